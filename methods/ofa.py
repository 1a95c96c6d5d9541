"""OFA-KD: Hao, Guo, Han, Tang, Hu, Wang, Xu, "One-for-All: Bridge the Gap Between Heterogeneous
Architectures in Knowledge Distillation", NeurIPS 2023 (arXiv 2310.19444).

Why: a CNN's and a ViT's intermediate features hardly resemble each other (the paper measures it
with CKA), so matching them feature to feature — FitNet-style — teaches the student the teacher's
architecture rather than its knowledge. OFA compares the networks where every architecture
agrees, in the space of class probabilities: each of the student's four stages gets an *exit
branch* that turns its features into logits, and every branch, like the student's own head, learns
the teacher's prediction. The OFA loss also *enhances the target class*: the teacher's probability
on the true class y is raised to (1 + p_t^y)^ε − 1 (other classes to (p_t^c)^ε), which puts more
weight on the label where the teacher is confident and, with ε > 1, shrinks the small non-target
probabilities, the part of the teacher's answer a heterogeneous student is least able to use.

    q_c   = (p_t^c + 1[c = y])^ε − 1[c = y]         p_t = σ(z_t / τ); y the label (argmax of soft targets)
    ℓ(z, ε) = −(1/B) Σ_b Σ_c q_c · log σ(z / τ)_c
    L = ce_weight · CE_ls(z_s, y) + kd_weight · ℓ(z_s, ε_last) + ofa_weight · Σ_k ℓ(branch_k(F_k), ε_k)

CE_ls is cross-entropy with label smoothing (the official configs' ``smoothing: 0.1``). No τ²
factor: the official ``ofa_loss`` has none. ``eps`` holds one ε for everything or one per branch
plus one for the final logits (the official ``--ofa-eps``).

The exit branches (Hao840/OFAKD ``distillers/ofa.py``, ``distillers/utils.py``), built from the
tapped stage shapes; D = max(student's, teacher's embedding width), n = 4 − k for OFA stage k:

- **conv students** (a stage is a (C, H, W) map): n SepConvs (depthwise 3×3 stride 2, 1×1, BN,
  ReLU, depthwise 3×3, 1×1, BN, ReLU), the channels doubling and the last one giving D — stage 4:
  a 1×1 conv to D — then global average pooling and a linear layer to the classes.
- **token students** (ViT, DeiT, Swin, MLP-Mixer …; kdzoo hands their tokens over as the (C, H, W)
  grid): max(⌊log2(H / 7)⌋, 0) Swin patch mergings (2×2 neighbours concatenated, LayerNorm, linear
  without bias, GELU except on the last of several; the first maps to the student's embedding
  width E), max(4 − k, 1) ViT blocks of width E with 4 heads, the mean over tokens and a linear
  layer to the classes.

Which of the student's stages are OFA's stages 1–4 (``stages`` names OFA stages): on a network
with four or more resolution stages the last four (stage 4 is the last); a network with fewer has
only the last of OFA's stages and the others are skipped; on an isotropic network (every stage the
same shape: a ViT's blocks) blocks 2, 4, D − 2 and D of D — the official choice (1, 3, 9, 11
counted from 0 on every 12-block ViT, 1, 3, 21, 23 on 24 blocks) — or, below 8 blocks, the
ends of four equal quarters, ⌈D·k/4⌉.
Where this differs from the code, see docs/methods/ofa.md (the cls token, odd grids, widths).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from kdzoo.errors import UserError
from kdzoo.losses import cross_entropy
from kdzoo.method import Method, StepOutputs, Taps
from kdzoo.registry import register_method

OFA_STAGES = 4            # OFA splits every network into four stages
FINAL_PATCH_GRID = 7      # token branches merge patches down to a 7×7 grid (49 tokens)
BRANCH_HEADS = 4          # attention heads of the branch blocks
# timm modules whose networks compute on token sequences (the official code's "not CNN" students)
TOKEN_MODULES = ("vision_transformer", "vision_transformer_hybrid", "vision_transformer_relpos", "deit", "beit",
                 "cait", "eva", "xcit", "swin_transformer", "swin_transformer_v2", "swin_transformer_v2_cr",
                 "mlp_mixer", "volo", "tnt", "crossvit", "twins", "pit", "levit")


def ofa_loss(logits: Tensor, teacher_logits: Tensor, target_mask: Tensor, eps: float, temperature: float) -> Tensor:
    """ℓ = −mean_b Σ_c ((p_t + m)^ε − m)_c · log σ(z/τ)_c, m the one-hot label mask; float32."""
    log_p_s = torch.log_softmax(logits.float() / temperature, dim=-1)
    p_t = torch.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    weight = (p_t + target_mask).pow(eps) - target_mask
    return torch.sum(-weight * log_p_s, dim=-1).mean()


def label_mask(targets: Tensor, num_classes: int) -> Tensor:
    """One-hot of the label; of the argmax for soft (mixed) targets, as the official code does."""
    if targets.dtype.is_floating_point:
        targets = targets.argmax(dim=-1)
    return F.one_hot(targets, num_classes).float()


# -- exit branches ---------------------------------------------------------------------------------

class SepConv(nn.Sequential):
    """Depthwise-separable down-sampling by 2, twice separable: the DARTS/OFA ``SepConv``."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(),
            nn.Conv2d(c_in, c_in, 3, stride=1, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )


def conv_branch(channels: int, stage: int, width: int, num_classes: int) -> nn.Sequential:
    """Stage map (B, C, H, W) → logits: 4 − stage SepConvs (stage 4: a 1×1 conv) to ``width``, pool, linear."""
    if stage < OFA_STAGES:
        blocks, c = [], channels
        for i in range(OFA_STAGES - stage):
            blocks.append(SepConv(c, width if i == OFA_STAGES - stage - 1 else c * 2))
            c *= 2
    else:
        blocks = [nn.Conv2d(channels, width, 1)]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class PatchMerging(nn.Module):
    """Swin's 2×2 patch merging on a (B, H, W, C) grid: concatenate the four neighbours (order
    (0,0), (1,0), (0,1), (1,1)), LayerNorm, linear without bias, activation. An odd side is padded
    with zeros (the official code refuses odd grids)."""

    def __init__(self, dim: int, out_dim: int, act: bool):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[1:3]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.act(self.reduction(self.norm(x)))


class TokenBranch(nn.Module):
    """Token grid (B, C, H, W) → logits: patch mergings down to 7×7, ViT blocks, mean over tokens, linear."""

    def __init__(self, channels: int, grid: int, stage: int, width: int, num_classes: int):
        super().__init__()
        merges = max(int(math.log2(grid / FINAL_PATCH_GRID)), 0) if grid > 0 else 0
        mergers: list[nn.Module] = [PatchMerging(channels if i == 0 else width, width, act=i == 0 or i != merges - 1)
                                    for i in range(merges)]
        if not mergers and channels != width:  # the official code has no case for this (kdzoo's addition)
            mergers.append(nn.Linear(channels, width))
        self.merge = nn.Sequential(*mergers)
        if width % BRANCH_HEADS:
            raise UserError(f"method 'ofa': the exit branches of a token student run {BRANCH_HEADS}-head attention "
                            f"blocks of the student's embedding width, which must be divisible by {BRANCH_HEADS} "
                            f"(it is {width}); use --set branch=conv")
        # timm 0.6.5's Block defaults, which the official code used: LayerNorm eps 1e-5, no qkv bias
        self.blocks = nn.Sequential(*[Block(dim=width, num_heads=BRANCH_HEADS, qkv_bias=False, norm_layer=nn.LayerNorm)
                                      for _ in range(max(OFA_STAGES - stage, 1))])
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.merge(x.permute(0, 2, 3, 1))   # (B, H', W', E)
        x = self.blocks(x.flatten(1, 2))         # (B, H'·W', E)
        return self.head(x.mean(dim=1))


def init_branch(module: nn.Module) -> None:
    """The official ``init_weights``: convs Kaiming-normal (fan-out, ReLU), BN 1/0, linears
    truncated-normal σ = 0.02 with zero bias; LayerNorms keep their 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# -- which stages, which branch ---------------------------------------------------------------------

def is_isotropic(info) -> bool:
    shapes = [info.shapes[k] for k in info.stage_names]
    return len(shapes) > 1 and all(s == shapes[0] for s in shapes)


def stage_map(info) -> dict[int, str]:
    """OFA stage k (1..4) → the student's stage tap it reads; stages the student lacks are absent."""
    names = info.stage_names
    n = len(names)
    if is_isotropic(info):
        ends = [2, 4, n - 2, n] if n >= 8 else [math.ceil(n * k / OFA_STAGES) for k in range(1, OFA_STAGES + 1)]
        return {k: names[e - 1] for k, e in enumerate(ends, start=1)}
    return {k: names[n - OFA_STAGES + k - 1] for k in range(1, OFA_STAGES + 1) if n - OFA_STAGES + k >= 1}


def is_token_model(info) -> bool:
    """The official code tells CNN students from the rest by their feature shape; kdzoo's stage
    taps give every network maps, so it asks timm which family the student comes from (an
    isotropic network of unknown family counts as a token model)."""
    return timm.models.is_model_in_modules(info.name, TOKEN_MODULES) or is_isotropic(info)


@register_method("ofa")
class OFA(Method):
    summary = "One-for-All KD: exit branches project every student stage to logits, target-enhanced KD on each"
    needs_teacher = True
    logits_only_teacher = True   # the teacher is read at its logits only
    taps = Taps(student=["stages"])
    dataset_defaults = {"imagefolder": {"eps": (1.5,)}}

    @dataclass
    class Config:
        eps: tuple[float, ...] = (1.0,)          # ε: one value, or one per stage plus one for the logits
        stages: tuple[int, ...] = (1, 2, 3, 4)   # OFA stages with an exit branch
        temperature: float = 1.0                 # τ
        ce_weight: float = 1.0                   # official gt_loss_weight
        kd_weight: float = 1.0                   # the OFA term on the student's own logits
        ofa_weight: float = 1.0                  # the branches' OFA terms (summed)
        label_smoothing: float = 0.1             # of the CE (official configs: smoothing 0.1)
        branch: Literal["auto", "conv", "token"] = "auto"

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        self.check_config(positive=("temperature",), non_negative=("ce_weight", "kd_weight", "ofa_weight"),
                          unit=("label_smoothing",))
        if not c.stages or any(k not in range(1, OFA_STAGES + 1) for k in c.stages) or len(set(c.stages)) != len(c.stages):
            raise UserError(f"method 'ofa': stages must be distinct OFA stages among 1, 2, 3, 4, got {c.stages} "
                            "(--set stages=1,2,3,4)")
        if len(c.eps) not in (1, len(c.stages) + 1):
            raise UserError(f"method 'ofa': eps takes one value or {len(c.stages) + 1} (one per stage, then one for "
                            f"the logits), got {len(c.eps)} (--set eps=1.5)")
        if any(not e > 0 for e in c.eps):
            raise UserError(f"method 'ofa': eps must be positive, got {c.eps}")
        eps = c.eps * (len(c.stages) + 1) if len(c.eps) == 1 else c.eps
        self.stage_eps = dict(zip(c.stages, eps[:-1]))
        self.logit_eps = eps[-1]
        self.branch_taps: dict[int, str] = {}
        self.branch_kind = ""

    def setup(self, student, teacher) -> None:
        if teacher is None:
            raise UserError("method 'ofa' needs a teacher: add --teacher MODEL")
        if not student.stage_names:
            raise UserError(f"method 'ofa' reads the student's stages, but {student.name} has no timm feature_info")
        available = stage_map(student)
        self.branch_taps = {k: available[k] for k in self.config.stages if k in available}
        if not self.branch_taps:
            raise UserError(f"method 'ofa': {student.name} has none of the OFA stages {self.config.stages}; "
                            f"it has {len(student.stage_names)} stage(s), OFA's stage 4 is its last")
        kind = self.config.branch
        self.branch_kind = kind if kind != "auto" else ("token" if is_token_model(student) else "conv")
        self.taps = Taps(student=sorted(set(self.branch_taps.values()), key=lambda k: int(k[5:])))
        classes = student.shapes["logits"][0]
        branches = {}
        for k, tap in self.branch_taps.items():
            c, h, w = student.shapes[tap]
            if self.branch_kind == "conv":
                branches[str(k)] = conv_branch(c, k, max(student.embedding_dim, teacher.embedding_dim), classes)
            else:
                branches[str(k)] = TokenBranch(c, math.isqrt(h * w), k, student.embedding_dim, classes)
        self.branches = nn.ModuleDict(branches)
        init_branch(self.branches)

    def branch_logits(self, out: StepOutputs) -> dict[int, Tensor]:
        if not self.branch_taps:
            raise RuntimeError("ofa.setup() must run before the loss")
        return {k: self.branches[str(k)](out.student.features[tap]) for k, tap in self.branch_taps.items()}

    def loss(self, out: StepOutputs):
        c = self.config
        teacher = self.teacher_output(out).logits
        logits = out.student.logits
        mask = label_mask(out.targets, logits.shape[-1])
        branch_terms = [ofa_loss(z, teacher, mask, self.stage_eps[k], c.temperature)
                        for k, z in self.branch_logits(out).items()]
        return {
            "ce": c.ce_weight * cross_entropy(logits, out.targets, label_smoothing=c.label_smoothing),
            "kd": c.kd_weight * ofa_loss(logits, teacher, mask, self.logit_eps, c.temperature),
            "ofa": c.ofa_weight * sum(branch_terms),
        }
