"""train-gate: gate math, every fusion, cache-only training, determinism, outputs, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from featcache.evaluation.runner import EvalConfig, run_eval
from featcache.gate import train as train_mod
from featcache.gate.model import GateModel, fusion_names
from featcache.gate.runner import run_train_gate
from featcache.errors import ConfigError, InputError, RunError
from featcache.gate.config import GateConfig
from featcache.synth_cache import write_feature_cache


@pytest.fixture(scope="session")  # session: kept while other modules interleave (a module scope is redone each time)
def fcache(tmp_path_factory) -> Path:
    return write_feature_cache(tmp_path_factory.mktemp("fc") / "feat.h5", ids=24, per_id=6, cams=4, views=3)


def cfg(cache: Path, out: Path, **kw) -> GateConfig:
    base = dict(cache=str(cache), out=str(out), experts=("clip-sim", "align-sim"), fusion="moe-top1", epochs=6, seed=42)
    base.update(kw)
    return GateConfig.from_dict(base)


def test_gate_temperatures_sparsity_and_gradients():
    torch.manual_seed(0)
    m = GateModel(["open_clip", "align"], [12, 10], "moe-top1", n_classes=5)
    xs = [torch.randn(8, 12), torch.randn(8, 10)]
    feats = [a(x) for a, x in zip(m.adapters, xs)]
    logits = m.fusion.gate(torch.cat(feats, 1))
    m.train()
    g_train, p_train = m.fusion.weights(feats)
    torch.testing.assert_close(g_train, torch.softmax(logits / 1.0, 1))  # dense, tau 1 in training
    m.eval()
    g_test, p_test = m.fusion.weights(feats)
    torch.testing.assert_close(p_test, torch.softmax(logits / 0.5, 1))  # tau 0.5 at inference
    assert torch.equal(g_test, torch.nn.functional.one_hot(logits.argmax(1), 2).float())  # top-1, renormalised
    m.train()
    fo, neck, out = m(xs)
    (out.logsumexp(1).mean() + fo.feature.pow(2).mean()).backward()
    assert m.fusion.gate[0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.adapters.parameters())
    soft = GateModel(["open_clip", "align"], [12, 10], "moe-soft", 5).eval()
    g, p = soft.fusion.weights([a(x) for a, x in zip(soft.adapters, xs)])
    torch.testing.assert_close(g, p)  # dense mixture at inference too


# the method's fusion in every run; the others with -m slow (concat, its plainest baseline, trains in every run's
# pipeline test too: test_pipeline.py's demo trains concat and moe-top1)
@pytest.mark.parametrize("fusion", [f if f == "moe-top1" else pytest.param(f, marks=pytest.mark.slow)
                                    for f in fusion_names()])
@pytest.mark.heavy
def test_every_fusion_trains_and_beats_raw_concatenation(fcache, tmp_path, fusion):
    raw = run_eval(EvalConfig(fcache, "concat:clip-sim,align-sim")).report["mAP"]
    res = run_train_gate(cfg(fcache, tmp_path / fusion, fusion=fusion, epochs=8))
    m = run_eval(EvalConfig(fcache, f"gate:{res.run}")).report["mAP"]
    assert m > raw + 0.05, f"{fusion}: mAP {m:.3f} vs raw concatenation {raw:.3f}"


def test_trains_from_the_cache_alone(fcache, tmp_path, monkeypatch):
    import open_clip.model
    import transformers

    from featcache.backbones import build_backbone
    from featcache.backbones.base import Backbone

    def boom(*a, **k):
        raise AssertionError("a backbone was constructed")

    monkeypatch.setattr(Backbone, "__init__", boom)  # every featcache backbone is built through it
    monkeypatch.setattr(open_clip.model.CLIP, "__init__", boom)
    monkeypatch.setattr(transformers.AlignVisionModel, "__init__", boom)
    with pytest.raises(AssertionError, match="a backbone was constructed"):
        build_backbone("clip-tiny", (32, 32))  # the patch is in force: building one would fail the run below
    res = run_train_gate(cfg(fcache, tmp_path / "r", epochs=2))
    assert (res.run / "model.safetensors").is_file()


def test_teacher_targets_reader(fcache, tmp_path):
    from featcache.cache import open_cache_file, read_identity
    from featcache.cache.targets import TeacherTargets

    res = run_train_gate(cfg(fcache, tmp_path / "r", epochs=1))
    with open_cache_file(fcache) as f:
        ident = read_identity(f, fcache).digest()
    t = TeacherTargets.load(res.targets, cache_identity=ident)
    assert t.experts == ["clip-sim", "align-sim"] and t.feature.shape[1] == 2048
    rows = t.rows(t.image[[5, 0, 9]], t.view[[5, 0, 9]])
    assert list(rows) == [5, 0, 9]
    with pytest.raises(InputError, match="no target for image row"):
        t.rows(np.array([10**6]), np.array([0]))
    with pytest.raises(InputError, match="made from another cache"):
        TeacherTargets.load(res.targets, cache_identity="0" * 40)
    with h5py.File(res.targets, "r+") as f:
        f["logits"][7, 2] = np.inf
        image7 = int(f["image"][7])
    with pytest.raises(InputError, match=f"1 row\\(s\\) of logits hold NaN or inf \\(cache image rows {image7}\\)"):
        TeacherTargets.load(res.targets)
    with h5py.File(res.targets, "r+") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(InputError, match="version 99, newer"):
        TeacherTargets.load(res.targets)


def test_teacher_targets_hold_the_retrieval_feature_and_the_held_out_identities(fcache, tmp_path):
    """Version 2: each row's L2-normalised retrieval feature, and view 0 of every held-out image, whose features
    rank exactly as the run's own validation did (the same mAP as val.json)."""
    import json

    from featcache.cache.targets import TeacherTargets
    from featcache.evaluation.heldout import evaluate_split

    res = run_train_gate(cfg(fcache, tmp_path / "r", epochs=2, val_ids=4))
    t = TeacherTargets.load(res.targets)
    np.testing.assert_allclose(np.linalg.norm(t.retrieval, axis=1), 1.0, rtol=1e-5)
    assert t.retrieval.shape == t.feature.shape
    val = t.val
    assert len(np.unique(val.pid)) == 4 and not np.isin(val.pid, t.label_pids).any()  # held out of training
    assert not np.isin(val.image, t.image).any() and val.query.sum() < len(val.query)
    again = evaluate_split(val.retrieval, val.pid, val.camid, val.query)
    assert again["mAP"] == pytest.approx(json.loads((res.run / "val.json").read_text())["mAP"], abs=1e-6)
    assert TeacherTargets.load(run_train_gate(cfg(fcache, tmp_path / "r0", epochs=1)).targets).val is None


def test_gate_features_in_blocks_on_the_device_equal_one_pass(fcache, tmp_path):
    res = run_train_gate(cfg(fcache, tmp_path / "r", epochs=2, fusion="moe-soft"))
    one = run_eval(EvalConfig(fcache, f"gate:{res.run}", flip=True))
    many = run_eval(EvalConfig(fcache, f"gate:{res.run}", flip=True, budget_mb=1, device="cpu"))
    np.testing.assert_allclose(one.qf, many.qf, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one.gf, many.gf, rtol=1e-5, atol=1e-6)
    from featcache.gate.features import GateFeatures
    from featcache.evaluation.features import FeatureContext

    src = GateFeatures(res.run)
    split = one.gallery
    tiny = FeatureContext("cpu", False, budget=1)  # one row a block
    np.testing.assert_allclose(src.features(split, tiny), src.features(split, FeatureContext("cpu")), rtol=1e-5, atol=1e-6)


def test_killed_after_logging_before_its_checkpoint_resumes_without_a_duplicate_row(fcache, tmp_path, monkeypatch):
    from featcache.training import rundir

    full = run_train_gate(cfg(fcache, tmp_path / "full", epochs=3))

    def die(name):
        if name == "train.after_log":
            raise KeyboardInterrupt

    monkeypatch.setattr(rundir, "fault_point", die)
    with pytest.raises(KeyboardInterrupt):
        run_train_gate(cfg(fcache, tmp_path / "cut", epochs=3))  # epoch 1 logged, no checkpoint
    monkeypatch.undo()
    assert len((tmp_path / "cut" / "log.csv").read_text().splitlines()) == 2
    cut = run_train_gate(cfg(fcache, tmp_path / "cut", epochs=3), resume=True)
    assert [r.split(",")[0] for r in (cut.run / "log.csv").read_text().splitlines()] == ["epoch", "1", "2", "3"]
    assert (cut.run / "model.safetensors").read_bytes() == (full.run / "model.safetensors").read_bytes()


@pytest.mark.heavy
def test_deterministic_for_a_seed_and_outputs(fcache, tmp_path):
    a = run_train_gate(cfg(fcache, tmp_path / "a", epochs=3))
    b = run_train_gate(cfg(fcache, tmp_path / "b", epochs=3))
    c = run_train_gate(cfg(fcache, tmp_path / "c", epochs=3, seed=1337))
    wa, wb, wc = ((r.run / "model.safetensors").read_bytes() for r in (a, b, c))
    assert wa == wb != wc
    for name in ("config.yaml", "log.csv", "gate_stats.json", "gate_hist.png", "teacher_targets.h5", "model.safetensors"):
        assert (a.run / name).is_file()
    stats = json.loads((a.run / "gate_stats.json").read_text())
    assert set(stats["mean_weight"]) == {"clip-sim", "align-sim"} and len(stats["per_camera"]) == 4
    assert sum(stats["routed_share"].values()) == pytest.approx(1.0)
    avg = run_train_gate(cfg(fcache, tmp_path / "avg", epochs=1, fusion="average"))
    assert json.loads((avg.run / "gate_stats.json").read_text())["routed_share"] is None
    with h5py.File(fcache, "r") as f:
        train_rows = int(f["images/n_views"][...][f["images/split"][...] == 0].sum())
        n_ids = len(np.unique(f["images/pid"][...][f["images/split"][...] == 0]))
    with h5py.File(a.targets, "r") as t:
        assert t["feature"].shape == (train_rows, 2048) and t["logits"].shape == (train_rows, n_ids) and t["gates"].shape == (train_rows, 2)
        assert t.attrs["cache"] == str(fcache.resolve()) and t.attrs["run"] == str(a.run.resolve())
        assert set(np.unique(t["view"][...])) == {0, 1, 2}
        np.testing.assert_allclose(t["gates"][...].sum(1), 1.0, rtol=1e-5)
    assert len((a.run / "log.csv").read_text().splitlines()) == 4


@pytest.mark.slow  # tests/test_faults.py resumes train-gate after 3 random SIGKILLs in every run (20 under -m slow); this is the in-process form
def test_resume_after_interruption_equals_an_uninterrupted_run(fcache, tmp_path, monkeypatch):
    from conftest import interrupt_after_epoch

    full = run_train_gate(cfg(fcache, tmp_path / "full", epochs=4))
    undo = interrupt_after_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_train_gate(cfg(fcache, tmp_path / "cut", epochs=4))
    undo()
    assert not (tmp_path / "cut" / "model.safetensors").exists()  # unfinished: no final weights
    with pytest.raises(InputError, match="unfinished run \\(it reached epoch 2 of 4\\)"):
        run_eval(EvalConfig(fcache, f"gate:{tmp_path / 'cut'}"))
    with pytest.raises(InputError, match="--resume"):
        run_train_gate(cfg(fcache, tmp_path / "cut", epochs=4))
    cut = run_train_gate(cfg(fcache, tmp_path / "cut", epochs=4), resume=True)
    assert (cut.run / "model.safetensors").read_bytes() == (full.run / "model.safetensors").read_bytes()
    assert len((cut.run / "log.csv").read_text().splitlines()) == 5


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(fcache, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train_mod.batch_hard_triplet

    def poisoned(*a, **k):
        calls["n"] += 1
        return real(*a, **k) * (float("nan") if calls["n"] > 12 else 1.0)

    monkeypatch.setattr(train_mod, "batch_hard_triplet", poisoned)
    with pytest.raises(RunError, match="loss became nan.*last good checkpoint") as now:
        run_train_gate(cfg(fcache, tmp_path / "nan", epochs=5))
    last = int((tmp_path / "nan" / "ckpt" / "last").read_text())
    assert last >= 1 and (tmp_path / "nan" / "ckpt" / f"weights-{last:04d}.safetensors").is_file()
    # the GPU's way: checked at the epoch's end, without a wait per step; the same batch named, the same checkpoint kept
    calls["n"] = 0
    from featcache.training import loop

    monkeypatch.setattr(loop, "DEFER_NAN_CHECK", True)
    with pytest.raises(RunError, match="loss became nan.*last good checkpoint") as deferred:
        run_train_gate(cfg(fcache, tmp_path / "nan-deferred", epochs=5))
    assert str(deferred.value).replace("nan-deferred", "nan") == str(now.value)
    assert int((tmp_path / "nan-deferred" / "ckpt" / "last").read_text()) == last


def test_bad_input(fcache, tmp_path, market_cache):
    with pytest.raises(Exception, match="lacks the expert"):
        run_train_gate(cfg(fcache, tmp_path / "x", experts=("clip-sim", "dino")))
    tiny = write_feature_cache(tmp_path / "tiny.h5", ids=6, per_id=4, cams=2)
    with pytest.raises(InputError, match="fewer than P = 8"):
        run_train_gate(cfg(tiny, tmp_path / "y"))
    run_train_gate(cfg(fcache, tmp_path / "z", epochs=1))
    other = write_feature_cache(tmp_path / "other.h5", ids=24, per_id=6, cams=4, views=3, seed=5)
    with pytest.raises(InputError, match="other inputs"):
        run_train_gate(cfg(other, tmp_path / "z", epochs=1), resume=True)
    with pytest.raises(Exception, match="was trained on"):
        run_eval(EvalConfig(other, f"gate:{tmp_path / 'z'}"))
    with pytest.raises(ConfigError, match="open_clip family"):
        run_train_gate(cfg(fcache, tmp_path / "w", experts=("align-sim",), fusion="clip"))
    with pytest.raises(ConfigError, match="needs at least two"):
        cfg(fcache, tmp_path / "v", experts=("clip-sim",), fusion="moe-top1")
    run_train_gate(cfg(fcache, tmp_path / "v", experts=("clip-sim",), fusion="clip", epochs=1))  # one expert alone is fine


def test_three_experts(tmp_path):
    experts = {"clip-a": ("open_clip", 48), "align-b": ("align", 40), "clip-c": ("open_clip", 32)}
    cache = write_feature_cache(tmp_path / "k3.h5", ids=16, per_id=4, cams=3, views=2, experts=experts)
    res = run_train_gate(cfg(cache, tmp_path / "r", experts=tuple(experts), epochs=2, fusion="moe-top2"))
    stats = json.loads((res.run / "gate_stats.json").read_text())
    assert list(stats["mean_weight"]) == list(experts)
    with h5py.File(res.targets, "r") as t:
        assert t["gates"].shape[1] == 3 and ((t["gates"][...] > 0).sum(1) <= 2).all()  # top-2 of 3 at inference
    assert run_eval(EvalConfig(cache, f"gate:{res.run}")).report["queries_evaluated"] > 0


def test_cache_without_training_split(market_root, tmp_path):
    from conftest import extract_cfg
    from featcache.extract.runner import run_extract

    root = tmp_path / "csv"
    root.mkdir()
    img = next((market_root / "query").glob("*.jpg"))
    (root / "a.jpg").write_bytes(img.read_bytes())
    (root / "manifest.csv").write_text("path,pid,camid,split\na.jpg,1,1,query\na.jpg,1,2,gallery\n")
    run_extract(extract_cfg(root, tmp_path / "c.h5", dataset="csv", backbones=("clip-tiny", "align-tiny")))
    with pytest.raises(Exception, match="no cached training images"):
        run_train_gate(cfg(tmp_path / "c.h5", tmp_path / "r", experts=("clip-tiny", "align-tiny")))


def test_resume_from_the_command_line_needs_only_the_run_directory(fcache, tmp_path, monkeypatch):
    """`train-gate --resume --out RUN` takes every other option from RUN/config.yaml; options given must agree."""
    from click.testing import CliRunner

    from conftest import interrupt_after_epoch
    from featcache.cli import main

    run = tmp_path / "cut"
    args = ["train-gate", "--cache", str(fcache), "--out", str(run), "--epochs", "3", "--device", "cpu", "--set", "lr=0.001"]
    undo = interrupt_after_epoch(monkeypatch, 1)
    CliRunner().invoke(main, args)
    undo()
    assert not (run / "model.safetensors").exists()
    res = CliRunner().invoke(main, ["train-gate", "--resume", "--out", str(run), "--set", "lr=0.01"])
    assert res.exit_code == 1 and "--resume with another config (lr: 0.001 -> 0.01)" in res.output
    res = CliRunner().invoke(main, ["train-gate", "--resume", "--out", str(run)])
    assert res.exit_code == 0, res.output
    assert (run / "model.safetensors").exists() and len((run / "log.csv").read_text().splitlines()) == 4
    res = CliRunner().invoke(main, ["train-gate", "--resume", "--out", str(tmp_path / "none")])  # nothing to continue:
    assert res.exit_code == 2 and "missing --cache" in res.output                               # a new run needs its options
    res = CliRunner().invoke(main, ["train-gate", "--resume"])
    assert res.exit_code == 2 and "--resume: give --out RUN_DIR" in res.output


def test_a_teacher_evaluated_on_another_cache_is_recorded_and_warned_about(fcache, tmp_path, caplog):
    """Same expert weights, other data (say a teacher trained on Market-1501 evaluated with --cache VeRi): it runs,
    the JSON records the cache the model was trained on, and a warning says how cross-domain evaluation goes."""
    run = run_train_gate(cfg(fcache, tmp_path / "g", epochs=1)).run
    same = run_eval(EvalConfig(fcache, f"gate:{run}")).report
    assert same["model"]["trained_on"]["identity"] == same["cache"]["identity"] and "warnings" not in same
    other = write_feature_cache(tmp_path / "other.h5", ids=20, per_id=6, cams=4, views=3)  # same synthetic weights
    with caplog.at_level("WARNING"):
        rep = run_eval(EvalConfig(other, f"gate:{run}")).report
    assert rep["model"]["trained_on"]["cache"] == str(fcache)
    assert "was trained on the cache" in rep["warnings"][0] and "--gallery-cache" in rep["warnings"][0]
    assert "was trained on the cache" in caplog.text
    from click.testing import CliRunner

    from featcache.cli import main

    out = CliRunner().invoke(main, ["eval", "--cache", str(other), "--model", f"gate:{run}"]).output
    assert out.count("was trained on the cache") == 1  # once (it was printed twice: as a log line and in the table)
    cross = run_eval(EvalConfig(fcache, f"gate:{run}", gallery_cache=other)).report  # the cross-domain way: no warning
    assert "warnings" not in cross


def test_a_fusion_without_gate_says_so_and_a_collapsed_gate_is_warned_about(fcache, tmp_path):
    from click.testing import CliRunner

    from featcache.cli import main
    from featcache.gate.outputs import collapse_note

    def train(out: str, *args: str) -> str:
        return CliRunner().invoke(main, ["train-gate", "--cache", str(fcache), "--out", str(tmp_path / out), "--epochs", "2",
                                         "--device", "cpu", *args]).output

    out = train("avg", "--fusion", "average")
    assert "fusion average (no gate)" in out and "gate mean weights" not in out
    stats = {"gated": True, "routed_share": {"clip-sim": 0.995, "align-sim": 0.005}}
    assert "sends 99.5% of the training images to clip-sim" in collapse_note(stats)
    assert collapse_note({**stats, "routed_share": {"clip-sim": 0.98, "align-sim": 0.02}}) is None
    assert collapse_note({**stats, "gated": False}) is None  # a single expert routes everything to itself by design
    out = train("paper", "--gate-recipe", "paper")  # the paper's recipe collapses here (docs/train-gate.md)
    stats = json.loads((tmp_path / "paper" / "gate_stats.json").read_text())
    assert stats["collapsed_onto"] is not None and out.count("collapsed onto one expert") == 1
