"""PKT: the probabilistic transfer loss against a plain-loop reference and RepDistiller's numbers, a
dead (all-zero) embedding, invariances, gradients, recipe defaults and --set, and CLI runs."""

import json
import math

import pytest
import torch
from kdzoo.methods.pkt import conditional_probabilities, pkt_loss

from kdzoo.build import validate
from kdzoo.cli import main
from kdzoo.config import RunConfig
from kdzoo.errors import UserError
from kdzoo.method import NetOutputs, StepOutputs
from kdzoo.registry import get_method

from .reference import mean_ce, mean_kl

PKT = get_method("pkt")
EPS = 1e-7


# -- plain-Python reference (explicit loops, float64) ---------------------------------------------------

def _conditional(rows, eps=EPS):
    unit = []
    for r in rows:
        norm = math.sqrt(sum(v * v for v in r))
        unit.append([v / (norm + eps) for v in r])
    kernel = [[(sum(a * b for a, b in zip(ui, uj)) + 1.0) / 2.0 for uj in unit] for ui in unit]
    return [[k / sum(row) for k in row] for row in kernel]


def _reference(s, t, eps=EPS):
    ps, pt = _conditional(s, eps), _conditional(t, eps)
    b = len(ps)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(b) for j in range(b)) / (b * b)


# -- fixed inputs (the generation is the parity script's; see below) --------------------------------

def _randn(g, shape, scale=1.0, shift=0.0):
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift


def _out(s, t, seed=0, teacher_grad=False):
    g = torch.Generator().manual_seed(seed)
    b = s.shape[0]
    return StepOutputs(NetOutputs(torch.randn(b, 3, generator=g), {"embedding": s}), torch.arange(b) % 3,
                       teacher=NetOutputs(torch.randn(b, 3, generator=g),
                                          {"embedding": t.requires_grad_(teacher_grad)}))


CASES = {  # name: (student embedding, teacher embedding, seed)
    "plain": ((6, 10), (6, 7), 400),
    "zero_row": ((5, 4), (5, 9), 401),  # the student's row 1 is all zeros
    "pair": ((2, 3), (2, 3), 402),
}

# HobbitLong/RepDistiller@b84f547c5db6a35318d4671d7d5c4de74c822403, distiller_zoo/PKT.py PKT (eps 1e-7),
# float64. Script: for each case in CASES order, with g = torch.Generator().manual_seed(seed):
# f_s = randn(s), f_t = randn(t) + 0.3 (randn float64 from g); for "zero_row", f_s[1] = 0; value = PKT()(f_s, f_t).
OFFICIAL = {"plain": 0.008050204434683192, "zero_row": 0.01599937006564345, "pair": 0.0007126753935372898}


def _case(name):
    s_shape, t_shape, seed = CASES[name]
    g = torch.Generator().manual_seed(seed)
    s, t = _randn(g, s_shape), _randn(g, t_shape, 1.0, 0.3)
    if name == "zero_row":
        s[1] = 0.0
    return s, t


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_the_official_code(name):
    s, t = _case(name)
    assert pkt_loss(s, t).item() == pytest.approx(OFFICIAL[name], rel=1e-5)
    assert PKT().loss(_out(s, t))["pkt"].item() == pytest.approx(30000.0 * OFFICIAL[name], rel=1e-5)


@pytest.mark.parametrize("s_shape,t_shape,seed,eps", [((7, 5), (7, 12), 1, EPS), ((3, 2), (3, 6), 2, 1e-3),
                                                      ((4, 8), (4, 8), 3, EPS)])
def test_loss_matches_the_loop_reference(s_shape, t_shape, seed, eps):
    g = torch.Generator().manual_seed(seed)
    s, t = _randn(g, s_shape, 3.0), _randn(g, t_shape, 0.5, 0.2)
    method = PKT(PKT.Config(pkt_weight=2.0, eps=eps, ce_weight=0.5, kd_weight=0.25, temperature=2.0))
    out = _out(s, t, seed)
    terms = method.loss(out)
    assert set(terms) == {"ce", "pkt", "kd"} and terms["pkt"].dtype == torch.float64  # float64 stays float64
    assert terms["pkt"].item() == pytest.approx(2.0 * _reference(s.tolist(), t.tolist(), eps), rel=1e-5)
    logits = out.student.logits.double().tolist()
    assert terms["ce"].item() == pytest.approx(0.5 * mean_ce(logits, out.targets.tolist()), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(
        0.25 * 4.0 * mean_kl(logits, out.teacher.logits.double().tolist(), 2.0), rel=1e-5)
    assert set(PKT().loss(out)) == {"ce", "pkt"}


def test_conditional_probabilities_are_rows_of_a_distribution():
    s, _ = _case("zero_row")
    p = conditional_probabilities(s)
    assert torch.allclose(p.sum(dim=1), torch.ones(5, dtype=p.dtype), atol=1e-12) and (p > 0).all()
    assert torch.allclose(p[1], torch.full((5,), 0.2, dtype=p.dtype), atol=1e-12)  # a zero row: cosine 0 with all, kernel 1/2


def test_a_dead_embedding_has_a_finite_gradient():
    """The official sqrt(Σx²) has an infinite derivative at 0 and gives NaN gradients for an all-zero row."""
    s, t = _case("zero_row")
    s.requires_grad_(True)
    out = _out(s, t, teacher_grad=True)
    PKT().loss(out)["pkt"].backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert out.teacher.embedding.grad is None


def test_invariances_and_zero():
    s, t = _case("plain")
    base = pkt_loss(s, t).item()
    scale = torch.rand(6, 1, dtype=torch.float64) * 5 + 0.5
    assert pkt_loss(s * scale, t).item() == pytest.approx(base, rel=1e-5)  # per-sample norms do not matter
    perm = torch.tensor([2, 5, 0, 1, 4, 3])
    assert pkt_loss(s[perm], t[perm]).item() == pytest.approx(base, rel=1e-5)
    assert pkt_loss(s, 2.0 * s).item() == pytest.approx(0.0, abs=1e-9)
    assert pkt_loss(t, s).item() != pytest.approx(base, rel=1e-3)  # KL(P_t ‖ P_s), not symmetric


def test_bf16_embeddings_are_computed_in_float32():
    s, t = _case("plain")
    ref = pkt_loss(s, t).item()
    half = pkt_loss(s.bfloat16(), t.bfloat16())
    assert half.dtype == torch.float32 and half.item() == pytest.approx(ref, rel=0.05)


@pytest.mark.parametrize("changes,match", [({"pkt_weight": -1.0}, "pkt_weight"), ({"eps": 0.0}, "eps"),
                                           ({"temperature": 0.0}, "temperature")])
def test_bad_settings_are_refused(changes, match):
    with pytest.raises(UserError, match=match):
        PKT(PKT.Config(**changes))


def _resolved(dataset="shapes", **settings):
    return validate(RunConfig(method="pkt", dataset=dataset, model="cifar_resnet8x4", teacher="cifar_resnet32x4",
                              method_settings=settings)).config


def test_recipe_defaults_and_set_wins():
    c = _resolved()  # RepDistiller scripts/run_cifar_distill.sh: --distill pkt -a 0 -b 30000, feat[-1]
    assert (c.pkt_weight, c.eps, c.ce_weight, c.kd_weight) == (30000.0, 1e-7, 1.0, 0.0)
    assert PKT.taps.student == ("embedding",) and PKT.taps.teacher == ("embedding",)
    assert _resolved("imagefolder") == c  # no benchmarked ImageNet setting: the CIFAR values
    mine = _resolved("imagefolder", pkt_weight="100", ce_weight="0")
    assert (mine.pkt_weight, mine.ce_weight) == (100.0, 0.0)


# -- CLI ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_output(tmp_path_factory):
    """One output folder for the module's CLI runs: each teacher is trained once and then cached."""
    return tmp_path_factory.mktemp("pkt-cli")


def _cli(output, student, teacher, *extra):
    name = f"pkt-{teacher}-{student}"
    args = ["run", "--method", "pkt", "--model", student, "--teacher", teacher, "--input-size", "32",
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
    assert "pkt" in capsys.readouterr().err
