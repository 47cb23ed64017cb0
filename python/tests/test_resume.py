"""state_dict() / load_state_dict() resume exactly: same remaining batches, same contents."""

from __future__ import annotations

import json

import numpy as np
import pytest

import ciphershard


def ids_and_feats(batch):
    return np.from_dlpack(batch["row_id"]).copy(), np.from_dlpack(batch["features"]).copy()


def test_resume_mid_epoch_equals_uninterrupted_run(data):
    ds = data.open()
    full = [ids_and_feats(b) for b in ciphershard.Loader(ds, 64, seed=11, epochs=2)]
    assert len(full) == 2 * 32

    first = ciphershard.Loader(ds, 64, seed=11, epochs=2)
    it = iter(first)
    for _ in range(45):  # into the second epoch
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    first.close()

    resumed = ciphershard.Loader(ds, 64, seed=11, epochs=2, state=state)
    rest = [ids_and_feats(b) for b in resumed]
    assert len(rest) == len(full) - 45
    for (ia, fa), (ib, fb) in zip(full[45:], rest):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(fa, fb)


def test_load_state_dict_per_epoch_mode(data):
    ds = data.open()
    ref = ciphershard.Loader(ds, 100, seed=5)
    epoch0 = [ids_and_feats(b)[0] for b in ref]
    epoch1 = [ids_and_feats(b)[0] for b in ref]

    a = ciphershard.Loader(ds, 100, seed=5)
    it = iter(a)
    for _ in range(7):
        next(it)
    state = a.state_dict()
    b = ciphershard.Loader(ds, 100, seed=5)
    b.load_state_dict(state)
    got0 = [ids_and_feats(x)[0] for x in b]
    got1 = [ids_and_feats(x)[0] for x in b]
    assert [x.tolist() for x in got0] == [x.tolist() for x in epoch0[7:]]
    assert [x.tolist() for x in got1] == [x.tolist() for x in epoch1]


def test_break_and_continue_keeps_position(data):
    ds = data.open()
    ref = [ids_and_feats(b)[0].tolist() for b in ciphershard.Loader(ds, 100, seed=2)]
    loader = ciphershard.Loader(ds, 100, seed=2)
    got = []
    for b in loader:
        got.append(ids_and_feats(b)[0].tolist())
        if len(got) == 5:
            break
    for b in loader:
        got.append(ids_and_feats(b)[0].tolist())
    assert got == ref


def test_ranks_cover_the_epoch(data, monkeypatch):
    ds = data.open()
    seen = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        loader = ciphershard.Loader(ds, 50, seed=9, drop_last=True)
        assert f"rank={rank}, world_size=3" in repr(loader)
        ids = [i for b in loader for i in np.from_dlpack(b["row_id"]).tolist()]
        seen.append(set(ids))
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    assert len(seen[0]) == len(seen[1]) == len(seen[2])
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    everyone = set()
    for rank in range(3):
        loader = ciphershard.Loader(ds, 50, seed=9, rank=rank, world_size=3)
        everyone |= {i for b in loader for i in np.from_dlpack(b["row_id"]).tolist()}
    assert everyone == set(range(2000))


def test_state_saved_with_other_options_is_refused(data):
    ds = data.open()
    saved = ciphershard.Loader(ds, 256, seed=3)
    next(iter(saved))
    state = saved.state_dict()
    saved.close()
    with pytest.raises(ciphershard.InvalidArgumentError, match=r"batch_size \(state 256, options 128\)"):
        ciphershard.Loader(ds, batch_size=128, seed=3, state=state)
    with pytest.raises(ciphershard.InvalidArgumentError) as e:
        ciphershard.Loader(ds, 128, seed=4, shuffle=False, state=state)
    assert all(f in str(e.value) for f in ("batch_size", "seed", "shuffle")), e.value
    other = ciphershard.Loader(ds, 256, seed=4)
    with pytest.raises(ciphershard.InvalidArgumentError, match="seed"):
        other.load_state_dict(state)
    # Refused without harm: `other` still runs its own order from the start.
    assert len(list(other)) == 8
    resumed = ciphershard.Loader(ds, 256, seed=3, state=state)
    assert len(list(resumed)) == 7
