//! The loader over a real converted dataset (format layer): plaintext round trip through
//! batches, tamper of a shard byte reported with shard/tensor/chunk, the bench report.
use std::sync::Arc;

use ciphershard::cipher::Backend;
use ciphershard::format::{ConvertInput, ConvertOptions, Dtype, convert};
use ciphershard::pipeline::{FormatSource, Loader, LoaderOptions, RowSource};
use ciphershard::{Error, MasterKey};

fn make(dir: &std::path::Path, rows: u64) -> (MasterKey, Vec<f32>, Vec<i32>) {
    let key = MasterKey::generate().unwrap();
    let x: Vec<f32> = (0..rows * 3).map(|i| i as f32 * 0.5).collect();
    let y: Vec<i32> = (0..rows as i32).map(|i| i * 7).collect();
    let inputs = [
        ConvertInput::InMemory {
            name: "x".into(),
            dtype: Dtype::F32,
            shape: vec![rows, 3],
            data: x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        },
        ConvertInput::InMemory {
            name: "y".into(),
            dtype: Dtype::I32,
            shape: vec![rows],
            data: y.iter().flat_map(|v| v.to_le_bytes()).collect(),
        },
    ];
    let opts = ConvertOptions {
        keys: vec![key.clone()],
        chunk_size: 128,
        shard_size: Some(1500),
        plain: vec!["y".into()],
        ..Default::default()
    };
    convert(&inputs, dir, &opts, &mut |_, _| {}).unwrap();
    (key, x, y)
}

#[test]
fn batches_hold_the_converted_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let (key, x, y) = make(dir.path(), 300);
    let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
    assert!(src.shard_count() > 1);
    let o = LoaderOptions {
        batch_size: 32,
        seed: 3,
        threads: 2,
        ..Default::default()
    };
    let mut seen = 0;
    for b in Loader::new(src, &o).unwrap() {
        let b = b.unwrap();
        let xs = b.tensor("x").unwrap();
        assert_eq!(xs.shape(), vec![b.len() as u64, 3]);
        let xs = xs.as_slice::<f32>().unwrap();
        let ys = b.tensor("y").unwrap().as_slice::<i32>().unwrap();
        for (i, &g) in b.row_ids().iter().enumerate() {
            assert_eq!(
                &xs[i * 3..i * 3 + 3],
                &x[g as usize * 3..g as usize * 3 + 3]
            );
            assert_eq!(ys[i], y[g as usize]);
        }
        seen += b.len();
    }
    assert_eq!(seen, 300);
}

#[test]
fn tampered_shard_byte_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _, _) = make(dir.path(), 300);
    let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
    let c = src.chunk(1, 0, 2);
    let path = src.store().name(1).to_path_buf();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[c.file_offset as usize + 7] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let src: Arc<dyn RowSource> = src;
    let e = Loader::new(
        src,
        &LoaderOptions {
            batch_size: 32,
            ..Default::default()
        },
    )
    .unwrap()
    .find_map(|r| r.err())
    .expect("tamper detected");
    match e {
        Error::Integrity(loc) => {
            assert_eq!(loc.path, path);
            assert_eq!(loc.tensor, "x");
            assert_eq!(loc.chunk, 2);
        }
        other => panic!("{other}"),
    }
}

#[test]
fn bench_reports_both_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _, _) = make(dir.path(), 2000);
    let o = ciphershard::bench::loader::BenchOptions {
        epochs: 1,
        batch_size: 64,
        ..Default::default()
    };
    let r = ciphershard::bench::loader::run(Some(dir.path()), Some(&key), &o).unwrap();
    assert_eq!(r.rows, 2000);
    assert_eq!(r.encrypted.batches, 32);
    assert_eq!(r.plaintext_twin.batches, 32);
    assert!(r.ratio > 0.0);
    // The twin decrypts nothing: its chunks pass through the bench's no-op check (counted in
    // the verify stage, every byte read) and are copied as they are.
    assert_eq!(r.plaintext_twin.stats.decrypt.bytes, 0);
    assert_eq!(
        r.plaintext_twin.stats.verify.bytes,
        r.plaintext_twin.stats.read.bytes
    );
    assert!(r.encrypted.stats.decrypt.bytes > 0);
    let j = serde_json::to_value(&r).unwrap();
    assert!(
        j["encrypted"]["stats"]["read_amplification"]
            .as_f64()
            .unwrap()
            >= 1.0
    );
}

/// A small dataset written with the largest chunk size (256 MiB): the loader's buffers follow
/// the data, not the chunk size (no 256 MiB allocation per pooled buffer), and absurd window
/// options neither overflow nor allocate.
#[test]
fn huge_chunk_size_over_small_data_allocates_little() {
    let dir = tempfile::tempdir().unwrap();
    let key = MasterKey::generate().unwrap();
    let rows = 300u64;
    let x: Vec<u8> = (0..rows * 4)
        .flat_map(|i| (i as f32).to_le_bytes())
        .collect();
    let inputs = [ConvertInput::InMemory {
        name: "x".into(),
        dtype: Dtype::F32,
        shape: vec![rows, 4],
        data: x.clone(),
    }];
    let opts = ConvertOptions {
        keys: vec![key.clone()],
        chunk_size: 256 << 20,
        ..Default::default()
    };
    convert(&inputs, dir.path(), &opts, &mut |_, _| {}).unwrap();
    for window_blocks in [8, u64::MAX] {
        let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
        let o = LoaderOptions {
            batch_size: 64,
            window_blocks,
            ..Default::default()
        };
        let mut l = Loader::new(src, &o).unwrap();
        let mut seen = 0;
        for b in l.by_ref() {
            let b = b.unwrap();
            let t = b.tensor("x").unwrap();
            for (i, &r) in b.row_ids().iter().enumerate() {
                let at = r as usize * 16;
                assert_eq!(t.bytes[i * 16..(i + 1) * 16], x[at..at + 16]);
            }
            seen += b.len();
        }
        assert_eq!(seen as u64, rows);
        let pools = l.stats().pool_bytes;
        assert!(pools < 16 << 20, "host pools hold {pools} bytes");
    }
}

/// Absurd options: a batch size far above the dataset loads the whole dataset as one batch
/// (buffers sized by the data), while absurd prefetch or thread counts are refused up front.
#[test]
fn absurd_loader_options_are_errors_or_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (key, x, _) = make(dir.path(), 200);
    let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
    let o = LoaderOptions {
        batch_size: usize::MAX,
        shuffle: false,
        ..Default::default()
    };
    let batches: Vec<_> = Loader::new(src.clone(), &o)
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].len(), 200);
    let got: &[f32] = batches[0].tensor("x").unwrap().as_slice().unwrap();
    assert_eq!(got, &x[..]);
    for (prefetch, threads) in [(usize::MAX, 2), (4, 1 << 20)] {
        let o = LoaderOptions {
            prefetch,
            threads,
            ..Default::default()
        };
        match Loader::new(src.clone(), &o) {
            Err(Error::InvalidArgument(msg)) => assert!(msg.contains("at most"), "{msg}"),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }
}
