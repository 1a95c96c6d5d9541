"""Run every registered method on full-size students of three families and a cross-family pair.

A smoke test at real scale: each cell trains a few steps on `shapes` at 32 px (ConvNeXt's stride-4
stem needs at least 32) and records whether it ran, its step time and its extra parameters.
The teachers are trained briefly once and cached, so the figures say nothing about accuracy.

    python benchmarks/method_matrix.py [--steps 3] [--output runs/matrix] [--methods kd,nfd]
"""

from __future__ import annotations

import argparse
import math
import time

from rich.console import Console
from rich.table import Table

from kdzoo.config import RunConfig
from kdzoo.engine import run
from kdzoo.registry import get_method, method_names

STUDENTS = ["resnet18", "mobilenetv3_small_100", "convnext_atto"]
TEACHER = "resnet34"
CROSS = [("resnet50", "mobilenetv3_small_100")]


def cells(methods: list[str]) -> list[tuple[str, str | None, str]]:
    out = []
    for method in methods:
        teacherless = not get_method(method).needs_teacher
        for student in STUDENTS:
            out.append((method, None if teacherless else TEACHER, student))
        if not teacherless:
            out += [(method, teacher, student) for teacher, student in CROSS]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output", default="runs/matrix")
    parser.add_argument("--methods", default=None, help="comma-separated; default: every registered method")
    args = parser.parse_args()
    methods = args.methods.split(",") if args.methods else method_names()
    console = Console()
    quiet = Console(quiet=True)
    table = Table(title=f"methods × students on shapes @32 px, {args.steps} steps each")
    for column in ("method", "teacher", "student", "status", "s/step", "extra params (M)", "loss"):
        table.add_column(column)
    failures = 0
    for method, teacher, student in cells(methods):
        cfg = RunConfig(method=method, model=student, teacher=teacher, input_size=32, train_size=256, test_size=128,
                        batch_size=32, epochs=1, max_steps=args.steps, teacher_epochs=1, device="cpu",
                        output=args.output, run_name=f"{method}-{teacher}-{student}")
        start = time.perf_counter()
        try:
            result = run(cfg, resume=False, console=quiet)
            ok = math.isfinite(result["final_train_loss"])
            row = ["ok" if ok else "non-finite", f"{result['ms_per_step'] / 1000:.2f}",
                   f"{result['extra_params_m']:.3f}", f"{result['final_train_loss']:.3f}"]
            failures += not ok
        except Exception as e:  # noqa: BLE001 - a matrix reports every failure and goes on
            failures += 1
            row = [f"[red]{type(e).__name__}: {str(e)[:60]}[/]", "-", "-", "-"]
        table.add_row(method, teacher or "-", student, *row)
        console.log(f"{method} {teacher or '-'}→{student}: {row[0]} ({time.perf_counter() - start:.0f} s)")
    console.print(table)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
