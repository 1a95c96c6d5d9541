"""Experiment loggers (``--log tensorboard``, ``--log wandb``): the run's numbers, sent elsewhere too.

A logger is a view of the run, not part of it: ``metrics.csv`` and ``result.json`` stay the
record, the setting is left out of the run id and the recipe hash (``RunConfig._NON_RESULT``),
it may change between a run and its ``--resume``, and only the main process (rank 0) writes.

The engine calls one small interface at the points where it already records numbers:
``log_scalars(step, values)`` at every host sync (the loss terms of the last 10 steps, the lr
and the steady img/s, under ``train/``) and at each epoch's end (the ``metrics.csv`` row, under
``epoch/``), then ``flush()``, and ``close()`` when training ends or stops. The x axis is always
the global optimiser step, so a resumed run continues its curves where they stopped.

The packages are optional extras: :func:`check` runs before any work, so a missing one is a
one-line error giving the pip command, never a traceback after a teacher has trained.
"""

from __future__ import annotations

import importlib.util
import math
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from .checkpoint import atomic_write_text
from .errors import UserError

# name -> (the package it needs, the pyproject extra that installs it)
LOGGERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


class Logger(Protocol):
    def log_scalars(self, step: int, values: Mapping[str, float]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def check(names: Iterable[str]) -> None:
    """Refuse an unknown logger or one whose package is missing (before any work starts)."""
    for name in names:
        if name not in LOGGERS:
            raise UserError(f"--log {name!r} is not a logger kdzoo knows; pass --log tensorboard or --log wandb")
        package, extra = LOGGERS[name]
        if importlib.util.find_spec(package) is None:
            raise UserError(f"--log {name} needs the {package} package, which is not installed; install it with "
                            f"pip install -e \".[{extra}]\" (or pip install {package})")


def scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of ``values``: a class absent from the test set has no IoU (NaN), and a
    chart is better without it than autoscaled to nothing."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class Loggers:
    """Every logger of a run behind the one interface; with none (or off rank 0) it does nothing."""

    def __init__(self, loggers: list[Logger] | None = None):
        self.loggers = loggers or []

    def log_scalars(self, step: int, values: Mapping[str, Any]) -> None:
        values = scalars(values)
        if values:
            for logger in self.loggers:
                logger.log_scalars(step, values)

    def flush(self) -> None:
        for logger in self.loggers:
            logger.flush()

    def close(self) -> None:
        loggers, self.loggers = self.loggers, []
        for logger in loggers:
            logger.close()


def open_loggers(names: Iterable[str], run_dir: Path, record: Mapping[str, Any], resume_step: int | None,
                 enabled: bool = True) -> Loggers:
    """The run's loggers. ``resume_step``: the global step a resumed run continues from (None: a
    fresh run); ``enabled``: False on every process but rank 0. ``record``: config.json's content."""
    names = list(dict.fromkeys(names))  # --log tensorboard twice is one logger
    check(names)
    if not enabled or not names:
        return Loggers()
    opened: list[Logger] = []
    try:
        for name in names:
            opened.append(_OPEN[name](Path(run_dir), record, resume_step))
    except BaseException:
        Loggers(opened).close()
        raise
    return Loggers(opened)


class TensorBoardLogger:
    """Event files in ``<run>/tensorboard/``: ``tensorboard --logdir runs`` shows every run.

    A resumed run opens a new event file in the same folder with ``purge_step`` at the step it
    continues from: what the stopped process logged after its last checkpoint (steps that are
    trained again) is hidden, so no curve shows a step twice.
    """

    def __init__(self, run_dir: Path, record: Mapping[str, Any], resume_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise UserError(f"--log tensorboard could not load TensorBoard ({e}); install it with "
                            "pip install -e \".[tensorboard]\" (or pip install tensorboard)") from None
        purge = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


WANDB_ID_FILE = "kdzoo-run-id"  # in <run>/wandb/: the W&B run id, so --resume continues the same W&B run


class WandbLogger:
    """A W&B run per kdzoo run; its files under ``<run>/wandb/``.

    W&B's own settings apply (``WANDB_MODE=offline`` logs without a network, ``wandb sync``
    uploads later; ``WANDB_PROJECT``, default ``kdzoo``; ``WANDB_ENTITY``). The W&B run id is
    drawn once and kept in ``<run>/wandb/kdzoo-run-id``, so ``--resume`` continues the same W&B
    run; every value is logged against a ``global_step`` metric rather than W&B's own step
    counter, which refuses a step lower than one it has seen (a resumed run retrains the steps
    after its last checkpoint). Runs of one recipe share a W&B group: the recipe hash.
    """

    def __init__(self, run_dir: Path, record: Mapping[str, Any], resume_step: int | None):
        import wandb

        folder = run_dir / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        run_id = _wandb_id(folder / WANDB_ID_FILE)
        run = record.get("run", {})
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "kdzoo"), dir=str(run_dir), id=run_id, name=run_dir.name,
                resume="allow", reinit="create_new", group=record.get("recipe_hash"), job_type=run.get("method"),
                tags=[str(t) for t in (run.get("method"), run.get("model"), run.get("dataset")) if t],
                config={key: record.get(key) for key in ("run", "method_config", "recipe_hash", "teacher_source")},
                allow_val_change=True,
                settings=wandb.Settings(console="off", silent=True),
            )
        except wandb.errors.Error as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--log wandb could not start a W&B run ({first}); run `wandb login`, or set "
                            "WANDB_MODE=offline to log without a network (upload later with `wandb sync`)") from None
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log({**values, "global_step": step})

    def flush(self) -> None:
        pass  # W&B sends in the background; finish() waits for it

    def close(self) -> None:
        self.run.finish()


def _wandb_id(path: Path) -> str:
    """The W&B run id recorded in ``path``, or a new random one written there (atomically)."""
    try:
        recorded = path.read_text().strip()
    except OSError:
        recorded = ""
    if recorded:
        return recorded
    run_id = secrets.token_hex(8)
    atomic_write_text(path, run_id + "\n")
    return run_id


_OPEN = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}
