"""How fast training goes, and how its progress is shown while it runs.

Two jobs the training loop hands off, both independent of any method:

- :class:`Throughput` measures the **steady** training rate: the images and seconds of the
  steps after the first ``WARMUP_STEPS`` of each process. Those first steps pay one-time costs
  (allocator growth, cuDNN autotuning, lazy initialisation, ``--compile``, a DataLoader's first
  workers) that say nothing about how fast the rest of the run trains; counting them made tiny
  runs report a fraction of their real rate. ``result.json``'s ``train_img_per_s`` and
  ``ms_per_step``, ``metrics.csv``'s ``img_per_s``, the progress bar, the plain progress lines
  and so the leaderboard all read this one measurement.
- :class:`TrainingProgress` shows progress: the rich progress bar on a terminal, and on
  anything else (CI, ``nohup``, a cluster job's log file) a plain line at most every
  ``PLAIN_INTERVAL_S`` seconds and at each epoch's end, since a bar redrawn in a file is either
  invisible or thousands of lines long.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

WARMUP_STEPS = 5  # steps of each process left out of the steady rate
PLAIN_INTERVAL_S = 30.0  # at most one plain progress line this often (plus one at each epoch's end)


class Throughput:
    """Images and seconds of training steps, in total and after warm-up.

    The clock is read only at the points where the loop synchronises anyway (every 10 steps and
    at each epoch's end) and once more when this process's warm-up ends, so the measurement adds
    no host sync per step. An interval between two readings counts as steady only when none of
    its steps was a warm-up step; a run too short to have one falls back to the rate over all
    steps. Time outside the steps (evaluation, checkpoints) is never counted: :meth:`start`
    restarts the clock at each epoch's first step.
    """

    def __init__(self, warmup_steps: int = WARMUP_STEPS, clock: Callable[[], float] = time.perf_counter):
        self.warmup_steps, self.clock = warmup_steps, clock
        self.seconds, self.images, self.steps = 0.0, 0, 0  # every step, over the whole run (resumes included)
        self.steady_seconds, self.steady_images, self.steady_steps = 0.0, 0, 0
        self.process_steps = 0  # steps this process has taken: a resumed process warms up again
        self._tick = clock()
        self._images = self._steps = 0
        self._warm = False  # the open interval holds a warm-up step

    def start(self) -> None:
        """Begin timing (at an epoch's first step): what happened since the last reading is not a step."""
        self._tick = self.clock()
        self._images = self._steps = 0
        self._warm = False

    def add_step(self, images: int) -> bool:
        """Count one step of ``images``; True when it is the last warm-up step (read the clock then)."""
        self.process_steps += 1
        self._images += images
        self._steps += 1
        if self.process_steps <= self.warmup_steps:
            self._warm = True
        return self.process_steps == self.warmup_steps

    def read(self) -> None:
        """Close the open interval (call it after the device has finished the steps)."""
        now = self.clock()
        elapsed = now - self._tick
        self.seconds += elapsed
        self.images += self._images
        self.steps += self._steps
        if not self._warm:
            self.steady_seconds += elapsed
            self.steady_images += self._images
            self.steady_steps += self._steps
        self._tick = now
        self._images = self._steps = 0
        self._warm = False

    def img_per_s(self) -> float:
        """Steady images per second (all processes), or over every step while none is steady yet."""
        if self.steady_seconds > 0:
            return self.steady_images / self.steady_seconds
        return self.images / max(self.seconds, 1e-9)

    def seconds_per_step(self) -> float | None:
        """Steady seconds per step, or over every step; None before any step was timed."""
        if self.steady_steps:
            return self.steady_seconds / self.steady_steps
        return self.seconds / self.steps if self.steps else None

    # -- checkpoints: a resumed run goes on counting where it stopped ------------------------------
    def state(self) -> dict[str, Any]:
        return {"train_seconds": self.seconds, "images_seen": self.images, "timed_steps": self.steps,
                "steady_seconds": self.steady_seconds, "steady_images": self.steady_images,
                "steady_steps": self.steady_steps}

    def load(self, state: dict[str, Any], global_step: int) -> None:
        """Restore :meth:`state`; a checkpoint written before the steady rate existed counts all its steps."""
        self.seconds, self.images = state["train_seconds"], state["images_seen"]
        self.steps = state.get("timed_steps", global_step)
        self.steady_seconds = state.get("steady_seconds", 0.0)
        self.steady_images = state.get("steady_images", 0)
        self.steady_steps = state.get("steady_steps", 0)


@dataclass
class Status:
    """Where training stands, for one progress update."""

    epoch: int  # 1-based
    epochs: int
    step: int  # steps done in this epoch
    steps: int  # steps this epoch will take
    global_step: int
    total_steps: int
    losses: dict[str, float] = field(default_factory=dict)  # epoch means so far
    img_per_s: float = 0.0
    seconds_per_step: float | None = None

    def eta_s(self) -> float | None:
        """Seconds left for the remaining training steps (evaluations not included)."""
        if self.seconds_per_step is None:
            return None
        return max(0, self.total_steps - self.global_step) * self.seconds_per_step

    def info(self) -> str:
        losses = "  ".join(f"{name} {value:.4g}" for name, value in self.losses.items())
        return f"{losses}  {self.img_per_s:.0f} img/s".strip()


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def plain_line(status: Status) -> str:
    """One progress line for a log: where, how well, how fast, how long still."""
    return (f"epoch {status.epoch}/{status.epochs}  step {status.step}/{status.steps}  "
            f"(run {status.global_step}/{status.total_steps})  {status.info()}  eta {format_duration(status.eta_s())}")


class TrainingProgress:
    """The rich bar on a terminal; otherwise plain lines at most every ``interval`` seconds and at
    each epoch's end. One instance serves the whole run, so the interval spans epochs."""

    def __init__(self, console, interval: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.console, self.clock = console, clock
        self.interval = PLAIN_INTERVAL_S if interval is None else interval
        self.plain = not console.is_terminal
        self._last_line = clock()  # the first line comes after one interval, not at once

    @contextlib.contextmanager
    def epoch(self, epoch: int, epochs: int, steps: int, completed: int) -> Iterator[Callable[[Status], None]]:
        """A context for one epoch's steps; yields ``update(status)``."""
        if self.plain:
            yield self._plain_update
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
            console=self.console, transient=True,
        )
        with bar:
            task = bar.add_task("train", total=steps, completed=completed, info="")
            yield lambda status: bar.update(task, completed=status.step, info=status.info())

    def _plain_update(self, status: Status) -> None:
        now = self.clock()
        if status.step >= status.steps or now - self._last_line >= self.interval:
            self._last_line = now
            self.console.print(plain_line(status), markup=False, highlight=False, soft_wrap=True)
