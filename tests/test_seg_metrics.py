"""mIoU, pixel accuracy and per-class IoU against confusion matrices counted by hand."""

import math

import pytest
import torch

from kdzoo.errors import UserError
from kdzoo.metrics import IGNORE_INDEX, confusion_matrix, segmentation_scores

I = IGNORE_INDEX


def test_confusion_matrix_counts_by_hand_and_skips_the_ignore_index():
    target = torch.tensor([[0, 0, 1, 1],
                           [2, 2, I, I]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 0, 2, 0]])   # the last two pixels are ignored whatever is predicted
    # rows = truth, columns = prediction
    expected = torch.tensor([[1, 1, 0],
                             [0, 2, 0],
                             [1, 0, 1]])
    assert torch.equal(confusion_matrix(pred, target, 3), expected)


def test_scores_of_a_hand_computed_matrix():
    conf = torch.tensor([[1, 1, 0],
                         [0, 2, 0],
                         [1, 0, 1]])
    scores = segmentation_scores(conf)
    # IoU = TP / (row + column − TP): class 0: 1/(2+2−1), class 1: 2/(2+3−2), class 2: 1/(2+1−1)
    ious = [1 / 3, 2 / 3, 1 / 2]
    assert scores["per_class_iou"] == pytest.approx([100 * v for v in ious])
    assert scores["miou"] == pytest.approx(100 * sum(ious) / 3)
    assert scores["pixel_acc"] == pytest.approx(100 * 4 / 6)


def test_classes_absent_from_a_batch_count_over_the_whole_set():
    """Two batches: class 2 appears only in the second. Summing the matrices before scoring gives
    the IoU of the pooled pixels, not the mean of per-batch scores."""
    batches = [
        (torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 0])),   # (target, pred), no class 2
        (torch.tensor([2, 2, 2, I]), torch.tensor([2, 2, 1, 2])),   # no class 0 labelled
    ]
    conf = sum(confusion_matrix(p, t, 3) for t, p in batches)
    scores = segmentation_scores(conf)
    # pooled: class 0 TP 2, FP 1 (a 1 predicted as 0) → 2/3; class 1 TP 1, FN 1, FP 1 → 1/3;
    # class 2 TP 2, FN 1 → 2/3; the ignored pixel's prediction 2 counts nowhere
    assert scores["per_class_iou"] == pytest.approx([200 / 3, 100 / 3, 200 / 3])
    assert scores["miou"] == pytest.approx(100 * (2 / 3 + 1 / 3 + 2 / 3) / 3)
    assert scores["pixel_acc"] == pytest.approx(100 * 5 / 7)


def test_a_class_never_labelled_nor_predicted_is_left_out_and_a_false_alarm_counts_zero():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 3, 1, 1])       # class 3 predicted once but never labelled; class 2 nowhere
    scores = segmentation_scores(confusion_matrix(pred, target, 4))
    iou = scores["per_class_iou"]
    assert iou[0] == pytest.approx(50.0) and iou[1] == pytest.approx(100.0)
    assert math.isnan(iou[2]) and iou[3] == 0.0
    assert scores["miou"] == pytest.approx((50 + 100 + 0) / 3)


def test_a_mask_value_outside_the_classes_is_a_user_error():
    with pytest.raises(UserError, match="value 7.*ignore index 255"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)
