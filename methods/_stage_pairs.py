"""Which student stage is compared with which teacher stage: the layer settings of FitNet, AT and SP.

RepDistiller indexes each network's ``is_feat`` list (``feat[0]`` the stem, ``feat[1..N]`` the
stages, ``feat[-1]`` the pooled vector); kdzoo's stage taps are ``feat[1..N]`` under the names
``stage1``…``stageN`` on any timm model, so a layer is written as

- ``stageK``: stage K of both networks (FitNet's ``--hint_layer 2`` is ``stage2``);
- ``last``: each network's deepest stage (RepDistiller's ``feat[-2]``, what SP distils);
- ``S:T``: student layer S with teacher layer T, each ``stageK`` or ``last``.

A setting names the layers before the networks are known; :func:`tap_names` gives the taps to
measure, :func:`resolve` the concrete stage once :meth:`Method.setup` sees the shapes.
"""

from __future__ import annotations

import re

from kdzoo.errors import UserError

_STAGE = re.compile(r"^stage(\d+)$")


def parse_pair(method: str, spec: str) -> tuple[str, str]:
    """``"stage2"`` → ("stage2", "stage2"); ``"last:stage4"`` → ("last", "stage4")."""
    student, sep, teacher = spec.strip().partition(":")
    student, teacher = student.strip(), teacher.strip()
    if not sep:
        teacher = student
    for name in (student, teacher):
        if name != "last" and not _STAGE.match(name):
            raise UserError(
                f"method {method!r}: layer {spec!r} is not understood; use 'stageK' (the same stage on both "
                "networks), 'last' (the deepest stage) or 'STUDENT:TEACHER' such as 'stage3:stage4'"
            )
    return student, teacher


def tap_names(names: list[str]) -> list[str]:
    """The stage taps to measure for these layer names (``last`` needs every stage)."""
    if "last" in names:
        return ["stages"]
    return sorted(set(names), key=lambda k: int(k[5:]))


def resolve(method: str, name: str, info, side: str) -> str:
    """A concrete stage of one network, checked against its measured shapes."""
    stages = info.stage_names
    if not stages:
        raise UserError(f"method {method!r} needs stage taps, but {side} {info.name} has no timm feature_info stages")
    if name == "last":
        return stages[-1]
    if name not in stages:
        raise UserError(f"method {method!r}: {side} {info.name} has no {name}; it has {stages[0]}..{stages[-1]}")
    return name


def resolve_pair(method: str, pair: tuple[str, str], student, teacher) -> tuple[str, str]:
    return resolve(method, pair[0], student, "student"), resolve(method, pair[1], teacher, "teacher")
