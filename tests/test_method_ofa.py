"""OFA: the OFA loss against a plain-loop reference, parity of the whole loss (exit branches
included) with the official code's numbers, which student stages get branches and of which kind,
gradients, defaults, resume and runs from the CLI (CNN ← ViT and ViT ← CNN included)."""

import json
import math
from dataclasses import dataclass

import pytest
import torch
from kdzoo.methods import ofa as ofa_module

from kdzoo.build import validate
from kdzoo.cli import main
from kdzoo.config import RunConfig
from kdzoo.engine import Interrupted, StopFlag, run
from kdzoo.errors import UserError
from kdzoo.method import NetOutputs, StepOutputs
from kdzoo.models import ModelInfo, create_model, model_info
from kdzoo.registry import get_method, register_method

from .conftest import tiny_config
from .reference import softmax

OFA = get_method("ofa")


# -- plain-Python reference: explicit loops, float64 -----------------------------------------------

def _ref_ofa(s, t, labels, eps, tau):
    """−mean_b Σ_c ((p_t,c + [c = y])^ε − [c = y]) · log σ(z_s/τ)_c; a soft label means its argmax."""
    total = 0.0
    for srow, trow, y in zip(s, t, labels):
        if isinstance(y, list):
            y = max(range(len(y)), key=lambda c: y[c])
        ps, pt = softmax(srow, tau), softmax(trow, tau)
        for c in range(len(srow)):
            hit = 1.0 if c == y else 0.0
            total -= ((pt[c] + hit) ** eps - hit) * math.log(ps[c])
    return total / len(s)


def _ref_ce_smoothed(z, labels, smoothing):
    total = 0.0
    for row, y in zip(z, labels):
        logp = [math.log(p) for p in softmax(row, 1.0)]
        total += -(1 - smoothing) * logp[y] - smoothing * sum(logp) / len(row)
    return total / len(z)


@pytest.mark.parametrize("seed,scale,eps,tau", [(0, 1.0, 1.0, 1.0), (1, 3.0, 1.5, 1.0), (2, 5.0, 0.5, 4.0),
                                                (3, 10.0, 2.0, 2.0)])
def test_ofa_loss_matches_the_loop_reference(seed, scale, eps, tau):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(5, 7, generator=g) * scale, torch.randn(5, 7, generator=g) * scale
    s[0, 1], t[1, 3] = 30.0, -30.0          # near-one-hot rows
    labels = [1, 3, 0, 6, 6]
    got = ofa_module.ofa_loss(s, t, ofa_module.label_mask(torch.tensor(labels), 7), eps, tau)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_ref_ofa(s.double().tolist(), t.double().tolist(), labels, eps, tau),
                                       abs=1e-5, rel=1e-6)


def test_soft_targets_use_their_argmax_class():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    soft = torch.tensor([[0.1, 0.6, 0.3, 0.0], [0.5, 0.2, 0.2, 0.1], [0.0, 0.0, 0.45, 0.55]])
    got = ofa_module.ofa_loss(s, t, ofa_module.label_mask(soft, 4), 1.5, 1.0).item()
    assert got == pytest.approx(_ref_ofa(s.tolist(), t.tolist(), soft.tolist(), 1.5, 1.0), abs=1e-6)
    assert got != pytest.approx(_ref_ofa(s.tolist(), t.tolist(), [0, 0, 0], 1.5, 1.0), abs=1e-3)


def test_eps_one_is_cross_entropy_with_teacher_plus_label_and_target_enhancement_grows_with_eps():
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g) * 3
    labels = torch.tensor([0, 1, 2, 3])
    mask = ofa_module.label_mask(labels, 5)
    # ε = 1: the weights are p_t exactly (+1 − 1 on the target): KD's cross-entropy with the teacher
    ce_t = -(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum(-1).mean()
    assert ofa_module.ofa_loss(s, t, mask, 1.0, 1.0).item() == pytest.approx(ce_t.item(), abs=1e-6)
    # ε > 1: the target weight (1 + p)^ε − 1 exceeds p and every non-target weight p^ε falls below p
    p = torch.softmax(t, -1)
    w = (p + mask) ** 2.0 - mask
    assert torch.all(w[mask.bool()] > p[mask.bool()]) and torch.all(w[~mask.bool()] < p[~mask.bool()])


# -- parity with the official code ---------------------------------------------------------------------
# Hao840/OFAKD @ f7bb896cac9879040800bde08a8cc2057a904c52, distillers/ofa.py (OFA, ofa_loss) and
# distillers/utils.py (SepConv, PatchMerging, GAP1d, TokenFnContext), run with timm 0.6.5 (its Block)
# and torch 2.14 in float64 outside the project. The script builds the official OFA distiller on
# stand-in networks whose stage_info() gives the shapes below (token students as (H·W, C) with no
# cls token, the maintainer's advice in OFAKD#38), draws in this order from
# torch.Generator().manual_seed(seed): each stage's features randn(B, *shape), student logits
# randn(B, K)·2, teacher logits randn(B, K)·2, then every projector parameter, stage 1 to 4 in
# parameters() order, randn(shape)·0.2; labels [0, 3, 1, 4]; criterion LabelSmoothingCrossEntropy(0.1);
# the distiller in train mode (batch statistics in the BatchNorms). B = 4, K = 5.
OFFICIAL = {
    # name: (stage shapes, student width, teacher width, eps, τ, (gt, kd, ofa weights), branch, seed, numbers)
    "conv": ([(8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 2, 2)], 64, 80, (1.0, 1.2, 1.5, 2.0, 1.5), 2.0,
             (1.0, 0.7, 0.5), "conv", 0,
             {"ce": 2.9466678139, "kd": 1.6370201075, "ofa": 3.7126085545}),
    "token": ([(8, 28, 28), (16, 14, 14), (32, 7, 7), (32, 7, 7)], 32, 80, (1.5,), 1.0,
              (1.0, 1.0, 1.0), "token", 1,
              {"ce": 2.2877129874, "kd": 2.1921726793, "ofa": 5.9216137418}),
}
# ofa_loss alone: z_s, z_t = randn(6, 7)·3 each from manual_seed(2), then z_s[0, 0] = 25, z_t[1, 2] = −25;
# labels [0, 2, 6, 3, 3, 1]; (ε, τ) → loss.
OFFICIAL_LOSS = {(1.0, 1.0): 6.124284048, (1.5, 1.0): 4.3551213954, (0.5, 4.0): 6.2495385767,
                 (2.0, 2.0): 1.5294389086}


def _info(name, shapes, width, classes=5):
    stages = {f"stage{i}": s for i, s in enumerate(shapes, start=1)}
    return ModelInfo(name, classes, 32, {**stages, "embedding": (width,), "logits": (classes,)})


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_parity_with_the_official_distiller(name):
    shapes, width_s, width_t, eps, tau, (gt, kd, ofa), branch, seed, expected = OFFICIAL[name]
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(4, *s, generator=g) for s in shapes]
    z_s, z_t = torch.randn(4, 5, generator=g) * 2, torch.randn(4, 5, generator=g) * 2
    method = OFA(OFA.Config(eps=eps, temperature=tau, ce_weight=gt, kd_weight=kd, ofa_weight=ofa, branch=branch))
    method.setup(_info("student", shapes, width_s), _info("teacher", [], width_t))
    with torch.no_grad():
        for k in ["1", "2", "3", "4"]:
            for p in method.branches[k].parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    out = StepOutputs(NetOutputs(z_s, {f"stage{i}": f for i, f in enumerate(feats, start=1)}),
                      torch.tensor([0, 3, 1, 4]), teacher=NetOutputs(z_t))
    terms = method.loss(out)
    assert set(terms) == set(expected)
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value, abs=1e-5), key


def test_parity_with_the_official_ofa_loss():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 7, generator=g) * 3, torch.randn(6, 7, generator=g) * 3
    s[0, 0], t[1, 2] = 25.0, -25.0
    mask = ofa_module.label_mask(torch.tensor([0, 2, 6, 3, 3, 1]), 7)
    for (eps, tau), value in OFFICIAL_LOSS.items():
        assert ofa_module.ofa_loss(s, t, mask, eps, tau).item() == pytest.approx(value, abs=1e-5)


def test_the_whole_loss_matches_the_reference_given_the_branch_logits():
    shapes = [(4, 8, 8), (6, 4, 4), (8, 2, 2), (10, 1, 1)]
    method = OFA(OFA.Config(eps=(1.1, 1.2, 1.3, 1.4, 1.7), temperature=3.0, kd_weight=0.4, ofa_weight=0.6))
    method.setup(_info("s", shapes, 10), _info("t", [], 12))
    g = torch.Generator().manual_seed(7)
    out = StepOutputs(NetOutputs(torch.randn(3, 5, generator=g),
                                 {f"stage{i}": torch.randn(3, *s, generator=g) for i, s in enumerate(shapes, 1)}),
                      torch.tensor([4, 0, 2]), teacher=NetOutputs(torch.randn(3, 5, generator=g)))
    terms = method.loss(out)
    z, zt, y = out.student.logits.tolist(), out.teacher.logits.tolist(), [4, 0, 2]
    branch = method.branch_logits(out)
    assert list(branch) == [1, 2, 3, 4]
    ofa = sum(_ref_ofa(branch[k].tolist(), zt, y, e, 3.0) for k, e in zip([1, 2, 3, 4], [1.1, 1.2, 1.3, 1.4]))
    assert terms["ce"].item() == pytest.approx(_ref_ce_smoothed(z, y, 0.1), abs=1e-5)
    assert terms["kd"].item() == pytest.approx(0.4 * _ref_ofa(z, zt, y, 1.7, 3.0), abs=1e-5)
    assert terms["ofa"].item() == pytest.approx(0.6 * ofa, abs=1e-5)


# -- stages and branches ------------------------------------------------------------------------------

def _iso(name, depth, c=16, hw=2):
    return _info(name, [(c, hw, hw)] * depth, c)


@pytest.mark.parametrize("depth,ends", [(12, [2, 4, 10, 12]), (24, [2, 4, 22, 24]), (8, [2, 4, 6, 8]),
                                        (6, [2, 3, 5, 6]), (4, [1, 2, 3, 4])])
def test_isotropic_students_read_the_official_blocks(depth, ends):
    assert ofa_module.stage_map(_iso("vit", depth)) == {k: f"stage{e}" for k, e in zip([1, 2, 3, 4], ends)}


def test_hierarchical_students_align_their_last_stage_with_ofa_stage_4():
    four = _info("r", [(8, 8, 8), (16, 4, 4), (32, 2, 2), (64, 1, 1)], 64)
    assert ofa_module.stage_map(four) == {1: "stage1", 2: "stage2", 3: "stage3", 4: "stage4"}
    five = _info("r", [(4, 16, 16), (8, 8, 8), (16, 4, 4), (32, 2, 2), (64, 1, 1)], 64)
    assert ofa_module.stage_map(five) == {1: "stage2", 2: "stage3", 3: "stage4", 4: "stage5"}
    three = _info("r", [(16, 8, 8), (32, 4, 4), (64, 2, 2)], 64)
    assert ofa_module.stage_map(three) == {2: "stage1", 3: "stage2", 4: "stage3"}
    method = OFA(OFA.Config(stages=(1, 3)))
    method.setup(three, _info("t", [], 8))
    assert method.branch_taps == {3: "stage2"} and method.taps.student == ("stage2",)
    with pytest.raises(UserError, match="none of the OFA stages"):
        OFA(OFA.Config(stages=(1,))).setup(three, _info("t", [], 8))


def test_branch_kind_follows_the_family_and_can_be_set():
    hier = [(8, 8, 8), (16, 4, 4), (32, 2, 2), (64, 1, 1)]
    assert not ofa_module.is_token_model(_info("test_resnet", hier, 64))
    assert ofa_module.is_token_model(_info("swin_tiny_patch4_window7_224", hier, 64))   # hierarchical transformer
    assert ofa_module.is_token_model(_iso("my_plugin_isotropic_net", 6))
    method = OFA(OFA.Config(branch="conv"))
    method.setup(_iso("vit_tiny_patch16_224", 12), _info("t", [], 24))
    assert method.branch_kind == "conv" and isinstance(method.branches["1"][0], ofa_module.SepConv)
    method = OFA()
    method.setup(_iso("vit_tiny_patch16_224", 12), _info("t", [], 24))
    assert method.branch_kind == "token"
    assert [len(method.branches[k].blocks) for k in "1234"] == [3, 2, 1, 1]
    with pytest.raises(UserError, match="divisible by 4"):
        OFA().setup(_iso("vit_x", 12, c=18), _info("t", [], 24))


def test_conv_branches_follow_the_official_widths():
    method = OFA()
    method.setup(_info("r", [(8, 8, 8), (16, 4, 4), (32, 2, 2), (64, 1, 1)], 64), _info("t", [], 96))
    b1 = method.branches["1"]
    widths = [(m[1].in_channels, m[5].out_channels) for m in b1 if isinstance(m, ofa_module.SepConv)]
    assert widths == [(8, 16), (16, 32), (32, 96)]      # doubling, the last to max(64, 96)
    assert isinstance(method.branches["4"][0], torch.nn.Conv2d) and method.branches["4"][0].out_channels == 96
    assert all(method.branches[k][-1].out_features == 5 for k in "1234")


def test_real_vit_at_32_pixels_and_odd_token_grids():
    torch.manual_seed(0)
    vit = create_model("vit_tiny_patch16_224", 5, 32)
    info = model_info(vit, "vit_tiny_patch16_224", 5, 32, ("stages",))
    assert info.shapes["stage1"] == (192, 2, 2) and len(info.stage_names) == 12
    method = OFA()
    method.setup(info, _info("resnet18", [], 512))
    assert method.branch_kind == "token" and method.taps.student == ("stage2", "stage4", "stage10", "stage12")
    # a 30×30 grid merges twice (30 → 15 → 8): the odd side is padded where the official code refuses
    branch = ofa_module.TokenBranch(8, 30, 1, 16, 5)
    assert len(branch.merge) == 2 and branch(torch.randn(2, 8, 30, 30)).shape == (2, 5)


# -- gradients, settings, defaults ------------------------------------------------------------------

def test_gradient_reaches_the_student_and_the_branches_never_the_teacher():
    shapes = [(4, 8, 8), (6, 4, 4), (8, 2, 2), (8, 1, 1)]
    method = OFA()
    method.setup(_info("s", shapes, 8), _info("t", [], 8))
    feats = {f"stage{i}": torch.randn(4, *s, requires_grad=True) for i, s in enumerate(shapes, 1)}
    logits, t_logits = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    terms = method.loss(StepOutputs(NetOutputs(logits, feats), torch.tensor([0, 1, 2, 3]), NetOutputs(t_logits)))
    sum(terms.values()).backward()
    assert logits.grad.abs().sum() > 0 and all(f.grad.abs().sum() > 0 for f in feats.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in method.named_parameters() if "weight" in n)
    assert t_logits.grad is None
    groups = method.param_groups()
    assert sum(len(g["params"]) for g in groups) == len(list(method.parameters()))


def _defaults(dataset="cifar100", **settings):
    cfg = RunConfig(method="ofa", dataset=dataset, teacher="resnet34", model="resnet18", method_settings=settings)
    return vars(validate(cfg).config)


def test_defaults_cifar_imagenet_and_set_wins():
    c = OFA.Config()
    assert (c.eps, c.stages, c.temperature, c.ce_weight, c.kd_weight, c.ofa_weight, c.label_smoothing, c.branch) == (
        (1.0,), (1, 2, 3, 4), 1.0, 1.0, 1.0, 1.0, 0.1, "auto")
    assert OFA.tasks == ("cls",) and OFA.needs_teacher and OFA.logits_only_teacher and OFA.taps.teacher == ()
    assert _defaults()["eps"] == (1.0,)
    assert _defaults("imagefolder")["eps"] == (1.5,)
    c = _defaults("imagefolder", eps="1.2, 1.3, 1.4, 1.5, 1.6", stages="1,2,3,4", temperature="2")
    assert (c["eps"], c["temperature"]) == ((1.2, 1.3, 1.4, 1.5, 1.6), 2.0)


@pytest.mark.parametrize("bad", [{"eps": (1.0, 2.0)}, {"eps": (0.0,)}, {"stages": (0, 1)}, {"stages": (2, 2)},
                                 {"stages": ()}, {"temperature": 0.0}, {"kd_weight": -1.0},
                                 {"label_smoothing": 1.5}])
def test_out_of_range_settings_are_refused(bad):
    with pytest.raises(UserError):
        OFA(OFA.Config(**bad))


# -- resume and the CLI ----------------------------------------------------------------------------

@register_method("test_ofa_stop_at_0")
class OFAStopAtZero(OFA):
    """OFA that raises the stop flag at the first step (of a 2-step epoch), as SIGTERM does."""

    flag: StopFlag | None = None

    @dataclass
    class Config(OFA.Config):
        pass

    def loss(self, out):
        if out.step == 0 and OFAStopAtZero.flag is not None and not OFAStopAtZero.flag:
            OFAStopAtZero.flag.signal_name = "SIGTERM"
        return super().loss(out)


def test_stop_then_resume_matches_uninterrupted(tmp_path, quiet_console):
    """The exit branches (and their optimiser state) are saved and restored with the run."""
    settings = {"method": "test_ofa_stop_at_0", "teacher": "test_resnet", "teacher_epochs": 1, "epochs": 1,
                    "train_size": 32, "test_size": 16}
    full = run(tiny_config(tmp_path, run_name="full", **settings), console=quiet_console)
    OFAStopAtZero.flag = StopFlag()
    try:
        with pytest.raises(Interrupted):
            run(tiny_config(tmp_path, run_name="cut", **settings), console=quiet_console, stop=OFAStopAtZero.flag)
    finally:
        OFAStopAtZero.flag = None
    resumed = run(tiny_config(tmp_path, run_name="cut", **settings), resume=True, console=quiet_console)
    assert resumed["final_train_loss"] == pytest.approx(full["final_train_loss"], rel=1e-6)
    rows = [(tmp_path / "runs" / name / "metrics.csv").read_text().splitlines() for name in ("cut", "full")]
    header = rows[0][0].split(",")
    keep = [header.index(c) for c in ("train_ce", "train_kd", "train_ofa", "test_loss")]
    assert [[r.split(",")[i] for i in keep] for r in rows[0][1:]] == [[r.split(",")[i] for i in keep] for r in rows[1][1:]]
    assert len(rows[0]) == 2


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    return tmp_path_factory.mktemp("ofa-cli")  # shared, so each teacher is trained once


def _cli(output, student, teacher, *extra):
    return ["run", "--method", "ofa", "--model", student, "--teacher", teacher, "--input-size", "32",
            "--train-size", "16", "--test-size", "8", "--batch-size", "8", "--epochs", "1", "--max-steps", "2",
            "--device", "cpu", "--optimizer", "sgd", "--lr", "0.05", "--teacher-epochs", "1",
            "--output", str(output), "--run-name", f"ofa-{teacher}-{student}", *extra]


@pytest.mark.parametrize("teacher,student", [
    ("test_resnet", "test_resnet"), ("test_resnet", "test_efficientnet"), ("test_resnet", "test_convnext"),
    ("test_convnext", "test_vit"),            # the matrix's cross-family pair
    ("test_resnet", "test_vit"),              # a ViT student of a CNN teacher
    ("vit_tiny_patch16_224", "resnet18"),     # OFA's DeiT-T → ResNet-18 pair, at 32 px
])
def test_runs_from_the_cli(output, teacher, student):
    assert main(_cli(output, student, teacher)) == 0
    folder = output / f"ofa-{teacher}-{student}"
    result = json.loads((folder / "result.json").read_text())
    assert result["complete"] and result["steps"] == 2 and math.isfinite(result["final_train_loss"])
    header = (folder / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_ce", "train_kd", "train_ofa"} <= set(header)


def test_segmentation_is_refused(output, capsys):
    assert main([*_cli(output, "test_resnet", "test_resnet"), "--task", "seg", "--run-name", "ofa-seg"]) == 2
    assert "ofa" in capsys.readouterr().err
