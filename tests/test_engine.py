"""End-to-end runs on tiny settings: run folders, determinism, resume, teacher caching."""

import csv
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch

from kdzoo.checkpoint import read_checkpoint
from kdzoo.cli import main
from kdzoo.engine import Interrupted, StopFlag, run
from kdzoo.losses import cross_entropy
from kdzoo.method import Method
from kdzoo.registry import register_method

from .conftest import tiny_args, tiny_config


def _metrics(folder):
    with open(folder / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_run_writes_a_complete_folder_and_lowers_the_loss(tmp_path, quiet_console):
    result = run(tiny_config(tmp_path, epochs=4, train_size=160, lr=0.05), console=quiet_console)
    folder = tmp_path / "runs" / result["run_id"]
    for name in ("config.json", "metrics.csv", "result.json", "last.pt", "best.pt"):
        assert (folder / name).is_file(), name
    rows = _metrics(folder)
    assert len(rows) == 4
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    config = json.loads((folder / "config.json").read_text())
    assert config["run"]["epochs"] == 4 and config["versions"]["torch"] == torch.__version__
    saved = json.loads((folder / "result.json").read_text())
    assert saved["complete"] and saved["epochs"] == 4 and 0 <= saved["top1"] <= 100
    state = read_checkpoint(folder / "last.pt")
    assert state["epoch"] == 4 and "student" in state


def test_same_seed_same_losses(tmp_path, quiet_console):
    a = run(tiny_config(tmp_path, run_name="a"), console=quiet_console)
    run(tiny_config(tmp_path, run_name="b"), console=quiet_console)
    rows_a, rows_b = _metrics(tmp_path / "runs" / "a"), _metrics(tmp_path / "runs" / "b")
    loss_columns = [c for c in rows_a[0] if c.startswith("train_") or c.startswith("test_")]
    assert [[r[c] for c in loss_columns] for r in rows_a] == [[r[c] for c in loss_columns] for r in rows_b]
    c = run(tiny_config(tmp_path, run_name="c", seed=1), console=quiet_console)
    assert c["final_train_loss"] != a["final_train_loss"]


@register_method("test_stop_after_5")
class StopAfterFive(Method):
    """Baseline that raises the stop flag at step 5, the way SIGTERM does."""

    flag: StopFlag | None = None

    @dataclass
    class Config:
        pass

    def loss(self, out):
        if out.step == 5 and StopAfterFive.flag is not None and not StopAfterFive.flag:
            StopAfterFive.flag.signal_name = "SIGTERM"
        return {"ce": cross_entropy(out.student.logits, out.targets)}


def test_stop_then_resume_matches_uninterrupted(tmp_path, quiet_console):
    full = run(tiny_config(tmp_path, method="test_stop_after_5", run_name="full"), console=quiet_console)
    StopAfterFive.flag = StopFlag()
    with pytest.raises(Interrupted, match="--resume"):
        run(tiny_config(tmp_path, method="test_stop_after_5", run_name="cut"), console=quiet_console, stop=StopAfterFive.flag)
    state = read_checkpoint(tmp_path / "runs" / "cut" / "last.pt")
    assert state["global_step"] == 6 and state["epoch"] == 0
    assert not (tmp_path / "runs" / "cut" / "result.json").exists()
    StopAfterFive.flag = None
    resumed = run(tiny_config(tmp_path, method="test_stop_after_5", run_name="cut"), resume=True, console=quiet_console)
    assert resumed["top1"] == full["top1"]
    assert resumed["final_train_loss"] == pytest.approx(full["final_train_loss"], rel=1e-6)
    columns = ["train_loss", "train_ce", "test_loss", "test_top1"]
    cut, uncut = _metrics(tmp_path / "runs" / "cut"), _metrics(tmp_path / "runs" / "full")
    assert [[r[c] for c in columns] for r in cut] == [[r[c] for c in columns] for r in uncut]


@register_method("test_stop_at_last_step")
class StopAtLastStep(Method):
    """Baseline that raises the stop flag at the run's very last step (step 11 of 2 × 6)."""

    flag: StopFlag | None = None

    @dataclass
    class Config:
        pass

    def loss(self, out):
        if out.step == 11 and StopAtLastStep.flag is not None and not StopAtLastStep.flag:
            StopAtLastStep.flag.signal_name = "SIGTERM"
        return {"ce": cross_entropy(out.student.logits, out.targets)}


def test_a_stop_at_the_last_step_resumes_into_the_last_evaluation(tmp_path, quiet_console):
    """The checkpoint is written before the last epoch closes: --resume must still evaluate it and
    write its metrics row, not find every step done and skip the epoch's end."""
    full = run(tiny_config(tmp_path, method="test_stop_at_last_step", run_name="full"), console=quiet_console)
    StopAtLastStep.flag = StopFlag()
    with pytest.raises(Interrupted):
        run(tiny_config(tmp_path, method="test_stop_at_last_step", run_name="cut"), console=quiet_console,
            stop=StopAtLastStep.flag)
    assert read_checkpoint(tmp_path / "runs" / "cut" / "last.pt")["global_step"] == 12
    StopAtLastStep.flag = None
    resumed = run(tiny_config(tmp_path, method="test_stop_at_last_step", run_name="cut"), resume=True, console=quiet_console)
    assert (resumed["epochs"], resumed["steps"], resumed["top1"]) == (full["epochs"], full["steps"], full["top1"])
    assert resumed["final_train_loss"] == pytest.approx(full["final_train_loss"], rel=1e-6)
    columns = ["epoch", "train_loss", "test_loss", "test_top1"]
    cut, uncut = _metrics(tmp_path / "runs" / "cut"), _metrics(tmp_path / "runs" / "full")
    assert [[r[c] for c in columns] for r in cut] == [[r[c] for c in columns] for r in uncut]


def test_sigterm_leaves_a_loadable_checkpoint_and_resume_finishes(tmp_path):
    args = [sys.executable, "-m", "kdzoo", *tiny_args(tmp_path, "--epochs", "12", "--run-name", "sig")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "runs" / "sig" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "--resume" in err
    state = read_checkpoint(last)
    assert state["format"] == "kdzoo-checkpoint-v1"
    assert not (tmp_path / "runs" / "sig" / "result.json").exists()
    # resume with the same settings finishes the run
    assert main([*tiny_args(tmp_path, "--epochs", "12", "--run-name", "sig", "--resume")]) == 0
    assert json.loads((tmp_path / "runs" / "sig" / "result.json").read_text())["steps"] == 12 * 6


def _files(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_with_other_settings_is_refused_naming_each_difference(tmp_path, capsys):
    StopAfterFive.flag = StopFlag()
    cfg = tiny_config(tmp_path, method="test_stop_after_5")
    with pytest.raises(Interrupted):
        run(cfg, console=None, stop=StopAfterFive.flag)
    StopAfterFive.flag = None
    capsys.readouterr()  # the stopped run's own progress lines (stderr is no terminal here)
    runs = tmp_path / "runs"
    before = _files(runs)
    base = tiny_args(tmp_path, "--method", "test_stop_after_5")
    # the same run named explicitly, and found from its settings alone
    named = next(runs.iterdir()).name
    for extra in (["--run-name", named, "--lr", "0.2", "--max-steps", "7"], ["--lr", "0.2"]):
        assert main([*base, *extra, "--resume"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert "lr: recorded 0.1, given 0.2" in err
        assert ("max_steps: recorded None, given 7" in err) == ("--max-steps" in extra)
        assert _files(runs) == before  # nothing written, nothing changed
    # where it runs may change: the same settings on another --workers resume it
    assert main([*base, "--resume", "--workers", "0"]) == 0


def test_kd_trains_and_caches_its_teacher(tmp_path, capsys):
    args = tiny_args(tmp_path, "--method", "kd", "--teacher", "test_resnet", "--teacher-epochs", "1")
    assert main(args) == 0
    first = capsys.readouterr().err
    assert "No teacher checkpoint given" in first and "training test_resnet" in first
    assert main(args) == 0
    second = capsys.readouterr().err
    assert "using the cached teacher" in second and "No teacher checkpoint given" not in second
    teachers = [p for p in (tmp_path / "runs" / "teachers").iterdir() if p.is_dir()]  # (and its .lock file)
    assert len(teachers) == 1 and (teachers[0] / "result.json").is_file()


def test_a_cached_teacher_gives_the_result_of_the_call_that_trained_it(tmp_path, capsys):
    # nfd has modules of its own (adapters): they must not start differently because the first
    # call drew random numbers to train the teacher and the second read it from the cache
    args = tiny_args(tmp_path, "--method", "nfd", "--teacher", "test_resnet", "--teacher-epochs", "1")
    assert main([*args, "--run-name", "first"]) == 0
    assert main([*args, "--run-name", "second"]) == 0
    assert "using the cached teacher" in capsys.readouterr().err
    first, second = _metrics(tmp_path / "runs" / "first"), _metrics(tmp_path / "runs" / "second")
    columns = [c for c in first[0] if c.startswith("train_") or c.startswith("test_")]
    assert [[r[c] for c in columns] for r in first] == [[r[c] for c in columns] for r in second]


def test_teacher_checkpoint_of_another_architecture_is_refused(tmp_path, capsys):
    from kdzoo.models import create_model

    path = tmp_path / "other.pt"
    torch.save(create_model("resnet18", 10, 16).state_dict(), path)
    code = main(tiny_args(tmp_path, "--method", "kd", "--teacher", "test_resnet", "--teacher-checkpoint", str(path)))
    assert code == 2
    assert "does not fit model" in capsys.readouterr().err
