"""CUDA device batches through DLPack (``Loader(..., device="cuda")``).

Skipped, with the reason, where torch sees no CUDA device or this build has no CUDA backend.
The same checks run standalone on a GPU box with ``python3 python/tests/run_cuda_check.py``.
"""

from __future__ import annotations

import pytest

import ciphershard

from cuda_checks import (
    check_equal_to_host,
    check_kept_tensors_stay_valid,
    check_per_thread_stream_release_on_other_thread,
    check_release_leaves_thread_context,
    check_tamper,
    check_zero_copy,
    cuda_unavailable_reason,
    make_dataset,
)

_reason = cuda_unavailable_reason()
needs_cuda = pytest.mark.skipif(_reason is not None, reason=f"no CUDA device batches here: {_reason}")


@pytest.fixture(scope="module")
def cuda_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("cuda"), "ds")[:2]


@needs_cuda
def test_device_batches_equal_host_batches(cuda_data):
    check_equal_to_host(*cuda_data)


@needs_cuda
def test_zero_copy_and_stream_protocol(cuda_data):
    check_zero_copy(*cuda_data)


@needs_cuda
def test_kept_tensors_stay_valid(cuda_data):
    check_kept_tensors_stay_valid(*cuda_data)


@needs_cuda
def test_release_leaves_thread_context(cuda_data):
    check_release_leaves_thread_context(*cuda_data)


@needs_cuda
def test_per_thread_stream_release_on_other_thread(cuda_data):
    check_per_thread_stream_release_on_other_thread(*cuda_data)


@needs_cuda
def test_tamper_raises_integrity_error(tmp_path):
    check_tamper(*make_dataset(tmp_path, "bad", rows=500, chunk_size=1024, shard_size=16 << 10)[:2])


def test_device_argument_is_checked(tmp_path):
    """Runs everywhere: bad `device`/`backend` combinations fail clearly at construction."""
    path, key_file, _ = make_dataset(tmp_path, "arg", rows=50)
    ds = ciphershard.Dataset(path, key_file=key_file, backend="cpu")
    with pytest.raises(ciphershard.InvalidArgumentError, match="device"):
        ciphershard.Loader(ds, 8, device="tpu")
    with pytest.raises(ciphershard.InvalidArgumentError, match="backend"):
        ciphershard.Loader(ds, 8, device="cuda", backend="cpu")
    # device="cpu" is the host loader.
    assert next(iter(ciphershard.Loader(ds, 8, device="cpu")))["label"].device == "cpu"
