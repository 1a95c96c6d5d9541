"""kdzoo plot: a valid image of the expected size from run folders' metrics.csv; bad inputs exit 2."""

from __future__ import annotations

import json
import struct

import pytest

from kdzoo.bench import curves
from kdzoo.cli import main

pytest.importorskip("matplotlib", reason="the plot extra is not installed (pip install -e \".[plot]\")")

HEADER = "epoch,step,lr,train_loss,train_ce,train_kd,train_top1,test_top1,test_top5,test_loss,img_per_s\n"


def make_run(root, name, method="kd", seed=0, epochs=3, teacher="resnet34", task="cls"):
    """A run folder as kdzoo writes it (config.json and metrics.csv), without training."""
    folder = root / name
    folder.mkdir(parents=True)
    run = {"method": method, "model": "resnet18", "teacher": teacher, "dataset": "shapes", "task": task, "seed": seed}
    (folder / "config.json").write_text(json.dumps({"run": run}))
    lines = [HEADER] + [f"{e},{10 * e},0.1,{3 - e * 0.5},{2 - e * 0.3},{1 - e * 0.2},{20 * e},{25 * e + seed},90,1.5,120\n"
                        for e in range(1, epochs + 1)]
    (folder / "metrics.csv").write_text("".join(lines))
    return folder


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png_of_every_panel_and_names_each_run(tmp_path, capsys):
    a = make_run(tmp_path / "runs", "shapes_kd_resnet34-resnet18_s0_aaaa1111")
    make_run(tmp_path / "runs", "shapes_kd_resnet34-resnet18_s1_bbbb2222", seed=1)
    make_run(tmp_path / "runs" / "teachers", "shapes_baseline_resnet34_s0_cccc3333", method="baseline", teacher=None)
    out = tmp_path / "curves.png"
    assert main(["plot", str(a), str(tmp_path / "runs"), "--out", str(out)]) == 0  # a run named twice is one run
    assert "2 run(s)" in capsys.readouterr().out
    # 4 panels (test top-1, the loss, kd, ce) in at most 3 columns at 4.2 x 3.1 inches, 120 dpi
    width, height = png_size(out)
    assert width == round(3 * 4.2 * 120)
    assert 2 * 3.1 * 120 < height < 2 * 3.1 * 120 + 120


def test_labels_name_method_pair_and_seed_and_tell_equal_ones_apart(tmp_path):
    runs = [curves.read_run(make_run(tmp_path, f"shapes_kd_resnet34-resnet18_s0_{key}")) for key in ("aaaa1111", "bbbb2222")]
    runs.append(curves.read_run(make_run(tmp_path, "shapes_baseline_resnet18_s3_cccc3333", method="baseline", teacher=None, seed=3)))
    curves.label_runs(runs)
    assert [r.label for r in runs] == ["kd  resnet34→resnet18  s0  (aaaa1111)", "kd  resnet34→resnet18  s0  (bbbb2222)",
                                       "baseline  resnet18  s3"]


def test_default_panels_and_metric_names(tmp_path):
    runs = [curves.read_run(make_run(tmp_path, "r"))]
    assert curves.default_metrics(runs) == ["test_top1", "train_loss", "train_ce", "train_kd"]
    assert curves.resolve_metrics(["top1", "kd", "lr", "test_loss"], runs) == ["test_top1", "train_kd", "lr", "test_loss"]


def test_a_term_that_is_the_whole_loss_gets_no_panel_of_its_own(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "metrics.csv").write_text("epoch,step,train_loss,train_ce,train_top1,test_top1\n1,5,2.0,2.0,10,12\n2,10,1.5,1.5,20,22\n")
    assert curves.default_metrics([curves.read_run(folder)]) == ["test_top1", "train_loss"]


def test_segmentation_runs_plot_miou(tmp_path):
    folder = tmp_path / "seg"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"run": {"method": "kd", "model": "resnet18", "task": "seg", "seed": 0}}))
    (folder / "metrics.csv").write_text("epoch,step,train_loss,train_pixel_acc,test_miou,test_pixel_acc\n1,5,2.0,40,10,50\n")
    assert curves.default_metrics([curves.read_run(folder)]) == ["test_miou", "train_loss"]
    assert main(["plot", str(folder), "--out", str(tmp_path / "seg.png")]) == 0
    png_size(tmp_path / "seg.png")


@pytest.mark.parametrize("case, args, message", [
    ("missing", ["{tmp}/nope"], "does not exist"),
    ("empty folder", ["{tmp}/empty"], "neither a run folder nor a folder holding run folders"),
    ("no epoch yet", ["{tmp}/started"], "has no metrics.csv yet"),
    ("header only", ["{tmp}/header"], "has no epoch rows"),
    ("empty csv", ["{tmp}/broken"], "is not a readable metrics file"),
    ("unknown metric", ["{tmp}/runs", "--metric", "nonsense"], "--metric 'nonsense' is not a column"),
    ("out is a folder", ["{tmp}/runs", "--out", "{tmp}"], "is a folder"),
    ("unknown format", ["{tmp}/runs", "--out", "{tmp}/x.docx"], "cannot write a 'docx' image"),
])
def test_bad_inputs_are_one_line_exit_2(tmp_path, capsys, case, args, message):
    make_run(tmp_path / "runs", "r")
    (tmp_path / "empty").mkdir()
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "config.json").write_text("{}")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.csv").write_text("")
    (tmp_path / "header").mkdir()
    (tmp_path / "header" / "metrics.csv").write_text(HEADER)
    assert main(["plot", *[a.format(tmp=tmp_path) for a in args]]) == 2, case
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_without_matplotlib_plot_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert main(["plot", str(make_run(tmp_path, "r")), "--out", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'kdzoo: error: kdzoo plot needs matplotlib, which is not installed; install it with pip install -e ".[plot]"'
    assert not (tmp_path / "c.png").exists()
