"""Writing files so that a crash never leaves a half-written one in place."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from featcache.errors import RunError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it into place.

    A failed write (disk full, a read-only folder) removes the temporary file, so nothing stops a rerun,
    and ends in one error naming the file.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.strerror:
            raise RunError(f"cannot write {path}: {exc.strerror} (errno {exc.errno})") from exc
        if isinstance(exc, RuntimeError):  # torch.save reports a short write this way ("unexpected pos ...")
            raise RunError(f"cannot write {path}: {exc} (is the disk full?)") from exc
        raise


def save_figure(fig, path: Path, **kw) -> None:
    """``fig.savefig`` through ``atomic_write``: a killed run never leaves a torn image under the real name."""
    path = Path(path)
    atomic_write(path, lambda p: fig.savefig(p, format=path.suffix.lstrip(".") or "png", **kw))
