"""Wei, Luo, Luo, CVPR 2024, "Scale Decoupled Distillation" (SDD; SD-KD in its tables).

The global logits mix the evidence of every part of the image. SDD also distils *local* logits:
the last feature map of each network is average-pooled over the cells of an s×s grid for every
scale s in ``scales`` (M = {1, 2, 4}: 1 + 4 + 16 = 21 regions), and each region's pooled feature
goes through the network's own classifier. Each region r of each sample b gives a softened KL

    ℓ_rb = τ² · KL(σ(z_t,rb/τ) ‖ σ(z_s,rb/τ))

and the distillation term is their weighted mean over all R·B (region, sample) pairs,

    L_SDD = Σ_rb w_rb · ℓ_rb / (R·B),   L = w_ce · CE(z_s, y) + w_kd · L_SDD.

The weights tell *consistent* from *complementary* knowledge, judged by the teacher against the
label: a local region whose teacher prediction is right while the teacher's global (scale-1)
prediction is wrong, or the reverse, is complementary (w = ``complementary_weight``, 2); regions
where both are right or both are wrong, and the global region itself, are consistent (w = 1).
Why: complementary regions are where the sample is ambiguous; weighting them up makes the
student attend to those samples. With ``scales = [1]`` the term is plain KD on the logits.

Exactly as shicaiwei123/SDD-CVPR2024 (``mdistiller/distillers/KD.py``: sdd_kd_loss and SDD_KD;
``mdistiller/models/cifar/utils.py``: SPP). As in SPP, the map is first pooled to a
``spp_grid``×``spp_grid`` (4×4) grid and every scale is pooled from that grid — the same as
pooling the map directly when its size is a multiple of 4 (CIFAR's 8×8), not quite on ImageNet's
7×7, where the official regions overlap. A NaN per-class KL is set to 0, as there.

kdzoo reads the last feature map through the ``features`` tap (timm's ``forward_features``
output) and applies the network's own head to each region, ``model.forward_head`` on a 1×1 map
of the region's pooled feature: global pooling of a 1×1 map is the identity, then the head's
norm (ConvNeXt), its 1×1 conv (MobileNetV3) and its classifier, so any timm CNN works. The
student's head gets the gradient of every region; the teacher's is run under no_grad. ViT-like
students (token outputs ``(B, N, D)``): the patch tokens are laid out on their grid (the
``stage`` taps' rule), pooled per region, and each region's mean token is given to
``forward_head`` as a sequence in which every token, class token included, is that mean — so a
class-token, average-pooling or attention-pooling head all read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdzoo.errors import UserError
from kdzoo.hooks import as_feature_map
from kdzoo.losses import cross_entropy, softened_kl
from kdzoo.method import Method, StepOutputs, Taps
from kdzoo.registry import register_method

# Teacher→student pairs the official scripts run with M = [1, 2] (same-family pairs); every
# other pair uses the default [1, 2, 4]. teacher_resnet32x4.sh, teacher_vgg.sh, run.sh.
PAIR_SCALES = {
    ("cifar_resnet32x4", "cifar_resnet8x4"): [1, 2],
    ("cifar_vgg13", "cifar_vgg8"): [1, 2],
    ("resnet34", "resnet18"): [1, 2],
}


def region_features(feature_map: Tensor, scales, grid: int) -> Tensor:
    """``(B, C, H, W)`` → ``(R·B, C)``: the mean feature of every cell of every scale, regions
    major (row r·B + b is region r of sample b), scales in the given order, cells row by row.

    The map is pooled to ``grid``×``grid`` first and each scale from that grid (the official SPP).
    """
    pooled = F.adaptive_avg_pool2d(feature_map, grid)
    cells = [F.adaptive_avg_pool2d(pooled, s).flatten(2) for s in scales]  # (B, C, s²) each
    regions = torch.cat(cells, dim=2)                                      # (B, C, R)
    return regions.permute(2, 0, 1).reshape(-1, feature_map.shape[1])      # (R·B, C)


def region_logits(model: nn.Module, features: Tensor, scales, grid: int) -> Tensor:
    """The network's own head applied to every region of its last feature map: ``(R·B, K)``."""
    if features.dim() == 4:
        fmap = as_feature_map(features, model)  # NHWC outputs become NCHW
        regions = region_features(fmap, scales, grid)
        return model.forward_head(regions[:, :, None, None].to(features.dtype))
    if features.dim() == 3:  # tokens (B, N, D): the patch tokens on their grid
        fmap = as_feature_map(features, model)
        regions = region_features(fmap, scales, grid)  # (R·B, D)
        tokens = int(getattr(model, "num_prefix_tokens", 0) or 0) + 1
        return model.forward_head(regions[:, None, :].expand(-1, tokens, -1).to(features.dtype))
    raise UserError(f"sdd: the last feature map of {type(model).__name__} has shape {tuple(features.shape)}, "
                    "neither a (B, C, H, W) map nor (B, N, D) tokens")


def sdd_kd_loss(student: Tensor, teacher: Tensor, targets: Tensor, temperature: float, batch: int,
                complementary_weight: float) -> Tensor:
    """Σ w · τ²·KL per region over all R·B rows / (R·B); rows region-major, the first B global."""
    regions = student.shape[0] // batch
    per_row = softened_kl(student, teacher, temperature, reduction="none")
    per_row = torch.nan_to_num(per_row, nan=0.0)
    labels = targets.repeat(regions)
    local_right = teacher.argmax(dim=1) == labels
    global_right = local_right[:batch].repeat(regions)
    complementary = local_right != global_right  # the global rows are never complementary
    weights = torch.where(complementary, complementary_weight, 1.0).to(per_row.dtype)
    return (per_row * weights).sum() / per_row.shape[0]


@register_method("sdd", aliases=("sd_kd",))
class SDD(Method):
    summary = "Scale-decoupled KD: KD on the logits of multi-scale regions, complementary regions weighted up"
    needs_teacher = True
    tasks = ("cls",)
    taps = Taps(student=["features"], teacher=["features"])

    @dataclass
    class Config:
        temperature: float = 4.0
        ce_weight: float = 0.1
        kd_weight: float = 0.9
        scales: list[int] = field(default_factory=lambda: [1, 2, 4])  # M; the first must be 1 (global)
        complementary_weight: float = 2.0
        spp_grid: int = 4

    def __init__(self, config=None):
        super().__init__(config)
        self.check_config(positive=("temperature", "spp_grid"),
                          non_negative=("ce_weight", "kd_weight", "complementary_weight"))
        scales = list(self.config.scales)
        if not scales or scales[0] != 1 or any(s < 1 for s in scales):
            raise UserError(f"method 'sdd': scales must start with 1 (the global region) and be positive, "
                            f"got {scales}; e.g. --set scales=1,2,4")
        self._nets: dict[str, nn.Module | None] = {}

    @classmethod
    def recipe_defaults(cls, run, settings):
        defaults = super().recipe_defaults(run, settings)
        scales = PAIR_SCALES.get((run.teacher, run.model))
        if scales is not None:
            defaults["scales"] = list(scales)
        return defaults

    def install(self, student, teacher):
        for name, model in (("student", student), ("teacher", teacher)):
            if model is not None and not callable(getattr(model, "forward_head", None)):
                raise UserError(f"method 'sdd' applies the {name}'s own classifier to image regions and needs a "
                                f"timm model with forward_head; {type(model).__name__} has none")
        self._nets = {"student": student, "teacher": teacher}  # a plain dict: not registered as submodules
        return []

    def _network(self, name: str) -> nn.Module:
        model = self._nets.get(name)
        if model is None:
            raise RuntimeError("method 'sdd': install(student, teacher) must run before loss()")
        return model

    def loss(self, out: StepOutputs):
        c = self.config
        teacher = self.teacher_output(out)
        targets = out.targets.argmax(dim=1) if out.targets.dtype.is_floating_point else out.targets
        terms = {"ce": c.ce_weight * cross_entropy(out.student.logits, out.targets)}
        if list(c.scales) == [1]:  # the official M = [1]: plain KD on the logits
            terms["kd"] = c.kd_weight * softened_kl(out.student.logits, teacher.logits, c.temperature)
            return terms
        batch = out.student.logits.shape[0]
        student_regions = region_logits(self._network("student"), out.student.features["features"], c.scales, c.spp_grid)
        with torch.no_grad():
            teacher_regions = region_logits(self._network("teacher"), teacher.features["features"].detach(),
                                            c.scales, c.spp_grid)
        terms["kd"] = c.kd_weight * sdd_kd_loss(student_regions, teacher_regions, targets, c.temperature, batch,
                                                c.complementary_weight)
        return terms
