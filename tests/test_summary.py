"""The closing summary of `kdzoo run`: the gain over a baseline of the same student and recipe,
or the command that makes one; a method's own reason when it trails."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from kdzoo.cli import main
from kdzoo.config import RunConfig
from kdzoo.summary import baseline_command, find_baselines, render

from .conftest import tiny_args

VERSIONS = {"torch": "2", "timm": "1", "kdzoo": "0.1.0"}


def _run(root: Path, folder: str, method: str, top1: float, teacher: str | None = None, seed: int = 0, lr: float = 0.1):
    path = root / folder
    path.mkdir(parents=True)
    run = RunConfig(method=method, teacher=teacher, seed=seed, lr=lr, device="cpu", output=str(root)).resolved().to_dict()
    (path / "config.json").write_text(json.dumps({"run": run, "method_config": {}, "versions": VERSIONS}))
    result = {"run_id": folder, "complete": True, "method": method, "model": "resnet18", "teacher": teacher,
              "dataset": "shapes", "task": "cls", "seed": seed, "epochs": 1, "top1": top1, "top5": 90.0, "best_top1": top1,
              "best_epoch": 1, "teacher_top1": 70.0 if teacher else None, "wall_time_s": 12.0, "train_img_per_s": 100.0}
    (path / "result.json").write_text(json.dumps(result))
    return path, result


def _render(result, folder, root) -> str:
    console = Console(record=True, width=200)
    render(result, folder, root, ["run", "--method", result["method"], "--model", "resnet18", "--output", str(root)], console)
    return console.export_text()


def test_the_gain_is_over_the_baselines_of_the_same_student_and_recipe(tmp_path):
    _run(tmp_path, "base_s0", "baseline", 60.0, seed=0)
    _run(tmp_path, "base_s1", "baseline", 62.0, seed=1)
    _run(tmp_path, "base_lr", "baseline", 10.0, lr=0.01)  # another recipe: never the comparison
    folder, result = _run(tmp_path, "kd_s0", "kd", 71.5, teacher="resnet34")
    assert sorted(b["top1"] for b in find_baselines(folder, tmp_path)) == [60.0, 62.0]
    text = _render(result, folder, tmp_path)
    assert "+10.50 points (61.00 % baseline, 2 runs of the same student and recipe)" in text
    assert "resnet34 (top-1 70.00 %)" in text and "71.50 % after 1 epoch" in text
    assert "why it trails" not in text and "kdzoo leaderboard --runs" in text


def test_a_method_that_trails_says_why_in_one_line(tmp_path):
    _run(tmp_path, "base_s0", "baseline", 60.0)
    folder, result = _run(tmp_path, "frskd_s0", "frskd", 50.0)
    text = _render(result, folder, tmp_path)
    assert "-10.00 points" in text
    why = [line for line in text.splitlines() if line.startswith("why it trails:")]
    assert len(why) == 1 and "self-teacher starts untrained" in why[0] and "200 epochs" in why[0]


def test_without_a_baseline_it_prints_the_command_that_makes_one(tmp_path):
    folder, result = _run(tmp_path, "kd_s0", "kd", 71.5, teacher="resnet34")
    text = _render(result, folder, tmp_path)
    assert "no baseline of this student and recipe" in text
    assert f"kdzoo run --method baseline --model resnet18 --output {tmp_path}" in text


def test_the_baseline_command_drops_only_the_methods_flags():
    argv = ["run", "--method", "kd", "--model", "resnet18", "--teacher", "resnet34", "--set", "temperature=2",
            "--teacher-epochs=3", "--lr", "0.1", "--teacher-pretrained", "--resume", "--run-name", "x", "--seed", "1"]
    assert baseline_command(argv) == "kdzoo run --method baseline --model resnet18 --lr 0.1 --seed 1"


def test_the_cli_prints_the_summary_after_a_run(tmp_path, capsys):
    assert main(tiny_args(tmp_path, "--epochs", "1", "--train-size", "32", "--test-size", "16")) == 0
    assert main(tiny_args(tmp_path, "--epochs", "1", "--train-size", "32", "--test-size", "16", "--method", "kd",
                          "--teacher", "test_resnet", "--teacher-epochs", "1")) == 0
    out = capsys.readouterr().out
    assert "vs baseline" in out and "points" in out and "next:" in out
