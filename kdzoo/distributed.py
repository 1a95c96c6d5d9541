"""Data-parallel training across processes: everything the engine needs from ``torch.distributed``.

kdzoo runs distributed when it is started by ``torchrun`` (or ``kdzoo run --nproc N``, which
starts torchrun for you): the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` variables it sets are what
:func:`init_from_env` reads. Without them every helper here is a no-op, so the single-process
path stays exactly what it was.

The rules the engine follows, and why:

- ``--batch-size`` is the *global* batch: each of N processes takes 1/N of every global batch,
  so a recipe means the same thing on 1 or 8 GPUs (and keeps its recipe hash).
- Only rank 0 writes files; every decision that depends on the file system (which run folder,
  whether to resume, whether a teacher is cached) is taken on rank 0 and broadcast, so ranks
  cannot disagree and deadlock in a collective.
- A ``UserError`` raised on rank 0 inside :func:`on_main` reaches every rank, so bad input
  stops all processes with the same one-line message instead of leaving the others waiting.
- gloo on the CPU, NCCL on CUDA with one GPU per process chosen by ``LOCAL_RANK``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError

T = TypeVar("T")

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in _ENV)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if active() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device_type: str) -> bool:
    """Join the process group torchrun described in the environment; False when not under torchrun.

    ``device_type`` is "cuda" or "cpu": NCCL with this process's GPU (``LOCAL_RANK``), or gloo.
    """
    if not launched_by_torchrun() or active():
        return active()
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        gpu = int(os.environ["LOCAL_RANK"])
        if gpu >= torch.cuda.device_count():
            raise UserError(f"local rank {gpu} has no GPU: only {torch.cuda.device_count()} visible; "
                            "start at most that many processes per node (--nproc / --nproc_per_node)")
        torch.cuda.set_device(gpu)
        dist.init_process_group("nccl", device_id=torch.device("cuda", gpu))
    else:
        dist.init_process_group("gloo")
    return True


def shutdown(together: bool = False) -> None:
    """Leave the process group. When every rank reached the same end (the run completed, or all
    agreed to stop), they first meet at a barrier, so none tears gloo's connections down while a
    peer still uses them: a rank that left early sometimes made a process abort (exit -6) after a
    complete run. After a failure on one rank there is no barrier: its peers may never arrive."""
    if active():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def device_for(device: torch.device) -> torch.device:
    """The device of this process: CUDA runs use the GPU numbered by ``LOCAL_RANK``."""
    if active() and device.type == "cuda":
        return torch.device("cuda", local_rank())
    return device


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (in place; returned for chaining)."""
    if active():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (any picklable value)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank.

    A UserError raised there is re-raised on every rank, so all processes stop together with
    the same message instead of the other ranks waiting forever in the next collective.
    """
    if not active():
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    result, error = broadcast((result, error))
    if error is not None:
        raise UserError(error)
    return result


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    if not active():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    return bool(all_reduce_sum(value).item() > 0)


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


class StudentAndMethod(nn.Module):
    """The student and the method as one module, so one DDP wrapper covers both.

    Its forward is the engine's step function (student forward, teacher forward, method loss),
    which reads the student and method it was given directly: the student's forward hooks
    (FeatureTaps) are registered on that very module and fire as usual. The teacher is not a
    submodule — frozen weights need no gradient sync and no per-step buffer broadcast.
    """

    def __init__(self, student: nn.Module, method: nn.Module, step: Callable):
        super().__init__()
        self.student, self.method = student, method
        self._step = step  # a plain function, not a module: DDP sees only student + method

    def forward(self, *args):
        return self._step(*args)


def data_parallel(student: nn.Module, method: nn.Module, step: Callable, device: torch.device,
                  find_unused_parameters: bool) -> Callable:
    """``step`` wrapped so that backward averages the gradients of student and method over ranks.

    In a single process ``step`` itself is returned: no wrapper, no cost.
    ``find_unused_parameters`` costs a graph traversal per step, so it is on only for methods that
    declare that some of their parameters may get no gradient on some steps.
    """
    if not active():
        return step
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    wrapper = StudentAndMethod(student, method, step)
    # DDP copies rank 0's buffers to every rank before each forward. A method whose buffers every
    # rank updates identically itself (CRD's memory bank, from the rows gathered over ranks) names
    # them in ``buffers_kept_in_sync``: broadcasting N×128 floats each step would cost more than the step.
    kept = [f"method.{name}" for name in getattr(method, "buffers_kept_in_sync", ())]
    if kept:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(wrapper, kept)
    return DistributedDataParallel(wrapper, device_ids=ids, find_unused_parameters=find_unused_parameters)


def sync_buffers(*modules: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    Each rank updates its running statistics from its own part of the batch; before evaluation
    and checkpointing every rank takes rank 0's, so all ranks evaluate the model rank 0 saves.
    """
    if not active():
        return
    for module in modules:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def launch(nproc: int, argv: list[str]) -> int:
    """``kdzoo <argv>`` in ``nproc`` processes on this machine, as ``torchrun --standalone`` would.

    Returns the exit code a single process would have given: 2 when any process stopped on bad
    input, 130/143 when stopped by a signal (after saving), else 1 for a failure.
    """
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"kdzoo-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
        start_method="spawn", shutdown_timeout=60,  # after a signal: time for every rank to save
    )
    if nproc > 1:  # N processes each with a thread per core would oversubscribe the CPU (torchrun does this too)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "kdzoo", *argv)
    except ChildFailedError as e:
        codes = {failure.exitcode for failure in e.failures.values()}
        for code in (2, 143, 130):
            if code in codes:
                return code
        return 1
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0
