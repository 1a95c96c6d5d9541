"""How a batch of raw pixels becomes a network's input, the same way in training and evaluation.

Loaders yield raw pixels (uint8, or float in [0, 1]); the networks want normalised float
tensors, in channels_last memory format when that is on, under bf16 autocast on CUDA when
``amp`` is on. :class:`Inputs` holds those settings once, so a training step, every task's
evaluation, the teacher's check and ``kdzoo speed`` cannot disagree about them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .data.loaders import to_float


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when ``amp`` is on; full precision elsewhere (CPU bf16 is slower)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Inputs:
    """Normalisation, memory format and autocast of one run's network inputs."""

    def __init__(self, mean, std, device: torch.device | str, amp: bool = False, channels_last: bool = False):
        self.device = torch.device(device)
        self.amp, self.channels_last = amp, channels_last
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)

    def __call__(self, images: Tensor) -> Tensor:
        """Float images in [0, 1] → what the networks read."""
        images = (images - self.mean) / self.std
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def autocast(self):
        return autocast(self.device, self.amp)

    def eval_batches(self, model: nn.Module, loader) -> Iterator[tuple[Tensor, Tensor]]:
        """(float32 outputs, targets) of ``model`` in eval mode over ``loader``, without gradients.

        The model's training mode is restored afterwards, even when the caller stops early or fails.
        """
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.autocast():
                for images, targets, _index in loader.batches():
                    yield model(self(to_float(images))).float(), targets
        finally:
            model.train(was_training)
