"""The dataset catalogue: what a dataset is to kdzoo, and the registry of them by name.

A dataset is a function from a :class:`DataRequest` to a :class:`DataBundle`: train and test
loaders that yield raw pixels (uint8 or float in [0, 1], not yet augmented or normalised), plus
the augmentation and normalisation the engine applies on the device. Each has a default
training :class:`Recipe`. The builders themselves live in :mod:`.classification` and
:mod:`.segmentation`, which register here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import UserError, close_matches
from .loaders import CropFlip, InMemoryLoader, TorchLoader

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Recipe:
    """A dataset's default training recipe (any field can be overridden on the command line)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    warmup_epochs: float = 0.0
    nesterov: bool = False
    optimizer: str = "sgd"
    teacher_epochs: int | None = None  # cached teachers train this long (None: same as epochs)
    # images per split: how many a generated dataset makes (None: the whole split of a real one).
    # Part of the recipe so that they enter every run's hash: a cached teacher trained on another
    # amount of data is never taken for this recipe's.
    train_size: int | None = None
    test_size: int | None = None


@dataclass
class DataRequest:
    root: str | None = None
    download: bool = False
    input_size: int | None = None
    train_size: int | None = None
    test_size: int | None = None
    batch_size: int = 64
    seed: int = 0
    workers: int = 2
    # independently cropped copies of each training image (the method's ``loader_views``): a
    # loader that crops in its workers (image folders) then yields (B, views, C, H, W); loaders
    # that crop on the device (through ``DataBundle.augment``) ignore it
    views: int = 1


@dataclass
class DataBundle:
    train: InMemoryLoader | TorchLoader
    test: InMemoryLoader | TorchLoader
    num_classes: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Callable = field(default_factory=CropFlip)
    class_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    num_classes: int | None
    input_size: int
    recipe: Recipe
    build: Callable[[DataRequest], DataBundle]
    needs_root: bool = False
    task: str = "cls"  # a name may have one spec per task (shapes: labels for cls, masks for seg)
    # --data-root -> what identifies the data in it (see kdzoo.data.fingerprint); None for data
    # kdzoo generates, which its settings (sizes, input size) and kdzoo's version identify
    fingerprint: Callable[[str | None], str | None] | None = None

    def data_fingerprint(self, root: str | None) -> str | None:
        return self.fingerprint(root) if self.fingerprint is not None else None


_DATASETS: dict[tuple[str, str], DatasetSpec] = {}  # (task, name) -> spec


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    _DATASETS[(spec.task, spec.name)] = spec
    return spec


def dataset_names(task: str | None = None) -> list[str]:
    """Dataset names, of one task or of all."""
    return sorted({name for t, name in _DATASETS if task in (None, t)})


def dataset_specs() -> list[DatasetSpec]:
    """Every registered spec, by name then task (for `kdzoo list datasets`)."""
    return [_DATASETS[key] for key in sorted(_DATASETS, key=lambda k: (k[1], k[0]))]


def get_dataset(name: str, task: str = "cls") -> DatasetSpec:
    if (task, name) in _DATASETS:
        return _DATASETS[(task, name)]
    tasks = sorted(t for t, n in _DATASETS if n == name)
    if tasks:
        raise UserError(
            f"dataset {name!r} is for --task {' or '.join(tasks)}, not {task}; add --task {tasks[0]} "
            f"or pick a {task} dataset: {', '.join(dataset_names(task))}"
        )
    names = dataset_names(task)
    raise UserError(f"unknown dataset {name!r}.{close_matches(name, names)} Available for --task {task}: {', '.join(names)}")
