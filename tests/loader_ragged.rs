//! The host loader over ragged columns: each batch holds the rows' values concatenated and
//! their `B + 1` offsets, every row exactly as converted, for any thread count, shuffled or
//! not, across ranks and after a resume; the device loaders refuse ragged columns clearly.

use std::sync::Arc;

use ciphershard::MasterKey;
use ciphershard::cipher::Backend;
use ciphershard::format::{ConvertInput, ConvertOptions, Dtype, convert};
use ciphershard::pipeline::{FormatSource, Loader, LoaderOptions, RowSource};

/// Row `r` of `tokens` holds `len(r)` I32 values `r * 1000 + j`; lengths are skewed (many
/// short and empty rows, a few long ones spanning several chunks).
fn len(r: u64) -> usize {
    match r % 23 {
        0 => 0,
        7 => 300,
        _ => ((r * 37) % 11) as usize,
    }
}

fn row(r: u64) -> Vec<i32> {
    (0..len(r) as i32).map(|j| r as i32 * 1000 + j).collect()
}

fn make(dir: &std::path::Path, rows: u64, plain: &[&str]) -> MasterKey {
    let key = MasterKey::generate().unwrap();
    let mut values = Vec::new();
    let mut offsets = vec![0u64];
    for r in 0..rows {
        values.extend(row(r).iter().flat_map(|v| v.to_le_bytes()));
        offsets.push(offsets.last().unwrap() + len(r) as u64);
    }
    let inputs = [
        ConvertInput::InMemory {
            name: "label".into(),
            dtype: Dtype::I64,
            shape: vec![rows],
            data: (0..rows as i64)
                .flat_map(|r| (r * 3).to_le_bytes())
                .collect(),
        },
        ConvertInput::Ragged {
            name: "tokens".into(),
            dtype: Dtype::I32,
            shape: vec![],
            values,
            offsets,
        },
    ];
    let opts = ConvertOptions {
        keys: vec![key.clone()],
        chunk_size: 256,
        shard_size: Some(4000),
        plain: plain.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    convert(&inputs, dir, &opts, &mut |_, _| {}).unwrap();
    key
}

/// Checks every row of a batch and returns its row ids.
fn check_batch(b: &ciphershard::pipeline::Batch) -> Vec<u64> {
    let t = b.tensor("tokens").unwrap();
    assert!(t.is_ragged());
    let offsets = t.offsets().unwrap();
    assert_eq!(offsets.len(), b.len() + 1);
    assert_eq!(offsets[0], 0);
    let values = t.as_slice::<i32>().unwrap();
    assert_eq!(t.shape(), vec![values.len() as u64]);
    assert_eq!(*offsets.last().unwrap() as usize, values.len());
    let labels = b.tensor("label").unwrap().as_slice::<i64>().unwrap();
    for (i, &g) in b.row_ids().iter().enumerate() {
        let got = &values[offsets[i] as usize..offsets[i + 1] as usize];
        assert_eq!(got, row(g).as_slice(), "row {g}");
        assert_eq!(labels[i], g as i64 * 3);
    }
    b.row_ids().to_vec()
}

fn epoch(src: Arc<FormatSource>, o: &LoaderOptions) -> Vec<Vec<u64>> {
    Loader::new(src, o)
        .unwrap()
        .map(|b| check_batch(&b.unwrap()))
        .collect()
}

#[test]
fn ragged_batches_hold_every_row_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let rows = 700;
    for plain in [&[][..], &["tokens"][..]] {
        let sub = dir.path().join(format!("p{}", plain.len()));
        let key = make(&sub, rows, plain);
        let src = FormatSource::open(&sub, &key, Backend::Cpu).unwrap();
        assert!(src.shard_count() > 2, "{} shards", src.shard_count());
        let mut reference = None;
        for threads in [1, 2, 4] {
            for shuffle in [true, false] {
                let o = LoaderOptions {
                    batch_size: 33,
                    seed: 5,
                    threads,
                    shuffle,
                    ..Default::default()
                };
                let batches = epoch(src.clone(), &o);
                let mut all: Vec<u64> = batches.iter().flatten().copied().collect();
                all.sort_unstable();
                assert_eq!(all, (0..rows).collect::<Vec<_>>());
                if shuffle {
                    // Deterministic for any thread count.
                    match &reference {
                        None => reference = Some(batches),
                        Some(r) => assert_eq!(&batches, r, "threads {threads}"),
                    }
                }
            }
        }
    }
}

#[test]
fn ragged_batches_split_across_ranks_and_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let key = make(dir.path(), 500, &[]);
    let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
    let base = LoaderOptions {
        batch_size: 16,
        seed: 9,
        threads: 2,
        ..Default::default()
    };
    let mut seen: Vec<u64> = (0..2)
        .flat_map(|rank| {
            let o = LoaderOptions {
                rank,
                world_size: 2,
                ..base.clone()
            };
            epoch(src.clone(), &o).into_iter().flatten()
        })
        .collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 500);
    // Resume after 5 batches gives the rest of the epoch unchanged.
    let full = epoch(src.clone(), &base);
    let mut l = Loader::new(src.clone(), &base).unwrap();
    for _ in 0..5 {
        l.next().unwrap().unwrap();
    }
    let state = l.state();
    drop(l);
    let rest: Vec<Vec<u64>> = Loader::resume(src, &base, &state)
        .unwrap()
        .map(|b| check_batch(&b.unwrap()))
        .collect();
    assert_eq!(rest, full[5..]);
}

/// A tampered byte in a ragged column's values is an integrity error naming its chunk, and
/// one in its offsets is caught when the dataset is opened for loading.
#[test]
fn tampered_ragged_column_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = make(dir.path(), 300, &[]);
    let shard = dir.path().join("shard-00000.safetensors");
    let h = ciphershard::format::ShardHeader::read(&shard).unwrap();
    let (vi, _) = h.tensor("tokens").unwrap();
    let (oi, _) = h.tensor("tokens.offsets").unwrap();
    let original = std::fs::read(&shard).unwrap();
    for (tensor, at_open) in [(vi, false), (oi, true)] {
        let c = h.chunk(tensor, 0);
        let mut bytes = original.clone();
        bytes[c.file_offset as usize] ^= 1;
        std::fs::write(&shard, &bytes).unwrap();
        let opened = FormatSource::open(dir.path(), &key, Backend::Cpu);
        let e = if at_open {
            opened.unwrap_err()
        } else {
            let o = LoaderOptions {
                batch_size: 300,
                shuffle: false,
                ..Default::default()
            };
            Loader::new(opened.unwrap(), &o)
                .unwrap()
                .find_map(|b| b.err())
                .expect("an integrity error")
        };
        let msg = e.to_string();
        let name = if at_open { "tokens.offsets" } else { "tokens" };
        assert!(
            msg.contains(&format!("tensor '{name}'")) && msg.contains("shard-00000"),
            "{msg}"
        );
    }
    std::fs::write(&shard, &original).unwrap();
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
#[test]
fn device_loaders_refuse_ragged_columns() {
    let dir = tempfile::tempdir().unwrap();
    let key = make(dir.path(), 50, &[]);
    let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
    let e = ciphershard::pipeline::device::refuse_ragged(src.as_ref()).unwrap_err();
    assert!(e.to_string().contains("column 'tokens' is ragged"), "{e}");
}
