#!/usr/bin/env python3
"""Independent reader for ciphershard formats 1 and 2 (docs/FORMAT.md), using only
`cryptography`, `json`, `hashlib`, `base64` and `struct`. Reads the golden datasets
(tests/golden/dataset, version 1; tests/golden/v2/dataset, version 2 with ragged columns) with
their keys, checks every structure and tag the spec defines, and compares the plaintext with
their expected.json.

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


def check_offsets(name, raw, rows, elements):
    """A ragged column's row offsets: rows + 1 little-endian int64, 0 first, non-decreasing,
    the values' element count last."""
    offs = list(struct.unpack("<%dq" % (rows + 1), raw))
    if offs[0] != 0 or offs[-1] != elements or any(b < a for a, b in zip(offs, offs[1:])):
        fail("ragged column %s: row offsets do not describe its values" % name)
    return offs


def read_dataset(dataset, key_file):
    """Returns {column: bytes} for fixed columns and {column: [row bytes, ...]} for ragged ones."""
    master = bytes.fromhex(open(key_file).read().strip())
    key_id = hashlib.sha256(b"ciphershard key id v1" + master).digest()[:8].hex()
    manifest = json.load(open(os.path.join(dataset, "manifest.json")))
    keyring = json.load(open(os.path.join(dataset, "keyring.json")))
    version = manifest["version"]
    if version not in (1, 2) or keyring["version"] != 1:
        fail("unsupported version")
    if keyring["dataset_id"] != manifest["dataset_id"]:
        fail("keyring belongs to another dataset")
    wrap = next((w for w in keyring["wraps"] if w["key_id"] == key_id), None)
    if wrap is None or wrap["alg"] != "A256KW":
        fail("wrong key: %s not in keyring" % key_id)

    ragged = {c["name"] for c in manifest["columns"] if version >= 2 and c["ragged"]}
    columns = {c["name"]: ([] if c["name"] in ragged else b"") for c in manifest["columns"]}
    next_row = 0
    for i, entry in enumerate(manifest["shards"]):
        data_key = aes_key_unwrap(master, base64.b64decode(wrap["data_keys"][i]))
        gcm = AESGCM(data_key)
        raw = open(os.path.join(dataset, entry["file"]), "rb").read()
        (n,) = struct.unpack("<Q", raw[:8])
        header = raw[8:8 + n]
        meta = json.loads(header)["__metadata__"]
        desc_str = meta["ciphershard"]
        desc = json.loads(desc_str)
        if desc["version"] != version or desc["cipher"] != "AES-256-GCM":
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
        plain = []
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
            plain.append(out)
        # Version 2: a ragged tensor is followed by its row offsets, `NAME.offsets`, I64 of
        # shape [rows + 1]; a fixed tensor is a column as in version 1.
        ti = 0
        while ti < len(tensors):
            t = tensors[ti]
            layout = t.get("layout", "fixed") if version >= 2 else "fixed"
            if layout == "fixed":
                columns[t["name"]] += plain[ti]
                ti += 1
                continue
            o = tensors[ti + 1]
            if (layout != "ragged" or o["layout"] != "row_offsets" or o["name"] != t["name"] + ".offsets"
                    or o["dtype"] != "I64" or o["shape"] != [desc["rows"] + 1]
                    or o["encrypted"] != t["encrypted"]):
                fail("ragged tensor %s without its row offsets" % t["name"])
            elem = DTYPE_SIZE[t["dtype"]]
            for d in t["shape"][1:]:
                elem *= d
            offs = check_offsets(t["name"], plain[ti + 1], desc["rows"], t["shape"][0])
            columns[t["name"]] += [plain[ti][a * elem:b * elem] for a, b in zip(offs, offs[1:])]
            ti += 2
    if next_row != manifest["rows"]:
        fail("row count")
    return manifest, columns


def main():
    if len(sys.argv) > 2:
        _, columns = read_dataset(sys.argv[1], sys.argv[2])
        for name in sorted(columns):
            col = columns[name]
            # A ragged column: the SHA-256 of its rows concatenated, and of their lengths.
            if isinstance(col, list):
                lens = struct.pack("<%dq" % len(col), *map(len, col))
                print("%s %s (rows)" % (hashlib.sha256(b"".join(col)).hexdigest(), name))
                print("%s %s (row lengths, int64)" % (hashlib.sha256(lens).hexdigest(), name))
            else:
                print("%s %s" % (hashlib.sha256(col).hexdigest(), name))
        return
    for sub in ("", "v2"):
        base = os.path.join(HERE, sub)
        manifest, columns = read_dataset(os.path.join(base, "dataset"), os.path.join(base, "key.hex"))
        expected = json.load(open(os.path.join(base, "expected.json")))
        for name, col in expected["columns"].items():
            got = columns[name]
            want = col["rows_hex"] if col.get("ragged") else col["hex"]
            got = [r.hex() for r in got] if isinstance(got, list) else got.hex()
            if got != want:
                fail("column %s differs from expected.json" % name)
        print("OK: version %d: %d shards, %d rows, columns %s match expected.json" % (
            manifest["version"], len(manifest["shards"]), manifest["rows"], ", ".join(sorted(columns))))


if __name__ == "__main__":
    main()
