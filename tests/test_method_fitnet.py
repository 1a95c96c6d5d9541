"""FitNet: the hint loss and every regressor shape against plain-loop references and RepDistiller's
numbers, layer pairing, gradients (student and regressor, never the teacher), the regressor's
exact --resume, recipe defaults and --set, and CLI runs."""

import json
import math

import pytest
import torch
from kdzoo.methods.fitnet import regressor_kind

from kdzoo.build import validate
from kdzoo.checkpoint import read_checkpoint
from kdzoo.cli import main
from kdzoo.config import RunConfig
from kdzoo.engine import Interrupted, StopFlag, run
from kdzoo.errors import UserError
from kdzoo.method import NetOutputs, StepOutputs
from kdzoo.models import ModelInfo
from kdzoo.registry import get_method, register_method

from .conftest import tiny_config
from .reference import mean_ce, mean_kl

FitNet = get_method("fitnet")


# -- plain-Python references (nested lists [b][c][h][w], explicit loops, float64) -------------------

def _conv(x, w, bias, stride, pad):
    """out[b][o][y][x] = bias[o] + Σ_i Σ_ky Σ_kx w[o][i][ky][kx] · x[b][i][y·s − p + ky][x·s − p + kx] (zeros outside)."""
    h, wd, kh, kw = len(x[0][0]), len(x[0][0][0]), len(w[0][0]), len(w[0][0][0])
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    out = []
    for xb in x:
        planes = []
        for o, wo in enumerate(w):
            plane = [[bias[o]] * ow for _ in range(oh)]
            for y in range(oh):
                for xx in range(ow):
                    for i, wi in enumerate(wo):
                        for ky in range(kh):
                            for kx in range(kw):
                                sy, sx = y * stride - pad + ky, xx * stride - pad + kx
                                if 0 <= sy < h and 0 <= sx < wd:
                                    plane[y][xx] += wi[ky][kx] * xb[i][sy][sx]
            planes.append(plane)
        out.append(planes)
    return out


def _conv_transposed(x, w, bias, stride, pad):
    """Scatter form: input pixel (y, x) adds w[i][o][ky][kx] · x to output (y·s − p + ky, x·s − p + kx)."""
    h, wd, k = len(x[0][0]), len(x[0][0][0]), len(w[0][0])
    oh, ow = (h - 1) * stride - 2 * pad + k, (wd - 1) * stride - 2 * pad + k
    out = []
    for xb in x:
        planes = [[[bias[o]] * ow for _ in range(oh)] for o in range(len(w[0]))]
        for i, wi in enumerate(w):
            for o in range(len(wi)):
                for y in range(h):
                    for xx in range(wd):
                        for ky in range(k):
                            for kx in range(k):
                                ty, tx = y * stride - pad + ky, xx * stride - pad + kx
                                if 0 <= ty < oh and 0 <= tx < ow:
                                    planes[o][ty][tx] += wi[o][ky][kx] * xb[i][y][xx]
        out.append(planes)
    return out


def _bilinear(x, oh, ow):
    """align_corners=False: source = (dst + 0.5) · in/out − 0.5, clamped at 0, edges replicated."""
    def coords(dst, n_in, n_out):
        src = max((dst + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(math.floor(src), n_in - 1)
        return i0, min(i0 + 1, n_in - 1), src - i0

    out = []
    for xb in x:
        planes = []
        for p in xb:
            h, w = len(p), len(p[0])
            plane = []
            for y in range(oh):
                y0, y1, fy = coords(y, h, oh)
                row = []
                for xx in range(ow):
                    x0, x1, fx = coords(xx, w, ow)
                    top, bottom = p[y0][x0] * (1 - fx) + p[y0][x1] * fx, p[y1][x0] * (1 - fx) + p[y1][x1] * fx
                    row.append(top * (1 - fy) + bottom * fy)
                plane.append(row)
            planes.append(plane)
        out.append(planes)
    return out


def _batch_norm_relu(x, gamma, beta, relu, eps=1e-5):
    """Training-mode batch norm (batch statistics, biased variance), then ReLU."""
    out = [[None] * len(x[0]) for _ in x]
    for c in range(len(x[0])):
        values = [v for xb in x for row in xb[c] for v in row]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / len(values)
        for b, xb in enumerate(x):
            plane = [[(v - mean) / math.sqrt(var + eps) * gamma[c] + beta[c] for v in row] for row in xb[c]]
            out[b][c] = [[max(v, 0.0) for v in row] for row in plane] if relu else plane
    return out


def _mse(a, t):
    diffs = [(u - v) ** 2 for ab, tb in zip(a, t) for ap, tp in zip(ab, tb) for ar, tr in zip(ap, tp)
             for u, v in zip(ar, tr)]
    return sum(diffs) / len(diffs)


def _reference_hint(method, s, t):
    """MSE(r(s), t) with every regressor kind written out as loops."""
    reg = method.regressor
    conv, bn = reg.proj[0], reg.proj[1]
    w = conv.weight.double().tolist()
    bias = conv.bias.double().tolist() if conv.bias is not None else [0.0] * bn.num_features
    x, th, tw = s.tolist(), t.shape[-2], t.shape[-1]
    if reg.kind == "stride2":
        y = _conv(x, w, bias, 2, 1)
    elif reg.kind == "transposed":
        y = _conv_transposed(x, w, bias, 2, 1)
    elif reg.kind == "valid":
        y = _conv(x, w, bias, 1, 0)
    else:
        y = _conv(_bilinear(x, th, tw), w, bias, 1, 0)
    y = _batch_norm_relu(y, bn.weight.double().tolist(), bn.bias.double().tolist(), reg.relu)
    return _mse(y, t.tolist())


# -- fixed inputs (the generation is the parity script's; see below) --------------------------------

def _randn(g, shape, scale=1.0, shift=0.0):
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift


def _info(name, shapes):
    return ModelInfo(name, 3, 32, {**shapes, "embedding": (7,), "logits": (3,)})


def _fixed(s_shape, t_shape, seed, config=None, teacher_grad=False):
    """Student/teacher stage1 maps and the regressor's parameters, drawn in the parity script's order."""
    g = torch.Generator().manual_seed(seed)
    s, t = _randn(g, s_shape), _randn(g, t_shape).relu()
    method = FitNet(config or FitNet.Config(hint_layer="stage1"))
    method.setup(_info("s", {"stage1": s_shape[1:]}), _info("t", {"stage1": t_shape[1:]}))
    proj = method.regressor.proj
    params = [proj[0].weight, proj[0].bias, proj[1].weight, proj[1].bias]
    with torch.no_grad():
        for p in params:
            if p is not None:
                p.copy_(_randn(g, p.shape, 0.5, 1.0))
    b = s_shape[0]
    logits, t_logits = _randn(g, (b, 3)).float(), _randn(g, (b, 3)).float()
    out = StepOutputs(NetOutputs(logits, {"stage1": s}), torch.arange(b) % 3,
                      teacher=NetOutputs(t_logits, {"stage1": t.requires_grad_(teacher_grad)}))
    return method, out


CASES = {  # name: (student map, teacher map, seed, regressor kind)
    "same": ((4, 3, 4, 4), (4, 5, 4, 4), 100, "valid"),
    "halve": ((4, 3, 8, 8), (4, 5, 4, 4), 101, "stride2"),
    "double": ((4, 3, 2, 2), (4, 5, 4, 4), 102, "transposed"),
    "shrink": ((4, 3, 6, 6), (4, 5, 4, 4), 103, "valid"),
}

# HobbitLong/RepDistiller@b84f547c5db6a35318d4671d7d5c4de74c822403, models/util.py ConvReg (train mode)
# followed by distiller_zoo/FitNet.py HintLoss, float64. Script: for each case in CASES order, with
# g = torch.Generator().manual_seed(seed): f_s = randn(s), f_t = randn(t).relu(), then ConvReg(s, t)'s
# conv.weight, conv.bias, bn.weight, bn.bias each set to randn(shape) * 0.5 + 1 (all randn float64 from g).
OFFICIAL = {
    "same": 1.8516193354677202,
    "halve": 1.3975621645593987,
    "double": 2.252182376690517,
    "shrink": 1.8373773616349223,
}


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_the_official_code(name):
    s_shape, t_shape, seed, kind = CASES[name]
    method, out = _fixed(s_shape, t_shape, seed)
    assert method.regressor.kind == kind
    assert method.hint_loss(out).item() == pytest.approx(OFFICIAL[name], rel=1e-5)
    assert method.loss(out)["hint"].item() == pytest.approx(100.0 * OFFICIAL[name], rel=1e-5)


@pytest.mark.parametrize("s_shape,t_shape,seed,relu", [
    ((4, 3, 4, 4), (4, 5, 4, 4), 1, True),
    ((4, 3, 8, 8), (4, 5, 4, 4), 2, True),
    ((2, 3, 2, 2), (2, 4, 4, 4), 3, False),
    ((3, 2, 5, 4), (3, 4, 2, 3), 4, True),   # non-square valid kernel (4, 2)
    ((3, 2, 3, 3), (3, 4, 4, 4), 5, True),   # 3 → 4: the resize fallback
    ((2, 3, 2, 6), (2, 2, 4, 4), 6, False),  # taller and narrower: the resize fallback
])
def test_loss_matches_the_loop_reference(s_shape, t_shape, seed, relu):
    config = FitNet.Config(hint_layer="stage1", relu=relu, hint_weight=3.0, ce_weight=0.5, kd_weight=0.25,
                           temperature=2.0)
    method, out = _fixed(s_shape, t_shape, seed, config)
    terms = method.loss(out)
    assert set(terms) == {"ce", "hint", "kd"} and all(v.dtype == torch.float32 for v in terms.values())
    assert terms["hint"].item() == pytest.approx(3.0 * _reference_hint(method, out.student.features["stage1"],
                                                                       out.teacher.features["stage1"]), rel=1e-5)
    logits, targets = out.student.logits.double().tolist(), out.targets.tolist()
    assert terms["ce"].item() == pytest.approx(0.5 * mean_ce(logits, targets), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(0.25 * 4.0 * mean_kl(logits, out.teacher.logits.double().tolist(), 2.0),
                                               rel=1e-5)


def test_no_kd_term_by_default():
    method, out = _fixed((4, 3, 4, 4), (4, 5, 4, 4), 1)
    assert set(method.loss(out)) == {"ce", "hint"}


@pytest.mark.parametrize("s,t,kind", [
    ((8, 32, 32), (16, 16, 16), "stride2"), ((8, 7, 7), (16, 4, 4), "valid"),  # 7 ≠ 2·4: as ConvReg, a 4×4 kernel
    ((8, 2, 2), (16, 4, 4), "transposed"), ((8, 16, 16), (16, 16, 16), "valid"),
    ((8, 9, 9), (16, 4, 4), "valid"), ((8, 2, 2), (16, 3, 3), "resize"), ((8, 4, 2), (16, 2, 4), "resize"),
])
def test_regressor_output_has_the_teacher_shape(s, t, kind):
    assert regressor_kind(s, t) == kind
    method = FitNet(FitNet.Config(hint_layer="stage1"))
    method.setup(_info("s", {"stage1": s}), _info("t", {"stage1": t}))
    y = method.regressor(torch.randn(2, *s), torch.randn(2, *t))
    assert tuple(y.shape[1:]) == t and (y >= 0).all()


# stage2 (C, H, W) of RepDistiller's networks at 32 px, as kdzoo's cifar_* models measure them
# (tests/test_cifar_models.py checks those shapes against the reference code)
CIFAR_STAGE2 = {"cifar_wrn_40_2": (64, 16, 16), "cifar_wrn_16_2": (64, 16, 16), "cifar_wrn_40_1": (32, 16, 16),
                "cifar_resnet20": (32, 16, 16), "cifar_resnet32x4": (128, 16, 16), "cifar_resnet8x4": (128, 16, 16),
                "cifar_vgg13": (256, 8, 8), "cifar_vgg8": (256, 8, 8), "cifar_mobilenetv2": (16, 8, 8),
                "cifar_resnet50": (512, 16, 16), "cifar_shufflenet_v1": (480, 8, 8), "cifar_shufflenet_v2": (232, 8, 8)}


@pytest.mark.parametrize("teacher,student,kind", [
    ("cifar_wrn_40_2", "cifar_wrn_16_2", "valid"), ("cifar_wrn_40_2", "cifar_wrn_40_1", "valid"),
    ("cifar_resnet32x4", "cifar_resnet8x4", "valid"), ("cifar_vgg13", "cifar_vgg8", "valid"),
    ("cifar_vgg13", "cifar_mobilenetv2", "valid"), ("cifar_resnet50", "cifar_mobilenetv2", "transposed"),
    ("cifar_resnet50", "cifar_vgg8", "transposed"), ("cifar_resnet32x4", "cifar_shufflenet_v1", "transposed"),
    ("cifar_resnet32x4", "cifar_shufflenet_v2", "transposed"), ("cifar_wrn_40_2", "cifar_shufflenet_v1", "transposed"),
])
def test_every_pair_of_the_official_table_uses_convreg(teacher, student, kind):
    """The pairs of RepDistiller's table all map through ConvReg's own convolutions, never the resize fallback."""
    assert regressor_kind(CIFAR_STAGE2[student], CIFAR_STAGE2[teacher]) == kind


# -- gradients ----------------------------------------------------------------------------------------

def test_gradients_reach_student_and_regressor_never_the_teacher():
    method, out = _fixed((4, 3, 8, 8), (4, 5, 4, 4), 7, teacher_grad=True)
    out.student.features["stage1"].requires_grad_(True)
    method.loss(out)["hint"].backward()
    assert out.student.features["stage1"].grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.regressor.parameters())
    assert out.teacher.features["stage1"].grad is None


def test_matching_maps_through_an_identity_regressor_give_zero():
    method = FitNet(FitNet.Config(hint_layer="stage1", relu=False))
    method.setup(_info("s", {"stage1": (3, 4, 4)}), _info("t", {"stage1": (3, 4, 4)}))
    method.regressor.eval()  # running stats 0 / 1: batch norm is the identity up to its eps
    with torch.no_grad():
        method.regressor.proj[0].weight.copy_(torch.eye(3)[:, :, None, None])
        method.regressor.proj[0].bias.zero_()
    f = torch.randn(2, 3, 4, 4)
    out = StepOutputs(NetOutputs(torch.zeros(2, 3), {"stage1": f}), torch.tensor([0, 1]),
                      teacher=NetOutputs(torch.zeros(2, 3), {"stage1": f / math.sqrt(1 + 1e-5)}))
    assert method.hint_loss(out).item() == pytest.approx(0.0, abs=1e-10)


# -- layers and settings ----------------------------------------------------------------------------------

def test_hint_layer_pairs_and_taps():
    shapes_s = {"stage1": (3, 8, 8), "stage2": (4, 4, 4), "stage3": (5, 2, 2)}
    shapes_t = {"stage1": (6, 8, 8), "stage2": (7, 4, 4), "stage3": (8, 2, 2), "stage4": (9, 1, 1)}
    for spec, pair, taps in [("stage2", ("stage2", "stage2"), (("stage2",), ("stage2",))),
                             ("stage3:stage4", ("stage3", "stage4"), (("stage3",), ("stage4",))),
                             ("last", ("stage3", "stage4"), (("stages",), ("stages",)))]:
        method = FitNet(FitNet.Config(hint_layer=spec))
        assert (method.taps.student, method.taps.teacher) == taps
        method.setup(_info("s", shapes_s), _info("t", shapes_t))
        assert method.pair == pair and method.taps.student == (pair[0],) and method.taps.teacher == (pair[1],)
        assert method.regressor.proj[1].num_features == shapes_t[pair[1]][0]


@pytest.mark.parametrize("changes,match", [
    ({"hint_layer": "layer2"}, "not understood"), ({"hint_layer": "stage1:stage2:stage3"}, "not understood"),
    ({"hint_weight": -1.0}, "hint_weight"), ({"temperature": 0.0}, "temperature"), ({"ce_weight": -0.1}, "ce_weight"),
])
def test_bad_settings_are_refused(changes, match):
    with pytest.raises(UserError, match=match):
        FitNet(FitNet.Config(**changes))


def test_missing_stage_is_a_user_error():
    with pytest.raises(UserError, match="no stage5"):
        FitNet(FitNet.Config(hint_layer="stage5")).setup(_info("s", {"stage1": (3, 4, 4)}),
                                                         _info("t", {"stage1": (3, 4, 4)}))


def _resolved(dataset="shapes", **settings):
    return validate(RunConfig(method="fitnet", dataset=dataset, model="cifar_resnet8x4", teacher="cifar_resnet32x4",
                              method_settings=settings)).config


def test_recipe_defaults_and_set_wins():
    # RepDistiller scripts/run_cifar_distill.sh: --distill hint -a 0 -b 100 (-r 1, --hint_layer 2 by default)
    c = _resolved()
    assert (c.hint_layer, c.hint_weight, c.ce_weight, c.kd_weight, c.relu) == ("stage2", 100.0, 1.0, 0.0, True)
    assert _resolved("imagefolder") == c  # no official one-stage ImageNet setting: the CIFAR values
    mine = _resolved("imagefolder", hint_layer="stage3:stage4", hint_weight="5", relu="false")
    assert (mine.hint_layer, mine.hint_weight, mine.relu) == ("stage3:stage4", 5.0, False)


# -- the regressor survives a stop and --resume exactly ----------------------------------------------------

@register_method("test_fitnet_stop_after_2")
class FitNetStopAfterTwo(FitNet):
    """FitNet that raises the stop flag at step 2 (the first of epoch 1, 2-step epochs), the way SIGTERM does."""

    flag: StopFlag | None = None

    def loss(self, out):
        if out.step == 2 and FitNetStopAfterTwo.flag is not None and not FitNetStopAfterTwo.flag:
            FitNetStopAfterTwo.flag.signal_name = "SIGTERM"
        return super().loss(out)


def test_regressor_survives_stop_and_resume_exactly(tmp_path, quiet_console):
    settings = dict(method="test_fitnet_stop_after_2", teacher="test_resnet", teacher_epochs=1, train_size=8,
                    test_size=4, batch_size=4, epochs=2, lr=0.5)
    full = run(tiny_config(tmp_path, run_name="full", **settings), console=quiet_console)
    FitNetStopAfterTwo.flag = StopFlag()
    try:
        with pytest.raises(Interrupted):
            run(tiny_config(tmp_path, run_name="cut", **settings), console=quiet_console, stop=FitNetStopAfterTwo.flag)
    finally:
        FitNetStopAfterTwo.flag = None
    cut = read_checkpoint(tmp_path / "runs" / "cut" / "last.pt")["method"]
    resumed = run(tiny_config(tmp_path, run_name="cut", **settings), resume=True, console=quiet_console)
    a = read_checkpoint(tmp_path / "runs" / "full" / "last.pt")["method"]
    b = read_checkpoint(tmp_path / "runs" / "cut" / "last.pt")["method"]
    keys = [k for k in a if k.startswith("regressor.")]
    assert "regressor.proj.1.running_mean" in keys and set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["regressor.proj.0.weight"], cut["regressor.proj.0.weight"])  # training went on
    assert resumed["final_train_loss"] == pytest.approx(full["final_train_loss"], rel=1e-6)


# -- CLI ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_output(tmp_path_factory):
    """One output folder for the module's CLI runs: each teacher is trained once and then cached."""
    return tmp_path_factory.mktemp("fitnet-cli")


def _cli(output, student, teacher, *extra):
    name = f"fitnet-{teacher}-{student}"
    args = ["run", "--method", "fitnet", "--model", student, "--teacher", teacher, "--input-size", "32",
            "--train-size", "32", "--test-size", "16", "--batch-size", "8", "--epochs", "1", "--max-steps", "2",
            "--device", "cpu", "--optimizer", "sgd", "--lr", "0.05", "--teacher-epochs", "1",
            "--output", str(output), "--run-name", name, *extra]
    return main(args), output / name


@pytest.mark.parametrize("student,teacher", [("test_resnet", "test_resnet"), ("test_efficientnet", "test_resnet"),
                                             ("test_convnext", "test_resnet"), ("test_vit", "test_convnext")])
def test_cli_runs(shared_output, student, teacher):
    code, folder = _cli(shared_output, student, teacher)
    assert code == 0
    result = json.loads((folder / "result.json").read_text())
    assert result["complete"] and result["steps"] == 2 and math.isfinite(result["final_train_loss"])


def test_cli_refuses_segmentation(tmp_path, capsys):
    code, _ = _cli(tmp_path, "test_resnet", "test_resnet", "--task", "seg")
    assert code == 2
    assert "fitnet" in capsys.readouterr().err
