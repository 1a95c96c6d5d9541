"""FRSKD: "Refine Myself by Teaching Myself: Feature Refinement via Self-Knowledge Distillation"
(Ji et al., CVPR 2021); reference code MingiJi/FRSKD.

There is no pretrained teacher. A small trainable *self-teacher* (a BiFPN-style network) reads the
classifier's own stage maps F_1..F_n, refines them top-down and bottom-up into R_1..R_n and
classifies from the last one. Both networks learn from the labels; the classifier additionally
imitates the self-teacher's softened logits and the spatial attention of its refined maps:

    L = CE(z_c, y) + CE(z_t, y)
        + α · τ² · KL_b( σ(sg(z_t)/τ) ‖ σ(z_c/τ) )
        + β · Σ_i mean_{b,p} ( a(F_i) − a(sg(R_i)) )²

with a(X) = the per-sample channel mean of X², flattened over H·W and L2-normalised
(:func:`kdzoo.losses.attention_map`, p = 2; the term is :func:`kdzoo.losses.attention_loss`). The
reference averages the squared difference over batch and positions (MSE), while the paper writes
an L2 norm; kdzoo follows the code. The τ²·KL term is :func:`kdzoo.losses.softened_kl`. The stage
maps enter the self-teacher *without* a stop-gradient, so the self-teacher's cross-entropy also
trains the classifier's backbone; both distillation terms move only the classifier.

Segmentation (``--task seg``, the paper's VOC setting; defaults α = 1, β = 50, τ = 1, and α, β
zero for the first 2/3 of training, then sigmoid-ramped): the self-teacher refines the
segmentation backbone's stages the same way and predicts per pixel with a 1×1 conv on R_1 (the
finest refined map, which the top-down path has fused with every coarser level), upsampled to the
input; both CEs are per labelled pixel and the KD term is per pixel, normalised by B·H·W.

Variants (``aug``): mixup and cutmix mix the batch in :meth:`FRSKD.prepare_batch`; every term is
then computed on the mixed batch with the mixed soft targets. ``sla=true`` adds self-supervised
label augmentation (four rotations and joint class×rotation heads), as in the reference code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdzoo.errors import UserError
from kdzoo.losses import (
    attention_loss,
    class_probabilities,
    cross_entropy,
    downsample_max,
    resize_bilinear,
    softened_kl,
    upsample_nearest,
)
from kdzoo.method import Batch, Method, StepOutputs, Taps
from kdzoo.registry import register_method

Size = tuple[int, int]

_FUSION_EPS = 1e-6  # EfficientDet's fast-normalised-fusion epsilon, as in the reference


# -- plain functions, so the tests can check each one ---------------------------------------

def ramp(progress: float, start: float, length: float) -> float:
    """Factor of α and β at ``progress`` (0 → 1 over training): 0 before ``start``, then the
    sigmoid ramp-up exp(−5·(1 − t)²) over ``length``, then 1. With start = length = 0, always 1.

    The paper ramps α and β this way only in its segmentation setting (zero for 40 of 60
    epochs); the exact curve is kdzoo's reading of "sigmoid ramp".
    """
    if progress < start:
        return 0.0
    if length <= 0:
        return 1.0
    t = min(1.0, (progress - start) / length)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def fusion_weights(raw: Tensor) -> Tensor:
    """Fast normalised fusion: ReLU(w) / (Σ ReLU(w) + ε). Non-negative, sums to at most 1."""
    w = F.relu(raw)
    return w / (w.sum() + _FUSION_EPS)


# -- the self-teacher -------------------------------------------------------------------------

class Pointwise(nn.Sequential):
    """1×1 conv (no bias) → BN → ReLU: the laterals and the projections after resampling."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DepthwiseSeparable(nn.Sequential):
    """``depth`` × (depthwise 3×3 → pointwise 1×1 → BN), with a ReLU between repeats only.

    The output ends in BN, not ReLU: the next consumer applies the ReLU itself, which keeps the
    pre-activation available exactly as in the reference.
    """

    def __init__(self, channels: int, depth: int):
        layers: list[nn.Module] = []
        for i in range(depth):
            if i:
                layers.append(nn.ReLU())
            layers += [
                nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                nn.Conv2d(channels, channels, 1, bias=False),
                nn.BatchNorm2d(channels),
            ]
        super().__init__(*layers)


class SelfTeacher(nn.Module):
    """One BiFPN layer with per-level widths d_i = width · C_i (the reference's ``BiFPNc``).

    Top-down:  P_n = L_n;  P_i = DS_i( ŵ₁·L_i + ŵ₂·PW(up(P_{i+1})) )
    Bottom-up: T_1 = P_1;  T_i = DS'_i( ŵ₁·L'_i + ŵ₂·P_i + ŵ₃·PW(down(T_{i−1})) )  (no P_n term)
    Output:    R_i = ReLU(T_i),  z_t = Linear(GAP(R_n))

    L_i and L'_i are two separately parameterised 1×1 laterals of the same stage map; every
    fused input passes through a ReLU first. ``up`` is :func:`kdzoo.losses.upsample_nearest` and
    ``down`` :func:`kdzoo.losses.downsample_max`. The reference assumes each stage halves the
    resolution (×2 nearest upsample, stride-2 same-padded max-pool); kdzoo uses exactly those
    whenever the sizes halve and adapts to whatever other sizes arrive, so the same module works
    for halving CNN stages, odd sizes and equal-size ViT grids.
    """

    def __init__(self, channels: list[int], num_classes: int, width: int = 2, depth: int = 2, dense: bool = False):
        super().__init__()
        self.dense = dense
        n = len(channels)
        d = [width * c for c in channels]
        self.widths = d
        self.lateral = nn.ModuleList(Pointwise(c, di) for c, di in zip(channels, d))
        self.lateral_bu = nn.ModuleList(Pointwise(channels[i], d[i]) for i in range(1, n))
        # Top-down node i (0-based, i < n−1) fuses level i with the resampled level i+1.
        self.td_proj = nn.ModuleList(Pointwise(d[i + 1], d[i]) for i in range(n - 1))
        self.td_conv = nn.ModuleList(DepthwiseSeparable(d[i], depth) for i in range(n - 1))
        self.td_weight = nn.ParameterList(nn.Parameter(torch.ones(2)) for _ in range(n - 1))
        # Bottom-up node i (1 ≤ i ≤ n−1) fuses its second lateral, P_i (except at the top) and T_{i−1}.
        self.bu_proj = nn.ModuleList(Pointwise(d[i - 1], d[i]) for i in range(1, n))
        self.bu_conv = nn.ModuleList(DepthwiseSeparable(d[i], depth) for i in range(1, n))
        self.bu_weight = nn.ParameterList(nn.Parameter(torch.ones(3 if i < n - 1 else 2)) for i in range(1, n))
        # dense (segmentation): per-pixel logits from R_1; else logits from the pooled R_n
        self.fc = nn.Conv2d(d[0], num_classes, 1) if dense else nn.Linear(d[-1], num_classes)

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Stage maps (finest first) → (refined maps R_1..R_n, self-teacher logits z_t)."""
        n = len(feats)
        if n != len(self.lateral):
            raise RuntimeError(f"the self-teacher was built for {len(self.lateral)} stages, got {n}")
        feats = [F.relu(f) for f in feats]
        sizes = [tuple(f.shape[-2:]) for f in feats]
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        lat_bu = [None] + [conv(f) for conv, f in zip(self.lateral_bu, feats[1:])]

        top_down: list[Tensor] = [None] * n  # type: ignore[list-item]
        top_down[-1] = lat[-1]
        for i in range(n - 2, -1, -1):
            w = fusion_weights(self.td_weight[i])
            coarser = self.td_proj[i](upsample_nearest(F.relu(top_down[i + 1]), sizes[i]))
            top_down[i] = self.td_conv[i](w[0] * F.relu(lat[i]) + w[1] * coarser)

        outs = [top_down[0]]
        for i in range(1, n):
            w = fusion_weights(self.bu_weight[i - 1])
            finer = self.bu_proj[i - 1](downsample_max(F.relu(outs[-1]), sizes[i]))
            inputs = [F.relu(lat_bu[i]), F.relu(top_down[i]), finer] if i < n - 1 else [F.relu(lat_bu[i]), finer]
            outs.append(self.bu_conv[i - 1](sum(wk * x for wk, x in zip(w, inputs))))

        refined = [F.relu(t) for t in outs]
        logits = self.fc(refined[0]) if self.dense else self.fc(refined[-1].mean(dim=(2, 3)))
        return refined, logits


# -- helpers for the augmentation variants ---------------------------------------------------

def _beta(concentration: float, device: torch.device) -> Tensor:
    """λ ~ Beta(a, a) as a 0-d tensor drawn on ``device`` (no host synchronisation)."""
    a = torch.tensor(float(concentration), device=device)
    return torch.distributions.Beta(a, a).sample()


def mixup(images: Tensor, targets: Tensor, concentration: float) -> tuple[Tensor, Tensor]:
    """x = λ·x + (1−λ)·x[π], y = λ·y + (1−λ)·y[π], one λ per batch (``targets`` as (B, K))."""
    lam = _beta(concentration, images.device)
    perm = torch.randperm(images.shape[0], device=images.device)
    mixed = lam.to(images.dtype) * images + (1 - lam).to(images.dtype) * images[perm]
    return mixed, lam * targets + (1 - lam) * targets[perm]


def cutmix_box(size: Size, lam: Tensor) -> Tensor:
    """The (H, W) boolean box that receives the partner image, as the reference draws it.

    Side lengths ⌊H·√(1−λ)⌋ and ⌊W·√(1−λ)⌋, centre uniform over the image, half-sides rounded
    down and the box clipped to the image; it may therefore cover less than 1−λ of the area.
    """
    h, w = size
    device = lam.device
    cut = torch.sqrt(1 - lam)
    half_h = torch.floor(h * cut).long() // 2
    half_w = torch.floor(w * cut).long() // 2
    cy = torch.randint(h, (), device=device)
    cx = torch.randint(w, (), device=device)
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    in_rows = (rows >= (cy - half_h).clamp(0, h)) & (rows < (cy + half_h).clamp(0, h))
    in_cols = (cols >= (cx - half_w).clamp(0, w)) & (cols < (cx + half_w).clamp(0, w))
    return in_rows[:, None] & in_cols[None, :]


def cutmix(images: Tensor, targets: Tensor, concentration: float) -> tuple[Tensor, Tensor]:
    """Paste a box of a permuted partner; λ becomes the share of pixels that stayed the image's own."""
    lam = _beta(concentration, images.device)
    perm = torch.randperm(images.shape[0], device=images.device)
    box = cutmix_box(tuple(images.shape[-2:]), lam)
    mixed = torch.where(box, images[perm], images)
    kept = 1 - box.float().mean()
    return mixed, kept * targets + (1 - kept) * targets[perm]


def rotations(images: Tensor) -> Tensor:
    """(B, C, S, S) → (4B, C, S, S): each image at 0°, 90°, 180°, 270°, sample-major (b·4 + r)."""
    if images.shape[-1] != images.shape[-2]:
        raise UserError(f"frskd sla=true rotates images by 90°, which needs square inputs, got {tuple(images.shape[-2:])}")
    return torch.stack([torch.rot90(images, k, (2, 3)) for k in range(4)], dim=1).flatten(0, 1)


def joint_targets(targets: Tensor) -> Tensor:
    """(B, K) class probabilities → (4B, 4K) joint class×rotation targets, index k·4 + r."""
    b, k = targets.shape
    eye = torch.eye(4, device=targets.device, dtype=targets.dtype)
    return (targets[:, None, :, None] * eye[None, :, None, :]).reshape(4 * b, 4 * k)


def aggregate_rotations(joint_logits: Tensor) -> Tensor:
    """(4B, 4K) joint logits → (B, K): per rotation r, its own class block, averaged over r."""
    return torch.stack([joint_logits[r::4, r::4] for r in range(4)], dim=1).mean(dim=1)


# -- the method -------------------------------------------------------------------------------

@register_method("frskd")
class FRSKD(Method):
    """Feature refinement via self-knowledge distillation with a BiFPN self-teacher."""

    summary = "self-KD: a BiFPN self-teacher on the stages teaches logits (KD) and attention maps"
    needs_teacher = False
    tasks = ("cls", "seg")
    taps = Taps(student=["stages"])
    # spec §1.3, the segmentation setting: α = 1, β = 50, τ = 1; α = β = 0 for 40 of 60 epochs,
    # then the sigmoid ramp over the last 20 (the ramp's length is kdzoo's reading)
    short_budget_note = ("FRSKD's self-teacher starts untrained: in the first epochs its KD (α = 2, τ = 4) and "
                         "attention (β = 100) terms pull the classifier towards a network weaker than the labels; "
                         "the paper trains 200 epochs (--recipe cifar100-frskd)")
    task_defaults = {"seg": {"alpha": 1.0, "beta": 50.0, "temperature": 1.0, "ramp_start": 2 / 3, "ramp_length": 1 / 3}}

    @dataclass
    class Config:
        alpha: float = 2.0  # weight of the logit KD term (times τ²)
        beta: float = 100.0  # weight of the attention term
        temperature: float = 4.0  # τ of the logit KD term
        width: int = 2  # self-teacher width d_i = width · C_i
        depth: int = 2  # depthwise-separable repeats per fusion node
        num_stages: int = 0  # use the last N stages (the reference's --num_features); 0 = all
        aug: Literal["none", "mixup", "cutmix"] = "none"
        mix_alpha: float | None = None  # Beta(a, a) of mixup/cutmix; none = 0.2 (mixup), 1.0 (cutmix)
        sla: bool = False  # self-supervised label augmentation (4 rotations, joint heads)
        sla_weight: float = 1.0  # weight of SLA's aggregated-logit KD (the reference's aux_lamb)
        ramp_start: float = 0.0  # fraction of training with α = β = 0 (the paper's segmentation setting: 40/60)
        ramp_length: float = 0.0  # fraction of training over which α, β then rise to full (sigmoid ramp)

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        self.check_config(positive=("temperature", "width", "depth", "mix_alpha"),
                          non_negative=("alpha", "beta", "sla_weight", "num_stages"),
                          unit=("ramp_start", "ramp_length"))
        if c.sla and c.aug != "none":
            raise UserError("method 'frskd': sla=true cannot be combined with aug=mixup/cutmix; pick one")
        self.num_classes = 0
        self.num_used = 0
        self.dense = False

    def setup(self, student, teacher=None) -> None:
        c = self.config
        names = student.stage_names
        if not names:
            raise UserError(f"method 'frskd' needs stage maps, and model {student.name!r} has none")
        if c.num_stages > len(names):
            raise UserError(f"method 'frskd': num_stages={c.num_stages} but {student.name} has {len(names)} stages")
        self.num_used = c.num_stages or len(names)
        channels = student.stage_channels[-self.num_used:]
        self.num_classes = student.num_classes
        self.dense = student.task == "seg"
        if self.dense and (c.sla or c.aug != "none"):
            raise UserError("method 'frskd' on segmentation supports neither sla nor mixup/cutmix; use aug=none, sla=false")
        self.self_teacher = SelfTeacher(channels, student.num_classes, c.width, c.depth, dense=self.dense)
        if c.sla:
            self.rotation_head = nn.Linear(channels[-1], 4 * student.num_classes)
            self.rotation_head_self = nn.Linear(self.self_teacher.widths[-1], 4 * student.num_classes)

    def prepare_batch(self, batch: Batch, augment) -> Batch:
        c = self.config
        images, targets, index = augment(batch.images), batch.targets, batch.index
        if c.sla:  # the batch, then its four rotations (sample-major): each row keeps its image's index
            return Batch(torch.cat([images, rotations(images)]), targets, torch.cat([index, index.repeat_interleave(4)]))
        if c.aug == "none":
            return Batch(images, targets, index)
        soft = class_probabilities(targets, self.num_classes)
        mix = mixup if c.aug == "mixup" else cutmix
        concentration = c.mix_alpha if c.mix_alpha is not None else (0.2 if c.aug == "mixup" else 1.0)
        mixed, mixed_targets = mix(images, soft, concentration)
        return Batch(mixed, mixed_targets, index)  # a mixed row keeps the index of the image it was

    def _distill(self, z_c: Tensor, z_t: Tensor, feats: list[Tensor], refined: list[Tensor],
                 progress: float) -> dict[str, Tensor]:
        """The two FRSKD terms; the self-teacher's outputs are detached, so only the classifier moves."""
        c = self.config
        scale = ramp(progress, c.ramp_start, c.ramp_length)
        return {
            "kd": scale * c.alpha * softened_kl(z_c, z_t.detach(), c.temperature),
            "att": scale * c.beta * sum(attention_loss(f, r) for f, r in zip(feats, refined)),
        }

    def loss(self, out: StepOutputs) -> dict[str, Tensor]:
        feats = out.student.stages[-self.num_used:]
        refined, z_t = self.self_teacher(feats)
        z_c = out.student.logits
        if self.dense:  # the self-teacher predicts at R_1's resolution; compare at the student's
            z_t = resize_bilinear(z_t, z_c.shape[-2:])
        if self.config.sla:
            return self._sla_loss(out, z_c, z_t, feats, refined)
        return {
            "ce": cross_entropy(z_c, out.targets),
            "ce_self": cross_entropy(z_t, out.targets),
            **self._distill(z_c, z_t, feats, refined, out.progress),
        }

    def _sla_loss(self, out, z_c, z_t, feats, refined) -> dict[str, Tensor]:
        """The reference's SLA variant on the batch [originals (B); their 4 rotations (4B)].

        Both networks get CE on the originals and a joint class×rotation CE from their extra
        head on the rotated copies; each network also distils from its own rotation-aggregated
        head (detached). The FRSKD terms then run on [originals; aggregated] logits and on the
        stage maps of all 5B images.
        """
        c = self.config
        b = out.targets.shape[0]
        if z_c.shape[0] != 5 * b:
            raise RuntimeError(f"frskd sla=true expects 5B = {5 * b} samples (originals + 4 rotations), got {z_c.shape[0]}")
        joint = joint_targets(class_probabilities(out.targets, self.num_classes))
        rot_c = self.rotation_head(feats[-1][b:].float().mean(dim=(2, 3)))
        rot_t = self.rotation_head_self(refined[-1][b:].float().mean(dim=(2, 3)))
        agg_c, agg_t = aggregate_rotations(rot_c), aggregate_rotations(rot_t)
        own_kd = (softened_kl(z_c[:b], agg_c.detach(), c.temperature)
                  + softened_kl(z_t[:b], agg_t.detach(), c.temperature))
        return {
            "ce": cross_entropy(z_c[:b], out.targets),
            "ce_self": cross_entropy(z_t[:b], out.targets),
            "sla_ce": cross_entropy(rot_c, joint) + cross_entropy(rot_t, joint),
            "sla_kd": c.sla_weight * own_kd,
            **self._distill(torch.cat([z_c[:b], agg_c]), torch.cat([z_t[:b], agg_t]), feats, refined, out.progress),
        }
