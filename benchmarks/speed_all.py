"""`kdzoo speed --json` for every built-in method, as one table (and optionally into RESULTS.md).

Each method runs in its own process (a fresh allocator and thread pool for each). The targets
are those of the project's speed issue: ``hook_overhead`` ≤ 1.03 everywhere; ``overhead`` ≤ 1.10
for logit and embedding methods (kd, dkd, dist, nkd, wttm, ctkd, relational_kd, and mlkd, ccd
and kd_jda, whose plain phases see both views), ≤ 1.15 for feature methods (nfd, lakd) and sdd
(its region logits run the heads again). crd and reviewkd are reported without a target: they do
real work beyond the networks' passes (an NCE over 16,384 memory-bank negatives per sample; fusion
modules over every stage), which their papers' own timings show too (SDD paper, Table 9: KD 11 ms,
ReviewKD 26 ms, CRD 41 ms per step). FRSKD has no teacher: its line is the cost of its
self-teacher over the plain step, reported without a target; baseline's line shows the noise
floor (its method step *is* the plain step, so its ratios should be 1.00). Peak memory: the
method step's peak over the plain step's plus the teacher forward's, target ≤ 1.10 (FRSKD's is its
self-teacher's memory over the plain step, without a target).

    python benchmarks/speed_all.py [--model resnet18 --teacher resnet34] [--batch-size 32]
        [--steps 10 --rounds 5 --warmup 2] [--device auto] [--compile] [--write benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from results_md import add_workload_arguments, header, write_section

TARGETS = {"kd": 1.10, "dkd": 1.10, "dist": 1.10, "nkd": 1.10, "wttm": 1.10, "ctkd": 1.10, "mlkd": 1.10, "sdd": 1.15,
           "relational_kd": 1.10, "ccd": 1.10, "kd_jda": 1.10, "nfd": 1.15, "lakd": 1.15, "ofa": 1.15,
           "fitnet": 1.15, "at": 1.15, "sp": 1.15, "pkt": 1.10, "vid": 1.15}
HOOK_TARGET = 1.03
MEMORY_TARGET = 1.10
METHODS = ["baseline", "kd", "dkd", "dist", "nkd", "wttm", "ctkd", "mlkd", "sdd", "relational_kd", "ccd", "kd_jda", "nfd",
           "lakd", "ofa", "fitnet", "at", "sp", "pkt", "vid", "crd", "reviewkd", "frskd"]


def run_one(method: str, args) -> dict:
    command = ["kdzoo", "speed", "--method", method, "--model", args.model, "--teacher", args.teacher,
               "--input-size", str(args.input_size), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
               "--rounds", str(args.rounds), "--warmup", str(args.warmup), "--device", args.device, "--json"]
    if args.compile:
        command.append("--compile")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout)


def verdict(value: float | None, target: float | None) -> str:
    if value is None:
        return "not measured"
    if target is None:
        return f"{value:.3f}"
    return f"{value:.3f} {'✓' if value <= target else '✗ (target ≤ %.2f)' % target}"


def mem_mb(phase: dict) -> str:
    return "not measured" if phase["peak_mem_mb"] is None else f"{phase['peak_mem_mb']:.0f}"


def table(results: list[dict]) -> str:
    lines = ["| method | images / pass | (a) student step ms | (b) teacher fwd ms | (c) method step ms "
             "| (d) hooked step ms | (c) img/s | overhead (c)/((a)+(b)) | hook_overhead (d)/(a) "
             "| (c) peak MB | peak memory (c)/((a)+(b)) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        p = r["phases"]
        b = f"{p['teacher_forward']['ms_per_step']:.1f}" if "teacher_forward" in p else "–"
        name = r["method"] if r["teacher"] or r["method"] == "baseline" else f"{r['method']} (self-teacher cost: (c)/(a))"
        if r["method"] == "baseline":
            name = "baseline (noise floor: (c) is (a))"
        lines.append(
            f"| {name} | {r['images_per_pass']} | {p['student_step']['ms_per_step']:.1f} | {b} "
            f"| {p['method_step']['ms_per_step']:.1f} | {p['hooked_step']['ms_per_step']:.1f} "
            f"| {p['method_step']['img_per_s']:.1f} | {verdict(r['overhead'], TARGETS.get(r['method']))} "
            f"| {verdict(r['hook_overhead'], HOOK_TARGET)} "
            f"| {mem_mb(p['method_step'])} | {verdict(r['memory_ratio'], MEMORY_TARGET if r['teacher'] else None)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    add_workload_arguments(parser, batch_size=32, steps=10, rounds=5, warmup=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", default=None, metavar="FILE", help="also save every raw measurement")
    args = parser.parse_args()
    results = []
    for method in args.methods.split(","):
        print(f"measuring {method} ...", file=sys.stderr, flush=True)
        results.append(run_one(method, args))
    first = results[0]
    text = (f"{header(first['device'])}\n{args.model} ← {args.teacher} on shapes at {first['input_size']} px, batch "
            f"{args.batch_size}; {args.steps} timed steps per phase in {args.rounds} interleaved rounds after "
            f"{args.warmup} warm-up steps; medians. amp={first['amp']}, channels_last={first['channels_last']}, "
            f"compile={first['compile']}. overhead and hook_overhead are ratios of time per step; peak memory is "
            f"of bytes ({'the CUDA allocator' if first['device'].startswith('cuda') else 'one profiled step per phase'}"
            f", docs/speed.md).\n\n{table(results)}\n")
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.write:
        write_section(args.write, "speed" + ("-compile" if args.compile else ""), text)


if __name__ == "__main__":
    main()
