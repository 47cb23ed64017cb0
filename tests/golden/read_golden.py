#!/usr/bin/env python3
"""Independent reader for ciphershard format v1 (docs/FORMAT.md), using only `cryptography`,
`json`, `hashlib`, `base64` and `struct`. Reads tests/golden/dataset with tests/golden/key.hex,
checks every structure and tag the spec defines, and compares the plaintext with expected.json.

    pip install cryptography && python3 tests/golden/read_golden.py
    python3 tests/golden/read_golden.py DATASET_DIR KEY_FILE   # any dataset: prints SHA-256 per column
"""
import base64
import hashlib
import json
import os
import struct
import sys

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap

HERE = os.path.dirname(os.path.abspath(__file__))
DATASET = sys.argv[1] if len(sys.argv) > 2 else os.path.join(HERE, "dataset")
KEY_FILE = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "key.hex")
DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
              "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def fail(msg):
    sys.exit("FAIL: " + msg)


def dumps(obj):
    # serde_json's compact form: no spaces, non-ASCII kept as UTF-8.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def canonical_header(desc_str, tags_b64, tensors):
    h = '{"__metadata__":{"ciphershard":' + dumps(desc_str) + ',"ciphershard.tags":"' + tags_b64 + '"}'
    for t in tensors:
        h += "," + dumps(t["name"]) + ':{"dtype":"' + t["dtype"] + '","shape":' + dumps(t["shape"]) \
             + ',"data_offsets":' + dumps(t["offsets"]) + "}"
    h += "}"
    h += " " * (-len(h.encode()) % 8)
    return h.encode()


def main():
    master = bytes.fromhex(open(KEY_FILE).read().strip())
    key_id = hashlib.sha256(b"ciphershard key id v1" + master).digest()[:8].hex()
    manifest = json.load(open(os.path.join(DATASET, "manifest.json")))
    keyring = json.load(open(os.path.join(DATASET, "keyring.json")))
    if manifest["version"] != 1 or keyring["version"] != 1:
        fail("unsupported version")
    if keyring["dataset_id"] != manifest["dataset_id"]:
        fail("keyring belongs to another dataset")
    wrap = next((w for w in keyring["wraps"] if w["key_id"] == key_id), None)
    if wrap is None or wrap["alg"] != "A256KW":
        fail("wrong key: %s not in keyring" % key_id)

    columns = {c["name"]: b"" for c in manifest["columns"]}
    next_row = 0
    for i, entry in enumerate(manifest["shards"]):
        data_key = aes_key_unwrap(master, base64.b64decode(wrap["data_keys"][i]))
        gcm = AESGCM(data_key)
        raw = open(os.path.join(DATASET, entry["file"]), "rb").read()
        (n,) = struct.unpack("<Q", raw[:8])
        header = raw[8:8 + n]
        meta = json.loads(header)["__metadata__"]
        desc_str = meta["ciphershard"]
        desc = json.loads(desc_str)
        if desc["version"] != 1 or desc["cipher"] != "AES-256-GCM":
            fail("unsupported version or cipher")
        if canonical_header(desc_str, meta["ciphershard.tags"], desc["tensors"]) != header:
            fail("header not canonical")
        tensors = desc["tensors"]
        if len(raw) != 8 + n + tensors[-1]["offsets"][1]:
            fail("truncated or appended bytes")
        digest = hashlib.sha256(desc_str.encode()).digest()
        checks = [
            (desc["dataset_id"] == manifest["dataset_id"], "dataset id"),
            (desc["shard_index"] == i and desc["shard_count"] == len(manifest["shards"]), "shard index/count"),
            (desc["row_start"] == entry["row_start"] == next_row and desc["rows"] == entry["rows"], "rows"),
            (digest.hex() == entry["header_digest"], "header digest"),
            (len(raw) == entry["bytes"], "size"),
        ]
        for ok, what in checks:
            if not ok:
                fail("%s: manifest/shard mismatch: %s" % (entry["file"], what))
        next_row += desc["rows"]
        tags = base64.b64decode(meta["ciphershard.tags"])
        total = tensors[-1]["first_chunk"] + tensors[-1]["chunks"]
        if len(tags) != 16 * (1 + total):
            fail("tag count")
        # Header tag: GCM with empty plaintext, AAD = descriptor bytes, nonce all-FF.
        if gcm.encrypt(b"\xff" * 12, b"", desc_str.encode()) != tags[:16]:
            fail("%s: header tag" % entry["file"])
        cs = desc["chunk_size"]
        data = raw[8 + n:]
        for ti, t in enumerate(tensors):
            b, e = t["offsets"]
            size = DTYPE_SIZE[t["dtype"]]
            for d in t["shape"]:
                size *= d
            if size != e - b or t["chunks"] != max(1, -(-(e - b) // cs)):
                fail("tensor layout")
            out = b""
            for j in range(t["chunks"]):
                g = t["first_chunk"] + j
                chunk = data[b + j * cs:min(b + (j + 1) * cs, e)]
                nonce = b"\x00" * 4 + struct.pack(">Q", g)
                aad = (b"CSHARD01" + bytes.fromhex(desc["dataset_id"]) + digest
                       + struct.pack(">IIQQQ", i, ti, j, t["chunks"], g) + bytes([1 if t["encrypted"] else 0]))
                tag = tags[16 * (1 + g):16 * (2 + g)]
                if t["encrypted"]:
                    out += gcm.decrypt(nonce, chunk + tag, aad)  # raises InvalidTag on tampering
                elif gcm.encrypt(nonce, b"", aad + chunk) != tag:
                    fail("plain chunk tag")
                else:
                    out += chunk
            columns[t["name"]] += out
    if next_row != manifest["rows"]:
        fail("row count")
    if len(sys.argv) > 2:
        for name in sorted(columns):
            print("%s %s" % (hashlib.sha256(columns[name]).hexdigest(), name))
        return
    expected = json.load(open(os.path.join(HERE, "expected.json")))
    for name, col in expected["columns"].items():
        if columns[name].hex() != col["hex"]:
            fail("column %s differs from expected.json" % name)
    print("OK: %d shards, %d rows, columns %s match expected.json" % (
        len(manifest["shards"]), manifest["rows"], ", ".join(sorted(columns))))


if __name__ == "__main__":
    main()
