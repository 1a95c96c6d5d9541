"""Peak CPU memory of one piece of work, for ``kdzoo speed`` on machines without CUDA.

CUDA's caching allocator keeps a high-water mark (``torch.cuda.max_memory_allocated``); the CPU
allocator keeps none. PyTorch's profiler, run with ``profile_memory=True``, records every CPU
allocation and free with its size, so replaying those events in time order gives nearly the
number CUDA reports: the most bytes the work allocated and held at once (see ``cpu_peak_bytes``
for the one difference).
Process RSS is no substitute: glibc keeps freed pages, so RSS says little about one step.

Profiling slows the work down, so the speed command runs this on a separate, untimed step.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Mute file descriptor 2 while the profiler starts and stops: its C++ side writes
    start/stop and no-GPU lines there directly, which would break up the speed table."""
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2 (embedded interpreters): nothing to mute
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _allocations(prof) -> list[tuple[int, int, int]]:
    """(time in ns, address, signed size in bytes) of every CPU allocation and free the profiler saw."""
    events: list[tuple[int, int, int]] = []
    allocation = torch._C._profiler._EventType.Allocation
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        fields = node.extra_fields
        if node.tag == allocation and fields.device.type == "cpu":
            events.append((node.start_time_ns, fields.ptr, fields.alloc_size))
        stack.extend(node.children)
    return sorted(events)


def cpu_peak_bytes(work: Callable[[], object]) -> int | None:
    """Run ``work`` once and return the most CPU bytes it allocated and held at one time.

    Only frees of blocks that ``work`` allocated count against it. The profiler also reports the
    free of a tensor allocated in an earlier profiling session, and never one allocated outside
    any, so counting those would make the figure depend on what was profiled before. On CPU the
    figure is therefore an upper bound of CUDA's ``max_memory_allocated`` delta, which also
    counts freeing what existed before. None when this torch's profiler exposes no allocation
    events (a private interface; checked, not assumed)."""
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    with _quiet_stderr():
        try:
            events = _allocations(prof)
        except AttributeError:
            return None
    live: dict[int, int] = {}  # address -> size of the blocks ``work`` allocated and still holds
    held = peak = 0
    for _, address, size in events:
        if size > 0:
            live[address] = size
            held += size
            peak = max(peak, held)
        elif address in live:
            held -= live.pop(address)
    return peak
