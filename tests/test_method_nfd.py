"""NFD: standardisation and loss against plain-loop references, layer pairing by name, gradient
flow to the student and adapters (never the teacher) and heterogeneous networks (the short run
is in test_methods_train.py)."""

import math

import pytest
import torch

from kdzoo import losses
from kdzoo.errors import UserError
from kdzoo.hooks import FeatureTaps
from kdzoo.method import NetOutputs, StepOutputs
from kdzoo.models import ModelInfo, create_model, model_info
from kdzoo.registry import get_method
from kdzoo.settings import apply_overrides

from .reference import conv1x1, mean_ce, mean_kl

NFD = get_method("nfd")


# -- plain-Python references (nested lists [b][c][h][w], explicit loops; shared: tests/reference.py)

def _bilinear_plane(plane, height, width):
    """align_corners=False: source = (dst + 0.5) · in/out − 0.5, clamped at 0, edge-replicated."""
    h0, w0 = len(plane), len(plane[0])

    def coords(dst, n_in, n_out):
        src = max((dst + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    out = []
    for y in range(height):
        y0, y1, fy = coords(y, h0, height)
        row = []
        for x in range(width):
            x0, x1, fx = coords(x, w0, width)
            top = plane[y0][x0] * (1 - fx) + plane[y0][x1] * fx
            bottom = plane[y1][x0] * (1 - fx) + plane[y1][x1] * fx
            row.append(top * (1 - fy) + bottom * fy)
        out.append(row)
    return out


def _standardize(f, eps):
    out = []
    for b in range(len(f)):
        planes = []
        for c in range(len(f[b])):
            values = [v for row in f[b][c] for v in row]
            n = len(values)
            mean = sum(values) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
            planes.append([[(v - mean) / (std + eps) for v in row] for row in f[b][c]])
        out.append(planes)
    return out


def _ref_layer(s, weight, t, eps):
    proj = conv1x1(s, weight)
    h, w = len(proj[0][0]), len(proj[0][0][0])
    resized = [[_bilinear_plane(plane, h, w) for plane in tb] for tb in t]
    ns, nt = _standardize(proj, eps), _standardize(resized, eps)
    total = 0.0
    for b in range(len(ns)):
        for c in range(len(ns[b])):
            for y in range(h):
                for x in range(w):
                    total += (nt[b][c][y][x] - ns[b][c][y][x]) ** 2
    return total / (h * w) / len(ns)


# -- a fixed toy pair: every resize path (same size, shrink 6→3, grow 2→3) and 1×1 stages --------

S_SHAPES = {"stage1": (2, 4, 4), "stage2": (3, 3, 3), "stage3": (4, 1, 1)}
T_SHAPES = {"stage1": (3, 4, 4), "stage2": (2, 6, 6), "stage3": (5, 2, 2), "stage4": (6, 1, 1)}
B = 2


def _info(name, shapes):
    return ModelInfo(name, 3, 16, {**shapes, "embedding": (7,), "logits": (3,)})


def _toy(config, teacher_grad=False):
    g = torch.Generator().manual_seed(0)
    student = {k: torch.randn(B, *v, generator=g) for k, v in S_SHAPES.items()}
    teacher = {k: (3.0 * torch.randn(B, *v, generator=g) + 1.0).requires_grad_(teacher_grad)
               for k, v in T_SHAPES.items()}
    logits, t_logits = torch.randn(B, 3, generator=g), torch.randn(B, 3, generator=g)
    targets = torch.tensor([2, 0])
    method = NFD(config)
    method.setup(_info("s", S_SHAPES), _info("t", T_SHAPES))
    with torch.no_grad():
        for adapter in method.adapters:
            adapter.weight.copy_(torch.randn(adapter.weight.shape, generator=g))
    out = StepOutputs(NetOutputs(logits, student), targets, teacher=NetOutputs(t_logits, teacher))
    return method, out


def _expected(method, out, config):
    nfd = 0.0
    for (s_name, t_name), adapter in zip(method.pairs, method.adapters):
        nfd += _ref_layer(out.student.features[s_name].tolist(), adapter.weight[:, :, 0, 0].tolist(),
                          out.teacher.features[t_name].detach().tolist(), config.eps)
    logits, targets = out.student.logits.tolist(), out.targets.tolist()
    expected = {"ce": config.ce_weight * mean_ce(logits, targets), "nfd": config.nfd_weight * nfd}
    if config.kd_weight > 0:
        expected["kd"] = config.kd_weight * config.temperature**2 * mean_kl(
            logits, out.teacher.logits.tolist(), config.temperature)
    return expected


@pytest.mark.parametrize("layers,pairs", [
    (("last",), [("stage2", "stage3")]),
    (("stage1", "stage2", "last"), [("stage1", "stage1"), ("stage2", "stage2"), ("stage2", "stage3")]),
    (("stage1:stage3", "stage2:stage1"), [("stage1", "stage3"), ("stage2", "stage1")]),
])
def test_loss_matches_loop_reference(layers, pairs):
    config = NFD.Config(layers=layers, nfd_weight=0.37, ce_weight=0.8, eps=1e-3)
    method, out = _toy(config)
    assert method.pairs == pairs
    assert [tuple(a.weight.shape[:2]) for a in method.adapters] == [
        (T_SHAPES[t][0], S_SHAPES[s][0]) for s, t in pairs]
    terms = method.loss(out)
    expected = _expected(method, out, config)
    assert set(terms) == set(expected) == {"ce", "nfd"}
    for name, value in expected.items():
        assert terms[name].dtype == torch.float32
        assert terms[name].item() == pytest.approx(value, abs=1e-5, rel=1e-6), name


def test_defaults_and_optional_kd_term():
    c = NFD.Config()
    assert (c.layers, c.nfd_weight, c.eps, c.ce_weight, c.kd_weight, c.temperature) == (
        ("last",), 1e-3, 1e-5, 1.0, 0.0, 4.0)
    config = NFD.Config(kd_weight=0.5, temperature=2.0)
    method, out = _toy(config)
    terms = method.loss(out)
    expected = _expected(method, out, config)
    assert set(terms) == {"ce", "nfd", "kd"}
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, abs=1e-5, rel=1e-6), name


def test_standardize_matches_loops_and_is_invariant_to_scale_and_shift():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 3, 4, generator=g)
    ref = _standardize(x.tolist(), 1e-5)
    got = losses.standardize(x)
    for b in range(2):
        for c in range(3):
            for y in range(3):
                for w in range(4):
                    assert got[b, c, y, w].item() == pytest.approx(ref[b][c][y][w], abs=1e-5)
    # positive per-sample, per-channel scale and any shift leave the standardised map unchanged
    scale = torch.rand(2, 3, 1, 1, generator=g) * 5 + 0.1
    shift = torch.randn(2, 3, 1, 1, generator=g) * 10
    assert torch.allclose(losses.standardize(x * scale + shift), got, atol=1e-4)


def test_magnitude_of_the_teacher_does_not_matter():
    method, out = _toy(NFD.Config(layers=("stage1", "last")))
    base = method.loss(out)["nfd"].item()
    scaled = {k: v * 50.0 - 7.0 for k, v in out.teacher.features.items()}
    out2 = StepOutputs(out.student, out.targets, teacher=NetOutputs(out.teacher.logits, scaled))
    assert method.loss(out2)["nfd"].item() == pytest.approx(base, rel=1e-4)


def test_matching_features_give_zero_loss():
    shapes = {"stage1": (3, 4, 4)}
    method = NFD()
    method.setup(_info("s", shapes), _info("t", shapes))
    with torch.no_grad():
        method.adapters[0].weight.copy_(torch.eye(3)[:, :, None, None] * 2.0)
    f = torch.randn(2, 3, 4, 4)
    out = StepOutputs(NetOutputs(torch.zeros(2, 3), {"stage1": f}), torch.tensor([0, 1]),
                      teacher=NetOutputs(torch.zeros(2, 3), {"stage1": f}))
    assert method.loss(out)["nfd"].item() == pytest.approx(0.0, abs=1e-9)


def test_constant_channel_standardises_to_zero_with_finite_gradient():
    x = torch.randn(2, 3, 4, 4)
    x[:, 1] = 2.5
    x.requires_grad_(True)
    y = losses.standardize(x)
    assert torch.all(y[:, 1] == 0)
    y.pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()


# -- layer pairing and settings ----------------------------------------------------------------

def test_taps_follow_the_layers_setting():
    assert NFD().taps.student == ("stages",) and NFD().taps.teacher == ("stages",)
    method = NFD(NFD.Config(layers=("stage3:stage4", "stage1")))
    assert method.taps.student == ("stage1", "stage3") and method.taps.teacher == ("stage1", "stage4")
    method = NFD(NFD.Config(layers=("stage2:last",)))
    assert method.taps.student == ("stage2",) and method.taps.teacher == ("stages",)


def test_layers_setting_is_typed_from_the_command_line():
    c = apply_overrides(NFD.Config(), {"layers": "stage3:stage4, last", "nfd_weight": "0.5"}, "nfd")
    assert c.layers == ("stage3:stage4", "last") and c.nfd_weight == 0.5
    assert NFD(c).layer_specs == [("stage3", "stage4"), ("last", "last")]


@pytest.mark.parametrize("layers,message", [
    (("stage3",), "1×1"),            # student stage3 is 1×1
    (("stage1:stage4",), "1×1"),     # teacher stage4 is 1×1
    (("stage4",), "no stage4"),      # student has three stages
    (("layer4",), "not understood"),
    (("a:b:c",), "not understood"),
])
def test_bad_layers_are_user_errors(layers, message):
    with pytest.raises(UserError, match=message):
        NFD(NFD.Config(layers=layers)).setup(_info("s", S_SHAPES), _info("t", T_SHAPES))


def test_other_bad_settings_are_user_errors():
    for bad in (dict(layers=()), dict(nfd_weight=-1.0), dict(eps=0.0), dict(temperature=0.0)):
        with pytest.raises(UserError):
            NFD(NFD.Config(**bad))
    with pytest.raises(UserError, match="every stage"):
        NFD().setup(_info("s", {"stage1": (4, 1, 1)}), _info("t", T_SHAPES))


def test_duplicate_pairs_are_distilled_once():
    method = NFD(NFD.Config(layers=("last", "stage2:stage3")))
    method.setup(_info("s", S_SHAPES), _info("t", T_SHAPES))
    assert method.pairs == [("stage2", "stage3")] and len(method.adapters) == 1


# -- gradient flow ---------------------------------------------------------------------------------

def test_gradient_reaches_student_and_adapters_never_the_teacher():
    method, out = _toy(NFD.Config(layers=("stage1", "last")), teacher_grad=True)
    for f in out.student.features.values():
        f.requires_grad_(True)
    method.loss(out)["nfd"].backward()
    assert out.student.features["stage1"].grad.abs().sum() > 0
    assert out.student.features["stage2"].grad.abs().sum() > 0
    assert out.student.features["stage3"].grad is None  # not distilled
    assert all(a.weight.grad is not None and a.weight.grad.abs().sum() > 0 for a in method.adapters)
    assert all(t.grad is None for t in out.teacher.features.values())


def test_bf16_features_are_computed_in_float32():
    method, out = _toy(NFD.Config())
    ref = method.loss(out)["nfd"].item()
    half = StepOutputs(
        NetOutputs(out.student.logits.bfloat16(), {k: v.bfloat16() for k, v in out.student.features.items()}),
        out.targets, teacher=NetOutputs(out.teacher.logits.bfloat16(),
                                        {k: v.bfloat16() for k, v in out.teacher.features.items()}))
    terms = method.loss(half)
    assert all(v.dtype == torch.float32 for v in terms.values())
    assert terms["nfd"].item() == pytest.approx(ref, rel=0.05)


def test_heterogeneous_networks_pair_by_name():
    """A ResNet teacher and a MobileNetV3 student: at 16 px the student's two deepest stages are
    1×1, so 'last' is its stage2 (2×2); the teacher's 'last' is its stage4."""
    torch.manual_seed(0)
    student, teacher = create_model("mobilenetv3_small_100", 5, 16), create_model("test_resnet", 5, 16)
    teacher.eval().requires_grad_(False)
    s_info = model_info(student, "mobilenetv3_small_100", 5, 16)
    t_info = model_info(teacher, "test_resnet", 5, 16)
    method = NFD(NFD.Config(layers=("last", "stage1")))
    method.setup(s_info, t_info)
    assert method.pairs == [("stage2", "stage4"), ("stage1", "stage1")]
    images = torch.randn(4, 3, 16, 16)
    with FeatureTaps(student, method.taps.student) as s_taps, FeatureTaps(teacher, method.taps.teacher) as t_taps:
        s_out = NetOutputs(student(images), s_taps.pop())
        with torch.no_grad():
            t_out = NetOutputs(teacher(images), t_taps.pop())
    terms = method.loss(StepOutputs(s_out, torch.tensor([0, 1, 2, 3]), t_out))
    assert all(torch.isfinite(v) for v in terms.values()) and terms["nfd"] > 0
    terms["nfd"].backward()
    assert student.blocks[0][0].conv_dw.weight.grad.abs().sum() > 0
    assert all(a.weight.grad.abs().sum() > 0 for a in method.adapters)
    assert all(p.grad is None for p in teacher.parameters())
