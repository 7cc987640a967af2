"""Checksums of every stored row, so that a flipped byte is found, named and repaired instead of used.

Format 2 caches hold ``checksums/``: a CRC-32 per stored row, written with
its batch before the batch's status flags.

- ``checksums/backbones/<preset>/<array>``: one per row of that array (per
  view row, or per image for ``--tokens view0`` tokens);
- ``checksums/views``: one per view row, over its ``image``, ``view``, ``dx``, ``dy``, ``flip`` (and, format 3,
  ``erase`` and ``erase_fill``);
- ``checksums/images``: one per image, over its ``path``, ``pid``, ``camid``,
  ``split``, ``n_views``, ``view_start``, ``width``, ``height`` and ``sha1``;
- ``checksums/synthetic/<name>``: one per view row of an annotation (a synthetic cache's known route or camera
  condition), written with it.

Readers of pooled features (evaluation, training) check the rows they load;
``featcache verify`` checks everything and names the images whose rows fail,
and, since a row stored with NaN or inf matches its checksum, also names rows
that hold NaN or inf (readers refuse them too).
Format 1 caches carry no checksums and are read without checks.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field
from typing import Iterator
from pathlib import Path

import h5py
import numpy as np

from featcache.cache.fileformat import ANNOTATIONS, DONE, FAILED, PENDING, CacheError, open_cache_file, window_offsets
from featcache.errors import InputError

logger = logging.getLogger(__name__)

GROUP = "checksums"
IMAGE_FIELDS = ("pid", "camid", "split", "n_views", "view_start", "width", "height", "sha1")


def row_crcs(arr: np.ndarray) -> np.ndarray:
    """CRC-32 of each row's bytes: (n, ...) -> (n,) uint32."""
    a = np.ascontiguousarray(arr)
    if len(a) == 0:
        return np.zeros(0, np.uint32)
    flat = a.reshape(len(a), -1).view(np.uint8).reshape(len(a), -1)
    return np.fromiter((zlib.crc32(r) for r in flat), dtype=np.uint32, count=len(a))


def nonfinite_rows(arr: np.ndarray) -> np.ndarray:
    """Indices of the rows of a float array that hold NaN or inf (none for integer arrays)."""
    if arr.dtype.kind != "f" or not len(arr):
        return np.zeros(0, np.int64)
    return np.flatnonzero(~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1))


def image_crcs(fields: dict[str, np.ndarray], paths: np.ndarray) -> np.ndarray:
    """CRC-32 of each image's metadata row (``IMAGE_FIELDS`` then the UTF-8 path)."""
    n = len(paths)
    out = np.empty(n, np.uint32)
    cols = [np.ascontiguousarray(fields[k]) for k in IMAGE_FIELDS]
    for i in range(n):
        crc = 0
        for c in cols:
            crc = zlib.crc32(c[i].tobytes(), crc)
        out[i] = zlib.crc32(str(paths[i]).encode(), crc)
    return out


def view_crcs(image: np.ndarray, view: np.ndarray, dx: np.ndarray, dy: np.ndarray, flip: np.ndarray,
              erase: np.ndarray | None = None, erase_fill: np.ndarray | None = None) -> np.ndarray:
    """CRC-32 of each view row: its image, view index and augmentation parameters (erasing too, format 3), as stored."""
    cols = [np.ascontiguousarray(a, dtype=dt).reshape(len(image), -1).view(np.uint8)
            for a, dt in ((image, np.int64), (view, np.uint8), (dx, np.int16), (dy, np.int16), (flip, np.uint8),
                          (erase, np.int16), (erase_fill, np.uint8)) if a is not None]
    return row_crcs(np.concatenate(cols, axis=1))


def _views(f: h5py.File) -> np.ndarray:
    v = f["views"]
    erase = (v["erase"][...], v["erase_fill"][...]) if "erase" in v else ()
    return view_crcs(v["image"][...], v["view"][...], v["dx"][...], v["dy"][...], v["flip"][...], *erase)


def has_checksums(f: h5py.File) -> bool:
    return GROUP in f


def annotation_key(name: str) -> str:
    """Where the checksums of annotation ``name`` (``synthetic/<name>``) are stored."""
    return f"{GROUP}/{ANNOTATIONS}/{name}"


def check_annotation(f: h5py.File, name: str, values: np.ndarray) -> np.ndarray:
    """The rows of annotation ``name`` whose values fail their checksum (none when it carries no checksums)."""
    key = annotation_key(name)
    if key not in f:
        return np.zeros(0, np.int64)
    return np.flatnonzero(row_crcs(values) != f[key][...])


def array_checksums(f: h5py.File, backbone: str, array: str) -> h5py.Dataset | None:
    key = f"{GROUP}/backbones/{backbone}/{array}"
    return f[key] if key in f else None


@dataclass
class VerifyReport:
    """What ``verify`` found: the images whose rows fail, with the arrays that failed."""
    checked_images: int = 0
    checked_bytes: int = 0
    seconds: float = 0.0
    bad: dict[int, list[str]] = field(default_factory=dict)   # image row -> failing arrays
    paths: dict[int, str] = field(default_factory=dict)

    def add(self, image: int, what: str) -> None:
        if what not in self.bad.setdefault(int(image), []):
            self.bad[int(image)].append(what)

    @property
    def mb_per_s(self) -> float:
        return self.checked_bytes / 2**20 / self.seconds if self.seconds > 0 else 0.0

    def lines(self, cache: Path) -> list[str]:
        """What ``featcache verify`` prints: each damaged image, then what was checked."""
        out = [f"damaged: {self.paths[i]}: {', '.join(self.bad[i])}" for i in sorted(self.bad)]
        return out + [f"{cache}: {self.checked_images} cached images, {self.checked_bytes / 2**20:.1f} MiB checked "
                      f"in {self.seconds:.2f} s ({self.mb_per_s:.0f} MiB/s)"]

    def refuse_damage(self, cache: Path) -> None:
        """Fail, saying how to repair, if any image is damaged."""
        if self.bad:
            raise InputError(f"{cache}: {len(self.bad)} damaged image(s); `featcache extract ... --out {cache} --repair` "
                             "(with the options that made the cache) extracts exactly them again")


def _chunks(n: int, rows_per_chunk: int) -> Iterator[tuple[int, int]]:
    for s in range(0, n, rows_per_chunk):
        yield s, min(n, s + rows_per_chunk)


def verify(f: h5py.File, chunk_bytes: int = 64 * 2**20, progress=None) -> VerifyReport:
    """Check every stored row of the cached images against its checksum."""
    rep = VerifyReport()
    t0 = time.perf_counter()

    g = f["images"]
    status = g["status"][...]
    paths = g["path"].asstr()[...]
    n_img = len(status)
    image0, row0 = window_offsets(f)  # a shard: images and rows are numbered as in the whole cache
    done = status == DONE
    for i in np.flatnonzero(~np.isin(status, (PENDING, DONE, FAILED))):
        rep.add(i, "images/status")
    rep.checked_images = int(done.sum())
    fields = {k: g[k][...] for k in IMAGE_FIELDS}
    bad = np.flatnonzero(done & (image_crcs(fields, paths) != f[f"{GROUP}/images"][...]))
    for i in bad:
        rep.add(i, "images")
    # which image owns each view row: views/image, itself checked by the views checksum; a damaged entry
    # there is named through view_start instead (the rows of image i start at view_start[i])
    view_image = np.clip(f["views/image"][...] - image0, 0, n_img - 1)
    vbad = np.flatnonzero(_views(f) != f[f"{GROUP}/views"][...])
    by_start = np.clip(np.searchsorted(fields["view_start"] - row0, vbad, side="right") - 1, 0, n_img - 1)
    view_image[vbad] = by_start
    for r in vbad:
        if done[view_image[r]]:
            rep.add(view_image[r], "views")
    for name, ds in (f[ANNOTATIONS].items() if ANNOTATIONS in f else ()):
        for r in check_annotation(f, name, ds[...]):
            if done[view_image[r]]:
                rep.add(view_image[r], f"{ANNOTATIONS}/{name}")
    for bname, bg in f["backbones"].items():
        for aname, ds in bg.items():
            sums = array_checksums(f, bname, aname)
            if sums is None:
                continue
            per_image = ds.attrs["rows"] == "image"
            owner = np.arange(n_img) if per_image else view_image
            want = sums[...]
            row_bytes = max(1, int(np.prod(ds.shape[1:])) * ds.dtype.itemsize)
            for a, b in _chunks(ds.shape[0], max(1, chunk_bytes // row_bytes)):
                live = done[owner[a:b]]
                if not live.any():
                    continue
                chunk = ds[a:b]
                got = row_crcs(chunk)
                rep.checked_bytes += (b - a) * row_bytes
                for r in np.flatnonzero(live & (got != want[a:b])):
                    rep.add(owner[a + r], f"backbones/{bname}/{aname}")
                for r in nonfinite_rows(chunk):  # stored as computed, so its checksum matches: still unusable
                    if live[r]:
                        rep.add(owner[a + r], f"backbones/{bname}/{aname} (NaN or inf)")
                if progress is not None:
                    progress(b - a)
    rep.paths = {i: str(paths[i]) for i in rep.bad}
    rep.seconds = time.perf_counter() - t0
    return rep


def verify_cache(path, progress=None) -> VerifyReport:
    """``featcache verify``: every stored row of ``path`` against its checksum."""
    with open_cache_file(path) as f:
        if not has_checksums(f):
            raise CacheError(f"{path} is a format {int(f.attrs['format_version'])} cache, which carries no checksums "
                             "(extract it again with this featcache to get them)")
        return verify(f, progress=progress)


def mark_for_repair(path, report: VerifyReport) -> int:
    """Set the images ``report`` found damaged back to pending, so that a resumed extraction redoes exactly them."""
    bad = np.array(sorted(report.bad), dtype=np.int64)
    if bad.size:
        with open_cache_file(path, "r+") as f:
            status = f["images/status"]
            for i in bad:
                status[int(i)] = PENDING
    return int(bad.size)


def check_images(f: h5py.File, images: np.ndarray) -> None:
    """Refuse to use images whose metadata (labels, cameras, row layout) fail their checksums."""
    if not has_checksums(f) or not len(images):
        return
    g = f["images"]
    fields = {k: g[k][...][images] for k in IMAGE_FIELDS}
    paths = g["path"].asstr()[...][images]
    bad = np.flatnonzero(image_crcs(fields, paths) != f[f"{GROUP}/images"][...][images])
    if bad.size:
        raise CacheError(f"{f.filename}: the metadata (identity, camera, rows) of {bad.size} image(s) fail their checksum "
                         f"(images {', '.join(paths[bad][:5])}{' ...' if bad.size > 5 else ''}): `featcache verify {f.filename}` "
                         "lists every damaged image and `featcache extract ... --repair` restores them")
