"""Writer: a background thread that stores finished batches, so inference never waits on disk."""

from __future__ import annotations

import logging
import queue
import threading

from featcache.cache import BatchResult, CacheWriter

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

    def submit(self, batch: BatchResult) -> None:
        if self.error is not None:
            raise RuntimeError(f"writing the cache failed: {self.error}") from self.error
        self.queue.put(batch)

    def close(self) -> None:
        self.queue.put(self._STOP)
        self.thread.join()
        self.writer.close()
        if self.error is not None:
            raise RuntimeError(f"writing the cache failed: {self.error}") from self.error
