"""Every built-in method, from the CLI, on three student families and across families.

The taps resolve by name on each timm model, so a method written against ResNet stage maps must
also run on an EfficientNet (MBConv blocks, stage1 = blocks.1), a ConvNeXt (NHWC-free stages)
and a ViT (token grids reshaped to maps), with teachers of another family. timm's tiny
``test_*`` models keep this to seconds; `benchmarks/method_matrix.py` runs the same matrix on
the full-size models.
"""

import json
import math

import pytest

from kdzoo.cli import main
from kdzoo.registry import get_method, method_names

STUDENTS = ["test_resnet", "test_efficientnet", "test_convnext"]
# (teacher, student): resnet → mobile and convnext → ViT, both across families
CROSS = [("test_resnet", "test_efficientnet"), ("test_convnext", "test_vit")]
BUILT_IN = ["baseline", "kd", "relational_kd", "nfd", "lakd", "ccd", "kd_jda", "frskd",
            "dkd", "dist", "nkd", "mlkd", "ctkd", "sdd", "wttm", "ofa", "vid", "crd", "reviewkd",
            "fitnet", "at", "sp", "pkt"]


def test_the_matrix_covers_every_built_in_method():
    assert set(BUILT_IN) <= set(method_names())


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    return tmp_path_factory.mktemp("matrix")  # shared, so each teacher is trained once


def _run(output, method, student, teacher):
    args = ["run", "--method", method, "--model", student, "--input-size", "32", "--train-size", "32",
            "--test-size", "16", "--batch-size", "8", "--epochs", "1", "--max-steps", "2", "--device", "cpu",
            "--optimizer", "sgd", "--lr", "0.05", "--teacher-epochs", "1", "--output", str(output),
            "--run-name", f"{method}-{teacher}-{student}"]
    if get_method(method).needs_teacher:
        args += ["--teacher", teacher]
    assert main(args) == 0
    result = json.loads((output / f"{method}-{teacher}-{student}" / "result.json").read_text())
    assert result["complete"] and result["steps"] == 2
    assert math.isfinite(result["final_train_loss"])
    return result


@pytest.mark.parametrize("student", STUDENTS)
@pytest.mark.parametrize("method", BUILT_IN)
def test_method_runs_on_student_family(output, method, student):
    _run(output, method, student, "test_resnet")


@pytest.mark.parametrize("teacher,student", CROSS, ids=[f"{t}-to-{s}" for t, s in CROSS])
@pytest.mark.parametrize("method", [m for m in BUILT_IN if get_method(m).needs_teacher])
def test_method_runs_across_families(output, method, teacher, student):
    result = _run(output, method, student, teacher)
    assert result["teacher"] == teacher
