"""Classification datasets: the embedded ``shapes``, CIFAR-10/100 from a local root, and any
ImageNet-style folder tree. Each registers itself in :mod:`.catalog` with its default recipe.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..errors import UserError, missing
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
from .loaders import CropFlip, InMemoryLoader, TorchLoader


def _subset(images, targets, size):
    return (images, targets) if size is None else (images[:size], targets[:size])


# -- shapes --------------------------------------------------------------------------------
# One epoch of 10,000 fresh images at batch 32 (312 steps) is the default budget: it buys steps,
# not repeats, so FRSKD (about 2x a plain step) ends in about 2 minutes on 2 CPU cores and the
# baseline in about 1 (measured: 88.8 % and 93.0 % test top-1, benchmarks/RESULTS.md).
SHAPES_TRAIN, SHAPES_TEST = 10_000, 1000


def _build_shapes(req: DataRequest) -> DataBundle:
    # None is "the default"; 0 is refused by RunConfig.validate, never read as the default
    size = 16 if req.input_size is None else req.input_size
    n_train = SHAPES_TRAIN if req.train_size is None else req.train_size
    n_test = SHAPES_TEST if req.test_size is None else req.test_size
    # the data are fixed by their own seeds, not the run's seed: every run sees the same data
    x_train, y_train, _ = shapes_module.generate(n_train, size, seed=1)
    x_test, y_test, _ = shapes_module.generate(n_test, size, seed=2)
    return DataBundle(
        train=InMemoryLoader(x_train, y_train, req.batch_size, shuffle=True, seed=req.seed, drop_last=True),
        test=InMemoryLoader(x_test, y_test, max(req.batch_size, 256), shuffle=False),
        num_classes=len(shapes_module.CLASSES), input_size=size,
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
        augment=CropFlip(padding=max(1, size // 8)), class_names=shapes_module.CLASSES,
    )


register_dataset(DatasetSpec(
    "shapes", "embedded default: procedural coloured shapes with clutter, generated in memory (10 classes, 16 px)",
    # AdamW with a short warm-up; batch 32 gives twice the steps of 64 for the same images, and
    # steps are what a CPU budget lacks. Cached teachers get two epochs (625 steps).
    10, 16, Recipe(epochs=1, batch_size=32, lr=5e-3, weight_decay=0.05, optimizer="adamw", warmup_epochs=0.1,
                   teacher_epochs=2, train_size=SHAPES_TRAIN, test_size=SHAPES_TEST),
    _build_shapes,
))


# -- CIFAR ---------------------------------------------------------------------------------
def _require_root(req: DataRequest, name: str, layout: str) -> Path:
    if not req.root:
        raise UserError(f"dataset {name!r} needs --data-root DIR (expected {layout}); add --download to fetch it when online")
    return Path(req.root).expanduser()


def _build_cifar(name: str, num_classes: int, mean, std):
    folder = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"

    def build(req: DataRequest) -> DataBundle:
        import torchvision

        root = _require_root(req, name, f"DIR/{folder}/")
        cls = torchvision.datasets.CIFAR10 if num_classes == 10 else torchvision.datasets.CIFAR100
        try:
            train = cls(str(root), train=True, download=req.download)
            test = cls(str(root), train=False, download=req.download)
        except RuntimeError:
            raise UserError(
                f"{name} not found under {str(root)!r}: expected {root / folder}/ (the python version of the "
                "dataset); point --data-root at its parent folder, or add --download when online"
            ) from None
        except OSError as e:
            raise UserError(f"could not download {name} into {str(root)!r} ({e}); download it elsewhere and pass --data-root") from None

        def tensors(ds):
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            return images, torch.tensor(ds.targets, dtype=torch.long)

        x_train, y_train = _subset(*tensors(train), req.train_size)
        x_test, y_test = _subset(*tensors(test), req.test_size)
        return DataBundle(
            train=InMemoryLoader(x_train, y_train, req.batch_size, shuffle=True, seed=req.seed, drop_last=True),
            test=InMemoryLoader(x_test, y_test, max(req.batch_size, 256), shuffle=False),
            num_classes=num_classes, input_size=32, mean=mean, std=std, augment=CropFlip(4),
            class_names=tuple(train.classes),
        )

    return build


def _cifar_fingerprint(num_classes: int):
    """torchvision loads CIFAR only when every file's MD5 equals the published one, so any root it
    loads from holds the same data: the fingerprint is those MD5s (the same before a --download
    as after it)."""

    def fingerprint(root: str | None) -> str:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if num_classes == 10 else torchvision.datasets.CIFAR100
        md5s = sorted(md5 for _, md5 in (*cls.train_list, *cls.test_list)) + [cls.meta["md5"]]
        return f"{cls.__name__} md5-checked {hashlib.sha256(' '.join(md5s).encode()).hexdigest()[:12]}"

    return fingerprint


_CIFAR_RECIPE = Recipe(epochs=240, batch_size=64, lr=0.05, weight_decay=5e-4, schedule="step", milestones=(150, 180, 210))
register_dataset(DatasetSpec(
    "cifar10", "CIFAR-10 from --data-root (torchvision layout; --download when online)", 10, 32, _CIFAR_RECIPE,
    _build_cifar("cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), needs_root=True,
    fingerprint=_cifar_fingerprint(10),
))
register_dataset(DatasetSpec(
    "cifar100", "CIFAR-100 from --data-root (torchvision layout; --download when online)", 100, 32, _CIFAR_RECIPE,
    _build_cifar("cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)), needs_root=True,
    fingerprint=_cifar_fingerprint(100),
))


# -- image folders -------------------------------------------------------------------------
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def _check_split(root: Path, split_names: tuple[str, ...]) -> Path:
    for name in split_names:
        split = root / name
        if split.is_dir():
            classes = [d for d in split.iterdir() if d.is_dir()]
            if not classes:
                raise UserError(f"{split} holds no class folders; expected {split}/<class>/<image files>")
            if not any(f.suffix.lower() in IMAGE_SUFFIXES for d in classes for f in d.iterdir()):
                raise UserError(f"the class folders under {split} hold no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            return split
    raise UserError(
        f"{root} has no {' or '.join(split_names)} folder; expected {root}/{split_names[0]}/<class>/<image files>"
    )


class Views:
    """A per-image transform applied ``n`` times over, stacked: ``(n, C, H, W)``. Each call of
    ``transform`` draws its own randomness, so ``Views(RandomResizedCrop + ToTensor, 2)`` gives
    two independent crops of one image (the views a method's ``loader_views`` asks for)."""

    def __init__(self, transform, n: int):
        if n < 1:
            raise ValueError(f"Views needs at least 1 view, got {n}")
        self.transform, self.n = transform, n

    def __call__(self, image) -> torch.Tensor:
        return torch.stack([self.transform(image) for _ in range(self.n)])

    def __repr__(self) -> str:
        return f"Views({self.transform!r}, n={self.n})"


def _build_imagefolder(req: DataRequest) -> DataBundle:
    import torchvision
    from torchvision import transforms as T

    root = _require_root(req, "imagefolder", "DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg")
    if not root.is_dir():
        raise UserError(f"{missing('data root', root, 'folder')}; expected DIR/train/<class>/ and DIR/val/<class>/")
    train_dir, test_dir = _check_split(root, ("train",)), _check_split(root, ("val", "test"))
    size = 224 if req.input_size is None else req.input_size
    crop = T.Compose([T.RandomResizedCrop(size), T.ToTensor()])
    # the crop happens here, in the workers: a method that needs separately cropped views
    # (loader_views > 1) gets them from here, (B, views, C, H, W), and its augment flips only
    train = torchvision.datasets.ImageFolder(str(train_dir), crop if req.views == 1 else Views(crop, req.views))
    test = torchvision.datasets.ImageFolder(
        str(test_dir), T.Compose([T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size), T.ToTensor()])
    )
    if train.classes != test.classes:
        raise UserError(f"{train_dir} and {test_dir} hold different class folders; both need the same classes")
    if req.train_size is not None:
        train = torch.utils.data.Subset(train, range(min(req.train_size, len(train))))
    if req.test_size is not None:
        test = torch.utils.data.Subset(test, range(min(req.test_size, len(test))))
    classes = tuple(train.dataset.classes if isinstance(train, torch.utils.data.Subset) else train.classes)
    return DataBundle(
        train=TorchLoader(train, req.batch_size, shuffle=True, seed=req.seed, workers=req.workers, drop_last=True),
        test=TorchLoader(test, max(req.batch_size, 256), shuffle=False, workers=req.workers),
        num_classes=len(classes), input_size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        augment=CropFlip(padding=0), class_names=classes,
    )


register_dataset(DatasetSpec(
    "imagefolder", "any ImageNet-style tree: --data-root DIR with DIR/train/<class>/ and DIR/val/<class>/",
    None, 224, Recipe(epochs=100, batch_size=256, lr=0.1, weight_decay=1e-4, schedule="step", milestones=(30, 60, 90)),
    _build_imagefolder, needs_root=True, fingerprint=folders("train", "val", "test"),
))
