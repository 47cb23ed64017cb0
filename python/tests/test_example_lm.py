"""examples/train_lm.py: the language model's loss goes down on packed batches, and a crash +
--resume sees the same batches and ends with the same losses as an uninterrupted run."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("pyarrow")

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "train_lm.py"


def run(workdir, *extra):
    r = subprocess.run(
        [sys.executable, str(EXAMPLE), "--workdir", str(workdir), "--epochs", "1", "--batch-size", "8",
         "--seq-len", "96", "--backend", "cpu", "--log-every", "20", "--checkpoint-every", "20", *extra],
        capture_output=True, text=True, timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def step_lines(out: str, after: int) -> list[str]:
    """Log lines (loss and batch fingerprint) of the steps after `after`."""
    return [l for l in out.splitlines() if l.startswith("step") and int(l.split()[1]) > after]


def test_example_lm_learns_and_resumes_exactly(tmp_path):
    full = run(tmp_path / "a")
    assert "plaintext Parquet file is deleted" in full
    assert not list((tmp_path / "a").rglob("*.parquet"))
    losses = [float(l.split("loss")[1].split()[0]) for l in step_lines(full, 0)]
    assert len(losses) >= 5, full
    # From near ln(256) = 5.5 for random bytes to clearly lower.
    assert losses[-1] < losses[0] - 0.5, full

    crashed = run(tmp_path / "b", "--stop-after", "70")
    assert "stopping after step 70" in crashed
    resumed = run(tmp_path / "b", "--resume")
    assert "resumed at step 60" in resumed
    # The first window after the resume (steps 61..80) is whole again: every line from then on,
    # losses and batch fingerprints, is the uninterrupted run's.
    assert step_lines(resumed, 60) == step_lines(full, 60)
    assert step_lines(full, 60)
    done = lambda out: [l for l in out.splitlines() if l.startswith("done:")][0].split(", ")[:2]  # noqa: E731
    assert done(resumed) == done(full)
