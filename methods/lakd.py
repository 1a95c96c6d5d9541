"""LAKD: "Activation Mapping Distillation Based on Local Learning" (Zhang et al., arXiv 2408.11478).

The student is cut into local modules, one per stage, with the gradient stopped between them
(the paper's Separation-Decoupling Mechanism, SDM): each module learns only from its own loss
against the teacher's matching stage, and only the last module and the head see the labels.

    L = α · CE(z_s, y) + (1 − α) · Σ_k L_att^k + β · Σ_k L_lf^k

- L_lf^k = mean over elements of (A_k(S_k) − T̃_k)², the paper's per-layer feature loss; A_k is a
  trainable 1×1 conv (C_s → C_t) and T̃_k the teacher stage resized to the student's H×W
  (:func:`kdzoo.losses.resize_average`: average pooling when shrinking, bilinear when growing).
- L_att^k is the Non-Directional Activation Mapping (NDAM) loss. The paper body could not be
  read; kdzoo's reading is a sign-free ("non-directional"), class-free activation map
  m(F) = channel-mean of |F|^p over each position, L2-normalised over the H·W positions
  (:func:`kdzoo.losses.attention_map`), compared between student and teacher by the squared L2
  distance summed over positions (:func:`kdzoo.losses.attention_loss` with
  ``sum_positions=True``; ``ndam="map"``, default), or the teacher's map used as spatial weights
  of the feature error (``ndam="weighted"``). See docs/methods/lakd.md for
  exactly which parts are the paper's and which are kdzoo's.

Because every stage's input is detached, Σ_k of the local losses gives each module exactly the
gradient of its own loss: summing them is the same as training the modules one by one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from kdzoo.errors import UserError
from kdzoo.hooks import stage_entries
from kdzoo.losses import activation_map, attention_loss, cross_entropy, resize_average
from kdzoo.method import Method, StepOutputs, Taps
from kdzoo.registry import register_method

_EPS = 1e-12


# -- pieces that are plain functions so the tests can check each one --------------------------

def pair_stages(n_student: int, n_teacher: int) -> list[int]:
    """Teacher stage index (0-based) for every student stage, matched by relative depth.

    Student stage i of N goes to teacher stage round(i·M/N) of M (1-based, halves rounded up),
    so equal counts pair one to one and the last stages always meet.
    """
    if n_student < 1 or n_teacher < 1:
        raise UserError("lakd needs at least one stage on the student and on the teacher")
    return [min(n_teacher, max(1, math.floor(i * n_teacher / n_student + 0.5))) - 1 for i in range(1, n_student + 1)]


def weighted_feature_loss(projected: Tensor, teacher_resized: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """Feature error per position (mean over channels) weighted by the teacher's activation map.

    The weights are the teacher map at the student's H×W, normalised to sum to 1 per sample.
    """
    size = tuple(projected.shape[-2:])
    weights = resize_average(activation_map(teacher.detach(), p).unsqueeze(1), size).flatten(1)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(_EPS)
    error = (projected.float() - teacher_resized.detach().float()).pow(2).mean(dim=1).flatten(1)
    return (weights * error).sum(dim=1).mean()


def stage_ramp(progress: float, n_stages: int, span: float) -> list[float]:
    """kdzoo's optional "simple to complex" schedule: weight of each stage's local loss.

    Stage 1 is on from the start; stage k ramps linearly from 0 to 1 while ``progress`` goes
    from span·(k−2)/(N−1) to span·(k−1)/(N−1), so the deepest stage is fully on at ``span``.
    """
    if n_stages <= 1 or span <= 0:
        return [1.0] * n_stages
    step = span / (n_stages - 1)
    weights = [1.0]
    for k in range(2, n_stages + 1):
        start = step * (k - 2)
        weights.append(min(1.0, max(0.0, (progress - start) / step)))
    return weights


def _detach_inputs(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.detach() if isinstance(a, Tensor) else a for a in args)


def _next_module(model: nn.Module, path: str) -> str | None:
    """The module registered right after ``path``: its next sibling, or its parent's, and so on up."""
    parts = path.split(".")
    while parts:
        parent_path = ".".join(parts[:-1])
        parent = model.get_submodule(parent_path) if parent_path else model
        names = [n for n, m in parent._modules.items() if m is not None]
        if parts[-1] in names:
            for name in names[names.index(parts[-1]) + 1:]:
                return f"{parent_path}.{name}" if parent_path else name
        parts = parts[:-1]
    return None


def boundary_modules(model: nn.Module) -> list[str]:
    """Where local module k (k ≥ 2) begins: the module that consumes stage k−1's output.

    That is the module registered right after stage k−1 (timm registers blocks in execution
    order), not necessarily stage k itself: on MobileNetV3 the stages are blocks.0, blocks.1,
    blocks.3, blocks.5, and blocks.2 must join the local module of blocks.3, not be cut off.
    Falls back to stage k's own module when no successor lies at or before it.
    """
    paths = [e["module"] for e in stage_entries(model)]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    targets = []
    for prev, this in zip(paths, paths[1:]):
        nxt = _next_module(model, prev)
        ok = nxt is not None and nxt in order and (
            this == nxt or this.startswith(nxt + ".") or order[nxt] <= order.get(this, -1))
        targets.append(nxt if ok else this)
    return targets


# -- the method -----------------------------------------------------------------------------

@register_method("lakd")
class LAKD(Method):
    summary = "LAKD: gradient-isolated local modules, each fitting its teacher stage (features + activation maps)"
    needs_teacher = True
    taps = Taps(student=["stages"], teacher=["stages"])

    @dataclass
    class Config:
        alpha: float = 0.5               # α: CE weight; (1 − α) weighs L_att. Paper value unconfirmed
        beta: float = 1.0                # β: weight of L_lf. Paper value unconfirmed
        ndam: Literal["map", "weighted"] = "map"   # kdzoo's two readings of NDAM (see docs)
        p: float = 2.0                   # exponent of |F| in the activation map
        adapter: Literal["auto", "always"] = "auto"  # 1×1 conv only where C_s ≠ C_t, or on every stage
        separate: bool = True            # SDM: stop the gradient between student stages
        progressive: bool = False        # kdzoo's shallow-to-deep ramp of the local losses
        progressive_span: float = 0.5    # fraction of training after which every stage is fully on

    def __init__(self, config=None):
        super().__init__(config)
        self.check_config(positive=("p",), non_negative=("beta",), unit=("alpha", "progressive_span"))

    def setup(self, student, teacher) -> None:
        if teacher is None:
            raise UserError("lakd needs a teacher: add --teacher MODEL")
        s_channels, t_channels = student.stage_channels, teacher.stage_channels
        if not s_channels or not t_channels:
            raise UserError(
                f"lakd needs stage taps on both networks; {student.name if not s_channels else teacher.name} "
                "has none (a timm model with feature_info is required)"
            )
        self.pairs = pair_stages(len(s_channels), len(t_channels))
        self.adapters = nn.ModuleList(
            nn.Conv2d(cs, t_channels[j], kernel_size=1, bias=False)
            if self.config.adapter == "always" or cs != t_channels[j] else nn.Identity()
            for cs, j in zip(s_channels, self.pairs)
        )

    def install(self, student: nn.Module, teacher: nn.Module | None) -> list:
        """SDM: forward pre-hooks that detach the input of every local module after the first."""
        if not self.config.separate:
            return []
        modules = dict(student.named_modules())
        return [modules[path].register_forward_pre_hook(_detach_inputs) for path in boundary_modules(student)]

    def stage_losses(self, out: StepOutputs) -> list[tuple[Tensor, Tensor]]:
        """(L_lf^k, L_att^k) for every student stage k, unweighted, in float32."""
        if not hasattr(self, "adapters"):
            raise RuntimeError("lakd.setup() must run before the loss")
        teacher = self.teacher_output(out)
        s_stages, t_stages = out.student.stages, teacher.stages
        if len(s_stages) != len(self.adapters) or len(t_stages) <= max(self.pairs):
            raise RuntimeError(
                f"lakd was set up for {len(self.adapters)} student stages and {max(self.pairs) + 1}+ teacher "
                f"stages but got {len(s_stages)} and {len(t_stages)}"
            )
        p = self.config.p
        terms = []
        for s, adapter, j in zip(s_stages, self.adapters, self.pairs):
            t = t_stages[j].detach().float()
            with torch.autocast(device_type=s.device.type, enabled=False):
                projected = adapter(s.float())
            t_resized = resize_average(t, tuple(s.shape[-2:]))
            lf = (projected - t_resized).pow(2).mean()
            if self.config.ndam == "map":
                att = attention_loss(s, t, p, sum_positions=True)
            else:
                att = weighted_feature_loss(projected, t_resized, t, p)
            terms.append((lf, att))
        return terms

    def loss(self, out: StepOutputs):
        c = self.config
        terms = self.stage_losses(out)
        ramp = stage_ramp(out.progress, len(terms), c.progressive_span) if c.progressive else [1.0] * len(terms)
        lf = sum(w * t[0] for w, t in zip(ramp, terms))
        att = sum(w * t[1] for w, t in zip(ramp, terms))
        return {
            "ce": c.alpha * cross_entropy(out.student.logits, out.targets),
            "att": (1.0 - c.alpha) * att,
            "lf": c.beta * lf,
        }
