"""Run integrity: bad input never loses, corrupts or mislabels a result.

Every case runs the CLI in this process and requires exit code 2, one line on stderr that
names the problem and the fix (no traceback), and — by hashing every file under the output
folder before and after — that no file that existed was changed or removed. Cases that are
refused before any work also require that nothing new was written. docs/reliability.md
lists the same cases, one table row each.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from kdzoo.cli import build_parser, config_from_args, main
from kdzoo.models import create_model

from .conftest import tiny_args

QUICK = ("--epochs", "1", "--train-size", "32", "--test-size", "32")


class _RunsSystem:
    """A pickled object whose loading calls ``os.system`` (what a malicious checkpoint does)."""

    def __reduce__(self):
        return (os.system, ("echo this must never run",))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """<root>/runs: a finished run (done), a resumable one (partial), a folder of the user's own
    files (mine), a plain file where a run folder could be (afile); <root>/files: inputs to misuse."""
    root = tmp_path_factory.mktemp("integrity")
    assert main(tiny_args(root, *QUICK, "--run-name", "done")) == 0
    runs, files = root / "runs", root / "files"
    done, partial, mine = runs / "done", runs / "partial", runs / "mine"
    partial.mkdir()
    for name in ("config.json", "metrics.csv", "last.pt"):
        shutil.copy(done / name, partial / name)
    mine.mkdir()
    (mine / "config.json").write_text('{"lr": 0.1, "notes": "my own experiment settings"}\n')
    (mine / "notes.txt").write_text("results I must not lose\n")
    (runs / "afile").write_text("a file, not a folder\n")
    files.mkdir()
    torch.save({"student": create_model("test_resnet", 10, 16).state_dict(), "hook": _RunsSystem()}, files / "runs_code.pt")
    (files / "plain.pkl").write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    (files / "a_folder.pt").mkdir()
    _config_files(files)
    return root


def _config_files(files: Path) -> None:
    toml = {
        "settings_wrong_type.toml": 'method = "kd"\nteacher = "test_resnet"\n[method_settings]\ntemperature = "hot"\n',
        "settings_unknown_key.toml": 'method = "kd"\nteacher = "test_resnet"\n[method_settings]\ntemprature = 2.0\n',
        "settings_not_a_table.toml": 'method = "kd"\nmethod_settings = 3\n',
        "settings_twice.toml": '[method]\ntemperature = 2.0\n[method_settings]\ntemperature = 3.0\n',
        "settings_inf.toml": 'method = "kd"\nteacher = "test_resnet"\n[method_settings]\ntemperature = inf\n',
        "unknown_key.toml": 'lrr = 0.1\n',
        "unknown_table.toml": '[optimiser]\nlr = 0.1\n',
        "gamma_nan.toml": 'gamma = nan\n',
        "suite_bad_lr.toml": '[[grid]]\nmethods = ["baseline"]\nmodels = ["test_resnet"]\nlr = -1.0\n',
        "suite_zero_steps.toml": '[defaults]\nmax_steps = 0\n[[grid]]\nmethods = ["baseline"]\n',
        "suite_method_settings.toml": '[method_settings]\ntemperature = 2.0\n[[grid]]\nmethods = ["kd"]\n',
        "suite_set_inf.toml": '[set.kd]\ntemperature = inf\n[[grid]]\nmethods = ["kd"]\nteachers = ["test_resnet"]\n',
    }
    for name, text in toml.items():
        (files / name).write_text(text)


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_line(capsys) -> str:
    """The one error line; the run may have printed progress before it, but nothing after."""
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in err and "Traceback" not in captured.out, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    return errors[0]


def _refused(capsys, argv, needles, folder: Path, new_files_allowed: bool = False) -> str:
    """Run ``argv``; require exit 2, one line holding every needle, and ``folder`` unchanged."""
    before = _snapshot(folder)
    assert main(argv) == 2
    line = _error_line(capsys)
    for needle in needles:
        assert needle in line, line
    after = _snapshot(folder)
    if new_files_allowed:  # a run that started and then stopped: its own new files may exist
        assert {k: after.get(k) for k in before} == before
    else:
        assert after == before
    assert not [p for p in folder.rglob(".*.tmp")], "no half-written file is left"
    return line


def _run_args(root: Path, *extra: str) -> list[str]:
    args = tiny_args(root, *QUICK, *extra)
    if extra.count("--output"):  # the case's own --output replaces the default one
        i = args.index("--output")
        del args[i:i + 2]
    return args


F = "{files}"
PLAIN_NAME = ["--run-name must be one plain folder name inside --output", "my-run"]
REFUSED_BEFORE_ANY_WORK = {
    # A: --resume into a folder that is not a kdzoo run
    "resume into the user's own folder": (["--run-name", "mine", "--resume"],
                                          ["mine is not a kdzoo run folder", "notes.txt", "not written by kdzoo", "another --run-name"]),
    "resume into a file": (["--run-name", "afile", "--resume"], ["afile exists and is not a folder", "another --run-name"]),
    # B: --run-name must stay inside --output
    "run name ../../x": (["--run-name", "../../x"], PLAIN_NAME),
    "run name a/b": (["--run-name", "a/b"], PLAIN_NAME),
    "run name absolute": (["--run-name", "/tmp/kdzoo-escape"], PLAIN_NAME),
    "run name ..": (["--run-name", ".."], PLAIN_NAME),
    "run name .": (["--run-name", "."], PLAIN_NAME),
    "run name empty": (["--run-name", ""], PLAIN_NAME),
    # D: numbers no run can use, refused before any teacher is trained
    "--lr nan": (["--lr", "nan"], ["--lr must be a finite number, got nan", "--lr 0.1"]),
    "--lr -0.1": (["--lr", "-0.1"], ["--lr must be positive, got -0.1", "--lr 0.1"]),
    "--lr 0": (["--lr", "0"], ["--lr must be positive, got 0.0"]),
    "--lr inf with a teacher to train": (["--method", "kd", "--teacher", "test_resnet", "--lr", "inf"],
                                         ["--lr must be a finite number, got inf"]),
    "--momentum nan": (["--momentum", "nan"], ["--momentum must be a finite number", "--momentum 0.9"]),
    "--momentum 1.5": (["--momentum", "1.5"], ["--momentum must lie in [0, 1), got 1.5"]),
    "--momentum -0.1": (["--momentum", "-0.1"], ["--momentum must lie in [0, 1)"]),
    "--weight-decay -1": (["--weight-decay", "-1"], ["--weight-decay must not be negative, got -1.0"]),
    "--weight-decay nan": (["--weight-decay", "nan"], ["--weight-decay must be a finite number"]),
    "--max-steps -5": (["--max-steps", "-5"], ["--max-steps must be at least 1", "leave it out for no limit"]),
    "--epochs 0": (["--epochs", "0"], ["--epochs must be at least 1, got 0"]),
    "--batch-size -1": (["--batch-size", "-1"], ["--batch-size must be at least 1, got -1"]),
    "--gamma inf": (["--gamma", "inf"], ["--gamma must be a finite number, got inf"]),
    "--gamma nan": (["--gamma", "nan"], ["--gamma must be a finite number, got nan"]),
    "--warmup-epochs -1": (["--warmup-epochs", "-1"], ["--warmup-epochs must not be negative"]),
    "--teacher-epochs 0": (["--method", "kd", "--teacher", "test_resnet", "--teacher-epochs", "0"],
                           ["--teacher-epochs must be at least 1"]),
    "--workers -1": (["--workers", "-1"], ["--workers must not be negative"]),
    "--seed 2**62": (["--seed", str(2**62)], ["--seed must be a whole number below 2**40 in size"]),
    "--milestones a,b": (["--milestones", "a,b"], ["--milestones", "whole epochs separated by commas"]),
    "--set alpha=inf": (["--method", "frskd", "--set", "alpha=inf"], ["method 'frskd': alpha must be a finite number, got inf"]),
    "--set temperature=nan": (["--method", "kd", "--teacher", "test_resnet", "--set", "temperature=nan"],
                              ["method 'kd': temperature must be a finite number, got nan"]),
    "--set mix_alpha=-inf": (["--method", "frskd", "--set", "mix_alpha=-inf"], ["mix_alpha must be a finite number"]),
    # E: zero is not "the default"
    "--max-steps 0": (["--max-steps", "0"], ["--max-steps must be at least 1 (leave it out for no limit), got 0"]),
    "--train-size 0": (["--train-size", "0"], ["--train-size must be at least 1, got 0"]),
    "--input-size 0": (["--input-size", "0"], ["--input-size must be at least 1, got 0"]),
    "--test-size 0": (["--test-size", "0"], ["--test-size must be at least 1, got 0"]),
    # F: config files keep nothing silently
    "[method_settings] of the wrong type": (["--config", f"{F}/settings_wrong_type.toml"], ["temperature expects a float", "'hot'"]),
    "[method_settings] unknown key": (["--config", f"{F}/settings_unknown_key.toml"], ["no setting 'temprature'", "temperature"]),
    "method_settings not a table": (["--config", f"{F}/settings_not_a_table.toml"], ["method_settings must be a table"]),
    "[method] and [method_settings]": (["--config", f"{F}/settings_twice.toml"], ["both a [method] and a [method_settings]", "keep one"]),
    "[method_settings] inf": (["--config", f"{F}/settings_inf.toml"], ["temperature must be a finite number, got inf"]),
    "config unknown key": (["--config", f"{F}/unknown_key.toml"], ["has no setting 'lrr'", "Valid settings", "lr,"]),
    "config unknown table": (["--config", f"{F}/unknown_table.toml"], ["has no setting 'optimiser'", "optimizer"]),
    "config gamma = nan": (["--config", f"{F}/gamma_nan.toml"], ["--gamma must be a finite number, got nan"]),
    # G: truthful wording about checkpoints
    "checkpoint that would run code": (
        ["--method", "kd", "--teacher", "test_resnet", "--teacher-checkpoint", f"{F}/runs_code.pt"],
        ["is not a plain weights file", "refused by safe loading", "system"]),
    "plain pickle as checkpoint": (
        ["--method", "kd", "--teacher", "test_resnet", "--teacher-checkpoint", f"{F}/plain.pkl"],
        ["is a plain Python pickle, not a file written by torch.save"]),
    "config file that is a folder": (["--config", f"{F}/a_folder.pt"], ["config file", "a_folder.pt' is a folder, not a file"]),
    "plugin that is a folder": (["--plugin", f"{F}/a_folder.pt"], ["plugin file", "is a folder, not a file"]),
    "data root that is a file": (["--dataset", "imagefolder", "--data-root", f"{F}/plain.pkl"],
                                 ["data root", "plain.pkl' is a file, not a folder"]),
    "folder as checkpoint": (
        ["--method", "kd", "--teacher", "test_resnet", "--teacher-checkpoint", f"{F}/a_folder.pt"],
        ["a_folder.pt' is a folder, not a file", "pass the checkpoint file"]),
}


@pytest.mark.parametrize("case", list(REFUSED_BEFORE_ANY_WORK))
def test_refused_before_any_work(root, capsys, case):
    extra, needles = REFUSED_BEFORE_ANY_WORK[case]
    extra = [a.format(files=root / "files") for a in extra]
    line = _refused(capsys, _run_args(root, *extra), needles, root)
    assert "truncated or corrupted" not in line
    assert not (root.parent / "kdzoo-escape").exists() and not Path("/tmp/kdzoo-escape").exists()


@pytest.mark.parametrize("suite,needles", [
    ("suite_bad_lr.toml", ["[[grid]] #1", "--lr must be positive, got -1.0"]),
    ("suite_zero_steps.toml", ["--max-steps must be at least 1"]),
    ("suite_method_settings.toml", ["'method_settings' cannot be set here", "[set.<method>]", "valid keys: name"]),
    ("suite_set_inf.toml", ["temperature must be a finite number, got inf"]),
])
def test_suite_files_refused_before_any_cell_runs(root, capsys, suite, needles):
    _refused(capsys, ["bench", str(root / "files" / suite), "--output", str(root / "runs")], needles, root)


def test_a_config_file_holds_the_method_and_its_settings(tmp_path):
    """``method = "kd"`` and a ``[method_settings]`` table: both reach the run, typed by the method's Config."""
    from kdzoo.engine import validate

    path = tmp_path / "kd.toml"
    path.write_text('method = "kd"\nteacher = "test_resnet"\nlr = 0.05\n[method_settings]\ntemperature = 2\n')
    cfg, _ = config_from_args(build_parser().parse_args(["run", "--config", str(path), "--set", "ce_weight=0.5"]))
    assert (cfg.method, cfg.teacher, cfg.lr) == ("kd", "test_resnet", 0.05)
    method = validate(cfg)
    assert method.config.temperature == 2.0 and isinstance(method.config.temperature, float)
    assert method.config.ce_weight == 0.5


# -- A, B: the user's folders --------------------------------------------------------------
def test_without_resume_a_user_folder_is_left_alone(root, capsys):
    """Not an error: the run goes to mine-2 and the user's folder stays exactly as it was."""
    mine = {k: v for k, v in _snapshot(root).items() if k.startswith("runs/mine/")}
    assert main(_run_args(root, "--max-steps", "1", "--run-name", "mine")) == 0
    assert "runs/mine-2" in capsys.readouterr().out
    assert {k: v for k, v in _snapshot(root).items() if k.startswith("runs/mine/")} == mine
    shutil.rmtree(root / "runs" / "mine-2")


def test_resume_into_an_empty_folder_starts_the_run_there(tmp_path, capsys):
    """An empty folder (or one holding only a killed write's temporary) is a run that had not begun."""
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    (tmp_path / "runs" / "empty" / ".last.pt.abc123.tmp").write_bytes(b"half")
    assert main(_run_args(tmp_path, "--max-steps", "1", "--run-name", "empty", "--resume")) == 0
    assert (tmp_path / "runs" / "empty" / "result.json").is_file()
    assert not (tmp_path / "runs" / "empty" / ".last.pt.abc123.tmp").exists()


# -- C: one process per run folder ----------------------------------------------------------
_HOLD = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("locks", sys.argv[1])
locks = importlib.util.module_from_spec(spec); spec.loader.exec_module(locks)
fd = locks.try_claim(sys.argv[2])
print("held" if fd is not None else "busy", flush=True)
sys.stdin.read()
locks.release(fd, sys.argv[2])
"""


def test_a_run_folder_is_locked_while_a_process_trains_in_it(root, capsys):
    """A second process resuming the same run is refused, naming the first (its pid and host)."""
    import kdzoo.locks

    lock = root / "runs" / ".partial.lock"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, kdzoo.locks.__file__, str(lock)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = _refused(capsys, _run_args(root, "--run-name", "partial", "--resume"),
                        ["run folder", "partial is in use by another kdzoo process", f"pid {holder.pid} on host",
                         "wait for it to finish", "--resume"], root)
        assert "is in use" in line
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not lock.exists(), "the holder's lock file goes with it"


def test_the_lock_is_released_and_removed_after_a_run_and_after_a_failure(tmp_path, capsys):
    args = _run_args(tmp_path, "--max-steps", "1", "--run-name", "r")
    assert main(args) == 0
    (tmp_path / "runs" / "r" / "result.json").unlink()  # resumable again
    last = tmp_path / "runs" / "r" / "last.pt"
    intact = last.read_bytes()
    last.write_bytes(intact[: len(intact) // 3])
    assert main([*args, "--resume"]) == 2  # fails inside the lock (a truncated checkpoint)
    assert "truncated or corrupted" in _error_line(capsys)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r"], "no lock file is left"
    last.write_bytes(intact)
    assert main([*args, "--resume"]) == 0  # and the folder is free again


def test_claims_name_their_holder_and_vanish_on_release(tmp_path):
    from kdzoo.locks import holder, release, try_claim

    path = tmp_path / ".x.lock"
    fd = try_claim(path)
    assert fd is not None and try_claim(path) is None  # a second open file description is refused
    assert holder(path).startswith(f"pid {os.getpid()} on host ")
    release(fd, path)
    assert not path.exists()
    fd = try_claim(path)
    assert fd is not None
    release(fd, path)


# -- D: files the machine refuses to give or take ---------------------------------------------
def _tiny_image_tree(root: Path) -> Path:
    from PIL import Image

    for split, per_class in (("train", 4), ("val", 2)):
        for c, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), colour).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("kind,workers", [("not an image", "0"), ("truncated JPEG", "1")])
def test_an_unreadable_image_names_the_file_and_how_to_remove_it(tmp_path, capsys, kind, workers):
    from PIL import Image

    tree = _tiny_image_tree(tmp_path / "tree")
    bad = tree / "train" / "a" / "0.jpg"
    (tree / "train" / "a" / "0.png").unlink()  # 8 training images: batches of 2 read every one
    if kind == "not an image":
        bad.write_bytes(b"this is a text file, not a JPEG\n" * 4)
    else:
        buffer = io.BytesIO()
        Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, "JPEG", quality=95)
        bad.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    args = ["run", "--model", "test_resnet", "--dataset", "imagefolder", "--data-root", str(tree), "--input-size", "16",
            "--batch-size", "2", "--epochs", "1", "--device", "cpu", "--workers", workers, "--output", str(tmp_path / "runs")]
    _refused(capsys, args, ["cannot read image", str(bad), f"rm '{bad}'", "--resume"], tmp_path, new_files_allowed=True)


def test_leaderboard_export_to_a_folder_is_refused(root, capsys):
    for flag in ("--csv", "--markdown"):
        _refused(capsys, ["leaderboard", "--runs", str(root / "runs"), flag, str(root / "files")],
                 [f"{flag} {root / 'files'} is a folder", "pass a file path"], root)


def test_paths_of_the_wrong_kind_are_named_as_such(root, capsys):
    """A file where a folder belongs, or the reverse, is not "missing"."""
    files = root / "files"
    _refused(capsys, ["leaderboard", "--runs", str(files / "plain.pkl")], ["runs folder", "is a file, not a folder"], root)
    _refused(capsys, ["bench", str(files / "a_folder.pt")], ["suite file", "is a folder, not a file"], root)
    _refused(capsys, ["leaderboard", "--runs", str(root / "runs"), "--csv", str(files / "plain.pkl" / "board.csv")],
             ["plain.pkl/board.csv cannot be created: a part of its path is a file", "another path"], root)


def test_an_unreadable_checkpoint_is_not_called_corrupted(root, capsys, monkeypatch):
    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    monkeypatch.setattr(torch, "load", denied)
    line = _refused(capsys, _run_args(root, "--method", "kd", "--teacher", "test_resnet", "--teacher-checkpoint",
                                      str(root / "runs" / "done" / "last.pt")),
                    ["last.pt' cannot be read (Permission denied)", "read access"], root)
    assert "corrupted" not in line


@pytest.fixture
def refuse_writes(monkeypatch):
    """Make every new file under a folder fail as the OS would (root ignores chmod, so a real
    read-only folder cannot be made in a test run as root); returns the switch."""
    real_mkstemp = tempfile.mkstemp

    def switch(folder: Path, error: int, only_prefix: str = ""):
        def mkstemp(*args, **kwargs):
            where = Path(kwargs.get("dir") or tempfile.gettempdir()).resolve()
            prefix = kwargs.get("prefix", "")
            if where.is_relative_to(folder.resolve()) and prefix.startswith(only_prefix):
                raise OSError(error, os.strerror(error), str(where))
            return real_mkstemp(*args, **kwargs)
        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)

    return switch


def test_a_read_only_output_folder_is_refused(root, capsys, refuse_writes):
    refuse_writes(root / "runs", errno.EROFS)
    _refused(capsys, _run_args(root, "--run-name", "new"), ["output folder", "is not writable", "writable --output"], root)


def test_a_read_only_run_folder_is_refused_on_resume(root, capsys, refuse_writes):
    refuse_writes(root / "runs" / "partial", errno.EACCES)
    _refused(capsys, _run_args(root, "--run-name", "partial", "--resume"),
             ["run folder", "partial is not writable", "make it writable"], root)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_really_read_only_run_folder_is_refused(tmp_path, capsys):
    assert main(_run_args(tmp_path, "--max-steps", "1", "--run-name", "r")) == 0
    folder = tmp_path / "runs" / "r"
    (folder / "result.json").unlink()
    folder.chmod(0o555)
    try:
        _refused(capsys, _run_args(tmp_path, "--run-name", "r", "--resume"), ["is not writable"], tmp_path)
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("error,needles", [
    (errno.EROFS, ["last.pt is on a read-only file system", "writable disk"]),
    (errno.EACCES, ["permission denied for", "last.pt", "give this user access"]),
])
def test_a_folder_that_turns_read_only_during_a_run_is_one_line(tmp_path, capsys, refuse_writes, error, needles):
    refuse_writes(tmp_path / "runs", error, only_prefix=".last.pt.")
    _refused(capsys, _run_args(tmp_path, "--run-name", "r"), needles, tmp_path, new_files_allowed=True)


def _disk_full_at(monkeypatch, name: str, nth: int) -> list[bytes]:
    """The ``nth`` write of a file called ``name`` fails half-way with ENOSPC, as on a full disk;
    returns the data of every write of it that was attempted."""
    import kdzoo.checkpoint

    attempts: list[bytes] = []

    def fail(f, data, path):
        if path.name == name:
            attempts.append(data)
            if len(attempts) == nth:
                f.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(kdzoo.checkpoint, "_maybe_kill_mid_write", fail)
    return attempts


def test_a_full_disk_loses_nothing_and_resume_continues(tmp_path, capsys, monkeypatch):
    """ENOSPC while writing the second epoch's checkpoint: one line saying where, the first
    epoch's checkpoint intact, and the same command with --resume finishes the run."""
    args = _run_args(tmp_path, "--epochs", "2", "--run-name", "r")
    last = tmp_path / "runs" / "r" / "last.pt"
    with monkeypatch.context() as m:
        attempts = _disk_full_at(m, "last.pt", nth=2)
        _refused(capsys, args, [f"no space left on the device while writing {last}", "nothing was lost",
                                "run the same command with --resume"], tmp_path, new_files_allowed=True)
    assert len(attempts) == 2 and last.read_bytes() == attempts[0], "the previous checkpoint is intact"
    assert main([*args, "--resume"]) == 0
    assert json.loads((last.parent / "result.json").read_text())["epochs"] == 2


# -- G: truthful wording ----------------------------------------------------------------------
def test_no_arguments_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage: kdzoo" in err and "run" in err and "Traceback" not in err


def test_list_models_finds_names_containing_the_word(capsys):
    assert main(["list", "models", "resnet10"]) == 0
    assert "resnet10t" in capsys.readouterr().out.split()
    assert main(["list", "models", "resnet1*"]) == 0  # a wildcard pattern is taken as it is
    assert "resnet18" in capsys.readouterr().out.split()
    assert main(["list", "models", "no-such-model-xyz"]) == 2
    assert "no timm model matches 'no-such-model-xyz'" in _error_line(capsys)


BAD_TERMS = {
    "none": ("None", "loss() returned None, not a dict"),
    "string": ("'loss'", "loss() returned str 'loss', not a dict"),
    "list": ("[torch.nn.functional.cross_entropy(out.student.logits, out.targets)]", "returned list"),
    "empty": ("{}", "loss() returned an empty dict"),
    "vector": ("{'ce': torch.nn.functional.cross_entropy(out.student.logits, out.targets, reduction='none')}",
               "loss term 'ce' is a tensor of shape (16,), not a scalar"),
    "number": ("{'ce': 1.5}", "loss term 'ce' is float 1.5, not a float tensor"),
    "integer tensor": ("{'ce': torch.tensor(3)}", "loss term 'ce' is a tensor of dtype int64 and shape (), not a float tensor"),
}


@pytest.fixture(scope="module")
def bad_loss_plugin(tmp_path_factory):
    lines = ["import torch", "from kdzoo import Method, register_method"]
    for kind, (value, _) in BAD_TERMS.items():
        name = "test_returns_" + kind.replace(" ", "_")
        lines += [f"@register_method({name!r})", f"class M_{name}(Method):",
                  "    def loss(self, out):", f"        return {value}", ""]
    path = tmp_path_factory.mktemp("plugins") / "bad_losses.py"
    path.write_text("\n".join(lines))
    return path


@pytest.mark.parametrize("kind", list(BAD_TERMS))
def test_a_method_whose_loss_is_not_scalar_terms_is_named(tmp_path, capsys, bad_loss_plugin, kind):
    name = "test_returns_" + kind.replace(" ", "_")
    args = _run_args(tmp_path, "--plugin", str(bad_loss_plugin), "--method", name)
    line = _refused(capsys, args, [f"method {name!r}", BAD_TERMS[kind][1], "scalar"], tmp_path, new_files_allowed=True)
    assert "e.g. {'kd': loss}" in line or ".mean()" in line


def test_check_terms_accepts_what_the_step_needs():
    from kdzoo.method import check_terms

    check_terms("m", {"ce": torch.tensor(1.0, requires_grad=True), "kd": torch.zeros((), dtype=torch.bfloat16)})


# -- H: strict JSON ---------------------------------------------------------------------------
def _strict(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def test_json_files_are_strict_with_null_for_missing_numbers(tmp_path):
    from kdzoo.checkpoint import atomic_write_json
    from kdzoo.runs import RunDir

    atomic_write_json(tmp_path / "a.json", {"iou": [0.5, float("nan")], "loss": float("inf"), "n": {"x": -float("inf")}})
    assert _strict((tmp_path / "a.json").read_text()) == {"iou": [0.5, None], "loss": None, "n": {"x": None}}
    RunDir(tmp_path / "run").write_result({"best_top1": float("nan"), "top1": 50.0})
    assert _strict((tmp_path / "run" / "result.json").read_text()) == {"best_top1": None, "top1": 50.0}


def test_every_json_file_of_a_run_is_strict(root):
    files = [p for p in root.rglob("*.json")]
    assert any(p.name == "result.json" for p in files) and any(p.name == "config.json" for p in files)
    for path in files:
        if path.parent.name != "mine":  # the user's own file
            _strict(path.read_text())


def test_speed_json_is_strict(capsys):
    assert main(["speed", "--method", "baseline", "--model", "test_resnet", "--input-size", "16", "--batch-size", "8",
                 "--train-size", "32", "--steps", "1", "--rounds", "1", "--warmup", "0", "--device", "cpu", "--json"]) == 0
    _strict(capsys.readouterr().out)

