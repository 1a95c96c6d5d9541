"""ReviewKD: ABF + HCL against an independent float64 reference and against numbers from the
official code, the level pairing and widths, the warm-up at its boundaries (0-based epochs, as
the official CIFAR trainer counts), CIFAR / per-pair / ImageNet defaults, gradients, resume and
runs from the CLI."""

import json
import math
from dataclasses import dataclass

import pytest
import torch

from kdzoo.build import validate
from kdzoo.cli import main
from kdzoo.config import RunConfig
from kdzoo.engine import Interrupted, StopFlag, run
from kdzoo.errors import UserError
from kdzoo.method import NetOutputs, StepOutputs
from kdzoo.methods import reviewkd as rk
from kdzoo.models import ModelInfo, create_model, model_info
from kdzoo.registry import get_method, register_method

from .conftest import tiny_config
from .reference import mean_ce

ReviewKD = get_method("reviewkd")
B = 3


# -- an independent reference: explicit BN, nearest indices, pooling bins and loops (float64) ---

def _bn(x, weight, bias, eps=1e-5):
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)  # batch statistics, biased (training mode)
    return (x - mean) / torch.sqrt(var + eps) * weight[None, :, None, None] + bias[None, :, None, None]


def _nearest(x, h, w):
    rows = [math.floor(i * x.shape[2] / h) for i in range(h)]
    cols = [math.floor(j * x.shape[3] / w) for j in range(w)]
    return x[:, :, rows][:, :, :, cols]


def _conv3x3(x, weight):
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    h, w = x.shape[2:]
    out = torch.zeros(x.shape[0], weight.shape[0], h, w, dtype=x.dtype)
    for dy in range(3):
        for dx in range(3):
            out += torch.einsum("bchw,oc->bohw", padded[:, :, dy:dy + h, dx:dx + w], weight[:, :, dy, dx])
    return out


def _ref_abf(abf, x, deeper, out_size):
    p = dict(abf.named_parameters())
    x = _bn(torch.einsum("bchw,oc->bohw", x, p["conv1.0.weight"][:, :, 0, 0]), p["conv1.1.weight"], p["conv1.1.bias"])
    if deeper is not None:
        deeper = _nearest(deeper, *x.shape[2:])
        w, b = p["att_conv.0.weight"][:, :, 0, 0], p["att_conv.0.bias"]
        logits = torch.einsum("bchw,oc->bohw", torch.cat([x, deeper], 1), w) + b[None, :, None, None]
        gates = 1 / (1 + torch.exp(-logits))
        x = x * gates[:, :1] + deeper * gates[:, 1:]
    if tuple(x.shape[2:]) != tuple(out_size):
        x = _nearest(x, *out_size)
    return _bn(_conv3x3(x, p["conv2.0.weight"]), p["conv2.1.weight"], p["conv2.1.bias"]), x


def _pool(x, size):
    h, w = x.shape[2:]
    out = torch.zeros(*x.shape[:2], size, size, dtype=x.dtype)
    for i in range(size):
        for j in range(size):
            r0, r1 = (i * h) // size, -((-(i + 1) * h) // size)
            c0, c1 = (j * w) // size, -((-(j + 1) * w) // size)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(dim=(2, 3))
    return out


def _mse(a, b):
    flat = [(u - v) ** 2 for u, v in zip(a.flatten().tolist(), b.flatten().tolist())]
    return sum(flat) / len(flat)


def _ref_hcl(y, t, levels=(4, 2, 1)):
    terms = [(1.0, _mse(y, t))]
    for size in levels:
        if size < y.shape[2]:
            terms.append((terms[-1][0] / 2, _mse(_pool(y, size), _pool(t, size))))
    return sum(w * v for w, v in terms) / sum(w for w, _ in terms)


# -- toy pairs: student / teacher levels (channels, size), shallow → deep, the last the embedding --

CASES = {
    "same_size": ([(4, 8), (6, 4), (8, 2), (8, 1)], [(5, 8), (7, 4), (9, 2), (9, 1)]),
    "teacher_larger": ([(4, 4), (6, 2), (8, 1)], [(5, 8), (7, 4), (9, 1)]),
    "odd_sizes": ([(3, 5), (4, 3), (6, 1)], [(2, 7), (3, 5), (4, 1)]),
}


def _info(name, levels, preact):
    shapes = {"logits": (3,), "embedding": (levels[-1][0],)}
    for i, (c, h) in enumerate(levels[:-1], start=1):
        shapes[f"stage{i}"] = (c, h, h)
        if preact:
            shapes[f"preact_stage{i}"] = (c, h, h)
    return ModelInfo(name, 3, 32, shapes)


def _toy(case, config=None, seed=7, teacher_grad=False):
    """The official parity script's inputs: features (student, then teacher, shallow → deep) and
    then every ABF parameter, deep → shallow, drawn from one generator as 0.5·N(0, 1)."""
    s_levels, t_levels = CASES[case]
    g = torch.Generator().manual_seed(seed)
    fs = [torch.randn(B, c, h, h, generator=g, dtype=torch.float64) for c, h in s_levels]
    ft = [torch.randn(B, c, h, h, generator=g, dtype=torch.float64) for c, h in t_levels]
    method = ReviewKD(config or ReviewKD.Config())
    method.setup(_info("s", s_levels, True), _info("t", t_levels, True))
    method.double().train()
    with torch.no_grad():
        for abf in reversed(method.abfs):
            for p in abf.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    s_feats = {k: v.clone().requires_grad_(True) for k, v in zip(method.student_levels[:-1], fs[:-1])}
    s_feats["embedding"] = fs[-1].flatten(1).clone().requires_grad_(True)
    t_feats = {k: v.clone().requires_grad_(teacher_grad) for k, v in zip(method.teacher_levels[:-1], ft[:-1])}
    t_feats["embedding"] = ft[-1].flatten(1).clone().requires_grad_(teacher_grad)
    logits, t_logits = torch.randn(B, 3, generator=g), torch.randn(B, 3, generator=g)
    out = StepOutputs(NetOutputs(logits, s_feats), torch.tensor([0, 2, 1]), NetOutputs(t_logits, t_feats), epoch=30)
    return method, out, fs, ft


@pytest.mark.parametrize("case", list(CASES))
def test_levels_match_the_independent_reference(case):
    method, out, fs, ft = _toy(case)
    got = [v.item() for v in method.level_losses(out)]
    fused, outputs = None, []
    for i in reversed(range(len(fs))):
        y, fused = _ref_abf(method.abfs[i], fs[i].detach(), fused, method.out_sizes[i])
        outputs.insert(0, y)
    expected = [_ref_hcl(y.detach(), t) for y, t in zip(outputs, ft)]
    assert got == pytest.approx(expected, abs=1e-9)
    terms = method.loss(out)
    assert terms["reviewkd"].item() == pytest.approx(5.0 * sum(expected), abs=1e-8)
    assert terms["ce"].item() == pytest.approx(mean_ce(out.student.logits.tolist(), out.targets.tolist()), abs=1e-6)


# Official numbers: dvlab-research/ReviewKD @ cede6ea6387ae9b6127de0e561507177bf19c11e,
# CIFAR-100/model/reviewkd.py (ABF with out_shape, ReviewKD.forward's deep → shallow loop, hcl),
# run outside the project in float64 on the inputs _toy draws (seed 7, B = 3, CASES above, ABFs
# in train mode, mid = min(512, last in_channel)); per level hcl([Y_i], [T_i]) and the total.
OFFICIAL = {
    "same_size": (3.9592041241517437, [0.8336446932065082, 0.9690849401600835, 0.980238110893518, 1.1762363798916342]),
    "teacher_larger": (4.128040756981927, [0.6925383415816319, 1.4140496225981762, 2.021452792802119]),
    "odd_sizes": (3.5291212093280744, [1.2206864756423785, 0.8055017558534227, 1.5029329778322733]),
}


@pytest.mark.parametrize("case", list(OFFICIAL))
def test_parity_with_the_official_abf_and_hcl(case):
    method, out, _, _ = _toy(case)
    levels = method.level_losses(out)
    total, per_level = OFFICIAL[case]
    assert [v.item() for v in levels] == pytest.approx(per_level, abs=1e-5)
    assert sum(levels).item() == pytest.approx(total, abs=1e-5)
    # float32, as training runs it, agrees too
    method.float()
    out32 = StepOutputs(NetOutputs(out.student.logits, {k: v.float() for k, v in out.student.features.items()}),
                        out.targets, NetOutputs(out.teacher.logits, {k: v.float() for k, v in out.teacher.features.items()}))
    assert sum(method.level_losses(out32)).item() == pytest.approx(total, abs=1e-4)


def test_hcl_weights_and_skipped_sizes():
    g = torch.Generator().manual_seed(0)
    for h, used in ((8, 3), (5, 3), (4, 2), (2, 1), (1, 0)):
        y, t = torch.randn(2, 3, h, h, generator=g, dtype=torch.float64), torch.randn(2, 3, h, h, generator=g, dtype=torch.float64)
        weights = [1.0] + [0.5 ** k for k in range(1, used + 1)]
        sizes = [s for s in (4, 2, 1) if s < h]
        assert len(sizes) == used
        terms = [_mse(y, t)] + [_mse(_pool(y, s), _pool(t, s)) for s in sizes]
        expected = sum(w * v for w, v in zip(weights, terms)) / sum(weights)
        assert rk.hcl_loss(y, t).item() == pytest.approx(expected, abs=1e-12)
    y = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    assert rk.hcl_loss(y, y).item() == 0.0
    # a constant offset survives every pooling: HCL = offset² whatever the weights
    assert rk.hcl_loss(y + 0.3, y).item() == pytest.approx(0.09, abs=1e-12)


def test_setup_pairs_the_deepest_stages_and_sizes_the_abfs():
    s = _info("s", [(4, 8), (6, 4), (8, 2), (10, 1)], preact=False)
    t = _info("t", [(3, 16), (5, 8), (7, 4), (9, 2), (11, 1)], preact=True)
    method = ReviewKD()
    method.setup(s, t)
    assert method.student_levels == ["stage1", "stage2", "stage3", "embedding"]
    assert method.teacher_levels == ["preact_stage2", "preact_stage3", "preact_stage4", "embedding"]
    assert method.taps.student == tuple(method.student_levels) and method.taps.teacher == tuple(method.teacher_levels)
    assert method.out_sizes == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert [(a.conv1[0].in_channels, a.conv1[0].out_channels, a.conv2[0].out_channels) for a in method.abfs] == [
        (4, 10, 5), (6, 10, 7), (8, 10, 9), (10, 10, 11)]
    assert [a.att_conv is not None for a in method.abfs] == [True, True, True, False]
    two = ReviewKD(ReviewKD.Config(num_stages=2, mid_channels=3, student_preact=True))
    two.setup(_info("s", [(4, 8), (6, 4), (8, 2), (10, 1)], preact=True), t)
    assert two.student_levels == ["preact_stage2", "preact_stage3", "embedding"]
    assert two.abfs[0].conv1[0].out_channels == 3
    with pytest.raises(UserError, match="num_stages"):
        ReviewKD(ReviewKD.Config(num_stages=4)).setup(s, t)
    with pytest.raises(UserError, match="teacher"):
        ReviewKD().setup(s, None)


def test_widths_and_sizes_are_the_official_ones_on_the_published_pairs():
    """resnet32x4→resnet8x4 (CIFAR build_review_kd 'x4': in = out = [64,128,256,256], shapes
    [1,8,16,32]) and ResNet-34→ResNet-18 (ImageNet: [64,128,256,512,512], shapes [1,7,14,28,56],
    mid 512), both listed deep → shallow in the official code."""
    student, teacher = create_model("cifar_resnet8x4", 100, 32), create_model("cifar_resnet32x4", 100, 32)
    method = ReviewKD(ReviewKD.Config())
    method.setup(model_info(student, "cifar_resnet8x4", 100, 32, method.taps.student),
                 model_info(teacher, "cifar_resnet32x4", 100, 32, method.taps.teacher))
    assert [a.conv1[0].in_channels for a in method.abfs] == [64, 128, 256, 256]
    assert [a.conv2[0].out_channels for a in method.abfs] == [64, 128, 256, 256]
    assert [h for h, _ in method.out_sizes][::-1] == [1, 8, 16, 32]
    assert method.abfs[0].conv1[0].out_channels == 256  # min(512, 256)
    assert method.teacher_levels == ["preact_stage1", "preact_stage2", "preact_stage3", "embedding"]
    imagenet = ReviewKD(ReviewKD.Config(reviewkd_weight=1.0, warmup_epochs=0, student_preact=True))
    s18, t34 = create_model("resnet18", 1000, 224), create_model("resnet34", 1000, 224)
    imagenet.setup(model_info(s18, "resnet18", 1000, 224, imagenet.taps.student),
                   model_info(t34, "resnet34", 1000, 224, imagenet.taps.teacher))
    assert [a.conv1[0].in_channels for a in imagenet.abfs] == [64, 128, 256, 512, 512]
    assert [h for h, _ in imagenet.out_sizes][::-1] == [1, 7, 14, 28, 56]
    assert imagenet.abfs[0].conv1[0].out_channels == 512
    assert imagenet.student_levels[0] == "preact_stage1"


# -- warm-up -----------------------------------------------------------------------------------

def test_warm_up_at_its_boundaries():
    assert [rk.warmup_factor(e, 20) for e in (0, 1, 10, 19, 20, 21, 239)] == [0.0, 0.05, 0.5, 0.95, 1.0, 1.0, 1.0]
    assert rk.warmup_factor(0, 0) == 1.0
    method, out, _, _ = _toy("same_size")
    full = method.loss(out)
    for epoch, factor in ((0, 0.0), (5, 0.25), (20, 1.0)):
        out.epoch = epoch
        terms = method.loss(out)
        assert terms["reviewkd"].item() == pytest.approx(factor * full["reviewkd"].item(), rel=1e-12, abs=1e-15)
        assert terms["ce"].item() == full["ce"].item()


# -- gradients -----------------------------------------------------------------------------------

def test_gradient_reaches_student_and_abfs_never_the_teacher():
    method, out, _, _ = _toy("teacher_larger", teacher_grad=True)
    method.loss(out)["reviewkd"].backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in out.student.features.values())
    for abf in method.abfs:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in abf.parameters())
    assert all(t.grad is None for t in out.teacher.features.values())


def test_bf16_features_are_computed_in_float32():
    method, out, _, _ = _toy("same_size")
    method.float()
    cast = lambda net, dt: NetOutputs(net.logits.to(dt), {k: v.detach().to(dt) for k, v in net.features.items()})  # noqa: E731
    ref = method.loss(StepOutputs(cast(out.student, torch.float32), out.targets, cast(out.teacher, torch.float32), epoch=30))
    half = method.loss(StepOutputs(cast(out.student, torch.bfloat16), out.targets, cast(out.teacher, torch.bfloat16), epoch=30))
    assert all(v.dtype == torch.float32 for v in half.values())
    assert half["reviewkd"].item() == pytest.approx(ref["reviewkd"].item(), rel=0.05)


# -- defaults ----------------------------------------------------------------------------------

def _defaults(dataset="cifar100", teacher="cifar_resnet32x4", model="cifar_resnet8x4", **settings):
    cfg = RunConfig(method="reviewkd", dataset=dataset, teacher=teacher, model=model, method_settings=settings)
    return vars(validate(cfg).config)


def test_config_defaults_are_the_official_cifar_setting():
    c = ReviewKD.Config()
    assert (c.ce_weight, c.reviewkd_weight, c.warmup_epochs, c.student_preact, c.teacher_preact, c.mid_channels,
            c.hcl_levels, c.num_stages) == (1.0, 5.0, 20, False, True, 0, (4, 2, 1), 0)
    assert ReviewKD.tasks == ("cls",) and ReviewKD.needs_teacher and not ReviewKD.logits_only_teacher


@pytest.mark.parametrize("teacher,student,weight", [
    ("cifar_resnet32x4", "cifar_resnet8x4", 5.0), ("cifar_wrn_40_2", "cifar_wrn_16_2", 5.0),
    ("cifar_wrn_40_2", "cifar_wrn_40_1", 5.0), ("cifar_wrn_40_2", "cifar_shufflenet_v1", 5.0),
    ("cifar_resnet32x4", "cifar_shufflenet_v1", 5.0), ("cifar_resnet32x4", "cifar_shufflenet_v2", 8.0),
    ("cifar_resnet56", "cifar_resnet20", 0.6), ("cifar_resnet110", "cifar_resnet32", 1.0)])
def test_cifar_weight_per_pair_is_the_official_script(teacher, student, weight):
    c = _defaults(teacher=teacher, model=student)
    assert (c["reviewkd_weight"], c["warmup_epochs"], c["student_preact"], c["ce_weight"]) == (weight, 20, False, 1.0)


def test_imagenet_defaults_and_set_wins():
    c = _defaults(dataset="imagefolder", teacher="resnet34", model="resnet18")
    assert (c["reviewkd_weight"], c["warmup_epochs"], c["student_preact"], c["mid_channels"]) == (1.0, 0, True, 0)
    c = _defaults(dataset="imagefolder", teacher="resnet50", model="mobilenetv1_100")
    assert (c["reviewkd_weight"], c["mid_channels"]) == (8.0, 256)
    assert _defaults(dataset="imagefolder", teacher="cifar_resnet56", model="cifar_resnet20")["reviewkd_weight"] == 1.0
    assert _defaults(dataset="cifar100", teacher="resnet50", model="mobilenetv1_100")["reviewkd_weight"] == 5.0
    c = _defaults(teacher="cifar_resnet56", model="cifar_resnet20", reviewkd_weight="2", warmup_epochs="3",
                  hcl_levels="2,1")
    assert (c["reviewkd_weight"], c["warmup_epochs"], c["hcl_levels"]) == (2.0, 3, (2, 1))
    assert _defaults(dataset="imagefolder", teacher="resnet34", model="resnet18", student_preact="false")["student_preact"] is False


@pytest.mark.parametrize("key,value", [("reviewkd_weight", -1.0), ("ce_weight", -0.1), ("warmup_epochs", -1),
                                       ("mid_channels", -2), ("num_stages", -1), ("hcl_levels", (2, 0))])
def test_out_of_range_settings_are_refused(key, value):
    with pytest.raises(UserError, match=key):
        ReviewKD(ReviewKD.Config(**{key: value}))


# -- resume and the CLI -----------------------------------------------------------------------

@register_method("test_reviewkd_stop_at_4")
class ReviewKDStopAtFour(ReviewKD):
    """ReviewKD that raises the stop flag at global step 4 (epoch 2 of 3-step epochs), as SIGTERM does."""

    flag: StopFlag | None = None

    @dataclass
    class Config(ReviewKD.Config):
        pass

    def loss(self, out):
        if out.step == 4 and ReviewKDStopAtFour.flag is not None and not ReviewKDStopAtFour.flag:
            ReviewKDStopAtFour.flag.signal_name = "SIGTERM"
        return super().loss(out)


def test_stop_then_resume_matches_uninterrupted(tmp_path, quiet_console):
    """The ABFs (weights, BN statistics, momentum) survive a stop; the warm-up resumes at its epoch."""
    settings = dict(method="test_reviewkd_stop_at_4", teacher="test_resnet", teacher_epochs=1, epochs=2,
                    train_size=48, test_size=32, method_settings={"warmup_epochs": 2})
    full = run(tiny_config(tmp_path, run_name="full", **settings), console=quiet_console)
    ReviewKDStopAtFour.flag = StopFlag()
    try:
        with pytest.raises(Interrupted):
            run(tiny_config(tmp_path, run_name="cut", **settings), console=quiet_console, stop=ReviewKDStopAtFour.flag)
    finally:
        ReviewKDStopAtFour.flag = None
    resumed = run(tiny_config(tmp_path, run_name="cut", **settings), resume=True, console=quiet_console)
    assert resumed["final_train_loss"] == pytest.approx(full["final_train_loss"], rel=1e-6)
    cut = (tmp_path / "runs" / "cut" / "metrics.csv").read_text().splitlines()
    uncut = (tmp_path / "runs" / "full" / "metrics.csv").read_text().splitlines()
    header = cut[0].split(",")
    keep = [header.index(c) for c in ("train_loss", "train_reviewkd", "test_loss")]
    rows = [[r.split(",")[i] for i in keep] for r in cut[1:]]
    assert rows == [[r.split(",")[i] for i in keep] for r in uncut[1:]]
    assert float(rows[0][1]) == 0.0 and float(rows[1][1]) > 0  # epoch 0 of the warm-up has no review term


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    return tmp_path_factory.mktemp("reviewkd-cli")  # shared, so each teacher is trained once


def _cli(output, student, teacher, *extra):
    return ["run", "--method", "reviewkd", "--model", student, "--teacher", teacher, "--input-size", "32",
            "--train-size", "32", "--test-size", "16", "--batch-size", "8", "--epochs", "1", "--max-steps", "2",
            "--device", "cpu", "--optimizer", "sgd", "--lr", "0.05", "--teacher-epochs", "1",
            "--output", str(output), "--run-name", f"reviewkd-{teacher}-{student}", *extra]


@pytest.mark.parametrize("teacher,student", [("test_resnet", "test_resnet"), ("test_resnet", "test_efficientnet"),
                                             ("test_resnet", "test_convnext"), ("test_convnext", "test_vit")])
def test_runs_from_the_cli(output, teacher, student):
    # warm-up off, so the review term is trained in this one-epoch run
    assert main(_cli(output, student, teacher, "--set", "warmup_epochs=0")) == 0
    folder = output / f"reviewkd-{teacher}-{student}"
    result = json.loads((folder / "result.json").read_text())
    assert result["complete"] and result["steps"] == 2 and math.isfinite(result["final_train_loss"])
    header = (folder / "metrics.csv").read_text().splitlines()
    row = dict(zip(header[0].split(","), header[1].split(",")))
    assert float(row["train_reviewkd"]) > 0 and float(row["train_ce"]) > 0


def test_segmentation_is_refused(output, capsys):
    assert main([*_cli(output, "test_resnet", "test_resnet"), "--task", "seg", "--run-name", "reviewkd-seg"]) == 2
    assert "reviewkd" in capsys.readouterr().err
