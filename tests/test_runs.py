"""Runs as users expect them of torchreid and fast-reid: live TensorBoard curves, and finished runs that extend."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from featcache.cli import main


@pytest.fixture(scope="session")
def feat_cache(tmp_path_factory) -> Path:
    from featcache.synth_cache import write_feature_cache

    return write_feature_cache(tmp_path_factory.mktemp("runs") / "feat.h5", ids=24, per_id=6, cams=4, views=3)


def gate(*args: str) -> str:
    res = CliRunner().invoke(main, ["train-gate", *args])
    assert res.exit_code == 0, res.output
    return res.output


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_train_gate_writes_live_curves_and_distill_its_validation(feat_cache, tmp_path):
    pytest.importorskip("tensorboard")
    gate("--cache", str(feat_cache), "--out", str(tmp_path / "g"), "--epochs", "2", "--device", "cpu")
    curves = scalars(tmp_path / "g")
    assert {"train-gate/loss", "train-gate/id", "train-gate/triplet", "train-gate/lr", "train-gate/images_per_s"} <= set(curves)
    assert [s for s, _ in curves["train-gate/loss"]] == [1, 2]


def test_distill_writes_its_curves(runs):
    pytest.importorskip("tensorboard")
    curves = scalars(runs["student"])
    assert {"distill/loss", "distill/kd", "distill/feat", "distill/lr"} <= set(curves)


def test_without_tensorboard_no_curves_and_one_note(feat_cache, tmp_path, monkeypatch):
    import importlib.util

    import featcache.training.hooks as hooks

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    monkeypatch.setattr(hooks, "_NOTED", set())
    said = [gate("--cache", str(feat_cache), "--out", str(tmp_path / name), "--epochs", "1", "--device", "cpu") for name in "ab"]
    assert not (tmp_path / "a" / "tb").exists() and not (tmp_path / "b" / "tb").exists()
    assert [out.count("pip install -e '.[tensorboard]'") for out in said] == [1, 0]  # once a process, not per run
    res = CliRunner().invoke(main, ["train-gate", "--cache", str(feat_cache), "--out", str(tmp_path / "c"), "--epochs", "1",
                                    "--tensorboard"])
    assert res.exit_code == 2 and "tensorboard package is not installed" in res.output


def test_a_finished_run_extends_with_a_larger_epochs(feat_cache, tmp_path):
    run = tmp_path / "g"
    base = ["--cache", str(feat_cache), "--device", "cpu", "--no-tensorboard"]
    gate(*base, "--out", str(run), "--epochs", "1")
    out = gate("--resume", "--out", str(run), "--epochs", "3")
    assert "nothing to do" not in out and not (run / "tb").exists()  # --no-tensorboard: no curves
    rows = list(csv.DictReader((run / "log.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and (run / "model.safetensors").is_file()
    assert json.loads((run / "run.json").read_text())["extended"] == [{"from_epochs": 1, "to_epochs": 3, "after_epoch": 1}]
    gate(*base, "--out", str(tmp_path / "three"), "--epochs", "3")  # the schedule: re-planned over the new total
    fresh = list(csv.DictReader((tmp_path / "three" / "log.csv").open()))
    assert [r["lr"] for r in rows[1:]] == [r["lr"] for r in fresh[1:]]
    assert "nothing to do" in gate("--resume", "--out", str(run))
    assert "nothing to do" in gate("--resume", "--out", str(run), "--epochs", "3")
    res = CliRunner().invoke(main, ["train-gate", "--resume", "--out", str(run), "--epochs", "2"])
    assert res.exit_code == 1 and "is fewer than the run's 3" in res.output and len(res.output.strip().splitlines()) == 1
    rows_after = list(csv.DictReader((run / "log.csv").open()))
    assert rows_after == rows  # nothing lost by the refusal


def test_a_finished_student_resumed_as_it_was_has_nothing_to_do(runs):
    student = runs["student"]
    before = (student / "model.safetensors").read_bytes(), (student / "log.csv").read_text()
    res = CliRunner().invoke(main, ["distill", "--resume", "--out", str(student)])
    assert res.exit_code == 0 and "nothing to do" in res.output, res.output
    assert ((student / "model.safetensors").read_bytes(), (student / "log.csv").read_text()) == before
