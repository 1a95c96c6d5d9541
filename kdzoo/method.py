"""The plugin contract: what a distillation method is.

Training with distillation is ordinary supervised training plus a method that looks at what
the networks computed in one step and returns extra loss terms. A method never touches the
training loop and the loop never knows which method runs; this file is the whole interface
between the two.

A method is an ``nn.Module`` so that its trainable extras (a self-teacher, 1×1 adapters) are
moved to the device, optimised, checkpointed and wrapped for DDP together with the student
with no special cases in the engine.

The loss terms methods are built from (softened KL, cross-entropy, attention maps, …) live in
:mod:`kdzoo.losses`; this file holds only the contract.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from .errors import UserError

if TYPE_CHECKING:
    from .models import ModelInfo


@dataclass(frozen=True)
class Taps:
    """Named points of the student and teacher whose outputs a method reads.

    Names resolve against any timm model: ``stages`` (every stage), ``stage1``…``stageN``,
    ``embedding`` (pooled features that enter the classifier) or a module path such as
    ``layer3.1.conv2``. Logits are always available and need no tap.
    """

    student: tuple[str, ...] = ()
    teacher: tuple[str, ...] = ()

    def __init__(self, student=(), teacher=()):
        object.__setattr__(self, "student", tuple(student))
        object.__setattr__(self, "teacher", tuple(teacher))


@dataclass
class NetOutputs:
    """What one network produced in one forward pass."""

    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)

    @property
    def stages(self) -> list[Tensor]:
        """Stage maps in order (stage1 first), as captured by the ``stages`` tap."""
        keys = sorted((k for k in self.features if k.startswith("stage") and k[5:].isdigit()),
                      key=lambda k: int(k[5:]))
        return [self.features[k] for k in keys]

    @property
    def embedding(self) -> Tensor:
        return self.features["embedding"]


@dataclass
class StepOutputs:
    """Everything a method's loss may read for one training step.

    ``targets`` are class indices ``(B,)`` or, after mixing augmentations, class
    probabilities ``(B, K)``; for segmentation they are masks ``(B, H, W)`` (255 = ignore) and
    the logits are ``(B, K, H, W)`` maps; ``progress`` runs from 0 at the first step to 1 at the last,
    for methods whose weights ramp over training.
    """

    student: NetOutputs
    targets: Tensor
    teacher: NetOutputs | None = None
    images: Tensor | None = None
    epoch: int = 0
    step: int = 0
    progress: float = 0.0
    index: Tensor | None = None  # each row's dataset index (see Batch.index)


@dataclass
class Batch:
    """One training batch, raw from the loader or as ``prepare_batch`` made it.

    ``images`` are pixels in [0, 1] (not yet normalised); ``index`` holds each row's position in
    the dataset (int64) — a method that builds several views of one image repeats its index, so
    per-sample state (a memory bank, a cache of teacher outputs) stays keyed by the image.
    ``teacher_images``, when set, is what the teacher sees instead of ``images`` (weak/strong
    views, another resolution); ``None`` means the teacher reads the student's images.
    """

    images: Tensor
    targets: Tensor
    index: Tensor
    teacher_images: Tensor | None = None


Augment = Callable[[Tensor], Tensor]


class Method(nn.Module, metaclass=abc.ABCMeta):
    """Base class of every distillation method.

    Subclasses set the class attributes, declare a ``Config`` dataclass whose fields are the
    method's hyperparameters with the paper's defaults, and implement :meth:`loss`.
    The life cycle the engine follows:

    1. ``__init__(config)`` — hyperparameters only, no models yet.
    2. ``setup(student_info, teacher_info)`` — create trainable extras as submodules; the
       shapes of every tapped feature are known here.
    3. ``install(student, teacher)`` — optional extra hooks (e.g. stop-gradient pre-hooks);
       returns the handles, which the engine removes at the end of training.
    4. per step: ``prepare_batch`` → forward passes with taps → ``loss``.
    """

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = False
    tasks: ClassVar[tuple[str, ...]] = ("cls",)
    # Config values that differ from the Config defaults (the paper's CIFAR-100 setting) in
    # another setting, applied by recipe_defaults before the user's --set, later ones winning:
    # by dataset name (the ImageNet setting under "imagefolder"), by task (the paper's
    # segmentation setting), and by a boolean setting the user switched on (a variant's
    # companion weights, e.g. those logit standardisation brings).
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    task_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    switch_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    taps: Taps = Taps()
    summary: ClassVar[str] = ""
    # True when some trainable parameter may get no gradient on some steps (an extra used only
    # in some phases or settings). DDP must then search the graph for unused parameters each
    # step, which costs time, so it is off unless a method says so.
    some_parameters_unused: ClassVar[bool] = False
    # True when the method reads nothing of the teacher but its logits (no teacher taps, no hooks
    # on the teacher, no teacher_images of its own): its teacher outputs are then a function of
    # the input alone, which a teacher-output cache may store.
    logits_only_teacher: ClassVar[bool] = False
    # How many independently cropped copies of each image a loader that crops in its workers
    # (image folders: RandomResizedCrop) must deliver. With more than 1 such a loader yields
    # images (B, loader_views, C, H, W) and prepare_batch must take that shape; loaders that keep
    # their images whole and crop on the device (shapes, CIFAR: ``augment``) ignore it and yield
    # (B, C, H, W), since every call of ``augment`` draws a new crop there.
    loader_views: ClassVar[int] = 1
    # Set by @register_method: "<12 hex>" of the source file of a method that is not part of
    # kdzoo (a --plugin file, a user's package), None for kdzoo's own (kdzoo's version names
    # those). Part of every run's identity, so an edited plugin never reuses an earlier result.
    source: ClassVar[str | None] = None
    # One line the closing summary prints when a run of this method ends below the baseline of its
    # student and recipe: why that is expected at a short budget (empty: a general note).
    short_budget_note: ClassVar[str] = ""

    @dataclass
    class Config:
        pass

    def __init__(self, config: Any | None = None):
        super().__init__()
        self.config = config if config is not None else self.Config()

    # -- hook points -------------------------------------------------------------------
    def setup(self, student: ModelInfo, teacher: ModelInfo | None) -> None:
        """Create trainable extra modules from the tapped shapes. Default: none."""

    def install(self, student: nn.Module, teacher: nn.Module | None) -> list[Any]:
        """Register extra hooks on the networks; return their handles. Default: none."""
        return []

    def prepare_batch(self, batch: Batch, augment: Augment) -> Batch:
        """Turn a raw batch (pixels in [0, 1], not yet augmented) into the training batch.

        ``augment`` is the dataset's standard training augmentation (random crop and flip)
        as a batched tensor function. Methods that build extra views (JDA), mix images
        (mixup) or give the teacher its own input (``Batch.teacher_images``) override this;
        everything runs on tensors, on whatever device holds them.
        """
        return dataclasses.replace(batch, images=augment(batch.images))

    def teacher_cache_refusal(self) -> str | None:
        """Why ``--teacher-cache`` cannot serve this method's teacher (None: it can).

        The cache stores logits keyed by (sample, standard augmentation choice), so it serves a
        method that reads only the teacher's logits of the batch ``augment`` made; one that
        builds its own views or mixes images overrides ``prepare_batch`` and is refused.
        A method that delegates ``prepare_batch`` to another method answers for it.
        """
        if not self.needs_teacher:
            return "uses no teacher"
        if not self.logits_only_teacher:
            return "reads the teacher's features, not only its logits"
        if type(self).prepare_batch is not Method.prepare_batch:
            return "builds its own views of each image (prepare_batch), which the cache cannot key"
        return None

    @abc.abstractmethod
    def loss(self, out: StepOutputs) -> dict[str, Tensor]:
        """Return every loss term, already weighted; the engine sums and logs them."""

    # -- conveniences ------------------------------------------------------------------
    def check_config(self, positive=(), non_negative=(), unit=()) -> None:
        """Refuse out-of-range hyperparameters before any work starts, naming the key.

        ``positive``: must be > 0; ``non_negative``: ≥ 0; ``unit``: within [0, 1]. Keys whose
        value is ``None`` (meaning "the default") are skipped.
        """
        rules = [(positive, lambda v: v > 0, "must be positive"),
                 (non_negative, lambda v: v >= 0, "must not be negative"),
                 (unit, lambda v: 0 <= v <= 1, "must lie in [0, 1]")]
        for keys, ok, what in rules:
            for key in keys:
                value = getattr(self.config, key)
                if value is not None and not ok(value):
                    raise UserError(f"method {self.name!r}: {key} {what}, got {value} (--set {key}=...)")

    def teacher_output(self, out: StepOutputs) -> NetOutputs:
        if out.teacher is None:
            raise RuntimeError(f"method {self.name!r} needs a teacher but the step has none")
        return out.teacher

    def param_groups(self) -> list[dict[str, Any]]:
        """The method's trainable extras as optimiser groups.

        Each group is ``{"params": [...], ...}`` and may set ``lr_scale`` (a factor on the run's
        learning rate, following its schedule) and ``weight_decay`` (replacing the run's, which
        otherwise applies to matrices and kernels but not to biases and norm weights). Default:
        every parameter with the run's settings, optimised like the student's own.
        """
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def extra_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @classmethod
    def recipe_defaults(cls, run: Any, settings: dict[str, Any]) -> dict[str, Any]:
        """The Config values a run (a :class:`kdzoo.config.RunConfig`) starts from before the user's ``settings`` (``--set``) are
        applied: ``dataset_defaults``, then ``task_defaults``, then the ``switch_defaults`` of
        each switch ``settings`` turns on. A method whose defaults depend on more (DKD's β on the
        teacher→student pair) overrides this and extends what ``super()`` returns.
        """
        defaults = {**cls.dataset_defaults.get(run.dataset, {}), **cls.task_defaults.get(run.task, {})}
        for switch, values in cls.switch_defaults.items():
            if settings.get(switch) is True:
                defaults.update(values)
        return defaults

    @classmethod
    def config_fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls.Config)]


def check_terms(name: str, terms: Any) -> None:
    """Refuse what a method's ``loss`` returned unless it is a non-empty dict of named scalar
    float tensors.

    The step sums the terms, backpropagates the sum and logs each term by name; anything else
    fails later as a confusing error deep in the loop (or, for a per-sample vector, broadcasts
    into a wrong loss). This runs on every step, so it reads only types and shapes, which does
    not wait for the device.
    """
    def describe(value: Any) -> str:
        if isinstance(value, Tensor):
            return f"a tensor of dtype {str(value.dtype).removeprefix('torch.')} and shape {tuple(value.shape)}"
        text = repr(value)
        return "None" if value is None else f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"

    fix = "return a dict of scalar loss tensors, e.g. {'kd': loss}"
    if not isinstance(terms, dict):
        raise UserError(f"method {name!r}: loss() returned {describe(terms)}, not a dict; {fix}")
    if not terms:
        raise UserError(f"method {name!r}: loss() returned an empty dict; {fix}")
    for key, value in terms.items():
        if not isinstance(key, str):
            raise UserError(f"method {name!r}: loss() returned a term named {key!r}, not a string; {fix}")
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise UserError(f"method {name!r}: loss term {key!r} is {describe(value)}, not a float tensor; {fix}")
        if value.dim() != 0:
            raise UserError(f"method {name!r}: loss term {key!r} is a tensor of shape {tuple(value.shape)}, not a "
                            "scalar; reduce it (e.g. .mean()) before returning it")
