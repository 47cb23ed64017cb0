"""Waiting for a batch releases the GIL, and Ctrl-C interrupts the wait.

`_wait_like_next` runs the very helper `Loader.__next__` waits with, around a plain sleep, so the
checks do not depend on how fast the pipeline is; the last test checks a real loader too.
"""

from __future__ import annotations

import _thread
import signal
import threading
import time

import numpy as np
import pytest

import ciphershard
from ciphershard import _ciphershard as native


class Spinner:
    """A Python thread that counts while it gets the GIL."""

    def __init__(self):
        self.ticks = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run)

    def _run(self):
        while not self._stop:
            self.ticks += 1
            time.sleep(0.0005)

    def __enter__(self):
        self._thread.start()
        time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()


def test_the_wait_releases_the_gil():
    with Spinner() as s:
        before = s.ticks
        native._wait_like_next(0.3)
        during = s.ticks - before
    # Holding the GIL for 0.3 s would leave the other thread no tick at all.
    assert during > 20, during


@pytest.fixture()
def sigint_handler():
    """Python's KeyboardInterrupt handler for SIGINT, restored afterwards. The Ctrl-C tests
    simulate it with ``_thread.interrupt_main()``, which does nothing while SIGINT is ignored,
    as it is for a command a shell starts in the background (Python then installs no handler)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_interrupts_the_wait(sigint_handler):
    timer = threading.Timer(0.1, _thread.interrupt_main)
    t0 = time.perf_counter()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        native._wait_like_next(30)
    timer.join()
    assert time.perf_counter() - t0 < 5  # not the 30 s of the sleep


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Wide rows (64 KiB) so one batch takes a few ms to decrypt on one thread."""
    root = tmp_path_factory.mktemp("wide")
    key = root / "k.key"
    ciphershard.generate_key(key)
    ciphershard.convert({"x": np.ones((1024, 16384), dtype=np.float32)}, out=root / "ds",
                        key_file=key, chunk_size=1 << 20)
    return ciphershard.Dataset(root / "ds", key_file=key, backend="cpu")


def test_loader_interrupted_then_usable(wide, sigint_handler):
    loader = ciphershard.Loader(wide, 64, threads=1, prefetch=1, epochs=50, shuffle=False)
    it = iter(loader)
    next(it)
    timer = threading.Timer(0.05, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        for _ in it:
            pass
    timer.join()
    assert loader.stats()["batches"] < 50 * 16, "the run ended before the interrupt"
    assert next(it)["x"].shape == (64, 16384)
