"""Logit standardisation (Sun et al., CVPR 2024) and what the logit methods share: the z-score,
the switch with its companion defaults, the per-dataset defaults and the temperature hook."""

from __future__ import annotations

import math

import pytest
import torch

from kdzoo.build import validate
from kdzoo.config import RunConfig
from kdzoo.losses import standardize_logits
from kdzoo.method import NetOutputs, StepOutputs
from kdzoo.registry import get_method


def _zscore_reference(row: list[float], eps: float) -> list[float]:
    """Mean and the unbiased standard deviation by explicit sums, float64."""
    n = len(row)
    mean = sum(row) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (n - 1))
    return [(v - mean) / (std + eps) for v in row]


def test_standardize_logits_is_the_unbiased_z_score_with_eps_on_the_std():
    torch.manual_seed(0)
    z = torch.randn(5, 7, dtype=torch.float64) * 4 + 2
    got = standardize_logits(z, eps=1e-7).double()
    want = torch.tensor([_zscore_reference(row, 1e-7) for row in z.tolist()], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    constant = torch.full((2, 4), 3.0)  # std 0: eps keeps it finite (zeros), not NaN
    assert torch.equal(standardize_logits(constant), torch.zeros(2, 4))


def test_standardize_logits_uses_the_class_axis_of_dense_logits():
    torch.manual_seed(1)
    dense = torch.randn(2, 5, 3, 4)
    per_pixel = standardize_logits(dense.permute(0, 2, 3, 1).reshape(-1, 5))
    torch.testing.assert_close(standardize_logits(dense).permute(0, 2, 3, 1).reshape(-1, 5), per_pixel)


# Official numbers: sunshangquan/logit-standardization-KD @ f6e5aa5172bad618e801163c3385322eea673754,
# mdistiller/distillers/KD.py `kd_loss(logits_student, logits_teacher, temperature, logit_stand)`,
# run outside kdzoo on torch.manual_seed(0); s = randn(6, 10, float64) * 3; t = randn(6, 10, float64) * 5 + 1.
OFFICIAL_KD = {(2.0, True): 0.7023058174563022, (4.0, True): 0.7245765033864769, (4.0, False): 8.443704596592369}
OFFICIAL_Z_ROW0 = [-1.5084694142684831, 0.2167418253425496, -0.39559566923097056, 1.4393048588779305]


def _fixed_logits():
    torch.manual_seed(0)
    s = torch.randn(6, 10, dtype=torch.float64) * 3
    t = torch.randn(6, 10, dtype=torch.float64) * 5 + 1
    return s, t


@pytest.mark.parametrize("temperature,standardize", list(OFFICIAL_KD))
def test_kd_with_logit_standardization_equals_the_official_code(temperature, standardize):
    s, t = _fixed_logits()
    kd = get_method("kd")(get_method("kd").Config(temperature=temperature, ce_weight=0.0, kd_weight=1.0,
                                                  logit_standardize=standardize))
    out = StepOutputs(student=NetOutputs(s), teacher=NetOutputs(t), targets=torch.zeros(6, dtype=torch.long))
    assert kd.loss(out)["kd"].item() == pytest.approx(OFFICIAL_KD[(temperature, standardize)], rel=1e-5)
    torch.testing.assert_close(standardize_logits(s)[0, :4].double(), torch.tensor(OFFICIAL_Z_ROW0, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)


def _config(method: str, *sets: tuple[str, object], **run) -> object:
    cfg = RunConfig(method=method, teacher="resnet34", method_settings=dict(sets), **run)
    return validate(cfg).config


def test_kd_defaults_follow_the_dataset_the_task_and_the_switch():
    assert (_config("kd").temperature, _config("kd").ce_weight, _config("kd").kd_weight) == (4.0, 0.1, 0.9)
    imagenet = _config("kd", dataset="imagefolder")  # mdistiller configs/imagenet/r34_r18/kd.yaml
    assert (imagenet.temperature, imagenet.ce_weight, imagenet.kd_weight) == (1.0, 0.5, 0.5)
    ls = _config("kd", ("logit_standardize", True))  # the LS repo's tools/train.py: τ = base_temp 2, weight 9
    assert (ls.temperature, ls.ce_weight, ls.kd_weight, ls.logit_standardize) == (2.0, 0.1, 9.0, True)
    assert _config("kd", ("logit_standardize", False)).temperature == 4.0
    assert _config("kd", ("logit_standardize", "true")).kd_weight == 9.0  # as --set gives it: a string
    assert _config("kd", ("logit_standardize", "false")).kd_weight == 0.9
    mine = _config("kd", ("logit_standardize", True), ("temperature", 3.0))  # --set wins over every default
    assert (mine.temperature, mine.kd_weight) == (3.0, 9.0)
    seg = _config("kd", task="seg")
    assert (seg.temperature, seg.ce_weight) == (1.0, 1.0)


def test_a_step_temperature_replaces_the_configured_one_and_carries_its_gradient():
    s, t = _fixed_logits()
    kd = get_method("kd")(get_method("kd").Config(ce_weight=0.0, kd_weight=1.0))
    out = StepOutputs(student=NetOutputs(s), teacher=NetOutputs(t), targets=torch.zeros(6, dtype=torch.long))
    tau = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    kd.step_temperature = tau
    learned = kd.loss(out)["kd"]
    learned.backward()
    assert tau.grad is not None and tau.grad.abs() > 0
    kd.step_temperature = None
    fixed_at_2 = get_method("kd")(get_method("kd").Config(temperature=2.0, ce_weight=0.0, kd_weight=1.0)).loss(out)["kd"]
    assert learned.item() == pytest.approx(fixed_at_2.item(), rel=1e-6)
    assert kd.loss(out)["kd"].item() != pytest.approx(fixed_at_2.item(), rel=1e-3)  # back to τ = 4
