"""Extraction: the cache holds the right numbers in the right rows, survives kill -9, records bad files."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_same_cache, extract_cfg
from featcache.backbones import build_backbone
from featcache.cache import DONE, FAILED, CacheError, summary
from featcache.datasets import load_listing
from featcache.extract.runner import run_extract
from featcache.preprocess import apply_view, letterbox


def test_round_trip_matches_a_direct_forward_pass(market_root, market_cache):
    lst = load_listing("market1501", market_root)
    with h5py.File(market_cache, "r") as f:
        img = f["images"]
        assert (img["status"][...] == DONE).all()
        assert [p for p in img["path"].asstr()[...]] == [i.path for i in lst.items]
        i = int(np.flatnonzero(img["split"][...] == 0)[3])  # a training image
        start, n = int(img["view_start"][i]), int(img["n_views"][i])
        assert n == 3
        params = np.concatenate([np.stack([f["views/dx"][start: start + n], f["views/dy"][start: start + n],
                                           f["views/flip"][start: start + n]], 1),
                                 f["views/erase"][start: start + n], f["views/erase_fill"][start: start + n]], 1)
        pooled = f["backbones/clip-tiny/pooled"][start: start + n]
        attn = f["backbones/align-tiny/attn_02"][start: start + n]
        tokens = f["backbones/clip-tiny/tokens"][i]
        assert img["sha1"][i].decode() == __import__("hashlib").sha1((market_root / lst.items[i].path).read_bytes()).hexdigest()
    base = letterbox(Image.open(market_root / lst.items[i].path), (64, 32))
    views = torch.from_numpy(np.stack([apply_view(base, *map(int, p[:7]), tuple(map(int, p[7:]))) for p in params])).permute(0, 3, 1, 2)
    with torch.inference_mode():
        clip = build_backbone("clip-tiny", (64, 32)).eval()
        out = clip(clip.normalize(views))
        align = build_backbone("align-tiny", (64, 32)).eval()
        a_out = align(align.normalize(views))
    np.testing.assert_allclose(pooled, out["pooled"].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tokens, out["tokens"][0].numpy(), rtol=1e-2, atol=1e-3)  # stored as fp16
    np.testing.assert_allclose(attn, a_out["attn_02"].numpy(), rtol=1e-4, atol=1e-4)
    assert not np.allclose(pooled[0], pooled[2])  # the augmented view differs from the clean one


def test_rerun_skips_everything(market_root, market_cache, tmp_path):
    copy = tmp_path / "again.h5"
    shutil.copy(market_cache, copy)
    res = run_extract(extract_cfg(market_root, copy))
    assert res.processed == 0
    assert_same_cache(market_cache, copy)


def test_mismatched_cache_is_refused_and_kept(market_root, market_cache, tmp_path):
    copy = tmp_path / "c.h5"
    shutil.copy(market_cache, copy)
    with pytest.raises(CacheError) as err:
        run_extract(extract_cfg(market_root, copy, backbones=("clip-tiny",), image_size=(64, 64)))
    msg = str(err.value)
    assert "backbones: the cache holds clip-tiny, align-tiny; this run asks for clip-tiny" in msg.replace("align-tiny, clip-tiny", "clip-tiny, align-tiny")
    assert "image_size: 64x32 in the cache, 64x64 now" in msg and "--overwrite" in msg and "\n" not in msg
    assert_same_cache(market_cache, copy)  # nothing already computed is lost
    res = run_extract(extract_cfg(market_root, copy, backbones=("clip-tiny",), overwrite=True))
    assert set(res.summary["backbones"]) == {"clip-tiny"}


def test_bad_files_are_recorded_and_do_not_stop_the_run(market_root, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(market_root, root)
    train = sorted((root / "bounding_box_train").glob("*.jpg"))
    train[0].write_bytes(b"")
    train[1].write_bytes(train[1].read_bytes()[:300])
    train[2].write_text("this is not a JPEG")
    res = run_extract(extract_cfg(root, tmp_path / "c.h5", backbones=("clip-tiny",)))
    failed = {rec["path"]: rec["reason"] for rec in res.summary["failed"]}
    assert set(failed) == {f"bounding_box_train/{p.name}" for p in train[:3]}
    assert "zero-byte" in failed[f"bounding_box_train/{train[0].name}"]
    assert "truncated" in failed[f"bounding_box_train/{train[1].name}"].lower()
    assert "not an image" in failed[f"bounding_box_train/{train[2].name}"]
    n = len(load_listing("market1501", root).items)
    assert sum(res.summary["splits"].values()) + len(failed) == n and res.summary["pending"] == 0
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert (f["images/status"][...] == FAILED).sum() == 3


def test_rejected_names_are_recorded_as_failed(market_root, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(market_root, root)
    shutil.copy(next((root / "query").glob("*.jpg")), root / "query" / "b0280_c3s3_065619_00.jpg")
    res = run_extract(extract_cfg(root, tmp_path / "c.h5", backbones=("clip-tiny",), skip_bad_names=True))
    assert [r["path"] for r in res.summary["failed"]] == ["query/b0280_c3s3_065619_00.jpg"]
    assert "does not match" in res.summary["failed"][0]["reason"]


def _extract_argv(root: Path, out: Path) -> list[str]:
    return ["extract", "--dataset", "market1501", "--root", str(root), "--backbone", "clip-tiny", "--backbone", "align-tiny",
            "--out", str(out), "--views", "3", "--batch-size", "8", "--workers", "1", "--image-size", "64x32"]


@pytest.mark.heavy
def test_kill_9_then_resume_equals_an_uninterrupted_run(market_root, market_cache, tmp_path):
    """SIGKILL at a fixed point (FEATCACHE_FAULT): after two whole batches, between the third batch's arrays and
    its status flags; the killed file opens and resumes to the same bytes (tests/test_faults.py kills at random
    moments)."""
    from crash import finish, start

    point, batches = "extract.before_status", 3
    out = tmp_path / "killed.h5"
    argv = _extract_argv(market_root, out)
    assert finish(start(argv, tmp_path / "log", env_per_rank=[{"FEATCACHE_FAULT": f"{point}:{batches}"}])) == [-signal.SIGKILL]
    total = len(load_listing("market1501", market_root).items)
    done_batches = batches if point == "extract.after_batch" else batches - 1
    s = summary(out)  # the killed file opens
    assert sum(s["splits"].values()) == 8 * done_batches and s["pending"] == total - 8 * done_batches
    assert finish(start(argv, tmp_path / "log")) == [0]
    assert_same_cache(market_cache, out)


def test_view_pixels_are_what_the_backbones_saw(market_root, tmp_path, monkeypatch):
    """Rebuilding a view from the cache's stored parameters gives the exact uint8 tensor extraction fed the backbones."""
    from featcache.cache.pixels import ViewPixels, view_pixels
    from conftest import record_mapper_inputs

    seen = record_mapper_inputs(monkeypatch)
    out = tmp_path / "c.h5"
    run_extract(extract_cfg(market_root, out, backbones=("clip-tiny",), views=4))
    fed = torch.cat(seen)  # every view row, in batch order = cache row order
    with h5py.File(out, "r") as f:
        image, view = f["views/image"][...], f["views/view"][...]
        flips = f["views/flip"][...]
    assert len(fed) == len(image)
    vp = ViewPixels(out)
    for row in range(len(image)):
        assert torch.equal(vp.image_views(int(image[row]), [int(view[row])])[0], fed[row]), row
    assert flips[view >= 2].any() and torch.equal(view_pixels(out, int(image[0]), 0), fed[0])
    # a changed image file is refused, naming it
    path = market_root / vp.paths[int(image[0])]
    copy = tmp_path / "m"
    shutil.copytree(market_root, copy)
    (copy / vp.paths[int(image[0])]).write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(Exception, match="changed since it was extracted"):
        ViewPixels(out, root=copy).image_views(int(image[0]))


@pytest.mark.parametrize("tokens", ["all", "none"])
def test_token_modes(market_root, tmp_path, tokens):
    out = tmp_path / f"{tokens}.h5"
    res = run_extract(extract_cfg(market_root, out, backbones=("clip-tiny",), tokens=tokens))
    arrays = res.summary["backbones"]["clip-tiny"]["arrays"]
    with h5py.File(out, "r") as f:
        n_rows = len(f["views/image"])
        if tokens == "none":
            assert "tokens" not in arrays
        else:
            assert arrays["tokens"]["rows"] == "view" and arrays["tokens"]["shape"][0] == n_rows
            flipped = f["views/flip"][...] == 1
            t = f["backbones/clip-tiny/tokens"]
            assert not np.array_equal(t[int(np.flatnonzero(flipped)[0])], t[int(np.flatnonzero(~flipped)[0])])


def test_real_crops_through_a_csv_manifest(tmp_path):
    from conftest import shared_path

    crops = shared_path("real-crops")
    files = sorted(crops.glob("market1501-named/*.jpg"))[:12] + sorted(crops.glob("veri776-named/*.jpg"))
    root = tmp_path / "real"
    root.mkdir()
    lines = ["path,pid,camid,split"]
    for i, f in enumerate(files):
        shutil.copy(f, root / f.name)  # copies: a manifest may not lead outside its folder, symbolic links included
        lines.append(f"{f.name},{int(f.name[:4]) + 1},{1 + i % 3},{['train', 'query', 'gallery'][i % 3]}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    res = run_extract(extract_cfg(root, tmp_path / "real.h5", dataset="csv", image_size=(64, 64)))
    assert res.summary["failed"] == [] and sum(res.summary["splits"].values()) == len(files)
    with h5py.File(tmp_path / "real.h5", "r") as f:
        sizes = set(zip(f["images/width"][...], f["images/height"][...]))
        pooled = f["backbones/align-tiny/pooled"][...]
    assert (64, 128) in sizes and len(sizes) > 2  # person crops and vehicle crops of several sizes
    assert np.isfinite(pooled).all() and pooled.std(0).mean() > 1e-3


def test_decoding_workers_fit_in_shared_memory(tmp_path, monkeypatch, caplog):
    """15 workers x 2 prefetched batches of 50 MB against Docker's default 64 MiB of /dev/shm ended in "DataLoader
    worker killed by signal: Bus error". Now the workers are as many as /dev/shm holds, with one line saying why."""
    import logging
    import shutil
    from collections import namedtuple

    from featcache import runtime

    usage = namedtuple("usage", "total used free")
    free = {"bytes": 64 * 2**20}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(free["bytes"], 0, free["bytes"]))
    shm = tmp_path / "shm"
    shm.mkdir()
    with caplog.at_level(logging.WARNING, logger="featcache.runtime"):
        assert runtime.workers_for_shm(15, 50 * 2**20, str(shm)) == 0
    assert "too little for 15 decoding workers" in caplog.text and "--shm-size" in caplog.text
    free["bytes"] = 2**30
    assert runtime.workers_for_shm(15, 50 * 2**20, str(shm)) == 8  # 1 GiB / (2 batches x 50 MiB x 1.25)
    caplog.clear()
    free["bytes"] = 2**40
    assert runtime.workers_for_shm(15, 50 * 2**20, str(shm)) == 15 and "shm" not in caplog.text
    opts = runtime.loader_options(__import__("torch").device("cpu"), 15, 50 * 2**20)
    assert opts["prefetch_factor"] == runtime.PREFETCH == 2 and opts["pin_memory"] is False


def test_an_extraction_short_of_shared_memory_decodes_with_fewer_workers(market_root, tmp_path, monkeypatch, caplog):
    import logging
    import shutil
    from collections import namedtuple

    real = shutil.disk_usage
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**16, 0, 2**16) if str(path) == "/dev/shm" else real(path))
    with caplog.at_level(logging.WARNING, logger="featcache.runtime"):
        res = run_extract(extract_cfg(market_root, tmp_path / "c.h5", workers=2))
    assert res.processed > 0 and "too little for 2 decoding workers" in caplog.text
