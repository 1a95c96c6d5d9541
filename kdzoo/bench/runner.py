"""``kdzoo bench``: run every cell of a suite, as ordinary runs, and end with the leaderboard.

Each cell is a normal run (``kdzoo.engine.run`` with ``resume=True``) in the suite's output
folder. A complete cell (its run folder has ``result.json``) is skipped; an incomplete one is
resumed from its ``last.pt``; a cell that fails is recorded in ``bench-status/<run-id>.json``
and the suite goes on. With ``--jobs 1`` cells run one after another in this process; with
``--jobs N`` each runs in a subprocess (``python -m kdzoo.bench.runner CELL-JSON``), one per GPU when
there are several, or with the CPU cores divided between them.

Concurrency: each cell is locked (``bench-status/<run-id>.lock``) while it runs, so two suites
sharing an output folder never train the same cell at once (the second waits, then finds it
complete); cached teachers are locked the same way in :mod:`kdzoo.teacher`. SIGINT/SIGTERM stop
the suite: running cells save ``last.pt`` and stop, no new cell starts; the next ``kdzoo bench``
runs only what is missing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..build import validate
from ..config import RunConfig
from ..engine import Interrupted, StopFlag, run, stop_on_signals
from ..errors import UserError
from ..locks import try_lock, unlock
from ..registry import load_plugin
from ..runs import RunDir
from ..tasks import get_task
from . import leaderboard as lb
from .leaderboard import wide_console
from .status import read_status, status_path, write_status
from .suite import Suite, cell_id

EXIT_FAILED_CELLS = 3


@dataclass
class Cell:
    number: int
    cfg: RunConfig
    run_id: str
    invalid: str | None = None            # why it cannot run (a UserError from validation)
    state: str = "pending"                # pending | skipped | complete | failed | interrupted
    error: str | None = None
    result: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        c = self.cfg
        pair = f"{c.teacher}→{c.model}" if c.teacher else c.model
        return f"{c.method} {pair} {c.dataset} seed {c.seed}"

    def run_dir(self) -> RunDir:
        """The folder the engine will use (as ``RunDir.for_run(..., resume=True)`` picks it)."""
        output = Path(self.cfg.output)
        if not output.is_dir():
            return RunDir(output / self.run_id)
        return RunDir.for_run(output, self.run_id, resume=True)


# -- one cell ----------------------------------------------------------------------------------
def run_cell(cell: Cell, suite_name: str, stop, console, attempt: str | None = None) -> str:
    """Run one cell in this process and record the outcome; returns its state."""

    attempt = attempt or uuid.uuid4().hex
    started = time.time()
    folder = cell.run_dir().path.name
    error = tb = None
    try:
        cell.result = run(cell.cfg, resume=True, console=console, stop=stop)
        state = "complete"
    except Interrupted as e:
        state, error = "interrupted", str(e)
    except UserError as e:
        state, error = "failed", str(e)
    except KeyboardInterrupt:
        write_status(cell.cfg, cell.run_id, folder, "interrupted", suite_name, attempt, started, "stopped at once by a second signal")
        raise
    except Exception as e:  # noqa: BLE001 - a suite records every failure and goes on
        state, error, tb = "failed", f"{type(e).__name__}: {e}".splitlines()[0], traceback.format_exc()
    write_status(cell.cfg, cell.run_id, folder, state, suite_name, attempt, started, error, tb)
    cell.state, cell.error = state, error
    return state


def worker_main(argv: list[str]) -> int:
    """Subprocess entry: ``python -m kdzoo.bench.runner '{"cell": {...}, ...}'``."""
    from rich.console import Console

    payload = json.loads(argv[0])
    threads = payload.get("threads")
    if threads:
        torch.set_num_threads(threads)
    for plugin in payload.get("plugins", []):
        load_plugin(plugin)
    cfg = RunConfig(**payload["cell"])
    cell = Cell(payload.get("number", 0), cfg, payload["run_id"])
    with stop_on_signals(StopFlag()) as flag:
        state = run_cell(cell, payload["suite"], flag, Console(stderr=True), payload["attempt"])
    if state == "interrupted":
        return 143 if flag.signal_name == "SIGTERM" else 130
    return {"complete": 0, "failed": EXIT_FAILED_CELLS}[state]


# -- the suite ---------------------------------------------------------------------------------
def plan(suite: Suite) -> list[Cell]:
    """The suite's cells, checked; in the order they will be tried (see :func:`_order`)."""

    cells = []
    for number, cfg in enumerate(suite.cells, 1):
        cell = Cell(number, cfg, cell_id(cfg))
        try:
            validate(cfg)
        except UserError as e:
            cell.invalid = str(e)
        cells.append(cell)
    return _order(cells)


def _order(cells: list[Cell]) -> list[Cell]:
    """The first cell that needs each teacher goes first (it trains and caches the teacher),
    then cells that need no teacher (they run while the teacher trains), then the rest."""
    first, teacherless, rest, seen = [], [], [], set()
    for cell in cells:
        key = (cell.cfg.teacher, cell.cfg.dataset)
        if not cell.cfg.teacher:
            teacherless.append(cell)
        elif key not in seen:
            seen.add(key)
            first.append(cell)
        else:
            rest.append(cell)
    return first + teacherless + rest


def run_suite(suite: Suite, jobs: int = 1, dry_run: bool = False, console=None, stop=None,
              threads: int | None = None) -> int:
    """Run the suite; returns the exit code (0 all complete, 3 some cells failed, 130/143 stopped).

    Every cell computes with ``threads`` intra-op threads (default: the machine's cores), however
    many run at once: the thread count changes float summation order and so the digits, and a
    cell's result must not depend on ``jobs``.
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    stop = stop if stop is not None else StopFlag()
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    threads = _cores() if threads is None else threads
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    cells = plan(suite)
    if dry_run:
        _print_plan(cells, suite, wide_console())
        return 0
    try:
        Path(suite.output).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the suite's output folder {suite.output!r} ({e.strerror}); pass a writable --output DIR") from None
    done = sum(c.run_dir().is_complete() for c in cells)
    console.print(f"[bold]suite {suite.name}[/]: {len(cells)} cells, {done} already complete; output {suite.output}"
                  + (f"; {jobs} parallel jobs" if jobs > 1 else ""))
    if jobs * threads > _cores():
        console.print(f"[yellow]note:[/] {jobs} cells × {threads} threads share {_cores()} cores; each cell keeps "
                      f"{threads} threads so its figures do not depend on --jobs (pass --threads 1 to trade "
                      "figures comparable with single-job runs for speed)")
    Scheduler(suite, jobs, threads, console, stop).run(cells)
    _print_leaderboard(suite, cells)
    failed = [c for c in cells if c.state == "failed"]
    if stop:
        console.print(f"stopped by {stop.signal_name}; run the same `kdzoo bench` again to run the missing cells")
        return 143 if stop.signal_name == "SIGTERM" else 130
    if failed:
        console.print(f"[red]{len(failed)} of {len(cells)} cells failed[/]; their errors are above and in "
                      f"{Path(suite.output) / 'bench-status'}/")
        return EXIT_FAILED_CELLS
    return 0


class Scheduler:
    """Start cells as slots free up, one lock per cell; in this process when ``jobs == 1``."""

    def __init__(self, suite: Suite, jobs: int, threads: int, console, stop):
        self.suite, self.jobs, self.threads, self.console, self.stop = suite, jobs, threads, console, stop
        self.running: dict[int, tuple[subprocess.Popen, Cell, int, str]] = {}  # slot -> (process, cell, lock fd, attempt)
        self.total = 0
        self.waiting_noted: set[str] = set()
        self.gpus = _gpus() if jobs > 1 else []

    def run(self, cells: list[Cell]) -> None:
        self.total = len(cells)
        pending = deque(cells)
        try:
            while (pending or self.running) and not self.stop:
                started = False
                for _ in range(len(pending)):
                    if len(self.running) >= self.jobs or self.stop:
                        break
                    started |= self._try_start(pending)
                self._reap()
                if not started and (pending or self.running):
                    time.sleep(0.2)
            self._stop_running()
        except KeyboardInterrupt:  # a second signal: the children stop at once too
            self._stop_running(again=True)
            raise

    def _try_start(self, pending: deque) -> bool:
        cell = pending.popleft()
        if cell.invalid:
            self._record_invalid(cell)
            return True
        lock = status_path(self.suite.output, cell.run_id, ".lock")
        fd = try_lock(lock)
        if fd is None:  # another bench runs this cell now: try again later
            if cell.run_id not in self.waiting_noted:
                self.waiting_noted.add(cell.run_id)
                self.console.print(f"[{cell.number}/{self.total}] {cell.label}: another process is running it; waiting")
            pending.append(cell)
            return False
        run_dir = cell.run_dir()
        if run_dir.is_complete():
            unlock(fd)
            cell.state, cell.result = "skipped", run_dir.read_result()
            self.console.print(f"[{cell.number}/{self.total}] {cell.label}: complete, skipped")
            return True
        resuming = " (resuming)" if run_dir.last.is_file() else ""
        cell.extra["started"] = time.monotonic()
        self.console.print(f"[bold][{cell.number}/{self.total}] {cell.label}[/]{resuming} → {run_dir.path}")
        if self.jobs == 1:
            before = torch.get_num_threads()
            torch.set_num_threads(self.threads)  # as a subprocess cell would (see run_suite)
            try:
                run_cell(cell, self.suite.name, self.stop, self.console)
            finally:
                torch.set_num_threads(before)
                unlock(fd)
            self._report(cell)
        else:
            self._spawn(cell, fd)
        return True

    def _record_invalid(self, cell: Cell) -> None:
        write_status(cell.cfg, cell.run_id, cell.run_id, "failed", self.suite.name, uuid.uuid4().hex, time.time(), cell.invalid)
        cell.state, cell.error = "failed", cell.invalid
        self._report(cell)

    def _report(self, cell: Cell) -> None:
        prefix = f"[{cell.number}/{self.total}] {cell.label}:"
        if cell.state == "complete" and cell.result:
            r = cell.result
            elapsed = time.monotonic() - cell.extra.get("started", time.monotonic())
            task = get_task(r.get("task", "cls"))
            self.console.print(f"{prefix} [green]done[/] {task.label} {r[task.score]:.2f}% in {elapsed:.0f} s")
        elif cell.state == "failed":
            self.console.print(f"{prefix} [red]failed[/]: {cell.error}", soft_wrap=True)
        elif cell.state == "interrupted":
            self.console.print(f"{prefix} [yellow]interrupted[/]; its last.pt is kept for the next bench")

    # -- subprocesses --------------------------------------------------------------------------
    def _spawn(self, cell: Cell, fd: int) -> None:
        slot = min(set(range(self.jobs)) - set(self.running))
        attempt = uuid.uuid4().hex
        payload = {"cell": cell.cfg.to_dict(), "run_id": cell.run_id, "number": cell.number, "suite": self.suite.name,
                   "plugins": self.suite.plugins, "attempt": attempt, "threads": self.threads}
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        if self.gpus and cell.cfg.device != "cpu":
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot % len(self.gpus)]
        log_path = status_path(self.suite.output, cell.run_id, ".log")
        with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
            process = subprocess.Popen([sys.executable, "-m", "kdzoo.bench.runner", json.dumps(payload)], stdout=log,
                                       stderr=subprocess.STDOUT, env=env, start_new_session=True)
        cell.extra["log"] = str(log_path)
        self.running[slot] = (process, cell, fd, attempt)

    def _reap(self) -> None:
        for slot, (process, cell, fd, attempt) in list(self.running.items()):
            code = process.poll()
            if code is None:
                continue
            del self.running[slot]
            unlock(fd)
            record = read_status(status_path(self.suite.output, cell.run_id))
            if record is not None and record.get("attempt") == attempt:
                cell.state, cell.error = record["state"], record.get("error")
            else:  # it died before it could write its record: stopped early, or killed
                cell.state = "interrupted" if self.stop else "failed"
                cell.error = f"the cell's process exited with code {code} without a record; see {cell.extra['log']}"
                write_status(cell.cfg, cell.run_id, cell.run_dir().path.name, cell.state, self.suite.name, attempt,
                             time.time(), cell.error)
            if cell.state == "complete":
                cell.result = cell.run_dir().read_result()
            self._report(cell)

    def _stop_running(self, again: bool = False) -> None:
        """Pass the stop on to running cells and wait for them to save ``last.pt`` and exit."""
        if not self.running:
            return
        sig = signal.SIGTERM if self.stop.signal_name == "SIGTERM" else signal.SIGINT
        for process, *_ in self.running.values():
            if process.poll() is None:
                process.send_signal(sig)
        deadline = time.monotonic() + (10 if again else 600)
        while self.running and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.2)
        for process, *_ in self.running.values():  # did not stop in time
            process.kill()
        for process, *_ in self.running.values():
            process.wait()
        self._reap()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _gpus() -> list[str]:
    """The CUDA devices to spread cells over (as CUDA_VISIBLE_DEVICES entries)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no usable CUDA: CPU jobs
        return []


# -- output ------------------------------------------------------------------------------------
def _print_plan(cells: list[Cell], suite: Suite, console) -> None:
    from rich.table import Table

    table = Table(title=f"suite {suite.name}: {len(cells)} cells → {suite.output} (dry run: nothing is trained)")
    cached = any(c.cfg.teacher_cache for c in cells)
    for column in ("#", "method", "teacher", "student", "dataset", "seed", *(["cache"] if cached else []), "state", "run id"):
        table.add_column(column, overflow="fold")
    for cell in cells:
        run_dir = cell.run_dir()
        if cell.invalid:
            state = f"[red]invalid: {cell.invalid}[/]"
        elif run_dir.is_complete():
            state = "complete"
        else:
            state = "resume" if run_dir.last.is_file() else "to run"
        c = cell.cfg
        cache = (["yes" if c.teacher_cache else "-"] if cached else [])
        table.add_row(str(cell.number), c.method, c.teacher or "-", c.model, c.dataset, str(c.seed), *cache, state,
                      cell.run_id)
    console.print(table)


def _print_leaderboard(suite: Suite, cells: list[Cell]) -> None:
    folders = {c.run_dir().path.name for c in cells}
    entries, _ = lb.collect(suite.output)
    entries = [e for e in entries if Path(e.folder).name in folders and len(Path(e.folder).parts) == 1]
    if not entries:
        return
    board, errors = lb.build(entries), lb.failures(entries)
    console = lb.wide_console()
    lb.print_table(board, errors, console, f"suite {suite.name}")
    stem = Path(suite.output) / f"leaderboard-{suite.name}"
    lb.export(board, errors, f"{stem}.csv", f"{stem}.md")
    saved = cache_savings([c.result for c in cells if c.result])
    if saved:
        console.print(saved)


def cache_savings(results: list[dict]) -> str | None:
    """One line on what --teacher-cache saved over the suite's cells that used it, or None.

    The time saved is each cell's hits times the teacher's time per image measured on its own
    misses; a cell with no misses (a fully warm cache) is costed at the median of the others."""
    stats = [r["teacher_cache"] for r in results if r.get("teacher_cache")]
    if not stats:
        return None
    hits, misses = sum(s["hits"] for s in stats), sum(s["misses"] for s in stats)
    rates = sorted(s["teacher_seconds"] / s["misses"] for s in stats if s["misses"])
    per_image = rates[len(rates) // 2] if rates else None
    spent = sum(s["teacher_seconds"] for s in stats)
    line = (f"teacher cache: {len(stats)} cell(s) used it; {hits:,} of {hits + misses:,} teacher outputs "
            f"({100 * hits / max(1, hits + misses):.1f} %) came from the cache")
    if per_image is not None:
        line += f"; teacher time saved ≈ {hits * per_image:,.0f} s, spent filling it {spent:,.0f} s"
    return line


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
