"""A run's identity: the data it read and the plugin code it ran are part of its id, its recipe
hash, its cached teacher and its leaderboard row; the machine it ran on is recorded and shown.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from kdzoo.bench.leaderboard import build, collect, columns
from kdzoo.build import identify
from kdzoo.cli import main
from kdzoo.config import RunConfig, recipe_hash
from kdzoo.data.fingerprint import files_fingerprint
from kdzoo.registry import get_method, load_plugin


def _image_tree(root: Path, colours=((200, 30, 30), (30, 30, 200)), per_class: int = 4) -> Path:
    from PIL import Image

    for split, count in (("train", per_class), ("val", 2)):
        for name, colour in zip("ab", colours):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), colour).save(folder / f"{i}.png")
    return root


def _folder_args(tmp_path: Path, tree: Path, *extra: str) -> list[str]:
    return ["run", "--model", "test_resnet", "--dataset", "imagefolder", "--data-root", str(tree), "--input-size", "16",
            "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--workers", "0", "--output", str(tmp_path / "runs"),
            *extra]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1]


def test_the_fingerprint_follows_the_files_not_the_path(tmp_path):
    tree = _image_tree(tmp_path / "one")
    first = files_fingerprint(tree, ["train", "val"])
    assert first.startswith("12 files ")
    assert files_fingerprint(shutil.copytree(tree, tmp_path / "copy"), ["train", "val"]) == first  # moved: same data
    (tree / "train" / "a" / "4.png").write_bytes((tree / "train" / "a" / "0.png").read_bytes())  # one image more
    assert files_fingerprint(tree, ["train", "val"]).startswith("13 files ")
    (tree / "train" / "a" / "4.png").unlink()
    (tree / "train" / "a" / "0.png").write_bytes(b"x" * 10)  # same names, another size
    assert files_fingerprint(tree, ["train", "val"]) not in (first, None)
    assert files_fingerprint(tmp_path / "nothing", ["train"]) is None


def test_two_data_roots_give_two_run_ids_and_two_leaderboard_rows(tmp_path, capsys):
    red = _image_tree(tmp_path / "red")
    blue = _image_tree(tmp_path / "blue", colours=((30, 200, 30), (200, 200, 30)), per_class=5)
    assert main(_folder_args(tmp_path, red)) == 0
    assert main(_folder_args(tmp_path, blue)) == 0
    blue_id = capsys.readouterr().out.replace("\n", "").split("done ")[-1].split(":")[0]
    folders = sorted(p for p in (tmp_path / "runs").iterdir() if p.is_dir() and p.name.startswith("imagefolder"))
    assert len(folders) == 2, folders
    records = [json.loads((f / "config.json").read_text())["run"] for f in folders]
    assert sorted(r["data_fingerprint"].split(" files ")[0] for r in records) == ["12", "14"]
    # --resume on the second root finds its own run, not "already complete" with the first one's top-1
    assert main(_folder_args(tmp_path, blue, "--resume")) == 0
    captured = capsys.readouterr()
    out = (captured.err + captured.out).replace("\n", "")
    assert f"{blue_id} is already complete" in out, out
    entries, _ = collect(tmp_path / "runs")
    board = build(entries)
    assert len(board) == 2 and (board["n_seeds"] == 1).all() and board["recipe_hash"].nunique() == 2


def test_the_same_images_elsewhere_are_the_same_run(tmp_path):
    tree = _image_tree(tmp_path / "here")
    moved = shutil.copytree(tree, tmp_path / "there")
    ids = {identify(RunConfig(dataset="imagefolder", data_root=str(root))).run_id() for root in (tree, moved)}
    assert len(ids) == 1


def test_a_cached_teacher_is_never_reused_for_other_data(tmp_path):
    from kdzoo.teacher import teacher_run_config

    a, b = _image_tree(tmp_path / "a"), _image_tree(tmp_path / "b", per_class=5)
    ids = {identify(teacher_run_config(identify(RunConfig(method="kd", teacher="test_resnet", dataset="imagefolder",
                                                          data_root=str(root))))).run_id() for root in (a, b)}
    assert len(ids) == 2


def test_resume_after_the_data_changed_names_the_fingerprint(tmp_path, capsys):
    tree = _image_tree(tmp_path / "tree")
    args = _folder_args(tmp_path, tree, "--run-name", "mine")
    assert main(args) == 0
    (tree / "train" / "b" / "9.png").write_bytes((tree / "train" / "b" / "0.png").read_bytes())
    before = (tmp_path / "runs" / "mine" / "config.json").read_bytes()
    assert main([*args, "--resume"]) == 2
    line = _error_line(capsys)
    assert "data_fingerprint" in line and "12 files" in line and "13 files" in line, line
    assert (tmp_path / "runs" / "mine" / "config.json").read_bytes() == before


def test_generated_data_and_builtin_methods_keep_their_ids():
    """Fields added for identity are left out while None: shapes runs keep the ids they had."""
    cfg = identify(RunConfig(method="kd", teacher="resnet34"))
    assert cfg.data_fingerprint is None and cfg.method_source is None
    plain = {k: v for k, v in cfg.to_dict().items() if k not in ("data_fingerprint", "method_source")}
    assert recipe_hash(plain, None, {}) == recipe_hash(cfg.to_dict(), None, {})
    assert cfg.run_key() == RunConfig(**plain).run_key()


def test_cifar_is_identified_by_its_checked_files_before_and_after_download():
    one = identify(RunConfig(dataset="cifar10", data_root="/nowhere", download=True)).data_fingerprint
    assert one == identify(RunConfig(dataset="cifar10", data_root="/elsewhere")).data_fingerprint
    assert one.startswith("CIFAR10 md5-checked ")
    assert identify(RunConfig(dataset="cifar100", data_root="/nowhere")).data_fingerprint != one


PLUGIN = """
import torch
from kdzoo import Method, register_method

SCALE = {scale}

@register_method("test_identity_scaled_ce")
class ScaledCE(Method):
    def loss(self, out):
        return {{"ce": SCALE * torch.nn.functional.cross_entropy(out.student.logits, out.targets)}}
"""


def _load_fresh(path: Path) -> str:
    """Load ``path`` as a new process would (forgetting an earlier import of it)."""
    for name in [n for n in sys.modules if n.startswith(f"kdzoo_plugin_{path.stem}_")]:
        del sys.modules[name]
    load_plugin(str(path))
    return get_method("test_identity_scaled_ce").source


def test_an_edited_plugin_is_another_run(tmp_path, capsys):
    import hashlib

    plugin = tmp_path / "scaled.py"
    plugin.write_text(PLUGIN.format(scale=1.0))
    source = _load_fresh(plugin)
    assert source == hashlib.sha256(plugin.read_bytes()).hexdigest()[:12]
    cfg = RunConfig(method="test_identity_scaled_ce", model="test_resnet")
    first = identify(cfg).run_id()
    args = ["run", "--plugin", str(plugin), "--method", "test_identity_scaled_ce", "--model", "test_resnet",
            "--input-size", "16", "--train-size", "32", "--test-size", "32", "--batch-size", "16", "--epochs", "1",
            "--device", "cpu", "--output", str(tmp_path / "runs"), "--run-name", "mine"]
    assert main(args) == 0
    recorded = json.loads((tmp_path / "runs" / "mine" / "config.json").read_text())["run"]
    assert recorded["method_source"] == source
    plugin.write_text(PLUGIN.format(scale=2.0))
    assert _load_fresh(plugin) != source
    assert identify(cfg).run_id() != first
    before = (tmp_path / "runs" / "mine" / "config.json").read_bytes()
    assert main([*args, "--resume"]) == 2
    assert "method_source" in _error_line(capsys)
    assert (tmp_path / "runs" / "mine" / "config.json").read_bytes() == before


@pytest.mark.parametrize("where", ["config", "suite"])
def test_computed_fields_cannot_be_set(tmp_path, capsys, where):
    if where == "config":
        path = tmp_path / "c.toml"
        path.write_text('data_fingerprint = "12 files abc"\n')
        argv = ["run", "--config", str(path), "--output", str(tmp_path / "runs")]
    else:
        path = tmp_path / "s.toml"
        path.write_text('[defaults]\nmethod_source = "abc"\n[[grid]]\nmethods = ["baseline"]\n')
        argv = ["bench", str(path), "--output", str(tmp_path / "runs")]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "kdzoo computes" in line and "remove it" in line, line
    assert not (tmp_path / "runs").exists()


def _machine_run(root: Path, folder: str, seed: int, machine: dict, top1: float) -> None:
    path = root / folder
    path.mkdir(parents=True)
    run = RunConfig(seed=seed, device="cpu").resolved().to_dict()
    (path / "config.json").write_text(json.dumps({"run": run, "method_config": {}, "versions": {}, "machine": machine}))
    (path / "result.json").write_text(json.dumps({"run_id": folder, "complete": True, "top1": top1, "machine": machine,
                                                  "method": "baseline", "model": "resnet18", "dataset": "shapes"}))


def test_the_leaderboard_shows_and_splits_by_machine_when_asked(tmp_path, capsys):
    one = {"cpu": "Xeon  Gold 6338", "threads": 2, "gpu": None}
    other = {"cpu": "EPYC 7763", "threads": 2, "gpu": None}
    gpu = {"cpu": "EPYC 7763", "threads": 16, "gpu": "NVIDIA H200"}
    _machine_run(tmp_path, "a", 0, one, 40.0)
    _machine_run(tmp_path, "b", 1, one, 42.0)
    _machine_run(tmp_path, "c", 2, other, 50.0)
    _machine_run(tmp_path, "d", 3, gpu, 60.0)
    entries, _ = collect(tmp_path)
    assert len(build(entries)) == 1 and "machine" not in build(entries).columns  # seeds of one recipe: one row
    board = build(entries, by_machine=True)
    assert list(board.columns) == columns(True) and len(board) == 3
    rows = {r.machine: (r.n_seeds, r.top1_mean) for r in board.itertuples()}
    assert rows == {"Xeon Gold 6338, 2 threads": (2, 41.0), "EPYC 7763, 2 threads": (1, 50.0), "NVIDIA H200": (1, 60.0)}
    assert main(["leaderboard", "--runs", str(tmp_path), "--by-machine", "--csv", str(tmp_path / "b.csv")]) == 0
    header = (tmp_path / "b.csv").read_text().splitlines()[0].split(",")
    assert header[header.index("method") + 1] == "machine"
