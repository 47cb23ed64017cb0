"""Ragged columns (rows of varying length) from Python: converted from a (values, offsets)
pair, loaded as values + int64 offsets tensors (zero-copy), and with as_torch also as a jagged
torch.nested tensor over the same memory."""

from __future__ import annotations

import numpy as np
import pytest

import ciphershard

ROWS = 500


def rows_of(rows: int = ROWS) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    lens = rng.integers(0, 40, rows)
    lens[::17] = 0
    lens[5] = 700  # one long row spanning several chunks
    return [np.arange(n, dtype=np.int32) + i * 1000 for i, n in enumerate(lens)]


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    root = tmp_path_factory.mktemp("ragged")
    key = root / "k.key"
    ciphershard.generate_key(key)
    rows = rows_of()
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    values = np.concatenate(rows)
    summary = ciphershard.convert(
        {"row_id": np.arange(ROWS, dtype=np.int64), "tokens": (values, offsets)},
        out=root / "ds",
        key_file=key,
        chunk_size=1024,
        shard_size=16 << 10,
    )
    assert summary["shards"] > 2
    return ciphershard.Dataset(root / "ds", key_file=key, backend="cpu"), rows


def test_columns_info_says_ragged(ragged):
    ds, _ = ragged
    info = ds.columns_info
    assert info["tokens"]["ragged"] is True and info["tokens"]["shape"] == []
    assert info["row_id"]["ragged"] is False


def test_batches_hold_values_and_offsets(ragged):
    ds, rows = ragged
    seen = []
    for b in ciphershard.Loader(ds, 32, seed=1):
        ids = np.from_dlpack(b["row_id"])
        values = np.from_dlpack(b["tokens"])
        offsets = np.from_dlpack(b["tokens.offsets"])
        assert offsets.dtype == np.int64 and offsets.shape == (len(ids) + 1,)
        assert offsets[0] == 0 and offsets[-1] == len(values)
        for i, g in enumerate(ids):
            np.testing.assert_array_equal(values[offsets[i] : offsets[i + 1]], rows[g])
        seen.extend(ids.tolist())
    assert sorted(seen) == list(range(ROWS))


def test_torch_nested_tensor_views_the_batch(ragged):
    torch = pytest.importorskip("torch")
    ds, rows = ragged
    b = next(iter(ciphershard.Loader(ds, 16, seed=2, as_torch=True)))
    nested = b["tokens.nested"]
    assert nested.is_nested
    # The nested tensor is built over the batch's own buffers: no copy.
    assert nested.values().data_ptr() == b["tokens"].data_ptr()
    assert nested.offsets().data_ptr() == b["tokens.offsets"].data_ptr()
    for g, row in zip(b["row_id"].tolist(), nested.unbind()):
        assert torch.equal(row, torch.from_numpy(rows[g]))


def test_bad_ragged_input_is_refused(tmp_path):
    key = tmp_path / "k.key"
    ciphershard.generate_key(key)
    with pytest.raises(ciphershard.CiphershardError, match="offsets do not"):
        ciphershard.convert(
            {"t": (np.arange(5, dtype=np.int32), np.array([0, 3, 2, 5]))},
            out=tmp_path / "ds",
            key_file=key,
        )
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_packed_batches(ragged):
    ds, rows = ragged
    loader = ciphershard.Loader(ds, 4, seed=3, pack="tokens", seq_len=64)
    total = sum(len(r) for r in rows)
    assert len(loader) == total // (4 * 64)
    seen = []
    for b in loader:
        ids = np.from_dlpack(b["tokens"])
        pos = np.from_dlpack(b["position_ids"])
        cu = np.from_dlpack(b["cu_seqlens"])
        assert ids.shape == (4, 64) and pos.shape == (4, 64)
        assert cu.dtype == np.int32 and cu[0] == 0 and cu[-1] == 4 * 64
        flat, fpos = ids.reshape(-1), pos.reshape(-1)
        for a, e in zip(cu[:-1], cu[1:]):
            assert a // 64 == (e - 1) // 64  # a piece never crosses a sequence
            np.testing.assert_array_equal(fpos[a:e], np.arange(e - a))
            np.testing.assert_array_equal(np.diff(flat[a:e]), 1)
        seen.extend(flat.tolist())
    assert len(seen) == len(set(seen)) == len(loader) * 256


def test_packing_state_resumes(ragged):
    ds, _ = ragged
    kw = dict(seed=8, pack="tokens", seq_len=32)
    full = [np.from_dlpack(b["tokens"]).copy() for b in ciphershard.Loader(ds, 2, **kw)]
    first = ciphershard.Loader(ds, 2, **kw)
    it = iter(first)
    for _ in range(5):
        next(it)
    state = first.state_dict()
    first.close()
    rest = [np.from_dlpack(b["tokens"]).copy() for b in ciphershard.Loader(ds, 2, state=state, **kw)]
    assert len(rest) == len(full) - 5
    for a, b in zip(full[5:], rest):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ciphershard.InvalidArgumentError, match="pack"):
        ciphershard.Loader(ds, 2, seed=8, state=state)


def test_token_budget_batches(ragged):
    ds, rows = ragged
    kw = dict(seed=5, budget="tokens", max_tokens=800)
    loader = ciphershard.Loader(ds, 64, **kw)  # epochs=None: each iter() one epoch
    per_epoch = []
    for _ in range(2):
        n = len(loader)  # the coming epoch's count (it varies with the order)
        seen = []
        batches = 0
        for b in loader:
            ids = np.from_dlpack(b["row_id"])
            offsets = np.from_dlpack(b["tokens.offsets"])
            assert 1 <= len(ids) <= 64 and offsets[-1] <= 800
            seen.extend(ids.tolist())
            batches += 1
        assert batches == n
        assert sorted(seen) == list(range(ROWS))
        per_epoch.append(seen)
    assert per_epoch[0] != per_epoch[1]
    # Resume mid-epoch: the rest of the epoch, exactly.
    full = [np.from_dlpack(b["row_id"]).copy() for b in ciphershard.Loader(ds, 64, epochs=1, **kw)]
    first = ciphershard.Loader(ds, 64, epochs=1, **kw)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    first.close()
    rest = [np.from_dlpack(b["row_id"]).copy() for b in ciphershard.Loader(ds, 64, epochs=1, state=state, **kw)]
    assert [r.tolist() for r in rest] == [r.tolist() for r in full[3:]]
    # Checked against the shards when the loader first plans (len, iter, state_dict).
    with pytest.raises(ciphershard.InvalidArgumentError, match="longest 700"):
        len(ciphershard.Loader(ds, 64, budget="tokens", max_tokens=100))
    with pytest.raises(ciphershard.InvalidArgumentError, match="go together"):
        ciphershard.Loader(ds, 64, budget="tokens")


@pytest.mark.parametrize("pad", ["longest", 16])
def test_padded_copies_and_masks(ragged, pad):
    ds, rows = ragged
    for b in ciphershard.Loader(ds, 8, seed=4, pad=pad):
        ids = np.from_dlpack(b["row_id"])
        dense = np.from_dlpack(b["tokens.padded"])
        mask = np.from_dlpack(b["tokens.mask"])
        width = max(len(rows[g]) for g in ids) if pad == "longest" else pad
        assert dense.shape == mask.shape == (len(ids), width)
        assert mask.dtype == np.bool_
        for i, g in enumerate(ids):
            n = min(len(rows[g]), width)
            np.testing.assert_array_equal(dense[i, :n], rows[g][:n])
            assert mask[i, :n].all() and not mask[i, n:].any()
            assert (dense[i, n:] == 0).all()
    with pytest.raises(ciphershard.InvalidArgumentError, match="pad"):
        ciphershard.Loader(ds, 8, pad="shortest")
