"""A loader's life around its pipeline: what len()/state_dict() may start, what a tensor kept
past its loader holds, and a loader inherited through fork()."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import ciphershard

PAGE = os.sysconf("SC_PAGE_SIZE")


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def test_len_and_state_dict_start_nothing(data):
    ds = data.open()
    loader = ciphershard.Loader(ds, 100, seed=1, threads=2)
    base = threads()
    assert len(loader) == 20
    fresh = loader.state_dict()
    assert threads() == base, "len()/state_dict() started a pipeline"
    it = iter(loader)
    assert fresh == loader.state_dict(), "planned start state differs from the started one"
    next(it)
    assert threads() > base
    loader.close()
    assert threads() == base
    after = loader.state_dict()
    assert after["loader"]["batches_done_in_epoch"] == 1
    assert len(loader) == 20
    assert loader.stats()["batches"] == 1
    assert threads() == base, "len()/state_dict() on a closed loader restarted its pipeline"
    with pytest.raises(ciphershard.LoaderStoppedError):
        next(it)


def test_kept_tensor_holds_only_its_batch(tmp_path):
    """A small tensor kept after its loader is closed and deleted holds its own batch's buffers,
    not the loader's preallocated pool. Buffers of 36 MiB are mmap'ed by the allocator, so
    freeing them shows in the resident size."""
    key = tmp_path / "k.key"
    ciphershard.generate_key(key)
    rows, width = 1024, 9216
    ciphershard.convert(
        {"x": np.ones((rows, width), np.float32), "label": np.arange(rows, dtype=np.int64)},
        out=tmp_path / "ds", key_file=key, chunk_size=1 << 20,
    )
    ds = ciphershard.Dataset(tmp_path / "ds", key_file=key, backend="cpu")
    set_bytes = rows * width * 4
    loader = ciphershard.Loader(ds, rows, shuffle=False, prefetch=2, threads=1)
    label = next(iter(loader))["label"]
    loader.close()
    del loader
    gc.collect()
    before = rss()
    del label
    gc.collect()
    released = before - rss()
    # Before the fix, freeing the label freed the whole pool: four sets of 36 MiB.
    assert 0.5 * set_bytes < released < 1.5 * set_bytes, released / set_bytes


def run_in_child(child, timeout: float = 30.0) -> int:
    """Runs `child()` in a forked process and returns its exit code (its return value; 98 for
    an exception); a child still running after `timeout` seconds is killed and fails the test."""
    pid = os.fork()
    if pid == 0:
        code = 98
        try:
            code = child()
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.01)


def test_forked_child_is_refused_cleanly(data):
    loader = ciphershard.Loader(data.open(), 50, seed=3, threads=2)
    it = iter(loader)
    batch = next(it)
    expected = np.from_dlpack(batch["row_id"]).tolist()

    def every_use_refused() -> int:
        uses = [lambda: next(it), lambda: len(loader), loader.state_dict, loader.stats,
                lambda: iter(loader), lambda: loader.load_state_dict(loader_state)]
        for i, use in enumerate(uses):
            try:
                use()
            except ciphershard.LoaderStoppedError as e:
                if "fork" not in str(e):
                    return 10 + i
            else:
                return 20 + i
        return 0

    def close_and_delete() -> int:
        nonlocal batch, loader, it
        loader.close()
        loader.close()
        assert np.from_dlpack(batch["row_id"]).tolist() == expected  # inherited tensors stay readable
        del batch, it, loader
        gc.collect()
        return 0

    loader_state = loader.state_dict()
    assert run_in_child(every_use_refused) == 0
    assert run_in_child(close_and_delete) == 0
    # The parent's loader is untouched.
    assert next(it)["row_id"].shape == (50,)
    assert loader.state_dict()["loader"]["batches_done_in_epoch"] == 2


def test_forked_child_exits_normally(data):
    """A child that simply ends (interpreter shutdown drops the inherited loader)."""
    script = textwrap.dedent(f"""
        import os, signal, sys, ciphershard
        ds = ciphershard.Dataset({str(data.path)!r}, key_file={str(data.key_file)!r}, backend="cpu")
        loader = ciphershard.Loader(ds, 50, threads=2)
        it = iter(loader)
        batch = next(it)
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)  # a hung child ends (SIGALRM's default action) instead of lingering
            try:
                next(it)
            except ciphershard.LoaderStoppedError:
                sys.exit(0)     # finalization drops `loader` and `batch` in the child
            sys.exit(3)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Panic" not in r.stderr and "panicked" not in r.stderr, r.stderr
