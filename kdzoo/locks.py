"""Advisory file locks between processes (``fcntl.flock``).

Used where two processes could otherwise do the same work at once: two bench cells that need
the same cached teacher, two suites that reach the same cell. The lock belongs to the open file,
so it is released when the holder exits, however it exits; the lock file itself stays (it is
empty and harmless).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
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
