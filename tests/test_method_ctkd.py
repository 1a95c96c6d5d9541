"""CTKD: the learned, gradient-reversed temperature against a float64 loop reference and the official
code's numbers, the λ curriculum at its boundaries, θ's optimiser group, any logit method as the
base, recipe defaults (CIFAR, ImageNet, LS) and --set, exact --resume of θ, and CLI runs."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from kdzoo.methods._logit import LogitMethod
from kdzoo.methods.ctkd import reversal_strength

from kdzoo.build import validate
from kdzoo.checkpoint import read_checkpoint
from kdzoo.cli import main
from kdzoo.config import RunConfig
from kdzoo.engine import Interrupted, StopFlag, run
from kdzoo.errors import UserError
from kdzoo.losses import softened_kl
from kdzoo.method import NetOutputs, StepOutputs
from kdzoo.optim import build_optimizer, split_method_groups
from kdzoo.registry import get_method, register_method

from .conftest import tiny_config

CTKD = get_method("ctkd")


def _ctkd(**changes):
    return CTKD(CTKD.Config(**changes))


def _step(s, t, y, epoch=0):
    return StepOutputs(NetOutputs(s), y, NetOutputs(t), epoch=epoch)


# -- independent float64 reference: plain loops over classes, numerical derivative in τ --------

def _ref_kd(s, t, tau, standardize=False):
    """τ² · mean over rows of Σ_k p_t log(p_t / p_s), explicit loops, float64."""
    def z(row):
        if not standardize:
            return row
        mean = sum(row) / len(row)
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
        return [(v - mean) / (std + 1e-7) for v in row]

    def softmax(row):
        m = max(v / tau for v in row)
        e = [math.exp(v / tau - m) for v in row]
        return [v / sum(e) for v in e]

    total = 0.0
    for rs, rt in zip(s, t):
        ps, pt = softmax(z(rs)), softmax(z(rt))
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    return tau**2 * total / len(s)


def _ref_ce(s, y):
    total = 0.0
    for row, label in zip(s, y):
        m = max(row)
        total += -(row[label] - m - math.log(sum(math.exp(v - m) for v in row)))
    return total / len(s)


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_loss_and_temperature_gradient_match_a_float64_reference():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(7, 6, generator=g) * 4, torch.randn(7, 6, generator=g) * 4
    t[0] = 0.0  # a uniform teacher row
    t[1, 2] = 30.0  # a near one-hot teacher row
    y = torch.tensor([0, 1, 2, 3, 4, 5, 0])
    for epoch, theta0 in ((0, 1.0), (3, -0.7), (12, 2.5)):
        m = _ctkd(temperature_init=theta0)
        tau = 1 + 20 * _sigmoid(theta0)
        lam = (1 - math.cos(min(epoch + 1, 10) * math.pi / 10)) / 2
        terms = m.loss(_step(s, t, y, epoch))
        sum(terms.values()).backward()
        ls, lt, ly = s.tolist(), t.tolist(), y.tolist()
        assert terms["kd"].item() == pytest.approx(0.9 * _ref_kd(ls, lt, tau), rel=1e-5)
        assert terms["ce"].item() == pytest.approx(0.1 * _ref_ce(ls, ly), rel=1e-5)
        h = 1e-5  # dL/dτ by central differences of the reference, then the chain rule and −λ
        dl_dtau = 0.9 * (_ref_kd(ls, lt, tau + h) - _ref_kd(ls, lt, tau - h)) / (2 * h)
        expected = -lam * dl_dtau * 20 * _sigmoid(theta0) * (1 - _sigmoid(theta0))
        assert m.theta.grad.item() == pytest.approx(expected, rel=1e-3, abs=1e-9)
        assert m.base.step_temperature is None  # cleared after the step


def test_temperature_range_and_reversal_sign():
    m = _ctkd(t_start=2.0, t_end=3.0, temperature_init=0.0)
    tau = m.curriculum_temperature(epoch=20)
    assert tau.dim() == 0 and tau.item() == pytest.approx(3.5)
    tau.backward()  # d τ / d θ = t_end σ'(0) = 0.75, reversed with λ = 1
    assert m.theta.grad.item() == pytest.approx(-0.75)
    for theta in (-50.0, 50.0):
        assert 2.0 <= _ctkd(t_start=2.0, t_end=3.0, temperature_init=theta).curriculum_temperature(0).item() <= 5.0


# -- parity with the official code ----------------------------------------------------------------
# /tmp/official-ctkd/run.py: zhengli97/CTKD @ 7d5252241259ae70d38a832371fed9697d15fc14 —
# models/temp_global.py (Global_T, GradientReversalFunction), distiller_zoo/KD.py (DistillKL),
# train_student.py (CosineDecay(max_value=0, min_value=-1, num_loops=10)), helper/loops.py
# (temp = 1 + 20 * sigmoid(mlp(...)); loss = 0.1 * CE + alpha * KL) — and
# sunshangquan/logit-standardization-KD @ f6e5aa5172bad618e801163c3385322eea673754,
# CTKD/distiller_zoo/KD.py (DistillKL_logit_stand, alpha = 9). Inputs, float64:
# torch.manual_seed(0); s = torch.randn(6, 10) * 3; t = torch.randn(6, 10) * 3; y = [0, 3, 9, 2, 2, 7];
# Global_T's θ = 1 (its init) and, filled in by the script, −2.
# Columns: θ, official epoch, decay_value, temp, loss, global_T.grad, d loss / d s[1, 3].
OFFICIAL = {
    "kd": [(1.0, 1, -0.02447174185242318, 15.621171572600097, 6.484439449785583, -0.0010489920970764258, -0.11349242904536044),
           (1.0, 2, -0.09549150281252627, 15.621171572600097, 6.484439449785583, -0.004093285733086162, -0.11349242904536044),
           (1.0, 5, -0.5, 15.621171572600097, 6.484439449785583, -0.02143272234976921, -0.11349242904536044),
           (1.0, 10, -1.0, 15.621171572600097, 6.484439449785583, -0.04286544469953842, -0.11349242904536044),
           (1.0, 11, -1.0, 15.621171572600097, 6.484439449785583, -0.04286544469953842, -0.11349242904536044),
           (-2.0, 1, -0.02447174185242318, 3.384058440442351, 5.764741883152315, -0.015737440404072173, -0.10338280319337897),
           (-2.0, 10, -1.0, 3.384058440442351, 5.764741883152315, -0.6430862379546497, -0.10338280319337897)],
    "ls": [(1.0, 1, -0.02447174185242318, 15.621171572600097, 7.323835569749594, -0.0001201494001323088, -0.08370621179629284),
           (1.0, 5, -0.5, 15.621171572600097, 7.323835569749594, -0.002454859994373708, -0.08370621179629284),
           (1.0, 11, -1.0, 15.621171572600097, 7.323835569749594, -0.004909719988747416, -0.08370621179629284),
           (-2.0, 1, -0.02447174185242318, 3.384058440442351, 7.210555231464822, -0.0030334844228094523, -0.07920028613514976),
           (-2.0, 10, -1.0, 3.384058440442351, 7.210555231464822, -0.12395866387864328, -0.07920028613514976)],
}


@pytest.mark.parametrize("variant", ["kd", "ls"])
def test_parity_with_the_official_code(variant):
    torch.manual_seed(0)
    s = torch.randn(6, 10, dtype=torch.float64) * 3
    t = torch.randn(6, 10, dtype=torch.float64) * 3
    y = torch.tensor([0, 3, 9, 2, 2, 7])
    if variant == "ls":  # through the run's recipe: LS brings kd's τ = 2 (unused here) and kd_weight 9
        m = validate(RunConfig(method="ctkd", model="test_resnet", teacher="test_resnet",
                               method_settings={"logit_standardize": "true"}))
        assert m.base.config.logit_standardize and m.base.config.kd_weight == 9.0
    else:
        m = CTKD()
    for theta, epoch, decay, temp, loss, theta_grad, s_grad in OFFICIAL[variant]:
        with torch.no_grad():
            m.theta.fill_(theta)
        assert -m.reversal(epoch - 1) == pytest.approx(decay, abs=1e-12)  # kdzoo's epochs count from 0
        assert m.curriculum_temperature(epoch - 1).item() == pytest.approx(temp, rel=1e-6)
        m.theta.grad = None
        logits = s.clone().requires_grad_(True)
        terms = m.loss(_step(logits, t, y, epoch - 1))
        total = sum(terms.values())
        total.backward()
        # kdzoo's KL runs in float32. At τ ≈ 15.6 (θ = 1) the soft targets are nearly uniform: the KL is
        # small next to τ², and its τ-derivative cancels further. Run in float32, the official code itself
        # moves from its float64 numbers by 1.4e-5 (LS loss) and 1.1e-2 (LS θ gradient), relative: those two
        # are checked to 2e-5 and 2e-2 relative, every other loss to 1e-5 relative, gradients to 1e-5.
        assert total.item() == pytest.approx(loss, rel=2e-5 if (variant, theta) == ("ls", 1.0) else 1e-5)
        if (variant, theta) == ("ls", 1.0):
            assert m.theta.grad.item() == pytest.approx(theta_grad, rel=2e-2)
        else:
            assert m.theta.grad.item() == pytest.approx(theta_grad, abs=1e-5)
        assert logits.grad[1, 3].item() == pytest.approx(s_grad, abs=1e-5)


# -- the λ curriculum -------------------------------------------------------------------------------

def test_reversal_curriculum_boundaries():
    m = CTKD()  # N = 10, official epochs 1…: λ = (1 − cos(π e / N)) / 2, e = kdzoo epoch + 1
    assert reversal_strength(0, 0.0, 1.0, 10) == 0.0
    assert m.reversal(0) == pytest.approx(0.02447174185242318, abs=1e-15)
    assert m.reversal(4) == pytest.approx(0.5, abs=1e-15)
    assert m.reversal(8) < 1.0 and m.reversal(9) == 1.0 and m.reversal(100) == 1.0
    values = [m.reversal(e) for e in range(12)]
    assert values == sorted(values)
    short = _ctkd(lambda_epochs=5, lambda_min=0.2, lambda_max=0.6)
    assert short.reversal(1) == pytest.approx(0.2 + 0.4 * (1 - math.cos(2 * math.pi / 5)) / 2)
    assert short.reversal(4) == pytest.approx(0.6) and short.reversal(5) == pytest.approx(0.6)


def test_theta_gradient_scales_with_the_epoch():
    g = torch.Generator().manual_seed(1)
    s, t, y = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g) * 3, torch.tensor([0, 1, 2, 3])
    grads = []
    for epoch in (0, 4, 9):
        m = CTKD()
        sum(m.loss(_step(s, t, y, epoch)).values()).backward()
        grads.append(m.theta.grad.item())
    assert grads[1] / grads[2] == pytest.approx(0.5, rel=1e-6)
    assert grads[0] / grads[2] == pytest.approx(0.02447174185242318, rel=1e-6)


# -- gradient flow, optimiser group --------------------------------------------------------------

def test_gradients_reach_student_and_theta_never_the_teacher():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(5, 4, generator=g, requires_grad=True)
    t = torch.randn(5, 4, generator=g, requires_grad=True)
    m = CTKD()
    sum(m.loss(_step(s, t, torch.tensor([0, 1, 2, 3, 0]), 3)).values()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert m.theta.grad is not None and m.theta.grad.item() != 0
    assert t.grad is None


def test_step_temperature_is_cleared_when_the_base_fails():
    m = CTKD()
    with pytest.raises((IndexError, RuntimeError)):  # a label beyond the 3 classes: the base's CE fails
        m.loss(_step(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 7])))
    assert m.base.step_temperature is None


def test_theta_is_an_sgd_parameter_with_weight_decay():
    m = CTKD()
    assert m.extra_parameter_count() == 1
    plain, groups = split_method_groups(m, [])
    assert plain == [] and groups == [{"params": [m.theta], "weight_decay": 5e-4}]
    cfg = tiny_config(Path("/nonexistent"), nesterov=False).resolved()  # SGD, lr 0.1, momentum 0.9
    opt = build_optimizer(plain, cfg, groups)
    g = torch.Generator().manual_seed(3)
    sum(m.loss(_step(torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.tensor([0, 1, 2]), 9)).values()).backward()
    grad = m.theta.grad.item()
    opt.step()
    assert m.theta.item() == pytest.approx(1.0 - 0.1 * (grad + 5e-4 * 1.0), rel=1e-6)


# -- any logit method as the base ---------------------------------------------------------------

@register_method("test_ctkd_scaled_base")
class ScaledBase(LogitMethod):
    """A toy logit method: 2·softened KL at self.temperature(), with a trainable scale."""

    @dataclass
    class Config:
        temperature: float = 3.0
        factor: float = 2.0

    def setup(self, student, teacher):
        self.scale = torch.nn.Parameter(torch.ones(()))

    def loss(self, out):
        return {"kd": self.config.factor * self.scale * softened_kl(out.student.logits, out.teacher.logits,
                                                                    self.temperature())}


def test_any_logit_method_with_a_temperature_is_a_base():
    m = _ctkd(base="test_ctkd_scaled_base", base_settings="factor=5")
    assert m.base.config.factor == 5.0 and m.config.base_settings == {"factor": "5"}
    m.setup(None, None)
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    terms = m.loss(_step(s, t, torch.tensor([0, 1, 2]), 9))
    tau = m.curriculum_temperature(9).item()
    assert terms["kd"].item() == pytest.approx(5 * _ref_kd(s.tolist(), t.tolist(), tau), rel=1e-5)
    # the base's own trainable extras are in the optimiser too
    plain, groups = split_method_groups(m, [])
    assert [p for p in plain] == [m.base.scale] and groups[0]["params"] == [m.theta]
    with pytest.raises(UserError, match="logit_standardize"):
        _ctkd(base="test_ctkd_scaled_base", logit_standardize=True)


@pytest.mark.parametrize("changes,match", [
    ({"base": "relational_kd"}, "not a logit method"),
    ({"base": "ctkd"}, "not a logit method"),
    ({"base": "no_such_method"}, "unknown method"),
    ({"base_settings": "kd_weigth=1"}, "kd_weigth"),
    ({"base_settings": "kd_weight"}, "key=value"),
    ({"base_settings": "logit_standardize=true"}, "on ctkd itself"),
    ({"lambda_min": 0.8, "lambda_max": 0.2}, "lambda_min"),
    ({"t_end": 0.0}, "t_end"),
    ({"lambda_epochs": 0}, "lambda_epochs"),
])
def test_bad_settings_are_refused(changes, match):
    with pytest.raises(UserError, match=match):
        _ctkd(**changes)


# -- recipe defaults -------------------------------------------------------------------------------

def _resolved(dataset="shapes", **settings):
    return validate(RunConfig(method="ctkd", dataset=dataset, model="test_resnet", teacher="test_resnet",
                              method_settings=settings))


def test_recipe_defaults_cifar_imagenet_ls_and_set_wins():
    cifar = _resolved()
    assert (cifar.config.lambda_epochs, cifar.config.temperature_weight_decay) == (10, 5e-4)
    assert (cifar.base.config.ce_weight, cifar.base.config.kd_weight) == (0.1, 0.9)
    assert not cifar.base.config.logit_standardize
    imagenet = _resolved("imagefolder")  # scripts/run_imagenet_distill.sh: -r 1 -a 1, decay_loops 5, wd 1e-4
    assert (imagenet.config.lambda_epochs, imagenet.config.temperature_weight_decay) == (5, 1e-4)
    assert (imagenet.base.config.ce_weight, imagenet.base.config.kd_weight) == (1.0, 1.0)
    assert imagenet.config.base_defaults["kd_weight"] == 1.0  # recorded in the run's method settings
    ls = _resolved(logit_standardize="true")  # LS repo CTKD/scripts/run_cifar_distill.sh: -r 0.1 -a 9
    assert ls.base.config.logit_standardize and (ls.base.config.ce_weight, ls.base.config.kd_weight) == (0.1, 9.0)
    ls_imagenet = _resolved("imagefolder", logit_standardize="true")  # its ImageNet script: -r 1 -a 2
    assert (ls_imagenet.base.config.ce_weight, ls_imagenet.base.config.kd_weight) == (1.0, 2.0)
    mine = _resolved("imagefolder", lambda_epochs="7", base_settings="kd_weight=3,ce_weight=0.25")
    assert mine.config.lambda_epochs == 7
    assert (mine.base.config.ce_weight, mine.base.config.kd_weight) == (0.25, 3.0)
    table = _resolved(base_settings={"kd_weight": 4.0})  # a TOML [method_settings] table
    assert table.base.config.kd_weight == 4.0


# -- exact resume of θ and CLI runs ------------------------------------------------------------

@register_method("test_ctkd_stop_after_2")
class CTKDStopAfterFive(CTKD):
    """CTKD that raises the stop flag at step 2 (the first of epoch 1, 2-step epochs), the way SIGTERM does."""

    flag: StopFlag | None = None

    def loss(self, out):
        if out.step == 2 and CTKDStopAfterFive.flag is not None and not CTKDStopAfterFive.flag:
            CTKDStopAfterFive.flag.signal_name = "SIGTERM"
        return super().loss(out)


def test_theta_survives_stop_and_resume_exactly(tmp_path, quiet_console):
    settings = dict(method="test_ctkd_stop_after_2", teacher="test_resnet", teacher_epochs=1, train_size=16,
                    test_size=8, batch_size=8, epochs=2, lr=0.5, method_settings={"lambda_epochs": "2"})
    full = run(tiny_config(tmp_path, run_name="full", **settings), console=quiet_console)
    CTKDStopAfterFive.flag = StopFlag()
    try:
        with pytest.raises(Interrupted):
            run(tiny_config(tmp_path, run_name="cut", **settings), console=quiet_console, stop=CTKDStopAfterFive.flag)
    finally:
        CTKDStopAfterFive.flag = None
    cut_state = read_checkpoint(tmp_path / "runs" / "cut" / "last.pt")
    assert cut_state["global_step"] == 3 and cut_state["method"]["theta"].item() != 1.0
    resumed = run(tiny_config(tmp_path, run_name="cut", **settings), resume=True, console=quiet_console)
    a = read_checkpoint(tmp_path / "runs" / "full" / "last.pt")["method"]["theta"]
    b = read_checkpoint(tmp_path / "runs" / "cut" / "last.pt")["method"]["theta"]
    assert torch.equal(a, b) and a.item() != cut_state["method"]["theta"].item()
    assert resumed["final_train_loss"] == pytest.approx(full["final_train_loss"], rel=1e-6)
    assert resumed["top1"] == full["top1"]


@pytest.fixture(scope="module")
def shared_output(tmp_path_factory):
    """One output folder for the module's CLI runs: each teacher is trained once and then cached."""
    return tmp_path_factory.mktemp("ctkd-cli")


def _cli(tmp_path, student, teacher, *extra):
    name = f"ctkd-{teacher}-{student}"
    args = ["run", "--method", "ctkd", "--model", student, "--teacher", teacher, "--input-size", "32",
            "--train-size", "32", "--test-size", "16", "--batch-size", "8", "--epochs", "1", "--max-steps", "2",
            "--device", "cpu", "--optimizer", "sgd", "--lr", "0.05", "--teacher-epochs", "1",
            "--output", str(tmp_path), "--run-name", name, *extra]
    code = main(args)
    return code, (tmp_path / name)


@pytest.mark.parametrize("student,teacher", [("test_resnet", "test_resnet"), ("test_efficientnet", "test_resnet"),
                                             ("test_convnext", "test_resnet"), ("test_vit", "test_convnext")])
def test_cli_runs(shared_output, student, teacher):
    code, folder = _cli(shared_output, student, teacher, "--set", "logit_standardize=true")
    assert code == 0
    result = json.loads((folder / "result.json").read_text())
    assert result["complete"] and result["steps"] == 2 and math.isfinite(result["final_train_loss"])
    config = json.loads((folder / "config.json").read_text())["method_config"]
    assert config["logit_standardize"] is True and config["base_defaults"]["kd_weight"] == 9.0


def test_cli_refuses_segmentation(tmp_path, capsys):
    code, _ = _cli(tmp_path, "test_resnet", "test_resnet", "--task", "seg")
    assert code == 2
    assert "ctkd" in capsys.readouterr().err
