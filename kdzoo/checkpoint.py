"""Atomic writes and safe reads.

Every file kdzoo writes goes to a temporary file in the same folder, is flushed to disk and
then renamed over the target: a crash or a kill at any moment leaves either the old complete
file or the new complete file, never a torn one. Checkpoints are read with
``weights_only=True`` only — a checkpoint is data, never code.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickletools
import re
import signal
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import UserError, missing

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
    """Replace ``path`` with ``data`` atomically.

    An OSError (a full disk, a read-only folder) leaves the previous file as it was and is
    raised with ``filename`` set to ``path``, the file the user knows, rather than the temporary
    one or none (a failed ``write`` names no file), so the CLI can say where it happened.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory", str(path))
        _write_replace(path, data)
    except OSError as e:
        e.filename = str(path)
        raise


def _write_replace(path: Path, data: bytes) -> None:
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


def strict_json(obj: Any, indent: int | None = 2) -> str:
    """``obj`` as strict JSON: a NaN or infinite float (a missing IoU, an empty mean) becomes
    ``null``, never the ``NaN`` token Python writes by default, which JSON readers other than
    Python's reject."""
    return json.dumps(_finite_or_none(obj), indent=indent, sort_keys=True, default=str, allow_nan=False)


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, strict_json(obj) + "\n")


def save_checkpoint(path: str | Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> Any:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{missing(what, path)}; pass the checkpoint file in it (e.g. last.pt)")
    if not path.is_file():
        raise UserError(f"{missing(what, path)}; check the path")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols before refusing them
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if isinstance(e, OSError) and e.errno is not None:  # permission denied, an I/O error: not the content
            raise UserError(f"{what} {str(path)!r} cannot be read ({e.strerror}); give this user read access or "
                            "pass another file") from None
        raise UserError(f"{what} {str(path)!r} {_why_unreadable(path, e)}; pass an intact kdzoo checkpoint or state_dict") from None


def _why_unreadable(path: Path, error: Exception) -> str:
    """What is wrong with a file ``torch.load(weights_only=True)`` refused, in words that are true.

    Safe loading refuses a file that would import a class or call a function (that is how a
    pickle runs code); such a file is intact but not plain data, and saying "corrupted" would
    be false. Its imports are read from the pickle's opcodes, which executes nothing; torch's
    own message is the fallback. A file with no pickle in it is damaged.
    """
    names = _pickled_imports(path)
    if not names:
        names = re.findall(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(error))
    if names:
        return (f"is not a plain weights file (refused by safe loading: it holds a pickled "
                f"{', '.join(dict.fromkeys(names))}, which loading would import and call)")
    if _is_plain_pickle(path):
        return "is a plain Python pickle, not a file written by torch.save (refused by safe loading)"
    return f"is truncated or corrupted ({type(error).__name__})"


# what a weights file may import: tensors, their storages and containers (torch's own allowlist)
_SAFE_PREFIXES = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset", "builtins.bytearray",
                  "builtins.complex", "builtins.slice", "_codecs.encode")


def _pickled_imports(path: Path) -> list[str]:
    """``module.name`` of every global the pickle(s) in ``path`` would import, other than torch's."""
    names = []
    for stream in _pickle_streams(path):
        strings: list[str] = []
        for opcode, arg, _ in pickletools.genops(stream):
            if opcode.name in ("GLOBAL", "INST"):
                names.append(arg.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    return [n for n in names if not n.startswith(_SAFE_PREFIXES)]


def _pickle_streams(path: Path) -> list[io.BytesIO]:
    """The complete pickles of a checkpoint: ``data.pkl`` of a torch.save zip, else those at the
    start of the file (the legacy format is several pickles in a row). Only pickles that parse to
    their end count, so bytes of a damaged file are never read as names."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                blobs = [archive.read(n) for n in archive.namelist() if n.endswith("data.pkl")]
        else:
            with path.open("rb") as f:
                blobs = [f.read(64 * 2**20)]
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError, EOFError):
        return []
    streams = []
    for blob in blobs:
        stream = io.BytesIO(blob)
        for _ in range(5):
            start = stream.tell()
            try:
                for _op in pickletools.genops(stream):
                    pass
            except Exception:  # not (or no longer) a pickle
                break
            streams.append(io.BytesIO(blob[start:stream.tell()]))
            if stream.tell() == len(blob):
                break
    return streams


def _is_plain_pickle(path: Path) -> bool:
    """Whether ``path`` is exactly one complete pickle (``pickle.dump``), not a torch.save file."""
    try:
        with path.open("rb") as f:
            for _op in pickletools.genops(f):
                pass
            return f.read(1) == b""
    except Exception:
        return False
