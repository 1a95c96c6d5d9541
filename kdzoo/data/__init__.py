"""Datasets by name, each with its default training recipe (see :mod:`.catalog`).

Importing the package registers every built-in dataset: classification (shapes, cifar10,
cifar100, imagefolder) and segmentation (shapes, voc, cityscapes).
"""

from . import classification, segmentation  # noqa: F401  (they register their datasets)
from .catalog import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataBundle,
    DataRequest,
    DatasetSpec,
    Recipe,
    dataset_names,
    dataset_specs,
    get_dataset,
    register_dataset,
)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "DataBundle", "DataRequest", "DatasetSpec", "Recipe",
    "dataset_names", "dataset_specs", "get_dataset", "register_dataset",
]
