"""Plain supervised training: the reference every method is compared against."""

from __future__ import annotations

from dataclasses import dataclass

from kdzoo.losses import class_probabilities, cross_entropy
from kdzoo.method import Method, StepOutputs
from kdzoo.registry import register_method


@register_method("baseline")
class Baseline(Method):
    """Cross-entropy on the labels, no teacher."""

    summary = "cross-entropy only (no distillation); per labelled pixel on segmentation"
    needs_teacher = False
    tasks = ("cls", "seg")

    @dataclass
    class Config:
        label_smoothing: float = 0.0

    def __init__(self, config=None):
        super().__init__(config)
        self.check_config(unit=("label_smoothing",))

    def loss(self, out: StepOutputs):
        targets, eps = out.targets, self.config.label_smoothing
        if out.student.logits.dim() > 2:  # segmentation: masks with ignored pixels
            return {"ce": cross_entropy(out.student.logits, targets, label_smoothing=eps)}
        if eps > 0:
            k = out.student.logits.shape[1]
            targets = class_probabilities(targets, k) * (1 - eps) + eps / k
        return {"ce": cross_entropy(out.student.logits, targets)}
