"""WTTM: the loss against a plain-loop reference and the official code's numbers, edge cases,
gradient flow, recipe defaults and CLI runs."""

import json
import math

import pytest
import torch

from kdzoo.cli import main
from kdzoo.config import RunConfig
from kdzoo.errors import UserError
from kdzoo.method import NetOutputs, StepOutputs
from kdzoo.methods.wttm import weighted_transformed_kl
from kdzoo.registry import get_method
from kdzoo.settings import apply_overrides

from .reference import mean_ce, softmax

WTTM = get_method("wttm")


def _reference(s, t, gamma):
    """mean_b U_b · KL(p̃_b ‖ p_s,b), U_b = Σ_k p_t,bk^γ, p̃ = p_t^γ / U — lists and loops, float64."""
    total = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        ps, pt = softmax(srow, 1.0), softmax(trow, 1.0)
        powered = [p ** gamma for p in pt]
        u = sum(powered)
        kl = sum((q / u) * (math.log(q / u) - math.log(p)) for q, p in zip(powered, ps) if q > 0)
        total += u * kl
    return total / len(s)


def _inputs(case):
    """The fixed tensors of the official-code script (see test_parity_with_the_official_code)."""
    g = torch.Generator().manual_seed(10 + case)
    b, k = (6, 10) if case == 0 else (5, 100)
    s = torch.randn(b, k, generator=g, dtype=torch.float64) * 2
    t = torch.randn(b, k, generator=g, dtype=torch.float64) * 3
    if case == 1:
        t[0, 4] += 12.0  # a near one-hot teacher row
    return s, t


@pytest.mark.parametrize("case", [0, 1])
@pytest.mark.parametrize("gamma", [0.2, 0.1, 0.5, 1.0])
def test_loss_matches_loop_reference(case, gamma):
    s, t = _inputs(case)
    assert weighted_transformed_kl(s, t, gamma).item() == pytest.approx(_reference(s, t, gamma), rel=1e-5)


# Official numbers. Script /tmp/official-wttm/run.py: WTTM(γ)(s, t) of zkxufo/TTM
# distiller_zoo/wttm.py @ fe457b33a71ba27536ec04fe3d32c5b04963522f on _inputs(case), float64.
OFFICIAL = {
    (0, 0.2): 6.53759709448703, (0, 0.1): 9.142167809650948, (0, 0.5): 3.5799965988722566,
    (1, 0.2): 36.048871744576346, (1, 0.1): 73.25060327580155, (1, 0.5): 9.627911306450617,
}


@pytest.mark.parametrize("case,gamma", list(OFFICIAL))
def test_parity_with_the_official_code(case, gamma):
    s, t = _inputs(case)
    assert weighted_transformed_kl(s, t, gamma).item() == pytest.approx(OFFICIAL[case, gamma], rel=1e-5)


def test_closed_forms_at_the_edges():
    s = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    # γ = 1: U = 1 and p̃ = p_t, so WTTM is plain KL(p_t ‖ p_s)
    t = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    pt, log_ps = torch.softmax(t, 1), torch.log_softmax(s, 1)
    plain = (pt * (pt.log() - log_ps)).sum(1).mean()
    assert weighted_transformed_kl(s, t, 1.0).item() == pytest.approx(plain.item(), rel=1e-5)
    # a uniform teacher: U = K^(1−γ) and p̃ uniform, whatever γ
    flat = torch.zeros(3, 5)
    for gamma in (0.1, 0.5):
        kl_uniform = (0.2 * (math.log(0.2) - log_ps)).sum(1).mean().item()
        assert weighted_transformed_kl(s, flat, gamma).item() == pytest.approx(5 ** (1 - gamma) * kl_uniform, rel=1e-5)
    # a student equal to the transformed teacher (z_s = γ z_t) has zero loss
    assert weighted_transformed_kl(0.3 * t, t, 0.3).item() == pytest.approx(0.0, abs=1e-6)


def test_extreme_teacher_logits_stay_finite():
    s = torch.randn(2, 6)
    t = torch.tensor([[200.0, -200, 0, 0, 0, 0], [0.0, 0, 0, 0, 0, 1e4]])  # probabilities underflow float32
    value = weighted_transformed_kl(s, t, 0.2)
    assert math.isfinite(value.item())
    assert weighted_transformed_kl(s.bfloat16(), t.bfloat16(), 0.2).dtype == torch.float32


def _terms(s, t, y, **settings):
    return WTTM(WTTM.Config(**settings)).loss(StepOutputs(NetOutputs(s), y, teacher=NetOutputs(t)))


def test_method_terms_and_weights():
    s, t = (x.float() for x in _inputs(0))
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    terms = _terms(s, t, y)
    assert set(terms) == {"ce", "wttm"}
    assert terms["ce"].item() == pytest.approx(mean_ce(s.tolist(), y.tolist()), rel=1e-5)
    assert terms["wttm"].item() == pytest.approx(4.0 * _reference(s, t, 0.2), rel=1e-5)
    terms = _terms(s, t, y, gamma=0.5, ce_weight=0.3, wttm_weight=2.0)
    assert terms["ce"].item() == pytest.approx(0.3 * mean_ce(s.tolist(), y.tolist()), rel=1e-5)
    assert terms["wttm"].item() == pytest.approx(2.0 * _reference(s, t, 0.5), rel=1e-5)
    soft = torch.nn.functional.one_hot(y, 10).float()
    assert _terms(s, t, soft)["ce"].item() == pytest.approx(terms["ce"].item() / 0.3, rel=1e-5)


def test_bad_settings_fail_clearly():
    for bad in ({"gamma": 0.0}, {"wttm_weight": -1.0}, {"ce_weight": -0.1}):
        with pytest.raises(UserError):
            WTTM(WTTM.Config(**bad))


def test_gradient_reaches_student_never_teacher():
    s, t = (x.float() for x in _inputs(0))
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    _terms(s, t, torch.zeros(6, dtype=torch.long))["wttm"].backward()
    assert t.grad is None and (s.grad.abs().sum(1) > 0).all()


def test_recipe_defaults_and_set_wins():
    c = WTTM.Config()
    assert (c.gamma, c.ce_weight, c.wttm_weight) == (0.2, 1.0, 4.0)
    for dataset in ("cifar100", "imagefolder"):
        defaults = WTTM.recipe_defaults(RunConfig(dataset=dataset), {})
        assert defaults == {}  # the official repository publishes no other setting (docs/methods/wttm.md)
    user = {"gamma": 0.1, "wttm_weight": 45.0}
    c = apply_overrides(WTTM.Config(), {**WTTM.recipe_defaults(RunConfig(dataset="imagefolder"), user), **user}, "w")
    assert (c.gamma, c.wttm_weight) == (0.1, 45.0)


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    return tmp_path_factory.mktemp("wttm")


@pytest.mark.parametrize("student,teacher", [("test_resnet", "test_resnet"), ("test_efficientnet", "test_resnet"),
                                             ("test_convnext", "test_resnet"), ("test_vit", "test_convnext")])
def test_runs_from_the_cli(output, student, teacher):
    name = f"wttm-{teacher}-{student}"
    args = ["run", "--method", "wttm", "--model", student, "--teacher", teacher, "--input-size", "32",
            "--train-size", "32", "--test-size", "16", "--batch-size", "8", "--epochs", "1", "--max-steps", "2",
            "--device", "cpu", "--optimizer", "sgd", "--lr", "0.05", "--teacher-epochs", "1",
            "--output", str(output), "--run-name", name]
    assert main(args) == 0
    result = json.loads((output / name / "result.json").read_text())
    assert result["complete"] and result["steps"] == 2 and math.isfinite(result["final_train_loss"])


def test_segmentation_is_refused_with_exit_2(tmp_path, capsys):
    code = main(["run", "--task", "seg", "--method", "wttm", "--teacher", "test_resnet", "--model", "test_resnet",
                 "--output", str(tmp_path), "--device", "cpu"])
    assert code == 2 and "'wttm' supports task(s) cls, not 'seg'" in capsys.readouterr().err
