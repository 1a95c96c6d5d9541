"""DIST: the loss against a plain-loop Pearson reference and against numbers of the official code,
segmentation as pixels-as-samples, gradients to the student (and a curriculum's τ) but never the
teacher, the CIFAR/ImageNet/segmentation defaults, and short CLI runs on several families."""

import json
import math

import pytest
import torch

from kdzoo.build import validate
from kdzoo.cli import main
from kdzoo.config import RunConfig
from kdzoo.errors import UserError
from kdzoo.method import NetOutputs, StepOutputs
from kdzoo.registry import get_method

from .reference import mean_ce, softmax

DIST = get_method("dist")


# -- inputs: closed-form logits, so the official script (/tmp/official-dist/run_parity.py, recorded
#    in test_parity_with_the_official_code) and this file build the very same tensors ------------

def closed_form(shape, a, b, c, scale):
    """scale·sin(Σ_j 0.37·a·(j+1)·i_j + b) + 0.5·cos(c·i_last·(i_0 + 1)), float64."""
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))
    phase = sum((j + 1) * 0.37 * a * idx[j] for j in range(len(shape)))
    return scale * torch.sin(phase + b) + 0.5 * torch.cos(c * idx[-1] * (idx[0] + 1))


def pair(shape, t_scale=4.0):
    return closed_form(shape, 1.3, 0.1, 2.1, 2.5), closed_form(shape, -0.9, 0.4, 0.5, t_scale)


def step(z_s, z_t, targets=None):
    if targets is None:
        targets = torch.arange(z_s.shape[0]) % z_s.shape[1]
    return StepOutputs(NetOutputs(z_s), targets, teacher=NetOutputs(z_t))


# -- the independent reference: lists, explicit loops, float64 ----------------------------------

def ref_pearson(a, b):
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    da, db = [x - ma for x in a], [y - mb for y in b]
    num = sum(x * y for x, y in zip(da, db))
    return num / (math.sqrt(sum(x * x for x in da)) * math.sqrt(sum(y * y for y in db)) + 1e-8)


def ref_dist(zs, zt, tau):
    """(inter, intra) on lists of rows (samples × classes), before β, γ and τ²."""
    ps = [softmax(row, tau) for row in zs]
    pt = [softmax(row, tau) for row in zt]
    n, k = len(ps), len(ps[0])
    inter = 1 - sum(ref_pearson(ps[i], pt[i]) for i in range(n)) / n
    intra = 1 - sum(ref_pearson([ps[i][j] for i in range(n)], [pt[i][j] for i in range(n)]) for j in range(k)) / k
    return inter, intra


CASES = {
    "cifar-like": (pair((6, 5)), 4.0),
    "tau-1": (pair((6, 5)), 1.0),
    "batch-of-one": (pair((1, 5)), 4.0),               # every class is constant over the batch: intra = 1
    "sharp-teacher": (pair((8, 7), t_scale=30.0), 1.0),  # near one-hot teacher
    "uniform-student": ((torch.zeros(4, 6, dtype=torch.float64), pair((4, 6))[1]), 2.0),  # ρ = 0 on every row
    "random": ((torch.randn(5, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3,
                torch.randn(5, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 5), 3.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_loss_matches_the_loop_reference(name):
    (z_s, z_t), tau = CASES[name]
    targets = torch.arange(z_s.shape[0]) % z_s.shape[1]
    config = DIST.Config(temperature=tau, beta=0.7, gamma=1.9, ce_weight=0.4)
    terms = DIST(config).loss(step(z_s, z_t, targets))
    inter, intra = ref_dist(z_s.tolist(), z_t.tolist(), tau)
    assert set(terms) == {"ce", "inter", "intra"}
    assert terms["inter"].item() == pytest.approx(0.7 * tau**2 * inter, abs=1e-5)
    assert terms["intra"].item() == pytest.approx(1.9 * tau**2 * intra, abs=1e-5)
    assert terms["ce"].item() == pytest.approx(0.4 * mean_ce(z_s.tolist(), targets.tolist()), abs=1e-5)
    if name == "batch-of-one":
        assert intra == 1.0 and terms["intra"].item() == pytest.approx(1.9 * tau**2)
    if name == "uniform-student":
        assert inter == 1.0


def test_identical_predictions_give_zero_relation_losses():
    z = pair((6, 5))[1]
    terms = DIST().loss(step(z.clone(), z.clone()))
    # not exactly 0: ρ = n²/(n² + 1e-8) for centred norm n, and n is small at τ = 4 (the official eps)
    assert 0 < terms["inter"].item() < 1e-4 and 0 < terms["intra"].item() < 1e-4


def test_relations_ignore_the_scale_and_shift_of_the_probabilities():
    """ρ is invariant to a positive affine map: only the teacher's order and shape of the
    probabilities count, not their values. Here the 'teacher' is the student's probabilities
    pushed through p ↦ 0.5·p + 0.5/K, which σ(z_t) reproduces exactly; one map for every entry
    is an affine map of each row and of each column, so both relations are kept."""
    z_s = pair((5, 4))[0]
    p = torch.softmax(z_s, dim=1)
    z_t = torch.log(0.5 * p + 0.5 / 4)          # σ(z_t) = 0.5·p + 0.125 (sums to 1)
    terms = DIST(DIST.Config(temperature=1.0)).loss(step(z_s, z_t))
    assert abs(terms["inter"].item()) < 1e-5   # up to the official eps's 1e-8 in the denominator
    assert abs(terms["intra"].item()) < 1e-5
    assert DIST(DIST.Config(temperature=1.0)).loss(step(z_s, pair((5, 4))[1]))["inter"].item() > 0.1


# -- parity with the official code ---------------------------------------------------------------
# hunto/image_classification_sota lib/models/losses/dist_kd.py at d9662f7df68fe46b973c4580b7c9b896cedcd301
# (the commit hunto/DIST_KD 2418f18b1fedd7c2646a7b1b9a27d5c674c2170b pins as its `classification`
# submodule), and hunto/DIST_KD segmentation/losses/dist_kd.py at 2418f18b. Script: the official
# file copied to a scratch folder, fed `pair(shape, t_scale)` above (float64), printing
# inter_class_relation, intra_class_relation (on σ(z/τ)) and DIST(beta, gamma, tau)(z_s, z_t).
OFFICIAL = {  # name: (shape, τ, teacher scale, inter, intra, DIST(1, 1, τ), DIST(0.3, 1.7, τ))
    "b6k5_t4": ((6, 5), 4.0, 4.0, 1.0229266398554697, 1.0912488831434124, 33.82680836798211, 34.592017492807074),
    "b6k5_t1": ((6, 5), 1.0, 4.0, 1.0752225309268617, 1.1706814337254172, 2.245903964652279, 2.3127251966112676),
    "b1k5_t4": ((1, 5), 4.0, 4.0, 0.8987015448744273, 1.0, 30.379224717990837, 31.51376741539725),
    "b8k7_t1_sharp": ((8, 7), 1.0, 30.0, 0.6647146303264747, 0.7388176137402851, 1.40353224406676, 1.455404332456427),
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_parity_with_the_official_code(name):
    shape, tau, t_scale, inter, intra, total_11, total_0317 = OFFICIAL[name]
    z_s, z_t = pair(shape, t_scale)
    terms = DIST(DIST.Config(temperature=tau, beta=1.0, gamma=1.0, ce_weight=0.0)).loss(step(z_s, z_t))
    assert terms["inter"].item() == pytest.approx(tau**2 * inter, abs=1e-5)
    assert terms["intra"].item() == pytest.approx(tau**2 * intra, abs=1e-5)
    assert sum(terms.values()).item() == pytest.approx(total_11, abs=1e-5)
    terms = DIST(DIST.Config(temperature=tau, beta=0.3, gamma=1.7, ce_weight=0.0)).loss(step(z_s, z_t))
    assert sum(terms.values()).item() == pytest.approx(total_0317, abs=1e-5)


def test_parity_with_the_official_code_for_a_student_close_to_the_teacher():
    z_s, z_t = pair((6, 5))
    z_s = 0.8 * z_t + 0.3 * closed_form((6, 5), 1.0, 0.0, 0.0, 1.0)
    terms = DIST(DIST.Config(temperature=4.0, beta=1.0, gamma=1.0, ce_weight=0.0)).loss(step(z_s, z_t))
    assert terms["inter"].item() == pytest.approx(16 * 0.004861996261425472, abs=1e-6)
    assert terms["intra"].item() == pytest.approx(16 * 0.0019754201862657306, abs=1e-6)
    assert sum(terms.values()).item() == pytest.approx(0.10939866316305924, abs=1e-6)


def test_segmentation_parity_with_the_official_code_and_pixels_as_samples():
    """Official segmentation DIST (no τ) on (2, 4, 3, 2) maps: β = γ = 1 → 1.56735285035509,
    β = 0.5, γ = 2 → 1.9821744155548027. Every pixel is a sample of the reference."""
    z_s, z_t = pair((2, 4, 3, 2))
    masks = torch.tensor([[[0, 1], [2, 255], [3, 3]], [[1, 1], [0, 2], [255, 255]]])
    for beta, gamma, expected in [(1.0, 1.0, 1.56735285035509), (0.5, 2.0, 1.9821744155548027)]:
        terms = DIST(DIST.Config(temperature=1.0, beta=beta, gamma=gamma)).loss(step(z_s, z_t, masks))
        assert (terms["inter"] + terms["intra"]).item() == pytest.approx(expected, abs=1e-5)
    rows_s = z_s.permute(0, 2, 3, 1).reshape(-1, 4).tolist()
    rows_t = z_t.permute(0, 2, 3, 1).reshape(-1, 4).tolist()
    inter, intra = ref_dist(rows_s, rows_t, 1.0)
    terms = DIST(DIST.Config(temperature=1.0, beta=1.0, gamma=1.0)).loss(step(z_s, z_t, masks))
    assert terms["inter"].item() == pytest.approx(inter, abs=1e-5)
    assert terms["intra"].item() == pytest.approx(intra, abs=1e-5)
    labelled = [(y, row) for y, row in zip(masks.reshape(-1).tolist(), rows_s) if y != 255]
    assert terms["ce"].item() == pytest.approx(mean_ce([r for _, r in labelled], [y for y, _ in labelled]), abs=1e-5)


# -- gradients -------------------------------------------------------------------------------------

def test_gradient_reaches_the_student_and_a_curriculum_temperature_never_the_teacher():
    z_s, z_t = pair((6, 5))
    z_s = z_s.float().requires_grad_(True)
    z_t = z_t.float().requires_grad_(True)   # as if the teacher's graph were alive
    method = DIST()
    method.step_temperature = torch.tensor(4.0, requires_grad=True)  # as ctkd sets it
    terms = method.loss(step(z_s, z_t))
    (terms["inter"] + terms["intra"]).backward()
    assert z_s.grad.abs().sum() > 0 and torch.isfinite(z_s.grad).all()
    assert z_t.grad is None
    assert method.step_temperature.grad is not None and method.step_temperature.grad != 0


def test_gradient_matches_finite_differences_float64():
    z_s, z_t = pair((5, 4))
    method = DIST(DIST.Config(temperature=2.0, beta=0.7, gamma=1.3))
    # the distillation terms (CE is computed in float32, too coarse for finite differences)
    def total(z):
        terms = method.loss(step(z, z_t))
        return terms["inter"] + terms["intra"]
    assert torch.autograd.gradcheck(total, (z_s.clone().requires_grad_(True),))


def test_batch_of_one_and_uniform_student_keep_finite_gradients():
    for z_s, z_t in [pair((1, 5)), (torch.zeros(3, 5, dtype=torch.float64), pair((3, 5))[1])]:
        z_s = z_s.clone().requires_grad_(True)
        terms = DIST().loss(step(z_s, z_t))
        (terms["inter"] + terms["intra"]).backward()
        assert torch.isfinite(z_s.grad).all()
    z_s = pair((1, 5))[0].requires_grad_(True)
    DIST().loss(step(z_s, pair((1, 5))[1]))["intra"].backward()
    assert torch.all(z_s.grad == 0)   # intra is the constant γτ² on a batch of one


def test_bf16_logits_are_computed_in_float32():
    z_s, z_t = pair((6, 5))
    ref = DIST().loss(step(z_s.float(), z_t.float()))
    terms = DIST().loss(step(z_s.bfloat16(), z_t.bfloat16()))
    assert all(v.dtype == torch.float32 for v in terms.values())
    assert terms["inter"].item() == pytest.approx(ref["inter"].item(), rel=0.05)


def test_soft_targets_enter_only_the_cross_entropy():
    z_s, z_t = pair((4, 5))
    soft = torch.softmax(pair((4, 5))[1] * 0.3, dim=1)
    terms = DIST().loss(step(z_s, z_t, soft))
    assert terms["ce"].item() == pytest.approx(mean_ce(z_s.tolist(), soft.tolist()), abs=1e-5)
    assert terms["inter"].item() == DIST().loss(step(z_s, z_t))["inter"].item()


# -- defaults and settings -------------------------------------------------------------------------

def _config(**run):
    return validate(RunConfig(method="dist", teacher="test_resnet", **run)).config


def test_defaults_cifar_imagenet_segmentation_and_set_wins():
    assert DIST.Config() == DIST.Config(temperature=4.0, beta=2.0, gamma=2.0, ce_weight=1.0)
    assert _config(dataset="cifar100") == DIST.Config()
    assert _config(dataset="imagefolder") == DIST.Config(temperature=1.0, beta=2.0, gamma=2.0, ce_weight=1.0)
    assert _config(task="seg") == DIST.Config(temperature=1.0, beta=1.0, gamma=1.0, ce_weight=1.0)
    assert _config(dataset="imagefolder", method_settings={"temperature": "3", "beta": "0.5"}).temperature == 3.0
    assert _config(task="seg", method_settings={"gamma": 4.0}).gamma == 4.0
    assert DIST.switch_defaults == {} and DIST.tasks == ("cls", "seg") and DIST.logits_only_teacher


def test_bad_settings_are_user_errors():
    for bad in (dict(temperature=0.0), dict(beta=-1.0), dict(gamma=-0.1), dict(ce_weight=-1.0)):
        with pytest.raises(UserError):
            DIST(DIST.Config(**bad))
    with pytest.raises(UserError, match="logit_standardize"):
        _config(method_settings={"logit_standardize": True})   # the LS paper does not apply LS to DIST


# -- from the command line -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def output(tmp_path_factory):
    return tmp_path_factory.mktemp("dist")  # shared, so each teacher is trained once


def _run(output, student, teacher, *extra):
    name = f"dist-{teacher}-{student}{'-'.join(extra)}"
    args = ["run", "--method", "dist", "--model", student, "--teacher", teacher, "--input-size", "32",
            "--train-size", "32", "--test-size", "16", "--batch-size", "8", "--epochs", "1", "--max-steps", "2",
            "--device", "cpu", "--optimizer", "sgd", "--lr", "0.05", "--teacher-epochs", "1",
            "--output", str(output), "--run-name", name, *extra]
    assert main(args) == 0
    result = json.loads((output / name / "result.json").read_text())
    assert result["complete"] and result["steps"] == 2 and math.isfinite(result["final_train_loss"])
    return result


@pytest.mark.parametrize("teacher,student", [("test_resnet", "test_resnet"), ("test_resnet", "test_efficientnet"),
                                             ("test_resnet", "test_convnext"), ("test_convnext", "test_vit")])
def test_runs_from_the_cli(output, teacher, student):
    assert _run(output, student, teacher)["teacher"] == teacher


def test_runs_segmentation_from_the_cli(output):
    result = _run(output, "test_resnet", "test_resnet", "--task", "seg")
    assert result["task"] == "seg" and result["miou"] >= 0
