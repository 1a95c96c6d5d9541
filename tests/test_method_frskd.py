"""FRSKD: loss terms against loop references, the stop-gradients, the self-teacher on odd and
equal stage sizes, mixup/cutmix/SLA batches, and the variants in the engine."""

import math

import pytest
import torch
from kdzoo.methods import frskd as FR

from kdzoo import losses
from kdzoo.errors import UserError
from kdzoo.method import Batch, NetOutputs, StepOutputs
from kdzoo.models import ModelInfo
from kdzoo.registry import get_method

from .conftest import tiny_config
from .reference import ce, kl, mean_ce, mean_kl

K = 5


def prepared(method, images, targets, augment):
    """(images, targets) of ``method.prepare_batch`` on a raw batch whose rows are dataset images 0..B-1."""
    batch = method.prepare_batch(Batch(images, targets, torch.arange(len(targets), device=targets.device)), augment)
    return batch.images, batch.targets


def _info(channels, sizes, num_classes=K):
    shapes = {f"stage{i + 1}": (c, *((s, s) if isinstance(s, int) else s)) for i, (c, s) in enumerate(zip(channels, sizes))}
    shapes["logits"] = (num_classes,)
    return ModelInfo("hand-made", num_classes, 16, shapes)


def _method(channels, sizes, num_classes=K, **settings):
    cls = get_method("frskd")
    method = cls(cls.Config(**settings))
    method.setup(_info(channels, sizes, num_classes), None)
    return method


def _stages(channels, sizes, batch=2, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    feats = {}
    for i, (c, s) in enumerate(zip(channels, sizes)):
        h, w = (s, s) if isinstance(s, int) else s
        feats[f"stage{i + 1}"] = torch.randn(batch, c, h, w, generator=g).relu().requires_grad_(grad)
    return feats


# -- independent references: plain Python loops in float64 (shared ones in tests/reference.py) --

def _attention(sample):
    """One sample (C, H, W) as nested lists → its normalised attention values over positions."""
    c, h, w = len(sample), len(sample[0]), len(sample[0][0])
    values = [sum(sample[k][y][x] ** 2 for k in range(c)) / c for y in range(h) for x in range(w)]
    norm = math.sqrt(sum(v * v for v in values))
    return [v / max(norm, 1e-12) for v in values]


def _att_loss(f, r):
    f, r = f.tolist(), r.tolist()
    total, count = 0.0, 0
    for fs, rs in zip(f, r):
        for a, b in zip(_attention(fs), _attention(rs)):
            total += (a - b) ** 2
            count += 1
    return total / count


# -- (a) the loss against the formula ---------------------------------------------------------

CHANNELS, SIZES = [3, 4, 6, 2], [6, 3, 2, 1]


def test_attention_map_closed_form():
    x = torch.zeros(1, 2, 1, 2)
    x[0, :, 0, 0] = torch.tensor([3.0, 1.0])  # mean of squares 5
    x[0, :, 0, 1] = torch.tensor([0.0, 2.0 * math.sqrt(5.0)])  # mean of squares 10
    expected = torch.tensor([[5.0, 10.0]]) / math.sqrt(125.0)
    assert torch.allclose(losses.attention_map(x), expected, atol=1e-7)


def test_loss_terms_match_loop_reference():
    torch.manual_seed(0)
    method = _method(CHANNELS, SIZES)
    feats = _stages(CHANNELS, SIZES, batch=3)
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0, 0.0], [0.3, 1.5, 0.0, 0.2, -2.0], [0.0, -1.0, 3.0, 1.0, 0.5]])
    y = torch.tensor([1, 4, 2])
    terms = method.loss(StepOutputs(NetOutputs(logits, feats), y))
    assert set(terms) == {"ce", "ce_self", "kd", "att"}

    refined, z_t = method.self_teacher(list(feats.values()))  # deterministic: same batch, same BN statistics
    s, t = logits.tolist(), z_t.detach().tolist()
    hard = mean_ce(s, y.tolist())
    hard_self = mean_ce(t, y.tolist())
    kl4 = mean_kl(s, t, 4.0)
    mse = sum(_att_loss(f, r.detach()) for f, r in zip(feats.values(), refined))
    assert terms["ce"].item() == pytest.approx(hard, abs=1e-5)
    assert terms["ce_self"].item() == pytest.approx(hard_self, abs=1e-5)
    # the unweighted quantities to 1e-6, then the weights α·τ² = 32 and β = 100 (float32 sums)
    assert terms["kd"].item() / 32 == pytest.approx(kl4, abs=1e-6)
    assert terms["att"].item() / 100 == pytest.approx(mse, abs=1e-6)
    assert terms["kd"].item() == pytest.approx(32 * kl4, rel=1e-5)
    assert terms["att"].item() == pytest.approx(100 * mse, rel=1e-5)


def test_settings_change_the_weights():
    feats = _stages(CHANNELS, SIZES)
    logits, y = torch.randn(2, K, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 3])
    torch.manual_seed(0)
    base = _method(CHANNELS, SIZES).loss(StepOutputs(NetOutputs(logits, feats), y))
    torch.manual_seed(0)
    other = _method(CHANNELS, SIZES, alpha=1.0, beta=10.0, temperature=1.0).loss(StepOutputs(NetOutputs(logits, feats), y))
    assert other["att"].item() == pytest.approx(base["att"].item() / 10, rel=1e-5)
    assert other["ce_self"].item() == pytest.approx(base["ce_self"].item(), rel=1e-6)
    torch.manual_seed(0)
    z_t = _method(CHANNELS, SIZES).self_teacher(list(feats.values()))[1].detach()
    kl1 = mean_kl(logits.tolist(), z_t.tolist(), 1.0)
    assert other["kd"].item() == pytest.approx(kl1, abs=1e-5)


@pytest.mark.parametrize("progress,expected", [(0.0, 0.0), (0.29, 0.0), (0.3, math.exp(-5)), (0.45, math.exp(-5 * 0.5**2)), (0.6, 1.0), (1.0, 1.0)])
def test_ramp_scales_both_distillation_terms(progress, expected):
    feats = _stages(CHANNELS, SIZES)
    logits, y = torch.randn(2, K, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 3])
    torch.manual_seed(0)
    full = _method(CHANNELS, SIZES).loss(StepOutputs(NetOutputs(logits, feats), y))
    torch.manual_seed(0)
    ramped = _method(CHANNELS, SIZES, ramp_start=0.3, ramp_length=0.3).loss(
        StepOutputs(NetOutputs(logits, feats), y, progress=progress))
    for term in ("kd", "att"):
        assert ramped[term].item() == pytest.approx(expected * full[term].item(), rel=1e-5, abs=1e-12)
    assert ramped["ce_self"].item() == pytest.approx(full["ce_self"].item(), rel=1e-6)  # never ramped


def test_soft_targets_and_bf16_features_are_accepted():
    method = _method(CHANNELS, SIZES)
    feats = {k: v.bfloat16() for k, v in _stages(CHANNELS, SIZES).items()}
    soft = torch.tensor([[0.5, 0.5, 0, 0, 0], [0, 0, 0.25, 0.75, 0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the engine runs loss() under autocast
        terms = method.loss(StepOutputs(NetOutputs(torch.randn(2, K).bfloat16(), feats), soft))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())


def test_num_stages_uses_the_last_stages():
    method = _method(CHANNELS, SIZES, num_stages=2)
    assert method.self_teacher.widths == [12, 4]
    terms = method.loss(StepOutputs(NetOutputs(torch.randn(2, K), _stages(CHANNELS, SIZES)), torch.tensor([0, 1])))
    assert torch.isfinite(sum(terms.values()))
    with pytest.raises(UserError):
        _method(CHANNELS, SIZES, num_stages=5)


@pytest.mark.parametrize("settings", [dict(temperature=0), dict(beta=-1), dict(width=0), dict(mix_alpha=0.0),
                                      dict(sla=True, aug="mixup"), dict(num_stages=-1)])
def test_bad_settings_fail_clearly(settings):
    cls = get_method("frskd")
    with pytest.raises(UserError):
        cls(cls.Config(**settings))


# -- the self-teacher's pieces ----------------------------------------------------------------

def test_self_teacher_widths_and_output_shapes():
    method = _method([64, 128, 256, 512], [8, 4, 2, 1])
    st = method.self_teacher
    assert st.widths == [128, 256, 512, 1024]
    assert [len(w) for w in st.td_weight] == [2, 2, 2] and [len(w) for w in st.bu_weight] == [3, 3, 2]
    assert all(torch.equal(w, torch.ones_like(w)) for w in [*st.td_weight, *st.bu_weight])
    refined, z_t = st(list(_stages([64, 128, 256, 512], [8, 4, 2, 1]).values()))
    assert [tuple(r.shape[1:]) for r in refined] == [(128, 8, 8), (256, 4, 4), (512, 2, 2), (1024, 1, 1)]
    assert z_t.shape == (2, K) and all((r >= 0).all() for r in refined)


def test_self_teacher_forward_is_the_bifpn_formula():
    """Three levels at 8/4/2, written out node by node with ×2 nearest and a padded 3×3/2 pool."""
    F = torch.nn.functional
    st = _method([3, 4, 5], [8, 4, 2]).self_teacher
    with torch.no_grad():
        for w in [*st.td_weight, *st.bu_weight]:
            w.copy_(torch.rand_like(w) + 0.1)
        w = [w.relu() / (w.relu().sum() + 1e-6) for w in [*st.td_weight, *st.bu_weight]]
    f0, f1, f2 = (f.relu() for f in _stages([3, 4, 5], [8, 4, 2], batch=3, seed=7).values())

    def up2(x):
        return F.interpolate(x.relu(), scale_factor=2.0, mode="nearest")

    def down2(x):  # TF "same" for an even size: one zero row/column after, none before
        return F.max_pool2d(F.pad(x.relu(), [0, 1, 0, 1]), 3, 2)

    p2 = st.lateral[2](f2)
    p1 = st.td_conv[1](w[1][0] * st.lateral[1](f1) + w[1][1] * st.td_proj[1](up2(p2)))
    p0 = st.td_conv[0](w[0][0] * st.lateral[0](f0) + w[0][1] * st.td_proj[0](up2(p1)))
    t1 = st.bu_conv[0](w[2][0] * st.lateral_bu[0](f1) + w[2][1] * p1.relu() + w[2][2] * st.bu_proj[0](down2(p0)))
    t2 = st.bu_conv[1](w[3][0] * st.lateral_bu[1](f2) + w[3][1] * st.bu_proj[1](down2(t1)))
    logits = st.fc(t2.relu().mean(dim=(2, 3)))

    refined, z_t = st([f0, f1, f2])
    for got, want in zip(refined, (p0, t1, t2)):
        assert torch.allclose(got, want.relu(), atol=1e-5)
    assert torch.allclose(z_t, logits, atol=1e-5)


def test_same_max_pool_is_tf_same_padding():
    x = torch.arange(25.0).view(1, 1, 5, 5)
    out = losses.same_max_pool(x)  # 5 → 3; padding 1 on each side
    assert out.shape[-2:] == (3, 3)
    assert out[0, 0].tolist() == [[6.0, 8.0, 9.0], [16.0, 18.0, 19.0], [21.0, 23.0, 24.0]]
    assert losses.same_max_pool(torch.ones(1, 1, 8, 8)).shape[-2:] == (4, 4)


def test_resampling_lands_on_any_target_size():
    x = torch.rand(2, 3, 7, 7)
    assert losses.downsample_max(x, (4, 4)).shape[-2:] == (4, 4)
    assert torch.equal(losses.downsample_max(x, (4, 4)), losses.same_max_pool(x))
    assert losses.downsample_max(x, (7, 7)) is x
    assert losses.downsample_max(x, (2, 2)).shape[-2:] == (2, 2)
    assert losses.downsample_max(x, (9, 9)).shape[-2:] == (9, 9)
    small = torch.rand(2, 3, 4, 4)
    assert torch.equal(losses.upsample_nearest(small, (8, 8)), small.repeat_interleave(2, 2).repeat_interleave(2, 3))
    assert losses.upsample_nearest(small, (7, 7)).shape[-2:] == (7, 7)


def test_fusion_weights_are_relu_normalised():
    w = FR.fusion_weights(torch.tensor([2.0, -1.0, 2.0]))
    assert w.tolist() == pytest.approx([2 / (4 + 1e-6), 0.0, 2 / (4 + 1e-6)])


# -- (b) gradient flow -------------------------------------------------------------------------

def _grad_setup(channels=CHANNELS, sizes=SIZES):
    method = _method(channels, sizes)
    feats = _stages(channels, sizes, grad=True)
    logits = torch.randn(2, K, requires_grad=True)
    return method, feats, logits, method.loss(StepOutputs(NetOutputs(logits, feats), torch.tensor([1, 3])))


def test_every_self_teacher_parameter_and_every_stage_get_gradient():
    method, feats, logits, terms = _grad_setup()
    sum(terms.values()).backward()
    for name, p in method.self_teacher.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, f in feats.items():
        assert f.grad is not None and f.grad.abs().sum() > 0, name
    assert logits.grad.abs().sum() > 0


def test_distillation_terms_do_not_reach_the_self_teacher():
    method, feats, logits, terms = _grad_setup()
    (terms["kd"] + terms["att"]).backward()
    assert all(p.grad is None for p in method.self_teacher.parameters())
    assert logits.grad.abs().sum() > 0
    # a 1×1 map's normalised attention is the constant 1, so only larger maps get an attention gradient
    assert all(f.grad.abs().sum() > 0 for f in feats.values() if f.shape[-1] * f.shape[-2] > 1)


def test_self_teacher_cross_entropy_trains_the_backbone():
    method, feats, logits, terms = _grad_setup()
    terms["ce_self"].backward()
    assert logits.grad is None
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats.values())


# -- (c) stage sizes that are not exact halvings -----------------------------------------------

@pytest.mark.parametrize("channels,sizes", [
    ([3, 4, 6, 2], [7, 4, 2, 1]),              # odd sizes
    ([8, 8, 8, 8], [3, 3, 3, 3]),              # ViT-like: every stage on the same grid
    ([4, 6, 5], [(4, 6), (2, 3), (1, 2)]),    # non-square
    ([4, 6], [16, 4]),                         # a stride-4 jump
    ([4, 6, 5], [4, 5, 2]),                    # a deeper stage larger than the one before
    ([6], [3]),                                # a single stage
])
def test_any_stage_sizes_work(channels, sizes):
    method, feats, logits, terms = _grad_setup(channels, sizes)
    refined, _ = method.self_teacher(list(feats.values()))
    assert [r.shape[-2:] for r in refined] == [f.shape[-2:] for f in feats.values()]
    total = sum(terms.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(f.grad is not None for f in feats.values())


def test_vit_stages_from_timm_build_and_train():
    from kdzoo.models import create_model, model_info

    model = create_model("test_vit", K, 16)
    info = model_info(model, "test_vit", K, 16, ("stages",))
    cls = get_method("frskd")
    method = cls()
    method.setup(info, None)
    feats = {k: torch.rand(2, *info.shapes[k]) for k in info.stage_names}
    terms = method.loss(StepOutputs(NetOutputs(torch.randn(2, K), feats), torch.tensor([0, 1])))
    assert torch.isfinite(sum(terms.values()))


# -- (d) mixup and cutmix ----------------------------------------------------------------------

def _indexed_batch(b=6, size=8):
    """Image i is constant i / b, label i: a mixed pixel shows exactly which images were mixed."""
    images = torch.arange(b, dtype=torch.float32).div(b).view(b, 1, 1, 1).expand(b, 3, size, size).contiguous()
    return images, torch.arange(b)


@pytest.mark.parametrize("aug", ["mixup", "cutmix"])
def test_mixing_gives_valid_soft_targets_that_match_the_pixels(aug):
    method = _method([4, 6], [4, 2], num_classes=6, aug=aug)
    images, labels = _indexed_batch()
    calls = []

    def augment(x):
        calls.append(x.shape)
        return x

    torch.manual_seed(3)
    for _ in range(5):
        mixed, soft = prepared(method, images, labels, augment)
        assert mixed.shape == images.shape and soft.shape == (6, 6) and soft.dtype == torch.float32
        assert (soft >= 0).all() and torch.allclose(soft.sum(1), torch.ones(6))
        # the mean pixel of each mixed image is the label-weighted mean of the source values
        expected = soft @ (torch.arange(6.0) / 6)
        assert torch.allclose(mixed.mean(dim=(1, 2, 3)), expected, atol=1e-6)
        if aug == "cutmix":  # every pixel comes from one of the two images, never a blend
            values = (mixed * 6).round()
            assert torch.allclose(values, mixed * 6, atol=1e-5)
    assert len(calls) == 5


@pytest.mark.parametrize("aug,expected", [("mixup", 0.2), ("cutmix", 1.0)])
def test_mixing_uses_the_reference_beta(monkeypatch, aug, expected):
    seen = []
    monkeypatch.setattr(FR, "_beta", lambda a, device: seen.append(a) or torch.tensor(0.7))
    method = _method([4, 6], [4, 2], aug=aug)
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    prepared(method, images, labels, lambda x: x)
    method2 = _method([4, 6], [4, 2], aug=aug, mix_alpha=0.5)
    prepared(method2, images, labels, lambda x: x)
    assert seen == [expected, 0.5]


def test_mixup_with_lambda_one_is_the_identity(monkeypatch):
    monkeypatch.setattr(FR, "_beta", lambda a, device: torch.tensor(1.0))
    method = _method([4, 6], [4, 2], aug="mixup")
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    mixed, soft = prepared(method, images, labels, lambda x: x)
    assert torch.equal(mixed, images) and torch.equal(soft, torch.nn.functional.one_hot(labels, K).float())


def test_cutmix_box_follows_the_reference_rule():
    torch.manual_seed(0)
    for lam in (0.0, 0.3, 0.75, 1.0):
        for _ in range(10):
            box = FR.cutmix_box((10, 10), torch.tensor(lam))
            side = int(10 * math.sqrt(1 - lam)) // 2 * 2  # both half-sides rounded down
            rows, cols = box.any(1).sum().item(), box.any(0).sum().item()
            assert rows <= side and cols <= side and box.sum().item() == rows * cols


def test_mixing_is_seeded():
    method = _method([4, 6], [4, 2], aug="cutmix")
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(5)
    a = prepared(method, images, labels, lambda x: x)
    torch.manual_seed(5)
    b = prepared(method, images, labels, lambda x: x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("aug", ["mixup", "cutmix"])
def test_mixing_on_gpu_stays_on_gpu(aug):
    method = _method([4, 6], [4, 2], aug=aug)
    images, labels = torch.rand(4, 3, 8, 8, device="cuda"), torch.tensor([0, 1, 2, 3], device="cuda")
    mixed, soft = prepared(method, images, labels, lambda x: x)
    assert mixed.is_cuda and soft.is_cuda


# -- SLA ---------------------------------------------------------------------------------------

def test_rotation_batch_layout_and_joint_targets():
    x = torch.arange(2 * 9.0).view(2, 1, 3, 3)
    rot = FR.rotations(x)
    assert rot.shape == (8, 1, 3, 3)
    for b in range(2):
        for r in range(4):
            assert torch.equal(rot[b * 4 + r], torch.rot90(x[b], r, (1, 2)))
    joint = FR.joint_targets(torch.nn.functional.one_hot(torch.tensor([2, 0]), 3).float())
    assert joint.shape == (8, 12)
    assert joint.argmax(1).tolist() == [2 * 4 + r for r in range(4)] + [0 * 4 + r for r in range(4)]
    logits = torch.arange(8 * 12.0).view(8, 12)
    agg = FR.aggregate_rotations(logits)
    for b in range(2):
        for k in range(3):
            assert agg[b, k].item() == pytest.approx(sum(logits[b * 4 + r, k * 4 + r].item() for r in range(4)) / 4)


def test_sla_prepare_batch_appends_the_rotations():
    method = _method([4, 6], [4, 2], sla=True)
    images, labels = torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 2])
    batch, targets = prepared(method, images, labels, lambda x: x)
    index = method.prepare_batch(Batch(images, labels, torch.tensor([7, 8, 9])), lambda x: x).index
    assert index.tolist() == [7, 8, 9] + [7] * 4 + [8] * 4 + [9] * 4  # each rotation keeps its image's index
    assert batch.shape == (15, 3, 8, 8) and torch.equal(batch[:3], images) and torch.equal(targets, labels)
    assert torch.equal(batch[3:], FR.rotations(images))


def test_sla_loss_matches_loop_reference():
    torch.manual_seed(0)
    channels, sizes, b = [3, 4], [4, 2], 2
    method = _method(channels, sizes, sla=True)
    feats = _stages(channels, sizes, batch=5 * b, seed=2)
    logits = torch.randn(5 * b, K, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([3, 1])
    terms = method.loss(StepOutputs(NetOutputs(logits, feats), y))
    assert set(terms) == {"ce", "ce_self", "sla_ce", "sla_kd", "kd", "att"}

    refined, z_t = method.self_teacher(list(feats.values()))
    rot_c = method.rotation_head(feats["stage2"][b:].mean(dim=(2, 3))).tolist()
    rot_t = method.rotation_head_self(refined[-1][b:].mean(dim=(2, 3))).tolist()

    def aggregate(rows):
        return [[sum(rows[i * 4 + r][k * 4 + r] for r in range(4)) / 4 for k in range(K)] for i in range(b)]

    s, t, labels = logits.tolist(), z_t.tolist(), y.tolist()
    agg_c, agg_t = aggregate(rot_c), aggregate(rot_t)
    joint = [labels[i // 4] * 4 + i % 4 for i in range(4 * b)]
    expected = dict(
        ce=sum(ce(s[i], labels[i]) for i in range(b)) / b,
        ce_self=sum(ce(t[i], labels[i]) for i in range(b)) / b,
        sla_ce=sum(ce(rot_c[i], joint[i]) + ce(rot_t[i], joint[i]) for i in range(4 * b)) / (4 * b),
        sla_kd=16 * sum(kl(s[i], agg_c[i], 4.0) + kl(t[i], agg_t[i], 4.0) for i in range(b)) / b,
        kd=2 * 16 * sum(kl(a, c, 4.0) for a, c in zip(s[:b] + agg_c, t[:b] + agg_t)) / (2 * b),
        att=100 * sum(_att_loss(f, r.detach()) for f, r in zip(feats.values(), refined)),
    )
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5, abs=1e-5), name


def test_sla_rejects_a_batch_without_rotations():
    method = _method([4, 6], [4, 2], sla=True)
    with pytest.raises(RuntimeError):
        method.loss(StepOutputs(NetOutputs(torch.randn(2, K), _stages([4, 6], [4, 2])), torch.tensor([0, 1])))


# -- (e) end to end (the short run that lowers the loss is in test_methods_train.py) ------------

@pytest.mark.parametrize("settings", [{"aug": "cutmix"}, {"sla": True}])
def test_variants_run_in_the_engine(tmp_path, quiet_console, settings):
    from kdzoo.engine import run

    result = run(tiny_config(tmp_path, method="frskd", epochs=1, train_size=16, test_size=16, method_settings=settings),
                 console=quiet_console)
    assert result["complete"] and math.isfinite(result["final_train_loss"])
