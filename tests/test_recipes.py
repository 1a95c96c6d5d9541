"""Paper recipes by name: what each fixes, what a flag beside it changes, and a run on CIFAR's
on-disk format that records every recipe field."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from kdzoo.cli import main
from kdzoo.config import RunConfig
from kdzoo.engine import StopFlag, Trainer, build
from kdzoo.recipes import RECIPES


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1]


def test_list_recipes_names_each_with_its_source(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    assert main(["list", "recipes"]) == 0
    out = capsys.readouterr().out.replace("\n", " ")
    for name in ("cifar100-repdistiller", "cifar100-frskd", "cifar100-ccd", "imagenet-torchvision"):
        assert name in out
    assert "RepDistiller" in out and "FRSKD" in out and "mdistiller" in out


def test_a_recipe_fixes_every_setting_that_changes_the_result():
    cfg = RunConfig(dataset="cifar100", recipe="cifar100-repdistiller", model="cifar_resnet8x4").resolved()
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay, cfg.batch_size, cfg.epochs) == \
        ("sgd", 0.05, 0.9, False, 5e-4, 64, 240)
    assert (cfg.schedule, cfg.milestones, cfg.gamma, cfg.warmup_epochs) == ("step", [150, 180, 210], 0.1, 0.0)
    assert (cfg.weight_decay_on, cfg.zero_init_last, cfg.amp) == ("all", False, False)
    frskd = RunConfig(dataset="cifar100", recipe="cifar100-frskd").resolved()
    assert (frskd.lr, frskd.batch_size, frskd.epochs, frskd.milestones, frskd.weight_decay) == (0.1, 128, 200, [100, 150], 1e-4)
    ccd = RunConfig(dataset="cifar100", recipe="cifar100-ccd").resolved()
    assert (ccd.nesterov, ccd.lr, ccd.weight_decay, ccd.amp) == (True, 0.1, 1e-4, True)
    imagenet = RunConfig(dataset="imagefolder", recipe="imagenet-torchvision").resolved()
    assert (imagenet.lr, imagenet.batch_size, imagenet.epochs, imagenet.milestones, imagenet.input_size) == \
        (0.2, 512, 100, [30, 60, 90], 224)


@pytest.mark.parametrize("student,lr", [("cifar_mobilenetv2", 0.01), ("cifar_shufflenet_v1", 0.01),
                                        ("mobilenetv3_small_100", 0.01), ("cifar_resnet8x4", 0.05)])
def test_repdistiller_trains_mobilenet_and_shufflenet_students_at_lr_0_01(student, lr):
    assert RunConfig(dataset="cifar100", recipe="cifar100-repdistiller", model=student).resolved().lr == lr


def test_a_flag_beside_a_recipe_wins_and_is_recorded_as_an_override():
    given = RunConfig(dataset="cifar100", recipe="cifar100-repdistiller", lr=0.1, epochs=240, weight_decay_on="weights")
    assert given.resolved().lr == 0.1 and given.resolved().weight_decay_on == "weights"
    record = given.recipe_record()
    assert record["name"] == "cifar100-repdistiller" and "RepDistiller" in record["source"]
    assert record["overrides"] == {"lr": {"recipe": 0.05, "given": 0.1},
                                   "weight_decay_on": {"recipe": "all", "given": "weights"}}  # epochs 240 = the recipe's
    assert RunConfig().recipe_record() is None


def test_the_recipe_enters_the_run_id_and_the_recipe_hash():
    from kdzoo.config import recipe_hash

    plain = RunConfig(dataset="cifar100", data_root="/d").resolved()
    paper = RunConfig(dataset="cifar100", data_root="/d", recipe="cifar100-repdistiller").resolved()
    assert plain.run_key() != paper.run_key()
    assert recipe_hash(plain.to_dict(), None, {}) != recipe_hash(paper.to_dict(), None, {})


@pytest.mark.parametrize("argv,needles", [
    (["--recipe", "cifar100-repdistiler", "--dataset", "cifar100"], ["unknown recipe 'cifar100-repdistiler'",
                                                                     "cifar100-repdistiller"]),
    (["--recipe", "cifar100-frskd"], ["recipe 'cifar100-frskd' is written for cifar100 or cifar10, not 'shapes'",
                                      "--dataset cifar100"]),
    (["--recipe", "imagenet-torchvision", "--dataset", "cifar10"], ["not 'cifar10'", "--dataset imagefolder"]),
])
def test_a_recipe_that_cannot_apply_is_refused_before_any_work(tmp_path, capsys, argv, needles):
    assert main(["run", "--device", "cpu", "--output", str(tmp_path / "runs"), *argv]) == 2
    line = _error_line(capsys)
    for needle in needles:
        assert needle in line, line
    assert not (tmp_path / "runs").exists()


def _write_cifar100(root: Path, train: int = 240, test: int = 80) -> Path:
    """A small CIFAR-100 in torchvision's on-disk layout (pickled dicts of uint8 rows)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", train), ("test", test)):
        labels = rng.integers(0, 100, n)
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        data[:, : 1024] = (labels[:, None] * 2).astype(np.uint8)  # the red channel carries the label: learnable
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist()}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, f)
    return root


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    import torchvision

    # torchvision refuses files whose MD5 is not the published one; these are written here
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    return _write_cifar100(tmp_path / "data")


def test_a_recipe_runs_end_to_end_on_cifar_files_and_records_every_field(tmp_path, cifar_root, capsys):
    args = ["run", "--dataset", "cifar100", "--data-root", str(cifar_root), "--recipe", "cifar100-repdistiller",
            "--model", "test_resnet", "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--workers", "0",
            "--output", str(tmp_path / "runs"), "--run-name", "paper"]
    assert main(args) == 0
    record = json.loads((tmp_path / "runs" / "paper" / "config.json").read_text())
    run = record["run"]
    for key, value in RECIPES["cifar100-repdistiller"].settings.items():
        if key not in ("epochs", "batch_size"):
            assert run[key] == value, key
    assert (run["epochs"], run["batch_size"], run["recipe"]) == (1, 32, "cifar100-repdistiller")
    assert record["recipe"]["overrides"] == {"epochs": {"recipe": 240, "given": 1}, "batch_size": {"recipe": 64, "given": 32}}
    assert record["data"]["num_classes"] == 100 and record["data"]["train_images"] == 224  # 7 full batches of 32
    assert json.loads((tmp_path / "runs" / "paper" / "result.json").read_text())["complete"]


def _optimizer_of(tmp_path, **settings) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    from rich.console import Console

    cfg = RunConfig(model="test_resnet", input_size=16, train_size=32, test_size=16, batch_size=16, device="cpu",
                    output=str(tmp_path / "runs"), **settings)
    ctx = build(cfg, resume=False, console=Console(quiet=True))
    trainer = Trainer(ctx, Console(quiet=True), StopFlag())
    params = [p for p in [*ctx.student.parameters(), *ctx.method.parameters()] if p.requires_grad]
    return trainer.optimizer, params


def test_the_frskd_recipe_decays_every_parameter_as_the_official_code(tmp_path, cifar_root):
    """MingiJi/FRSKD: one SGD over the classifier and the self-teacher, weight_decay 1e-4 on all."""
    optimizer, params = _optimizer_of(tmp_path, method="frskd", dataset="cifar100", data_root=str(cifar_root),
                                      recipe="cifar100-frskd")
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert set(decay) == {id(p) for p in params}
    assert set(decay.values()) == {1e-4}
    assert any(p.ndim == 1 for p in params)  # norm weights, biases and fusion weights are among them
    # kdzoo's default leaves the one-dimensional ones undecayed
    default, params = _optimizer_of(tmp_path / "default", method="frskd", dataset="cifar100", data_root=str(cifar_root),
                                    epochs=1)
    undecayed = {id(p) for g in default.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert undecayed == {id(p) for p in params if p.ndim == 1}


def test_zero_init_last_is_the_recipes_init(tmp_path, cifar_root):
    from kdzoo.build import create_network
    from kdzoo.data import DataBundle

    data = DataBundle(train=None, test=None, num_classes=100, input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    paper = RunConfig(dataset="cifar100", recipe="cifar100-repdistiller").resolved()
    timm_default = RunConfig(dataset="cifar100").resolved()
    assert create_network(paper, "resnet18", data).layer1[0].bn2.weight.abs().sum() > 0
    assert create_network(timm_default, "resnet18", data).layer1[0].bn2.weight.abs().sum() == 0


@pytest.mark.parametrize("dataset,policy", [("cifar100", "cifar100"), ("cifar10", "cifar10"), ("imagefolder", "imagenet"),
                                            ("shapes", "cifar100")])
@pytest.mark.parametrize("method", ["ccd", "kd_jda"])
def test_ccd_takes_the_jda_policy_of_its_dataset(method, dataset, policy):
    from kdzoo.build import validate

    cfg = RunConfig(method=method, teacher="resnet34", dataset=dataset)
    assert validate(cfg).config.policy == policy
    mine = RunConfig(method=method, teacher="resnet34", dataset="cifar10", method_settings={"policy": "imagenet"})
    assert validate(mine).config.policy == "imagenet"
