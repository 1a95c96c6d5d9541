"""The closing summary of ``kdzoo run``: what the run reached, against what, and what to do next.

A top-1 alone says little about distillation; the question a user asks is "did the method help
this student?". So the summary looks, under the same output folder, for complete ``baseline``
runs of the same student trained with the same recipe (the leaderboard's training hash: the
recipe apart from the method and the teacher) and reports the gain over them — or prints the one
command that makes that baseline.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from .bench.leaderboard import collect, training_hash
from .registry import get_method
from .tasks import get_task

# flags of `kdzoo run` that belong to the method or its teacher, dropped from the baseline command
_METHOD_FLAGS = {"--method", "--teacher", "--set", "--teacher-checkpoint", "--teacher-epochs", "--run-name", "--plugin",
                 "--config"}
_METHOD_SWITCHES = {"--teacher-pretrained", "--no-teacher-pretrained", "--teacher-cache", "--no-teacher-cache", "--resume"}


def find_baselines(run_folder: Path, output: Path) -> list[dict[str, Any]]:
    """result.json of every complete baseline run under ``output`` that this run should be compared
    with: same dataset, task and student, same training recipe (any seed)."""
    record = _read(run_folder / "config.json")
    if record is None:
        return []
    run, versions = record.get("run") or {}, record.get("versions") or {}
    if run.get("method") == "baseline":
        return []
    wanted = training_hash(run, versions)
    entries, _ = collect(output)
    found = []
    for e in entries:
        if e.status != "complete" or e.run.get("method") != "baseline" or e.result is None:
            continue
        same = all(e.run.get(k) == run.get(k) for k in ("dataset", "task", "model"))
        if same and training_hash(e.run, e.versions) == wanted:
            found.append(e.result)
    return found


def baseline_command(argv: list[str]) -> str:
    """This command with the method's and the teacher's flags taken out and ``--method baseline``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in _METHOD_FLAGS:
            skip = "=" not in arg
            continue
        if name in _METHOD_SWITCHES:
            continue
        out.append(arg)
    if out and out[0] == "run":
        out = out[1:]
    return shlex.join(["kdzoo", "run", "--method", "baseline", *out])


def render(result: dict[str, Any], run_folder: Path, output: Path, argv: list[str], console) -> None:
    """Print the summary table, the comparison with the baseline and the next commands."""
    from rich.table import Table

    task = get_task(result.get("task", "cls"))
    score, name = task.score, {"top1": "top-1", "miou": "mIoU"}.get(task.score, task.score)
    table = Table(title=f"{result['run_id']}", show_header=False, title_justify="left")
    table.add_column(style="dim")
    table.add_column()
    teacher = result.get("teacher")
    teacher_score = result.get(f"teacher_{score}")
    table.add_row("method", str(result.get("method")))
    table.add_row("student", str(result.get("model")))
    if teacher:
        table.add_row("teacher", f"{teacher}" + (f" ({name} {teacher_score:.2f} %)" if teacher_score is not None else ""))
    epochs = result.get("epochs")
    last = f"{result[score]:.2f} % after {epochs} epoch{'s' if epochs != 1 else ''}"
    table.add_row(f"test {name}", last + (f", best {result[f'best_{score}']:.2f} % (epoch {result.get('best_epoch')})"
                                          if result.get(f"best_{score}") is not None else ""))
    if result.get("top5") is not None:
        table.add_row("test top-5", f"{result['top5']:.2f} %")
    table.add_row("time", f"{result.get('wall_time_s', 0):.0f} s wall, {result.get('train_img_per_s', 0):.0f} img/s training")
    baselines = find_baselines(run_folder, output)
    note = None
    if baselines:
        mean = sum(b[score] for b in baselines) / len(baselines)
        gain = result[score] - mean
        table.add_row("vs baseline", f"{gain:+.2f} points ({mean:.2f} % baseline, {len(baselines)} run"
                                     f"{'s' if len(baselines) != 1 else ''} of the same student and recipe)")
        if gain < 0:
            note = _trails_note(result.get("method"))
    console.print(table)
    if note:
        console.print(f"[yellow]why it trails:[/] {note}", soft_wrap=True)
    if not baselines and result.get("method") != "baseline":
        console.print(f"[dim]no baseline of this student and recipe under {output}; make one with:[/]")
        console.print(f"  {baseline_command(argv)}", soft_wrap=True, highlight=False)
    console.print("[dim]next:[/]")
    console.print(f"  kdzoo leaderboard --runs {shlex.quote(str(output))}", soft_wrap=True, highlight=False)
    console.print(f"  kdzoo export {shlex.quote(str(run_folder))}", soft_wrap=True, highlight=False)
    console.print(f"  kdzoo plot {shlex.quote(str(run_folder))}", soft_wrap=True, highlight=False)


def _trails_note(method: str | None) -> str:
    """The method's own one-line reason for trailing the baseline at a short budget, if it gives one."""
    try:
        cls = get_method(method) if method else None
    except Exception:  # a plugin that is not loaded here: no note, not a crash
        return ""
    reason = getattr(cls, "short_budget_note", "") if cls is not None else ""
    return reason or ("distillation terms often need the papers' long schedules to pay off; compare at the "
                      "paper's budget (`kdzoo list recipes`) before drawing a conclusion")


def _read(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
