"""Segmentation datasets (``--task seg``): ``shapes`` with its masks, ``voc`` and ``cityscapes``.

Targets are (B, H, W) int64 masks; 255 marks pixels that count nowhere (borders, unlabelled
regions, padding). The training augmentation needs the masks, so it cannot be the image-only
function a method's ``prepare_batch`` receives: :class:`AugmentedLoader` applies the joint
augmentation to each training batch on the device, and the bundle's ``augment`` is the identity
(:class:`AppliedByLoader`), so methods see already augmented pairs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UserError, missing
from ..metrics import IGNORE_INDEX
from . import shapes as shapes_module
from .catalog import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataBundle,
    DataRequest,
    DatasetSpec,
    Recipe,
    register_dataset,
)
from .fingerprint import folders
from .joint import Canvas, JointAugment
from .loaders import InMemoryLoader, TorchLoader, to_float


class AugmentedLoader:
    """A loader whose batches come out as (float images, int64 masks), augmented when ``augment`` is set."""

    def __init__(self, loader: InMemoryLoader | TorchLoader, augment: JointAugment | None = None):
        self.loader, self.augment = loader, augment

    def to(self, device) -> AugmentedLoader:
        self.loader.to(device)
        return self

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def shard(self, rank: int, world: int) -> AugmentedLoader:
        """This process's share of every batch under DDP (see ``InMemoryLoader.shard``)."""
        self.loader.shard(rank, world)
        return self

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def size(self) -> int:
        """Images in the split (what per-sample method state is sized by)."""
        return self.loader.size

    def labels(self) -> None:
        """Masks are no per-image labels (what class-aware sampling, as CRD's, would need)."""
        return None

    def batches(self, skip: int = 0) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for images, masks, index in self.loader.batches(skip):
            if self.augment is not None:
                yield (*self.augment(images, masks), index)
            else:
                yield to_float(images), masks.long(), index

    def __iter__(self):
        return self.batches()


class AppliedByLoader:
    """The bundle's ``augment`` for segmentation: the identity, since :class:`AugmentedLoader`
    has already augmented images and masks together; its repr records what was applied."""

    def __init__(self, joint: JointAugment):
        self.joint = joint

    def __call__(self, images: Tensor) -> Tensor:
        return images

    def __repr__(self) -> str:
        return f"{self.joint!r} (images and masks, in the loader)"


def _bundle(train, test, num_classes, size, mean, std, joint: JointAugment, class_names) -> DataBundle:
    return DataBundle(
        train=AugmentedLoader(train, joint), test=AugmentedLoader(test), num_classes=num_classes,
        input_size=size, mean=mean, std=std, augment=AppliedByLoader(joint), class_names=tuple(class_names),
    )


# -- shapes, with masks ----------------------------------------------------------------------
SHAPES_SEG_SIZE, SHAPES_SEG_TRAIN, SHAPES_SEG_TEST = 32, 8000, 300
SHAPES_SEG_CLASSES = ("background", *shapes_module.CLASSES)


def _build_shapes_seg(req: DataRequest) -> DataBundle:
    size = SHAPES_SEG_SIZE if req.input_size is None else req.input_size
    n_train = SHAPES_SEG_TRAIN if req.train_size is None else req.train_size
    n_test = SHAPES_SEG_TEST if req.test_size is None else req.test_size
    x_train, _, m_train = shapes_module.generate(n_train, size, seed=1)  # the cls data's seeds: the same images
    x_test, _, m_test = shapes_module.generate(n_test, size, seed=2)
    return _bundle(
        InMemoryLoader(x_train, m_train, req.batch_size, shuffle=True, seed=req.seed, drop_last=True),
        InMemoryLoader(x_test, m_test, max(req.batch_size, 256), shuffle=False),
        len(SHAPES_SEG_CLASSES), size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
        JointAugment(size, scale=(0.75, 1.25)), SHAPES_SEG_CLASSES,
    )


register_dataset(DatasetSpec(
    "shapes", "embedded default: the shapes images with per-pixel masks (background + 10 shape classes, 32 px)",
    len(SHAPES_SEG_CLASSES), SHAPES_SEG_SIZE,
    # AdamW as for classification. Batch 16: from scratch, a segmentation net first sits on the
    # background prior for ~100 steps (measured: pixel accuracy ≈ background share up to step 100
    # at batch 16), so the recipe buys steps rather than images per step, and fresh images rather
    # than repeats: 3 epochs of 8,000 took resnet18 to mIoU 57 % where 4 epochs of 2,000 gave 19 %.
    # The teacher trains one epoch longer: a resnet50 needs more steps than a resnet18 to pass it.
    # Figures in docs/segmentation.md.
    Recipe(epochs=3, batch_size=16, lr=3e-3, weight_decay=0.05, optimizer="adamw", warmup_epochs=0.25, teacher_epochs=4,
           train_size=SHAPES_SEG_TRAIN, test_size=SHAPES_SEG_TEST),
    _build_shapes_seg, task="seg",
))


# -- folder datasets ---------------------------------------------------------------------------
def _root(req: DataRequest, name: str, layout: str) -> Path:
    if not req.root:
        raise UserError(f"dataset {name!r} needs --data-root DIR (expected {layout}); it cannot be downloaded by kdzoo")
    root = Path(req.root).expanduser()
    if not root.is_dir():
        raise UserError(f"{missing('data root', root, 'folder')}; expected {layout}")
    return root


def _subset(dataset, size: int | None):
    return torch.utils.data.Subset(dataset, range(min(size, len(dataset)))) if size is not None else dataset


def _folder_bundle(train, test, req: DataRequest, num_classes: int, crop: int, joint: JointAugment, names) -> DataBundle:
    train, test = _subset(train, req.train_size), _subset(test, req.test_size)
    if len(train) == 0 or len(test) == 0:
        raise UserError(f"the dataset's {'train' if len(train) == 0 else 'val'} split lists no images; check --data-root")
    return _bundle(
        TorchLoader(train, req.batch_size, shuffle=True, seed=req.seed, workers=req.workers, drop_last=True),
        TorchLoader(test, req.batch_size, shuffle=False, workers=req.workers),
        num_classes, crop, IMAGENET_MEAN, IMAGENET_STD, joint, names,
    )


VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
VOC_CANVAS = (512, 512)  # every VOC 2012 image fits (at most 500 × 500)


def _build_voc(req: DataRequest) -> DataBundle:
    import torchvision

    layout = "DIR/VOCdevkit/VOC2012/ with JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/{train,val}.txt"
    root = _root(req, "voc", layout)
    canvas = Canvas(VOC_CANVAS)
    try:
        train = torchvision.datasets.VOCSegmentation(str(root), year="2012", image_set="train", transforms=canvas)
        test = torchvision.datasets.VOCSegmentation(str(root), year="2012", image_set="val", transforms=canvas)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        raise UserError(f"Pascal VOC 2012 not found under {str(root)!r} ({str(e).splitlines()[0][:80]}); "
                        f"expected {layout}") from None
    crop = 512 if req.input_size is None else req.input_size
    return _folder_bundle(train, test, req, len(VOC_CLASSES), crop, JointAugment(crop, scale=(0.5, 2.0)), VOC_CLASSES)


register_dataset(DatasetSpec(
    "voc", "Pascal VOC 2012 segmentation from --data-root (DIR/VOCdevkit/VOC2012; 21 classes, 512 px crops)",
    len(VOC_CLASSES), 512,
    Recipe(epochs=50, batch_size=16, lr=0.01, weight_decay=1e-4, schedule="cosine", warmup_epochs=1.0),
    _build_voc, needs_root=True, task="seg",
    fingerprint=folders(*(f"VOCdevkit/VOC2012/{d}" for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"))),
))


CITYSCAPES_SCALE = 0.5  # trained and evaluated at half resolution, 1024 × 512


def cityscapes_lut() -> tuple[Tensor, tuple[str, ...]]:
    """Label id → train id (19 classes; every other id → ignore), from torchvision's class table."""
    import torchvision

    lut = torch.full((256,), IGNORE_INDEX, dtype=torch.uint8)
    names = {}
    for c in torchvision.datasets.Cityscapes.classes:
        if 0 <= c.id < 256 and not c.ignore_in_eval and 0 <= c.train_id < 255:
            lut[c.id] = c.train_id
            names[c.train_id] = c.name
    return lut, tuple(names[i] for i in range(len(names)))


def _build_cityscapes(req: DataRequest) -> DataBundle:
    import torchvision

    layout = "DIR/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and DIR/gtFine/{train,val}/<city>/*_gtFine_labelIds.png"
    root = _root(req, "cityscapes", layout)
    lut, names = cityscapes_lut()
    canvas = Canvas((round(1024 * CITYSCAPES_SCALE), round(2048 * CITYSCAPES_SCALE)), CITYSCAPES_SCALE, lut)
    try:
        train = torchvision.datasets.Cityscapes(str(root), split="train", mode="fine", target_type="semantic", transforms=canvas)
        test = torchvision.datasets.Cityscapes(str(root), split="val", mode="fine", target_type="semantic", transforms=canvas)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        raise UserError(f"Cityscapes not found under {str(root)!r} ({str(e).splitlines()[0][:80]}); expected {layout}") from None
    crop = 512 if req.input_size is None else req.input_size
    return _folder_bundle(train, test, req, len(names), crop, JointAugment(crop, scale=(0.5, 2.0)), names)


register_dataset(DatasetSpec(
    "cityscapes", "Cityscapes fine from --data-root (leftImg8bit/, gtFine/; 19 classes at half resolution, 512 px crops)",
    19, 512,
    Recipe(epochs=120, batch_size=8, lr=0.01, weight_decay=1e-4, schedule="cosine", warmup_epochs=1.0),
    _build_cityscapes, needs_root=True, task="seg", fingerprint=folders("leftImg8bit", "gtFine"),
))
