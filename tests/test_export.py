"""kdzoo export and kdzoo eval: a trained student leaves kdzoo and loads in plain timm with the
same logits; a run folder and its export score the same; bad input is exit 2, one line, and
leaves the disk as it was.

Two tiny runs are trained once for the module: a ResNet at 16 px (the small-input stem, so the
export is the registered ``*_smallstem`` model) and a EfficientNet (a plain timm name, which must
load in a process that never imports kdzoo).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch

from kdzoo.cli import main
from kdzoo.export import build_student, read_run

TINY = ["--input-size", "16", "--train-size", "32", "--test-size", "32", "--batch-size", "16", "--epochs", "1",
        "--device", "cpu", "--optimizer", "sgd", "--lr", "0.1", "--warmup-epochs", "0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{model: run folder} of one tiny finished run per model."""
    root = tmp_path_factory.mktemp("export") / "runs"
    folders = {}
    for model in ("test_resnet", "test_efficientnet"):
        assert main(["run", "--model", model, "--output", str(root), *TINY]) == 0
        (folder,) = [p for p in root.iterdir() if p.is_dir() and f"_{model}_" in p.name]
        folders[model] = folder
    return folders


def _export(run: Path, out: Path, *extra: str) -> dict:
    assert main(["export", str(run), "--out", str(out), *extra]) == 0
    return json.loads(out.with_suffix(".json").read_text())


def _example(size: int = 16) -> torch.Tensor:
    return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))


def _checkpoint_logits(run: Path, which: str = "last") -> torch.Tensor:
    with torch.no_grad():
        return build_student(read_run(run, which))(_example())


def test_exports_load_through_timm_alone_with_the_checkpoints_logits(runs, tmp_path):
    resnet = _export(runs["test_resnet"], tmp_path / "resnet.safetensors")
    effnet = _export(runs["test_efficientnet"], tmp_path / "effnet.safetensors")
    assert resnet["timm_model"] == "test_resnet_smallstem" and resnet["small_input_stem"] is True
    assert resnet["needs_import"] == "kdzoo"
    assert effnet["timm_model"] == "test_efficientnet" and effnet["small_input_stem"] is False
    assert effnet["needs_import"] is None
    torch.save(_example(), tmp_path / "x.pt")
    # a fresh process: the EfficientNet through timm with kdzoo never imported, then the documented
    # `import kdzoo` that registers the *_smallstem models, then the ResNet
    script = textwrap.dedent(f"""
        import sys, torch, timm
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
        def load(name, path, k):
            m = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=k)).eval()
            with torch.no_grad():
                return m(x)
        out = {{"effnet": load("test_efficientnet", {str(tmp_path / 'effnet.safetensors')!r}, 10)}}
        assert not any(m == "kdzoo" or m.startswith("kdzoo.") for m in sys.modules), "kdzoo was imported"
        assert not timm.is_model("test_resnet_smallstem")
        import kdzoo
        out["resnet"] = load("test_resnet_smallstem", {str(tmp_path / 'resnet.safetensors')!r}, 10)
        torch.save(out, {str(tmp_path / 'out.pt')!r})
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    for key, model in (("resnet", "test_resnet"), ("effnet", "test_efficientnet")):
        expected = _checkpoint_logits(runs[model])
        assert out[key].shape == expected.shape == (4, 10)
        torch.testing.assert_close(out[key], expected, atol=1e-5, rtol=1e-5)


def test_the_overlay_must_carry_num_classes_or_timm_drops_the_trained_classifier(runs, tmp_path):
    """Why docs/export.md puts num_classes in pretrained_cfg_overlay: timm compares it with the
    config's 1000 ImageNet classes and, when they differ, silently leaves the head random."""
    _export(runs["test_efficientnet"], tmp_path / "c.safetensors")
    path = str(tmp_path / "c.safetensors")
    with torch.no_grad():
        torch.manual_seed(0)
        bare = timm.create_model("test_efficientnet", pretrained=True, pretrained_cfg_overlay=dict(file=path),
                                 num_classes=10).eval()(_example())
        right = timm.create_model("test_efficientnet", pretrained=True,
                                  pretrained_cfg_overlay=dict(file=path, num_classes=10)).eval()(_example())
    expected = _checkpoint_logits(runs["test_efficientnet"])
    torch.testing.assert_close(right, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(bare, expected, atol=1e-3)


def test_the_safetensors_header_alone_describes_the_export(runs, tmp_path):
    from safetensors import safe_open

    record = _export(runs["test_resnet"], tmp_path / "r.safetensors", "--which", "best")
    with safe_open(str(tmp_path / "r.safetensors"), "pt") as f:
        header = json.loads(f.metadata()["kdzoo"])
    assert header["timm_model"] == record["timm_model"] and header["checkpoint"] == "best"
    assert header["run_id"] == runs["test_resnet"].name and header["recipe_hash"]
    assert header["mean"] == [0.5, 0.5, 0.5] and header["std"] == [0.25, 0.25, 0.25]


def _eval(target, capsys, *extra) -> dict:
    """``kdzoo eval --json``; latency at batch 1 and 2 only, once each (the CPU is shared in CI)."""
    capsys.readouterr()
    assert main(["eval", str(target), "--json", "--repeats", "1", "--warmup", "0", "--latency-batches", "1,2",
                 *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def run_eval(runs):
    """kdzoo eval of the ResNet run folder (its last.pt), once for the module."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", str(runs["test_resnet"]), "--json", "--repeats", "1", "--warmup", "0",
                     "--latency-batches", "1,2"]) == 0
    return json.loads(out.getvalue())


def test_eval_of_a_run_and_of_its_export_agree(runs, run_eval, tmp_path, capsys):
    run = runs["test_resnet"]
    _export(run, tmp_path / "r.safetensors")
    of_export = _eval(tmp_path / "r.json", capsys)
    of_weights = _eval(tmp_path / "r.safetensors", capsys)  # the JSON found beside it
    assert run_eval["kind"] == "run" and of_export["kind"] == "export"
    assert run_eval["metrics"] == of_export["metrics"] == of_weights["metrics"]
    assert run_eval["params"] == of_export["params"] > 0
    assert run_eval["test_images"] == 32
    # the figure result.json recorded at the end of training (there with channels_last; here contiguous)
    assert abs(run_eval["metrics"]["top1"] - json.loads((run / "result.json").read_text())["top1"]) <= 100 / 32
    for result in (run_eval, of_export):
        assert set(result["latency"]) == {"batch1", "batch2"}
        assert all(lat["ms"] > 0 and lat["img_per_s"] > 0 for lat in result["latency"].values())


def test_eval_times_batch_1_and_64_by_default():
    from kdzoo.cli import build_parser

    assert build_parser().parse_args(["eval", "runs/x"]).latency_batches == [1, 64]


def test_torchscript_export_loads_and_evaluates_without_timm(runs, run_eval, tmp_path, capsys):
    record = _export(runs["test_resnet"], tmp_path / "r.pt", "--format", "torchscript")
    assert record["weights_format"] == "torchscript"
    with torch.no_grad():
        logits = torch.jit.load(str(tmp_path / "r.pt")).eval()(_example())
    torch.testing.assert_close(logits, _checkpoint_logits(runs["test_resnet"]), atol=1e-5, rtol=1e-5)
    assert _eval(tmp_path / "r.json", capsys)["metrics"] == run_eval["metrics"]


def test_onnx_export_passes_the_onnx_checker(runs, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    record = _export(runs["test_efficientnet"], tmp_path / "e.onnx", "--format", "onnx")
    assert record["weights_format"] == "onnx" and record["load"].startswith("import onnxruntime")
    onnx.checker.check_model(str(tmp_path / "e.onnx"))


def test_an_incomplete_run_is_exported_only_when_asked(runs, tmp_path, capsys):
    run = tmp_path / "stopped"
    shutil.copytree(runs["test_resnet"], run)
    (run / "result.json").unlink()
    before = _snapshot(tmp_path)
    assert main(["export", str(run), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "incomplete" in _one_line(capsys) and _snapshot(tmp_path) == before
    record = _export(run, tmp_path / "x.safetensors", "--allow-incomplete")
    assert record["complete"] is False
    assert "incomplete" in capsys.readouterr().err


def test_overwrite_replaces_an_existing_export(runs, tmp_path):
    _export(runs["test_resnet"], tmp_path / "r.safetensors")
    record = _export(runs["test_efficientnet"], tmp_path / "r.safetensors", "--overwrite")
    assert record["model"] == "test_efficientnet"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.safetensors"]  # no temporary file left


# -- bad input ----------------------------------------------------------------------------

def _snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdzoo: error: "), err
    return lines[0]


def _bad_cases(run: Path, tmp: Path) -> list[tuple[list[str], str]]:
    """(argv, a word the message must contain) for every bad input; the folders they point at are made here."""
    no_checkpoint = tmp / "no_checkpoint"
    no_checkpoint.mkdir()
    shutil.copy(run / "config.json", no_checkpoint / "config.json")
    (tmp / "plain").mkdir()
    (tmp / "notes.txt").write_text("hello")
    (tmp / "other.json").write_text('{"a": 1}')
    (tmp / "broken.json").write_text('{"a": ')
    broken = tmp / "broken"
    shutil.copytree(run, broken)
    (broken / "last.pt").write_bytes(b"not a checkpoint")
    (tmp / "taken.safetensors").write_text("mine")
    (tmp / "taken2.json").write_text("mine")
    return [
        (["export", str(tmp / "missing")], "does not exist"),
        (["export", str(tmp / "notes.txt")], "not a folder"),
        (["export", str(tmp / "plain")], "not a kdzoo run folder"),
        (["export", str(no_checkpoint)], "no last.pt"),
        (["export", str(no_checkpoint), "--which", "best"], "no best.pt"),
        (["export", str(broken)], "corrupted"),
        (["export", str(run), "--out", str(tmp / "taken.safetensors")], "exists already"),
        (["export", str(run), "--out", str(tmp / "taken2.safetensors")], "exists already"),  # its JSON exists
        (["export", str(run), "--out", str(tmp / "model.pt")], "must end in .safetensors"),
        (["export", str(run), "--out", str(tmp / "plain")], "is a folder"),
        (["export", str(run), "--format", "keras"], "invalid choice"),
        (["eval", str(tmp / "missing")], "does not exist"),
        (["eval", str(tmp / "other.json")], "not a kdzoo export"),
        (["eval", str(tmp / "notes.txt")], "not a kdzoo export"),
        (["eval", str(tmp / "broken.json")], "not readable JSON"),
        (["eval", str(tmp / "plain")], "not a kdzoo run folder"),
        (["eval", str(run), "--batch-size", "0"], "--batch-size"),
        (["eval", str(run), "--latency-batches", "1,x"], "batch sizes"),
        (["eval", str(run), "--dataset", "cifar10"], "--data-root"),
        (["eval", str(run), "--dataset", "nope"], "unknown dataset"),
    ]


def test_every_bad_input_is_exit_2_with_one_line_and_changes_nothing(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["test_resnet"], run)
    cases = _bad_cases(run, tmp_path)
    before = _snapshot(tmp_path)
    for argv, word in cases:
        assert main(argv) == 2, argv
        line = _one_line(capsys)
        assert word in line, (argv, line)
        assert _snapshot(tmp_path) == before, argv


def test_onnx_without_its_extra_is_exit_2_naming_the_pip_command(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed: importing it raises ImportError
    before = _snapshot(runs["test_resnet"])
    assert main(["export", str(runs["test_resnet"]), "--format", "onnx"]) == 2
    assert "pip install" in _one_line(capsys)
    assert _snapshot(runs["test_resnet"]) == before


def test_small_stem_models_are_registered_and_the_stem_is_applied_once():
    import kdzoo  # noqa: F401
    from kdzoo.models import create_model

    model = timm.create_model("resnet18_smallstem", num_classes=10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model.feature_info[-1]["reduction"] == 8  # 32 / 4, divided once
    again = create_model("resnet18_smallstem", 10, 16)  # kdzoo's auto stem on top of it: a no-op
    assert again.feature_info[-1]["reduction"] == 8
    with pytest.raises(RuntimeError, match="no published weights"):
        timm.create_model("resnet18_smallstem", pretrained=True)
    assert "resnet18_smallstem" not in timm.list_models(pretrained=True)
