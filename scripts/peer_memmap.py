#!/usr/bin/env python3
"""The unencrypted peer of the loader (issue 19): what a team does today without encryption.

The data stays as one `.npy` file per column, memory-mapped and hot in the page cache; every
epoch takes a seeded global permutation of the rows, and each batch is gathered column by column
with NumPy fancy indexing (`col[np.sort(idx)]`, a copy out of the memmap that releases the GIL),
wrapped with `torch.from_numpy` (zero-copy; skipped with --no-torch or when torch is missing),
by a pool of --threads prefetch threads that run at most --prefetch batches ahead of the consumer.
The consumer takes the batches in order, touches each one minimally (reads one element of every
column) and counts the bytes delivered. No encryption, no authentication: this is the yardstick,
not a competitor with the same guarantees.

    pip install numpy [torch]
    # make the columns (x.npy, y.npy, ...) with deterministic random contents:
    python3 scripts/peer_memmap.py DIR --make 300000 x:f32:1024,y:i64
    # the same data, encrypted, for `ciphershard bench`:
    ciphershard convert --key K DIR/x.npy DIR/y.npy --out DS
    # the peer:
    python3 scripts/peer_memmap.py DIR [--batch-size 512] [--threads 2] [--epochs 3] \
        [--prefetch 4] [--seed 0] [--no-torch] [--json]

What it reports (decimal: 1 GB/s = 10^9 bytes per second of delivered plaintext):
  * before timing, one sequential read of every file (so the page cache is hot; it must fit in
    RAM) -- not timed;
  * all epochs together (the figure to set beside `ciphershard bench`'s `gb_per_s`);
  * the first epoch separately (thread start, first touches of fresh pages for the batches);
  * steady state: the bytes and time of epochs 2..N together (the first epoch when --epochs 1).
Every row is delivered once per epoch; the last batch of an epoch may be short.
"""
import argparse
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

DTYPES = {"f64": "<f8", "f32": "<f4", "f16": "<f2", "i64": "<i8", "i32": "<i4", "i16": "<i2",
          "i8": "i1", "u8": "u1", "u16": "<u2", "u32": "<u4", "u64": "<u8"}


def make_columns(directory, rows, spec, seed):
    """Write one .npy per `name:dtype[:d1xd2...]` of SPEC (comma-separated), ROWS rows each."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    for item in spec.split(","):
        parts = item.split(":")
        if len(parts) not in (2, 3) or parts[1] not in DTYPES:
            sys.exit(f"bad column spec {item!r}: want name:dtype[:d1xd2...], dtype in {sorted(DTYPES)}")
        name, dtype = parts[0], np.dtype(DTYPES[parts[1]])
        inner = tuple(int(d) for d in parts[2].split("x")) if len(parts) == 3 else ()
        path = os.path.join(directory, name + ".npy")
        out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows,) + inner)
        step = max(1, (64 << 20) // max(1, out[:1].nbytes))  # ~64 MiB per piece
        for start in range(0, rows, step):
            piece = out[start:start + step]
            if dtype.kind == "f":
                piece[...] = rng.standard_normal(piece.shape, dtype=np.float32)
            else:
                piece[...] = rng.integers(0, 1 << 20, size=piece.shape, dtype=dtype)
        out.flush()
        del out
        print(f"wrote {path}: {dtype.name}{list((rows,) + inner)}", file=sys.stderr)


def open_columns(directory):
    names = sorted(f for f in os.listdir(directory) if f.endswith(".npy"))
    if not names:
        sys.exit(f"no .npy files in {directory}")
    cols = {n[:-4]: np.load(os.path.join(directory, n), mmap_mode="r") for n in names}
    rows = {c.shape[0] for c in cols.values()}
    if len(rows) != 1:
        sys.exit(f"the columns do not share a first dimension: { {k: v.shape for k, v in cols.items()} }")
    return cols, rows.pop()


def warm_page_cache(cols):
    """Read every file once, sequentially, so the timed epochs find it in the page cache."""
    for col in cols.values():
        step = max(1, (64 << 20) // max(1, col[:1].nbytes))
        for start in range(0, col.shape[0], step):
            np.array(col[start:start + step])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", help="directory of .npy files, one per column")
    ap.add_argument("--make", nargs=2, metavar=("ROWS", "SPEC"),
                    help="write the columns instead, e.g. --make 300000 x:f32:1024,y:i64")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2, help="prefetch threads")
    ap.add_argument("--prefetch", type=int, default=None,
                    help="batches in flight ahead of the consumer [default: 2 x threads]")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-torch", action="store_true", help="deliver NumPy arrays, not tensors")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args()

    if a.make:
        make_columns(a.dir, int(a.make[0]), a.make[1], a.seed)
        return

    from_numpy = None
    if not a.no_torch:
        try:
            import torch
            from_numpy = torch.from_numpy
        except ImportError:
            pass

    cols, rows = open_columns(a.dir)
    arrays = list(cols.values())
    row_bytes = sum(c[:1].nbytes for c in arrays)
    prefetch = a.prefetch or 2 * a.threads
    warm_page_cache(cols)

    def gather(idx):
        idx = np.sort(idx)
        batch = [c[idx] for c in arrays]
        return [from_numpy(b) for b in batch] if from_numpy else batch

    rng = np.random.default_rng(a.seed)
    epoch_s, epoch_bytes, touched = [], [], 0.0
    with ThreadPoolExecutor(a.threads) as pool:
        for _ in range(a.epochs):
            t0 = time.perf_counter()
            perm = rng.permutation(rows)
            starts = iter(range(0, rows, a.batch_size))
            pending, delivered = deque(), 0
            for s in starts:
                pending.append(pool.submit(gather, perm[s:s + a.batch_size]))
                if len(pending) >= prefetch:
                    break
            while pending:
                batch = pending.popleft().result()
                s = next(starts, None)
                if s is not None:
                    pending.append(pool.submit(gather, perm[s:s + a.batch_size]))
                for b in batch:  # the consumer's minimal touch: one element per column
                    touched += float(b.reshape(-1)[0])
                    delivered += b.nbytes if from_numpy is None else b.numel() * b.element_size()
            epoch_s.append(time.perf_counter() - t0)
            epoch_bytes.append(delivered)

    steady = slice(1, None) if a.epochs > 1 else slice(0, None)
    steady_gbps = sum(epoch_bytes[steady]) / sum(epoch_s[steady]) / 1e9
    first_gbps = epoch_bytes[0] / epoch_s[0] / 1e9
    all_gbps = sum(epoch_bytes) / sum(epoch_s) / 1e9
    report = {
        "schema": "peer_memmap/1",
        "dir": a.dir,
        "columns": {k: [str(v.dtype), list(v.shape)] for k, v in cols.items()},
        "rows": rows, "row_bytes": row_bytes, "batch_size": a.batch_size,
        "threads": a.threads, "prefetch": prefetch, "epochs": a.epochs, "seed": a.seed,
        "torch": from_numpy is not None,
        "epoch_seconds": [round(s, 4) for s in epoch_s],
        "bytes_per_epoch": epoch_bytes[0],
        "first_epoch_gbps": round(first_gbps, 4),
        "all_epochs_gbps": round(all_gbps, 4),
        "steady_gbps": round(steady_gbps, 4),
        "checksum": touched,  # keeps the touch observable
    }
    if a.json:
        print(json.dumps(report))
    else:
        print(f"{rows} rows x {row_bytes} B, batch {a.batch_size}, {a.threads} threads, "
              f"{'torch' if report['torch'] else 'numpy'}: all epochs {all_gbps:.2f} GB/s, "
              f"first epoch {first_gbps:.2f}, "
              f"steady {steady_gbps:.2f} GB/s (epochs {report['epoch_seconds']} s)")


if __name__ == "__main__":
    main()
