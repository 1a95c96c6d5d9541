"""Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher" (DIST), NeurIPS 2022.

A stronger teacher's probabilities can be far from anything a small student can reach, and
KL divergence asks for an exact match. DIST asks only for the same *relations*: with
Y_s = σ(z_s/τ) and Y_t = σ(z_t/τ) as (B, K) matrices and ρ the Pearson correlation,

    inter = 1 − mean_i ρ(Y_s[i, :], Y_t[i, :])      (each sample's ranking of the classes)
    intra = 1 − mean_k ρ(Y_s[:, k], Y_t[:, k])      (each class's ranking of the batch)
    L = ce_weight · CE(z_s, y) + beta · τ² · inter + gamma · τ² · intra

ρ(a, b) = ⟨a − ā, b − b̄⟩ / (‖a − ā‖ · ‖b − b̄‖ + 1e-8), the eps added to the product of the
norms, as the official code does (hunto/image_classification_sota, lib/models/losses/dist_kd.py).
Pearson correlation is invariant to a positive scale and shift of either side, so the student
is free in the sharpness and offset of its predictions; only their order and shape count.

Defaults are the official CIFAR-100 setting (configs/strategies/distill/dist_cifar.yaml:
``kd: dist_t4``, ``ori_loss_weight 1``, ``kd_loss_weight 2`` with ``DIST(beta=1, gamma=1)``),
written with the loss weight folded into β and γ: τ = 4, β = γ = 2, ce_weight = 1. The ImageNet
setting (resnet_dist.yaml: ``kd: dist``, τ = 1) is the ``imagefolder`` default.

Segmentation (the official Cityscapes code, DIST_KD segmentation/losses/dist_kd.py and
train_kd.py): every pixel is a sample, so inter averages over all B·H·W pixels and intra
correlates each class over all of them (ignored pixels included: the teacher has an answer there
too); no temperature, β = γ = 1, ``--lambda-kd 1`` beside the task loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdzoo.losses import cross_entropy, pixels_as_samples
from kdzoo.method import StepOutputs
from kdzoo.methods._logit import LogitMethod
from kdzoo.registry import register_method

PEARSON_EPS = 1e-8  # added to ‖a − ā‖·‖b − b̄‖, as in the official cosine_similarity


def at_least_float32(x: Tensor) -> Tensor:
    """float32 for half and bfloat16 (autocast must not round the small probabilities away);
    float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def pearson(a: Tensor, b: Tensor, dim: int, eps: float = PEARSON_EPS) -> Tensor:
    """Pearson correlation of ``a`` and ``b`` along ``dim``: the cosine of the centred vectors,
    ⟨a − ā, b − b̄⟩ / (‖a − ā‖·‖b − b̄‖ + eps). A constant vector (e.g. a class over a batch of one)
    has a zero norm and correlates 0 with anything."""
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    return (a * b).sum(dim=dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


def relation_losses(student_probs: Tensor, teacher_probs: Tensor) -> tuple[Tensor, Tensor]:
    """(inter, intra) for (N, K) probabilities: 1 − the mean correlation over the rows (classes of
    a sample) and over the columns (samples of a class)."""
    inter = 1.0 - pearson(student_probs, teacher_probs, dim=1).mean()
    intra = 1.0 - pearson(student_probs, teacher_probs, dim=0).mean()
    return inter, intra


@register_method("dist")
class DIST(LogitMethod):
    summary = "DIST: Pearson correlation of softened predictions across classes (inter) and across the batch (intra)"
    tasks = ("cls", "seg")
    dataset_defaults = {"imagefolder": {"temperature": 1.0}}
    task_defaults = {"seg": {"temperature": 1.0, "beta": 1.0, "gamma": 1.0}}

    @dataclass
    class Config:
        temperature: float = 4.0
        beta: float = 2.0
        gamma: float = 2.0
        ce_weight: float = 1.0

    def __init__(self, config=None):
        super().__init__(config)
        self.check_config(positive=("temperature",), non_negative=("beta", "gamma", "ce_weight"))

    def loss(self, out: StepOutputs):
        c = self.config
        teacher = self.teacher_output(out)
        tau = self.temperature()
        z_s = at_least_float32(pixels_as_samples(out.student.logits))
        z_t = at_least_float32(pixels_as_samples(teacher.logits).detach())
        inter, intra = relation_losses((z_s / tau).softmax(dim=1), (z_t / tau).softmax(dim=1))
        return {
            "ce": c.ce_weight * cross_entropy(out.student.logits, out.targets),
            "inter": c.beta * tau**2 * inter,
            "intra": c.gamma * tau**2 * intra,
        }
