"""Loss values against hand-computed references on fixed tensors."""

import pytest
import torch

from kdzoo.method import NetOutputs, StepOutputs, cross_entropy, kl_div
from kdzoo.registry import get_method

from .reference import mean_ce, mean_kl

S = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
T = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 2.0]])
Y = torch.tensor([1, 2])
S_ROWS, T_ROWS, Y_LIST = S.tolist(), T.tolist(), Y.tolist()  # for the loop references


def test_kl_div_matches_loop():
    for tau in (1.0, 4.0):
        assert kl_div(S, T, tau).item() == pytest.approx(mean_kl(S_ROWS, T_ROWS, tau), abs=1e-6)


def test_cross_entropy_hard_and_soft_targets_agree():
    assert cross_entropy(S, Y).item() == pytest.approx(mean_ce(S_ROWS, Y_LIST), abs=1e-6)
    one_hot = torch.nn.functional.one_hot(Y, 3).float()
    assert cross_entropy(S, one_hot).item() == pytest.approx(mean_ce(S_ROWS, Y_LIST), abs=1e-6)


def test_kd_loss_against_formula():
    method = get_method("kd")()
    terms = method.loss(StepOutputs(NetOutputs(S), Y, teacher=NetOutputs(T)))
    assert terms["ce"].item() == pytest.approx(0.1 * mean_ce(S_ROWS, Y_LIST), abs=1e-6)
    assert terms["kd"].item() == pytest.approx(0.9 * 16 * mean_kl(S_ROWS, T_ROWS, 4.0), abs=1e-5)


def test_kd_settings_change_the_loss():
    cls = get_method("kd")
    method = cls(cls.Config(temperature=1.0, ce_weight=0.5, kd_weight=0.5))
    terms = method.loss(StepOutputs(NetOutputs(S), Y, teacher=NetOutputs(T)))
    assert terms["kd"].item() == pytest.approx(0.5 * mean_kl(S_ROWS, T_ROWS, 1.0), abs=1e-6)


def test_kd_gradient_reaches_student_not_teacher():
    s = S.clone().requires_grad_(True)
    t = T.clone().requires_grad_(True)
    method = get_method("kd")()
    with torch.no_grad():
        t_out = t * 1.0  # what the engine does: the teacher forward runs under no_grad
    sum(method.loss(StepOutputs(NetOutputs(s), Y, teacher=NetOutputs(t_out))).values()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_baseline_is_cross_entropy_and_label_smoothing():
    cls = get_method("baseline")
    assert cls().loss(StepOutputs(NetOutputs(S), Y))["ce"].item() == pytest.approx(mean_ce(S_ROWS, Y_LIST), abs=1e-6)
    smoothed = cls(cls.Config(label_smoothing=0.3)).loss(StepOutputs(NetOutputs(S), Y))["ce"].item()
    targets = [[0.1 + (0.7 if k == label else 0.0) for k in range(3)] for label in Y_LIST]
    assert smoothed == pytest.approx(mean_ce(S_ROWS, targets), abs=1e-6)
