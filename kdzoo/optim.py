"""Optimisers and learning-rate schedules (per-step, so warm-up and cosine are smooth)."""

from __future__ import annotations

import math

import torch
from torch import nn

GROUP_KEYS = {"params", "lr_scale", "weight_decay"}


def build_optimizer(params: list[nn.Parameter], cfg, extra_groups: list[dict] = ()) -> torch.optim.Optimizer:
    """The run's optimiser over ``params`` (the student's, and a method's extras without options)
    and the method's ``extra_groups`` (see :meth:`kdzoo.method.Method.param_groups`).

    ``cfg.weight_decay_on``: "weights" leaves biases and norm weights (tensors of one dimension)
    undecayed, the usual practice for both SGD and AdamW; "all" decays every parameter, as the
    papers' official codes do. A group that sets its own ``weight_decay`` keeps it either way. A
    group's ``lr_scale`` multiplies the run's lr; the schedule scales every group alike.
    """
    decay_all = getattr(cfg, "weight_decay_on", "weights") == "all"
    groups = _decay_split(list(params), cfg.weight_decay, cfg.lr, decay_all)
    for extra in extra_groups:
        scale = extra.get("lr_scale", 1.0)
        if "weight_decay" in extra:
            groups.append({"params": list(extra["params"]), "weight_decay": extra["weight_decay"], "lr": cfg.lr * scale})
        else:
            groups += _decay_split(list(extra["params"]), cfg.weight_decay, cfg.lr * scale, decay_all)
    everything = [p for g in groups for p in g["params"]]
    fused = {"fused": True} if everything and all(p.is_cuda for p in everything) else {}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, **fused)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=bool(cfg.nesterov) and cfg.momentum > 0, **fused)


def _decay_split(params: list[nn.Parameter], weight_decay: float, lr: float, decay_all: bool = False) -> list[dict]:
    if decay_all:
        return [{"params": params, "weight_decay": weight_decay, "lr": lr}]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "lr": lr},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": lr}]


def split_method_groups(method: nn.Module, student_params: list[nn.Parameter]) -> tuple[list, list[dict]]:
    """(params optimised like the student's, the method's groups with options of their own).

    Refuses a group with unknown keys, a parameter in two groups and a trainable parameter in
    none: each would silently train something other than what the method says.
    """
    plain, special, seen = list(student_params), [], set()
    for group in method.param_groups():
        unknown = set(group) - GROUP_KEYS
        if unknown:
            raise ValueError(f"method {method.name!r}: param_groups() key(s) {sorted(unknown)} are not "
                             f"{sorted(GROUP_KEYS)}")
        members = [p for p in group["params"] if p.requires_grad]
        if any(id(p) in seen for p in members):
            raise ValueError(f"method {method.name!r}: a parameter is in two of its param_groups()")
        seen.update(id(p) for p in members)
        if set(group) == {"params"}:
            plain += members
        else:
            special.append({**group, "params": members})
    missing = [name for name, p in method.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"method {method.name!r}: trainable parameter(s) {missing[:3]} are in none of its param_groups()")
    return plain, special


def lr_factor(step: int, steps_per_epoch: int, cfg) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    epoch = step / steps_per_epoch
    return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)


def build_scheduler(optimizer, steps_per_epoch: int, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, cfg))
