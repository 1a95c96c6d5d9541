"""The run folder: what a run leaves on disk, written so that a kill never corrupts it.

``<output>/<run-id>/`` holds ``config.json`` (everything needed to re-run it), ``metrics.csv``
(one row per epoch), ``result.json`` (final figures; a run without it is incomplete),
``last.pt`` and ``best.pt``. Every file is replaced atomically.

Under data parallelism every process holds a ``RunDir`` for the same folder, but only rank 0's
is a *writer*: the others' writes are no-ops, so the engine calls the same methods on every
rank and exactly one copy of each file is written.
"""

from __future__ import annotations

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

from .checkpoint import (
    TEMP_SUFFIX,
    atomic_write_json,
    atomic_write_text,
    save_checkpoint,
)
from .errors import UserError


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
        """The folder for ``run_id``: reused with ``resume``, else a fresh one (never overwritten)."""
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
            return cls(existing[-1] if existing else candidates[0])
        for candidate in candidates:
            if not candidate.exists():
                return cls(candidate)
        raise UserError(f"too many runs named {run_id!r} in {output}; pass --run-name")

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


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
