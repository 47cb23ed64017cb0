"""examples/train_torch.py trains, and a crash + --resume ends exactly like an uninterrupted run."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "train_torch.py"


def run(workdir, *extra):
    r = subprocess.run(
        [sys.executable, str(EXAMPLE), "--workdir", str(workdir), "--rows", "6000", "--epochs", "2",
         "--batch-size", "100", "--backend", "cpu", "--checkpoint-every", "10", *extra],
        capture_output=True, text=True, timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def tail_lines(out: str) -> list[str]:
    # Loss lines after step 100 (the first print after the resume at step 70 averages a shorter
    # window), plus the final line without its timing.
    lines = [l for l in out.splitlines() if l.startswith("epoch") and int(l.split()[3]) > 100]
    done = [l for l in out.splitlines() if l.startswith("done:")][0]
    return lines + [done.split(" in ")[0], done.split("accuracy ")[1].split(",")[0]]


def test_example_trains_and_resumes_exactly(tmp_path):
    full = run(tmp_path / "a")
    losses = [float(l.split("loss")[1]) for l in full.splitlines() if l.startswith("epoch")]
    assert losses[-1] < losses[0], full
    accuracy = float(full.split("accuracy ")[1].split(",")[0])
    assert accuracy > 0.5, full

    crashed = run(tmp_path / "b", "--stop-after", "75")
    assert "stopping after step 75" in crashed
    resumed = run(tmp_path / "b", "--resume")
    assert "resumed at step 70" in resumed
    assert tail_lines(resumed) == tail_lines(full)
