"""SP: the similarity loss against a plain-loop reference and RepDistiller's numbers, its
invariances, gradients, layer choice, recipe defaults and --set, and CLI runs."""

import json
import math

import pytest
import torch
from kdzoo.methods.sp import sp_loss

from kdzoo.build import validate
from kdzoo.cli import main
from kdzoo.config import RunConfig
from kdzoo.errors import UserError
from kdzoo.method import NetOutputs, StepOutputs
from kdzoo.models import ModelInfo
from kdzoo.registry import get_method

from .reference import mean_ce, mean_kl

SP = get_method("sp")


# -- plain-Python reference (explicit loops, float64) ---------------------------------------------------

def _flat(x):
    return [[v for c in xb for row in c for v in row] for xb in x]


def _normalised_gram(rows):
    gram = [[sum(a * b for a, b in zip(ri, rj)) for rj in rows] for ri in rows]
    return [[v / max(math.sqrt(sum(u * u for u in row)), 1e-12) for v in row] for row in gram]


def _reference(s, t):
    gs, gt = _normalised_gram(_flat(s)), _normalised_gram(_flat(t))
    b = len(gs)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / (b * b)


# -- fixed inputs (the generation is the parity script's; see below) --------------------------------

def _randn(g, shape, scale=1.0, shift=0.0):
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift


def _info(name, shapes):
    return ModelInfo(name, 3, 32, {**{f"stage{i}": s for i, s in enumerate(shapes, 1)}, "embedding": (7,),
                                   "logits": (3,)})


def _out(s, t, seed=0, teacher_grad=False):
    g = torch.Generator().manual_seed(seed)
    b = s.shape[0]
    return StepOutputs(NetOutputs(torch.randn(b, 3, generator=g), {"stage1": s}), torch.arange(b) % 3,
                       teacher=NetOutputs(torch.randn(b, 3, generator=g), {"stage1": t.requires_grad_(teacher_grad)}))


def _method(s, t, **changes):
    method = SP(SP.Config(**changes))
    method.setup(_info("s", [tuple(s.shape[1:])]), _info("t", [tuple(t.shape[1:])]))
    return method


CASES = {  # name: (student map, teacher map, seed)
    "maps": ((5, 4, 3, 3), (5, 6, 2, 2), 300),
    "vectors": ((8, 16, 1, 1), (8, 3, 1, 1), 301),
    "pair": ((2, 3, 2, 2), (2, 5, 4, 4), 302),
}

# HobbitLong/RepDistiller@b84f547c5db6a35318d4671d7d5c4de74c822403, distiller_zoo/SP.py Similarity, the
# list summed as helper/loops.py does, float64. Script: for each case in CASES order, with
# g = torch.Generator().manual_seed(seed): f_s = randn(s), f_t = randn(t).relu() (randn float64 from g);
# value = sum(Similarity()([f_s], [f_t])).
OFFICIAL = {"maps": 0.0897536419725925, "vectors": 0.11049775199980619, "pair": 0.0002709853108010541}


def _case(name):
    s_shape, t_shape, seed = CASES[name]
    g = torch.Generator().manual_seed(seed)
    return _randn(g, s_shape), _randn(g, t_shape).relu()


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_the_official_code(name):
    s, t = _case(name)
    assert sp_loss(s, t).item() == pytest.approx(OFFICIAL[name], rel=1e-5)
    method = _method(s, t)
    assert method.loss(_out(s, t))["sp"].item() == pytest.approx(3000.0 * OFFICIAL[name], rel=1e-5)


@pytest.mark.parametrize("s_shape,t_shape,seed", [
    ((6, 2, 3, 3), (6, 5, 2, 2), 1), ((3, 7, 1, 1), (3, 2, 4, 4), 2), ((4, 3, 2, 5), (4, 1, 3, 3), 3),
])
def test_loss_matches_the_loop_reference(s_shape, t_shape, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = _randn(g, s_shape), _randn(g, t_shape, 2.0, 0.3)
    method = _method(s, t, sp_weight=2.5, ce_weight=0.5, kd_weight=0.25, temperature=2.0)
    out = _out(s, t, seed)
    terms = method.loss(out)
    assert set(terms) == {"ce", "sp", "kd"} and terms["sp"].dtype == torch.float64  # float64 stays float64
    assert terms["sp"].item() == pytest.approx(2.5 * _reference(s.tolist(), t.tolist()), rel=1e-5)
    logits = out.student.logits.double().tolist()
    assert terms["ce"].item() == pytest.approx(0.5 * mean_ce(logits, out.targets.tolist()), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(
        0.25 * 4.0 * mean_kl(logits, out.teacher.logits.double().tolist(), 2.0), rel=1e-5)
    assert set(_method(s, t).loss(out)) == {"ce", "sp"}


def test_zero_sample_and_batch_of_one():
    g = torch.Generator().manual_seed(5)
    s, t = _randn(g, (4, 3, 2, 2)), _randn(g, (4, 5, 2, 2))
    s[2] = 0.0  # a dead sample: its Gram row is zero and stays zero after the floored normalisation
    assert sp_loss(s, t).item() == pytest.approx(_reference(s.tolist(), t.tolist()), rel=1e-5)
    assert sp_loss(s[:1], t[:1]).item() == pytest.approx(0.0, abs=1e-12)  # G̃ = [[1]] for both


def test_invariances():
    s, t = _case("maps")
    base = sp_loss(s, t).item()
    assert sp_loss(4.0 * s, 0.1 * t).item() == pytest.approx(base, rel=1e-5)  # a global scale cancels
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert sp_loss(s[perm], t[perm]).item() == pytest.approx(base, rel=1e-5)  # the batch order does not matter
    assert sp_loss(s, torch.cat([s, s], dim=1)).item() == pytest.approx(0.0, abs=1e-9)


def test_bf16_maps_are_computed_in_float32():
    s, t = _case("maps")
    half = sp_loss(s.bfloat16(), t.bfloat16())
    assert half.dtype == torch.float32 and half.item() == pytest.approx(sp_loss(s, t).item(), rel=0.05)


def test_gradients_reach_the_student_never_the_teacher():
    s, t = _case("maps")
    s.requires_grad_(True)
    out = _out(s, t, teacher_grad=True)
    _method(s, t).loss(out)["sp"].backward()
    assert s.grad.abs().sum() > 0 and out.teacher.features["stage1"].grad is None


# -- layers and settings -------------------------------------------------------------------------------------

def test_layer_choice():
    s_shapes, t_shapes = [(3, 8, 8), (4, 4, 4), (5, 2, 2)], [(6, 8, 8), (7, 4, 4), (8, 2, 2), (9, 1, 1)]
    for spec, pair in [("last", ("stage3", "stage4")), ("stage2", ("stage2", "stage2")),
                       ("stage2:last", ("stage2", "stage4"))]:
        method = SP(SP.Config(layer=spec))
        method.setup(_info("s", s_shapes), _info("t", t_shapes))
        assert method.pair == pair and (method.taps.student, method.taps.teacher) == ((pair[0],), (pair[1],))
    assert SP().taps.student == ("stages",) and SP(SP.Config(layer="stage2")).taps.teacher == ("stage2",)
    with pytest.raises(UserError, match="no stage5"):
        SP(SP.Config(layer="stage5")).setup(_info("s", s_shapes), _info("t", t_shapes))


@pytest.mark.parametrize("changes,match", [({"layer": "layer4"}, "not understood"), ({"sp_weight": -1.0}, "sp_weight"),
                                           ({"temperature": 0.0}, "temperature")])
def test_bad_settings_are_refused(changes, match):
    with pytest.raises(UserError, match=match):
        SP(SP.Config(**changes))


def _resolved(dataset="shapes", **settings):
    return validate(RunConfig(method="sp", dataset=dataset, model="cifar_resnet8x4", teacher="cifar_resnet32x4",
                              method_settings=settings)).config


def test_recipe_defaults_and_set_wins():
    c = _resolved()  # RepDistiller scripts/run_cifar_distill.sh: --distill similarity -a 0 -b 3000, feat[-2]
    assert (c.layer, c.sp_weight, c.ce_weight, c.kd_weight) == ("last", 3000.0, 1.0, 0.0)
    assert _resolved("imagefolder") == c  # no benchmarked ImageNet setting: the CIFAR values
    mine = _resolved("imagefolder", sp_weight="1", layer="stage3")
    assert (mine.sp_weight, mine.layer) == (1.0, "stage3")


# -- CLI ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_output(tmp_path_factory):
    """One output folder for the module's CLI runs: each teacher is trained once and then cached."""
    return tmp_path_factory.mktemp("sp-cli")


def _cli(output, student, teacher, *extra):
    name = f"sp-{teacher}-{student}"
    args = ["run", "--method", "sp", "--model", student, "--teacher", teacher, "--input-size", "32",
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
    assert "sp" in capsys.readouterr().err
