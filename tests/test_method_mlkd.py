"""MLKD: the loss against a plain-loop reference and the official code's numbers, the confidence
shares, gradient flow, the weak/strong batch and its RandAugment, recipe defaults, CLI runs."""

import json
import math
import statistics

import pytest
import torch

from kdzoo.cli import main
from kdzoo.config import RunConfig
from kdzoo.data.loaders import CropFlip
from kdzoo.errors import UserError
from kdzoo.method import Batch, NetOutputs, StepOutputs
from kdzoo.methods import mlkd as M
from kdzoo.registry import get_method
from kdzoo.settings import apply_overrides

from .reference import mean_ce, mean_kl, softmax

MLKD = get_method("mlkd")


# -- an independent reference: lists, explicit loops, float64 ------------------------------------

def _standardized(row):
    mean = sum(row) / len(row)
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))  # unbiased, as torch.std
    return [(v - mean) / (std + 1e-7) for v in row]


def _median(values):
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def _gram_distance(ps, pt, by_class):
    b, k = len(ps), len(ps[0])
    if by_class:  # K × K: Σ_b p_bi p_bj
        idx, n, get = range(k), k, (lambda p, i, j: sum(p[r][i] * p[r][j] for r in range(b)))
    else:  # B × B: Σ_k p_ik p_jk
        idx, n, get = range(b), b, (lambda p, i, j: sum(p[i][c] * p[j][c] for c in range(k)))
    return sum((get(pt, i, j) - get(ps, i, j)) ** 2 for i in idx for j in idx) / n


def _reference(sw, ss, tw, ts, y, tau, ce_w, kd_w, ls=False):
    sw, ss, tw, ts, y = (x.tolist() for x in (sw, ss, tw, ts, y))
    teacher_p = [softmax(row, 1.0) for row in tw]
    top = [max(p) for p in teacher_p]
    sample_share = sum(v <= _median(top) for v in top) / len(top)
    class_sum = [sum(p[c] for p in teacher_p) for c in range(len(tw[0]))]
    class_share = sum(v <= _median(class_sum) for v in class_sum) / len(class_sum)

    def inst(s, t, T):
        if ls:
            s, t = [_standardized(r) for r in s], [_standardized(r) for r in t]
        return T * T * mean_kl(s, t, T)

    def probs(rows, T):
        return [softmax(r, T) for r in rows]

    temps = [tau, 3.0, 5.0, 2.0, 6.0]
    kd = (sum(inst(sw, tw, T) for T in temps) * sample_share
          + sum(inst(ss, ts, T) for T in temps[:3]) + sum(inst(sw, tw, T) for T in temps[3:]))
    cc = sum(_gram_distance(probs(sw, T), probs(tw, T), True) for T in temps) * class_share
    bc = sum(_gram_distance(probs(sw, T), probs(tw, T), False) for T in temps) * sample_share
    return {"ce": ce_w * (mean_ce(sw, y) + mean_ce(ss, y)), "kd": kd_w * kd, "cc": kd_w * cc, "bc": kd_w * bc}


def _inputs(case):
    """The fixed tensors of the official-code script (see test_parity_with_the_official_code)."""
    g = torch.Generator().manual_seed(case)
    b, k = (6, 10) if case == 0 else (5, 7)
    sw, ss, tw, ts = (torch.randn(b, k, generator=g, dtype=torch.float64) * 2 for _ in range(4))
    if case == 1:
        tw[3] = tw[1]  # a tie in the teacher's confidence
        tw[0, 2] += 6.0  # one very confident teacher row
    y = torch.randint(k, (b,), generator=g)
    return sw, ss, tw, ts, y


def _terms(sw, ss, tw, ts, y, **settings):
    method = MLKD(MLKD.Config(**settings))
    return method.loss(StepOutputs(NetOutputs(torch.cat([sw, ss]).float()), torch.cat([y, y]),
                                   teacher=NetOutputs(torch.cat([tw, ts]).float())))


SETTINGS = {"cifar": ({}, (4.0, 0.1, 0.9, False)),
            "imagenet": ({"temperature": 1.0, "ce_weight": 0.5, "kd_weight": 0.5}, (1.0, 0.5, 0.5, False)),
            "ls": ({"temperature": 2.0, "kd_weight": 9.0, "logit_standardize": True}, (2.0, 0.1, 9.0, True))}


@pytest.mark.parametrize("case", [0, 1])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_loss_matches_loop_reference(case, setting):
    settings, (tau, ce_w, kd_w, ls) = SETTINGS[setting]
    terms = _terms(*_inputs(case), **settings)
    ref = _reference(*_inputs(case), tau, ce_w, kd_w, ls)
    assert set(terms) == {"ce", "kd", "cc", "bc"}
    for key in ref:
        assert terms[key].item() == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key


# Official numbers. Script /tmp/official-mlkd/run.py: the official forward_train bodies on the
# tensors of _inputs(case) (student(x) = x[..., 0], teacher(x) = x[..., 1], float64), with
#   Jin-Ying/Multi-Level-Logit-Distillation mdistiller/distillers/KD_ours.py
#     @ 5ee473fcf193dfb00a0598b64d0acfe6ad58a482 (cfg KD τ / CE / KD weights as below), and
#   sunshangquan/logit-standardization-KD mdistiller/distillers/MLKD.py
#     @ f6e5aa5172bad618e801163c3385322eea673754 (LOGIT_STAND=True, τ 2, KD weight 9).
OFFICIAL = {
    (0, "cifar"): (0.6726213654333075, 22.07920788876833, 0.039259756708937193, 0.010229002801211457),
    (0, "imagenet"): (3.363106827166537, 11.413592774396413, 0.0992087524542306, 0.061399216097450526),
    (0, "ls"): (0.6726213654333075, 57.72279011591719, 0.580620778745893, 0.17948240258949108),
    (1, "cifar"): (0.47209504174853, 21.649367083419232, 0.07709571075024964, 0.03560729333597768),
    (1, "imagenet"): (2.36047520874265, 11.089033266555052, 0.09575963087775059, 0.05098512355589339),
    (1, "ls"): (0.47209504174853, 57.8921430614857, 1.1177850833745038, 0.5982050922652485),
}


@pytest.mark.parametrize("case,setting", list(OFFICIAL))
def test_parity_with_the_official_code(case, setting):
    terms = _terms(*_inputs(case), **SETTINGS[setting][0])
    for key, value in zip(("ce", "kd", "cc", "bc"), OFFICIAL[case, setting]):
        assert terms[key].item() == pytest.approx(value, rel=1e-5), key


def test_confidence_shares_follow_the_median():
    assert M.low_confidence_share(torch.tensor([0.1, 0.9, 0.5, 0.7])).item() == 0.5  # median 0.6
    assert M.low_confidence_share(torch.tensor([0.1, 0.9, 0.5])).item() == pytest.approx(2 / 3)
    assert M.low_confidence_share(torch.tensor([0.3, 0.3, 0.3, 0.9])).item() == 0.75  # ties count
    # a confident teacher on the weak view lowers only the weak-view terms' share
    sw, ss, tw, ts, y = _inputs(0)
    flat = tw * 0.0
    terms = _terms(sw, ss, flat, ts, y)  # all teacher rows alike: every sample ≤ the median
    ref = _reference(sw, ss, flat, ts, y, 4.0, 0.1, 0.9)
    assert terms["bc"].item() == pytest.approx(ref["bc"], rel=1e-5)


def test_gram_terms_are_zero_for_a_matching_student_and_carry_no_tau_squared():
    x = torch.randn(4, 5)
    assert M.class_gram_loss(x, x, 4.0).item() == 0 and M.batch_gram_loss(x, x, 4.0).item() == 0
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    ps, pt = torch.softmax(s / 2, 1), torch.softmax(t / 2, 1)
    assert M.batch_gram_loss(s, t, 2.0).item() == pytest.approx(((pt @ pt.T - ps @ ps.T) ** 2).sum().item() / 4)
    assert M.class_gram_loss(s, t, 2.0).item() == pytest.approx(((pt.T @ pt - ps.T @ ps) ** 2).sum().item() / 5)


def test_odd_batches_and_bad_settings_fail_clearly():
    sw, ss, tw, ts, y = _inputs(0)
    with pytest.raises(RuntimeError, match="weak views, strong views"):
        MLKD().loss(StepOutputs(NetOutputs(sw[:3].float()), y[:3], teacher=NetOutputs(tw[:3].float())))
    for bad in ({"temperature": 0.0}, {"kd_weight": -1.0}, {"cutout": 1.5}):
        with pytest.raises(UserError):
            MLKD(MLKD.Config(**bad))


def test_curriculum_temperature_replaces_the_base_tau_only():
    method = MLKD()
    method.step_temperature = torch.tensor(2.5)
    sw, ss, tw, ts, y = _inputs(0)
    terms = method.loss(StepOutputs(NetOutputs(torch.cat([sw, ss]).float()), torch.cat([y, y]),
                                    teacher=NetOutputs(torch.cat([tw, ts]).float())))
    assert terms["kd"].item() == pytest.approx(_reference(sw, ss, tw, ts, y, 2.5, 0.1, 0.9)["kd"], rel=1e-5)


# -- gradients ------------------------------------------------------------------------------------

def test_gradient_reaches_both_student_views_never_the_teacher():
    sw, ss, tw, ts, y = _inputs(0)
    s = torch.cat([sw, ss]).float().requires_grad_(True)
    t = torch.cat([tw, ts]).float().requires_grad_(True)
    terms = MLKD().loss(StepOutputs(NetOutputs(s), torch.cat([y, y]), teacher=NetOutputs(t)))
    sum(terms.values()).backward()
    assert t.grad is None
    assert (s.grad.abs().sum(1) > 0).all()
    for key in ("kd", "cc", "bc"):
        s.grad = None
        MLKD().loss(StepOutputs(NetOutputs(s), torch.cat([y, y]), teacher=NetOutputs(t)))[key].backward()
        assert s.grad.abs().sum() > 0 and t.grad is None, key


# -- the weak/strong batch and the strong augmentation ---------------------------------------------

def test_prepare_batch_builds_weak_then_strong_views_with_repeated_index():
    x = torch.rand(4, 3, 16, 16)
    batch = MLKD().prepare_batch(Batch(x, torch.tensor([5, 6, 7, 8]), torch.arange(10, 14)), CropFlip(padding=4))
    assert batch.images.shape == (8, 3, 16, 16) and batch.teacher_images is None
    assert batch.targets.tolist() == [5, 6, 7, 8, 5, 6, 7, 8]
    assert batch.index.tolist() == [10, 11, 12, 13, 10, 11, 12, 13]
    assert not torch.equal(batch.images[:4], batch.images[4:])
    assert 0 <= batch.images.min() and batch.images.max() <= 1


def test_prepare_batch_weak_view_is_the_dataset_augmentation():
    x = torch.rand(3, 3, 8, 8)
    method = MLKD(MLKD.Config(strong_ops=0, cutout=0.0))  # no RandAugment, no Cutout: both views = augment(x)
    batch = method.prepare_batch(Batch(x, torch.arange(3), torch.arange(3)), lambda im: im * 0.5)
    assert torch.equal(batch.images[:3], x * 0.5) and torch.equal(batch.images[3:], x * 0.5)


def test_randaugment_operations_on_hand_made_tensors():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    v = torch.tensor([0.5, 0.9])
    assert torch.allclose(M._apply("brightness", x, v), x * v.view(-1, 1, 1, 1))
    assert torch.equal(M._apply("identity", x, v), x)
    levels = torch.tensor([255.0, 200, 100, 15]).view(1, 1, 1, 4) / 255
    both = M._posterize(levels.expand(2, 3, 1, 4), torch.tensor([4.7, 6.0]))
    assert torch.allclose(both[0, 0, 0], torch.tensor([240.0, 192, 96, 0]) / 255)
    assert torch.allclose(both[1, 0, 0], torch.tensor([252.0, 200, 100, 12]) / 255)
    solar = M._apply("solarize", torch.full((2, 3, 1, 1), 0.6), torch.tensor([100.0, 200.0]))
    assert torch.allclose(solar[:, 0, 0, 0], torch.tensor([0.4, 0.6]))
    # geometry: black (0) fill, nearest, one value per image; a 90° rotation is rot90
    grid = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8).expand(2, 3, 8, 8) / 64
    assert torch.equal(M._rotate(grid, torch.tensor([90.0, 0.0]))[0], torch.rot90(grid[0], 1, dims=(-2, -1)))
    moved = M._apply("translateX", grid, torch.tensor([0.25, -0.25]))
    assert torch.equal(moved[0, ..., :6], grid[0, ..., 2:]) and (moved[0, ..., 6:] == 0).all()
    assert torch.equal(moved[1, ..., 2:], grid[1, ..., :6]) and (moved[1, ..., :2] == 0).all()


def test_randaugment_matches_pil_for_the_operations_pil_defines():
    pytest.importorskip("PIL")
    np = pytest.importorskip("numpy")
    from PIL import Image, ImageEnhance, ImageOps

    arr = (torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(1)) * 255).round().to(torch.uint8).numpy()
    img = Image.fromarray(arr)
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255
    refs = {
        "brightness": lambda v: ImageEnhance.Brightness(img).enhance(v),
        "color": lambda v: ImageEnhance.Color(img).enhance(v),
        "contrast": lambda v: ImageEnhance.Contrast(img).enhance(v),
        "sharpness": lambda v: ImageEnhance.Sharpness(img).enhance(v),
        "posterize": lambda v: ImageOps.posterize(img, int(v)),
        "solarize": lambda v: ImageOps.solarize(img, v),
        "rotate": lambda v: img.rotate(v),
        "shearX": lambda v: img.transform(img.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
        "shearY": lambda v: img.transform(img.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
        "translateX": lambda v: img.transform(img.size, Image.AFFINE, (1, 0, v * 16, 0, 1, 0)),
        "translateY": lambda v: img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, v * 16)),
    }
    for op, ref in refs.items():
        lo, hi = M.RANDAUGMENT_RANGES[op]
        for v in (lo + 0.2 * (hi - lo), lo + 0.85 * (hi - lo)):
            expected = torch.from_numpy(np.array(ref(v))).permute(2, 0, 1)[None].float() / 255
            out = M._apply(op, x, torch.tensor([float(v)]))
            tolerance = 1.5 if op in ("color", "contrast", "sharpness", "brightness") else 1.01
            mismatch = ((out - expected).abs() > tolerance / 255).float().mean().item()
            assert mismatch <= (0.02 if op in ("rotate", "shearX", "shearY") else 0.0), (op, v, mismatch)


def test_randaugment_draws_per_image_and_keeps_shape_dtype_range():
    x = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    aug = M.RandAugment()
    for dtype in (torch.float32, torch.float64):
        out = aug(x.to(dtype), generator=torch.Generator().manual_seed(3))
        assert out.shape == x.shape and out.dtype == dtype and 0 <= out.min() and out.max() <= 1
    out = aug(x, generator=torch.Generator().manual_seed(3))
    changed = (out - x).abs().flatten(1).amax(1) > 1e-6
    assert changed.float().mean() > 0.8  # identity twice and a zero-size cutout are rare
    again = aug(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)


def test_cutout_paints_the_official_square():
    x = torch.zeros(1, 3, 10, 10)
    g = torch.Generator().manual_seed(0)
    out = M.cutout(x, torch.tensor([0.3]), generator=g)
    g = torch.Generator().manual_seed(0)
    cx, cy = torch.rand(1, generator=g).item() * 10, torch.rand(1, generator=g).item() * 10
    x0, y0 = int(max(0.0, cx - 1.5)), int(max(0.0, cy - 1.5))
    painted = (out[0, 0] > 0).nonzero()
    assert painted[:, 1].min().item() == x0 and painted[:, 0].min().item() == y0
    assert painted[:, 1].max().item() == min(9, math.floor(x0 + 3)) and painted.shape[0] > 0
    assert torch.allclose(out[0, :, y0, x0], torch.tensor(M.CUTOUT_FILL))
    assert torch.equal(M.cutout(x, torch.tensor([0.0])), x)


# -- recipe defaults ------------------------------------------------------------------------------

def _settings(run, user):
    return apply_overrides(MLKD.Config(), {**MLKD.recipe_defaults(run, user), **user}, "method 'mlkd'")


def test_recipe_defaults_per_dataset_switch_and_pair_and_set_wins():
    c = MLKD.Config()
    assert (c.temperature, c.ce_weight, c.kd_weight, c.logit_standardize) == (4.0, 0.1, 0.9, False)
    c = _settings(RunConfig(dataset="imagefolder"), {})
    assert (c.temperature, c.ce_weight, c.kd_weight) == (1.0, 0.5, 0.5)
    c = _settings(RunConfig(dataset="cifar100"), {"logit_standardize": True})
    assert (c.temperature, c.ce_weight, c.kd_weight) == (2.0, 0.1, 9.0)
    c = _settings(RunConfig(model="cifar_vgg8", teacher="cifar_vgg13"), {"logit_standardize": True})
    assert c.kd_weight == 6.0
    c = _settings(RunConfig(model="cifar_vgg8", teacher="cifar_vgg13"), {})
    assert c.kd_weight == 0.9  # the pair's weight belongs to the LS variant only
    c = _settings(RunConfig(dataset="imagefolder"), {"logit_standardize": True, "kd_weight": 3.0, "temperature": 5.0})
    assert (c.temperature, c.kd_weight) == (5.0, 3.0)


# -- from the CLI ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def output(tmp_path_factory):
    return tmp_path_factory.mktemp("mlkd")


def _run(output, student, teacher, *extra):
    name = f"mlkd-{teacher}-{student}{'-'.join(extra)}"
    args = ["run", "--method", "mlkd", "--model", student, "--teacher", teacher, "--input-size", "32",
            "--train-size", "32", "--test-size", "16", "--batch-size", "8", "--epochs", "1", "--max-steps", "2",
            "--device", "cpu", "--optimizer", "sgd", "--lr", "0.05", "--teacher-epochs", "1",
            "--output", str(output), "--run-name", name, *extra]
    assert main(args) == 0
    result = json.loads((output / name / "result.json").read_text())
    assert result["complete"] and result["steps"] == 2 and math.isfinite(result["final_train_loss"])
    return result


@pytest.mark.parametrize("student,teacher", [("test_resnet", "test_resnet"), ("test_efficientnet", "test_resnet"),
                                             ("test_convnext", "test_resnet"), ("test_vit", "test_convnext")])
def test_runs_from_the_cli(output, student, teacher):
    _run(output, student, teacher)


def test_runs_with_logit_standardisation(output):
    _run(output, "test_resnet", "test_resnet", "--set", "logit_standardize=true")


def test_segmentation_is_refused_with_exit_2(tmp_path, capsys):
    code = main(["run", "--task", "seg", "--method", "mlkd", "--teacher", "test_resnet", "--model", "test_resnet",
                 "--output", str(tmp_path), "--device", "cpu"])
    assert code == 2 and "'mlkd' supports task(s) cls, not 'seg'" in capsys.readouterr().err


def test_reference_helpers_agree_on_a_known_median():
    assert _median([3.0, 1.0, 2.0]) == statistics.median([3.0, 1.0, 2.0])
    assert _median([4.0, 1.0, 2.0, 3.0]) == 2.5
