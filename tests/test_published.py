"""The published table beside the leaderboard: paper_top1 and delta_vs_paper for matching rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdzoo.bench import published
from kdzoo.bench.leaderboard import build, collect
from kdzoo.cli import main
from kdzoo.config import RunConfig

KD = {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9, "logit_standardize": False}


def _run(root: Path, folder: str, *, method="kd", dataset="cifar100", teacher="cifar_resnet32x4", model="cifar_resnet8x4",
         method_config=None, num_classes=100, top1=74.0, seed=0) -> None:
    path = root / folder
    path.mkdir(parents=True)
    run = RunConfig(method=method, dataset=dataset, teacher=teacher, model=model, seed=seed, data_root="/data",
                    device="cpu", data_fingerprint=f"{num_classes} classes").resolved().to_dict()
    config = {"run": run, "method_config": method_config if method_config is not None else KD, "versions": {},
              "data": {"num_classes": num_classes, "input_size": 32}}
    (path / "config.json").write_text(json.dumps(config))
    (path / "result.json").write_text(json.dumps({"run_id": folder, "complete": True, "top1": top1, "method": method,
                                                  "model": model, "teacher": teacher, "dataset": dataset}))


def _row(board, **match):
    rows = board
    for key, value in match.items():
        rows = rows[rows[key] == value]
    assert len(rows) == 1, board[["method", "student", "paper_top1"]]
    return rows.iloc[0]


def test_the_table_holds_repdistillers_cifar_table_and_the_imagenet_rows():
    rows = published.table()
    cifar = [r for r in rows if r.dataset == "cifar100" and r.method == "crd"]
    assert len(cifar) == 13  # 7 same-family + 6 cross-family pairs
    kd = published.lookup("kd", "cifar100", 100, "cifar_resnet32x4", "cifar_resnet8x4", KD)
    assert (kd.top1, "RepDistiller" in kd.source) == (73.33, True)
    dkd = published.lookup("dkd", "imagefolder", 1000, "resnet34.tv_in1k", "resnet18", {})  # a weights tag is the same network
    assert dkd.top1 == 71.70 and "mdistiller" in dkd.source
    assert published.lookup("baseline", "cifar100", 100, None, "cifar_resnet8x4", {}).top1 == 72.50
    assert all(r.source for r in rows) and len({(r.method, r.settings, r.dataset, r.teacher, r.student) for r in rows}) == len(rows)


def test_a_variant_is_compared_with_its_own_row_never_the_plain_one():
    ls = {**KD, "logit_standardize": True}
    assert published.lookup("kd", "cifar100", 100, "cifar_resnet32x4", "cifar_resnet8x4", ls).top1 == 76.62
    assert published.lookup("kd", "cifar100", 100, "cifar_resnet32x4", "cifar_wrn_16_2", ls) is None  # no KD+LS row there
    assert published.lookup("mlkd", "cifar100", 100, "cifar_resnet32x4", "cifar_resnet8x4", {"logit_standardize": False}).top1 == 77.08


@pytest.mark.parametrize("dataset,classes,teacher,student", [
    ("imagefolder", 10, "resnet34", "resnet18"),   # an image folder that is not ImageNet
    ("cifar10", 10, "cifar_resnet32x4", "cifar_resnet8x4"),
    ("cifar100", 100, "cifar_resnet32x4", "cifar_resnet20"),  # a pair no paper ran
])
def test_no_row_is_claimed_for_other_data_or_pairs(dataset, classes, teacher, student):
    assert published.lookup("kd", dataset, classes, teacher, student, KD) is None


def test_the_leaderboard_shows_paper_top1_and_the_delta(tmp_path):
    _run(tmp_path, "kd_s0", top1=74.00, seed=0)
    _run(tmp_path, "kd_s1", top1=73.00, seed=1)
    _run(tmp_path, "kdls_s0", method_config={**KD, "logit_standardize": True, "temperature": 2.0, "kd_weight": 9.0}, top1=76.0)
    _run(tmp_path, "in_s0", dataset="imagefolder", teacher="resnet34", model="resnet18", num_classes=1000, top1=70.0)
    _run(tmp_path, "folder_s0", dataset="imagefolder", teacher="resnet34", model="resnet18", num_classes=5, top1=90.0)
    board = build(collect(tmp_path)[0])
    plain = _row(board, dataset="cifar100", n_seeds=2)
    assert plain.paper_top1 == 73.33 and plain.delta_vs_paper == pytest.approx(73.50 - 73.33)
    variant = _row(board, dataset="cifar100", n_seeds=1)
    assert variant.paper_top1 == 76.62 and variant.delta_vs_paper == pytest.approx(-0.62)
    imagenet = _row(board, top1_mean=70.0)
    assert imagenet.paper_top1 == 71.03 and imagenet.delta_vs_paper == pytest.approx(-1.03)
    other = _row(board, top1_mean=90.0)
    assert other.paper_top1 != other.paper_top1  # NaN: no published row
    assert main(["leaderboard", "--runs", str(tmp_path), "--csv", str(tmp_path / "b.csv")]) == 0
    header = (tmp_path / "b.csv").read_text().splitlines()[0].split(",")
    assert {"paper_top1", "delta_vs_paper", "paper_source"} <= set(header)
