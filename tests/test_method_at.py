"""AT: attention maps and the stage loss against plain-loop references and RepDistiller's numbers
(maps of one size and of different sizes, zip pairing), gradients, stage pairing, recipe defaults
(CIFAR, ImageNet) and --set, and CLI runs."""

import json
import math

import pytest
import torch
from kdzoo.methods.at import at_stage_loss

from kdzoo.build import validate
from kdzoo.cli import main
from kdzoo.config import RunConfig
from kdzoo.errors import UserError
from kdzoo.method import NetOutputs, StepOutputs
from kdzoo.models import ModelInfo
from kdzoo.registry import get_method

from .reference import mean_ce, mean_kl

AT = get_method("at")


# -- plain-Python references (nested lists [b][c][h][w], explicit loops, float64) -------------------

def _adaptive_average(x, oh, ow):
    """Cell (i, j) = mean of rows ⌊i·H/oh⌋ … ⌈(i+1)·H/oh⌉ − 1 and the same for columns."""
    out = []
    for xb in x:
        planes = []
        for p in xb:
            h, w = len(p), len(p[0])
            plane = []
            for i in range(oh):
                r0, r1 = (i * h) // oh, -((-(i + 1) * h) // oh)
                row = []
                for j in range(ow):
                    c0, c1 = (j * w) // ow, -((-(j + 1) * w) // ow)
                    cells = [p[r][c] for r in range(r0, r1) for c in range(c0, c1)]
                    row.append(sum(cells) / len(cells))
                plane.append(row)
            planes.append(plane)
        out.append(planes)
    return out


def _attention(x, p):
    """Per sample: the list over positions of mean_c |x|^p, divided by its Euclidean norm (the paper's |·|)."""
    maps = []
    for xb in x:
        h, w = len(xb[0]), len(xb[0][0])
        q = [sum(abs(xb[c][y][xx]) ** p for c in range(len(xb))) / len(xb) for y in range(h) for xx in range(w)]
        norm = math.sqrt(sum(v * v for v in q))
        maps.append([v / max(norm, 1e-12) for v in q])
    return maps


def _reference_stage(s, t, p):
    hs, ht = len(s[0][0]), len(t[0][0])
    if hs > ht:
        s = _adaptive_average(s, ht, len(t[0][0][0]))
    elif hs < ht:
        t = _adaptive_average(t, hs, len(s[0][0][0]))
    qs, qt = _attention(s, p), _attention(t, p)
    diffs = [(a - b) ** 2 for rs, rt in zip(qs, qt) for a, b in zip(rs, rt)]
    return sum(diffs) / len(diffs)


# -- fixed inputs (the generation is the parity script's; see below) --------------------------------

def _randn(g, shape, scale=1.0, shift=0.0):
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift


def _info(name, shapes):
    return ModelInfo(name, 3, 32, {**{f"stage{i}": s[1:] for i, s in enumerate(shapes, 1)},
                                   "embedding": (7,), "logits": (3,)})


def _fixed(s_shapes, t_shapes, seed, config=None, teacher_grad=False):
    g = torch.Generator().manual_seed(seed)
    s = {f"stage{i}": _randn(g, shape) for i, shape in enumerate(s_shapes, 1)}
    t = {f"stage{i}": _randn(g, shape, 2.0, 0.5).requires_grad_(teacher_grad) for i, shape in enumerate(t_shapes, 1)}
    method = AT(config)
    method.setup(_info("s", s_shapes), _info("t", t_shapes))
    b = s_shapes[0][0]
    logits, t_logits = torch.randn(b, 3, generator=g), torch.randn(b, 3, generator=g)
    return method, StepOutputs(NetOutputs(logits, s), torch.arange(b) % 3, teacher=NetOutputs(t_logits, t))


CASES = {  # name: (student stages, teacher stages, seed)
    "equal": ([(4, 3, 8, 8), (4, 4, 4, 4), (4, 5, 2, 2)], [(4, 6, 8, 8), (4, 7, 4, 4), (4, 8, 2, 2)], 200),
    "mismatch": ([(4, 3, 8, 8), (4, 4, 2, 2)], [(4, 6, 4, 4), (4, 7, 4, 4)], 201),
    "zip": ([(3, 3, 8, 8), (3, 4, 4, 4), (3, 5, 2, 2)], [(3, 2, 8, 8), (3, 2, 4, 4), (3, 2, 2, 2), (3, 2, 1, 1)], 202),
}

# HobbitLong/RepDistiller@b84f547c5db6a35318d4671d7d5c4de74c822403, distiller_zoo/AT.py Attention(p=2),
# the list summed as helper/loops.py does, float64. Script: for each case in CASES order, with
# g = torch.Generator().manual_seed(seed): g_s = [randn(s) for s in students], then
# g_t = [randn(t) * 2 + 0.5 for t in teachers] (randn float64 from g); value = sum(Attention()(g_s, g_t)).
OFFICIAL = {"equal": 0.1436563644068956, "mismatch": 0.1632990837731694, "zip": 0.24293894916176206}


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_the_official_code(name):
    method, out = _fixed(*CASES[name])
    assert len(method.pairs) == min(len(CASES[name][0]), len(CASES[name][1]))
    assert sum(method.stage_losses(out)).item() == pytest.approx(OFFICIAL[name], rel=1e-5)
    assert method.loss(out)["at"].item() == pytest.approx(1000.0 * OFFICIAL[name], rel=1e-5)


@pytest.mark.parametrize("s_shape,t_shape,p", [
    ((3, 4, 5, 5), (3, 2, 5, 5), 2.0),
    ((2, 3, 6, 6), (2, 5, 3, 3), 2.0),   # student pooled 2×2 → 1
    ((2, 3, 2, 2), (2, 5, 6, 6), 4.0),   # teacher pooled 3×3 → 1
    ((2, 3, 7, 7), (2, 5, 3, 3), 2.0),   # 7 → 3: overlapping adaptive cells
    ((2, 3, 4, 4), (2, 5, 4, 4), 3.0),   # odd p: |F|^p (the paper), see docs/methods/at.md
])
def test_stage_loss_matches_the_loop_reference(s_shape, t_shape, p):
    g = torch.Generator().manual_seed(int(p * 10) + s_shape[2])
    s, t = _randn(g, s_shape), _randn(g, t_shape, 1.5, -0.2)
    assert at_stage_loss(s, t, p).item() == pytest.approx(_reference_stage(s.tolist(), t.tolist(), p), rel=1e-5)


def test_method_terms_and_weights():
    config = AT.Config(at_weight=7.0, ce_weight=0.5, kd_weight=0.25, temperature=2.0)
    method, out = _fixed(*CASES["mismatch"], config=config)
    terms = method.loss(out)
    assert set(terms) == {"ce", "at", "kd"} and all(v.dtype == torch.float32 for v in terms.values())
    expected = sum(_reference_stage(out.student.features[s].tolist(), out.teacher.features[t].tolist(), 2.0)
                   for s, t in method.pairs)
    assert terms["at"].item() == pytest.approx(7.0 * expected, rel=1e-5)
    logits = out.student.logits.double().tolist()
    assert terms["ce"].item() == pytest.approx(0.5 * mean_ce(logits, out.targets.tolist()), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(
        0.25 * 4.0 * mean_kl(logits, out.teacher.logits.double().tolist(), 2.0), rel=1e-5)
    method, out = _fixed(*CASES["mismatch"])
    assert set(method.loss(out)) == {"ce", "at"}


def test_attention_is_blind_to_scale_and_sign():
    method, out = _fixed(*CASES["equal"])
    base = method.loss(out)["at"].item()
    flipped = {k: -3.0 * v for k, v in out.teacher.features.items()}
    out2 = StepOutputs(out.student, out.targets, teacher=NetOutputs(out.teacher.logits, flipped))
    assert method.loss(out2)["at"].item() == pytest.approx(base, rel=1e-5)
    same = StepOutputs(out.student, out.targets, teacher=NetOutputs(out.teacher.logits, {
        k: 5.0 * out.student.features[k] for k in out.student.features}))
    assert method.loss(same)["at"].item() == pytest.approx(0.0, abs=1e-9)


def test_gradients_reach_the_student_never_the_teacher():
    method, out = _fixed(*CASES["mismatch"], teacher_grad=True)
    for f in out.student.features.values():
        f.requires_grad_(True)
    method.loss(out)["at"].backward()
    assert all(f.grad.abs().sum() > 0 for f in out.student.features.values())
    assert all(f.grad is None for f in out.teacher.features.values())


def test_bf16_features_are_computed_in_float32():
    method, out = _fixed(*CASES["equal"])
    ref = method.loss(out)["at"].item()
    half = StepOutputs(NetOutputs(out.student.logits.bfloat16(), {k: v.bfloat16() for k, v in out.student.features.items()}),
                       out.targets, teacher=NetOutputs(out.teacher.logits.bfloat16(),
                                                       {k: v.bfloat16() for k, v in out.teacher.features.items()}))
    terms = method.loss(half)
    assert all(v.dtype == torch.float32 for v in terms.values())
    assert terms["at"].item() == pytest.approx(ref, rel=0.05)


# -- stage pairing and settings -------------------------------------------------------------------------

S4 = [(2, 3, 8, 8), (2, 4, 4, 4), (2, 5, 2, 2)]
T4 = [(2, 6, 8, 8), (2, 7, 4, 4), (2, 8, 2, 2), (2, 9, 1, 1)]


@pytest.mark.parametrize("layers,pairs", [
    (("all",), [("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3")]),
    (("stage2", "last"), [("stage2", "stage2"), ("stage3", "stage4")]),
    (("stage3:stage4", "stage3:last"), [("stage3", "stage4")]),
])
def test_layers_pair_stages(layers, pairs):
    method = AT(AT.Config(layers=layers))
    method.setup(_info("s", S4), _info("t", T4))
    assert method.pairs == pairs
    assert method.taps.student == tuple(sorted({s for s, _ in pairs}))
    assert method.taps.teacher == tuple(sorted({t for _, t in pairs}))


def test_taps_before_setup():
    assert (AT().taps.student, AT().taps.teacher) == (("stages",), ("stages",))
    m = AT(AT.Config(layers=("stage3", "stage4")))
    assert (m.taps.student, m.taps.teacher) == (("stage3", "stage4"), ("stage3", "stage4"))


@pytest.mark.parametrize("changes,match", [
    ({"layers": ()}, "at least one"), ({"layers": ("all", "stage2")}, "alone"), ({"layers": ("layer3",)}, "not understood"),
    ({"p": 0.0}, "p must"), ({"at_weight": -1.0}, "at_weight"), ({"temperature": 0.0}, "temperature"),
])
def test_bad_settings_are_refused(changes, match):
    with pytest.raises(UserError, match=match):
        AT(AT.Config(**changes))


def test_missing_stage_is_a_user_error():
    with pytest.raises(UserError, match="no stage4"):
        AT(AT.Config(layers=("stage4",))).setup(_info("s", S4), _info("t", T4))


def _resolved(dataset="shapes", **settings):
    return validate(RunConfig(method="at", dataset=dataset, model="resnet18", teacher="resnet34",
                              method_settings=settings)).config


def test_recipe_defaults_cifar_imagenet_and_set_wins():
    c = _resolved()  # RepDistiller scripts/run_cifar_distill.sh: --distill attention -a 0 -b 1000, feat[1:-1]
    assert (c.layers, c.p, c.at_weight, c.ce_weight, c.kd_weight) == (("all",), 2.0, 1000.0, 1.0, 0.0)
    # szagoruyko/attention-transfer imagenet.py --beta 1e+3 (alpha 0): all four groups; mdistiller's r34_r18/at.yaml
    imagenet = _resolved("imagefolder")
    assert (imagenet.layers, imagenet.at_weight, imagenet.ce_weight, imagenet.kd_weight) == (("all",), 1000.0, 1.0, 0.0)
    assert AT.dataset_defaults["imagefolder"]["layers"] == ("all",)
    # torchdistill's rrpr2020 config: layer3 and layer4
    mine = _resolved("imagefolder", layers="stage3,stage4", at_weight="500")
    assert (mine.layers, mine.at_weight) == (("stage3", "stage4"), 500.0)
    assert _resolved(layers="stage2, stage3:stage4").layers == ("stage2", "stage3:stage4")


# -- CLI ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_output(tmp_path_factory):
    """One output folder for the module's CLI runs: each teacher is trained once and then cached."""
    return tmp_path_factory.mktemp("at-cli")


def _cli(output, student, teacher, *extra):
    name = f"at-{teacher}-{student}"
    args = ["run", "--method", "at", "--model", student, "--teacher", teacher, "--input-size", "32",
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
    assert "at" in capsys.readouterr().err
