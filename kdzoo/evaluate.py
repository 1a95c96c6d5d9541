"""``kdzoo eval``: what a trained or exported student scores and costs.

One measurement for a run folder and for an export alike: the task's test metrics (top-1 and
top-5, or mIoU) on the dataset's test split, the parameter count, and inference latency at
batch 1 and batch 64 on the chosen device. Both kinds of target end as the same thing — a
network in eval mode plus the normalisation it was trained with — so a run and its export
must score the same; a difference is a broken export.

Evaluation runs in float32 with contiguous tensors, whatever the run trained with, so the
figures compare across runs, exports and machines; latency is the median of several timed
repeats after warm-up, with the device synchronised around each on CUDA (kernels are
asynchronous: without it the clock would time the launch, not the work).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .build import resolve_device
from .data import DataRequest, get_dataset
from .errors import UserError, missing
from .export import build_student, load_export, read_record, read_run
from .inputs import Inputs
from .runs import RunDir
from .tasks import get_task

LATENCY_BATCHES = (1, 64)


@dataclass
class Target:
    """A network to evaluate and what it needs: its data and normalisation."""

    label: str        # the path the user gave
    kind: str         # run | export
    model: nn.Module
    name: str         # the timm (or kdzoo) model name
    task: str
    num_classes: int
    input_size: int
    mean: list[float]
    std: list[float]
    dataset: str
    data_root: str | None
    test_size: int | None
    notes: list[str]


def open_target(path: str | Path, which: str = "last") -> Target:
    """A run folder (or one of its ``last.pt``/``best.pt``), or an export (.json, .safetensors, .pt)."""
    path = Path(path)
    if path.is_file() and path.name in ("last.pt", "best.pt") and RunDir(path.parent, writer=False).is_kdzoo_run():
        path, which = path.parent, path.stem
    if path.is_dir():
        student = read_run(path, which)
        notes = [] if student.complete else [f"run {student.run_id} is incomplete (no result.json): "
                                             f"evaluating its {student.checkpoint.name} as it is now"]
        return Target(str(path), "run", build_student(student), student.model, student.task, student.num_classes,
                      student.input_size, student.mean, student.std, student.dataset, student.data_root,
                      student.test_size, notes)
    if not path.exists():
        raise UserError(f"{missing('run folder or export', path)}; pass a run folder (runs/<run-id>) or the .json / "
                        ".safetensors file of kdzoo export")
    read_record(path)  # a clear error for a file that is no export, before anything is built
    model, record = load_export(path)
    notes = [] if record.get("complete", True) else [f"exported from an incomplete run ({record.get('run_id')})"]
    return Target(str(path), "export", model, record.get("timm_model") or record["model"], record["task"],
                  record["num_classes"], record["input_size"], record["mean"], record["std"], record["dataset"], None,
                  record.get("test_size"), notes)


def evaluate(target: Target, dataset: str | None = None, data_root: str | None = None, test_size: int | None = None,
             device: str = "auto", batch_size: int = 256, warmup: int = 3, repeats: int = 10,
             latency_batches: tuple[int, ...] = LATENCY_BATCHES) -> dict[str, Any]:
    """The target's test metrics, parameter count and latency as one flat-ish record (``--json``)."""
    for flag, value, least in (("--batch-size", batch_size, 1), ("--repeats", repeats, 1), ("--warmup", warmup, 0),
                               ("--test-size", test_size, 1)):
        if value is not None and value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    if not latency_batches or any(b < 1 for b in latency_batches):
        raise UserError(f"--latency-batches must be batch sizes of at least 1, got {list(latency_batches)}; pass e.g. 1,64")
    dev = resolve_device(device)
    name = dataset or target.dataset
    spec = get_dataset(name, target.task)
    if test_size is None and name == target.dataset:  # the run's test size belongs to its own dataset
        test_size = target.test_size
    root = data_root if data_root is not None else (target.data_root if name == target.dataset else None)
    data = spec.build(DataRequest(root=root, input_size=target.input_size, train_size=1, test_size=test_size,
                                  batch_size=batch_size, workers=0))
    if data.num_classes != target.num_classes:
        raise UserError(f"{target.name} has {target.num_classes} classes but dataset {name!r} has {data.num_classes}; "
                        "evaluate it on the dataset it was trained for (--dataset)")
    data.test.to(dev)
    model = target.model.to(dev).eval()
    inputs = Inputs(target.mean, target.std, dev, amp=False, channels_last=False)
    metrics = get_task(target.task).evaluate(model, data, inputs)
    latency = {f"batch{b}": measure_latency(model, b, target.input_size, dev, warmup, repeats) for b in latency_batches}
    params = sum(p.numel() for p in model.parameters())
    if params == 0 and isinstance(model, torch.jit.ScriptModule):
        params = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    return {
        "target": target.label, "kind": target.kind, "model": target.name, "task": target.task,
        "dataset": name, "test_images": _images(data.test),
        "input_size": target.input_size, "num_classes": target.num_classes,
        "metrics": {k: v for k, v in metrics.items() if k != "per_class_iou"},
        "params": params, "params_m": params / 1e6,
        "latency": latency, "device": str(dev), "device_name": _device_name(dev), "threads": torch.get_num_threads(),
        "precision": "fp32", "warmup": warmup, "repeats": repeats, "torch": torch.__version__, "notes": target.notes,
    }


def measure_latency(model: nn.Module, batch: int, size: int, device: torch.device, warmup: int,
                    repeats: int) -> dict[str, float]:
    """Median (and min) milliseconds of one forward pass of ``batch`` images, and images per second."""
    x = torch.randn(batch, 3, size, size, device=device)
    cuda = device.type == "cuda"
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if cuda:
                torch.cuda.synchronize(device)
            tick = time.perf_counter()
            model(x)
            if cuda:
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - tick)
    median = statistics.median(times)
    return {"ms": 1000 * median, "ms_min": 1000 * min(times), "img_per_s": batch / median}


def _images(loader) -> int:
    """Test images in ``loader`` (a segmentation loader wraps the one that counts them)."""
    return getattr(loader, "size", None) or _images(loader.loader)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


def print_report(result: dict[str, Any], console) -> None:
    from rich.table import Table

    table = Table(title=f"kdzoo eval: {result['model']} ({result['kind']}) on {result['dataset']} "
                        f"({result['test_images']} test images, {result['input_size']} px), {result['device']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    labels = {"top1": "top-1 (%)", "top5": "top-5 (%)", "loss": "test loss", "miou": "mIoU (%)",
              "pixel_acc": "pixel accuracy (%)"}
    for key, value in result["metrics"].items():
        table.add_row(labels.get(key, key), "–" if value is None else f"{value:.2f}" if key != "loss" else f"{value:.4f}")
    table.add_row("parameters", f"{result['params_m']:.3f} M")
    for key, lat in result["latency"].items():
        batch = key.removeprefix("batch")
        table.add_row(f"latency, batch {batch} (median)", f"{lat['ms']:.2f} ms  ({lat['img_per_s']:.0f} img/s)")
    console.print(table)
    for note in result["notes"]:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"[dim]{result['precision']}, {result['warmup']} warm-up + {result['repeats']} timed repeats per batch "
                  f"size; {result['threads']} threads, {result['device_name']}, torch {result['torch']}[/]")
