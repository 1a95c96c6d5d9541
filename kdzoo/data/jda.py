"""Joint Data Augmentation (JDA) as batched tensor code.

JDA (Li, Shao et al., ACCV 2022, the data side of CCD) builds a second, augmented view of every
training image: a fixed sequence of AutoAugment operations, each at a fixed magnitude bin and
each firing on its own with probability ``p``. The reference code does this per image with PIL
inside a dataset wrapper; here every operation works on a float batch ``(B, C, H, W)`` in
[0, 1] on whatever device holds it, and the per-image coin flips and random signs are drawn
as tensors, so a batch on the GPU never leaves it.

Magnitudes follow the AutoAugment table of the reference code: bin ``b`` of 0–9 is
``linspace(lo, hi, 10)[b]`` over the ranges in :data:`RANGES`. Operations that take a random
sign in the reference (shear, translate and the four enhancers) draw one sign per image;
``rotate`` turns counter-clockwise only, as the reference does. Pixels that geometry moves in
from outside the image take the reference's grey fill, 128/255.

Differences from PIL that remain (all small): pixels stay float between operations instead of
being rounded to 8 bits after each one; contrast uses the exact grey mean rather than its
rounded value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["JDA", "POLICIES", "RANGES", "FILL", "Policy", "magnitude", "paired_views", "OPS"]

FILL = 128 / 255
"""Grey used by the reference for pixels moved in from outside the image."""

# (low, high) of each operation's magnitude over bins 0..9; None = the operation has no magnitude.
RANGES: dict[str, tuple[float, float] | None] = {
    "shearX": (0.0, 0.3),
    "shearY": (0.0, 0.3),
    "translateX": (0.0, 150 / 331),  # fraction of the image size
    "translateY": (0.0, 150 / 331),
    "rotate": (0.0, 30.0),  # degrees
    "color": (0.0, 0.9),  # enhance factor 1 ± m
    "contrast": (0.0, 0.9),
    "sharpness": (0.0, 0.9),
    "brightness": (0.0, 0.9),
    "posterize": (8.0, 4.0),  # bits kept, rounded to an integer
    "solarize": (256.0, 0.0),  # threshold on the 0..255 pixel scale
    "autocontrast": None,
    "equalize": None,
    "invert": None,
}

SIGNED = frozenset({"shearX", "shearY", "translateX", "translateY", "color", "contrast", "sharpness", "brightness"})


def magnitude(op: str, level: int) -> float:
    """The AutoAugment magnitude of ``op`` at bin ``level`` (0–9)."""
    if op not in RANGES:
        raise ValueError(f"unknown JDA operation {op!r}; known: {', '.join(RANGES)}")
    if not 0 <= int(level) <= 9:
        raise ValueError(f"JDA magnitude bins run 0..9, got {level} for {op!r}")
    span = RANGES[op]
    if span is None:
        return 0.0
    lo, hi = span
    value = lo + (hi - lo) * int(level) / 9
    if op == "posterize":
        return float(round(value))  # numpy rounds halves to even; no bin of 8→4 lands on a half
    return value


@dataclass(frozen=True)
class Policy:
    """A JDA policy: the probability each operation fires and the (operation, bin) sequence."""

    p: float
    ops: tuple[tuple[str, int], ...]


# From the reference code's dataset wrappers (data/datasets.py: PolicyDatasetC100, PolicyDatasetC10,
# PolicyDatasetImageNet). The order matters: operations compose in this order.
POLICIES: dict[str, Policy] = {
    "cifar100": Policy(0.3, (
        ("autocontrast", 2), ("contrast", 3), ("posterize", 0), ("solarize", 4),
        ("translateY", 8), ("shearX", 5), ("brightness", 3), ("shearY", 0), ("translateX", 1),
        ("sharpness", 5), ("invert", 4), ("color", 4), ("equalize", 8), ("rotate", 3),
    )),
    "cifar10": Policy(0.5, (
        ("invert", 7), ("rotate", 2), ("shearY", 8), ("posterize", 9), ("autocontrast", 8),
        ("color", 3), ("sharpness", 9), ("equalize", 5), ("contrast", 7), ("translateY", 3),
        ("brightness", 6), ("solarize", 2), ("translateX", 3), ("shearX", 8),
    )),
    "imagenet": Policy(0.2, (
        ("posterize", 8), ("solarize", 5), ("equalize", 8), ("posterize", 7), ("equalize", 7),
        ("equalize", 4), ("solarize", 3), ("posterize", 5), ("rotate", 3), ("equalize", 8),
        ("rotate", 8), ("rotate", 9), ("equalize", 7), ("invert", 4), ("color", 4),
        ("rotate", 8), ("color", 8), ("sharpness", 7), ("shearX", 5), ("color", 0),
        ("equalize", 7), ("solarize", 5), ("invert", 4), ("color", 4), ("equalize", 8),
    )),
}


# ----------------------------------------------------------------------------------------
# Operations. Each takes a float batch (n, C, H, W) in [0, 1], the magnitude, and a per-image
# sign tensor (n,) of ±1 (ignored by unsigned operations); each returns a batch of the same shape.
# ----------------------------------------------------------------------------------------

def _grey(x: Tensor) -> Tensor:
    """ITU-R 601 luma, as PIL's "L" conversion: (n, 1, H, W)."""
    if x.shape[1] == 1:
        return x
    if x.shape[1] != 3:
        raise ValueError(f"colour operations need 1 or 3 channels, got {x.shape[1]}")
    w = x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """PIL ImageEnhance: degenerate + factor · (image − degenerate), clipped to [0, 1]."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp_(0, 1)


def _factors(m: float, signs: Tensor) -> Tensor:
    return 1 + m * signs


def brightness(x: Tensor, m: float, signs: Tensor) -> Tensor:
    return _blend(torch.zeros_like(x), x, _factors(m, signs))


def color(x: Tensor, m: float, signs: Tensor) -> Tensor:
    return _blend(_grey(x).expand_as(x), x, _factors(m, signs))


def contrast(x: Tensor, m: float, signs: Tensor) -> Tensor:
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(mean.expand_as(x), x, _factors(m, signs))


def sharpness(x: Tensor, m: float, signs: Tensor) -> Tensor:
    """PIL's SMOOTH filter (centre 5, neighbours 1, /13) as the degenerate; the border keeps its pixels."""
    c = x.shape[1]
    kernel = x.new_ones(3, 3)
    kernel[1, 1] = 5
    kernel = (kernel / kernel.sum()).expand(c, 1, 3, 3)
    smooth = x.clone()
    if x.shape[-1] > 2 and x.shape[-2] > 2:
        smooth[..., 1:-1, 1:-1] = F.conv2d(x, kernel, groups=c)
    return _blend(smooth, x, _factors(m, signs))


def _levels(x: Tensor) -> Tensor:
    """Float pixels → their 8-bit level 0..255 (rounded)."""
    return (x * 255).round_().clamp_(0, 255)


def posterize(x: Tensor, bits: float, signs: Tensor | None = None) -> Tensor:
    """Keep the top ``bits`` bits of every 8-bit level."""
    bits = int(bits)
    if bits >= 8:
        return x
    step = 2 ** (8 - bits)
    return torch.div(_levels(x), step, rounding_mode="floor").mul_(step / 255)


def solarize(x: Tensor, threshold: float, signs: Tensor | None = None) -> Tensor:
    """Invert every pixel whose 8-bit value is at least ``threshold`` (PIL's rule)."""
    return torch.where(x * 255 >= threshold, 1 - x, x)


def invert(x: Tensor, m: float = 0.0, signs: Tensor | None = None) -> Tensor:
    return 1 - x


def autocontrast(x: Tensor, m: float = 0.0, signs: Tensor | None = None) -> Tensor:
    """Stretch each channel of each image so its darkest pixel is 0 and its brightest 1."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    flat = span <= 0
    out = (x - lo) / torch.where(flat, torch.ones_like(span), span)
    return torch.where(flat, x, out).clamp_(0, 1)


def equalize(x: Tensor, m: float = 0.0, signs: Tensor | None = None) -> Tensor:
    """PIL's histogram equalisation per channel, on the 8-bit levels, for the whole batch at once."""
    n, c, h, w = x.shape
    levels = _levels(x).long().view(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(1, levels, torch.ones_like(levels))
    # PIL: step = (count − count of the last non-empty level) // 255; step 0 leaves the channel as is.
    last = 255 - torch.argmax((hist.flip(1) > 0).long(), dim=1)
    last_count = hist.gather(1, last[:, None]).squeeze(1)
    step = torch.div(h * w - last_count, 255, rounding_mode="floor")
    before = torch.cumsum(hist, dim=1) - hist  # pixels strictly below each level
    safe = step.clamp(min=1)[:, None]
    lut = torch.div(before + torch.div(safe, 2, rounding_mode="floor"), safe, rounding_mode="floor").clamp_(max=255)
    mapped = lut.gather(1, levels).view(n, c, h, w).to(x.dtype) / 255
    keep = (step == 0).view(n, c, 1, 1)
    return torch.where(keep, x, mapped)


def _affine(x: Tensor, matrix: Tensor, mode: str, fill: float = FILL) -> Tensor:
    """Inverse-map every output pixel through ``matrix`` (n, 6) = (a, b, c, d, e, f), PIL's
    convention: the output pixel centred at (u, v) reads the input at (a·u + b·v + c, d·u + e·v + f),
    in pixel units with the image's top-left corner at 0. Reads outside the image get ``fill``."""
    n, ch, h, w = x.shape
    v, u = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype) + 0.5,
                          torch.arange(w, device=x.device, dtype=x.dtype) + 0.5, indexing="ij")
    a, b, c, d, e, f = (matrix[:, i].to(x.dtype).view(n, 1, 1) for i in range(6))
    xin = a * u + b * v + c  # (n, H, W)
    yin = d * u + e * v + f
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    if mode == "nearest":
        xi = xin.floor().long().clamp_(0, w - 1)
        yi = yin.floor().long().clamp_(0, h - 1)
        index = (yi * w + xi).view(n, 1, h * w).expand(n, ch, h * w)
        out = x.reshape(n, ch, h * w).gather(2, index).view(n, ch, h, w)
    elif mode == "bicubic":
        out = _bicubic(x, xin, yin)
    else:
        raise ValueError(f"unknown interpolation {mode!r}")
    return torch.where(inside[:, None], out, torch.full_like(out, fill))


def _cubic_weights(t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Weights of the four taps at offsets −1, 0, 1, 2 for fractional position ``t``: the cubic
    convolution kernel with a = −1 that PIL's affine transforms use (PyTorch's bicubic has a = −0.75)."""
    t2, t3 = t * t, t * t * t
    return -t + 2 * t2 - t3, 1 - 2 * t2 + t3, t + t2 - t3, t3 - t2


def _bicubic(x: Tensor, xin: Tensor, yin: Tensor) -> Tensor:
    """Sample ``x`` at (xin, yin) (pixel units, centres at i + 0.5) with PIL's bicubic filter:
    separable, edge pixels repeated, result clipped to [0, 1]."""
    n, ch, h, w = x.shape
    xs, ys = xin - 0.5, yin - 0.5
    x0, y0 = xs.floor(), ys.floor()
    wx, wy = _cubic_weights(xs - x0), _cubic_weights(ys - y0)
    x0, y0 = x0.long(), y0.long()
    flat = x.reshape(n, ch, h * w)
    out = torch.zeros_like(x)
    for j, wyj in enumerate(wy):
        row = (y0 + (j - 1)).clamp_(0, h - 1) * w
        line = torch.zeros_like(x)
        for i, wxi in enumerate(wx):
            index = (row + (x0 + (i - 1)).clamp_(0, w - 1)).view(n, 1, h * w).expand(n, ch, h * w)
            line += wxi[:, None] * flat.gather(2, index).view(n, ch, h, w)
        out += wyj[:, None] * line
    return out.clamp_(0, 1)


def _matrix(signs: Tensor, **entries: Tensor | float) -> Tensor:
    """An (n, 6) batch of identity matrices with some entries replaced."""
    names = "abcdef"
    base = {"a": 1.0, "b": 0.0, "c": 0.0, "d": 0.0, "e": 1.0, "f": 0.0}
    cols = []
    for name in names:
        value = entries.get(name, base[name])
        if not torch.is_tensor(value):
            value = torch.full_like(signs, float(value))
        cols.append(value.to(signs.dtype))
    return torch.stack(cols, dim=1)


def shear_x(x: Tensor, m: float, signs: Tensor) -> Tensor:
    return _affine(x, _matrix(signs.float(), b=m * signs.float()), "bicubic")


def shear_y(x: Tensor, m: float, signs: Tensor) -> Tensor:
    return _affine(x, _matrix(signs.float(), d=m * signs.float()), "bicubic")


def translate_x(x: Tensor, m: float, signs: Tensor) -> Tensor:
    """Shift by ``m`` of the width: the output at column u shows the input at u + m·W·sign."""
    return _affine(x, _matrix(signs.float(), c=m * x.shape[-1] * signs.float()), "nearest")


def translate_y(x: Tensor, m: float, signs: Tensor) -> Tensor:
    return _affine(x, _matrix(signs.float(), f=m * x.shape[-2] * signs.float()), "nearest")


def rotate(x: Tensor, degrees: float, signs: Tensor | None = None) -> Tensor:
    """Counter-clockwise by ``degrees`` about the image centre, nearest neighbour, grey corners
    (PIL ``Image.rotate`` composited over grey, as the reference does)."""
    n, _, h, w = x.shape
    t = -math.radians(degrees)
    cos, sin = math.cos(t), math.sin(t)
    cx, cy = w / 2, h / 2
    ref = torch.zeros(n, device=x.device)
    m = _matrix(ref, a=cos, b=sin, c=cx - cos * cx - sin * cy, d=-sin, e=cos, f=cy + sin * cx - cos * cy)
    return _affine(x, m, "nearest")


OPS: dict[str, Callable[[Tensor, float, Tensor], Tensor]] = {
    "shearX": shear_x, "shearY": shear_y, "translateX": translate_x, "translateY": translate_y,
    "rotate": rotate, "color": color, "posterize": posterize, "solarize": solarize,
    "contrast": contrast, "sharpness": sharpness, "brightness": brightness,
    "autocontrast": autocontrast, "equalize": equalize, "invert": invert,
}


class JDA:
    """Apply a JDA policy to a float batch: ``JDA("cifar100")(images) -> images``.

    ``policy`` is a name in :data:`POLICIES` or a sequence of ``(operation, bin)`` pairs;
    ``p`` overrides the policy's firing probability. Randomness comes from ``generator`` when
    given, else from torch's global generator on the images' device, so seeding torch (and the
    engine's checkpointed RNG state) makes runs repeatable.

    ``full_batch`` chooses how the per-image coin flips are applied: transform the whole batch
    and keep the images whose coin fired (no host synchronisation; the default on GPUs), or
    transform only those images (less work; the default on the CPU). Both give the same result.
    """

    def __init__(self, policy: str | Sequence[tuple[str, int]] = "cifar100", p: float | None = None,
                 full_batch: bool | None = None):
        self.full_batch = full_batch
        if isinstance(policy, str):
            if policy not in POLICIES:
                raise ValueError(f"unknown JDA policy {policy!r}; known: {', '.join(POLICIES)}")
            self.name = policy
            base = POLICIES[policy]
            ops, default_p = base.ops, base.p
        else:
            self.name = "custom"
            ops, default_p = tuple((str(o), int(b)) for o, b in policy), 0.5
        self.p = float(default_p if p is None else p)
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"JDA probability p must lie in [0, 1], got {self.p}")
        self.ops = tuple((op, level, magnitude(op, level)) for op, level in ops)

    def __repr__(self) -> str:
        return f"JDA(policy={self.name!r}, p={self.p}, ops={len(self.ops)})"

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if images.ndim != 4:
            raise ValueError(f"JDA expects a batch (B, C, H, W), got shape {tuple(images.shape)}")
        dtype = images.dtype
        x = images.float() / 255 if dtype == torch.uint8 else images.float()
        b = x.shape[0]
        if b == 0 or self.p == 0.0:
            return images.clone()
        for op, _level, m in self.ops:
            fire = torch.rand(b, device=x.device, generator=generator) < self.p
            signs = torch.where(torch.rand(b, device=x.device, generator=generator) < 0.5, -1.0, 1.0)
            full = x.device.type != "cpu" if self.full_batch is None else self.full_batch
            if full:
                x = torch.where(fire[:, None, None, None], OPS[op](x, m, signs), x)
            else:
                idx = fire.nonzero().squeeze(1)
                if idx.numel():
                    x = x.index_copy(0, idx, OPS[op](x.index_select(0, idx), m, signs.index_select(0, idx)))
        if dtype == torch.uint8:
            return (x * 255).round_().clamp_(0, 255).to(torch.uint8)
        return x.to(dtype)


def paired_views(images: Tensor, targets: Tensor, augment: Callable[[Tensor], Tensor], jda: JDA) -> tuple[Tensor, Tensor]:
    """The JDA training batch: 2B images interleaved ``[orig₀, aug₀, orig₁, aug₁, …]`` and the
    targets duplicated to match.

    ``images`` is either a batch ``(B, C, H, W)`` of whole images, which ``augment`` crops and
    flips (in-memory datasets): ``orig = augment(x)``, ``aug = augment(jda(x))``, the two calls
    drawing their crops and flips independently; or ``(B, 2, C, H, W)``, two crops of each image
    that the loader already drew separately (image folders, for a method with ``loader_views = 2``):
    ``orig = augment(x[:, 0])``, ``aug = augment(jda(x[:, 1]))``, where ``augment`` flips.
    """
    if images.ndim == 5:
        if images.shape[1] != 2:
            raise ValueError(f"paired_views takes (B, 2, C, H, W) crops, one per view; got shape {tuple(images.shape)}")
        first, second = images[:, 0], images[:, 1]
    else:
        first = second = images
    original = augment(first)
    augmented = augment(jda(second))
    views = torch.stack([original, augmented], dim=1).flatten(0, 1)
    return views, targets.repeat_interleave(2, dim=0)
