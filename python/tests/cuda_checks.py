"""Device-batch checks shared by test_cuda.py (pytest) and run_cuda_check.py (the standalone
GPU-box runner). Each check raises AssertionError with a message on failure.

Needs torch with CUDA and a ciphershard build with the ``cuda`` feature.
"""

from __future__ import annotations

import pathlib

import numpy as np

import ciphershard


def cuda_unavailable_reason() -> str | None:
    """Why the device checks cannot run here, or None when they can."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    for name, ok, why in ciphershard.backends():
        if name == "cuda":
            return None if ok else f"ciphershard's cuda backend is unavailable: {why}"
    return "this ciphershard build has no cuda backend"


def make_columns(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "features": rng.standard_normal((rows, 16)).astype(np.float32),
        "label": rng.integers(0, 10, rows).astype(np.int64),
        "pixels": rng.integers(0, 256, (rows, 3, 2)).astype(np.uint8),
        "half": rng.standard_normal((rows, 2)).astype(np.float16),
    }


def make_dataset(root: pathlib.Path, name: str, rows: int = 3000, seed: int = 0, **kw):
    """An encrypted dataset under ``root/name``: returns (path, key_file, columns)."""
    key_file = root / f"{name}.key"
    ciphershard.generate_key(key_file)
    path = root / name
    columns = make_columns(rows, seed)
    kw.setdefault("chunk_size", 4096)
    kw.setdefault("shard_size", 64 << 10)
    ciphershard.convert(columns, out=path, key_file=key_file, **kw)
    return path, key_file, columns


def _host_batches(path, key_file, **kw):
    ds = ciphershard.Dataset(path, key_file=key_file, backend="cpu")
    out = []
    for batch in ciphershard.Loader(ds, backend="cpu", **kw):
        out.append({k: np.array(t.numpy(), copy=True) for k, t in batch.items()})
    return out


def _as_numpy(t) -> np.ndarray:
    import torch

    x = torch.from_dlpack(t).cpu()
    if x.dtype == torch.bfloat16:
        x = x.view(torch.int16)
    return x.numpy()


def check_equal_to_host(path, key_file) -> None:
    """Device batches equal the host loader's for the same seed, over two epochs."""
    kw = dict(batch_size=128, shuffle=True, seed=7, epochs=2)
    host = _host_batches(path, key_file, **kw)
    ds = ciphershard.Dataset(path, key_file=key_file)
    dev = ciphershard.Loader(ds, device="cuda", **kw)
    n = 0
    for i, batch in enumerate(dev):
        assert i < len(host), "device loader yielded more batches than the host loader"
        assert set(batch) == set(host[i]), f"batch {i}: columns {set(batch)} != {set(host[i])}"
        for name, t in batch.items():
            assert t.device == "cuda:0", f"batch {i} {name}: device {t.device}"
            assert t.__dlpack_device__() == (2, 0), f"{name}: {t.__dlpack_device__()}"
            got = _as_numpy(t)
            assert got.shape == host[i][name].shape, f"batch {i} {name}: shape {got.shape}"
            assert np.array_equal(got, host[i][name]), f"batch {i} column {name} differs"
        n += 1
    assert n == len(host), f"device loader yielded {n} batches, host {len(host)}"


def check_zero_copy(path, key_file) -> None:
    """torch.from_dlpack views the loader's device buffer: same data pointer, no copy."""
    import torch

    ds = ciphershard.Dataset(path, key_file=key_file)
    loader = ciphershard.Loader(ds, 64, device="cuda", shuffle=False)
    batch = next(iter(loader))
    for name, t in batch.items():
        x = torch.from_dlpack(t)
        assert x.is_cuda and x.device.index == 0, f"{name}: {x.device}"
        assert x.data_ptr() == t.data_ptr(), f"{name}: {x.data_ptr():#x} != {t.data_ptr():#x}"
        assert x.data_ptr() != 0
    # The stream protocol: explicit streams, -1, and rejected values.
    t = batch["features"]
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = torch.from_dlpack(t)  # torch passes its current stream (s)
        z = y * 2
    torch.cuda.synchronize()
    assert y.data_ptr() == t.data_ptr(), "export on a side stream copied"
    assert torch.equal(z, torch.from_dlpack(t) * 2), "read on a side stream differs"
    capsule = t.__dlpack__(stream=-1)
    del capsule
    try:
        t.__dlpack__(stream=0)
    except BufferError:
        pass
    else:
        raise AssertionError("stream=0 must be rejected for CUDA (ambiguous)")
    try:
        t.__dlpack__(copy=True)
    except BufferError:
        pass
    else:
        raise AssertionError("copy=True must be rejected for a device tensor")
    loader.close()


def check_kept_tensors_stay_valid(path, key_file) -> None:
    """Tensors kept after their loader is dropped (and while later batches reuse the pool)
    keep their values, including while torch kernels still read them on a busy stream."""
    import torch

    kw = dict(batch_size=100, shuffle=True, seed=3, epochs=3)
    host = _host_batches(path, key_file, **kw)
    ds = ciphershard.Dataset(path, key_file=key_file)
    loader = ciphershard.Loader(ds, device="cuda", **kw)
    it = iter(loader)
    kept = []
    for i in range(3):
        b = next(it)
        kept.append((i, torch.from_dlpack(b["features"]), b["label"]))
    # Queue slow work on a side stream that reads a batch, then drop every reference to it:
    # the pool must not reuse that buffer before the queued kernels ran.
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        b = next(it)
        x = torch.from_dlpack(b["features"])
        torch.cuda._sleep(1_000_000_000)  # about half a second of GPU time before the read
        result = x.clone()
        del x, b
    # Many more batches: the pool recycles buffers while `side` is still busy.
    later = [next(it) for _ in range(25)]
    side.synchronize()
    expect = torch.from_numpy(host[3]["features"]).cuda()
    assert torch.equal(result, expect), "a released buffer was overwritten before the consumer stream read it"
    del later, loader, it
    for i, feats, label in kept:
        assert np.array_equal(feats.cpu().numpy(), host[i]["features"]), f"kept batch {i} features changed"
        assert np.array_equal(_as_numpy(label), host[i]["label"]), f"kept batch {i} label changed"


def check_tamper(path, key_file) -> None:
    """A flipped byte in a chunk raises IntegrityError from the device loader; no batch with
    unverified bytes comes out."""
    info = ciphershard.inspect(path)
    shard = pathlib.Path(path) / info["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x01  # inside the last chunk of the last tensor
    shard.write_bytes(bytes(data))
    ds = ciphershard.Dataset(path, key_file=key_file)  # headers intact
    loader = ciphershard.Loader(ds, 50, device="cuda", shuffle=False)
    try:
        for _ in loader:
            pass
    except ciphershard.IntegrityError as e:
        assert info["shards"][0]["file"] in str(e), f"error does not name the shard: {e}"
    else:
        raise AssertionError("tampered chunk: no IntegrityError from the device loader")


def _current_cuda_context() -> int:
    """The calling thread's current CUDA context handle (0: none), from the driver itself."""
    import ctypes

    cuda = ctypes.CDLL("libcuda.so.1")
    ctx = ctypes.c_void_p()
    rc = cuda.cuCtxGetCurrent(ctypes.byref(ctx))
    assert rc == 0, f"cuCtxGetCurrent failed with CUresult {rc}"
    return ctx.value or 0


def check_release_leaves_thread_context(path, key_file) -> None:
    """A thread that drops the last view of a device batch keeps the CUDA context it had (here:
    none), so a release on a thread that works on another GPU does not switch its device."""
    import threading

    import torch

    ds = ciphershard.Dataset(path, key_file=key_file)
    loader = ciphershard.Loader(ds, batch_size=100, device="cuda", shuffle=False)
    it = iter(loader)
    box = {"batch": next(it)}
    box["view"] = torch.from_dlpack(box["batch"]["features"])
    torch.cuda.synchronize()
    seen = {}

    def release() -> None:
        try:
            seen["before"] = _current_cuda_context()
            box.clear()  # the last references: the deleters run on this thread
            seen["after"] = _current_cuda_context()
        except BaseException as e:  # reported below, in the checking thread
            seen["error"] = e

    t = threading.Thread(target=release)
    t.start()
    t.join(60)
    assert not t.is_alive(), "releasing a device batch hung"
    if "error" in seen:
        raise seen["error"]
    assert seen["after"] == seen["before"], (
        f"releasing a device batch changed the thread's current context: {seen['before']:#x} -> {seen['after']:#x}"
    )
    next(it)  # the loader goes on after the release
    loader.close()


def check_per_thread_stream_release_on_other_thread(path, key_file) -> None:
    """An export for the per-thread default stream (stream=2) released by another thread: the
    buffer is not reused before the exporting thread's queued kernels read it."""
    import threading

    import torch

    kw = dict(batch_size=100, shuffle=True, seed=5, epochs=3)
    host = _host_batches(path, key_file, **kw)
    ds = ciphershard.Dataset(path, key_file=key_file)
    loader = ciphershard.Loader(ds, device="cuda", **kw)
    it = iter(loader)
    b = next(it)
    capsule = b["features"].__dlpack__(stream=2)
    x = torch.utils.dlpack.from_dlpack(capsule)
    # This thread's per-thread default stream (handle 2), the one the export named.
    with torch.cuda.stream(torch.cuda.ExternalStream(2)):
        torch.cuda._sleep(1_000_000_000)  # keep the stream busy before the read below
        result = x.clone()
        done = torch.cuda.Event()
        done.record()
    box = {"b": b, "x": x}
    del b, x, capsule
    t = threading.Thread(target=box.clear)  # the release happens on another thread
    t.start()
    t.join(60)
    later = [next(it) for _ in range(25)]  # the pool recycles buffers meanwhile
    done.synchronize()
    expect = torch.from_numpy(host[0]["features"]).cuda()
    assert torch.equal(result, expect), "a buffer released on another thread was reused before its reader ran"
    del later
    loader.close()


CHECKS = [
    check_equal_to_host,
    check_zero_copy,
    check_kept_tensors_stay_valid,
    check_release_leaves_thread_context,
    check_per_thread_stream_release_on_other_thread,
]
