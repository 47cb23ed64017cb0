#!/usr/bin/env python3
"""The unencrypted peer of packed token batches (issue 14): what a careful Python team does
today to feed a language model from a Parquet file of token ids.

The file's token column (`list<int32>` or `list<int64>`, no nulls) is read once with pyarrow
into one flat NumPy array of token ids and one of document offsets (timed and reported apart:
`load_seconds`). Every epoch takes a seeded permutation of all the documents (a whole-dataset
shuffle: better mixed than ciphershard's shuffle windows, and never slower to compute) and lays
them end to end, one stream of T tokens; batch k is the stream's tokens [k·B·L, (k+1)·B·L) cut
into B sequences of L, exactly as ciphershard's `--pack` cuts them (docs/LOADER.md, "Packing"):
a document that reaches the end of a sequence continues at the start of the next as a new
piece, ⌊T / (B·L)⌋ batches an epoch, the tail dropped. Each batch is built with offset
arithmetic, no per-token or per-document Python loop: the documents a batch spans are found
with `searchsorted` on the permuted documents' cumulative lengths, one gather index is made
with `np.repeat` + `arange` and taken from the flat token array (`np.take`, which releases the
GIL), `cu_seqlens` (int32, every piece's start and the end, the `flash_attn_varlen_func`
convention) is the union of document starts and sequence starts, and `position_ids` (int64,
[B, L]) is `arange` minus a running maximum of piece starts. A pool of --threads prefetch
threads builds batches at most --prefetch ahead of the consumer, which takes them in order and
touches one element of each array. No encryption, no authentication: the yardstick.

    pip install pyarrow numpy
    python3 scripts/peer_packed.py FILE.parquet [--column input_ids] [--seq-len 2048] \
        [--batch-size 8] [--threads 2] [--prefetch 4] [--epochs 2] [--seed 0] [--json]

Tokens/s = batches × B × L ÷ seconds (the figure `ciphershard bench --pack` gives as
batches_per_s × tokens_per_batch). Reported: all epochs together (load excluded), the same
with the load counted, the first epoch, and steady state (epochs 2..N; the first when
--epochs 1).
"""
import argparse
import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def load(path, column):
    """The column as (flat token ids, int64 document offsets), read from plaintext Parquet."""
    col = pq.read_table(path, columns=[column]).column(column)
    arr = pa.concat_arrays(col.chunks) if col.num_chunks != 1 else col.chunk(0)
    if arr.null_count or not pa.types.is_list(arr.type) and not pa.types.is_large_list(arr.type):
        raise SystemExit(f"{path}: column {column!r} must be a list of integers without nulls")
    offsets = np.asarray(arr.offsets).astype(np.int64)
    tokens = arr.values.to_numpy(zero_copy_only=False)
    # A sliced array's values start before its first offset: keep its own tokens only.
    tokens, offsets = tokens[offsets[0]:offsets[-1]], offsets - offsets[0]
    return np.ascontiguousarray(tokens), offsets


class Epoch:
    """One epoch's document order and the batches cut from it."""

    def __init__(self, tokens, offsets, perm, batch_size, seq_len):
        self.tokens, self.b, self.l = tokens, batch_size, seq_len
        self.n = batch_size * seq_len
        lens = np.diff(offsets)[perm]
        self.cum = np.zeros(len(perm) + 1, dtype=np.int64)
        np.cumsum(lens, out=self.cum[1:])
        self.src = offsets[:-1][perm]  # each permuted document's first token
        self.batches = int(self.cum[-1] // self.n)
        self.seq_starts = np.arange(0, self.n + 1, seq_len, dtype=np.int64)

    def batch(self, k):
        n, s = self.n, k * self.n
        # Documents overlapping [s, s + n): d0 holds token s, d1 - 1 holds token s + n - 1.
        d0 = int(np.searchsorted(self.cum, s, side="right")) - 1
        d1 = int(np.searchsorted(self.cum, s + n, side="left"))
        starts = np.maximum(self.cum[d0:d1], s) - s  # piece starts in the batch
        ends = np.minimum(self.cum[d0 + 1:d1 + 1], s + n) - s
        first = self.src[d0:d1] + (starts + s - self.cum[d0:d1])  # their first tokens' index
        idx = np.repeat(first - starts, ends - starts) + np.arange(n, dtype=np.int64)
        tokens = np.take(self.tokens, idx).reshape(self.b, self.l)
        bounds = np.union1d(starts, self.seq_starts)  # sorted, unique, 0 first, n last
        cu_seqlens = bounds.astype(np.int32)
        marks = np.zeros(n, dtype=np.int64)
        marks[bounds[:-1]] = bounds[:-1]
        position_ids = (np.arange(n, dtype=np.int64)
                        - np.maximum.accumulate(marks)).reshape(self.b, self.l)
        return tokens, position_ids, cu_seqlens


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", help="Parquet file (plaintext)")
    ap.add_argument("--column", default="input_ids")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="prefetch threads")
    ap.add_argument("--prefetch", type=int, default=4, help="batches in flight")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args()

    t0 = time.perf_counter()
    tokens, offsets = load(a.file, a.column)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(a.seed)
    epoch_s, epoch_batches, touched = [], [], 0
    with ThreadPoolExecutor(a.threads) as pool:
        for _ in range(a.epochs):
            t = time.perf_counter()
            ep = Epoch(tokens, offsets, rng.permutation(len(offsets) - 1), a.batch_size,
                       a.seq_len)
            ks = iter(range(ep.batches))
            pending = deque(pool.submit(ep.batch, k) for k, _ in zip(ks, range(a.prefetch)))
            done = 0
            while pending:
                tok, pos, cu = pending.popleft().result()
                k = next(ks, None)
                if k is not None:
                    pending.append(pool.submit(ep.batch, k))
                touched += int(tok[0, 0]) + int(pos[-1, -1]) + int(cu[-1])
                done += 1
            epoch_s.append(time.perf_counter() - t)
            epoch_batches.append(done)

    per_batch = a.batch_size * a.seq_len
    steady = slice(1, None) if a.epochs > 1 else slice(0, None)
    rate = lambda b, s: b * per_batch / s
    report = {
        "schema": "peer_packed/1",
        "file": a.file, "column": a.column, "documents": len(offsets) - 1,
        "tokens": int(offsets[-1]), "dtype": str(tokens.dtype),
        "batch_size": a.batch_size, "seq_len": a.seq_len, "threads": a.threads,
        "prefetch": a.prefetch, "epochs": a.epochs, "seed": a.seed,
        "shuffle": "whole dataset, per epoch",
        "load_seconds": round(load_s, 4),
        "epoch_seconds": [round(s, 4) for s in epoch_s],
        "batches_per_epoch": epoch_batches[0],
        "tokens_per_s": round(rate(sum(epoch_batches), sum(epoch_s))),
        "tokens_per_s_with_load": round(rate(sum(epoch_batches), sum(epoch_s) + load_s)),
        "first_epoch_tokens_per_s": round(rate(epoch_batches[0], epoch_s[0])),
        "steady_tokens_per_s": round(rate(sum(epoch_batches[steady]), sum(epoch_s[steady]))),
        "checksum": touched,
    }
    if a.json:
        print(json.dumps(report))
    else:
        print(f"{report['documents']} documents, {report['tokens']} tokens; [{a.batch_size}, "
              f"{a.seq_len}] batches, {a.threads} threads: {report['tokens_per_s'] / 1e6:.1f} M "
              f"tokens/s ({report['tokens_per_s_with_load'] / 1e6:.1f} M with the "
              f"{load_s:.2f} s load; epochs {report['epoch_seconds']} s)")


if __name__ == "__main__":
    main()
