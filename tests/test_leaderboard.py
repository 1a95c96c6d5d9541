"""The leaderboard on hand-written run folders: every aggregate checked against hand-computed values."""

import csv
import json
import math
import sys

import pytest

from kdzoo.bench.leaderboard import COLUMNS, build, collect
from kdzoo.cli import main
from kdzoo.config import RunConfig, recipe_hash

VERSIONS = {"python": "3.11.0", "torch": "2.5.0", "timm": "1.0.0", "kdzoo": "0.1.0"}
KD_CONFIG = {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}


def _run(root, folder, *, method="baseline", model="resnet18", teacher=None, seed=0, lr=0.1, method_config=None,
         result=None):
    """A run folder as the engine writes it: config.json always, result.json when ``result`` is given."""
    path = root / folder
    path.mkdir(parents=True)
    run = RunConfig(method=method, model=model, teacher=teacher, seed=seed, lr=lr, epochs=2, batch_size=64,
                    optimizer="sgd", device="cpu", output=str(root)).resolved().to_dict()
    if teacher:
        run["teacher_epochs"] = 4
    method_config = method_config if method_config is not None else (KD_CONFIG if method == "kd" else {"label_smoothing": 0.0})
    (path / "config.json").write_text(json.dumps({"run": run, "method_config": method_config, "versions": VERSIONS}))
    if result is not None:
        top1, top5, best, ms, ips, mem = result
        (path / "result.json").write_text(json.dumps({
            "run_id": path.name, "complete": True, "method": method, "model": model, "teacher": teacher,
            "dataset": "shapes", "task": "cls", "seed": seed, "epochs": 2, "steps": 100, "top1": top1, "top5": top5,
            "best_top1": best, "teacher_top1": 70.0 if teacher else None, "params_m": 11.2, "extra_params_m": 0.5 if teacher else 0.0,
            "ms_per_step": ms, "train_img_per_s": ips, "peak_mem_mb": mem, "recipe_hash": "ignored",
        }))
    return path


def _status(root, folder, state, error, **run_kwargs):
    run = RunConfig(**run_kwargs).to_dict()
    (root / "bench-status").mkdir(exist_ok=True)
    (root / "bench-status" / f"{folder}.json").write_text(json.dumps({
        "format": "kdzoo-bench-status-v1", "run_id": folder, "folder": folder, "state": state, "error": error,
        "run": run, "method_config": None, "versions": VERSIONS}))


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    # baseline resnet18, lr 0.1: three seeds
    for seed, res in enumerate([(50, 90, 51, 10, 100, 1000), (52, 91, 53, 20, 200, 1100), (57, 95, 58, 30, 300, 1200)]):
        _run(root, f"base_s{seed}", seed=seed, result=res)
    _run(root, "base_s0-2", seed=0, result=(10, 10, 10, 10, 10, 10))  # a repeat of seed 0: counted once (the first)
    # kd resnet34 -> resnet18, same training recipe: two seeds (in a nested folder: found too)
    _run(root / "bench" / "quick", "kd_s0", method="kd", teacher="resnet34", seed=0, result=(60, 96, 61, 40, 80, 1500))
    _run(root / "bench" / "quick", "kd_s1", method="kd", teacher="resnet34", seed=1, result=(64, 98, 65, 40, 80, 1500))
    # kd with another temperature: another recipe, never averaged with the above
    _run(root, "kdT2_s0", method="kd", teacher="resnet34", method_config={**KD_CONFIG, "temperature": 2.0},
         result=(58, 94, 58, 40, 80, 1500))
    # another learning rate: its own baseline
    _run(root, "base_lr05", lr=0.05, result=(40, 80, 41, 10, 100, 1000))
    _run(root, "kd_lr05", method="kd", teacher="resnet34", lr=0.05, result=(45, 85, 46, 40, 80, 1500))
    # a student with no baseline run
    _run(root, "kd_mbv3", method="kd", teacher="resnet34", model="mobilenetv3_small_100", result=(30, 70, 31, 5, 500, 300))
    # a run that never finished, and a cached teacher (skipped)
    _run(root, "nfd_s0", method="nfd", teacher="resnet34")
    _run(root / "teachers", "teacher_run", model="resnet34", result=(70, 99, 70, 30, 50, 2000))
    # bench records: a cell that failed before its folder existed, a stale failure now complete,
    # and a failure with a folder (e.g. a NaN loss mid-run)
    _status(root, "lakd_s0", "failed", "unknown model 'resnet81'", method="lakd", teacher="resnet34", model="resnet81")
    _status(root, "base_s1", "failed", "an old failure, since rerun", seed=1, lr=0.1)
    _run(root, "ccd_s0", method="ccd", teacher="resnet34", method_config={})
    _status(root, "ccd_s0", "failed", "loss term 'kd' became nan", method="ccd", teacher="resnet34")
    return root


def _row(board, **match):
    rows = board
    for key, value in match.items():
        rows = rows[rows[key] == value]
    assert len(rows) == 1, (match, rows)
    return rows.iloc[0]


def test_aggregates_match_hand_computed_values(runs):
    entries, notes = collect(runs)
    assert not notes
    board = build(entries)
    assert list(board.columns) == COLUMNS

    base = _row(board, method="baseline", n_seeds=3)
    assert base["top1_mean"] == pytest.approx(53.0)
    assert base["top1_std"] == pytest.approx(math.sqrt(13))        # sample std (ddof=1) of 50, 52, 57
    assert base["top5_mean"] == pytest.approx(92.0)
    assert base["best_top1_mean"] == pytest.approx(54.0)
    assert (base["ms_per_step"], base["train_img_per_s"], base["peak_mem_mb"]) == pytest.approx((20, 200, 1100))
    assert base["gain_vs_baseline"] == 0.0 and base["teacher"] == "" and math.isnan(base["teacher_top1"])
    assert (base["params_m"], base["extra_params_m"]) == pytest.approx((11.2, 0.0))
    assert (base["epochs"], base["status"]) == (2, "complete")
    # the row names its runs (the repeated seed 0 counted once: base_s0 sorts before base_s0-2) and the best one
    assert base["runs"] == "base_s0; base_s1; base_s2" and base["best_run"] == "base_s2"

    kd = _row(board, method="kd", student="resnet18", top1_mean=62.0)
    assert kd["n_seeds"] == 2 and kd["top1_std"] == pytest.approx(math.sqrt(8))
    assert kd["gain_vs_baseline"] == pytest.approx(62 - 53)
    assert (kd["teacher"], kd["teacher_top1"], kd["extra_params_m"]) == ("resnet34", 70.0, 0.5)

    kd_t2 = _row(board, method="kd", top1_mean=58.0)              # another method setting: another row
    assert kd_t2["n_seeds"] == 1 and math.isnan(kd_t2["top1_std"])  # one seed: no std
    assert kd_t2["gain_vs_baseline"] == pytest.approx(58 - 53)
    assert kd_t2["recipe_hash"] != kd["recipe_hash"]

    assert _row(board, method="kd", top1_mean=45.0)["gain_vs_baseline"] == pytest.approx(45 - 40)  # vs the lr 0.05 baseline
    assert _row(board, method="baseline", top1_mean=40.0)["recipe_hash"] != base["recipe_hash"]
    assert math.isnan(_row(board, student="mobilenetv3_small_100")["gain_vs_baseline"])           # no baseline for it

    incomplete = _row(board, method="nfd")
    assert incomplete["status"] == "incomplete" and incomplete["n_seeds"] == 1 and math.isnan(incomplete["top1_mean"])
    failed = _row(board, method="lakd")
    assert (failed["status"], failed["student"], failed["n_seeds"]) == ("failed", "resnet81", 1)
    assert _row(board, method="ccd")["status"] == "failed"
    assert "resnet34" not in set(board["student"])                 # teachers/ is skipped

    # sorted by top-1, best first; rows without a top-1 last
    assert list(board["top1_mean"].dropna()) == [62.0, 58.0, 53.0, 45.0, 40.0, 30.0]
    assert board["top1_mean"].iloc[6:].isna().all() and len(board) == 9


def test_teachers_on_request_and_errors_kept(runs):
    from kdzoo.bench.leaderboard import failures

    entries, _ = collect(runs, include_teachers=True)
    assert "resnet34" in set(build(entries)["student"])
    errors = dict(failures(entries))
    assert errors == {"lakd_s0": "unknown model 'resnet81'", "ccd_s0": "loss term 'kd' became nan"}


def test_recipe_hash_ignores_seed_and_where_it_ran():
    run = RunConfig(seed=0, device="cpu", output="a").to_dict()
    other = RunConfig(seed=5, device="cuda", output="b", run_name="x", workers=8).to_dict()
    assert recipe_hash(run, {}, VERSIONS) == recipe_hash(other, {}, VERSIONS)
    assert recipe_hash(run, {}, VERSIONS) != recipe_hash(RunConfig(lr=0.2).to_dict(), {}, VERSIONS)
    assert recipe_hash(run, {}, VERSIONS) != recipe_hash(run, {}, {**VERSIONS, "torch": "9"})
    assert recipe_hash(run, {}, VERSIONS) == recipe_hash(run, {}, {**VERSIONS, "python": "3.12"})


def test_cli_prints_and_exports_the_documented_columns(runs, tmp_path, capsys):
    csv_path, md_path = tmp_path / "out" / "board.csv", tmp_path / "board.md"
    assert main(["leaderboard", "--runs", str(runs), "--csv", str(csv_path), "--markdown", str(md_path)]) == 0
    out = capsys.readouterr().out
    assert "kd" in out and "failed" in out and "unknown model 'resnet81'" in out
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS and len(rows) == 9
    assert rows[0]["method"] == "kd" and float(rows[0]["top1_mean"]) == 62.0 and float(rows[0]["gain_vs_baseline"]) == 9.0
    assert rows[0]["n_seeds"] == "2" and rows[0]["epochs"] == "2"
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 2 and all(r["top1_mean"] == "" for r in failed)
    md = md_path.read_text().splitlines()
    assert md[0] == "| " + " | ".join(COLUMNS) + " |" and len([line for line in md if line.startswith("| ")]) == 10
    assert any("unknown model 'resnet81'" in line for line in md)


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, needle in ((["--runs", str(empty)], "no runs under"), (["--runs", str(tmp_path / "nope")], "does not exist")):
        assert main(["leaderboard", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert main(["leaderboard", "--runs", str(empty), "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert 'pip install -e ".[plot]"' in err and len(err.splitlines()) == 1


def test_plot(runs, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "plot.png"
    assert main(["leaderboard", "--runs", str(runs), "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
