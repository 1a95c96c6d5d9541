"""`kdzoo speed`: the four phases run the engine's step, hook what they say, and the report's
ratios are the ratios of the phases' times."""

from __future__ import annotations

import json

import pytest
import torch

from kdzoo import step as step_module
from kdzoo.bench.cpu_memory import cpu_peak_bytes
from kdzoo.bench.speed import PHASES, SpeedBench, _tensor_bytes, measure
from kdzoo.cli import main
from kdzoo.config import RunConfig
from kdzoo.hooks import resolve_taps

TINY = dict(model="test_resnet", teacher="test_resnet", input_size=16, batch_size=8, train_size=32, device="cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_report_ratios_are_ratios_of_the_phase_times():
    result = measure(RunConfig(method="kd", **TINY), steps=3, rounds=3, warmup=1)
    phases = result["phases"]
    assert list(phases) == list(PHASES)
    t = {name: p["ms_per_step"] for name, p in phases.items()}
    assert result["overhead"] == pytest.approx(t["method_step"] / (t["student_step"] + t["teacher_forward"]))
    assert result["hook_overhead"] == pytest.approx(t["hooked_step"] / t["student_step"])
    assert result["method_extra_ms"] == pytest.approx(t["method_step"] - t["student_step"] - t["teacher_forward"])
    for p in phases.values():
        assert len(p["rounds_ms"]) == 3
        assert p["ms_per_step"] == pytest.approx(sorted(p["rounds_ms"])[1])  # the median of three rounds
        assert p["img_per_s"] == pytest.approx(8 / (p["ms_per_step"] / 1000))
    mem = {name: p["peak_mem_mb"] for name, p in phases.items()}
    assert result["memory_ratio"] == pytest.approx(mem["method_step"] / (mem["student_step"] + mem["teacher_forward"]))
    assert result["images_per_pass"] == 8


def test_plain_phases_see_as_many_images_as_the_methods_networks():
    # CCD's batch holds both JDA views: the plain step and the teacher forward get 2B images too
    ccd = measure(RunConfig(method="ccd", **TINY), steps=1, rounds=1, warmup=0)
    assert ccd["images_per_pass"] == 16
    assert ccd["source_img_per_s"] == pytest.approx(8 / (ccd["phases"]["method_step"]["ms_per_step"] / 1000))
    # FRSKD has no teacher: no (b), and its overhead is its own cost over the plain step
    frskd = measure(RunConfig(method="frskd", **TINY), steps=1, rounds=1, warmup=0)
    assert "teacher_forward" not in frskd["phases"] and frskd["teacher"] is None
    t = {name: p["ms_per_step"] for name, p in frskd["phases"].items()}
    assert frskd["overhead"] == pytest.approx(t["method_step"] / t["student_step"])


def test_phases_hook_what_they_claim_and_unhook_on_close():
    bench = SpeedBench(RunConfig(method="nfd", **TINY))
    nets = bench.networks
    try:
        assert _hooks(nets["student_step"]) == 0
        assert _hooks(nets["teacher_forward"]) == 0
        tapped = {p.module for p in resolve_taps(nets["hooked_step"], bench.method.taps.student)}
        modules = dict(nets["hooked_step"].named_modules())
        assert tapped and all(len(modules[path]._forward_hooks) == 1 for path in tapped)
        assert _hooks(nets["method_step"]) == _hooks(nets["hooked_step"]) > 0
        # the method phase trains the student and the method's adapters; the teacher stays frozen
        phase = {p.name: p for p in bench.phases}["method_step"]
        before = [p.detach().clone() for p in nets["method_step"].parameters()]
        adapters = [p.detach().clone() for p in bench.method.parameters()]
        teacher = [p.detach().clone() for p in nets["teacher_forward"].parameters()]
        phase.run(1)
        assert any(not torch.equal(a, b) for a, b in zip(before, nets["method_step"].parameters()))
        assert any(not torch.equal(a, b) for a, b in zip(adapters, bench.method.parameters()))
        assert all(torch.equal(a, b) for a, b in zip(teacher, nets["teacher_forward"].parameters()))
    finally:
        bench.close()
    assert all(_hooks(net) == 0 for net in nets.values())


def test_every_student_phase_runs_the_engines_train_step(monkeypatch):
    calls = []
    original = step_module.TrainStep.__call__

    def counting(self, *args, **kwargs):
        calls.append(self.parts.method.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(step_module.TrainStep, "__call__", counting)
    measure(RunConfig(method="kd", **TINY), steps=2, rounds=1, warmup=1)
    # (a) and (d) are the baseline's step, (c) the method's: 1 warm-up + 2 timed + 1 profiled for memory
    assert sorted(calls) == sorted(["baseline"] * 8 + ["kd"] * 4)


def test_cpu_peak_bytes_replays_allocations_and_frees_in_order():
    def work():
        a = torch.empty(1 << 20, dtype=torch.uint8)
        b = torch.empty(2 << 20, dtype=torch.uint8)  # 3 MiB held here: the peak
        del a
        c = torch.empty(1 << 19, dtype=torch.uint8)  # 2.5 MiB
        return b, c

    assert cpu_peak_bytes(work) == 3 << 20


def test_cpu_peak_bytes_counts_only_what_the_work_allocates():
    held = [torch.ones(4 << 20, dtype=torch.uint8)]  # allocated before: neither counted nor subtracted when freed

    def work():
        held.clear()
        return torch.empty(3 << 20, dtype=torch.uint8)

    assert cpu_peak_bytes(work) == 3 << 20
    # nor one allocated during an earlier profiled step (the profiler would report that free)
    held.append(None)
    cpu_peak_bytes(lambda: held.__setitem__(0, torch.ones(1 << 20, dtype=torch.uint8)))
    assert cpu_peak_bytes(work) == 3 << 20


def test_cpu_peaks_hold_the_kept_tensors_plus_the_steps_own_memory():
    bench = SpeedBench(RunConfig(method="kd", **TINY))
    try:
        resident = {p.name: p.resident() for p in bench.phases}
        result = bench.measure(steps=1, rounds=1, warmup=1)
    finally:
        bench.close()
    peaks = {name: p["peak_mem_mb"] * 2**20 for name, p in result["phases"].items()}
    # a training step allocates at least one gradient per parameter beyond what it keeps
    student = bench.networks["student_step"]
    grads = _tensor_bytes(list(student.parameters()))
    assert peaks["student_step"] >= resident["student_step"] + grads
    assert resident["teacher_forward"] < peaks["teacher_forward"] < resident["teacher_forward"] + 64 * 2**20
    # the method step holds both networks' memory at once, so it needs more than either alone
    assert peaks["method_step"] > max(peaks["student_step"], peaks["teacher_forward"])


def test_tensor_bytes_counts_shared_storage_once():
    a = torch.zeros(10, dtype=torch.float32)  # 40 bytes
    b = torch.zeros(3, 2, dtype=torch.float64)  # 48 bytes
    assert _tensor_bytes([a, a, b, None]) == 88


def test_cli_json(capsys):
    code = main(["speed", "--method", "rkd", "--model", "test_resnet", "--teacher", "test_resnet", "--input-size", "16",
                 "--batch-size", "8", "--train-size", "32", "--device", "cpu", "--steps", "1", "--rounds", "1",
                 "--warmup", "0", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "rkd" and result["overhead"] > 0 and set(result["phases"]) == set(PHASES)


TINY_ARGS = ["speed", "--model", "test_resnet", "--input-size", "16", "--batch-size", "8", "--train-size", "32",
             "--device", "cpu"]


@pytest.mark.parametrize("extra, message", [
    (["--teacher", "test_resnet", "--steps", "0"], "--steps and --rounds must be at least 1"),
    (["--teacher", "nonexistent_net"], "unknown model 'nonexistent_net'"),
    ([], "needs a teacher"),
])
def test_cli_bad_input_is_one_line(capsys, extra, message):
    assert main(TINY_ARGS + ["--method", "kd"] + extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
