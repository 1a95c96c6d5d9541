"""Similarity-Preserving Knowledge Distillation (Tung & Mori, ICCV 2019).

Two inputs that the teacher represents alike should be represented alike by the student. SP
does not match the features themselves but the B×B matrix of their pairwise similarities within
the batch, so the two networks may differ in width, grid and architecture, with no extra
parameters.

    G      = A · Aᵀ           A = the (B, C·H·W) flattened map of one network
    G̃[i]   = G[i] / ‖G[i]‖₂   each row L2-normalised
    L_SP   = ‖ G̃_t − G̃_s ‖²_F / B²
    L      = ce_weight · CE(z_s, y) + sp_weight · L_SP    (+ kd_weight · τ² · KL, off by default)

The map is each network's last stage (RepDistiller's ``feat[-2]``, mdistiller's ``feats[-1]``).
Defaults are RepDistiller's CIFAR-100 setting (``--distill similarity -r 1 -a 0 -b 3000``; the
same in mdistiller's ``CFG.SP``); its loss was "verified by original author" (RepDistiller's
docstring). The row normalisation floors the norm at 1e-12, as ``F.normalize`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kdzoo.methods._stage_pairs import parse_pair, resolve_pair, tap_names
from torch import Tensor

from kdzoo.losses import cross_entropy, softened_kl
from kdzoo.method import Method, StepOutputs, Taps
from kdzoo.registry import register_method


def similarity_matrix(feature: Tensor) -> Tensor:
    """G̃: the (B, B) Gram matrix of the flattened samples, each row L2-normalised, in float32 (float64 stays)."""
    a = feature.reshape(feature.shape[0], -1)
    a = a.to(torch.promote_types(a.dtype, torch.float32))
    return F.normalize(a @ a.t(), p=2, dim=1)


def sp_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """‖G̃_t − G̃_s‖²_F / B², the teacher detached."""
    b = student.shape[0]
    if teacher.shape[0] != b:
        raise RuntimeError(f"sp: student batch {b} != teacher batch {teacher.shape[0]}")
    diff = similarity_matrix(teacher.detach()) - similarity_matrix(student)
    return diff.pow(2).sum() / (b * b)


@register_method("sp")
class SP(Method):
    summary = "Similarity-preserving KD (Tung & Mori 2019): match the row-normalised batch Gram matrix of the last stage"
    needs_teacher = True
    tasks = ("cls",)
    taps = Taps(student=["stages"], teacher=["stages"])

    @dataclass
    class Config:
        layer: str = "last"          # 'last' (deepest stage), 'stageK' or 'STUDENT:TEACHER'
        sp_weight: float = 3000.0    # β
        ce_weight: float = 1.0
        kd_weight: float = 0.0       # optional vanilla KD term (RepDistiller's -a), off in its SP setting
        temperature: float = 4.0     # τ of the optional KD term

    def __init__(self, config=None):
        super().__init__(config)
        self.check_config(positive=("temperature",), non_negative=("sp_weight", "ce_weight", "kd_weight"))
        self.layer = parse_pair(self.name, self.config.layer)
        self.taps = Taps(student=tap_names([self.layer[0]]), teacher=tap_names([self.layer[1]]))
        self.pair: tuple[str, str] | None = None

    def setup(self, student, teacher) -> None:
        self.pair = resolve_pair(self.name, self.layer, student, teacher)
        self.taps = Taps(student=[self.pair[0]], teacher=[self.pair[1]])

    def loss(self, out: StepOutputs):
        c = self.config
        if self.pair is None:
            raise RuntimeError("sp.setup() must run before the loss")
        teacher = self.teacher_output(out)
        with torch.autocast(device_type=out.student.logits.device.type, enabled=False):
            terms = {"ce": c.ce_weight * cross_entropy(out.student.logits, out.targets),
                     "sp": c.sp_weight * sp_loss(out.student.features[self.pair[0]], teacher.features[self.pair[1]])}
            if c.kd_weight > 0:
                terms["kd"] = c.kd_weight * softened_kl(out.student.logits, teacher.logits.detach(), c.temperature)
        return terms
