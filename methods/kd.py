"""Hinton et al. 2015, "Distilling the Knowledge in a Neural Network".

L = w_ce · CE(z_s, y) + w_kd · τ² · KL(σ(z_t/τ) ‖ σ(z_s/τ)). The τ² factor keeps the soft
term's gradient scale independent of τ. Defaults are the CIFAR-100 setting of RepDistiller
and mdistiller (τ = 4, 0.1 / 0.9); their ImageNet setting (τ = 1, 0.5 / 0.5) is the default
on ``imagefolder``. ``logit_standardize`` z-scores both logits first (Sun et al., CVPR 2024)
and brings that paper's τ = 2, w_kd = 9.

Segmentation: the same loss per pixel. Every pixel is a sample, so the KL is summed over
classes and averaged over B·H·W pixels (all of them: the teacher has an answer for ignored
pixels too), and the CE over the labelled pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdzoo.losses import cross_entropy, softened_kl
from kdzoo.method import StepOutputs
from kdzoo.methods._logit import LogitMethod
from kdzoo.registry import register_method


@register_method("kd")
class KD(LogitMethod):
    summary = "Hinton KD: KL between temperature-softened teacher and student logits"
    tasks = ("cls", "seg")
    dataset_defaults = {"imagefolder": {"temperature": 1.0, "ce_weight": 0.5, "kd_weight": 0.5}}
    task_defaults = {"seg": {"temperature": 1.0, "ce_weight": 1.0, "kd_weight": 1.0}}
    switch_defaults = {"logit_standardize": {"temperature": 2.0, "kd_weight": 9.0}}

    @dataclass
    class Config:
        temperature: float = 4.0
        ce_weight: float = 0.1
        kd_weight: float = 0.9
        logit_standardize: bool = False

    def __init__(self, config=None):
        super().__init__(config)
        self.check_config(positive=("temperature",), non_negative=("ce_weight", "kd_weight"))

    def loss(self, out: StepOutputs):
        c = self.config
        teacher = self.teacher_output(out)
        return {
            "ce": c.ce_weight * cross_entropy(out.student.logits, out.targets),
            "kd": c.kd_weight * softened_kl(self.softenable(out.student.logits), self.softenable(teacher.logits),
                                            self.temperature()),
        }
