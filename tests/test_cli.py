"""Bad input: exit code 2 and one line that names the problem and the fix."""

import pytest

from kdzoo.cli import main

from .conftest import tiny_args


def _error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("extra,needles", [
    (["--method", "kdd"], ["unknown method 'kdd'", "Did you mean: kd"]),
    (["--method", "kd", "--teacher", "resnet34", "--model", "resnet81"], ["unknown model 'resnet81'", "resnet18"]),
    (["--dataset", "cifar101"], ["unknown dataset 'cifar101'", "cifar100"]),
    (["--method", "kd", "--teacher", "test_resnet", "--set", "temprature=2"], ["no setting 'temprature'", "temperature"]),
    (["--method", "kd", "--teacher", "test_resnet", "--set", "temperature=hot"], ["temperature expects a float", "'hot'"]),
    (["--dataset", "cifar100"], ["needs --data-root", "--download"]),
    (["--method", "kd"], ["needs a teacher", "--teacher"]),
    (["--epochs", "0"], ["--epochs must be at least 1"]),
    (["--bogus-flag"], ["unrecognized arguments", "--help"]),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, extra, needles):
    assert main(tiny_args(tmp_path, *extra)) == 2
    line = _error_line(capsys)
    for needle in needles:
        assert needle in line, line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), "nothing is written on bad input"


def test_missing_and_malformed_data_roots(tmp_path, capsys):
    assert main(tiny_args(tmp_path, "--dataset", "cifar10", "--data-root", str(tmp_path / "nope"))) == 2
    assert "cifar-10-batches-py" in _error_line(capsys)
    (tmp_path / "tree" / "train").mkdir(parents=True)
    assert main(tiny_args(tmp_path, "--dataset", "imagefolder", "--data-root", str(tmp_path / "tree"))) == 2
    assert "<class>" in _error_line(capsys)


def test_list_and_hooks_commands(capsys):
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "kd" in out and "needs" in out
    assert main(["list", "datasets"]) == 0
    assert "shapes" in capsys.readouterr().out
    assert main(["hooks", "--model", "resnet18", "--input-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "layer1" in out and "64×32×32" in out
    assert main(["hooks", "--model", "resnet18", "--input-size", "32", "--no-small-input-stem"]) == 0
    out = capsys.readouterr().out
    assert "64×8×8" in out and "64×32×32" not in out


def test_list_methods_is_readable_at_80_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "dkd" in out and "hyperparameters (defaults)" not in out and "kdzoo list methods --verbose" in out
    monkeypatch.setenv("COLUMNS", "100")  # narrower than 160: --verbose still shows every column
    assert main(["list", "methods", "--verbose"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if "┳" in line)
    assert header.count("┳") == 6  # seven columns: taps and hyperparameters included
