"""Advisory file locks between processes (``fcntl.flock``).

Used where two processes could otherwise do the same work at once: two bench cells that need
the same cached teacher, two suites that reach the same cell, two processes training in one
run folder. The lock belongs to the open file, so it is released when the holder exits, however
it exits; a plain lock file stays (it is empty and harmless), a claim's (:func:`try_claim`)
names its holder and is removed on release.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def try_lock(path: str | Path) -> int | None:
    """An open descriptor holding the exclusive lock on ``path``, or None if another holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def unlock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: str | Path, on_wait: Callable[[], None] | None = None,
              should_stop: Callable[[], bool] | None = None, poll_s: float = 0.5) -> Iterator[bool]:
    """Hold the lock on ``path`` for the ``with`` block, waiting for it if it is taken.

    ``on_wait`` is called once if the lock is busy (to say so). While waiting, ``should_stop``
    is polled; when it returns true the block runs without the lock and the context yields
    False (the caller then stops instead of working).
    """
    fd = try_lock(path)
    if fd is None and on_wait is not None:
        on_wait()
    while fd is None:
        if should_stop is not None and should_stop():
            yield False
            return
        time.sleep(poll_s)
        fd = try_lock(path)
    try:
        yield True
    finally:
        unlock(fd)


# -- locks whose file names the holder and goes away with it ---------------------------------
def try_claim(path: str | Path) -> int | None:
    """Like :func:`try_lock`, for a lock that should say who holds it and leave no file behind.

    The holder's pid, host and start time are written into the file, so a process that is
    refused can name it (:func:`holder`); :func:`release` deletes the file. Deleting a lock
    file races with a process that opened it just before: that process would then hold a lock
    on a file no longer at ``path``. So after locking, the descriptor is checked to still be the
    file at ``path``, and the claim starts over on the new file if not.
    """
    path = Path(path)
    while True:
        fd = try_lock(path)
        if fd is None:
            return None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
            break
        unlock(fd)
    os.ftruncate(fd, 0)
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {since}\n".encode())
    return fd


def holder(path: str | Path) -> str:
    """Who holds the claim on ``path``, as its holder wrote it (or a neutral phrase)."""
    try:
        text = Path(path).read_text(errors="replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "another process (it has not yet written its pid)"


def release(fd: int, path: str | Path) -> None:
    """Give up a claim from :func:`try_claim`: the file is removed first, while still locked."""
    try:
        Path(path).unlink(missing_ok=True)
    finally:
        unlock(fd)
