"""Deterministic fault points for crash tests: ``FEATCACHE_FAULT=NAME:N`` kills the process at the N-th hit of NAME.

``NAME:N:TERM`` sends SIGTERM instead (a polite stop, as a scheduler sends it); ``NAME:N:STOP`` sends
SIGSTOP (a hung process, or a lost node, still holding its files).

A test that kills a run at a fixed point (after batch N is written, say)
cannot pass by luck or fail under load, unlike one that sleeps and signals.
The points cost one dictionary look-up when the variable is unset.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process if ``FEATCACHE_FAULT`` names this point and its count is reached."""
    spec = os.environ.get("FEATCACHE_FAULT")
    if not spec:
        return
    want, _, rest = spec.partition(":")
    if want != name:
        return
    count, _, how = rest.partition(":")
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(count or 1) and how in ("TERM", "STOP"):
        os.kill(os.getpid(), signal.SIGTERM if how == "TERM" else signal.SIGSTOP)
        return
    if _hits[name] >= int(count or 1) and how not in ("TERM", "STOP"):
        # a process group leader takes its group (decoding workers) with it, as `kill -9 -PGID` would
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
