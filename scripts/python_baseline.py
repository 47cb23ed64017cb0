#!/usr/bin/env python3
"""What a team would write without ciphershard: numpy + `cryptography`'s AESGCM decrypting the
same encrypted chunks into shuffled batches. The baseline for `ciphershard bench` (issue 3).

    pip install numpy cryptography
    CIPHERSHARD_KEY_FILE=master.key python3 scripts/python_baseline.py DATASET_DIR \
        [--threads 2] [--batch-size 512] [--epochs 3] [--window 8] [--json]

Written to be fast, so the comparison is honest:
  * one AESGCM object per shard (key schedule once); every chunk opened with one
    `AESGCM.decrypt` call (OpenSSL, AES-NI/VAES; releases the GIL) -> real parallelism;
  * a thread pool of --threads workers decrypts the chunks of a window while numpy gathers;
  * the same sampling as the loader: per epoch a seeded permutation of chunk-aligned row blocks
    of every shard, windows of --window blocks, rows shuffled within the window, batches
    gathered with `np.take` into preallocated output arrays (no per-row Python work);
  * plaintext only in memory.
It reads the format exactly as docs/FORMAT.md describes (nonce, AAD, tags); it does not check
the header tag or manifest cross-checks (the loader does those once at open, off the hot path).
The key comes from a file named by $CIPHERSHARD_KEY_FILE (never the command line).
"""
import argparse
import base64
import hashlib
import json
import os
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap

DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
          "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "u1"}


def read_key():
    path = os.environ.get("CIPHERSHARD_KEY_FILE")
    if not path:
        sys.exit("set CIPHERSHARD_KEY_FILE to the master key file")
    raw = open(path, "rb").read()
    return raw if len(raw) == 32 else bytes.fromhex(raw.decode().strip())


class Shard:
    def __init__(self, path, data_key, manifest_id, index):
        raw = open(path, "rb")
        (n,) = struct.unpack("<Q", raw.read(8))
        header = raw.read(n)
        raw.close()
        meta = json.loads(header)["__metadata__"]
        self.desc_str = meta["ciphershard"]
        self.desc = json.loads(self.desc_str)
        self.digest = hashlib.sha256(self.desc_str.encode()).digest()
        self.tags = base64.b64decode(meta["ciphershard.tags"])
        self.data_start = 8 + n
        self.gcm = AESGCM(data_key)
        self.fd = os.open(path, os.O_RDONLY)
        self.index = index
        self.dsid = bytes.fromhex(self.desc["dataset_id"])
        self.tensors = {t["name"]: (ti, t) for ti, t in enumerate(self.desc["tensors"])}

    def open_chunk(self, name, j):
        ti, t = self.tensors[name]
        cs = self.desc["chunk_size"]
        b, e = t["offsets"]
        lo, hi = b + j * cs, min(b + (j + 1) * cs, e)
        data = os.pread(self.fd, hi - lo, self.data_start + lo)
        g = t["first_chunk"] + j
        nonce = b"\x00" * 4 + struct.pack(">Q", g)
        aad = (b"CSHARD01" + self.dsid + self.digest
               + struct.pack(">IIQQQ", self.index, ti, j, t["chunks"], g) + bytes([1 if t["encrypted"] else 0]))
        tag = self.tags[16 * (1 + g):16 * (2 + g)]
        if t["encrypted"]:
            return self.gcm.decrypt(nonce, data + tag, aad)
        if self.gcm.encrypt(nonce, b"", aad + data) != tag:
            raise ValueError("tag mismatch")
        return data


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    master = read_key()
    key_id = hashlib.sha256(b"ciphershard key id v1" + master).digest()[:8].hex()
    manifest = json.load(open(os.path.join(a.dataset, "manifest.json")))
    keyring = json.load(open(os.path.join(a.dataset, "keyring.json")))
    wrap = next(w for w in keyring["wraps"] if w["key_id"] == key_id)
    shards = [Shard(os.path.join(a.dataset, e["file"]),
                    aes_key_unwrap(master, base64.b64decode(wrap["data_keys"][i])), manifest["dataset_id"], i)
              for i, e in enumerate(manifest["shards"])]
    cols = manifest["columns"]
    cs = manifest["chunk_size"]
    row_bytes = {c["name"]: int(np.prod(c["shape"], dtype=np.int64)) * np.dtype(DTYPES[c["dtype"]]).itemsize
                 for c in cols}
    widest = max(row_bytes.values())
    block_rows = max(1, cs // widest)
    blocks = [(s, r0, min(block_rows, sh.desc["rows"] - r0))
              for s, sh in enumerate(shards) for r0 in range(0, sh.desc["rows"], block_rows)]
    out = {c["name"]: np.empty((a.batch_size,) + tuple(c["shape"]), dtype=DTYPES[c["dtype"]]) for c in cols}
    pool = ThreadPoolExecutor(a.threads)

    def load_block(blk):
        """Decrypts the chunks covering a block's rows, returns {column: rows array}."""
        s, r0, n = blk
        res = {}
        for c in cols:
            rb = row_bytes[c["name"]]
            lo, hi = r0 * rb, (r0 + n) * rb
            parts = [shards[s].open_chunk(c["name"], j) for j in range(lo // cs, (hi - 1) // cs + 1)]
            buf = parts[0] if len(parts) == 1 else b"".join(parts)
            off = lo - (lo // cs) * cs
            arr = np.frombuffer(buf, dtype=DTYPES[c["dtype"]], offset=off, count=n * rb // np.dtype(DTYPES[c["dtype"]]).itemsize)
            res[c["name"]] = arr.reshape((n,) + tuple(c["shape"]))
        return res

    rng = np.random.default_rng(a.seed)
    delivered = 0
    batches = 0
    t0 = time.perf_counter()
    for _epoch in range(a.epochs):
        order = rng.permutation(len(blocks))
        windows = [order[i:i + a.window] for i in range(0, len(order), a.window)]
        nxt = pool.map(load_block, [blocks[k] for k in windows[0]]) if windows else None
        for wi in range(len(windows)):
            loaded = list(nxt)
            if wi + 1 < len(windows):  # prefetch the next window while this one is gathered
                nxt = pool.map(load_block, [blocks[k] for k in windows[wi + 1]])
            win = {c["name"]: np.concatenate([l[c["name"]] for l in loaded]) for c in cols}
            n = len(next(iter(win.values())))
            perm = rng.permutation(n)
            for i in range(0, n, a.batch_size):
                idx = perm[i:i + a.batch_size]
                for c in cols:
                    dst = out[c["name"]][:len(idx)]
                    np.take(win[c["name"]], idx, axis=0, out=dst)
                    delivered += dst.nbytes
                batches += 1
    secs = time.perf_counter() - t0
    report = {"tool": "python-numpy-cryptography", "threads": a.threads, "batch_size": a.batch_size,
              "epochs": a.epochs, "batches": batches, "seconds": secs, "batches_per_s": batches / secs,
              "gb_per_s": delivered / secs / 1e9}
    if a.json:
        print(json.dumps(report))
    else:
        print("python baseline: %d batches in %.2f s: %.0f batches/s, %.2f GB/s (threads %d)" % (
            batches, secs, batches / secs, delivered / secs / 1e9, a.threads))


if __name__ == "__main__":
    main()
