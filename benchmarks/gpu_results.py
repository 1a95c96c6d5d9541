"""The "gpu" section of RESULTS.md from the files benchmarks/gpu.sh leaves in its output folder.

    python benchmarks/gpu_results.py OUT_DIR [--write RESULTS.md]

Reads ``speed_eager.json`` and ``speed_compile.json`` (``kdzoo speed --json``),
``torchdistill.json`` (``compare_torchdistill.py --json``) and the ``--nproc 1`` run's
``result.json`` under ``runs/``; the ones that are absent are reported as not run. Every figure
comes from one run of the script, and the section names the device they were measured on.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from results_md import write_section


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def speed_rows(speeds: dict[str, dict]) -> list[str]:
    lines = ["| execution | (a) student step img/s | (b) teacher forward img/s | (c) kd step img/s | "
             "(e) kd step, cache img/s | (c) / (a) | (e) / (a) | (c) / ((a) + (b)) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in speeds.items():
        p = r["phases"]
        t = {k: v["ms_per_step"] for k, v in p.items()}
        cached = p.get("cached_step")
        lines.append(
            f"| {name} | {p['student_step']['img_per_s']:,.0f} | {p['teacher_forward']['img_per_s']:,.0f} | "
            f"{p['method_step']['img_per_s']:,.0f} | {cached['img_per_s'] if cached else float('nan'):,.0f} | "
            f"{t['method_step'] / t['student_step']:.3f} | "
            f"{(r['cache_ratio'] if r.get('cache_ratio') is not None else float('nan')):.3f} | {r['overhead']:.3f} |")
    return lines


def section(out: Path) -> str:
    speeds = {name: r for name, r in (("eager", _load(out / "speed_eager.json")),
                                      ("--compile", _load(out / "speed_compile.json"))) if r}
    if not speeds:
        raise SystemExit(f"no speed_eager.json under {out}: run benchmarks/gpu.sh")
    first = next(iter(speeds.values()))
    device = first["device_name"]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Device: {device} ({first['device']}), torch {first['torch']}. Date: {now}. Command: `bash benchmarks/gpu.sh`.",
        "",
        f"kd, {first['model']} ← {first['teacher']} on shapes at {first['input_size']} px, batch {first['batch_size']}, "
        f"amp={first['amp']}, channels_last={first['channels_last']}; {first['steps']} timed steps per phase in "
        f"{first['rounds']} interleaved rounds after {first['warmup']} warm-up steps; medians. Phase (e) is the kd step "
        "served by a warm teacher cache in device memory (every crop/flip of the batches it cycles through filled ahead); "
        "the target is (e) / (a) ≤ 1.05.",
        "",
        *speed_rows(speeds),
    ]
    if "--compile" not in speeds:
        lines += ["", "`--compile`: not run (the CPU dry run leaves it out)."]
    td = _load(out / "torchdistill.json")
    lines.append("")
    if td:
        r = td[0]
        lines.append(f"The same kd step through torchdistill (eager): kdzoo {r['kdzoo_img_per_s']:,.0f} img/s, torchdistill "
                     f"{r['torchdistill_img_per_s']:,.0f} img/s, kdzoo ÷ torchdistill {r['ratio']:.3f}× "
                     f"(first-batch loss {r['first_loss_kdzoo']:.4f} / {r['first_loss_torchdistill']:.4f}).")
    else:
        lines.append("torchdistill: not run (the bench extra was not installed).")
    results = sorted((out / "runs").glob("shapes_kd_*/result.json"))
    run = _load(results[0]) if results else None
    lines.append("")
    if run:
        cache = run.get("teacher_cache") or {}
        lines.append(
            f"`kdzoo run --nproc 1` (torchrun, one process, {'NCCL' if run['device'].startswith('cuda') else 'gloo'}), "
            f"kd with the cache, {run['steps']} steps: {run['train_img_per_s']:,.0f} img/s steady, wall {run['wall_time_s']:.0f} s, "
            f"test top-1 {run['top1']:.2f} %; cache hit rate {100 * (cache.get('hit_rate') or 0):.1f} % "
            f"({cache.get('entries', 0):,} entries).")
    else:
        lines.append("`kdzoo run --nproc 1`: no complete run found.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the output folder benchmarks/gpu.sh printed")
    parser.add_argument("--write", default=None, metavar="RESULTS.md", help="write the section into this file")
    args = parser.parse_args()
    text = section(Path(args.out))
    print(text)
    if args.write:
        write_section(args.write, "gpu", "## GPU: `benchmarks/gpu.sh`\n\n" + text)


if __name__ == "__main__":
    main()
