"""Where a teacher comes from — never a silent random network.

In this order: ``--teacher-checkpoint PATH`` (a kdzoo checkpoint or a plain state_dict,
loaded safely); ``--teacher-pretrained`` (timm's weights; fine-tuned once on the dataset when
its classifier does not match); otherwise kdzoo trains the teacher with the dataset's
baseline recipe once, says so, and caches it under ``<output>/teachers/`` keyed by model,
dataset, task and recipe, so the next run reuses it (a segmentation teacher is never taken for a
classifier: the task is in its run id and recipe hash).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .build import create_network
from .config import RunConfig
from .inputs import Inputs
from .locks import file_lock
from .models import load_weights
from .runs import RunDir
from .tasks import get_task

# trains one run to completion (or finds it complete) and returns its result.json: the engine's
# ``run``, handed in by the engine, which sits above this module
Train = Callable[..., dict[str, Any]]


def teacher_run_config(cfg: RunConfig, pretrained_init: bool = False) -> RunConfig:
    """The baseline run that produces the cached teacher: the dataset's recipe (with the run's data
    settings: input size, image counts, batch size) and a fixed seed."""
    return RunConfig(
        method="baseline", model=cfg.teacher, dataset=cfg.dataset, task=cfg.task, data_root=cfg.data_root, download=cfg.download,
        input_size=cfg.input_size, train_size=cfg.train_size, test_size=cfg.test_size, batch_size=cfg.batch_size,
        epochs=cfg.teacher_epochs, seed=0, device=cfg.device, amp=cfg.amp, channels_last=cfg.channels_last,
        compile=cfg.compile, small_input_stem=cfg.small_input_stem, workers=cfg.workers,
        output=str(Path(cfg.output) / "teachers"),
        pretrained=pretrained_init, data_fingerprint=cfg.data_fingerprint, recipe=cfg.recipe,
    )


def obtain_teacher(cfg: RunConfig, data, device: torch.device, console, train: Train,
                   stop=None) -> tuple[nn.Module, float | None, str]:
    """(frozen teacher in eval mode on ``device``, its test score if known — top-1 for cls, mIoU
    for seg —, where it came from). ``train`` trains the teacher's run when it is not cached."""
    task = get_task(cfg.task)
    if cfg.teacher_checkpoint:
        teacher = create_network(cfg, cfg.teacher, data)
        load_weights(teacher, cfg.teacher_checkpoint, "teacher checkpoint")
        source = f"checkpoint {cfg.teacher_checkpoint}"
        score = None
    elif cfg.teacher_pretrained and data.num_classes == 1000 and cfg.task == "cls":
        teacher = create_network(cfg, cfg.teacher, data, pretrained=True)
        source, score = "timm pretrained weights", None
    else:
        teacher, score, source = _cached_teacher(cfg, data, console, train, stop)
    teacher = teacher.to(device).eval().requires_grad_(False)
    if score is None:
        score = task.evaluate(teacher, data, Inputs(data.mean, data.std, device, cfg.amp))[task.score]
    console.print(f"teacher {cfg.teacher}: {source}; test {task.label} {score:.2f}%")
    if near_chance(task.name, score, data.num_classes):
        console.print(f"[yellow]warning:[/] the teacher's top-1 {score:.2f}% is within {CHANCE_MARGIN:g} points of "
                      f"chance ({100 / data.num_classes:.2f}% for {data.num_classes} classes): it has little to teach; "
                      "train it longer (--teacher-epochs) or pass --teacher-checkpoint FILE")
    return teacher, score, source


CHANCE_MARGIN = 5.0  # points of top-1 above chance under which a teacher is reported as near chance


def near_chance(task: str, score: float | None, num_classes: int) -> bool:
    """A classification teacher that scores within a few points of guessing (recorded in result.json)."""
    return task == "cls" and score is not None and score < 100 / num_classes + CHANCE_MARGIN


def _cached_teacher(cfg: RunConfig, data, console, train: Train, stop=None) -> tuple[nn.Module, float, str]:
    tcfg = teacher_run_config(cfg, pretrained_init=cfg.teacher_pretrained).resolved()
    # One process trains a given teacher; another that needs it meanwhile (parallel bench cells)
    # waits for the lock and then finds it cached. Under DDP rank 0 alone holds the lock and
    # decides; all ranks then train the teacher together (or all load it).
    run_dir = RunDir(distributed.on_main(lambda: RunDir.for_run(tcfg.output, tcfg.run_id(), resume=True).path))
    lock = Path(tcfg.output) / f"{tcfg.run_id()}.lock"
    on_wait = lambda: console.print(f"waiting for another process that is training the teacher {lock.stem}")  # noqa: E731
    with file_lock(lock, on_wait=on_wait) if distributed.is_main() else contextlib.nullcontext():
        if distributed.on_main(lambda: run_dir.is_complete() and run_dir.last.is_file()):
            result = distributed.on_main(run_dir.read_result)
            console.print(f"using the cached teacher {run_dir.path}")
        else:
            console.print(
                f"[bold]No teacher checkpoint given:[/] training {cfg.teacher} on {cfg.dataset} with the baseline recipe "
                f"for {tcfg.epochs} epoch{'s' if tcfg.epochs != 1 else ''}, once; it is cached at {run_dir.path} and reused by later runs "
                "(pass --teacher-checkpoint FILE to use your own)"
            )
            result = train(tcfg, resume=True, console=console, stop=stop)  # Ctrl-C stops it too
    teacher = create_network(cfg, cfg.teacher, data)
    load_weights(teacher, str(run_dir.last), "cached teacher")
    return teacher, result[get_task(cfg.task).score], f"trained by kdzoo ({run_dir.path})"
