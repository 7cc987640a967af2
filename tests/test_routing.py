"""Gate routing: each remedy's math on small cases, the default recipe routing by camera, the paper recipe, the oracle."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
import torch

from featcache.errors import ConfigError, InputError
from featcache.gate.config import GateConfig
from featcache.gate.routing import RECIPES, Routing
from featcache.gate.model import GateModel
from featcache.gate.runner import run_train_gate
from featcache.cli import main
from featcache.synth_cache import write_feature_cache


def gated(routing: Routing, fusion: str = "moe-top1") -> tuple[GateModel, list[torch.Tensor]]:
    torch.manual_seed(0)
    m = GateModel(["open_clip", "align"], [12, 10], fusion, n_classes=5, routing=routing)
    return m, [torch.randn(8, 12), torch.randn(8, 10)]


def test_noise_only_in_training():
    m, xs = gated(Routing(gate_noise=1.0))
    feats = [a(x) for a, x in zip(m.adapters, xs)]
    m.eval()
    a, _ = m.fusion.weights(feats, xs)
    b, _ = m.fusion.weights(feats, xs)
    assert torch.equal(a, b)
    m.train()
    h1 = m.fusion.logits(m.fusion.gate_input(feats, xs))
    h2 = m.fusion.logits(m.fusion.gate_input(feats, xs))
    assert not torch.allclose(h1, h2)


def test_balancing_losses_at_perfect_balance():
    from featcache.gate.objective import balance_losses

    r = Routing(importance=1.0, gate_init="zero")
    m, xs = gated(r)  # zero init: every expert equally likely
    m.train()
    fo, _, _ = m(xs)
    assert balance_losses(m, fo, r).item() == pytest.approx(0.0, abs=1e-9)  # importance CV^2 is 0 when the experts' weights are equal
    r = Routing(balance=1.0, gate_init="zero")
    m, xs = gated(r)
    m.train()
    fo, _, _ = m(xs)
    # Switch loss: K * sum(share routed * mean probability); all routed to expert 0 by the tie: 2 * 1 * 0.5 = 1
    assert balance_losses(m, fo, r).item() == pytest.approx(1.0)


def test_smooth_load_by_hand():
    from featcache.gate.objective import cv_squared, smooth_load

    clean = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    noisy = torch.tensor([[0.5, -0.5], [0.2, 0.4]])
    std = torch.tensor([[1.0, 1.0], [0.5, 2.0]])
    phi = torch.distributions.Normal(0.0, 1.0).cdf
    # image 0: expert 0 leads, so its threshold is the other's noisy logit (-0.5); expert 1's is expert 0's (0.5)
    # image 1: expert 1 leads; expert 0 must beat 0.4, expert 1 must beat 0.2
    want = torch.stack([phi(torch.tensor([0.5, -0.5])), phi(torch.tensor([(1.0 - 0.4) / 0.5, (0.0 - 0.2) / 2.0]))])
    assert torch.allclose(smooth_load(clean, noisy, std, 1), want)
    assert torch.equal(smooth_load(clean, noisy, std, 2), torch.ones(2, 2))  # top-2 of 2: every expert always loaded
    mirrored = smooth_load(torch.tensor([[0.3, 0.0], [0.0, 0.3]]), torch.tensor([[0.9, 0.1], [0.1, 0.9]]), torch.ones(2, 2), 1)
    assert cv_squared(mirrored.sum(0)).item() == pytest.approx(0.0, abs=1e-12)  # balanced: no load loss


def test_agreement_loss_by_hand():
    from featcache.gate.objective import agreement_loss

    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert agreement_loss([a, 3 * a]).item() == pytest.approx(0.0, abs=1e-7)  # same direction: agree
    b = torch.tensor([[0.0, 1.0], [0.0, -1.0]])  # orthogonal (1 - 0), opposite (1 - (-1))
    assert agreement_loss([a, b]).item() == pytest.approx((1 + 2) / 2)
    assert agreement_loss([a, a, b]).item() == pytest.approx((0 + 1.5 + 1.5) / 3)  # every pair, equally weighted


def test_load_loss_reaches_the_gate_and_its_noise():
    from featcache.gate.objective import balance_losses

    r = Routing(gate_noise=1.0, load=1.0)
    m, xs = gated(r)
    m.train()
    fo, _, _ = m(xs)
    loss = balance_losses(m, fo, r)
    assert loss.item() > 0
    loss.backward()
    assert m.fusion.gate[-1].weight.grad.abs().sum() > 0 and m.fusion.noise.weight.grad.abs().sum() > 0
    m.eval()
    fo, _, _ = m(xs)
    assert balance_losses(m, fo, r).item() == 0.0  # no noise, no load loss outside training


def test_straight_through_uses_hard_weights_forward_and_reaches_the_gate():
    m, xs = gated(Routing(train_routing="straight-through"))
    m.train()
    fo, _, logits = m(xs)
    assert set(fo.gates.detach().flatten().tolist()) <= {0.0, 1.0} and torch.allclose(fo.gates.sum(1), torch.ones(8))
    (logits.logsumexp(1).mean() + fo.feature.pow(2).mean()).backward()
    assert m.fusion.gate[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("gate_input", ["raw", "adapted"])
def test_detached_gate_does_not_move_the_adapters(gate_input):
    for detach in (True, False):
        m, xs = gated(Routing(gate_input=gate_input, gate_detach=detach))
        m.train()
        feats = [a(x) for a, x in zip(m.adapters, xs)]
        _, p = m.fusion.weights(feats, xs)
        p[:, 0].sum().backward()
        moved = any(q.grad is not None and q.grad.abs().sum() > 0 for q in m.adapters.parameters())
        assert moved == (gate_input == "adapted" and not detach), (gate_input, detach)
        assert m.fusion.gate[0].weight.grad.abs().sum() > 0


def fidelity(run: Path, cache: Path) -> float:
    import h5py

    with h5py.File(cache, "r") as f:
        names = json.loads(f["synthetic"].attrs["experts"])
    per = json.loads((run / "gate_stats.json").read_text())["per_camera"]
    return sum(per[c][names[int(c) % 2]] for c in per) / len(per)


@pytest.fixture(scope="session")  # session: kept while other modules interleave (a module scope is redone each time)
def camera_cache(tmp_path_factory) -> Path:
    return write_feature_cache(tmp_path_factory.mktemp("routing") / "cam.h5", ids=24, per_id=6, cams=4, views=3, kind="camera")


@pytest.mark.heavy
def test_default_recipe_routes_by_camera_and_the_paper_recipe_runs(camera_cache, tmp_path):
    routed = run_train_gate(GateConfig.from_dict(dict(cache=camera_cache, out=tmp_path / "routed", epochs=15)))
    assert fidelity(routed.run, camera_cache) >= 0.8
    paper = run_train_gate(GateConfig.from_dict(dict(cache=camera_cache, out=tmp_path / "paper", epochs=2, gate_recipe="paper")))
    saved = json.loads(json.dumps(__import__("yaml").safe_load((paper.run / "config.yaml").read_text())))["train-gate"]
    routing = saved["routing"]  # the recipe's values, resolved, as one nested map
    assert (saved["gate_recipe"], routing["gate_input"], routing["train_routing"], routing["route_by_loss"]) == ("paper", "adapted", "dense", 0.0)
    assert not set(saved) & set(routing)
    rows = list(csv.DictReader((routed.run / "log.csv").open()))
    assert len(rows) == 15 and {"gate_entropy", "routed_cam1_clip-sim", "routed_align-sim"} <= set(rows[0])
    for png in ("gate_heatmap.png", "gate_hist.png", "gate_routing.png"):
        assert (routed.run / png).stat().st_size > 1000


def test_oracle_router(camera_cache, tmp_path):
    from featcache.evaluation.runner import EvalConfig, run_eval

    res = run_train_gate(GateConfig.from_dict(dict(cache=camera_cache, out=tmp_path / "oracle", fusion="moe-oracle", epochs=2)))
    assert fidelity(res.run, camera_cache) == 1.0
    assert run_eval(EvalConfig(camera_cache, f"gate:{res.run}")).report["queries_evaluated"] > 0
    twin = write_feature_cache(tmp_path / "twin.h5", ids=16, per_id=4, cams=4, views=2, kind="twin")
    with pytest.raises(InputError, match="moe-oracle routes by the known reliable expert"):
        run_train_gate(GateConfig.from_dict(dict(cache=twin, out=tmp_path / "o2", fusion="moe-oracle", epochs=1)))


@pytest.mark.parametrize("over, text", [
    ({"fusion": "concat", "gate_noise": 0.5}, "--fusion concat has no gate, so gate_noise cannot apply"),
    ({"balance": -0.1}, "balance=-0.1: expected 0 or more"),
    ({"fusion": "moe-soft", "train_routing": "gumbel"}, "moe-soft mixes all of them densely"),
    ({"gate_recipe": "fancy"}, "--gate-recipe 'fancy'"),
    ({"warmup": 1.0}, "warmup=1.0"),
    ({"load": 0.1}, "load=0.1 estimates how the noise moves each expert's load, so it needs --set gate_noise above 0"),
    ({"fusion": "moe-soft", "load": 0.1, "gate_noise": 1.0}, "--fusion moe-soft sends every image to every expert"),
    ({"fusion": "concat", "expert_neck": True}, "--fusion concat is not a weighted mix of experts"),
    ({"gate_recipe": "paper", "gate_freeze": True}, "gate_freeze=true keeps the routing learned during the warm-up"),
    ({"retrieval": "logits"}, "--set retrieval=logits: expected one of neck, id-span"),
    ({"cross_expert": -1.0}, "cross_expert=-1.0: expected 0 or more"),
    ({"val_ids": -2}, "val_ids=-2: expected 0 or more"),
])
def test_nonsense_combinations_are_refused(tmp_path, over, text):
    with pytest.raises(ConfigError, match=text.replace("(", "\\(").replace(")", "\\)")):
        GateConfig.from_dict({"cache": tmp_path / "c.h5", "out": tmp_path / "r", **over})


def test_recipes_are_what_the_docs_say():
    assert RECIPES["paper"] == Routing()  # Eq. 7-9: adapted input, dense softmax at tau 1, nothing added
    r = RECIPES["routed"]
    assert (r.gate_input, r.gate_detach, r.gate_init, r.train_routing, r.warmup, r.route_by_loss) == ("raw", True, "zero", "straight-through", 0.5, 1.0)
    assert (r.gate_freeze, r.retrieval, r.expert_loss) == (True, "id-span", 0.5)


def test_expert_fields_train_every_fusion_and_gate_fields_only_gated_ones(tmp_path):
    base = {"cache": tmp_path / "c.h5", "out": tmp_path / "r"}
    avg = GateConfig.from_dict({**base, "fusion": "average"})
    avg = GateConfig.from_dict({**base, "fusion": "average"}).routing
    assert (avg.retrieval, avg.expert_loss, avg.route_by_loss, avg.warmup) == ("id-span", 0.5, 0.0, 0.0)
    assert GateConfig.from_dict({**base, "fusion": "average", "cross_expert": 1.0}).routing.cross_expert == 1.0
    nested = GateConfig.from_dict({**base, "fusion": "average", "routing": {"cross_expert": 1.0}})  # as config.yaml saves it
    assert nested.routing.cross_expert == 1.0 and nested.routing.retrieval == "id-span"
    paper = GateConfig.from_dict({**base, "fusion": "average", "gate_recipe": "paper"}).routing
    assert (paper.retrieval, paper.expert_loss) == ("neck", 0.0)
    concat = GateConfig.from_dict({**base, "fusion": "concat", "gate_recipe": "routed"}).routing
    assert (concat.expert_neck, concat.retrieval, concat.expert_loss) == (False, "neck", 0.5)
    assert GateConfig.from_dict({**base, "fusion": "clip"}).routing == Routing()  # one expert: nothing to align
    with pytest.raises(ConfigError, match="routing: unknown key 'balanse'.*balance"):
        GateConfig.from_dict({**base, "routing": {"balanse": 0.1}})


def test_id_span_is_an_orthogonal_projection_that_keeps_the_logits():
    m, xs = gated(Routing(retrieval="id-span"))
    m.eval()
    _, neck, logits = m(xs)
    m.id_span = False
    _, plain, plain_logits = m(xs)
    w = m.classifier.weight
    assert torch.allclose(logits, plain_logits) and torch.allclose(neck @ w.T, plain @ w.T, atol=1e-4)
    assert torch.allclose(m.project_id_span(neck), neck, atol=1e-4)              # idempotent
    assert ((plain - neck) @ w.T).abs().max() < 1e-4                            # what it drops is orthogonal to W's rows
    m.id_span = True
    m.train()
    fo, neck, _ = m(xs)
    assert torch.allclose(neck, m.bn(fo.feature))  # training sees the whole neck: the projection is for retrieval


def test_expert_necks_give_the_routed_experts_own_bn_feature():
    m, xs = gated(Routing(expert_neck=True))
    m.eval()
    fo, neck, _ = m(xs)
    want = torch.where(fo.gates[:, :1] > 0, m.necks[0](fo.experts[0]), m.necks[1](fo.experts[1]))
    assert set(fo.gates.flatten().tolist()) <= {0.0, 1.0} and torch.allclose(neck, want)


def test_cross_expert_triplet_by_hand():
    from featcache.training.losses import batch_hard_triplet

    a = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    y = torch.tensor([0, 1])
    # anchor a0: positive b0 at 1, negative b1 at sqrt(13); anchor a1: positive b1 at 2, negative b0 at 2
    want = (max(0, 1 - 13 ** 0.5 + 0.5) + max(0, 2 - 2 + 0.5)) / 2
    assert batch_hard_triplet(a, y, 0.5, others=b).item() == pytest.approx(want, rel=1e-5)


def test_cross_detach_moves_only_each_images_unreliable_expert():
    from featcache.gate.objective import alignment_losses

    m, xs = gated(Routing(cross_expert=1.0, cross_detach=True))
    m.train()
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    feats = [a(x) for a, x in zip(m.adapters, xs)]
    for f in feats:
        f.retain_grad()
    alignment_losses(m, feats, y, m.fusion.routing, 0.3).backward()
    reliable = m.expert_id_losses([f.detach() for f in feats], y).argmin(1)
    for e, f in enumerate(feats):
        moved = f.grad.abs().sum(1) > 0
        assert not moved[reliable == e].any()  # the reliable side is the target
        assert moved[reliable != e].any()


def test_frozen_gate_keeps_the_routing_of_the_warm_up(camera_cache, tmp_path):
    from featcache.training.rundir import RunDir

    cfg = GateConfig.from_dict(dict(cache=camera_cache, out=tmp_path / "g", epochs=4, warmup=0.5))
    run_train_gate(cfg)
    rows = list(csv.DictReader((tmp_path / "g" / "log.csv").open()))
    routed = [[r[k] for k in r if k.startswith("routed_cam")] for r in rows]
    assert routed[1] == routed[2] == routed[3]  # the gate stopped learning after epoch 2 of 4
    assert "val_pids" not in RunDir(tmp_path / "g", "train-gate").meta()  # as before validation existed: old runs resume


def test_validation_split_is_held_out_and_evaluated(camera_cache, tmp_path):
    from featcache.training.rundir import VAL
    from featcache.training.rundir import RunDir
    from featcache.training.validation import val_identities, val_queries

    pids = np.repeat(np.arange(1, 25), 6)
    held = val_identities(pids, 6)
    assert len(held) == 6 and np.array_equal(held, val_identities(pids[::-1], 6))  # a fixed choice
    with pytest.raises(InputError, match="at most 22 can be held out"):
        val_identities(pids, 23)
    q = val_queries(np.array([5, 5, 5, 7, 7]), np.array([1, 1, 2, 2, 2]))
    assert q.tolist() == [True, False, True, True, False]  # the first image of each identity in each camera
    res = run_train_gate(GateConfig.from_dict(dict(cache=camera_cache, out=tmp_path / "v", epochs=2, val_ids=6, seed=3)))
    meta = RunDir(res.run, "train-gate").meta()
    assert len(meta["val_pids"]) == 6 and not set(meta["val_pids"]) & set(meta["pids"]) and len(meta["pids"]) == 18
    val = json.loads((res.run / VAL).read_text())
    assert val["identities"] == 6 and 0 < val["mAP"] <= 1 and val["queries"] > 0
    assert val["queries_same"] + val["queries_cross"] >= val["queries_all"]


def test_ap_by_expert_by_hand():
    from featcache.gate.diagnostics import ap_by_expert

    g = np.eye(4, dtype=np.float32)
    q = np.array([[0.9, 0.5, 0.1, 0.0]], dtype=np.float32)  # ranks gallery 0, 1, 2, 3
    g_pids, g_cams = np.array([1, 2, 1, 1]), np.array([2, 2, 3, 1])  # gallery 3: same camera, junk
    res = ap_by_expert(q, g, np.array([1]), np.array([1]), g_pids, g_cams, np.array([0]), np.array([0, 0, 1, 0]))
    assert res["mAP_all"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert res["mAP_same"] == pytest.approx(1.0)       # match 0 alone; match 2 is junk for this group
    assert res["mAP_cross"] == pytest.approx(1 / 2)   # match 2 alone, behind the negative 1
    assert (res["queries_same"], res["queries_cross"]) == (1, 1)


def test_retrieval_targets_pick_the_expert_that_retrieves_each_image_best(camera_cache):
    from featcache.gate.data import load_train
    from featcache.gate.route_targets import NO_TARGET, retrieval_targets

    data = load_train(camera_cache, ["clip-sim", "align-sim"])
    targets = retrieval_targets(data)
    known = targets != NO_TARGET
    assert known.mean() > 0.5
    reliable = data.route[data.row_start]  # view 0 of each image: the expert the generator made reliable
    assert (targets[known] == reliable[known]).mean() > 0.6  # 0.66 here: raw features are dominated by the camera bias
    # an image alone in its identity has no positive, so no target
    lone = dataclasses.replace(data, labels=np.where(np.arange(len(data.labels)) == 0, data.labels.max() + 1, data.labels),
                               pids=np.append(data.pids, 10_000))
    assert retrieval_targets(lone)[0] == NO_TARGET


def test_retrieval_routing_option_trains(camera_cache, tmp_path):
    res = run_train_gate(GateConfig.from_dict(dict(cache=camera_cache, out=tmp_path / "r", epochs=4, route_target="retrieval")))
    assert fidelity(res.run, camera_cache) >= 0.8
    with pytest.raises(ConfigError, match="--set route_target=knn: expected one of loss, retrieval"):
        GateConfig.from_dict(dict(cache=camera_cache, out=tmp_path / "x", route_target="knn"))


def test_a_run_saved_before_the_new_fields_loads_as_it_was_trained(camera_cache, tmp_path):
    import yaml

    from featcache.gate.train import load_run

    res = run_train_gate(GateConfig.from_dict(dict(cache=camera_cache, out=tmp_path / "old", epochs=1, gate_freeze=False, retrieval="neck")))
    path = res.run / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    section = saved["train-gate"]
    section.update(section.pop("routing"))  # the flat form runs were saved in before the nested routing: map
    for k in ("expert_id", "expert_neck", "cross_expert", "cross_detach", "retrieval", "gate_freeze", "route_target", "val_ids"):
        section.pop(k)  # as a 2026-11-22 run wrote it
    path.write_text(yaml.safe_dump(saved))
    model, cfg, _ = load_run(res.run)
    r = cfg.routing
    assert (r.retrieval, r.gate_freeze, r.expert_neck) == ("neck", False, False) and model.necks is None and not model.id_span
    assert r.gate_input == section["gate_input"] == "raw" and r.warmup == section["warmup"] == 0.5  # the flat values it saved
    out = CliRunner().invoke(main, ["train-gate", "--resume", "--out", str(res.run)])  # resumes: nothing left to train
    assert out.exit_code == 0, out.output


def test_a_validation_split_without_true_matches_is_reported_not_fatal():
    from featcache.gate.data import ValData
    from featcache.gate.diagnostics import evaluate_val

    m, xs = gated(Routing(retrieval="id-span"))
    val = ValData([x.numpy() for x in xs], np.arange(8), np.ones(8, dtype=np.int64), np.arange(8) < 4, None, np.arange(8))  # one image each
    res = evaluate_val(m, val)
    assert res["mAP"] is None and "no query has a valid match" in res["reason"] and res["identities"] == 8


def test_the_oracle_routes_rendered_data_by_each_conditions_expert(tmp_path):
    """moe-oracle on a rendered synthetic dataset: each view goes to the expert named for its camera's condition
    (chosen beforehand on validation), read from the condition the cache records; without that choice it is refused."""
    from click.testing import CliRunner

    from conftest import extract_cfg
    from featcache.cli import main
    from featcache.errors import ConfigError
    from featcache.extract.runner import run_extract
    from featcache.gate.config import GateConfig
    from featcache.gate.data import load_train
    from featcache.synth import SynthConfig, generate

    root = tmp_path / "m"
    generate(SynthConfig(root, "market1501", ids=12, cams=3, seed=2, night_cams=(2,), blur_cams=(3,)))
    cache = tmp_path / "c.h5"
    run_extract(extract_cfg(root, cache))
    experts = ["align-tiny", "clip-tiny"]
    data = load_train(cache, experts, oracle={"night": "align-tiny", "day": "clip-tiny", "blur": "clip-tiny"})
    per_row_cam = np.repeat(data.camids, data.n_views)
    assert (data.route == np.where(per_row_cam == 2, 0, 1)).all()
    assert load_train(cache, experts).route is None  # no choice given: no route
    out = tmp_path / "oracle"
    res = CliRunner().invoke(main, ["train-gate", "--cache", str(cache), "--out", str(out), "--fusion", "moe-oracle", "--epochs", "1",
                                    "--batch-size", "8", "--set", "oracle_route=night=align-tiny,day=clip-tiny,blur=clip-tiny"])
    assert res.exit_code == 0, res.output
    stats = json.loads((out / "gate_stats.json").read_text())
    assert stats["per_camera"]["2"]["align-tiny"] == 1.0 and stats["per_camera"]["1"]["clip-tiny"] == 1.0
    res = CliRunner().invoke(main, ["eval", "--cache", str(cache), "--model", f"gate:{out}"])
    assert res.exit_code == 0, res.output  # evaluation routes the query and gallery views the same way
    res = CliRunner().invoke(main, ["train-gate", "--cache", str(cache), "--out", str(tmp_path / "x"), "--fusion", "moe-oracle",
                                    "--epochs", "1", "--batch-size", "8"])
    assert res.exit_code == 1 and "--set oracle_route=" in res.output
    with pytest.raises(ConfigError, match="only --fusion moe-oracle"):
        GateConfig.from_dict(dict(cache=cache, out=tmp_path / "y", fusion="moe-top1", oracle_route=("night=align-tiny",)))
    with pytest.raises(ConfigError, match="CONDITION=EXPERT"):
        GateConfig.from_dict(dict(cache=cache, out=tmp_path / "y", fusion="moe-oracle", oracle_route=("dusk=align-tiny",)))
