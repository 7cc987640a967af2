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


@pytest.mark.slow  # about 8 s: a pipeline run twice (extraction, gate, eval, report); extract's own move test runs by default
def test_a_pipeline_keeps_its_cache_when_the_dataset_moves(market_root, tmp_path):
    """The pipeline keys its cache by the data's content: after a move the extraction is skipped, the cache is
    pointed at the new place, and stages that read images (the report's ranked lists) find them there."""
    import yaml
    from click.testing import CliRunner

    from featcache.cli import main

    root = tmp_path / "first" / "market"
    shutil.copytree(market_root, root)

    def write(root: Path, seeds: list[int]) -> Path:
        p = tmp_path / "p.yaml"
        p.write_text(yaml.safe_dump({
            "pipeline": {"out": str(tmp_path / "out"), "seeds": seeds, "fusions": ["concat"], "teacher": "concat",
                         "distill": False, "profile": False, "experts_alone": False},
            "extract": {"dataset": "market1501", "root": str(root), "backbones": ["clip-tiny", "align-tiny"],
                        "image_size": "64x32", "views": 2, "batch_size": 16},
            "train-gate": {"epochs": 1, "batch_size": 8, "instances": 2},
            "eval": {"plot_queries": 2}}))
        return p

    res = CliRunner().invoke(main, ["run", str(write(root, [42]))])
    assert res.exit_code == 0, res.output
    cache = next((tmp_path / "out").glob("cache-*.h5"))
    moved = tmp_path / "second" / "market"
    moved.parent.mkdir()
    shutil.move(str(root), str(moved))
    from featcache.pipeline.config import load_pipeline
    from featcache.pipeline.stages import build_stages

    stages, _ = build_stages(load_pipeline(write(moved, [42, 7])))
    before = cache.read_bytes()
    stages[0].key()  # computing a key changes no file: the skipped stage's reuse points the cache at the new place
    assert stages[0].name == "extract" and cache.read_bytes() == before and cache_identity(cache).dataset_root == str(root)
    res = CliRunner().invoke(main, ["run", str(write(moved, [42, 7]))])
    assert res.exit_code == 0, res.output
    assert [c.name for c in (tmp_path / "out").glob("cache-*.h5")] == [cache.name]  # the same cache, not extracted again
    assert cache_identity(cache).dataset_root == str(moved)
