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
import math
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import read_checkpoint, save_checkpoint
from .config import RunConfig, hash_recipe
from .data import DataRequest, get_dataset
from .data.loaders import to_float
from .errors import UserError
from .hooks import FeatureTaps
from .method import Method, NetOutputs, StepOutputs
from .models import check_model_name, create_model, model_info, parameter_count
from .optim import build_optimizer, build_scheduler
from .registry import get_method
from .runs import RunDir, command_line, git_commit, versions
from .settings import apply_overrides
from .tasks import get_task

CHECKPOINT_FORMAT = "kdzoo-checkpoint-v1"


class Interrupted(Exception):
    """The run was asked to stop (SIGINT/SIGTERM); a checkpoint has been written."""


class NonFiniteLoss(UserError):
    """A loss term became NaN or Inf; the last good checkpoint is kept."""


@dataclass
class StopFlag:
    """Set by signal handlers; the loop checks it between steps."""

    signal_name: str | None = None

    def __bool__(self) -> bool:
        return self.signal_name is not None


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag):
    """SIGINT/SIGTERM set ``flag`` instead of killing the process mid-write."""
    def handler(signum, frame):
        if flag:  # a second signal: stop now
            raise KeyboardInterrupt
        flag.signal_name = signal.Signals(signum).name

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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


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


def validate(cfg: RunConfig) -> Method:
    """Check every name and setting before any work starts (all errors are UserErrors).

    Returns the method, built from its validated settings (its constructor checks their values).
    """
    method_cls = get_method(cfg.method)
    get_task(cfg.task)
    if cfg.task not in method_cls.tasks:
        raise UserError(f"method {cfg.method!r} supports task(s) {', '.join(method_cls.tasks)}, not {cfg.task!r}")
    settings = {**method_cls.task_defaults.get(cfg.task, {}), **cfg.method_settings}
    method_config = apply_overrides(method_cls.Config(), settings, f"method {method_cls.name!r}")
    get_dataset(cfg.dataset, cfg.task)
    check_model_name(cfg.model)
    if method_cls.needs_teacher:
        if not cfg.teacher:
            raise UserError(f"method {cfg.method!r} needs a teacher: add --teacher MODEL (e.g. --teacher resnet34)")
        check_model_name(cfg.teacher)
    for key in ("epochs", "batch_size"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {value}")
    return method_cls(method_config)


def build(cfg: RunConfig, resume: bool, console, stop: StopFlag | None = None) -> Context:
    from .teacher import obtain_teacher

    method = validate(cfg)
    method_cls, method_config = type(method), method.config
    if not method_cls.needs_teacher and cfg.teacher:
        console.print(f"[yellow]note:[/] method {cfg.method!r} uses no teacher; ignoring --teacher {cfg.teacher}")
        cfg = dataclasses.replace(cfg, teacher=None, teacher_checkpoint=None, teacher_pretrained=False)
    cfg = cfg.resolved()
    device = resolve_device(cfg.device)
    run_dir = RunDir.for_run(cfg.output, cfg.run_id(), resume)

    spec = get_dataset(cfg.dataset, cfg.task)
    data = spec.build(DataRequest(
        root=cfg.data_root, download=cfg.download, input_size=cfg.input_size, train_size=cfg.train_size,
        test_size=cfg.test_size, batch_size=cfg.batch_size, seed=cfg.seed, workers=cfg.workers,
    ))
    if len(data.train) == 0:
        raise UserError(f"the training set has fewer images than one batch ({cfg.batch_size}); lower --batch-size")
    data.train.to(device)
    data.test.to(device)

    # The student is built and probed before a teacher is trained, so an input size the
    # student cannot take fails at once rather than after the teacher's training.
    torch.manual_seed(cfg.seed)  # the student's init depends on the seed alone, not on teacher sourcing
    student = create_model(cfg.model, data.num_classes, data.input_size, cfg.small_input_stem, cfg.pretrained,
                           cfg.task).to(device)
    s_info = model_info(student, cfg.model, data.num_classes, data.input_size, method.taps.student)

    teacher, teacher_score, teacher_source = None, None, None
    if cfg.teacher:
        teacher, teacher_score, teacher_source = obtain_teacher(cfg, data, device, console, stop)
    t_info = model_info(teacher, cfg.teacher, data.num_classes, data.input_size, method.taps.teacher) if teacher is not None else None
    if t_info is not None and t_info.shapes["logits"] != s_info.shapes["logits"]:
        raise UserError(
            f"teacher {cfg.teacher} outputs {t_info.shapes['logits'][0]} classes but the student {s_info.shapes['logits'][0]}; "
            "use a teacher trained on the same dataset"
        )
    method.setup(s_info, t_info)
    method.to(device)
    return Context(cfg, method, method_config, student, teacher, teacher_score, teacher_source, data, device, run_dir,
                   {"student_info": s_info, "teacher_info": t_info})


def evaluate(model: nn.Module, loader, normalize, device, amp: bool, channels_last: bool) -> dict[str, float]:
    """Top-1, top-5 and mean cross-entropy of ``model`` on ``loader``."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0.0
    loss_sum, count = 0.0, 0
    with torch.no_grad(), _autocast(device, amp):
        for images, targets in loader:
            images = normalize(to_float(images))
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            logits = model(images).float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hits = top.eq(targets[:, None])
            correct1 += hits[:, 0].sum().item()
            correct5 += hits.any(dim=1).sum().item()
            loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += len(targets)
    model.train(was_training)
    return {"top1": 100 * correct1 / count, "top5": 100 * correct5 / count, "loss": loss_sum / count}


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Normalize:
    def __init__(self, mean, std, device):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def __call__(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std


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


def run(cfg: RunConfig, resume: bool = False, console=None, stop: StopFlag | None = None) -> dict[str, Any]:
    """Train one run to completion (or resume it) and return its ``result.json`` content."""
    from rich.console import Console

    console = console or Console(stderr=True)
    stop = stop if stop is not None else StopFlag()
    ctx = build(cfg, resume, console, stop)
    if ctx.run_dir.is_complete():
        console.print(f"run {ctx.run_dir.path} is already complete; not training again")
        return ctx.run_dir.read_result()
    return Trainer(ctx, console, stop).fit(resume)


class Trainer:
    def __init__(self, ctx: Context, console, stop: StopFlag):
        self.ctx, self.console, self.stop = ctx, console, stop
        cfg, device = ctx.cfg, ctx.device
        self.cfg, self.device = cfg, device
        self.task = get_task(cfg.task)
        self.student, self.teacher, self.method = ctx.student, ctx.teacher, ctx.method
        self.channels_last = cfg.channels_last
        if self.channels_last:
            self.student.to(memory_format=torch.channels_last)
            self.method.to(memory_format=torch.channels_last)  # its convs read the student's channels_last maps
            if self.teacher is not None:
                self.teacher.to(memory_format=torch.channels_last)
        if self.teacher is not None:
            self.teacher.eval()
            self.teacher.requires_grad_(False)
        self.params = [p for p in [*self.student.parameters(), *self.method.parameters()] if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg)
        self.steps_per_epoch = len(ctx.data.train)
        self.scheduler = build_scheduler(self.optimizer, self.steps_per_epoch, cfg)
        self.normalize = Normalize(ctx.data.mean, ctx.data.std, device)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_score, self.best_epoch = -1.0, -1  # best test top-1 (cls) or mIoU (seg)
        self.rows: list[dict[str, Any]] = []
        self.sums: dict[str, float] = {}
        self.train_seconds = 0.0
        self.images_seen = 0

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
            "train_seconds": self.train_seconds, "images_seen": self.images_seen,
            "rng": _rng_state(self.device),
            "model": self.cfg.model, "method_name": self.cfg.method,
        }

    def save_last(self) -> None:
        save_checkpoint(self.ctx.run_dir.last, self._state())

    def _load(self, path) -> None:
        state = read_checkpoint(path, "checkpoint")
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
        self.train_seconds, self.images_seen = state["train_seconds"], state["images_seen"]
        _set_rng_state(state["rng"], self.device)

    # -- the loop ----------------------------------------------------------------------
    def fit(self, resume: bool) -> dict[str, Any]:
        ctx, cfg = self.ctx, self.cfg
        run_dir = ctx.run_dir
        run_dir.create()
        if resume and run_dir.last.is_file():
            self._load(run_dir.last)
            self.console.print(f"resuming {run_dir.path.name} at epoch {self.epoch + 1}, step {self.step_in_epoch}")
        else:
            torch.manual_seed(cfg.seed + 1)
        run_dir.write_config(self._config_record())
        start = time.perf_counter()
        handles = self.method.install(self.student, self.teacher)
        try:
            with FeatureTaps(self.student, self.method.taps.student) as s_taps, \
                    (FeatureTaps(self.teacher, self.method.taps.teacher) if self.teacher is not None else contextlib.nullcontext()) as t_taps:
                self.s_taps, self.t_taps = s_taps, t_taps
                while self.epoch < cfg.epochs and self.global_step < self.total_steps:
                    self._train_epoch()
                    self._end_epoch()
        finally:
            for handle in handles:
                handle.remove()
        return self._finish(time.perf_counter() - start)

    def _train_epoch(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        cfg, loader = self.cfg, self.ctx.data.train
        loader.set_epoch(self.epoch)
        self.student.train()
        self.method.train()
        steps_this_epoch = min(self.steps_per_epoch, self.total_steps - self.global_step + self.step_in_epoch)
        sync = self.device.type == "cuda"
        pending: dict[str, Tensor] = {}
        progress = Progress(
            TextColumn(f"epoch {self.epoch + 1}/{cfg.epochs}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
            console=self.console, transient=True, disable=not self.console.is_terminal,
        )
        with progress:
            task = progress.add_task("train", total=steps_this_epoch, completed=self.step_in_epoch, info="")
            tick = time.perf_counter()
            for images, targets in loader.batches(skip=self.step_in_epoch):
                if self.step_in_epoch >= steps_this_epoch:
                    break
                terms, n_images = self._step(images, targets)
                for name, value in terms.items():
                    pending[name] = pending.get(name, 0) + value
                self.sums["_steps"] = self.sums.get("_steps", 0) + 1
                self.step_in_epoch += 1
                self.global_step += 1
                self.images_seen += n_images
                last = self.step_in_epoch >= steps_this_epoch
                if self.global_step % 10 == 0 or last or self.stop:
                    self._flush(pending)  # one host sync per 10 steps
                    if sync:
                        torch.cuda.synchronize(self.device)
                    now = time.perf_counter()
                    self.train_seconds += now - tick
                    tick = now
                    steps = max(1, self.sums["_steps"])
                    info = "  ".join(f"{k} {v / steps:.3f}" for k, v in self.sums.items() if not k.startswith("_"))
                    rate = self.images_seen / max(self.train_seconds, 1e-9)
                    progress.update(task, completed=self.step_in_epoch, info=f"{info}  {rate:.0f} img/s")
                if self.stop:
                    self.save_last()
                    raise Interrupted(
                        f"stopped by {self.stop.signal_name} at epoch {self.epoch + 1}, step {self.step_in_epoch}; "
                        f"checkpoint saved to {self.ctx.run_dir.last}; continue with the same command plus --resume"
                    )

    def _flush(self, pending: dict[str, Tensor]) -> None:
        if not pending:
            return
        names = list(pending)
        values = torch.stack([torch.as_tensor(pending[n], dtype=torch.float32, device=self.device) for n in names]).tolist()
        for name, value in zip(names, values):
            if not math.isfinite(value):
                raise NonFiniteLoss(
                    f"loss term {name!r} became {value} by step {self.global_step} (epoch {self.epoch + 1}); "
                    f"the last good checkpoint is {self.ctx.run_dir.last}; lower --lr or the term's weight"
                )
            self.sums[name] = self.sums.get(name, 0.0) + value
        pending.clear()

    def _step(self, images: Tensor, targets: Tensor) -> tuple[dict[str, Tensor], int]:
        cfg, device = self.cfg, self.device
        images = to_float(images)
        images, targets = self.method.prepare_batch(images, targets, self.ctx.data.augment)
        images = self.normalize(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, cfg.amp):
            logits = self.student(images)
            student = NetOutputs(logits, self.s_taps.pop())
            teacher = None
            if self.teacher is not None:
                with torch.no_grad():
                    t_logits = self.teacher(images)
                teacher = NetOutputs(t_logits, self.t_taps.pop())
            out = StepOutputs(student, targets, teacher, images, self.epoch, self.global_step,
                              self.global_step / max(1, self.total_steps))
            terms = self.method.loss(out)
        if not terms:
            raise RuntimeError(f"method {cfg.method!r} returned no loss terms")
        loss = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        detached = {name: value.detach().float() for name, value in terms.items()}
        detached["loss"] = loss.detach().float()
        detached["_correct"], detached["_counted"] = self.task.train_hits(logits.detach(), targets)
        return detached, len(images)

    def _end_epoch(self) -> None:
        cfg, data = self.cfg, self.ctx.data
        metrics = self.task.evaluate(self.student, data, self.normalize, self.device, cfg.amp, self.channels_last)
        self.s_taps.pop()
        steps = max(1, self.sums.get("_steps", 0))
        row: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.global_step, "lr": self.optimizer.param_groups[0]["lr"]}
        row["train_loss"] = self.sums.get("loss", float("nan")) / steps
        for name, value in self.sums.items():
            if not name.startswith("_") and name != "loss":
                row[f"train_{name}"] = value / steps
        row[f"train_{self.task.train_metric}"] = 100 * self.sums.get("_correct", 0) / max(1, self.sums.get("_counted", 1))
        row.update(self.task.row_fields(metrics, data.class_names))
        row["img_per_s"] = self.images_seen / max(self.train_seconds, 1e-9)
        self.rows.append(row)
        self.console.print(
            f"epoch {self.epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.4f}  "
            f"test {self.task.headline(metrics)}  {row['img_per_s']:.0f} img/s"
        )
        score = metrics[self.task.score]
        improved = score > self.best_score
        if improved:
            self.best_score, self.best_epoch = score, self.epoch + 1
        self.epoch += 1
        self.step_in_epoch = 0
        self.sums = {}
        self.ctx.run_dir.write_metrics(self.rows)
        self.save_last()
        if improved:
            save_checkpoint(self.ctx.run_dir.best, {
                "format": CHECKPOINT_FORMAT + "-weights", "student": self.student.state_dict(),
                "method": self.method.state_dict(), "epoch": self.epoch, self.task.score: score, "model": cfg.model,
            })

    def _config_record(self) -> dict[str, Any]:
        ctx = self.ctx
        return {
            "run": self.cfg.to_dict(),
            "method_config": dataclasses.asdict(ctx.method_config),
            "recipe_hash": recipe_hash(self.cfg, ctx.method_config),
            "teacher_source": ctx.teacher_source,
            "data": {"num_classes": ctx.data.num_classes, "input_size": ctx.data.input_size,
                     "train_images": len(ctx.data.train) * self.cfg.batch_size, "augment": repr(ctx.data.augment)},
            "versions": versions(), "git_commit": git_commit(), "command": command_line(),
        }

    def _finish(self, wall: float) -> dict[str, Any]:
        last = self.rows[-1]
        params = parameter_count(self.student)
        steps = max(1, self.global_step)
        result = {
            "run_id": self.ctx.run_dir.path.name, "complete": True,
            "method": self.cfg.method, "model": self.cfg.model, "teacher": self.cfg.teacher,
            "dataset": self.cfg.dataset, "task": self.cfg.task, "seed": self.cfg.seed,
            "epochs": self.epoch, "steps": self.global_step,
            **self.task.result_fields(last, self.ctx.data.class_names),
            f"best_{self.task.score}": self.best_score, "best_epoch": self.best_epoch,
            f"teacher_{self.task.score}": self.ctx.teacher_score,
            "final_train_loss": last["train_loss"],
            "params_m": params / 1e6, "extra_params_m": self.method.extra_parameter_count() / 1e6,
            "train_img_per_s": self.images_seen / max(self.train_seconds, 1e-9),
            "ms_per_step": 1000 * self.train_seconds / steps,
            "peak_mem_mb": _peak_memory_mb(self.device), "device": str(self.device),
            "wall_time_s": wall, "train_time_s": self.train_seconds,
            "recipe_hash": recipe_hash(self.cfg, self.ctx.method_config),
        }
        self.ctx.run_dir.write_result(result)
        return result


def recipe_hash(cfg: RunConfig, method_config) -> str:
    """The run's :func:`kdzoo.config.hash_recipe`: never averaged with a different recipe."""
    return hash_recipe(cfg.to_dict(), dataclasses.asdict(method_config), versions())
