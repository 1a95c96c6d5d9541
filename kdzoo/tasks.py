"""What differs between classification and segmentation, and nothing else.

The training loop is the same for both tasks; a :class:`Task` supplies the few things that are
not: how a model is evaluated, which metric picks the best epoch, how training accuracy is
counted and how the figures are named in ``metrics.csv``, ``result.json`` and the console.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UserError, close_matches
from .metrics import IGNORE_INDEX, confusion_matrix, segmentation_scores

TASKS = ("cls", "seg")


@dataclass(frozen=True)
class Task:
    name: str
    score: str        # the metric that ranks epochs and runs: top1 | miou
    label: str        # how the score is printed
    train_metric: str  # the training accuracy column: top1 | pixel_acc

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, model: nn.Module, data, normalize, device, amp: bool, channels_last: bool) -> dict[str, Any]:
        """Test metrics of ``model`` as flat floats (``metrics.csv`` columns ``test_<key>``);
        segmentation adds ``per_class_iou`` (one value per class, NaN where undefined)."""
        from .engine import evaluate

        if self.name == "cls":
            return evaluate(model, data.test, normalize, device, amp, channels_last)
        return evaluate_segmentation(model, data.test, data.num_classes, normalize, device, amp, channels_last)

    # -- training accuracy ----------------------------------------------------------------
    def train_hits(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, int]:
        """(correct, counted) on a training batch: images for cls, labelled pixels for seg.
        ``correct`` stays on the device (no host sync per step)."""
        hard = targets if not targets.dtype.is_floating_point else targets.argmax(dim=1)
        hits = logits[: len(hard)].argmax(dim=1).eq(hard)
        if self.name == "cls":
            return hits.sum(), len(hard)
        labelled = hard != IGNORE_INDEX
        return (hits & labelled).sum(), labelled.sum()

    # -- reporting ----------------------------------------------------------------------
    def headline(self, metrics: dict[str, Any]) -> str:
        if self.name == "cls":
            return f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%"
        return f"mIoU {metrics['miou']:.2f}%  pixel acc {metrics['pixel_acc']:.2f}%"

    def summary(self, result: dict[str, Any]) -> str:
        """One line of a finished run's ``result.json``: final and best score, the second metric."""
        best = result.get(f"best_{self.score}")
        best_text = f" (best {best:.2f}%)" if best is not None else ""
        if self.name == "cls":
            return f"top-1 {result['top1']:.2f}%{best_text}, top-5 {result['top5']:.2f}%"
        return f"mIoU {result['miou']:.2f}%{best_text}, pixel acc {result['pixel_acc']:.2f}%"

    def result_fields(self, last_row: dict[str, Any], class_names: tuple[str, ...]) -> dict[str, Any]:
        """``result.json``'s test figures, from the last epoch's ``metrics.csv`` row."""
        if self.name == "cls":
            return {"top1": last_row["test_top1"], "top5": last_row["test_top5"], "test_loss": last_row["test_loss"]}
        per_class = {name: _json_float(last_row.get(f"test_iou_{name}")) for name in class_names}
        return {"miou": last_row["test_miou"], "pixel_acc": last_row["test_pixel_acc"],
                "test_loss": last_row["test_loss"], "per_class_iou": per_class}

    def row_fields(self, metrics: dict[str, Any], class_names: tuple[str, ...]) -> dict[str, Any]:
        """``metrics.csv`` columns of one evaluation; per-class IoU becomes ``test_iou_<class>``."""
        row = {f"test_{k}": v for k, v in metrics.items() if k != "per_class_iou"}
        for name, value in zip(class_names, metrics.get("per_class_iou", ())):
            row[f"test_iou_{name}"] = value
        return row


def evaluate_segmentation(model: nn.Module, loader, num_classes: int, normalize, device, amp: bool,
                          channels_last: bool) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU from the confusion matrix of the whole test set,
    and the mean cross-entropy per labelled pixel."""
    from .step import eval_batches

    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    loss_sum, labelled = 0.0, 0
    for logits, masks in eval_batches(model, loader, normalize, device, amp, channels_last):
        masks = masks.long()
        conf += confusion_matrix(logits.argmax(dim=1), masks, num_classes)
        loss_sum += F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX, reduction="sum").item()
        labelled += int((masks != IGNORE_INDEX).sum())
    # under DDP each process saw its share of the test set: add the counts up over processes
    from . import distributed
    conf = distributed.all_reduce_sum(conf)
    loss_sum, labelled = distributed.all_reduce_sum(
        torch.tensor([loss_sum, labelled], dtype=torch.float64, device=device)).tolist()
    if labelled == 0:
        raise UserError("the test set has no labelled pixel (every mask value is 255); check the dataset's masks")
    scores = segmentation_scores(conf.cpu())
    return {"miou": scores["miou"], "pixel_acc": scores["pixel_acc"], "loss": loss_sum / labelled,
            "per_class_iou": scores["per_class_iou"]}


def _json_float(value) -> float | None:
    """NaN (a class with no IoU) is not valid JSON: it is written as null."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


CLASSIFICATION = Task("cls", score="top1", label="top-1", train_metric="top1")
SEGMENTATION = Task("seg", score="miou", label="mIoU", train_metric="pixel_acc")


def get_task(name: str) -> Task:
    for task in (CLASSIFICATION, SEGMENTATION):
        if task.name == name:
            return task
    raise UserError(f"unknown task {name!r}.{close_matches(name, TASKS)} Use --task cls or --task seg")
