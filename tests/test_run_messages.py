"""What a run tells: a teacher near chance is reported before the student trains and recorded in
result.json; a stop that saved nothing exits 131, not 130."""

from __future__ import annotations

import json

import torch

from kdzoo import engine
from kdzoo.cli import EXIT_STOPPED_UNSAVED, main
from kdzoo.models import create_model
from kdzoo.teacher import near_chance

from .conftest import tiny_args


def test_a_teacher_near_chance_is_reported_and_recorded(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "untrained.pt"
    torch.save(create_model("test_resnet", 10, 16).state_dict(), path)
    args = tiny_args(tmp_path, "--method", "kd", "--teacher", "test_resnet", "--teacher-checkpoint", str(path),
                     "--epochs", "1", "--run-name", "weak")
    assert main(args) == 0
    err = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert "within 5 points of chance (10.00% for 10 classes)" in err and "--teacher-epochs" in err
    assert err.index("chance") < err.index("epoch 1/1")  # before the student trains
    result = json.loads((tmp_path / "runs" / "weak" / "result.json").read_text())
    assert result["teacher_near_chance"] is True


def test_near_chance_is_a_margin_over_guessing():
    assert near_chance("cls", 14.9, 10) and not near_chance("cls", 15.1, 10)
    assert not near_chance("cls", 6.0, 100) and near_chance("cls", 5.9, 100)
    assert not near_chance("seg", 1.0, 21)  # mIoU has no such chance level


def test_a_second_signal_exits_131_and_says_nothing_was_saved(tmp_path, capsys, monkeypatch):
    def stopped_at_once(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.Trainer, "fit", stopped_at_once)
    assert main(tiny_args(tmp_path, "--run-name", "k")) == EXIT_STOPPED_UNSAVED == 131
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "nothing was saved since the last checkpoint" in err
