"""Shared helpers: tiny, fast run settings so the whole suite stays within minutes on 2 CPUs."""

from __future__ import annotations

import csv

import pytest
import torch

from kdzoo.config import RunConfig

torch.set_num_threads(2)

# The tests pin their own recipe (SGD), so retuning the shapes default does not change them.
RECIPE = dict(optimizer="sgd", lr=0.1, nesterov=True, weight_decay=5e-4, warmup_epochs=0.0)
TINY = dict(model="test_resnet", dataset="shapes", input_size=16, train_size=96, test_size=64,
            batch_size=16, epochs=2, device="cpu", workers=0, **RECIPE)


@pytest.fixture
def one_thread():
    """For tests of tiny tensors: one thread is as fast, and does not stall when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(tmp_path, **overrides) -> RunConfig:
    values = {**TINY, "output": str(tmp_path / "runs"), **overrides}
    return RunConfig(**values)


# A short distillation run: long enough for the training loss to fall, short enough for CI.
SHORT_RUN = dict(teacher="test_resnet", teacher_epochs=1, epochs=3, lr=0.05, train_size=128)


def train_and_read(tmp_path, console, **overrides):
    """Run ``tiny_config`` with the short-run settings and ``overrides``; return the result and
    the rows of its metrics.csv."""
    from kdzoo.engine import run

    result = run(tiny_config(tmp_path, **{**SHORT_RUN, **overrides}), console=console)
    with open(tmp_path / "runs" / result["run_id"] / "metrics.csv") as f:
        return result, list(csv.DictReader(f))


def tiny_args(tmp_path, *extra: str) -> list[str]:
    args = ["run", "--model", "test_resnet", "--input-size", "16", "--train-size", "96", "--test-size", "64",
            "--batch-size", "16", "--epochs", "2", "--device", "cpu", "--output", str(tmp_path / "runs"),
            "--optimizer", "sgd", "--lr", "0.1", "--nesterov", "--weight-decay", "5e-4", "--warmup-epochs", "0"]
    return args + list(extra)


@pytest.fixture
def quiet_console():
    from rich.console import Console

    return Console(stderr=True, quiet=True)
