"""NFD: Normalized Feature Distillation (Liu, Yang, Chen, arXiv 2207.05256, 2022).

The student imitates the teacher's raw feature maps *after* both have been standardised, so it
learns where and how each channel responds, not the magnitude of the teacher's responses.

    Norm(F)[b, c] = (F[b, c] − μ_bc) / (σ_bc + eps)   μ, σ over the H·W positions of channel c of sample b
    L_l   = (1/B) Σ_b Σ_{c,h,w} ( Norm(T̃_l) − Norm(A_l(S_l)) )²[b, c, h, w] / (H_l · W_l)
    L     = ce_weight · CE + nfd_weight · Σ_l L_l  (+ kd_weight · τ² · KL, off by default)

- A_l: a trainable 1×1 conv C_s → C_t (no bias: the standardisation removes any bias), present
  for every distilled layer, also when the channel counts already agree.
- T̃_l: the teacher map, resized bilinearly to the student's H×W when the sizes differ; detached.
- Reduction: the squared error is summed over channels and positions, divided by H·W and
  averaged over the batch. This is the paper's per-layer ‖·‖²/(H·W) made batch-size
  independent; it equals C_t × the element-wise mean squared error.
- σ is the population standard deviation over H·W; eps is added to σ (not to the variance).

Layers are paired by name: ``stageK`` means stage K of both networks; ``last`` means each
network's last feature map before its classifier — on classification the deepest stage whose map
has more than one position (a 1×1 map standardises to all zeros and carries no signal), on
segmentation (``--task seg``) the ``decoder`` map, the one segmentation KD distils; ``decoder``
names it explicitly; ``S:T`` pairs student layer S with teacher layer T.

Segmentation changes nothing else: the CE is per labelled pixel, and the optional KD term is
per pixel (normalised by B·H·W).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdzoo.errors import UserError
from kdzoo.losses import cross_entropy, resize_bilinear, softened_kl, standardize
from kdzoo.method import Method, StepOutputs, Taps
from kdzoo.registry import register_method

_STAGE = re.compile(r"^stage(\d+)$")


def nfd_layer_loss(projected: Tensor, teacher: Tensor, eps: float = 1e-5) -> Tensor:
    """One layer's term: Σ_{c,h,w} (Norm(T̃) − Norm(A(S)))² / (H·W), averaged over the batch.

    ``projected`` is the student map after its adapter (B, C_t, H, W); ``teacher`` is resized here.
    """
    h, w = projected.shape[-2:]
    target = standardize(resize_bilinear(teacher.detach().float(), (h, w)), eps)
    diff = standardize(projected, eps) - target
    return diff.pow(2).sum(dim=(1, 2, 3)).mean() / (h * w)


def _parse_layer(spec: str) -> tuple[str, str]:
    spec = spec.strip()
    student, sep, teacher = spec.partition(":")
    student, teacher = student.strip(), teacher.strip()
    if not sep:
        teacher = student
    for name in (student, teacher):
        if name not in ("last", "decoder") and not _STAGE.match(name):
            raise UserError(
                f"method 'nfd': layer {spec!r} is not understood; use 'last', 'stageK' (the same stage on "
                "both networks), 'decoder' (segmentation) or 'STUDENT:TEACHER' such as 'stage3:stage4'"
            )
    return student, teacher


def _side_tap(names: list[str]) -> list[str]:
    """The taps to measure before the task is known; :meth:`NFD.setup` narrows them to the layers used."""
    stages = sorted({n for n in names if _STAGE.match(n)}, key=lambda k: int(k[5:]))
    return (["stages"] if "last" in names else stages) + (["decoder"] if "decoder" in names else [])


def _resolve(name: str, info, side: str) -> str:
    """A concrete layer name on one network, checked against its measured shapes."""
    if name == "decoder" or (name == "last" and info.task == "seg"):
        if "decoder" not in info.shapes:
            raise UserError("method 'nfd': the decoder layer exists only with --task seg; distil 'last' or a 'stageK'")
        return "decoder"
    stages = info.stage_names
    if not stages:
        raise UserError(f"method 'nfd' needs stage taps, but {side} {info.name} has no timm feature_info stages")
    if name == "last":
        usable = [k for k in stages if len(info.shapes[k]) == 3 and info.shapes[k][1] * info.shapes[k][2] > 1]
        if not usable:
            raise UserError(
                f"method 'nfd': every stage of {side} {info.name} is 1×1 at input size {info.input_size}, and a 1×1 "
                "map standardises to zeros; use a larger --input-size"
            )
        return usable[-1]
    if name not in stages:
        raise UserError(
            f"method 'nfd': {side} {info.name} has no {name}; it has {stages[0]}..{stages[-1]}"
        )
    shape = info.shapes[name]
    if shape[1] * shape[2] <= 1:
        raise UserError(
            f"method 'nfd': {side} {name} of {info.name} is 1×1 at input size {info.input_size}, and a 1×1 map "
            "standardises to zeros; pick an earlier stage (--set layers=...) or a larger --input-size"
        )
    return name


@register_method("nfd")
class NFD(Method):
    summary = "Normalized Feature Distillation: L2 between spatially standardised teacher and adapted student maps"
    needs_teacher = True
    tasks = ("cls", "seg")
    taps = Taps(student=["stages"], teacher=["stages"])

    @dataclass
    class Config:
        layers: tuple[str, ...] = ("last",)  # 'last', 'stageK', 'decoder' (seg) or 'STUDENT:TEACHER' pairs
        nfd_weight: float = 1e-3             # λ; the paper's value is unconfirmed (see docs)
        eps: float = 1e-5                    # added to σ in the standardisation
        ce_weight: float = 1.0
        kd_weight: float = 0.0               # optional vanilla KD term (off by default)
        temperature: float = 4.0             # τ of the optional KD term

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        if not c.layers:
            raise UserError("method 'nfd': layers must name at least one layer, e.g. --set layers=last")
        self.layer_specs = [_parse_layer(spec) for spec in c.layers]
        self.check_config(positive=("eps", "temperature"), non_negative=("nfd_weight", "ce_weight", "kd_weight"))
        self.taps = Taps(student=_side_tap([s for s, _ in self.layer_specs]),
                         teacher=_side_tap([t for _, t in self.layer_specs]))
        self.pairs: list[tuple[str, str]] = []

    def setup(self, student, teacher) -> None:
        if teacher is None:
            raise UserError("method 'nfd' needs a teacher: add --teacher MODEL")
        pairs = []
        for s_name, t_name in self.layer_specs:
            pair = (_resolve(s_name, student, "student"), _resolve(t_name, teacher, "teacher"))
            if pair not in pairs:
                pairs.append(pair)
        self.pairs = pairs
        self.taps = Taps(student=[s for s, _ in pairs], teacher=[t for _, t in pairs])  # hook only what is distilled
        self.adapters = nn.ModuleList(
            nn.Conv2d(student.shapes[s][0], teacher.shapes[t][0], kernel_size=1, bias=False) for s, t in pairs
        )

    def layer_losses(self, out: StepOutputs) -> list[Tensor]:
        """Unweighted L_l for every (student, teacher) layer pair, float32."""
        if not self.pairs:
            raise RuntimeError("nfd.setup() must run before the loss")
        teacher = self.teacher_output(out)
        losses = []
        for (s_name, t_name), adapter in zip(self.pairs, self.adapters):
            s = out.student.features[s_name]
            t = teacher.features[t_name]
            with torch.autocast(device_type=s.device.type, enabled=False):
                losses.append(nfd_layer_loss(adapter(s.float()), t, self.config.eps))
        return losses

    def loss(self, out: StepOutputs):
        c = self.config
        with torch.autocast(device_type=out.student.logits.device.type, enabled=False):
            terms = {
                "ce": c.ce_weight * cross_entropy(out.student.logits, out.targets),
                "nfd": c.nfd_weight * sum(self.layer_losses(out)),
            }
            if c.kd_weight > 0:
                teacher = self.teacher_output(out)
                terms["kd"] = c.kd_weight * softened_kl(out.student.logits, teacher.logits.detach(), c.temperature)
        return terms
