"""Zheng & Yang, ICLR 2024, "Knowledge Distillation Based on Transformed Teacher Matching" (WTTM).

KD with a temperature on the teacher side only. A temperature T on the teacher is a power
transform of its probabilities, σ(z_t/T) = p_t^γ / Σ_k p_t,k^γ with γ = 1/T; leaving the student
unscaled ("transformed teacher matching", TTM) turns KD's objective into KD plus a Rényi-entropy
regulariser on the student, which the paper shows generalises better. WTTM weighs each sample
by how smooth its transformed teacher is, U_γ(p_t) = Σ_k p_t,k^γ (large for a flat teacher,
1 for a one-hot one), so that the student works hardest where the teacher has most to say:

    p̃_t = p_t^γ / U_γ(p_t),      U_γ(p_t) = Σ_k p_t,k^γ
    L = ce_weight · CE(z_s, y) + wttm_weight · mean_b [ U_γ(p_t,b) · KL(p̃_t,b ‖ σ(z_s,b)) ]

as the official code computes it (zkxufo/TTM, ``distiller_zoo/wttm.py``: the weight is the
un-normalised sum of the powered probabilities; no τ² factor and no temperature on the student).
The official loop adds ``alpha`` · KD (``--add``, default kd at ``kd_T`` 4) to it; every official
WTTM example sets ``-a 0``, so kdzoo leaves that term out.

Defaults: γ = 0.2, wttm_weight (β) = 4, ce_weight 1 — see ``docs/methods/wttm.md`` for where
they come from and what is not published in the official repository.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdzoo.losses import cross_entropy
from kdzoo.method import StepOutputs
from kdzoo.methods._logit import LogitMethod
from kdzoo.registry import register_method


def weighted_transformed_kl(student_logits: Tensor, teacher_logits: Tensor, gamma: float) -> Tensor:
    """mean_b U_γ(p_t,b) · KL(p_t,b^γ / U_γ ‖ σ(z_s,b)), in float32, with U_γ = Σ_k p_t,k^γ.

    The power is taken in log space, γ · log σ(z_t) (the official code raises σ(z_t) to γ), which
    is the same value but keeps teacher probabilities that underflow float32 from becoming 0.
    """
    log_p_s = torch.log_softmax(student_logits.float(), dim=-1)
    powered = gamma * torch.log_softmax(teacher_logits.float(), dim=-1)  # log p_t^γ
    log_weight = torch.logsumexp(powered, dim=-1, keepdim=True)  # log U_γ
    log_p_t = powered - log_weight  # log p̃_t
    kl = torch.sum(log_p_t.exp() * (log_p_t - log_p_s), dim=-1)
    return (log_weight.squeeze(-1).exp() * kl).mean()


@register_method("wttm")
class WTTM(LogitMethod):
    summary = "Weighted transformed teacher matching: KL to the power-transformed teacher (no student temperature), weighted by Σp_t^γ"
    tasks = ("cls",)

    @dataclass
    class Config:
        gamma: float = 0.2  # power γ = 1/T on the teacher's probabilities (the official --ttm_l)
        ce_weight: float = 1.0  # the official -r
        wttm_weight: float = 4.0  # β, the official -b on the WTTM term

    def __init__(self, config=None):
        super().__init__(config)
        self.check_config(positive=("gamma",), non_negative=("ce_weight", "wttm_weight"))

    def loss(self, out: StepOutputs):
        c = self.config
        teacher = self.teacher_output(out).logits.detach()
        return {
            "ce": c.ce_weight * cross_entropy(out.student.logits, out.targets),
            "wttm": c.wttm_weight * weighted_transformed_kl(out.student.logits, teacher, c.gamma),
        }
