"""Progress that reads well in a terminal and in a log file, and log lines that never collide with it.

In a terminal, tqdm bars as usual. When stderr is not a terminal (a log
file, CI), a plain line every ``LOG_INTERVAL`` seconds instead of ``\\r``
frames. Logging goes through ``tqdm.write`` so a message never lands in the
middle of a bar.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from tqdm import tqdm

LOG_INTERVAL = 10.0


class _LineTqdm(tqdm):
    """tqdm that prints whole lines (no carriage returns), for files: none at the start, one per interval,
    and a last one when a bar that stays (``leave``) closes."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:  # noqa: D102
        if msg is not None or self.n == 0:  # msg '' clears a bar: nothing to clear in a file
            return True
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()
        return True

    def close(self) -> None:  # noqa: D102
        if self.disable:
            return
        if self.leave and self.last_print_n < self.n:
            self.display()
        self.leave = False  # tqdm would add a newline or clear the line: neither belongs in a file
        super().close()


class _LineFile:
    """A file that passes whole lines and drops tqdm's cursor control (lone newlines, carriage returns)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        text = text.lstrip("\r")
        if text.strip():
            self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _is_tty(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress(iterable=None, **kw) -> tqdm:
    """A progress bar on stderr: frames in a terminal, a line every few seconds elsewhere."""
    kw.setdefault("file", sys.stderr)
    kw.setdefault("dynamic_ncols", True)
    if _is_tty(kw["file"]):
        return tqdm(iterable, **kw)
    kw.update(mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL * 3, ncols=100, dynamic_ncols=False, ascii=True,
              file=_LineFile(kw["file"]))
    return _LineTqdm(iterable, **kw)


class TqdmHandler(logging.StreamHandler):
    """A logging handler that writes through tqdm, above any live bar."""

    def emit(self, record: logging.LogRecord) -> None:
        if not _is_tty(self.stream):  # bars in a file are whole lines already: nothing to clear
            return super().emit(record)
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def setup_logging(verbose: int) -> None:
    """Warnings from everyone by default; featcache's progress at INFO with -v, everything at DEBUG with -vv."""
    handler = TqdmHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("featcache").setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
