"""One error type for every stage: a known bad input ends with a one-line message and an exit code.

``ConfigError`` (exit 2): the command line or a config file is wrong in
itself (an unknown name or key, a value out of range, a combination that
makes no sense, a device that is not there). ``InputError`` (exit 1): the
inputs named are missing, malformed or do not fit together (a cache, a run
directory, weights, a dataset). ``RunError`` (exit 1): a failure while
running (a NaN loss, a failed write). The command line prints the message
without a traceback (``--debug`` shows it); library users catch
``FeatcacheError``.
"""

from __future__ import annotations

from typing import Any, Iterable


class FeatcacheError(Exception):
    """Base of every error featcache raises on purpose."""

    exit_code = 1


class ConfigError(FeatcacheError, ValueError):
    """A bad option, config key or value: usage and configuration errors (exit 2)."""

    exit_code = 2


class InputError(FeatcacheError, ValueError):
    """Input files or directories that are missing, malformed or do not match (exit 1)."""

    exit_code = 1


class RunError(FeatcacheError, RuntimeError):
    """A failure while running (exit 1)."""

    exit_code = 1


def one_line(exc: BaseException) -> str:
    """The message to print for ``exc``. An error raised in a DataLoader worker comes back from torch wrapped
    ("Caught InputError in DataLoader worker process 0. Original Traceback ..."), with the worker's
    traceback in the message: its own message is the last line, after the exception's name."""
    msg = str(exc)
    if "Original Traceback" not in msg:
        return msg
    last = [ln for ln in msg.strip().splitlines() if ln.strip()][-1]
    name, sep, rest = last.partition(": ")
    return rest if sep and name.rsplit(".", 1)[-1] == type(exc).__name__ else last


def check_choice(value: Any, choices: Iterable[Any], option: str, error: type[Exception] | None = None,
                 what: str | None = None, note: str = "") -> None:
    """Refuse ``value`` unless it is one of ``choices``, in one line: ``<option> <value!r>: expected one of a, b, c``
    (``what`` replaces ``<option> <value!r>``; ``note`` follows the list). ``error`` defaults to ``ConfigError``."""
    choices = list(choices)
    if value not in choices:
        label = what if what is not None else f"{option} {value!r}"
        raise (error or ConfigError)(f"{label}: expected one of {', '.join(map(str, choices))}{note}")
