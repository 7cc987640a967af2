"""A cache identifies its data by content: a dataset moved elsewhere resumes and reuses its cache (and later
stages find the images at the new place); the same names with other contents are refused, naming the files."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import pytest
from PIL import Image

from conftest import extract_cfg
from featcache.cache import PENDING, CacheError, cache_identity
from featcache.cache.pixels import view_pixels
from featcache.extract.runner import run_extract


def _cache_of_a_copy(market_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "first" / "market"
    shutil.copytree(market_root, root)
    out = tmp_path / "c.h5"
    run_extract(extract_cfg(root, out, backbones=("clip-tiny",)))
    with h5py.File(out, "r+") as f:
        f["images/status"][8:16] = PENDING  # one block left to do
    return root, out


def test_a_moved_dataset_resumes_and_reuses_its_cache(market_root, tmp_path):
    root, out = _cache_of_a_copy(market_root, tmp_path)
    before = cache_identity(out)
    moved = tmp_path / "elsewhere" / "market"
    moved.parent.mkdir()
    shutil.move(str(root), str(moved))
    res = run_extract(extract_cfg(moved, out, backbones=("clip-tiny",)))
    assert res.processed == 8 and res.summary["pending"] == 0
    after = cache_identity(out)
    assert after.dataset_root == str(moved) and after.digest() == before.digest()  # runs trained on it stay valid
    assert view_pixels(out, 0, 0).shape[0] == 3  # images are found at the new place
    assert run_extract(extract_cfg(moved, out, backbones=("clip-tiny",))).processed == 0


def test_the_same_names_with_other_contents_are_refused(market_root, tmp_path):
    root, out = _cache_of_a_copy(market_root, tmp_path)
    with h5py.File(out, "r") as f:
        name = f["images/path"].asstr()[3]
    img = Image.open(root / name)
    img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / name)
    with pytest.raises(CacheError, match=f"image contents: 1 file\\(s\\) changed since they were extracted \\({name}\\)"):
        run_extract(extract_cfg(root, out, backbones=("clip-tiny",)))
