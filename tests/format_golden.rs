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

/// The version-2 golden dataset (tests/golden/v2): a fixed column, an encrypted ragged column
/// with empty rows and a row spanning several chunks, and a plain ragged byte column.
fn golden_v2() -> PathBuf {
    golden().join("v2")
}

/// `features` F32 x2 per row; `tokens` I32 lists; `text` byte strings (ragged U8, plain).
fn golden_v2_rows() -> (Vec<u8>, Vec<Vec<i32>>, Vec<&'static [u8]>) {
    let features: Vec<u8> = (0..18)
        .flat_map(|i| (i as f32 * 0.25 - 1.0).to_le_bytes())
        .collect();
    let lens = [3usize, 0, 40, 1, 0, 5, 0, 2, 7];
    let tokens = lens
        .iter()
        .enumerate()
        .map(|(r, &n)| (0..n as i32).map(|j| r as i32 * 100 + j).collect())
        .collect();
    let text: Vec<&[u8]> = vec![
        b"hello",
        b"",
        b"a row of text long enough to span two chunks of 64 bytes each, at least",
        b"x",
        b"",
        b"\xe2\x82\xac5",
        b"",
        b"ok",
        b"last",
    ];
    (features, tokens, text)
}

fn golden_v2_inputs() -> Vec<ConvertInput> {
    let (features, tokens, text) = golden_v2_rows();
    let ragged = |name: &str, dtype: Dtype, rows: Vec<Vec<u8>>| {
        let mut offsets = vec![0u64];
        for r in &rows {
            offsets.push(offsets.last().unwrap() + (r.len() / dtype.size_bytes()) as u64);
        }
        ConvertInput::Ragged {
            name: name.into(),
            dtype,
            shape: vec![],
            values: rows.concat(),
            offsets,
        }
    };
    vec![
        ConvertInput::InMemory {
            name: "features".into(),
            dtype: Dtype::F32,
            shape: vec![9, 2],
            data: features,
        },
        ragged(
            "tokens",
            Dtype::I32,
            tokens
                .iter()
                .map(|r| r.iter().flat_map(|v| v.to_le_bytes()).collect())
                .collect(),
        ),
        ragged("text", Dtype::U8, text.iter().map(|t| t.to_vec()).collect()),
    ]
}

/// Every row of ragged column `name` (the index of its values tensor in each shard), read
/// through the library's own checked offsets.
fn ragged_rows(ud: &format::UnlockedDataset, values: u32) -> Vec<Vec<u8>> {
    let mut rows = Vec::new();
    for s in 0..ud.dataset().shards().len() {
        let data = read_tensor(ud, s, values).unwrap();
        let elem = ud.dataset().shards()[s].descriptor.tensors[values as usize]
            .dtype
            .size_bytes();
        let offsets = format::read_row_offsets(ud, s, values).unwrap();
        rows.extend(
            offsets
                .windows(2)
                .map(|w| data[w[0] as usize * elem..w[1] as usize * elem].to_vec()),
        );
    }
    rows
}

#[test]
fn golden_v2_dataset_decrypts_to_expected_rows() {
    let dir = golden_v2().join("dataset");
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(golden_v2().join("expected.json")).unwrap()).unwrap();
    let k = MasterKey::from_file(&golden_v2().join("key.hex")).unwrap();
    let ud = unlock(&dir, &k).expect("golden v2 dataset opens with its key");
    format::verify(&ud, &mut |_, _| {}).unwrap();
    let m = ud.dataset().manifest();
    assert_eq!(
        (m.version, m.shards.len(), m.rows, m.chunk_size),
        (2, 2, 9, 64)
    );
    let (features, tokens, text) = golden_v2_rows();
    assert_eq!(read_column(&ud, 0).unwrap(), features);
    assert_eq!(
        expected["columns"]["features"]["hex"],
        hex::encode(&features)
    );
    let tokens: Vec<Vec<u8>> = tokens
        .iter()
        .map(|r| r.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let text: Vec<Vec<u8>> = text.iter().map(|t| t.to_vec()).collect();
    for (name, values, rows) in [("tokens", 1, tokens), ("text", 3, text)] {
        assert_eq!(ragged_rows(&ud, values), rows, "{name}");
        let hex_rows: Vec<String> = rows.iter().map(hex::encode).collect();
        assert_eq!(
            expected["columns"][name]["rows_hex"],
            serde_json::json!(hex_rows)
        );
    }
    let ragged: Vec<(bool, bool)> = m.columns.iter().map(|c| (c.ragged, c.encrypted)).collect();
    assert_eq!(ragged, [(false, true), (true, true), (true, false)]);
    // The worked example quotes shard 0's tokens offsets.
    let offsets = format::read_row_offsets(&ud, 0, 1).unwrap();
    assert_eq!(
        expected["example"]["tokens_offsets_shard0"],
        serde_json::json!(offsets)
    );
    let h = ShardHeader::read(&dir.join("shard-00000.safetensors")).unwrap();
    assert_eq!(h.descriptor_json(), expected["example"]["descriptor"]);
}

/// Regenerates tests/golden/v2 (new keys and ids): only when the format changes on purpose,
/// with `cargo test --test format_golden -- --ignored regenerate_golden_v2`.
#[test]
#[ignore]
fn regenerate_golden_v2() {
    let g = golden_v2();
    let dir = g.join("dataset");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&g).unwrap();
    let k = MasterKey::generate().unwrap();
    std::fs::write(
        g.join("key.hex"),
        format!("{}\n", hex::encode(k.as_bytes())),
    )
    .unwrap();
    let o = format::ConvertOptions {
        shard_size: Some(400),
        chunk_size: 64,
        plain: vec!["text".into()],
        keys: vec![k.clone()],
        metadata: BTreeMap::from([("golden".to_string(), "v2".to_string())]),
    };
    format::convert(&golden_v2_inputs(), &dir, &o, &mut |_, _| {}).unwrap();
    let ud = unlock(&dir, &k).unwrap();
    assert_eq!(
        ud.dataset().shards().len(),
        2,
        "the golden set has two shards"
    );
    let (features, tokens, text) = golden_v2_rows();
    let h = ShardHeader::read(&dir.join("shard-00000.safetensors")).unwrap();
    let tokens_hex: Vec<String> = tokens
        .iter()
        .map(|r| hex::encode(r.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()))
        .collect();
    let text_hex: Vec<String> = text.iter().map(hex::encode).collect();
    let expected = serde_json::json!({
        "key_id": k.id(),
        "columns": {
            "features": {"dtype": "F32", "shape": [2], "ragged": false, "hex": hex::encode(&features)},
            "tokens": {"dtype": "I32", "shape": [], "ragged": true, "rows_hex": tokens_hex},
            "text": {"dtype": "U8", "shape": [], "ragged": true, "rows_hex": text_hex},
        },
        "example": {
            "descriptor": h.descriptor_json(),
            "header_digest": hex::encode(h.digest),
            "tokens_offsets_shard0": format::read_row_offsets(&ud, 0, 1).unwrap(),
        },
    });
    std::fs::write(
        g.join("expected.json"),
        serde_json::to_string_pretty(&expected).unwrap() + "\n",
    )
    .unwrap();
}
