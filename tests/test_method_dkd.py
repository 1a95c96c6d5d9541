"""DKD: TCKD and NCKD against a plain-loop reference, parity with the official code's numbers,
the warm-up at its boundaries (1-based epochs as mdistiller counts them), per-pair, ImageNet and
logit-standardisation defaults, gradients, resume and runs from the CLI."""

import json
import math
from dataclasses import dataclass

import pytest
import torch
from kdzoo.methods import dkd as dkd_module

from kdzoo.build import validate
from kdzoo.cli import main
from kdzoo.config import RunConfig
from kdzoo.engine import Interrupted, StopFlag, run
from kdzoo.errors import UserError
from kdzoo.losses import softened_kl
from kdzoo.method import NetOutputs, StepOutputs
from kdzoo.registry import get_method, register_method

from .conftest import tiny_config
from .reference import mean_ce

DKD = get_method("dkd")


# -- plain-Python reference: log space, explicit loops, the target class removed by renormalising

def _log_softmax(row, tau):
    z = [v / tau for v in row]
    top = max(z)
    log_total = top + math.log(sum(math.exp(v - top) for v in z))
    return [v - log_total for v in z]


def _log_sum_exp(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _kl_from_logs(log_p, log_q):
    """KL(p ‖ q) from log-probabilities (p = exp(log_p) may underflow to 0: that entry adds 0)."""
    return sum(math.exp(a) * (a - b) for a, b in zip(log_p, log_q))


def _ref_terms(s, t, y, tau):
    """(TCKD, NCKD) without τ², batch mean, each sample's target class ``y[i]``."""
    tc = nc = 0.0
    for srow, trow, gt in zip(s, t, y):
        ls, lt = _log_softmax(srow, tau), _log_softmax(trow, tau)
        others = [k for k in range(len(srow)) if k != gt]
        # binary split [p_gt, Σ_{k≠gt} p_k]
        bs = [ls[gt], _log_sum_exp([ls[k] for k in others])]
        bt = [lt[gt], _log_sum_exp([lt[k] for k in others])]
        tc += _kl_from_logs(bt, bs)
        # non-target distribution: p_k / Σ_{j≠gt} p_j over k ≠ gt
        ns = [ls[k] - bs[1] for k in others]
        nt = [lt[k] - bt[1] for k in others]
        nc += _kl_from_logs(nt, ns)
    return tc / len(s), nc / len(s)


def _ref_dkd(s, t, y, tau, alpha, beta):
    tc, nc = _ref_terms(s, t, y, tau)
    return tau**2 * alpha * tc, tau**2 * beta * nc


def _step(s, t, y, epoch=0):
    return StepOutputs(NetOutputs(s), y, teacher=NetOutputs(t), epoch=epoch)


def _inputs(seed, b, k, scale, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, k, generator=g, dtype=dtype) * scale
    t = torch.randn(b, k, generator=g, dtype=dtype) * scale
    y = torch.randint(0, k, (b,), generator=g)
    return s, t, y


# -- the loss against the reference ----------------------------------------------------------

@pytest.mark.parametrize("seed,b,k,scale,tau,alpha,beta", [
    (10, 8, 10, 2.0, 4.0, 1.0, 8.0),      # CIFAR setting
    (11, 5, 7, 3.0, 1.0, 1.0, 0.5),       # ImageNet setting
    (12, 4, 2, 2.0, 4.0, 1.0, 8.0),       # two classes: one non-target class, NCKD = 0
    (13, 3, 5, 0.0, 4.0, 1.0, 8.0),       # equal logits everywhere: both terms 0
    (14, 6, 9, 60.0, 1.0, 2.0, 3.0),      # large logits: target probabilities underflow
])
def test_terms_match_the_loop_reference(seed, b, k, scale, tau, alpha, beta):
    s, t, y = _inputs(seed, b, k, scale)
    terms = DKD(DKD.Config(alpha=alpha, beta=beta, temperature=tau, warmup=0)).loss(_step(s, t, y))
    tc, nc = _ref_dkd(s.tolist(), t.tolist(), y.tolist(), tau, alpha, beta)
    assert set(terms) == {"ce", "tckd", "nckd"}
    assert terms["tckd"].item() == pytest.approx(tc, abs=1e-5, rel=1e-6)
    assert terms["nckd"].item() == pytest.approx(nc, abs=1e-5, rel=1e-6)
    assert terms["ce"].item() == pytest.approx(mean_ce(s.float().double().tolist(), y.tolist()), abs=1e-5)
    assert all(torch.isfinite(v) for v in terms.values())
    if k == 2:
        assert terms["nckd"].item() == 0.0 and terms["tckd"].item() > 0
    if scale == 0.0:
        assert terms["tckd"].item() == pytest.approx(0.0, abs=1e-9) and terms["nckd"].item() == pytest.approx(0.0, abs=1e-9)


def test_identical_logits_give_zero_and_the_terms_are_not_symmetric():
    s, t, y = _inputs(20, 6, 8, 2.0)
    terms = DKD().loss(_step(s, s.clone(), y))
    assert terms["tckd"].item() == pytest.approx(0.0, abs=1e-6) and terms["nckd"].item() == pytest.approx(0.0, abs=1e-6)
    a = DKD().loss(_step(s, t, y))
    b = DKD().loss(_step(t, s, y))
    assert a["nckd"].item() != pytest.approx(b["nckd"].item(), rel=1e-3)  # KL(teacher ‖ student), not the reverse


def test_kd_equals_tckd_plus_one_minus_teacher_target_probability_times_nckd():
    """The paper's Eq. (1): KD = TCKD + (1 − p_t^gt)·NCKD, per sample."""
    s, t, y = _inputs(21, 1, 6, 2.5)
    tau = 3.0
    p_t_gt = torch.softmax(t / tau, dim=1)[0, y[0]].item()
    method = DKD(DKD.Config(alpha=1.0, beta=1.0 - p_t_gt, temperature=tau, warmup=0))
    terms = method.loss(_step(s, t, y))
    kd = softened_kl(s, t, tau).item()
    assert terms["tckd"].item() + terms["nckd"].item() == pytest.approx(kd, abs=1e-5, rel=1e-6)
    # and the weights are not ignored: β = 8 gives another value
    assert DKD(DKD.Config(temperature=tau, warmup=0)).loss(_step(s, t, y))["nckd"].item() != pytest.approx(
        terms["nckd"].item(), rel=1e-3)


def test_soft_targets_use_the_argmax_class_and_the_whole_distribution_for_ce():
    s, t, y = _inputs(22, 5, 6, 2.0)
    soft = torch.full((5, 6), 0.02, dtype=torch.float64)
    soft[torch.arange(5), y] = 0.9
    hard = DKD(DKD.Config(warmup=0)).loss(_step(s, t, y))
    mixed = DKD(DKD.Config(warmup=0)).loss(_step(s, t, soft))
    assert mixed["tckd"].item() == pytest.approx(hard["tckd"].item(), abs=1e-6)
    assert mixed["nckd"].item() == pytest.approx(hard["nckd"].item(), abs=1e-6)
    assert mixed["ce"].item() == pytest.approx(mean_ce(s.tolist(), soft.tolist()), abs=1e-5)
    assert mixed["ce"].item() != pytest.approx(hard["ce"].item(), rel=1e-3)


def test_bf16_logits_are_computed_in_float32():
    s, t, y = _inputs(23, 4, 5, 2.0, dtype=torch.float32)
    terms = DKD(DKD.Config(warmup=0)).loss(_step(s.bfloat16(), t.bfloat16(), y))
    assert all(v.dtype == torch.float32 for v in terms.values())
    tc, nc = _ref_dkd(s.bfloat16().double().tolist(), t.bfloat16().double().tolist(), y.tolist(), 4.0, 1.0, 8.0)
    assert terms["tckd"].item() == pytest.approx(tc, abs=1e-5) and terms["nckd"].item() == pytest.approx(nc, rel=1e-5)


# -- parity with the official code ----------------------------------------------------------
# Numbers from megvii-research/mdistiller a08d46f10d6102bd6e3f258ca5ac880b020ea259,
# mdistiller/distillers/DKD.py (dkd_loss; DKD.forward_train), and for logit standardisation
# sunshangquan/logit-standardization-KD f6e5aa5172bad618e801163c3385322eea673754,
# mdistiller/distillers/DKD.py (dkd_loss(..., logit_stand=True)), run in float64 on
# _inputs(seed, B, K, scale) (torch.Generator().manual_seed(seed); s, t = randn(B, K) * scale;
# y = randint(0, K, (B,))). TCKD alone is dkd_loss(α=1, β=0), NCKD alone dkd_loss(α=0, β=1).

OFFICIAL = {  # name: (seed, B, K, scale, α, β, τ), (total, tckd, nckd)
    "cifar": ((0, 8, 10, 2.0, 1.0, 8.0, 4.0), (30.18690726745274, 0.5125232383116572, 3.709298003642635)),
    "imagenet": ((1, 6, 7, 3.0, 1.0, 0.5, 1.0), (1.3767023954908888, 0.3475485250048093, 2.058307740972159)),
    "two_classes": ((2, 5, 2, 2.0, 1.0, 8.0, 4.0), (0.22570368248640768, 0.22570368248640768, 0.0)),
    "large": ((3, 4, 6, 20.0, 1.0, 2.0, 1.0), (33.0561363605336, 3.764157246361601, 14.645989557086)),
}
OFFICIAL_LS = 72.05651057570252  # cifar inputs, logit_stand=True, α 9, β 72, τ 2
OFFICIAL_CE = 2.2123492096481803  # forward_train's loss_ce on the cifar inputs
# forward_train's loss_kd (CE_WEIGHT 1, α 1, β 8, T 4, WARMUP 20) at the official 1-based epoch
OFFICIAL_WARMUP = {1: 1.509345363372637, 2: 3.018690726745274, 19: 28.6775619040801, 20: 30.18690726745274,
                   21: 30.18690726745274, 240: 30.18690726745274}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_parity_with_the_official_dkd_loss(name):
    (seed, b, k, scale, alpha, beta, tau), (total, tc, nc) = OFFICIAL[name]
    s, t, y = _inputs(seed, b, k, scale)
    terms = DKD(DKD.Config(alpha=alpha, beta=beta, temperature=tau, warmup=1)).loss(_step(s, t, y))
    assert terms["tckd"].item() == pytest.approx(alpha * tc, abs=1e-5, rel=1e-6)
    assert terms["nckd"].item() == pytest.approx(beta * nc, abs=1e-5, rel=1e-6)
    assert (terms["tckd"] + terms["nckd"]).item() == pytest.approx(total, abs=1e-5, rel=1e-6)


def test_parity_with_the_official_logit_standardised_dkd():
    (seed, b, k, scale, *_), _ = OFFICIAL["cifar"]
    s, t, y = _inputs(seed, b, k, scale)
    method = DKD(DKD.Config(alpha=9.0, beta=72.0, temperature=2.0, warmup=1, logit_standardize=True))
    terms = method.loss(_step(s, t, y))
    assert (terms["tckd"] + terms["nckd"]).item() == pytest.approx(OFFICIAL_LS, abs=1e-5, rel=1e-6)
    # the CE keeps the raw logits, as in the official code
    assert terms["ce"].item() == pytest.approx(OFFICIAL_CE, abs=1e-5)
    off = DKD(DKD.Config(alpha=9.0, beta=72.0, temperature=2.0, warmup=1)).loss(_step(s, t, y))
    assert (off["tckd"] + off["nckd"]).item() != pytest.approx(OFFICIAL_LS, rel=1e-2)


@pytest.mark.parametrize("official_epoch", list(OFFICIAL_WARMUP))
def test_parity_with_the_official_warm_up(official_epoch):
    (seed, b, k, scale, *_), _ = OFFICIAL["cifar"]
    s, t, y = _inputs(seed, b, k, scale)
    terms = DKD().loss(_step(s, t, y, epoch=official_epoch - 1))  # kdzoo's epochs are 0-based
    assert terms["ce"].item() == pytest.approx(OFFICIAL_CE, abs=1e-5)
    assert (terms["tckd"] + terms["nckd"]).item() == pytest.approx(OFFICIAL_WARMUP[official_epoch], abs=1e-5, rel=1e-6)


def test_large_gaps_stay_finite_where_the_official_log_of_a_sum_overflows():
    # float32 softmax gives the student's target probability 0 here; log(0) makes the official TCKD ∞
    s = torch.tensor([[-150.0, 0.0, 10.0]])
    t = torch.tensor([[2.0, 1.0, 0.0]])
    y = torch.tensor([0])
    assert torch.softmax(s, dim=1)[0, 0].item() == 0.0
    terms = DKD(DKD.Config(temperature=1.0, warmup=0)).loss(_step(s, t, y))
    tc, nc = _ref_dkd(s.tolist(), t.tolist(), y.tolist(), 1.0, 1.0, 8.0)
    assert math.isfinite(terms["tckd"].item()) and terms["tckd"].item() == pytest.approx(tc, rel=1e-5)
    assert terms["nckd"].item() == pytest.approx(nc, rel=1e-5)


# -- warm-up ----------------------------------------------------------------------------------

def test_warm_up_weight_at_its_boundaries():
    w = dkd_module.warmup_weight
    assert w(0, 20) == 1 / 20            # first epoch (official epoch 1) already carries 1/20
    assert w(18, 20) == 19 / 20
    assert w(19, 20) == 1.0              # the 20th epoch carries all of it
    assert w(20, 20) == 1.0 and w(239, 20) == 1.0
    assert w(0, 1) == 1.0                # ImageNet: warm-up 1 is no warm-up
    assert w(0, 0) == 1.0                # 0 = none


def test_warm_up_scales_both_distillation_terms_but_not_the_ce():
    s, t, y = _inputs(24, 4, 6, 2.0)
    full = DKD().loss(_step(s, t, y, epoch=19))
    first = DKD().loss(_step(s, t, y, epoch=0))
    assert first["ce"].item() == full["ce"].item()
    for name in ("tckd", "nckd"):
        assert first[name].item() == pytest.approx(full[name].item() / 20, rel=1e-6)
    imagenet = DKD(DKD.Config(warmup=1)).loss(_step(s, t, y, epoch=0))
    assert imagenet["nckd"].item() == pytest.approx(full["nckd"].item(), rel=1e-6)


# -- gradients --------------------------------------------------------------------------------

@pytest.mark.parametrize("standardize", [False, True])
def test_gradient_reaches_the_student_never_the_teacher(standardize):
    s, t, y = _inputs(25, 5, 6, 2.0, dtype=torch.float32)
    s.requires_grad_(True)
    t.requires_grad_(True)  # passed with grad on: the method must detach it
    method = DKD(DKD.Config(warmup=0, logit_standardize=standardize))
    for name in ("tckd", "nckd"):
        s.grad = None
        terms = method.loss(_step(s, t, y))
        terms[name].backward()
        assert s.grad is not None and s.grad.abs().sum() > 0 and torch.isfinite(s.grad).all(), name
    assert t.grad is None


def test_the_nckd_gradient_leaves_the_target_logit_alone_and_tckd_moves_it():
    s, t, y = _inputs(26, 3, 5, 2.0, dtype=torch.float32)
    s.requires_grad_(True)
    DKD(DKD.Config(warmup=0)).loss(_step(s, t, y))["nckd"].backward()
    rows = torch.arange(3)
    assert torch.all(s.grad[rows, y] == 0)
    s.grad = None
    DKD(DKD.Config(warmup=0)).loss(_step(s, t, y))["tckd"].backward()
    assert torch.all(s.grad[rows, y] != 0)


def test_a_curriculum_temperature_gets_a_gradient():
    s, t, y = _inputs(27, 4, 6, 2.0, dtype=torch.float32)
    method = DKD(DKD.Config(warmup=0))
    tau = torch.tensor(3.0, requires_grad=True)
    method.step_temperature = tau
    terms = method.loss(_step(s, t, y))
    (terms["tckd"] + terms["nckd"]).backward()
    assert tau.grad is not None and tau.grad.item() != 0
    tc, nc = _ref_dkd(s.tolist(), t.tolist(), y.tolist(), 3.0, 1.0, 8.0)
    assert terms["nckd"].item() == pytest.approx(nc, rel=1e-5)


# -- defaults: CIFAR pairs, ImageNet, logit standardisation, --set --------------------------

# every yaml of mdistiller configs/cifar100/dkd/ (a08d46f): its pair and the β it sets (8 = default)
CIFAR_CONFIGS = {
    ("cifar_resnet110", "cifar_resnet32"): 2.0, ("cifar_resnet56", "cifar_resnet20"): 2.0,
    ("cifar_resnet32x4", "cifar_resnet8x4"): 8.0, ("cifar_resnet32x4", "cifar_shufflenet_v1"): 8.0,
    ("cifar_resnet32x4", "cifar_shufflenet_v2"): 8.0, ("cifar_resnet50", "cifar_mobilenetv2"): 8.0,
    ("cifar_vgg13", "cifar_mobilenetv2"): 6.0, ("cifar_vgg13", "cifar_vgg8"): 6.0,
    ("cifar_wrn_40_2", "cifar_shufflenet_v1"): 8.0, ("cifar_wrn_40_2", "cifar_wrn_16_2"): 6.0,
    ("cifar_wrn_40_2", "cifar_wrn_40_1"): 6.0,
}


def _defaults(dataset="cifar100", teacher="cifar_resnet32x4", model="cifar_resnet8x4", **settings):
    """The method's settings as a run resolves them (kdzoo.build.validate: defaults, then --set)."""
    cfg = RunConfig(method="dkd", dataset=dataset, teacher=teacher, model=model, method_settings=settings)
    return vars(validate(cfg).config)


def test_config_defaults_are_the_official_cifar_setting():
    c = DKD.Config()
    assert (c.ce_weight, c.alpha, c.beta, c.temperature, c.warmup, c.logit_standardize) == (1.0, 1.0, 8.0, 4.0, 20, False)
    assert DKD.tasks == ("cls",) and DKD.needs_teacher and DKD.logits_only_teacher


@pytest.mark.parametrize("pair", list(CIFAR_CONFIGS), ids=["-".join(p) for p in CIFAR_CONFIGS])
def test_cifar_beta_per_pair(pair):
    c = _defaults(teacher=pair[0], model=pair[1])
    assert (c["beta"], c["alpha"], c["temperature"], c["warmup"], c["ce_weight"]) == (CIFAR_CONFIGS[pair], 1.0, 4.0, 20, 1.0)
    ls = _defaults(teacher=pair[0], model=pair[1], logit_standardize=True)
    assert (ls["alpha"], ls["beta"], ls["temperature"]) == (9.0, 9.0 * CIFAR_CONFIGS[pair], 2.0)


def test_imagenet_defaults():
    c = _defaults(dataset="imagefolder", teacher="resnet34", model="resnet18")
    assert (c["alpha"], c["beta"], c["temperature"], c["warmup"], c["ce_weight"]) == (1.0, 0.5, 1.0, 1, 1.0)
    assert _defaults(dataset="imagefolder", teacher="resnet50", model="mobilenetv1_100")["beta"] == 2.0
    # the CIFAR pair table does not apply on ImageNet, nor the ImageNet one elsewhere
    assert _defaults(dataset="imagefolder", teacher="cifar_resnet56", model="cifar_resnet20")["beta"] == 0.5
    assert _defaults(dataset="cifar100", teacher="resnet50", model="mobilenetv1_100")["beta"] == 8.0
    ls = _defaults(dataset="imagefolder", teacher="resnet34", model="resnet18", logit_standardize=True)
    assert (ls["alpha"], ls["beta"], ls["temperature"], ls["warmup"]) == (9.0, 4.5, 2.0, 1)


def test_the_switch_as_cli_strings_and_set_wins():
    # --set gives strings: "true" switches the companion weights on, "false" off
    assert _defaults(logit_standardize="true")["beta"] == 72.0
    assert _defaults(logit_standardize="false")["beta"] == 8.0
    # the user's --set is the final value (also under logit standardisation: not multiplied again)
    c = _defaults(teacher="cifar_resnet56", model="cifar_resnet20", beta="3", temperature="5", logit_standardize="on")
    assert (c["beta"], c["temperature"], c["alpha"], c["logit_standardize"]) == (3.0, 5.0, 9.0, True)
    with pytest.raises(UserError):
        _defaults(logit_standardize="maybe")


def test_validate_builds_the_method_from_recipe_defaults_and_set():
    cfg = RunConfig(method="dkd", dataset="imagefolder", model="resnet18", teacher="resnet34",
                    method_settings={"warmup": "3", "logit_standardize": "true"})
    c = validate(cfg).config
    assert (c.alpha, c.beta, c.temperature, c.warmup, c.logit_standardize) == (9.0, 4.5, 2.0, 3, True)


@pytest.mark.parametrize("key,value", [("beta", -1.0), ("alpha", -0.5), ("temperature", 0.0), ("warmup", -1),
                                       ("ce_weight", -1.0)])
def test_out_of_range_settings_are_refused(key, value):
    with pytest.raises(UserError, match=key):
        DKD(DKD.Config(**{key: value}))


# -- resume and the CLI -----------------------------------------------------------------------

@register_method("test_dkd_stop_at_4")
class DKDStopAtFour(DKD):
    """DKD that raises the stop flag at global step 4 (epoch 2 of 3-step epochs), the way SIGTERM does."""

    flag: StopFlag | None = None

    @dataclass
    class Config(DKD.Config):
        pass

    def loss(self, out):
        if out.step == 4 and DKDStopAtFour.flag is not None and not DKDStopAtFour.flag:
            DKDStopAtFour.flag.signal_name = "SIGTERM"
        return super().loss(out)


def test_stop_then_resume_matches_uninterrupted(tmp_path, quiet_console):
    settings = dict(method="test_dkd_stop_at_4", teacher="test_resnet", teacher_epochs=1, epochs=2,
                    train_size=48, test_size=32, method_settings={"warmup": 2})
    full = run(tiny_config(tmp_path, run_name="full", **settings), console=quiet_console)
    DKDStopAtFour.flag = StopFlag()
    try:
        with pytest.raises(Interrupted):
            run(tiny_config(tmp_path, run_name="cut", **settings), console=quiet_console, stop=DKDStopAtFour.flag)
    finally:
        DKDStopAtFour.flag = None
    resumed = run(tiny_config(tmp_path, run_name="cut", **settings), resume=True, console=quiet_console)
    assert resumed["final_train_loss"] == pytest.approx(full["final_train_loss"], rel=1e-6)
    cut = (tmp_path / "runs" / "cut" / "metrics.csv").read_text().splitlines()
    uncut = (tmp_path / "runs" / "full" / "metrics.csv").read_text().splitlines()
    header = cut[0].split(",")
    keep = [header.index(c) for c in ("train_loss", "train_tckd", "train_nckd", "test_loss")]
    assert [[r.split(",")[i] for i in keep] for r in cut[1:]] == [[r.split(",")[i] for i in keep] for r in uncut[1:]]
    assert len(cut) == 1 + 2  # header and the two epochs


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    return tmp_path_factory.mktemp("dkd-cli")  # shared, so each teacher is trained once


def _cli(output, student, teacher, *extra):
    return ["run", "--method", "dkd", "--model", student, "--teacher", teacher, "--input-size", "32",
            "--train-size", "32", "--test-size", "16", "--batch-size", "8", "--epochs", "1", "--max-steps", "2",
            "--device", "cpu", "--optimizer", "sgd", "--lr", "0.05", "--teacher-epochs", "1",
            "--output", str(output), "--run-name", f"dkd-{teacher}-{student}", *extra]


@pytest.mark.parametrize("teacher,student", [("test_resnet", "test_resnet"), ("test_resnet", "test_efficientnet"),
                                             ("test_resnet", "test_convnext"), ("test_convnext", "test_vit")])
def test_runs_from_the_cli(output, teacher, student):
    extra = ["--set", "logit_standardize=true"] if student == "test_vit" else []
    assert main(_cli(output, student, teacher, *extra)) == 0
    folder = output / f"dkd-{teacher}-{student}"
    result = json.loads((folder / "result.json").read_text())
    assert result["complete"] and result["steps"] == 2 and math.isfinite(result["final_train_loss"])
    header = (folder / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_ce", "train_tckd", "train_nckd"} <= set(header)
    if extra:
        recorded = json.loads((folder / "config.json").read_text())["method_config"]
        assert (recorded["alpha"], recorded["beta"], recorded["temperature"]) == (9.0, 72.0, 2.0)


def test_segmentation_is_refused(output, capsys):
    assert main([*_cli(output, "test_resnet", "test_resnet"), "--task", "seg", "--run-name", "dkd-seg"]) == 2
    assert "dkd" in capsys.readouterr().err
