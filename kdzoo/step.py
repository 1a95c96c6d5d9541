"""One training step, shared by the training loop and ``kdzoo speed``.

The engine's :class:`~kdzoo.engine.Trainer` and the speed benchmark both build a
:class:`TrainStep` from a :class:`StepParts` record, so what ``kdzoo speed`` times is the code
path a run executes, not a copy of it. The step is: raw batch → ``method.prepare_batch``
(augmentation and views on the device) → the run's :class:`~kdzoo.inputs.Inputs` (normalise,
memory format) → student forward (+ teacher forward under ``no_grad``, on the teacher's own
images when the method gave it other ones) with the taps hooked → ``method.loss`` → backward →
optimiser and schedule step. Nothing in it waits for the host: loss terms come back as device
tensors, and the caller decides when to synchronise.

:func:`prepare_networks` and :func:`compile_networks` hold the fast-path set-up that both
callers share (channels_last, a frozen eval-mode teacher, cuDNN autotuning, ``torch.compile``
after the hooks are registered).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed
from .data.loaders import to_float
from .hooks import FeatureTaps
from .inputs import Inputs
from .method import Batch, Method, NetOutputs, StepOutputs, check_terms
from .teacher_cache import RecordedAugment, TeacherCache


def prepare_networks(student: nn.Module | None, teacher: nn.Module | None, method: Method | None,
                     channels_last: bool, device: torch.device) -> None:
    """Put the networks in their training form, in place (any of them may be ``None``).

    The teacher is frozen and stays in eval mode (its BatchNorm uses running statistics);
    with ``channels_last`` every network and the method's own modules (whose convolutions
    read the student's maps) switch memory format; on CUDA, cuDNN picks the fastest
    convolution algorithms for the fixed training shapes.
    """
    if channels_last:
        for module in (student, method, teacher):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher.eval()
        teacher.requires_grad_(False)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def compile_networks(student: nn.Module, teacher: nn.Module | None,
                     backend: str = "inductor") -> tuple[nn.Module, nn.Module | None]:
    """Compiled forwards of the student and, separately, of the teacher.

    Call this only after every hook (the taps, a method's ``install``) is registered: hooks
    present at compile time are traced into the graph, hooks added later may be ignored.
    The teacher is compiled on its own (it is only ever called under ``no_grad``), so its
    graph holds no autograd bookkeeping. The modules themselves are left as they are, so
    checkpoints keep their plain parameter names and evaluation runs eagerly.
    """
    compiled_teacher = torch.compile(teacher, backend=backend) if teacher is not None else None
    return torch.compile(student, backend=backend), compiled_teacher


@dataclass
class StepParts:
    """Everything one training step is made of; the engine and ``kdzoo speed`` each build one.

    ``student``/``teacher`` are the plain networks (compiled here when ``compile`` is on, after
    the taps ``s_taps``/``t_taps`` are open on them); ``train_hits`` is the task's training
    accuracy count; ``augment`` the dataset's batched training augmentation.
    """

    student: nn.Module
    teacher: nn.Module | None
    method: Method
    s_taps: FeatureTaps
    t_taps: FeatureTaps | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    inputs: Inputs
    augment: Callable[[Tensor], Tensor]
    train_hits: Callable[[Tensor, Tensor], tuple[Tensor, Any]]
    compile: str | None = None  # a torch.compile backend ("inductor"), or None: eager
    teacher_cache: TeacherCache | None = None  # --teacher-cache: the teacher's logits stored per (sample, crop/flip)


class TrainStep:
    """One optimisation step of the method on a raw batch; calling it returns the detached loss
    terms (plus ``loss``, their sum, and the training-accuracy counts ``_correct`` and
    ``_counted``) and the number of images the student saw, all without a host synchronisation.

    Under DDP the forward passes and the loss run inside one wrapper of student + method
    (:func:`kdzoo.distributed.data_parallel`), so backward averages the gradients of both over
    processes; in one process there is no wrapper.
    """

    def __init__(self, parts: StepParts):
        self.parts = parts
        student, teacher = parts.student, parts.teacher
        self.student_forward, self.teacher_forward = (
            compile_networks(student, teacher, parts.compile) if parts.compile else (student, teacher))
        self.forward = distributed.data_parallel(student, parts.method, self.forward_loss, parts.inputs.device,
                                                 type(parts.method).some_parameters_unused)

    def forward_loss(self, images: Tensor, teacher_images: Tensor, targets: Tensor, index: Tensor,
                     epoch: int = 0, step: int = 0, progress: float = 0.0,
                     cached_teacher: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Student and teacher forward passes with the taps (the teacher's logits ``cached_teacher``
        when the cache gave them), then the method's loss terms."""
        parts = self.parts
        logits = self.student_forward(images)
        student = NetOutputs(logits, parts.s_taps.pop())
        teacher = None
        if cached_teacher is not None:
            teacher = NetOutputs(cached_teacher, {})
        elif self.teacher_forward is not None:
            with torch.no_grad():
                t_logits = self.teacher_forward(teacher_images)
            teacher = NetOutputs(t_logits, parts.t_taps.pop() if parts.t_taps is not None else {})
        terms = parts.method.loss(StepOutputs(student, targets, teacher, images, epoch, step, progress, index))
        check_terms(parts.method.name, terms)
        return logits, terms

    def __call__(self, images: Tensor, targets: Tensor, index: Tensor, epoch: int = 0, step: int = 0,
                 progress: float = 0.0) -> tuple[dict[str, Tensor], int]:
        parts, cache = self.parts, self.parts.teacher_cache
        augment = RecordedAugment(parts.augment) if cache is not None else parts.augment
        batch = parts.method.prepare_batch(Batch(to_float(images), targets, index), augment)
        student_images = parts.inputs(batch.images)
        teacher_images = student_images if batch.teacher_images is None else parts.inputs(batch.teacher_images)
        with parts.inputs.autocast():
            cached = (cache.teacher_logits(augment.keys(batch.index), self.teacher_forward, teacher_images)
                      if cache is not None else None)
            logits, terms = self.forward(student_images, teacher_images, batch.targets, batch.index,
                                         epoch, step, progress, cached)
        loss = sum(terms.values())
        parts.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parts.optimizer.step()
        parts.scheduler.step()
        detached = {name: value.detach().float() for name, value in terms.items()}
        detached["loss"] = loss.detach().float()
        detached["_correct"], detached["_counted"] = parts.train_hits(logits.detach(), batch.targets)
        return detached, len(student_images)
