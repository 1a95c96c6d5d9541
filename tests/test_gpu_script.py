"""benchmarks/gpu.sh: valid bash, and its CPU dry run goes through every step and writes the section."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(shutil.which("kdzoo") is None, reason="the kdzoo command is not on PATH (install the package)")
def test_the_cpu_dry_run_measures_every_step_and_writes_the_gpu_section(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(SCRIPT), "--cpu-dry-run"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (out,) = tmp_path.glob("kdzoo-gpu.*")
    text = (out / "RESULTS.md").read_text()
    assert "<!-- gpu:begin -->" in text and "<!-- gpu:end -->" in text
    eager = next(line for line in text.splitlines() if line.startswith("| eager |"))
    assert "nan" not in eager  # every phase, the cached one included, was measured
    assert "`kdzoo run --nproc 1` (torchrun, one process, gloo), kd with the cache, 4 steps" in text
    assert (out / "speed_eager.json").is_file()
