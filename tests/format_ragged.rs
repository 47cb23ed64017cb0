//! Ragged columns (format version 2): conversion, the stored layout, verification, export,
//! and lying row offsets.

mod format_common;

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ciphershard::cipher::Cipher;
use ciphershard::cipher::cpu::CpuCipher;
use ciphershard::format::{
    self, ConvertInput, Dataset, Dtype, Layout, Manifest, ShardHeader, UnlockedDataset,
};
use format_common::{bytes, convert_quiet, key, opts};

/// `rows` lists of I32: row `i` holds `len(i)` values `i * 1000 + j`.
fn ragged_i32(name: &str, lens: &[usize]) -> (ConvertInput, Vec<Vec<i32>>) {
    let rows: Vec<Vec<i32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| (0..n as i32).map(|j| i as i32 * 1000 + j).collect())
        .collect();
    let mut offsets = vec![0u64];
    let mut values = Vec::new();
    for r in &rows {
        values.extend(r.iter().flat_map(|v| v.to_le_bytes()));
        offsets.push(offsets.last().unwrap() + r.len() as u64);
    }
    let input = ConvertInput::Ragged {
        name: name.into(),
        dtype: Dtype::I32,
        shape: vec![],
        values,
        offsets,
    };
    (input, rows)
}

/// Byte strings as a ragged U8 column.
fn ragged_text(name: &str, texts: &[&[u8]]) -> ConvertInput {
    let mut offsets = vec![0u64];
    for t in texts {
        offsets.push(offsets.last().unwrap() + t.len() as u64);
    }
    ConvertInput::Ragged {
        name: name.into(),
        dtype: Dtype::U8,
        shape: vec![],
        values: texts.concat(),
        offsets,
    }
}

/// The lengths used below: empty rows, and rows long enough to span several 64-byte chunks.
const LENS: [usize; 12] = [3, 0, 0, 40, 1, 0, 17, 2, 90, 0, 5, 8];
const TEXTS: [&[u8]; 12] = [
    b"alpha",
    b"",
    b"gamma",
    b"",
    b"a much longer note that spans more than one chunk of sixty-four bytes, easily",
    b"z",
    b"",
    b"k",
    b"",
    b"",
    b"omega",
    b"end",
];

/// Decrypts every shard through `decrypt_shard` and reassembles the rows of the ragged
/// column `name` from its values and offsets tensors (read with the stock safetensors crate).
fn rows_of(ds: &UnlockedDataset, name: &str, tmp: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for s in 0..ds.dataset().shards().len() {
        let path = tmp.join(format!("plain-{name}-{s}.safetensors"));
        format::decrypt_shard(ds, s, &path).unwrap();
        let file = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&file).unwrap();
        let values = st.tensor(name).unwrap();
        let offsets = st.tensor(&format!("{name}.offsets")).unwrap();
        assert_eq!(offsets.dtype(), safetensors::Dtype::I64);
        let elem = values.dtype().bitsize() / 8;
        let offs: Vec<usize> = offsets
            .data()
            .chunks(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as usize)
            .collect();
        for w in offs.windows(2) {
            out.push(values.data()[w[0] * elem..w[1] * elem].to_vec());
        }
    }
    out
}

#[test]
fn ragged_columns_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    let (ids, id_rows) = ragged_i32("ids", &LENS);
    let x = ConvertInput::InMemory {
        name: "x".into(),
        dtype: Dtype::F32,
        shape: vec![12, 2],
        data: bytes(12 * 8, 3),
    };
    let inputs = [x, ids, ragged_text("text", &TEXTS)];
    // About 200 bytes a shard: several shards, rows never split.
    let o = opts(64, 200, &["text"]);
    let s = convert_quiet(&inputs, &out, &o).unwrap();
    assert!(s.shards > 2, "{} shards", s.shards);
    assert_eq!(s.rows, 12);
    assert_eq!(s.columns, 3);
    assert_eq!(s.plain_columns, ["text"]);

    let manifest = Manifest::parse(
        &out.join("manifest.json"),
        &std::fs::read(out.join("manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest.version, 2);
    let ragged: Vec<(&str, bool)> = manifest
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.ragged))
        .collect();
    assert_eq!(ragged, [("x", false), ("ids", true), ("text", true)]);

    // Each shard: x, ids, ids.offsets, text, text.offsets; offsets encrypted as their values.
    let h = ShardHeader::read(&out.join("shard-00000.safetensors")).unwrap();
    let layout: Vec<(&str, Layout, bool)> = h
        .descriptor
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.layout, t.encrypted))
        .collect();
    assert_eq!(
        layout,
        [
            ("x", Layout::Fixed, true),
            ("ids", Layout::Ragged, true),
            ("ids.offsets", Layout::RowOffsets, true),
            ("text", Layout::Ragged, false),
            ("text.offsets", Layout::RowOffsets, false),
        ]
    );
    // Stock safetensors tools read the header: names, dtypes, shapes.
    let file = std::fs::read(out.join("shard-00000.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&file).unwrap();
    assert_eq!(
        st.tensor("ids.offsets").unwrap().shape(),
        [h.descriptor.rows as usize + 1]
    );

    let ds = Dataset::open(&out)
        .unwrap()
        .unlock(&key(1), &CpuCipher::new())
        .unwrap();
    let v = format::verify(&ds, &mut |_, _| {}).unwrap();
    assert_eq!(v.shards, s.shards);
    let got_ids: Vec<Vec<i32>> = rows_of(&ds, "ids", dir.path())
        .into_iter()
        .map(|r| {
            r.chunks(4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        })
        .collect();
    assert_eq!(got_ids, id_rows);
    let got_text = rows_of(&ds, "text", dir.path());
    assert_eq!(
        got_text,
        TEXTS.iter().map(|t| t.to_vec()).collect::<Vec<_>>()
    );
}

/// A ragged column whose offsets do not describe its values (written by someone who holds
/// the key, so every tag is right) is refused by verify and by decrypt, naming the shard file,
/// the column and the row.
#[test]
fn lying_offsets_are_refused_naming_file_column_and_row() {
    for (lie, want) in [
        (vec![0i64, 3, 1, 41, 42, 44], "row 1 ends before it starts"),
        (
            vec![0i64, 3, 3, 3, 99, 44],
            "row 3 ends at element 99, past the 44",
        ),
        (vec![5i64, 3, 3, 43, 44, 44], "start at 5"),
        (vec![0i64, 3, 3, 3, 43, 43], "last row ends at element 43"),
        (vec![0i64, 3, -3, 3, 43, 44], "row offset 2 is negative"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ds");
        let (ids, _) = ragged_i32(
            "ids",
            &LENS[..4].iter().copied().chain([1]).collect::<Vec<_>>(),
        );
        // One shard of 5 rows: offsets 0, 3, 3, 3, 43, 44.
        convert_quiet(&[ids], &out, &opts(64, 1 << 20, &[])).unwrap();
        reseal_tensor(
            &out,
            0,
            "ids.offsets",
            &lie.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>(),
        );
        let ds = Dataset::open(&out)
            .unwrap()
            .unlock(&key(1), &CpuCipher::new())
            .unwrap();
        for e in [
            format::verify(&ds, &mut |_, _| {}).unwrap_err(),
            format::decrypt_shard(&ds, 0, &dir.path().join("plain.safetensors")).unwrap_err(),
        ] {
            let e = e.to_string();
            assert!(
                e.contains("shard-00000.safetensors")
                    && e.contains("column 'ids'")
                    && e.contains(want),
                "{e}"
            );
        }
        assert!(!dir.path().join("plain.safetensors").exists());
    }
}

/// Replaces tensor `name` of shard `s` with `plaintext` (same length), sealed under the shard's
/// own data key with the right nonces and associated data, tags rewritten in the header: what
/// a writer holding the key could do.
fn reseal_tensor(dir: &Path, s: usize, name: &str, plaintext: &[u8]) {
    let ds = Dataset::open(dir)
        .unwrap()
        .unlock(&key(1), &CpuCipher::new())
        .unwrap();
    let h = &ds.dataset().shards()[s];
    let (t, desc) = h
        .descriptor
        .tensors
        .iter()
        .enumerate()
        .find(|(_, t)| t.name == name)
        .unwrap();
    assert_eq!(desc.len() as usize, plaintext.len());
    let opener = CpuCipher::new().prepare(ds.data_key(s)).unwrap();
    let path = h.path.clone();
    let mut file = std::fs::read(&path).unwrap();
    let mut tags = Vec::new();
    let mut at = 0;
    for c in h.chunks(t as u32) {
        let mut buf = plaintext[at..at + c.len].to_vec();
        let tag = opener
            .seal_in_place(&c.nonce, &c.aad, c.encrypted, &mut buf)
            .unwrap();
        file[c.file_offset as usize..c.file_offset as usize + c.len].copy_from_slice(&buf);
        tags.push((
            desc.first_chunk + (at / h.descriptor.chunk_size as usize) as u64,
            tag,
        ));
        at += c.len;
    }
    // Rewrite the tags in the header's base64 (same length).
    let header = String::from_utf8(file[8..h.data_start as usize].to_vec()).unwrap();
    let start = header.find("\"ciphershard.tags\":\"").unwrap() + "\"ciphershard.tags\":\"".len();
    let end = start + header[start..].find('"').unwrap();
    let mut raw = B64.decode(&header[start..end]).unwrap();
    for (g, tag) in tags {
        raw[16 * (1 + g as usize)..16 * (2 + g as usize)].copy_from_slice(&tag);
    }
    let new_header = format!("{}{}{}", &header[..start], B64.encode(&raw), &header[end..]);
    assert_eq!(new_header.len(), header.len());
    file[8..h.data_start as usize].copy_from_slice(new_header.as_bytes());
    drop(ds);
    std::fs::write(&path, file).unwrap();
}

/// Ragged and fixed columns must agree on the row count, names may not collide with a ragged
/// column's offsets tensor, and bad in-memory offsets are refused before anything is written.
#[test]
fn bad_ragged_inputs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    let (ids, _) = ragged_i32("ids", &[1, 2, 3]);
    let cases: Vec<(Vec<ConvertInput>, &str)> = vec![
        (
            vec![
                ids.clone(),
                ConvertInput::InMemory {
                    name: "x".into(),
                    dtype: Dtype::U8,
                    shape: vec![4],
                    data: vec![0; 4],
                },
            ],
            "has 4 rows, an earlier in-memory column 3",
        ),
        (
            vec![
                ids.clone(),
                ConvertInput::InMemory {
                    name: "ids.offsets".into(),
                    dtype: Dtype::U8,
                    shape: vec![3],
                    data: vec![0; 3],
                },
            ],
            "column 'ids.offsets' is given twice",
        ),
        (
            vec![ConvertInput::Ragged {
                name: "r".into(),
                dtype: Dtype::U16,
                shape: vec![],
                values: vec![0; 6],
                offsets: vec![0, 2, 1, 3],
            }],
            "in-memory column 'r' 4 offsets do not",
        ),
        (
            vec![ConvertInput::Ragged {
                name: "r".into(),
                dtype: Dtype::U16,
                shape: vec![],
                values: vec![0; 5],
                offsets: vec![0, 2, 3],
            }],
            "in-memory column 'r'",
        ),
        (
            vec![ConvertInput::Ragged {
                name: "z".into(),
                dtype: Dtype::U16,
                shape: vec![2, 0],
                values: vec![],
                offsets: vec![0, 4],
            }],
            "ragged column 'z' has elements of shape [2, 0] U16, which hold no bytes",
        ),
        (
            vec![ids.clone(), format_common::column("w", Dtype::U8, &[3], 1)],
            "",
        ),
    ];
    for (inputs, want) in cases {
        let r = convert_quiet(&inputs, &out, &opts(64, 1 << 20, &[]));
        if want.is_empty() {
            r.unwrap();
            std::fs::remove_dir_all(&out).unwrap();
            continue;
        }
        let e = r.unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
        assert!(!out.join("manifest.json").exists());
    }
    // More rows than 2^20 one-row shards (a 1-byte shard size): refused naming the input.
    let many = ConvertInput::Ragged {
        name: "many".into(),
        dtype: Dtype::U8,
        shape: vec![],
        values: vec![],
        offsets: vec![0; (1 << 20) + 2],
    };
    let e = convert_quiet(&[many], &out, &opts(64, 1, &[]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("<memory>: 1048577 rows make 1048577 shards, more than the 1048576"),
        "{e}"
    );
    // Mixed with a byte-range input.
    let st = dir.path().join("a.safetensors");
    std::fs::write(&st, safetensors_file()).unwrap();
    let e = convert_quiet(
        &[ids, ConvertInput::Safetensors(st)],
        &out,
        &opts(64, 1 << 20, &[]),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("cannot be mixed"), "{e}");
}

fn safetensors_file() -> Vec<u8> {
    let data = vec![0u8; 3];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![3], &data).unwrap();
    safetensors::serialize([("a", view)], None).unwrap()
}
