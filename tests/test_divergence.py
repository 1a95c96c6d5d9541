"""A run whose loss or weights become non-finite is failed, never complete: it says where, keeps
only finite checkpoints, records ``failure.json`` (strict JSON) and shows as failed on the
leaderboard — the last step included."""

from __future__ import annotations

import json

import torch

from kdzoo import Method, cross_entropy, register_method
from kdzoo.bench.leaderboard import collect, failures
from kdzoo.checkpoint import read_checkpoint
from kdzoo.cli import main

from .conftest import tiny_args

STEPS = 96 // 16  # steps per epoch of tiny_args


@register_method("test_poison_weights")
class PoisonsWeights(Method):
    """Baseline that writes NaN into one student weight after the step it is told (the loss it
    returns stays finite: only the weight check can see it)."""

    at_step: int = -1

    def install(self, student, teacher):
        self.student_ref = [student]  # a list: not registered as a submodule
        return []

    def loss(self, out):
        if out.step == PoisonsWeights.at_step:
            with torch.no_grad():
                weight = next(self.student_ref[0].parameters())
                weight.data[(0,) * weight.ndim] = float("nan")  # .data: the step's autograd graph is unaffected
        return {"ce": cross_entropy(out.student.logits, out.targets)}


def test_weights_that_go_nan_at_the_last_step_fail_the_run(tmp_path, capsys):
    PoisonsWeights.at_step = 2 * STEPS - 1  # the last step of the last epoch
    code = main(tiny_args(tmp_path, "--method", "test_poison_weights", "--run-name", "poisoned"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert "weight tensor(s) became NaN or Inf by step 12" in err and "recorded as failed" in err
    folder = tmp_path / "runs" / "poisoned"
    assert not (folder / "result.json").exists()
    state = read_checkpoint(folder / "last.pt")  # epoch 1's, the last finite one
    assert state["global_step"] == STEPS
    assert all(torch.isfinite(t).all() for t in state["student"].values() if t.is_floating_point())
    best = read_checkpoint(folder / "best.pt")
    assert all(torch.isfinite(t).all() for t in best["student"].values() if t.is_floating_point())
    failure = json.loads((folder / "failure.json").read_text(), parse_constant=lambda c: 1 / 0)  # strict JSON
    assert failure["state"] == "failed" and failure["step"] == 2 * STEPS and failure["last_checkpoint"] == "last.pt"
    assert str(folder / "last.pt") in err
    entries, _ = collect(tmp_path / "runs")
    assert [e.status for e in entries] == ["failed"]
    assert failures(entries)[0][1].startswith("1 weight tensor(s) became NaN")


def test_divergence_in_the_first_epoch_names_no_checkpoint(tmp_path, capsys):
    PoisonsWeights.at_step = 1
    assert main(tiny_args(tmp_path, "--method", "test_poison_weights", "--run-name", "early")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no checkpoint was written" in err and "last.pt" not in err
    folder = tmp_path / "runs" / "early"
    assert not (folder / "last.pt").exists() and not (folder / "best.pt").exists()
    assert json.loads((folder / "failure.json").read_text())["last_checkpoint"] is None


def test_every_run_records_the_machine(tmp_path):
    assert main(tiny_args(tmp_path, "--epochs", "1", "--run-name", "m")) == 0
    config = json.loads((tmp_path / "runs" / "m" / "config.json").read_text())
    result = json.loads((tmp_path / "runs" / "m" / "result.json").read_text())
    for record in (config["machine"], result["machine"]):
        assert record["threads"] == torch.get_num_threads() and record["cpu"] and record["torch"] == torch.__version__
        assert set(record) >= {"cpu", "cores", "threads", "gpu", "cuda", "cudnn", "torch"}
