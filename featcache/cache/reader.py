"""Reading a cache: the cached images of a split (identities, cameras, view rows) and a summary of the file."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featcache.cache.checksum import check_images
from featcache.cache.identity import CacheIdentity
from featcache.cache.store import DONE, FAILED, PENDING, CacheError, open_cache, read_checked, read_identity
from featcache.datasets import SPLITS

logger = logging.getLogger(__name__)


@dataclass
class CacheSplit:
    """The cached images of one split: identities, cameras, names and their view rows."""

    cache: Path
    split: str
    images: np.ndarray      # indices into images/
    pids: np.ndarray
    camids: np.ndarray
    names: np.ndarray       # paths relative to the dataset root
    view_start: np.ndarray
    n_views: np.ndarray
    identity: CacheIdentity

    @classmethod
    def load(cls, cache: Path, split: str) -> "CacheSplit":
        with open_cache(cache) as f:
            g = f["images"]
            keep = (g["split"][...] == SPLITS.index(split)) & (g["status"][...] == DONE)
            idx = np.flatnonzero(keep)
            check_images(f, idx)
            out = cls(
                Path(cache), split, idx, g["pid"][...][idx], g["camid"][...][idx], g["path"].asstr()[...][idx],
                g["view_start"][...][idx], g["n_views"][...][idx], read_identity(f, cache),
            )
        if idx.size == 0:
            raise CacheError(f"{cache} holds no cached {split} images")
        return out

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, keep: np.ndarray) -> "CacheSplit":
        """The images selected by mask or index ``keep`` (a validation split carved from training, say)."""
        return dataclasses.replace(self, images=self.images[keep], pids=self.pids[keep], camids=self.camids[keep],
                                   names=self.names[keep], view_start=self.view_start[keep], n_views=self.n_views[keep])

    @property
    def root(self) -> Path:
        return Path(self.identity.dataset_root)

    def rows(self, view: int) -> np.ndarray:
        """The view row of view ``view`` of each image."""
        if (self.n_views <= view).any():
            raise CacheError(f"{self.cache}: some {self.split} images have no view {view} (extracted with --views 1?)")
        return self.view_start + view

    def read(self, backbone: str, array: str, view: int, subset: slice | None = None) -> np.ndarray:
        """Rows of ``backbones/<backbone>/<array>`` for view ``view`` of each image of the split (or of ``subset``)."""
        rows = self.rows(view)
        if subset is not None:
            rows = rows[subset]
        with open_cache(self.cache) as f:
            if backbone not in f["backbones"]:
                raise CacheError(f"{self.cache} has no backbone {backbone!r}; it holds: {', '.join(f['backbones'])}")
            return read_checked(f, backbone, array, rows)


def status_counts(path: str | Path) -> dict[str, dict[str, int]]:
    """Images per split that are pending (extraction unfinished) and failed (unreadable files)."""
    with open_cache(path) as f:
        status, split = f["images/status"][...], f["images/split"][...]
    return {name: {s: int(((status == code) & (split == i)).sum()) for i, s in enumerate(SPLITS)}
            for name, code in (("pending", PENDING), ("failed", FAILED))}


def summary(path: str | Path) -> dict[str, Any]:
    """What ``featcache info --json`` prints: counts per split, failures, arrays and sizes per backbone."""
    with open_cache(path) as f:
        g = f["images"]
        status, split = g["status"][...], g["split"][...]
        paths, reasons = g["path"].asstr()[...], g["reason"][...]
        out: dict[str, Any] = {
            "path": str(path),
            "format_version": int(f.attrs["format_version"]),
            "featcache_version": f.attrs["featcache_version"],
            "identity": read_identity(f, path).to_dict(),
            "splits": {s: int(((status == DONE) & (split == i)).sum()) for i, s in enumerate(SPLITS)},
            "pending": int((status == PENDING).sum()),
            "pending_per_split": {s: int(((status == PENDING) & (split == i)).sum()) for i, s in enumerate(SPLITS)},
            "failed": [{"path": str(paths[i]), "reason": reasons[i].decode(errors="replace")} for i in np.flatnonzero(status == FAILED)],
            "tokens": f.attrs["tokens"],
            "backbones": {},
            "file_bytes": Path(path).stat().st_size,
        }
        for name, bg in f["backbones"].items():
            arrays = {k: {"shape": list(d.shape), "dtype": str(d.dtype), "rows": d.attrs["rows"], "doc": d.attrs["doc"]} for k, d in bg.items()}
            out["backbones"][name] = {"arrays": arrays, "bytes": int(sum(_stored_bytes(d) for d in bg.values()))}
        shards = "shards" in f.attrs
    if shards:  # a distributed extraction's master: the arrays live in the shard files
        from featcache.cache.shards import shard_status

        states = shard_status(Path(path))
        out["shards"] = [{"path": str(p), "state": st} for p, st in states]
        out["file_bytes"] += sum(p.stat().st_size for p, st in states if st == "published")
    return out


def _stored_bytes(ds) -> int:
    """Bytes a dataset holds on disk; for a virtual dataset, the bytes it maps (in its source files)."""
    return int(np.prod(ds.shape, dtype=np.int64)) * ds.dtype.itemsize if ds.is_virtual else int(ds.id.get_storage_size())


def split_stats(path: str | Path) -> dict[str, dict[str, int]]:
    """The paper's Table 1 from a cache: cached images, identities and cameras per split (distractors, pid <= 0,
    count as images but not as identities)."""
    with open_cache(path) as f:
        g = f["images"]
        done = g["status"][...] == DONE
        split, pid, cam = g["split"][...], g["pid"][...], g["camid"][...]
    out = {}
    for i, name in enumerate(SPLITS):
        m = done & (split == i)
        out[name] = {"images": int(m.sum()), "identities": int(np.unique(pid[m & (pid > 0)]).size),
                     "cameras": int(np.unique(cam[m]).size)}
    return out
