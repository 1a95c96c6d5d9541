"""The method contract's extension points, each exercised by a small plugin through the engine:
sample indices (``out.index``), method state kept across ``--resume``, the teacher's own input,
parameter groups and the logits-only declaration."""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdzoo import Method, cross_entropy, kl_div, register_method
from kdzoo.checkpoint import read_checkpoint
from kdzoo.data import DataRequest, get_dataset
from kdzoo.data.loaders import InMemoryLoader, TorchLoader
from kdzoo.engine import Interrupted, StopFlag, Trainer, build, run
from kdzoo.errors import UserError
from kdzoo.method import Batch, Taps
from kdzoo.registry import get_method, method_names

from .conftest import tiny_config


def _rows(folder):
    with open(folder / "metrics.csv") as f:
        return list(csv.DictReader(f))


# -- out.index ---------------------------------------------------------------------------------
@register_method("test_contract_index")
class RecordsIndex(Method):
    """Baseline that checks each row's image against the dataset at its index, and records them."""

    seen: list = []
    dataset_images = None

    def prepare_batch(self, batch, augment):
        # no augmentation: the rows must be the dataset's images at ``index``, then two views each
        expected = RecordsIndex.dataset_images[batch.index.cpu()].float() / 255
        assert torch.equal(batch.images.cpu(), expected)
        return Batch(batch.images.repeat_interleave(2, dim=0), batch.targets.repeat_interleave(2),
                     batch.index.repeat_interleave(2))

    def loss(self, out):
        if self.training:
            RecordsIndex.seen.append(out.index.cpu())
        return {"ce": cross_entropy(out.student.logits, out.targets)}


def test_out_index_names_each_row_of_every_view(tmp_path, quiet_console):
    cfg = tiny_config(tmp_path, method="test_contract_index", epochs=1)
    data = get_dataset("shapes").build(DataRequest(input_size=16, train_size=96, batch_size=16))
    RecordsIndex.dataset_images, RecordsIndex.seen = data.train.images, []
    run(cfg, console=quiet_console)
    seen = RecordsIndex.seen
    assert len(seen) == 96 // 16 and all(len(i) == 32 for i in seen)
    assert all(torch.equal(i[0::2], i[1::2]) for i in seen)  # both views of an image carry its index
    assert sorted(torch.cat([i[0::2] for i in seen]).tolist()) == list(range(96))  # one epoch: each image once


@pytest.mark.parametrize("world", [2, 3])
def test_index_under_sharding_is_the_single_process_batch(world):
    images, targets = torch.arange(40).view(40, 1, 1, 1), torch.arange(40) * 7
    single = InMemoryLoader(images, targets, 8, shuffle=True, seed=5, drop_last=True)
    shards = [InMemoryLoader(images, targets, 8, shuffle=True, seed=5, drop_last=True).shard(r, world) for r in range(world)]
    for whole, *parts in zip(single.batches(), *(s.batches() for s in shards)):
        assert torch.equal(torch.cat([p[2] for p in parts]), whole[2])
        for x, y, index in parts:
            assert torch.equal(y, targets[index]) and torch.equal(x.flatten(), images.flatten()[index])


def test_torch_loader_batches_carry_the_dataset_index():
    dataset = torch.utils.data.TensorDataset(torch.arange(10).float().view(10, 1), torch.arange(10) * 3)
    loader = TorchLoader(dataset, 4, shuffle=True, seed=1, workers=0)
    got = [(x, y, i) for x, y, i in loader.batches()]
    assert sorted(torch.cat([i for _, _, i in got]).tolist()) == list(range(10))
    for x, y, i in got:
        assert torch.equal(y, i * 3) and torch.equal(x.flatten(), i.float())


# -- method state --------------------------------------------------------------------------------
@register_method("test_contract_state")
class MemoryBank(Method):
    """A CRD-like method: a per-sample memory bank (buffer) updated with momentum from ``out.index``,
    a learned temperature (parameter) and a Python counter kept as extra state. Stops at step 5
    when ``flag`` is set, the way SIGTERM does."""

    flag: StopFlag | None = None
    taps = Taps(student=["embedding"])

    @dataclass
    class Config:
        momentum: float = 0.5

    def setup(self, student, teacher=None):
        self.register_buffer("bank", torch.zeros(96, student.embedding_dim))
        self.log_tau = nn.Parameter(torch.zeros(()))
        self.updates = 0

    def loss(self, out):
        if out.step == 5 and MemoryBank.flag is not None and not MemoryBank.flag:
            MemoryBank.flag.signal_name = "SIGTERM"
        emb = F.normalize(out.student.embedding.float(), dim=1)
        with torch.no_grad():
            m = self.config.momentum
            self.bank[out.index] = m * self.bank[out.index] + (1 - m) * emb.detach()
            self.updates += 1
        sim = emb @ self.bank.t() / self.log_tau.exp()
        return {"ce": cross_entropy(out.student.logits, out.targets), "bank": 0.1 * sim.logsumexp(dim=1).mean()}

    def get_extra_state(self):
        return {"updates": self.updates}

    def set_extra_state(self, state):
        self.updates = state["updates"]


def test_method_state_is_saved_and_resume_equals_an_uninterrupted_run(tmp_path, quiet_console):
    cfg = tiny_config(tmp_path, method="test_contract_state", epochs=2)
    MemoryBank.flag = None
    run(replace(cfg, run_name="full"), console=quiet_console)
    MemoryBank.flag = StopFlag()
    with pytest.raises(Interrupted):
        run(replace(cfg, run_name="cut"), console=quiet_console, stop=MemoryBank.flag)
    saved = read_checkpoint(tmp_path / "runs" / "cut" / "last.pt")["method"]
    assert saved["_extra_state"] == {"updates": 6} and saved["bank"].abs().sum() > 0
    MemoryBank.flag = None
    run(replace(cfg, run_name="cut"), resume=True, console=quiet_console)
    full = read_checkpoint(tmp_path / "runs" / "full" / "last.pt")
    cut = read_checkpoint(tmp_path / "runs" / "cut" / "last.pt")
    assert cut["method"]["_extra_state"] == full["method"]["_extra_state"] == {"updates": 12}
    for key in ("bank", "log_tau"):
        assert torch.equal(cut["method"][key], full["method"][key]), key
    for key, value in full["student"].items():
        assert torch.equal(cut["student"][key], value), key
    columns = ["train_ce", "train_bank", "test_loss", "test_top1"]
    assert [[r[c] for c in columns] for r in _rows(tmp_path / "runs" / "cut")] == \
           [[r[c] for c in columns] for r in _rows(tmp_path / "runs" / "full")]


# -- the teacher's own input ---------------------------------------------------------------------
@register_method("test_contract_teacher_view")
class TeacherSeesLarger(Method):
    """The teacher reads the batch at twice the resolution; the student reads it as it is."""

    needs_teacher = True
    sizes: list = []

    def prepare_batch(self, batch, augment):
        images = augment(batch.images)
        return replace(batch, images=images, teacher_images=F.interpolate(images, scale_factor=2, mode="bilinear"))

    def install(self, student, teacher):
        record = lambda name: lambda module, args: TeacherSeesLarger.sizes.append((name, tuple(args[0].shape[-2:])))  # noqa: E731
        return [student.register_forward_pre_hook(record("student")), teacher.register_forward_pre_hook(record("teacher"))]

    def loss(self, out):
        return {"ce": cross_entropy(out.student.logits, out.targets),
                "kd": kl_div(out.student.logits, self.teacher_output(out).logits, 4.0) * 16}


def test_the_teacher_can_read_other_images_than_the_student(tmp_path, quiet_console):
    TeacherSeesLarger.sizes = []
    run(tiny_config(tmp_path, method="test_contract_teacher_view", teacher="test_resnet", teacher_epochs=1, epochs=1),
        console=quiet_console)
    training = TeacherSeesLarger.sizes[: 2 * (96 // 16)]  # the training steps come before evaluation
    assert {size for who, size in training if who == "student"} == {(16, 16)}
    assert {size for who, size in training if who == "teacher"} == {(32, 32)}


# -- parameter groups ------------------------------------------------------------------------------
@register_method("test_contract_groups")
class OwnGroups(Method):
    """A projection trained at a tenth of the run's lr and a temperature without weight decay."""

    taps = Taps(student=["embedding"])

    @dataclass
    class Config:
        groups: str = "valid"  # valid | missing | twice | unknown_key

    def setup(self, student, teacher=None):
        self.proj = nn.Linear(student.embedding_dim, 4)
        self.tau = nn.Parameter(torch.ones(2, 2))  # 2-D: weight-decayed unless the group says otherwise

    def param_groups(self):
        proj, tau = list(self.proj.parameters()), [self.tau]
        return {"valid": [{"params": proj, "lr_scale": 0.1}, {"params": tau, "weight_decay": 0.0}],
                "missing": [{"params": proj}],
                "twice": [{"params": proj + tau}, {"params": tau, "weight_decay": 0.0}],
                "unknown_key": [{"params": proj + tau, "momentum": 0.5}]}[self.config.groups]

    def loss(self, out):
        aux = self.proj(out.student.embedding).pow(2).mean() * self.tau.sum()
        return {"ce": cross_entropy(out.student.logits, out.targets), "aux": 1e-3 * aux}


def _trainer(tmp_path, console, **settings):
    ctx = build(tiny_config(tmp_path, method="test_contract_groups", method_settings=settings), False, console)
    return Trainer(ctx, console, StopFlag())


def test_param_groups_set_their_own_lr_and_weight_decay(tmp_path, quiet_console):
    trainer = _trainer(tmp_path, quiet_console)
    cfg, groups = trainer.cfg, trainer.optimizer.param_groups
    method = trainer.method

    def group_of(param):
        return next(g for g in groups if any(p is param for p in g["params"]))

    assert group_of(method.proj.weight)["lr"] == pytest.approx(0.1 * cfg.lr)
    assert group_of(method.proj.weight)["weight_decay"] == cfg.weight_decay
    assert group_of(method.proj.bias)["weight_decay"] == 0.0  # biases stay undecayed within a scaled group
    assert group_of(method.tau)["weight_decay"] == 0.0 and group_of(method.tau)["lr"] == cfg.lr
    conv = next(p for p in trainer.student.parameters() if p.ndim == 4)
    assert group_of(conv)["lr"] == cfg.lr and group_of(conv)["weight_decay"] == cfg.weight_decay
    # the schedule scales every group alike: the ratio holds after warm-up and decay steps
    for _ in range(5):
        trainer.optimizer.step()  # no gradients yet: leaves the weights alone
        trainer.scheduler.step()
    assert group_of(method.proj.weight)["lr"] == pytest.approx(0.1 * group_of(conv)["lr"])


@pytest.mark.parametrize("groups,message", [("missing", "in none of its param_groups"),
                                            ("twice", "in two of its param_groups"),
                                            ("unknown_key", "momentum")])
def test_param_groups_that_lose_or_repeat_a_parameter_are_refused(tmp_path, quiet_console, groups, message):
    with pytest.raises(UserError, match=message):
        _trainer(tmp_path, quiet_console, groups=groups)


# -- logits-only teachers --------------------------------------------------------------------------
def test_builtin_logit_methods_declare_they_read_only_teacher_logits():
    declared = {n for n in method_names() if get_method(n).logits_only_teacher}
    assert {"kd", "ccd", "kd_jda"} <= declared
    assert not declared & {"baseline", "frskd", "nfd", "lakd", "relational_kd"}
    for name in declared:
        assert get_method(name).needs_teacher and not get_method(name).taps.teacher, name


def test_a_logits_only_method_with_teacher_taps_is_refused_at_registration():
    class Wrong(Method):
        needs_teacher = True
        logits_only_teacher = True
        taps = Taps(teacher=["stages"])

        def loss(self, out):
            return {}

    with pytest.raises(UserError, match="logits_only_teacher"):
        register_method("test_contract_wrong")(Wrong)
    assert "test_contract_wrong" not in method_names()


# -- loader views ----------------------------------------------------------------------------------
def test_loader_views_default_to_one_and_jda_methods_ask_for_two():
    assert {n for n in method_names() if get_method(n).loader_views != 1} >= {"ccd", "kd_jda"}
    assert get_method("baseline").loader_views == get_method("kd").loader_views == 1


@pytest.mark.parametrize("views", [0, 1.5, True])
def test_loader_views_that_are_not_a_whole_number_of_at_least_one_are_refused(views):
    class Wrong(Method):
        loader_views = views

        def loss(self, out):
            return {}

    with pytest.raises(UserError, match="loader_views"):
        register_method("test_contract_views")(Wrong)
    assert "test_contract_views" not in method_names()
