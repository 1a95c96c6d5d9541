"""Fault injection: a run killed again and again at seeded random points ends exactly like an
uninterrupted one, and its folder never holds a corrupt file.

The kills are deterministic, so the test cannot flake: a plugin method kills its own process
at a chosen step (SIGKILL: no chance to save; SIGTERM: the graceful path), and the test hook
``KDZOO_TEST_KILL_IN_WRITE`` (kdzoo/checkpoint.py) SIGKILLs the process halfway through a chosen
atomic write — inside a checkpoint, inside result.json.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdzoo.checkpoint import read_checkpoint
from kdzoo.cli import main

from .conftest import tiny_args

PLUGIN = '''
import os, signal
from kdzoo import Method, register_method
from kdzoo.losses import cross_entropy

@register_method("test_self_kill")
class SelfKill(Method):
    """Cross-entropy; kills its own process at step $KILL_STEP with signal $KILL_SIGNAL."""

    def loss(self, out):
        if out.step == int(os.environ.get("KILL_STEP", -1)):
            os.kill(os.getpid(), getattr(signal, os.environ["KILL_SIGNAL"]))
        value = cross_entropy(out.student.logits, out.targets)
        if out.step >= int(os.environ.get("NAN_FROM_STEP", 10**9)):
            value = value * float("nan")
        return {"ce": value}
'''

EPOCHS, STEPS_PER_EPOCH = 4, 6  # 96 images in batches of 16


def _check_folder(folder: Path, complete: bool) -> None:
    """Every file in the run folder is whole: JSON parses, the CSV is rectangular, checkpoints load."""
    for path in folder.iterdir():
        if path.name.startswith("."):
            assert path.name.endswith(".tmp"), path  # only a killed write's temporary file
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".csv":
            rows = list(csv.reader(io.StringIO(path.read_text())))
            assert len(rows) >= 2 and len({len(r) for r in rows}) == 1, path
        elif path.suffix == ".pt":
            assert read_checkpoint(path)["format"].startswith("kdzoo-checkpoint-v1"), path
        else:
            raise AssertionError(f"unexpected file {path}")
    assert (folder / "result.json").is_file() == complete


def _metrics(folder: Path) -> list[dict]:
    with open(folder / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    """One file for the whole module: a method name may be registered from one place only."""
    path = tmp_path_factory.mktemp("plugin") / "self_kill.py"
    path.write_text(PLUGIN)
    return path


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path, plugin):
    base = tiny_args(tmp_path, "--plugin", str(plugin), "--method", "test_self_kill", "--epochs", str(EPOCHS))
    assert main([*base, "--run-name", "reference"]) == 0
    reference = tmp_path / "runs" / "reference"

    rng = random.Random(20240601)
    last_step = EPOCHS * STEPS_PER_EPOCH - 1
    # (environment, expected exit code): each process resumes from what the previous one left
    faults = [
        ({"KDZOO_TEST_KILL_IN_WRITE": rng.choice(["last.pt", "best.pt"])}, -signal.SIGKILL),  # inside a checkpoint write
        ({"KILL_STEP": rng.randint(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH - 1), "KILL_SIGNAL": "SIGKILL"}, -signal.SIGKILL),
        ({"KILL_STEP": rng.randint(2 * STEPS_PER_EPOCH + 1, last_step - 1), "KILL_SIGNAL": "SIGTERM"}, 143),
        ({"KDZOO_TEST_KILL_IN_WRITE": "result.json"}, -signal.SIGKILL),  # the very last write
        ({}, 0),
    ]
    folder = tmp_path / "runs" / "faulty"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # the thread count the in-process reference uses
    for i, (fault, expected) in enumerate(faults):
        args = [*base, "--run-name", "faulty"] + (["--resume"] if i else [])
        proc = subprocess.run([sys.executable, "-m", "kdzoo", *args], env={**env, **{k: str(v) for k, v in fault.items()}},
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == expected, (fault, proc.stderr[-2000:])
        _check_folder(folder, complete=expected == 0)

    assert not list(folder.glob(".*")), "a resumed run removes the temporary files of killed writes"
    got, want = json.loads((folder / "result.json").read_text()), json.loads((reference / "result.json").read_text())
    for key in ("top1", "top5", "best_top1", "best_epoch", "epochs", "steps"):
        assert got[key] == want[key], key
    for key in ("final_train_loss", "test_loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    columns = ["epoch", "step", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5"]
    assert [[r[c] for c in columns] for r in _metrics(folder)] == [[r[c] for c in columns] for r in _metrics(reference)]
    final, uncut = read_checkpoint(folder / "last.pt"), read_checkpoint(reference / "last.pt")
    for name, tensor in uncut["student"].items():
        torch.testing.assert_close(final["student"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_nan_loss_stops_with_the_term_and_step_and_keeps_the_good_checkpoint(tmp_path, plugin, capsys, monkeypatch):
    monkeypatch.setenv("NAN_FROM_STEP", str(STEPS_PER_EPOCH + 1))
    args = tiny_args(tmp_path, "--plugin", str(plugin), "--method", "test_self_kill", "--run-name", "nan")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    err = err.splitlines()[-1]  # after the progress lines of epoch 1
    assert "loss term 'ce' became nan by step 10 (epoch 2)" in err and "lower --lr" in err
    folder = tmp_path / "runs" / "nan"
    state = read_checkpoint(folder / "last.pt")  # the end of epoch 1: finite weights
    assert state["global_step"] == STEPS_PER_EPOCH
    assert all(torch.isfinite(t).all() for t in state["student"].values() if t.is_floating_point())
    assert not (folder / "result.json").exists()
    failure = json.loads((folder / "failure.json").read_text())
    assert failure["step"] == 10 and failure["non_finite"] == "loss term ce" and failure["last_checkpoint"] == "last.pt"


def test_cuda_out_of_memory_suggests_a_smaller_batch(tmp_path, capsys, monkeypatch):
    from kdzoo import engine

    real_step = engine.Trainer._step

    def step_then_oom(self, images, targets, index):
        if self.global_step == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, images, targets, index)

    monkeypatch.setattr(engine.Trainer, "_step", step_then_oom)
    assert main(tiny_args(tmp_path, "--run-name", "oom")) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    err = err.splitlines()[-1]
    assert "out of memory" in err and "--batch-size 16" in err and "smaller --batch-size (e.g. 8)" in err
