"""Suite files: expansion into cells, and one-line errors for every malformed suite."""

import pytest

from kdzoo.bench.suite import cell_id, load_suite
from kdzoo.errors import UserError


def _suite(tmp_path, text, name="s.toml", **kwargs):
    path = tmp_path / name
    path.write_text(text)
    return load_suite(path, **kwargs)


def _cells(suite):
    return [(c.method, c.teacher, c.model, c.dataset, c.seed) for c in suite.cells]


def test_grid_is_a_product_and_teacherless_methods_ignore_the_teacher_axis(tmp_path):
    suite = _suite(tmp_path, """
[defaults]
epochs = 3
lr = 0.01
[[grid]]
methods = ["baseline", "kd", "frskd"]
models = ["resnet18", "mobilenetv3_small_100"]
teachers = ["resnet34", "resnet50"]
seeds = [0, 1]
""")
    cells = _cells(suite)
    # kd: 2 students x 2 teachers x 2 seeds; baseline and frskd: 2 students x 2 seeds, no teacher
    assert len(cells) == 8 + 4 + 4
    assert sum(1 for c in cells if c[0] == "kd") == 8
    assert {c[1] for c in cells if c[0] in ("baseline", "frskd")} == {None}
    assert {(c[1], c[2], c[4]) for c in cells if c[0] == "kd"} == {
        (t, s, seed) for t in ("resnet34", "resnet50") for s in ("resnet18", "mobilenetv3_small_100") for seed in (0, 1)}
    assert all(c.epochs == 3 and c.lr == 0.01 for c in suite.cells)
    assert len({cell_id(c) for c in suite.cells}) == len(cells)
    assert suite.name == "s" and suite.output == "runs/bench/s"


def test_grid_settings_override_defaults_and_method_settings_merge(tmp_path):
    suite = _suite(tmp_path, """
name = "named"
output = "somewhere"
[defaults]
epochs = 3
model = "resnet18"
teacher = "resnet34"
[set.kd]
temperature = 2.0
ce_weight = 0.5
[[grid]]
methods = ["kd", "rkd"]
seeds = [0]
[[grid]]
methods = ["kd"]
epochs = 7
[grid.set.kd]
temperature = 8.0
""", output="elsewhere")
    first_kd, rkd, second_kd = suite.cells
    assert (first_kd.method, first_kd.epochs, first_kd.method_settings) == ("kd", 3, {"temperature": 2.0, "ce_weight": 0.5})
    assert rkd.method == "relational_kd" and rkd.method_settings == {}  # aliases resolve to the method's name
    assert (second_kd.epochs, second_kd.method_settings) == (7, {"temperature": 8.0, "ce_weight": 0.5})
    assert first_kd.model == "resnet18" and first_kd.teacher == "resnet34"
    assert suite.name == "named" and suite.output == "elsewhere"  # --output wins over the suite's
    assert all(c.output == "elsewhere" for c in suite.cells)


def test_identical_cells_from_two_grids_run_once(tmp_path):
    suite = _suite(tmp_path, """
[[grid]]
methods = ["baseline"]
teachers = ["resnet34"]
[[grid]]
methods = ["baseline", "kd"]
teachers = ["resnet34", "resnet50"]
""")
    assert _cells(suite) == [("baseline", None, "resnet18", "shapes", 0), ("kd", "resnet34", "resnet18", "shapes", 0),
                             ("kd", "resnet50", "resnet18", "shapes", 0)]


def test_unknown_model_is_not_a_suite_error(tmp_path):
    """A bad model or dataset name fails its cell when it runs; the other cells still run."""
    suite = _suite(tmp_path, "[[grid]]\nmodels = [\"resnet81\"]\ndatasets = [\"nope\"]\n")
    assert _cells(suite) == [("baseline", None, "resnet81", "nope", 0)]


@pytest.mark.parametrize("text,needles", [
    ("[[grid]\nmethods = [1]", ["not valid TOML"]),
    ("[defaults]\nepochz = 3\n[[grid]]\n", ["no key 'epochz'", "Did you mean: epochs", "Valid keys:", "teacher_epochs"]),
    ("[[grid]]\nmodel = [\"a\"]\n", ["model expects a string"]),
    ("[[grid]]\nmethod = \"kd\"\nmethods = [\"kd\"]\n", ["gives both 'methods' and 'method'"]),
    ("[[grid]]\nmodelz = [\"a\"]\n", ["no key 'modelz'", "models", "Valid keys:"]),
    ("[[grid]]\nseeds = [\"0\"]\n", ["seeds must be a non-empty list of integers"]),
    ("[[grid]]\nseeds = []\n", ["seeds must be a non-empty list"]),
    ("[[grid]]\nmethods = \"kd\"\n", ["methods must be a list of strings"]),
    ("[[grid]]\nmethods = [\"kdd\"]\n", ["unknown method 'kdd'", "kd"]),
    ("[[grid]]\nepochs = \"many\"\n", ["epochs expects a int", "'many'"]),
    ("[defaults]\nepochs = 3\n", ["no [[grid]] table"]),
    ("titel = \"x\"\n[[grid]]\n", ["no key 'titel'", "Valid keys: name, description"]),
    ("[defaults]\noutput = \"x\"\n[[grid]]\n", ["'output' cannot be set here", "top of the suite"]),
    ("[[grid]]\nrun_name = \"x\"\n", ["'run_name' cannot be set here"]),
    ("[[grid]]\nmethods = [\"kd\"]\n[grid.set.kd]\ntemprature = 2\n", ["no setting 'temprature'", "temperature"]),
    ("[[grid]]\nmethods = [\"kd\"]\n[grid.set.kd]\ntemperature = \"hot\"\n", ["temperature expects a float"]),
    ("[[grid]]\nmethods = [\"kd\"]\n[grid.set.nfd]\nx = 1\n", ["does not run 'nfd'"]),
    ("[set.nfd]\nx = 1\n[[grid]]\nmethods = [\"kd\"]\n", ["[set.nfd] but no grid runs 'nfd'"]),
    ("[set]\nkd = 3\n[[grid]]\nmethods = [\"kd\"]\n", ["set.kd must be a table"]),
    ("name = 3\n[[grid]]\n", ["name must be a non-empty string"]),
])
def test_malformed_suites_are_one_line_user_errors(tmp_path, text, needles):
    with pytest.raises(UserError) as info:
        _suite(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_missing_suite_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_suite(tmp_path / "nope.toml")


def test_shipped_suites_expand(tmp_path):
    """benchmarks/*.toml load and expand to the cells their comments promise."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "benchmarks"
    quick = load_suite(root / "quick.toml")
    assert len(quick.cells) == 48
    assert {c.method for c in quick.cells} == {"baseline", "kd", "relational_kd", "nfd", "lakd", "ccd", "kd_jda", "frskd",
                                                "dkd", "dist", "nkd", "mlkd", "ctkd", "sdd", "wttm", "ofa", "fitnet",
                                                "at", "sp", "pkt", "vid", "crd", "reviewkd"}
    assert [c.method_settings for c in quick.cells if c.method == "kd"].count({"logit_standardize": True}) == 2
    cifar = load_suite(root / "cifar100.toml")
    assert all(c.dataset == "cifar100" and c.epochs == 240 and c.milestones == [150, 180, 210] for c in cifar.cells)
    table = load_suite(root / "cifar100_table.toml")
    assert len(table.cells) == 725 and {c.recipe for c in table.cells} == {"cifar100-repdistiller"}
    pairs = {(c.teacher, c.model) for c in table.cells if c.teacher}
    assert len(pairs) == 10 and ("cifar_resnet32x4", "cifar_resnet8x4") in pairs
    assert sum(c.method == "baseline" for c in table.cells) == 75
    imagenet_table = load_suite(root / "imagenet_table.toml")
    assert len(imagenet_table.cells) == 18 and {c.recipe for c in imagenet_table.cells} == {"imagenet-torchvision"}
    imagenet = load_suite(root / "imagenet.toml")
    assert {(c.method, c.teacher) for c in imagenet.cells} == {("baseline", None), ("kd", "resnet34")}
    voc = load_suite(root / "voc.toml")
    assert all(c.task == "seg" and c.dataset == "voc" and c.teacher in (None, "resnet101") for c in voc.cells)
    seg = load_suite(root / "seg_shapes.toml")
    assert sorted((c.method, c.teacher) for c in seg.cells) == [
        ("baseline", None), ("frskd", None), ("kd", "resnet50"), ("nfd", "resnet50")]
    assert all(c.task == "seg" and c.dataset == "shapes" and c.model == "resnet18" for c in seg.cells)
