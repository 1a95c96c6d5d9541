"""FitNets: Hints for Thin Deep Nets (Romero, Ballas, Kahou, Chassang, Gatta, Bengio, ICLR 2015).

A thin student learns faster and better when an intermediate layer of it (the *guided* layer)
is trained to predict an intermediate layer of the teacher (the *hint*): the hint is a
richer, denser target than the labels. The widths and sizes of the two layers differ, so a
small trained regressor r maps the student's map onto the teacher's before they are compared.

    L = ce_weight · CE(z_s, y) + hint_weight · MSE( r(S_g), T_h )    (+ kd_weight · τ² · KL, off by default)

MSE is the mean over every element of the teacher's map (B·C_t·H_t·W_t). This is the one-stage
training of RepDistiller and mdistiller, the setting their tables report: regressor and student
are trained together with the cross-entropy from the first step. The paper's own recipe trains in
two stages (hint pre-training of the lower student layers, then KD); kdzoo does not run that.

The regressor (RepDistiller's ``ConvReg``) is a convolution chosen by the spatial ratio, then
batch norm and ReLU:

- student H = 2 × teacher H: 3×3 convolution, stride 2, padding 1;
- student H × 2 = teacher H: 4×4 transposed convolution, stride 2, padding 1;
- student H ≥ teacher H: a "valid" convolution with kernel (1 + H_s − H_t, 1 + W_s − W_t)
  (1×1 when the sizes agree);
- any other pair (a student map smaller than the teacher's but not by 2×, which the official
  code cannot map, or non-square maps whose widths do not follow): the student map is resized
  to the teacher's grid with :func:`kdzoo.align.to_common_grid` and projected by
  :class:`kdzoo.align.ChannelProjection` (1×1 conv + batch norm), then ReLU.

Defaults are RepDistiller's CIFAR-100 setting (``train_student.py --distill hint -r 1 -a 0 -b
100 --hint_layer 2``; mdistiller's ``CFG.FITNET`` is the same). ``--hint_layer 2`` indexes
RepDistiller's feature list, whose entry 0 is the stem: kdzoo's ``stage2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kdzoo.methods._stage_pairs import parse_pair, resolve_pair, tap_names
from torch import Tensor, nn

from kdzoo.align import ChannelProjection, to_common_grid
from kdzoo.losses import cross_entropy, softened_kl
from kdzoo.method import Method, StepOutputs, Taps
from kdzoo.registry import register_method


def regressor_kind(student: tuple[int, ...], teacher: tuple[int, ...]) -> str:
    """Which regressor maps a (C_s, H_s, W_s) map onto a (C_t, H_t, W_t) one (see the module docstring)."""
    (_, hs, ws), (_, ht, wt) = student, teacher
    if hs == 2 * ht and (ws + 1) // 2 == wt:
        return "stride2"
    if hs * 2 == ht and ws * 2 == wt:
        return "transposed"
    if hs >= ht and ws >= wt:
        return "valid"
    return "resize"


class HintRegressor(nn.Module):
    """r: the student's map → the teacher's width and grid; ``proj`` is (convolution, batch norm)."""

    def __init__(self, student: tuple[int, ...], teacher: tuple[int, ...], relu: bool = True):
        super().__init__()
        (cs, hs, ws), (ct, ht, wt) = student, teacher
        self.kind = regressor_kind(student, teacher)
        self.relu = relu
        if self.kind == "resize":
            self.proj = ChannelProjection(cs, ct)
            return
        if self.kind == "stride2":
            conv = nn.Conv2d(cs, ct, kernel_size=3, stride=2, padding=1)
        elif self.kind == "transposed":
            conv = nn.ConvTranspose2d(cs, ct, kernel_size=4, stride=2, padding=1)
        else:
            conv = nn.Conv2d(cs, ct, kernel_size=(1 + hs - ht, 1 + ws - wt))
        self.proj = nn.Sequential(conv, nn.BatchNorm2d(ct))

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        if self.kind == "resize":
            student, _ = to_common_grid(student, teacher, grid="teacher")
        y = self.proj(student)
        return F.relu(y) if self.relu else y


@register_method("fitnet")
class FitNet(Method):
    summary = "FitNets (Romero et al. 2015): a trained regressor maps a student stage onto the teacher's hint, MSE"
    needs_teacher = True
    tasks = ("cls",)
    taps = Taps(student=["stage2"], teacher=["stage2"])

    @dataclass
    class Config:
        hint_layer: str = "stage2"   # 'stageK', 'last' or 'STUDENT:TEACHER' (guided:hint), e.g. 'stage3:stage4'
        hint_weight: float = 100.0   # β
        ce_weight: float = 1.0
        kd_weight: float = 0.0       # optional vanilla KD term (RepDistiller's -a), off in its FitNet setting
        temperature: float = 4.0     # τ of the optional KD term
        relu: bool = True            # ReLU after the regressor's batch norm (ConvReg's use_relu)

    def __init__(self, config=None):
        super().__init__(config)
        self.check_config(positive=("temperature",), non_negative=("hint_weight", "ce_weight", "kd_weight"))
        self.layer = parse_pair(self.name, self.config.hint_layer)
        self.taps = Taps(student=tap_names([self.layer[0]]), teacher=tap_names([self.layer[1]]))
        self.pair: tuple[str, str] | None = None

    def setup(self, student, teacher) -> None:
        self.pair = resolve_pair(self.name, self.layer, student, teacher)
        self.taps = Taps(student=[self.pair[0]], teacher=[self.pair[1]])
        self.regressor = HintRegressor(student.shapes[self.pair[0]], teacher.shapes[self.pair[1]], self.config.relu)

    def hint_loss(self, out: StepOutputs) -> Tensor:
        """MSE(r(S_g), T_h), unweighted, float32."""
        if self.pair is None:
            raise RuntimeError("fitnet.setup() must run before the loss")
        s = out.student.features[self.pair[0]]
        t = self.teacher_output(out).features[self.pair[1]].detach()
        with torch.autocast(device_type=s.device.type, enabled=False):
            t = t.float()
            return F.mse_loss(self.regressor(s.float(), t), t)

    def loss(self, out: StepOutputs):
        c = self.config
        with torch.autocast(device_type=out.student.logits.device.type, enabled=False):
            terms = {"ce": c.ce_weight * cross_entropy(out.student.logits, out.targets),
                     "hint": c.hint_weight * self.hint_loss(out)}
            if c.kd_weight > 0:
                terms["kd"] = c.kd_weight * softened_kl(out.student.logits, self.teacher_output(out).logits.detach(),
                                                        c.temperature)
        return terms
