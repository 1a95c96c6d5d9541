"""Jin, Wang, Lin, CVPR 2023, "Multi-Level Logit Distillation" (MLKD).

Every image is seen twice, as a weak view (the dataset's crop and flip) and a strong view (an
independent crop and flip followed by RandAugment and Cutout, :class:`RandAugment`); teacher and
student read both. The student then matches the teacher's predictions at three levels, each at
five temperatures 𝒯 = {τ, 3, 5, 2, 6}:

    instance  I_T(v) = τ_T² · KL_b(σ(z_t/T) ‖ σ(z_s/T))                    (per sample, batch mean)
    batch     B_T(v) = ‖P_t P_tᵀ − P_s P_sᵀ‖²_F / B    with P = σ(z/T), (B, K)  (sample-to-sample Gram)
    class     C_T(v) = ‖P_tᵀ P_t − P_sᵀ P_s‖²_F / K                          (class-to-class Gram)

Why: a single KL at one temperature matches each prediction alone; the Gram matrices add how the
teacher relates samples to each other (batch level) and classes to each other (class level), and
several temperatures spread the match over sharp and soft versions of the same predictions.
The batch and class terms carry no τ².

**Confidence masking** (from the teacher's weak-view probabilities p = σ(z_t(weak))): the
samples whose top probability is at most the batch median, and the classes whose summed
probability Σ_b p_bk is at most the median over classes, i.e. the less confident half. In the
official code (``KD_ours.py``) the per-term losses are already reduced to scalars when the mask
multiplies them (``reduce=False`` is commented out), so the mask scales each weak-view term by
the *share* of masked samples m̄ (or classes c̄) instead of selecting samples; kdzoo does the same.

What the official code sums (and kdzoo with it), w = kd_weight:

    ce = ce_weight · [CE(z_s(weak), y) + CE(z_s(strong), y)]
    kd = w · Σ_{T∈𝒯} m̄ · I_T(weak)
       + w · [Σ_{T∈{τ,3,5}} I_T(strong) + Σ_{T∈{2,6}} I_T(weak)]     (the code's "strong" sum reads the
                                                                       weak view at T = 2 and 6)
    cc = w · Σ_{T∈𝒯} c̄ · C_T(weak)
    bc = w · Σ_{T∈𝒯} m̄ · B_T(weak)

The strong-view class and batch terms are computed by the official code but never returned, so
they do not train the student; they are left out here.

Defaults are the official CIFAR-100 setting (mdistiller's KD defaults, which ``KD_ours`` reads:
τ = 4, 0.1 / 0.9); ``configs/imagenet/r34_r18/kd_ours.yaml`` sets τ = 1, 0.5 / 0.5 on ImageNet.
``logit_standardize`` (Sun et al., CVPR 2024, their ``MLKD.py``) z-scores both logits in the
instance-level terms only (not in the masks, the Gram terms or the CE) and brings τ = 2,
kd_weight = 9 (6 for the pairs the LS repository ran with 6).

Layout: the training batch is ``[weak₀ … weak_{B−1}, strong₀ … strong_{B−1}]`` with targets and
dataset indices repeated, so per-image state stays keyed by the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdzoo.data import jda
from kdzoo.losses import cross_entropy, softened_kl
from kdzoo.method import Batch, StepOutputs
from kdzoo.methods._logit import LogitMethod
from kdzoo.registry import register_method

# The temperatures the official code adds to the base τ, in its order. Its strong-view instance
# sum reads the strong view at τ, 3 and 5 and the weak view at 2 and 6 (see above).
EXTRA_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)
STRONG_EXTRA = (3.0, 5.0)
STRONG_FROM_WEAK = (2.0, 6.0)

# Teacher → student pairs the logit-standardisation repository trained MLKD+LS with kd_weight 6
# instead of 9 (its logs/MLKD/mlkd,<teacher>,<student>,2,6.txt).
LS_WEIGHT_6 = {("cifar_vgg13", "cifar_vgg8"), ("cifar_resnet32x4", "cifar_shufflenet_v2"),
               ("cifar_vgg13", "cifar_mobilenetv2")}


# -- the strong view: FixMatch-style RandAugment on float batches ---------------------------------

# (low, high) of each operation's value, drawn uniformly per image (the official augment_list;
# the magnitude argument m = 10 of RandAugment(2, 10) is unused there).
RANDAUGMENT_RANGES: dict[str, tuple[float, float]] = {
    "autocontrast": (0, 1), "brightness": (0.05, 0.95), "color": (0.05, 0.95), "contrast": (0.05, 0.95),
    "equalize": (0, 1), "identity": (0, 1), "posterize": (4, 8), "rotate": (-30, 30),
    "sharpness": (0.05, 0.95), "shearX": (-0.3, 0.3), "shearY": (-0.3, 0.3), "solarize": (0, 256),
    "translateX": (-0.3, 0.3), "translateY": (-0.3, 0.3),
}
CUTOUT_FILL = (125 / 255, 123 / 255, 114 / 255)


def _enhance(op: str, x: Tensor, factor: Tensor) -> Tensor:
    """PIL ImageEnhance at a per-image factor: jda's enhancers blend at 1 + m·s, so m = 1, s = factor − 1."""
    return jda.OPS[op](x, 1.0, factor - 1)


def _geometry(x: Tensor, **entries: Tensor) -> Tensor:
    """PIL ``Image.transform(AFFINE)`` with its defaults: nearest neighbour, black outside."""
    ref = torch.zeros(x.shape[0], device=x.device)
    return jda._affine(x, jda._matrix(ref, **entries), "nearest", fill=0.0)


def _rotate(x: Tensor, degrees: Tensor) -> Tensor:
    """PIL ``Image.rotate(v)``: counter-clockwise about the centre, nearest, black corners; one angle per image."""
    h, w = x.shape[-2:]
    t = -torch.deg2rad(degrees.float())
    cos, sin = torch.cos(t), torch.sin(t)
    cx, cy = w / 2, h / 2
    return _geometry(x, a=cos, b=sin, c=cx - cos * cx - sin * cy, d=-sin, e=cos, f=cy + sin * cx - cos * cy)


def _posterize(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the top ``int(v)`` bits of every 8-bit level, one bit count per image."""
    step = torch.pow(2.0, 8 - bits.floor().clamp(1, 8)).view(-1, 1, 1, 1)
    levels = (x * 255).round().clamp(0, 255)
    return torch.div(levels, step, rounding_mode="floor") * step / 255


def _apply(op: str, x: Tensor, v: Tensor) -> Tensor:
    h, w = x.shape[-2:]
    if op in ("brightness", "color", "contrast", "sharpness"):
        return _enhance(op, x, v)
    if op in ("autocontrast", "equalize"):
        return jda.OPS[op](x, 0.0, v)
    if op == "identity":
        return x
    if op == "posterize":
        return _posterize(x, v)
    if op == "solarize":
        return jda.solarize(x, v.view(-1, 1, 1, 1))
    if op == "rotate":
        return _rotate(x, v)
    if op == "shearX":
        return _geometry(x, b=v)
    if op == "shearY":
        return _geometry(x, d=v)
    if op == "translateX":
        return _geometry(x, c=v * w)
    if op == "translateY":
        return _geometry(x, f=v * h)
    raise ValueError(f"unknown RandAugment operation {op!r}")


def cutout(x: Tensor, size: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The official Cutout: a square of ``size`` (fraction of the width) at a uniform centre, clipped
    to the image, painted (125, 123, 114); PIL's rectangle includes its far edge."""
    n, c, h, w = x.shape
    side = size * w
    x0 = (torch.rand(n, device=x.device, generator=generator) * w - side / 2).clamp(min=0).floor()
    y0 = (torch.rand(n, device=x.device, generator=generator) * h - side / 2).clamp(min=0).floor()
    x1 = (x0 + side).clamp(max=w)
    y1 = (y0 + side).clamp(max=h)
    cols = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, w)
    rows = torch.arange(h, device=x.device, dtype=x.dtype).view(1, h, 1)
    inside = ((cols >= x0.view(-1, 1, 1)) & (cols <= x1.view(-1, 1, 1))
              & (rows >= y0.view(-1, 1, 1)) & (rows <= y1.view(-1, 1, 1)) & (size > 0).view(-1, 1, 1))
    fill = x.new_tensor(CUTOUT_FILL if c == 3 else [sum(CUTOUT_FILL) / 3] * c).view(1, c, 1, 1)
    return torch.where(inside[:, None], fill.expand_as(x), x)


class RandAugment:
    """MLKD's strong augmentation on a float batch ``(B, C, H, W)`` in [0, 1]: per image, ``n``
    operations drawn uniformly with replacement from :data:`RANDAUGMENT_RANGES`, each at a value
    drawn uniformly from its range, then Cutout of a side drawn from [0, ``cutout``) of the width.

    The FixMatch-style ``RandAugment(2, 10)`` of the official ``mdistiller/dataset/cifar100.py``
    (PIL, per image) as tensor code. Differences that remain: pixels stay float between operations
    (PIL rounds to 8 bits after each); Cutout's corner is taken to whole pixels.
    """

    ops = tuple(RANDAUGMENT_RANGES)

    def __init__(self, n: int = 2, cutout: float = 0.5):
        self.n, self.cutout = int(n), float(cutout)

    def __repr__(self) -> str:
        return f"RandAugment(n={self.n}, cutout={self.cutout})"

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        dtype = images.dtype
        x = images.float()
        b, device = x.shape[0], x.device
        for _ in range(self.n):
            choice = torch.randint(len(self.ops), (b,), device=device, generator=generator)
            u = torch.rand(b, device=device, generator=generator)
            for k, op in enumerate(self.ops):
                idx = (choice == k).nonzero().squeeze(1)
                if idx.numel():
                    lo, hi = RANDAUGMENT_RANGES[op]
                    x = x.index_copy(0, idx, _apply(op, x.index_select(0, idx), lo + (hi - lo) * u[idx]))
        size = torch.rand(b, device=device, generator=generator) * self.cutout
        return cutout(x, size, generator).to(dtype)


# -- the loss terms -------------------------------------------------------------------------------

def class_gram_loss(student: Tensor, teacher: Tensor, temperature) -> Tensor:
    """‖P_tᵀP_t − P_sᵀP_s‖²_F / K with P = σ(z/T): how the batch relates the classes (no τ²)."""
    ps, pt = torch.softmax(student / temperature, dim=1), torch.softmax(teacher / temperature, dim=1)
    return ((pt.t() @ pt - ps.t() @ ps) ** 2).sum() / student.shape[1]


def batch_gram_loss(student: Tensor, teacher: Tensor, temperature) -> Tensor:
    """‖P_tP_tᵀ − P_sP_sᵀ‖²_F / B with P = σ(z/T): how the predictions relate the samples (no τ²)."""
    ps, pt = torch.softmax(student / temperature, dim=1), torch.softmax(teacher / temperature, dim=1)
    return ((pt @ pt.t() - ps @ ps.t()) ** 2).sum() / student.shape[0]


def low_confidence_share(scores: Tensor) -> Tensor:
    """The share of entries at or below their median (numpy's linear-interpolation percentile 50)."""
    return (scores <= torch.quantile(scores, 0.5)).float().mean()


@register_method("mlkd")
class MLKD(LogitMethod):
    summary = "Multi-level logit distillation: instance KL + batch and class Gram matching at 5 temperatures, weak/strong views"
    tasks = ("cls",)
    dataset_defaults = {"imagefolder": {"temperature": 1.0, "ce_weight": 0.5, "kd_weight": 0.5}}
    switch_defaults = {"logit_standardize": {"temperature": 2.0, "kd_weight": 9.0}}

    @dataclass
    class Config:
        temperature: float = 4.0  # the base τ; 3, 5, 2 and 6 are always added
        ce_weight: float = 0.1
        kd_weight: float = 0.9  # w on every instance, batch and class term
        logit_standardize: bool = False
        strong_ops: int = 2  # RandAugment operations per image of the strong view
        cutout: float = 0.5  # largest Cutout side, as a fraction of the width

    def __init__(self, config=None):
        super().__init__(config)
        self.check_config(positive=("temperature",), non_negative=("ce_weight", "kd_weight", "strong_ops"),
                          unit=("cutout",))
        self.strong = RandAugment(self.config.strong_ops, self.config.cutout)

    @classmethod
    def recipe_defaults(cls, run, settings):
        defaults = super().recipe_defaults(run, settings)
        if settings.get("logit_standardize") is True and (run.teacher, run.model) in LS_WEIGHT_6:
            defaults["kd_weight"] = 6.0
        return defaults

    def prepare_batch(self, batch: Batch, augment) -> Batch:
        weak = augment(batch.images)
        strong = self.strong(augment(batch.images))  # its own crop and flip, then RandAugment + Cutout
        return Batch(torch.cat([weak, strong]), torch.cat([batch.targets, batch.targets]), batch.index.repeat(2))

    def loss(self, out: StepOutputs):
        c = self.config
        student = out.student.logits.float()
        teacher = self.teacher_output(out).logits.float().detach()
        if student.dim() != 2 or student.shape[0] % 2:
            raise RuntimeError(f"method 'mlkd' expects the batch [weak views, strong views] of (2B, K) logits, "
                               f"got shape {tuple(student.shape)}")
        b = student.shape[0] // 2
        s_weak, s_strong, t_weak, t_strong = student[:b], student[b:], teacher[:b], teacher[b:]

        p_teacher = torch.softmax(t_weak, dim=1)
        sample_share = low_confidence_share(p_teacher.max(dim=1).values)  # m̄
        class_share = low_confidence_share(p_teacher.sum(dim=0))  # c̄

        tau = self.temperature()
        temperatures = (tau, *EXTRA_TEMPERATURES)

        def instance(s, t, temperature):
            return softened_kl(self.softenable(s), self.softenable(t), temperature)

        kd_weak = sum(instance(s_weak, t_weak, T) for T in temperatures) * sample_share
        kd_strong = (sum(instance(s_strong, t_strong, T) for T in (tau, *STRONG_EXTRA))
                     + sum(instance(s_weak, t_weak, T) for T in STRONG_FROM_WEAK))
        cc = sum(class_gram_loss(s_weak, t_weak, T) for T in temperatures) * class_share
        bc = sum(batch_gram_loss(s_weak, t_weak, T) for T in temperatures) * sample_share
        targets_weak, targets_strong = out.targets[:b], out.targets[b:]
        return {
            "ce": c.ce_weight * (cross_entropy(s_weak, targets_weak) + cross_entropy(s_strong, targets_strong)),
            "kd": c.kd_weight * (kd_weak + kd_strong),
            "cc": c.kd_weight * cc,
            "bc": c.kd_weight * bc,
        }

