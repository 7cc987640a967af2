"""The pixel cache: every cached image decoded and letterboxed once, as uint8 in HDF5, so no epoch decodes a JPEG.

``PIXELS.h5`` (format ``featcache-pixel-cache``, version 1) has one row per
row of the feature cache's ``images/`` table: ``image`` (H, W, 3) uint8, the
letterboxed image every view is cut from (``featcache.preprocess.letterbox``),
with its CRC-32 in ``crc`` and a ``done`` flag. The attributes record the
feature cache's identity digest and the input size, and ``sha1`` copies the
cache's content hash of every image: a pixel cache built for other images or
another size is refused, never silently used.

Building it resumes like extraction: the datasets are allocated up front,
each batch is written, flushed, then marked done, so a killed build goes on
from the first image not marked. One writer at a time (``WriterLock``).
"""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path

import h5py
import numpy as np

from featcache import __version__
from featcache.cache.checksum import row_crcs
from featcache.cache.fileformat import DONE, PIXELS_FORMAT, PIXELS_VERSION, open_featcache
from featcache.cache.lock import WriterLock
from featcache.cache.pixels import ViewPixels
from featcache.cache.reader import CacheReader
from featcache.errors import InputError
from featcache.progress import progress

logger = logging.getLogger(__name__)

WRITE_BATCH = 64


def _source(cache: Path) -> tuple[str, tuple[int, int], str, np.ndarray, np.ndarray, np.ndarray]:
    """What the pixel cache must match: the cache's identity digest, input size, root, paths, SHA-1s, statuses."""
    with CacheReader(cache) as c:
        ident = c.identity
        return (ident.digest(), tuple(ident.preprocessing["image_size"]), ident.dataset_root,
                c.table("path"), c.table("sha1"), c.table("status"))


def check_pixel_cache(path: Path, cache: Path) -> None:
    """Refuse a pixel cache made for another cache, other images or another size (one line naming what differs)."""
    digest, size, _, _, sha1, _ = _source(cache)
    with open_featcache(path, "pixels", label="--pixel-cache") as f:
        have = tuple(int(v) for v in f.attrs["image_size"])
        if have != size:
            raise InputError(f"--pixel-cache {path} holds {have[0]}x{have[1]} images, but {cache} was extracted at "
                             f"{size[0]}x{size[1]}; use another --pixel-cache path")
        if len(f["sha1"]) != len(sha1) or f.attrs["cache_identity"] != digest:
            raise InputError(f"--pixel-cache {path} was built for another cache (identity {f.attrs['cache_identity']}, "
                             f"{cache} is {digest}); use another --pixel-cache path")
        differ = np.flatnonzero(f["sha1"][...] != sha1)
        if differ.size:
            raise InputError(f"--pixel-cache {path} holds other versions of {differ.size} image(s) than {cache} "
                             f"(row {int(differ[0])} first); use another --pixel-cache path")


def build_pixel_cache(path: Path, cache: Path, root: Path | None = None) -> dict:
    """Create or resume ``path`` for every cached image of ``cache``; returns counts and the decode rate."""
    path = Path(path)
    digest, size, _, paths, sha1, status = _source(cache)
    views = ViewPixels(cache, root)
    with WriterLock(path):
        if path.exists():
            check_pixel_cache(path, cache)
        else:
            _create(path, digest, size, paths, sha1)
        with open_featcache(path, "pixels", label="--pixel-cache") as f:
            todo = np.flatnonzero((status == DONE) & ~f["done"][...])
        if not len(todo):  # complete: nothing to write (and readers in this process may keep it open)
            return {"path": str(path), "decoded": 0, "images": int((status == DONE).sum()), "seconds": 0.0}
        with open_featcache(path, "pixels", "r+", label="--pixel-cache") as f:
            t0 = time.perf_counter()
            bar = progress(total=len(todo), desc=f"pixel cache {path.name}", unit="img")
            for s in range(0, len(todo), WRITE_BATCH):
                rows = todo[s: s + WRITE_BATCH]
                imgs = np.stack([views.base(int(i)) for i in rows])
                for i, img in zip(rows, imgs):  # rows are increasing; one chunk per image
                    f["image"][i] = img
                f["crc"][rows] = row_crcs(imgs)
                f.flush()
                f["done"][rows] = True
                f.flush()
                bar.update(len(rows))
            bar.close()
            seconds = time.perf_counter() - t0
            n_done = int(f["done"][...].sum())
    logger.info("pixel cache %s: %d images decoded this run (%d in all)", path, len(todo), n_done)
    return {"path": str(path), "decoded": int(len(todo)), "images": n_done, "seconds": seconds}


def _create(path: Path, digest: str, size: tuple[int, int], paths: np.ndarray, sha1: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    n, (h, w) = len(paths), size
    with h5py.File(tmp, "w") as f:
        f.attrs.update(format=PIXELS_FORMAT, format_version=PIXELS_VERSION, featcache_version=__version__,
                       cache_identity=digest, image_size=list(size), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       doc="one row per row of the feature cache's images/: the letterboxed uint8 image views are cut from")
        # every chunk allocated now: later writes change raw bytes only, never HDF5's chunk index, so a run
        # killed at any moment leaves a file that opens (as the feature cache, featcache.cache.store)
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((1, h, w, 3))
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        h5py.h5d.create(f.id, b"image", h5py.h5t.py_create(np.dtype(np.uint8)), h5py.h5s.create_simple((n, h, w, 3)), dcpl=dcpl)
        f.create_dataset("crc", data=np.zeros(n, np.uint32))  # written now: allocated now
        f.create_dataset("done", data=np.zeros(n, bool))
        f.create_dataset("sha1", data=sha1)
        f.create_dataset("path", data=np.asarray(paths, dtype=object), dtype=h5py.string_dtype())
    tmp.replace(path)


class PixelReader:
    """Reads letterboxed images by cache row, opening the file lazily (so it can be sent to DataLoader workers)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._f: h5py.File | None = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "_f": None}

    def _open(self) -> None:
        """Open once per process; the small tables stay in memory (an HDF5 lookup costs ~100 us, a row read ~10 us)."""
        self._f = open_featcache(self.path, "pixels", label="--pixel-cache")
        self._image = self._f["image"]
        self._done, self._crc = self._f["done"][...], self._f["crc"][...]

    def base(self, row: int) -> np.ndarray:
        if self._f is None:
            self._open()
        if not self._done[row]:
            raise InputError(f"--pixel-cache {self.path}: image row {row} was never built (the build did not finish)")
        img = self._image[row]
        if zlib.crc32(img) != self._crc[row]:
            raise InputError(f"--pixel-cache {self.path}: image row {row} fails its checksum (the file is damaged); delete it to rebuild")
        return img
