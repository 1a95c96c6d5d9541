"""Probabilistic Knowledge Transfer (Passalis & Tefas, ECCV 2018).

The student's embedding space should have the same *neighbourhood structure* as the teacher's:
for each sample i, the probability of picking sample j as its neighbour, under a kernel on the
embeddings, should be the same in both networks. The kernel is the cosine similarity shifted to
[0, 1], so embeddings of any widths compare directly, with no extra parameters.

    x̂_i     = x_i / (‖x_i‖₂ + eps)                                (a NaN entry is set to 0)
    K_ij    = (⟨x̂_i, x̂_j⟩ + 1) / 2                                 i, j over the batch, i = j included
    P_j|i   = K_ij / Σ_k K_ik                                     row-normalised, per network
    L_PKT   = (1/B²) Σ_i Σ_j P^t_j|i · log( (P^t_j|i + eps) / (P^s_j|i + eps) )
    L       = ce_weight · CE(z_s, y) + pkt_weight · L_PKT    (+ kd_weight · τ² · KL, off by default)

As in the authors' code (passalis/probabilistic_kt, copied into RepDistiller and mdistiller),
the KL terms are averaged over all B² pairs (``torch.mean`` of the B×B matrix), i.e. the
per-sample KL divided by B as well; eps = 1e-7 both in the norm and inside the log. The
embeddings are the pooled features that enter the classifier (RepDistiller's ``feat[-1]``,
mdistiller's ``pooled_feat``). Defaults are RepDistiller's CIFAR-100 setting
(``--distill pkt -r 1 -a 0 -b 30000``; the same in mdistiller's ``CFG.PKT``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdzoo.losses import cross_entropy, softened_kl
from kdzoo.method import Method, StepOutputs, Taps
from kdzoo.registry import register_method


def conditional_probabilities(embedding: Tensor, eps: float = 1e-7) -> Tensor:
    """P_j|i of the shifted cosine kernel, (B, B), rows summing to 1, in float32 (float64 stays float64)."""
    x = embedding.reshape(embedding.shape[0], -1)
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    x = x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + eps)
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    kernel = (x @ x.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(student: Tensor, teacher: Tensor, eps: float = 1e-7) -> Tensor:
    """mean over the B² pairs of P^t · log((P^t + eps) / (P^s + eps)), the teacher detached."""
    if student.shape[0] != teacher.shape[0]:
        raise RuntimeError(f"pkt: student batch {student.shape[0]} != teacher batch {teacher.shape[0]}")
    p_s = conditional_probabilities(student, eps)
    p_t = conditional_probabilities(teacher.detach(), eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


@register_method("pkt")
class PKT(Method):
    summary = "Probabilistic KT (Passalis & Tefas 2018): match cosine-kernel neighbour probabilities of the embeddings"
    needs_teacher = True
    tasks = ("cls",)
    taps = Taps(student=["embedding"], teacher=["embedding"])

    @dataclass
    class Config:
        pkt_weight: float = 30000.0  # β
        eps: float = 1e-7            # added to the norm and inside the log, as the authors' code
        ce_weight: float = 1.0
        kd_weight: float = 0.0       # optional vanilla KD term (RepDistiller's -a), off in its PKT setting
        temperature: float = 4.0     # τ of the optional KD term

    def __init__(self, config=None):
        super().__init__(config)
        self.check_config(positive=("eps", "temperature"), non_negative=("pkt_weight", "ce_weight", "kd_weight"))

    def loss(self, out: StepOutputs):
        c = self.config
        teacher = self.teacher_output(out)
        with torch.autocast(device_type=out.student.logits.device.type, enabled=False):
            terms = {"ce": c.ce_weight * cross_entropy(out.student.logits, out.targets),
                     "pkt": c.pkt_weight * pkt_loss(out.student.embedding, teacher.embedding, c.eps)}
            if c.kd_weight > 0:
                terms["kd"] = c.kd_weight * softened_kl(out.student.logits, teacher.logits.detach(), c.temperature)
        return terms
