"""Writing a feature cache: ``CacheWriter`` stores finished extraction batches (arrays, then checksums, then
status, so a killed batch is simply redone; see ``featcache.cache.store`` for the layout) and annotations.

Extraction and the synthetic caches of tests and benchmarks write through it alone."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from featcache.cache import checksum
from featcache.cache.fileformat import ANNOTATIONS, CONDITION, ROUTE, DONE, FAILED, FORMAT_VERSION, CacheError, open_cache_file, window_offsets
from featcache.cache.store import REASON_LEN, _runs
from featcache.faults import fault_point


@dataclass
class BatchResult:
    """One batch of images after inference: what the writer stores."""

    images: list[int]              # image indices, cached and failed
    failed_mask: np.ndarray        # bool per entry of ``images``
    reasons: list[str]             # '' for cached images
    ok_images: list[int]           # image indices with outputs, in row order
    widths: np.ndarray
    heights: np.ndarray
    sha1: np.ndarray
    params: np.ndarray             # (rows, 10) featcache.preprocess.PARAMS
    first_view_index: np.ndarray   # row of view 0 of each ok image within the batch
    outputs: dict[str, dict[str, np.ndarray]]  # stored arrays only: a row per view row, or per ok image for
    #                                            arrays with one row per image (tokens of view 0)


class CacheWriter:
    """Writes finished batches into an open cache: arrays first, then status (see module doc)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.f = open_cache_file(path, "r+")
        if "shards" in self.f.attrs:
            self.f.close()
            raise CacheError(f"{path} stitches the shards of a distributed extraction: its ranks write their shards, not it")
        self.image0, self.row0 = window_offsets(self.f)  # a shard numbers images and rows as the whole cache does
        g = self.f["images"]
        self.view_start = g["view_start"][...]
        self.n_views = g["n_views"][...]
        self.tokens = self.f.attrs["tokens"]
        version = int(self.f.attrs["format_version"])
        if version != FORMAT_VERSION:  # the resume check refuses older caches first (their augmentation differs)
            self.f.close()
            raise CacheError(f"{path} is a format {version} cache: this featcache writes format {FORMAT_VERSION} only")
        self.static = {k: g[k][...] for k in ("pid", "camid", "split", "n_views", "view_start")}
        self.paths = g["path"].asstr()[...]

    def _put_checked(self, ds: h5py.Dataset, key: str, rows: np.ndarray, arr: np.ndarray) -> None:
        _put(ds, rows, arr)
        _put(self.f[f"{checksum.GROUP}/{key}"], rows, checksum.row_crcs(arr))

    def write(self, batch: "BatchResult") -> None:
        g = self.f["images"]
        ok = batch.ok_images
        if len(ok):
            ok_global = np.asarray(ok)
            ok_idx = ok_global - self.image0
            rows = np.concatenate([np.arange(self.view_start[i], self.view_start[i] + self.n_views[i]) for i in ok_idx]) - self.row0
            for name, arr in (("dx", batch.params[:, 0]), ("dy", batch.params[:, 1]), ("flip", batch.params[:, 2])):
                _put(self.f["views"][name], rows, arr)
            _put(self.f["views"]["erase"], rows, batch.params[:, 3:7])
            _put(self.f["views"]["erase_fill"], rows, batch.params[:, 7:10].astype(np.uint8))
            for bname, outs in batch.outputs.items():
                bg = self.f["backbones"][bname]
                for oname, arr in outs.items():
                    if oname not in bg:
                        continue
                    if bg[oname].attrs["rows"] == "image":
                        self._put_checked(bg[oname], f"backbones/{bname}/{oname}", ok_idx, arr)
                    else:
                        self._put_checked(bg[oname], f"backbones/{bname}/{oname}", rows, arr)
            for name, arr in (("width", batch.widths), ("height", batch.heights), ("sha1", batch.sha1)):
                _put(g[name], ok_idx, arr)
            p = batch.params.astype(np.int16)
            image = np.repeat(ok_global, self.n_views[ok_idx])
            view = rows + self.row0 - np.repeat(self.view_start[ok_idx], self.n_views[ok_idx])
            _put(self.f[f"{checksum.GROUP}/views"], rows,
                 checksum.view_crcs(image, view, p[:, 0], p[:, 1], p[:, 2], p[:, 3:7], p[:, 7:10].astype(np.uint8)))
            fields = {k: v[ok_idx] for k, v in self.static.items()}
            fields.update(width=batch.widths, height=batch.heights, sha1=batch.sha1)
            _put(self.f[f"{checksum.GROUP}/images"], ok_idx, checksum.image_crcs(fields, self.paths[ok_idx]))
        self.f.flush()
        fault_point("extract.before_status")  # arrays written, status not yet: the batch must be redone
        idx = np.asarray(batch.images) - self.image0
        order = np.argsort(idx)
        status = np.where(batch.failed_mask, FAILED, DONE).astype(np.uint8)
        reasons = np.array([r.encode()[:REASON_LEN] for r in batch.reasons], dtype=f"S{REASON_LEN}")
        _put(g["reason"], idx[order], reasons[order])
        _put(g["status"], idx[order], status[order])
        self.f.flush()
        fault_point("extract.after_batch")

    def annotate(self, name: str, values: np.ndarray, **attrs: str) -> None:
        """Store an annotation array (one value per view row) that is not a backbone output, such as the known
        reliable expert of a synthetic cache (read back with ``CacheReader.annotation``); written once."""
        _annotate(self.f, name, values, attrs)

    def annotate_route(self, route: np.ndarray, kind: str, experts: list[str]) -> None:
        """A synthetic feature cache's known route: per view row, the index in ``experts`` of the expert known to
        be reliable (-1: none), for ``moe-oracle`` (read back with ``CacheReader.route``)."""
        self.annotate(ROUTE, np.asarray(route).astype(np.int8), kind=kind, experts=json.dumps(list(experts)),
                      doc="route: per view row, the index of the expert known to be reliable (-1: none), for moe-oracle")

    def close(self) -> None:
        self.f.close()


def _put(ds: h5py.Dataset, rows: np.ndarray, arr: np.ndarray) -> None:
    """Write ``arr`` at ``rows`` (ascending), one slice per run of consecutive rows."""
    if len(rows):
        for a, b, first in _runs(rows):
            ds[first: first + b - a] = arr[a:b]


def annotate_conditions(path: Path, values: np.ndarray, conditions: list[str]) -> bool:
    """A rendered synthetic dataset's camera conditions: per view row, the index of its camera's condition in
    ``conditions`` (read back with ``CacheReader.conditions``); ``annotate_cache``'s rules. Whether it wrote."""
    return annotate_cache(path, CONDITION, values, conditions=json.dumps(list(conditions)),
                          condition_doc="condition: per view row, the index of its camera's condition in conditions")


def annotate_cache(path: Path, name: str, values: np.ndarray, **attrs: str) -> bool:
    """``CacheWriter.annotate`` for any cache, the master file of a distributed extraction included: written when
    missing, rewritten where its stored values differ from ``values`` (damaged); a cache that already holds exactly
    ``values``, or that this process may not write, is left alone. Whether it wrote."""
    with open_cache_file(path) as f:
        key = f"{ANNOTATIONS}/{name}"
        if key in f and np.array_equal(f[key][...], values):
            return False
    if not os.access(path, os.W_OK):  # a read-only cache made before the annotation existed is only read
        return False
    with open_cache_file(path, "r+") as f:
        for key in (f"{ANNOTATIONS}/{name}", checksum.annotation_key(name)):
            if key in f:
                del f[key]
        _annotate(f, name, values, attrs)
    return True


def _annotate(f: h5py.File, name: str, values: np.ndarray, attrs: dict[str, str]) -> None:
    if len(values) != len(f["views/image"]):
        raise CacheError(f"{f.filename}: annotation {name!r} has {len(values)} rows, the cache {len(f['views/image'])} view rows")
    g = f.require_group(ANNOTATIONS)
    g.attrs.update(attrs)
    g.create_dataset(name, data=values)
    if checksum.has_checksums(f):  # a flipped byte in it is found like one in any stored row
        f.create_dataset(checksum.annotation_key(name), data=checksum.row_crcs(np.asarray(values)))
    f.flush()
