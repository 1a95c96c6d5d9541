"""`kdzoo bench` on a tiny suite: failures recorded, complete cells skipped, interrupted ones resumed."""

import json
import threading

import pytest

from kdzoo.bench.runner import run_suite
from kdzoo.bench.status import read_status, status_path
from kdzoo.bench.suite import cell_id, load_suite
from kdzoo.cli import main
from kdzoo.engine import StopFlag
from kdzoo.locks import try_lock, unlock

DEFAULTS = """
[defaults]
model = "test_resnet"
input_size = 16
train_size = 64
test_size = 32
batch_size = 16
epochs = 1
device = "cpu"
optimizer = "sgd"
lr = 0.1
workers = 0
teacher_epochs = 1
"""
GRIDS = """
[[grid]]
methods = ["baseline", "kd"]
teachers = ["test_resnet"]

[[grid]]
methods = ["baseline"]
models = ["resnet81"]
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def _write(tmp_path, text, name="tiny"):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def _results(out):
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/result.json")}


def test_failed_cell_is_recorded_and_a_rerun_trains_nothing(tmp_path, capsys):
    suite, out = _write(tmp_path, DEFAULTS + GRIDS), tmp_path / "out"
    assert main(["bench", str(suite), "--output", str(out)]) == 3  # some cells failed
    captured = capsys.readouterr()
    results = _results(out)
    assert len(results) == 2 and all(name.startswith("shapes_") for name in results)
    failed = [read_status(p) for p in (out / "bench-status").glob("*resnet81*.json")]
    assert len(failed) == 1 and failed[0]["state"] == "failed" and "unknown model 'resnet81'" in failed[0]["error"]
    assert "unknown model 'resnet81'" in captured.out  # the closing leaderboard shows the failure
    board = (out / "leaderboard-tiny.csv").read_text().splitlines()
    assert len(board) == 4 and sum(",failed" in line for line in board) == 1 and sum(",complete" in line for line in board) == 2
    assert (out / "teachers").is_dir()

    folders = sorted(p.name for p in out.iterdir())
    assert main(["bench", str(suite), "--output", str(out)]) == 3
    err = capsys.readouterr().err
    assert err.count("complete, skipped") == 2 and "epoch 1/1" not in err
    assert _results(out) == results  # complete runs untouched
    assert sorted(p.name for p in out.iterdir()) == folders


def test_dry_run_lists_cells_and_writes_nothing(tmp_path, capsys):
    suite, out = _write(tmp_path, DEFAULTS + GRIDS), tmp_path / "out"
    assert main(["bench", str(suite), "--output", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert text.count("to run") == 2 and "invalid: unknown model 'resnet81'" in text
    assert not out.exists()


class StopAtSecondEpoch(StopFlag):
    """Raised like SIGTERM as soon as a run under ``folder`` has written its first last.pt."""

    def __init__(self, folder):
        super().__init__()
        self.folder = folder

    def __bool__(self):
        if self.signal_name is None and any(self.folder.glob("*/last.pt")):
            self.signal_name = "SIGTERM"
        return self.signal_name is not None


def test_interrupted_cell_is_resumed(tmp_path, quiet_console, capsys):
    suite_path = _write(tmp_path, DEFAULTS.replace("epochs = 1", "epochs = 2") + "[[grid]]\nmethods = [\"baseline\"]\n")
    out = tmp_path / "out"
    suite = load_suite(suite_path, output=str(out))
    assert run_suite(suite, console=quiet_console, stop=StopAtSecondEpoch(out)) == 143
    folder = out / cell_id(suite.cells[0])
    assert (folder / "last.pt").is_file() and not (folder / "result.json").exists()
    assert read_status(status_path(out, folder.name))["state"] == "interrupted"
    capsys.readouterr()
    assert main(["leaderboard", "--runs", str(out)]) == 0
    assert "incomplete" in capsys.readouterr().out

    assert main(["bench", str(suite_path), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "(resuming)" in err and "at epoch 2" in err and "epoch 1/2" not in err  # continued, not restarted
    result = json.loads((folder / "result.json").read_text())
    assert result["epochs"] == 2 and result["steps"] == 8
    assert read_status(status_path(out, folder.name))["state"] == "complete"


def test_a_cell_another_bench_is_running_waits_for_it(tmp_path, quiet_console):
    """Two suites on one output folder: a locked cell is left until its lock frees, then found complete or run."""
    suite = load_suite(_write(tmp_path, DEFAULTS + "[[grid]]\nmethods = [\"baseline\"]\nseeds = [0, 1]\n"),
                       output=str(tmp_path / "out"))
    first = cell_id(suite.cells[0])
    fd = try_lock(status_path(suite.output, first, ".lock"))
    timer = threading.Timer(2.0, unlock, [fd])
    timer.start()
    try:
        assert run_suite(suite, console=quiet_console) == 0
    finally:
        timer.cancel()
    assert len(_results(tmp_path / "out")) == 2


def test_parallel_jobs_share_one_cached_teacher(tmp_path, capsys):
    suite = _write(tmp_path, DEFAULTS + "[[grid]]\nmethods = [\"kd\"]\nteachers = [\"test_resnet\"]\nseeds = [0, 1]\n")
    out = tmp_path / "out"
    assert main(["bench", str(suite), "--output", str(out), "--jobs", "2"]) == 0
    assert len(_results(out)) == 2
    assert len([p for p in (out / "teachers").iterdir() if p.is_dir()]) == 1
    logs = [p.read_text() for p in (out / "bench-status").glob("*.log")]
    assert len(logs) == 2 and sum("No teacher checkpoint given" in log for log in logs) == 1  # trained once
    assert all(read_status(p)["state"] == "complete" for p in (out / "bench-status").glob("*.json"))


def test_a_cells_figures_do_not_depend_on_jobs(tmp_path, capsys):
    """The same 4-cell suite with --jobs 1 (in this process) and --jobs 2 (subprocesses): every
    metric equal, because every cell computes with --threads 2 either way (recorded in the run)."""
    grid = "[[grid]]\nmethods = [\"baseline\", \"kd\"]\nteachers = [\"test_resnet\"]\nseeds = [0, 1]\n"
    suite = _write(tmp_path, DEFAULTS.replace("train_size = 64", "train_size = 96") + grid)
    for jobs in ("1", "2"):
        assert main(["bench", str(suite), "--output", str(tmp_path / f"jobs{jobs}"), "--jobs", jobs, "--threads", "2"]) == 0

    def figures(out):
        rows = {}
        for run in sorted(p for p in out.iterdir() if (p / "result.json").is_file()):
            result = json.loads((run / "result.json").read_text())
            assert json.loads((run / "config.json").read_text())["machine"]["threads"] == 2
            rows[run.name] = ((run / "metrics.csv").read_text().splitlines()[1].split(",")[:-1],  # all but img/s
                              [result[k] for k in ("top1", "top5", "test_loss", "final_train_loss", "teacher_top1")])
        return rows

    one, two = figures(tmp_path / "jobs1"), figures(tmp_path / "jobs2")
    assert len(one) == 4 and one == two


def test_bad_bench_input_exits_2_with_one_line(tmp_path, capsys):
    suite = _write(tmp_path, DEFAULTS + "[[grid]]\nmethods = [\"baseline\"]\n")
    for args, needle in ((["bench", str(tmp_path / "nope.toml")], "does not exist"),
                         (["bench", str(suite), "--jobs", "0"], "--jobs must be at least 1"),
                         (["bench", str(_write(tmp_path, "[[grid]]\nmethodz = []\n", "bad"))], "no key 'methodz'")):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
