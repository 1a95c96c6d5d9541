"""One training step, shared by the training loop and ``kdzoo speed``.

The engine's :class:`~kdzoo.engine.Trainer` and the speed benchmark both call
:class:`TrainStep`, so what ``kdzoo speed`` times is the code path a run executes, not a copy
of it. The step is: raw batch → ``method.prepare_batch`` (augmentation on the device) →
normalise → student forward (+ teacher forward under ``no_grad``) with the taps hooked →
``method.loss`` → backward → optimiser and schedule step. Nothing in it waits for the host:
loss terms come back as device tensors, and the caller decides when to synchronise.

:func:`prepare_networks` and :func:`compile_networks` hold the fast-path set-up that both
callers share (channels_last, a frozen eval-mode teacher, cuDNN autotuning, ``torch.compile``
after the hooks are registered).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .data.loaders import to_float
from .hooks import FeatureTaps
from .method import Method, NetOutputs, StepOutputs, check_terms
from .tasks import CLASSIFICATION


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when ``amp`` is on; full precision elsewhere (CPU bf16 is slower)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def eval_batches(model: nn.Module, loader, normalize, device: torch.device, amp: bool, channels_last: bool):
    """(float32 logits, targets) of ``model`` in eval mode over ``loader``, without gradients.

    Every task's evaluation reads the test set the same way: the input pipeline of a training
    step (normalise, memory format, autocast) with the model in eval mode, restored afterwards
    even when the caller stops early or fails.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(device, amp):
            for images, targets in loader:
                images = normalize(to_float(images))
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                yield model(images).float(), targets
    finally:
        model.train(was_training)


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
class TrainStep:
    """One optimisation step of ``method`` on a raw batch; ``__call__`` returns the detached
    loss terms (plus ``loss``, their sum, and the training-accuracy counts ``_correct`` and
    ``_counted``) and the number of images the networks saw, all without a host synchronisation.

    ``student_forward``/``teacher_forward`` are the networks or their compiled forwards;
    ``s_taps``/``t_taps`` are the open :class:`FeatureTaps` on the same networks.
    """

    student_forward: nn.Module
    teacher_forward: nn.Module | None
    method: Method
    s_taps: FeatureTaps
    t_taps: FeatureTaps | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    normalize: Any
    augment: Any
    device: torch.device
    amp: bool
    channels_last: bool
    hits: Any = None  # (logits, targets) -> (correct, counted) on the device; default: classification's

    def __post_init__(self):
        # the part of the step that DDP wraps (see kdzoo.distributed.data_parallel); by default
        # the forward passes and the loss themselves
        self.forward = self.forward_loss

    def forward_loss(self, images: Tensor, targets: Tensor, epoch: int = 0, step: int = 0,
                     progress: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
        """Student and teacher forward passes with the taps, then the method's loss terms."""
        logits = self.student_forward(images)
        student = NetOutputs(logits, self.s_taps.pop())
        teacher = None
        if self.teacher_forward is not None:
            with torch.no_grad():
                t_logits = self.teacher_forward(images)
            teacher = NetOutputs(t_logits, self.t_taps.pop() if self.t_taps is not None else {})
        terms = self.method.loss(StepOutputs(student, targets, teacher, images, epoch, step, progress))
        check_terms(self.method.name, terms)
        return logits, terms

    def __call__(self, images: Tensor, targets: Tensor, epoch: int = 0, step: int = 0,
                 progress: float = 0.0) -> tuple[dict[str, Tensor], int]:
        images = to_float(images)
        images, targets = self.method.prepare_batch(images, targets, self.augment)
        images = self.normalize(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp):
            logits, terms = self.forward(images, targets, epoch, step, progress)
        loss = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        detached = {name: value.detach().float() for name, value in terms.items()}
        detached["loss"] = loss.detach().float()
        detached["_correct"], detached["_counted"] = (self.hits or CLASSIFICATION.train_hits)(logits.detach(), targets)
        return detached, len(images)

