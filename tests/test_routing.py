"""Gate routing: each remedy's math on small cases, the default recipe routing by camera, the paper recipe, the oracle."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from featcache.errors import ConfigError, InputError
from featcache.gate.config import RECIPES, GateConfig, Routing
from featcache.gate.model import GateModel
from featcache.gate.runner import run_train_gate
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
    m, xs = gated(Routing(importance=1.0, gate_init="zero"))  # zero init: every expert equally likely
    m.train()
    fo, _, _ = m(xs)
    assert fo.aux_loss.item() == pytest.approx(0.0, abs=1e-9)  # importance CV^2 is 0 when the experts' weights are equal
    m, xs = gated(Routing(balance=1.0, gate_init="zero"))
    m.train()
    fo, _, _ = m(xs)
    # Switch loss: K * sum(share routed * mean probability); all routed to expert 0 by the tie: 2 * 1 * 0.5 = 1
    assert fo.aux_loss.item() == pytest.approx(1.0)


def test_smooth_load_by_hand():
    from featcache.gate.model import cv_squared, smooth_load

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
    from featcache.gate.model import agreement_loss

    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert agreement_loss([a, 3 * a]).item() == pytest.approx(0.0, abs=1e-7)  # same direction: agree
    b = torch.tensor([[0.0, 1.0], [0.0, -1.0]])  # orthogonal (1 - 0), opposite (1 - (-1))
    assert agreement_loss([a, b]).item() == pytest.approx((1 + 2) / 2)
    assert agreement_loss([a, a, b]).item() == pytest.approx((0 + 1.5 + 1.5) / 3)  # every pair, equally weighted


def test_load_loss_reaches_the_gate_and_its_noise():
    m, xs = gated(Routing(gate_noise=1.0, load=1.0))
    m.train()
    fo, _, _ = m(xs)
    assert fo.aux_loss.item() > 0
    fo.aux_loss.backward()
    assert m.fusion.gate[-1].weight.grad.abs().sum() > 0 and m.fusion.noise.weight.grad.abs().sum() > 0
    m.eval()
    fo, _, _ = m(xs)
    assert fo.aux_loss.item() == 0.0  # no noise, no load loss outside training


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


@pytest.fixture(scope="module")
def camera_cache(tmp_path_factory) -> Path:
    return write_feature_cache(tmp_path_factory.mktemp("routing") / "cam.h5", ids=24, per_id=6, cams=4, views=3, kind="camera")


def test_default_recipe_routes_by_camera_and_the_paper_recipe_runs(camera_cache, tmp_path):
    routed = run_train_gate(GateConfig(camera_cache, tmp_path / "routed", epochs=15))
    assert fidelity(routed.run, camera_cache) >= 0.8
    paper = run_train_gate(GateConfig(camera_cache, tmp_path / "paper", epochs=15, gate_recipe="paper"))
    saved = json.loads(json.dumps(__import__("yaml").safe_load((paper.run / "config.yaml").read_text())))["train-gate"]
    assert (saved["gate_recipe"], saved["gate_input"], saved["train_routing"], saved["route_by_loss"]) == ("paper", "adapted", "dense", 0.0)
    rows = list(csv.DictReader((routed.run / "log.csv").open()))
    assert len(rows) == 15 and {"gate_entropy", "routed_cam1_clip-sim", "routed_align-sim"} <= set(rows[0])
    for png in ("gate_heatmap.png", "gate_hist.png", "gate_routing.png"):
        assert (routed.run / png).stat().st_size > 1000


def test_oracle_router(camera_cache, tmp_path):
    from featcache.evaluation.runner import EvalConfig, run_eval

    res = run_train_gate(GateConfig(camera_cache, tmp_path / "oracle", fusion="moe-oracle", epochs=2))
    assert fidelity(res.run, camera_cache) == 1.0
    assert run_eval(EvalConfig(camera_cache, f"gate:{res.run}")).report["queries_evaluated"] > 0
    twin = write_feature_cache(tmp_path / "twin.h5", ids=16, per_id=4, cams=4, views=2, kind="twin")
    with pytest.raises(InputError, match="moe-oracle routes by the known reliable expert"):
        run_train_gate(GateConfig(twin, tmp_path / "o2", fusion="moe-oracle", epochs=1))


@pytest.mark.parametrize("over, text", [
    ({"fusion": "concat", "gate_noise": 0.5}, "--fusion concat has no gate, so gate_noise cannot apply"),
    ({"balance": -0.1}, "balance=-0.1: expected 0 or more"),
    ({"fusion": "moe-soft", "train_routing": "gumbel"}, "moe-soft mixes all of them densely"),
    ({"gate_recipe": "fancy"}, "--gate-recipe 'fancy'"),
    ({"warmup": 1.0}, "warmup=1.0"),
    ({"load": 0.1}, "load=0.1 estimates how the noise moves each expert's load, so it needs --set gate_noise above 0"),
    ({"fusion": "moe-soft", "load": 0.1, "gate_noise": 1.0}, "--fusion moe-soft sends every image to every expert"),
])
def test_nonsense_combinations_are_refused(tmp_path, over, text):
    with pytest.raises(ConfigError, match=text.replace("(", "\\(").replace(")", "\\)")):
        GateConfig.from_dict({"cache": tmp_path / "c.h5", "out": tmp_path / "r", **over})


def test_recipes_are_what_the_docs_say():
    assert RECIPES["paper"] == Routing()  # Eq. 7-9: adapted input, dense softmax at tau 1, nothing added
    r = RECIPES["routed"]
    assert (r.gate_input, r.gate_detach, r.gate_init, r.train_routing, r.warmup, r.route_by_loss) == ("raw", True, "zero", "straight-through", 0.5, 1.0)
