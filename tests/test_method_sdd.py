"""SDD: region pooling and the consistent/complementary weighting against a float64 loop reference
and the official code's numbers, the networks' own heads on timm CNNs and ViTs, gradients (the
student's head yes, the teacher never), per-pair defaults and --set, CLI runs. Also the
``features`` tap (timm's forward_features output) that SDD reads, added to kdzoo/hooks.py."""

import json
import math

import pytest
import torch
from kdzoo.methods.sdd import region_features, region_logits
from torch import nn

from kdzoo.cli import main
from kdzoo.config import RunConfig
from kdzoo.errors import UserError
from kdzoo.hooks import FeatureTaps
from kdzoo.method import NetOutputs, StepOutputs
from kdzoo.models import create_model
from kdzoo.registry import get_method
from kdzoo.settings import apply_overrides

SDD = get_method("sdd")


class LinearHead(nn.Module):
    """The smallest network with a timm-style head: forward_head = global mean + linear."""

    def __init__(self, weight, bias):
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0]).to(weight.dtype)
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)

    def forward_head(self, x):
        return self.fc(x.mean(dim=(2, 3)))


def _case(seed, b, c, k, h):
    """The official script's inputs (/tmp/official-sdd/run.py), drawn in the same order."""
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(b, c, h, h, generator=g, dtype=torch.float64).relu()
    ft = torch.randn(b, c, h, h, generator=g, dtype=torch.float64).relu()
    ws = torch.randn(k, c, generator=g, dtype=torch.float64)
    wt = torch.randn(k, c, generator=g, dtype=torch.float64) * 2
    bs = torch.randn(k, generator=g, dtype=torch.float64)
    bt = torch.randn(k, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (b,), generator=g)
    return fs, ft, LinearHead(ws, bs), LinearHead(wt, bt), y


def _method(scales, temperature=4.0, **changes):
    return SDD(SDD.Config(scales=list(scales), temperature=temperature, ce_weight=0.0, kd_weight=1.0, **changes))


def _sdd_term(method, fs, ft, student, teacher, y):
    method.install(student, teacher)
    logits_s, logits_t = student.forward_head(fs), teacher.forward_head(ft)
    out = StepOutputs(NetOutputs(logits_s, {"features": fs}), y, NetOutputs(logits_t, {"features": ft}))
    return method.loss(out)["kd"]


# -- independent reference: explicit cells, loops, the four categories of the paper ----------------

def _cell_mean(f, b, c, rows, cols):
    return sum(f[b][c][i][j] for i in rows for j in cols) / (len(rows) * len(cols))


def _ref_sdd(fs, ft, student, teacher, y, scales, tau, comp=2.0):
    """Σ_rb w_rb τ² KL_rb / (R·B) with cells of an s×s split of an H×W map, H divisible by every s."""
    fs, ft = fs.tolist(), ft.tolist()
    ws, bs = student.fc.weight.tolist(), student.fc.bias.tolist()
    wt, bt = teacher.fc.weight.tolist(), teacher.fc.bias.tolist()
    n, c, h = len(fs), len(fs[0]), len(fs[0][0])

    def logits(f, w, bias, b, rows, cols):
        feat = [_cell_mean(f, b, ch, rows, cols) for ch in range(c)]
        return [sum(wi * fi for wi, fi in zip(row, feat)) + bi for row, bi in zip(w, bias)]

    def log_softmax(z):
        m = max(v / tau for v in z)
        lse = m + math.log(sum(math.exp(v / tau - m) for v in z))
        return [v / tau - lse for v in z]

    regions = [(s, i, j) for s in scales for i in range(s) for j in range(s)]
    total, count = 0.0, 0
    global_right = {}
    for (s, i, j) in regions:
        for b in range(n):
            rows = range(i * h // s, (i + 1) * h // s)
            cols = range(j * h // s, (j + 1) * h // s)
            zs, zt = logits(fs, ws, bs, b, rows, cols), logits(ft, wt, bt, b, rows, cols)
            lps, lpt = log_softmax(zs), log_softmax(zt)
            kl = tau**2 * sum(math.exp(a) * (a - q) for a, q in zip(lpt, lps))
            right = max(range(len(zt)), key=lambda k: zt[k]) == y[b]
            if s == 1:
                global_right[b] = right
            # consistent: both right or both wrong (the global region always); complementary: they differ
            weight = 1.0 if right == global_right[b] else comp
            total += weight * kl
            count += 1
    return total / count


@pytest.mark.parametrize("seed,scales,h", [(0, (1, 2, 4), 8), (1, (1, 2), 8), (3, (1, 2, 4), 4), (4, (1, 4), 8)])
def test_loss_matches_a_float64_loop_reference(seed, scales, h):
    fs, ft, student, teacher, y = _case(seed, 6, 5, 4, h)
    y = y.tolist()
    for tau, comp in ((4.0, 2.0), (1.0, 3.5)):
        value = _sdd_term(_method(scales, tau, complementary_weight=comp), fs, ft, student, teacher, torch.tensor(y))
        assert value.item() == pytest.approx(_ref_sdd(fs, ft, student, teacher, y, scales, tau, comp), rel=1e-5)


def test_the_reference_data_has_complementary_regions():
    # the weighting is exercised: some regions disagree with their sample's global prediction
    _fs, ft, _student, teacher, y = _case(0, 6, 8, 5, 8)
    rows = region_logits(teacher, ft, [1, 2, 4], 4).argmax(dim=1) == y.repeat(21)
    assert (rows != rows[:6].repeat(21)).any() and (rows == rows[:6].repeat(21)).any()


def test_region_features_are_cell_means_in_official_order():
    f = torch.arange(2 * 3 * 8 * 8, dtype=torch.float64).reshape(2, 3, 8, 8)
    regions = region_features(f, [1, 2, 4], 4)
    assert regions.shape == (21 * 2, 3)
    assert torch.allclose(regions[:2], f.mean(dim=(2, 3)))  # rows 0..B-1: the global region
    assert torch.allclose(regions[2 * 2 + 1], f[1, :, :4, 4:].mean(dim=(1, 2)))  # scale 2, cell (0, 1), sample 1
    assert torch.allclose(regions[2 * (5 + 6) + 0], f[0, :, 2:4, 4:6].mean(dim=(1, 2)))  # scale 4, cell (1, 2)
    # on 7×7 maps the official SPP pools 4×4 first (overlapping cells), then 2×2 and 1×1 from that grid
    g = torch.randn(1, 2, 7, 7, dtype=torch.float64)
    grid = torch.nn.functional.adaptive_avg_pool2d(g, 4)
    assert torch.allclose(region_features(g, [1, 2, 4], 4)[0], grid.mean(dim=(2, 3))[0])
    assert not torch.allclose(region_features(g, [1], 4)[0], g.mean(dim=(2, 3))[0])


# -- parity with the official code ----------------------------------------------------------------
# /tmp/official-sdd/run.py: shicaiwei123/SDD-CVPR2024 @ e412036c6b7b67d8ed25418d2dedad223ab49a71 —
# mdistiller/distillers/KD.py (sdd_kd_loss), mdistiller/models/cifar/utils.py (SPP), the patch_score
# lines of mdistiller/models/cifar/resnet.py (SPP → permute → fc → reshape → permute). Inputs as
# _case(seed, B, C, K, H) above (float64, post-ReLU maps; teacher fc weights ×2); τ as listed.
# Columns: seed, B, C, K, H, M, τ, sdd_kd_loss.
OFFICIAL = [
    (0, 6, 8, 5, 8, (1, 2, 4), 4.0, 2.419545894206485),
    (1, 6, 8, 5, 8, (1, 2), 4.0, 1.2901473766693285),
    (2, 5, 6, 7, 7, (1, 2, 4), 4.0, 2.7478976149421332),  # 7×7: overlapping 4×4 cells, as on ImageNet
    (3, 4, 8, 3, 4, (1, 2, 4), 1.0, 1.3769523896769573),
]


@pytest.mark.parametrize("seed,b,c,k,h,scales,tau,expected", OFFICIAL)
def test_parity_with_the_official_code(seed, b, c, k, h, scales, tau, expected):
    fs, ft, student, teacher, y = _case(seed, b, c, k, h)
    assert _sdd_term(_method(scales, tau), fs, ft, student, teacher, y).item() == pytest.approx(expected, rel=1e-5)


def test_single_scale_is_plain_kd_on_the_logits():
    # official M = [1]: kd_loss on the networks' logits (1.926546491249822 for seed 0, same script)
    fs, ft, student, teacher, y = _case(0, 6, 8, 5, 8)
    assert _sdd_term(_method([1]), fs, ft, student, teacher, y).item() == pytest.approx(1.926546491249822, rel=1e-5)


# -- the networks' own heads ---------------------------------------------------------------------

@pytest.mark.parametrize("name,size", [("test_resnet", 32), ("test_efficientnet", 32), ("test_convnext", 64),
                                       ("test_vit", 32)])
def test_region_logits_use_each_timm_family_head(name, size):
    torch.manual_seed(0)
    model = create_model(name, 10, size).eval()
    with FeatureTaps(model, ["features"]) as taps:
        logits = model(torch.randn(2, 3, size, size))
        features = taps.pop()["features"]
    regions = region_logits(model, features, [1, 2, 4], 4)
    assert regions.shape == (21 * 2, 10) and torch.isfinite(regions).all()
    if features.dim() == 4 and features.shape[-1] in (1, 2, 4, 8):
        # CNNs: the global region is the network's own prediction when 4 divides the map (or the map is 1×1, 2×2)
        assert torch.allclose(regions[:2], logits, atol=1e-5)
    if name == "test_vit":  # a class-token ViT: every token of the region's sequence is the region's mean token
        tokens = features[:, model.num_prefix_tokens:].mean(dim=1)
        expected = model.forward_head(tokens[:, None, :].expand(-1, 1 + model.num_prefix_tokens, -1))
        assert torch.allclose(regions[:2], expected, atol=1e-5)


def test_gradients_reach_the_student_and_its_head_never_the_teacher():
    torch.manual_seed(1)
    student, teacher = create_model("test_resnet", 10, 32), create_model("test_resnet", 10, 32).eval()
    m = SDD()
    m.install(student, teacher)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with FeatureTaps(student, ["features"]) as s_taps, FeatureTaps(teacher, ["features"]) as t_taps:
        s_out = NetOutputs(student(x), s_taps.pop())
        t_out = NetOutputs(teacher(x), t_taps.pop())  # the teacher's graph is live: the method must not use it
    terms = m.loss(StepOutputs(s_out, y, t_out))
    assert set(terms) == {"ce", "kd"}
    terms["kd"].backward()
    assert student.get_classifier().weight.grad.abs().sum() > 0
    assert next(student.parameters()).grad.abs().sum() > 0  # the stem: the body learns too
    assert all(p.grad is None for p in teacher.parameters())
    assert m.extra_parameter_count() == 0 and list(m.state_dict()) == []  # the networks are not submodules


def test_soft_targets_use_their_most_likely_class():
    fs, ft, student, teacher, y = _case(0, 6, 8, 5, 8)
    hard = _sdd_term(SDD(), fs, ft, student, teacher, y)
    soft = _sdd_term(SDD(), fs, ft, student, teacher, torch.nn.functional.one_hot(y, 5).double() * 0.7 + 0.06)
    assert hard.item() == pytest.approx(soft.item(), rel=1e-7)


def test_loss_before_install_and_models_without_a_head_are_refused():
    fs, ft, _student, teacher, y = _case(0, 2, 3, 4, 4)
    out = StepOutputs(NetOutputs(torch.zeros(2, 4), {"features": fs}), y, NetOutputs(torch.zeros(2, 4), {"features": ft}))
    with pytest.raises(RuntimeError, match="install"):
        SDD().loss(out)
    with pytest.raises(UserError, match="forward_head"):
        SDD().install(nn.Linear(2, 2), teacher)


# -- settings ---------------------------------------------------------------------------------------

def test_defaults_pairs_and_set_wins():
    c = SDD.Config()
    assert (c.temperature, c.ce_weight, c.kd_weight, c.scales, c.complementary_weight, c.spp_grid) == \
        (4.0, 0.1, 0.9, [1, 2, 4], 2.0, 4)

    def resolved(teacher, model, dataset="shapes", **settings):
        run = RunConfig(method="sdd", model=model, teacher=teacher, dataset=dataset)
        values = {**SDD.recipe_defaults(run, settings), **settings}
        return apply_overrides(SDD.Config(), values, "method 'sdd'")

    # same-family pairs of the official scripts use M = [1, 2], every other pair [1, 2, 4]
    assert resolved("cifar_resnet32x4", "cifar_resnet8x4").scales == [1, 2]
    assert resolved("cifar_vgg13", "cifar_vgg8").scales == [1, 2]
    assert resolved("resnet34", "resnet18", "imagefolder").scales == [1, 2]
    assert resolved("cifar_resnet32x4", "cifar_shufflenet_v1").scales == [1, 2, 4]
    # configs/imagenet/r34_r18/sdd_kd.yaml sets no KD section: mdistiller's τ = 4, 0.1 / 0.9
    imagenet = resolved("resnet34", "resnet18", "imagefolder")
    assert (imagenet.temperature, imagenet.ce_weight, imagenet.kd_weight) == (4.0, 0.1, 0.9)
    assert resolved("cifar_resnet32x4", "cifar_resnet8x4", scales="1,2,4").scales == [1, 2, 4]
    assert resolved("resnet34", "resnet18", "imagefolder", temperature="2").temperature == 2.0


@pytest.mark.parametrize("changes", [{"scales": [2, 4]}, {"scales": []}, {"scales": [1, 0]}, {"temperature": 0.0},
                                     {"complementary_weight": -1.0}, {"spp_grid": 0}])
def test_bad_settings_are_refused(changes):
    with pytest.raises(UserError):
        SDD(SDD.Config(**changes))


# -- the features tap (kdzoo/hooks.py) ---------------------------------------------------------------

def test_features_tap_captures_forward_features_and_is_removed():
    torch.manual_seed(0)
    model = create_model("test_efficientnet", 10, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    with FeatureTaps(model, ["features"]) as outer:
        with FeatureTaps(model, ["features", "embedding"]) as inner:
            logits = model(x)
            captured = inner.pop()
        assert "forward_features" in model.__dict__  # the outer tap is still in place
        model(x)
        assert torch.equal(outer.pop()["features"], captured["features"])
    assert "forward_features" not in model.__dict__
    # what forward_head reads: EfficientNet's head conv and norm have run
    assert torch.equal(captured["features"], model.forward_features(x))
    assert torch.equal(model.forward_head(captured["features"]), logits)
    with pytest.raises(UserError, match="forward_features"):
        FeatureTaps(nn.Linear(2, 2), ["features"])


# -- CLI ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_output(tmp_path_factory):
    """One output folder for the module's CLI runs: each teacher is trained once and then cached."""
    return tmp_path_factory.mktemp("sdd-cli")


def _cli(output, student, teacher, *extra):
    name = f"sdd-{teacher}-{student}"
    args = ["run", "--method", "sdd", "--model", student, "--teacher", teacher, "--input-size", "32",
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
    assert "sdd" in capsys.readouterr().err
