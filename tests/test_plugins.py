"""User methods: the example in docs/writing-a-method.md, loaded with --plugin, lists and trains."""

import re
from pathlib import Path

import pytest

from kdzoo.cli import main
from kdzoo.errors import UserError
from kdzoo.registry import load_plugin, register_method

from .conftest import tiny_args

DOC = Path(__file__).resolve().parents[1] / "docs" / "writing-a-method.md"


def _doc_example() -> str:
    return re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)


def test_doc_example_registers_lists_and_trains(tmp_path, capsys):
    plugin = tmp_path / "my_method.py"
    plugin.write_text(_doc_example())
    assert main(["list", "methods", "--plugin", str(plugin)]) == 0
    assert "my_attention" in capsys.readouterr().out
    code = main(tiny_args(tmp_path, "--plugin", str(plugin), "--method", "my_attention", "--teacher", "test_resnet",
                          "--teacher-epochs", "1", "--set", "beta=500"))
    assert code == 0
    out = capsys.readouterr().out
    assert "done" in out
    metrics = next((tmp_path / "runs").glob("shapes_my_attention_*/metrics.csv")).read_text()
    assert "train_at" in metrics and "train_ce" in metrics


def test_plugin_errors_are_one_line_exit_2(tmp_path, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("def oops(:\n")
    assert main(["list", "methods", "--plugin", str(broken)]) == 2
    assert "syntax error at line 1" in capsys.readouterr().err
    clash = tmp_path / "clash.py"
    clash.write_text("from kdzoo import Method, register_method\n"
                     "@register_method('kd')\nclass Mine(Method):\n    def loss(self, out):\n        return {}\n")
    assert main(["list", "methods", "--plugin", str(clash)]) == 2
    assert "'kd' is already taken" in capsys.readouterr().err
    assert main(["list", "methods", "--plugin", str(tmp_path / "missing.py")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_register_requires_a_method_subclass():
    with pytest.raises(UserError, match="subclass of kdzoo.Method"):
        register_method("not_a_method")(object)
    with pytest.raises(UserError):
        load_plugin("no_such_module_for_kdzoo")
