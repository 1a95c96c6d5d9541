"""Segmentation metrics from a confusion matrix: mIoU, pixel accuracy and per-class IoU.

Scores are computed once from the confusion matrix summed over the whole test set, never
averaged over batches: a class missing from one batch still counts with every pixel it has
elsewhere, and a small batch weighs no more than a large one. Pixels labelled with the ignore
index (255: object borders in VOC, unlabelled regions, padding) enter neither the matrix nor
any score.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import UserError

IGNORE_INDEX = 255


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(K, K) int64 counts: row = true class, column = predicted class, over the labelled pixels.

    ``pred`` and ``target`` hold class indices of the same shape (any shape, e.g. (B, H, W)).
    Target values outside [0, K) other than ``ignore_index`` are a data error (UserError).
    """
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long()
    labelled = target != ignore_index
    target, pred = target[labelled], pred[labelled]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        bad = int(target.max()) if int(target.max()) >= num_classes else int(target.min())
        raise UserError(f"a mask holds the value {bad}, which is neither a class in [0, {num_classes}) nor the ignore "
                        f"index {ignore_index}; check that the dataset's masks match its class list")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_per_class(conf: Tensor) -> list[float]:
    """IoU_c = TP / (TP + FP + FN) for every class; NaN for a class that is neither in the
    labels nor ever predicted (its union is empty, so it has no IoU at all)."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(dim=0) + conf.sum(dim=1) - tp
    return [float(t / u) if u > 0 else math.nan for t, u in zip(tp.tolist(), union.tolist())]


def segmentation_scores(conf: Tensor) -> dict[str, float | list[float]]:
    """``miou`` (mean IoU over the classes that have one, %), ``pixel_acc`` (%) and
    ``per_class_iou`` (list, %, NaN where undefined).

    A class predicted somewhere but absent from the labels has IoU 0 and lowers the mean; a
    class absent from both is left out of the mean (the convention of mmsegmentation and the
    VOC/Cityscapes evaluation code).
    """
    ious = iou_per_class(conf)
    defined = [v for v in ious if not math.isnan(v)]
    total = int(conf.sum())
    return {
        "miou": 100 * sum(defined) / len(defined) if defined else math.nan,
        "pixel_acc": 100 * int(conf.diag().sum()) / total if total else math.nan,
        "per_class_iou": [100 * v for v in ious],
    }
