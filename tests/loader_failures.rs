//! Tamper and truncation inside a running epoch become `Err` naming the chunk (never a panic,
//! a SIGBUS or a hang); dropping mid-epoch joins promptly; see loader_stall.rs for a stalled consumer.
mod common;

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ciphershard::Error;
use ciphershard::pipeline::{DecryptMode, Loader, LoaderOptions, RowSource};

fn big(dir: &std::path::Path) -> Arc<common::Fixture> {
    common::Fixture::create(
        dir,
        &[4000, 4000],
        &[
            common::Col("x", "F32", 4, 16, true),
            common::Col("y", "U8", 1, 3, false),
        ],
        1024,
    )
}

fn sequential(mode: DecryptMode) -> LoaderOptions {
    LoaderOptions {
        batch_size: 64,
        shuffle: false,
        epochs: 1,
        threads: 2,
        prefetch: 2,
        window_blocks: 2,
        mode,
        ..Default::default()
    }
}

#[test]
fn tamper_in_a_running_epoch_names_the_chunk() {
    for (mode, col) in [
        (DecryptMode::ChunkOpen, 0usize),
        (DecryptMode::RowCtr, 0),
        (DecryptMode::RowCtr, 1),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let fx = big(dir.path());
        let src: Arc<dyn RowSource> = fx.clone();
        let mut l = Loader::new(src.clone(), &sequential(mode)).unwrap();
        let first = l.next().unwrap().unwrap();
        fx.check_batch(&first);
        // Flip one byte of chunk 3 of shard 1 (read only near the end of the epoch).
        let path = src.store().name(1).to_path_buf();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .open(&path)
            .unwrap();
        let off = fx.chunk_offset(1, col, 3) + 5;
        let mut b = [0u8];
        f.read_exact_at(&mut b, off).unwrap();
        f.write_all_at(&[b[0] ^ 0x20], off).unwrap();
        let mut err = None;
        let mut good = 1;
        for item in l.by_ref() {
            match item {
                Ok(b) => {
                    fx.check_batch(&b); // every batch before the failure is verified plaintext
                    good += 1;
                }
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        let e = err.expect("tamper must be reported");
        match &e {
            Error::Integrity(loc) => {
                assert_eq!(loc.path, path);
                assert_eq!(loc.tensor, if col == 0 { "x" } else { "y" });
                assert_eq!(loc.chunk, 3);
            }
            other => panic!("expected an integrity error, got {other}"),
        }
        assert!(e.to_string().contains("chunk 3"), "{e}");
        assert!(good > 1 && good < 125, "{good}");
        // The loader stops cleanly after the error; state points at the failed batch.
        assert!(l.next().is_none());
        assert_eq!(l.state().batches_done_in_epoch, good as u64);
    }
}

#[test]
fn truncated_while_open_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let fx = big(dir.path());
    let src: Arc<dyn RowSource> = fx.clone();
    let mut l = Loader::new(src.clone(), &sequential(DecryptMode::RowCtr)).unwrap();
    l.next().unwrap().unwrap();
    let path = src.store().name(1).to_path_buf();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(100)
        .unwrap();
    let e = l
        .find_map(|r| r.err())
        .expect("truncation must be reported");
    match &e {
        Error::Io { path: p, .. } => assert_eq!(p, &path),
        other => panic!("expected an I/O error, got {other}"),
    }
    assert!(e.to_string().contains("truncated"), "{e}");
    // Opening a new loader on the truncated dataset fails up front.
    let e = Loader::new(src, &sequential(DecryptMode::RowCtr)).unwrap_err();
    assert!(e.to_string().contains("header says"), "{e}");
}

#[test]
fn deleted_while_open_still_reads_or_errors() {
    // The open file descriptor keeps the inode: a deleted shard is read to the end, verified.
    let dir = tempfile::tempdir().unwrap();
    let fx = big(dir.path());
    let src: Arc<dyn RowSource> = fx.clone();
    let mut l = Loader::new(src.clone(), &sequential(DecryptMode::ChunkOpen)).unwrap();
    std::fs::remove_file(src.store().name(1)).unwrap();
    let mut n = 0;
    for b in l.by_ref() {
        fx.check_batch(&b.unwrap());
        n += 1;
    }
    assert_eq!(n, 125);
}

#[test]
fn drop_mid_epoch_joins_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let src: Arc<dyn RowSource> = big(dir.path());
    for threads in [1, 4] {
        let o = LoaderOptions {
            batch_size: 16,
            epochs: 1000,
            threads,
            prefetch: 8,
            ..Default::default()
        };
        let mut l = Loader::new(src.clone(), &o).unwrap();
        let _held = l.next().unwrap().unwrap(); // a batch outliving the loader is fine
        let t = Instant::now();
        drop(l);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "drop took {:?}",
            t.elapsed()
        );
    }
}

#[test]
fn bytes_changed_after_verification_never_reach_a_batch() {
    // The loader decrypts from the private copy it verified, so a writer changing the file
    // afterwards (time-of-check/time-of-use) changes nothing that is handed out. Were the rows
    // decrypted from the file (or the chunk re-read), the batches would differ or fail.
    for mode in [DecryptMode::RowCtr, DecryptMode::ChunkOpen] {
        let dir = tempfile::tempdir().unwrap();
        // 64-byte rows, 64 KiB chunks: x chunk 0 of shard 0 holds rows 0..1024.
        let fx = common::Fixture::create(
            dir.path(),
            &[3000],
            &[common::Col("x", "F32", 4, 16, true)],
            65536,
        );
        let src: Arc<dyn RowSource> = fx.clone();
        let o = LoaderOptions {
            batch_size: 8,
            threads: 1,
            prefetch: 1,
            ..sequential(mode)
        };
        let mut l = Loader::new(src.clone(), &o).unwrap();
        fx.check_batch(&l.next().unwrap().unwrap()); // chunk 0 read and verified
        // Overwrite rows 512..1024 in the file: at most 3 batches (24 rows) are in flight, so
        // those rows are assembled after the write, from the chunk verified before it.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(src.store().name(0))
            .unwrap();
        f.write_all_at(&[0xFF; 32768], fx.chunk_offset(0, 0, 0) + 32768)
            .unwrap();
        let mut n = 1;
        for b in l.by_ref() {
            fx.check_batch(&b.unwrap());
            n += 1;
        }
        assert_eq!(n, 375);
        // A fresh loader reads the file again and reports the change.
        let e = Loader::new(src, &o).unwrap().find_map(|r| r.err()).unwrap();
        assert!(
            matches!(e, Error::Integrity(ref loc) if loc.chunk == 0),
            "{e}"
        );
    }
}

/// Delegates to the fixture but panics when asked for one chunk (a backend or source bug).
struct PanickingSource(Arc<common::Fixture>);

impl RowSource for PanickingSource {
    fn shard_count(&self) -> usize {
        self.0.shard_count()
    }
    fn shard_rows(&self, s: usize) -> u64 {
        self.0.shard_rows(s)
    }
    fn shard_row_start(&self, s: usize) -> u64 {
        self.0.shard_row_start(s)
    }
    fn store(&self) -> &dyn ciphershard::store::ShardStore {
        self.0.store()
    }
    fn columns(&self) -> &[ciphershard::pipeline::ColumnInfo] {
        self.0.columns()
    }
    fn chunk_size(&self) -> u64 {
        self.0.chunk_size()
    }
    fn chunk(&self, s: usize, c: usize, j: u64) -> ciphershard::pipeline::ChunkSpec {
        assert!(!(s == 1 && j == 2), "injected failure");
        self.0.chunk(s, c, j)
    }
    fn opener(&self, s: usize) -> &dyn ciphershard::cipher::ChunkOpener {
        self.0.opener(s)
    }
    fn location(&self, s: usize, c: usize, j: u64) -> ciphershard::error::ChunkLocation {
        self.0.location(s, c, j)
    }
}

#[test]
fn a_panicking_worker_becomes_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let src: Arc<dyn RowSource> = Arc::new(PanickingSource(big(dir.path())));
    let mut l = Loader::new(src, &sequential(DecryptMode::ChunkOpen)).unwrap();
    let e = l
        .find_map(|r| r.err())
        .expect("the panic must surface as an error");
    assert!(matches!(e, Error::Stopped(_)), "{e}");
    assert!(l.next().is_none());
}
