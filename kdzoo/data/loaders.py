"""Batches and the standard training augmentation, as tensor code that runs on any device.

In-memory datasets (``shapes``, CIFAR) live as one uint8 tensor on the training device and
are sliced into batches there: no DataLoader workers, no host-to-device copy per step.
Augmentation (random crop with padding, horizontal flip) is batched tensor code applied after
the batch reaches the device, which is also what lets a method such as CCD build extra views
from the raw images.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UserError


def rank_part(batch: Tensor, rank: int, world: int) -> Tensor:
    """This rank's share of one global batch (contiguous; the first ``len % world`` ranks get one more).

    Every rank draws the same global order from (seed, epoch), so the N shares of a batch are
    disjoint and together are exactly the batch a single process would take.
    """
    return batch.tensor_split(world)[rank] if world > 1 else batch


class Loader(abc.ABC):
    """What every training and test loader shares: a length in batches, an epoch that seeds the
    order, a share of every batch under data parallelism, and a device the batches arrive on.

    ``batches(skip)`` yields ``(images, targets, index)``: ``index`` holds each sample's position
    in the dataset (int64, on the device), so a method can keep per-sample state (CRD's memory
    bank) and a cache can key per-sample outputs. Under :meth:`shard` ``batch_size`` stays the
    global batch and each process yields its share of every batch.
    """

    def __init__(self, size: int, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False):
        self.size, self.batch_size, self.shuffle, self.seed, self.drop_last = size, batch_size, shuffle, seed, drop_last
        self.epoch = 0
        self.rank, self.world = 0, 1
        self.device = torch.device("cpu")

    def shard(self, rank: int, world: int) -> Loader:
        self.rank, self.world = rank, world
        return self

    def to(self, device) -> Loader:
        self.device = torch.device(device)
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.batch_size if self.drop_last else -(-self.size // self.batch_size)

    def order(self) -> Tensor:
        """This epoch's sample order: a function of (seed, epoch) alone, the same on every rank."""
        if not self.shuffle:
            return torch.arange(self.size)
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))

    def parts(self, skip: int = 0) -> Iterator[Tensor]:
        """Sample indices of this rank's share of each batch from batch ``skip`` on."""
        order = self.order()
        for i in range(skip, len(self)):
            part = rank_part(order[i * self.batch_size:(i + 1) * self.batch_size], self.rank, self.world)
            if len(part):  # a short last test batch may leave a rank nothing
                yield part

    @abc.abstractmethod
    def batches(self, skip: int = 0) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """``(images, targets, index)`` of this rank's share of each batch, from batch ``skip`` on."""

    def __iter__(self):
        return self.batches()

    def labels(self) -> Tensor | None:
        """Each sample's class (int64, CPU, in dataset order), or None when it cannot be known
        without reading every sample (masks, a dataset without a ``targets`` list)."""
        return None


class InMemoryLoader(Loader):
    """Shuffled mini-batches of a tensor dataset held on the training device; the order is a
    function of (seed, epoch)."""

    def __init__(self, images: Tensor, targets: Tensor, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False):
        super().__init__(len(targets), batch_size, shuffle, seed, drop_last)
        self.images, self.targets = images, targets

    def to(self, device) -> InMemoryLoader:
        super().to(device)
        self.images, self.targets = self.images.to(device), self.targets.to(device)
        return self

    def batches(self, skip: int = 0) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for part in self.parts(skip):
            index = part.to(self.images.device)
            yield self.images[index], self.targets[index], index

    def labels(self) -> Tensor | None:
        return self.targets.cpu().long() if self.targets.dim() == 1 else None


class _WithIndex(torch.utils.data.Dataset):
    """A dataset whose items carry their own index, so the DataLoader's batches do too."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, target = self.dataset[i]
        return image, target, i


class TorchLoader(Loader):
    """A DataLoader for datasets too large for memory (image folders).

    The batches are drawn here, from (seed, epoch), and handed to the DataLoader as a batch
    sampler: that makes the order reproducible, lets ``--resume`` skip the batches already seen,
    and (after :meth:`shard`) gives each process its share of every global batch — what a
    DistributedSampler does, with the same per-epoch seeding on every rank.
    """

    def __init__(self, dataset, batch_size: int, shuffle: bool, seed: int = 0, workers: int = 2, drop_last: bool = False):
        super().__init__(len(dataset), batch_size, shuffle, seed, drop_last)
        self.dataset, self.workers = dataset, workers

    def batches(self, skip: int = 0) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        loader = torch.utils.data.DataLoader(
            _WithIndex(ReadChecked(self.dataset)), batch_sampler=[p.tolist() for p in self.parts(skip)],
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )
        for images, targets, index in loader:
            yield (images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True),
                   index.to(self.device, non_blocking=True))


    def labels(self) -> Tensor | None:
        return dataset_labels(self.dataset)


def dataset_labels(dataset) -> Tensor | None:
    """The ``targets`` of a torchvision-style dataset (through ``Subset``s) as int64, else None."""
    if isinstance(dataset, torch.utils.data.Subset):
        inner = dataset_labels(dataset.dataset)
        return None if inner is None else inner[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    try:
        labels = torch.as_tensor(targets)
    except (TypeError, ValueError, RuntimeError):
        return None
    if labels.dim() != 1 or len(labels) != len(dataset) or labels.is_floating_point() or labels.dtype == torch.bool:
        return None
    return labels.long()


class UnreadableImage(UserError):
    """An image file of a folder dataset that cannot be decoded (truncated, or not an image).

    Raised in a DataLoader worker, it reaches the main process re-made by torch from the
    worker's formatted traceback (same type, the whole traceback as the message); the
    constructor then keeps only the traceback's last line, our message, so the CLI still
    prints one line.
    """

    def __init__(self, message: str):
        lines = str(message).strip().splitlines()
        if len(lines) > 1:
            message = lines[-1].split(": ", 1)[-1]
        super().__init__(message)


class ReadChecked(torch.utils.data.Dataset):
    """``dataset`` whose failure to decode an image names the file and how to get past it.

    A bad file is found only when its batch is read (decoding a whole ImageNet up front would
    take longer than an epoch), so the message says to remove the file and continue.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except (OSError, SyntaxError, ValueError) as e:  # PIL: UnidentifiedImageError is an OSError
            path = sample_path(self.dataset, index)
            if path is None:
                raise
            if type(e).__name__ == "UnidentifiedImageError":  # its text repeats the path
                detail = "no image format recognised"
            else:
                detail = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}"
            raise UnreadableImage(
                f"cannot read image {path} ({detail}); it is damaged or not an image: remove it "
                f"from the dataset folder (rm '{path}') or replace it, then run the same command with --resume"
            ) from None


def sample_path(dataset, index: int) -> str | None:
    """The file behind item ``index`` of an image-folder dataset (through ``Subset``s), if known."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    samples = getattr(dataset, "samples", None) or getattr(dataset, "images", None)
    if samples is None or not 0 <= index < len(samples):
        return None
    item = samples[index]
    return str(item[0] if isinstance(item, tuple) else Path(item))


def to_float(images: Tensor) -> Tensor:
    """uint8 pixels → float in [0, 1]; float input passes through."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


def crop_at(images: Tensor, padding: int, oy: Tensor, ox: Tensor) -> Tensor:
    """Each image cropped from its zero-padded copy at offsets (``oy``, ``ox``) in [0, 2·padding]."""
    if padding <= 0:
        return images
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    rows = (oy[:, None] + torch.arange(h, device=images.device)[None])  # (B, H)
    cols = (ox[:, None] + torch.arange(w, device=images.device)[None])  # (B, W)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    chans = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]


def random_crop(images: Tensor, padding: int) -> Tensor:
    """Per-sample random crop of the zero-padded batch back to its size (CIFAR's translate)."""
    if padding <= 0:
        return images
    side, n, device = 2 * padding + 1, images.shape[0], images.device
    return crop_at(images, padding, torch.randint(0, side, (n,), device=device), torch.randint(0, side, (n,), device=device))


def random_flip(images: Tensor) -> Tensor:
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


class CropFlip:
    """The standard CIFAR-style training augmentation on a float batch.

    Its space is discrete: every draw is one of :attr:`choices` (offset, flip) pairs, numbered by
    :meth:`draw` and replayed exactly by :meth:`apply`. That number is what lets a teacher-output
    cache (kdzoo/teacher_cache.py) key a sample's augmented view by (dataset index, choice).
    Calling it draws in the same order as :func:`random_crop` then :func:`random_flip`.
    """

    def __init__(self, padding: int = 4, flip: bool = True):
        self.padding, self.flip = padding, flip

    @property
    def choices(self) -> int:
        return (2 * max(self.padding, 0) + 1) ** 2 * (2 if self.flip else 1)

    def draw(self, n: int, device) -> Tensor:
        """``n`` random choices (int64 in [0, choices)), drawn from the global generators."""
        side, zeros = 2 * max(self.padding, 0) + 1, torch.zeros(n, dtype=torch.long, device=device)
        oy = torch.randint(0, side, (n,), device=device) if self.padding > 0 else zeros
        ox = torch.randint(0, side, (n,), device=device) if self.padding > 0 else zeros
        code = oy * side + ox
        if self.flip:
            code = code * 2 + (torch.rand(n, device=device) < 0.5).long()
        return code

    def apply(self, images: Tensor, choice: Tensor) -> Tensor:
        """The batch cropped and flipped as ``choice`` (from :meth:`draw`) says, image by image."""
        side = 2 * max(self.padding, 0) + 1
        flip, position = (choice % 2 == 1, choice // 2) if self.flip else (None, choice)
        images = crop_at(images, self.padding, position // side, position % side)
        return images if flip is None else torch.where(flip[:, None, None, None], images.flip(-1), images)

    def __call__(self, images: Tensor) -> Tensor:
        return self.apply(images, self.draw(images.shape[0], images.device))

    def __repr__(self) -> str:
        return f"CropFlip(padding={self.padding}, flip={self.flip})"
