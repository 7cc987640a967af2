"""Checksums: a flipped byte in any stored array is found and named; readers refuse it; --repair redoes exactly it."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import assert_same_cache, extract_cfg
from featcache.cache import CacheError, CacheSplit
from featcache.cache.checksum import verify_cache
from featcache.cli import main
from featcache.extract.runner import run_extract


def flip_byte(path: Path, name: str, row: int, byte: int = 1) -> None:
    """Damage the file as a disk would: one byte of row ``row`` of dataset ``name``, behind HDF5's back."""
    with h5py.File(path, "r") as f:
        ds = f[name]
        row_bytes = int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize
        offset = ds.id.get_offset() + row * row_bytes + min(byte, row_bytes - 1)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x5A]))


def as_format_1(path: Path) -> None:
    """Make a cache look as featcache 0.1 wrote it: no checksums, no erasing columns."""
    with h5py.File(path, "r+") as f:
        del f["checksums"], f["views/erase"], f["views/erase_fill"]
        f.attrs["format_version"] = 1


def stored_arrays(path: Path) -> list[str]:
    names: list[str] = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and not n.startswith("checksums")
                     and o.dtype.kind != "O" and n not in ("images/status", "images/reason") else None)
    return names


def test_verify_finds_a_flipped_byte_in_any_stored_array_and_names_the_image(market_cache, tmp_path):
    assert verify_cache(market_cache).bad == {}
    with h5py.File(market_cache, "r") as f:
        image = int(np.flatnonzero(f["images/split"][...] == 0)[5])  # a training image
        view_row = int(f["images/view_start"][image]) + 2
        name = f["images/path"].asstr()[image]
        rows_of = {n: ("image" if n.startswith("images/") or f[n].attrs.get("rows") == "image" else "view")
                   for n in stored_arrays(market_cache)}
    assert len(rows_of) > 20 and "backbones/clip-tiny/tokens" in rows_of and "views/dx" in rows_of
    for array, rows in rows_of.items():
        copy = tmp_path / "c.h5"
        shutil.copy(market_cache, copy)
        flip_byte(copy, array, image if rows == "image" else view_row)
        rep = verify_cache(copy)
        assert list(rep.paths.values()) == [name], array
        assert any(array.startswith(w) or w == array.split("/")[0] for w in rep.bad[image]), (array, rep.bad)


def damaged_copy(cache, tmp_path, query: int, train: int) -> tuple:
    """A copy of ``cache`` to damage, with the image rows of its ``query``-th query and ``train``-th training image."""
    copy = tmp_path / "c.h5"
    shutil.copy(cache, copy)
    with h5py.File(copy, "r") as f:
        split = f["images/split"][...]
    return copy, int(np.flatnonzero(split == 1)[query]), int(np.flatnonzero(split == 0)[train])


def test_readers_refuse_damaged_rows_and_repair_restores_the_uninterrupted_bytes(market_root, market_cache, tmp_path):
    copy, q, t = damaged_copy(market_cache, tmp_path, 0, 3)
    with h5py.File(copy, "r") as f:
        q_row, q_name = int(f["images/view_start"][q]), f["images/path"].asstr()[q]
    flip_byte(copy, "backbones/align-tiny/pooled", q_row)
    flip_byte(copy, "backbones/clip-tiny/tokens", t)
    with pytest.raises(CacheError, match=f"fail their checksum \\(images {q_name}\\).*featcache verify"):
        CacheSplit.load(copy, "query").read("align-tiny", "pooled", 0)
    r = CliRunner()
    res = r.invoke(main, ["eval", "--cache", str(copy), "--model", "backbone:align-tiny"])
    assert res.exit_code == 1 and "fail their checksum" in res.output
    res = r.invoke(main, ["verify", str(copy)])
    assert res.exit_code == 1 and f"damaged: {q_name}: backbones/align-tiny/pooled" in res.output and "--repair" in res.output
    res = run_extract(extract_cfg(market_root, copy, repair=True))
    assert res.processed == 16  # the two blocks of 8 that hold the damaged images, nothing else
    assert_same_cache(market_cache, copy)
    assert CliRunner().invoke(main, ["verify", str(copy)]).exit_code == 0


def test_a_damaged_annotation_is_refused_named_and_restored(market_root, market_cache, tmp_path):
    from featcache.cache import CacheReader

    copy, _, t = damaged_copy(market_cache, tmp_path, 0, 2)
    with h5py.File(copy, "r") as f:
        row, name = int(f["images/view_start"][t]) + 1, f["images/path"].asstr()[t]
    flip_byte(copy, "synthetic/condition", row, byte=0)
    with CacheReader(copy) as c, pytest.raises(CacheError, match=f"1 row\\(s\\) of its 'condition' annotation fail their checksum \\(view rows {row}\\)"):
        c.annotation("condition")
    assert verify_cache(copy).bad == {t: ["synthetic/condition"]} and verify_cache(copy).paths[t] == name
    run_extract(extract_cfg(market_root, copy, repair=True))
    assert_same_cache(market_cache, copy)


def test_a_format_1_cache_still_reads(market_cache, tmp_path):
    old = tmp_path / "v1.h5"
    shutil.copy(market_cache, old)
    as_format_1(old)
    ref = CacheSplit.load(market_cache, "gallery").read("clip-tiny", "pooled", 0)
    np.testing.assert_array_equal(CacheSplit.load(old, "gallery").read("clip-tiny", "pooled", 0), ref)
    with pytest.raises(CacheError, match="format 1 cache, which carries no checksums"):
        verify_cache(old)


def test_a_format_1_feature_cache_trains_and_evaluates(tmp_path):
    from featcache.evaluation.runner import EvalConfig, run_eval
    from featcache.gate.config import GateConfig
    from featcache.gate.runner import run_train_gate
    from featcache.synth_cache import write_feature_cache

    cache = write_feature_cache(tmp_path / "f.h5", ids=16, per_id=4, cams=4, views=2)
    as_format_1(cache)
    res = run_train_gate(GateConfig.from_dict(dict(cache=cache, out=tmp_path / "r", fusion="average", epochs=1)))
    assert run_eval(EvalConfig(cache, f"gate:{res.run}")).report["queries_evaluated"] > 0
    assert CliRunner().invoke(main, ["info", str(cache)]).output.count("format version 1") == 1


def test_damaged_metadata_is_refused_by_readers_and_restored_by_repair(market_root, market_cache, tmp_path):
    copy, q, t = damaged_copy(market_cache, tmp_path, 2, 5)
    with h5py.File(copy, "r") as f:
        q_name = f["images/path"].asstr()[q]
    flip_byte(copy, "images/camid", q, byte=0)       # a camera label: would change the protocol's junk and positives
    flip_byte(copy, "images/view_start", t, byte=0)  # a row layout: would send a repair's rows to another image
    flip_byte(copy, "views/image", 7, byte=0)
    with pytest.raises(CacheError, match=f"metadata .* fail their checksum \\(images {q_name}\\)"):
        CacheSplit.load(copy, "query")
    assert CliRunner().invoke(main, ["eval", "--cache", str(copy), "--model", "backbone:clip-tiny"]).exit_code == 1
    run_extract(extract_cfg(market_root, copy, repair=True))
    assert verify_cache(copy).bad == {}
    assert_same_cache(market_cache, copy)
