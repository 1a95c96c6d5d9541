"""Paper recipes by name: everything around the loss that decides whether a number reproduces.

Distillation papers are reproduced or missed on recipe details — the learning rate of a
MobileNet student, whether norm weights are decayed, whether a block's last BN starts at zero —
more often than on the loss. A named recipe fixes every such setting to what the paper's official
code does, so ``--recipe cifar100-repdistiller`` means one thing everywhere. A flag given beside
it still wins for that field, and the run's record lists each such override.

The data side (crop with padding 4 and flip on CIFAR, random-resized crop on image folders) is
the dataset's and matches all of these recipes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UserError, close_matches

# Students RepDistiller trains with lr 0.01 instead of 0.05 (train_student.py: its lr rule for
# MobileNetV2, ShuffleV1 and ShuffleV2), matched by name.
_LIGHT_STUDENTS = ("mobilenet", "shufflenet")


@dataclass(frozen=True)
class NamedRecipe:
    name: str
    datasets: tuple[str, ...]      # the datasets it is written for (others are refused)
    source: str                    # where each value was read
    settings: dict[str, Any]       # RunConfig fields
    # (substring of the student's name, settings that replace the above for such a student)
    by_student: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = field(default=())

    def settings_for(self, student: str) -> dict[str, Any]:
        values = dict(self.settings)
        for patterns, changes in self.by_student:
            if any(p in student.lower() for p in patterns):
                values.update(changes)
        return values


_SGD_ALL_DECAY = dict(optimizer="sgd", momentum=0.9, gamma=0.1, warmup_epochs=0.0, weight_decay_on="all",
                      zero_init_last=False)

RECIPES: dict[str, NamedRecipe] = {r.name: r for r in (
    NamedRecipe(
        "cifar100-repdistiller", ("cifar100", "cifar10"),
        "HobbitLong/RepDistiller train_student.py defaults (the CRD table; mdistiller's configs/cifar100 "
        "are the same): SGD 0.05, 0.01 for MobileNet/ShuffleNet students, momentum 0.9, wd 5e-4 on every "
        "parameter, batch 64, 240 epochs, x0.1 at 150/180/210, fp32",
        dict(_SGD_ALL_DECAY, epochs=240, batch_size=64, lr=0.05, nesterov=False, weight_decay=5e-4, schedule="step",
             milestones=[150, 180, 210], amp=False),
        by_student=((_LIGHT_STUDENTS, {"lr": 0.01}),),
    ),
    NamedRecipe(
        "cifar100-frskd", ("cifar100", "cifar10"),
        "MingiJi/FRSKD classification/main.py defaults: SGD 0.1, momentum 0.9, wd 1e-4 on every parameter "
        "(the self-teacher's fusion weights included), batch 128, 200 epochs, x0.1 at 100/150, fp32",
        dict(_SGD_ALL_DECAY, epochs=200, batch_size=128, lr=0.1, nesterov=False, weight_decay=1e-4, schedule="step",
             milestones=[100, 150], amp=False),
    ),
    NamedRecipe(
        "cifar100-ccd", ("cifar100", "cifar10"),
        "liwei-group/CCD C100/train_student_singleccd.py: SGD Nesterov 0.1, momentum 0.9, wd 1e-4 on every "
        "parameter, 128 images (each a JDA pair) per batch, 240 epochs, x0.1 at 150/180/210, mixed precision",
        dict(_SGD_ALL_DECAY, epochs=240, batch_size=128, lr=0.1, nesterov=True, weight_decay=1e-4, schedule="step",
             milestones=[150, 180, 210], amp=True),
    ),
    NamedRecipe(
        "imagenet-torchvision", ("imagefolder",),
        "the ResNet-34 -> ResNet-18 table recipe of DKD/mdistiller (configs/imagenet/r34_r18/*.yaml, after "
        "torchvision's reference): SGD 0.2, momentum 0.9, wd 1e-4 on every parameter, batch 512, 100 epochs, "
        "x0.1 at 30/60/90, 224 px, torchvision's init (no zero-initialised last BN), fp32",
        dict(_SGD_ALL_DECAY, epochs=100, batch_size=512, lr=0.2, nesterov=False, weight_decay=1e-4, schedule="step",
             milestones=[30, 60, 90], input_size=224, amp=False),
    ),
)}


def get_recipe(name: str) -> NamedRecipe:
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}.{close_matches(name, list(RECIPES))} "
                        f"Available: {', '.join(RECIPES)} (see `kdzoo list recipes`)")
    return RECIPES[name]


def recipe_settings(name: str, dataset: str, student: str) -> dict[str, Any]:
    """The recipe's values for a run of ``student`` on ``dataset`` (refused on another dataset)."""
    recipe = get_recipe(name)
    if dataset not in recipe.datasets:
        raise UserError(f"recipe {name!r} is written for {' or '.join(recipe.datasets)}, not {dataset!r}; "
                        f"add --dataset {recipe.datasets[0]} (or pick a recipe for {dataset} from `kdzoo list recipes`)")
    return recipe.settings_for(student)
