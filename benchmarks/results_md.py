"""Shared by the speed benchmarks: their common arguments, a description of the machine, and
replacing one section of RESULTS.md.

Each script owns the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``, so rerunning
one benchmark rewrites its own table and leaves every other section of the file as it was.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

import torch


def machine(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = os.environ.get("OMP_NUM_THREADS") or str(torch.get_num_threads())
    return f"{os.cpu_count()}-core CPU ({cpu}), {threads} torch thread(s), torch {torch.__version__}"


def header(device: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ)
    command = " ".join([env, "python", *map(shlex.quote, sys.argv)]).strip()
    return f"Machine: {machine(device)}. Date: {now}.\nCommand: `{command}`\n"


def write_section(path: str | Path, name: str, text: str) -> None:
    path = Path(path)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(new)
    tmp.replace(path)


def add_workload_arguments(parser, batch_size: int, steps: int, rounds: int, warmup: int) -> None:
    """The arguments every speed benchmark takes: which networks, how big a batch, how many timed
    steps in how many interleaved rounds, on which device, and where to write the table."""
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--teacher", default="resnet34")
    parser.add_argument("--input-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--write", default=None, metavar="RESULTS.md", help="also write the table into this file")
