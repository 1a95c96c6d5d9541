"""The leaderboard: every run under a folder, grouped by recipe, mean ± std over seeds.

Runs are found by walking the folder (a run folder is one holding ``config.json`` or
``result.json``; cached teachers under ``teachers/`` are skipped unless asked for). Complete
runs (``result.json``) of the same (dataset, task, teacher, student, method, recipe) form one
row; runs whose recipe differs in anything but the seed are never averaged together. Cells a
bench recorded as failed (``bench-status/``) and runs that never finished have rows of their
own, with status ``failed`` or ``incomplete``. Every column is documented in docs/leaderboard.md.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..checkpoint import atomic_write_bytes, atomic_write_text
from ..config import recipe_hash
from ..errors import UserError
from . import published
from .status import STATUS_DIR, read_statuses

# The metric rows are ranked by and compared with the baseline on, per task: classification
# runs by test top-1, segmentation runs by mIoU. Chosen here, in this one place.
MAIN_METRIC = {"cls": "top1", "seg": "miou"}
SORT_COLUMN = "_score"  # while building: the row's main metric (mean over seeds), whatever its task

KEY = ["dataset", "task", "teacher", "student", "method", "recipe_hash"]
COLUMNS = [
    "dataset", "task", "teacher", "student", "method", "n_seeds", "top1_mean", "top1_std", "top5_mean",
    "miou_mean", "miou_std", "pixel_acc_mean",
    "gain_vs_baseline", "paper_top1", "delta_vs_paper", "best_top1_mean", "best_miou_mean", "teacher_top1", "teacher_miou", "params_m", "extra_params_m",
    "ms_per_step", "train_img_per_s", "peak_mem_mb", "epochs", "recipe_hash", "status", "best_run", "runs", "paper_source",
]
# too long for the terminal table: in the CSV and Markdown exports only
EXPORT_ONLY = ("runs",)
# result.json field -> column, each the mean over the row's seeds
MEANS = {"top1": "top1_mean", "top5": "top5_mean", "best_top1": "best_top1_mean", "teacher_top1": "teacher_top1",
         "miou": "miou_mean", "pixel_acc": "pixel_acc_mean", "best_miou": "best_miou_mean", "teacher_miou": "teacher_miou",
         "params_m": "params_m", "extra_params_m": "extra_params_m", "ms_per_step": "ms_per_step",
         "train_img_per_s": "train_img_per_s", "peak_mem_mb": "peak_mem_mb"}
# the columns only one task fills: the terminal leaves out those that are empty in every row
TASK_COLUMNS = ("top1_mean", "top1_std", "top5_mean", "best_top1_mean", "teacher_top1",
                "miou_mean", "miou_std", "pixel_acc_mean", "best_miou_mean", "teacher_miou",
                "paper_top1", "delta_vs_paper", "paper_source")
# how each column is shown in the terminal and in Markdown (CSV keeps full precision)
FORMATS = {"top1_mean": ".2f", "top1_std": ".2f", "top5_mean": ".2f", "gain_vs_baseline": "+.2f",
           "paper_top1": ".2f", "delta_vs_paper": "+.2f",
           "best_top1_mean": ".2f", "teacher_top1": ".2f", "params_m": ".2f", "extra_params_m": ".3f",
           "miou_mean": ".2f", "miou_std": ".2f", "pixel_acc_mean": ".2f", "best_miou_mean": ".2f", "teacher_miou": ".2f",
           "ms_per_step": ".1f", "train_img_per_s": ".0f", "peak_mem_mb": ".0f"}

# What, beyond the method, may differ between a row and the baseline it is compared with.
_METHOD_ONLY = ("method", "teacher", "teacher_checkpoint", "teacher_pretrained", "teacher_epochs")


def training_hash(run: dict[str, Any], versions: dict[str, Any]) -> str:
    """The recipe apart from the method: what must match for a row to be compared with a baseline."""
    return recipe_hash(run, {}, versions, leave_out=_METHOD_ONLY)


# -- finding runs ----------------------------------------------------------------------------
@dataclass
class Entry:
    """One run folder or one bench record, as the leaderboard sees it."""

    folder: str            # the run folder's path relative to the scanned root (or where it would be)
    status: str            # complete | incomplete | failed
    run: dict[str, Any]
    method_config: dict[str, Any] | None
    versions: dict[str, Any]
    result: dict[str, Any] | None = None
    error: str | None = None
    machine: str | None = None  # machine_label of where it ran (None: not recorded)
    num_classes: int | None = None  # config.json's data record (tells ImageNet from other image folders)


def machine_label(record: dict[str, Any] | None) -> str | None:
    """A run's machine in one short cell: the GPU, or the CPU model with the thread count — what
    decides whether two runs of one recipe and seed give identical digits."""
    if not isinstance(record, dict):
        return None
    if record.get("gpu"):
        return str(record["gpu"])
    cpu = " ".join(str(record.get("cpu") or "unknown CPU").split())
    return f"{cpu}, {record.get('threads')} threads"


def collect(root: str | Path, include_teachers: bool = False) -> tuple[list[Entry], list[str]]:
    """Every run under ``root`` (recursively) and every failed bench cell; plus notes on what was skipped."""
    root = Path(root)
    entries: list[Entry] = []
    notes: list[str] = []
    if _is_run_folder(root):  # pointed at one run folder
        entry = _run_entry(root, None, notes)
        return ([entry] if entry else []), notes
    for here, dirs, files in os.walk(root):
        here_path = Path(here)
        if "config.json" in files or "result.json" in files:
            dirs[:] = []  # a run folder: nothing below it is another run
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (include_teachers or d != "teachers"))
        run_folders = {d: here_path / d for d in dirs if _is_run_folder(here_path / d)}
        statuses = {r.get("folder"): r for r in read_statuses(here_path / STATUS_DIR)} if STATUS_DIR in dirs else {}
        for name, path in run_folders.items():
            entry = _run_entry(path, statuses.get(name), notes)
            if entry is not None:
                entry.folder = str(path.relative_to(root))
                entries.append(entry)
        for name, record in statuses.items():
            if name in run_folders or record.get("state") == "complete":
                continue
            status = "failed" if record.get("state") == "failed" else "incomplete"
            entries.append(Entry(str((here_path / str(name)).relative_to(root)), status, record.get("run") or {},
                                 record.get("method_config"), record.get("versions") or {}, error=record.get("error")))
        if STATUS_DIR in dirs:
            dirs.remove(STATUS_DIR)
    return entries, notes


def _is_run_folder(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "result.json").is_file()


def _read_json(path: Path, notes: list[str]) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        notes.append(f"skipped {path}: not readable JSON ({type(e).__name__})")
        return None
    return value if isinstance(value, dict) else None


def _run_entry(path: Path, record: dict[str, Any] | None, notes: list[str]) -> Entry | None:
    config = _read_json(path / "config.json", notes) or {}
    result = _read_json(path / "result.json", notes)
    run = config.get("run") or {}
    if not run and result:  # a result without its config.json: what result.json says
        run = {k: result.get(k) for k in ("method", "teacher", "dataset", "task", "seed", "epochs")}
        run["model"] = result.get("model")
    if not run:
        notes.append(f"skipped {path}: neither config.json nor result.json is readable")
        return None
    failure = _read_json(path / "failure.json", notes)
    if result is not None:
        status, error = "complete", None
    elif failure is not None:  # the run itself recorded why it stopped (it diverged)
        status, error = "failed", failure.get("error")
    elif record is not None and record.get("state") == "failed":
        status, error = "failed", record.get("error")
    else:
        status, error = "incomplete", None
    return Entry(str(path), status, run, config.get("method_config"), config.get("versions") or {}, result, error,
                 machine_label((result or {}).get("machine") or config.get("machine")),
                 (config.get("data") or {}).get("num_classes"))


# -- the table -------------------------------------------------------------------------------
def build(entries: list[Entry], by_machine: bool = False) -> pd.DataFrame:
    """The leaderboard: exactly ``columns(by_machine)``, sorted by the main metric (best first,
    empty last). ``by_machine`` keeps runs of different machines in different rows."""
    key = [*KEY, "machine"] if by_machine else KEY
    rows = []
    for e in entries:
        run, result = e.run, e.result or {}
        row = {
            "dataset": run.get("dataset") or result.get("dataset"), "task": run.get("task") or result.get("task", "cls"),
            "teacher": run.get("teacher") or "", "student": run.get("model") or result.get("model"),
            "method": run.get("method") or result.get("method"), "seed": run.get("seed", result.get("seed")),
            "status": e.status, "folder": e.folder, "error": e.error, "machine": e.machine or "",
            "recipe_hash": recipe_hash(run, e.method_config, e.versions),
            "_train": training_hash(run, e.versions),
            "epochs": result.get("epochs", run.get("epochs")),
        }
        paper = published.lookup(row["method"], row["dataset"], e.num_classes, row["teacher"], row["student"], e.method_config)
        row["paper_top1"], row["paper_source"] = (paper.top1, paper.source) if paper else (None, None)
        row.update({field: result.get(field) for field in MEANS})
        task = row["task"] if row["task"] in MAIN_METRIC else "cls"
        row["_run_score"] = result.get(MAIN_METRIC[task])
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=columns(by_machine))
    df = pd.DataFrame(rows)
    for field in [*MEANS, "epochs"]:
        df[field] = pd.to_numeric(df[field], errors="coerce")
    # one run per seed: a repeated seed (a run started twice) counts once, the first folder by name
    df = df.sort_values("folder", kind="stable").drop_duplicates([*key, "status", "seed"], keep="first")
    grouped = df.groupby([*key, "status"], sort=False, dropna=False)
    board = grouped.agg(
        n_seeds=("seed", "size"), top1_std=("top1", "std"), miou_std=("miou", "std"), epochs=("epochs", "max"),
        _train=("_train", "first"), paper_top1=("paper_top1", "first"), paper_source=("paper_source", "first"),
        runs=("folder", lambda folders: "; ".join(sorted(folders))), best_run=("folder", "first"),
        **{column: (field, "mean") for field, column in MEANS.items()},
    ).reset_index()
    # the folder of each row's best run by its main metric (the first by name on a tie; none scored: the first)
    scored = df.assign(_run_score=pd.to_numeric(df["_run_score"], errors="coerce")).sort_values(
        ["_run_score", "folder"], ascending=[False, True], na_position="last", kind="stable")
    best = scored.drop_duplicates([*key, "status"], keep="first").set_index([*key, "status"])["folder"]
    board["best_run"] = [best.get(tuple(k), None) for k in board[[*key, "status"]].itertuples(index=False)]
    board[SORT_COLUMN] = _main_metric(board, "mean")
    board["gain_vs_baseline"] = _gain(board)
    board["paper_top1"] = pd.to_numeric(board["paper_top1"], errors="coerce")
    board["delta_vs_paper"] = (board["top1_mean"] - board["paper_top1"]).where(board["status"] == "complete")
    board["epochs"] = board["epochs"].astype("Int64")
    board = board.sort_values([SORT_COLUMN, "dataset", "student", "method", "teacher"],
                              ascending=[False, True, True, True, True], na_position="last", kind="stable")
    return board[columns(by_machine)].reset_index(drop=True)


def columns(by_machine: bool = False) -> list[str]:
    """The table's columns: ``COLUMNS``, with ``machine`` after ``method`` when grouped by it."""
    if not by_machine:
        return COLUMNS
    at = COLUMNS.index("method") + 1
    return [*COLUMNS[:at], "machine", *COLUMNS[at:]]


def _main_metric(board: pd.DataFrame, statistic: str) -> pd.Series:
    """Each row's main-metric column (``mean`` or ``std``), chosen by its task (NaN for an unknown task)."""
    values = [getattr(row, f"{MAIN_METRIC[row.task]}_{statistic}") if row.task in MAIN_METRIC else float("nan")
              for row in board.itertuples(index=False)]
    return pd.Series(values, index=board.index, dtype=float)


def _gain(board: pd.DataFrame) -> pd.Series:
    """Main metric minus that of the one complete ``baseline`` row with the same dataset, task,
    student and training recipe (the recipe apart from the method, its settings and the
    teacher); NaN when there is none, or more than one (ambiguous), or the row is not complete."""
    match = ["dataset", "task", "student", "_train"]
    base = board[(board["method"] == "baseline") & (board["status"] == "complete")]
    unique = base.groupby(match).filter(lambda g: len(g) == 1).set_index(match)[SORT_COLUMN]
    reference = pd.Series([unique.get(tuple(k), float("nan")) for k in board[match].itertuples(index=False)],
                          index=board.index, dtype=float)
    return (board[SORT_COLUMN] - reference).where(board["status"] == "complete")


def failures(entries: list[Entry]) -> list[tuple[str, str]]:
    """(run folder, error) for every failed cell."""
    return [(e.folder, e.error or "(no error recorded)") for e in entries if e.status == "failed"]


# -- output ----------------------------------------------------------------------------------
def _cell(value: Any, column: str) -> str:
    if value is None or (isinstance(value, float) and value != value) or value is pd.NA:
        return ""
    if column in FORMATS:
        return format(float(value), FORMATS[column])
    return str(value)


def to_csv(board: pd.DataFrame) -> str:
    return board.to_csv(index=False, lineterminator="\n")


def to_markdown(board: pd.DataFrame, errors: list[tuple[str, str]] = ()) -> str:
    names = list(board.columns)
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join("---:" if c in FORMATS or c in ("n_seeds", "epochs") else "---"
                                                         for c in names) + "|"]
    for row in board.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v, c).replace("|", "\\|") for v, c in zip(row, names)) + " |")
    if errors:
        lines += ["", "Failed cells:", ""] + [f"- `{folder}`: {error}" for folder, error in errors]
    return "\n".join(lines) + "\n"


def print_table(board: pd.DataFrame, errors: list[tuple[str, str]], console, title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    shown = [c for c in board.columns if c not in EXPORT_ONLY and (c not in TASK_COLUMNS or board[c].notna().any())]
    for column in shown:
        table.add_column(column, justify="right" if column in FORMATS or column in ("n_seeds", "epochs") else "left",
                         overflow="fold")
    style = {"failed": "red", "incomplete": "yellow"}
    for row in board[shown].itertuples(index=False):
        values = [_cell(v, c) or "-" for v, c in zip(row, shown)]
        table.add_row(*values, style=style.get(row.status))
    console.print(table)
    for folder, error in errors:
        console.print(f"[red]failed[/] {folder}: {error}", soft_wrap=True)


def plot(board: pd.DataFrame, path: str | Path) -> None:
    """Mean ± std of the main metric per row (complete rows), as horizontal bars with error bars."""
    plt = require_matplotlib()
    rows = board[board["status"] == "complete"].iloc[::-1]
    if rows.empty:
        raise UserError("no complete runs to plot")
    datasets = rows["dataset"].nunique() > 1
    labels = [f"{r.method}  {r.teacher + '→' if r.teacher else ''}{r.student}" + (f"  [{r.dataset}]" if datasets else "")
              + f"  n={r.n_seeds}" for r in rows.itertuples()]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.35 * len(rows)))
    ax.barh(range(len(rows)), _main_metric(rows, "mean"), xerr=_main_metric(rows, "std").fillna(0), capsize=3, color="tab:blue",
            alpha=0.8)
    ax.set_yticks(range(len(rows)), labels)
    metrics = " / ".join({"top1": "top-1", "miou": "mIoU"}[MAIN_METRIC[t]] for t in sorted(rows["task"].unique())
                         if t in MAIN_METRIC)
    ax.set_xlabel(f"test {metrics} (%) — mean ± std over seeds")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def require_matplotlib(what: str = "--plot"):
    """matplotlib's pyplot (drawing to files, no display needed), or a one-line error naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(f'{what} needs matplotlib, which is not installed; install it with pip install -e ".[plot]"') from None
    return plt


def export(board: pd.DataFrame, errors: list[tuple[str, str]], csv: str | Path | None = None,
           markdown: str | Path | None = None, plot_path: str | Path | None = None) -> None:
    if csv:
        atomic_write_text(csv, to_csv(board))
    if markdown:
        atomic_write_text(markdown, to_markdown(board, errors))
    if plot_path:
        plot(board, plot_path)


def wide_console():
    """A console for the wide table: the terminal's width, or 240 columns when not a terminal."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=240)
