"""Writer: a background thread that stores finished batches, so inference never waits on disk."""

from __future__ import annotations

import logging
import queue
import threading

from featcache.cache import BatchResult, CacheWriter
from featcache.errors import RunError

logger = logging.getLogger(__name__)


class BackgroundWriter:
    """Queue batches with ``submit``; ``close`` drains the queue and re-raises any write error."""

    _STOP = object()

    def __init__(self, writer: CacheWriter, max_pending: int = 2) -> None:
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.written = 0
        self.thread = threading.Thread(target=self._run, name="featcache-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            batch = self.queue.get()
            if batch is self._STOP:
                return
            if self.error is not None:
                continue  # drain without writing after a failure
            try:
                self.writer.write(batch)
                self.written += len(batch.images)
            except BaseException as exc:  # reported to the main thread at the next submit/close
                self.error = exc

    def _raise(self) -> None:
        exc = self.error
        why = f"{exc.strerror} (errno {exc.errno})" if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        raise RunError(f"writing {self.writer.path} failed: {why}. The batches written before stay cached; "
                       "fix the cause (free space, say) and run the same command to resume") from exc

    def submit(self, batch: BatchResult) -> None:
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
