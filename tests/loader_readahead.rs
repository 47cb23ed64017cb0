//! Reading ahead (issue 15, docs/LOADER.md "Reading ahead"): the I/O threads that read the next
//! windows' ciphertext change no batch (same seed: the same batches for any thread count, with
//! and without reading ahead), a failed or tampered read ahead is the error of the batch that
//! needs the chunk, naming the shard, and dropping a loader with reads outstanding joins
//! promptly.
mod common;

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ciphershard::Error;
use ciphershard::pipeline::{Loader, LoaderOptions, RowSource};

/// Three shards, rows straddling 1 KiB chunks, about 60 windows an epoch.
fn fixture(dir: &std::path::Path) -> Arc<common::Fixture> {
    common::Fixture::create(
        dir,
        &[3000, 2500, 2700],
        &[
            common::Col("x", "F32", 4, 15, true),
            common::Col("y", "U8", 1, 3, false),
        ],
        1024,
    )
}

fn opts(threads: usize, readahead_windows: u64, io_threads: usize) -> LoaderOptions {
    LoaderOptions {
        batch_size: 48,
        seed: 11,
        epochs: 2,
        threads,
        prefetch: 3,
        window_blocks: 4,
        readahead_windows: Some(readahead_windows),
        io_threads: Some(io_threads),
        ..Default::default()
    }
}

#[test]
fn batches_are_the_same_with_and_without_reading_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture(dir.path());
    let src: Arc<dyn RowSource> = fx.clone();
    let reference = common::all_batches(Loader::new(src.clone(), &opts(1, 0, 1)).unwrap());
    assert_eq!(reference.len(), 2 * (8200usize).div_ceil(48));
    for (threads, ahead, io) in [(1, 1, 1), (2, 1, 4), (4, 3, 2), (3, 8, 8), (2, 0, 1)] {
        let mut l = Loader::new(src.clone(), &opts(threads, ahead, io)).unwrap();
        let mut got = Vec::new();
        for b in l.by_ref() {
            let b = b.unwrap();
            fx.check_batch(&b);
            got.push((
                b.row_ids().to_vec(),
                b.tensors().map(|t| t.bytes.to_vec()).collect::<Vec<_>>(),
            ));
        }
        assert!(
            got == reference,
            "threads {threads}, readahead {ahead}, io {io}: batches differ"
        );
        // Every chunk buffer came from the pool's bound, read-ahead or not (queued reads
        // hold their chunks weakly: a lagging I/O thread keeps no buffer alive).
        assert_eq!(
            l.extra_allocations(),
            0,
            "threads {threads}, readahead {ahead}, io {io}"
        );
    }
    // Zero I/O threads cannot read ahead: refused by name.
    let e = Loader::new(src, &opts(2, 1, 0)).err().unwrap();
    assert!(e.to_string().contains("io_threads"), "{e}");
}

#[test]
fn a_tampered_chunk_read_ahead_is_the_batch_error_naming_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture(dir.path());
    let src: Arc<dyn RowSource> = fx.clone();
    let mut l = Loader::new(src.clone(), &opts(2, 4, 4)).unwrap();
    fx.check_batch(&l.next().unwrap().unwrap());
    // Tamper with a chunk of shard 2: the second epoch reads it again in any case.
    let path = src.store().name(2).to_path_buf();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let off = fx.chunk_offset(2, 0, 17) + 9;
    let mut b = [0u8];
    f.read_exact_at(&mut b, off).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], off).unwrap();
    let mut err = None;
    for item in l.by_ref() {
        match item {
            Ok(b) => fx.check_batch(&b), // every batch before the error is verified plaintext
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    match err.expect("the tampered chunk must be reported, never skipped") {
        Error::Integrity(loc) => {
            assert_eq!(loc.path, path);
            assert_eq!((loc.tensor.as_str(), loc.chunk), ("x", 17));
        }
        other => panic!("expected an integrity error, got {other}"),
    }
    assert!(l.next().is_none(), "the loader goes on after its error");
}

#[test]
fn a_shard_truncated_under_reading_ahead_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture(dir.path());
    let src: Arc<dyn RowSource> = fx.clone();
    let mut l = Loader::new(src.clone(), &opts(2, 4, 4)).unwrap();
    fx.check_batch(&l.next().unwrap().unwrap());
    let path = src.store().name(1).to_path_buf();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(3000)
        .unwrap();
    let mut err = None;
    for item in l.by_ref() {
        match item {
            Ok(b) => fx.check_batch(&b),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let e = err.expect("the truncation must be reported, never skipped");
    match &e {
        Error::Io { path: p, .. } => assert_eq!(p, &path),
        other => panic!("expected an I/O error naming the shard, got {other}"),
    }
    assert!(e.to_string().contains("truncated"), "{e}");
    assert!(l.next().is_none());
}

#[test]
fn dropping_with_reads_outstanding_joins_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let src: Arc<dyn RowSource> = fixture(dir.path());
    for (threads, ahead, io) in [(1, 8, 1), (4, 16, 8)] {
        let o = LoaderOptions {
            batch_size: 16,
            epochs: 1000,
            ..opts(threads, ahead, io)
        };
        let mut l = Loader::new(src.clone(), &o).unwrap();
        let _held = l.next().unwrap().unwrap();
        let t = Instant::now();
        drop(l);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "drop took {:?}",
            t.elapsed()
        );
    }
}
