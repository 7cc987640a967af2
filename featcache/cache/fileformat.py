"""The feature cache's file format at its most basic: its name and version, the image status codes, the error
type, and opening a cache with those checked. Every other module of ``featcache.cache`` builds on this one and it
on none of them, so that the store, checksums and shards do not import each other in a loop."""

from __future__ import annotations

import errno
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py

from featcache.errors import InputError

FORMAT = "featcache-cache"
FORMAT_VERSION = 3  # 2: checksums/ (featcache.cache.checksum); 3: views/erase, views/erase_fill (random erasing)
PENDING, DONE, FAILED = 0, 1, 2


class CacheError(InputError):
    """A cache file that is not a featcache cache, or does not match the requested run."""


def open_cache(path: str | Path, mode: str = "r") -> h5py.File:
    """Open a featcache cache, refusing other files with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"cache {path} does not exist")
    try:
        # featcache's writers hold the writer lock (featcache.cache.lock) and open without HDF5's own file lock,
        # so that readers can open a cache while it is written: they see the images whose status is set, and a
        # status is set only after its batch's rows are flushed. Readers keep HDF5's lock: a foreign writer
        # (plain h5py in 'r+') still makes the file busy.
        f = h5py.File(path, mode, locking=False) if mode == "r+" else h5py.File(path, mode)
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


def window_offsets(f: h5py.File) -> tuple[int, int]:
    """(first image, first view row) of a shard's window in the whole cache; (0, 0) for a whole cache."""
    if "window" not in f.attrs:
        return 0, 0
    w = Window.from_json(f.attrs["window"])
    return int(w.images[0]), int(w.rows[0])


@dataclass(frozen=True)
class Window:
    """One rank's share of a cache: images [images[0], images[1]) and view rows [rows[0], rows[1])."""

    rank: int
    world: int
    batch_size: int
    images: tuple[int, int]
    rows: tuple[int, int]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Window":
        d = json.loads(text)
        return cls(int(d["rank"]), int(d["world"]), int(d["batch_size"]), tuple(d["images"]), tuple(d["rows"]))

    @property
    def n_images(self) -> int:
        return self.images[1] - self.images[0]
