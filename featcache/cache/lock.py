"""The writer lock: one process writes a cache at a time, from the existence check to the end of the run.

``CACHE.h5.lock`` is held with a POSIX record lock (``fcntl.lockf``): the
kernel releases it when the holding process dies, however it dies, and
forked decoding workers do not inherit it. So a killed run never leaves the
cache locked. The file holds the holder's pid, host and start time, which a
refused second writer quotes. A run that ends removes the lock file while it
still holds the lock, so no litter stays beside the cache; a process that
locked a file just removed (its name now another file's, or none) sees that
the name no longer leads to its file and tries again, so two writers never
hold two different files of one name. A killed run leaves the file (harmless:
the next run takes it). POSIX locks are reliable on local filesystems; on
NFS they depend on the server's lock daemon.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from featcache.errors import InputError


def lock_path(cache: Path) -> Path:
    return Path(cache).with_name(Path(cache).name + ".lock")


def holder(cache: Path) -> str:
    """Who holds (or last held) the lock, as written in the lock file."""
    try:
        return lock_path(cache).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


class WriterLock:
    """``with WriterLock(cache):`` – refused at once, naming the holder, if another process writes the cache."""

    def __init__(self, cache: Path) -> None:
        self.cache = Path(cache)
        self.fd: int | None = None

    def __enter__(self) -> "WriterLock":
        path = lock_path(self.cache)
        for _ in range(100):
            fd = self._open(path)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise InputError(f"{self.cache} is being written by another featcache process ({holder(self.cache)}); "
                                     "wait for it to finish or stop it, then run again") from None
                raise
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder before removed this file as it finished: lock the name's file anew
        else:
            raise InputError(f"{path}: could not take the writer lock (the file kept changing); run again")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode())
        self.fd = fd
        return self

    def _open(self, path: Path) -> int:
        folder = path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except PermissionError:
            raise InputError(f"cannot write in {folder} (permission denied), where {self.cache.name} goes: make the folder "
                             "writable or choose another --out") from None
        except OSError as exc:
            if exc.errno == errno.EROFS:
                raise InputError(f"cannot write in {folder}: a read-only filesystem; choose another --out") from None
            raise

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                os.unlink(lock_path(self.cache))  # still holding the lock: nobody else holds this file
            except OSError:
                pass
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def held_by(cache: Path) -> str | None:
    """The featcache writer holding the cache's lock now, or None (nobody, or another program)."""
    path = lock_path(cache)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return None
    except OSError:
        return holder(cache)
    finally:
        os.close(fd)
