"""Atomic writes and safe reads.

Every file kdzoo writes goes to a temporary file in the same folder, is flushed to disk and
then renamed over the target: a crash or a kill at any moment leaves either the old complete
file or the new complete file, never a torn one. Checkpoints are read with
``weights_only=True`` only — a checkpoint is data, never code.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

_UMASK = os.umask(0o022)
os.umask(_UMASK)
TEMP_SUFFIX = ".tmp"  # temporary files are ".<name>.<random>.tmp" next to their target

# Fault injection for tests/test_faults.py only: KDZOO_TEST_KILL_IN_WRITE=N makes the process
# SIGKILL itself halfway through writing the data of its N-th atomic write (counted from 1);
# KDZOO_TEST_KILL_IN_WRITE=NAME, through its first write of a file called NAME. That is the
# worst moment for a crash. Unset, it costs one dictionary lookup per write.
_KILL_IN_WRITE_ENV = "KDZOO_TEST_KILL_IN_WRITE"
_writes_done = 0


def _maybe_kill_mid_write(f, data: bytes, path: Path) -> None:
    global _writes_done
    target = os.environ.get(_KILL_IN_WRITE_ENV)
    if not target:
        return
    _writes_done += 1
    if (str(_writes_done) == target) or path.name == target:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            _maybe_kill_mid_write(f, data, path)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_checkpoint(path: str | Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} does not exist; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # safe loading refuses a pickled object by naming its class ("Unsupported global: GLOBAL
        # mod.Class"); anything else that fails is a damaged file
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        kind = f"is not a plain weights file (refused by safe loading: it holds a pickled {unsafe.group(1)})" if unsafe \
            else f"is truncated or corrupted ({type(e).__name__})"
        raise UserError(f"{what} {str(path)!r} {kind}; pass an intact kdzoo checkpoint or state_dict") from None
