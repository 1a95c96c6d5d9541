"""Taps on real timm families; hooks removed on exit and on error; nothing outlives a step."""

import gc
import weakref

import pytest
import torch

from kdzoo.errors import UserError
from kdzoo.hooks import FeatureTaps, resolve_taps
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
