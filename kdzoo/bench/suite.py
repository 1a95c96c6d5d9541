"""Benchmark suites: a TOML file that expands into a list of runs (cells).

```toml
name = "quick"                 # optional: default the file's stem
output = "runs/bench/quick"    # optional: default runs/bench/<name>; --output wins
plugins = ["my_method.py"]     # optional: user methods, as --plugin

[defaults]                     # any `kdzoo run` setting (RunConfig field), for every cell
dataset = "shapes"
epochs = 2

[set.kd]                       # method hyperparameters (as --set) for every cell of method kd
temperature = 4.0

[[grid]]                       # one or more grids; each is a product of its list-valued axes
methods = ["baseline", "kd"]
models = ["resnet18"]          # students
teachers = ["resnet34"]        # ignored by methods that need no teacher (one cell, no teacher)
teacher_cache = true           # optional: the cells whose method reads only teacher logits use it
datasets = ["shapes"]
seeds = [0, 1]
lr = 0.01                      # any other run setting overrides [defaults] for this grid
[grid.set.kd]                  # method hyperparameters for this grid only (win over [set.kd])
kd_weight = 0.5
```

An axis that is left out takes its one value from the grid's or the defaults' scalar setting
(``model = "resnet18"``), else from ``RunConfig``'s default. Names are checked here only where
the expansion needs them (methods: whether they take a teacher); an unknown model or dataset
is the failure of that cell when it runs, not of the whole suite.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..build import cache_refusal, identify
from ..config import RunConfig, refuse_computed
from ..errors import UserError, close_matches, missing
from ..registry import get_method, load_plugin
from ..settings import apply_overrides, load_toml

AXES = {"methods": "method", "models": "model", "teachers": "teacher", "datasets": "dataset", "seeds": "seed"}
TOP_LEVEL = ("name", "description", "output", "plugins", "defaults", "set", "grid")
# set per cell by the suite itself, never in [defaults] or a grid
_RESERVED = {"output": "put `output` at the top of the suite (or pass --output)",
             "run_name": "cells are named by their settings",
             "method_settings": "use [set.<method>] or [grid.set.<method>] tables"}
RUN_KEYS = [f.name for f in dataclasses.fields(RunConfig) if f.name not in _RESERVED]


@dataclass
class Suite:
    name: str
    path: Path
    output: str
    cells: list[RunConfig]
    plugins: list[str] = field(default_factory=list)
    description: str = ""


def cell_id(cfg: RunConfig) -> str:
    """The run id the engine gives this cell (its settings resolved against the dataset's recipe)."""
    try:
        return identify(cfg).run_id()
    except UserError:  # unknown dataset: the cell will fail; it still needs a stable name
        return cfg.run_id()


def load_suite(path: str | Path, output: str | None = None, teacher_cache: bool = False) -> Suite:
    """Read and expand a suite file (every mistake in it is a one-line UserError); ``teacher_cache``
    sets ``teacher_cache = true`` in its [defaults] (``kdzoo bench --teacher-cache``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{missing('suite file', path)}; pass a TOML suite such as benchmarks/quick.toml")
    data = load_toml(path)
    where = f"suite {path.name}"
    _check_keys(data, TOP_LEVEL, where)
    name = _string(data.get("name", path.stem), "name", where)
    plugins = _string_list(data.get("plugins", []), "plugins", where)
    if plugins:

        for plugin in plugins:
            load_plugin(plugin)
    if teacher_cache:
        data = {**data, "defaults": {**_table(data.get("defaults", {}), "[defaults]", where), "teacher_cache": True}}
    cells = expand(data, where)
    out = output or _string(data.get("output", f"runs/bench/{name}"), "output", where)
    cells = [dataclasses.replace(c, output=out) for c in cells]
    description = data.get("description", "")
    if not isinstance(description, str):
        raise UserError(f"{where}: description must be a string, got {description!r}")
    return Suite(name, path, out, cells, plugins, description)


def expand(data: dict[str, Any], where: str = "suite") -> list[RunConfig]:
    """The cells of a parsed suite, in file order, without duplicates (same run id)."""
    defaults = _table(data.get("defaults", {}), "[defaults]", where)
    _check_keys(defaults, RUN_KEYS, f"{where} [defaults]")
    suite_sets = _method_sets(data.get("set", {}), f"{where} [set]")
    grids = data.get("grid")
    if not isinstance(grids, list) or not grids or not all(isinstance(g, dict) for g in grids):
        raise UserError(f"{where} has no [[grid]] table; add at least one, e.g. [[grid]] methods = [\"baseline\"]")
    cells: dict[str, RunConfig] = {}
    used_methods: set[str] = set()
    for number, grid in enumerate(grids, 1):
        gwhere = f"{where} [[grid]] #{number}"
        _check_keys(grid, [*AXES, "set", *RUN_KEYS], gwhere)
        scalars = {k: v for k, v in grid.items() if k in RUN_KEYS}
        for axis, key in AXES.items():
            if axis in grid and key in scalars:
                raise UserError(f"{gwhere} gives both {axis!r} and {key!r}; keep one")
        refuse_computed({**defaults, **scalars}, gwhere)
        base = apply_overrides(RunConfig(), {**defaults, **scalars}, gwhere)
        axes = {axis: _axis(grid[axis], axis, gwhere) if axis in grid else [getattr(base, key)] for axis, key in AXES.items()}
        grid_sets = _method_sets(grid.get("set", {}), f"{gwhere} [grid.set]")
        methods = [_method_class(m, gwhere) for m in axes["methods"]]
        names = [cls.name for cls in methods]
        for method in grid_sets:
            if method not in names:
                raise UserError(f"{gwhere} has [grid.set.{method}] but does not run {method!r} (methods: {', '.join(names)})")
        used_methods.update(names)
        for dataset, model, cls, seed in itertools.product(axes["datasets"], axes["models"], methods, axes["seeds"]):
            teachers = axes["teachers"] if cls.needs_teacher else [None]
            settings = {**suite_sets.get(cls.name, {}), **grid_sets.get(cls.name, {})}
            apply_overrides(cls.Config(), settings, f"{gwhere}: method {cls.name!r}")  # checks keys and types now
            for teacher in teachers:
                cfg = apply_overrides(base, {"method": cls.name, "model": model, "dataset": dataset, "seed": seed,
                                             "teacher": teacher}, gwhere)
                if not cls.needs_teacher:  # as the engine does: a teacherless method runs without one
                    cfg = dataclasses.replace(cfg, teacher_checkpoint=None, teacher_pretrained=False)
                cfg = dataclasses.replace(cfg, method_settings=settings)
                if cfg.teacher_cache and _cache_refusal(cls, settings, cfg, gwhere):
                    cfg = dataclasses.replace(cfg, teacher_cache=False)  # the cache is for the cells it can serve
                try:  # a value no run can use (lr = -1, max_steps = 0) fails the suite now, not each cell later
                    cfg.validate()
                except UserError as e:
                    raise UserError(f"{gwhere}: {e}") from None
                cells.setdefault(cell_id(cfg), cfg)
    for method in suite_sets:
        if method not in used_methods:
            raise UserError(f"{where} has [set.{method}] but no grid runs {method!r}")
    return list(cells.values())


def _cache_refusal(cls, settings: dict[str, Any], cfg: RunConfig, where: str) -> str | None:
    """Why ``teacher_cache = true`` cannot serve this cell (its method reads features or builds
    its own views, or the task is seg); such cells run without the cache rather than fail."""
    return cache_refusal(cls(apply_overrides(cls.Config(), settings, f"{where}: method {cls.name!r}")), cfg.task)


# -- checks ----------------------------------------------------------------------------------
def _check_keys(table: dict[str, Any], valid, where: str) -> None:
    for key in table:
        if key in _RESERVED and key not in valid:
            raise UserError(f"{where}: {key!r} cannot be set here ({_RESERVED[key]}); valid keys: {', '.join(valid)}")
        if key not in valid:
            raise UserError(f"{where} has no key {key!r}.{close_matches(key, valid)} Valid keys: {', '.join(valid)}")


def _table(value: Any, name: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UserError(f"{where}: {name} must be a table, got {value!r}")
    return value


def _string(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise UserError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return value


def _string_list(value: Any, key: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise UserError(f"{where}: {key} must be a list of strings, e.g. {key} = [\"a\", \"b\"], got {value!r}")
    return value


def _axis(value: Any, axis: str, where: str) -> list:
    if axis == "seeds":
        if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise UserError(f"{where}: seeds must be a non-empty list of integers, e.g. seeds = [0, 1], got {value!r}")
        return value
    if not value:
        raise UserError(f"{where}: {axis} must be a non-empty list of names, got {value!r}")
    return _string_list(value, axis, where)


def _method_class(name: str, where: str):
    try:
        return get_method(name)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _method_sets(value: Any, where: str) -> dict[str, dict[str, Any]]:
    """``{method: {setting: value}}`` with aliases resolved to the method's name."""
    table = _table(value, "set", where)
    out: dict[str, dict[str, Any]] = {}
    for method, settings in table.items():
        cls = _method_class(method, where)
        out[cls.name] = {**out.get(cls.name, {}), **_table(settings, f"set.{method}", where)}
    return out
