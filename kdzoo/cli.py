"""The ``kdzoo`` command line.

Exit codes: 0 success; 2 bad input (one line on stderr naming the problem and the fix, no
traceback); 1 an unexpected failure (a bug: the traceback is printed); 130/143 stopped by
SIGINT/SIGTERM after saving a checkpoint (``--resume`` continues exactly there); 131 stopped at
once by a second signal, with nothing saved since the last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys
from pathlib import Path

import timm
import torch

from . import __version__, distributed
from .bench import curves
from .bench import leaderboard as lb
from .bench.runner import run_suite
from .bench.speed import measure, print_report
from .bench.suite import load_suite
from .build import identify, resolve_device, validate
from .checkpoint import strict_json
from .config import RunConfig, refuse_computed
from .data import dataset_specs
from .engine import Interrupted, StopFlag, run, stop_on_signals
from .errors import UserError, missing
from .evaluate import evaluate, open_target
from .evaluate import print_report as print_eval
from .export import FORMATS, check_export_format, export, read_run
from .hooks import describe_all_modules, resolve_taps
from .models import create_model, model_info
from .recipes import RECIPES
from .summary import render as closing_summary
from .registry import aliases_of, get_method, load_plugin, method_names
from .runs import RunDir
from .settings import apply_overrides, describe, load_toml, parse_assignments
from .tasks import get_task

EXIT_STOPPED_UNSAVED = 131  # not 130: a script can tell "checkpoint saved" from "nothing saved"


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as a one-line exit-2 error like the rest of kdzoo."""

    def error(self, message: str):
        raise UserError(f"{message}; see `{self.prog} --help`")


def _epoch_list(text: str) -> list[int]:
    """``150,180,210`` → ``[150, 180, 210]``, with an error that says what was expected."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects whole epochs separated by commas, e.g. 150,180,210, got {text!r}") from None


def _batch_list(text: str) -> list[int]:
    """``1,64`` → ``[1, 64]``: the batch sizes ``kdzoo eval`` times."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects batch sizes separated by commas, e.g. 1,64, got {text!r}") from None


def _bool_flag(parser, name: str, help: str, default=None):
    parser.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction, default=default, help=help)


def _execution_flags(parser) -> None:
    """How a step executes, shared by `run` and `speed` so that `speed` measures what a run does."""
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    _bool_flag(parser, "amp", "bf16 autocast on CUDA (default on)")
    _bool_flag(parser, "channels-last", "channels_last memory format (default on)")
    _bool_flag(parser, "compile", "torch.compile the student after its hooks are registered, and the teacher separately")
    _bool_flag(parser, "small-input-stem", "3x3 stride-1 stem without max-pool for ResNets (default: on for inputs <= 64 px)")
    _bool_flag(parser, "teacher-cache", "store the teacher's logits per (image, crop/flip) under <output>/teacher-cache/ "
                                        "and reuse them (methods that read only the teacher's logits; docs/teacher-cache.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdzoo", description="A pluggable knowledge-distillation method zoo for PyTorch and timm.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    run = sub.add_parser("run", help="train one run (a method on a student, optionally with a teacher)")
    run.add_argument("--method", default=None, help="distillation method (see `kdzoo list methods`); default baseline")
    run.add_argument("--model", default=None, help="student: any timm model name (default resnet18)")
    run.add_argument("--teacher", default=None, help="teacher: any timm model name")
    run.add_argument("--task", choices=["cls", "seg"], default=None,
                     help="cls: classification (default); seg: semantic segmentation (timm backbone + FPN decoder)")
    run.add_argument("--dataset", default=None,
                     help="shapes (default, embedded), cifar10, cifar100, imagefolder; with --task seg: shapes, voc, cityscapes")
    run.add_argument("--data-root", default=None, help="folder holding the dataset")
    _bool_flag(run, "download", "download the dataset into --data-root (needs internet)")
    run.add_argument("--input-size", type=int, default=None, help="image size (shapes: generated at this size)")
    run.add_argument("--train-size", type=int, default=None, help="use only the first N training images")
    run.add_argument("--test-size", type=int, default=None, help="use only the first N test images")
    run.add_argument("--recipe", default=None, metavar="NAME",
                     help="a paper's training recipe (see `kdzoo list recipes`); flags given beside it win")
    run.add_argument("--epochs", type=int, default=None)
    run.add_argument("--batch-size", type=int, default=None)
    run.add_argument("--lr", type=float, default=None)
    run.add_argument("--optimizer", choices=["sgd", "adamw"], default=None)
    run.add_argument("--momentum", type=float, default=None)
    _bool_flag(run, "nesterov", "Nesterov momentum for SGD")
    run.add_argument("--weight-decay", type=float, default=None)
    run.add_argument("--weight-decay-on", choices=["weights", "all"], default=None,
                     help="weights: matrices and kernels only (default); all: biases and norm weights too, as the papers' code")
    run.add_argument("--schedule", choices=["cosine", "step"], default=None)
    run.add_argument("--milestones", type=_epoch_list, default=None,
                     help="epochs where a step schedule multiplies the lr by --gamma, e.g. 150,180,210")
    run.add_argument("--gamma", type=float, default=None)
    run.add_argument("--warmup-epochs", type=float, default=None)
    run.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps")
    _execution_flags(run)
    _bool_flag(run, "zero-init-last", "zero-initialise the last norm layer of residual blocks (timm's default for ResNets)")
    _bool_flag(run, "pretrained", "initialise the student from timm's pretrained weights (needs internet once)")
    run.add_argument("--teacher-checkpoint", default=None, help="teacher weights: a kdzoo checkpoint or a state_dict")
    _bool_flag(run, "teacher-pretrained", "start the teacher from timm's pretrained weights (needs internet once)")
    run.add_argument("--teacher-epochs", type=int, default=None, help="epochs for a teacher kdzoo trains and caches")
    run.add_argument("--workers", type=int, default=None, help="data loading workers (image folders)")
    run.add_argument("--output", default=None, help="folder for run folders (default runs/)")
    run.add_argument("--run-name", default=None, help="name of the run folder (default: derived from the settings)")
    run.add_argument("--log", action="append", default=None, choices=["tensorboard", "wandb"],
                     help="also log loss terms, lr, img/s and test metrics to TensorBoard (<run>/tensorboard/) or "
                          "W&B (<run>/wandb/; WANDB_MODE=offline needs no network); repeatable; needs the extra")
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                     help="override a method hyperparameter (repeatable); see `kdzoo list methods`")
    run.add_argument("--config", default=None,
                     help="TOML file with run settings (method = \"kd\", lr = 0.1, ...) and a [method_settings] table")
    run.add_argument("--plugin", action="append", default=[], metavar="FILE.py|MODULE", help="load user methods")
    run.add_argument("--resume", action="store_true", help="continue the run with these settings from its last.pt")
    run.add_argument("--nproc", type=int, default=None, metavar="N",
                     help="train data-parallel in N processes on this machine (one per GPU; gloo on CPU) via torchrun")

    lst = sub.add_parser("list", help="list methods, models or datasets")
    lst.add_argument("what", nargs="?", choices=["methods", "models", "datasets", "recipes"], default="methods")
    lst.add_argument("pattern", nargs="?", default=None, help="filter models with a pattern such as 'resnet*'")
    lst.add_argument("--verbose", "-v", action="store_true", help="methods: also their taps and every hyperparameter")
    lst.add_argument("--plugin", action="append", default=[], metavar="FILE.py|MODULE")

    hooks = sub.add_parser("hooks", help="print every tap of a model with its output shape")
    hooks.add_argument("--model", required=True)
    hooks.add_argument("--input-size", type=int, default=224)
    hooks.add_argument("--num-classes", type=int, default=10)
    hooks.add_argument("--task", choices=["cls", "seg"], default="cls", help="seg: the segmentation model (adds the decoder tap)")
    _bool_flag(hooks, "small-input-stem", "force the small-input stem on or off (default: on for <= 64 px)")
    hooks.add_argument("--all", action="store_true", help="also list every module path")

    bench = sub.add_parser("bench", help="run every cell of a suite (TOML), skipping complete ones; print the leaderboard")
    bench.add_argument("suite", metavar="SUITE.toml", help="the suite file, e.g. benchmarks/quick.toml")
    bench.add_argument("--output", default=None, help="folder for the suite's runs (default: the suite's, or runs/bench/<name>)")
    bench.add_argument("--jobs", type=int, default=1, help="cells at once, each in a subprocess (default 1: in this process)")
    bench.add_argument("--threads", type=int, default=None,
                       help="intra-op threads of every cell, whatever --jobs (default: all cores); recorded in each run")
    bench.add_argument("--dry-run", action="store_true", help="list the cells and their state; train nothing")
    bench.add_argument("--teacher-cache", action="store_true",
                       help="as teacher_cache = true in the suite's [defaults]: the cells whose method reads only "
                            "teacher logits share one teacher-output cache (docs/teacher-cache.md)")
    bench.add_argument("--plugin", action="append", default=[], metavar="FILE.py|MODULE", help="load user methods")

    speed = sub.add_parser("speed", help="time a method's step against the student step and teacher forward it is made of")
    speed.add_argument("--method", default="kd", help="the method to measure (default kd)")
    speed.add_argument("--model", default=None, help="student: any timm model name (default resnet18)")
    speed.add_argument("--teacher", default=None, help="teacher: any timm model name (randomly initialised)")
    speed.add_argument("--dataset", default=None, help="an in-memory dataset: shapes (default), cifar10, cifar100")
    speed.add_argument("--data-root", default=None)
    speed.add_argument("--input-size", type=int, default=None)
    speed.add_argument("--train-size", type=int, default=None, help="images held on the device (default 16 batches)")
    speed.add_argument("--batch-size", type=int, default=None)
    speed.add_argument("--steps", type=int, default=20, help="timed steps per phase (default 20)")
    speed.add_argument("--rounds", type=int, default=10, help="interleaved rounds the steps are split into (default 10)")
    speed.add_argument("--warmup", type=int, default=3, help="untimed steps per phase first (default 3)")
    _execution_flags(speed)
    speed.add_argument("--optimizer", choices=["sgd", "adamw"], default=None)
    speed.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="override a method hyperparameter (repeatable)")
    speed.add_argument("--config", default=None,
                       help="TOML file with run settings (method = \"kd\", ...) and a [method_settings] table")
    speed.add_argument("--plugin", action="append", default=[], metavar="FILE.py|MODULE", help="load user methods")
    speed.add_argument("--json", action="store_true", help="print the measurement as JSON on stdout")
    speed.set_defaults(resume=False)

    exp = sub.add_parser("export", help="write a run's student as safetensors (or ONNX, TorchScript) plus a JSON record")
    exp.add_argument("run", metavar="RUN", help="a run folder, e.g. runs/<run-id>")
    exp.add_argument("--out", default=None, metavar="FILE",
                     help="the weights file (default <RUN>/export/<run-id>-<which>.safetensors); the JSON goes beside it")
    exp.add_argument("--which", choices=["last", "best"], default="last",
                     help="last: the final weights (result.json's top-1; default); best: the best epoch's")
    exp.add_argument("--format", choices=list(FORMATS), default="safetensors",
                     help="safetensors (default; loads with timm.create_model), onnx (needs the export extra), torchscript")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing --out file and its JSON")
    exp.add_argument("--allow-incomplete", action="store_true",
                     help="export a run that has not finished (no result.json) as it is now, with a warning")

    ev = sub.add_parser("eval", help="test metrics, parameters and latency of a run folder or an export")
    ev.add_argument("target", metavar="RUN|FILE", help="a run folder, or the .json / .safetensors of kdzoo export")
    ev.add_argument("--which", choices=["last", "best"], default="last", help="a run folder's checkpoint (default last)")
    ev.add_argument("--dataset", default=None, help="evaluate on this dataset's test split (default: the run's)")
    ev.add_argument("--data-root", default=None, help="folder holding the dataset (default: the run's)")
    ev.add_argument("--test-size", type=int, default=None, help="use the first N test images (default: as the run did)")
    ev.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ev.add_argument("--batch-size", type=int, default=256, help="evaluation batch (default 256)")
    ev.add_argument("--warmup", type=int, default=3, help="untimed forward passes before timing (default 3)")
    ev.add_argument("--repeats", type=int, default=10, help="timed forward passes per batch size; the median is shown (default 10)")
    ev.add_argument("--latency-batches", type=_batch_list, default=[1, 64], metavar="1,64",
                    help="batch sizes whose latency is timed (default 1,64)")
    ev.add_argument("--json", action="store_true", help="print the measurement as JSON on stdout")

    board = sub.add_parser("leaderboard", help="group the runs under a folder by recipe: mean ± std over seeds")
    board.add_argument("--runs", default="runs", help="folder to scan recursively (default runs/)")
    board.add_argument("--csv", default=None, metavar="FILE", help="also write the table as CSV")
    board.add_argument("--markdown", default=None, metavar="FILE", help="also write the table as Markdown")
    board.add_argument("--plot", default=None, metavar="FILE.png", help="bar chart of mean ± std (needs the plot extra)")
    board.add_argument("--teachers", action="store_true", help="include the cached teachers under teachers/ folders")
    board.add_argument("--by-machine", action="store_true",
                       help="one row per machine too (GPU, or CPU model and threads), with a machine column")

    plot = sub.add_parser("plot", help="training curves (loss terms, test top-1 or mIoU per epoch) of runs on one figure")
    plot.add_argument("runs", nargs="+", metavar="RUN",
                      help="run folders (holding metrics.csv), or folders holding run folders (e.g. a suite's output)")
    plot.add_argument("--out", default=curves.DEFAULT_OUT, metavar="FILE.png",
                      help=f"the image to write (.png, .pdf, .svg; default {curves.DEFAULT_OUT})")
    plot.add_argument("--metric", action="append", default=None, metavar="NAME",
                      help="a metrics.csv column to plot instead of the defaults (repeatable): e.g. top1, top5, "
                           "loss, kd, lr, img_per_s, test_loss")
    return parser


def config_from_args(args) -> tuple[RunConfig, bool]:
    """RunConfig defaults, then the --config TOML file, then command-line flags, then --set."""

    fields = {f.name for f in dataclasses.fields(RunConfig)}
    values: dict = {}
    method_settings: dict = {}
    if args.config:
        values, method_settings = read_config_file(args.config)
    for key, value in vars(args).items():
        if key in fields and key != "method_settings" and value is not None:
            values[key] = value
    method_settings.update(parse_assignments(args.sets))
    # RunConfig.validate (called before any work) checks the values' ranges, naming the flags
    cfg = apply_overrides(RunConfig(), values, "run config", finite=False)
    return dataclasses.replace(cfg, method_settings=method_settings), bool(args.resume)


def read_config_file(path: str) -> tuple[dict, dict]:
    """(run settings, method settings) of a ``--config`` TOML file, every key checked.

    Top-level keys are ``kdzoo run`` settings (``lr = 0.1``, ``method = "kd"``); the method's
    settings go in a ``[method_settings]`` table (or, as before, a ``[method]`` table when the
    method is named on the command line). Nothing is dropped: an unknown key or table is an error
    naming it and the valid ones, and values are type-checked here (run settings) and against
    the method's Config before any work (method settings).
    """

    data = {key.replace("-", "_"): value for key, value in load_toml(path).items()}
    where = f"config file {path}"
    method_settings = data.pop("method_settings", {})
    if not isinstance(method_settings, dict):
        raise UserError(f"{where}: method_settings must be a table of the method's settings, e.g. "
                        f"[method_settings] temperature = 4.0, got {method_settings!r}")
    if isinstance(data.get("method"), dict):  # [method] table: the settings, the method named elsewhere
        table = data.pop("method")
        if method_settings:
            raise UserError(f"{where} has both a [method] and a [method_settings] table; keep one "
                            "([method_settings], with method = \"NAME\" at the top)")
        method_settings = table
    refuse_computed(data, where)
    apply_overrides(RunConfig(), data, where, finite=False)  # unknown keys and wrong types, naming the file
    return data, dict(method_settings)


def cmd_run(args) -> int:
    from rich.console import Console

    for plugin in args.plugin:
        load_plugin(plugin)
    cfg, resume = config_from_args(args)
    if args.nproc is not None:
        return _launch_processes(args, cfg)
    device = resolve_device(cfg.device)
    if distributed.init_from_env(device.type) and not distributed.is_main():
        console = Console(stderr=True, quiet=True)  # rank 0 speaks for all
    else:
        console = Console(stderr=True)
    main_process = distributed.is_main()
    together = False  # every rank reached the same end: the run completed, or all agreed to stop
    try:
        with stop_on_signals(StopFlag()) as flag:
            result = run(cfg, resume=resume, console=console, stop=flag, search_stopped=resume)
        together = True
    except Interrupted:
        together = True
        raise
    finally:
        distributed.shutdown(together)
    if not main_process:
        return 0
    out = Console()

    summary = get_task(result.get("task", "cls")).summary(result)
    out.print(f"[bold green]done[/] {result['run_id']}: {summary}, {result['train_img_per_s']:.0f} img/s", soft_wrap=True)
    out.print(f"run folder: {cfg.output}/{result['run_id']}")
    closing_summary(result, Path(cfg.output) / result["run_id"], Path(cfg.output), args.argv, out)
    return 0


def _launch_processes(args, cfg: RunConfig) -> int:
    """``kdzoo run --nproc N``: check the settings here (one clean error, not N), then start N workers."""
    if args.nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {args.nproc}")
    if distributed.launched_by_torchrun():
        raise UserError("--nproc starts its own processes; under torchrun leave it out (torchrun's --nproc_per_node sets it)")
    validate(cfg)
    if resolve_device(cfg.device).type == "cuda" and args.nproc > torch.cuda.device_count():
        raise UserError(f"--nproc {args.nproc} asks for one GPU per process but {torch.cuda.device_count()} are visible; "
                        "pass at most that many")
    RunDir.for_run(cfg.output, identify(cfg).run_id(), bool(args.resume))  # the output (and a resumed run's) folder is usable
    argv, skip = [], False
    for arg in args.argv:  # the same command line without --nproc
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            argv.append(arg)
    return distributed.launch(args.nproc, argv)


def cmd_list(args) -> int:
    from rich.console import Console
    from rich.table import Table

    for plugin in args.plugin:
        load_plugin(plugin)
    console = Console()
    if args.what == "methods":
        # every column only where it can be read: taps and defaults need about 160 columns
        full = args.verbose or console.width >= 160
        table = Table(title="kdzoo methods")
        table.add_column("method", no_wrap=True)
        extra = ("student taps", "teacher taps", "hyperparameters (defaults)") if full else ()
        for column in ("teacher", "tasks", *extra, "summary"):
            table.add_column(column, overflow="fold")
        for name in method_names():
            cls = get_method(name)
            taps = cls.taps
            label = name + (f" ({', '.join(aliases_of(name))})" if aliases_of(name) else "")
            variants = [*cls.dataset_defaults.items(), *cls.task_defaults.items(), *cls.switch_defaults.items()]
            settings = ", ".join(f"{k}={v}" + "".join(f" ({where}: {values[k]})" for where, values in variants if k in values)
                                 for k, _, v in describe(cls.Config))
            details = (", ".join(["logits", *taps.student]), ", ".join(["logits", *taps.teacher]) if cls.needs_teacher else "-",
                       settings or "-") if full else ()
            table.add_row(label, "needs" if cls.needs_teacher else "none", ",".join(cls.tasks), *details, cls.summary)
        console.print(table)
        if not full:
            console.print("[dim]taps and hyperparameters: kdzoo list methods --verbose[/]")
    elif args.what == "datasets":

        table = Table(title="kdzoo datasets")
        for column in ("dataset", "task", "classes", "size", "default recipe", "description"):
            table.add_column(column, overflow="fold")
        for spec in dataset_specs():
            r = spec.recipe
            recipe = f"{r.epochs} ep, {r.optimizer} lr {r.lr}, batch {r.batch_size}, wd {r.weight_decay}, {r.schedule}"
            if r.train_size:
                recipe += f", {r.train_size:,} train images"
            if r.test_size:
                recipe += f", {r.test_size:,} test images"
            if r.teacher_epochs:
                recipe += f"; teachers {r.teacher_epochs} ep"
            table.add_row(spec.name, spec.task, str(spec.num_classes or "from folders"), str(spec.input_size), recipe,
                          spec.description)
        console.print(table)
    elif args.what == "recipes":
        table = Table(title="kdzoo recipes (kdzoo run --recipe NAME)")
        table.add_column("recipe", no_wrap=True)
        for column in ("datasets", "settings", "source"):
            table.add_column(column, overflow="fold")
        for recipe in RECIPES.values():
            settings = ", ".join(f"{k}={v}" for k, v in recipe.settings.items())
            for patterns, changes in recipe.by_student:
                settings += f"; {'/'.join(patterns)} students: " + ", ".join(f"{k}={v}" for k, v in changes.items())
            table.add_row(recipe.name, ", ".join(recipe.datasets), settings, recipe.source)
        console.print(table)
    else:
        names = timm.list_models(_model_pattern(args.pattern))
        if not names:
            raise UserError(f"no timm model matches {args.pattern!r}; try a shorter part of the name, "
                            "or list them all with `kdzoo list models`")
        console.print("\n".join(names))
        console.print(f"[dim]{len(names)} timm models; pass a pattern to filter, e.g. `kdzoo list models 'resnet*'`[/]")
    return 0


def _model_pattern(pattern: str | None) -> str:
    """A plain word finds every model whose name contains it (``resnet10`` → ``resnet10t``), as
    users expect of a search; a pattern with wildcards (``'resnet*'``) is taken as it is."""
    if not pattern:
        return "*"
    return pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"


def cmd_hooks(args) -> int:
    from rich.console import Console
    from rich.table import Table

    for flag, value, example in (("--input-size", args.input_size, 32), ("--num-classes", args.num_classes, 10)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}; pass e.g. {flag} {example}")
    model = create_model(args.model, args.num_classes, args.input_size, args.small_input_stem, task=args.task)
    info = model_info(model, args.model, args.num_classes, args.input_size)
    last = "embedding" if args.task == "cls" else "decoder"
    points = {p.name: p for p in resolve_taps(model, ["stages", last])}
    preact = resolve_taps(model, ["preact_stages"]) if info.stage_names else []
    table = Table(title=f"taps of {args.model} at {args.input_size}×{args.input_size}")
    for column in ("tap", "module", "output shape (C×H×W)"):
        table.add_column(column)
    for name in [*info.stage_names, last]:
        point = points.get(name)
        table.add_row(name, point.module + (" (input)" if point.kind == "input" else ""), "×".join(map(str, info.shapes[name])))
    for point, stage in zip(preact, info.stage_names):
        where = (f"{point.module} ({point.kind}, before the ReLU)" if point.clone
                 else f"= {stage} (no pre-activation point known)")
        table.add_row(point.name, where, "×".join(map(str, info.shapes[stage])))
    table.add_row("logits", "(model output)", "×".join(map(str, info.shapes["logits"])))
    console = Console()
    console.print(table)
    if args.all:
        all_table = Table(title="every module (tap any of these by its path)")
        for column in ("module path", "type", "output shape"):
            all_table.add_column(column)
        for path, kind, shape in describe_all_modules(model, args.input_size):
            all_table.add_row(path, kind, shape)
        console.print(all_table)
    return 0


def cmd_speed(args) -> int:
    from rich.console import Console

    for plugin in args.plugin:
        load_plugin(plugin)
    cfg, _ = config_from_args(args)
    batch = cfg.resolved().batch_size
    if cfg.train_size is None:
        cfg = dataclasses.replace(cfg, train_size=16 * batch)
    console = Console(stderr=True)
    with console.status("building") as status:
        result = measure(cfg, args.steps, args.rounds, args.warmup, progress=status.update)
    if args.json:
        print(strict_json(result))
    else:
        print_report(result, Console())
    return 0


def cmd_bench(args) -> int:
    from rich.console import Console

    for plugin in args.plugin:
        load_plugin(plugin)
    suite = load_suite(args.suite, output=args.output, teacher_cache=args.teacher_cache)
    suite.plugins = [*args.plugin, *suite.plugins]
    with stop_on_signals(StopFlag()) as flag:
        return run_suite(suite, jobs=args.jobs, threads=args.threads, dry_run=args.dry_run, console=Console(stderr=True), stop=flag)


_SUFFIX = {"--csv": ".csv", "--markdown": ".md", "--plot": ".png"}


def cmd_leaderboard(args) -> int:
    if args.plot:
        lb.require_matplotlib()  # before any work: a missing extra is a one-line error
    for flag, path in (("--csv", args.csv), ("--markdown", args.markdown), ("--plot", args.plot)):
        if path and Path(path).is_dir():
            raise UserError(f"{flag} {path} is a folder; pass a file path such as {Path(path) / ('leaderboard' + _SUFFIX[flag])}")
    root = Path(args.runs)
    if not root.is_dir():
        raise UserError(f"{missing('runs folder', root, 'folder')}; pass --runs DIR (the --output of kdzoo run or bench)")
    entries, notes = lb.collect(root, include_teachers=args.teachers)
    if not entries:
        raise UserError(f"no runs under {str(root)!r}; train some with `kdzoo run` or `kdzoo bench SUITE.toml`, "
                        "or pass --runs DIR (their --output folder)")
    board = lb.build(entries, by_machine=args.by_machine)
    errors = lb.failures(entries)
    console = lb.wide_console()
    for note in notes:
        console.print(f"[dim]{note}[/]")
    lb.print_table(board, errors, console, f"kdzoo leaderboard: {root} ({len(entries)} runs)")
    lb.export(board, errors, args.csv, args.markdown, args.plot)
    for label, path in (("CSV", args.csv), ("Markdown", args.markdown), ("plot", args.plot)):
        if path:
            console.print(f"{label}: {path}")
    return 0


def cmd_export(args) -> int:
    from rich.console import Console

    check_export_format(args.format)  # a missing extra is refused before any work
    student = read_run(args.run, args.which)
    console = Console(stderr=True)
    if not student.complete:
        if not args.allow_incomplete:
            raise UserError(f"run {student.run_id} is incomplete (no result.json): its {student.checkpoint.name} is not "
                            "the finished student; finish it with `kdzoo run ... --resume`, or pass --allow-incomplete "
                            "to export it as it is")
        console.print(f"[yellow]warning:[/] run {student.run_id} is incomplete; exporting its {student.checkpoint.name} "
                      "as it is now (the record says complete: false)")
    record = export(student, args.out, args.format, args.overwrite)
    out = Console()
    out.print(f"[bold green]exported[/] {student.run_id} ({student.checkpoint.name}) as {args.format}: {record['path']}", soft_wrap=True)
    out.print(f"record: {record['json']}", soft_wrap=True)
    out.print(f"load: {record['load']}", soft_wrap=True)
    return 0


def cmd_eval(args) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    target = open_target(args.target, args.which)
    with console.status("evaluating"):
        result = evaluate(target, args.dataset, args.data_root, args.test_size, args.device, args.batch_size,
                          args.warmup, args.repeats, tuple(args.latency_batches))
    if args.json:
        print(strict_json(result))
    else:
        print_eval(result, Console())
    return 0


def cmd_plot(args) -> int:
    runs = curves.plot_runs(args.runs, args.out, args.metric)
    print(f"plot of {len(runs)} run(s): {args.out}")
    return 0


def _name() -> str:
    """How messages are signed: "kdzoo", or "kdzoo[rank N]" from the other processes of a DDP run."""
    rank = os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"
    return "kdzoo" if rank == "0" else f"kdzoo[rank {rank}]"


def os_error_message(e: OSError) -> str | None:
    """One line for a failure of the machine's files that the user can fix (a full disk, a
    read-only or forbidden folder, a folder where a file belongs); None for any other OSError,
    which stays a bug with its traceback.

    Every file kdzoo writes is written atomically (kdzoo/checkpoint.py), so a write that
    fails half-way leaves the previous version whole: the message can say nothing was lost.
    """
    where = e.filename if e.filename is not None else "a file"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on the device" if e.errno == errno.ENOSPC else "the disk quota is exhausted"
        return (f"{what} while writing {where}; nothing was lost (files are replaced atomically, the previous "
                "version is intact); free some space, then run the same command with --resume to continue")
    if e.errno == errno.EROFS:
        return f"{where} is on a read-only file system; pass an --output folder on a writable disk"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied for {where}; give this user access to it or pass another path (e.g. --output DIR)"
    if e.errno == errno.EISDIR:
        return f"{where} is a folder where a file was expected; pass a file path"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):  # mkdir(exist_ok=True) on a path that is a file
        return f"{where} cannot be created: a part of its path is a file, not a folder; pass another path"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.argv = list(argv if argv is not None else sys.argv[1:])
        if args.version:

            print(f"kdzoo {__version__}")
            return 0
        if args.command is None:  # a command is required: say which exist, as for any usage error
            parser.print_help(sys.stderr)
            return 2
        handler = {"run": cmd_run, "list": cmd_list, "hooks": cmd_hooks, "bench": cmd_bench,
                   "leaderboard": cmd_leaderboard, "speed": cmd_speed, "export": cmd_export,
                   "eval": cmd_eval, "plot": cmd_plot}[args.command]
        return handler(args)
    except UserError as e:
        print(f"{_name()}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        message = os_error_message(e)
        if message is None:
            raise
        print(f"{_name()}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{_name()}: stopped at once by a second signal: nothing was saved since the last checkpoint; "
              "--resume continues from that one", file=sys.stderr)
        return EXIT_STOPPED_UNSAVED
    except Exception as e:

        if isinstance(e, Interrupted):
            print(f"{_name()}: {e}", file=sys.stderr)
            return e.exit_code
        raise


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
