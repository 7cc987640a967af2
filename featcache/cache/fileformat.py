"""featcache's HDF5 files at their most basic: each format's name and version, the image status codes, the error
type, and one door (``open_featcache``) that opens any of them with its format and version checked. Every other
module of ``featcache.cache`` builds on this one and it on none of them, so that the store, checksums and shards do
not import each other in a loop.

Three formats, all plain HDF5 that h5py reads as documented (docs/cache-format.md):

- ``featcache-cache``: the feature cache (``store``, ``writer``, ``reader``);
- ``featcache-teacher-targets``: a gate run's outputs per training view (``targets``);
- ``featcache-pixel-cache``: letterboxed uint8 images for the student (``pixelcache``).
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py

from featcache.errors import InputError

FORMAT = "featcache-cache"
ANNOTATIONS = "synthetic"  # the one group of annotations a cache may carry (synthetic caches: route, conditions)
ROUTE, CONDITION = "route", "condition"  # its two annotations (cache.writer writes them, cache.reader reads them)
FORMAT_VERSION = 3  # 2: checksums/ (featcache.cache.checksum); 3: views/erase, views/erase_fill (random erasing)
TARGETS_FORMAT, TARGETS_VERSION = "featcache-teacher-targets", 2  # 2: retrieval, val/
PIXELS_FORMAT, PIXELS_VERSION = "featcache-pixel-cache", 1
PENDING, DONE, FAILED = 0, 1, 2


@dataclass(frozen=True)
class FileKind:
    """One of featcache's HDF5 formats: its ``format`` attribute, the newest version this featcache reads, and
    how messages name such a file."""

    format: str
    version: int
    noun: str   # in "X is not a <noun>"
    short: str  # in "<short> X does not exist"


KINDS = {
    "cache": FileKind(FORMAT, FORMAT_VERSION, "featcache cache", "cache"),
    "teacher-targets": FileKind(TARGETS_FORMAT, TARGETS_VERSION, "featcache teacher-targets file", "teacher targets"),
    "pixels": FileKind(PIXELS_FORMAT, PIXELS_VERSION, "featcache pixel cache", "pixel cache"),
}


class CacheError(InputError):
    """A cache file that is not a featcache cache, or does not match the requested run."""


class EmptySplit(CacheError):
    """A split (train, query, gallery) of which the cache holds no cached image: callers say what needed it."""

    def __init__(self, cache: str | Path, split: str) -> None:
        super().__init__(f"{cache} holds no cached {split} images")
        self.cache, self.split = Path(cache), split


class CacheBusy(CacheError):
    """Another process holds the cache file open for writing: try again later, never replace it."""


class NotResumable(CacheError):
    """A cache built from other inputs or options than the run that wants to resume it."""


def open_featcache(path: str | Path, kind: str, mode: str = "r", label: str = "") -> h5py.File:
    """Open one of featcache's HDF5 files (``kind`` in ``KINDS``), refusing a missing file, another kind of file
    or a newer version with one line that names it (``label``, an option such as ``--pixel-cache``, first)."""
    fk = KINDS[kind]
    path = Path(path)
    name = f"{label} {path}" if label else str(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.h5"))
        raise CacheError(f"{label or fk.short} {path} is a folder, not a {fk.noun} file: "
                         + (f"give one of the files it holds ({', '.join(found[:5])}{' ...' if len(found) > 5 else ''}), "
                            f"e.g. {path / found[0]}" if found else "give the path of a .h5 file"))
    if not path.is_file():
        raise CacheError(f"{label or fk.short} {path} does not exist")
    try:
        # featcache's writers hold the writer lock (featcache.cache.lock) and open without HDF5's own file lock,
        # so that readers can open a file while it is written: they see the images whose status is set, and a
        # status is set only after its batch's rows are flushed. Readers keep HDF5's lock: a foreign writer
        # (plain h5py in 'r+') still makes the file busy.
        f = h5py.File(path, mode, locking=False) if mode == "r+" else h5py.File(path, mode)
    except OSError as exc:
        if exc.errno == errno.EAGAIN or "unable to lock file" in str(exc):
            from featcache.cache.lock import held_by

            who = held_by(path)
            raise CacheBusy(f"{path} is busy: another process has it open ({f'featcache extract, {who}' if who else 'not a featcache writer'}); "
                             "try again when it has finished") from None
        if mode != "r" and not os.access(path, os.W_OK):
            raise CacheError(f"{name} is read-only (permission denied): featcache reads it as it is (info, eval, training), "
                             "but writing into it (resuming, repairing) needs it writable") from None
        raise CacheError(f"{name} is not a readable HDF5 file ({str(exc).splitlines()[0]})") from None
    if f.attrs.get("format") != fk.format:
        f.close()
        raise CacheError(f"{name} is not a {fk.noun} (no format={fk.format!r} attribute)")
    version = int(f.attrs.get("format_version", -1))
    if version > fk.version:
        f.close()
        raise CacheError(f"{name} has format version {version}, newer than this featcache reads ({fk.version}): upgrade featcache")
    return f


def open_cache_file(path: str | Path, mode: str = "r") -> h5py.File:
    """Open a featcache feature cache, refusing other files with a clear message."""
    return open_featcache(path, "cache", mode)


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
