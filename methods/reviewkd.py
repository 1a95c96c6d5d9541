"""ReviewKD: knowledge review (Chen, Liu, Zhao, Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021).

Why: a student stage that imitates only the teacher stage of the same depth is asked for
something its shallower feature cannot express; ReviewKD lets every student stage be
*reviewed* by the deeper ones. The student's maps are fused from deep to shallow, each level
mixing its own map with the fused result of all deeper levels (attention-based fusion, ABF),
and the fused map of level i is compared with the teacher's map of level i at several
pooled resolutions (hierarchical context loss, HCL).

Levels i = 1..n are the n deepest stages plus the pooled embedding as a 1×1 map (level n+1),
shallow to deep. With F_i the student's map of level i and T_i the teacher's:

    P_{n+1}     = conv1_{n+1}(F_{n+1})                                    (no fusion at the deepest level)
    P_i         = a_i ⊙ conv1_i(F_i) + b_i ⊙ up(P_{i+1})                  [a_i, b_i] = σ(W_i [conv1_i(F_i); up(P_{i+1})])
    P_i        ← nearest-resized to T_i's H×W when the sizes differ
    Y_i         = conv2_i(P_i)                                            (3×3 conv + BN to the teacher's width)
    HCL(Y, T)   = ( MSE(Y, T) + Σ_k 2^{-k} MSE(pool_{l_k}(Y), pool_{l_k}(T)) ) / (1 + Σ_k 2^{-k})
                  over the pooled sizes l_k ∈ (4, 2, 1) smaller than the map's height, k = 1, 2, … counting
                  only the sizes used
    L           = ce_weight · CE + min(1, epoch / warmup_epochs) · reviewkd_weight · Σ_i HCL(Y_i, T_i)

- conv1_i: 1×1 conv (no bias) + BN to ``mid`` channels (min(512, C of the student's embedding)
  unless ``mid_channels`` says otherwise); W_i: 1×1 conv with bias, 2·mid → 2; up: nearest
  interpolation to level i's size; pool: adaptive average pooling; MSE: the element mean.
  The conv weights start Kaiming-uniform with a = 1, as the official code initialises them.
- T_i: the teacher's *pre-activation* stage maps (``preact_stageK``: the residual sum before the
  last ReLU of the stage) and its embedding, detached. The student's stage maps are
  post-activation on CIFAR-100 (the official CIFAR code calls the student with ``is_feat=True``
  but the teacher with ``preact=True``) and pre-activation on ImageNet (there the official
  ResNets return the pre-ReLU output of every stage for both networks): ``student_preact``.
  Networks without a known pre-activation point use their stage outputs (see docs/methods/reviewkd.md).
- The warm-up counts 0-based epochs as the official CIFAR trainer does (``for epoch in
  range(epochs)``, ``min(1, epoch / 20)``): the first epoch trains with CE only. ImageNet has no
  warm-up (``warmup_epochs=0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdzoo.errors import UserError
from kdzoo.losses import cross_entropy
from kdzoo.method import Method, StepOutputs, Taps
from kdzoo.registry import register_method

# reviewkd_weight per (teacher, student) where the official script (CIFAR-100/script/reviewKD.sh)
# uses another value than 5.0, the weight of its resnet32x4→resnet8x4, WRN and ShuffleNetV1 runs.
CIFAR_PAIR_WEIGHT: dict[tuple[str, str], float] = {
    ("cifar_resnet56", "cifar_resnet20"): 0.6,
    ("cifar_resnet110", "cifar_resnet32"): 1.0,
    ("cifar_resnet32x4", "cifar_shufflenet_v2"): 8.0,
}
# ImageNet/README.md: ResNet-50 → MobileNet trains with --review-kd-loss-weight 8.0, and
# ImageNet/models/reviewkd.py builds its ABFs with mid_channel 256 (ResNet-18: 512).
IMAGENET_PAIR: dict[tuple[str, str], dict[str, Any]] = {
    ("resnet50", "mobilenetv1_100"): {"reviewkd_weight": 8.0, "mid_channels": 256},
}


def hcl_loss(student: Tensor, teacher: Tensor, levels=(4, 2, 1)) -> Tensor:
    """Hierarchical context loss of one level: the full-resolution MSE plus the MSEs of the maps
    average-pooled to each size in ``levels`` below the map's height, weighted 1, ½, ¼, … in
    the order used and normalised by the sum of the weights."""
    height = student.shape[-2]
    loss = F.mse_loss(student, teacher)
    weight, total = 1.0, 1.0
    for size in levels:
        if size >= height:
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size))
        total += weight
    return loss / total


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """min(1, epoch / warmup_epochs) with 0-based epochs; 1 when there is no warm-up."""
    return 1.0 if warmup_epochs <= 0 else min(1.0, epoch / warmup_epochs)


class ABF(nn.Module):
    """Attention-based fusion of one level: its own map, projected to ``mid`` channels, mixed with
    the fused map of the level below by two per-position sigmoid gates; the mix is resized to
    the teacher's grid and turned into the teacher's width by a 3×3 conv + BN.

    ``forward`` returns (output compared with the teacher, fused map handed to the next
    shallower level)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, deeper: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            deeper = F.interpolate(deeper, size=tuple(x.shape[-2:]), mode="nearest")
            gates = self.att_conv(torch.cat([x, deeper], dim=1))
            x = x * gates[:, 0:1] + deeper * gates[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


def _stage_taps(info, preact: bool) -> list[str]:
    return [("preact_" if preact else "") + name for name in info.stage_names]


@register_method("reviewkd")
class ReviewKD(Method):
    summary = "ReviewKD: student stages fused deep-to-shallow (ABF), matched to the teacher's by a multi-scale MSE (HCL)"
    needs_teacher = True
    tasks = ("cls",)
    taps = Taps(student=["stages", "embedding"], teacher=["preact_stages", "embedding"])
    dataset_defaults = {"imagefolder": {"reviewkd_weight": 1.0, "warmup_epochs": 0, "student_preact": True}}

    @dataclass
    class Config:
        ce_weight: float = 1.0
        reviewkd_weight: float = 5.0        # official CIFAR script for resnet32x4→resnet8x4 (per-pair table above)
        warmup_epochs: int = 20             # min(1, epoch/warmup_epochs), 0-based epochs; 0 = none
        student_preact: bool = False        # CIFAR: post-activation student maps; ImageNet: pre-activation
        teacher_preact: bool = True         # the teacher's pre-activation maps (both official settings)
        mid_channels: int = 0               # ABF width; 0 = min(512, the student's embedding width)
        hcl_levels: tuple[int, ...] = (4, 2, 1)  # pooled sizes of the hierarchical context loss
        num_stages: int = 0                 # stages distilled (the deepest); 0 = as many as both networks have

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        self.check_config(non_negative=("ce_weight", "reviewkd_weight", "warmup_epochs", "mid_channels", "num_stages"))
        if any(int(size) != size or size < 1 for size in c.hcl_levels):
            raise UserError(f"method 'reviewkd': hcl_levels must be positive integers, got {tuple(c.hcl_levels)}")
        self.taps = Taps(student=["preact_stages" if c.student_preact else "stages", "embedding"],
                         teacher=["preact_stages" if c.teacher_preact else "stages", "embedding"])
        self.student_levels: list[str] = []
        self.teacher_levels: list[str] = []
        self.out_sizes: list[tuple[int, int]] = []

    @classmethod
    def recipe_defaults(cls, run: Any, settings: dict[str, Any]) -> dict[str, Any]:
        """Dataset defaults, then the pair's weight (and ABF width) from the official scripts."""
        defaults = super().recipe_defaults(run, settings)
        pair = (run.teacher, run.model)
        if run.dataset == "imagefolder":
            defaults.update(IMAGENET_PAIR.get(pair, {}))
        elif pair in CIFAR_PAIR_WEIGHT:
            defaults["reviewkd_weight"] = CIFAR_PAIR_WEIGHT[pair]
        return defaults

    def setup(self, student, teacher) -> None:
        if teacher is None:
            raise UserError("method 'reviewkd' needs a teacher: add --teacher MODEL")
        c = self.config
        for info, side in ((student, "student"), (teacher, "teacher")):
            if not info.stage_names or "embedding" not in info.shapes:
                raise UserError(f"method 'reviewkd' needs stage taps and an embedding, but {side} {info.name} "
                                "has no timm feature_info stages or no classifier")
        s_stages = _stage_taps(student, c.student_preact)
        t_stages = _stage_taps(teacher, c.teacher_preact)
        shared = min(len(s_stages), len(t_stages))
        n = c.num_stages or shared
        if n > shared:
            raise UserError(f"method 'reviewkd': num_stages={n} but student {student.name} has {len(s_stages)} "
                            f"and teacher {teacher.name} {len(t_stages)} stages; use at most {shared}")
        # levels shallow → deep: the n deepest stages of each network, then the pooled embedding
        self.student_levels = [*s_stages[-n:], "embedding"]
        self.teacher_levels = [*t_stages[-n:], "embedding"]
        s_shapes = [student.shapes[k] if k != "embedding" else (student.embedding_dim, 1, 1) for k in self.student_levels]
        t_shapes = [teacher.shapes[k] if k != "embedding" else (teacher.embedding_dim, 1, 1) for k in self.teacher_levels]
        mid = c.mid_channels or min(512, s_shapes[-1][0])
        deepest = len(s_shapes) - 1
        self.abfs = nn.ModuleList(
            ABF(s[0], mid, t[0], fuse=i < deepest) for i, (s, t) in enumerate(zip(s_shapes, t_shapes)))
        self.out_sizes = [(t[1], t[2]) for t in t_shapes]
        self.taps = Taps(student=self.student_levels, teacher=self.teacher_levels)  # hook only what is used

    @staticmethod
    def _as_map(x: Tensor) -> Tensor:
        return x[:, :, None, None] if x.dim() == 2 else x

    def review(self, features: list[Tensor]) -> list[Tensor]:
        """The ABF outputs Y_i, shallow → deep, from the student's level maps (shallow → deep)."""
        outputs: list[Tensor] = []
        fused = None
        for i in reversed(range(len(features))):
            y, fused = self.abfs[i](features[i], fused, self.out_sizes[i])
            outputs.insert(0, y)
        return outputs

    def level_losses(self, out: StepOutputs) -> list[Tensor]:
        """Unweighted HCL of every level, shallow → deep, in the ABFs' dtype (float32 unless cast)."""
        if not self.student_levels:
            raise RuntimeError("reviewkd.setup() must run before the loss")
        teacher = self.teacher_output(out)
        dtype = self.abfs[0].conv2[0].weight.dtype
        s = [self._as_map(out.student.features[k]).to(dtype) for k in self.student_levels]
        t = [self._as_map(teacher.features[k]).detach().to(dtype) for k in self.teacher_levels]
        return [hcl_loss(y, target, self.config.hcl_levels) for y, target in zip(self.review(s), t)]

    def loss(self, out: StepOutputs):
        c = self.config
        with torch.autocast(device_type=out.student.logits.device.type, enabled=False):
            review = sum(self.level_losses(out))
            return {
                "ce": c.ce_weight * cross_entropy(out.student.logits, out.targets),
                "reviewkd": warmup_factor(out.epoch, c.warmup_epochs) * c.reviewkd_weight * review,
            }
