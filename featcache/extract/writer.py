"""Writer: a background thread that settles and stores finished batches, so inference never waits on disk.

Settling a batch (``settle``) waits for its copies off the device, reads the value checks the mapper made, and
turns the batch into what the cache stores: an image whose backbone output holds NaN or inf is recorded as
failed with the reason (its rows are not written); a finite value beyond the range of the array's stored dtype
stops the run (``ValueOverflowError``) before anything of that batch is written, keeping every batch before it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from featcache.cache import BatchResult, CacheWriter
from featcache.errors import FeatcacheError, RunError
from featcache.extract.mapper import NONFINITE, OVERFLOW, Mapped
from featcache.extract.reader import Decoded
from featcache.preprocess import PARAMS

logger = logging.getLogger(__name__)


class ValueOverflowError(RunError):
    """A backbone output that does not fit the dtype its cache stores it in."""


@dataclass
class MappedBatch:
    """A batch between the mapper and the writer: its records and its outputs (possibly still being copied)."""

    records: list[Decoded]
    mapped: Mapped | None        # None: no image of the batch decoded
    read_ms: float = 0.0
    map_ms: float = 0.0

    def release(self) -> None:
        if self.mapped is not None:
            self.mapped.release()


def settle(batch: MappedBatch, cache: Path, paths: list[str]) -> BatchResult:
    """Wait for the batch's copies, apply the value checks, and build what the cache writer stores."""
    records = batch.records
    ok = [r for r in records if r.params is not None]
    counts = np.array([len(r.params) for r in ok], dtype=np.int64)
    first = (np.cumsum(counts) - counts).astype(np.int64)
    reasons = {r.index: r.error for r in records if r.params is None}
    outputs: dict[str, dict[str, np.ndarray]] = {}
    if batch.mapped is not None:
        m = batch.mapped
        m.wait()
        owner = np.repeat(np.arange(len(ok)), counts)
        over = np.argwhere(m.codes == OVERFLOW)
        if len(over):
            r, k = (int(v) for v in over[0])
            b, o = m.keys[k]
            i = owner[r]
            raise ValueOverflowError(
                f"{cache}: backbone {b}, output {o}, image {paths[ok[i].index]} (view {r - first[i]}): a value beyond "
                f"float16's range (|x| > 65504), and this cache stores {o} as float16. Nothing of this batch was written; "
                f"the images written before stay cached. Extract into a new cache with --float32 {o} (and --overwrite, "
                "or another --out): a cache keeps the dtypes it was created with")
        for r, k in np.argwhere(m.codes == NONFINITE):
            i = owner[r]
            if ok[i].index not in reasons:
                b, o = m.keys[k]
                reasons[ok[i].index] = f"backbone {b} output {o} holds NaN or inf (view {int(r - first[i])})"
        keep_img = np.array([r.index not in reasons for r in ok], dtype=bool)
        keep_row = np.repeat(keep_img, counts)
        for b, outs in m.outputs.items():
            # per-image arrays (tokens of view 0) have one row per image; the rest one per view row
            outputs[b] = {o: a if keep_img.all() else a[keep_img if len(a) == len(ok) else keep_row] for o, a in outs.items()}
        if not keep_img.all():
            logger.warning("%d image(s) recorded as failed: a backbone output held NaN or inf (%s)", int((~keep_img).sum()),
                           "; ".join(f"{paths[r.index]}: {reasons[r.index]}" for r in ok if r.index in reasons)[:500])
            ok = [r for r, keep in zip(ok, keep_img) if keep]
            counts = counts[keep_img]
            first = (np.cumsum(counts) - counts).astype(np.int64)
    return BatchResult(
        images=[r.index for r in records],
        failed_mask=np.array([r.index in reasons for r in records]),
        reasons=[reasons.get(r.index, "") for r in records],
        ok_images=[r.index for r in ok],
        widths=np.array([r.width for r in ok], dtype=np.int32),
        heights=np.array([r.height for r in ok], dtype=np.int32),
        sha1=np.array([r.sha1.encode() for r in ok], dtype="S40"),
        params=np.concatenate([r.params for r in ok]) if ok else np.zeros((0, len(PARAMS)), np.int16),
        first_view_index=first,
        outputs=outputs,
    )


class BackgroundWriter:
    """Queue batches with ``submit``; ``close`` drains the queue and re-raises any write error.

    ``settle`` (optional) turns a submitted item into a ``BatchResult`` in the writer thread; an item with a
    ``release`` method has it called once the item is written or dropped (the mapper's host buffers)."""

    _STOP = object()

    def __init__(self, writer: CacheWriter, max_pending: int = 2, settle: Callable | None = None) -> None:
        self.writer = writer
        self.settle = settle
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.written = 0
        self.thread = threading.Thread(target=self._run, name="featcache-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is self._STOP:
                return
            try:
                if self.error is None:  # after a failure: drain without writing
                    t0 = time.perf_counter()
                    batch = self.settle(item) if self.settle is not None else item
                    t1 = time.perf_counter()
                    self.writer.write(batch)
                    self.written += len(batch.images)
                    if isinstance(item, MappedBatch):
                        logger.debug("batch from image %d: %d images; read %.1f ms, inference %.1f ms, settled (copies awaited, "
                                     "values checked) %.1f ms, written %.1f ms", item.records[0].index, len(item.records), item.read_ms, item.map_ms,
                                     (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3)
            except BaseException as exc:  # reported to the main thread at the next submit/close
                self.error = exc
            finally:
                if hasattr(item, "release"):
                    item.release()

    def _raise(self) -> None:
        exc = self.error
        if isinstance(exc, FeatcacheError):  # a message of its own, naming what to do
            raise exc
        why = f"{exc.strerror} (errno {exc.errno})" if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        raise RunError(f"writing {self.writer.path} failed: {why}. The batches written before stay cached; "
                       "fix the cause (free space, say) and run the same command to resume") from exc

    def submit(self, batch) -> None:
        if self.error is not None:
            self._raise()
        self.queue.put(batch)

    def close(self) -> None:
        self.queue.put(self._STOP)
        self.thread.join()
        try:
            self.writer.close()
        except Exception as exc:  # a failed flush at close is a failed write too
            self.error = self.error or exc
        if self.error is not None:
            self._raise()
