"""JAX imports batches through DLPack without a copy."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import ciphershard

jax = pytest.importorskip("jax")


def test_jax_from_dlpack_is_zero_copy(data):
    loader = ciphershard.Loader(data.open(), 64, shuffle=False)
    batch = next(iter(loader))
    x = jax.dlpack.from_dlpack(batch["features"])
    assert x.shape == (64, 16) and x.dtype == np.float32
    assert x.unsafe_buffer_pointer() == batch["features"].data_ptr()
    np.testing.assert_array_equal(np.asarray(x), data.columns["features"][:64])
    # Without jax_enable_x64, JAX converts int64 to int32 (its own copy); values still match.
    y = jax.numpy.from_dlpack(batch["label"])
    np.testing.assert_array_equal(np.asarray(y), data.columns["label"][:64])
    loader.close()
    del loader, batch
    gc.collect()
    np.testing.assert_array_equal(np.asarray(x), data.columns["features"][:64])
