"""``--compile``: hooks registered before compiling are traced, so a compiled network captures the
features the eager one does, and a compiled training step computes what the eager step computes.

The suite compiles with the ``aot_eager`` backend: it traces exactly as inductor does (dynamo,
then AOT autograd), which is where hooks are either honoured or lost, without spending a minute
generating C++ on two cores. ``test_inductor_*`` repeats the check with inductor; it is marked
``slow`` and runs with ``pytest -m slow``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kdzoo import step as step_module
from kdzoo.checkpoint import read_checkpoint
from kdzoo.data.loaders import CropFlip
from kdzoo.engine import run
from kdzoo.hooks import FeatureTaps
from kdzoo.inputs import Inputs
from kdzoo.models import create_model, model_info
from kdzoo.optim import build_optimizer, build_scheduler
from kdzoo.registry import get_method
from kdzoo.step import StepParts, TrainStep, compile_networks, prepare_networks
from kdzoo.tasks import get_task

from .conftest import tiny_config


@pytest.fixture(autouse=True)
def fresh_dynamo_one_thread():
    """Each test compiles from scratch; one thread, as tiny tensors stall on shared cores' barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def _features_eager_and_compiled(backend: str):
    torch.manual_seed(0)
    model = create_model("test_resnet", 10, 16)
    x = torch.randn(4, 3, 16, 16)
    with FeatureTaps(model, ["stages", "embedding"]) as taps:
        eager = model(x)
        eager_features = taps.pop()
        eager.square().mean().backward()
        eager_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        compiled_model, _ = compile_networks(model, None, backend=backend)
        compiled = compiled_model(x)
        compiled_features = taps.pop()
        compiled.square().mean().backward()
    assert set(compiled_features) == {"stage1", "stage2", "stage3", "stage4", "embedding"} == set(eager_features)
    for name, value in eager_features.items():
        torch.testing.assert_close(compiled_features[name], value, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def test_compiled_network_captures_the_same_features_and_gradients():
    _features_eager_and_compiled("aot_eager")


@pytest.mark.slow
def test_inductor_compiled_network_captures_the_same_features_and_gradients():
    _features_eager_and_compiled("inductor")


def _nfd_step(student, teacher, compiled: bool, cfg):
    method = get_method("nfd")()
    torch.manual_seed(2)  # the same adapter initialisation for both
    method.setup(model_info(student, "test_resnet", 10, 16, method.taps.student),
                 model_info(teacher, "test_resnet", 10, 16, method.taps.teacher))
    prepare_networks(student, teacher, method, True, torch.device("cpu"))
    optimizer = build_optimizer([*student.parameters(), *method.parameters()], cfg)
    s_taps = FeatureTaps(student, method.taps.student).__enter__()
    t_taps = FeatureTaps(teacher, method.taps.teacher).__enter__()
    step = TrainStep(StepParts(student, teacher, method, s_taps, t_taps, optimizer, build_scheduler(optimizer, 4, cfg),
                               Inputs((0.5,) * 3, (0.25,) * 3, "cpu", amp=False, channels_last=True), CropFlip(2),
                               get_task("cls").train_hits, compile="aot_eager" if compiled else None))
    return step, method


def test_compiled_training_step_matches_the_eager_step(tmp_path):
    cfg = tiny_config(tmp_path).resolved()
    torch.manual_seed(0)
    student, teacher = create_model("test_resnet", 10, 16), create_model("test_resnet", 10, 16)
    twins = copy.deepcopy(student), copy.deepcopy(teacher)
    images, targets = torch.rand(8, 3, 16, 16), torch.arange(8) % 10
    results = []
    for (s, t), compiled in ((twins, False), ((student, teacher), True)):
        step, method = _nfd_step(s, t, compiled, cfg)
        torch.manual_seed(1)  # the same crop and flip for both
        terms, n = step(images, targets, torch.arange(len(targets)))
        results.append((terms, [p.detach().clone() for p in s.parameters()], method.adapters[0].weight.detach().clone()))
    (eager_terms, eager_params, eager_adapter), (terms, params, adapter) = results
    assert set(terms) == {"ce", "nfd", "loss", "_correct", "_counted"} and eager_terms["nfd"] > 0
    for name in terms:
        torch.testing.assert_close(torch.as_tensor(terms[name]).float(), torch.as_tensor(eager_terms[name]).float(),
                                   atol=1e-5, rtol=1e-4)
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(adapter, eager_adapter, atol=1e-5, rtol=1e-4)


def test_run_with_compile_registers_hooks_before_compiling(tmp_path, quiet_console, monkeypatch):
    seen = []

    def recording(student, teacher, backend="inductor"):
        hooks = sum(len(m._forward_hooks) for m in student.modules())
        seen.append(hooks)
        return compile_networks(student, teacher, backend="aot_eager")

    monkeypatch.setattr(step_module, "compile_networks", recording)
    result = run(tiny_config(tmp_path, method="frskd", epochs=1, compile=True), console=quiet_console)
    assert result["complete"] and seen and seen[0] >= 4  # frskd taps every stage: hooked when compiled
    state = read_checkpoint(tmp_path / "runs" / result["run_id"] / "last.pt", "checkpoint")
    assert not any(k.startswith("_orig_mod.") for k in state["student"])  # checkpoints keep plain names
