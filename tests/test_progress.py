"""Progress without a terminal (plain lines at most every 30 s and at each epoch's end) and the
steady img/s (the first steps of a process are warm-up and left out)."""

from __future__ import annotations

import io
import time

import pytest
from rich.console import Console

from kdzoo import engine, progress
from kdzoo.checkpoint import read_checkpoint
from kdzoo.progress import Status, Throughput, TrainingProgress

from .conftest import tiny_config


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _log_console():
    """A console writing to a file, as under nohup or CI: not a terminal."""
    buffer = io.StringIO()
    return Console(file=buffer, width=80), buffer


def _status(step, steps=100, rate=50.0, spp=0.5):
    return Status(1, 2, step, steps, step, 2 * steps, {"loss": 2.0, "kd": 0.25, "feature_distance": 1.75}, rate, spp)


def test_plain_lines_at_most_every_interval_and_at_each_epoch_end():
    console, buffer = _log_console()
    clock = FakeClock()
    shown = TrainingProgress(console, interval=30, clock=clock)
    assert shown.plain
    with shown.epoch(1, 2, 100, 0) as update:
        for step, now in ((10, 5.0), (20, 29.0), (30, 31.0), (40, 45.0), (50, 60.0), (60, 62.0)):
            clock.now = now
            update(_status(step))
        clock.now = 63.0
        update(_status(100))  # the epoch's end: always a line
    lines = buffer.getvalue().splitlines()
    assert [line.split("  ")[1] for line in lines] == ["step 30/100", "step 60/100", "step 100/100"]
    # step/total, the loss terms, img/s and the time left for the remaining 100 steps at 0.5 s each
    assert lines[-1] == ("epoch 1/2  step 100/100  (run 100/200)  loss 2  kd 0.25  feature_distance 1.75  50 img/s  "
                         "eta 0:00:50")
    assert len(max(lines, key=len)) > 80  # a long line is one line in a log, not wrapped at the console width


def test_a_terminal_gets_the_rich_bar_not_lines():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    shown = TrainingProgress(console, interval=0, clock=FakeClock())
    assert not shown.plain
    with shown.epoch(1, 2, 10, 0) as update:
        update(_status(10, steps=10))
    assert "eta" not in buffer.getvalue()


def test_throughput_leaves_the_warm_up_steps_out():
    clock = FakeClock()
    meter = Throughput(warmup_steps=2, clock=clock)
    meter.start()
    for step, seconds in enumerate([5.0, 5.0, 0.5, 0.5, 0.5, 0.5], 1):  # two slow warm-up steps, then 0.5 s a step
        clock.now += seconds
        if meter.add_step(10):
            assert step == 2
            meter.read()
        if step in (3, 6):  # the loop's flushes
            meter.read()
    assert meter.img_per_s() == pytest.approx(40 / 2.0)  # 20 img/s, not 60 images / 12 s = 5
    assert meter.seconds_per_step() == pytest.approx(0.5)
    assert (meter.seconds, meter.images, meter.steps) == (12.0, 60, 6)
    # a resumed process warms up again; the totals go on from the checkpoint
    again = Throughput(warmup_steps=2, clock=clock)
    again.load(meter.state(), global_step=6)
    assert again.img_per_s() == pytest.approx(20)


def test_a_run_shorter_than_the_warm_up_reports_its_rate_over_every_step():
    clock = FakeClock()
    meter = Throughput(warmup_steps=5, clock=clock)
    meter.start()
    for _ in range(3):
        clock.now += 1.0
        meter.add_step(8)
    meter.read()
    assert meter.img_per_s() == pytest.approx(8.0)


def test_a_run_without_a_terminal_prints_progress_lines_and_its_img_per_s_excludes_warm_up(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.0)  # a line at every flush
    slow = engine.Trainer._step

    def slow_warm_up(self, *args):  # the first steps pay a one-time cost, as on a GPU
        if self.meter.process_steps < progress.WARMUP_STEPS:
            time.sleep(0.3)
        return slow(self, *args)

    monkeypatch.setattr(engine.Trainer, "_step", slow_warm_up)
    console, buffer = _log_console()
    result = engine.run(tiny_config(tmp_path, run_name="plain"), console=console)
    text = buffer.getvalue()
    for line in ("epoch 1/2  step 6/6  (run 6/12)", "epoch 2/2  step 4/6  (run 10/12)", "epoch 2/2  step 6/6  (run 12/12)"):
        assert line in text, text
    assert "img/s  eta " in text and "\x1b[" not in text  # plain text, no bar or colour codes
    state = read_checkpoint(tmp_path / "runs" / "plain" / "last.pt")
    assert state["steady_steps"] == 12 - progress.WARMUP_STEPS
    assert state["steady_images"] == 16 * state["steady_steps"]
    assert state["steady_seconds"] <= state["train_seconds"] - progress.WARMUP_STEPS * 0.3
    assert result["train_img_per_s"] == pytest.approx(state["steady_images"] / state["steady_seconds"])
    assert result["train_img_per_s"] > state["images_seen"] / state["train_seconds"]
    assert result["ms_per_step"] == pytest.approx(1000 * state["steady_seconds"] / state["steady_steps"])
