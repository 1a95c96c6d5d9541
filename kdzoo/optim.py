"""Optimisers and learning-rate schedules (per-step, so warm-up and cosine are smooth)."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(params: list[nn.Parameter], cfg) -> torch.optim.Optimizer:
    # no weight decay on biases and norm weights: the usual practice for both SGD and AdamW
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if all(p.is_cuda for p in params) and params else {}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, **fused)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=bool(cfg.nesterov) and cfg.momentum > 0, **fused)


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
