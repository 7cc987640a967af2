"""Writing files so that a crash never leaves a half-written one in place."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from featcache.errors import InputError, RunError


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc/self/status``); elsewhere
    set and restored at once."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_umask_mode(path: Path) -> None:
    """Widen a file written narrower than a plain ``open`` would have made it (0666 less the umask) to that mode;
    never narrows, and a file system that refuses modes (some network mounts) keeps the file as it is."""
    want = 0o666 & ~current_umask()
    try:
        have = os.stat(path).st_mode & 0o777
        if have & want != want:
            os.chmod(path, have | want)
    except OSError:
        pass


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it into place with the mode a plain
    ``open`` would have given it (0666 less the umask): writers that go through a private temporary file of
    their own (safetensors creates it 0600) would otherwise publish files colleagues cannot read.

    A failed write (disk full, a read-only folder) removes the temporary file, so nothing stops a rerun,
    and ends in one error naming the file.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        give_umask_mode(tmp)
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


def check_output(path: Path | None, option: str, folder: bool = False) -> None:
    """Refuse, before any work, an output path that cannot be written: ``path`` (a file, or a ``folder``) must be
    creatable in its nearest existing ancestor, which must be a writable folder. One line names the option."""
    if path is None:
        return
    path = Path(path)
    if path.exists():
        if path.is_dir() != folder:
            raise InputError(f"{option} {path}: is {'a file' if folder else 'a folder'}; expected {'a folder' if folder else 'a file name'}")
        if folder:
            if not os.access(path, os.W_OK | os.X_OK):
                raise InputError(f"{option} {path}: cannot write in it (permission denied)")
            return
    parent = path.parent  # a file is replaced through a temporary name beside it: its folder must be writable
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{option} {path}: cannot create it: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: cannot create it: {parent} is not writable (permission denied)")
