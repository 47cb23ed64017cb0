"""Decrypted batches equal the arrays that were converted."""

from __future__ import annotations

import errno
import json
import pathlib

import numpy as np
import pytest

import ciphershard


def collect(loader, columns=None):
    out = []
    for batch in loader:
        out.append({k: np.from_dlpack(v).copy() for k, v in batch.items() if columns is None or k in columns})
    return out


def test_in_order_batches_equal_source(data):
    ds = data.open()
    loader = ciphershard.Loader(ds, 128, shuffle=False)
    batches = collect(loader)
    assert len(batches) == len(loader) == -(-2000 // 128)
    for name, arr in data.columns.items():
        got = np.concatenate([b[name] for b in batches])
        assert got.dtype == arr.dtype, name
        assert got.shape == arr.shape, name
        np.testing.assert_array_equal(got, arr, err_msg=name)


def test_shuffled_epoch_is_a_permutation_with_matching_rows(data):
    ds = data.open()
    loader = ciphershard.Loader(ds, 100, shuffle=True, seed=7)
    ids = []
    for batch in loader:
        rid = np.from_dlpack(batch["row_id"])
        np.testing.assert_array_equal(np.from_dlpack(batch["features"]), data.columns["features"][rid])
        np.testing.assert_array_equal(np.from_dlpack(batch["pixels"]), data.columns["pixels"][rid])
        np.testing.assert_array_equal(np.from_dlpack(batch["mask"]), data.columns["mask"][rid])
        ids.extend(rid.tolist())
    assert sorted(ids) == list(range(2000))
    assert ids != list(range(2000)), "shuffle=True kept the dataset order"


def test_same_seed_same_order_new_epoch_new_order(data):
    ds = data.open()
    a = ciphershard.Loader(ds, 100, seed=3, threads=1)
    b = ciphershard.Loader(ds, 100, seed=3, threads=2)
    ea = [np.from_dlpack(x["row_id"]).tolist() for x in a]
    eb = [np.from_dlpack(x["row_id"]).tolist() for x in b]
    assert ea == eb
    second = [np.from_dlpack(x["row_id"]).tolist() for x in a]  # next iter() = epoch 1
    assert a.epoch == 2
    assert second != ea and sorted(sum(second, [])) == list(range(2000))


def test_epochs_n_streams_every_epoch_in_one_iteration(data):
    ds = data.open()
    loader = ciphershard.Loader(ds, 500, epochs=3)
    n = sum(1 for _ in loader)
    assert n == 3 * 4
    assert sum(1 for _ in loader) == 0  # all epochs done
    assert loader.stats()["batches"] == 12


def test_tensor_metadata(data):
    ds = data.open()
    batch = next(iter(ciphershard.Loader(ds, 32, shuffle=False)))
    t = batch["pixels"]
    assert isinstance(t, ciphershard.Tensor)
    assert t.shape == (32, 3, 2) and t.dtype == "uint8" and t.ndim == 3 and len(t) == 32
    assert t.nbytes == 32 * 6 and t.device == "cpu"
    assert t.__dlpack_device__() == (1, 0)
    assert batch["half"].dtype == "float16" and batch["mask"].dtype == "bool"
    assert "Tensor(shape=[32, 3, 2], dtype=uint8, device=cpu)" in repr(t)
    np.testing.assert_array_equal(np.asarray(t), data.columns["pixels"][:32])
    assert np.asarray(t, dtype=np.float32).dtype == np.float32


def test_dataset_properties_and_inspect(data):
    ds = data.open()
    assert len(ds) == ds.rows == 2000
    assert ds.column_names == list(data.columns)
    assert ds.columns_info["features"] == {
        "dtype": "float32",
        "shape": [16],
        "encrypted": True,
        "ragged": False,
    }
    assert ds.columns_info["row_id"]["encrypted"] is False  # plain=["row_id"]
    assert ds.key_id == data.key_id and ds.backend == "cpu"
    assert ds.num_shards == data.summary["shards"] > 1
    info = ciphershard.inspect(data.path)  # no key needed
    assert info["rows"] == 2000 and info["kind"] == "dataset" and info["chunk_size"] == 4096
    assert [c["name"] for c in info["columns"]] == list(data.columns)
    assert info["key_ids"] == [data.key_id]
    assert sum(s["rows"] for s in info["shards"]) == 2000
    assert ds.verify()["chunks"] > 0


def test_inspect_has_the_cli_schema(data):
    """``ciphershard.inspect`` returns what ``ciphershard inspect --json`` prints: the same
    field names and the file format's dtype names."""
    info = ciphershard.inspect(data.path)
    assert info["schema"] == "ciphershard.inspect/1"
    assert pathlib.Path(info["dataset"]) == pathlib.Path(data.path)
    features = next(c for c in info["columns"] if c["name"] == "features")
    assert features == {
        "name": "features",
        "dtype": "F32",
        "shape": [16],
        "encrypted": True,
        "ragged": False,
    }
    assert info["shard_count"] == len(info["shards"]) and info["key_wrap"] == "A256KW"
    shard = info["shards"][0]
    assert shard["cipher"] == "AES-256-GCM" and shard["format_version"] >= 1
    assert {t["name"] for t in shard["tensors"]} == set(data.columns)
    # One shard file alone: that shard's report.
    one = ciphershard.inspect(pathlib.Path(shard["file"]))
    assert [s["file"] for s in one["shards"]] == [shard["file"]]


def test_state_dict_is_json(data):
    loader = ciphershard.Loader(data.open(), 64)
    next(iter(loader))
    s = loader.state_dict()
    assert json.loads(json.dumps(s)) == s
    assert s["loader"]["batches_done_in_epoch"] == 1


def test_stats_dict(data):
    loader = ciphershard.Loader(data.open(), 200)
    for _ in loader:
        pass
    st = loader.stats()
    assert st["batches"] == 10
    assert st["delivered_bytes"] == sum(a.nbytes for a in data.columns.values())
    assert st["decrypt"]["bytes"] > 0 and st["read"]["bytes"] >= st["decrypt"]["bytes"]
    assert st["read_amplification"] >= 1.0
    assert {"verify", "assemble", "consumer_wait_ns", "pool_bytes", "first_batch_ns"} <= st.keys()


def test_convert_rejects_bad_input(tmp_path):
    key = tmp_path / "k.key"
    ciphershard.generate_key(key)
    with pytest.raises(ciphershard.InvalidArgumentError):
        ciphershard.convert({"c": np.zeros(4, dtype=np.complex64)}, out=tmp_path / "a", key_file=key)
    with pytest.raises(ciphershard.InvalidArgumentError):
        ciphershard.convert({"c": np.float32(1.0)}, out=tmp_path / "b", key_file=key)
    with pytest.raises(ciphershard.CiphershardError):
        ciphershard.convert({"a": np.zeros(4), "b": np.zeros(5)}, out=tmp_path / "c", key_file=key)
    with pytest.raises(ciphershard.InvalidArgumentError):
        ciphershard.convert({"a": np.zeros(4)}, out=tmp_path / "d", key_file=key, chunk_size=100)
    with pytest.raises(OSError) as e:
        ciphershard.generate_key(key)  # never overwrites a key
    assert e.value.errno == errno.EEXIST and isinstance(e.value, ciphershard.DatasetIOError)


def test_threads_share_a_loader_and_a_dataset(data):
    """stats() from a monitoring thread while another iterates; two loaders opening backends."""
    import threading

    ds = data.open()
    loader = ciphershard.Loader(ds, 20, epochs=3)
    seen, errors = [], []

    def monitor():
        try:
            while len(seen) < 300:
                seen.append(loader.stats()["batches"])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def other_backend_loader():
        try:
            for _ in ciphershard.Loader(ds, 500, backend="cpu"):
                pass
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=monitor), threading.Thread(target=other_backend_loader)]
    for t in threads:
        t.start()
    n = sum(1 for _ in loader)
    for t in threads:
        t.join()
    assert not errors, errors
    assert n == 300 and loader.stats()["batches"] == 300
    assert seen == sorted(seen)


def test_convert_views_memmaps_and_npy_paths(tmp_path):
    key = tmp_path / "k.key"
    ciphershard.generate_key(key)
    base = np.arange(600, dtype=np.int32).reshape(100, 6)
    strided = base[:, ::2]  # not contiguous: converted through a C-order copy
    np.save(tmp_path / "col.npy", base * 3)
    mm = np.lib.format.open_memmap(tmp_path / "mm.npy", mode="w+", dtype=np.float64, shape=(100, 2))
    mm[:] = np.linspace(0, 1, 200).reshape(100, 2)
    ciphershard.convert({"strided": strided, "mm": mm, "file": tmp_path / "col.npy"},
                        out=tmp_path / "ds", key_file=key, chunk_size=256)
    ds = ciphershard.Dataset(tmp_path / "ds", key_file=key, backend="cpu")
    b = next(iter(ciphershard.Loader(ds, 100, shuffle=False)))
    np.testing.assert_array_equal(np.from_dlpack(b["strided"]), strided)
    np.testing.assert_array_equal(np.from_dlpack(b["mm"]), mm)
    np.testing.assert_array_equal(np.from_dlpack(b["file"]), base * 3)


def write_safetensors(path, tensors: dict) -> None:
    """A minimal safetensors writer (the format is 8-byte header length + JSON + data)."""
    names = {"float32": "F32", "int64": "I64", "uint8": "U8"}
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        data = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": names[arr.dtype.name], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def test_convert_safetensors_files_concatenates_rows(tmp_path):
    key = tmp_path / "k.key"
    ciphershard.generate_key(key)
    a = {"x": np.arange(40, dtype=np.float32).reshape(10, 4), "y": np.arange(10, dtype=np.int64)}
    b = {"x": -np.arange(20, dtype=np.float32).reshape(5, 4), "y": np.arange(10, 15, dtype=np.int64)}
    write_safetensors(tmp_path / "a.safetensors", a)
    write_safetensors(tmp_path / "b.safetensors", b)
    s = ciphershard.convert([tmp_path / "a.safetensors", str(tmp_path / "b.safetensors")],
                            out=tmp_path / "ds", key_file=key, chunk_size=64)
    assert s["rows"] == 15 and s["kind"] == "dataset"
    ds = ciphershard.Dataset(tmp_path / "ds", key_file=key, backend="cpu")
    got = next(iter(ciphershard.Loader(ds, 15, shuffle=False)))
    np.testing.assert_array_equal(np.from_dlpack(got["x"]), np.concatenate([a["x"], b["x"]]))
    np.testing.assert_array_equal(np.from_dlpack(got["y"]), np.arange(15))
