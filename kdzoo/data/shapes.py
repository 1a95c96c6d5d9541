"""``shapes``: the embedded default dataset, generated in memory from a seed.

Ten classes of coloured geometric shapes (circle, ring, square, diamond, triangle, cross,
star, hexagon, ellipse, crescent), each drawn light on a darker, textured, noisy background at
a random position, scale, colour and a small tilt, with smaller distractor shapes of other
classes as clutter — some drawn over the main shape. The label is the class of the main
(largest) shape; the per-pixel mask holds, for each pixel, 0 for background or 1 + class of the
shape visible there.

It needs no download, builds thousands of images in about a second on a CPU, learns fast enough
that one epoch on two CPU cores teaches a resnet18 most of it, and stays hard enough that methods
separate: small, cluttered or occluded shapes make 100 % accuracy unreachable for a small
network trained briefly.

Why light-on-dark and a small tilt (measured, benchmarks/RESULTS.md): with colours drawn freely
and a full turn of rotation, resnet18 reached 35 % after one epoch. A full turn makes a square a
diamond and costs ~17 points; free contrast polarity (the shape lighter or darker than the
background, in any colour) costs most of the rest — with both fixed, 93 %.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# How often a smaller shape of another class lies under the main one (clutter) or over it
# (occluders), and how strong the pixel noise is: what makes the task hard for a short run.
CLUTTER, OCCLUDERS, NOISE = 0.4, 0.1, 0.03
TILT = 15.0  # the main shape is rotated by up to this many degrees either way
BACKGROUND = 0.45  # the background's channels are at most this bright; the main shape's at least 1 - BACKGROUND

CLASSES = ("circle", "ring", "square", "diamond", "triangle", "cross", "star", "hexagon", "ellipse", "crescent")


def _inside(kind: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Membership of local coordinates (x, y) (unit radius) in each image's shape ``kind``."""
    r = torch.sqrt(x * x + y * y)
    theta = torch.atan2(y, x)
    masks = [
        r < 1.0,                                                                     # circle
        (r < 1.0) & (r > 0.55),                                                      # ring
        torch.maximum(x.abs(), y.abs()) < 0.8,                                       # square
        x.abs() + y.abs() < 1.0,                                                     # diamond
        (y > -0.5) & (y < 1.0 - 1.732 * x.abs()),                                    # triangle
        ((x.abs() < 0.3) & (y.abs() < 1.0)) | ((y.abs() < 0.3) & (x.abs() < 1.0)),   # cross
        r < 0.5 + 0.45 * torch.cos(5 * theta).clamp(min=0) ** 2,                     # star
        r * torch.cos(torch.remainder(theta, math.pi / 3) - math.pi / 6) < 0.88,     # hexagon
        (x / 1.0) ** 2 + (y / 0.5) ** 2 < 1.0,                                       # ellipse
        (r < 1.0) & (((x - 0.45) ** 2 + y ** 2).sqrt() > 0.75),                      # crescent
    ]
    stacked = torch.stack(masks, dim=0)  # (K, N, H, W)
    return stacked.gather(0, kind.view(1, -1, 1, 1).expand(1, *x.shape)).squeeze(0)


def _draw(images, masks, kind, cx, cy, radius, angle, colour, grid_x, grid_y):
    c, s = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    dx = (grid_x - cx.view(-1, 1, 1)) / radius.view(-1, 1, 1)
    dy = (grid_y - cy.view(-1, 1, 1)) / radius.view(-1, 1, 1)
    lx, ly = c * dx + s * dy, -s * dx + c * dy
    inside = _inside(kind, lx, ly)
    images[:] = torch.where(inside.unsqueeze(1), colour.view(-1, 3, 1, 1), images)
    masks[:] = torch.where(inside, (kind + 1).view(-1, 1, 1), masks)


def generate(n: int, size: int = 16, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` images (uint8, N×3×size×size), labels (int64, N) and masks (uint8, N×size×size)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1  # [-1, 1]
    grid_y, grid_x = torch.meshgrid(coords, coords, indexing="ij")
    grid_x, grid_y = grid_x.expand(n, size, size), grid_y.expand(n, size, size)

    # background: a dark colour gradient with faint stripes of random frequency and orientation
    base = rand(n, 3, 1, 1) * 0.8 + 0.1
    slope = (rand(n, 3, 1, 1) - 0.5) * 0.4
    freq = rand(n, 1, 1, 1) * 6 + 2
    phi = rand(n, 1, 1, 1) * math.pi
    stripes = torch.sin(freq * (grid_x.unsqueeze(1) * torch.cos(phi) + grid_y.unsqueeze(1) * torch.sin(phi)) * math.pi)
    images = (base + slope * grid_x.unsqueeze(1) + 0.06 * stripes * rand(n, 1, 1, 1)) * BACKGROUND
    masks = torch.zeros(n, size, size, dtype=torch.long)

    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    main_radius = 0.6 + rand(n) * 0.35            # fraction of the half-width
    main_colour = 1 - BACKGROUND + rand(n, 3) * BACKGROUND  # lighter than any background

    def distractors(count_prob: float, scale: float):
        present = rand(n) < count_prob
        kind = torch.remainder(labels + 1 + torch.randint(0, len(CLASSES) - 1, (n,), generator=g), len(CLASSES))
        radius = main_radius * (0.2 + rand(n) * scale)
        cx, cy = rand(n) * 1.6 - 0.8, rand(n) * 1.6 - 0.8
        angle = rand(n) * 2 * math.pi
        colour = rand(n, 3)
        radius = torch.where(present, radius, torch.full_like(radius, 1e-3))  # absent: too small to hit a pixel
        return kind, cx, cy, radius, angle, colour

    _draw(images, masks, *distractors(CLUTTER, 0.3), grid_x, grid_y)  # clutter under the main shape
    cx = (rand(n) * 2 - 1) * (1 - main_radius) * 0.9
    cy = (rand(n) * 2 - 1) * (1 - main_radius) * 0.9
    _draw(images, masks, labels, cx, cy, main_radius, (rand(n) * 2 - 1) * math.radians(TILT), main_colour, grid_x, grid_y)
    _draw(images, masks, *distractors(OCCLUDERS, 0.2), grid_x, grid_y)  # small occluders on top

    images = images + torch.randn(images.shape, generator=g) * NOISE
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels, masks.to(torch.uint8)
