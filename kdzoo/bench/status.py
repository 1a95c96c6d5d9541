"""The bench's record of each cell's last attempt: ``<output>/bench-status/<run-id>.json``.

One small file per cell, replaced atomically, so suites that share an output folder never
overwrite each other's records and a kill never leaves a torn one. The run folder stays the
truth about results (a run is complete when its ``result.json`` exists); these files add what a
run folder cannot hold: that a cell failed, and why. The leaderboard reads them.

A record: ``format``, ``run_id`` (the cell's id), ``folder`` (its run folder's name),
``state`` (``complete`` | ``failed`` | ``interrupted``), ``error`` (one line, or null),
``traceback`` (for unexpected errors), ``suite``, ``run`` (the run settings, resolved where
possible), ``method_config`` (the method's resolved settings, or null if they could not be
resolved), ``versions``, ``started``, ``finished``, ``attempt`` (a token per attempt), ``pid``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_json
from ..config import RunConfig
from ..errors import UserError
from ..registry import get_method
from ..runs import versions
from ..settings import apply_overrides

STATUS_DIR = "bench-status"
FORMAT = "kdzoo-bench-status-v1"


def status_folder(output: str | Path) -> Path:
    return Path(output) / STATUS_DIR


def status_path(output: str | Path, run_id: str, suffix: str = ".json") -> Path:
    """The cell's record (``.json``); with another suffix its lock (``.lock``) or log (``.log``)."""
    return status_folder(output) / f"{run_id}{suffix}"


def settings_record(cfg: RunConfig) -> dict[str, Any]:
    """``run``, ``method_config`` and ``versions`` as ``config.json`` has them, as far as they resolve."""

    try:
        cfg = cfg.resolved()
    except UserError:
        pass
    try:
        method_cls = get_method(cfg.method)
        method_config = dataclasses.asdict(apply_overrides(method_cls.Config(), cfg.method_settings, cfg.method))
    except UserError:
        method_config = None
    return {"run": cfg.to_dict(), "method_config": method_config, "versions": versions()}


def write_status(cfg: RunConfig, run_id: str, folder: str, state: str, suite: str, attempt: str, started: float,
                 error: str | None = None, traceback: str | None = None) -> dict[str, Any]:
    record = {
        "format": FORMAT, "run_id": run_id, "folder": folder, "state": state, "error": error, "traceback": traceback,
        "suite": suite, **settings_record(cfg), "started": _iso(started), "finished": _iso(time.time()),
        "attempt": attempt, "pid": os.getpid(),
    }
    atomic_write_json(status_path(cfg.output, run_id), record)
    return record


def read_status(path: str | Path) -> dict[str, Any] | None:
    """A status record, or None when the file is not one (unreadable, torn by hand, another format)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def read_statuses(folder: str | Path) -> list[dict[str, Any]]:
    return [r for r in (read_status(p) for p in sorted(Path(folder).glob("*.json"))) if r is not None]


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))
