"""``kdzoo export``: the distilled student leaves kdzoo as a file that plain timm loads.

A run folder holds training state (``last.pt``: student, method extras, optimiser, RNG) in
kdzoo's own layout. An export is what a user deploys or shares: the student's weights alone,
as ``safetensors`` (tensors only, no pickle: loading it can run no code), plus a small JSON
beside it that says how to rebuild the network — the timm name, classes, input size, stem,
normalisation — and where it came from (run id, recipe hash, versions). The same record is
stored in the safetensors header, so the weights file alone still describes itself.

Why the name in the record is not always the run's ``--model``: the small-input stem changes
the architecture, so a small-stem ResNet is recorded as ``<name>_smallstem``, a timm model
that :mod:`kdzoo.stem` registers on ``import kdzoo`` (docs/export.md). A segmentation student
(backbone + FPN decoder) is not a timm model at all; its record names the kdzoo call that
rebuilds it.

Every export is checked before the command returns: the written file is loaded back the way
the docs tell a user to load it, and its logits must equal the run checkpoint's on a random
batch. A mismatch is a bug in kdzoo (exit 1) and the written files are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from . import __version__
from .checkpoint import atomic_write_bytes, atomic_write_json, read_checkpoint, strict_json
from .data import DataRequest, get_dataset
from .errors import UserError, missing
from .models import SMALL_INPUT_MAX, create_model, has_small_stem, load_weights
from .runs import RunDir
from .stem import small_stem_name

RECORD_FORMAT = "kdzoo-export-1"
FORMATS = {"safetensors": ".safetensors", "onnx": ".onnx", "torchscript": ".pt"}
EXTRA_HINT = 'pip install -e ".[export]"'  # the onnx extra (pyproject.toml)
_TOLERANCE = 1e-5


@dataclass
class Student:
    """What rebuilds a run's student, read from its folder (config.json, result.json, a checkpoint)."""

    run: Path
    run_id: str
    checkpoint: Path
    which: str
    model: str
    task: str
    num_classes: int
    input_size: int
    small_input_stem: bool  # as the run asked for it (auto resolved); has_small_stem says if it applied
    mean: list[float]
    std: list[float]
    dataset: str
    data_root: str | None
    test_size: int | None
    recipe_hash: str | None
    complete: bool
    method: str | None = None
    teacher: str | None = None


def read_run(path: str | Path, which: str = "last") -> Student:
    """The student of the run folder ``path``; every way it can be unusable is one UserError.

    A run without ``result.json`` is returned with ``complete=False``: the caller decides
    (export refuses it unless asked, eval warns).
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{missing('run folder', path, 'folder')}; pass a run folder such as runs/<run-id> "
                        "(the --output of kdzoo run)")
    run_dir = RunDir(path, writer=False)
    if not run_dir.is_kdzoo_run():
        raise UserError(f"{str(path)!r} is not a kdzoo run folder (no config.json written by kdzoo); "
                        "pass a folder made by kdzoo run, e.g. runs/<run-id>")
    record = json.loads((path / "config.json").read_text())
    run, data = record["run"], record.get("data") or {}
    checkpoint = run_dir.best if which == "best" else run_dir.last
    if not checkpoint.is_file():
        why = ("no epoch finished yet" if which == "last" else "no epoch finished yet, so no best epoch")
        hint = "--which last" if which == "best" and run_dir.last.is_file() else "train the run to the end of an epoch first"
        raise UserError(f"run {path.name} has no {checkpoint.name} ({why}); {hint}")
    task = run.get("task", "cls")
    input_size = int(data.get("input_size") or run.get("input_size") or get_dataset(run["dataset"], task).input_size)
    stem = run.get("small_input_stem")
    if stem is None:  # auto, as kdzoo.models.create_model resolves it
        stem = task == "cls" and input_size <= SMALL_INPUT_MAX
    mean, std = data.get("mean"), data.get("std")
    if mean is None or std is None:  # a run recorded before config.json kept them: ask the dataset
        mean, std = _dataset_normalisation(run, task, input_size)
    return Student(
        run=path, run_id=path.name, checkpoint=checkpoint, which=which, model=run["model"], task=task,
        num_classes=int(data["num_classes"]), input_size=input_size, small_input_stem=bool(stem),
        mean=[float(v) for v in mean], std=[float(v) for v in std], dataset=run["dataset"],
        data_root=run.get("data_root"), test_size=run.get("test_size"), recipe_hash=record.get("recipe_hash"),
        complete=run_dir.is_complete(), method=run.get("method"), teacher=run.get("teacher"),
    )


def _dataset_normalisation(run: dict, task: str, input_size: int) -> tuple[tuple, tuple]:
    request = DataRequest(root=run.get("data_root"), input_size=input_size, train_size=1, test_size=1, batch_size=1,
                          workers=0)
    try:
        data = get_dataset(run["dataset"], task).build(request)
    except UserError as e:
        raise UserError(f"this run's config.json predates recorded normalisation and its dataset cannot be read to "
                        f"find it ({e})") from None
    return data.mean, data.std


def build_student(student: Student) -> nn.Module:
    """The run's network with the checkpoint's weights, in eval mode (kdzoo's own builder)."""
    model = create_model(student.model, student.num_classes, student.input_size, student.small_input_stem,
                         task=student.task)
    load_weights(model, str(student.checkpoint), f"{student.which} checkpoint")
    return model.eval()


def student_weights(student: Student) -> dict[str, torch.Tensor]:
    """The student's state_dict from its checkpoint, plain names, contiguous and unshared."""
    state = read_checkpoint(student.checkpoint, f"{student.which} checkpoint")
    weights = state.get("student") if isinstance(state, dict) else None
    if not isinstance(weights, dict):
        raise UserError(f"{student.checkpoint} holds no student weights; pass a run folder kdzoo wrote")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v.detach().cpu().contiguous().clone()
            for k, v in weights.items()}


# -- the record ---------------------------------------------------------------------------

def registered_by(name: str) -> str | None:
    """The top-level package that registers timm model ``name`` when it is not timm itself
    (``kdzoo`` for cifar_* and *_smallstem): a loading process must import it first."""
    try:
        module = timm.models.model_entrypoint(name).__module__
    except RuntimeError:
        return None
    top = module.split(".")[0]
    return None if top == "timm" else top


def timm_name(student: Student, model: nn.Module) -> str | None:
    """The timm name that rebuilds this architecture; None for a segmentation model."""
    if student.task != "cls":
        return None
    return small_stem_name(student.model) if has_small_stem(model) else student.model


def make_record(student: Student, model: nn.Module, fmt: str, weights_name: str) -> dict[str, Any]:
    name = timm_name(student, model)
    needs = registered_by(name) if name else "kdzoo"
    overlay = {"num_classes": student.num_classes, "input_size": [3, student.input_size, student.input_size],
               "mean": student.mean, "std": student.std}
    record: dict[str, Any] = {
        "format": RECORD_FORMAT, "weights": weights_name, "weights_format": fmt,
        "timm_model": name, "model": student.model, "task": student.task, "num_classes": student.num_classes,
        "input_size": student.input_size, "small_input_stem": has_small_stem(model),
        "mean": student.mean, "std": student.std, "needs_import": needs,
        "pretrained_cfg_overlay": overlay if name else None,
        "dataset": student.dataset, "test_size": student.test_size,
        "run_id": student.run_id, "recipe_hash": student.recipe_hash, "checkpoint": student.which,
        "complete": student.complete, "method": student.method, "teacher": student.teacher,
        "kdzoo_version": __version__, "timm_version": timm.__version__, "torch_version": torch.__version__,
        "params": sum(p.numel() for p in model.parameters()),
    }
    record["load"] = load_snippet(record)
    return record


def load_snippet(record: dict[str, Any]) -> str:
    """The Python lines that load this export, as docs/export.md explains them."""
    weights = record["weights"]
    if record["weights_format"] == "torchscript":
        return f"import torch; model = torch.jit.load({weights!r}).eval()"
    if record["weights_format"] == "onnx":
        return f"import onnxruntime; session = onnxruntime.InferenceSession({weights!r})"
    if record["timm_model"] is None:
        return ("import kdzoo.models, safetensors.torch; "
                f"model = kdzoo.models.create_model({record['model']!r}, {record['num_classes']}, {record['input_size']}, "
                f"small_input_stem={record['small_input_stem']}, task={record['task']!r}); "
                f"model.load_state_dict(safetensors.torch.load_file({weights!r})); model.eval()")
    first = f"import {record['needs_import']}; " if record["needs_import"] else ""
    overlay = record["pretrained_cfg_overlay"]
    items = ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v!r}" for k, v in overlay.items())
    return (f"{first}import timm; model = timm.create_model({record['timm_model']!r}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={weights!r}, {items})).eval()")


# -- loading an export --------------------------------------------------------------------

def read_record(path: str | Path) -> tuple[dict[str, Any], Path]:
    """(record, weights file) of an export: its JSON, or its weights file with the JSON beside it
    (a safetensors file without one describes itself in its header)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{missing('export', path)}; pass the .json or .safetensors file kdzoo export wrote")
    if path.suffix == ".json":
        json_path = path
    elif path.suffix in FORMATS.values():
        json_path = path.with_suffix(".json")
        if not json_path.is_file():
            if path.suffix == ".safetensors":
                return _header_record(path), path
            raise UserError(f"{str(path)!r} has no {json_path.name} beside it; keep the JSON kdzoo export wrote with it")
    else:
        raise UserError(f"{str(path)!r} is not a kdzoo export (expected the .json or .safetensors file kdzoo export "
                        "wrote) nor a run folder")
    try:
        record = json.loads(json_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{str(json_path)!r} is not readable JSON ({type(e).__name__}); pass the JSON kdzoo export wrote") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise UserError(f"{str(json_path)!r} is not a kdzoo export record (no \"format\": {RECORD_FORMAT!r}); "
                        "pass the JSON kdzoo export wrote")
    weights = json_path.parent / record["weights"]
    if not weights.is_file():
        raise UserError(f"{missing('weights file', weights)}, which {json_path.name} names; keep the two files together")
    return record, weights


def _header_record(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            text = (f.metadata() or {}).get("kdzoo")
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise UserError(f"{str(path)!r} is not a readable safetensors file ({type(e).__name__}); pass an intact export") from None
    if not text:
        raise UserError(f"{str(path)!r} has no kdzoo record in its header and no .json beside it; "
                        "pass a file kdzoo export wrote")
    record = json.loads(text)
    record["weights"] = path.name
    return record


def load_export(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The exported network in eval mode, rebuilt the way docs/export.md tells a user to.

    A classifier goes through ``timm.create_model`` with the weights file as the pretrained
    source (the documented line); a segmentation model through kdzoo's builder; a TorchScript
    file through ``torch.jit.load``.
    """
    record, weights = read_record(path)
    fmt = record.get("weights_format")
    if fmt == "torchscript":
        return torch.jit.load(str(weights), map_location="cpu").eval(), record
    if fmt != "safetensors":
        raise UserError(f"{weights.name} is a {fmt} export; kdzoo reads back safetensors and torchscript exports "
                        "(run ONNX files with onnxruntime)")
    if record["timm_model"] is None:
        from safetensors.torch import load_file

        model = create_model(record["model"], record["num_classes"], record["input_size"], record["small_input_stem"],
                             task=record["task"])
        model.load_state_dict(load_file(str(weights)), strict=True)
        return model.eval(), record
    if not timm.is_model(record["timm_model"]):
        raise UserError(f"timm has no model {record['timm_model']!r} (timm {timm.__version__}; the export was made with "
                        f"timm {record.get('timm_version')}); install that timm version")
    overlay = {**record["pretrained_cfg_overlay"], "file": str(weights)}
    overlay["input_size"] = tuple(overlay["input_size"])  # a fixed-size model (ViT) is built at this size
    model = timm.create_model(record["timm_model"], pretrained=True, pretrained_cfg_overlay=overlay)
    return model.eval(), record


# -- writing ------------------------------------------------------------------------------

def output_paths(student: Student, out: str | None, fmt: str) -> tuple[Path, Path]:
    """(weights file, JSON) for ``--out``; default ``<run>/export/<run-id>-<which><suffix>`` (``-onnx``,
    ``-torchscript`` added to the name for those formats, so that their JSON never takes the safetensors export's name)."""
    suffix = FORMATS[fmt]
    tag = "" if fmt == "safetensors" else f"-{fmt}"
    path = Path(out) if out else student.run / "export" / f"{student.run_id}-{student.which}{tag}{suffix}"
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; pass a file path such as {path / (student.run_id + suffix)}")
    if path.suffix != suffix:
        raise UserError(f"--out {path} must end in {suffix} for --format {fmt} (the JSON record goes beside it, "
                        f"as {path.with_suffix('.json').name})")
    return path, path.with_suffix(".json")


def refuse_existing(paths: tuple[Path, ...], overwrite: bool) -> None:
    if overwrite:
        return
    for path in paths:
        if path.exists():
            raise UserError(f"{path} exists already; pass another --out, or --overwrite to replace it")


def check_export_format(fmt: str) -> None:
    """A missing optional package is a one-line error naming the pip command, before any work."""
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}; pick one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401  (torch.onnx.export's exporter)
        except ImportError:
            raise UserError(f"--format onnx needs the onnx and onnxscript packages: {EXTRA_HINT} "
                            "(or pip install onnx onnxscript)") from None


def export(student: Student, out: str | None = None, fmt: str = "safetensors", overwrite: bool = False) -> dict[str, Any]:
    """Write ``student`` as ``fmt`` plus its JSON record, check it loads back equal, return the record
    (with ``path`` and ``json`` added)."""
    check_export_format(fmt)
    weights_path, json_path = output_paths(student, out, fmt)
    refuse_existing((weights_path, json_path), overwrite)
    model = build_student(student)  # the checkpoint fits the architecture (strict), or a UserError
    record = make_record(student, model, fmt, weights_path.name)
    example = torch.randn(2, 3, student.input_size, student.input_size, generator=torch.Generator().manual_seed(0))
    if fmt == "safetensors":
        data = _safetensors_bytes(student_weights(student), record)
    elif fmt == "torchscript":
        data = _torchscript_bytes(model, example)
    else:
        data = _onnx_bytes(model, example, weights_path.parent)
    record["sha256"] = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(weights_path, data)
    try:
        atomic_write_json(json_path, record)
        _verify(model, json_path, example, fmt)
    except BaseException:
        for path in (weights_path, json_path):
            path.unlink(missing_ok=True)
        raise
    return {**record, "path": str(weights_path), "json": str(json_path)}


def _safetensors_bytes(weights: dict[str, torch.Tensor], record: dict[str, Any]) -> bytes:
    from safetensors.torch import save

    return save(weights, metadata={"kdzoo": strict_json(record, indent=None), "format": "pt"})


def _torchscript_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings: the traced graph is checked below
        traced = torch.jit.trace(model, example)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    return buffer.getvalue()


def _onnx_bytes(model: nn.Module, example: torch.Tensor, folder: Path) -> bytes:
    """ONNX with a dynamic batch axis; written to a temporary file first (the exporter wants a path)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".export.", suffix=".onnx.tmp", dir=folder)
    os.close(fd)
    try:
        # the exporter prints its progress on stdout, which belongs to kdzoo's own report
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), tmp, input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, external_data=False)
        return Path(tmp).read_bytes()
    finally:
        Path(tmp).unlink(missing_ok=True)


def _verify(model: nn.Module, json_path: Path, example: torch.Tensor, fmt: str) -> None:
    """The export, loaded back as a user would, computes the checkpoint's logits (else a bug: RuntimeError)."""
    with torch.no_grad():
        expected = model(example)
        if fmt == "onnx":
            import onnx

            onnx.checker.check_model(str(json_path.with_suffix(".onnx")))
            actual = _onnx_logits(json_path.with_suffix(".onnx"), example)
            if actual is None:
                return  # no onnxruntime here: the graph is checked, not run
        else:
            loaded, _ = load_export(json_path)
            actual = loaded(example)
    if actual.shape != expected.shape or not torch.allclose(actual, expected, atol=_TOLERANCE, rtol=_TOLERANCE):
        worst = (actual - expected).abs().max().item() if actual.shape == expected.shape else float("nan")
        raise RuntimeError(f"the export {json_path.with_suffix(FORMATS[fmt])} does not reproduce the checkpoint's logits "
                           f"(max difference {worst:.3g}); the files were removed. This is a bug in kdzoo export")


def _onnx_logits(path: Path, example: torch.Tensor) -> torch.Tensor | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": example.numpy()})[0])
