"""DLPack hand-off: no copy, and a buffer returns to the pool only when its last view dies."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import ciphershard
from ciphershard import _ciphershard as native

PAGE = 4096
# NumPy >= 2.1 imports versioned DLPack capsules as writable arrays and takes copy=; older
# releases mark DLPack imports read-only.
NEW_NUMPY = np.lib.NumpyVersion(np.__version__) >= "2.1.0"


def live_exports() -> int:
    gc.collect()
    return native._live_dlpack_exports()


def test_numpy_views_the_pool_buffer(data):
    loader = ciphershard.Loader(data.open(), 64, shuffle=False)
    batch = next(iter(loader))
    for name, t in batch.items():
        arr = np.from_dlpack(t)
        # The array's memory is the loader's page-aligned batch buffer, not a copy.
        assert arr.ctypes.data == t.data_ptr(), name
        assert t.data_ptr() % PAGE == 0, name
        assert arr.flags.c_contiguous
        assert arr.flags.writeable or not NEW_NUMPY
    if not NEW_NUMPY:
        return
    # Writes through one view are seen by another: same memory.
    a = np.from_dlpack(batch["features"])
    b = np.from_dlpack(batch["features"])
    a[0, 0] = 1234.5
    assert b[0, 0] == np.float32(1234.5)


def test_pool_buffers_are_recycled_when_views_die(data):
    """Addresses repeat once batches are released: batches live in a fixed pool."""
    prefetch, threads = 2, 1
    loader = ciphershard.Loader(data.open(), 50, prefetch=prefetch, threads=threads, epochs=3)
    addresses = set()
    n = 0
    for batch in loader:
        addresses.add(batch["features"].data_ptr())
        n += 1
        del batch
    assert n == 3 * 40
    # The loader keeps prefetch + threads batches in flight, plus the one the consumer holds:
    # a handful of buffer sets serve 120 batches.
    assert len(addresses) <= prefetch + threads + 2, len(addresses)


def test_views_keep_batches_alive_and_are_not_reused(data):
    loader = ciphershard.Loader(data.open(), 50, prefetch=2, threads=1, shuffle=False, epochs=2)
    it = iter(loader)
    kept = []
    for i in range(5):
        batch = next(it)
        kept.append((i, np.from_dlpack(batch["features"]), np.from_dlpack(batch["row_id"])))
    held = {arr.ctypes.data for _, arr, _ in kept}
    # Later batches never land in a buffer that a live view still points to.
    for batch in it:
        assert batch["features"].data_ptr() not in held
    for i, feats, ids in kept:
        np.testing.assert_array_equal(ids, np.arange(i * 50, i * 50 + 50))
        np.testing.assert_array_equal(feats, data.columns["features"][ids])


def test_tensors_outlive_the_loader_and_dataset(data):
    ds = data.open()
    loader = ciphershard.Loader(ds, 100, shuffle=False)
    batch = next(iter(loader))
    arrays = {k: np.from_dlpack(v) for k, v in batch.items()}
    before = live_exports()
    assert before >= len(arrays)
    loader.close()
    del loader, ds, batch
    gc.collect()
    for name, arr in arrays.items():
        np.testing.assert_array_equal(arr, data.columns[name][:100], err_msg=name)
    del arrays, arr  # the loop variable holds a view too
    assert live_exports() == before - 6


def test_every_export_is_released_exactly_once(data):
    base = live_exports()
    t = ciphershard.Tensor.from_bytes(np.arange(12, dtype=np.int32).tobytes(), "int32", [3, 4])
    caps = [t.__dlpack__(), t.__dlpack__(max_version=(1, 0))]
    assert live_exports() == base + 2
    del caps  # never consumed: the capsule destructors free them
    assert live_exports() == base
    a = np.from_dlpack(t)
    assert live_exports() == base + 1
    del a
    assert live_exports() == base


def test_dlpack_protocol_options():
    src = np.arange(6, dtype=np.float64).reshape(2, 3)
    t = ciphershard.Tensor.from_bytes(src.tobytes(), "float64", [2, 3])
    np.testing.assert_array_equal(np.from_dlpack(t), src)
    if NEW_NUMPY:
        copied = np.from_dlpack(t, copy=True)
        assert copied.ctypes.data != t.data_ptr()
        np.testing.assert_array_equal(copied, src)
    with pytest.raises(BufferError):
        t.__dlpack__(dl_device=(2, 0))
    with pytest.raises(BufferError):
        t.__dlpack__(stream=5)
    cap = t.__dlpack__(max_version=(1, 0))
    assert "dltensor_versioned" in repr(cap)
    assert "dltensor" in repr(t.__dlpack__())
    with pytest.raises(ValueError):
        ciphershard.Tensor.from_bytes(b"123", "float32", [1])


def test_numpy_dtypes_through_dlpack():
    for dtype in ["float64", "float32", "float16", "int64", "int32", "int16", "int8",
                  "uint8", "uint16", "uint32", "uint64", "bool"]:
        src = (np.arange(8) % 2).astype(dtype)
        t = ciphershard.Tensor.from_bytes(src.tobytes(), dtype, [8])
        out = np.from_dlpack(t)
        assert out.dtype == src.dtype
        np.testing.assert_array_equal(out, src)


def test_batches_are_writable_and_private(data):
    """Batches are writable (documented): each owns its buffer, so a write to one batch never
    shows in another, neither in batches alive beside it nor in later ones reusing its buffer."""
    if not NEW_NUMPY:
        pytest.skip("this NumPy imports DLPack read-only")
    ds = data.open()
    names = list(data.columns)
    ref = [{n: np.from_dlpack(b[n]).copy() for n in names} for b in ciphershard.Loader(ds, 64, seed=8)]
    kept = []
    for i, b in enumerate(ciphershard.Loader(ds, 64, seed=8, prefetch=2, threads=2)):
        for n in names:
            arr = np.from_dlpack(b[n])
            np.testing.assert_array_equal(arr, ref[i][n], err_msg=f"batch {i} {n}")
            arr[...] = ~ref[i][n] if arr.dtype == np.bool_ else ref[i][n] + 1
        if i % 3 == 0:
            kept.append((i, b))  # alive beside the next ones; the others are recycled
    assert len(ref) == 32
    for i, b in kept:
        f = np.from_dlpack(b["features"])
        np.testing.assert_array_equal(f, ref[i]["features"] + 1)
