"""What differs between classification and segmentation, and nothing else.

The training loop is the same for both tasks; a :class:`Task` supplies the few things that are
not: how a model is evaluated, which metric picks the best epoch, how training accuracy is
counted and how the figures are named in ``metrics.csv``, ``result.json`` and the console.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed
from .errors import UserError, close_matches
from .inputs import Inputs
from .metrics import IGNORE_INDEX, confusion_matrix, segmentation_scores


class Task(Protocol):
    name: str          # cls | seg (the --task value)
    score: str         # the metric that ranks epochs and runs: top1 | miou
    label: str         # how the score is printed
    train_metric: str  # the training accuracy column: top1 | pixel_acc

    def evaluate(self, model: nn.Module, data, inputs: Inputs) -> dict[str, Any]:
        """Test metrics of ``model`` as flat floats (``metrics.csv`` columns ``test_<key>``)."""

    def train_hits(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Any]:
        """(correct, counted) on a training batch; ``correct`` stays on the device (no host sync)."""

    def headline(self, metrics: dict[str, Any]) -> str:
        """One evaluation, for the console."""

    def summary(self, result: dict[str, Any]) -> str:
        """A finished run's ``result.json`` in one line: final and best score, the second metric."""

    def result_fields(self, last_row: dict[str, Any], class_names: tuple[str, ...]) -> dict[str, Any]:
        """``result.json``'s test figures, from the last epoch's ``metrics.csv`` row."""


def _hard(targets: Tensor) -> Tensor:
    """Class indices, also from soft (mixed) targets."""
    return targets if not targets.dtype.is_floating_point else targets.argmax(dim=1)


def _best(result: dict[str, Any], score: str) -> str:
    best = result.get(f"best_{score}")
    return f" (best {best:.2f}%)" if best is not None else ""


class Classification:
    name, score, label, train_metric = "cls", "top1", "top-1", "top1"

    def evaluate(self, model: nn.Module, data, inputs: Inputs) -> dict[str, Any]:
        """Top-1, top-5 and mean cross-entropy on the test set."""
        device = inputs.device
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss, count: one host sync
        for logits, targets in inputs.eval_batches(model, data.test):
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(targets[:, None])
            sums += torch.stack([hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                                 F.cross_entropy(logits, targets, reduction="sum").double(),
                                 torch.tensor(len(targets), dtype=torch.float64, device=device)])
        # each process saw its share of the test set: add the sums up over processes
        correct1, correct5, loss_sum, count = distributed.all_reduce_sum(sums).tolist()
        return {"top1": 100 * correct1 / count, "top5": 100 * correct5 / count, "loss": loss_sum / count}

    def train_hits(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, int]:
        hard = _hard(targets)
        return logits[: len(hard)].argmax(dim=1).eq(hard).sum(), len(hard)

    def headline(self, metrics: dict[str, Any]) -> str:
        return f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%"

    def summary(self, result: dict[str, Any]) -> str:
        return f"top-1 {result['top1']:.2f}%{_best(result, self.score)}, top-5 {result['top5']:.2f}%"

    def result_fields(self, last_row: dict[str, Any], class_names: tuple[str, ...]) -> dict[str, Any]:
        return {"top1": last_row["test_top1"], "top5": last_row["test_top5"], "test_loss": last_row["test_loss"]}


class Segmentation:
    name, score, label, train_metric = "seg", "miou", "mIoU", "pixel_acc"

    def evaluate(self, model: nn.Module, data, inputs: Inputs) -> dict[str, Any]:
        """mIoU, pixel accuracy and per-class IoU (NaN where undefined) from the confusion matrix
        of the whole test set, and the mean cross-entropy per labelled pixel."""
        device, num_classes = inputs.device, data.num_classes
        conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
        loss_sum, labelled = 0.0, 0
        for logits, masks in inputs.eval_batches(model, data.test):
            masks = masks.long()
            conf += confusion_matrix(logits.argmax(dim=1), masks, num_classes)
            loss_sum += F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX, reduction="sum").item()
            labelled += int((masks != IGNORE_INDEX).sum())
        # under DDP each process saw its share of the test set: add the counts up over processes
        conf = distributed.all_reduce_sum(conf)
        loss_sum, labelled = distributed.all_reduce_sum(
            torch.tensor([loss_sum, labelled], dtype=torch.float64, device=device)).tolist()
        if labelled == 0:
            raise UserError("the test set has no labelled pixel (every mask value is 255); check the dataset's masks")
        scores = segmentation_scores(conf.cpu())
        return {"miou": scores["miou"], "pixel_acc": scores["pixel_acc"], "loss": loss_sum / labelled,
                "per_class_iou": scores["per_class_iou"]}

    def train_hits(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        hard = _hard(targets)
        labelled = hard != IGNORE_INDEX
        return (logits[: len(hard)].argmax(dim=1).eq(hard) & labelled).sum(), labelled.sum()

    def headline(self, metrics: dict[str, Any]) -> str:
        return f"mIoU {metrics['miou']:.2f}%  pixel acc {metrics['pixel_acc']:.2f}%"

    def summary(self, result: dict[str, Any]) -> str:
        return f"mIoU {result['miou']:.2f}%{_best(result, self.score)}, pixel acc {result['pixel_acc']:.2f}%"

    def result_fields(self, last_row: dict[str, Any], class_names: tuple[str, ...]) -> dict[str, Any]:
        per_class = {name: _json_float(last_row.get(f"test_iou_{name}")) for name in class_names}
        return {"miou": last_row["test_miou"], "pixel_acc": last_row["test_pixel_acc"],
                "test_loss": last_row["test_loss"], "per_class_iou": per_class}


def metric_columns(metrics: dict[str, Any], class_names: tuple[str, ...]) -> dict[str, Any]:
    """``metrics.csv`` columns of one evaluation; per-class IoU becomes ``test_iou_<class>``."""
    row = {f"test_{k}": v for k, v in metrics.items() if k != "per_class_iou"}
    for name, value in zip(class_names, metrics.get("per_class_iou", ())):
        row[f"test_iou_{name}"] = value
    return row


def _json_float(value) -> float | None:
    """NaN (a class with no IoU) is not valid JSON: it is written as null."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


TASKS: dict[str, Task] = {task.name: task for task in (Classification(), Segmentation())}


def get_task(name: str) -> Task:
    if name in TASKS:
        return TASKS[name]
    raise UserError(f"unknown task {name!r}.{close_matches(name, list(TASKS))} Use --task cls or --task seg")
