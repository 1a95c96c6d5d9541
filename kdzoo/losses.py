"""The shared distillation vocabulary: the loss terms and tensor helpers methods are built from.

A method file should read like its paper: the weights, the pairing of layers and the method's own
ideas live there, while the terms many papers share — softened KL, cross-entropy, attention maps,
resizing, standardisation, pairwise relations — are defined once, here, and tested once
(``tests/test_losses.py``). Every function keeps the exact arithmetic the built-in methods had
when each wrote its own copy, so moving a method onto this module does not move its results.

This module depends only on torch and kdzoo's base modules; it knows nothing of methods or the
training loop.

Shapes: logits are ``(B, K)`` for classification and ``(B, K, H, W)`` for segmentation; feature
maps are ``(B, C, H, W)``; embeddings are ``(B, D)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .metrics import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    # logits
    "pixels_as_samples", "kl_div", "softened_kl", "cross_entropy", "class_probabilities", "standardize_logits",
    # spatial attention
    "activation_map", "attention_map", "attention_loss",
    # resizing
    "resize_bilinear", "resize_average", "same_max_pool", "downsample_max", "upsample_nearest",
    # standardisation
    "standardize",
    # pairwise relations
    "pairwise_distances", "normalized_distances", "unit_differences", "triplet_cosines",
    "auto_chunk", "angle_potential_huber",
]

Size = tuple[int, int]

_NORM_FLOOR = 1e-12  # smallest norm divided by when L2-normalising a map (F.normalize's default)
_VAR_FLOOR = 1e-12  # keeps sqrt's gradient finite on a spatially constant channel


def _as_size(size) -> Size:
    """``(h, w)`` as plain ints, so a ``torch.Size`` slice or a tuple of tensors compares equal."""
    return int(size[0]), int(size[1])


# -- logits -----------------------------------------------------------------------------------

def pixels_as_samples(logits: Tensor) -> Tensor:
    """``(B, K, H, W)`` → ``(B·H·W, K)``: each pixel becomes a row, so a per-sample loss averaged
    over rows is normalised by B·H·W. Classification logits ``(B, K)`` pass through."""
    if logits.dim() == 2:
        return logits
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def kl_div(student_logits: Tensor, teacher_logits: Tensor, temperature: float, reduction: str = "batchmean") -> Tensor:
    """KL(σ(z_t/τ) ‖ σ(z_s/τ)) — summed over classes (the last axis), averaged over rows ("batchmean").

    With ``reduction="none"`` the per-row KL is returned. Computed in float32 so that bf16
    autocast does not lose the small probabilities the soft targets carry.
    """
    log_p_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_sample = torch.sum(log_p_t.exp() * (log_p_t - log_p_s), dim=-1)
    if reduction == "none":
        return per_sample
    return per_sample.mean()


def softened_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
                reduction: str = "batchmean") -> Tensor:
    """Hinton's soft-target term τ² · KL(σ(z_t/τ) ‖ σ(z_s/τ)).

    The gradient of the KL with respect to the logits shrinks as 1/τ², so the τ² factor keeps
    the soft term's weight relative to the cross-entropy independent of the temperature.
    Segmentation logits ``(B, K, H, W)`` are compared per pixel: every pixel is a sample, so the
    KL is summed over classes and averaged over all B·H·W pixels (the teacher has an answer for
    ignored pixels too). ``reduction="none"`` returns τ²·KL per row (per pixel on dense logits).
    """
    per_class_kl = kl_div(pixels_as_samples(student_logits), pixels_as_samples(teacher_logits),
                          temperature, reduction)
    return temperature**2 * per_class_kl


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score of each sample's logits over its classes, (z − mean) / (std + eps), float32.

    Logit standardisation (Sun et al., CVPR 2024): a student need not match the teacher's logit
    range, only their relations, so both are standardised before a temperature softens them.
    The class axis is 1 for ``(B, K)`` and ``(B, K, H, W)`` logits alike. As in the official code,
    the standard deviation is the unbiased one and eps is added to it, not to the variance.
    """
    z = logits.float()
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + eps)


def cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy −Σ_k q_k log σ(z)_k for hard (class index) or soft (probability) targets q.

    Dense logits ``(B, K, H, W)`` against masks ``(B, H, W)``: the mean over labelled pixels
    (mask ≠ ``IGNORE_INDEX``, 255), so the loss does not shrink with the share of unlabelled
    pixels; zero, with the graph kept, when a batch has no labelled pixel at all.
    ``label_smoothing`` applies to hard targets. Computed in float32.
    """
    if targets.dtype.is_floating_point:
        return torch.sum(-targets * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    if logits.dim() > 2:
        summed = F.cross_entropy(logits.float(), targets.long(), ignore_index=IGNORE_INDEX,
                                 reduction="sum", label_smoothing=label_smoothing)
        return summed / (targets != IGNORE_INDEX).sum().clamp_min(1)
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def class_probabilities(targets: Tensor, num_classes: int) -> Tensor:
    """Class indices ``(B,)`` → one-hot float ``(B, K)``; probabilities pass through as float.

    Mixing images (mixup, cutmix) or smoothing labels needs targets as distributions.
    """
    if targets.dtype.is_floating_point:
        return targets.float()
    return F.one_hot(targets, num_classes).float()


# -- spatial attention ------------------------------------------------------------------------

def activation_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """Where a network responds: the channel mean of |F|^p at every position, ``(B, H, W)``, float32.

    Sign-free (a strong negative response counts as much as a positive one) and channel-free,
    so maps of networks with different widths compare directly. For p = 2 it is the channel
    mean of F², the attention map of Zagoruyko & Komodakis's attention transfer.
    """
    return feature.float().abs().pow(p).mean(dim=1)


def attention_map(feature: Tensor, p: float = 2.0, size: Size | None = None) -> Tensor:
    """The activation map flattened to ``(B, H·W)`` and L2-normalised per sample: Q / ‖Q‖₂.

    Normalising keeps only the spatial pattern, not the overall scale of the activations, which
    differs between any two networks. With ``size`` the map (not the feature) is first resized
    with :func:`resize_average`, so maps of different resolutions are compared on one grid.
    """
    amap = activation_map(feature, p).unsqueeze(1)
    if size is not None:
        amap = resize_average(amap, size)
    flat = amap.flatten(1)
    return flat / flat.norm(p=2, dim=1, keepdim=True).clamp_min(_NORM_FLOOR)


def attention_loss(student: Tensor, teacher: Tensor, p: float = 2.0, sum_positions: bool = False) -> Tensor:
    """Squared difference of normalised attention maps, ( Q_s/‖Q_s‖ − Q_t/‖Q_t‖ )², teacher detached.

    The teacher's map is resized to the student's H×W. ``sum_positions=False``: the mean over
    batch and positions (FRSKD's reference code, attention transfer); ``True``: the squared L2
    distance summed over positions, then averaged over the batch (LAKD as kdzoo reads it) —
    H·W times the former.
    """
    size = tuple(student.shape[-2:])
    squared = (attention_map(student, p, size) - attention_map(teacher.detach(), p, size)).pow(2)
    if sum_positions:
        return squared.sum(dim=1).mean()
    return squared.mean()


# -- resizing feature maps ----------------------------------------------------------------------

def resize_bilinear(x: Tensor, size: Size) -> Tensor:
    """``(B, C, H, W)`` → ``(B, C, *size)`` by bilinear interpolation (align_corners=False).

    The usual way to bring a teacher map (or logits) to the student's grid before comparing them
    position by position; a map already at ``size`` is returned as it is.
    """
    size = _as_size(size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def resize_average(x: Tensor, size: Size) -> Tensor:
    """``(B, C, H, W)`` → ``(B, C, *size)``: average pooling when shrinking, bilinear when growing.

    Pooling makes every target cell the mean of the source cells it covers, so shrinking a map
    loses no position entirely (bilinear sampling would skip some).
    """
    size = _as_size(size)
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def same_max_pool(x: Tensor) -> Tensor:
    """3×3 max-pool, stride 2, with TensorFlow "same" padding: H×W → ⌈H/2⌉×⌈W/2⌉.

    The down-sampler of EfficientDet's BiFPN (and FRSKD's self-teacher). The padding is zeros;
    that is harmless when the input has just been through a ReLU.
    """
    h, w = x.shape[-2:]
    pad_h = max((math.ceil(h / 2) - 1) * 2 + 3 - h, 0)
    pad_w = max((math.ceil(w / 2) - 1) * 2 + 3 - w, 0)
    x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
    return F.max_pool2d(x, kernel_size=3, stride=2)


def downsample_max(x: Tensor, size: Size) -> Tensor:
    """Bring a finer map to a coarser level's size by max-pooling, whatever the ratio.

    The stride-2 same-padded max-pool whenever the target is exactly ⌈H/2⌉×⌈W/2⌉ (ResNets at 32²
    and 224², odd sizes such as 7→4 included); nothing when the sizes already agree (ViT-like
    equal grids); otherwise adaptive max-pooling to the target (or, should the target be larger,
    the nearest pixel).
    """
    h, w = x.shape[-2:]
    size = _as_size(size)
    if (h, w) == size:
        return x
    if size == ((h + 1) // 2, (w + 1) // 2):
        return same_max_pool(x)
    if size[0] <= h and size[1] <= w:
        return F.adaptive_max_pool2d(x, size)
    return F.interpolate(x, size=size, mode="nearest")


def upsample_nearest(x: Tensor, size: Size) -> Tensor:
    """Bring a coarser map to a finer level's size: nearest pixel.

    For an exact 2× ratio this is the feature pyramid's ×2 nearest upsample; for any other ratio
    it still lands on the target size.
    """
    size = _as_size(size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="nearest")


# -- standardisation ----------------------------------------------------------------------------

def standardize(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Norm(F)[b, c] = (F[b, c] − μ_bc) / (σ_bc + eps), μ and σ over the H·W positions, float32.

    Per sample and per channel, so what remains is where and how a channel responds, not the
    magnitude of its response. σ is the population standard deviation; eps is added to σ, not to
    the variance, and the variance is floored at 1e-12 so that a spatially constant channel
    (which standardises to zeros) keeps a finite gradient.
    """
    x = x.float()
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = (x - mean).pow(2).mean(dim=(2, 3), keepdim=True)
    return (x - mean) / (var.clamp_min(_VAR_FLOOR).sqrt() + eps)


# -- pairwise relations between the samples of a batch ----------------------------------------

def pairwise_distances(e: Tensor, eps: float = 1e-12, squared: bool = False) -> Tensor:
    """(B, B) Euclidean distances ‖e_i − e_j‖ of the rows of ``e``, zero on the diagonal.

    Computed as √(‖e_i‖² + ‖e_j‖² − 2 e_i·e_j), one matrix product instead of B² differences;
    the squared distance is clamped at ``eps`` before the square root, whose gradient is infinite
    at 0. ``squared=True`` returns the clamped squared distances. The diagonal is written with
    ``torch.where`` (no in-place write on a tensor autograd needs).
    """
    sq_norms = e.pow(2).sum(dim=1)
    sq = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * (e @ e.t())).clamp_min(eps)
    d = sq if squared else sq.sqrt()
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return torch.where(eye, torch.zeros((), dtype=d.dtype, device=d.device), d)


def normalized_distances(e: Tensor, eps: float = 1e-12, squared: bool = False) -> Tensor:
    """RKD's distance potential ψ_D(i, j) = d_ij / μ, μ = the mean of the positive (off-diagonal) d_ij.

    Dividing by the network's own mean distance makes the structure scale-free, so embeddings
    of different widths and magnitudes compare directly.
    """
    d = pairwise_distances(e, eps, squared)
    positive = d > 0
    mean = (d * positive).sum() / positive.sum().clamp_min(1)
    return d / mean


def unit_differences(e: Tensor, eps: float = 1e-12) -> Tensor:
    """(B, B, D): u[i, j] = (e_j − e_i) / ‖e_j − e_i‖, and 0 where ‖e_j − e_i‖ ≤ eps (always for i = j).

    The directions from anchor i to every other sample; their dot products are RKD's angle
    potential. Dividing a (near-)zero difference by eps, as ``F.normalize`` would, sends a
    gradient of order 1/eps = 1e12 into the network when two embeddings coincide; here such a
    pair is a constant zero vector: same values for every pair farther apart than eps, no
    gradient spike.
    """
    diff = e[None, :, :] - e[:, None, :]
    norm = diff.norm(p=2, dim=2, keepdim=True)
    apart = norm > eps
    safe = torch.where(apart, norm, torch.ones_like(norm))
    return torch.where(apart, diff / safe, torch.zeros_like(diff))


def triplet_cosines(u: Tensor, start: int, stop: int) -> Tensor:
    """RKD's angle potential ψ(i, j, k) = ⟨u_ij, u_ik⟩ for the anchors i in [start, stop): (stop − start, B, B).

    The cosine of the angle at e_i in the triangle (e_i, e_j, e_k), from :func:`unit_differences`.
    """
    block = u[start:stop]
    return torch.bmm(block, block.transpose(1, 2))


def auto_chunk(batch: int, dim_s: int, dim_t: int) -> int:
    """Anchors per chunk so that chunk·B² cosines never exceed one (B, B, D) tensor: min(B, D)."""
    return max(1, min(batch, max(dim_s, dim_t)))


class _ChunkedAngleHuber(torch.autograd.Function):
    """Σ_ijk Huber(ψ^s_ijk − ψ^t_ijk) / B³ with ψ computed chunk by chunk over anchors.

    Plain chunking under autograd would not save memory: autograd would keep every chunk's
    cosines alive until backward (B³ in total). This function keeps only u_s and u_t.
    Backward: ∂/∂u_s[i] = (G_i + G_iᵀ) · u_s[i], with G_i[j, k] = Huber'(ψ^s_ijk − ψ^t_ijk) =
    clamp(ψ^s − ψ^t, −1, 1); the chunk's cosines are recomputed.
    """

    @staticmethod
    def forward(ctx, u_s: Tensor, u_t: Tensor, chunk: int) -> Tensor:
        b = u_s.shape[0]
        total = u_s.new_zeros(())
        for start in range(0, b, chunk):
            stop = min(b, start + chunk)
            diff = triplet_cosines(u_s, start, stop) - triplet_cosines(u_t, start, stop)
            total = total + F.smooth_l1_loss(diff, torch.zeros_like(diff), reduction="sum", beta=1.0)
        ctx.save_for_backward(u_s, u_t)
        ctx.chunk = chunk
        return total / float(b) ** 3

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        u_s, u_t = ctx.saved_tensors
        b, chunk = u_s.shape[0], ctx.chunk
        grad = torch.empty_like(u_s)
        scale = grad_out / float(b) ** 3
        for start in range(0, b, chunk):
            stop = min(b, start + chunk)
            g = (triplet_cosines(u_s, start, stop) - triplet_cosines(u_t, start, stop)).clamp(-1.0, 1.0)
            grad[start:stop] = torch.bmm(g + g.transpose(1, 2), u_s[start:stop]) * scale
        return grad, None, None


def angle_potential_huber(u_student: Tensor, u_teacher: Tensor, chunk: int) -> Tensor:
    """mean over all B³ triplets of Huber(ψ^s_ijk − ψ^t_ijk), Huber = smooth-L1 with δ = 1.

    Takes the :func:`unit_differences` of both networks (the teacher's receives no gradient).
    The B³ cosines are never held at once: ``chunk`` anchors at a time (at most chunk·B²
    cosines), recomputed in backward. ``chunk`` changes only the peak memory, not the result.
    """
    return _ChunkedAngleHuber.apply(u_student, u_teacher, int(chunk))
