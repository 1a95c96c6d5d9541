"""LAKD: loss terms against loop references, gradient isolation between local modules, adapters,
heterogeneous teacher/student pairs (the short end-to-end run is in test_methods_train.py)."""

import math

import pytest
import torch
from kdzoo.methods import lakd as lakd_module

from kdzoo.hooks import FeatureTaps
from kdzoo.method import NetOutputs, StepOutputs
from kdzoo.models import ModelInfo, create_model, model_info
from kdzoo.registry import get_method
from kdzoo.settings import apply_overrides

from .reference import conv1x1, mean_ce

LAKD = get_method("lakd")


# -- plain-Python references (nested lists, explicit loops; shared ones in tests/reference.py) ---

def _resize_plane(plane, height, width):
    """Same size: copy; 1×1: broadcast (bilinear of a constant); integer shrink: block means."""
    h0, w0 = len(plane), len(plane[0])
    if (h0, w0) == (height, width):
        return [row[:] for row in plane]
    if (h0, w0) == (1, 1):
        return [[plane[0][0]] * width for _ in range(height)]
    fh, fw = h0 // height, w0 // width
    assert fh * height == h0 and fw * width == w0
    return [[sum(plane[y * fh + dy][x * fw + dx] for dy in range(fh) for dx in range(fw)) / (fh * fw)
             for x in range(width)] for y in range(height)]


def _resize(t, height, width):
    return [[_resize_plane(plane, height, width) for plane in tb] for tb in t]


def _amap(f, p):
    """[b][h][w]: mean over channels of |f|^p."""
    out = []
    for fb in f:
        c, h, w = len(fb), len(fb[0]), len(fb[0][0])
        out.append([[sum(abs(fb[k][y][x]) ** p for k in range(c)) / c for x in range(w)] for y in range(h)])
    return out


def _flat(plane):
    return [v for row in plane for v in row]


def _ref_lf(proj, target):
    total, count = 0.0, 0
    for pb, tb in zip(proj, target):
        for pc, tc in zip(pb, tb):
            for pr, tr in zip(pc, tc):
                for a, b in zip(pr, tr):
                    total += (a - b) ** 2
                    count += 1
    return total / count


def _ref_map_loss(s, t, p):
    h, w = len(s[0][0]), len(s[0][0][0])
    ms, mt = _amap(s, p), _amap(t, p)
    total = 0.0
    for sb, tb in zip(ms, mt):
        vs, vt = _flat(sb), _flat(_resize_plane(tb, h, w))
        ns, nt = math.sqrt(sum(v * v for v in vs)), math.sqrt(sum(v * v for v in vt))
        total += sum((a / ns - b / nt) ** 2 for a, b in zip(vs, vt))
    return total / len(s)


def _ref_weighted(proj, t_resized, t, p):
    h, w = len(proj[0][0]), len(proj[0][0][0])
    total = 0.0
    for b, tb in enumerate(_amap(t, p)):
        weights = _flat(_resize_plane(tb, h, w))
        z = sum(weights)
        c = len(proj[b])
        for idx in range(h * w):
            y, x = divmod(idx, w)
            err = sum((proj[b][k][y][x] - t_resized[b][k][y][x]) ** 2 for k in range(c)) / c
            total += weights[idx] / z * err
    return total / len(proj)


# -- a fixed toy problem: three stages, every resize path, adapters and an identity -------------

S_SHAPES = [(2, 2, 3, 3), (2, 3, 2, 2), (2, 2, 2, 2)]
T_SHAPES = [(2, 4, 3, 3), (2, 2, 6, 6), (2, 2, 1, 1)]   # same size, 3× shrink, 1×1 → grow


def _info(name, shapes):
    stages = {f"stage{i + 1}": s[1:] for i, s in enumerate(shapes)}
    return ModelInfo(name, 3, 8, {**stages, "logits": (3,)})


def _toy(config):
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(*s, generator=g) for s in S_SHAPES]
    teacher = [torch.randn(*s, generator=g) for s in T_SHAPES]
    logits = torch.randn(2, 3, generator=g)
    targets = torch.tensor([2, 0])
    method = LAKD(config)
    method.setup(_info("s", S_SHAPES), _info("t", T_SHAPES))
    with torch.no_grad():
        for adapter in method.adapters:
            if isinstance(adapter, torch.nn.Conv2d):
                adapter.weight.copy_(torch.randn(adapter.weight.shape, generator=g))
    out = StepOutputs(
        NetOutputs(logits, {f"stage{i + 1}": x for i, x in enumerate(student)}), targets,
        teacher=NetOutputs(torch.zeros(2, 3), {f"stage{i + 1}": x for i, x in enumerate(teacher)}),
    )
    return method, out, student, teacher, logits, targets


def _expected(method, student, teacher, logits, targets, config):
    lf_total = att_total = 0.0
    for k, (s, adapter, j) in enumerate(zip(student, method.adapters, method.pairs)):
        s_l, t_l = s.tolist(), teacher[j].tolist()
        if isinstance(adapter, torch.nn.Conv2d):
            proj = conv1x1(s_l, adapter.weight[:, :, 0, 0].tolist())
        else:
            proj = s_l
        t_resized = _resize(t_l, s.shape[2], s.shape[3])
        lf_total += _ref_lf(proj, t_resized)
        if config.ndam == "map":
            att_total += _ref_map_loss(s_l, t_l, config.p)
        else:
            att_total += _ref_weighted(proj, t_resized, t_l, config.p)
    return {
        "ce": config.alpha * mean_ce(logits.tolist(), targets.tolist()),
        "att": (1 - config.alpha) * att_total,
        "lf": config.beta * lf_total,
    }


@pytest.mark.parametrize("ndam,p", [("map", 2.0), ("weighted", 2.0), ("map", 1.0), ("weighted", 1.0)])
def test_loss_terms_match_loop_references(ndam, p):
    config = LAKD.Config(alpha=0.3, beta=2.5, ndam=ndam, p=p)
    method, out, student, teacher, logits, targets = _toy(config)
    assert method.pairs == [0, 1, 2]
    assert [type(a).__name__ for a in method.adapters] == ["Conv2d", "Conv2d", "Identity"]
    terms = method.loss(out)
    expected = _expected(method, student, teacher, logits, targets, config)
    assert set(terms) == {"ce", "att", "lf"}
    for name, value in expected.items():
        assert terms[name].dtype == torch.float32
        assert terms[name].item() == pytest.approx(value, abs=1e-5), name


def test_default_weights_and_always_adapters():
    config = LAKD.Config(adapter="always")
    method, out, student, teacher, logits, targets = _toy(config)
    assert all(isinstance(a, torch.nn.Conv2d) for a in method.adapters)
    terms = method.loss(out)
    expected = _expected(method, student, teacher, logits, targets, config)
    assert config.alpha == 0.5 and config.beta == 1.0
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, abs=1e-5), name


def test_identical_features_give_zero_distillation_terms():
    method = LAKD()
    shapes = [(2, 3, 4, 4), (2, 5, 2, 2)]
    method.setup(_info("s", shapes), _info("t", shapes))
    feats = {f"stage{i + 1}": torch.rand(*s) for i, s in enumerate(shapes)}
    out = StepOutputs(NetOutputs(torch.zeros(2, 3), feats), torch.tensor([0, 1]),
                      teacher=NetOutputs(torch.zeros(2, 3), feats))
    terms = method.loss(out)
    assert terms["lf"].item() == 0.0 and terms["att"].item() == pytest.approx(0.0, abs=1e-12)


def test_stage_pairing_by_relative_depth():
    pair = lakd_module.pair_stages
    assert pair(4, 4) == [0, 1, 2, 3]
    assert pair(4, 6) == [1, 2, 4, 5]
    assert pair(6, 4) == [0, 0, 1, 2, 2, 3]
    assert pair(3, 4) == [0, 2, 3]
    assert pair(1, 4) == [3]


def test_progressive_ramp_turns_stages_on_shallow_to_deep():
    ramp = lakd_module.stage_ramp
    assert ramp(0.0, 4, 0.5) == [1.0, 0.0, 0.0, 0.0]
    assert ramp(0.25, 4, 0.5) == pytest.approx([1.0, 1.0, 0.5, 0.0])
    assert ramp(0.5, 4, 0.5) == [1.0, 1.0, 1.0, 1.0]
    assert ramp(0.9, 4, 0.5) == [1.0, 1.0, 1.0, 1.0]
    assert ramp(0.0, 1, 0.5) == [1.0]
    config = LAKD.Config(progressive=True, progressive_span=0.5)
    method, out, *_ = _toy(config)
    stage_terms = method.stage_losses(out)
    out.progress = 0.0
    terms = method.loss(out)
    assert terms["lf"].item() == pytest.approx(stage_terms[0][0].item(), abs=1e-6)
    assert terms["att"].item() == pytest.approx(0.5 * stage_terms[0][1].item(), abs=1e-6)
    out.progress = 1.0
    full = method.loss(out)
    assert full["lf"].item() == pytest.approx(sum(t[0].item() for t in stage_terms), abs=1e-5)


def test_settings_are_typed():
    config = apply_overrides(LAKD.Config(), {"alpha": "0.9", "ndam": "weighted", "separate": "false"}, "lakd")
    assert config.alpha == 0.9 and config.ndam == "weighted" and config.separate is False


# -- gradient isolation on a real network ----------------------------------------------------

def _pair(student_name, teacher_name, size, **config):
    torch.manual_seed(0)
    student = create_model(student_name, 10, size)
    teacher = create_model(teacher_name, 10, size)
    method = LAKD(LAKD.Config(**config))
    method.setup(model_info(student, student_name, 10, size), model_info(teacher, teacher_name, 10, size))
    return method, student, teacher


def _forward(method, student, teacher, size, teacher_grad=False):
    torch.manual_seed(1)
    images = torch.randn(4, 3, size, size)
    targets = torch.tensor([0, 1, 2, 3])
    with FeatureTaps(student, ["stages"]) as s_taps, FeatureTaps(teacher, ["stages"]) as t_taps:
        logits = student(images)
        s_out = NetOutputs(logits, s_taps.pop())
        with torch.set_grad_enabled(teacher_grad):
            t_logits = teacher(images)
        t_out = NetOutputs(t_logits, t_taps.pop())
    return StepOutputs(s_out, targets, t_out)


def _grad(module):
    return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)


def _zero_grads(*modules):
    for m in modules:
        m.zero_grad(set_to_none=True)


def _resnet_parts(model):
    return {"stem": [model.conv1, model.bn1], "layer1": [model.layer1], "layer2": [model.layer2],
            "layer3": [model.layer3], "layer4": [model.layer4], "fc": [model.fc]}


def _part_grads(model):
    return {name: sum(_grad(m) for m in mods) for name, mods in _resnet_parts(model).items()}


def test_stage_loss_updates_only_its_own_local_module():
    method, student, teacher = _pair("test_resnet", "test_resnet", 16, adapter="always")
    handles = method.install(student, teacher)
    assert len(handles) == 3  # layer2, layer3, layer4 inputs are detached
    lf3, att3 = method.stage_losses(_forward(method, student, teacher, 16))[2]
    (lf3 + att3).backward()
    grads = _part_grads(student)
    assert grads["layer3"] > 0
    for name in ("stem", "layer1", "layer2", "layer4", "fc"):
        assert grads[name] == 0, name
    assert _grad(method.adapters[2]) > 0
    assert all(_grad(method.adapters[k]) == 0 for k in (0, 1, 3))

    # the shallowest module (and the stem in front of it) learns from its own loss
    _zero_grads(student, method)
    lf1, att1 = method.stage_losses(_forward(method, student, teacher, 16))[0]
    (lf1 + att1).backward()
    grads = _part_grads(student)
    assert grads["stem"] > 0 and grads["layer1"] > 0
    assert grads["layer2"] == grads["layer3"] == grads["layer4"] == 0

    # cross-entropy reaches only the last module and the head
    _zero_grads(student, method)
    method.loss(_forward(method, student, teacher, 16))["ce"].backward()
    grads = _part_grads(student)
    assert grads["layer4"] > 0 and grads["fc"] > 0
    assert grads["stem"] == grads["layer1"] == grads["layer2"] == grads["layer3"] == 0

    # once the handles are removed, the gradient flows end to end again
    for handle in handles:
        handle.remove()
    _zero_grads(student, method)
    lf3, att3 = method.stage_losses(_forward(method, student, teacher, 16))[2]
    (lf3 + att3).backward()
    grads = _part_grads(student)
    assert grads["stem"] > 0 and grads["layer1"] > 0 and grads["layer2"] > 0 and grads["layer3"] > 0


def test_without_the_hooks_a_later_loss_reaches_earlier_stages():
    method, student, teacher = _pair("test_resnet", "test_resnet", 16, separate=False)
    assert method.install(student, teacher) == []
    lf3, att3 = method.stage_losses(_forward(method, student, teacher, 16))[2]
    (lf3 + att3).backward()
    grads = _part_grads(student)
    assert grads["stem"] > 0 and grads["layer1"] > 0 and grads["layer2"] > 0


def test_every_student_parameter_is_trained_and_the_teacher_never_is():
    """Non-contiguous stages (MobileNetV3: blocks.0, 1, 3, 5): blocks in between join the next
    local module instead of being cut off; the teacher gets no gradient even if run with grad."""
    method, student, teacher = _pair("mobilenetv3_small_100", "test_resnet", 16)
    handles = method.install(student, teacher)
    out = _forward(method, student, teacher, 16, teacher_grad=True)
    sum(method.loss(out).values()).backward()
    orphans = [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
    assert orphans == []
    assert all(p.grad is None for p in teacher.parameters())
    convs = [a for a in method.adapters if isinstance(a, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(_grad(a) > 0 for a in convs)

    # blocks.2 sits between stage 2 (blocks.1) and stage 3 (blocks.3): stage 3's loss trains it,
    # stage 2's does not
    blocks = student.blocks
    _zero_grads(student, method)
    lf2, att2 = method.stage_losses(_forward(method, student, teacher, 16))[1]
    (lf2 + att2).backward()
    assert _grad(blocks[1]) > 0 and _grad(blocks[2]) == 0 and _grad(blocks[0]) == 0
    _zero_grads(student, method)
    lf3, _ = method.stage_losses(_forward(method, student, teacher, 16))[2]
    lf3.backward()
    assert _grad(blocks[2]) > 0 and _grad(blocks[3]) > 0 and _grad(blocks[1]) == 0
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("student_name,teacher_name,pairs", [
    ("test_convnext", "test_resnet", [0, 1, 2, 3]),
    ("test_resnet", "test_vit", [1, 2, 4, 5]),      # 4 student stages, 6 teacher stages
    ("test_vit", "test_resnet", [0, 0, 1, 2, 2, 3]),  # 6 token stages onto 4 conv stages
])
def test_heterogeneous_pairs(student_name, teacher_name, pairs):
    method, student, teacher = _pair(student_name, teacher_name, 32)
    assert method.pairs == pairs
    handles = method.install(student, teacher)
    terms = method.loss(_forward(method, student, teacher, 32))
    assert all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert all(_grad(a) > 0 for a in method.adapters if isinstance(a, torch.nn.Conv2d))
    assert all(p.grad is None for p in teacher.parameters())
    assert [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None] == []
    for handle in handles:
        handle.remove()
