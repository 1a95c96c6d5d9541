"""timm models by name, the small-input stem, and what methods need to know about a model.

The small-input stem (:mod:`kdzoo.stem`) turns an ImageNet ResNet stem (7×7 stride-2 conv +
max-pool) into the CIFAR stem the distillation papers use (3×3 stride-1 conv, no max-pool), so
``resnet18`` on 32-pixel images is the network those papers report, not one that sees a 8×8
map after its stem. The ``cifar_*`` models (:mod:`kdzoo.cifar_models`) are built for 32-pixel inputs already and
are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import timm
import torch
from torch import nn

from . import cifar_models  # noqa: F401  (registers the cifar_* timm models: RepDistiller's CIFAR networks)
from .checkpoint import read_checkpoint
from .errors import UserError, close_matches
from .hooks import probe_shapes, stage_entries
from .segmentation import SegmentationModel
from .stem import SMALL_INPUT_MAX, apply_small_input_stem, has_small_stem, supports_small_stem  # noqa: F401  (registers *_smallstem)


@dataclass
class ModelInfo:
    """Shapes a method needs to size its extra modules (measured by a dummy forward)."""

    name: str
    num_classes: int
    input_size: int
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # tap -> shape without batch
    task: str = "cls"  # "seg": logits are (K, H, W) maps and the shapes include the ``decoder`` tap
    # The training set, for methods with per-sample state (CRD's memory bank has one row per image
    # and draws its negatives from the other classes): its size, and each image's class (int64,
    # CPU) when the dataset knows them without reading the images; None outside a run.
    train_size: int | None = None
    train_labels: torch.Tensor | None = None

    @property
    def stage_names(self) -> list[str]:
        return sorted((k for k in self.shapes if k.startswith("stage") and k[5:].isdigit()), key=lambda k: int(k[5:]))

    @property
    def stage_channels(self) -> list[int]:
        return [self.shapes[k][0] for k in self.stage_names]

    @property
    def embedding_dim(self) -> int:
        return self.shapes["embedding"][-1]


def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        raise UserError(
            f"unknown model {name!r}.{close_matches(name, timm.list_models())} "
            "Any timm model name works; search them with `kdzoo list models PATTERN`"
        )


def _needs_img_size(name: str) -> bool:
    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True) if hasattr(timm.models, "get_pretrained_cfg") else None
    return bool(getattr(cfg, "fixed_input_size", False)) if cfg is not None else False


def create_model(
    name: str,
    num_classes: int,
    input_size: int,
    small_input_stem: bool | None = None,
    pretrained: bool = False,
    task: str = "cls",
    zero_init_last: bool | None = None,
) -> nn.Module:
    """A timm model with ``num_classes`` outputs, adapted to ``input_size``.

    ``small_input_stem=None`` means automatic: on for inputs of at most 64 pixels (classification;
    segmentation models keep the standard stem unless it is asked for).
    Transformers with a fixed input size are built for ``input_size``. ``task="seg"`` wraps the
    backbone (without its classifier) in :class:`kdzoo.segmentation.SegmentationModel`.
    ``zero_init_last=False`` asks for no zero-initialised last norm layer in residual blocks (a
    model without that option has none); None keeps the model's own init.
    """
    if task == "seg":
        # off unless asked for: segmentation keeps the stride-4 stem and lets the decoder restore resolution
        backbone = create_model(name, 0, input_size, bool(small_input_stem), pretrained, zero_init_last=zero_init_last)
        return SegmentationModel(backbone, num_classes, input_size)
    check_model_name(name)
    kwargs = {}
    if _needs_img_size(name):
        kwargs["img_size"] = input_size
    if zero_init_last is not None:
        kwargs["zero_init_last"] = zero_init_last
    try:
        model = _timm_model(name, pretrained, num_classes, kwargs)
    except (RuntimeError, OSError, ValueError) as e:
        if pretrained:
            raise UserError(
                f"could not load pretrained weights for {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                "go online once or pass --teacher-checkpoint FILE"
            ) from None
        raise
    if small_input_stem is None:
        small_input_stem = input_size <= SMALL_INPUT_MAX
    if small_input_stem:
        model = apply_small_input_stem(model)
    return model


def _timm_model(name: str, pretrained: bool, num_classes: int, kwargs: dict) -> nn.Module:
    """timm.create_model; ``zero_init_last`` is dropped for a model whose class has no such option
    (it has no zero-initialised last layer to switch off)."""
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except TypeError as e:
        if "zero_init_last" not in kwargs or "zero_init_last" not in str(e):
            raise
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes,
                             **{k: v for k, v in kwargs.items() if k != "zero_init_last"})


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_info(model: nn.Module, name: str, num_classes: int, input_size: int, taps=(), train=None) -> ModelInfo:
    """Measure the shapes of ``taps`` plus every stage and the embedding (or, on a segmentation
    model, the decoder map), when the model has them. ``train``: the run's training loader, whose
    size and labels the info then carries (see :attr:`ModelInfo.train_size`)."""
    names = list(taps)
    if getattr(model, "feature_info", None):
        stage_entries(model)
        names.append("stages")
    if hasattr(model, "get_classifier"):
        names.append("embedding")
    task = "seg" if isinstance(model, SegmentationModel) else "cls"
    if task == "seg":
        names.append("decoder")
    info = ModelInfo(name, num_classes, input_size, probe_shapes(model, names, input_size), task)
    if train is not None:
        info.train_size, info.train_labels = train.size, train.labels()
    return info


def load_weights(model: nn.Module, path: str, what: str = "checkpoint") -> dict:
    """Load a kdzoo checkpoint, a plain state_dict or a RepDistiller/mdistiller checkpoint
    (``{"model": state_dict, ...}``: their published CIFAR teachers) into ``model`` — safely.

    ``weights_only=True`` refuses pickled code, so a checkpoint from the internet cannot run
    anything on load. Any mismatch with the architecture is a UserError naming both.
    """
    state = read_checkpoint(path, what)
    weights = state
    if isinstance(state, dict) and "student" in state:  # a kdzoo run's last.pt / best.pt
        weights = state["student"]
    elif isinstance(state, dict) and isinstance(state.get("model"), dict):
        weights = state["model"]  # RepDistiller's / mdistiller's {"model": state_dict, "epoch": ..., ...}
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise UserError(f"{what} {path!r} holds no state_dict of tensors; pass a kdzoo checkpoint or a saved state_dict")
    weights = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in weights.items()}
    classes = _checkpoint_classes(model, weights)
    if classes is not None:
        raise UserError(
            f"{what} {path!r} was trained for {classes} classes but this run has "
            f"{_classifier_weight(model).shape[0]}; pass a checkpoint trained on the same dataset"
        )
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "shapes differ"
        detail = " ".join(str(e).split())[:200]
        raise UserError(
            f"{what} {path!r} does not fit model {type(model).__name__} ({first} {detail}); "
            "pass a checkpoint of the same architecture, class count and stem"
        ) from None
    return state if isinstance(state, dict) else {}


def _classifier_weight(model: nn.Module) -> torch.Tensor | None:
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    return getattr(classifier, "weight", None) if isinstance(classifier, nn.Module) else None


def _checkpoint_classes(model: nn.Module, weights: dict) -> int | None:
    """The class count of ``weights`` when it is the only thing that differs from ``model``'s classifier."""
    own = _classifier_weight(model)
    if own is None:
        return None
    name = next((k for k, v in model.named_parameters() if v is own), None)
    theirs = weights.get(name) if name else None
    if theirs is None or theirs.ndim != own.ndim or theirs.shape[0] == own.shape[0] or theirs.shape[1:] != own.shape[1:]:
        return None
    return int(theirs.shape[0])
