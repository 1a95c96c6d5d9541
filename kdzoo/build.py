"""From a :class:`~kdzoo.config.RunConfig` to the objects a run is made of.

The engine, the teacher's training and ``kdzoo speed`` all build their method, data and
networks here, so a setting means the same thing in each: one check of every name and value
before any work (:func:`validate`), one mapping from the run's settings to a data request
(:func:`data_request`), one network builder (:func:`create_network`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from . import distributed
from .config import RunConfig
from .data import DataBundle, DataRequest, get_dataset
from .errors import UserError
from .method import Method
from .models import check_model_name, create_model
from .registry import get_method
from .settings import apply_overrides
from .tasks import get_task


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when a GPU is visible, else the CPU; under DDP, this process's GPU."""
    if name == "auto":
        return distributed.device_for(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return distributed.device_for(torch.device(name))


def validate(cfg: RunConfig) -> Method:
    """Check every name and setting before any work starts (all errors are UserErrors).

    Returns the method, built from its validated settings (its constructor checks their values).
    """
    cfg.validate()  # every run setting's type and range (kdzoo/config.py)
    method_cls = get_method(cfg.method)
    get_task(cfg.task)
    if cfg.task not in method_cls.tasks:
        raise UserError(f"method {cfg.method!r} supports task(s) {', '.join(method_cls.tasks)}, not {cfg.task!r}")
    owner = f"method {method_cls.name!r}"
    # the user's settings typed first (--set gives strings: "true" must switch a variant on)
    given = apply_overrides(method_cls.Config(), cfg.method_settings, owner)
    typed = {key: getattr(given, key) for key in cfg.method_settings}
    settings = {**method_cls.recipe_defaults(cfg, typed), **cfg.method_settings}
    method_config = apply_overrides(method_cls.Config(), settings, owner)
    get_dataset(cfg.dataset, cfg.task)
    check_model_name(cfg.model)
    if method_cls.needs_teacher:
        if not cfg.teacher:
            raise UserError(f"method {cfg.method!r} needs a teacher: add --teacher MODEL (e.g. --teacher resnet34)")
        check_model_name(cfg.teacher)
    for key in ("epochs", "batch_size"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {value}")
    method = method_cls(method_config)
    if cfg.teacher_cache:
        refusal = cache_refusal(method, cfg.task)
        if refusal:
            raise UserError(f"--teacher-cache: method {cfg.method!r} {refusal}; run it without --teacher-cache "
                            "(the cache serves methods that read only the teacher's logits, e.g. kd, dkd, dist)")
    return method


def cache_refusal(method: Method, task: str) -> str | None:
    """Why ``--teacher-cache`` cannot serve this method on this task (None: it can)."""
    return method.teacher_cache_refusal() or ("runs --task seg (the cache holds class logits)" if task != "cls" else None)


def identify(cfg: RunConfig) -> RunConfig:
    """The settings that define the run's result, complete: the dataset's recipe defaults filled
    in, the fingerprint of the data under ``--data-root`` and the hash of a plugin method's source
    file. Its run id and recipe hash change whenever the images or the plugin's code do."""
    cfg = cfg.resolved()
    return dataclasses.replace(
        cfg, data_fingerprint=get_dataset(cfg.dataset, cfg.task).data_fingerprint(cfg.data_root),
        method_source=get_method(cfg.method).source,
    )


def data_request(cfg: RunConfig, **changes) -> DataRequest:
    """What the run asks of its dataset; ``changes`` replace fields (``kdzoo speed`` reads no workers).

    ``views`` is the method's ``loader_views``: how many separately cropped copies of each image a
    loader that crops in its workers delivers (a teacher's own training runs ``baseline``: 1)."""
    values = dict(root=cfg.data_root, download=cfg.download, input_size=cfg.input_size, train_size=cfg.train_size,
                  test_size=cfg.test_size, batch_size=cfg.batch_size, seed=cfg.seed, workers=cfg.workers,
                  views=get_method(cfg.method).loader_views)
    return DataRequest(**{**values, **changes})


def load_data(cfg: RunConfig, device: torch.device, **changes) -> DataBundle:
    """The run's data on ``device``; under DDP each process holds its share of every batch."""
    data = get_dataset(cfg.dataset, cfg.task).build(data_request(cfg, **changes))
    if len(data.train) == 0:
        raise UserError(f"the training set has fewer images than one batch ({cfg.batch_size}); "
                        "lower --batch-size or raise --train-size")
    world = distributed.world_size()
    if world > 1:
        if cfg.batch_size % world:
            raise UserError(f"--batch-size {cfg.batch_size} is the global batch and must divide evenly over "
                            f"{world} processes; pass a multiple of {world}")
        data.train.shard(distributed.rank(), world)
        data.test.shard(distributed.rank(), world)
    data.train.to(device)
    data.test.to(device)
    return data


def create_network(cfg: RunConfig, name: str, data: DataBundle, pretrained: bool = False) -> nn.Module:
    """The timm network ``name`` for this run's data and task (classes, input size, small-input stem)."""
    return create_model(name, data.num_classes, data.input_size, cfg.small_input_stem, pretrained, cfg.task,
                        zero_init_last=cfg.zero_init_last)
