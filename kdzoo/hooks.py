"""Forward hooks that read features out of any timm model without editing its code.

A *tap* is a named point in a network: ``stages`` / ``stage1``…``stageN`` (from timm's
``feature_info``), ``preact_stages`` / ``preact_stage1``…``preact_stageN`` (each stage's map
before its final activation, see :func:`preact_points`), ``embedding`` (the pooled features entering the classifier), ``features``
(what timm's ``forward_features`` returns, the input of ``forward_head``) or any module path.
:class:`FeatureTaps` registers one hook per tap when the context opens and removes them all when
it closes, also on error, so a model never keeps stray hooks. Captured tensors live
in one dict that :meth:`FeatureTaps.pop` hands over and empties: nothing outlives the step
that produced it, so memory cannot grow over a long run.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import UserError, close_matches

_STAGE = re.compile(r"^stage(\d+)$")
_PREACT = re.compile(r"^preact_stage(\d+)$")


@dataclass(frozen=True)
class TapPoint:
    name: str      # the tap as a method names it: stage2, embedding, layer3.1.conv2
    module: str    # the module path the hook sits on
    kind: str      # "output" (forward hook), "input" (forward pre-hook) or "features" (forward_features)
    as_map: bool   # stage taps are normalised to (B, C, H, W) maps
    clone: bool = False  # store a copy: the next module (an in-place ReLU) overwrites the tensor


def stage_entries(model: nn.Module) -> list[dict]:
    """timm's ``feature_info`` without the stride-2 stem entry.

    timm lists the stem activation of ResNets (and the first stride-2 block of
    EfficientNets) as feature 0; methods that distil "stages" mean the network's stages
    after the stem, so kdzoo's ``stage1`` of a ResNet is ``layer1``.
    """
    info = getattr(model, "feature_info", None)
    if not info:
        raise UserError(
            f"model {type(model).__name__} has no timm feature_info, so it has no stage taps; "
            "tap module paths instead (see `kdzoo hooks --model NAME --all`)"
        )
    entries = [dict(e) for e in info]
    reductions = [e.get("reduction", 1) for e in entries]
    if len(entries) > 1 and reductions[0] <= 2 and max(reductions) > reductions[0]:
        entries = entries[1:]
    return entries


def _last_child(module: nn.Module) -> tuple[str, nn.Module] | None:
    children = list(module.named_children()) if isinstance(module, nn.Sequential) else []
    return children[-1] if children else None


def _preact_module(model: nn.Module, modules: dict[str, nn.Module], paths: list[str], index: int) -> tuple[str, str] | None:
    """(module path, hook kind) where stage ``index`` (0-based) is still pre-activation, or None.

    Known cases, each the tensor RepDistiller's ``is_feat=True, preact=True`` (and ReviewKD's
    ImageNet ResNet) hands over:

    * a residual block ending in ``act(sum)``, the last block of the stage (timm's ResNet
      family and the cifar_* ResNets: ``BasicBlock.act2``, ``Bottleneck.act3``): the input
      of that activation, i.e. the residual sum;
    * a stage whose last module is a ReLU (cifar_vgg*): the ReLU's input;
    * the cifar_wrn_* pre-activation WideResNets, whose stage output is a raw sum that the next
      block's ``bn1`` (the final ``bn1`` after the last stage) normalises before its ReLU: that
      BN's output, as RepDistiller computes ``block{k+1}.layer[0].bn1(f_k)``.
    """
    from timm.models import resnet as timm_resnet

    from . import cifar_models

    if isinstance(model, cifar_models.WideResNet):
        nxt = f"{paths[index + 1]}.layer.0.bn1" if index + 1 < len(paths) else "bn1"
        return (nxt, "output") if nxt in modules else None
    path = paths[index]
    last = _last_child(modules[path])
    if last is None:
        return None
    name, block = last
    if isinstance(block, nn.ReLU):
        return f"{path}.{name}", "input"
    for kinds, act in (((timm_resnet.BasicBlock, cifar_models.BasicBlock), "act2"),
                       ((timm_resnet.Bottleneck, cifar_models.Bottleneck), "act3")):
        if isinstance(block, kinds) and isinstance(getattr(block, act, None), nn.Module):
            return f"{path}.{name}.{act}", "input"
    return None


def preact_points(model: nn.Module) -> list[TapPoint]:
    """``preact_stage1``…``preact_stageN``: each stage's map before its final activation.

    Where kdzoo knows the network's pre-activation point (:func:`_preact_module`) the tap hooks
    it and stores a copy (the in-place ReLU that follows would overwrite it). Elsewhere the tap
    is the stage output itself (``TapPoint.module`` is the stage's module, ``clone`` False):
    for ViTs, ConvNeXts and EfficientNets, whose blocks end in a residual sum or a linear
    projection with no activation after it, that *is* the pre-activation map; for any other
    network (e.g. the cifar ShuffleNets, which apply ``torch.relu`` functionally) it is the
    post-activation map, the closest available. :func:`preact_is_stage_output` tells which.
    """
    entries = stage_entries(model)
    modules = dict(model.named_modules())
    paths = [e["module"] for e in entries]
    points = []
    for i, path in enumerate(paths):
        found = _preact_module(model, modules, paths, i)
        if found is None:
            points.append(TapPoint(f"preact_stage{i + 1}", path, "output", True))
        else:
            points.append(TapPoint(f"preact_stage{i + 1}", found[0], found[1], True, clone=True))
    return points


def preact_is_stage_output(model: nn.Module) -> list[bool]:
    """Per stage: True where ``preact_stageK`` falls back to the stage output (no pre-activation
    point known, see :func:`preact_points`)."""
    return [not p.clone for p in preact_points(model)]


def _classifier_path(model: nn.Module) -> str:
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(classifier, nn.Module) and not isinstance(classifier, nn.Identity):
        for path, module in model.named_modules():
            if module is classifier:
                return path
    raise UserError(f"model {type(model).__name__} has no classifier module, so it has no 'embedding' tap")


def resolve_taps(model: nn.Module, names: tuple[str, ...] | list[str]) -> list[TapPoint]:
    """Turn tap names into concrete hook points; unknown names raise a UserError."""
    points: dict[str, TapPoint] = {}
    modules = None
    for name in names:
        if name == "logits":
            continue  # always returned by the forward itself
        if name == "stages":
            for i, entry in enumerate(stage_entries(model), start=1):
                points[f"stage{i}"] = TapPoint(f"stage{i}", entry["module"], "output", True)
            continue
        match = _STAGE.match(name)
        if match:
            entries = stage_entries(model)
            index = int(match.group(1))
            if not 1 <= index <= len(entries):
                raise UserError(
                    f"tap {name!r} does not exist on {type(model).__name__}: it has stage1..stage{len(entries)}"
                )
            points[name] = TapPoint(name, entries[index - 1]["module"], "output", True)
            continue
        if name == "preact_stages":
            for point in preact_points(model):
                points[point.name] = point
            continue
        match = _PREACT.match(name)
        if match:
            preact = preact_points(model)
            index = int(match.group(1))
            if not 1 <= index <= len(preact):
                raise UserError(
                    f"tap {name!r} does not exist on {type(model).__name__}: it has preact_stage1..preact_stage{len(preact)}"
                )
            points[name] = preact[index - 1]
            continue
        if name == "embedding":
            points[name] = TapPoint(name, _classifier_path(model), "input", False)
            continue
        if name == "features":
            if not callable(getattr(model, "forward_features", None)):
                raise UserError(f"model {type(model).__name__} has no forward_features, so it has no 'features' tap")
            points[name] = TapPoint(name, "", "features", False)
            continue
        if modules is None:
            modules = dict(model.named_modules())
        if name in modules and name:
            points[name] = TapPoint(name, name, "output", False)
            continue
        known = ["stages", "preact_stages", "embedding", "features", "logits", *[k for k in modules if k]]
        raise UserError(
            f"tap {name!r} is not a module of {type(model).__name__}.{close_matches(name, known)} "
            "List the taps with `kdzoo hooks --model NAME`"
        )
    return list(points.values())


def as_feature_map(x: Tensor, model: nn.Module) -> Tensor:
    """Bring a stage output to (B, C, H, W): ViT tokens become a grid, NHWC is permuted."""
    if isinstance(x, (tuple, list)):
        x = x[0]
    if x.dim() == 3:  # (B, N, C) tokens
        prefix = getattr(model, "num_prefix_tokens", 0) or 0
        tokens = x[:, prefix:, :]
        n = tokens.shape[1]
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        h, w = grid if grid and grid[0] * grid[1] == n else (int(math.isqrt(n)), n // max(1, int(math.isqrt(n))))
        if h * w != n:
            raise UserError(f"cannot arrange {n} tokens into a grid for a feature map")
        return tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
    if x.dim() == 4 and getattr(model, "output_fmt", "NCHW") == "NHWC":
        return x.permute(0, 3, 1, 2)
    return x


class _ForwardFeaturesHook:
    """The ``features`` tap: ``model.forward_features`` wrapped by an instance attribute that
    stores its output (no module's forward returns exactly it: EfficientNet's head conv, a ViT's
    final norm run inside it). ``remove`` puts back what was there, so nested taps undo in order."""

    def __init__(self, model: nn.Module, store: dict, name: str):
        self.model = model
        self.previous = model.__dict__.get("forward_features")
        inner = model.forward_features

        def forward_features(*args, **kwargs):
            out = inner(*args, **kwargs)
            store[name] = out
            return out

        self.wrapper = forward_features
        model.__dict__["forward_features"] = forward_features

    def remove(self) -> None:
        if self.model.__dict__.get("forward_features") is self.wrapper:
            if self.previous is None:
                del self.model.__dict__["forward_features"]
            else:
                self.model.__dict__["forward_features"] = self.previous


class FeatureTaps:
    """Context manager that captures the outputs of named taps during forward passes.

    >>> with FeatureTaps(model, ["stages", "embedding"]) as taps:
    ...     logits = model(images)
    ...     features = taps.pop()   # {"stage1": ..., "stage4": ..., "embedding": ...}
    """

    def __init__(self, model: nn.Module, names: tuple[str, ...] | list[str]):
        self.model = model
        self.points = resolve_taps(model, names)
        self._store: dict[str, Tensor] = {}
        self._handles: list = []

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.points]

    def __enter__(self) -> FeatureTaps:
        modules = dict(self.model.named_modules())
        try:
            for point in self.points:
                module = modules[point.module]
                if point.kind == "features":
                    self._handles.append(_ForwardFeaturesHook(self.model, self._store, point.name))
                elif point.kind == "input":
                    self._handles.append(module.register_forward_pre_hook(self._input_hook(point)))
                else:
                    self._handles.append(module.register_forward_hook(self._output_hook(point)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._store.clear()

    def _output_hook(self, point: TapPoint):
        store, model = self._store, self.model

        def hook(module, args, output):
            value = as_feature_map(output, model) if point.as_map else output
            store[point.name] = value.clone() if point.clone else value

        return hook

    def _input_hook(self, point: TapPoint):
        store, model = self._store, self.model

        def hook(module, args):
            value = as_feature_map(args[0], model) if point.as_map else args[0]
            store[point.name] = value.clone() if point.clone else value

        return hook

    def pop(self) -> dict[str, Tensor]:
        """The features captured since the last pop; the store is emptied."""
        captured = dict(self._store)
        self._store.clear()
        return captured

    def __len__(self) -> int:
        return len(self._store)


def probe_shapes(model: nn.Module, names, input_size: int, in_chans: int = 3) -> dict[str, tuple[int, ...]]:
    """Shape (without batch) of every tap and of the logits, from one dummy forward pass."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with FeatureTaps(model, names) as taps, torch.no_grad():
            try:
                logits = model(torch.zeros(2, in_chans, input_size, input_size, device=device))
            except RuntimeError as e:  # e.g. a kernel larger than a map that too many strides shrank
                raise UserError(
                    f"{type(model).__name__} cannot process {input_size}×{input_size} inputs "
                    f"({_first_sentence(str(e))}); use a larger --input-size or a model with less down-sampling"
                ) from None
            shapes = {k: tuple(v.shape[1:]) for k, v in taps.pop().items()}
    finally:
        model.train(was_training)
    shapes["logits"] = tuple(logits.shape[1:])
    return shapes


def describe_all_modules(model: nn.Module, input_size: int) -> list[tuple[str, str, str]]:
    """(path, class, output shape) of every module, for `kdzoo hooks --all`."""
    shapes: dict[str, str] = {}
    handles = []

    def make(path):
        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            shapes[path] = "×".join(map(str, out.shape[1:])) if isinstance(out, Tensor) else type(out).__name__
        return hook

    modules = [(p, m) for p, m in model.named_modules() if p]
    try:
        for path, module in modules:
            handles.append(module.register_forward_hook(make(path)))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return [(p, type(m).__name__, shapes.get(p, "-")) for p, m in modules]


def _first_sentence(message: str, limit: int = 160) -> str:
    """The first sentence of an error message, whole when it fits: enough to say what broke."""
    first = message.splitlines()[0] if message else ""
    sentence = first.split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= limit else sentence[: limit - 1] + "…"
