"""Relational KD: distance and angle terms against plain-loop references, chunked vs unchunked
angles, gradient flow, the alias and settings (the short end-to-end run is in test_methods_train.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from kdzoo.methods import rkd as rkd_module

from kdzoo import losses
from kdzoo.errors import UserError
from kdzoo.method import NetOutputs, StepOutputs
from kdzoo.registry import aliases_of, get_method
from kdzoo.settings import apply_overrides

from .reference import dot, huber, mean_ce

RKD = get_method("relational_kd")


# -- plain-Python references (lists of floats, explicit loops over i, j, k; shared: tests/reference.py)

def _sub(a, b):
    return [x - y for x, y in zip(a, b)]


def _ref_distances(e):
    n = len(e)
    d = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i != j:
                d[i][j] = math.sqrt(max(dot(_sub(e[i], e[j]), _sub(e[i], e[j])), 1e-12))
    positives = [d[i][j] for i in range(n) for j in range(n) if d[i][j] > 0]
    mu = sum(positives) / len(positives)
    return [[v / mu for v in row] for row in d]


def _ref_distance_loss(s, t):
    ds, dt = _ref_distances(s), _ref_distances(t)
    n = len(s)
    return sum(huber(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n**2


def _unit(v):
    norm = math.sqrt(dot(v, v))
    return [x / norm for x in v] if norm > 1e-12 else [0.0] * len(v)


def _ref_angles(e):
    n = len(e)
    psi = {}
    for i in range(n):
        for j in range(n):
            for k in range(n):
                psi[i, j, k] = dot(_unit(_sub(e[j], e[i])), _unit(_sub(e[k], e[i])))
    return psi


def _ref_angle_loss(s, t):
    ps, pt = _ref_angles(s), _ref_angles(t)
    n = len(s)
    return sum(huber(ps[key] - pt[key]) for key in ps) / n**3


# -- fixed toy tensors: student D=3, teacher D=5, one large-difference pair (|x| > 1 Huber branch)

S_EMB = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.2, -0.3], [-2.0, 0.7, 0.1],
                      [0.0, 0.0, 0.4], [3.0, -2.5, 1.0]])
T_EMB = torch.tensor([[1.0, 0.1, -0.4, 2.0, 0.3], [0.2, -1.2, 0.8, 0.0, 1.1], [-0.5, 0.4, 0.9, -1.3, 0.2],
                      [2.2, 1.0, -0.7, 0.5, -0.9], [0.3, 0.3, 0.3, 0.3, 0.3]])
LOGITS = torch.tensor([[0.2, 1.0, -0.5], [1.3, 0.0, 0.4], [-0.2, 0.3, 0.9], [0.0, 0.0, 0.0], [2.0, -1.0, 0.5]])
TARGETS = torch.tensor([1, 0, 2, 1, 0])


def _step(s_emb, t_emb, logits=LOGITS, targets=TARGETS):
    return StepOutputs(NetOutputs(logits, {"embedding": s_emb}), targets,
                       teacher=NetOutputs(torch.zeros_like(logits), {"embedding": t_emb}))


def test_distance_and_angle_match_loop_references():
    s, t = S_EMB.tolist(), T_EMB.tolist()
    assert rkd_module.distance_loss(S_EMB, T_EMB).item() == pytest.approx(_ref_distance_loss(s, t), abs=1e-5)
    assert rkd_module.angle_loss(S_EMB, T_EMB).item() == pytest.approx(_ref_angle_loss(s, t), abs=1e-5)
    # the toy data reaches the linear branch of the Huber loss in the distance term
    ds, dt = _ref_distances(s), _ref_distances(t)
    assert any(abs(ds[i][j] - dt[i][j]) > 1 for i in range(5) for j in range(5))


def test_distance_matrix_has_zero_diagonal_and_unit_mean():
    d = losses.normalized_distances(S_EMB)
    assert torch.all(d.diagonal() == 0)
    off = d[~torch.eye(5, dtype=torch.bool)]
    assert off.mean().item() == pytest.approx(1.0, abs=1e-6)
    ref = _ref_distances(S_EMB.tolist())
    for i in range(5):
        for j in range(5):
            assert d[i, j].item() == pytest.approx(ref[i][j], abs=1e-5)


def test_method_loss_terms_with_default_and_custom_weights():
    s, t = S_EMB.tolist(), T_EMB.tolist()
    ce, dist, ang = mean_ce(LOGITS.tolist(), TARGETS.tolist()), _ref_distance_loss(s, t), _ref_angle_loss(s, t)
    terms = RKD().loss(_step(S_EMB, T_EMB))
    assert set(terms) == {"ce", "distance", "angle"}
    assert terms["ce"].item() == pytest.approx(ce, abs=1e-5)
    assert terms["distance"].item() == pytest.approx(25 * dist, abs=1e-4)
    assert terms["angle"].item() == pytest.approx(50 * ang, abs=1e-4)
    assert all(v.dtype == torch.float32 for v in terms.values())

    custom = RKD(RKD.Config(ce_weight=0.5, distance_weight=2.0, angle_weight=3.0, angle_chunk=2))
    terms = custom.loss(_step(S_EMB, T_EMB))
    assert terms["ce"].item() == pytest.approx(0.5 * ce, abs=1e-5)
    assert terms["distance"].item() == pytest.approx(2 * dist, abs=1e-5)
    assert terms["angle"].item() == pytest.approx(3 * ang, abs=1e-5)


def test_coincident_embeddings_give_zero_unit_vectors_and_finite_gradients():
    s = S_EMB.clone()
    s[4] = s[1]  # two samples with the same embedding
    ref = _ref_angle_loss(s.tolist(), T_EMB.tolist())
    s.requires_grad_(True)
    value = rkd_module.angle_loss(s, T_EMB, chunk=2)
    assert value.item() == pytest.approx(ref, abs=1e-5)
    (value + rkd_module.distance_loss(s, T_EMB)).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().max() < 10
    u = losses.unit_differences(s.detach())
    assert torch.all(u[1, 4] == 0) and torch.all(u[4, 1] == 0) and torch.all(u[2, 2] == 0)


def test_identical_relations_give_zero_loss():
    # a scaled, rotated and shifted copy of the teacher has the same normalised distances and angles
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(3)))
    copy = 3.0 * T_EMB @ q + 1.5
    assert rkd_module.distance_loss(copy, T_EMB).item() == pytest.approx(0.0, abs=1e-9)
    assert rkd_module.angle_loss(copy, T_EMB).item() == pytest.approx(0.0, abs=1e-9)


# -- chunking ----------------------------------------------------------------------------------

def _unchunked_angle_loss(s, t):
    """The reference code's formulation: one batched matmul over the (B, B, D) unit differences."""
    us = F.normalize(s[None] - s[:, None], p=2, dim=2)
    with torch.no_grad():
        ut = F.normalize(t[None] - t[:, None], p=2, dim=2)
    return F.smooth_l1_loss(torch.bmm(us, us.transpose(1, 2)), torch.bmm(ut, ut.transpose(1, 2)))


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 9, 100, None])
def test_chunked_angle_equals_unchunked_in_value_and_gradient(chunk):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(9, 4, generator=g, requires_grad=True)
    t = torch.randn(9, 6, generator=g)
    ref = _unchunked_angle_loss(s, t)
    ref_grad, = torch.autograd.grad(ref, s)
    value = rkd_module.angle_loss(s, t, chunk)
    grad, = torch.autograd.grad(value, s)
    assert value.item() == pytest.approx(ref.item(), abs=1e-6)
    assert torch.allclose(grad, ref_grad, atol=1e-6)


def test_chunked_angle_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ut = losses.unit_differences(torch.randn(6, 4, generator=g, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda x: losses.angle_potential_huber(losses.unit_differences(x), ut, 4), (s,))


def test_auto_chunk_bounds_the_cosine_block():
    assert losses.auto_chunk(64, 512, 2048) == 64       # B ≤ D: one block
    assert losses.auto_chunk(1024, 128, 64) == 128      # B > D: chunk·B² ≤ B²·D
    assert losses.auto_chunk(3, 1, 1) == 1


# -- gradient flow -------------------------------------------------------------------------------

def test_gradient_reaches_the_student_never_the_teacher():
    s = S_EMB.clone().requires_grad_(True)
    t = T_EMB.clone().requires_grad_(True)
    logits = LOGITS.clone().requires_grad_(True)
    terms = RKD().loss(_step(s, t, logits))  # teacher passed with grad on: the method must detach it
    sum(terms.values()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and torch.isfinite(s.grad).all()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert t.grad is None
    # each relational term alone moves the student embedding
    for name in ("distance", "angle"):
        s.grad = None
        RKD().loss(_step(s, t, logits))[name].backward()
        assert s.grad.abs().sum() > 0, name
    assert t.grad is None


def test_bf16_embeddings_are_computed_in_float32():
    terms = RKD().loss(_step(S_EMB.bfloat16(), T_EMB.bfloat16(), LOGITS.bfloat16()))
    assert all(v.dtype == torch.float32 for v in terms.values())
    expected = 25 * _ref_distance_loss(S_EMB.bfloat16().float().tolist(), T_EMB.bfloat16().float().tolist())
    assert terms["distance"].item() == pytest.approx(expected, abs=1e-4)


def test_batch_of_one_gives_zero_relational_terms():
    terms = RKD().loss(_step(S_EMB[:1], T_EMB[:1], LOGITS[:1], TARGETS[:1]))
    assert terms["distance"].item() == 0.0 and terms["angle"].item() == 0.0


# -- registry and settings ---------------------------------------------------------------------

def test_alias_resolves_to_the_same_class():
    assert get_method("rkd") is RKD
    assert RKD.name == "relational_kd"
    assert "rkd" in aliases_of("relational_kd")
    assert RKD.needs_teacher and RKD.taps.student == ("embedding",) and RKD.taps.teacher == ("embedding",)
    assert RKD().extra_parameter_count() == 0


def test_defaults_and_typed_settings():
    c = RKD.Config()
    assert (c.ce_weight, c.distance_weight, c.angle_weight, c.eps, c.squared) == (1.0, 25.0, 50.0, 1e-12, False)
    c = apply_overrides(RKD.Config(), {"distance_weight": "1", "angle_weight": "2", "angle_chunk": "8"}, "rkd")
    assert (c.distance_weight, c.angle_weight, c.angle_chunk) == (1.0, 2.0, 8)
    with pytest.raises(UserError):
        apply_overrides(RKD.Config(), {"angle_weigth": "2"}, "rkd")
    with pytest.raises(UserError):
        RKD(RKD.Config(angle_weight=-1.0))
    with pytest.raises(UserError):
        RKD(RKD.Config(angle_chunk=-2))


def test_squared_distances_option():
    s, t = S_EMB.tolist(), T_EMB.tolist()

    def sq(e):
        n = len(e)
        d = [[dot(_sub(e[i], e[j]), _sub(e[i], e[j])) if i != j else 0.0 for j in range(n)] for i in range(n)]
        mu = sum(v for row in d for v in row if v > 0) / (n * n - n)
        return [[v / mu for v in row] for row in d]

    ds, dt = sq(s), sq(t)
    expected = sum(huber(ds[i][j] - dt[i][j]) for i in range(5) for j in range(5)) / 25
    assert rkd_module.distance_loss(S_EMB, T_EMB, squared=True).item() == pytest.approx(expected, abs=1e-5)
