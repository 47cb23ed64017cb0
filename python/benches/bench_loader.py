#!/usr/bin/env python3
"""Batches per second through Python vs. the Rust bench, same dataset, backend and options.

    python python/benches/bench_loader.py [--rows 262144 --features 256 --batch-size 512]

The Rust side is `ciphershard bench`'s library function (`pipeline::bench::run_source`, run
through `ciphershard._ciphershard._bench_native`): it builds the same loader and drops each
batch in Rust. The Python side iterates `ciphershard.Loader` and imports every column of every
batch into NumPy (or PyTorch with --torch) through DLPack, as a training loop would. Both run
in this process on the same page-cache-hot shards; each side runs --repeat times, interleaved;
the ratios of the best and of the median runs are printed. The issue's target: Python ≥ 0.95 × Rust.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time

import numpy as np

import ciphershard
from ciphershard import _ciphershard as native


def python_run(ds, args) -> float:
    from_dlpack = np.from_dlpack
    if args.torch:
        import torch

        from_dlpack = torch.from_dlpack
    t = time.perf_counter()
    loader = ciphershard.Loader(ds, args.batch_size, seed=1, epochs=args.epochs, threads=args.threads,
                                prefetch=args.prefetch)
    n = 0
    for batch in loader:
        for v in batch.values():
            from_dlpack(v)
        n += 1
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=pathlib.Path, help="existing dataset (default: generate one)")
    ap.add_argument("--key-file", type=pathlib.Path)
    ap.add_argument("--rows", type=int, default=262_144)
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--torch", action="store_true", help="import batches with torch.from_dlpack")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.dataset is None:
            root = pathlib.Path(tmp)
            args.key_file = root / "k.key"
            ciphershard.generate_key(args.key_file)
            rng = np.random.default_rng(0)
            cols = {
                "features": rng.standard_normal((args.rows, args.features), dtype=np.float32),
                "label": rng.integers(0, 1000, args.rows).astype(np.int64),
            }
            args.dataset = root / "data"
            ciphershard.convert(cols, out=args.dataset, key_file=args.key_file)
            del cols
        ds = ciphershard.Dataset(args.dataset, key_file=args.key_file, backend=args.backend)
        rust, py = [], []
        for _ in range(args.repeat):
            rep = native._bench_native(ds, args.batch_size, epochs=args.epochs, threads=args.threads,
                                       prefetch=args.prefetch)
            rust.append(rep["encrypted"]["batches_per_s"])
            # run_source keeps the faster of two encrypted runs; so does the Python side.
            py.append(max(python_run(ds, args), python_run(ds, args)))
        best_rust, best_py = max(rust), max(py)
        med_rust, med_py = statistics.median(rust), statistics.median(py)
        print(json.dumps({
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "dataset": str(args.dataset), "rows": ds.rows, "backend": ds.backend_description,
            "batch_size": args.batch_size, "epochs": args.epochs, "threads": args.threads,
            "rust_batches_per_s": [round(x, 1) for x in rust],
            "python_batches_per_s": [round(x, 1) for x in py],
            "ratio_python_over_rust_best": round(best_py / best_rust, 3),
            "ratio_python_over_rust_median": round(med_py / med_rust, 3),
            "importer": "torch.from_dlpack" if args.torch else "numpy.from_dlpack",
        }, indent=2))


if __name__ == "__main__":
    main()
