"""Typed exceptions with the CLI's messages; keys never in repr or messages."""

from __future__ import annotations

import os

import numpy as np
import pytest

import ciphershard


def key_hex(path) -> str:
    return open(path).read().strip()


def test_wrong_key_is_a_key_error(fresh_data, tmp_path):
    other = tmp_path / "other.key"
    other_id = ciphershard.generate_key(other)
    with pytest.raises(ciphershard.WrongKeyError) as e:
        ciphershard.Dataset(fresh_data.path, key_file=other, backend="cpu")
    err = e.value
    assert isinstance(err, KeyError) and isinstance(err, ciphershard.CiphershardError)
    assert err.key_id == other_id
    assert fresh_data.key_id in err.available
    msg = str(err)
    assert "wrong key" in msg and other_id in msg
    assert not msg.startswith("'"), "KeyError must not quote the message"
    for k in (key_hex(other), key_hex(fresh_data.key_file)):
        assert k not in msg and k not in repr(err)


def flip_byte(path, offset_from_end):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size - offset_from_end)
        b = f.read(1)
        f.seek(size - offset_from_end)
        f.write(bytes([b[0] ^ 0x01]))


def test_tampered_chunk_raises_integrity_error(fresh_data):
    info = ciphershard.inspect(fresh_data.path)
    shard = fresh_data.path / info["shards"][0]["file"]
    flip_byte(shard, 10)  # inside the last chunk of the last tensor
    ds = fresh_data.open()  # headers are intact
    loader = ciphershard.Loader(ds, 50, shuffle=False)
    with pytest.raises(ciphershard.IntegrityError) as e:
        for _ in loader:
            pass
    err = e.value
    assert err.path == str(shard) or err.path.endswith(info["shards"][0]["file"])
    assert err.tensor in fresh_data.columns and isinstance(err.chunk, int)
    assert "integrity check failed" in str(err) and info["shards"][0]["file"] in str(err)
    # The loader stopped cleanly; its state points at the failed batch.
    assert loader.state_dict()["loader"]["epoch"] == 0
    with pytest.raises(ciphershard.IntegrityError):
        ds.verify()


def test_tampered_header_fails_at_open(fresh_data):
    info = ciphershard.inspect(fresh_data.path)
    shard = fresh_data.path / info["shards"][0]["file"]
    with open(shard, "r+b") as f:
        f.seek(20)
        b = f.read(1)
        f.seek(20)
        f.write(bytes([b[0] ^ 0x20]))
    with pytest.raises((ciphershard.IntegrityError, ciphershard.FormatError)) as e:
        fresh_data.open()
    assert info["shards"][0]["file"] in str(e.value)


def test_key_sources(fresh_data, tmp_path, monkeypatch):
    monkeypatch.setenv("CS_TEST_KEY", str(fresh_data.key_file))
    ds = ciphershard.Dataset(fresh_data.path, key_env="CS_TEST_KEY", backend="cpu")
    assert ds.key_id == fresh_data.key_id
    assert key_hex(fresh_data.key_file) not in repr(ds)
    with pytest.raises(ciphershard.KeySourceError):
        ciphershard.Dataset(fresh_data.path, backend="cpu")
    with pytest.raises(ciphershard.KeySourceError):
        ciphershard.Dataset(fresh_data.path, key_env="CS_TEST_UNSET_VAR", backend="cpu")
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    with pytest.raises(ciphershard.KeySourceError) as e:
        ciphershard.Dataset(fresh_data.path, key_file=bad, backend="cpu")
    assert "bad.key" in str(e.value)
    with pytest.raises(ciphershard.DatasetIOError) as e:
        ciphershard.Dataset(fresh_data.path, key_file=tmp_path / "missing.key", backend="cpu")
    assert isinstance(e.value, OSError) and "missing.key" in str(e.value)


HEX_KEY = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
B64_KEY = "ABEiM0RVZneImaq7zN3u/wARIjNEVWZ3iJmqu8zd7v8="


@pytest.mark.parametrize("secret", [HEX_KEY, HEX_KEY.upper() + "\n", B64_KEY])
def test_a_key_given_as_a_key_source_is_refused_unrepeated(fresh_data, monkeypatch, secret):
    """A key pasted where a key file (or a variable naming one) is expected: refused, and the
    message (which ends up in tracebacks and logs) does not repeat it."""
    monkeypatch.setenv("CS_TEST_KEY", secret)
    attempts = [
        lambda: ciphershard.Dataset(fresh_data.path, key_file=secret, backend="cpu"),
        lambda: ciphershard.Dataset(fresh_data.path, key_env="CS_TEST_KEY", backend="cpu"),
        lambda: ciphershard.Dataset(fresh_data.path, key_env=secret, backend="cpu"),
        lambda: ciphershard.convert({"x": np.zeros((4, 2), np.float32)},
                                    out=fresh_data.path.parent / "new", key_file=secret),
    ]
    for attempt in attempts:
        with pytest.raises(ciphershard.KeySourceError) as e:
            attempt()
        text = str(e.value) + repr(e.value) + repr(e.value.args)
        assert "looks like a key" in str(e.value)
        assert secret.strip() not in text and secret.strip()[:16] not in text, text


def test_key_files_that_are_not_regular_files_are_refused_unread(fresh_data, tmp_path):
    for path in ("/dev/zero", tmp_path):
        with pytest.raises(ciphershard.KeySourceError) as e:
            ciphershard.Dataset(fresh_data.path, key_file=path, backend="cpu")
        assert "not a regular file" in str(e.value)
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)  # nobody writes to it: a blocking open would hang
    with pytest.raises(ciphershard.KeySourceError):
        ciphershard.Dataset(fresh_data.path, key_file=fifo, backend="cpu")
    big = tmp_path / "big.key"
    big.write_bytes(b" " * 5000)
    with pytest.raises(ciphershard.KeySourceError) as e:
        ciphershard.Dataset(fresh_data.path, key_file=big, backend="cpu")
    assert "more than 4096 bytes" in str(e.value)


def test_not_a_dataset(tmp_path, fresh_data):
    with pytest.raises(ciphershard.CiphershardError) as e:
        ciphershard.inspect(tmp_path / "nothing-here")
    assert "nothing-here" in str(e.value)
    (fresh_data.path / "manifest.json").write_text("{not json")
    with pytest.raises(ciphershard.FormatError) as e:
        ciphershard.inspect(fresh_data.path)
    assert "manifest.json" in str(e.value) and isinstance(e.value, ValueError)


def test_invalid_arguments(fresh_data):
    ds = fresh_data.open()
    with pytest.raises(ciphershard.InvalidArgumentError):
        ciphershard.Loader(ds, 0)
    with pytest.raises(ciphershard.InvalidArgumentError):
        ciphershard.Loader(ds, 8, rank=2, world_size=2)
    with pytest.raises(ciphershard.InvalidArgumentError):
        ciphershard.Dataset(fresh_data.path, key_file=fresh_data.key_file, backend="tpu")
    with pytest.raises(ciphershard.InvalidArgumentError):
        ciphershard.Loader(ds, 8).load_state_dict({"format": "something else"})
    with pytest.raises(ciphershard.InvalidArgumentError):
        ciphershard.Loader(ds, 8).load_state_dict({"format": "ciphershard.loader_state/1", "loader": {}})


def test_closed_loader(fresh_data):
    loader = ciphershard.Loader(fresh_data.open(), 8)
    with loader:
        next(iter(loader))
    with pytest.raises(ciphershard.LoaderStoppedError):
        next(loader)


def test_hierarchy():
    for cls in (ciphershard.IntegrityError, ciphershard.WrongKeyError, ciphershard.FormatError,
                ciphershard.BackendError, ciphershard.KeySourceError, ciphershard.DatasetIOError,
                ciphershard.InvalidArgumentError, ciphershard.LoaderStoppedError):
        assert issubclass(cls, ciphershard.CiphershardError)
    assert issubclass(ciphershard.WrongKeyError, KeyError)
    assert issubclass(ciphershard.FormatError, ValueError)
    assert issubclass(ciphershard.DatasetIOError, OSError)
    assert issubclass(ciphershard.BackendError, RuntimeError)


def test_backend_advice_is_for_python(fresh_data):
    # Where CUDA is missing, the advice names the Python argument, not the CLI option.
    try:
        ciphershard.Dataset(fresh_data.path, key_file=fresh_data.key_file, backend="cuda")
    except ciphershard.BackendError as e:
        msg = str(e)
        assert "--backend" not in msg, msg
        if "cpu" in msg:
            assert 'backend="cpu"' in msg, msg
    else:
        pytest.skip("CUDA is available here: no advice to check")


def test_backends_listing_advises_the_python_argument():
    for name, ok, why in ciphershard.backends():
        assert "--backend" not in why, (name, why)
