"""The segmentation network (FPN decoder on a timm backbone) and the methods on dense outputs:
per-pixel CE and KD against plain-loop references, NFD on the decoder map, FRSKD's segmentation
setting, task checks and task-keyed cached teachers."""

import dataclasses

import pytest
import torch

from kdzoo.config import RunConfig
from kdzoo.engine import validate
from kdzoo.errors import UserError
from kdzoo.hooks import FeatureTaps
from kdzoo.losses import IGNORE_INDEX, cross_entropy
from kdzoo.method import NetOutputs, StepOutputs
from kdzoo.models import ModelInfo, create_model, model_info
from kdzoo.registry import get_method
from kdzoo.teacher import teacher_run_config

from .reference import mean_ce, mean_kl
from .test_method_nfd import _ref_layer

I = IGNORE_INDEX


@pytest.mark.parametrize("size", [(33, 33), (50, 50), (45, 61)])
def test_head_works_at_sizes_that_are_not_multiples_of_32(size):
    torch.manual_seed(0)
    model = create_model("test_resnet", 5, size[0], task="seg")
    info = model_info(model, "test_resnet", 5, size[0])
    assert info.task == "seg" and info.shapes["logits"] == (5, size[0], size[0])
    images = torch.randn(2, 3, *size)
    with FeatureTaps(model, ["stages", "decoder"]) as taps:
        logits = model(images)
        features = taps.pop()
    assert logits.shape == (2, 5, *size)
    # the decoder map is at the finest stage's resolution, whatever the rounding of the strides
    assert features["decoder"].shape[-2:] == features["stage1"].shape[-2:]
    logits.logsumexp(dim=1).mean().backward()
    first = next(name for name, _ in model.named_parameters())   # the backbone's stem
    assert first.startswith("backbone.conv1")
    for name in (first, "decoder.lateral.0.weight", "decoder.lateral.3.weight",
                 "decoder.fuse.0.weight", "classifier.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_stage_taps_point_into_the_backbone_and_no_parameter_is_left_unused():
    model = create_model("resnet18", 3, 32, task="seg")
    with FeatureTaps(model, ["stages", "decoder"]) as taps:
        assert taps.names == ["stage1", "stage2", "stage3", "stage4", "decoder"]
        assert [p.module for p in taps.points][:2] == ["backbone.layer1", "backbone.layer2"]
        model(torch.randn(2, 3, 32, 32)).mean().backward()
    assert all(p.grad is not None for p in model.parameters())  # classifier and final norm were pruned
    assert not hasattr(model.backbone, "fc") or isinstance(model.backbone.fc, torch.nn.Identity)


# -- dense losses ------------------------------------------------------------------------------

def _dense_toy(seed=0, b=2, k=3, h=2, w=3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k, h, w, generator=g)
    t_logits = torch.randn(b, k, h, w, generator=g)
    masks = torch.randint(0, k, (b, h, w), generator=g)
    masks[0, 0, :] = I
    return logits, t_logits, masks


def _pixel_rows(logits):
    b, k, h, w = logits.shape
    return [[logits[i, c, y, x].item() for c in range(k)] for i in range(b) for y in range(h) for x in range(w)]


def test_dense_cross_entropy_is_the_mean_over_labelled_pixels():
    logits, _, masks = _dense_toy()
    rows, labels = _pixel_rows(logits), masks.flatten().tolist()
    kept = [(r, y) for r, y in zip(rows, labels) if y != I]
    expected = mean_ce([r for r, _ in kept], [y for _, y in kept])
    assert cross_entropy(logits, masks).item() == pytest.approx(expected, rel=1e-5)


def test_dense_cross_entropy_of_an_all_ignored_batch_is_zero_not_nan():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = cross_entropy(logits, torch.full((1, 2, 2), I))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_pixel_kd_is_the_kl_averaged_over_every_pixel():
    logits, t_logits, masks = _dense_toy()
    kd = get_method("kd")(validate(RunConfig(method="kd", teacher="test_resnet", task="seg")).config)
    c = kd.config
    assert (c.temperature, c.ce_weight, c.kd_weight) == (1.0, 1.0, 1.0)   # the segmentation defaults
    terms = kd.loss(StepOutputs(NetOutputs(logits), masks, NetOutputs(t_logits)))
    expected_kd = mean_kl(_pixel_rows(logits), _pixel_rows(t_logits), 1.0)   # B·H·W rows
    assert terms["kd"].item() == pytest.approx(expected_kd, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(cross_entropy(logits, masks).item(), rel=1e-6)


def test_user_settings_win_over_the_task_defaults():
    method = validate(RunConfig(method="kd", teacher="test_resnet", task="seg", method_settings={"temperature": "2"}))
    assert method.config.temperature == 2.0 and method.config.ce_weight == 1.0
    assert validate(RunConfig(method="kd", teacher="test_resnet")).config.temperature == 4.0  # cls unchanged


# -- NFD on the decoder ------------------------------------------------------------------------

def _seg_info(name, decoder, stages):
    return ModelInfo(name, 3, 16, {**stages, "decoder": decoder, "logits": (3, 6, 7)}, task="seg")


@pytest.mark.parametrize("t_decoder", [(5, 3, 4), (5, 6, 7)])  # teacher map resized, or the same size
def test_nfd_distils_the_decoder_by_default_on_segmentation(t_decoder):
    nfd_cls = get_method("nfd")
    config = nfd_cls.Config(nfd_weight=0.5, eps=1e-3, kd_weight=0.3, temperature=2.0)
    method = nfd_cls(config)
    method.setup(_seg_info("s", (4, 3, 4), {"stage1": (2, 3, 4)}),
                 _seg_info("t", t_decoder, {"stage1": (3, 3, 4)}))
    assert method.pairs == [("decoder", "decoder")] and method.taps.student == ("decoder",)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        method.adapters[0].weight.copy_(torch.randn(method.adapters[0].weight.shape, generator=g))
    s_dec, t_dec = torch.randn(2, 4, 3, 4, generator=g), 2 * torch.randn(2, *t_decoder, generator=g) + 1
    logits, t_logits, masks = _dense_toy(seed=4, h=6, w=7)
    out = StepOutputs(NetOutputs(logits, {"decoder": s_dec}), masks, NetOutputs(t_logits, {"decoder": t_dec}))
    terms = method.loss(out)
    reference = _ref_layer(s_dec.tolist(), method.adapters[0].weight[:, :, 0, 0].tolist(), t_dec.tolist(), config.eps)
    assert terms["nfd"].item() == pytest.approx(0.5 * reference, rel=1e-4)
    expected_kd = 0.3 * 4.0 * mean_kl(_pixel_rows(logits), _pixel_rows(t_logits), 2.0)
    assert terms["kd"].item() == pytest.approx(expected_kd, rel=1e-5)


def test_nfd_stages_on_segmentation_and_decoder_refused_on_classification():
    nfd_cls = get_method("nfd")
    method = nfd_cls(nfd_cls.Config(layers=("stage1", "decoder")))
    method.setup(_seg_info("s", (4, 3, 4), {"stage1": (2, 3, 4)}), _seg_info("t", (5, 3, 4), {"stage1": (3, 3, 4)}))
    assert method.pairs == [("stage1", "stage1"), ("decoder", "decoder")]
    cls_info = ModelInfo("c", 3, 16, {"stage1": (2, 3, 4), "logits": (3,)})
    with pytest.raises(UserError, match="decoder layer exists only with --task seg"):
        nfd_cls(nfd_cls.Config(layers=("decoder",))).setup(cls_info, cls_info)


# -- FRSKD's segmentation setting --------------------------------------------------------------

def test_frskd_on_segmentation_ramps_alpha_and_beta_and_predicts_per_pixel():
    method = validate(RunConfig(method="frskd", task="seg", model="test_resnet"))
    c = method.config
    assert (c.alpha, c.beta, c.temperature) == (1.0, 50.0, 1.0)
    assert c.ramp_start == pytest.approx(2 / 3) and c.ramp_length == pytest.approx(1 / 3)
    torch.manual_seed(0)
    model = create_model("test_resnet", 4, 24, task="seg")
    method.setup(model_info(model, "test_resnet", 4, 24, ["stages"]), None)
    with FeatureTaps(model, ["stages"]) as taps:
        logits = model(torch.randn(2, 3, 24, 24))
        features = taps.pop()
    masks = torch.randint(0, 4, (2, 24, 24))
    early = method.loss(StepOutputs(NetOutputs(logits, features), masks, progress=0.5))
    late = method.loss(StepOutputs(NetOutputs(logits, features), masks, progress=1.0))
    assert early["kd"].item() == 0.0 and early["att"].item() == 0.0     # before 2/3 of training
    assert late["kd"].item() > 0 and late["att"].item() > 0
    assert early["ce_self"].item() > 0
    late["ce_self"].backward()
    assert method.self_teacher.fc.weight.grad.abs().sum() > 0          # the per-pixel head learns


def test_frskd_refuses_mixing_on_segmentation():
    method = validate(RunConfig(method="frskd", task="seg", model="test_resnet", method_settings={"aug": "mixup"}))
    model = create_model("test_resnet", 4, 24, task="seg")
    with pytest.raises(UserError, match="neither sla nor mixup"):
        method.setup(model_info(model, "test_resnet", 4, 24), None)


# -- tasks -------------------------------------------------------------------------------------

def test_a_method_without_segmentation_support_names_its_tasks():
    with pytest.raises(UserError, match="'ccd' supports task\\(s\\) cls, not 'seg'"):
        validate(RunConfig(method="ccd", teacher="test_resnet", task="seg"))


def test_cached_teachers_are_keyed_by_task():
    seg = RunConfig(method="kd", teacher="resnet50", task="seg").resolved()
    cls = dataclasses.replace(seg, task="cls").resolved()
    seg_teacher, cls_teacher = teacher_run_config(seg).resolved(), teacher_run_config(cls).resolved()
    assert seg_teacher.task == "seg" and seg_teacher.run_id().startswith("shapes-seg_baseline_resnet50_")
    assert cls_teacher.run_id().startswith("shapes_baseline_resnet50_")
    assert seg_teacher.run_key() != cls_teacher.run_key()


def test_cached_teachers_are_keyed_by_the_amount_of_generated_data(monkeypatch):
    from kdzoo.data import catalog

    spec = catalog.get_dataset("shapes", "seg")
    cfg = RunConfig(method="kd", teacher="resnet50", task="seg").resolved()
    assert (cfg.train_size, cfg.test_size) == (spec.recipe.train_size, spec.recipe.test_size)
    before = teacher_run_config(cfg).resolved().run_id()
    # a later kdzoo that generates more images by default must not reuse this teacher
    more = dataclasses.replace(spec, recipe=dataclasses.replace(spec.recipe, train_size=2 * spec.recipe.train_size))
    monkeypatch.setitem(catalog._DATASETS, ("seg", "shapes"), more)
    cfg = RunConfig(method="kd", teacher="resnet50", task="seg").resolved()
    assert teacher_run_config(cfg).resolved().run_id() != before
    # an explicit --train-size wins over the recipe's
    assert RunConfig(task="seg", train_size=64).resolved().train_size == 64
