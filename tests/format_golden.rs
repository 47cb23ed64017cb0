//! The golden dataset in tests/golden/: committed files that this build must keep reading
//! byte for byte, so the format cannot drift silently. `read_golden.py` reads the same files
//! with only Python's `cryptography` and `json`.

mod format_common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ciphershard::MasterKey;
use ciphershard::format::{self, ConvertInput, Dataset, Dtype, ShardHeader};
use format_common::*;

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn golden_key() -> MasterKey {
    MasterKey::from_file(&golden().join("key.hex")).unwrap()
}

fn golden_columns() -> Vec<(String, Dtype, Vec<u64>, Vec<u8>)> {
    // 9 rows; 20-byte and 3-byte rows, so chunks and rows do not line up.
    let features: Vec<u8> = (0..45)
        .flat_map(|i| (i as f32 * 0.5 - 3.0).to_le_bytes())
        .collect();
    let label: Vec<u8> = (0..27u8).map(|i| i.wrapping_mul(37)).collect();
    vec![
        ("features".into(), Dtype::F32, vec![9, 5], features),
        ("label".into(), Dtype::U8, vec![9, 3], label),
    ]
}

#[test]
fn golden_dataset_decrypts_to_expected_plaintext() {
    let dir = golden().join("dataset");
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(golden().join("expected.json")).unwrap()).unwrap();
    let ud = unlock(&dir, &golden_key()).expect("golden dataset opens with its key");
    format::verify(&ud, &mut |_, _| {}).unwrap();
    let m = ud.dataset().manifest();
    assert_eq!((m.shards.len(), m.rows, m.chunk_size), (2, 9, 64));
    for (i, (name, dtype, shape, data)) in golden_columns().into_iter().enumerate() {
        let e = &expected["columns"][&name];
        assert_eq!(e["dtype"], dtype.as_str());
        assert_eq!(e["shape"], serde_json::json!(shape));
        assert_eq!(e["hex"], hex::encode(&data));
        assert_eq!(read_column(&ud, i as u32).unwrap(), data, "column {name}");
        assert_eq!(m.columns[i].encrypted, name != "label");
    }
    // The worked example in docs/FORMAT.md quotes these values.
    let h = ShardHeader::read(&dir.join("shard-00000.safetensors")).unwrap();
    let c = h.chunk(0, 0);
    assert_eq!(hex::encode(h.digest), expected["example"]["header_digest"]);
    assert_eq!(hex::encode(c.aad), expected["example"]["aad"]);
    assert_eq!(hex::encode(c.tag), expected["example"]["tag"]);
    assert_eq!(hex::encode(c.nonce), expected["example"]["nonce"]);
    assert!(unlock(&dir, &key(1)).is_err());
    assert!(Dataset::open(&dir).is_ok());
}

/// Regenerates tests/golden (new random data keys and dataset id): run only when the format
/// changes on purpose, with `cargo test --test format_golden -- --ignored regenerate`.
#[test]
#[ignore]
fn regenerate_golden() {
    let g = golden();
    let dir = g.join("dataset");
    let _ = std::fs::remove_dir_all(&dir);
    let k = MasterKey::generate().unwrap();
    std::fs::write(
        g.join("key.hex"),
        format!("{}\n", hex::encode(k.as_bytes())),
    )
    .unwrap();
    let inputs: Vec<ConvertInput> = golden_columns()
        .into_iter()
        .map(|(name, dtype, shape, data)| ConvertInput::InMemory {
            name,
            dtype,
            shape,
            data,
        })
        .collect();
    let o = format::ConvertOptions {
        shard_size: 120,
        chunk_size: 64,
        plain: vec!["label".into()],
        keys: vec![k.clone()],
        metadata: BTreeMap::from([("golden".to_string(), "v1".to_string())]),
    };
    format::convert(&inputs, &dir, &o, &mut |_, _| {}).unwrap();
    let h = ShardHeader::read(&dir.join("shard-00000.safetensors")).unwrap();
    let c = h.chunk(0, 0);
    let mut cols = serde_json::Map::new();
    for (name, dtype, shape, data) in golden_columns() {
        cols.insert(
            name,
            serde_json::json!({"dtype": dtype.as_str(), "shape": shape, "hex": hex::encode(data)}),
        );
    }
    let ring = ciphershard::format::Keyring::parse(
        &dir.join("keyring.json"),
        &std::fs::read(dir.join("keyring.json")).unwrap(),
    )
    .unwrap();
    let expected = serde_json::json!({
        "key_id": k.id(),
        "columns": cols,
        "example": {
            "header_len": h.data_start - 8,
            "descriptor": h.descriptor_json(),
            "header_digest": hex::encode(h.digest),
            "data_key_wrapped": hex::encode(ring.wraps[0].data_keys[0]),
            "data_key": hex::encode(ring.unwrap(&k, 0).unwrap().as_bytes()),
            "nonce": hex::encode(c.nonce),
            "aad": hex::encode(c.aad),
            "tag": hex::encode(c.tag),
            "chunk_file_offset": c.file_offset,
            "chunk_len": c.len,
        },
    });
    std::fs::write(
        g.join("expected.json"),
        serde_json::to_string_pretty(&expected).unwrap() + "\n",
    )
    .unwrap();
}

/// Writes a dataset with awkward names and metadata (quotes, backslashes, control characters,
/// non-ASCII) to `$CIPHERSHARD_SAMPLE_DIR` and prints each column's SHA-256, for checking the
/// Python reader against the spec's escaping rules:
/// `CIPHERSHARD_SAMPLE_DIR=/tmp/s cargo test --test format_golden -- --ignored awkward --nocapture`
/// then `python3 tests/golden/read_golden.py /tmp/s/ds /tmp/s/key.hex`.
#[test]
#[ignore]
fn write_awkward_sample() {
    use sha2::Digest;
    let out =
        PathBuf::from(std::env::var("CIPHERSHARD_SAMPLE_DIR").expect("set CIPHERSHARD_SAMPLE_DIR"));
    std::fs::create_dir_all(&out).unwrap();
    let k = MasterKey::generate().unwrap();
    std::fs::write(out.join("key.hex"), hex::encode(k.as_bytes())).unwrap();
    let names = [
        "quo\"te",
        "back\\slash",
        "tab\tnew\nline\u{1}",
        "ünïcødé 张量 🚀",
        "/slash",
    ];
    let inputs: Vec<ConvertInput> = names
        .iter()
        .enumerate()
        .map(|(i, n)| column(n, Dtype::ALL[i * 3], &[37, i as u64 + 1], i as u64))
        .collect();
    let mut o = opts(128, 700, &["back*", "ü*"]);
    o.keys = vec![k];
    o.metadata
        .insert("note \"\\\u{7f}\u{1f}".into(), "värde\r\n".into());
    format::convert(&inputs, &out.join("ds"), &o, &mut |_, _| {}).unwrap();
    for (n, i) in names.iter().zip(&inputs) {
        let ConvertInput::InMemory { data, .. } = i else {
            unreachable!()
        };
        println!("{} {n}", hex::encode(sha2::Sha256::digest(data)));
    }
}
