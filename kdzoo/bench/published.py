"""Published top-1 results, so every leaderboard row can stand beside the paper's number.

The table (``published.csv`` beside this file) holds one row per (method, dataset, teacher,
student) as the papers and official READMEs report it, with its source. Networks carry kdzoo's
names (the CIFAR networks of RepDistiller's table as ``cifar_*``, ImageNet's as timm names);
``settings`` narrows a row to runs of one variant (``logit_standardize=true``). Read once.
"""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass
from importlib import resources
from typing import Any


@dataclass(frozen=True)
class Published:
    method: str
    settings: tuple[tuple[str, Any], ...]  # (key, value) the run's method settings must equal
    dataset: str                           # cifar100 | imagenet
    teacher: str                           # "" for a network trained alone
    student: str
    top1: float
    source: str


def _value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return float(text)
    except ValueError:
        return text.strip()


@functools.cache
def table() -> tuple[Published, ...]:
    text = resources.files(__package__).joinpath("published.csv").read_text()
    rows = []
    for r in csv.DictReader(io.StringIO(text)):
        settings = tuple((k.strip(), _value(v)) for k, v in (pair.split("=", 1) for pair in r["settings"].split(";") if pair))
        rows.append(Published(r["method"], settings, r["dataset"], r["teacher"], r["student"], float(r["top1"]), r["source"]))
    return tuple(rows)


def published_dataset(dataset: str | None, num_classes: int | None) -> str | None:
    """The table's name for a run's data: CIFAR-100 by name (torchvision checks its files);
    ImageNet is an ``imagefolder`` run with 1000 classes (an image folder of another size is
    some other dataset, and has no published row)."""
    if dataset == "cifar100":
        return "cifar100"
    if dataset == "imagefolder" and num_classes == 1000:
        return "imagenet"
    return None


def lookup(method: str | None, dataset: str | None, num_classes: int | None, teacher: str | None, student: str | None,
           method_config: dict[str, Any] | None) -> Published | None:
    """The published row for this run, or None: same method, data, teacher and student, and every
    setting the row names equal in the run (a row that names settings wins over one that does
    not, so KD with logit standardisation is compared with KD+LS, not with plain KD)."""
    data = published_dataset(dataset, num_classes)
    if data is None:
        return None
    config = method_config or {}
    # a timm name with a weights tag (resnet34.tv_in1k: torchvision's weights) is that network
    teacher, student = (teacher or "").split(".")[0], (student or "").split(".")[0]
    candidates = [p for p in table() if (p.method, p.dataset, p.teacher, p.student) == (method, data, teacher, student)
                  and all(config.get(k) == v for k, v in p.settings)]
    # a plain row must not stand for a run of a variant some other row names
    variants = {k for p in table() if p.method == method for k, _ in p.settings}
    candidates = [p for p in candidates if p.settings or not any(config.get(k) for k in variants)]
    return max(candidates, key=lambda p: len(p.settings), default=None)
