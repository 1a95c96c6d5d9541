"""The small-input stem, and the ``<name>_smallstem`` timm models that carry it.

The small-input stem turns an ImageNet ResNet stem (7×7 stride-2 conv + max-pool) into the
CIFAR stem the distillation papers use (3×3 stride-1 conv, no max-pool), so ``resnet18`` on
32-pixel images is the network those papers report, not one that sees a 8×8 map after its
stem. It applies to timm's ResNet class, which covers ResNet, WideResNet, ResNeXt, Res2Net,
ResNeSt and SKNet.

It changes the architecture, so timm cannot rebuild such a network from its plain name. That
is why importing this module (``import kdzoo`` does) registers, for every model timm builds on
its ResNet class, a timm model ``<name>_smallstem``: the same network with this stem. A student
kdzoo exports then loads through ``timm.create_model`` alone, like any timm model, with its
weights file given as ``pretrained_cfg_overlay=dict(file=...)`` (docs/export.md).

This module imports nothing else of kdzoo: a process that only loads an exported student
pays for timm and nothing more.
"""

from __future__ import annotations

import timm
from torch import nn

SMALL_INPUT_MAX = 64
SUFFIX = "_smallstem"
# timm modules whose models are built on timm's ResNet class (resnetv2 is another class)
RESNET_MODULES = ("resnet", "res2net", "resnest", "sknet")
_TAG = "kdzoo_small_input_stem"  # set on a model whose stem was replaced, so it is never replaced twice


def supports_small_stem(model: nn.Module) -> bool:
    return isinstance(model, timm.models.ResNet)


def has_small_stem(model: nn.Module) -> bool:
    """Whether ``model`` (or a segmentation model's ``backbone``) carries the small-input stem."""
    return bool(getattr(getattr(model, "backbone", model), _TAG, False))


def apply_small_input_stem(model: nn.Module) -> nn.Module:
    """3×3 stride-1 first conv and no max-pool (ResNet family); reductions updated to match.

    Idempotent: a model that has the stem already (a ``*_smallstem`` model) is left as it is,
    since a second pass would divide its feature reductions by 4 again.
    """
    if not supports_small_stem(model) or getattr(model, _TAG, False):
        return model
    conv1 = model.conv1
    if isinstance(conv1, nn.Conv2d):
        model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, 1, 1, bias=False)
    else:  # deep stem (resnet*d / *t): three 3×3 convs, the first with stride 2
        first = conv1[0]
        first.stride = (1, 1)
    model.maxpool = nn.Identity()
    for entry in model.feature_info:
        entry["reduction"] = max(1, entry["reduction"] // 4)
    setattr(model, _TAG, True)
    return model


def small_stem_name(name: str) -> str:
    """The registered timm name of ``name`` with the small-input stem."""
    return name + SUFFIX


def _has_weights_source(cfg: dict) -> bool:
    return bool(cfg.get("file") or cfg.get("state_dict"))


def _entrypoint(base: str):
    variant = small_stem_name(base)

    def entrypoint(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs) -> nn.Module:
        # The base entrypoint resolves the config exactly as for the plain name (num_classes,
        # input size, mean/std from the overlay) but must not load weights: they fit the small stem only.
        model = timm.create_model(base, pretrained=False, pretrained_cfg=pretrained_cfg,
                                  pretrained_cfg_overlay=pretrained_cfg_overlay, **kwargs)
        model = apply_small_input_stem(model)
        cfg = dict(getattr(model, "pretrained_cfg", None) or {}, architecture=variant)
        model.pretrained_cfg = model.default_cfg = cfg
        if pretrained:
            if not _has_weights_source(cfg):
                raise RuntimeError(f"{variant} has no published weights (its stem differs from {base}'s); pass the "
                                   "file kdzoo exported: pretrained_cfg_overlay=dict(file=PATH, num_classes=K)")
            timm.models.load_pretrained(model, pretrained_cfg=cfg, num_classes=model.num_classes,
                                        in_chans=kwargs.get("in_chans", 3))
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = variant
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"timm's ``{base}`` with kdzoo's small-input stem (3×3 stride-1 conv, no max-pool)."
    return entrypoint


def register_small_stem_models() -> list[str]:
    """Register ``<name>_smallstem`` for every timm model of the ResNet class; returns the new names.

    The names carry no pretrained config of their own, so ``timm.list_models(pretrained=True)``
    never offers them as downloadable weights.
    """
    added = []
    for base in timm.list_models(module=list(RESNET_MODULES)):
        if base.endswith(SUFFIX) or timm.is_model(small_stem_name(base)):
            continue
        fn = _entrypoint(base)
        globals()[fn.__name__] = timm.models.register_model(fn)  # register_model lists it in __all__
        added.append(fn.__name__)
    return added


__all__ = ["SMALL_INPUT_MAX", "apply_small_input_stem", "has_small_stem", "small_stem_name", "supports_small_stem"]

SMALL_STEM_MODELS = register_small_stem_models()
