"""Every kind of bad input: exit code 2, one line naming the problem, and nothing on disk changed.

One finished run and one interrupted run (its ``last.pt`` but no ``result.json``) sit in the
output folder that every bad command is pointed at; a hash of every file before and after
proves that a refused command wrote, replaced or deleted nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from kdzoo.cli import main
from kdzoo.models import create_model

from .conftest import tiny_args


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """<root>/runs/done (complete), <root>/runs/partial (resumable), and checkpoints to misuse."""
    root = tmp_path_factory.mktemp("bad_input")
    assert main(tiny_args(root, "--run-name", "done")) == 0  # the settings every case below resumes with
    done, partial = root / "runs" / "done", root / "runs" / "partial"
    partial.mkdir()
    for name in ("config.json", "metrics.csv", "last.pt"):
        shutil.copy(done / name, partial / name)
    truncated = root / "runs" / "truncated"
    truncated.mkdir()
    shutil.copy(done / "config.json", truncated / "config.json")  # a kdzoo run (--resume refuses other folders)
    data = (done / "last.pt").read_bytes()
    (truncated / "last.pt").write_bytes(data[: len(data) // 3])
    files = root / "files"
    files.mkdir()
    torch.save(create_model("test_resnet", 100, 16).state_dict(), files / "hundred_classes.pt")
    torch.save(create_model("resnet18", 10, 16).state_dict(), files / "resnet18.pt")
    (files / "truncated.pt").write_bytes(data[: len(data) // 2])
    (files / "garbage.pt").write_bytes(b"\x00not a checkpoint at all" * 40)
    torch.save({"student": create_model("test_resnet", 10, 16).state_dict(), "extra": argparse.Namespace(x=1)},
               files / "pickled_object.pt")
    (files / "syntax_error.py").write_text("def oops(:\n")
    (files / "duplicate.py").write_text("from kdzoo import Method, register_method\n"
                                        "@register_method('kd')\nclass Mine(Method):\n    def loss(self, out):\n        return {}\n")
    (files / "task.toml").write_text('task = "segm"\n')
    (files / "suite_syntax.toml").write_text("[[grid]\nmethods = ['kd']\n")
    (files / "suite_keys.toml").write_text("[[grid]]\nmethodz = ['kd']\n")
    (files / "tree" / "train").mkdir(parents=True)
    return root


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    return err


F = "{files}"
CASES = {
    "unknown method": (["--method", "kdd"], ["unknown method 'kdd'", "kd"]),
    "unknown model": (["--model", "resnet81"], ["unknown model 'resnet81'", "resnet18"]),
    "unknown dataset": (["--dataset", "cifar101"], ["unknown dataset 'cifar101'", "cifar100"]),
    "unknown task": (["--config", f"{F}/task.toml"], ["task must be one of cls", "'segm'"]),
    "--set unknown key": (["--method", "kd", "--teacher", "test_resnet", "--set", "temprature=2"],
                          ["no setting 'temprature'", "temperature"]),
    "--set wrong type": (["--method", "kd", "--teacher", "test_resnet", "--set", "temperature=hot"],
                         ["temperature expects a float", "'hot'"]),
    "teacher with other class count": (
        ["--method", "kd", "--teacher", "test_resnet", "--teacher-checkpoint", f"{F}/hundred_classes.pt"],
        ["trained for 100 classes but this run has 10", "same dataset"]),
    "teacher of another architecture": (
        ["--method", "kd", "--teacher", "test_resnet", "--teacher-checkpoint", f"{F}/resnet18.pt"],
        ["does not fit model ResNet", "same architecture"]),
    "resume with another architecture": (["--run-name", "partial", "--resume", "--model", "resnet18"],
                                         ["model: recorded 'test_resnet', given 'resnet18'", "drop those flags"]),
    "truncated checkpoint": (["--method", "kd", "--teacher", "test_resnet", "--teacher-checkpoint", f"{F}/truncated.pt"],
                             ["is truncated or corrupted", "intact"]),
    "corrupted checkpoint": (["--method", "kd", "--teacher", "test_resnet", "--teacher-checkpoint", f"{F}/garbage.pt"],
                             ["is truncated or corrupted"]),
    "truncated last.pt on resume": (["--run-name", "truncated", "--resume"], ["truncated/last.pt", "is truncated or corrupted"]),
    "not a plain weights file": (
        ["--method", "kd", "--teacher", "test_resnet", "--teacher-checkpoint", f"{F}/pickled_object.pt"],
        ["is not a plain weights file", "refused by safe loading", "argparse.Namespace"]),
    "plugin syntax error": (["--plugin", f"{F}/syntax_error.py"], ["syntax error at line 1", "fix the file"]),
    "plugin duplicate name": (["--plugin", f"{F}/duplicate.py"], ["'kd' is already taken", "another name"]),
    "data root of the wrong layout": (["--dataset", "imagefolder", "--data-root", f"{F}/tree"], ["holds no class folders", "<class>"]),
    "missing dataset": (["--dataset", "cifar10", "--data-root", f"{F}/nothing"], ["cifar-10-batches-py", "--download"]),
    "output folder not writable": (["--output", "{runs}/done/config.json"], ["cannot create output folder", "writable --output"]),
    "--nproc below 1": (["--nproc", "0"], ["--nproc must be at least 1"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_run_input_exits_2_and_changes_nothing(root, capsys, case):
    extra, needles = CASES[case]
    extra = [a.format(files=root / "files", runs=root / "runs") for a in extra]
    before = _snapshot(root)
    args = tiny_args(root, *extra)
    if "--output" in extra:  # the case's own --output replaces the default one
        i = args.index("--output")
        del args[i:i + 2]
    assert main(args) == 2
    line = _one_line(capsys)
    for needle in needles:
        assert needle in line, line
    assert _snapshot(root) == before


@pytest.mark.parametrize("suite,needle", [("suite_syntax.toml", "not valid TOML"), ("suite_keys.toml", "no key 'methodz'")])
def test_malformed_suite_exits_2_and_changes_nothing(root, capsys, suite, needle):
    before = _snapshot(root)
    assert main(["bench", str(root / "files" / suite), "--output", str(root / "runs")]) == 2
    assert needle in _one_line(capsys)
    assert _snapshot(root) == before


def test_a_second_run_with_the_same_name_never_touches_the_first(root, capsys):
    """Not an error: the new run gets its own folder (done-2) and the finished one stays as it was."""
    done = {k: v for k, v in _snapshot(root).items() if k.startswith("runs/done/")}
    assert main(tiny_args(root, "--epochs", "1", "--train-size", "32", "--max-steps", "1", "--run-name", "done")) == 0
    assert "done-2" in capsys.readouterr().out
    assert {k: v for k, v in _snapshot(root).items() if k.startswith("runs/done/")} == done
    assert (root / "runs" / "done-2" / "result.json").is_file()
    shutil.rmtree(root / "runs" / "done-2")
