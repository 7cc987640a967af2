"""Extraction's device path: only what is stored leaves the device, cast there; the overlapped path writes the
same cache as the plain one (even when the writer lags); values that do not fit or are not finite never pass
silently, at extraction or at any reader."""

from __future__ import annotations

import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import assert_same_cache, extract_cfg
from featcache.backbones import build_backbone
from featcache.backbones.clip import ClipBackbone
from featcache.cache import DONE, FAILED, PENDING, CacheError, CacheSplit, summary
from featcache.cache.checksum import verify_cache
from featcache.cli import main
from featcache.extract import runner as extract_runner
from featcache.extract.mapper import Mapper
from featcache.extract.runner import run_extract
from featcache.extract.writer import ValueOverflowError


@pytest.mark.parametrize("tokens", ["view0", "all", "none"])
def test_the_overlapped_path_writes_the_plain_paths_cache_and_copies_only_what_is_stored(market_root, tmp_path, tokens):
    plain = run_extract(extract_cfg(market_root, tmp_path / "plain.h5", tokens=tokens, mapper="plain"))
    fast = run_extract(extract_cfg(market_root, tmp_path / "fast.h5", tokens=tokens))
    assert_same_cache(tmp_path / "plain.h5", tmp_path / "fast.h5")
    # counted at the copy calls: exactly the bytes the cache's arrays hold for these images
    assert fast.bytes_out == fast.stored_bytes > 0
    with h5py.File(tmp_path / "fast.h5", "r") as f:
        on_disk = sum(f["backbones"][b][o].nbytes for b in f["backbones"] for o in f["backbones"][b])
    assert fast.stored_bytes == on_disk
    # the plain path moves every kept output as float32 (cls_attn is stored as float16), tokens of every view too
    assert plain.bytes_out > fast.bytes_out


def test_a_lagging_writer_never_sees_a_buffer_refilled_too_early(market_root, tmp_path, monkeypatch):
    from featcache.cache.writer import CacheWriter

    run_extract(extract_cfg(market_root, tmp_path / "plain.h5", mapper="plain", batch_size=3))
    real = CacheWriter.write

    def slow(self, batch):
        time.sleep(0.05)  # the mapper runs ahead; a buffer handed back before this write would be overwritten
        return real(self, batch)

    monkeypatch.setattr(CacheWriter, "write", slow)
    monkeypatch.setattr(extract_runner, "make_mapper", lambda kind, bbs, stored, dev: Mapper(bbs, stored, dev, slots=2))
    run_extract(extract_cfg(market_root, tmp_path / "fast.h5", batch_size=3))
    assert_same_cache(tmp_path / "plain.h5", tmp_path / "fast.h5")


def test_the_copies_event_is_recorded_on_the_batchs_own_gpu(monkeypatch):
    """With --device cuda:1 the batch's kernels and copies run on GPU 1's stream while the current device stays 0: an
    event recorded on the current stream would complete at once and let the writer read unfinished buffers. A spy
    stands in for CUDA: which device's stream the event is recorded on, and that it blocks instead of spinning."""
    from featcache.extract import mapper

    recorded, created = [], []

    class Event:
        def __init__(self, **kw):
            created.append(kw)

        def record(self, stream=None):
            recorded.append(stream)

        def synchronize(self):
            pass

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", torch.device(device)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    wait = mapper.copies_done(torch.device("cuda:1"))
    assert recorded == [("stream of", torch.device("cuda:1"))] and created == [{"blocking": True}]
    wait()
    assert mapper.copies_done(torch.device("cpu"))() is None and len(recorded) == 1  # nothing to wait for on the CPU


@pytest.fixture
def overflowing_clip(tmp_path) -> Path:
    """A clip-tiny checkpoint whose final LayerNorm scale is huge: its tokens exceed float16's range."""
    bb = build_backbone("clip-tiny", (64, 32))
    sd = bb.clip_model.state_dict()
    sd["visual.ln_post.weight"] = sd["visual.ln_post.weight"] * 1e6
    path = tmp_path / "overflow.pt"
    torch.save(sd, path)
    return path


def test_an_overflowing_checkpoint_stops_the_run_and_float32_stores_it(market_root, tmp_path, overflowing_clip):
    out = tmp_path / "c.h5"
    args = ["extract", "--dataset", "market1501", "--root", str(market_root), "--backbone", "clip-tiny", "--out", str(out),
            "--image-size", "64x32", "--views", "2", "--batch-size", "8", "--workers", "0", "--weights", f"clip-tiny={overflowing_clip}"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    line = res.output.strip().splitlines()[-1]
    assert "backbone clip-tiny, output tokens, image " in line and "float16" in line and "--float32 tokens" in line
    with h5py.File(out, "r") as f:
        assert (f["images/status"][...] == PENDING).all()  # nothing of the failing batch written, no inf stored
        assert not np.isinf(f["backbones/clip-tiny/tokens"][...][f["images/status"][...] == DONE]).any()
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "f32.h5"), "--float32", "tokens"])
    assert res.exit_code == 0, res.output
    with h5py.File(tmp_path / "f32.h5", "r") as f:
        tok = f["backbones/clip-tiny/tokens"]
        assert tok.dtype == np.float32 and np.isfinite(tok[...]).all() and np.abs(tok[...]).max() > 65504
    # a resumed cache keeps the dtypes it was created with
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "f32.h5")])
    assert res.exit_code == 0 and "0 images this run" in res.output


def test_float32_names_a_real_output(market_root, tmp_path):
    res = CliRunner().invoke(main, ["extract", "--dataset", "market1501", "--root", str(market_root), "--backbone", "clip-tiny",
                                    "--out", str(tmp_path / "c.h5"), "--image-size", "64x32", "--float32", "tokenz"])
    assert res.exit_code == 2 and "--float32 tokenz: no backbone output matches" in res.output and "clip-tiny:tokens" in res.output


def _white_last_gallery_image(market_root: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the dataset whose last gallery image is plain white, for a backbone patched to misbehave on it."""
    import shutil

    root = tmp_path / "m"
    shutil.copytree(market_root, root)
    last = sorted((root / "bounding_box_test").glob("*.jpg"))[-1]
    w, h = Image.open(last).size
    Image.new("RGB", (w, h), (255, 255, 255)).save(last)
    return root, f"bounding_box_test/{last.name}"


def _misbehave_on_white(monkeypatch, output: str, value: float) -> None:
    real = ClipBackbone.forward

    def forward(self, x):
        out = real(self, x)
        white = (x.mean(dim=(1, 2, 3)) > 1.0).view(-1, *([1] * (out[output].dim() - 1)))
        out[output] = torch.where(white, torch.full_like(out[output], value), out[output])
        return out

    monkeypatch.setattr(ClipBackbone, "forward", forward)


def test_an_image_whose_backbone_emits_nan_is_recorded_failed(market_root, tmp_path, monkeypatch):
    root, white = _white_last_gallery_image(market_root, tmp_path)
    _misbehave_on_white(monkeypatch, "pooled", float("nan"))
    res = run_extract(extract_cfg(root, tmp_path / "c.h5", backbones=("clip-tiny",)))
    failed = {r["path"]: r["reason"] for r in res.summary["failed"]}
    assert list(failed) == [white] and "backbone clip-tiny output pooled holds NaN or inf (view 0)" in failed[white]
    assert res.summary["pending"] == 0
    assert verify_cache(tmp_path / "c.h5").bad == {}
    res = CliRunner().invoke(main, ["eval", "--cache", str(tmp_path / "c.h5"), "--model", "backbone:clip-tiny"])
    assert res.exit_code == 0, res.output


def test_an_overflow_in_a_later_batch_keeps_the_batches_before(market_root, tmp_path, monkeypatch):
    root, white = _white_last_gallery_image(market_root, tmp_path)
    _misbehave_on_white(monkeypatch, "tokens", 1e6)
    with pytest.raises(ValueOverflowError, match=f"backbone clip-tiny, output tokens, image {white} .view 0.*float16"):
        run_extract(extract_cfg(root, tmp_path / "c.h5", backbones=("clip-tiny",)))
    s = summary(tmp_path / "c.h5")
    assert sum(s["splits"].values()) > 0 and s["pending"] > 0  # the batches before were written and stay cached
    assert verify_cache(tmp_path / "c.h5").bad == {}


def test_a_bf16_output_just_past_float16s_range_stops_the_run(market_root, tmp_path, monkeypatch):
    """Under bf16 autocast a backbone's tokens are bf16, where float16's largest value, 65504, rounds to 65536: a check
    made in bf16 passed 65536, which the cast to float16 turned into inf. The check compares in float32."""
    root, white = _white_last_gallery_image(market_root, tmp_path)
    real = ClipBackbone.forward

    def forward(self, x):  # what autocast hands the mapper: bf16 outputs, here 65536 on the white image
        out = real(self, x)
        white_rows = (x.mean(dim=(1, 2, 3)) > 1.0).view(-1, 1, 1)
        out["tokens"] = torch.where(white_rows, torch.full_like(out["tokens"], 65536.0), out["tokens"]).to(torch.bfloat16)
        return out

    monkeypatch.setattr(ClipBackbone, "forward", forward)
    assert not torch.tensor(65536.0, dtype=torch.bfloat16) > torch.tensor(65504.0).to(torch.bfloat16)  # the old check's blind spot
    with pytest.raises(ValueOverflowError, match=f"backbone clip-tiny, output tokens, image {white} .view 0.*float16"):
        run_extract(extract_cfg(root, tmp_path / "c.h5", backbones=("clip-tiny",)))


def _poison(cache: Path, backbone: str, split: int, nth: int, view: int, value: float) -> tuple[int, int, str]:
    """Put ``value`` into a pooled row (view ``view`` of the ``nth`` image of ``split``) and re-stamp its checksum,
    as a writer that stored it would have: (image, row, file name)."""
    with h5py.File(cache, "r+") as f:
        image = int(np.flatnonzero(f["images/split"][...] == split)[nth])
        row, name = int(f["images/view_start"][image]) + view, f["images/path"].asstr()[image]
        ds = f[f"backbones/{backbone}/pooled"]
        v = ds[row]
        v[0] = value
        ds[row] = v
        f[f"checksums/backbones/{backbone}/pooled"][row] = zlib.crc32(np.ascontiguousarray(v).tobytes())
    return image, row, name


def test_readers_and_verify_refuse_rows_holding_nan(market_cache, tmp_path):
    """A cache whose rows hold NaN under matching checksums (written so by an older featcache) passes nothing."""
    import shutil

    copy = tmp_path / "nan.h5"
    shutil.copy(market_cache, copy)
    q, row, name = _poison(copy, "clip-tiny", split=1, nth=0, view=0, value=np.nan)
    with pytest.raises(CacheError, match=f"hold NaN or inf \\(images {name}\\)"):
        CacheSplit.load(copy, "query").read("clip-tiny", "pooled", 0)
    r = CliRunner()
    res = r.invoke(main, ["eval", "--cache", str(copy), "--model", "backbone:clip-tiny"])
    assert res.exit_code == 1 and "NaN or inf" in res.output and name in res.output
    res = r.invoke(main, ["verify", str(copy)])
    assert res.exit_code == 1 and name in res.output and "NaN or inf" in res.output
    with h5py.File(copy, "r") as f:
        assert f["images/status"][q] == DONE != FAILED
    # train-gate reads the training rows through the same reader
    from featcache.gate.config import GateConfig
    from featcache.gate.runner import run_train_gate

    _, _, tname = _poison(copy, "align-tiny", split=0, nth=2, view=1, value=np.inf)
    with pytest.raises(CacheError, match=f"align-tiny/pooled hold NaN or inf \\(images {tname}\\)"):
        run_train_gate(GateConfig.from_dict(dict(cache=copy, out=tmp_path / "gate", epochs=1, batch_size=8, device="cpu")))


def _gpu_check():
    import importlib.util
    import os
    import sys

    repo = Path(__file__).resolve().parents[1]
    wrapper = repo / "benchmarks" / "gpu_check"
    assert os.access(wrapper, os.X_OK) and "gpu_check.py" in wrapper.read_text()  # the command runs this file
    if str(repo / "benchmarks") not in sys.path:  # as when the script runs: its folder first on the path (gpucheck/)
        sys.path.insert(0, str(repo / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_check", repo / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_in_its_cpu_mode(tmp_path):
    """benchmarks/gpu_check is the one GPU measurement: its CPU mode runs on tiny presets, so that it cannot rot
    between GPU sessions. The quick sections here; the rest in the slow test below (together: every section)."""
    module = _gpu_check()
    assert module.main(["--cpu", "--out", str(tmp_path / "t.md"), "--section", "equal", "--section", "eval", "--section", "gate"]) == 0
    table = (tmp_path / "t.md").read_text()
    assert "| equal | plain path |  | PASS |" in table  # the overlapped path's cache = the plain path's
    assert "| equal | CPU path |  | PASS |" in table  # eval: the device ranking path equals the CPU one
    assert "train-gate epoch after warm-up" in table and "FAIL" not in table
    import re

    watched = re.search(r"train-gate, 2 epochs: host syncs not counted on CPU \((\d+) training steps watched\)", table)
    assert watched and int(watched.group(1)) >= 2  # the sync counter, a loop hook, sees every step (counts on a GPU)
    assert "eval 100 x 20,000 x 32-d exact" in table  # the large-gallery block, scaled down, runs on the CPU too
    assert "gallery upload and identity index included; inputs normalised beforehand" in table
    from featcache.training.loop import Loop
    assert Loop.fit.__qualname__ == "Loop.fit"  # nothing patched the loop


def test_gpu_check_gives_expected_times_and_keeps_to_a_budget(tmp_path, capsys):
    module = _gpu_check()
    with pytest.raises(SystemExit):
        module.main(["--help"])
    text = capsys.readouterr().out
    for sec in module.SECTIONS:  # each section with its expected time on a GPU and in CPU mode
        assert f"``{sec.name}`` (about {sec.gpu_s // 60} min" in text and f"; {sec.cpu_s} s)" in text
    assert module.main(["--cpu", "--out", str(tmp_path / "b.md"), "--budget", "0"]) == 0
    table = (tmp_path / "b.md").read_text()
    assert table.count("| skipped | expected ") == len(module.SECTIONS) and "left of --budget 0" in table


@pytest.mark.slow  # about 15 s: two extractions, the models alone, decoding, and a student trained for two epochs
def test_gpu_check_other_sections_run_in_its_cpu_mode(tmp_path):
    module = _gpu_check()
    rest = [a for name in ("models", "pipeline", "decode", "distill") for a in ("--section", name)]
    assert {s.name for s in module.SECTIONS} == {"models", "pipeline", "decode", "distill", "equal", "eval", "gate"}  # none left out
    assert module.main(["--cpu", "--out", str(tmp_path / "d.md"), *rest]) == 0
    table = (tmp_path / "d.md").read_text()
    assert "library model" in table and "combined rate" in table and table.count("PASS (equal)") == 2
    assert "distill ResNet-18" in table and "six losses" in table and "FAIL" not in table
