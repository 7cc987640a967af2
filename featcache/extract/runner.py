"""``featcache extract``: list the dataset, build the backbones, stream images through reader -> mapper -> writer."""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featcache.backbones import Backbone, OutputSpec, build_backbone
from featcache.cache.checksum import mark_for_repair, verify_cache
from featcache.cache.digests import file_digests
from featcache.cache.store import restore_static, view_counts
from featcache.cache import PENDING, CacheBusy, CacheError, NotResumable, CacheReader, CacheWriter, check_identity, create_cache, make_identity, summary
from featcache.cache.shards import (
    Window, check_master, check_window, partial_path, plan_windows, shard_dir, shard_path, shard_status, write_master,
)
from featcache.extract.distributed import Group, Ranks, rank_device, ranks_from_env
from featcache.config import resolved_beside, save_resolved
from featcache.fileio import check_output
from featcache.errors import ConfigError, RunError
from featcache.datasets import load_listing
from featcache.extract.config import ExtractConfig
from featcache.extract.mapper import Stored, make_mapper, stored_layout
from featcache.cache.lock import WriterLock
from featcache.extract.result import ExtractResult
from featcache.extract.reader import BlockSampler, DecodedBatch, ImageReader, collate
from featcache.processes import die_with_parent, sigterm_as_interrupt
from featcache.extract.writer import BackgroundWriter, MappedBatch, settle
from featcache.preprocess import AUG_PAD, ERASE_AREA, ERASE_ASPECT, ERASE_FILL, ERASE_P
from featcache.progress import progress
from featcache.runtime import loader_options, on_device, resolve_device, resolve_workers

logger = logging.getLogger(__name__)


def run_extract(cfg: ExtractConfig, digests: np.ndarray | None = None, prebuilt: dict[str, Backbone] | None = None) -> ExtractResult:
    """Extract every image of the dataset into ``cfg.out``, resuming what an earlier run cached. ``digests``: the
    listed files' ``digests.file_digests`` when the caller has just computed them (the pipeline's key has);
    ``prebuilt``: backbones built by the caller instead of from ``cfg.backbones``' presets (``featcache embed``)."""
    if not Path(cfg.out).is_file():  # a cache to resume (or a finished, read-only one) is checked as it opens
        check_output(cfg.out, "--out")  # before the dataset is listed and hashed
    ranks = ranks_from_env()
    listing = load_listing(cfg.dataset, cfg.root, strict=not cfg.skip_bad_names)
    logger.info("dataset: %s", listing.summary())
    device = rank_device(resolve_device(cfg.device), ranks)
    backbones = prebuilt or {n: build_backbone(n, cfg.image_size, cfg.weights.get(n), cfg.random_init) for n in cfg.backbones}
    specs = with_float32({n: b.output_specs() for n, b in backbones.items()}, cfg.float32)
    n_views = {"train": cfg.views, "query": min(cfg.views, 2), "gallery": min(cfg.views, 2)}
    preprocessing = {
        "image_size": list(cfg.image_size),
        "resize": "PIL bilinear, aspect preserved, zero padded, centred",
        "views": n_views,
        "augment": {"kind": "pad-crop-flip-erase", "pad": AUG_PAD, "seed": cfg.aug_seed, "erase_p": ERASE_P,
                    "erase_area": list(ERASE_AREA), "erase_aspect": [ERASE_ASPECT[0], round(ERASE_ASPECT[1], 4)],
                    "erase_fill": list(ERASE_FILL)},
        "tokens": cfg.tokens,
    }
    if digests is None or len(digests) != len(listing.items):
        t0 = time.perf_counter()
        digests = file_digests(listing)  # the data is identified by content: a moved dataset resumes its cache
        logger.info("identified %d files by content in %.1f s", len(digests), time.perf_counter() - t0)
    identity = make_identity(
        listing, preprocessing,
        {n: {"family": b.family, "weights": b.weights_id, "preset": b.preset.to_dict()} for n, b in backbones.items()},
        digests,
    )
    job = _Job(cfg, listing, device, backbones, specs, n_views, identity, digests)
    if ranks.distributed:
        return _extract_sharded(job, ranks)
    with WriterLock(cfg.out), sigterm_as_interrupt():  # one writer, from the existence check to the end
        _prepare_single(job)
        save_resolved(resolved_beside(cfg.out), cfg)
        return _extract_into(job, cfg.out, None)


def with_float32(specs: dict[str, dict[str, OutputSpec]], names: tuple[str, ...]) -> dict[str, dict[str, OutputSpec]]:
    """The outputs ``--float32`` names (OUTPUT or PRESET:OUTPUT, globs) stored as float32 instead of their default."""
    out = {b: dict(outs) for b, outs in specs.items()}
    for name in names:
        preset, _, output = name.rpartition(":")
        hits = [(b, o) for b, outs in specs.items() for o in outs
                if fnmatch.fnmatchcase(o, output) and (not preset or fnmatch.fnmatchcase(b, preset))]
        if not hits:
            have = sorted({f"{b}:{o}" for b, outs in specs.items() for o in outs})
            raise ConfigError(f"--float32 {name}: no backbone output matches (outputs: {', '.join(have)})")
        for b, o in hits:
            out[b][o] = dataclasses.replace(specs[b][o], dtype="float32")
    return out


@dataclass
class _Job:
    """What every rank (or the one process) has worked out before it touches a file."""

    cfg: ExtractConfig
    listing: Any
    device: torch.device
    backbones: dict
    specs: dict
    n_views: dict[str, int]
    identity: Any
    digests: Any = None        # SHA-1 of every listed file (digests.file_digests)


def _prepare_single(job: _Job) -> None:
    """One process: replace (--overwrite), check (resume) or create the cache file."""
    cfg, out = job.cfg, job.cfg.out
    if out.exists() and cfg.overwrite:
        logger.warning("--overwrite: replacing %s", out)
        _remove_cache(out)
    if out.exists():
        try:
            check_identity(out, job.identity, job.digests)
        except (CacheBusy, NotResumable):
            raise
        except CacheError as exc:
            raise CacheError(f"{exc}; use --overwrite to replace it, or choose another --out") from None
        with CacheReader(out) as c:
            info = c.shard_info()
        if info is not None:
            raise CacheError(f"{out} was extracted by {info['world']} ranks: resume it with torchrun --nproc-per-node "
                             f"{info['world']} (across all nodes) and --batch-size {info['batch_size']}, or use --overwrite, or another --out")
        logger.info("resuming %s", out)
        if cfg.repair:
            _repair(out, job.listing, job.n_views, None)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        create_cache(out, job.listing, job.identity, job.n_views, job.specs, cfg.tokens,
                     before_publish=lambda tmp: record_conditions(tmp, job.listing, job.n_views))
    record_conditions(out, job.listing, job.n_views)  # a cache created before a kill, or damaged: else only read


def record_conditions(out: Path, listing, n_views: dict[str, int]) -> None:
    """A synthetic dataset's camera conditions (day, night, blur), carried into the cache as a ``condition``
    annotation per view row (an index into ``datasets.base.CONDITIONS``), as synthetic feature caches carry their
    known route; written once, also into a cache created before a kill, and rewritten where it was damaged."""
    from featcache.cache.writer import annotate_conditions
    from featcache.datasets.base import CONDITIONS, camera_conditions, condition_rows

    conditions = camera_conditions(listing.root)
    if conditions is None:
        return
    annotate_conditions(out, condition_rows(listing, view_counts(listing, n_views), conditions), list(CONDITIONS))


def _remove_cache(out: Path) -> None:
    """Delete a cache and, for a sharded one, its shards (--overwrite)."""
    import shutil

    out.unlink(missing_ok=True)
    if shard_dir(out).is_dir():
        shutil.rmtree(shard_dir(out))


def _extract_sharded(job: _Job, ranks: Ranks) -> ExtractResult:
    """One rank of a torchrun launch: rank 0 prepares the master file, every rank extracts and publishes its shard."""
    cfg, out = job.cfg, job.cfg.out
    windows = plan_windows(job.listing, job.n_views, cfg.batch_size, ranks.world)
    window = windows[ranks.rank]
    final = shard_path(out, ranks.rank, ranks.world)
    with Group(ranks) as group, ExitStack() as held:
        problem = None
        if ranks.rank == 0:
            try:  # rank 0 holds the master's lock for the whole launch: no other run replaces it meanwhile
                held.enter_context(WriterLock(out))
                _prepare_master(job, windows)
                save_resolved(resolved_beside(out), cfg)
            except Exception as exc:  # every rank learns of it, or the others would wait for rank 0 forever
                problem = str(exc)
        problem = group.share(problem)
        if problem:
            raise CacheError(problem if ranks.rank == 0 else f"rank 0 refused the cache: {problem}")
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            with WriterLock(final), sigterm_as_interrupt():
                result = _extract_shard(job, window, final)
        except Exception:
            group.all_true(False)  # the others stop waiting for this rank, then this rank's error is raised
            raise
        complete = group.all_true(final.is_file())  # every rank waits here for the slowest
    missing = [str(p) for p, state in shard_status(out) if state != "published"]
    if complete and not missing:
        logger.info("rank %d of %d: all %d shards of %s are published", ranks.rank, ranks.world, ranks.world, out)
    else:
        raise RunError(f"{out}: shards not published: {', '.join(missing)}; run the same command to finish them")
    result.summary = summary(out)
    if ranks.rank == 0:
        result.log()
    return result


def _prepare_master(job: _Job, windows: list[Window]) -> None:
    cfg, out = job.cfg, job.cfg.out
    if cfg.overwrite and (out.exists() or shard_dir(out).exists()):
        logger.warning("--overwrite: replacing %s and its shards", out)
        _remove_cache(out)
    if out.exists():
        check_master(out, job.identity, windows, job.digests)
        logger.info("resuming %s (%d ranks)", out, len(windows))
        if cfg.repair:  # the master's own tables (labels, row layout); each rank repairs its shard
            restore_static(out, job.listing, job.n_views)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        if shard_dir(out).exists() and any(shard_dir(out).iterdir()):
            raise CacheError(f"{shard_dir(out)} holds shards but {out} is missing; use --overwrite to start anew")
        write_master(out, job.listing, job.identity, job.n_views, job.specs, job.cfg.tokens, windows,
                     before_publish=lambda tmp: record_conditions(tmp, job.listing, job.n_views))
    record_conditions(out, job.listing, job.n_views)  # as a one-process cache carries them (else only read)


def _extract_shard(job: _Job, window: Window, final: Path) -> ExtractResult:
    """Resume or start this rank's shard; rename it to its final name once no image of its window is pending."""
    part = partial_path(final)
    if final.is_file():
        check_window(final, job.identity, window)
        if not job.cfg.repair:
            logger.info("rank %d: shard %s is already complete", window.rank, final)
            return ExtractResult(final, 0, 0.0, {})
        os.replace(final, part)  # unpublished while it is checked and redone
    if part.is_file():
        check_window(part, job.identity, window)
        logger.info("rank %d: resuming %s", window.rank, part)
        if job.cfg.repair:
            _repair(part, job.listing, job.n_views, window)
    else:
        create_cache(part, job.listing, job.identity, job.n_views, job.specs, job.cfg.tokens, window)
    result = _extract_into(job, part, window)
    with CacheReader(part) as c:
        pending = int((c.table("status") == PENDING).sum())
    if pending:
        raise RunError(f"{part}: {pending} images still pending after the run")
    os.replace(part, final)  # published: a shard under its final name is complete
    logger.info("rank %d: published %s", window.rank, final)
    return result


def _pending(job: _Job, out: Path, window: Window | None) -> tuple[np.ndarray, dict, int]:
    """Which of the listing's images ``out`` still lacks (a mask over the whole listing), the stored layout (its
    dtypes checked against the options), and how many images ``out`` covers."""
    n_items = len(job.listing.items)
    with CacheReader(out) as c:
        status = c.table("status")
        stored = stored_layout({b: {o: c.output_info(b, o) for o in c.outputs(b)} for b in c.backbones})
    _check_dtypes(job.cfg, out, job.specs, stored)
    pending = np.zeros(n_items, dtype=bool)
    lo = window.images[0] if window else 0
    hi = min(n_items, lo + len(status))
    pending[lo:hi] = status[: hi - lo] == PENDING
    return pending, stored, hi - lo


def _extract_into(job: _Job, out: Path, window: Window | None) -> ExtractResult:
    """Extract every pending image of ``out`` (a whole cache, or a shard's window of it)."""
    cfg, listing, device = job.cfg, job.listing, job.device
    n_items = len(listing.items)
    pending, stored, mine = _pending(job, out, window)
    workers = resolve_workers(cfg.workers, device)
    sampler = BlockSampler(n_items, cfg.batch_size, pending)
    todo = sum(len(b) for b in sampler.blocks)
    logger.info("%d of %d images to extract (%d already done)", todo, mine, mine - int(pending.sum()))
    if todo == 0:  # nothing to write: the cache is read, never opened for writing (it may be read-only)
        result = ExtractResult(out, 0, 0.0, summary(out))
        if window is None:
            result.log()
        return result
    n_views, backbones = job.n_views, job.backbones
    reader = ImageReader(listing.root, listing.items, cfg.image_size, n_views, cfg.aug_seed)
    h, w = cfg.image_size
    loader = torch.utils.data.DataLoader(reader, batch_sampler=sampler, collate_fn=collate, worker_init_fn=die_with_parent,
                                         **loader_options(device, workers, cfg.batch_size * max(cfg.views, 2) * h * w * 3))
    with on_device(device):  # the pinning thread pins for this GPU (cuda:N), not for the current device
        batches = iter(loader)  # fork the decoding workers before the cache is opened for writing,
    # so that no worker inherits its file lock (a killed run must leave the file free to resume)
    mapper = make_mapper(cfg.mapper, backbones, stored, device)
    paths = [it.path for it in listing.items]
    bg = BackgroundWriter(CacheWriter(out), settle=lambda b: settle(b, out, paths))
    start = time.perf_counter()
    done = exif = stored_bytes = 0
    try:
        with progress(total=todo, unit="img", desc="extract") as bar:
            t_read = time.perf_counter()
            for batch in batches:
                t_map = time.perf_counter()
                mapped = _map_batch(batch, mapper)
                mapped.read_ms, mapped.map_ms = (t_map - t_read) * 1e3, (time.perf_counter() - t_map) * 1e3
                bg.submit(mapped)
                done += len(batch.records)
                stored_bytes += _stored_bytes(stored, batch.counts)
                exif += sum(r.exif_rotated for r in batch.records)
                bar.update(len(batch.records))
                t_read = time.perf_counter()
    finally:
        bg.close()  # on an interrupt too: the queued batches are written
    if exif:
        logger.warning("%d image(s) carry an EXIF orientation tag; featcache ignores it and uses the stored pixel order, "
                       "as the datasets' official evaluation code does", exif)
    seconds = time.perf_counter() - start
    result = ExtractResult(out, done, seconds, summary(out), mapper.bytes_out, mapper.check_bytes, stored_bytes)
    if done:
        logger.info("left the device: %.1f KiB an image of outputs (the cache stores %.1f KiB an image) and %.0f bytes an "
                    "image of value checks (%s path)", mapper.bytes_out / done / 1024, stored_bytes / done / 1024,
                    mapper.check_bytes / done, cfg.mapper)
    if window is None:
        result.log()
    return result


def _repair(out: Path, listing, n_views: dict[str, int], window: Window | None) -> None:
    """Restore what the listing fixes (labels, row layout) from the dataset, verify every row, and set the
    damaged images back to pending: this run redoes exactly their blocks."""
    restore_static(out, listing, n_views, window)
    report = verify_cache(out)
    n = mark_for_repair(out, report)
    if n:
        logger.warning("--repair: %d damaged image(s) in %s will be extracted again: %s", n, out,
                       ", ".join(sorted(report.paths.values())[:10]) + (" ..." if n > 10 else ""))
    else:
        logger.info("--repair: every row of %s matches its checksum", out)


def _map_batch(batch: DecodedBatch, mapper) -> MappedBatch:
    """Run the backbones on a decoded batch; the result may still be on its way to the host (see the writer)."""
    if not batch.ok:
        return MappedBatch(batch.records, None)
    return MappedBatch(batch.records, mapper(batch.nchw(), batch.first_view))


def _stored_bytes(stored: dict[str, dict[str, Stored]], counts: np.ndarray) -> int:
    """Bytes the cache's arrays hold for images with ``counts`` views each."""
    total = 0
    for outs in stored.values():
        for s in outs.values():
            row = int(np.prod(s.tail, dtype=np.int64)) * s.dtype.itemsize
            total += row * (len(counts) if s.per == "image" else int(counts.sum()))
    return total


def _check_dtypes(cfg: ExtractConfig, out: Path, specs: dict[str, dict], stored: dict[str, dict[str, Stored]]) -> None:
    """A resumed cache keeps the dtypes it was created with; say so when the options ask for others."""
    differ = [f"{b}:{o} {s.dtype} (asked {np.dtype(specs[b][o].dtype)})" for b, outs in stored.items() for o, s in outs.items()
              if b in specs and o in specs[b] and np.dtype(specs[b][o].dtype) != s.dtype]
    if differ:
        logger.warning("%s keeps the dtypes it was created with: %s; --float32 applies to new caches "
                       "(--overwrite to start anew)", out, ", ".join(differ))
