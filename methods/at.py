"""Attention Transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).

Where a network looks is summarised by a spatial attention map: the mean over channels of the
squared activations at each position. A good student learns to look where the teacher looks, so
the student matches the teacher's L2-normalised attention maps at several stages. The maps are
channel-free, so networks of any widths compare directly, with no extra parameters.

    Q(F)      = vec( mean_c |F_c|^p ) / ‖ vec( mean_c |F_c|^p ) ‖₂          (p = 2)
    L_AT(l)   = mean over the batch and the H·W positions of ( Q(S_l) − Q(T_l) )²
    L         = ce_weight · CE(z_s, y) + at_weight · Σ_l L_AT(l)    (+ kd_weight · τ² · KL, off by default)

This is the authors' code (szagoruyko/attention-transfer ``utils.at_loss``; RepDistiller's,
mdistiller's and torchdistill's ``mode='code'`` are the same), not the paper's Eq. 2, which weights
by β/2 the (unsquared) L2 distance of the normalised maps: the code squares it and averages over the
H·W positions as well as the batch. Sum or mean over channels makes no difference after the
normalisation. When two paired maps differ in size,
the larger *feature map* is average-pooled to the smaller's grid before its attention map is
taken (RepDistiller's ``at_loss``), via :func:`kdzoo.align.to_common_grid` (``grid="smaller"``);
for square maps it is exactly the official ``adaptive_avg_pool2d``. Q is
:func:`kdzoo.losses.attention_map`. :func:`kdzoo.losses.attention_loss` is not used: it resizes
the *attention map* of the teacher to the student's grid, which is not what the official code
does when the sizes differ (it gives the official numbers only for maps of one size).

Defaults are RepDistiller's CIFAR-100 setting (``--distill attention -r 1 -a 0 -b 1000``; every
stage, ``feat[1:-1]``, paired in order and cut to the shorter list as Python's ``zip`` does).
The ImageNet setting (``imagefolder``) is the same: the authors' ``imagenet.py`` (szagoruyko/
attention-transfer, ``--beta 1e+3``, ``--alpha 0``) distils all four ResNet groups with β = 1000
and CE weight 1 (ResNet-34 → ResNet-18: 29.3 % top-1 error, i.e. 70.70 %), and mdistiller's
``configs/imagenet/r34_r18/at.yaml`` does the same. torchdistill's official config distils stages 3
and 4 only (``--set layers=stage3,stage4``; 70.90 % in its benchmark table).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kdzoo.methods._stage_pairs import parse_pair, resolve_pair, tap_names
from torch import Tensor

from kdzoo.align import to_common_grid
from kdzoo.errors import UserError
from kdzoo.losses import attention_map, cross_entropy, softened_kl
from kdzoo.method import Method, StepOutputs, Taps
from kdzoo.registry import register_method


def at_stage_loss(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """One stage: pool the larger feature map to the smaller grid, then the mean of (Q_s − Q_t)², float32."""
    student, teacher = to_common_grid(student.float(), teacher.detach().float(), grid="smaller")
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


@register_method("at")
class AT(Method):
    summary = "Attention transfer (Zagoruyko & Komodakis 2017): match normalised spatial attention maps of every stage"
    needs_teacher = True
    tasks = ("cls",)
    taps = Taps(student=["stages"], teacher=["stages"])
    # the same values as on CIFAR-100, stated for the record: the authors' ImageNet script
    dataset_defaults = {"imagefolder": {"layers": ("all",), "at_weight": 1000.0, "ce_weight": 1.0}}

    @dataclass
    class Config:
        layers: tuple[str, ...] = ("all",)  # 'all' (every stage, zipped in order) or 'stageK' / 'last' / 'S:T' entries
        p: float = 2.0                      # power of the activations in the attention map
        at_weight: float = 1000.0           # β
        ce_weight: float = 1.0
        kd_weight: float = 0.0              # optional vanilla KD term (RepDistiller's -a), off in its AT setting
        temperature: float = 4.0            # τ of the optional KD term

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        self.check_config(positive=("p", "temperature"), non_negative=("at_weight", "ce_weight", "kd_weight"))
        if not c.layers:
            raise UserError("method 'at': layers must name at least one layer, e.g. --set layers=all")
        if "all" in c.layers and len(c.layers) > 1:
            raise UserError("method 'at': layers=all already means every stage; give 'all' alone or a list of stages")
        self.specs = [] if c.layers == ("all",) else [parse_pair(self.name, spec) for spec in c.layers]
        if self.specs:
            self.taps = Taps(student=tap_names([s for s, _ in self.specs]),
                             teacher=tap_names([t for _, t in self.specs]))
        self.pairs: list[tuple[str, str]] = []

    def setup(self, student, teacher) -> None:
        if self.specs:
            pairs = []
            for spec in self.specs:
                pair = resolve_pair(self.name, spec, student, teacher)
                if pair not in pairs:
                    pairs.append(pair)
        else:
            pairs = list(zip(student.stage_names, teacher.stage_names))
            if not pairs:
                raise UserError(f"method 'at' needs stage taps on both networks ({student.name}, {teacher.name})")
        self.pairs = pairs
        self.taps = Taps(student=sorted({s for s, _ in pairs}, key=lambda k: int(k[5:])),
                         teacher=sorted({t for _, t in pairs}, key=lambda k: int(k[5:])))

    def stage_losses(self, out: StepOutputs) -> list[Tensor]:
        """Unweighted L_AT of every (student, teacher) stage pair, float32."""
        if not self.pairs:
            raise RuntimeError("at.setup() must run before the loss")
        teacher = self.teacher_output(out)
        return [at_stage_loss(out.student.features[s], teacher.features[t], self.config.p) for s, t in self.pairs]

    def loss(self, out: StepOutputs):
        c = self.config
        with torch.autocast(device_type=out.student.logits.device.type, enabled=False):
            terms = {"ce": c.ce_weight * cross_entropy(out.student.logits, out.targets),
                     "at": c.at_weight * sum(self.stage_losses(out))}
            if c.kd_weight > 0:
                terms["kd"] = c.kd_weight * softened_kl(out.student.logits, self.teacher_output(out).logits.detach(),
                                                        c.temperature)
        return terms
