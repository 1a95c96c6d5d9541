"""Shared helpers: tiny, fast run settings so the whole suite stays within minutes on 2 CPUs."""

from __future__ import annotations

import pytest
import torch

from kdzoo.config import RunConfig

torch.set_num_threads(2)

TINY = dict(model="test_resnet", dataset="shapes", input_size=16, train_size=96, test_size=64,
            batch_size=16, epochs=2, device="cpu", workers=0)


def tiny_config(tmp_path, **overrides) -> RunConfig:
    values = {**TINY, "output": str(tmp_path / "runs"), **overrides}
    return RunConfig(**values)


def tiny_args(tmp_path, *extra: str) -> list[str]:
    args = ["run", "--model", "test_resnet", "--input-size", "16", "--train-size", "96", "--test-size", "64",
            "--batch-size", "16", "--epochs", "2", "--device", "cpu", "--output", str(tmp_path / "runs")]
    return args + list(extra)


@pytest.fixture
def quiet_console():
    from rich.console import Console

    return Console(stderr=True, quiet=True)
