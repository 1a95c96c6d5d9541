"""The same distillation work through kdzoo and through torchdistill, timed in one process.

For ``kd`` and ``rkd`` both sides train the same student (same initial weights) against the same
frozen teacher, on the same batches drawn from the same on-device tensor, with the same crop,
flip and normalisation, the same precision and memory format, the same optimiser (AdamW with the
dataset recipe's lr and weight decay; fused on CUDA for both) and the same number of steps:

- kdzoo: the method's real training step, :class:`kdzoo.step.TrainStep`, as ``kdzoo run`` and
  ``kdzoo speed`` execute it (hooks from :class:`kdzoo.hooks.FeatureTaps`);
- torchdistill: its own single-stage :class:`torchdistill.core.distillation.DistillationBox`
  built from a config dict — its forward-hook machinery, its ``WeightedSumLoss`` over its
  ``KDLoss`` / ``RKDLoss`` / cross-entropy, and its ``forward_process`` +
  ``post_forward_process`` (backward and optimiser step), exactly what its training loop calls
  per batch. Only its DataLoader is bypassed: it is fed the batches kdzoo's pipeline makes, so
  the comparison is of the distillation machinery, not of the data pipelines.

The loss settings match kdzoo's defaults: KD τ = 4 with 0.1 · CE + 0.9 · τ² · KL; RKD with
CE + 25 · distance + 50 · angle on the pooled embeddings (timm's ``global_pool`` output, the
tensor kdzoo's ``embedding`` tap reads). The two sides run interleaved in rounds after a
warm-up; the ratio is of medians, ``kdzoo img/s ÷ torchdistill img/s``. Needs the bench extra:
``pip install -e ".[bench]"``.

    python benchmarks/compare_torchdistill.py [--model resnet18 --teacher resnet34] [--batch-size 64]
        [--steps 20 --rounds 10 --warmup 3] [--methods kd,rkd] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time

import torch
from results_md import add_workload_arguments, header, write_section

from kdzoo.bench.speed import SpeedBench, _batches, _device_name
from kdzoo.config import RunConfig
from kdzoo.data.loaders import to_float
from kdzoo.hooks import FeatureTaps
from kdzoo.method import NetOutputs, StepOutputs
from kdzoo.registry import get_method


def loss_config(method: str) -> tuple[dict, list[str]]:
    """torchdistill's criterion for ``method`` with kdzoo's default weights, and the student and
    teacher module paths it needs hooked."""
    c = get_method(method).Config()
    if method == "kd":
        return {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {
            "criterion": {"key": "KDLoss", "kwargs": {
                "student_module_path": ".", "student_module_io": "output",
                "teacher_module_path": ".", "teacher_module_io": "output",
                "temperature": c.temperature, "alpha": c.ce_weight, "beta": c.kd_weight}},
            "weight": 1.0}}}}, []
    if method in ("rkd", "relational_kd"):
        return {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {
            "ce": {"criterion": {"key": "CrossEntropyLoss", "kwargs": {"reduction": "mean"}},
                   "criterion_wrapper": {"key": "SimpleLossWrapper", "kwargs": {
                       "input": {"is_from_teacher": False, "module_path": ".", "io": "output"},
                       "target": {"uses_label": True}}},
                   "weight": c.ce_weight},
            "rkd": {"criterion": {"key": "RKDLoss", "kwargs": {
                "student_output_path": "global_pool", "teacher_output_path": "global_pool",
                "dist_factor": c.distance_weight, "angle_factor": c.angle_weight, "reduction": "mean"}},
                    "weight": 1.0}}}}, ["global_pool"]
    raise SystemExit(f"no torchdistill counterpart wired for {method!r}; use kd or rkd")


class TorchdistillSide:
    """torchdistill's DistillationBox on copies of kdzoo's networks, fed kdzoo's batches."""

    def __init__(self, bench: SpeedBench, method: str):
        from torchdistill.common.constant import def_logger
        from torchdistill.core.distillation import DistillationBox

        def_logger.setLevel(logging.WARNING)  # it logs every module it wraps
        cfg, device = bench.cfg, bench.device
        # the hook-free copies of the plain phases: same initial weights, same memory format, frozen eval teacher
        self.student = copy.deepcopy(bench.networks["student_step"])
        self.teacher = copy.deepcopy(bench.networks["teacher_forward"])
        criterion, paths = loss_config(method)
        optim_kwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
        if cfg.optimizer != "adamw":
            optim_kwargs["momentum"] = cfg.momentum
        if device.type == "cuda":
            optim_kwargs["fused"] = True
        train_config = {
            "num_epochs": 1,
            "teacher": {"forward_proc": "forward_batch_only", "forward_hook": {"input": [], "output": paths},
                        "requires_grad": False},
            "student": {"forward_proc": "forward_batch_only", "forward_hook": {"input": [], "output": paths},
                        "requires_grad": True},
            "optimizer": {"key": "AdamW" if cfg.optimizer == "adamw" else "SGD", "kwargs": optim_kwargs},
            "criterion": criterion,
        }
        self.box = DistillationBox(self.teacher, self.student, {}, train_config, device, None, False, 1.0)
        self.box.pre_epoch_process(epoch=0)
        self.teacher.eval()
        self.bench, self.batches = bench, _batches(bench.data.train)

    def run(self, n: int) -> None:
        bench = self.bench
        for _ in range(n):
            images, targets, _ = next(self.batches)
            images = bench.inputs(bench.data.augment(to_float(images)))
            with bench.inputs.autocast():
                loss = self.box.forward_process(images, targets)
            self.box.post_forward_process(loss=loss)


def first_losses(bench: SpeedBench, td: TorchdistillSide) -> tuple[float, float]:
    """Both sides' loss on one batch before any training (the networks are identical then): the
    check that the two sides compute the same objective."""
    images, targets, _ = next(_batches(bench.data.train))
    images = bench.inputs(to_float(images))
    taps = bench.method.taps
    with torch.no_grad(), bench.inputs.autocast():
        with FeatureTaps(td.student, taps.student) as s, FeatureTaps(td.teacher, taps.teacher) as t:
            student, teacher = NetOutputs(td.student(images), s.pop()), NetOutputs(td.teacher(images), t.pop())
            ours = sum(bench.method.loss(StepOutputs(student, targets, teacher, images)).values())
        theirs = td.box.forward_process(images, targets)
    return float(ours), float(theirs)


def compare(method: str, args) -> dict:
    cfg = RunConfig(method=method, model=args.model, teacher=args.teacher, input_size=args.input_size,
                    batch_size=args.batch_size, train_size=16 * args.batch_size, device=args.device, seed=args.seed)
    bench = SpeedBench(cfg)
    try:
        td = TorchdistillSide(bench, method)  # copies the networks before any of them trains
        loss_kdzoo, loss_torchdistill = first_losses(bench, td)
        kdzoo_step = {p.name: p for p in bench.phases}["method_step"].run
        sides = {"kdzoo": kdzoo_step, "torchdistill": td.run}
        seconds = {name: [] for name in sides}
        for run in sides.values():
            run(args.warmup)
        per_round = [args.steps // args.rounds + (1 if r < args.steps % args.rounds else 0) for r in range(args.rounds)]
        for n in per_round:
            for name, run in sides.items():
                bench._sync()
                tick = time.perf_counter()
                run(n)
                bench._sync()
                seconds[name].append((time.perf_counter() - tick) / n)
        median = {name: statistics.median(s) for name, s in seconds.items()}
        return {
            "method": method, "model": args.model, "teacher": args.teacher, "input_size": bench.data.input_size,
            "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
            "device": str(bench.device), "device_name": _device_name(bench.device), "threads": torch.get_num_threads(),
            "amp": cfg.amp and bench.device.type == "cuda", "channels_last": cfg.channels_last,
            "kdzoo_ms": 1000 * median["kdzoo"], "torchdistill_ms": 1000 * median["torchdistill"],
            "kdzoo_img_per_s": args.batch_size / median["kdzoo"],
            "torchdistill_img_per_s": args.batch_size / median["torchdistill"],
            "ratio": median["torchdistill"] / median["kdzoo"],
            "first_loss_kdzoo": loss_kdzoo, "first_loss_torchdistill": loss_torchdistill,
        }
    finally:
        bench.close()


def markdown(rows: list[dict]) -> str:
    lines = ["| method | student ← teacher | batch | kdzoo img/s | torchdistill img/s | kdzoo ÷ torchdistill "
             "| first-batch loss (kdzoo / torchdistill) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['model']} ← {r['teacher']} | {r['batch_size']} | "
                     f"{r['kdzoo_img_per_s']:.1f} | {r['torchdistill_img_per_s']:.1f} | {r['ratio']:.3f}× | "
                     f"{r['first_loss_kdzoo']:.4f} / {r['first_loss_torchdistill']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="kd,rkd")
    add_workload_arguments(parser, batch_size=64, steps=20, rounds=10, warmup=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a Markdown table")
    args = parser.parse_args()
    args.rounds = max(1, min(args.rounds, args.steps))
    rows = [compare(method, args) for method in args.methods.split(",")]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    r = rows[0]
    text = (f"{header(r['device'])}\n{r['model']} ← {r['teacher']} on shapes at {r['input_size']} px, batch "
            f"{r['batch_size']}, amp={r['amp']}, channels_last={r['channels_last']}; {args.steps} timed steps per side "
            f"in {args.rounds} interleaved rounds after {args.warmup} warm-up steps; medians.\n\n{markdown(rows)}\n")
    print(text)
    if args.write:
        write_section(args.write, "torchdistill", text)


if __name__ == "__main__":
    main()
