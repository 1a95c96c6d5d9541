"""Taps on real timm families; hooks removed on exit and on error; nothing outlives a step."""

import gc
import weakref

import pytest
import torch

from kdzoo.errors import UserError
from kdzoo.hooks import FeatureTaps, preact_is_stage_output, resolve_taps
from kdzoo.models import create_model, model_info


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name,size,first_stage,n_stages", [
    ("resnet18", 32, "layer1", 4),
    ("resnet34", 32, "layer1", 4),
    ("resnet50", 32, "layer1", 4),
    ("mobilenetv3_small_100", 64, "blocks.0", 4),
    ("efficientnet_b0", 64, "blocks.1", 4),
    ("convnext_atto", 64, "stages.0", 4),
    ("vit_tiny_patch16_224", 32, "blocks.0", 12),
])
def test_stage_and_embedding_taps_on_timm_families(name, size, first_stage, n_stages):
    model = create_model(name, 10, size)
    points = {p.name: p for p in resolve_taps(model, ["stages", "embedding"])}
    assert points["stage1"].module == first_stage
    assert len([k for k in points if k.startswith("stage")]) == n_stages
    info = model_info(model, name, 10, size)
    for stage in info.stage_names:
        assert len(info.shapes[stage]) == 3, "stage taps are (C, H, W) maps, ViT tokens included"
    assert info.shapes["logits"] == (10,)
    # the embedding is what enters the classifier: its width is the classifier's in_features
    assert info.embedding_dim == model.get_classifier().in_features
    # one forward pass gives logits and features together
    with FeatureTaps(model, ["stages", "embedding"]) as taps:
        logits = model.eval()(torch.randn(2, 3, size, size))
        feats = taps.pop()
    assert logits.shape == (2, 10)
    assert torch.allclose(model.get_classifier()(feats["embedding"]), logits, atol=1e-5)


def test_small_input_stem_keeps_resolution():
    on = model_info(create_model("resnet18", 10, 32), "resnet18", 10, 32)
    off = model_info(create_model("resnet18", 10, 32, small_input_stem=False), "resnet18", 10, 32)
    assert on.shapes["stage1"] == (64, 32, 32)
    assert off.shapes["stage1"] == (64, 8, 8)
    assert on.shapes["stage4"] == (512, 4, 4)


def test_module_path_taps_and_unknown_tap():
    model = create_model("resnet18", 10, 32)
    with FeatureTaps(model, ["layer3.1.conv2", "logits"]) as taps:
        model(torch.randn(2, 3, 32, 32))
        assert taps.pop()["layer3.1.conv2"].shape == (2, 256, 8, 8)
    with pytest.raises(UserError, match="layer3.1.conv2"):
        resolve_taps(model, ["layer3.1.conv"])
    with pytest.raises(UserError, match="stage1..stage4"):
        resolve_taps(model, ["stage9"])


def test_hooks_removed_on_exit_and_on_error():
    model = create_model("test_resnet", 10, 16)
    before = _hook_count(model)
    with FeatureTaps(model, ["stages", "embedding"]):
        assert _hook_count(model) == before + 5
    assert _hook_count(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureTaps(model, ["stages", "embedding"]):
            model(torch.randn(2, 3, 16, 16))
            raise RuntimeError("boom")
    assert _hook_count(model) == before


def test_captured_features_do_not_outlive_the_step():
    """200 training steps: the store is empty after each pop and old features are freed."""
    torch.manual_seed(0)
    model = create_model("test_resnet", 10, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    refs = []
    with FeatureTaps(model, ["stages", "embedding"]) as taps:
        for step in range(200):
            logits = model(torch.randn(4, 3, 16, 16))
            feats = taps.pop()
            assert len(taps) == 0 and len(feats) == 5
            loss = logits.logsumexp(1).mean() + sum(f.float().pow(2).mean() for f in feats.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            refs.append([weakref.ref(f) for f in feats.values()])
            del feats, logits, loss
            if step % 50 == 49:
                gc.collect()
                alive = sum(r() is not None for step_refs in refs for r in step_refs)
                assert alive == 0, f"{alive} captured tensors still alive after step {step}"


# -- pre-activation stage taps (ReviewKD's teacher features, RepDistiller's preact=True) --------

def _last_block_input(model, path):
    """The input of the stage's last block, captured by a hook of the test's own."""
    seen = {}
    handle = model.get_submodule(path).register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].clone()))
    return seen, handle


@pytest.mark.parametrize("name,act", [("resnet18", "act2"), ("resnet50", "act3"), ("test_resnet", None),
                                      ("cifar_resnet8x4", "act2"), ("cifar_resnet50", "act3")])
def test_preact_taps_of_residual_networks_are_the_residual_sum_before_the_relu(name, act):
    torch.manual_seed(0)
    model = create_model(name, 10, 32, zero_init_last=False).eval()  # timm's zero init makes the sum ≥ 0 at first
    stages = resolve_taps(model, ["stages"])
    preact = resolve_taps(model, ["preact_stages"])
    assert [p.name for p in preact] == [f"preact_stage{i}" for i in range(1, len(stages) + 1)]
    for point, stage in zip(preact, stages):
        assert point.clone and point.kind == "input" and point.module.startswith(stage.module + ".")
        if act:
            assert point.module.endswith("." + act)
    # the value: recompute the last block of every stage from its input, without its final ReLU
    last_blocks = [p.module.rpartition(".")[0] for p in preact]
    captures = [_last_block_input(model, path) for path in last_blocks]
    with FeatureTaps(model, ["stages", "preact_stages"]) as taps, torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        features = taps.pop()
    for (seen, handle), path, i in zip(captures, last_blocks, range(1, len(stages) + 1)):
        handle.remove()
        block, x = model.get_submodule(path), seen["x"]
        with torch.no_grad():
            if hasattr(block, "conv3"):
                out = block.bn3(block.conv3(torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x))))))))
            else:
                out = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
            short = getattr(block, "downsample", None) or getattr(block, "shortcut", None)
            expected = out + (short(x) if short is not None else x)
        pre, post = features[f"preact_stage{i}"], features[f"stage{i}"]
        assert pre.shape == post.shape == expected.shape
        assert torch.allclose(pre, expected, atol=1e-5)
        assert (pre < 0).any(), "the copy is taken before the in-place ReLU overwrites it"
        assert torch.equal(torch.relu(pre), post)
    assert _hook_count(model) == 0


def test_preact_taps_of_the_cifar_wrn_vgg_and_fallbacks():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    # WRN: the next block's bn1 (the final bn1 after the last stage) applied to the raw stage sum
    wrn = create_model("cifar_wrn_16_2", 10, 32).eval()
    assert [p.module for p in resolve_taps(wrn, ["preact_stages"])] == ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"]
    with FeatureTaps(wrn, ["stages", "preact_stages"]) as taps, torch.no_grad():
        wrn(x)
        f = taps.pop()
        bns = [wrn.block2.layer[0].bn1, wrn.block3.layer[0].bn1, wrn.bn1]
        for i, bn in enumerate(bns, start=1):
            assert torch.allclose(f[f"preact_stage{i}"], bn(f[f"stage{i}"]), atol=1e-6)
            assert (f[f"preact_stage{i}"] < 0).any()
    # VGG: the input of the block's closing ReLU
    vgg = create_model("cifar_vgg8", 10, 32).eval()
    with FeatureTaps(vgg, ["stages", "preact_stages"]) as taps, torch.no_grad():
        vgg(x)
        f = taps.pop()
    assert resolve_taps(vgg, ["preact_stage1"])[0].module == "block1.2"
    for i in range(1, 5):
        assert (f[f"preact_stage{i}"] < 0).any() and torch.equal(torch.relu(f[f"preact_stage{i}"]), f[f"stage{i}"])
    # no pre-activation point: the stage output itself, marked as such
    for name, size in (("test_vit", 32), ("test_convnext", 32), ("cifar_shufflenet_v1", 32)):
        model = create_model(name, 10, size).eval()
        assert all(preact_is_stage_output(model))
        with FeatureTaps(model, ["stages", "preact_stages"]) as taps, torch.no_grad():
            model(torch.randn(2, 3, size, size))
            f = taps.pop()
        stages = [k for k in f if k.startswith("stage")]
        assert stages and all(torch.equal(f["preact_" + k], f[k]) for k in stages)
        assert _hook_count(model) == 0
    assert not any(preact_is_stage_output(create_model("resnet18", 10, 32)))


def test_preact_tap_passes_gradients_in_training_and_unknown_index_is_refused():
    torch.manual_seed(0)
    model = create_model("resnet18", 10, 32, zero_init_last=False).train()
    with FeatureTaps(model, ["preact_stage2"]) as taps:
        model(torch.randn(2, 3, 32, 32))
        pre = taps.pop()["preact_stage2"]
        pre.pow(2).mean().backward()  # the in-place ReLU after the tap must not break autograd
    assert model.layer2[-1].conv2.weight.grad.abs().sum() > 0
    assert model.layer3[0].conv1.weight.grad is None  # later layers are not on the path
    assert _hook_count(model) == 0
    with pytest.raises(UserError, match="preact_stage1..preact_stage4"):
        resolve_taps(model, ["preact_stage5"])


def test_hooks_command_lists_the_preact_taps(capsys):
    from kdzoo.cli import main

    assert main(["hooks", "--model", "resnet18", "--input-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "preact_stage4" in out and "layer4.1.act2" in out
    assert main(["hooks", "--model", "test_vit", "--input-size", "32"]) == 0
    assert "= stage1" in capsys.readouterr().out
