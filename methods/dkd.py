"""Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022 (DKD).

Hinton's KD term mixes two things: how much probability the student puts on the target class
versus everything else (the *target-class* part) and how it spreads the rest over the non-target
classes (the *non-target* part, the "dark knowledge"). Rewritten, KD = TCKD + (1 − p_t^gt)·NCKD:
the non-target part is scaled down exactly when the teacher is confident, i.e. on the samples
whose dark knowledge is most reliable. DKD decouples the two and weights them freely:

    b = [p^gt, 1 − p^gt]                              binary target / non-target split of σ(z/τ)
    p̂ = σ(z/τ) renormalised over the classes ≠ gt     the non-target distribution
    TCKD = τ² · KL(b_t ‖ b_s),  NCKD = τ² · KL(p̂_t ‖ p̂_s)        (summed, averaged over the batch)
    L = ce_weight · CE(z_s, y) + w(epoch) · (α · TCKD + β · NCKD),   w = min(epoch₁ / warmup, 1)

with epoch₁ the 1-based epoch of the official trainer (``out.epoch + 1``), so the first epoch
already carries 1/warmup of the weight and the last warm-up epoch carries all of it.

Numbers follow the official code (megvii-research/mdistiller ``mdistiller/distillers/DKD.py``):
NCKD is computed as the official one is, by subtracting 1000 from the target logit after dividing
by τ (``z/τ − 1000·[gt]``), which zeroes the target class of both softmaxes; TCKD is computed in
log space (log b from log-sum-exps), which equals the official ``log(sum(softmax))`` wherever that
is finite and stays finite where the official one overflows to ∞ (a target probability that
underflows to 0). Defaults: the CIFAR-100 setting (α 1, β 8, τ 4, warm-up 20, CE 1), with the β
of the official per-pair configs (``configs/cifar100/dkd/*.yaml``) looked up by teacher→student
pair; ImageNet (``imagefolder``): β 0.5, τ 1, warm-up 1 (``configs/imagenet/r34_r18/dkd.yaml``).

``logit_standardize`` (Sun et al., CVPR 2024; sunshangquan/logit-standardization-KD): z-score
both networks' logits before everything above (the CE keeps the raw logits), τ = 2 and α, β
multiplied by 9 (``tools/train.py``: ``ALPHA *= kd_weight; BETA *= kd_weight; T = base_temp``).

Mixed (soft) targets: the target class is the argmax of the target distribution (the mixed
image's dominant label); the CE uses the whole distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kdzoo.losses import cross_entropy, kl_div
from kdzoo.method import StepOutputs
from kdzoo.methods._logit import LogitMethod
from kdzoo.registry import register_method

# β of the official CIFAR-100 configs (mdistiller configs/cifar100/dkd/*.yaml) that differ from the
# default 8, keyed (teacher, student) by kdzoo's CIFAR network names.
CIFAR_PAIR_BETA: dict[tuple[str, str], float] = {
    ("cifar_resnet56", "cifar_resnet20"): 2.0,      # res56_res20.yaml
    ("cifar_resnet110", "cifar_resnet32"): 2.0,     # res110_res32.yaml
    ("cifar_vgg13", "cifar_vgg8"): 6.0,             # vgg13_vgg8.yaml
    ("cifar_vgg13", "cifar_mobilenetv2"): 6.0,      # vgg13_mv2.yaml
    ("cifar_wrn_40_2", "cifar_wrn_16_2"): 6.0,      # wrn40_2_wrn_16_2.yaml
    ("cifar_wrn_40_2", "cifar_wrn_40_1"): 6.0,      # wrn40_2_wrn_40_1.yaml
}
# β of the official ImageNet configs that differ from r34_r18's 0.5, keyed by timm names.
IMAGENET_PAIR_BETA: dict[tuple[str, str], float] = {
    ("resnet50", "mobilenetv1_100"): 2.0,           # configs/imagenet/r50_mv1/dkd.yaml
}
LS_WEIGHT = 9.0      # logit-standardization-KD tools/train.py: --kd-weight 9 multiplies α and β
LS_TEMPERATURE = 2.0  # … and --base-temp 2 replaces τ
NCKD_MASK = 1000.0   # what the official code subtracts from the target logit (after /τ) for NCKD


def target_mask(logits: Tensor, targets: Tensor) -> Tensor:
    """(B, K) bool, True at each row's target class; soft targets (B, K) use their argmax."""
    classes = targets.argmax(dim=1) if targets.dtype.is_floating_point else targets.reshape(-1)
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, classes.long().unsqueeze(1), True)


def binary_log_probs(logits: Tensor, gt: Tensor, temperature) -> Tensor:
    """(B, 2): log [p^gt, 1 − p^gt] of σ(z/τ), from log-sum-exps (no log of a sum of probabilities)."""
    z = logits / temperature
    log_all = torch.logsumexp(z, dim=1)
    log_gt = (z * gt).sum(dim=1) - log_all
    log_rest = torch.logsumexp(z.masked_fill(gt, float("-inf")), dim=1) - log_all
    return torch.stack([log_gt, log_rest], dim=1)


def tckd(student_logits: Tensor, teacher_logits: Tensor, gt: Tensor, temperature) -> Tensor:
    """Target-class KD: τ² · KL(b_t ‖ b_s) of the binary target / non-target split, batch mean."""
    log_bs = binary_log_probs(student_logits, gt, temperature)
    log_bt = binary_log_probs(teacher_logits, gt, temperature)
    return temperature**2 * (log_bt.exp() * (log_bt - log_bs)).sum(dim=1).mean()


def nckd(student_logits: Tensor, teacher_logits: Tensor, gt: Tensor, temperature) -> Tensor:
    """Non-target-class KD: τ² · KL(p̂_t ‖ p̂_s) over the classes ≠ gt, batch mean.

    As in the official code, the target class is removed by subtracting 1000 from its logit after
    dividing by τ: its probability underflows to 0 in both softmaxes (exactly, in float32).
    """
    offset = NCKD_MASK * gt.to(student_logits.dtype)
    return temperature**2 * kl_div(student_logits / temperature - offset, teacher_logits / temperature - offset, 1.0)


def warmup_weight(epoch: int, warmup: int) -> float:
    """min(epoch₁ / warmup, 1) with epoch₁ = epoch + 1, the official trainer's 1-based epoch; 1 if warmup = 0."""
    return 1.0 if warmup == 0 else min((epoch + 1) / warmup, 1.0)


@register_method("dkd")
class DKD(LogitMethod):
    summary = "Decoupled KD: target-class and non-target-class KL weighted apart (α, β), warm-up"
    tasks = ("cls",)
    dataset_defaults = {"imagefolder": {"beta": 0.5, "temperature": 1.0, "warmup": 1}}
    # logit standardisation's ×9 on α and β and τ = 2 depend on the dataset's and the pair's β:
    # recipe_defaults applies them

    @dataclass
    class Config:
        ce_weight: float = 1.0
        alpha: float = 1.0
        beta: float = 8.0
        temperature: float = 4.0
        warmup: int = 20  # epochs over which the DKD weight ramps linearly (1-based epochs); 0 = none
        logit_standardize: bool = False

    def __init__(self, config=None):
        super().__init__(config)
        self.check_config(positive=("temperature",), non_negative=("ce_weight", "alpha", "beta", "warmup"))

    @classmethod
    def recipe_defaults(cls, run: Any, settings: dict[str, Any]) -> dict[str, Any]:
        """Dataset defaults, then the pair's β, then logit standardisation (×9 on α and β, τ = 2)."""
        defaults = super().recipe_defaults(run, {**settings, "logit_standardize": False})
        table = IMAGENET_PAIR_BETA if run.dataset == "imagefolder" else CIFAR_PAIR_BETA
        pair_beta = table.get((run.teacher, run.model))
        if pair_beta is not None:
            defaults["beta"] = pair_beta
        if settings.get("logit_standardize") is True:
            plain = cls.Config()
            defaults.update(alpha=LS_WEIGHT * defaults.get("alpha", plain.alpha),
                            beta=LS_WEIGHT * defaults.get("beta", plain.beta), temperature=LS_TEMPERATURE)
        return defaults

    def loss(self, out: StepOutputs):
        c = self.config
        teacher = self.teacher_output(out)
        tau = self.temperature()
        z_s = self.softenable(out.student.logits).float()
        z_t = self.softenable(teacher.logits.detach()).float()
        gt = target_mask(z_s, out.targets)
        w = warmup_weight(out.epoch, c.warmup)
        return {
            "ce": c.ce_weight * cross_entropy(out.student.logits, out.targets),
            "tckd": w * c.alpha * tckd(z_s, z_t, gt, tau),
            "nckd": w * c.beta * nckd(z_s, z_t, gt, tau),
        }
