"""VID: the loss against a plain-loop float64 reference and the official RepDistiller numbers,
stage pairing, the variance initialisation, gradient flow, recipe defaults and CLI runs."""

import json
import math

import pytest
import torch

from kdzoo.build import validate
from kdzoo.cli import main
from kdzoo.config import RunConfig
from kdzoo.errors import UserError
from kdzoo.method import NetOutputs, StepOutputs
from kdzoo.models import ModelInfo, create_model
from kdzoo.registry import get_method
from kdzoo.settings import apply_overrides

from .reference import conv1x1, mean_ce, mean_kl

VID = get_method("vid")


# -- plain-Python reference (nested lists [b][c][h][w]) ----------------------------------------

def _block_mean(f, h, w):
    """Average pooling to h×w when the map's size is a multiple of it (what adaptive pooling does then)."""
    fh, fw = len(f[0][0]) // h, len(f[0][0][0]) // w
    return [[[[sum(plane[y * fh + i][x * fw + j] for i in range(fh) for j in range(fw)) / (fh * fw)
               for x in range(w)] for y in range(h)] for plane in sample] for sample in f]


def _relu(f):
    return [[[[max(v, 0.0) for v in row] for row in plane] for plane in sample] for sample in f]


def _ref_pair(s, t, weights, log_scale, eps):
    (hs, ws), (ht, wt) = (len(s[0][0]), len(s[0][0][0])), (len(t[0][0]), len(t[0][0][0]))
    if hs * ws > ht * wt:
        s = _block_mean(s, ht, wt)
    elif ht * wt > hs * ws:
        t = _block_mean(t, hs, ws)
    mu = conv1x1(_relu(conv1x1(_relu(conv1x1(s, weights[0])), weights[1])), weights[2])
    var = [math.log1p(math.exp(a)) + eps for a in log_scale]
    total, n = 0.0, 0
    for b in range(len(t)):
        for c in range(len(t[b])):
            for y in range(len(t[b][c])):
                for x in range(len(t[b][c][y])):
                    total += 0.5 * ((mu[b][c][y][x] - t[b][c][y][x]) ** 2 / var[c] + math.log(var[c]))
                    n += 1
    return total / n


S_SHAPES = {"stage1": (3, 4, 4), "stage2": (4, 6, 6), "stage3": (2, 2, 2)}
T_SHAPES = {"stage1": (5, 4, 4), "stage2": (3, 3, 3), "stage3": (2, 4, 4), "stage4": (6, 1, 1)}


def _info(name, shapes):
    return ModelInfo(name, 3, 16, {**shapes, "embedding": (7,), "logits": (3,)})


def _toy(config=None, teacher_grad=False, batch=2):
    g = torch.Generator().manual_seed(0)
    method = VID(config)
    method.setup(_info("s", S_SHAPES), _info("t", T_SHAPES))
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    student = {k: torch.randn(batch, *v, generator=g) for k, v in S_SHAPES.items()}
    teacher = {k: (2 * torch.randn(batch, *v, generator=g) + 1).requires_grad_(teacher_grad) for k, v in T_SHAPES.items()}
    logits, t_logits = torch.randn(batch, 3, generator=g), torch.randn(batch, 3, generator=g)
    targets = torch.arange(batch) % 3
    return method, StepOutputs(NetOutputs(logits, student), targets, NetOutputs(t_logits, teacher))


def _expected(method, out):
    c = method.config
    vid = 0.0
    for (s, t), reg in zip(method.pairs, method.regressors):
        weights = [conv.weight[:, :, 0, 0].tolist() for conv in (reg.mean[0], reg.mean[2], reg.mean[4])]
        vid += _ref_pair(out.student.features[s].tolist(), out.teacher.features[t].tolist(), weights,
                         reg.log_scale.tolist(), c.eps)
    logits, targets = out.student.logits.tolist(), out.targets.tolist()
    expected = {"ce": c.ce_weight * mean_ce(logits, targets), "vid": c.vid_weight * vid}
    if c.kd_weight > 0:
        expected["kd"] = c.kd_weight * c.temperature**2 * mean_kl(logits, out.teacher.logits.tolist(), c.temperature)
    return expected


@pytest.mark.parametrize("config", [None, VID.Config(vid_weight=0.7, ce_weight=0.5, kd_weight=0.9, temperature=2.0),
                                    VID.Config(layers=("stage1:stage3", "stage3:stage4"), eps=0.3)])
def test_loss_matches_loop_reference(config):
    method, out = _toy(config)
    terms = method.loss(out)
    expected = _expected(method, out)
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert terms[name].dtype == torch.float32
        assert terms[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_stages_are_zipped_from_the_first_as_the_official_code():
    method, _ = _toy()
    # RepDistiller: zip(feat_s[1:-1], feat_t[1:-1]); the teacher's fourth stage has no partner
    assert method.pairs == [("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3")]
    assert [(r.mean[0].in_channels, r.mean[0].out_channels, r.mean[4].out_channels) for r in method.regressors] == \
           [(3, 5, 5), (4, 3, 3), (2, 2, 2)]  # C_s → C_t → C_t → C_t, as VIDLoss(s, t, t)
    assert all(conv.bias is None for r in method.regressors for conv in (r.mean[0], r.mean[2], r.mean[4]))
    assert method.taps.student == ("stage1", "stage2", "stage3") and method.taps.teacher == ("stage1", "stage2", "stage3")


# -- parity with the official code ------------------------------------------------------------
# HobbitLong/RepDistiller @ b84f547c5db6a35318d4671d7d5c4de74c822403, distiller_zoo/VID.py, VIDLoss(3, 5, 5)
# run in float64 by /tmp/official-vidcrd/parity.py: torch.Generator().manual_seed(0); for each case, in
# this order: s = randn(s_shape), t = 2·randn(t_shape) + 0.5, w1 = 0.5·randn(5,3,1,1), w2, w3 = 0.5·randn(5,5,1,1),
# log_scale += 0.3·randn(5) (all float64 draws from that generator); loss = VIDLoss(s, t).
OFFICIAL_VID = [("same", (2, 3, 4, 4), (2, 5, 4, 4), 1.1950922507906303),
                ("student_larger", (2, 3, 6, 6), (2, 5, 3, 3), 1.2823174528025134),
                ("teacher_larger", (2, 3, 2, 2), (2, 5, 4, 4), 0.9877030174500675)]
OFFICIAL_INIT_LOG_SCALE = 4.993229389190674  # np.log(np.exp(5.0 - 1e-5) - 1.0) in a float32 parameter


def test_parity_with_official_vidloss():
    g = torch.Generator().manual_seed(0)
    for name, s_shape, t_shape, official in OFFICIAL_VID:
        s = torch.randn(*s_shape, generator=g, dtype=torch.float64)
        t = 2.0 * torch.randn(*t_shape, generator=g, dtype=torch.float64) + 0.5
        ws = [0.5 * torch.randn(5, 3, 1, 1, generator=g, dtype=torch.float64),
              0.5 * torch.randn(5, 5, 1, 1, generator=g, dtype=torch.float64),
              0.5 * torch.randn(5, 5, 1, 1, generator=g, dtype=torch.float64)]
        dl = 0.3 * torch.randn(5, generator=g, dtype=torch.float64)
        method = VID()
        method.setup(_info("s", {"stage1": s_shape[1:]}), _info("t", {"stage1": t_shape[1:]}))
        reg = method.regressors[0]
        assert reg.log_scale[0].item() == OFFICIAL_INIT_LOG_SCALE
        with torch.no_grad():
            for conv, w in zip((reg.mean[0], reg.mean[2], reg.mean[4]), ws):
                conv.weight.copy_(w)
            reg.log_scale.add_(dl)
        out = StepOutputs(NetOutputs(torch.zeros(2, 3), {"stage1": s.float()}), torch.tensor([0, 1]),
                          NetOutputs(torch.zeros(2, 3), {"stage1": t.float()}))
        assert method.loss(out)["vid"].item() == pytest.approx(official, rel=1e-5), name


def test_variance_starts_at_init_var_and_is_floored_by_eps():
    method, _ = _toy()
    method = VID(VID.Config(init_var=2.0, eps=1e-3))
    method.setup(_info("s", S_SHAPES), _info("t", T_SHAPES))
    for reg in method.regressors:
        assert torch.allclose(reg.variance(), torch.full_like(reg.log_scale, 2.0), rtol=1e-6)
        with torch.no_grad():
            reg.log_scale.fill_(-200.0)  # softplus → 0: the variance is eps, the loss stays finite
        assert torch.allclose(reg.variance(), torch.full_like(reg.log_scale, 1e-3))


def test_perfect_prediction_leaves_only_the_log_variance():
    method = VID()
    method.setup(_info("s", {"stage1": (2, 3, 3)}), _info("t", {"stage1": (2, 3, 3)}))
    reg = method.regressors[0]
    with torch.no_grad():
        for conv in (reg.mean[0], reg.mean[2], reg.mean[4]):
            conv.weight.copy_(torch.eye(2)[:, :, None, None])
    f = torch.rand(4, 2, 3, 3)  # non-negative: the ReLUs pass it through
    out = StepOutputs(NetOutputs(torch.zeros(4, 3), {"stage1": f}), torch.zeros(4, dtype=torch.long),
                      NetOutputs(torch.zeros(4, 3), {"stage1": f.clone()}))
    assert method.loss(out)["vid"].item() == pytest.approx(0.5 * math.log(5.0), rel=1e-6)


# -- gradients -----------------------------------------------------------------------------------

def test_gradient_reaches_student_regressors_and_variances_never_the_teacher():
    method, out = _toy(teacher_grad=True)
    for f in out.student.features.values():
        f.requires_grad_(True)
    method.loss(out)["vid"].backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in out.student.features.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    assert all(t.grad is None for t in out.teacher.features.values())


def test_bf16_maps_are_computed_in_float32():
    method, out = _toy()
    ref = method.loss(out)["vid"].item()
    half = StepOutputs(NetOutputs(out.student.logits, {k: v.bfloat16() for k, v in out.student.features.items()}),
                       out.targets, NetOutputs(out.teacher.logits, {k: v.bfloat16() for k, v in out.teacher.features.items()}))
    terms = method.loss(half)
    assert terms["vid"].dtype == torch.float32 and terms["vid"].item() == pytest.approx(ref, rel=0.05)


# -- settings ------------------------------------------------------------------------------------

def test_defaults_are_repdistillers_cifar_setting():
    c = VID.Config()
    assert (c.layers, c.vid_weight, c.ce_weight, c.kd_weight, c.temperature, c.init_var, c.eps) == \
           ((), 1.0, 1.0, 0.0, 4.0, 5.0, 1e-5)


def test_recipe_defaults_and_set_wins():
    for dataset in ("cifar100", "imagefolder"):
        run = RunConfig(method="vid", dataset=dataset, model="resnet18", teacher="resnet34")
        assert VID.recipe_defaults(run, {}) == {}
    cfg = RunConfig(method="vid", dataset="imagefolder", model="resnet18", teacher="resnet34",
                    method_settings={"vid_weight": "2", "layers": "stage3:stage4, stage2"})
    c = validate(cfg).config
    assert c.vid_weight == 2.0 and c.layers == ("stage3:stage4", "stage2")
    assert VID(c).taps.student == ("stage2", "stage3") and VID(c).taps.teacher == ("stage2", "stage4")


@pytest.mark.parametrize("settings,message", [({"layers": "layer4"}, "not understood"),
                                              ({"vid_weight": "-1"}, "vid_weight"), ({"eps": "0"}, "eps"),
                                              ({"init_var": "0"}, "init_var")])
def test_bad_settings_are_user_errors(settings, message):
    with pytest.raises(UserError, match=message):
        VID(apply_overrides(VID.Config(), settings, "method 'vid'"))


def test_missing_stage_is_a_user_error():
    with pytest.raises(UserError, match="no stage5"):
        VID(VID.Config(layers=("stage5",))).setup(_info("s", S_SHAPES), _info("t", T_SHAPES))


# -- CLI -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_output(tmp_path_factory):
    """Untrained teacher checkpoints (what is tested is the method's wiring, not the teacher)."""
    folder = tmp_path_factory.mktemp("vid-cli")
    torch.manual_seed(0)
    for name in ("test_resnet", "test_convnext"):
        torch.save(create_model(name, 10, 32).state_dict(), folder / f"{name}.pt")
    return folder


def _cli(output, student, teacher, *extra):
    name = f"vid-{teacher}-{student}"
    args = ["run", "--method", "vid", "--model", student, "--teacher", teacher, "--input-size", "32",
            "--train-size", "32", "--test-size", "16", "--batch-size", "8", "--epochs", "1", "--max-steps", "2",
            "--device", "cpu", "--optimizer", "sgd", "--lr", "0.05", "--teacher-checkpoint",
            str(output / f"{teacher}.pt"), "--output", str(output), "--run-name", name, *extra]
    return main(args), output / name


@pytest.mark.parametrize("student,teacher", [("test_resnet", "test_resnet"), ("test_efficientnet", "test_resnet"),
                                             ("test_convnext", "test_resnet"), ("test_vit", "test_convnext")])
def test_cli_runs(shared_output, student, teacher):
    code, folder = _cli(shared_output, student, teacher)
    assert code == 0
    result = json.loads((folder / "result.json").read_text())
    assert result["complete"] and result["steps"] == 2 and math.isfinite(result["final_train_loss"])
    with open(folder / "metrics.csv") as f:
        header = f.readline()
    assert "train_vid" in header and "train_ce" in header


def test_cli_refuses_segmentation(shared_output, capsys):
    code, _ = _cli(shared_output, "test_resnet", "test_resnet", "--task", "seg")
    assert code == 2
    assert "vid" in capsys.readouterr().err
