"""``kdzoo plot``: the training curves of one or several runs on one figure.

Everything comes from each run's ``metrics.csv`` (one row per epoch) and its ``config.json``
(who the run is), so a run still training, a stopped one and one copied from another machine
plot alike, with no logger needed. One panel per metric — the test score (top-1, or mIoU for
segmentation), the total training loss and each loss term — and one colour per run in every
panel, named in one legend by method, teacher → student and seed.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..checkpoint import atomic_write_bytes
from ..errors import UserError, missing
from ..tasks import TASKS
from .leaderboard import require_matplotlib

DEFAULT_OUT = "curves.png"
MAX_COLUMNS = 3  # panels per row
NOT_CURVES = {"epoch", "step"}  # the x axis, not a metric


@dataclass
class RunCurves:
    """One run's metrics.csv with who it is."""

    folder: Path
    run: dict[str, Any]  # config.json's run settings ({} when it has none)
    rows: pd.DataFrame
    label: str = ""

    @property
    def task(self) -> str:
        task = self.run.get("task")
        return task if task in TASKS else ("seg" if "test_miou" in self.rows else "cls")


# -- finding and reading runs ----------------------------------------------------------------
def find_runs(paths: list[str]) -> list[Path]:
    """Run folders (holding metrics.csv) from the arguments: a run folder stands for itself, any
    other folder for every run folder under it (cached teachers under ``teachers/`` left out)."""
    if not paths:
        raise UserError("kdzoo plot needs at least one run folder, e.g. kdzoo plot runs/<run-id>")
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise UserError(f"{missing('run', path, 'folder')}; pass run folders (the folders under --output holding metrics.csv)")
        if (path / "metrics.csv").is_file():
            found.append(path)
            continue
        if (path / "config.json").is_file():
            raise UserError(f"run {str(path)!r} has no metrics.csv yet (none of its epochs has finished); "
                            "plot it after its first epoch")
        below = _run_folders_under(path)
        if not below:
            raise UserError(f"{str(path)!r} is neither a run folder nor a folder holding run folders "
                            "(no metrics.csv found); pass runs/<run-id> or the --output folder of kdzoo run or bench")
        found += below
    return list(dict.fromkeys(p.resolve() for p in found))


def _run_folders_under(root: Path) -> list[Path]:
    out = []
    for here, dirs, files in os.walk(root):
        if "metrics.csv" in files:
            out.append(Path(here))
            dirs[:] = []  # nothing below a run folder is another run
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "teachers")
    return sorted(out)


def read_run(folder: Path) -> RunCurves:
    try:
        rows = pd.read_csv(folder / "metrics.csv")
    except (OSError, ValueError) as e:  # pandas' parser errors are ValueErrors
        raise UserError(f"{folder / 'metrics.csv'} is not a readable metrics file ({type(e).__name__}); "
                        "leave that run out") from None
    if rows.empty or "epoch" not in rows:
        raise UserError(f"{folder / 'metrics.csv'} has no epoch rows; leave that run out (or plot it after its first epoch)")
    try:
        record = json.loads((folder / "config.json").read_text())
        run = record.get("run") if isinstance(record, dict) and isinstance(record.get("run"), dict) else {}
    except (OSError, ValueError):
        run = {}  # the legend falls back to the folder name
    return RunCurves(folder, run, rows)


def label_runs(runs: list[RunCurves]) -> None:
    """Each run's legend entry: method, teacher → student, seed (the dataset when they differ);
    runs the entry would not tell apart get their folder's run key too."""
    datasets = {r.run.get("dataset") for r in runs}
    for r in runs:
        if not r.run:
            r.label = r.folder.name
            continue
        pair = f"{r.run['teacher']}→{r.run.get('model')}" if r.run.get("teacher") else str(r.run.get("model"))
        r.label = f"{r.run.get('method')}  {pair}  s{r.run.get('seed')}"
        if len(datasets) > 1:
            r.label += f"  [{r.run.get('dataset')}]"
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.label] = counts.get(r.label, 0) + 1
    for r in runs:
        if counts[r.label] > 1:
            r.label += f"  ({r.folder.name.rsplit('_', 1)[-1]})"


# -- which metrics --------------------------------------------------------------------------
def default_metrics(runs: list[RunCurves]) -> list[str]:
    """The test score of each task present, the total loss, then every loss term of any run."""
    scores = list(dict.fromkeys(f"test_{TASKS[r.task].score}" for r in runs))
    train_metrics = {f"train_{TASKS[r.task].train_metric}" for r in runs}
    terms: list[str] = []
    for r in runs:
        terms += [c for c in r.rows.columns if c.startswith("train_") and c != "train_loss"
                  and c not in train_metrics and c not in terms]
    # a term that is the whole loss in every run having it (the baseline's ce) would repeat the total's panel
    terms = [t for t in terms if not all(_same(r.rows[t], r.rows["train_loss"]) for r in runs if t in r.rows and "train_loss" in r.rows)]
    return [*scores, "train_loss", *terms]


def _same(a: pd.Series, b: pd.Series) -> bool:
    a, b = pd.to_numeric(a, errors="coerce"), pd.to_numeric(b, errors="coerce")
    return bool(((a - b).abs() <= 1e-6 * b.abs().clip(lower=1)).all())


def resolve_metrics(requested: list[str], runs: list[RunCurves]) -> list[str]:
    """metrics.csv columns for ``--metric`` names: the column itself, else ``test_<name>``, else
    ``train_<name>`` (so ``top1`` is test top-1 and ``kd`` the kd loss term)."""
    columns = list(dict.fromkeys(c for r in runs for c in r.rows.columns if c not in NOT_CURVES))
    out = []
    for name in requested:
        for candidate in (name, f"test_{name}", f"train_{name}"):
            if candidate in columns:
                out.append(candidate)
                break
        else:
            raise UserError(f"--metric {name!r} is not a column of these runs' metrics.csv; "
                            f"choose from: {', '.join(columns)}")
    return list(dict.fromkeys(out))


def title(column: str) -> str:
    words = {"test_top1": "test top-1 (%)", "test_top5": "test top-5 (%)", "test_miou": "test mIoU (%)",
             "test_pixel_acc": "test pixel accuracy (%)", "train_top1": "train top-1 (%)",
             "train_pixel_acc": "train pixel accuracy (%)", "train_loss": "train loss (total)", "test_loss": "test loss",
             "lr": "learning rate", "img_per_s": "img/s (steady)"}
    if column in words:
        return words[column]
    if column.startswith("train_"):
        return f"loss term {column[len('train_'):]}"
    return column.replace("_", " ")


# -- the figure -----------------------------------------------------------------------------
def check_out(out: str | Path, plt) -> str:
    """The image format from ``--out``'s suffix, refused before any work when matplotlib cannot write it."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; pass a file path such as {out / DEFAULT_OUT}")
    fmt = out.suffix.lstrip(".").lower()
    supported = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if fmt not in supported:
        raise UserError(f"--out {out}: cannot write a {fmt or 'file without a suffix'!r} image; end the name in "
                        ".png (or .pdf, .svg)")
    return fmt


def draw(runs: list[RunCurves], metrics: list[str], out: str | Path, plt, fmt: str = "png") -> None:
    panels = [m for m in metrics if any(m in r.rows and r.rows[m].notna().any() for r in runs)]
    if not panels:
        raise UserError(f"none of {', '.join(metrics)} has a value in these runs; pick others with --metric")
    ncols = min(MAX_COLUMNS, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    legend_rows = math.ceil(len(runs) / 2)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.1 * nrows + 0.1 + 0.25 * legend_rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, metric in enumerate(panels):
        ax = axes[i // ncols][i % ncols]
        for k, r in enumerate(runs):
            if metric not in r.rows:
                continue
            data = r.rows[["epoch", metric]].apply(pd.to_numeric, errors="coerce").dropna()
            ax.plot(data["epoch"], data[metric], marker="o", markersize=3.5, linewidth=1.6,
                    color=colors[k % len(colors)], label=r.label)
        ax.set_title(title(metric), fontsize=10)
        ax.set_xlabel("epoch", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        epochs = pd.concat([r.rows["epoch"] for r in runs])
        if epochs.max() - epochs.min() <= 12:  # few epochs: whole-number ticks
            ax.set_xticks(range(int(epochs.min()), int(epochs.max()) + 1))
    for j in range(len(panels), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    by_run = {}
    for r in runs:  # one entry per run, in the order given, whichever panel drew it first
        for ax in axes.flat:
            for line in ax.get_lines():
                if line.get_label() == r.label and r.label not in by_run:
                    by_run[r.label] = line
    fig.legend(list(by_run.values()), list(by_run), loc="lower center", ncol=min(2, len(by_run)), fontsize=9,
               frameon=False)
    fig.tight_layout(rect=(0, (0.1 + 0.25 * legend_rows) / fig.get_figheight(), 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=120)
    plt.close(fig)
    atomic_write_bytes(out, buffer.getvalue())


def plot_runs(paths: list[str], out: str | Path = DEFAULT_OUT, metrics: list[str] | None = None) -> list[RunCurves]:
    """Read the runs and write the figure; every mistake is a one-line UserError. Returns the runs."""
    plt = require_matplotlib("kdzoo plot")  # before any work
    fmt = check_out(out, plt)
    runs = [read_run(folder) for folder in find_runs(paths)]
    label_runs(runs)
    chosen = resolve_metrics(metrics, runs) if metrics else default_metrics(runs)
    draw(runs, chosen, out, plt, fmt)
    return runs
