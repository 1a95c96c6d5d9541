"""Count torch.compile graph breaks in every built-in method's compiled training step.

For each method the student and teacher are compiled exactly as ``--compile`` does (after the
taps and the method's own hooks are registered) and the method's real step
(:class:`kdzoo.step.TrainStep`) runs a few times. Dynamo's counters then say how many graph
breaks were met while compiling, and whether anything compiled again after the warm-up steps
(a recurring break or a recompilation would show there). Graph breaks are decided by Dynamo's
tracing, not by the backend, so the default ``eager`` backend gives the same answer as inductor
in seconds; ``--backend inductor`` compiles for real.

    python benchmarks/graph_breaks.py [--methods kd,nfd] [--model resnet18 --teacher resnet34]
    TORCH_LOGS=graph_breaks python benchmarks/graph_breaks.py     # also print each break's reason
"""

from __future__ import annotations

import argparse
import functools

import torch
from results_md import header, write_section
from torch._dynamo.utils import counters

from kdzoo.bench import speed
from kdzoo.config import RunConfig
from kdzoo.registry import method_names
from kdzoo.step import compile_networks


def check(method: str, args) -> dict:
    torch._dynamo.reset()
    counters.clear()
    cfg = RunConfig(method=method, model=args.model, teacher=args.teacher, input_size=args.input_size,
                    batch_size=args.batch_size, train_size=4 * args.batch_size, device=args.device, compile=True)
    bench = speed.SpeedBench(cfg)
    try:
        step = {p.name: p for p in bench.phases}["method_step"]
        step.run(args.warmup)
        breaks = sum(counters["graph_break"].values())
        frames = counters["stats"]["unique_graphs"]
        step.run(args.steps)
        return {
            "method": method,
            "graph_breaks": breaks,
            "reasons": sorted(counters["graph_break"]),
            "graphs": frames,
            "breaks_after_warmup": sum(counters["graph_break"].values()) - breaks,
            "graphs_after_warmup": counters["stats"]["unique_graphs"] - frames,
        }
    finally:
        bench.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--teacher", default="test_resnet")
    parser.add_argument("--input-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=2, help="steps that compile")
    parser.add_argument("--steps", type=int, default=3, help="steps after the warm-up that must not compile again")
    parser.add_argument("--backend", default="eager", help="eager (tracing only, fast) or inductor")
    parser.add_argument("--write", default=None, metavar="RESULTS.md", help="also write the table into this file")
    args = parser.parse_args()
    speed.compile_networks = functools.partial(compile_networks, backend=args.backend)
    methods = args.methods.split(",") if args.methods else method_names()
    lines = ["| method | graph breaks while compiling | graphs compiled | breaks / graphs after warm-up | reasons |",
             "|---|---|---|---|---|"]
    for method in methods:
        r = check(method, args)
        reasons = "; ".join(r["reasons"]) or "-"
        lines.append(f"| {method} | {r['graph_breaks']} | {r['graphs']} | {r['breaks_after_warmup']} / "
                     f"{r['graphs_after_warmup']} | {reasons} |")
    text = (f"{header(args.device)}\n{args.model} ← {args.teacher} at {args.input_size} px, backend {args.backend}, "
            f"{args.warmup} compiling steps then {args.steps} more.\n\n" + "\n".join(lines) + "\n")
    print(text)
    if args.write:
        write_section(args.write, "graph-breaks", text)


if __name__ == "__main__":
    main()
