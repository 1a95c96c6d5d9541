"""VID: Variational Information Distillation (Ahn, Hu, Damianou, Lawrence, Dai, CVPR 2019).

Maximise a variational lower bound on the mutual information between teacher and student
features: for each paired stage, a small network reads the student's map and predicts the
teacher's as a Gaussian with a mean per position and a learned variance per channel. The
student then has to carry what the teacher knows (the mean must be predictable from it), while
the variance lets the bound give up on teacher channels that cannot be predicted instead of
forcing them.

    μ_l   = R_l(S_l)                       R_l: conv1×1 – ReLU – conv1×1 – ReLU – conv1×1, no biases,
                                           C_s → C_t → C_t → C_t
    σ²_c  = softplus(α_c) + ε              one learned α per teacher channel; α_c initialised so σ²_c = 5
    L_l   = mean over b, c, h, w of ½ · [ (μ_l − T_l)² / σ²_c + log σ²_c ]
    L     = ce_weight · CE + vid_weight · Σ_l L_l  (+ kd_weight · τ² · KL, off as in RepDistiller's table)

Paired stages: every stage after the stem of both networks, zipped from the first (RepDistiller
distils ``feat[1:-1]``: the maps between the stem and the pooled vector, ``zip`` pairing them);
``layers`` names others. When the two maps of a pair differ in size, the larger is average-pooled
to the smaller one's grid before the regressor reads it (the official code pools the student's
input or the teacher's target, whichever is larger) — :func:`kdzoo.align.to_common_grid` with
``grid="smaller"``. The constant ½·log 2π of the negative log-likelihood is dropped, and the mean
runs over every element, as in the official code (the paper sums over channels and positions).

Defaults: RepDistiller's CIFAR-100 setting (``-r 1 -a 0 -b 1``; init_pred_var 5, eps 1e-5).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdzoo.align import to_common_grid
from kdzoo.errors import UserError
from kdzoo.losses import cross_entropy, softened_kl
from kdzoo.method import Method, StepOutputs, Taps
from kdzoo.registry import register_method

_STAGE = re.compile(r"^stage(\d+)$")


def inverse_softplus(y: float) -> float:
    """α with softplus(α) = y, computed in float64 as the official initialisation is."""
    return math.log(math.expm1(y))


def vid_nll(mean: Tensor, target: Tensor, variance: Tensor) -> Tensor:
    """½ · [(μ − t)² / σ² + log σ²] averaged over every element; ``variance`` is (C,)."""
    var = variance.view(1, -1, 1, 1)
    return (0.5 * ((mean - target) ** 2 / var + var.log())).mean()


class VIDRegressor(nn.Module):
    """One stage pair's predictor: the mean network and the per-channel variance of the teacher's map."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, init_var: float, eps: float):
        super().__init__()
        self.mean = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid_channels, out_channels, 1, bias=False),
        )
        self.log_scale = nn.Parameter(torch.full((out_channels,), inverse_softplus(init_var - eps)))
        self.eps = eps

    def variance(self) -> Tensor:
        return F.softplus(self.log_scale) + self.eps

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        student, teacher = to_common_grid(student, teacher, grid="smaller")
        return vid_nll(self.mean(student), teacher, self.variance())


def _parse_layer(spec: str) -> tuple[str, str]:
    student, sep, teacher = (part.strip() for part in spec.strip().partition(":"))
    teacher = teacher if sep else student
    if not (_STAGE.match(student) and _STAGE.match(teacher)):
        raise UserError(f"method 'vid': layer {spec!r} is not understood; use 'stageK' (the same stage on both "
                        "networks) or 'STUDENT:TEACHER' such as 'stage2:stage3'")
    return student, teacher


@register_method("vid")
class VID(Method):
    summary = "Variational Information Distillation: Gaussian likelihood of teacher stage maps under a student regressor"
    needs_teacher = True
    tasks = ("cls",)
    taps = Taps(student=["stages"], teacher=["stages"])
    # RepDistiller has no ImageNet setting for VID (nor has the paper): the CIFAR-100 one applies.
    dataset_defaults = {"imagefolder": {}}

    @dataclass
    class Config:
        layers: tuple[str, ...] = ()   # () = every stage, zipped from the first; or 'stageK' / 'S:T' pairs
        vid_weight: float = 1.0        # β (RepDistiller -b 1)
        ce_weight: float = 1.0         # γ (-r 1)
        kd_weight: float = 0.0         # α (-a 0 in RepDistiller's table)
        temperature: float = 4.0       # τ of the optional KD term (--kd_T 4)
        init_var: float = 5.0          # σ² at initialisation (init_pred_var)
        eps: float = 1e-5              # floor of σ²

    def __init__(self, config=None):
        super().__init__(config)
        self.check_config(positive=("temperature", "eps"), non_negative=("vid_weight", "ce_weight", "kd_weight"))
        if self.config.init_var <= self.config.eps:
            raise UserError(f"method 'vid': init_var must exceed eps ({self.config.eps}), got {self.config.init_var}")
        self.layer_specs = [_parse_layer(s) for s in self.config.layers]
        if self.layer_specs:
            self.taps = Taps(student=sorted({s for s, _ in self.layer_specs}), teacher=sorted({t for _, t in self.layer_specs}))
        self.pairs: list[tuple[str, str]] = []

    def setup(self, student, teacher) -> None:
        if teacher is None:
            raise UserError("method 'vid' needs a teacher: add --teacher MODEL")
        for info, side in ((student, "student"), (teacher, "teacher")):
            if not info.stage_names:
                raise UserError(f"method 'vid' needs stage taps, but {side} {info.name} has no timm feature_info stages")
        if self.layer_specs:
            pairs = list(dict.fromkeys(self.layer_specs))
            for s, t in pairs:
                for name, info, side in ((s, student, "student"), (t, teacher, "teacher")):
                    if name not in info.stage_names:
                        raise UserError(f"method 'vid': {side} {info.name} has no {name}; it has "
                                        f"{info.stage_names[0]}..{info.stage_names[-1]}")
        else:
            pairs = list(zip(student.stage_names, teacher.stage_names))
        self.pairs = pairs
        self.taps = Taps(student=[s for s, _ in pairs], teacher=[t for _, t in pairs])
        c = self.config
        self.regressors = nn.ModuleList(
            VIDRegressor(student.shapes[s][0], teacher.shapes[t][0], teacher.shapes[t][0], c.init_var, c.eps)
            for s, t in pairs)

    def layer_losses(self, out: StepOutputs) -> list[Tensor]:
        """Unweighted L_l for every stage pair, float32."""
        if not self.pairs:
            raise RuntimeError("vid.setup() must run before the loss")
        teacher = self.teacher_output(out)
        return [regressor(out.student.features[s].float(), teacher.features[t].detach().float())
                for (s, t), regressor in zip(self.pairs, self.regressors)]

    def loss(self, out: StepOutputs):
        c = self.config
        with torch.autocast(device_type=out.student.logits.device.type, enabled=False):
            terms = {"ce": c.ce_weight * cross_entropy(out.student.logits.float(), out.targets),
                     "vid": c.vid_weight * sum(self.layer_losses(out))}
            if c.kd_weight > 0:
                teacher = self.teacher_output(out)
                terms["kd"] = c.kd_weight * softened_kl(out.student.logits.float(), teacher.logits.detach().float(),
                                                        c.temperature)
        return terms
