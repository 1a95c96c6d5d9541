"""The cifar_* timm models (kdzoo/cifar_models.py) against RepDistiller's CIFAR networks.

The reference numbers below were measured by running the reference code itself, outside this
project, on HobbitLong/RepDistiller at commit b84f547c5db6a35318d4671d7d5c4de74c822403
(models/__init__.py ``model_dict``): for each network built with num_classes=100,
* its parameter count,
* the shapes (C, H, W) of its feature list for a 32×32 input (``net(x, is_feat=True)``
  without the last, pooled entry): entry 0 is the stem, the others the stages,
* the size of the pooled vector entering the classifier,
* the first 16 hex digits of sha256 over its sorted state_dict entries ``"key:shape"``
  joined by newlines (so a RepDistiller checkpoint loads with ``strict=True``).
Outside the project, the reference weights were also loaded into each cifar_* model and gave
the same logits and features (max relative difference < 3e-7).
"""

from __future__ import annotations

import hashlib

import pytest
import timm
import torch
from torch import nn

import kdzoo  # noqa: F401  (registers the cifar_* models)
from kdzoo import cifar_models
from kdzoo.cifar_models import CifarNet
from kdzoo.models import create_model, model_info, parameter_count

S32 = [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]      # resnet8…110
S32X4 = [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)]  # resnet8x4, resnet32x4
WRN1 = [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]
WRN2 = [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8)]
VGG = [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)]

# kdzoo name: (RepDistiller model_dict name, parameters, feature shapes, pooled size, state_dict digest)
REFERENCE = {
    "cifar_resnet8": ("resnet8", 83892, S32, 64, "166d31a811b31c5f"),
    "cifar_resnet14": ("resnet14", 181108, S32, 64, "8525efa6fc491f19"),
    "cifar_resnet20": ("resnet20", 278324, S32, 64, "6db44f39e3bff21f"),
    "cifar_resnet32": ("resnet32", 472756, S32, 64, "325ee6108709f7b5"),
    "cifar_resnet44": ("resnet44", 667188, S32, 64, "f1263f7b0ed71e1a"),
    "cifar_resnet56": ("resnet56", 861620, S32, 64, "3977b81559d8630f"),
    "cifar_resnet110": ("resnet110", 1736564, S32, 64, "7f8e5ac1814e480a"),
    "cifar_resnet8x4": ("resnet8x4", 1233540, S32X4, 256, "5d5871b403f3a649"),
    "cifar_resnet32x4": ("resnet32x4", 7433860, S32X4, 256, "610ad29043c56b33"),
    "cifar_resnet50": ("ResNet50", 23705252,
                       [(64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)], 2048, "d4a9e0738c8f8385"),
    "cifar_wrn_16_1": ("wrn_16_1", 180916, WRN1, 64, "f6cf46040022f13d"),
    "cifar_wrn_16_2": ("wrn_16_2", 703284, WRN2, 128, "bdbc50a2b3205f84"),
    "cifar_wrn_40_1": ("wrn_40_1", 569780, WRN1, 64, "deef22602ae7584b"),
    "cifar_wrn_40_2": ("wrn_40_2", 2255156, WRN2, 128, "bf5731c8e8e2b95f"),
    "cifar_vgg8": ("vgg8", 3965028, VGG, 512, "d9f8d7533423754e"),
    "cifar_vgg11": ("vgg11", 9277284, VGG, 512, "6592bd1869a5938f"),
    "cifar_vgg13": ("vgg13", 9462180, VGG, 512, "7bec65f1ca17a0bf"),
    "cifar_vgg16": ("vgg16", 14774436, VGG, 512, "b420ddff7e4306ec"),
    "cifar_vgg19": ("vgg19", 20086692, VGG, 512, "2d318270df30c723"),
    "cifar_mobilenetv2": ("MobileNetV2", 812836,
                          [(16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)], 1280, "10e9036e17013c38"),
    "cifar_shufflenet_v1": ("ShuffleV1", 949258,
                            [(24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4)], 960, "eb3bcbc847930cce"),
    "cifar_shufflenet_v2": ("ShuffleV2", 1355528,
                            [(24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4)], 1024, "b7e2c3e764687767"),
}
NAMES = list(REFERENCE)
# small tensors: one thread is as fast and does not stall when the cores are busy (conftest)
pytestmark = pytest.mark.usefixtures("one_thread")
ONE_PER_FAMILY = ["cifar_resnet8", "cifar_wrn_16_1", "cifar_vgg8", "cifar_mobilenetv2",
                  "cifar_shufflenet_v1", "cifar_shufflenet_v2"]


@pytest.fixture(scope="module")
def nets():
    """Every network built once, with timm's own factory (the big ones take a moment)."""
    torch.manual_seed(0)
    return {name: timm.create_model(name, num_classes=100).eval() for name in NAMES}


def test_all_22_are_registered_with_timm_under_the_cifar_prefix():
    assert sorted(timm.list_models("cifar_*")) == sorted(NAMES)
    for name in NAMES:
        entrypoint = timm.models.model_entrypoint(name)
        assert entrypoint.__module__ == "kdzoo.cifar_models" and getattr(cifar_models, name) is entrypoint
        assert timm.is_model(name)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_and_state_dict_match_the_reference(nets, name):
    _, params, _, _, digest = REFERENCE[name]
    model = nets[name]
    assert isinstance(model, CifarNet)
    assert parameter_count(model) == params
    text = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(model.state_dict().items()))
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == digest


@pytest.mark.parametrize("name", NAMES)
def test_stage_shapes_match_the_reference_through_kdzoo_taps(nets, name):
    """kdzoo's own probe (model_info → FeatureTaps): stage1…N are the reference's feat[1:],
    the stem (feature_info[0]) is feat[0]; embedding and logits have the reference's sizes."""
    _, _, shapes, pooled, _ = REFERENCE[name]
    model = nets[name]
    stem = model.feature_info[0]["module"]
    info = model_info(model, name, 100, 32, taps=(stem,))
    assert info.stage_names == [f"stage{i}" for i in range(1, len(shapes))]
    assert [info.shapes[stem]] + [info.shapes[s] for s in info.stage_names] == shapes
    assert info.embedding_dim == pooled == model.num_features
    assert info.shapes["logits"] == (100,)
    # feature_info tells the truth about every entry it lists
    assert [(e["num_chs"], 32 // e["reduction"]) for e in model.feature_info] == [(c, h) for c, h, _ in shapes]


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_timm_interface(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        assert logits.shape == (3, 10)
        assert features.dim() == 4 and features.shape[1] == model.num_features
        assert torch.allclose(model.forward_head(features), logits)
        assert model.forward_head(features, pre_logits=True).shape == (3, model.num_features)
        assert isinstance(model.get_classifier(), nn.Linear) and model.get_classifier().out_features == 10
        model.reset_classifier(0)
        assert isinstance(model.get_classifier(), nn.Identity) and model(x).shape == (3, model.num_features)
        model.reset_classifier(7)
        assert model(x).shape == (3, 7) and model.num_classes == 7
    assert timm.create_model(name).num_classes == 100  # CIFAR-100 by default
    with pytest.raises(RuntimeError, match="no pretrained weights"):
        timm.create_model(name, pretrained=True)


@pytest.mark.parametrize("name", ONE_PER_FAMILY + ["cifar_resnet50"])
@pytest.mark.parametrize("small_input_stem", [None, True])
def test_kdzoo_leaves_the_cifar_stem_alone(nets, name, small_input_stem):
    """At 32 px kdzoo swaps ImageNet ResNet stems for CIFAR ones; these nets have one already."""
    reference = nets[name]
    model = create_model(name, 100, 32, small_input_stem)
    assert parameter_count(model) == parameter_count(reference)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert model.feature_info == reference.feature_info
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]


def test_initialisation_follows_the_reference(nets):
    """Kaiming-normal (fan_out) convs; BN 1/0 everywhere (no zero-init of a last BN); the
    classifier: PyTorch's default for the ResNets, zero bias for WRN, N(0, 0.01) + zero bias
    for VGG and MobileNetV2."""
    conv = nets["cifar_resnet32x4"].layer3[1].conv1  # 256×256×3×3: the sample std is tight
    assert conv.weight.std().item() == pytest.approx((2 / (9 * 256)) ** 0.5, rel=0.02)
    conv = nets["cifar_vgg13"].block3[0]
    assert conv.weight.std().item() == pytest.approx((2 / (9 * 512)) ** 0.5, rel=0.02)
    assert conv.bias.abs().max() == 0
    for name in ("cifar_resnet56", "cifar_wrn_40_2", "cifar_vgg8", "cifar_mobilenetv2", "cifar_resnet50"):
        for m in nets[name].modules():
            if isinstance(m, nn.BatchNorm2d):
                assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    for name in ("cifar_vgg19", "cifar_mobilenetv2"):
        head = nets[name].get_classifier()
        assert head.weight.std().item() == pytest.approx(0.01, rel=0.05) and head.bias.abs().max() == 0
    assert nets["cifar_wrn_40_2"].get_classifier().bias.abs().max() == 0
    assert nets["cifar_resnet8"].get_classifier().bias.abs().max() > 0  # PyTorch's uniform default


def test_hooks_command_lists_the_stages(capsys):
    from kdzoo.cli import main

    assert main(["hooks", "--model", "cifar_wrn_16_2", "--input-size", "32"]) == 0
    out = capsys.readouterr().out
    for line in ("block1", "block3", "128×8×8", "fc (input)"):
        assert line in out


def test_kd_run_end_to_end_with_cifar_student_and_teacher(tmp_path):
    from kdzoo.cli import main

    assert main(["run", "--method", "kd", "--model", "cifar_resnet8", "--teacher", "cifar_resnet14",
                 "--input-size", "32", "--train-size", "32", "--test-size", "16", "--batch-size", "8",
                 "--epochs", "1", "--max-steps", "2", "--device", "cpu", "--teacher-epochs", "1",
                 "--output", str(tmp_path)]) == 0


def test_a_repdistiller_checkpoint_loads_as_a_teacher(tmp_path):
    """RepDistiller saves {"epoch", "model": state_dict, "best_acc", "optimizer"}; kdzoo reads it as it is."""
    from kdzoo.models import load_weights

    torch.manual_seed(0)
    source = create_model("cifar_resnet8", 100, 32)
    optimizer = torch.optim.SGD(source.parameters(), lr=0.05, momentum=0.9)
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": source.state_dict(), "best_acc": torch.tensor(70.1),
                "optimizer": optimizer.state_dict()}, path)
    target = create_model("cifar_resnet8", 100, 32)
    load_weights(target, str(path), "teacher checkpoint")
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name
