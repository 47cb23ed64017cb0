#!/usr/bin/env python3
"""Writes the seeds of the `records` fuzz target (fuzz/fuzz_targets/records.rs) into
fuzz/seeds/records/: small valid files of each row-batch input, as pyarrow writes them (the
writer most datasets come from), each prefixed by the target's selector byte (0 Parquet,
1 Arrow IPC, 2 JSONL). The files are committed; rerun this only to change them.

    pip install pyarrow
    python3 scripts/fuzz_seeds_records.py
"""
import io
import json
import os

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fuzz", "seeds", "records")


def table():
    """Three rows: token ids of varying length (one empty), a string, a fixed-size list."""
    return pa.table({
        "input_ids": pa.array([[1, 2, 3], [], [70000, 5]], pa.list_(pa.int32())),
        "text": pa.array(["ab", "", "héllo"]),
        "label": pa.array([[0, 1], [2, 3], [4, 5]], pa.list_(pa.int8(), 2)),
    })


def parquet(compression, dictionary):
    buf = io.BytesIO()
    # Two row groups, so the reader crosses one.
    pq.write_table(table(), buf, compression=compression, use_dictionary=dictionary,
                   row_group_size=2, write_statistics=False)
    return buf.getvalue()


def arrow(stream, compression=None):
    buf = io.BytesIO()
    opts = ipc.IpcWriteOptions(compression=compression)
    t = table()
    w = (ipc.new_stream if stream else ipc.new_file)(buf, t.schema, options=opts)
    for b in t.to_batches(max_chunksize=2):
        w.write_batch(b)
    w.close()
    return buf.getvalue()


def jsonl():
    rows = [{"input_ids": [1, 2, 3], "text": "ab"}, {"input_ids": []},
            {"other": {"x": [1]}, "input_ids": [-5, 2147483648]}]
    return "\n".join(json.dumps(r) for r in rows).encode() + b"\n\n"


def main():
    os.makedirs(OUT, exist_ok=True)
    seeds = {
        "parquet-snappy": (0, parquet("snappy", True)),
        "parquet-plain": (0, parquet("none", False)),
        "arrow-file": (1, arrow(False)),
        "arrow-stream": (1, arrow(True)),
        "arrow-stream-lz4": (1, arrow(True, "lz4")),
        "jsonl": (2, jsonl()),
    }
    for name, (selector, data) in seeds.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(bytes([selector]) + data)
        print(f"{name}: {len(data) + 1} bytes")


if __name__ == "__main__":
    main()
