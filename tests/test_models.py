"""Trained models in Python: ``featcache.load_model`` gives the features ``featcache eval`` ranks, row for row, and
the student's trunk loads into torchvision's own model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import featcache
from featcache.cli import main
from featcache.errors import FeatcacheError


def eval_features(model: str, cache: Path, out: Path) -> np.lib.npyio.NpzFile:
    res = CliRunner().invoke(main, ["eval", "--cache", str(cache), "--model", model, "--save-features", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    return np.load(out)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.heavy
@pytest.mark.parametrize("kind,run", [("student", "student"), ("gate", "gate")])
def test_embed_equals_what_eval_ranks_row_for_row(runs, market_cache, market_root, tmp_path, kind, run):
    saved = eval_features(f"{kind}:{runs[run]}", market_cache, tmp_path / "f.npz")
    paths = [market_root / n for n in saved["query_names"]]
    model = featcache.load_model(runs[run])
    assert isinstance(model, torch.nn.Module) and not model.training
    ours = model.embed(paths, batch_size=5)
    assert ours.shape == saved["query"].shape and ours.dtype == np.float32
    assert cosines(ours, saved["query"]).min() >= 0.9999  # float32 on the CPU: equal up to rounding
    pixels = model.preprocess(paths[:3])  # the user's own loop: preprocess, then the module
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape[2:]) == model.image_size
    with torch.no_grad():
        np.testing.assert_allclose(model(pixels).numpy(), ours[:3], atol=1e-5)
    pil = [Image.open(p) for p in paths[:3]]
    np.testing.assert_allclose(model.embed(pil), ours[:3], atol=1e-5)  # PIL images and uint8 tensors alike
    np.testing.assert_allclose(model.embed(pixels), ours[:3], atol=1e-5)


def test_the_student_trunk_loads_into_torchvision_and_computes_the_same(runs):
    import torchvision

    model = featcache.load_model(runs["student"])
    tv = torchvision.models.resnet18()
    result = tv.load_state_dict(model.torchvision_state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    tv.eval()
    x = torch.randn(2, 3, *model.image_size)
    with torch.no_grad():
        theirs = torch.nn.Sequential(*list(tv.children())[:-2])(x)
        ours, _ = model.student._trunk(x)
    assert torch.allclose(theirs, ours, atol=1e-5)


def test_bad_runs_and_images_are_one_line(runs, tmp_path):
    cases = [(tmp_path, "is not a featcache run folder"),  # a folder that is not a run
             (tmp_path / "nothere", "does not exist")]
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((runs["student"] / "config.yaml").read_text())
    (unfinished / "run.json").write_text((runs["student"] / "run.json").read_text())
    cases.append((unfinished, "is an unfinished run"))
    for run, words in cases:
        with pytest.raises(FeatcacheError, match=words) as exc:
            featcache.load_model(run)
        assert "\n" not in str(exc.value)
    model = featcache.load_model(runs["student"])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(FeatcacheError, match="broken.jpg: cannot read the image"):
        model.embed([bad])
    with pytest.raises(FeatcacheError, match="expected a uint8 tensor"):
        model.embed(torch.zeros(1, 3, 8, 8))
    for empty in (model.embed, model.preprocess):
        with pytest.raises(FeatcacheError, match="expected at least one image"):
            empty([])
    assert "load_model" in dir(featcache)


def _embed(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    """``featcache embed`` in a process of its own (a fault point may kill it)."""
    env = {k: v for k, v in os.environ.items() if k != "FEATCACHE_FAULT"}
    if fault:
        env["FEATCACHE_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "featcache", "embed", *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.heavy
@pytest.mark.parametrize("ids", [pytest.param(8, id="small"), pytest.param(126, id="1000-images", marks=pytest.mark.slow)])
def test_embed_a_folder_killed_resumes_to_the_same_file(runs, tmp_path, ids):
    from conftest import assert_same_cache
    from featcache.synth import SynthConfig, generate

    root = tmp_path / "ds"
    generate(SynthConfig(root, "market1501", ids=ids, cams=3, seed=2))
    folder = root if ids > 8 else root / "bounding_box_test"  # the 1,000-image case: every split's folder, recursively
    n = sum(1 for p in folder.rglob("*.jpg"))
    assert ids < 100 or n >= 1000
    (folder / "sub").mkdir()
    (folder / "sub" / "broken.jpg").write_bytes(b"not an image")  # recorded as failed, the rest go on
    base = ["--model", f"student:{runs['student']}", "--images", str(folder), "--batch-size", "4", "--device", "cpu", "--workers", "0"]
    whole = CliRunner().invoke(main, ["embed", *base, "--out", str(tmp_path / "whole.h5")])
    assert whole.exit_code == 0, whole.output
    cut = _embed([*base, "--out", str(tmp_path / "cut.h5")], fault="extract.after_batch:3")  # SIGKILL after batch 3
    assert cut.returncode == -9, cut.stderr
    again = CliRunner().invoke(main, ["embed", *base, "--out", str(tmp_path / "cut.h5")])  # the same command resumes
    assert again.exit_code == 0 and "images this run" in again.output, again.output
    assert_same_cache(tmp_path / "whole.h5", tmp_path / "cut.h5")
    with featcache.open_cache(tmp_path / "cut.h5") as c:
        assert c.backbones == ["student"] and c.status_counts()["failed"]["gallery"] == 1
        gallery = c.split("gallery")
        stored = gallery.read("student", "pooled")
    assert len(stored) == n
    ours = featcache.load_model(runs["student"]).embed([folder / p for p in gallery.names])
    assert cosines(ours, stored).min() >= 0.9999


def test_embed_a_dataset_and_evaluate_it(runs, market_cache, market_root, tmp_path):
    out = tmp_path / "teacher.h5"
    res = CliRunner().invoke(main, ["embed", "--model", f"gate:{runs['gate']}", "--dataset", "market1501", "--root",
                                    str(market_root), "--out", str(out), "--device", "cpu", "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert "teacher" in featcache.open_cache(out).backbones
    embedded = eval_features("backbone:teacher", out, tmp_path / "a.npz")
    direct = eval_features(f"gate:{runs['gate']}", market_cache, tmp_path / "b.npz")
    assert list(embedded["query_names"]) == list(direct["query_names"])
    assert cosines(embedded["query"], direct["query"]).min() >= 0.9999
    bad = CliRunner().invoke(main, ["embed", "--model", f"student:{runs['gate']}", "--images", str(tmp_path), "--out", str(tmp_path / "x.h5")])
    assert bad.exit_code == 1 and f"is a train-gate run: give --model gate:{runs['gate']}" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = CliRunner().invoke(main, ["embed", "--model", "backbone:clip-tiny", "--images", str(empty), "--out", str(tmp_path / "y.h5")])
    assert bad.exit_code == 1 and "no images found" in bad.output
    for spec, code, words in (("nothing:x", 2, "expected student:RUN, gate:RUN"), ("backbone:clip-tinny", 2, "did you mean"),
                              (str(tmp_path / "nowhere"), 1, "and no run folder of that name")):  # a bad value, or a missing input
        bad = CliRunner().invoke(main, ["embed", "--model", spec, "--images", str(empty), "--out", str(tmp_path / "z.h5")])
        assert bad.exit_code == code and words in bad.output and len(bad.output.strip().splitlines()) == 1, (spec, bad.output)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0"])
def test_every_student_trunk_loads_into_its_torchvision_model_with_only_the_head_missing(arch):
    import torchvision

    from featcache.distill.embedder import StudentModel
    from featcache.distill.students import STUDENTS, build_student

    student = build_student(arch, 5, "random", seed=0).eval()
    model = StudentModel(student, (64, 32), Path("."), torch.device("cpu"))
    tv = torchvision.models.get_model(STUDENTS.get(arch).tv_name, weights=None).eval()
    result = tv.load_state_dict(model.torchvision_state_dict(), strict=False)
    head = "fc" if arch.startswith("resnet") else "classifier"
    assert result.missing_keys and all(k.startswith(head + ".") for k in result.missing_keys) and not result.unexpected_keys
    x = torch.randn(1, 3, 64, 32)
    with torch.no_grad():
        trunk = tv.features(x) if head == "classifier" else torch.nn.Sequential(*list(tv.children())[:-2])(x)
        assert torch.allclose(trunk, student._trunk(x)[0], atol=1e-5)


def test_a_teacher_whose_backbone_weights_are_gone_says_where_it_looked(runs, market_cache, tmp_path):
    import shutil

    import yaml

    from featcache.config import resolved_beside

    cache = tmp_path / "market.h5"
    shutil.copy(market_cache, cache)
    saved = yaml.safe_load(resolved_beside(market_cache).read_text())
    saved["extract"]["weights"] = {"clip-tiny": str(tmp_path / "gone.pt")}
    resolved_beside(cache).write_text(yaml.safe_dump(saved))
    gate = tmp_path / "gate"
    shutil.copytree(runs["gate"], gate)
    cfg = yaml.safe_load((gate / "config.yaml").read_text())
    cfg["train-gate"]["cache"] = str(cache)
    (gate / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(FeatcacheError, match="expert clip-tiny: .*gone.pt") as exc:
        featcache.load_model(gate)
    assert "\n" not in str(exc.value)
