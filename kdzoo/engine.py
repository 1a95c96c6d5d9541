"""The one training loop every method runs in.

The loop knows nothing about any method: it builds the batch (``method.prepare_batch``), runs
the student and, under ``no_grad`` in eval mode, the teacher with their taps hooked, hands
the outputs to ``method.loss`` and optimises the sum of the terms it returns. Checkpoints
are written atomically every epoch and on SIGINT/SIGTERM, and carry the RNG state and the
position inside the epoch, so ``--resume`` continues exactly where a run stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed
from .build import create_network, identify, load_data, resolve_device, validate
from .checkpoint import read_checkpoint
from .config import RunConfig, recipe_hash
from .errors import UserError
from .hooks import FeatureTaps
from .inputs import Inputs
from .loggers import Loggers, open_loggers
from .method import Method
from .models import model_info, parameter_count
from .optim import build_optimizer, build_scheduler, split_method_groups
from .progress import Status, Throughput, TrainingProgress
from .runs import RunDir, command_line, git_commit, machine, versions
from .step import StepParts, TrainStep, prepare_networks
from .tasks import get_task, metric_columns
from .teacher import near_chance, obtain_teacher
from .stem import has_small_stem
from .teacher_cache import open_cache

CHECKPOINT_FORMAT = "kdzoo-checkpoint-v1"


class Interrupted(Exception):
    """The run was asked to stop (SIGINT/SIGTERM); a checkpoint has been written."""

    def __init__(self, message: str, signal_name: str | None = None):
        super().__init__(message)
        # the shell's code for the signal; "terminated" when another DDP process got it
        self.exit_code = 130 if signal_name == "SIGINT" else 143


class NonFiniteLoss(UserError):
    """A loss term or a weight became NaN or Inf; the last finite checkpoint is kept."""

    def __init__(self, message: str, step: int, what: str):
        super().__init__(message)
        self.step, self.what = step, what


@dataclass
class StopFlag:
    """Set by signal handlers; the loop checks it between steps."""

    signal_name: str | None = None

    def __bool__(self) -> bool:
        return self.signal_name is not None


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag):
    """SIGINT/SIGTERM set ``flag`` instead of killing the process mid-write.

    The same signal twice (a second Ctrl-C) stops at once. A different one does not: after a
    Ctrl-C in a terminal, torchrun forwards a SIGTERM to its workers, which are already saving.
    """
    def handler(signum, frame):
        name = signal.Signals(signum).name
        if flag and flag.signal_name == name:  # asked twice: stop now
            raise KeyboardInterrupt
        flag.signal_name = flag.signal_name or name

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not in the main thread
            pass
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


@dataclass
class Context:
    """Everything one run is made of, built once by :func:`build`."""

    cfg: RunConfig
    method: Method
    method_config: Any
    student: nn.Module
    teacher: nn.Module | None
    teacher_score: float | None  # the teacher's test top-1 (cls) or mIoU (seg)
    teacher_source: str | None
    data: Any
    device: torch.device
    run_dir: RunDir
    extras: dict = field(default_factory=dict)


def build(cfg: RunConfig, resume: bool, console, stop: StopFlag | None = None, search_stopped: bool = False) -> Context:
    """The run's method, data, networks and folder, from its settings (checked first)."""
    method = validate(cfg)
    method_cls, method_config = type(method), method.config
    if not method_cls.needs_teacher and cfg.teacher:
        console.print(f"[yellow]note:[/] method {cfg.method!r} uses no teacher; ignoring --teacher {cfg.teacher}")
        cfg = dataclasses.replace(cfg, teacher=None, teacher_checkpoint=None, teacher_pretrained=False)
    recipe = cfg.recipe_record()  # which fields the flags took from the named recipe, before defaults fill them
    cfg = identify(cfg)
    device = resolve_device(cfg.device)
    # rank 0 picks the folder (a fresh name is the first free one: ranks must not race for it)
    run_dir = RunDir(distributed.on_main(lambda: RunDir.for_run(cfg.output, cfg.run_id(), resume).path),
                     writer=distributed.is_main())
    if resume:
        distributed.on_main(lambda: check_resumed_settings(cfg, method_config, run_dir, search_stopped))

    data = load_data(cfg, device)

    # The student is built and probed before a teacher is trained, so an input size the
    # student cannot take fails at once rather than after the teacher's training.
    torch.manual_seed(cfg.seed)  # the student's init depends on the seed alone, not on teacher sourcing
    student = create_network(cfg, cfg.model, data, cfg.pretrained).to(device)
    s_info = model_info(student, cfg.model, data.num_classes, data.input_size, method.taps.student, data.train)
    after_student = torch.get_rng_state()

    teacher, teacher_score, teacher_source = None, None, None
    if cfg.teacher:
        teacher, teacher_score, teacher_source = obtain_teacher(cfg, data, device, console, run, stop)
        # Training a teacher here draws random numbers that reading it from the cache does not:
        # rewind, so that the method's own modules (NFD's and CCD's adapters, ...) start the same
        # either way and the first and the second call of one command give one result.
        torch.set_rng_state(after_student)
    t_info = (model_info(teacher, cfg.teacher, data.num_classes, data.input_size, method.taps.teacher, data.train)
              if teacher is not None else None)
    if t_info is not None and t_info.shapes["logits"] != s_info.shapes["logits"]:
        raise UserError(
            f"teacher {cfg.teacher} outputs {t_info.shapes['logits'][0]} classes but the student {s_info.shapes['logits'][0]}; "
            "use a teacher trained on the same dataset"
        )
    method.setup(s_info, t_info)
    method.to(device)
    return Context(cfg, method, method_config, student, teacher, teacher_score, teacher_source, data, device, run_dir,
                   {"student_info": s_info, "teacher_info": t_info, "recipe": recipe})


# what may differ between a run and its --resume: where it runs and how it is named, not what it computes
RESUME_MAY_CHANGE = frozenset(RunConfig._NON_RESULT) | {"method_settings"}  # method settings: compared resolved


def check_resumed_settings(cfg: RunConfig, method_config, run_dir: RunDir, search_stopped: bool = False) -> None:
    """``--resume`` continues exactly the recorded run: refuse settings that differ from its record.

    Continuing with another lr (say) would train on with a mix of both and file the result under
    the new settings. When this command names no existing run (its settings give another run id),
    a stopped run of the same method, networks, data and seed is searched for, so the message can
    say which settings made the difference instead of silently starting afresh.
    """
    given = {"run": cfg.to_dict(), "method_config": dataclasses.asdict(method_config)}
    if run_dir.path.is_dir():
        recorded = _read_record(run_dir.path)
        if recorded is not None:
            differences = _differences(recorded, given)
            if differences:
                raise UserError(f"--resume continues {run_dir.path.name} exactly as recorded, but "
                                f"{'; '.join(differences)}; drop those flags (or start a new run without --resume)")
        return
    if not search_stopped or cfg.run_name:
        return
    prefix = cfg.run_id().rsplit("_", 1)[0] + "_"
    output = Path(cfg.output)
    stopped = sorted(p for p in output.glob(f"{prefix}*") if p.is_dir() and not (p / "result.json").exists()
                     and _read_record(p) is not None) if output.is_dir() else []
    for path in stopped:
        differences = _differences(_read_record(path), given)
        if differences:
            raise UserError(f"--resume found no run with these settings; the stopped run {path.name} differs: "
                            f"{'; '.join(differences)}; resume it with its own settings (or drop --resume for a new run)")


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("run"), dict) else None


def _differences(recorded: dict, given: dict) -> list[str]:
    """Each setting that changes a result and differs, as 'key: recorded X, given Y'."""
    out = []
    for section, label in (("run", ""), ("method_config", "method setting ")):
        old, new = recorded.get(section) or {}, given[section]
        for key in sorted(set(old) | set(new)):
            if section == "run" and key in RESUME_MAY_CHANGE:
                continue
            if _plain(old.get(key)) != _plain(new.get(key)):
                out.append(f"{label}{key}: recorded {old.get(key)!r}, given {new.get(key)!r}")
    return out


def _plain(value):
    """A value as config.json holds it (tuples are lists there)."""
    return json.loads(json.dumps(value, default=str))


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def run(cfg: RunConfig, resume: bool = False, console=None, stop: StopFlag | None = None,
        search_stopped: bool = False) -> dict[str, Any]:
    """Train one run to completion (or resume it) and return its ``result.json`` content.

    ``search_stopped``: a user's ``--resume`` whose settings name no existing run is refused when
    a stopped run of the same method, networks, data and seed exists (see check_resumed_settings).
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    stop = stop if stop is not None else StopFlag()
    ctx = build(cfg, resume, console, stop, search_stopped)
    with ctx.run_dir.lock():  # one process at a time in a run folder; a second gets exit 2 (kdzoo/runs.py)
        if distributed.on_main(ctx.run_dir.is_complete):
            console.print(f"run {ctx.run_dir.path} is already complete; not training again")
            return distributed.on_main(ctx.run_dir.read_result)
        return Trainer(ctx, console, stop).fit(resume)


class Trainer:
    def __init__(self, ctx: Context, console, stop: StopFlag):
        self.ctx, self.console, self.stop = ctx, console, stop
        cfg, device = ctx.cfg, ctx.device
        self.cfg, self.device = cfg, device
        self.task = get_task(cfg.task)
        self.student, self.teacher, self.method = ctx.student, ctx.teacher, ctx.method
        self.channels_last = cfg.channels_last
        prepare_networks(self.student, self.teacher, self.method, self.channels_last, device)
        student_params = [p for p in self.student.parameters() if p.requires_grad]
        try:
            plain, groups = split_method_groups(self.method, student_params)
        except ValueError as e:
            raise UserError(f"{e}; fix the method's param_groups()") from None
        self.world = distributed.world_size()
        self.optimizer = build_optimizer(plain, cfg, groups)
        self.steps_per_epoch = len(ctx.data.train)
        self.scheduler = build_scheduler(self.optimizer, self.steps_per_epoch, cfg)
        self.inputs = Inputs(ctx.data.mean, ctx.data.std, device, cfg.amp, cfg.channels_last)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_score, self.best_epoch = -1.0, -1  # best test top-1 (cls) or mIoU (seg)
        self.rows: list[dict[str, Any]] = []
        self.sums: dict[str, float] = {}
        self.meter = Throughput()  # steady img/s: the first steps of each process are warm-up (kdzoo/progress.py)
        self.progress = TrainingProgress(console)  # the rich bar on a terminal, plain lines in a log
        self.loggers = Loggers()  # --log: opened by fit, on rank 0 only
        # --teacher-cache: every rank reads the whole cache and writes its own new rows
        self.teacher_cache = (open_cache(cfg.output, self._teacher_name(), self.teacher, ctx.data, self.inputs,
                                         name=f"{ctx.run_dir.path.name}-r{distributed.rank()}")
                              if cfg.teacher_cache and self.teacher is not None else None)

    # -- checkpoints -------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "student": self.student.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "best_score": self.best_score, "best_epoch": self.best_epoch,
            "rows": self.rows, "sums": self.sums,
            **self.meter.state(),  # train_seconds, images_seen and the steady rate's counts
            "rng": _rng_state(self.device),
            "rng_ranks": distributed.gather(_rng_state(self.device)),  # each process its own stream
            "model": self.cfg.model, "method_name": self.cfg.method,
        }

    def save_last(self) -> None:
        """Called on every rank (the RNG states are gathered); only rank 0 writes."""
        self.ctx.run_dir.save_checkpoint("last.pt", self._state())

    def _load(self, path) -> None:
        state = distributed.on_main(lambda: read_checkpoint(path, "checkpoint"))
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{path} is not a kdzoo training checkpoint; delete it or start without --resume")
        try:
            self.student.load_state_dict(state["student"])
            self.method.load_state_dict(state["method"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"checkpoint {path} does not match this run's model or method ({str(e).splitlines()[0][:160]}); "
                            "resume with the same settings or start a new run") from None
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.rows, self.sums = list(state["rows"]), dict(state["sums"])
        self.meter.load(state, self.global_step)
        rng_ranks = state.get("rng_ranks") or [state["rng"]]
        if len(rng_ranks) == self.world:
            _set_rng_state(rng_ranks[distributed.rank()], self.device)
        else:  # a different process count cannot continue the same random streams
            self.console.print(f"[yellow]note:[/] {path} was written by {len(rng_ranks)} process(es), this run has "
                               f"{self.world}: the data order is the same but augmentation draws differ from an uninterrupted run")
            torch.manual_seed(self.cfg.seed + 1 + 1000 * distributed.rank() + self.global_step)

    # -- the loop ----------------------------------------------------------------------
    def fit(self, resume: bool) -> dict[str, Any]:
        ctx, cfg = self.ctx, self.cfg
        run_dir = ctx.run_dir
        run_dir.create()
        if resume and distributed.on_main(run_dir.last.is_file):
            self._load(run_dir.last)
            self.console.print(f"resuming {run_dir.path.name} at epoch {self.epoch + 1}, step {self.step_in_epoch}")
        else:
            torch.manual_seed(cfg.seed + 1 + 1000 * distributed.rank())  # rank 0: the single-process stream
        record = self._config_record()
        run_dir.write_config(record)
        self.loggers = open_loggers(cfg.log, run_dir.path, record, self.global_step if resume else None,
                                    enabled=distributed.is_main())
        start = time.perf_counter()
        handles = self.method.install(self.student, self.teacher)
        try:
            with FeatureTaps(self.student, self.method.taps.student) as s_taps, \
                    (FeatureTaps(self.teacher, self.method.taps.teacher) if self.teacher is not None else contextlib.nullcontext()) as t_taps:
                self.s_taps, self.t_taps = s_taps, t_taps
                self.train_step = self._train_step(s_taps, t_taps)
                # an epoch whose steps are all done but which was not closed (a stop at its last step,
                # checkpointed before the evaluation) is closed on resume: step_in_epoch > 0
                while self.epoch < cfg.epochs and (self.global_step < self.total_steps or self.step_in_epoch > 0):
                    self._train_epoch()
                    self._end_epoch()
        except NonFiniteLoss as e:
            run_dir.write_failure({"state": "failed", "error": str(e), "step": e.step, "non_finite": e.what,
                                   "last_checkpoint": run_dir.last.name if distributed.on_main(run_dir.last.is_file) else None})
            raise
        except torch.OutOfMemoryError:
            raise UserError(
                f"out of memory on {self.device} at --batch-size {cfg.batch_size} ({cfg.model}"
                f"{' + ' + cfg.teacher if cfg.teacher else ''}, {cfg.method}); pass a smaller --batch-size "
                f"(e.g. {max(1, cfg.batch_size // 2)}) or keep --amp on; the last good checkpoint is {run_dir.last}"
            ) from None
        finally:
            for handle in handles:
                handle.remove()
            self.loggers.close()  # a stopped or failed run keeps what it logged
        result = self._finish(time.perf_counter() - start)
        distributed.barrier()  # the files rank 0 wrote are complete before any rank reads them
        return result

    def _train_epoch(self) -> None:
        cfg, loader = self.cfg, self.ctx.data.train
        loader.set_epoch(self.epoch)
        self.student.train()
        self.method.train()
        steps_this_epoch = min(self.steps_per_epoch, self.total_steps - self.global_step + self.step_in_epoch)
        sync = self.device.type == "cuda"
        pending: dict[str, Tensor] = {}
        meter = self.meter
        with self.progress.epoch(self.epoch + 1, cfg.epochs, steps_this_epoch, self.step_in_epoch) as show:
            meter.start()
            steps_at_flush = self.sums.get("_steps", 0)
            for images, targets, index in loader.batches(skip=self.step_in_epoch):
                if self.step_in_epoch >= steps_this_epoch:
                    break
                terms, n_images = self._step(images, targets, index)
                for name, value in terms.items():
                    pending[name] = pending.get(name, 0) + value
                self.sums["_steps"] = self.sums.get("_steps", 0) + 1
                self.step_in_epoch += 1
                self.global_step += 1
                warmed_up = meter.add_step(n_images)
                last = self.step_in_epoch >= steps_this_epoch
                # a signal is acted on at once in one process; under DDP at the next flush, where all
                # processes agree on it (one rank stopping alone would hang the others)
                stopping = False
                if self.global_step % 10 == 0 or last or (self.stop and self.world == 1):
                    interval = {n: v for n, v in self.sums.items() if not n.startswith("_")}
                    stopping = self._flush(pending)  # one host sync per 10 steps
                    if sync:
                        torch.cuda.synchronize(self.device)
                    meter.read()
                    steps = max(1, self.sums["_steps"])
                    status = Status(self.epoch + 1, cfg.epochs, self.step_in_epoch, steps_this_epoch, self.global_step,
                                    self.total_steps, {k: v / steps for k, v in self.sums.items() if not k.startswith("_")},
                                    meter.img_per_s(), meter.seconds_per_step())
                    show(status)
                    # the loss terms of the steps since the last flush (not the epoch's running mean)
                    since = max(1, self.sums["_steps"] - steps_at_flush)
                    steps_at_flush = self.sums["_steps"]
                    self.loggers.log_scalars(self.global_step, {
                        **{f"train/{k}": (v - interval.get(k, 0.0)) / since for k, v in self.sums.items() if not k.startswith("_")},
                        "train/lr": self.optimizer.param_groups[0]["lr"], "train/img_per_s": meter.img_per_s(),
                    })
                elif warmed_up:  # the steady rate starts here: read the clock once the device is done
                    if sync:
                        torch.cuda.synchronize(self.device)
                    meter.read()
                if stopping:
                    self.save_last()
                    raise Interrupted(
                        f"stopped by {self.stop.signal_name or 'a signal to another process'} at epoch {self.epoch + 1}, step {self.step_in_epoch}; "
                        f"checkpoint saved to {self.ctx.run_dir.last}; continue with the same command plus --resume",
                        self.stop.signal_name,
                    )

    def _flush(self, pending: dict[str, Tensor]) -> bool:
        """Add the pending loss terms to the epoch sums and check them; True when a stop was asked.

        Under DDP the terms are averaged over processes (counts such as ``_correct`` summed) in
        the same collective that tells every process whether any of them received a signal.
        """
        names = list(pending)
        values = torch.stack([torch.as_tensor(pending[n], dtype=torch.float32, device=self.device) for n in names]
                             + [torch.tensor(1.0 if self.stop else 0.0, device=self.device)])
        if self.world > 1:
            distributed.all_reduce_sum(values)
            means = torch.tensor([not n.startswith("_") for n in names] + [False], device=self.device)
            values = torch.where(means, values / self.world, values)
        *values, stop_votes = values.tolist()
        pending.clear()
        for name, value in zip(names, values):
            if not math.isfinite(value):
                raise NonFiniteLoss(
                    f"loss term {name!r} became {value} by step {self.global_step} (epoch {self.epoch + 1}); "
                    f"{self._kept()}; lower --lr, or the weight of {name!r} if the method has one (--set)",
                    self.global_step, f"loss term {name}")
            self.sums[name] = self.sums.get(name, 0.0) + value
        return stop_votes > 0

    def _train_step(self, s_taps: FeatureTaps, t_taps: FeatureTaps | None) -> TrainStep:
        """The shared step (kdzoo.step), built once the hooks are in place, so --compile traces them."""
        return TrainStep(StepParts(
            self.student, self.teacher, self.method, s_taps, t_taps, self.optimizer, self.scheduler, self.inputs,
            self.ctx.data.augment, self.task.train_hits, compile="inductor" if self.cfg.compile else None,
            teacher_cache=self.teacher_cache,
        ))

    def _teacher_name(self) -> str:
        """The teacher's architecture as the cache names it: the model and its stem."""
        return f"{self.cfg.teacher}{'_smallstem' if has_small_stem(self.teacher) else ''}"

    def _step(self, images: Tensor, targets: Tensor, index: Tensor) -> tuple[dict[str, Tensor], int]:
        terms, n_images = self.train_step(images, targets, index, self.epoch, self.global_step,
                                          self.global_step / max(1, self.total_steps))
        return terms, n_images * self.world  # images over all processes

    def _kept(self) -> str:
        """Which checkpoint survives a stop for non-finite values (only an existing file is named)."""
        last = self.ctx.run_dir.last
        if distributed.on_main(last.is_file):
            return f"the run is recorded as failed; its last finite checkpoint is {last}"
        return "the run is recorded as failed; no checkpoint was written (it diverged in its first epoch)"

    def _check_weights(self) -> None:
        """Before anything is evaluated or saved: every trainable weight is finite (one host sync)."""
        named = [*self.student.named_parameters(), *self.method.named_parameters(prefix="method")]
        finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named]).tolist() if named else []
        bad = [name for (name, _), ok in zip(named, finite) if not ok]
        if bad:
            raise NonFiniteLoss(
                f"{len(bad)} weight tensor(s) became NaN or Inf by step {self.global_step} (first: {bad[0]}); "
                f"{self._kept()}; lower --lr or check --momentum and the method's settings",
                self.global_step, f"weight {bad[0]}")

    def _end_epoch(self) -> None:
        cfg, data = self.cfg, self.ctx.data
        self._check_weights()
        distributed.sync_buffers(self.student, self.method)  # evaluate and save rank 0's model
        metrics = self.task.evaluate(self.student, data, self.inputs)
        self.s_taps.pop()
        steps = max(1, self.sums.get("_steps", 0))
        row: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.global_step, "lr": self.optimizer.param_groups[0]["lr"]}
        row["train_loss"] = self.sums.get("loss", float("nan")) / steps
        for name, value in self.sums.items():
            if not name.startswith("_") and name != "loss":
                row[f"train_{name}"] = value / steps
        row[f"train_{self.task.train_metric}"] = 100 * self.sums.get("_correct", 0) / max(1, self.sums.get("_counted", 1))
        row.update(metric_columns(metrics, data.class_names))
        row["img_per_s"] = self.meter.img_per_s()  # steady: warm-up steps left out (kdzoo/progress.py)
        self.rows.append(row)
        self.loggers.log_scalars(self.global_step, {f"epoch/{k}": v for k, v in row.items() if k != "step"})
        self.loggers.flush()  # a run killed later keeps its epochs' values
        self.console.print(
            f"epoch {self.epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.4f}  "
            f"test {self.task.headline(metrics)}  {row['img_per_s']:.0f} img/s"
        )
        score = metrics[self.task.score]
        improved = score > self.best_score
        if improved:
            self.best_score, self.best_epoch = score, self.epoch + 1
        if self.teacher_cache is not None:
            self.teacher_cache.flush(f"e{self.epoch + 1}")
        self.epoch += 1
        self.step_in_epoch = 0
        self.sums = {}
        self.ctx.run_dir.write_metrics(self.rows)
        self.save_last()
        if improved:
            self.ctx.run_dir.save_checkpoint("best.pt", {
                "format": CHECKPOINT_FORMAT + "-weights", "student": self.student.state_dict(),
                "method": self.method.state_dict(), "epoch": self.epoch, self.task.score: score, "model": cfg.model,
            })

    def _config_record(self) -> dict[str, Any]:
        ctx = self.ctx
        return {
            "run": self.cfg.to_dict(),
            "method_config": dataclasses.asdict(ctx.method_config),
            "recipe_hash": self._recipe_hash(),
            "teacher_source": ctx.teacher_source,
            "recipe": ctx.extras.get("recipe"),
            "data": {"num_classes": ctx.data.num_classes, "input_size": ctx.data.input_size,
                     "mean": list(ctx.data.mean), "std": list(ctx.data.std),  # what `kdzoo export` records
                     "train_images": len(ctx.data.train) * self.cfg.batch_size, "augment": repr(ctx.data.augment)},
            "versions": versions(), "machine": machine(), "git_commit": git_commit(), "command": command_line(),
            "world_size": self.world,
        }

    def _recipe_hash(self) -> str:
        """The run's :func:`kdzoo.config.recipe_hash`: never averaged with a different recipe."""
        return recipe_hash(self.cfg.to_dict(), dataclasses.asdict(self.ctx.method_config), versions())

    def _finish(self, wall: float) -> dict[str, Any]:
        last = self.rows[-1]
        params = parameter_count(self.student)
        result = {
            "run_id": self.ctx.run_dir.path.name, "complete": True,
            "method": self.cfg.method, "model": self.cfg.model, "teacher": self.cfg.teacher,
            "dataset": self.cfg.dataset, "task": self.cfg.task, "seed": self.cfg.seed,
            "epochs": self.epoch, "steps": self.global_step,
            **self.task.result_fields(last, self.ctx.data.class_names),
            f"best_{self.task.score}": self.best_score, "best_epoch": self.best_epoch,
            f"teacher_{self.task.score}": self.ctx.teacher_score,
            "teacher_near_chance": (near_chance(self.task.name, self.ctx.teacher_score, self.ctx.data.num_classes)
                                    if self.cfg.teacher else None),
            "final_train_loss": last["train_loss"],
            "params_m": params / 1e6, "extra_params_m": self.method.extra_parameter_count() / 1e6,
            # steady rate: the first steps of each process are warm-up and left out (kdzoo/progress.py)
            "train_img_per_s": self.meter.img_per_s(),
            "ms_per_step": 1000 * (self.meter.seconds_per_step() or 0.0),
            "peak_mem_mb": _peak_memory_mb(self.device), "device": str(self.device), "machine": machine(),
            "wall_time_s": wall, "train_time_s": self.meter.seconds, "world_size": self.world,
            "recipe_hash": self._recipe_hash(),
            "teacher_cache": self.teacher_cache.stats() if self.teacher_cache is not None else None,
        }
        self.ctx.run_dir.write_result(result)
        return result
