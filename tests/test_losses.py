"""The shared loss library (kdzoo.losses), one test per term, and the kd / baseline losses built on it.

Every term is compared with an independent reference written differently: plain Python over
nested lists, explicit loops, float64 (``math`` rather than torch), so a vectorised mistake in
the library cannot repeat itself in the reference. Inputs are float64; the terms that compute in
float32 on purpose (KL, CE, attention, standardisation) are held to 1e-5.
"""

import math

import pytest
import torch

from kdzoo import losses
from kdzoo.method import NetOutputs, StepOutputs
from kdzoo.registry import get_method

from .reference import ce, dot, huber, kl, mean_ce, mean_kl

TOL = 1e-5
S = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=torch.float64)
T = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 2.0]], dtype=torch.float64)
Y = torch.tensor([1, 2])
S_ROWS, T_ROWS, Y_LIST = S.tolist(), T.tolist(), Y.tolist()  # for the loop references


def _random(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _close(got: torch.Tensor, want, tol: float = TOL) -> bool:
    """Element-wise |got − want| ≤ tol·(1 + |want|), ``want`` a nested list or a number."""
    want = torch.tensor(want, dtype=torch.float64)
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    return bool(((got.double() - want).abs() <= tol * (1 + want.abs())).all())


# -- independent references: nested lists, loops -------------------------------------------------

def _pixel_rows(x):
    """(B, K, H, W) nested lists → list of per-pixel K-vectors in (b, h, w) order."""
    return [[x[b][k][h][w] for k in range(len(x[b]))]
            for b in range(len(x)) for h in range(len(x[b][0])) for w in range(len(x[b][0][0]))]


def _channel_mean_abs_pow(x, p):
    """(B, C, H, W) lists → (B, H, W): mean over channels of |x|^p."""
    return [[[sum(abs(x[b][c][h][w]) ** p for c in range(len(x[b]))) / len(x[b])
              for w in range(len(x[b][0][0]))] for h in range(len(x[b][0]))] for b in range(len(x))]


def _l2_normalised_rows(rows):
    out = []
    for row in rows:
        norm = math.sqrt(sum(v * v for v in row))
        out.append([v / max(norm, 1e-12) for v in row])
    return out


def _flatten_maps(maps):
    """(B, H, W) lists → (B, H·W)."""
    return [[v for line in m for v in line] for m in maps]


def _adaptive_windows(n_in, n_out):
    """PyTorch's adaptive pooling windows: [⌊i·n_in/n_out⌋, ⌈(i+1)·n_in/n_out⌉)."""
    return [(i * n_in // n_out, -(-(i + 1) * n_in // n_out)) for i in range(n_out)]


def _adaptive_pool(plane, size, reduce):
    rows, cols = _adaptive_windows(len(plane), size[0]), _adaptive_windows(len(plane[0]), size[1])
    return [[reduce([plane[y][x] for y in range(*r) for x in range(*c)]) for c in cols] for r in rows]


def _bilinear(plane, size):
    """align_corners=False: source coordinate (dst + ½)·in/out − ½, clamped at 0."""
    h_in, w_in = len(plane), len(plane[0])

    def source(dst, n_in, n_out):
        pos = max((dst + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = int(math.floor(pos))
        hi = min(lo + 1, n_in - 1)
        return lo, hi, pos - lo

    out = []
    for y in range(size[0]):
        y0, y1, fy = source(y, h_in, size[0])
        line = []
        for x in range(size[1]):
            x0, x1, fx = source(x, w_in, size[1])
            top = plane[y0][x0] * (1 - fx) + plane[y0][x1] * fx
            bottom = plane[y1][x0] * (1 - fx) + plane[y1][x1] * fx
            line.append(top * (1 - fy) + bottom * fy)
        out.append(line)
    return out


def _per_plane(x, fn):
    """Apply ``fn`` to every (H, W) plane of a (B, C, H, W) nested list."""
    return [[fn(plane) for plane in sample] for sample in x]


def _same_max_pool(plane):
    """3×3, stride 2, output ⌈n/2⌉, zero padding split as TensorFlow's "same" (extra on the far side)."""
    h, w = len(plane), len(plane[0])
    out_h, out_w = (h + 1) // 2, (w + 1) // 2
    top = max((out_h - 1) * 2 + 3 - h, 0) // 2
    left = max((out_w - 1) * 2 + 3 - w, 0) // 2

    def at(y, x):
        return plane[y][x] if 0 <= y < h and 0 <= x < w else 0.0

    return [[max(at(2 * i - top + dy, 2 * j - left + dx) for dy in range(3) for dx in range(3))
             for j in range(out_w)] for i in range(out_h)]


# -- logits: pixels as samples, KL, softened KL, cross-entropy ----------------------------------

def test_pixels_as_samples_makes_every_pixel_a_row_and_passes_rows_through():
    x = _random(2, 3, 2, 4)
    assert _close(losses.pixels_as_samples(x), _pixel_rows(x.tolist()), tol=0)
    assert losses.pixels_as_samples(S) is S


def test_kl_div_matches_loops_per_row_and_averaged():
    for tau in (1.0, 4.0):
        assert losses.kl_div(S, T, tau).item() == pytest.approx(mean_kl(S_ROWS, T_ROWS, tau), abs=TOL)
        per_row = [kl(a, b, tau) for a, b in zip(S_ROWS, T_ROWS)]
        assert _close(losses.kl_div(S, T, tau, reduction="none"), per_row)


def test_kl_div_closed_form_against_a_uniform_student():
    # KL(p ‖ uniform) = log K − H(p)
    teacher = torch.tensor([[3.0, 0.0, 1.0, -2.0]], dtype=torch.float64)
    p = torch.softmax(teacher, dim=1)[0].tolist()
    expected = math.log(4) + sum(q * math.log(q) for q in p)
    assert losses.kl_div(torch.zeros(1, 4, dtype=torch.float64), teacher, 1.0).item() == pytest.approx(expected, abs=TOL)
    assert losses.kl_div(teacher, teacher, 3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_softened_kl_is_tau_squared_kl():
    for tau in (1.0, 2.0, 4.0):
        assert losses.softened_kl(S, T, tau).item() == pytest.approx(tau**2 * mean_kl(S_ROWS, T_ROWS, tau), rel=TOL)
    per_row = [9.0 * kl(a, b, 3.0) for a, b in zip(S_ROWS, T_ROWS)]
    assert _close(losses.softened_kl(S, T, 3.0, reduction="none"), per_row)


def test_softened_kl_on_dense_logits_averages_over_every_pixel():
    s, t = _random(2, 3, 2, 3, seed=1), _random(2, 3, 2, 3, seed=2)
    s_rows, t_rows = _pixel_rows(s.tolist()), _pixel_rows(t.tolist())
    expected = 4.0 * sum(kl(a, b, 2.0) for a, b in zip(s_rows, t_rows)) / (2 * 2 * 3)  # B·H·W pixels
    assert losses.softened_kl(s, t, 2.0).item() == pytest.approx(expected, rel=TOL)


def test_cross_entropy_hard_soft_and_smoothed_targets():
    assert losses.cross_entropy(S, Y).item() == pytest.approx(mean_ce(S_ROWS, Y_LIST), abs=TOL)
    probabilities = [[0.2, 0.5, 0.3], [0.0, 0.1, 0.9]]
    soft = torch.tensor(probabilities, dtype=torch.float64)
    assert losses.cross_entropy(S, soft).item() == pytest.approx(mean_ce(S_ROWS, probabilities), abs=TOL)
    smoothed = [[0.1 + (0.7 if k == y else 0.0) for k in range(3)] for y in Y_LIST]
    assert losses.cross_entropy(S, Y, label_smoothing=0.3).item() == pytest.approx(mean_ce(S_ROWS, smoothed), abs=TOL)


def test_cross_entropy_on_masks_is_the_mean_over_labelled_pixels():
    logits = _random(2, 4, 2, 3, seed=3)
    masks = torch.tensor([[[0, 3, 255], [1, 255, 2]], [[255, 255, 3], [0, 0, 1]]])
    rows, labels = _pixel_rows(logits.tolist()), masks.flatten().tolist()
    labelled = [(row, y) for row, y in zip(rows, labels) if y != losses.IGNORE_INDEX]
    expected = sum(ce(row, y) for row, y in labelled) / len(labelled)
    assert len(labelled) == 8
    assert losses.cross_entropy(logits, masks).item() == pytest.approx(expected, abs=TOL)
    all_ignored = logits.clone().requires_grad_(True)
    loss = losses.cross_entropy(all_ignored, torch.full((2, 2, 3), losses.IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and all_ignored.grad is not None


def test_class_probabilities_one_hot_and_passthrough():
    assert losses.class_probabilities(Y, 3).tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    soft = torch.tensor([[0.25, 0.75]])
    assert torch.equal(losses.class_probabilities(soft, 2), soft)


# -- spatial attention ---------------------------------------------------------------------------

def test_activation_map_is_the_channel_mean_of_abs_pow_p():
    x = _random(2, 3, 2, 3, seed=4)
    for p in (1.0, 2.0, 3.0):  # p = 3 would go wrong without the absolute value
        assert _close(losses.activation_map(x, p), _channel_mean_abs_pow(x.tolist(), p))


def test_attention_map_normalises_the_flattened_map():
    x = _random(2, 3, 3, 2, seed=5)
    expected = _l2_normalised_rows(_flatten_maps(_channel_mean_abs_pow(x.tolist(), 2.0)))
    assert _close(losses.attention_map(x), expected)
    # closed form: channel means of squares 5 and 10 → (5, 10)/√125
    two = torch.tensor([[[[3.0, 0.0]], [[1.0, 2.0 * math.sqrt(5.0)]]]], dtype=torch.float64)
    assert _close(losses.attention_map(two), [[5 / math.sqrt(125), 10 / math.sqrt(125)]])


def test_attention_map_resizes_the_map_not_the_feature():
    x = _random(1, 2, 5, 4, seed=6)
    amap = _channel_mean_abs_pow(x.tolist(), 2.0)[0]
    pooled = _adaptive_pool(amap, (3, 2), lambda v: sum(v) / len(v))  # 5 → 3 uses overlapping windows
    expected = _l2_normalised_rows([[v for line in pooled for v in line]])
    assert _close(losses.attention_map(x, size=(3, 2)), expected)


def test_attention_loss_mean_and_summed_over_positions():
    student, teacher = _random(2, 3, 2, 2, seed=7), _random(2, 5, 4, 4, seed=8)  # other width, finer grid
    a_s = _l2_normalised_rows(_flatten_maps(_channel_mean_abs_pow(student.tolist(), 2.0)))
    t_maps = [_adaptive_pool(m, (2, 2), lambda v: sum(v) / len(v)) for m in _channel_mean_abs_pow(teacher.tolist(), 2.0)]
    a_t = _l2_normalised_rows(_flatten_maps(t_maps))
    squares = [[(u - v) ** 2 for u, v in zip(rs, rt)] for rs, rt in zip(a_s, a_t)]
    mean_all = sum(map(sum, squares)) / 8
    summed = sum(map(sum, squares)) / 2
    assert losses.attention_loss(student, teacher).item() == pytest.approx(mean_all, rel=TOL)
    assert losses.attention_loss(student, teacher, sum_positions=True).item() == pytest.approx(summed, rel=TOL)


def test_attention_loss_moves_only_the_student():
    student = _random(2, 3, 2, 2, seed=9).requires_grad_(True)
    teacher = _random(2, 3, 2, 2, seed=10).requires_grad_(True)
    losses.attention_loss(student, teacher).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    assert losses.attention_loss(teacher, 7.0 * teacher).item() == pytest.approx(0.0, abs=1e-12)  # scale-free


# -- resizing --------------------------------------------------------------------------------------

def test_resize_bilinear_matches_loops_both_ways():
    x = _random(1, 2, 3, 5, seed=11)
    for size in ((6, 7), (2, 3)):
        expected = _per_plane(x.tolist(), lambda plane: _bilinear(plane, size))
        assert _close(losses.resize_bilinear(x, size), expected)
    assert losses.resize_bilinear(x, torch.Size([3, 5])) is x


def test_resize_average_pools_down_and_interpolates_up():
    x = _random(2, 1, 5, 6, seed=12)
    expected = _per_plane(x.tolist(), lambda plane: _adaptive_pool(plane, (2, 3), lambda v: sum(v) / len(v)))
    assert _close(losses.resize_average(x, (2, 3)), expected)
    assert _close(losses.resize_average(x, (7, 8)), _per_plane(x.tolist(), lambda plane: _bilinear(plane, (7, 8))))
    assert losses.resize_average(x, (5, 6)) is x


def test_same_max_pool_matches_tensorflow_same_padding_including_negatives():
    for h, w in ((5, 5), (6, 7), (1, 2)):
        x = _random(1, 2, h, w, seed=h * 10 + w)  # negative values show where the zero padding lands
        assert _close(losses.same_max_pool(x), _per_plane(x.tolist(), _same_max_pool), tol=0)


def test_downsample_max_halves_pools_adaptively_or_passes_through():
    x = _random(1, 1, 7, 7, seed=13)
    assert _close(losses.downsample_max(x, (4, 4)), _per_plane(x.tolist(), _same_max_pool), tol=0)
    assert _close(losses.downsample_max(x, (3, 2)),
                  _per_plane(x.tolist(), lambda plane: _adaptive_pool(plane, (3, 2), max)), tol=0)
    assert losses.downsample_max(x, (7, 7)) is x


def test_upsample_nearest_takes_the_nearest_source_pixel():
    x = _random(1, 1, 3, 4, seed=14)
    size = (7, 8)
    expected = _per_plane(x.tolist(), lambda plane: [[plane[y * 3 // 7][c * 4 // 8] for c in range(8)] for y in range(7)])
    assert _close(losses.upsample_nearest(x, size), expected, tol=0)
    assert losses.upsample_nearest(x, (3, 4)) is x


# -- standardisation --------------------------------------------------------------------------------

def test_standardize_matches_loops():
    x = _random(2, 3, 3, 4, seed=15) * 3 + 1
    eps = 1e-2  # large enough for the reference to notice where eps is added

    def standardise(plane):
        values = [v for line in plane for v in line]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))  # population σ
        return [[(v - mean) / (std + eps) for v in line] for line in plane]

    assert _close(losses.standardize(x, eps), _per_plane(x.tolist(), standardise))


def test_standardize_constant_channel_is_zero_with_finite_gradient():
    x = _random(1, 2, 3, 3, seed=16)
    x[:, 1] = 2.5
    x.requires_grad_(True)
    y = losses.standardize(x)
    y.pow(2).sum().backward()
    assert torch.all(y[:, 1] == 0) and torch.isfinite(x.grad).all()


# -- pairwise relations --------------------------------------------------------------------------------

E = _random(5, 3, seed=17)
E_ROWS = E.tolist()


def _distance(a, b):
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def test_pairwise_distances_match_loops():
    n = len(E_ROWS)
    plain = [[0.0 if i == j else _distance(E_ROWS[i], E_ROWS[j]) for j in range(n)] for i in range(n)]
    assert _close(losses.pairwise_distances(E), plain)
    assert _close(losses.pairwise_distances(E, squared=True), [[v * v for v in row] for row in plain])
    same = torch.zeros(3, 2, dtype=torch.float64)  # coincident points: √eps off the diagonal, 0 on it
    assert _close(losses.pairwise_distances(same, eps=1e-6), [[0.0 if i == j else 1e-3 for j in range(3)] for i in range(3)])


def test_normalized_distances_divide_by_the_mean_off_diagonal_distance():
    n = len(E_ROWS)
    off = [_distance(E_ROWS[i], E_ROWS[j]) for i in range(n) for j in range(n) if i != j]
    mu = sum(off) / len(off)
    expected = [[0.0 if i == j else _distance(E_ROWS[i], E_ROWS[j]) / mu for j in range(n)] for i in range(n)]
    assert _close(losses.normalized_distances(E), expected)
    assert _close(losses.normalized_distances(10.0 * E), expected)  # scale-free


def _unit(a, b):
    """(b − a)/‖b − a‖, or zeros when the points coincide."""
    d = _distance(a, b)
    return [(y - x) / d for x, y in zip(a, b)] if d > 1e-12 else [0.0] * len(a)


def test_unit_differences_match_loops_and_are_zero_for_coincident_points():
    e = torch.cat([E, E[1:2]])  # sample 5 coincides with sample 1
    rows = e.tolist()
    expected = [[_unit(rows[i], rows[j]) for j in range(len(rows))] for i in range(len(rows))]
    u = losses.unit_differences(e)
    assert _close(u, expected)
    assert torch.all(u[1, 5] == 0) and torch.all(u[3, 3] == 0)


def test_triplet_cosines_are_the_angles_at_each_anchor():
    u = losses.unit_differences(E)
    n = len(E_ROWS)

    def cosine_at(i, j, k):
        return dot(_unit(E_ROWS[i], E_ROWS[j]), _unit(E_ROWS[i], E_ROWS[k]))

    expected = [[[cosine_at(i, j, k) for k in range(n)] for j in range(n)] for i in range(1, 3)]
    assert _close(losses.triplet_cosines(u, 1, 3), expected)
    # a right angle: from (0, 0), the points (1, 0) and (0, 2) are 90° apart
    corner = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    assert losses.triplet_cosines(losses.unit_differences(corner), 0, 1)[0, 1, 2].item() == pytest.approx(0.0, abs=1e-12)


def test_angle_potential_huber_is_the_mean_huber_over_all_triplets_for_any_chunk():
    student, teacher = E, _random(5, 4, seed=18) * 2
    s_rows, t_rows = student.tolist(), teacher.tolist()
    n = len(s_rows)

    def psi(rows, i, j, k):
        return dot(_unit(rows[i], rows[j]), _unit(rows[i], rows[k]))

    expected = sum(huber(psi(s_rows, i, j, k) - psi(t_rows, i, j, k))
                   for i in range(n) for j in range(n) for k in range(n)) / n**3
    u_t = losses.unit_differences(teacher)
    grads = []
    for chunk in (1, 2, 5):
        s = student.clone().requires_grad_(True)
        value = losses.angle_potential_huber(losses.unit_differences(s), u_t, chunk)
        assert value.item() == pytest.approx(expected, rel=TOL)
        value.backward()
        grads.append(s.grad)
    assert torch.allclose(grads[0], grads[1]) and torch.allclose(grads[0], grads[2])


def test_auto_chunk_is_min_of_batch_and_width():
    assert losses.auto_chunk(64, 512, 2048) == 64
    assert losses.auto_chunk(1024, 128, 64) == 128
    assert losses.auto_chunk(3, 1, 1) == 1


# -- methods built on the library: kd and baseline --------------------------------------------------

S32, T32 = S.float(), T.float()


def test_kd_loss_against_formula():
    method = get_method("kd")()
    terms = method.loss(StepOutputs(NetOutputs(S32), Y, teacher=NetOutputs(T32)))
    assert terms["ce"].item() == pytest.approx(0.1 * mean_ce(S_ROWS, Y_LIST), abs=1e-6)
    assert terms["kd"].item() == pytest.approx(0.9 * 16 * mean_kl(S_ROWS, T_ROWS, 4.0), abs=1e-5)


def test_kd_settings_change_the_loss():
    cls = get_method("kd")
    method = cls(cls.Config(temperature=1.0, ce_weight=0.5, kd_weight=0.5))
    terms = method.loss(StepOutputs(NetOutputs(S32), Y, teacher=NetOutputs(T32)))
    assert terms["kd"].item() == pytest.approx(0.5 * mean_kl(S_ROWS, T_ROWS, 1.0), abs=1e-6)


def test_kd_gradient_reaches_student_not_teacher():
    s = S32.clone().requires_grad_(True)
    t = T32.clone().requires_grad_(True)
    method = get_method("kd")()
    with torch.no_grad():
        t_out = t * 1.0  # what the engine does: the teacher forward runs under no_grad
    sum(method.loss(StepOutputs(NetOutputs(s), Y, teacher=NetOutputs(t_out))).values()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_baseline_is_cross_entropy_and_label_smoothing():
    cls = get_method("baseline")
    assert cls().loss(StepOutputs(NetOutputs(S32), Y))["ce"].item() == pytest.approx(mean_ce(S_ROWS, Y_LIST), abs=1e-6)
    smoothed = cls(cls.Config(label_smoothing=0.3)).loss(StepOutputs(NetOutputs(S32), Y))["ce"].item()
    targets = [[0.1 + (0.7 if k == label else 0.0) for k in range(3)] for label in Y_LIST]
    assert smoothed == pytest.approx(mean_ce(S_ROWS, targets), abs=1e-6)


def test_top_level_names_come_from_the_library():
    import kdzoo
    import kdzoo.method

    assert kdzoo.kl_div is losses.kl_div and kdzoo.cross_entropy is losses.cross_entropy
    assert kdzoo.losses is losses
    assert not hasattr(kdzoo.method, "kl_div") and not hasattr(kdzoo.method, "cross_entropy")
