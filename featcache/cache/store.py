"""The HDF5 feature cache: layout, creation, compatibility check and writes.

Layout (all readable with plain h5py; see docs/cache-format.md):

- root attributes: ``format`` ('featcache-cache'), ``format_version``,
  ``featcache_version``, ``identity`` (JSON: dataset, root, preprocessing,
  views, backbones and their weights), ``created``.
- ``images/``: one row per listed image: ``path`` (relative to the dataset
  root), ``pid``, ``camid``, ``split`` (0 train, 1 query, 2 gallery),
  ``width``, ``height``, ``sha1`` (of the file bytes), ``status`` (0 pending,
  1 cached, 2 failed), ``reason`` (why it failed), ``n_views``, ``view_start``.
- ``views/``: one row per (image, view): ``image``, ``view``, ``dx``, ``dy``,
  ``flip`` (see featcache.preprocess).
- ``backbones/<preset>/<output>``: one row per view row (``tokens``: one
  per image for ``--tokens view0``, per view row for ``all``).

Every array is allocated contiguously when the file is created, and the
file is created under a temporary name and renamed. A run then only
overwrites raw bytes at fixed offsets and never changes HDF5 metadata, so a
process killed at any moment leaves a file that opens; ``status`` is written
after the arrays of its batch, so a killed batch is simply redone.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from featcache import __version__
from featcache.cache import checksum
from featcache.cache.identity import CacheIdentity
from featcache.cache.spec import OutputSpec
from featcache.datasets import SPLITS, Listing
from featcache.errors import InputError, RunError
from featcache.faults import fault_point

logger = logging.getLogger(__name__)

FORMAT = "featcache-cache"
FORMAT_VERSION = 3  # 2: checksums/ (featcache.cache.checksum); 3: views/erase, views/erase_fill (random erasing)
PENDING, DONE, FAILED = 0, 1, 2
REASON_LEN = 256
SPLIT_CODE = {s: i for i, s in enumerate(SPLITS)}


class CacheError(InputError):
    """A cache file that is not a featcache cache, or does not match the requested run."""


def _create_fixed(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: Any) -> h5py.Dataset:
    """A contiguous dataset allocated now (no fill): later writes touch raw data only."""
    if "/" in name:  # intermediate groups first
        parent, name = name.rsplit("/", 1)
        group = group.require_group(parent)
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    space = h5py.h5s.create_simple(shape)
    tid = h5py.h5t.py_create(np.dtype(dtype), logical=True)
    dsid = h5py.h5d.create(group.id, name.encode(), tid, space, dcpl=dcpl)
    return h5py.Dataset(dsid)


def items_digest(listing: Listing) -> str:
    """Digest of the image list (paths, labels, splits, rejected names): part of the cache's identity."""
    h = hashlib.sha1()
    for it in listing.items:
        h.update(f"{it.path}\t{it.pid}\t{it.camid}\t{it.split}\n".encode())
    for r in listing.rejected:
        h.update(f"{r.path}\trejected\n".encode())
    return h.hexdigest()


def make_identity(listing: Listing, preprocessing: dict[str, Any], backbones: dict[str, dict[str, Any]]) -> CacheIdentity:
    """Everything that must match for a cache to be resumed or reused."""
    ident = CacheIdentity(listing.name, str(listing.root), items_digest(listing), preprocessing, backbones)
    return CacheIdentity.from_json(ident.to_json(), "identity")  # JSON-normalised, as it is read back


def read_identity(f: h5py.File, source: str | Path) -> CacheIdentity:
    return CacheIdentity.from_json(f.attrs.get("identity", ""), str(source))


def check_identity(path: Path, wanted: CacheIdentity) -> None:
    """Refuse to resume a cache made from other data, preprocessing, backbones or weights."""
    with open_cache(path) as f:
        have = read_identity(f, path)
    diffs = have.resume_differences(wanted)
    if diffs:
        raise CacheError(
            f"{path} was built differently and cannot be resumed: " + "; ".join(diffs)
            + ". Use --overwrite to replace it, or another --out."
        )


def open_cache(path: str | Path, mode: str = "r") -> h5py.File:
    """Open a featcache cache, refusing other files with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"cache {path} does not exist")
    try:
        f = h5py.File(path, mode)
    except OSError as exc:
        if exc.errno == errno.EAGAIN or "unable to lock file" in str(exc):
            from featcache.cache.lock import held_by

            who = held_by(path)
            raise CacheError(f"{path} is busy: another process has it open ({f'featcache extract, {who}' if who else 'not a featcache writer'}); "
                             "try again when it has finished") from None
        raise CacheError(f"{path} is not a readable HDF5 file ({str(exc).splitlines()[0]})") from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise CacheError(f"{path} is not a featcache cache (no format={FORMAT!r} attribute)")
    version = int(f.attrs.get("format_version", -1))
    if version > FORMAT_VERSION:
        f.close()
        raise CacheError(f"{path} has format version {version}, newer than this featcache reads ({FORMAT_VERSION}): upgrade featcache")
    return f


def create_cache(
    path: Path,
    listing: Listing,
    identity: CacheIdentity,
    n_views: dict[str, int],
    specs: dict[str, dict[str, OutputSpec]],
    tokens: str,
) -> None:
    """Create the whole file under a temporary name, then rename it into place."""
    counts = view_counts(listing, n_views)
    n_img = len(counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    n_rows = int(counts.sum())
    need = _bytes_needed(specs, tokens, n_img, n_rows)
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise RunError(f"cannot create {path}: it needs {_gib(need)} and {_gib(free)} are free on that filesystem "
                       "(free space, or choose another --out, fewer --views or --tokens none)")
    tmp = path.with_name(path.name + ".creating")
    try:
        _write_new(tmp, listing, identity, specs, tokens, counts, starts, n_img, n_rows)
        _reserve(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # nothing half-made stays behind to stop a rerun
        raise
    os.replace(tmp, path)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _bytes_needed(specs: dict[str, dict[str, OutputSpec]], tokens: str, n_img: int, n_rows: int) -> int:
    """The arrays' bytes plus metadata (about 1 KiB an image and 64 bytes a view row, generously)."""
    total = n_img * 1024 + n_rows * 64 + 2**20
    for outs in specs.values():
        for spec in outs.values():
            if spec.token and tokens == "none":
                continue
            n = (n_img if tokens == "view0" else n_rows) if spec.token else n_rows
            total += n * (int(np.prod(spec.shape, dtype=np.int64)) * np.dtype(spec.dtype).itemsize + 4)
    return total


def _reserve(tmp: Path, path: Path) -> None:
    """Reserve the file's blocks now (posix_fallocate), so that a cache that cannot fit fails at creation,
    not half-way: HDF5 allocated the arrays, but as holes that later writes would have to fill."""
    size = tmp.stat().st_size
    fd = os.open(tmp, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise RunError(f"cannot create {path}: it needs {_gib(size)} on disk and the filesystem has "
                           f"{_gib(shutil.disk_usage(path.parent).free)} free") from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # filesystems without it: holes stay
            raise
    finally:
        os.close(fd)


def view_counts(listing: Listing, n_views: dict[str, int]) -> np.ndarray:
    """Views per image, in cache order (rejected names have none)."""
    return np.array([n_views[it.split] for it in listing.items] + [0] * len(listing.rejected), dtype=np.int64)


def static_tables(listing: Listing, counts: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays a cache's listing fixes at creation: images' labels and row layout, views' owners."""
    items, rej = listing.items, listing.rejected
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    n_rows = int(counts.sum())
    return {
        "images/path": np.array([it.path for it in items] + [r.path for r in rej], dtype=object),
        "images/pid": np.array([it.pid for it in items] + [-1] * len(rej), dtype=np.int32),
        "images/camid": np.array([it.camid for it in items] + [-1] * len(rej), dtype=np.int32),
        "images/split": np.array([SPLIT_CODE[it.split] for it in items] + [SPLIT_CODE[r.split] for r in rej], dtype=np.uint8),
        "images/n_views": counts.astype(np.uint8),
        "images/view_start": starts,
        "views/image": np.repeat(np.arange(len(counts)), counts).astype(np.int64),
        "views/view": (np.arange(n_rows) - np.repeat(starts, counts)).astype(np.uint8),
    }


def restore_static(path: Path, listing: Listing, n_views: dict[str, int]) -> None:
    """Rewrite the arrays the listing fixes (labels, row layout), so that damage to them is repaired from the
    dataset, not carried into new checksums. The cache's identity (checked before) says the listing is the same."""
    tables = static_tables(listing, view_counts(listing, n_views))
    with open_cache(path, "r+") as f:
        for name, data in tables.items():
            if name == "images/path":
                if list(f[name].asstr()[...]) != list(data):
                    f[name][...] = data
            else:
                f[name][...] = data


def _write_new(tmp: Path, listing: Listing, identity: CacheIdentity, specs: dict[str, dict[str, OutputSpec]], tokens: str,
               counts: np.ndarray, starts: np.ndarray, n_img: int, n_rows: int) -> None:
    items = listing.items
    with h5py.File(tmp, "w") as f:
        f.attrs.update(
            format=FORMAT, format_version=FORMAT_VERSION, featcache_version=__version__,
            identity=identity.to_json(), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            split_codes=json.dumps(list(SPLITS)), status_codes=json.dumps({"pending": PENDING, "cached": DONE, "failed": FAILED}),
            tokens=tokens,
        )
        g = f.create_group("images")
        tables = static_tables(listing, counts)
        g.create_dataset("path", data=tables["images/path"], dtype=h5py.string_dtype())
        for name in ("pid", "camid", "split", "n_views", "view_start"):
            g.create_dataset(name, data=tables[f"images/{name}"])
        rej_split = [SPLIT_CODE[r.split] for r in listing.rejected]
        status = np.array([PENDING] * len(items) + [FAILED] * len(rej_split), dtype=np.uint8)
        reason = np.array([b""] * len(items) + [r.reason.encode()[:REASON_LEN] for r in listing.rejected], dtype=f"S{REASON_LEN}")
        for name, data in (("status", status), ("reason", reason)):
            _create_fixed(g, name, data.shape, data.dtype)[...] = data
        for name, dt in (("width", np.int32), ("height", np.int32), ("sha1", "S40")):
            _create_fixed(g, name, (n_img,), dt)
        v = f.create_group("views")
        v.create_dataset("image", data=tables["views/image"])
        v.create_dataset("view", data=tables["views/view"])
        for name, dt in (("dx", np.int16), ("dy", np.int16), ("flip", np.uint8)):
            _create_fixed(v, name, (n_rows,), dt)
        _create_fixed(v, "erase", (n_rows, 4), np.int16)       # ex, ey, ew, eh of the final view; ew = 0: none
        _create_fixed(v, "erase_fill", (n_rows, 3), np.uint8)  # RGB
        for bname, outs in specs.items():
            bg = f.create_group(f"backbones/{bname}")
            bg.attrs["outputs"] = json.dumps({k: s.doc for k, s in outs.items()})
            for oname, spec in outs.items():
                if spec.token and tokens == "none":
                    continue
                n = (n_img if tokens == "view0" else n_rows) if spec.token else n_rows
                ds = _create_fixed(bg, oname, (n, *spec.shape), spec.dtype)
                ds.attrs["doc"] = spec.doc
                ds.attrs["rows"] = ("image" if tokens == "view0" else "view") if spec.token else "view"
                _create_fixed(f, f"{checksum.GROUP}/backbones/{bname}/{oname}", (n,), np.uint32)
        _create_fixed(f, f"{checksum.GROUP}/images", (n_img,), np.uint32)
        _create_fixed(f, f"{checksum.GROUP}/views", (n_rows,), np.uint32)
        f[checksum.GROUP].attrs["doc"] = "CRC-32 of each stored row, written before the batch's status (featcache.cache.checksum)"


class CacheWriter:
    """Writes finished batches into an open cache: arrays first, then status (see module doc)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.f = open_cache(path, "r+")
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
            ok_idx = np.asarray(ok)
            rows = np.concatenate([np.arange(self.view_start[i], self.view_start[i] + self.n_views[i]) for i in ok])
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
                        self._put_checked(bg[oname], f"backbones/{bname}/{oname}", ok_idx, arr[batch.first_view_index])
                    else:
                        self._put_checked(bg[oname], f"backbones/{bname}/{oname}", rows, arr)
            for name, arr in (("width", batch.widths), ("height", batch.heights), ("sha1", batch.sha1)):
                _put(g[name], ok_idx, arr)
            p = batch.params.astype(np.int16)
            image = np.repeat(ok_idx, self.n_views[ok_idx])
            view = rows - self.view_start[image]
            _put(self.f[f"{checksum.GROUP}/views"], rows,
                 checksum.view_crcs(image, view, p[:, 0], p[:, 1], p[:, 2], p[:, 3:7], p[:, 7:10].astype(np.uint8)))
            fields = {k: v[ok_idx] for k, v in self.static.items()}
            fields.update(width=batch.widths, height=batch.heights, sha1=batch.sha1)
            _put(self.f[f"{checksum.GROUP}/images"], ok_idx, checksum.image_crcs(fields, self.paths[ok_idx]))
        self.f.flush()
        fault_point("extract.before_status")  # arrays written, status not yet: the batch must be redone
        idx = np.asarray(batch.images)
        order = np.argsort(idx)
        status = np.where(batch.failed_mask, FAILED, DONE).astype(np.uint8)
        reasons = np.array([r.encode()[:REASON_LEN] for r in batch.reasons], dtype=f"S{REASON_LEN}")
        _put(g["reason"], idx[order], reasons[order])
        _put(g["status"], idx[order], status[order])
        self.f.flush()
        fault_point("extract.after_batch")

    def close(self) -> None:
        self.f.close()


def _runs(rows: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """(a, b, first) for each run rows[a:b] of consecutive rows starting at row ``first``."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for a, b in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]])):
        yield int(a), int(b), int(rows[a])


def _put(ds: h5py.Dataset, rows: np.ndarray, arr: np.ndarray) -> None:
    """Write ``arr`` at ``rows`` (ascending), one slice per run of consecutive rows."""
    if len(rows):
        for a, b, first in _runs(rows):
            ds[first: first + b - a] = arr[a:b]


def read_checked(f: h5py.File, backbone: str, array: str, rows: np.ndarray) -> np.ndarray:
    """``read_rows`` of ``backbones/<backbone>/<array>``, each row checked against its stored checksum."""
    out = read_rows(f["backbones"][backbone][array], rows)
    sums = checksum.array_checksums(f, backbone, array)
    if sums is not None and rows.size:
        bad = np.flatnonzero(checksum.row_crcs(out) != sums[...][rows])  # 4 bytes a row: one read, then index
        if bad.size:
            per_image = f["backbones"][backbone][array].attrs["rows"] == "image"
            images = rows[bad] if per_image else f["views/image"][...][rows[bad]]
            names = f["images/path"].asstr()[...][np.unique(images)]
            raise CacheError(
                f"{f.filename}: {bad.size} row(s) of backbones/{backbone}/{array} fail their checksum "
                f"(images {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}): the file was damaged after it was written; "
                f"`featcache verify {f.filename}` lists every damaged image and `featcache extract ... --repair` redoes them"
            )
    return out


def read_rows(ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Read ``rows`` (ascending), one slice per run of consecutive rows: fast, and no full-array load."""
    out = np.empty((rows.size, *ds.shape[1:]), dtype=ds.dtype)
    if rows.size:
        for a, b, first in _runs(rows):
            out[a:b] = ds[first: first + b - a]
    return out


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
    outputs: dict[str, dict[str, np.ndarray]]

