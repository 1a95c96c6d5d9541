"""Li et al., AAAI 2023, "Curriculum Temperature for Knowledge Distillation" (CTKD).

The temperature of a logit method (KD, DKD, …) is not fixed but learned, adversarially: one
scalar θ, read as τ = t_start + t_end · sigmoid(θ), trained by the same optimiser as the student
through a gradient reversal layer, so that τ moves to *raise* the distillation loss while the
student lowers it. How hard τ pushes back is the curriculum: the reversal strength λ rises from
λ_min to λ_max along a half cosine over the first ``lambda_epochs`` epochs,

    λ(e) = λ_min + (λ_max − λ_min) · (1 − cos(π · min(e, N) / N)) / 2,   e = the official epoch (1, 2, …)

so training starts easy (τ barely fights the student) and gets harder. Forward: the identity;
backward: ∂L/∂θ is multiplied by −λ. The loss itself is the *base* method's (``base``, any
registered :class:`LogitMethod` whose Config has ``temperature``), with τ handed to it as its
``step_temperature`` for the step (see ``LogitMethod.temperature``).

Why a reversed gradient: minimising the loss over τ would make distillation ever easier (τ → the
value at which the soft targets are easiest to match); maximising it over τ while the student
minimises it over its weights makes τ seek the currently hardest soft targets, a curriculum that
follows the student instead of a fixed schedule.

Exactly as zhengli97/CTKD (``models/temp_global.py``: Global_T with θ initialised to 1,
GradientReversalFunction; ``train_student.py``: CosineDecay with decay_max = 0 = −λ_min, decay_min
= −1 = −λ_max, decay_loops = N, evaluated at the 1-based epoch; ``helper/loops.py``: τ =
t_start + t_end · sigmoid(GRL(θ))). θ is optimised by the student's SGD, with the run's learning
rate and schedule and, as there, with weight decay (``temperature_weight_decay``: SGD's 5e-4 on
CIFAR-100, 1e-4 on ImageNet; kdzoo would otherwise leave a scalar undecayed).

The base method is built from its own Config defaults and recipe defaults of the run (dataset,
teacher–student pair, logit-standardisation switch), then CTKD's own weights for ``base = kd``
(its scripts' ``-r``/``-a``), then the user's ``base_settings``. ``logit_standardize`` is passed
through to the base (Sun et al., CVPR 2024, whose CTKD folder z-scores the logits in the KL
term and weights it 9 on CIFAR-100).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from kdzoo.methods._logit import LogitMethod
from torch import Tensor, nn

from kdzoo.errors import UserError
from kdzoo.method import NetOutputs, StepOutputs
from kdzoo.registry import get_method, register_method
from kdzoo.settings import apply_overrides

# CTKD's own weights of the KD loss when the base is kd, where they differ from kd's defaults for
# that setting (scripts/run_imagenet_distill.sh: -r 1 -a 1; the LS repo's CTKD script: -r 1 -a 2).
# On CIFAR-100 CTKD's -r 0.1 -a 0.9 (LS: -a 9) are kd's own defaults already.
_KD_WEIGHTS = {
    ("imagefolder", False): {"ce_weight": 1.0, "kd_weight": 1.0},
    ("imagefolder", True): {"ce_weight": 1.0, "kd_weight": 2.0},
}


class _GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale`` (−λ for CTKD)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def reversal_strength(official_epoch: int, lambda_min: float, lambda_max: float, epochs: int) -> float:
    """λ at a 1-based epoch: cosine from λ_min (epoch 0) to λ_max (epoch ≥ N); CosineDecay in the code."""
    i = min(max(official_epoch, 0), epochs)
    return lambda_min + (lambda_max - lambda_min) * (1.0 - math.cos(i * math.pi / epochs)) / 2.0


def _parse_settings(value: Any, owner: str) -> dict[str, Any]:
    """``base_settings`` as a dict: a TOML table, or ``key=value,key=value`` from ``--set``."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str):
        out = {}
        for pair in (p.strip() for p in value.split(",")):
            if not pair:
                continue
            key, sep, item = pair.partition("=")
            if not sep or not key.strip():
                raise UserError(f"{owner}: base_settings expects key=value pairs separated by commas, got {pair!r}; "
                                "write e.g. --set base_settings=kd_weight=1,ce_weight=1")
            out[key.strip()] = item.strip()
        return out
    raise UserError(f"{owner}: base_settings must be a table or key=value,key=value, got {value!r}")


def _switch_on(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"))


@register_method("ctkd")
class CTKD(LogitMethod):
    summary = "Curriculum temperature: a learned, gradient-reversed τ for a logit method (kd, dkd, …)"
    tasks = ("cls",)
    dataset_defaults = {"imagefolder": {"lambda_epochs": 5, "temperature_weight_decay": 1e-4}}

    @dataclass
    class Config:
        base: str = "kd"                 # the logit method whose temperature is learned
        t_start: float = 1.0             # τ = t_start + t_end · sigmoid(θ): τ ∈ (t_start, t_start + t_end)
        t_end: float = 20.0
        lambda_min: float = 0.0          # reversal strength at epoch 0 …
        lambda_max: float = 1.0          # … and from lambda_epochs on
        lambda_epochs: int = 10          # N of the cosine curriculum (decay_loops)
        temperature_init: float = 1.0    # θ at the start (Global_T: torch.ones(1))
        temperature_weight_decay: float = 5e-4
        logit_standardize: bool = False  # passed to the base method
        base_settings: dict[str, Any] = field(default_factory=dict)   # the user's settings of the base
        base_defaults: dict[str, Any] = field(default_factory=dict)   # filled in by kdzoo from the run

    def __init__(self, config=None):
        super().__init__(config)
        self.check_config(positive=("t_end", "lambda_epochs"), non_negative=("t_start", "temperature_weight_decay"))
        c = self.config
        owner = f"method {self.name or 'ctkd'!r}"
        if c.lambda_min > c.lambda_max:
            raise UserError(f"{owner}: lambda_min ({c.lambda_min}) must not exceed lambda_max ({c.lambda_max})")
        if not math.isfinite(c.temperature_init):
            raise UserError(f"{owner}: temperature_init must be finite, got {c.temperature_init}")
        base_cls = self.base_class(c.base)
        user = _parse_settings(c.base_settings, owner)
        self.config = c = dataclasses.replace(c, base_settings=user, base_defaults=dict(c.base_defaults))
        if "logit_standardize" in user:
            raise UserError(f"{owner}: set logit_standardize on ctkd itself (--set logit_standardize=true), "
                            "not in base_settings")
        settings = {**c.base_defaults, **user}
        if "logit_standardize" in base_cls.config_fields():
            settings["logit_standardize"] = c.logit_standardize
        elif c.logit_standardize:
            raise UserError(f"{owner}: base {c.base!r} has no logit_standardize setting")
        base_config = apply_overrides(base_cls.Config(), settings, f"{owner} (base {c.base!r})")
        self.base = base_cls(base_config)
        self.taps = self.base.taps  # the base's (none for kdzoo's logit methods)
        self.theta = nn.Parameter(torch.tensor(float(c.temperature_init)))

    @staticmethod
    def base_class(name: str):
        cls = get_method(name)
        if cls is CTKD or not issubclass(cls, LogitMethod) or "temperature" not in cls.config_fields():
            raise UserError(f"method 'ctkd': base {name!r} is not a logit method with a temperature; "
                            "use e.g. base=kd or base=dkd")
        if "cls" not in cls.tasks:
            raise UserError(f"method 'ctkd': base {name!r} does not support classification")
        return cls

    @classmethod
    def recipe_defaults(cls, run, settings):
        """CTKD's dataset defaults, plus ``base_defaults``: what the base method would start from in
        this run (its dataset, task, pair and switch defaults), with CTKD's own kd weights on top."""
        defaults = super().recipe_defaults(run, settings)
        base_name = settings.get("base", cls.Config.base)
        base_cls = cls.base_class(base_name)
        ls = _switch_on(settings.get("logit_standardize", False))
        base_user = _parse_settings(settings.get("base_settings", {}), "method 'ctkd'")
        base_defaults = dict(base_cls.recipe_defaults(run, {**base_user, "logit_standardize": ls}))
        if base_cls.name == "kd":
            base_defaults.update(_KD_WEIGHTS.get((run.dataset, ls), {}))
        defaults["base_defaults"] = base_defaults
        return defaults

    # -- the base method's life cycle ---------------------------------------------------------
    def setup(self, student, teacher):
        self.base.setup(student, teacher)

    def install(self, student, teacher):
        return self.base.install(student, teacher)

    def prepare_batch(self, batch, augment):
        return self.base.prepare_batch(batch, augment)

    def teacher_cache_refusal(self):
        return self.base.teacher_cache_refusal()

    def param_groups(self):
        groups = [{"params": [self.theta], "weight_decay": self.config.temperature_weight_decay}]
        return groups + [g for g in self.base.param_groups() if list(g["params"])]

    # -- the curriculum ---------------------------------------------------------------------------
    def reversal(self, epoch: int) -> float:
        """λ at kdzoo's 0-based ``epoch`` (the official loop counts epochs from 1)."""
        c = self.config
        return reversal_strength(epoch + 1, c.lambda_min, c.lambda_max, c.lambda_epochs)

    def curriculum_temperature(self, epoch: int) -> Tensor:
        """τ = t_start + t_end · sigmoid(GRL_λ(θ)), a 0-dim float32 tensor carrying θ's gradient."""
        c = self.config
        theta = _GradientReversal.apply(self.theta.float(), -self.reversal(epoch))
        return c.t_start + c.t_end * torch.sigmoid(theta)

    def loss(self, out: StepOutputs):
        teacher = self.teacher_output(out)  # detached: θ and the student learn, never the teacher
        out = dataclasses.replace(out, teacher=NetOutputs(teacher.logits.detach(), teacher.features))
        self.base.step_temperature = self.curriculum_temperature(out.epoch)
        try:
            return self.base.loss(out)
        finally:
            self.base.step_temperature = None
