"""Sharded caches: one file per rank of a distributed extraction, stitched by a master file of virtual datasets.

``torchrun --nproc-per-node N -m featcache extract --out CACHE.h5 ...``
gives each rank a *window*: a run of whole extraction batches (so every
batch holds the same images as in a one-process run, and the numbers are
the same bit for bit). Rank r writes ``CACHE.h5.shards/rank-r-of-N.h5``
while it works under the name ``....h5.partial``: an ordinary cache file
(same crash-safety: arrays allocated at creation, status after rows) that
holds its window's images and view rows, numbered as in the whole cache.
When its window is complete the rank renames it to its final name: a shard
under its final name is complete.

``CACHE.h5`` itself is created once, before any shard is complete. It holds
the listing's fixed tables (paths, labels, row layout) and, for every array
a run writes, an HDF5 virtual dataset that maps each window onto its shard
file's array by a relative path. A shard that is not yet published reads as
HDF5's fill value: status 0, pending. So a reader of ``CACHE.h5`` - featcache
or plain h5py - sees one cache in which exactly the complete shards' images
are cached, at any moment of the run. The directory can be moved as a whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from featcache.cache.fileformat import Window
from featcache.cache.identity import CacheIdentity
from featcache.cache.spec import OutputSpec
from featcache.cache.store import (
    CacheError,
    check_identity,
    open_cache_file,
    read_identity,
    root_attrs,
    run_arrays,
    static_tables,
    view_counts,
    write_groups,
)
from featcache.datasets import Listing


def plan_windows(listing: Listing, n_views: dict[str, int], batch_size: int, world: int) -> list[Window]:
    """Whole batches to each rank, as evenly as they go; the names a reader rejected (no rows) go to the last."""
    counts = view_counts(listing, n_views)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n_items = len(listing.items)
    n_blocks = -(-n_items // batch_size)
    out = []
    for r in range(world):
        lo = min(n_items, (r * n_blocks // world) * batch_size)
        hi = min(n_items, ((r + 1) * n_blocks // world) * batch_size) if r < world - 1 else len(counts)
        out.append(Window(r, world, batch_size, (lo, hi), (int(starts[lo]), int(starts[hi]))))
    return out


def shard_dir(cache: Path) -> Path:
    return cache.with_name(cache.name + ".shards")


def shard_path(cache: Path, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` publishes its shard of ``cache``."""
    return shard_dir(cache) / f"rank-{rank:05d}-of-{world:05d}.h5"


def partial_path(shard: Path) -> Path:
    """The name a shard has while its rank writes it."""
    return shard.with_name(shard.name + ".partial")


def shard_info(f: h5py.File) -> dict | None:
    """The master's ``shards`` attribute (world, batch size, files), or None for a one-file cache."""
    return json.loads(f.attrs["shards"]) if "shards" in f.attrs else None


def write_master(cache: Path, listing: Listing, identity: CacheIdentity, n_views: dict[str, int],
                 specs: dict[str, dict[str, OutputSpec]], tokens: str, windows: list[Window],
                 before_publish: Callable[[Path], None] | None = None) -> None:
    """Create ``cache``: the fixed tables, and a virtual dataset per run array over the shards (tmp + rename;
    ``before_publish(tmp)`` adds to it first, so a published master never grows under a reader)."""
    counts = view_counts(listing, n_views)
    n = {"image": len(counts), "view": int(counts.sum())}
    files = [os.path.relpath(shard_path(cache, w.rank, w.world), cache.parent) for w in windows]
    tmp = cache.with_name(cache.name + ".creating")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(root_attrs(identity, tokens))
            f.attrs["shards"] = json.dumps({"world": len(windows), "batch_size": windows[0].batch_size, "files": files,
                                            "windows": [json.loads(w.to_json()) for w in windows]})
            write_groups(f, specs, static_tables(listing, counts))
            for arr in run_arrays(specs, tokens):
                layout = h5py.VirtualLayout((n[arr.per], *arr.tail), dtype=np.dtype(arr.dtype))
                for w, name in zip(windows, files):
                    lo, hi = w.images if arr.per == "image" else w.rows
                    if hi > lo:
                        layout[lo:hi] = h5py.VirtualSource(name, arr.name, shape=(hi - lo, *arr.tail), dtype=np.dtype(arr.dtype))
                ds = f.create_virtual_dataset(arr.name, layout)  # fill: zeros, so status reads 0, pending
                ds.attrs.update(arr.attrs)
        if before_publish is not None:
            before_publish(tmp)
        os.replace(tmp, cache)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_master(cache: Path, identity: CacheIdentity, windows: list[Window], digests=None) -> None:
    """Refuse to resume a master made for other data or another split into ranks, saying how to go on."""
    check_identity(cache, identity, digests)
    with open_cache_file(cache) as f:
        info = shard_info(f)
    if info is None:
        raise CacheError(f"{cache} was extracted by one process: resume it the same way (without torchrun), "
                         "or use --overwrite, or another --out")
    want = [json.loads(w.to_json()) for w in windows]
    if info["world"] != len(windows) or info["windows"] != want:
        raise CacheError(f"{cache} was extracted by {info['world']} ranks with --batch-size {info['batch_size']}; this run has "
                         f"{len(windows)} ranks and --batch-size {windows[0].batch_size}. Resume it with torchrun "
                         f"--nproc-per-node {info['world']} (across all nodes) and --batch-size {info['batch_size']}, "
                         "or use --overwrite, or another --out")


def check_window(shard: Path, identity: CacheIdentity, window: Window) -> None:
    """A shard (published or partial) must hold this run's data and exactly this window."""
    with open_cache_file(shard) as f:
        have = read_identity(f, shard)
        got = Window.from_json(f.attrs["window"]) if "window" in f.attrs else None
    diffs = have.resume_differences(identity)
    if diffs or got != window:
        why = "; ".join(diffs) if diffs else f"it holds window {got}, this rank's is {window}"
        raise CacheError(f"{shard} does not belong to this run ({why}); use --overwrite to start the cache anew")


def shard_status(cache: Path) -> list[tuple[Path, str]]:
    """Each shard of a master and whether it is ``published``, ``partial`` (being written or interrupted) or ``missing``."""
    with open_cache_file(cache) as f:
        info = shard_info(f)
    if info is None:
        return []
    out = []
    for name in info["files"]:
        p = cache.parent / name
        out.append((p, "published" if p.is_file() else "partial" if partial_path(p).is_file() else "missing"))
    return out
