"""Joint image/mask transforms for segmentation: whatever moves a pixel moves its label too.

Two steps, each doing one job:

- :class:`Canvas` (per sample, in DataLoader workers) brings a variable-sized photo and its mask
  to one fixed size, so samples stack into batches: resize by a base factor, then pad on the
  bottom/right (image with 0, mask with the ignore index) or crop from the top-left.
- :class:`JointAugment` (per batch, on the training device) is the training augmentation:
  per-sample random scale, random crop to the training size and horizontal flip, done as one
  affine resampling — bilinear for the image, nearest for the mask. Every output pixel that
  falls outside the source is padding: image 0, mask the ignore index, so it never counts.

Evaluation uses the canvas only; padding is ignored by the metrics, so scores are those of the
full images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..metrics import IGNORE_INDEX
from .loaders import to_float


class JointAugment:
    """Random scale in ``scale``, random crop to ``crop`` (a side, or (H, W)), horizontal flip."""

    def __init__(self, crop: int | tuple[int, int], scale: tuple[float, float] = (0.5, 2.0), flip: bool = True):
        self.crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
        self.scale, self.flip = (float(scale[0]), float(scale[1])), flip

    def __repr__(self) -> str:
        return f"JointAugment(crop={self.crop}, scale={self.scale}, flip={self.flip})"

    def __call__(self, images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) pixels (uint8 or float in [0, 1]) and (B, H, W) masks → float images and
        int64 masks of the crop size."""
        images = to_float(images)
        theta = self.sample_theta(images.shape[0], images.shape[-2:], images.device)
        return resample(images, masks, theta, self.crop)

    def sample_theta(self, batch: int, size, device) -> Tensor:
        """(B, 2, 3) affine maps from crop coordinates to source coordinates (normalised, as
        ``F.affine_grid`` takes them).

        A crop pixel at offset (oy + i + ½) in the image scaled by s reads the source at
        (oy + i + ½) / s. In normalised coordinates that is u = v·h/(s·H) + (2·oy + h)/(s·H) − 1,
        with the crop offset oy drawn so the crop lies inside the scaled image where it can
        (and overhangs it evenly at random where the scaled image is smaller than the crop).
        A flip negates the x slope.
        """
        (src_h, src_w), (crop_h, crop_w) = size, self.crop
        s = torch.empty(batch, device=device).uniform_(*self.scale)
        theta = torch.zeros(batch, 2, 3, device=device)
        for row, (crop, src) in enumerate(((crop_w, src_w), (crop_h, src_h))):
            spare = s * src - crop  # room left for the offset (negative: the crop overhangs)
            offset = torch.minimum(spare, torch.zeros_like(spare)) + torch.rand(batch, device=device) * spare.abs()
            theta[:, row, row] = crop / (s * src)
            theta[:, row, 2] = (2 * offset + crop) / (s * src) - 1
        if self.flip:
            flip = torch.rand(batch, device=device) < 0.5
            theta[:, 0, 0] = torch.where(flip, -theta[:, 0, 0], theta[:, 0, 0])
        return theta


def resample(images: Tensor, masks: Tensor, theta: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Apply the affine maps ``theta`` to float images (bilinear) and masks (nearest); pixels
    read from outside the source become 0 in the image and the ignore index in the mask."""
    b, c = images.shape[:2]
    grid = F.affine_grid(theta, [b, c, *size], align_corners=False)
    out_images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # the mask and a validity channel, sampled together: validity 0 marks padding
    labels = torch.stack([masks.float(), torch.ones_like(masks, dtype=torch.float32)], dim=1)
    sampled = F.grid_sample(labels, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    out_masks = torch.where(sampled[:, 1] > 0.5, sampled[:, 0], torch.full_like(sampled[:, 0], IGNORE_INDEX))
    return out_images, out_masks.round().long()


class Canvas:
    """Per-sample: PIL image and mask → (uint8 (3, H, W), uint8 (H, W)) of size ``size``.

    ``scale`` resizes first (bilinear image, nearest mask); ``lut`` (256 entries) maps raw mask
    values to training labels (Cityscapes label ids → train ids).
    """

    def __init__(self, size: tuple[int, int], scale: float = 1.0, lut: Tensor | None = None):
        self.size, self.scale, self.lut = tuple(size), scale, lut

    def __repr__(self) -> str:
        return f"Canvas(size={self.size}, scale={self.scale})"

    def __call__(self, image, mask) -> tuple[Tensor, Tensor]:
        import numpy as np

        if self.scale != 1.0:
            w, h = image.size
            new = (max(1, round(w * self.scale)), max(1, round(h * self.scale)))
            image = image.resize(new, resample=2)  # PIL bilinear
            mask = mask.resize(new, resample=0)    # PIL nearest
        pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
        labels = torch.from_numpy(np.array(mask, dtype=np.uint8))
        if self.lut is not None:
            labels = self.lut[labels.long()]
        return fit(pixels, labels, self.size)


def fit(image: Tensor, mask: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Pad (bottom/right; image 0, mask ignore) or crop (from the top-left) to ``size``."""
    h, w = size
    image, mask = image[:, :h, :w], mask[:h, :w]
    pad_h, pad_w = h - image.shape[1], w - image.shape[2]
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0)
        mask = F.pad(mask, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
    return image.contiguous(), mask.contiguous()
