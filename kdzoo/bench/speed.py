"""``kdzoo speed``: what a distillation method costs beyond its two forward passes.

Four phases are timed in one process, on the same batches, interleaved in rounds
(a, b, c, d, a, b, c, d, …) after a warm-up, so that machine noise hits all of them alike:

(a) ``student_step``  — the plain training step (the ``baseline`` method) of the student;
(b) ``teacher_forward`` — the teacher's forward pass alone (eval, ``no_grad``) on a batch
    that is already augmented and normalised;
(c) ``method_step``   — the method's full training step: its batch preparation, both
    networks with the method's taps hooked, its loss and extra modules, backward, optimiser;
(d) ``hooked_step``   — the student's plain step with the method's student taps hooked
    but their captures unused.

Every phase is :class:`kdzoo.step.TrainStep` — the code a run executes — built from the
objects the engine builds (``create_model``, ``model_info``, the method, ``FeatureTaps``,
the optimiser builder). Each phase has its own copy of the networks (same initial
weights), so hooks never need adding or removing between rounds and compiled graphs stay
valid. All four process the same number of images per network pass: a method whose batch
preparation multiplies the batch (CCD's two views, FRSKD's rotations) is compared with
a plain step and a teacher forward on that many images.

The ratios are ratios of *time per step*: ``overhead = t(c) / (t(a) + t(b))`` and
``hook_overhead = t(d) / t(a)``; 1.10 means 10 % more time than the two passes alone.
The teacher is randomly initialised: its weights do not change its cost.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..build import create_network, load_data, resolve_device, validate
from ..config import RunConfig
from ..data.loaders import InMemoryLoader, to_float
from ..errors import UserError
from ..hooks import FeatureTaps
from ..inputs import Inputs
from ..method import Batch, Method
from ..models import model_info
from ..optim import build_optimizer, build_scheduler, split_method_groups
from ..registry import get_method
from ..step import StepParts, TrainStep, compile_networks, prepare_networks
from ..tasks import get_task
from ..teacher_cache import TeacherCache, fill_every_choice, open_cache
from .cpu_memory import cpu_peak_bytes

PHASES = ("student_step", "teacher_forward", "method_step", "hooked_step")  # and (e) "cached_step" with --teacher-cache
LABELS = {
    "student_step": "(a) student step",
    "teacher_forward": "(b) teacher forward",
    "method_step": "(c) method step",
    "hooked_step": "(d) student step, taps hooked",
    "cached_step": "(e) method step, teacher cache",
}
CACHED_BATCHES = 4  # distinct batches phase (e) cycles through, their every crop/flip filled ahead


@dataclass
class Phase:
    """A timed unit of work: ``run(n)`` performs n steps; ``resident`` are the tensors the
    phase keeps between steps (parameters, buffers, gradients, optimiser state); ``optimizer``
    is the training phases' optimiser, whose gradients the CPU memory reading drops first."""

    name: str
    run: Callable[[int], None]
    resident: Callable[[], int]
    optimizer: torch.optim.Optimizer | None = None
    seconds: list[float] = field(default_factory=list)
    peak_bytes: int | None = None


def _batches(loader: InMemoryLoader) -> Iterator:
    """Endless batches of ``loader``, a new shuffle each pass."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader.batches()


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and torch.is_tensor(t) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _resident(modules: list[nn.Module | None], optimizer: torch.optim.Optimizer | None = None) -> Callable[[], int]:
    def count() -> int:
        tensors = []
        for m in modules:
            if m is not None:
                tensors += [*m.parameters(), *m.buffers(), *(p.grad for p in m.parameters())]
        if optimizer is not None:
            tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        return _tensor_bytes(tensors)
    return count


class SpeedBench:
    """Builds the four phases for one (method, student, teacher) and times them."""

    def __init__(self, cfg: RunConfig):
        method = validate(cfg)
        if not type(method).needs_teacher:
            cfg = dataclasses.replace(cfg, teacher=None)
        self.cfg = cfg = cfg.resolved()
        self.device = device = resolve_device(cfg.device)
        self.method = method
        self.data = data = load_data(cfg, device, test_size=cfg.batch_size, workers=0)
        if not isinstance(data.train, InMemoryLoader):
            raise UserError(f"kdzoo speed needs an in-memory dataset (shapes, cifar10, cifar100), not {cfg.dataset!r}")

        torch.manual_seed(cfg.seed)
        student = create_network(cfg, cfg.model, data).to(device)
        s_info = model_info(student, cfg.model, data.num_classes, data.input_size, method.taps.student, data.train)
        teacher = t_info = None
        if cfg.teacher:
            teacher = create_network(cfg, cfg.teacher, data).to(device)
            t_info = model_info(teacher, cfg.teacher, data.num_classes, data.input_size, method.taps.teacher, data.train)
        method.setup(s_info, t_info)
        method.to(device)
        self.views = self._views_per_step()
        if self.views > len(data.train.targets):
            raise UserError(f"the method's batch holds {self.views} images but the data only {len(data.train.targets)}; "
                            "raise --train-size")
        # the plain phases see as many images per pass as the method's networks do
        self.plain_loader = InMemoryLoader(data.train.images, data.train.targets, self.views, shuffle=True,
                                           seed=cfg.seed, drop_last=True)
        self.inputs = Inputs(data.mean, data.std, device, cfg.amp, cfg.channels_last)
        self.baseline_cls = get_method("baseline")
        self._exits: list[Callable[[], None]] = []  # hook removals, run by close()
        try:
            self.phases = self._build_phases(student, teacher)
        except BaseException:
            self.close()
            raise

    # -- set-up ----------------------------------------------------------------------------
    def _views_per_step(self) -> int:
        images, targets, index = next(iter(self.data.train.batches()))
        with torch.no_grad():
            prepared = self.method.prepare_batch(Batch(to_float(images), targets, index), self.data.augment)
        return int(prepared.images.shape[0])

    def _open_taps(self, model: nn.Module | None, names) -> FeatureTaps | None:
        if model is None:
            return None
        taps = FeatureTaps(model, names).__enter__()
        self._exits.append(taps.close)
        return taps

    def _step(self, method: Method, student: nn.Module, teacher: nn.Module | None, loader: InMemoryLoader,
              s_names, t_names, install: bool, cache: TeacherCache | None = None,
              ) -> tuple[Callable[[int], None], Callable[[], int], torch.optim.Optimizer]:
        cfg, device = self.cfg, self.device
        prepare_networks(student, teacher, method, cfg.channels_last, device)
        plain, groups = split_method_groups(method, [p for p in student.parameters() if p.requires_grad])
        optimizer = build_optimizer(plain, cfg, groups)
        scheduler = build_scheduler(optimizer, max(1, len(loader)), cfg)
        if install:
            for handle in method.install(student, teacher):
                self._exits.append(handle.remove)
        s_taps, t_taps = self._open_taps(student, s_names), self._open_taps(teacher, t_names)
        step = TrainStep(StepParts(student, teacher, method, s_taps, t_taps, optimizer, scheduler, self.inputs,
                                   self.data.augment, get_task(cfg.task).train_hits,
                                   compile="inductor" if cfg.compile else None, teacher_cache=cache))
        batches = _batches(loader)
        counter = itertools.count()
        student.train()
        method.train()

        def run(n: int) -> None:
            for _ in range(n):
                images, targets, index = next(batches)
                # progress 0.5 (mid-training): no built-in method's cost depends on it
                step(images, targets, index, 0, next(counter), 0.5)

        return run, _resident([student, teacher, method], optimizer), optimizer

    def _teacher_phase(self, teacher: nn.Module) -> tuple[Callable[[int], None], Callable[[], int]]:
        cfg, device = self.cfg, self.device
        prepare_networks(None, teacher, None, cfg.channels_last, device)
        forward = compile_networks(teacher, None)[0] if cfg.compile else teacher
        ready = []  # a few augmented, normalised batches: (b) times the forward pass alone
        for images, _, _ in itertools.islice(_batches(self.plain_loader), 4):
            ready.append(self.inputs(self.data.augment(to_float(images))))
        cycle = itertools.cycle(ready)

        def run(n: int) -> None:
            with torch.no_grad(), self.inputs.autocast():
                for _ in range(n):
                    forward(next(cycle))

        return run, _resident([teacher])

    def _build_phases(self, student: nn.Module, teacher: nn.Module | None) -> list[Phase]:
        method = self.method
        taps = method.taps
        copies = {name: copy.deepcopy(student) for name in ("student_step", "hooked_step")}
        self.networks = {"student_step": copies["student_step"], "method_step": student,
                         "hooked_step": copies["hooked_step"]}  # each phase's own student
        phases = [Phase("student_step", *self._step(self.baseline_cls(), copies["student_step"], None,
                                                    self.plain_loader, (), (), install=False))]
        if teacher is not None:
            self.networks["teacher_forward"] = copy.deepcopy(teacher)
            phases.append(Phase("teacher_forward", *self._teacher_phase(self.networks["teacher_forward"])))
        phases.append(Phase("method_step", *self._step(method, student, teacher, self.data.train,
                                                       taps.student, taps.teacher, install=True)))
        phases.append(Phase("hooked_step", *self._step(self.baseline_cls(), copies["hooked_step"], None,
                                                       self.plain_loader, taps.student, (), install=False)))
        if self.cfg.teacher_cache and teacher is not None:
            phases.append(Phase("cached_step", *self._cached_phase(student, teacher)))
        return phases

    def _cached_phase(self, student: nn.Module, teacher: nn.Module):
        """(e): the method's step served by a cache (in memory, never written) that holds every
        crop/flip of a few batches, so each timed step is all hits — the steady state of a warm cache."""
        cfg, train = self.cfg, self.data.train
        n = min(len(train.targets), CACHED_BATCHES * cfg.batch_size)
        loader = InMemoryLoader(train.images[:n], train.targets[:n], cfg.batch_size, shuffle=True, seed=cfg.seed,
                                drop_last=True)
        t = copy.deepcopy(teacher)
        prepare_networks(None, t, None, cfg.channels_last, self.device)
        cache = open_cache(None, cfg.teacher, t, self.data, self.inputs, writer=False)
        fill_every_choice(cache, t, train.images[:n], torch.arange(n, device=self.device), self.data.augment,
                          self.inputs, cfg.batch_size)
        self.networks["cached_step"] = s = copy.deepcopy(student)
        return self._step(copy.deepcopy(self.method), s, t, loader, self.method.taps.student, (), install=True,
                          cache=cache)

    def close(self) -> None:
        for close in reversed(self._exits):
            close()
        self._exits.clear()

    # -- timing ----------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure(self, steps: int, rounds: int, warmup: int, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
        _check_counts(steps, rounds, warmup)
        rounds = min(rounds, steps)
        per_round = [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]
        cuda = self.device.type == "cuda"
        for phase in self.phases:  # warm-up: allocator, cuDNN autotuning, compilation
            if progress:
                progress(f"warming up {LABELS[phase.name]}")
            phase.run(max(1, warmup))
        self._sync()
        for r, n in enumerate(per_round):
            if progress:
                progress(f"round {r + 1}/{rounds}")
            for phase in self.phases:
                self._sync()
                if cuda:
                    start_bytes = torch.cuda.memory_allocated(self.device)
                    resident = phase.resident()
                    torch.cuda.reset_peak_memory_stats(self.device)
                tick = time.perf_counter()
                phase.run(n)
                self._sync()
                phase.seconds.append((time.perf_counter() - tick) / n)
                if cuda:
                    peak = resident + torch.cuda.max_memory_allocated(self.device) - start_bytes
                    phase.peak_bytes = max(phase.peak_bytes or 0, peak)
        if not cuda:  # the CPU keeps no high-water mark: replay one untimed, profiled step per phase
            if progress:
                progress("measuring peak memory")
            for phase in self.phases:
                if phase.optimizer is not None:
                    # the step sets gradients to None before its backward anyway; doing it first lets
                    # the profiler see their whole life instead of counting them twice (kept + new)
                    phase.optimizer.zero_grad(set_to_none=True)
                transient = cpu_peak_bytes(lambda: phase.run(1))
                phase.peak_bytes = None if transient is None else phase.resident() + transient
        return self.report(steps, rounds, warmup)

    def report(self, steps: int, rounds: int, warmup: int) -> dict[str, Any]:
        cfg = self.cfg
        phases = {}
        for phase in self.phases:
            median = statistics.median(phase.seconds)
            phases[phase.name] = {
                "ms_per_step": 1000 * median,
                "ms_min": 1000 * min(phase.seconds),
                "img_per_s": self.views / median,
                "peak_mem_mb": None if phase.peak_bytes is None else phase.peak_bytes / 2**20,
                "rounds_ms": [1000 * s for s in phase.seconds],
            }
        t = {name: p["ms_per_step"] for name, p in phases.items()}
        two_passes = t["student_step"] + t.get("teacher_forward", 0.0)
        mem = {name: p["peak_mem_mb"] for name, p in phases.items()}
        mem_ratio = None
        if all(v is not None for v in mem.values()):
            mem_ratio = mem["method_step"] / (mem["student_step"] + (mem.get("teacher_forward") or 0.0))
        return {
            "method": cfg.method, "model": cfg.model, "teacher": cfg.teacher, "dataset": cfg.dataset,
            "input_size": self.data.input_size, "batch_size": cfg.batch_size, "images_per_pass": self.views,
            "device": str(self.device), "device_name": _device_name(self.device), "threads": torch.get_num_threads(),
            "amp": cfg.amp and self.device.type == "cuda", "channels_last": cfg.channels_last, "compile": cfg.compile,
            "steps": steps, "rounds": rounds, "warmup": warmup, "torch": torch.__version__,
            "method_settings": dataclasses.asdict(self.method.config),
            "phases": phases,
            # time ratios: method step over the two passes it cannot avoid; hooked over plain step
            "overhead": t["method_step"] / two_passes,
            "hook_overhead": t["hooked_step"] / t["student_step"],
            "method_extra_ms": t["method_step"] - two_passes,
            "source_img_per_s": cfg.batch_size / (t["method_step"] / 1000),
            "memory_ratio": mem_ratio,
            # --teacher-cache: the cached method step against the student's plain step alone
            "cache_ratio": t["cached_step"] / t["student_step"] if "cached_step" in t else None,
        }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


def _check_counts(steps: int, rounds: int, warmup: int) -> None:
    if steps < 1 or rounds < 1 or warmup < 0:
        raise UserError(f"--steps and --rounds must be at least 1 and --warmup at least 0 "
                        f"(got {steps}, {rounds}, {warmup})")


def measure(cfg: RunConfig, steps: int = 10, rounds: int = 10, warmup: int = 2, progress=None) -> dict[str, Any]:
    """Build the phases for ``cfg``, time them and return the report (see the module docstring)."""
    _check_counts(steps, rounds, warmup)
    bench = SpeedBench(cfg)
    try:
        return bench.measure(steps, rounds, warmup, progress)
    finally:
        bench.close()


def print_report(result: dict[str, Any], console) -> None:
    from rich.table import Table

    pair = f"{result['teacher']} → {result['model']}" if result["teacher"] else result["model"]
    table = Table(title=f"kdzoo speed: {result['method']}, {pair}, {result['dataset']} {result['input_size']} px, "
                        f"batch {result['batch_size']} ({result['images_per_pass']} images per pass), {result['device']}")
    for column in ("phase", "ms / step (median)", "img/s", "peak memory (MB)"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for name, phase in result["phases"].items():
        mem = "not measured" if phase["peak_mem_mb"] is None else f"{phase['peak_mem_mb']:.0f}"
        table.add_row(LABELS[name], f"{phase['ms_per_step']:.1f}", f"{phase['img_per_s']:.0f}", mem)
    console.print(table)
    if result["teacher"]:
        console.print(f"overhead      = (c) / ((a) + (b)) = {result['overhead']:.3f}  "
                      f"(time per step; the method adds {result['method_extra_ms']:+.1f} ms to its two passes)")
    else:
        console.print(f"overhead      = (c) / (a) = {result['overhead']:.3f}  "
                      f"(time per step; no teacher: this is the method's own cost, e.g. a self-teacher)")
    console.print(f"hook_overhead = (d) / (a) = {result['hook_overhead']:.3f}  (time per step)")
    if result.get("cache_ratio") is not None:
        console.print(f"cache         = (e) / (a) = {result['cache_ratio']:.3f}  (time per step: the method served by "
                      "a warm teacher cache, against the student's plain step alone)")
    if result["memory_ratio"] is not None:
        source = "CUDA allocator" if result["device"].startswith("cuda") else "profiled CPU allocations"
        parts = "(a) + (b)" if result["teacher"] else "(a)"
        console.print(f"memory        = peak(c) / ({parts}) = {result['memory_ratio']:.3f}  "
                      f"(peak = tensors kept between steps + the step's own high-water mark; {source})")
    else:
        console.print("memory        = not measured (this torch's profiler reports no CPU allocation events)")
    console.print(f"[dim]{result['steps']} timed steps per phase in {result['rounds']} interleaved rounds after "
                  f"{result['warmup']} warm-up steps; amp={result['amp']} channels_last={result['channels_last']} "
                  f"compile={result['compile']}; {result['threads']} threads, torch {result['torch']}[/]")
