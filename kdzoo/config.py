"""The run configuration: one typed record of everything that defines a training run.

Fields left as ``None`` take the dataset's recipe defaults when the run is resolved, so the
``config.json`` written into every run folder is complete and re-runnable on its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .data import get_dataset
from .errors import UserError
from .loggers import check as check_loggers
from .recipes import get_recipe, recipe_settings


@dataclass
class RunConfig:
    method: str = "baseline"
    model: str = "resnet18"
    teacher: str | None = None
    dataset: str = "shapes"
    task: Literal["cls", "seg"] = "cls"
    data_root: str | None = None
    download: bool = False
    input_size: int | None = None
    train_size: int | None = None
    test_size: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: Literal["sgd", "adamw"] | None = None
    momentum: float | None = None  # None: 0.9
    nesterov: bool | None = None
    weight_decay: float | None = None
    # which parameters weight decay applies to: "weights" (matrices and kernels, not biases and
    # norm weights: kdzoo's default) or "all" (what the papers' official codes do)
    weight_decay_on: Literal["weights", "all"] | None = None
    schedule: Literal["cosine", "step"] | None = None
    milestones: list[int] | None = None
    gamma: float | None = None  # None: 0.1
    warmup_epochs: float | None = None
    max_steps: int | None = None
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool | None = None  # None: on
    channels_last: bool = True
    compile: bool = False  # torch.compile the student (after its hooks) and, separately, the teacher
    small_input_stem: bool | None = None
    # False: no zero-initialised last norm layer in residual blocks (timm's ResNets have one; the
    # papers' CIFAR ResNets and torchvision's do not); None: the model's own init
    zero_init_last: bool | None = None
    pretrained: bool = False
    teacher_checkpoint: str | None = None
    teacher_pretrained: bool = False
    teacher_epochs: int | None = None
    # store the teacher's logits per (sample, crop/flip) and reuse them (kdzoo/teacher_cache.py);
    # lossless (the teacher's own dtype), so like compile it changes how a run executes, not its result
    teacher_cache: bool = False
    workers: int = 2
    output: str = "runs"
    run_name: str | None = None
    # experiment loggers (kdzoo/loggers.py): tensorboard, wandb; a view of the run, not part of its result
    log: list[str] = field(default_factory=list)
    recipe: str | None = None  # a paper recipe by name (kdzoo/recipes.py); flags given beside it win
    method_settings: dict[str, Any] = field(default_factory=dict)
    # Set by kdzoo (kdzoo.build.identify), never by the user: what the images under --data-root
    # are and what a plugin method's source file holds, so that a run on other data or with an
    # edited plugin never shares a run id, a cached teacher or a leaderboard row with this one.
    data_fingerprint: str | None = None
    method_source: str | None = None

    def resolved(self) -> RunConfig:
        """A copy with every default filled in: a field left None takes the named recipe's value
        (``--recipe``), else the dataset's recipe, else kdzoo's general default."""
        spec = get_dataset(self.dataset, self.task)
        recipe = spec.recipe
        values = dataclasses.asdict(self)
        if self.recipe is not None:
            for key, value in recipe_settings(self.recipe, self.dataset, self.model).items():
                if values[key] is None:
                    values[key] = value
        for key, value in _GENERAL_DEFAULTS.items():
            if values[key] is None:
                values[key] = value
        for key in ("epochs", "batch_size", "lr", "optimizer", "weight_decay", "schedule", "warmup_epochs", "nesterov",
                    "train_size", "test_size"):
            if values[key] is None:
                values[key] = getattr(recipe, key)
        if values["milestones"] is None:
            values["milestones"] = list(recipe.milestones)
        if values["teacher_epochs"] is None:
            values["teacher_epochs"] = recipe.teacher_epochs or values["epochs"]
        return RunConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def recipe_record(self) -> dict[str, Any] | None:
        """For a run with ``--recipe``: its name, source and each field a flag set to another
        value than the recipe's (call it on the settings as given, before :meth:`resolved`)."""
        if self.recipe is None:
            return None
        given = self.to_dict()
        overrides = {key: {"recipe": value, "given": given[key]}
                     for key, value in recipe_settings(self.recipe, self.dataset, self.model).items()
                     if given[key] is not None and given[key] != value}
        return {"name": self.recipe, "source": get_recipe(self.recipe).source, "overrides": overrides}

    def validate(self) -> None:
        """Refuse every value no run can use, before any work starts (no teacher is trained
        first, nothing is written), with one line naming the flag, the rule and a fix.

        Fields left ``None`` take the dataset's recipe later and are not checked here. Zero is
        never read as "the default": ``--max-steps 0`` or ``--train-size 0`` is refused, not
        replaced. Non-finite floats are refused before any range check, since NaN passes none
        of them but fails no ``<`` either.
        """
        for name, rule, example in _RULES:
            value = getattr(self, name)
            if value is None:
                continue
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"{flag} must be a number, got {value!r}; pass e.g. {flag} {example}")
            if not math.isfinite(value):
                raise UserError(f"{flag} must be a finite number, got {value}; pass e.g. {flag} {example}")
            if not rule.holds(value):
                raise UserError(f"{flag} {rule.text}, got {value}; pass e.g. {flag} {example}")
        for milestone in self.milestones or ():
            if isinstance(milestone, bool) or not isinstance(milestone, int) or milestone < 1:
                raise UserError(f"--milestones must be epochs (whole numbers of at least 1), got {milestone!r}; "
                                "pass e.g. --milestones 150,180,210")
        if self.recipe is not None:
            recipe_settings(self.recipe, self.dataset, self.model)  # a known recipe, for this dataset
        if not isinstance(self.output, str) or not self.output.strip():
            raise UserError(f"--output must name a folder, got {self.output!r}; pass e.g. --output runs")
        if self.run_name is not None:
            from .runs import check_folder_name

            check_folder_name(self.run_name)
        if not isinstance(self.log, (list, tuple)) or not all(isinstance(name, str) for name in self.log):
            raise UserError(f"log must be a list of logger names, got {self.log!r}; write e.g. log = [\"tensorboard\"]")
        check_loggers(self.log)  # known names, their packages installed: a missing extra fails here, before any work

    # settings that do not change the result (where it runs, how it is named, how fast)
    _NON_RESULT = ("device", "output", "run_name", "workers", "data_root", "download", "compile", "log", "teacher_cache")

    def run_key(self) -> str:
        """8 hex digits over every setting that changes the result, the seed included (not where
        it runs): the end of the run's folder name, so two different runs never share a folder.
        Not the recipe hash (:func:`recipe_hash`), which leaves the seed out to group seeds."""
        values = _identity(self.to_dict(), self._NON_RESULT)
        blob = json.dumps(values, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]

    def run_id(self) -> str:
        if self.run_name:
            return self.run_name
        pair = f"{self.teacher}-{self.model}" if self.teacher else self.model
        data = self.dataset if self.task == "cls" else f"{self.dataset}-{self.task}"
        return f"{data}_{self.method}_{pair}_s{self.seed}_{self.run_key()}"


# what a field left None means when neither a named recipe nor the dataset's recipe sets it
_GENERAL_DEFAULTS = {"momentum": 0.9, "gamma": 0.1, "amp": True, "weight_decay_on": "weights"}


@dataclass(frozen=True)
class _Rule:
    holds: Any  # value -> bool
    text: str


_AT_LEAST_1 = _Rule(lambda v: v >= 1, "must be at least 1")
_NOT_NEGATIVE = _Rule(lambda v: v >= 0, "must not be negative")
_POSITIVE = _Rule(lambda v: v > 0, "must be positive")
# (field, rule, an example of a good value)
_RULES = (
    ("epochs", _AT_LEAST_1, 10), ("batch_size", _AT_LEAST_1, 64),
    ("input_size", _AT_LEAST_1, 32), ("train_size", _AT_LEAST_1, 1000), ("test_size", _AT_LEAST_1, 1000),
    ("max_steps", _Rule(lambda v: v >= 1, "must be at least 1 (leave it out for no limit)"), 100),
    ("teacher_epochs", _AT_LEAST_1, 10), ("workers", _NOT_NEGATIVE, 2),
    ("lr", _POSITIVE, 0.1), ("momentum", _Rule(lambda v: 0 <= v < 1, "must lie in [0, 1)"), 0.9),
    ("weight_decay", _NOT_NEGATIVE, "5e-4"), ("gamma", _POSITIVE, 0.1), ("warmup_epochs", _NOT_NEGATIVE, 1),
    # seeds are multiplied and offset inside kdzoo before they reach torch's 64-bit generators
    ("seed", _Rule(lambda v: isinstance(v, int) and abs(v) < 2**40, "must be a whole number below 2**40 in size"), 0),
)


# what kdzoo fills in itself (kdzoo.build.identify): not a setting of a config file or flag
COMPUTED = ("data_fingerprint", "method_source")
RUN_FIELDS = [f.name for f in dataclasses.fields(RunConfig) if f.name != "method_settings" and f.name not in COMPUTED]


def refuse_computed(values: dict[str, Any], where: str) -> None:
    """A config file or suite that sets a field kdzoo computes is refused, not obeyed."""
    for key in COMPUTED:
        if key in values:
            raise UserError(f"{where} sets {key}, which kdzoo computes from the data and the method's code; remove it")


def _identity(run: dict[str, Any], leave_out) -> dict[str, Any]:
    """The run settings that identify a result. A computed field that is None (generated data,
    a built-in method) is left out, so runs recorded before it existed keep their ids."""
    return {k: v for k, v in run.items() if k not in leave_out and not (k in COMPUTED and v is None)}


# Settings that change no result, and the seed: left out of the recipe hash, so seeds group.
NOT_RECIPE = frozenset(RunConfig._NON_RESULT) | {"seed", "method_settings"}


def recipe_hash(run: dict[str, Any], method_config: dict[str, Any] | None, versions: dict[str, Any],
                leave_out: tuple[str, ...] = ()) -> str:
    """10 hex digits over everything that changes a result apart from the seed: the run settings,
    the method's resolved settings and the library versions (not Python's).

    Runs that differ only in their seed share it, so the leaderboard averages exactly those.
    ``leave_out`` drops further run keys (the leaderboard's method-free training hash). A run
    that failed before its method settings resolved (``method_config`` None) hashes its raw
    ``method_settings`` instead.
    """
    method = method_config if method_config is not None else {"settings": run.get("method_settings", {})}
    record = {
        "run": _identity(run, NOT_RECIPE | set(leave_out)),
        "method": method,
        "versions": {k: v for k, v in (versions or {}).items() if k != "python"},
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:10]
