"""Yang, Zeng, Li, Zhang, Yuan, Li, "From Knowledge Distillation to Self-Knowledge Distillation: A
Unified Approach with Normalized Loss and Customized Soft Labels" (NKD), ICCV 2023.

KD's loss splits into a target part and a non-target part, and in the non-target part the
student's non-target probabilities are asked to match the teacher's although the two sum to
different totals (1 − p_t of each network), so they can never be equal. NKD normalises the
non-target probabilities of both networks to sum to one before comparing them. With y the
target class, p = σ(z) at temperature 1 and q = σ(z_{≠y}/τ) the softmax over the K − 1
non-target logits (= the non-target probabilities at τ divided by their sum):

    target     = −mean_i  p_t[i, y_i] · log p_s[i, y_i]                       (τ = 1, no τ²)
    non_target = −γ · τ² · mean_i  Σ_{k≠y_i} q_t[i, k] · log q_s[i, k]
    L = ce_weight · CE(z_s, y) + target + non_target

as in the official code (yzd-v/cls_KD, mmcls/models/dis_losses/nkd.py): the target term is a
cross-entropy weighted by the teacher's target probability (detached), the non-target term a
cross-entropy (not a KL: it carries the teacher's entropy, a constant for the student).

Defaults: the official CIFAR-100 config (configs/distillers/cifar100/res34_distill_res18_cifar.py:
temp 3.0, gamma 3.5; the student's own CE at weight 1); the ImageNet configs
(configs/distillers/imagenet/res34_distill_res18_img.py and res50_distill_mv1_img.py: temp 1.0,
gamma 1.5) are the ``imagefolder`` defaults.

Mixed targets (class probabilities after mixup or cutmix): the target class is the most probable
one (argmax, the first on a tie), as the official code does (``torch.max(gt_label, dim=1)``);
the CE term uses the whole distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdzoo.losses import cross_entropy
from kdzoo.method import StepOutputs
from kdzoo.methods._logit import LogitMethod
from kdzoo.registry import register_method


def target_classes(targets: Tensor) -> Tensor:
    """Class indices ``(B,)``: as given, or the most probable class of probability targets ``(B, K)``."""
    return targets.argmax(dim=1) if targets.dtype.is_floating_point else targets.long()


def normalized_non_target_ce(student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                             temperature) -> Tensor:
    """−mean_i Σ_{k≠y_i} q_t[i, k] log q_s[i, k], q = softmax over the non-target logits at τ.

    The target logit is set to −∞ before the softmax, so it takes no share of the distribution;
    its −∞ log-probability is then zeroed, and it contributes neither value nor gradient.
    """
    is_target = torch.zeros_like(student_logits, dtype=torch.bool).scatter_(1, target[:, None], True)
    log_q_s = torch.log_softmax(student_logits.masked_fill(is_target, float("-inf")) / temperature, dim=1)
    q_t = torch.softmax(teacher_logits.masked_fill(is_target, float("-inf")) / temperature, dim=1)
    return -(q_t * log_q_s.masked_fill(is_target, 0.0)).sum(dim=1).mean()


@register_method("nkd")
class NKD(LogitMethod):
    summary = "NKD: target-class CE weighted by the teacher plus CE of normalised non-target distributions"
    dataset_defaults = {"imagefolder": {"temperature": 1.0, "gamma": 1.5}}

    @dataclass
    class Config:
        temperature: float = 3.0
        gamma: float = 3.5
        ce_weight: float = 1.0

    def __init__(self, config=None):
        super().__init__(config)
        self.check_config(positive=("temperature",), non_negative=("gamma", "ce_weight"))

    def loss(self, out: StepOutputs):
        c = self.config
        teacher = self.teacher_output(out)
        tau = self.temperature()
        z_s = out.student.logits
        z_s = z_s.to(torch.promote_types(z_s.dtype, torch.float32))  # float32 under autocast; float64 stays
        z_t = teacher.logits.detach().to(z_s.dtype)
        y = target_classes(out.targets)
        p_t_target = torch.softmax(z_t, dim=1).gather(1, y[:, None])
        log_p_s_target = torch.log_softmax(z_s, dim=1).gather(1, y[:, None])
        return {
            "ce": c.ce_weight * cross_entropy(out.student.logits, out.targets),
            "target": -(p_t_target * log_p_s_target).mean(),
            "non_target": c.gamma * tau**2 * normalized_non_target_ce(z_s, z_t, y, tau),
        }
