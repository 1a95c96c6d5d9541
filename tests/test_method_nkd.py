"""NKD: the loss against a plain-loop reference and against numbers of the official code, mixed
targets (argmax), gradients to the student (and a curriculum's τ) but never the teacher, the
CIFAR/ImageNet defaults, and short CLI runs on several families; --task seg is refused."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from kdzoo.build import validate
from kdzoo.cli import main
from kdzoo.config import RunConfig
from kdzoo.errors import UserError
from kdzoo.method import NetOutputs, StepOutputs
from kdzoo.registry import get_method

from .reference import mean_ce, softmax

NKD = get_method("nkd")


# -- inputs: closed-form logits, as in the official script (see OFFICIAL below) ---------------

def closed_form(shape, a, b, c, scale):
    """scale·sin(Σ_j 0.37·a·(j+1)·i_j + b) + 0.5·cos(c·i_last·(i_0 + 1)), float64."""
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))
    phase = sum((j + 1) * 0.37 * a * idx[j] for j in range(len(shape)))
    return scale * torch.sin(phase + b) + 0.5 * torch.cos(c * idx[-1] * (idx[0] + 1))


def pair(shape, t_scale=4.0):
    return closed_form(shape, 1.3, 0.1, 2.1, 2.5), closed_form(shape, -0.9, 0.4, 0.5, t_scale)


HARD = torch.tensor([0, 4, 2, 2, 1, 3])


def step(z_s, z_t, targets):
    return StepOutputs(NetOutputs(z_s), targets, teacher=NetOutputs(z_t))


# -- the independent reference: lists, explicit loops, float64 ----------------------------------

def ref_nkd(zs, zt, labels, tau, gamma):
    """(target, non_target) terms: the teacher-weighted target CE at τ = 1 and γ·τ² times the CE
    of the non-target probabilities renormalised to sum to one (taken from the full softmax at τ)."""
    target = non_target = 0.0
    for s_row, t_row, y in zip(zs, zt, labels):
        target -= softmax(t_row, 1.0)[y] * math.log(softmax(s_row, 1.0)[y])
        ps, pt = softmax(s_row, tau), softmax(t_row, tau)
        rest_s, rest_t = 1 - ps[y], 1 - pt[y]
        for k in range(len(s_row)):
            if k != y:
                non_target -= (pt[k] / rest_t) * math.log(ps[k] / rest_s)
    n = len(zs)
    return target / n, gamma * tau**2 * non_target / n


CASES = {
    "cifar-like": (pair((6, 5)), HARD, 3.0),
    "tau-1": (pair((6, 5)), HARD, 1.0),
    "two-classes": (pair((3, 2)), torch.tensor([1, 0, 1]), 3.0),     # one non-target class: that term is 0
    "sharp-teacher": (pair((6, 5), t_scale=12.0), HARD, 2.0),
    "uniform-student": ((torch.zeros(6, 5, dtype=torch.float64), pair((6, 5))[1]), HARD, 4.0),
    "random": ((torch.randn(7, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 3,
                torch.randn(7, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 4),
               torch.tensor([9, 0, 3, 3, 7, 1, 5]), 2.5),
}


@pytest.mark.parametrize("name", list(CASES))
def test_loss_matches_the_loop_reference(name):
    (z_s, z_t), labels, tau = CASES[name]
    terms = NKD(NKD.Config(temperature=tau, gamma=1.3, ce_weight=0.6)).loss(step(z_s, z_t, labels))
    target, non_target = ref_nkd(z_s.tolist(), z_t.tolist(), labels.tolist(), tau, 1.3)
    assert set(terms) == {"ce", "target", "non_target"}
    assert terms["target"].item() == pytest.approx(target, abs=1e-5)
    assert terms["non_target"].item() == pytest.approx(non_target, abs=1e-5)
    assert terms["ce"].item() == pytest.approx(0.6 * mean_ce(z_s.tolist(), labels.tolist()), abs=1e-5)
    if name == "two-classes":
        assert terms["non_target"].item() == 0.0


def test_non_target_term_is_the_teacher_entropy_when_the_student_matches():
    """A cross-entropy, not a KL: with equal logits it is γτ² × the entropy of the normalised
    non-target distribution, and any other student is worse."""
    z = pair((6, 5))[1]
    method = NKD(NKD.Config(temperature=2.0, gamma=1.0))
    same = method.loss(step(z.clone(), z.clone(), HARD))["non_target"].item()
    entropy = 0.0
    for row, y in zip(z.tolist(), HARD.tolist()):
        rest = [v for k, v in enumerate(row) if k != y]
        entropy -= sum(q * math.log(q) for q in softmax(rest, 2.0))
    assert same == pytest.approx(4.0 * entropy / 6, abs=1e-6)
    assert method.loss(step(pair((6, 5))[0], z, HARD))["non_target"].item() > same


# -- parity with the official code ---------------------------------------------------------------
# yzd-v/cls_KD mmcls/models/dis_losses/nkd.py at 1e5d48f36957ee460d39d7ebc592c6cc7f8f3d66 (branch 1.0;
# identical to mmcls/distillation/losses/nkd.py on master ad4876fa). Script: the file copied to a
# scratch folder without the mmcls registry decorator, NKDLoss(name, True, temp, gamma) called on
# `pair(shape)` above (float64) and the targets below; gamma = 0 gives the target term alone.
# Soft targets: 0.7·onehot(HARD) + 0.3·onehot(HARD.roll(1)).
OFFICIAL = {  # name: (temp, gamma, soft targets?, NKDLoss total, total with gamma = 0)
    "hard_t3_g3.5": (3.0, 3.5, False, 49.85711855480733, 0.4077419541844985),
    "hard_t1_g1.5": (1.0, 1.5, False, 4.4233922081019665, 0.4077419541844985),
    "soft_t3_g3.5": (3.0, 3.5, True, 49.85711855480733, 0.4077419541844985),
}


def _soft(weight_on_hard):
    return (weight_on_hard * F.one_hot(HARD, 5).double()
            + (1 - weight_on_hard) * F.one_hot(HARD.roll(1), 5).double())


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_parity_with_the_official_code(name):
    temp, gamma, soft, total, target_alone = OFFICIAL[name]
    z_s, z_t = pair((6, 5))
    targets = _soft(0.7) if soft else HARD
    terms = NKD(NKD.Config(temperature=temp, gamma=gamma, ce_weight=0.0)).loss(step(z_s, z_t, targets))
    assert terms["target"].item() == pytest.approx(target_alone, abs=1e-5)
    assert sum(terms.values()).item() == pytest.approx(total, abs=1e-5)


def test_parity_with_the_official_code_on_two_classes():
    z_s, z_t = pair((3, 2))
    terms = NKD(NKD.Config(temperature=3.0, gamma=3.5, ce_weight=0.0)).loss(step(z_s, z_t, torch.tensor([1, 0, 1])))
    assert sum(terms.values()).item() == pytest.approx(0.3033708574310328, abs=1e-5)


# -- mixed targets -----------------------------------------------------------------------------------

def test_mixed_targets_use_the_most_probable_class_and_the_full_distribution_in_ce():
    z_s, z_t = pair((6, 5))
    method = NKD()
    mostly_rolled = method.loss(step(z_s, z_t, _soft(0.3)))
    rolled = method.loss(step(z_s, z_t, HARD.roll(1)))
    assert mostly_rolled["target"].item() == rolled["target"].item()
    assert mostly_rolled["non_target"].item() == rolled["non_target"].item()
    assert mostly_rolled["ce"].item() == pytest.approx(mean_ce(z_s.tolist(), _soft(0.3).tolist()), abs=1e-6)
    assert mostly_rolled["target"].item() != method.loss(step(z_s, z_t, HARD))["target"].item()
    # a tie goes to the first class, as torch.max in the official code
    tie = torch.zeros(1, 5, dtype=torch.float64)
    tie[0, 1] = tie[0, 3] = 0.5
    assert method.loss(step(z_s[:1], z_t[:1], tie))["target"].item() == \
        method.loss(step(z_s[:1], z_t[:1], torch.tensor([1])))["target"].item()


# -- gradients -------------------------------------------------------------------------------------

def test_gradient_reaches_the_student_and_a_curriculum_temperature_never_the_teacher():
    z_s, z_t = pair((6, 5))
    z_s = z_s.float().requires_grad_(True)
    z_t = z_t.float().requires_grad_(True)   # as if the teacher's graph were alive
    method = NKD()
    method.step_temperature = torch.tensor(3.0, requires_grad=True)  # as ctkd sets it
    terms = method.loss(step(z_s, z_t, HARD))
    (terms["target"] + terms["non_target"]).backward()
    assert z_s.grad.abs().sum() > 0 and torch.isfinite(z_s.grad).all()
    assert z_t.grad is None
    assert method.step_temperature.grad is not None and method.step_temperature.grad != 0


def test_gradient_matches_finite_differences_float64():
    z_s, z_t = pair((6, 5))
    method = NKD(NKD.Config(temperature=2.0, gamma=1.3))
    # the distillation terms (CE is computed in float32, too coarse for finite differences)
    def total(z):
        terms = method.loss(step(z, z_t, HARD))
        return terms["target"] + terms["non_target"]
    assert torch.autograd.gradcheck(total, (z_s.clone().requires_grad_(True),))


def test_the_non_target_term_sends_no_gradient_to_the_target_logit():
    """Normalising removes the target class from the non-target distribution entirely."""
    z_s = pair((6, 5))[0].requires_grad_(True)
    NKD().loss(step(z_s, pair((6, 5))[1], HARD))["non_target"].backward()
    assert torch.all(z_s.grad.gather(1, HARD[:, None]) == 0)
    assert torch.isfinite(z_s.grad).all() and z_s.grad.abs().sum() > 0


def test_bf16_logits_are_computed_in_float32():
    z_s, z_t = pair((6, 5))
    ref = NKD().loss(step(z_s.float(), z_t.float(), HARD))
    terms = NKD().loss(step(z_s.bfloat16(), z_t.bfloat16(), HARD))
    assert all(v.dtype == torch.float32 for v in terms.values())
    assert terms["non_target"].item() == pytest.approx(ref["non_target"].item(), rel=0.05)


# -- defaults and settings -------------------------------------------------------------------------

def _config(**run):
    return validate(RunConfig(method="nkd", teacher="test_resnet", **run)).config


def test_defaults_cifar_imagenet_and_set_wins():
    assert NKD.Config() == NKD.Config(temperature=3.0, gamma=3.5, ce_weight=1.0)
    assert _config(dataset="cifar100") == NKD.Config()
    assert _config(dataset="imagefolder") == NKD.Config(temperature=1.0, gamma=1.5, ce_weight=1.0)
    assert _config(dataset="imagefolder", method_settings={"gamma": "2.5"}) == NKD.Config(1.0, 2.5, 1.0)
    assert _config(method_settings={"temperature": 4.0}).temperature == 4.0
    assert NKD.switch_defaults == {} and NKD.tasks == ("cls",) and NKD.logits_only_teacher


def test_bad_settings_are_user_errors():
    for bad in (dict(temperature=0.0), dict(gamma=-1.0), dict(ce_weight=-0.5)):
        with pytest.raises(UserError):
            NKD(NKD.Config(**bad))
    with pytest.raises(UserError, match="logit_standardize"):
        _config(method_settings={"logit_standardize": True})   # the LS paper does not apply LS to NKD


# -- from the command line -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def output(tmp_path_factory):
    return tmp_path_factory.mktemp("nkd")  # shared, so each teacher is trained once


@pytest.mark.parametrize("teacher,student", [("test_resnet", "test_resnet"), ("test_resnet", "test_efficientnet"),
                                             ("test_resnet", "test_convnext"), ("test_convnext", "test_vit")])
def test_runs_from_the_cli(output, teacher, student):
    name = f"nkd-{teacher}-{student}"
    assert main(["run", "--method", "nkd", "--model", student, "--teacher", teacher, "--input-size", "32",
                 "--train-size", "32", "--test-size", "16", "--batch-size", "8", "--epochs", "1", "--max-steps", "2",
                 "--device", "cpu", "--optimizer", "sgd", "--lr", "0.05", "--teacher-epochs", "1",
                 "--output", str(output), "--run-name", name]) == 0
    result = json.loads((output / name / "result.json").read_text())
    assert result["complete"] and result["steps"] == 2 and math.isfinite(result["final_train_loss"])
    assert result["teacher"] == teacher


def test_segmentation_is_refused_with_exit_2(tmp_path, capsys):
    code = main(["run", "--task", "seg", "--method", "nkd", "--teacher", "test_resnet", "--model", "test_resnet",
                 "--output", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "'nkd' supports task(s) cls, not 'seg'" in err
