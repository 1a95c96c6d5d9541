"""Student and teacher maps of different shapes, made comparable: one tested piece for every
feature method.

Stage taps already hand every network's features over as ``(B, C, H, W)`` maps (a ViT's tokens
reshaped to their grid), so two maps can differ in two ways only: their spatial size (a ResNet
at stride 8 against a ViT at 16; a CIFAR network against an ImageNet one) and their width. A
method that compares maps element by element takes both apart here, in the way its paper does:
resize one map to the other's grid (:func:`to_common_grid`) and project the student's channels
into the teacher's (:class:`ChannelProjection`, trained with the student).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from .losses import resize_average

Side = Literal["student", "teacher", "smaller"]


def to_common_grid(student: Tensor, teacher: Tensor, grid: Side = "student") -> tuple[Tensor, Tensor]:
    """(student, teacher) maps on one H×W grid: the student's, the teacher's, or the smaller of
    the two. A map that shrinks is average-pooled (every target cell the mean of what it covers),
    one that grows is interpolated bilinearly (:func:`kdzoo.losses.resize_average`)."""
    (hs, ws), (ht, wt) = student.shape[-2:], teacher.shape[-2:]
    if grid == "student":
        size = (hs, ws)
    elif grid == "teacher":
        size = (ht, wt)
    elif grid == "smaller":
        size = (hs, ws) if hs * ws <= ht * wt else (ht, wt)
    else:
        raise ValueError(f"grid must be 'student', 'teacher' or 'smaller', got {grid!r}")
    return resize_average(student, size), resize_average(teacher, size)


class ChannelProjection(nn.Sequential):
    """C_s → C_t: a 1×1 convolution without bias, then batch norm — the connector most feature
    methods put on the student side (FitNet's hint regressor in one-stage training, CRD-era
    baselines, OFD). Batch norm lets the projection match the teacher's per-channel scale, which a
    bias-free convolution alone would have to learn through its weights."""

    def __init__(self, in_channels: int, out_channels: int, norm: bool = True):
        layers = [nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=not norm)]
        if norm:
            layers.append(nn.BatchNorm2d(out_channels))
        super().__init__(*layers)
        nn.init.kaiming_normal_(layers[0].weight, mode="fan_out", nonlinearity="relu")
