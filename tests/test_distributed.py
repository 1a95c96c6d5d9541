"""Data parallelism: sharded batches, and a real 2-process gloo run against a single process.

The comparison is exact in exact arithmetic, so it can be tight: with the same global batch
(16 = 2 × 8), DDP's averaged gradient of two half-batch means *is* the gradient of the full
batch's mean, provided nothing couples the samples of a batch. The test removes the two things
that would: it uses ``test_convnext`` (LayerNorm — BatchNorm would normalise each rank's 8
images with their own statistics) and a method that skips augmentation (each rank draws its
own random crops). What remains is float32 rounding — summation order in the all-reduce and in
the half-batch means — compounded over 12 SGD steps: around 1e-6 relative, so the tolerance is
1e-4 relative on every logged loss, far below what one missed gradient sync would move.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from kdzoo.checkpoint import read_checkpoint
from kdzoo.cli import main
from kdzoo.data.loaders import InMemoryLoader, TorchLoader

PLUGIN = '''
import os, signal
from dataclasses import dataclass
from torch import nn
from kdzoo import Method, register_method
from kdzoo.losses import cross_entropy
from kdzoo.method import Taps

@register_method("test_ddp_aux")
class AuxHead(Method):
    """CE plus CE of a trainable linear head on the embedding (an extra DDP must sync); no augmentation."""

    taps = Taps(student=["embedding"])

    @dataclass
    class Config:
        signal_rank: int = -1  # this rank sends itself SIGTERM at step signal_step
        signal_step: int = -1

    def setup(self, student, teacher=None):
        self.head = nn.Linear(student.embedding_dim, student.num_classes)

    def prepare_batch(self, batch, augment):
        return batch

    def loss(self, out):
        if out.step == self.config.signal_step and int(os.environ.get("RANK", 0)) == self.config.signal_rank:
            os.kill(os.getpid(), signal.SIGTERM)
        return {"ce": cross_entropy(out.student.logits, out.targets),
                "aux": cross_entropy(self.head(out.student.embedding), out.targets)}
'''


def _rows(folder):
    with open(folder / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("n,batch,world,drop_last", [(64, 16, 2, True), (70, 32, 3, False), (5, 4, 2, False)])
def test_shards_of_each_batch_are_disjoint_and_make_up_the_single_process_batch(n, batch, world, drop_last):
    images = torch.arange(n).view(n, 1, 1, 1).float()
    targets = torch.arange(n)
    single = InMemoryLoader(images, targets, batch, shuffle=True, seed=3, drop_last=drop_last)
    shards = [InMemoryLoader(images, targets, batch, shuffle=True, seed=3, drop_last=drop_last).shard(r, world)
              for r in range(world)]
    for loader in (single, *shards):
        loader.set_epoch(2)
    per_rank = [[t.tolist() for _, t, _ in shard] for shard in shards]
    for i, (_, whole, _) in enumerate(single):
        parts = [rank_batches[i] for rank_batches in per_rank if i < len(rank_batches)]
        assert sorted(sum(parts, [])) == sorted(whole.tolist())
    folder = TorchLoader(torch.utils.data.TensorDataset(images, targets), batch, shuffle=True, seed=3, workers=0,
                         drop_last=drop_last)
    folder_shards = [TorchLoader(folder.dataset, batch, True, seed=3, workers=0, drop_last=drop_last).shard(r, world)
                     for r in range(world)]
    for loader in (folder, *folder_shards):
        loader.set_epoch(2)
    assert [t.tolist() for _, t, _ in folder] == [t.tolist() for _, t, _ in single]  # same order as in memory
    assert [[t.tolist() for _, t, _ in s] for s in folder_shards] == per_rank
    assert [t.tolist() for _, t, _ in shards[0].batches(skip=1)] == per_rank[0][1:]


def test_two_process_gloo_run_matches_one_process_stops_together_and_resumes(tmp_path):
    plugin = tmp_path / "aux_head.py"
    plugin.write_text(PLUGIN)
    common = ["run", "--plugin", str(plugin), "--method", "test_ddp_aux", "--model", "test_convnext", "--input-size", "32",
              "--train-size", "64", "--test-size", "40", "--batch-size", "16", "--epochs", "3", "--device", "cpu",
              "--workers", "0", "--optimizer", "sgd", "--lr", "0.1", "--warmup-epochs", "0", "--output", str(tmp_path / "runs")]
    assert main([*common, "--run-name", "single"]) == 0

    # Rank 1 alone gets SIGTERM during step 8; both ranks agree at the next flush (step 10, mid
    # epoch 3), save once and exit 143; the relaunch with --resume finishes the run.
    ddp = [sys.executable, "-m", "kdzoo", *common, "--nproc", "2", "--run-name", "ddp",
           "--set", "signal_rank=1", "--set", "signal_step=8"]
    stopped = subprocess.run(ddp, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "kdzoo[rank 1]: stopped by SIGTERM at epoch 3, step 2" in stopped.stderr
    folder = tmp_path / "runs" / "ddp"
    state = read_checkpoint(folder / "last.pt")
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (2, 2, 10)
    assert len(state["rng_ranks"]) == 2 and not torch.equal(state["rng_ranks"][0]["cpu"], state["rng_ranks"][1]["cpu"])
    assert not (folder / "result.json").exists()
    resumed = subprocess.run([*ddp, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp", "single"]  # one folder, rank 0's
    result = json.loads((folder / "result.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 12
    single, parallel = _rows(tmp_path / "runs" / "single"), _rows(folder)
    assert len(single) == len(parallel) == 3
    for a, b in zip(single, parallel):
        for column in ("train_loss", "train_ce", "train_aux", "test_loss"):
            assert float(b[column]) == pytest.approx(float(a[column]), rel=1e-4), (a["epoch"], column)
        for column in ("train_top1", "test_top1", "test_top5", "lr"):
            assert b[column] == a[column], (a["epoch"], column)
    one, two = read_checkpoint(tmp_path / "runs" / "single" / "last.pt"), read_checkpoint(folder / "last.pt")
    for part in ("student", "method"):  # the method's head was synchronised too
        assert one[part].keys() == two[part].keys()
        for name in one[part]:
            torch.testing.assert_close(two[part][name], one[part][name], rtol=1e-4, atol=1e-5, msg=f"{part}.{name}")


# the built-in methods with trainable extras (the others train the student alone, which the
# DDP run above covers), and FRSKD's variant with its two extra rotation heads
WITH_EXTRAS = [("nfd", []), ("lakd", []), ("frskd", []), ("frskd", ["--set", "sla=true"]), ("ctkd", []), ("vid", []),
               ("crd", ["--set", "nce_k=64"]), ("reviewkd", []), ("fitnet", []), ("ofa", [])]


def test_the_list_holds_every_built_in_method_with_extras():
    from kdzoo.method import Method
    from kdzoo.registry import get_method, method_names

    from kdzoo.data.loaders import InMemoryLoader
    from kdzoo.models import create_model, model_info

    built_in = [get_method(n) for n in method_names() if get_method(n).__module__.startswith("kdzoo.methods.")]
    net, other = create_model("test_resnet", 10, 16), create_model("test_efficientnet", 10, 16)  # widths differ
    train = InMemoryLoader(torch.zeros(20, 3, 16, 16, dtype=torch.uint8), torch.arange(20) % 10, 4, shuffle=False)
    with_extras = set()
    for cls in built_in:  # which ones create trainable extras in setup, measured
        if cls.setup is Method.setup:
            continue
        method = cls()
        s_info = model_info(net, "test_resnet", 10, 16, cls.taps.student, train=train)
        t_info = model_info(other, "test_efficientnet", 10, 16, cls.taps.teacher, train=train)
        method.setup(s_info, t_info if cls.needs_teacher else None)
        if any(p.requires_grad for p in method.parameters()):
            with_extras.add(cls.name)
    assert with_extras == {m for m, _ in WITH_EXTRAS}


@pytest.mark.parametrize("method,settings", WITH_EXTRAS)
def test_built_in_methods_give_every_trainable_parameter_a_gradient(tmp_path, monkeypatch, method, settings):
    """What lets DDP run without find_unused_parameters: a method that leaves a parameter without
    a gradient on some step must say so (Method.some_parameters_unused), or DDP stops with an error."""
    from kdzoo import engine
    from kdzoo.models import create_model
    from kdzoo.registry import get_method

    teacher = tmp_path / "teacher.pt"
    torch.save(create_model("test_resnet", 10, 16).state_dict(), teacher)
    unused: list[str] = []
    real_step = engine.Trainer._step

    def step_and_check(self, images, targets, index):
        out = real_step(self, images, targets, index)
        names = {id(p): n for n, p in [*self.student.named_parameters(), *(("method." + n, p) for n, p in self.method.named_parameters())]}
        unused.extend(names[id(p)] for g in self.optimizer.param_groups for p in g["params"] if p.grad is None)
        return out

    monkeypatch.setattr(engine.Trainer, "_step", step_and_check)
    args = ["run", "--method", method, "--model", "test_resnet", "--input-size", "16", "--train-size", "16",
            "--test-size", "8", "--batch-size", "8", "--epochs", "1", "--max-steps", "1", "--device", "cpu",
            "--output", str(tmp_path / "runs"), *settings]
    if get_method(method).needs_teacher:
        args += ["--teacher", "test_resnet", "--teacher-checkpoint", str(teacher)]
    assert main(args) == 0
    assert get_method(method).some_parameters_unused or not unused, unused
