"""Reading a cache: ``CacheReader`` (the one way stages read a cache file), the cached images of a split
(identities, cameras, view rows, read through the reader they came from), and what a stage trains on when the
extraction has not finished (``training_coverage``).

Stages never name the file's HDF5 paths: they ask a ``CacheReader`` for tables by name (``table('pid')``), for
stored arrays by backbone and output (``read``, every row checked against its checksum and refused when it holds
NaN or inf), and for the cache's identity. docs/cache-format.md documents the layout for plain h5py users.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from featcache.cache.checksum import check_annotation, check_images
from featcache.cache.identity import CacheIdentity
from featcache.cache.fileformat import ANNOTATIONS, CONDITION, ROUTE, EmptySplit
from featcache.cache.store import DONE, FAILED, PENDING, CacheError, open_cache_file, read_checked, read_identity
from featcache.datasets import SPLITS
from featcache.errors import check_choice

logger = logging.getLogger(__name__)

TABLES = ("path", "pid", "camid", "split", "status", "reason", "width", "height", "sha1", "n_views", "view_start")


class CacheReader:
    """An open feature cache, for reading: identity, per-image tables, view parameters and stored arrays.

    Use as a context manager (``with CacheReader(path) as c: ...``); ``cache_identity(path)`` reads the
    identity alone."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._f = open_cache_file(self.path)

    @contextlib.contextmanager
    def fork_safe(self) -> Iterator[None]:
        """Closed inside the block, reopened after it: an open HDF5 file must not cross the fork that starts
        DataLoader workers (a child would share its file handle and HDF5 state); the workers open their own."""
        self._f.close()
        try:
            yield
        finally:
            self._f = open_cache_file(self.path)

    def __enter__(self) -> "CacheReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    @property
    def is_open(self) -> bool:
        return bool(self._f)

    @cached_property
    def identity(self) -> CacheIdentity:
        return read_identity(self._f, self.path)

    @property
    def format_version(self) -> int:
        return int(self._f.attrs["format_version"])

    @property
    def tokens(self) -> str:
        return str(self._f.attrs["tokens"])

    @property
    def backbones(self) -> list[str]:
        """The backbones whose outputs the cache stores, in file order."""
        return list(self._f["backbones"])

    def outputs(self, backbone: str) -> list[str]:
        """The stored outputs of ``backbone`` (pooled, tokens, attn_XX, ...)."""
        self._need(backbone)
        return list(self._f["backbones"][backbone])

    def output_info(self, backbone: str, output: str) -> dict[str, Any]:
        """Shape, dtype and row kind ('view' or 'image') of one stored output."""
        ds = self._f["backbones"][backbone][output]
        return {"shape": tuple(ds.shape), "dtype": np.dtype(ds.dtype), "rows": str(ds.attrs["rows"]), "doc": str(ds.attrs["doc"])}

    def _need(self, backbone: str) -> None:
        if backbone not in self._f["backbones"]:
            raise CacheError(f"{self.path} has no backbone {backbone!r}; it holds: {', '.join(self._f['backbones'])}")

    def table(self, name: str) -> np.ndarray:
        """A per-image table (``TABLES``): one entry per row of the cache's image list (paths as str)."""
        if name not in TABLES:
            raise KeyError(f"{name!r}: the image tables are {', '.join(TABLES)}")
        ds = self._f["images"][name]
        return ds.asstr()[...] if name == "path" else ds[...]

    def view_params(self) -> np.ndarray:
        """(rows, 10) int16: each view row's dx, dy, flip, erase (x, y, w, h) and erase fill (featcache.preprocess.PARAMS)."""
        v = self._f["views"]
        cols = [v["dx"][...][:, None], v["dy"][...][:, None], v["flip"][...][:, None]]
        if "erase" in v:  # format 3: random erasing
            cols += [v["erase"][...], v["erase_fill"][...]]
        else:
            cols += [np.zeros((len(cols[0]), 4), np.int16), np.zeros((len(cols[0]), 3), np.int16)]
        return np.concatenate([c.astype(np.int16) for c in cols], 1)

    def read(self, backbone: str, output: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (ascending or not) of one stored output, each checked against its checksum; rows that
        hold NaN or inf are refused with the images named."""
        self._need(backbone)
        if output not in self._f["backbones"][backbone]:
            raise CacheError(f"{self.path}: backbone {backbone} stores no {output!r} (it stores {', '.join(self._f['backbones'][backbone])})")
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        if (order == np.arange(len(rows))).all():
            return read_checked(self._f, backbone, output, rows)
        out = read_checked(self._f, backbone, output, rows[order])
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        return out[inv]

    def split(self, name: str) -> "CacheSplit":
        """The cached images of split ``name`` (train, query or gallery): labels, names, and ``read`` (through this
        reader while it is open)."""
        check_choice(name, SPLITS, "split", CacheError)
        return CacheSplit.load(self, name)

    def status_counts(self) -> dict[str, dict[str, int]]:
        """Images per split that are pending (extraction unfinished) and failed (unreadable files)."""
        status, split = self.table("status"), self.table("split")
        return {name: {s: int(((status == code) & (split == i)).sum()) for i, s in enumerate(SPLITS)}
                for name, code in (("pending", PENDING), ("failed", FAILED))}

    def annotation(self, name: str) -> tuple[dict[str, Any], np.ndarray] | None:
        """An annotation array written with ``CacheWriter.annotate`` (attributes, values), or None."""
        key = f"{ANNOTATIONS}/{name}"
        if key not in self._f:
            return None
        values = self._f[key][...]
        bad = check_annotation(self._f, name, values)
        if bad.size:
            raise CacheError(f"{self.path}: {bad.size} row(s) of its {name!r} annotation fail their checksum "
                             f"(view rows {', '.join(map(str, bad[:5]))}{' ...' if bad.size > 5 else ''}): "
                             f"`featcache verify {self.path}` names the images")
        return dict(self._f[ANNOTATIONS].attrs), values

    def check_images(self, images: np.ndarray) -> None:
        """Refuse images whose metadata (labels, cameras, row layout) fail their checksums."""
        check_images(self._f, images)

    def route(self) -> tuple[list[str], str, np.ndarray] | None:
        """A synthetic feature cache's known route: (experts, kind, per view row the index of the reliable expert
        in experts or -1), or None."""
        ann = self.annotation(ROUTE)
        if ann is None:
            return None
        attrs, values = ann
        return json.loads(attrs["experts"]), str(attrs["kind"]), values

    def conditions(self) -> tuple[list[str], np.ndarray] | None:
        """A rendered synthetic dataset's camera conditions: (condition names, per view row its index), or None."""
        ann = self.annotation(CONDITION)
        if ann is None:
            return None
        attrs, values = ann
        return json.loads(attrs["conditions"]), values

    def shard_info(self) -> dict[str, Any] | None:
        """A distributed extraction's layout (world, batch size), or None for a one-process cache."""
        return json.loads(self._f.attrs["shards"]) if "shards" in self._f.attrs else None


def cache_identity(path: str | Path) -> CacheIdentity:
    """The identity of the cache at ``path`` (what it was built from), checked."""
    with CacheReader(path) as c:
        return c.identity


def known_route(cache: CacheReader, rows: np.ndarray, experts: list[str],
                by_condition: dict[str, str] | None = None) -> np.ndarray | None:
    """The known reliable expert of each view row, as an index into ``experts`` (-1: none known): from a synthetic
    feature cache's ``route``, or, given ``by_condition`` ({condition: expert}), from a rendered synthetic dataset's
    ``condition`` of each row; else None."""
    ann = cache.route()
    if ann is None and by_condition is not None:
        cond = cache.conditions()
        if cond is None:
            return None
        names, values = cond
        route = np.array([experts.index(by_condition[n]) if by_condition.get(n) in experts else -1 for n in names])
        return route[values[rows].astype(np.int64)]
    if ann is None:
        return None
    names, _, route = ann
    idx = route[rows]
    known = idx >= 0
    out = np.full(len(rows), -1, dtype=np.int64)
    for i, name in enumerate(names):
        if name in experts:
            out[known & (idx == i)] = experts.index(name)
    return out


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
    reader: CacheReader | None = field(default=None, repr=False, compare=False)  # the open cache it reads through

    @classmethod
    def load(cls, cache: CacheReader | Path, split: str) -> "CacheSplit":
        """The split of an open reader (reads go through it while it is open) or of a cache file (each read opens it)."""
        with (contextlib.nullcontext(cache) if isinstance(cache, CacheReader) else CacheReader(cache)) as c:
            keep = (c.table("split") == SPLITS.index(split)) & (c.table("status") == DONE)
            idx = np.flatnonzero(keep)
            c.check_images(idx)
            out = cls(
                c.path, split, idx, c.table("pid")[idx], c.table("camid")[idx], c.table("path")[idx],
                c.table("view_start")[idx], c.table("n_views")[idx], c.identity,
                reader=cache if isinstance(cache, CacheReader) else None,
            )
        if idx.size == 0:
            raise EmptySplit(c.path, split)
        return out

    def open(self) -> contextlib.AbstractContextManager[CacheReader]:
        """The cache to read from: the split's own reader while it is open, else one opened for the block."""
        if self.reader is not None and self.reader.is_open:
            return contextlib.nullcontext(self.reader)
        return CacheReader(self.cache)

    def fork_safe(self) -> contextlib.AbstractContextManager[None]:
        """The split's reader closed for a block that forks workers (``CacheReader.fork_safe``)."""
        if self.reader is not None and self.reader.is_open:
            return self.reader.fork_safe()
        return contextlib.nullcontext()

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
        """The view row of view ``view`` of each image; a view outside ``[0, n_views)`` is refused, never wrapped
        (view -1 of image i would be image i-1's last view)."""
        if isinstance(view, (bool, np.bool_)) or not isinstance(view, (int, np.integer)):
            raise CacheError(f"{self.cache}: view {view!r} of the {self.split} split: expected an integer")
        if len(self.n_views) == 0 and view >= 0:  # an empty subset: no rows, whatever the view
            return self.view_start + view
        fewest = int(self.n_views.min()) if len(self.n_views) else 0
        if not 0 <= view < fewest:
            most = int(self.n_views.max()) if len(self.n_views) else 0
            held = f"{fewest} view{'s' * (fewest != 1)}" + (f" (some up to {most})" if most != fewest else "")
            most_held = None if self.split == "train" else 2  # evaluation splits keep the image and its flip at most
            hint = f"; extract with --views {view + 1} or more to read it" \
                if fewest <= view and (most_held is None or view < most_held) else ""
            raise CacheError(f"{self.cache}: the {self.split} split holds {held} per image, so views 0 to {fewest - 1} "
                             f"can be read, not view {view}{hint}")
        return self.view_start + view

    def read(self, backbone: str, array: str, view: int = 0, subset: slice | None = None) -> np.ndarray:
        """Rows of ``backbones/<backbone>/<array>`` for view ``view`` of each image of the split (or of ``subset``):
        pooled features, attention maps, or tokens (kept for view 0 only under ``--tokens view0``)."""
        with self.open() as c:
            c._need(backbone)
            per_image = array in c.outputs(backbone) and c.output_info(backbone, array)["rows"] == "image"
            if per_image and view != 0:
                raise CacheError(f"{self.cache}: {backbone} {array} is kept for view 0 only (extracted with --tokens view0)")
            rows = self.images if per_image else self.rows(view)
            if subset is not None:
                rows = rows[subset]
            return c.read(backbone, array, rows)


def status_counts(path: str | Path) -> dict[str, dict[str, int]]:
    """Images per split that are pending (extraction unfinished) and failed (unreadable files)."""
    with CacheReader(path) as c:
        return c.status_counts()


def training_coverage(cache: CacheReader | Path, allow_partial: bool, stage: str, split: CacheSplit | None = None) -> dict[str, Any] | None:
    """What a stage trains on when the cache's extraction has not finished: None when every training image is
    cached; else refused unless ``allow_partial``, and then the record a run keeps in its ``run.json`` (images used,
    of how many, and a digest of which), so that every later stage can say so. ``cache``: an open reader, or a
    path; ``split``: the training split, when the caller has it (else read only if images are pending)."""
    import hashlib

    pending = (cache.status_counts() if isinstance(cache, CacheReader) else status_counts(cache))["pending"]["train"]
    if not pending:
        return None
    split = split if split is not None else CacheSplit.load(cache if isinstance(cache, CacheReader) else Path(cache), "train")
    total = len(split) + pending
    if not allow_partial:
        raise CacheError(f"{split.cache}: {pending} of {total} training images are not cached yet (its extraction has not "
                         f"finished): rerun the same featcache extract command to finish it, or pass --allow-partial to "
                         f"{stage} on the {len(split)} cached ones (recorded in the run)")
    logger.warning("%s: training on %d of %d training images (--allow-partial; the extraction has not finished): "
                   "recorded in the run's run.json", split.cache, len(split), total)
    digest = hashlib.sha256(np.sort(split.images).astype("<i8").tobytes()).hexdigest()
    return {"images_used": int(len(split)), "images_total": int(total), "images_digest": digest}


def partial_note(what: str, partial: dict[str, Any] | None) -> str | None:
    """One line saying that ``what`` was trained on part of its cache's training images, or None."""
    if not partial:
        return None
    return (f"{what} was trained on {partial['images_used']} of {partial['images_total']} training images (--allow-partial: "
            f"its cache's extraction had not finished)")
