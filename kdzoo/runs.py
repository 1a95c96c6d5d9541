"""The run folder: what a run leaves on disk, written so that a kill never corrupts it.

``<output>/<run-id>/`` holds ``config.json`` (everything needed to re-run it), ``metrics.csv``
(one row per epoch), ``result.json`` (final figures; a run without it is incomplete),
``last.pt`` and ``best.pt``. Every file is replaced atomically.

Under data parallelism every process holds a ``RunDir`` for the same folder, but only rank 0's
is a *writer*: the others' writes are no-ops, so the engine calls the same methods on every
rank and exactly one copy of each file is written.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import distributed
from .checkpoint import (
    TEMP_SUFFIX,
    atomic_write_json,
    atomic_write_text,
    save_checkpoint,
)
from .errors import UserError
from .locks import holder, release, try_claim


def versions() -> dict[str, str]:
    import timm
    import torch

    from . import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__, "kdzoo": __version__}


def machine() -> dict[str, Any]:
    """Where a run ran, as far as it changes the digits: the same code, versions and recipe give
    the same figures only on the same CPU (or GPU) model with the same thread count, since float
    summation order differs between kernels."""
    import torch

    record: dict[str, Any] = {"cpu": _cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                              "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": None, "cudnn": None}
    if torch.cuda.is_available():
        record["gpu"] = torch.cuda.get_device_name()
        record["cudnn"] = torch.backends.cudnn.version()
    return record


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class RunDir:
    def __init__(self, path: Path, writer: bool = True):
        self.path = Path(path)
        self.writer = writer

    # -- locating ------------------------------------------------------------------------
    @classmethod
    def for_run(cls, output: str | Path, run_id: str, resume: bool) -> RunDir:
        """The folder for ``run_id``: reused with ``resume``, else a fresh one (never overwritten).

        A reused folder must be a kdzoo run (:meth:`check_resumable`): ``--resume`` into a folder
        of the user's own files would otherwise overwrite them.
        """
        check_folder_name(run_id)
        output = Path(output)
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create output folder {str(output)!r} ({e.strerror}); pass a writable --output DIR") from None
        if not _writable(output):
            raise UserError(f"output folder {str(output)!r} is not writable; pass a writable --output DIR")
        candidates = [output / run_id] + [output / f"{run_id}-{i}" for i in range(2, 1000)]
        if resume:
            existing = [c for c in candidates if c.exists()]
            run_dir = cls(existing[-1] if existing else candidates[0])
            run_dir.check_resumable()
            return run_dir
        for candidate in candidates:
            if not candidate.exists():
                return cls(candidate)
        raise UserError(f"too many runs named {run_id!r} in {output}; pass --run-name")

    def check_resumable(self) -> None:
        """Refuse to resume into anything but a kdzoo run folder (or an empty one), or a folder
        that cannot be written: checked before any work, so a refusal changes nothing."""
        path = self.path
        if not path.exists():
            return
        if not path.is_dir():
            raise UserError(f"{path} exists and is not a folder, so it cannot be a run to resume; "
                            "pass another --run-name or --output")
        if not self.is_kdzoo_run():
            foreign = sorted(p.name for p in path.iterdir() if not _is_temporary(p))
            if foreign:
                listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
                why = "its config.json was not written by kdzoo" if "config.json" in foreign else "no kdzoo config.json"
                raise UserError(f"{path} is not a kdzoo run folder (it holds {listed}; {why}), so --resume will not "
                                "write into it; pass another --run-name or --output")
        if not _writable(path):
            raise UserError(f"run folder {path} is not writable; make it writable or pass another --output")

    def is_kdzoo_run(self) -> bool:
        """Whether the folder's ``config.json`` is the record kdzoo writes first in every run."""
        try:
            record = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(record, dict) and isinstance(record.get("run"), dict) and "recipe_hash" in record

    # -- one process at a time -----------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        """Next to the folder, not in it: the folder then holds only the run's own files."""
        return self.path.parent / f".{self.path.name}.lock"

    @contextlib.contextmanager
    def lock(self):
        """Hold the run folder for this process while it trains in it.

        Two processes in one folder (the same ``--resume`` started twice) would interleave their
        checkpoints and metrics; the second is refused with exit 2, naming the holder written in
        the lock file. The lock is taken on the writer (rank 0 under DDP) and the refusal reaches
        every rank; it is released, and its file removed, when the block ends, and by the
        operating system if the process dies.
        """
        fd = None

        def claim() -> None:
            nonlocal fd
            if self.writer:
                fd = try_claim(self.lock_path)
                if fd is None:
                    raise UserError(f"run folder {self.path} is in use by another kdzoo process "
                                    f"({holder(self.lock_path)}); wait for it to finish or stop it, then run "
                                    "the same command with --resume")

        distributed.on_main(claim)
        try:
            yield self
        finally:
            if fd is not None:
                release(fd, self.lock_path)

    def create(self) -> None:
        """Make the folder; remove temporary files a killed process left half-written in it."""
        if not self.writer:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob(f".*{TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)

    # -- files ---------------------------------------------------------------------------
    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    @property
    def result_path(self) -> Path:
        return self.path / "result.json"

    def is_complete(self) -> bool:
        return self.result_path.is_file()

    def read_result(self) -> dict[str, Any]:
        return json.loads(self.result_path.read_text())

    def write_config(self, config: dict[str, Any]) -> None:
        if self.writer:
            atomic_write_json(self.path / "config.json", config)

    def write_result(self, result: dict[str, Any]) -> None:
        if self.writer:
            atomic_write_json(self.result_path, result)
            self.failure_path.unlink(missing_ok=True)  # a resumed run that completes is no longer failed

    @property
    def failure_path(self) -> Path:
        return self.path / "failure.json"

    def write_failure(self, failure: dict[str, Any]) -> None:
        """Record why the run stopped without a result (it diverged): the leaderboard shows it as failed."""
        if self.writer:
            atomic_write_json(self.failure_path, failure)

    def save_checkpoint(self, name: str, state: dict[str, Any]) -> None:
        if self.writer:
            save_checkpoint(self.path / name, state)

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite metrics.csv with every row so far (atomic; columns are the union of keys)."""
        if not self.writer:
            return
        columns: list[str] = []
        for row in rows:
            columns += [k for k in row if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in columns})
        atomic_write_text(self.path / "metrics.csv", buffer.getvalue())


def _writable(folder: Path) -> bool:
    """Whether a file can really be created in ``folder`` (``os.access`` says yes to root on a
    read-only mount, and says nothing about a full quota)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".kdzoo-write-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def _is_temporary(path: Path) -> bool:
    """A half-written file a killed kdzoo process left (``.<name>.<random>.tmp``)."""
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


def check_folder_name(name: str) -> None:
    """A run's name must be one folder inside ``--output``: a name with a separator, ``..`` or an
    absolute path would put the run (and its overwrites) somewhere else."""
    if (not isinstance(name, str) or not name.strip() or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or len(name.encode()) > 200):
        raise UserError(f"--run-name must be one plain folder name inside --output (no '/', not '.' or '..', not empty, "
                        f"at most 200 bytes), got {name!r}; pass a name such as my-run")


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
