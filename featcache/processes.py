"""Processes that end with their run: workers the kernel kills with their parent, and SIGTERM taken as Ctrl-C.

Shared by extraction's decoding workers and the stand-ins' training workers.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


def die_with_parent(worker_id: int = 0) -> None:
    """A worker's start (a DataLoader's ``worker_init_fn``, or a worker process's first step): on Linux, ask the
    kernel to kill this process when its parent dies (SIGKILL, SIGTERM or a crash), so that no worker outlives its
    run; a SIGTERM to the whole group is left to the parent, which stops its workers itself."""
    import ctypes
    import os

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not Linux: workers notice a dead parent at their next pipe operation
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a SIGTERM to the group stops the run through the parent alone
    ppid = os.getppid()
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != ppid:  # the parent died before the request took effect
        os._exit(1)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops a run like Ctrl-C, so that its cleanup runs (extraction writes the batches already queued)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
