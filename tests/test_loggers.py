"""--log tensorboard / --log wandb: what is logged matches metrics.csv, a resume appends without
repeating a step, the setting is no part of the result, and a missing extra fails before any work."""

from __future__ import annotations

import csv
import dataclasses
import json
import struct
from dataclasses import dataclass

import pytest

from kdzoo import loggers
from kdzoo.cli import main
from kdzoo.config import RunConfig, recipe_hash
from kdzoo.engine import Interrupted, StopFlag, run
from kdzoo.errors import UserError
from kdzoo.losses import cross_entropy
from kdzoo.method import Method
from kdzoo.registry import register_method

from .conftest import tiny_args, tiny_config


def _metrics(folder):
    with open(folder / "metrics.csv") as f:
        return list(csv.DictReader(f))


@register_method("test_log_stop_at_6")
class StopAtSix(Method):
    """Baseline that raises the stop flag during step 6, the way SIGTERM does."""

    flag: StopFlag | None = None

    @dataclass
    class Config:
        pass

    def loss(self, out):
        if out.step == 5 and StopAtSix.flag is not None and not StopAtSix.flag:
            StopAtSix.flag.signal_name = "SIGTERM"
        return {"ce": cross_entropy(out.student.logits, out.targets)}


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_matches_metrics_csv_and_resume_appends_without_repeating_steps(tmp_path, quiet_console):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install -e \".[tensorboard]\")")
    from torch.utils.tensorboard import SummaryWriter

    cfg = tiny_config(tmp_path, method="test_log_stop_at_6", run_name="tb", log=["tensorboard"])
    StopAtSix.flag = StopFlag()
    try:
        with pytest.raises(Interrupted):
            run(cfg, console=quiet_console, stop=StopAtSix.flag)
    finally:
        StopAtSix.flag = None
    folder = tmp_path / "runs" / "tb"
    # what a process killed after its last checkpoint would leave: a value at a step the resume trains again
    stale = SummaryWriter(log_dir=str(folder / "tensorboard"))
    stale.add_scalar("train/loss", 999.0, global_step=10)
    stale.close()

    result = run(dataclasses.replace(cfg, log=["tensorboard", "tensorboard"]), resume=True, console=quiet_console)
    assert result["complete"]
    events, rows = _events(folder), _metrics(folder)
    assert len(rows) == 2
    # every metrics.csv column, at the row's global step, once
    for row in rows:
        for column, value in row.items():
            if column == "step" or value in ("", "nan"):
                continue
            logged = [v for s, v in events[f"epoch/{column}"] if s == int(row["step"])]
            assert logged == [pytest.approx(float(value), rel=1e-4, abs=1e-6)], column
    # per-interval loss terms: step 6 from the stopped process, 10 and 12 from the resumed one (not the stale 999)
    loss = events["train/loss"]
    assert [s for s, _ in loss] == [6, 10, 12]
    assert all(v < 100 for _, v in loss)
    values = dict(loss)
    # each interval's mean: epoch 1 is steps 1-6; epoch 2 is steps 7-10 and 11-12
    assert float(rows[0]["train_loss"]) == pytest.approx(values[6], rel=1e-4)
    assert float(rows[1]["train_loss"]) == pytest.approx((4 * values[10] + 2 * values[12]) / 6, rel=1e-4)
    assert {"train/ce", "train/lr", "train/img_per_s", "epoch/test_top1", "epoch/test_top5"} <= set(events)
    assert [s for s, _ in events["train/lr"]] == [6, 10, 12]


def test_a_logger_is_no_part_of_the_run_id_or_the_recipe_hash():
    plain, logged = RunConfig(), RunConfig(log=["tensorboard", "wandb"])
    assert plain.run_id() == logged.run_id()
    assert recipe_hash(plain.to_dict(), {}, {}) == recipe_hash(logged.to_dict(), {}, {})
    from kdzoo.engine import RESUME_MAY_CHANGE

    assert "log" in RESUME_MAY_CHANGE


def _wandb_history(path):
    """The history rows of an offline W&B run file (a leveldb-style log of Record protos)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks, partial = path.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        space = 32768 - pos % 32768
        if space < 7:  # block trailer
            pos += space
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            chunks.append(partial + chunk)
    rows = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def test_wandb_offline_logs_every_epoch_row(tmp_path, quiet_console, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install -e \".[wandb]\")")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # nothing outside the test's folder
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    result = run(tiny_config(tmp_path, run_name="wb", log=["wandb"]), console=quiet_console)
    folder = tmp_path / "runs" / result["run_id"]
    run_id = (folder / "wandb" / loggers.WANDB_ID_FILE).read_text().strip()
    files = list((folder / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1, list((folder / "wandb").iterdir())
    history = _wandb_history(files[0])
    epochs = [h for h in history if "epoch/test_top1" in h]
    rows = _metrics(folder)
    assert [h["global_step"] for h in epochs] == [int(r["step"]) for r in rows]
    for h, row in zip(epochs, rows):
        assert h["epoch/test_top1"] == pytest.approx(float(row["test_top1"]), rel=1e-4)
        assert h["epoch/train_loss"] == pytest.approx(float(row["train_loss"]), rel=1e-4)
    assert [h["global_step"] for h in history if "train/loss" in h] == [6, 10, 12]


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_missing_extra_is_one_line_exit_2_before_any_work(tmp_path, capsys, monkeypatch, name):
    real = loggers.importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda package, *a: None if package == name else real(package, *a))
    assert main(tiny_args(tmp_path, "--log", name)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pip install -e \".[{name}]\"" in err and f"--log {name}" in err
    assert not (tmp_path / "runs").exists()  # nothing was built, trained or written


def test_unknown_logger_names_are_refused_from_a_config_file_or_a_suite():
    with pytest.raises(UserError, match="--log tensorboard or --log wandb"):
        RunConfig(log=["mlflow"]).validate()
    with pytest.raises(UserError, match="list of logger names"):
        RunConfig(log="tensorboard").validate()


def test_log_is_a_suite_setting(tmp_path):
    from kdzoo.bench.suite import expand

    cells = expand({"defaults": {"log": ["tensorboard"]}, "grid": [{"methods": ["baseline"], "seeds": [0, 1]}]})
    assert [c.log for c in cells] == [["tensorboard"], ["tensorboard"]]
    assert cells[0].run_id() == dataclasses.replace(cells[0], log=[]).run_id()
