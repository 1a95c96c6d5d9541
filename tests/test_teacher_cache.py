"""--teacher-cache: numbered crop/flip choices, the cache's identity and safety, and a cached step
that gives the uncached step's losses bit for bit."""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest
import torch

from kdzoo.bench.speed import measure
from kdzoo.cli import main
from kdzoo.config import RunConfig, recipe_hash
from kdzoo.data.loaders import CropFlip, InMemoryLoader, random_crop, random_flip
from kdzoo.errors import UserError
from kdzoo.hooks import FeatureTaps
from kdzoo.inputs import Inputs
from kdzoo.models import create_model
from kdzoo.optim import build_optimizer, build_scheduler
from kdzoo.registry import get_method
from kdzoo.step import StepParts, TrainStep
from kdzoo.tasks import get_task
from kdzoo.teacher_cache import (
    FOLDER,
    CacheKey,
    RecordedAugment,
    TeacherCache,
    fill_every_choice,
    images_hash,
    weights_hash,
)

from .conftest import tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = CacheKey(teacher="test_resnet", teacher_weights="w" * 16, data="d" * 16, input_size=16, mean=(0.5,) * 3,
               std=(0.25,) * 3, augmentation="CropFlip(padding=2, flip=True)", choices=50, precision="float32",
               num_classes=10, storage="float32")


# -- numbered augmentation ------------------------------------------------------------------
@pytest.mark.parametrize("padding, flip", [(2, True), (4, True), (0, True), (3, False)])
def test_cropflip_draws_as_before_and_replays_its_choices(padding, flip):
    x = torch.rand(40, 3, 12, 12)
    torch.manual_seed(7)
    before = random_crop(x, padding)
    before = random_flip(before) if flip else before
    aug = CropFlip(padding, flip)
    torch.manual_seed(7)
    choice = aug.draw(len(x), x.device)
    assert torch.equal(aug.apply(x, choice), before)  # same draws, same images: no golden value moves
    assert choice.min() >= 0 and choice.max() < aug.choices == (2 * padding + 1) ** 2 * (2 if flip else 1)
    torch.manual_seed(7)
    assert torch.equal(aug(x), before)


def test_every_choice_is_a_different_view():
    aug = CropFlip(2)
    x = torch.rand(1, 3, 8, 8).expand(aug.choices, -1, -1, -1)
    views = aug.apply(x, torch.arange(aug.choices)).flatten(1)
    assert len(torch.unique(views, dim=0)) == aug.choices


def test_recorded_augment_keys_the_one_augmented_batch():
    rec = RecordedAugment(CropFlip(2))
    rec(torch.rand(4, 3, 8, 8))
    index = torch.tensor([3, 0, 9, 5])
    assert torch.equal(rec.keys(index), index * 50 + rec.choices[0])
    rec(torch.rand(4, 3, 8, 8))  # a second view: the teacher's input is no longer one keyed batch
    with pytest.raises(RuntimeError, match="augmented 2 time"):
        rec.keys(index)


# -- identity and safety ---------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("teacher", "resnet34"), ("teacher_weights", "x" * 16), ("data", "e" * 16), ("input_size", 32),
    ("mean", (0.4, 0.5, 0.5)), ("std", (0.2, 0.25, 0.25)), ("augmentation", "CropFlip(padding=4, flip=True)"),
    ("choices", 162), ("precision", "bf16-autocast"), ("num_classes", 100), ("storage", "bfloat16"), ("format", 2),
])
def test_every_key_field_changes_the_cache_id(field, value):
    assert dataclasses.replace(KEY, **{field: value}).id() != KEY.id()


def test_weights_and_images_hashes_see_one_changed_value():
    net = create_model("test_resnet", 10, 16)
    before = weights_hash(net)
    with torch.no_grad():
        next(net.parameters())[0].view(-1)[0] += 1e-3
    assert weights_hash(net) != before
    images, targets = torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.arange(4)
    changed = images.clone()
    changed[2, 1, 3, 3] = 1
    assert images_hash(images, targets) != images_hash(changed, targets)
    assert images_hash(images, targets) != images_hash(images, targets.flip(0))


def test_rows_survive_a_reopen_and_a_foreign_cache_is_refused(tmp_path):
    cache = TeacherCache(tmp_path, KEY, "cpu", name="a")
    keys, logits = torch.tensor([7, 3, 120]), torch.randn(3, 10)
    cache.pending.append((keys, logits))
    assert cache.flush("e1") == 3
    again = TeacherCache(tmp_path, KEY, "cpu")
    stored, hit = again.lookup(torch.tensor([3, 4, 120, 7]))
    assert hit.tolist() == [True, False, True, True]
    assert torch.equal(stored[[0, 2, 3]], logits[[1, 2, 0]]) and not stored[1].any()
    # the same folder claimed by another key (say, a teacher retrained in place) is never read
    folder = tmp_path / FOLDER / KEY.id()
    record = json.loads((folder / "key.json").read_text())
    (folder / "key.json").write_text(json.dumps({**record, "teacher_weights": "0" * 16}))
    with pytest.raises(UserError, match="differs in: teacher_weights"):
        TeacherCache(tmp_path, KEY, "cpu")


def test_a_part_of_another_cache_is_refused(tmp_path):
    TeacherCache(tmp_path, KEY, "cpu")
    other = dataclasses.replace(KEY, data="f" * 16)
    stranger = TeacherCache(tmp_path, other, "cpu", name="b")
    stranger.pending.append((torch.tensor([1]), torch.zeros(1, 10)))
    stranger.flush("e1")
    part = next((tmp_path / FOLDER / other.id()).glob("part-*.pt"))
    os.replace(part, tmp_path / FOLDER / KEY.id() / part.name)
    with pytest.raises(UserError, match="does not belong to this cache"):
        TeacherCache(tmp_path, KEY, "cpu")


def test_a_failed_write_leaves_no_part(tmp_path, monkeypatch):
    cache = TeacherCache(tmp_path, KEY, "cpu")
    cache.pending.append((torch.tensor([1, 2]), torch.zeros(2, 10)))

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        cache.flush("e1")
    monkeypatch.undo()
    folder = tmp_path / FOLDER / KEY.id()
    assert sorted(p.name for p in folder.iterdir()) == ["key.json"]  # no part, no temporary file
    assert len(TeacherCache(tmp_path, KEY, "cpu").keys) == 0


# -- the cached step ---------------------------------------------------------------------------
def _steps(method_name: str, cache: TeacherCache | None, teacher, student, data, n: int):
    """n training steps of ``method_name`` from ``student``'s weights; the loss terms of each."""
    method = get_method(method_name)()
    student = copy.deepcopy(student)
    inputs = Inputs((0.5,) * 3, (0.25,) * 3, "cpu")
    opt = build_optimizer([p for p in student.parameters()], RunConfig(optimizer="sgd", lr=0.01).resolved())
    sched = build_scheduler(opt, 10, RunConfig(epochs=1, schedule="cosine", warmup_epochs=0).resolved())
    with FeatureTaps(student, ()) as s_taps, FeatureTaps(teacher, ()) as t_taps:
        step = TrainStep(StepParts(student, teacher, method, s_taps, t_taps, opt, sched, inputs, CropFlip(2),
                                   get_task("cls").train_hits, teacher_cache=cache))
        torch.manual_seed(3)
        terms = []
        for images, targets, index in data.batches():
            terms.append({k: v.item() for k, v in step(images, targets, index)[0].items() if not k.startswith("_")})
            if len(terms) == n:
                return terms
    return terms


def _fixture():
    torch.manual_seed(0)
    teacher = create_model("test_resnet", 10, 16).eval().requires_grad_(False)
    with torch.no_grad():  # logits of a trained network's size (a few units), not an initialised one's (±0.05)
        teacher.get_classifier().weight.mul_(50)
    student = create_model("test_resnet", 10, 16)
    images = torch.randint(0, 256, (48, 3, 16, 16), dtype=torch.uint8)
    data = InMemoryLoader(images, torch.randint(0, 10, (48,)), 16, shuffle=True, seed=1)
    return teacher, student, data


@pytest.mark.parametrize("method", ["kd", "dkd", "dist"])
def test_cached_steps_equal_uncached_bit_for_bit_cold_and_warm(method):
    teacher, student, data = _fixture()
    plain = _steps(method, None, teacher, student, data, 3)
    cold = TeacherCache(None, KEY, "cpu")
    first = _steps(method, cold, teacher, student, data, 3)
    assert cold.misses == 48 and cold.hits == 0
    cold.flush("e1")
    assert first == plain  # step for step, every term: the cache keeps the teacher's own float32 bits
    second = _steps(method, cold, teacher, student, data, 3)  # same draws: every key is now present
    assert cold.hits == 48 and cold.misses == 48
    assert second == plain


def test_fill_ahead_stores_what_the_teacher_computes_for_every_choice():
    teacher, _, data = _fixture()
    cache, aug, inputs = TeacherCache(None, KEY, "cpu"), CropFlip(2), Inputs((0.5,) * 3, (0.25,) * 3, "cpu")
    images, index = data.images[:5], torch.arange(5)
    assert fill_every_choice(cache, teacher, images, index, aug, inputs, batch_size=4) == 5 * 50
    choice = torch.tensor([0, 17, 49, 25, 8])
    with torch.no_grad():
        expected = teacher(inputs(aug.apply(images.float() / 255, choice)))
    stored, hit = cache.lookup(index * 50 + choice)
    assert hit.all()
    # filled 4 images at a time, checked on a batch of 5: another batch size may take another
    # kernel path, so equal to float32's last bits rather than bit for bit
    torch.testing.assert_close(stored, expected, rtol=1e-5, atol=1e-5)


# -- the commands ------------------------------------------------------------------------------
def test_a_second_method_on_the_same_seed_reads_the_first_ones_teacher_outputs(tmp_path):
    common = ("--teacher", "test_resnet", "--teacher-epochs", "1", "--teacher-cache")
    assert main(tiny_args(tmp_path, "--method", "kd", *common)) == 0
    assert main(tiny_args(tmp_path, "--method", "dkd", "--set", "warmup=1", *common)) == 0
    runs = {p.name.split("_")[1]: json.loads((p / "result.json").read_text())
            for p in (tmp_path / "runs").glob("shapes_*")}
    kd, dkd = runs["kd"]["teacher_cache"], runs["dkd"]["teacher_cache"]
    assert kd["misses"] > 0 and kd["hit_rate"] < 0.5  # 2 epochs of fresh crop/flip draws: a few repeats
    assert dkd["id"] == kd["id"] and dkd["misses"] == 0 and dkd["hit_rate"] == 1.0  # the same draws, all stored
    assert dkd["entries"] == kd["entries"] > 0
    config = json.loads(next((tmp_path / "runs").glob("shapes_dkd_*/config.json")).read_text())
    assert config["run"]["teacher_cache"] is True
    # and the warm-cache run is the uncached run, digit for digit (the same teacher, read from runs/teachers/)
    assert main(tiny_args(tmp_path, "--method", "dkd", "--set", "warmup=1", *common[:-1], "--run-name", "plain")) == 0
    plain = (tmp_path / "runs" / "plain" / "metrics.csv").read_text().splitlines()
    cached = next((tmp_path / "runs").glob("shapes_dkd_*/metrics.csv")).read_text().splitlines()
    header = plain[0].split(",")
    speed = header.index("img_per_s")
    assert [r.split(",")[:speed] for r in cached] == [r.split(",")[:speed] for r in plain]


@pytest.mark.parametrize("extra, why", [
    (("--method", "fitnet", "--teacher", "test_resnet"), "reads the teacher's features"),
    (("--method", "ccd", "--teacher", "test_resnet"), "builds its own views"),
    (("--method", "mlkd", "--teacher", "test_resnet"), "builds its own views"),
    (("--method", "baseline",), "uses no teacher"),
    (("--method", "kd", "--teacher", "test_resnet", "--task", "seg"), "--task seg"),
])
def test_methods_the_cache_cannot_serve_are_refused_before_any_work(tmp_path, capsys, extra, why):
    assert main(tiny_args(tmp_path, *extra, "--teacher-cache")) == 2
    err = capsys.readouterr().err
    assert "--teacher-cache" in err and why in err
    assert not (tmp_path / "runs").exists()


def test_ctkd_is_served_when_its_base_method_is():
    ctkd = get_method("ctkd")
    assert ctkd().teacher_cache_refusal() is None
    assert get_method("kd")().teacher_cache_refusal() is None
    assert "views" in get_method("mlkd")().teacher_cache_refusal()


def test_a_dataset_whose_loader_crops_is_refused(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(tmp_path / "data" / split / cls / f"{i}.png")
    args = tiny_args(tmp_path, "--method", "kd", "--teacher", "test_resnet", "--teacher-epochs", "1",
                     "--dataset", "imagefolder", "--data-root", str(tmp_path / "data"), "--batch-size", "4",
                     "--workers", "0", "--teacher-cache")
    args[args.index("--train-size") + 1], args[args.index("--test-size") + 1] = "8", "8"
    assert main(args) == 2
    assert "crops its images in the loader's workers" in capsys.readouterr().err


def test_speed_reports_the_cached_step_against_the_student_step():
    cfg = RunConfig(method="kd", model="test_resnet", teacher="test_resnet", input_size=16, batch_size=8,
                    train_size=32, device="cpu", teacher_cache=True)
    result = measure(cfg, steps=2, rounds=2, warmup=1)
    t = {name: p["ms_per_step"] for name, p in result["phases"].items()}
    assert "cached_step" in t
    assert result["cache_ratio"] == pytest.approx(t["cached_step"] / t["student_step"])
    plain = measure(dataclasses.replace(cfg, teacher_cache=False), steps=1, rounds=1, warmup=0)
    assert "cached_step" not in plain["phases"] and plain["cache_ratio"] is None


def test_the_cache_changes_how_a_run_executes_not_its_identity():
    off, on = RunConfig(method="kd", teacher="resnet34"), RunConfig(method="kd", teacher="resnet34", teacher_cache=True)
    assert off.run_key() == on.run_key()  # lossless: a cached run is the same run, as --compile is
    assert recipe_hash(off.to_dict(), {}, {}) == recipe_hash(on.to_dict(), {}, {})


def test_a_suite_turns_the_cache_on_for_the_cells_it_can_serve(tmp_path):
    from kdzoo.bench.suite import load_suite

    suite_file = tmp_path / "s.toml"
    suite_file.write_text('[defaults]\nmodel = "test_resnet"\n[[grid]]\nmethods = ["baseline", "kd", "ctkd", "fitnet", '
                          '"ccd"]\nteachers = ["test_resnet"]\n')
    plain = {c.method: c.teacher_cache for c in load_suite(suite_file).cells}
    cached = {c.method: c.teacher_cache for c in load_suite(suite_file, teacher_cache=True).cells}
    assert not any(plain.values())
    assert cached == {"baseline": False, "kd": True, "ctkd": True, "fitnet": False, "ccd": False}


def test_the_bench_line_costs_hits_at_the_teachers_measured_rate():
    from kdzoo.bench.runner import cache_savings

    assert cache_savings([{"teacher_cache": None}, {}]) is None
    line = cache_savings([
        {"teacher_cache": {"hits": 0, "misses": 1000, "teacher_seconds": 10.0}},   # 10 ms per image
        {"teacher_cache": {"hits": 3000, "misses": 0, "teacher_seconds": 0.0}},
    ])
    assert "3,000 of 4,000 teacher outputs (75.0 %)" in line and "saved ≈ 30 s" in line and "filling it 10 s" in line


def test_the_table_stays_on_the_gpu_only_when_every_row_fits_in_half_its_free_memory(monkeypatch):
    from kdzoo.teacher_cache import storage_device

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10_000, 80_000))
    assert storage_device("cuda:0", 5_000) == torch.device("cuda:0")  # half of the 10,000 bytes free
    assert storage_device("cuda:0", 5_001) == torch.device("cpu")     # the host keeps it
    assert storage_device("cpu", 10**12) == torch.device("cpu")
