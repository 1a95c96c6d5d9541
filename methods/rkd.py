"""Relational Knowledge Distillation (Park, Kim, Lu, Cho, CVPR 2019).

The student matches the *structure* of the teacher's embedding space rather than the
embeddings themselves: the pairwise distances (normalised by their mean, per network) and the
angles formed by every triplet of samples in the batch. Embeddings of different widths can be
compared directly, so there are no extra parameters.

    L = ce_weight · CE(z_s, y) + distance_weight · L_D + angle_weight · L_A

    d_ij   = ‖e_i − e_j‖ (clamped at eps before the square root, 0 on the diagonal)
    L_D    = mean over the B² pairs of Huber( d^s_ij / μ_s − d^t_ij / μ_t )
             μ = mean of the positive (off-diagonal) distances of that network
    u_ij   = (e_j − e_i) / ‖e_j − e_i‖          (0 when ‖e_j − e_i‖ ≤ 1e-12, so u_ii = 0)
    ψ_ijk  = ⟨u_ij, u_ik⟩                        cosine of the angle at anchor i
    L_A    = mean over the B³ triplets of Huber( ψ^s_ijk − ψ^t_ijk )

Huber is smooth-L1 with δ = 1. Defaults (25, 50, CE 1) are the CIFAR-100 setting of
RepDistiller and mdistiller, on the pooled pre-logit embedding.

The potentials ψ_D (:func:`kdzoo.losses.normalized_distances`), the unit differences u and ψ_A
(:func:`kdzoo.losses.unit_differences`, :func:`kdzoo.losses.triplet_cosines`) are shared terms.

Memory. The unit-difference tensors are (B, B, D), i.e. O(B²·D). The B³ cosines are never held
at once: :func:`kdzoo.losses.angle_potential_huber` walks the anchors in chunks inside a custom
autograd function that keeps only the unit-difference tensors for backward and recomputes each
chunk's cosines there. Plain chunking under autograd would not help, since autograd would keep
every chunk's cosines alive until backward (B³ in total). Each chunk holds at most ``chunk·B²``
cosines; the automatic chunk size is min(B, D), so a chunk is never larger than a
unit-difference tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdzoo.losses import (
    angle_potential_huber,
    auto_chunk,
    cross_entropy,
    normalized_distances,
    unit_differences,
)
from kdzoo.method import Method, StepOutputs, Taps
from kdzoo.registry import register_method


def _flat32(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).float()


def distance_loss(student: Tensor, teacher: Tensor, eps: float = 1e-12, squared: bool = False) -> Tensor:
    """L_D: smooth-L1 (δ=1) between the normalised distance matrices ψ_D, mean over all B² entries."""
    s, t = _flat32(student), _flat32(teacher).detach()
    if s.shape[0] < 2:
        return s.sum() * 0.0  # no pairs: nothing to match, keep the graph connected
    with torch.no_grad():
        t_d = normalized_distances(t, eps, squared)
    return F.smooth_l1_loss(normalized_distances(s, eps, squared), t_d, reduction="mean", beta=1.0)


def angle_loss(student: Tensor, teacher: Tensor, chunk: int | None = None) -> Tensor:
    """L_A: smooth-L1 (δ=1) between triplet-angle cosines ψ_A, mean over all B³ entries.

    ``chunk``: anchors processed at once (None or ≤ 0: :func:`kdzoo.losses.auto_chunk`). The
    value does not change the result, only the peak memory.
    """
    s, t = _flat32(student), _flat32(teacher).detach()
    b = s.shape[0]
    if chunk is None or chunk <= 0:
        chunk = auto_chunk(b, s.shape[1], t.shape[1])
    u_s = unit_differences(s)
    with torch.no_grad():
        u_t = unit_differences(t)
    return angle_potential_huber(u_s, u_t, min(chunk, b))


@register_method("relational_kd", aliases=("rkd",))
class RelationalKD(Method):
    summary = "Relational KD (Park et al. 2019): match normalised pairwise distances and triplet angles of embeddings"
    needs_teacher = True
    tasks = ("cls",)
    taps = Taps(student=["embedding"], teacher=["embedding"])

    @dataclass
    class Config:
        ce_weight: float = 1.0
        distance_weight: float = 25.0
        angle_weight: float = 50.0
        eps: float = 1e-12            # clamp of the squared distance before the square root
        squared: bool = False         # use squared distances in L_D (mdistiller's option; off in the paper's setting)
        angle_chunk: int = 0          # anchors per chunk in L_A; 0 = automatic, min(B, D)

    def __init__(self, config=None):
        super().__init__(config)
        self.check_config(positive=("eps",), non_negative=("ce_weight", "distance_weight", "angle_weight", "angle_chunk"))

    def loss(self, out: StepOutputs):
        c = self.config
        teacher = self.teacher_output(out)
        s = out.student.embedding
        t = teacher.embedding.detach()
        if s.shape[0] != t.shape[0]:
            raise RuntimeError(f"relational_kd: student batch {s.shape[0]} != teacher batch {t.shape[0]}")
        terms = {"ce": c.ce_weight * cross_entropy(out.student.logits, out.targets)}
        with torch.autocast(device_type=s.device.type, enabled=False):
            terms["distance"] = c.distance_weight * distance_loss(s, t, c.eps, c.squared)
            terms["angle"] = c.angle_weight * angle_loss(s, t, c.angle_chunk or None)
        return terms
