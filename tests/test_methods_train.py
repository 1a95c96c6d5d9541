"""One short end-to-end run per built-in method: the training loss falls, every loss term has its
column in metrics.csv, and the extra trained parameters are what the method says."""

import math

import pytest

from .conftest import train_and_read

# method, run overrides, loss-term columns, extra parameters (">0" or "==0"), columns that must fall too
CASES = [
    ("baseline", {"teacher": None, "teacher_epochs": None}, {"ce"}, "==0", ()),
    ("kd", {}, {"ce", "kd"}, "==0", ()),
    ("ccd", {}, {"ce", "kd"}, "==0", ()),
    ("kd_jda", {}, {"ce", "kd"}, "==0", ()),
    # FRSKD teaches itself: no teacher; its self-teacher is the extra trained part
    ("frskd", {"teacher": None, "teacher_epochs": None, "test_size": 32}, {"ce", "ce_self", "kd", "att"}, ">0", ()),
    ("lakd", {}, {"ce", "att", "lf"}, "==0", ()),  # same-width teacher: identity adapters
    ("nfd", {}, {"ce", "nfd"}, ">0", ("nfd",)),  # the 1×1 adapter is trained with the student
    ("rkd", {}, {"ce", "distance", "angle"}, "==0", ()),  # the alias of relational_kd
]


@pytest.mark.parametrize("method,overrides,terms,extra,falling", CASES, ids=[c[0] for c in CASES])
def test_short_run_lowers_the_loss(tmp_path, quiet_console, method, overrides, terms, extra, falling):
    result, rows = train_and_read(tmp_path, quiet_console, method=method, **overrides)
    assert len(rows) == 3
    assert result["complete"] and math.isfinite(result["final_train_loss"])
    assert {f"train_{t}" for t in terms} <= set(rows[0])
    for column in ("loss", *falling):
        assert float(rows[-1][f"train_{column}"]) < float(rows[0][f"train_{column}"]), column
    if extra == ">0":
        assert result["extra_params_m"] > 0
    else:
        assert result["extra_params_m"] == 0
