"""convert from Arrow data (pyarrow Table, RecordBatch, RecordBatchReader, datasets.Dataset)
and from Parquet, Arrow IPC and JSONL paths: read in Rust through the Arrow C stream interface
or the file readers, with the Parquet type mapping, and loaded back through the Loader."""

from __future__ import annotations

import json

import numpy as np
import pytest

import ciphershard

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ROWS = 300


def sample_rows(rows: int = ROWS) -> dict[str, list]:
    rng = np.random.default_rng(7)
    lens = rng.integers(0, 30, rows)
    lens[::11] = 0
    return {
        "row_id": list(range(rows)),
        "tokens": [[i * 100 + j for j in range(n)] for i, n in enumerate(lens)],
        "text": ["" if i % 7 == 0 else f"row {i}: " + "é" * (i % 5) for i in range(rows)],
        "score": [i / 4 for i in range(rows)],
        "emb": [[i, -i, 0.5] for i in range(rows)],
    }


def sample_table(rows: int = ROWS):
    data = sample_rows(rows)
    schema = pa.schema(
        [
            ("row_id", pa.int64()),
            ("tokens", pa.list_(pa.int32())),
            ("text", pa.string()),
            ("score", pa.float32()),
            ("emb", pa.list_(pa.float32(), 3)),
        ]
    )
    return pa.Table.from_pydict(data, schema=schema)


@pytest.fixture()
def key(tmp_path):
    k = tmp_path / "k.key"
    ciphershard.generate_key(k)
    return k


def convert(data, tmp_path, key, name="ds", **kw):
    kw.setdefault("chunk_size", 1024)
    kw.setdefault("shard_size", 8 << 10)
    summary = ciphershard.convert(data, out=tmp_path / name, key_file=key, **kw)
    return summary, ciphershard.Dataset(tmp_path / name, key_file=key, backend="cpu")


def load_rows(ds) -> dict[int, dict]:
    """Every row by its row_id, ragged columns cut with NAME.offsets."""
    out: dict[int, dict] = {}
    for b in ciphershard.Loader(ds, 32, seed=3):
        ids = np.from_dlpack(b["row_id"])
        tok, tok_off = np.from_dlpack(b["tokens"]), np.from_dlpack(b["tokens.offsets"])
        txt, txt_off = np.from_dlpack(b["text"]), np.from_dlpack(b["text.offsets"])
        score, emb = np.from_dlpack(b["score"]), np.from_dlpack(b["emb"])
        for i, r in enumerate(ids.tolist()):
            assert r not in out
            out[r] = {
                "tokens": tok[tok_off[i] : tok_off[i + 1]].tolist(),
                "text": bytes(txt[txt_off[i] : txt_off[i + 1]]).decode(),
                "score": float(score[i]),
                "emb": emb[i].tolist(),
            }
    return out


def check_dataset(ds, rows: int = ROWS, first: int = 0):
    info = ds.columns_info
    assert info["tokens"] == {"dtype": "int32", "shape": [], "encrypted": True, "ragged": True}
    assert info["text"]["dtype"] == "uint8" and info["text"]["ragged"]
    assert info["score"] == {"dtype": "float32", "shape": [], "encrypted": True, "ragged": False}
    assert info["emb"]["shape"] == [3] and not info["emb"]["ragged"]
    assert ds.rows == rows
    want = sample_rows(first + rows)
    got = load_rows(ds)
    assert sorted(got) == list(range(first, first + rows))
    for r, row in got.items():
        for col in ("tokens", "text", "score", "emb"):
            assert row[col] == want[col][r], (r, col)


def test_table_round_trips(tmp_path, key):
    summary, ds = convert(sample_table(), tmp_path, key)
    assert summary["rows"] == ROWS and summary["shards"] > 1
    check_dataset(ds)


def test_table_of_several_chunks_and_a_slice(tmp_path, key):
    t = sample_table()
    chunked = pa.Table.from_batches(t.to_batches(max_chunksize=37))
    _, ds = convert(chunked.slice(10, 200), tmp_path, key)
    # Rows 10..210: row_id keeps the original numbering.
    check_dataset(ds, rows=200, first=10)


def test_record_batch_reader_and_record_batch(tmp_path, key):
    t = sample_table()
    batches = iter(t.to_batches(max_chunksize=50))
    # A reader whose batches come from Python: drained in Rust before conversion.
    reader = pa.RecordBatchReader.from_batches(t.schema, batches)
    _, ds = convert(reader, tmp_path, key, name="reader")
    check_dataset(ds)
    batch = t.combine_chunks().to_batches()[0]
    _, ds = convert(batch, tmp_path, key, name="batch")
    check_dataset(ds)


def test_hf_dataset(tmp_path, key):
    datasets = pytest.importorskip("datasets")
    data = sample_rows()
    hf = datasets.Dataset.from_dict(data)
    # datasets stores these lists as list<int64>/list<double>; emb stays a variable list.
    _, ds = convert(hf, tmp_path, key, name="hf")
    info = ds.columns_info
    assert info["tokens"]["dtype"] == "int64" and info["tokens"]["ragged"]
    assert ds.rows == ROWS
    # Its indices mapping (select, shuffle) is applied: rows in the selected order.
    sub = hf.select([5, 3, 9])
    _, ds = convert(sub, tmp_path, key, name="sub")
    assert ds.rows == 3
    b = next(iter(ciphershard.Loader(ds, 3, shuffle=False)))
    assert np.from_dlpack(b["row_id"]).tolist() == [5, 3, 9]
    toks, off = np.from_dlpack(b["tokens"]), np.from_dlpack(b["tokens.offsets"])
    assert toks[off[1] : off[2]].tolist() == data["tokens"][3]


def test_parquet_arrow_and_jsonl_paths(tmp_path, key):
    t = sample_table()
    pq.write_table(t.slice(0, 100), tmp_path / "a.parquet")
    pq.write_table(t.slice(100), tmp_path / "b.parquet")
    _, ds = convert(str(tmp_path / "a.parquet"), tmp_path, key, name="one")
    check_dataset(ds, rows=100)
    # A list is appended by rows; Arrow data and files mix.
    _, ds = convert([tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path, key, name="two")
    check_dataset(ds)
    _, ds = convert([t.slice(0, 100), tmp_path / "b.parquet"], tmp_path, key, name="mix")
    check_dataset(ds)
    with pa.OSFile(str(tmp_path / "t.arrow"), "wb") as f:
        with pa.ipc.new_file(f, t.schema) as w:
            w.write_table(t)
    _, ds = convert(tmp_path / "t.arrow", tmp_path, key, name="ipc")
    check_dataset(ds)
    jl = tmp_path / "t.jsonl"
    jl.write_text("".join(json.dumps({"ids": [i] * (i % 4), "x": "skip"}) + "\n" for i in range(9)))
    _, ds = convert(jl, tmp_path, key, name="jsonl", columns=["ids"])
    assert ds.rows == 9 and ds.columns_info["ids"]["ragged"]
    with pytest.raises(ciphershard.InvalidArgumentError, match="columns="):
        convert(jl, tmp_path, key, name="nocols")
    with pytest.raises(ciphershard.InvalidArgumentError, match="only to JSONL"):
        convert(t, tmp_path, key, name="badcols", columns=["ids"])


def test_nulls_and_structs_are_refused_naming_the_column(tmp_path, key):
    t = pa.table({"a": pa.array([1, 2, None, 4], pa.int32())})
    with pytest.raises(ciphershard.CiphershardError, match=r"<pyarrow.Table>: column 'a' has a null at row 2"):
        convert(t, tmp_path, key, name="nulls")
    inner = pa.table({"l": pa.array([[1], [2, None]], pa.list_(pa.int32()))})
    with pytest.raises(ciphershard.CiphershardError, match=r"column 'l' has a null at row 1"):
        convert(inner, tmp_path, key, name="inner")
    s = pa.table({"ok": [1, 2], "st": [{"x": 1}, {"x": 2}]})
    with pytest.raises(ciphershard.CiphershardError, match=r"column 'st' has Arrow type Struct"):
        convert(s, tmp_path, key, name="struct")
    # The same refusal from a Parquet file names the file.
    pq.write_table(s, tmp_path / "s.parquet")
    with pytest.raises(ciphershard.CiphershardError, match=r"s\.parquet: column 'st' has Arrow type Struct"):
        convert(tmp_path / "s.parquet", tmp_path, key, name="pqstruct")
    # Nothing was written for the refused inputs.
    assert not (tmp_path / "nulls" / "manifest.json").exists()


def test_other_objects_are_refused(tmp_path, key):
    with pytest.raises(ciphershard.InvalidArgumentError, match="not a int"):
        convert(3, tmp_path, key)
