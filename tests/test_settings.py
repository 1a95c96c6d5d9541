from dataclasses import dataclass
from typing import Literal

import pytest

from kdzoo.errors import UserError
from kdzoo.settings import apply_overrides, parse_assignments


@dataclass
class Cfg:
    temperature: float = 4.0
    layers: list[int] | None = None
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    steps: int = 3


def test_string_overrides_are_typed():
    cfg = apply_overrides(Cfg(), parse_assignments(["temperature=2", "layers=1,3", "mode=b", "flag=true", "steps=7"]), "m")
    assert cfg == Cfg(temperature=2.0, layers=[1, 3], mode="b", flag=True, steps=7)
    assert apply_overrides(Cfg(), {"layers": "none"}, "m").layers is None


def test_unknown_key_names_valid_keys_and_close_match():
    with pytest.raises(UserError) as e:
        apply_overrides(Cfg(), {"temperatur": "3"}, "method 'kd'")
    msg = str(e.value)
    assert "temperatur" in msg and "Did you mean: temperature" in msg and "steps" in msg


@pytest.mark.parametrize("key,value", [("temperature", "hot"), ("steps", "2.5"), ("flag", "maybe"), ("mode", "c")])
def test_wrong_type_is_an_error(key, value):
    with pytest.raises(UserError, match=key):
        apply_overrides(Cfg(), {key: value}, "m")


def test_malformed_assignment():
    with pytest.raises(UserError, match="key=value"):
        parse_assignments(["temperature"])
