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
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np

from featcache import __version__
from featcache.cache import checksum
from featcache.cache.fileformat import (  # noqa: F401  (re-exported: the store's public names)
    DONE,
    FAILED,
    FORMAT,
    FORMAT_VERSION,
    PENDING,
    CacheError,
    NotResumable,
    Window,
    open_cache_file,
)
from featcache.cache.digests import content_digest, items_digest
from featcache.cache.identity import CacheIdentity
from featcache.cache.spec import OutputSpec
from featcache.datasets import SPLITS, Listing
from featcache.errors import RunError

logger = logging.getLogger(__name__)

REASON_LEN = 256
SPLIT_CODE = {s: i for i, s in enumerate(SPLITS)}


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


def make_identity(listing: Listing, preprocessing: dict[str, Any], backbones: dict[str, dict[str, Any]],
                  digests: np.ndarray | None = None) -> CacheIdentity:
    """Everything that must match for a cache to be resumed or reused; with ``digests`` (``file_digests``), the
    data is identified by content, wherever it lies."""
    content = content_digest(listing, digests) if digests is not None else ""
    ident = CacheIdentity(listing.name, str(listing.root), items_digest(listing), preprocessing, backbones, content)
    return CacheIdentity.from_json(ident.to_json(), "identity")  # JSON-normalised, as it is read back


def read_identity(f: h5py.File, source: str | Path) -> CacheIdentity:
    return CacheIdentity.from_json(f.attrs.get("identity", ""), str(source))


def changed_files(f: h5py.File, digests: np.ndarray) -> list[str]:
    """The cached images whose file's bytes differ now from those extracted (by the SHA-1 the cache stores)."""
    g = f["images"]
    status, sha1 = g["status"][...], g["sha1"][...]
    n = min(len(digests), len(status))
    bad = np.flatnonzero((status[:n] == DONE) & (sha1[:n] != digests[:n]))
    return list(g["path"].asstr()[...][bad])


def check_identity(path: Path, wanted: CacheIdentity, digests: np.ndarray | None = None) -> None:
    """Refuse to resume a cache made from other data, preprocessing, backbones or weights (naming the files whose
    contents changed when ``digests`` are given); a cache whose data was moved is pointed at its new place."""
    with open_cache_file(path) as f:
        have = read_identity(f, path)
        diffs = have.resume_differences(wanted)
        changed = changed_files(f, digests) if digests is not None and any("contents" in d for d in diffs) and "window" not in f.attrs else []
    if changed:
        diffs = [d if "contents" not in d else f"image contents: {len(changed)} file(s) changed since they were extracted "
                 f"({', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''})" for d in diffs]
    if diffs:
        raise NotResumable(
            f"{path} was built differently and cannot be resumed: " + "; ".join(diffs)
            + ". Use --overwrite to replace it, or another --out."
        )
    if have.dataset_root != wanted.dataset_root:  # same data, by content, found elsewhere now
        relocate(path, have.moved_to(wanted.dataset_root))


def follow_moved_data(path: Path, root: str | Path) -> bool:
    """When the cache at ``path`` identifies its data by content and it now lies at ``root`` (a pipeline that skips
    an unchanged extraction after the dataset moved), point the cache there; True if it was moved."""
    with open_cache_file(path) as f:
        have = read_identity(f, path)
    if not have.content or have.dataset_root == str(root):
        return False
    relocate(path, have.moved_to(str(root)))
    return True


def relocate(path: Path, identity: CacheIdentity) -> None:
    """Record where the cache's data lies now (its identity's ``dataset_root``), for the stages that read images."""
    logger.info("%s: its dataset now lies at %s (same contents); the cache points there", path, identity.dataset_root)
    with open_cache_file(path, "r+") as f:
        f.attrs["identity"] = identity.to_json()


def create_cache(
    path: Path,
    listing: Listing,
    identity: CacheIdentity,
    n_views: dict[str, int],
    specs: dict[str, dict[str, OutputSpec]],
    tokens: str,
    window: Window | None = None,
    before_publish: Callable[[Path], None] | None = None,
) -> None:
    """Create the whole file under a temporary name, then rename it into place.

    With ``window`` (one rank's share of a distributed extraction, see
    featcache.cache.shards) the file holds only that window's images and
    view rows, numbered as in the whole cache, and records the window.
    ``before_publish(tmp)`` adds to the file before it is renamed (annotations): a reader never opens a
    published cache while it grows."""
    counts = view_counts(listing, n_views)
    ilo, ihi = window.images if window else (0, len(counts))
    rlo, rhi = window.rows if window else (0, int(counts.sum()))
    need = _bytes_needed(specs, tokens, ihi - ilo, rhi - rlo)
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise RunError(f"cannot create {path}: it needs {_gib(need)} and {_gib(free)} are free on that filesystem "
                       "(free space, or choose another --out, fewer --views or --tokens none)")
    tmp = path.with_name(path.name + ".creating")
    try:
        _write_new(tmp, listing, identity, specs, tokens, counts, window)
        if before_publish is not None:
            before_publish(tmp)
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


def initial_tables(listing: Listing) -> dict[str, np.ndarray]:
    """The starting values of the arrays a run changes: every listed image pending, every rejected name failed."""
    rej = listing.rejected
    return {
        "images/status": np.array([PENDING] * len(listing.items) + [FAILED] * len(rej), dtype=np.uint8),
        "images/reason": np.array([b""] * len(listing.items) + [r.reason.encode()[:REASON_LEN] for r in rej], dtype=f"S{REASON_LEN}"),
    }


def windowed(tables: dict[str, np.ndarray], window: Window | None) -> dict[str, np.ndarray]:
    """``tables`` cut to a window's images (``images/...``) and view rows (``views/...``); all of them without one."""
    if window is None:
        return tables
    return {k: v[slice(*(window.images if k.startswith("images/") else window.rows))] for k, v in tables.items()}


def restore_static(path: Path, listing: Listing, n_views: dict[str, int], window: Window | None = None) -> None:
    """Rewrite the arrays the listing fixes (labels, row layout), so that damage to them is repaired from the
    dataset, not carried into new checksums. The cache's identity (checked before) says the listing is the same."""
    tables = windowed(static_tables(listing, view_counts(listing, n_views)), window)
    with open_cache_file(path, "r+") as f:
        for name, data in tables.items():
            if name == "images/path":
                if list(f[name].asstr()[...]) != list(data):
                    f[name][...] = data
            else:
                f[name][...] = data


@dataclass(frozen=True)
class Array:
    """An array a run writes: one row per image or per view row, allocated at creation, never resized."""

    name: str
    per: str                  # "image" or "view"
    tail: tuple[int, ...]
    dtype: Any
    attrs: dict[str, str]

    @property
    def output(self) -> tuple[str, str] | None:
        """(backbone, output) of a backbone's stored output; None for the other arrays."""
        parts = self.name.split("/")
        return (parts[1], parts[2]) if len(parts) == 3 and parts[0] == "backbones" else None


def run_arrays(specs: dict[str, dict[str, OutputSpec]], tokens: str) -> list[Array]:
    """Every array extraction writes (the rest of a cache is fixed by the listing), in creation order."""
    out = [Array("images/status", "image", (), np.uint8, {}), Array("images/reason", "image", (), f"S{REASON_LEN}", {}),
           Array("images/width", "image", (), np.int32, {}), Array("images/height", "image", (), np.int32, {}),
           Array("images/sha1", "image", (), "S40", {})]
    out += [Array(f"views/{n}", "view", (), dt, {}) for n, dt in (("dx", np.int16), ("dy", np.int16), ("flip", np.uint8))]
    out.append(Array("views/erase", "view", (4,), np.int16, {}))        # ex, ey, ew, eh of the final view; ew = 0: none
    out.append(Array("views/erase_fill", "view", (3,), np.uint8, {}))   # RGB
    for bname, outs in specs.items():
        for oname, spec in outs.items():
            if spec.token and tokens == "none":
                continue
            per = ("image" if tokens == "view0" else "view") if spec.token else "view"
            out.append(Array(f"backbones/{bname}/{oname}", per, tuple(spec.shape), spec.dtype, {"doc": spec.doc, "rows": per}))
            out.append(Array(f"{checksum.GROUP}/backbones/{bname}/{oname}", per, (), np.uint32, {}))
    out.append(Array(f"{checksum.GROUP}/images", "image", (), np.uint32, {}))
    out.append(Array(f"{checksum.GROUP}/views", "view", (), np.uint32, {}))
    return out


def root_attrs(identity: CacheIdentity, tokens: str) -> dict[str, Any]:
    """The root attributes of a new cache (docs/cache-format.md)."""
    return dict(format=FORMAT, format_version=FORMAT_VERSION, featcache_version=__version__,
                identity=identity.to_json(), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                split_codes=json.dumps(list(SPLITS)), status_codes=json.dumps({"pending": PENDING, "cached": DONE, "failed": FAILED}),
                tokens=tokens)


def write_groups(f: h5py.File, specs: dict[str, dict[str, OutputSpec]], static: dict[str, np.ndarray]) -> None:
    """The fixed part of a new cache: the listing's tables and the groups' attributes."""
    for name, data in static.items():
        f.create_dataset(name, data=data, dtype=h5py.string_dtype() if name == "images/path" else None)
    for bname, outs in specs.items():
        f.require_group(f"backbones/{bname}").attrs["outputs"] = json.dumps({k: s.doc for k, s in outs.items()})
    f.require_group(checksum.GROUP).attrs["doc"] = "CRC-32 of each stored row, written before the batch's status (featcache.cache.checksum)"


def _write_new(tmp: Path, listing: Listing, identity: CacheIdentity, specs: dict[str, dict[str, OutputSpec]], tokens: str,
               counts: np.ndarray, window: Window | None) -> None:
    n_img = (window.images[1] - window.images[0]) if window else len(counts)
    n_rows = (window.rows[1] - window.rows[0]) if window else int(counts.sum())
    initial = windowed(initial_tables(listing), window)
    with h5py.File(tmp, "w") as f:
        f.attrs.update(root_attrs(identity, tokens))
        if window is not None:
            f.attrs["window"] = window.to_json()
        write_groups(f, specs, windowed(static_tables(listing, counts), window))
        for arr in run_arrays(specs, tokens):
            ds = _create_fixed(f, arr.name, (n_img if arr.per == "image" else n_rows, *arr.tail), arr.dtype)
            ds.attrs.update(arr.attrs)
            if arr.name in initial:
                ds[...] = initial[arr.name]


def _runs(rows: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """(a, b, first) for each run rows[a:b] of consecutive rows starting at row ``first``."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for a, b in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]])):
        yield int(a), int(b), int(rows[a])


def read_checked(f: h5py.File, backbone: str, array: str, rows: np.ndarray) -> np.ndarray:
    """``read_rows`` of ``backbones/<backbone>/<array>``, each row checked against its stored checksum."""
    out = read_rows(f["backbones"][backbone][array], rows)
    sums = checksum.array_checksums(f, backbone, array)
    if sums is not None and rows.size:
        bad = np.flatnonzero(checksum.row_crcs(out) != sums[...][rows])  # 4 bytes a row: one read, then index
        if bad.size:
            raise CacheError(
                f"{f.filename}: {bad.size} row(s) of backbones/{backbone}/{array} fail their checksum "
                f"(images {_image_names(f, backbone, array, rows[bad])}): the file was damaged after it was written; "
                f"`featcache verify {f.filename}` lists every damaged image and `featcache extract ... --repair` redoes them"
            )
    bad = checksum.nonfinite_rows(out)
    if bad.size:
        raise CacheError(
            f"{f.filename}: {bad.size} row(s) of backbones/{backbone}/{array} hold NaN or inf "
            f"(images {_image_names(f, backbone, array, rows[bad])}); featcache refuses to use them. "
            f"`featcache verify {f.filename}` lists them and `featcache extract ... --repair` extracts them again "
            "(an image whose backbone output is again non-finite is then recorded as failed)"
        )
    return out


def _image_names(f: h5py.File, backbone: str, array: str, rows: np.ndarray) -> str:
    """The files owning rows ``rows`` of a stored array (per view row or per image), the first five named."""
    per_image = f["backbones"][backbone][array].attrs["rows"] == "image"
    images = rows if per_image else f["views/image"][...][rows]
    names = f["images/path"].asstr()[...][np.unique(images)]
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


def read_rows(ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Read ``rows`` (ascending), one slice per run of consecutive rows: fast, and no full-array load."""
    out = np.empty((rows.size, *ds.shape[1:]), dtype=ds.dtype)
    if rows.size:
        for a, b, first in _runs(rows):
            out[a:b] = ds[first: first + b - a]
    return out
