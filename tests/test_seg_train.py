"""Short segmentation runs end to end: the loss falls, result.json and metrics.csv carry mIoU,
pixel accuracy and per-class IoU, a seg teacher is trained and cached under its own id, the
leaderboard ranks by mIoU, and an unsupported method/task pair is an exit-2 error."""

import csv
import json

import pytest

from kdzoo.bench.leaderboard import build, collect
from kdzoo.cli import main
from kdzoo.engine import run

from .conftest import tiny_config

SEG = dict(task="seg", input_size=32, train_size=96, test_size=32, batch_size=16, epochs=3, lr=0.05)


@pytest.fixture(scope="module")
def seg_runs(tmp_path_factory):
    from rich.console import Console

    tmp = tmp_path_factory.mktemp("seg")
    console = Console(stderr=True, quiet=True)
    base = run(tiny_config(tmp, **SEG), console=console)
    kd = run(tiny_config(tmp, method="kd", teacher="test_resnet", teacher_epochs=1, **SEG), console=console)
    return tmp / "runs", base, kd


def test_a_segmentation_run_learns_and_reports_miou(seg_runs):
    runs, base, _ = seg_runs
    with open(runs / base["run_id"] / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert {"test_miou", "test_pixel_acc", "train_pixel_acc", "test_iou_background", "test_iou_crescent"} <= set(rows[0])
    result = json.loads((runs / base["run_id"] / "result.json").read_text())
    assert result["task"] == "seg" and result["run_id"].startswith("shapes-seg_baseline_")
    assert set(result["per_class_iou"]) == {"background", "circle", "ring", "square", "diamond", "triangle", "cross",
                                            "star", "hexagon", "ellipse", "crescent"}
    assert 0 < result["miou"] <= 100 and 0 < result["pixel_acc"] <= 100
    assert result["best_miou"] >= result["miou"] and "top1" not in result
    assert result["per_class_iou"]["background"] == pytest.approx(float(rows[-1]["test_iou_background"]), rel=1e-4)


def test_kd_on_segmentation_trains_and_caches_a_segmentation_teacher(seg_runs):
    runs, _, kd = seg_runs
    teachers = [p.name for p in (runs / "teachers").iterdir() if p.is_dir()]
    assert len(teachers) == 1 and teachers[0].startswith("shapes-seg_baseline_test_resnet_")
    assert kd["teacher_miou"] is not None and kd["teacher_miou"] > 0
    assert kd["miou"] > 0


def test_the_leaderboard_shows_miou_for_segmentation_runs(seg_runs, capsys):
    runs, base, kd = seg_runs
    entries, _ = collect(runs)
    board = build(entries)
    assert set(board["task"]) == {"seg"}
    assert sorted(board["miou_mean"].tolist(), reverse=True) == board["miou_mean"].tolist()
    assert board["top1_mean"].isna().all()
    kd_row = board[board["method"] == "kd"].iloc[0]
    assert kd_row["gain_vs_baseline"] == pytest.approx(kd["miou"] - base["miou"])
    assert main(["leaderboard", "--runs", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "miou_mean" in out and "top1_mean" not in out   # empty task columns are left out of the terminal


def test_an_unsupported_method_task_pair_exits_2_naming_the_tasks(tmp_path, capsys):
    code = main(["run", "--task", "seg", "--method", "ccd", "--teacher", "test_resnet", "--model", "test_resnet",
                 "--output", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "'ccd' supports task(s) cls, not 'seg'" in err


def test_list_methods_shows_the_tasks_and_segmentation_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one table row per line
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    assert "cls,seg" in out and "(seg: 50.0)" in out


def test_hooks_lists_the_decoder_tap_of_a_segmentation_model(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["hooks", "--model", "test_resnet", "--task", "seg", "--input-size", "33"]) == 0
    out = capsys.readouterr().out
    assert "backbone.layer1" in out and "decoder" in out
    assert "128×9×9" in out and "10×33×33" in out   # decoder at stage 1's stride 4; logits at the input size
