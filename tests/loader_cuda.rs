//! The device loader (batches in CUDA memory) against the host loader: same seed, same rows,
//! same bytes once downloaded; tamper → `Err(Integrity)` naming the shard, tensor and chunk.
//! GPU tests print `SKIPPED` and return when no CUDA device answers (`cuda::probe`), so this
//! binary passes on a machine without a GPU and is the one to carry to the GPU box
//! (`cargo test --release --no-default-features --features cuda --test loader_cuda --no-run`).
#![cfg(feature = "cuda")]

use std::path::Path;

use ciphershard::cipher::{Backend, cuda};
use ciphershard::pipeline::{
    CudaBatch, DeviceLoader, DeviceStats, LoaderOptions, LoaderState, LoaderStats,
};
use ciphershard::{Error, MasterKey};

mod device_common;
use device_common::{Column, DeviceUnderTest, make};

fn gpu(test: &str) -> bool {
    match cuda::probe() {
        Ok(d) => {
            eprintln!("{test}: on {d}");
            true
        }
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

impl DeviceUnderTest for DeviceLoader {
    type Batch = CudaBatch;
    fn open_at(dir: &Path, key: &MasterKey, o: &LoaderOptions) -> Self {
        DeviceLoader::open(dir, key, 0, o).unwrap()
    }
    fn per_epoch(&self) -> u64 {
        self.batches_per_epoch()
    }
    fn position(&self) -> LoaderState {
        self.state()
    }
    fn telemetry(&self) -> (DeviceStats, LoaderStats) {
        (self.device_stats(), self.stats())
    }
    fn place(b: &CudaBatch) -> (u64, u64) {
        (b.epoch(), b.index())
    }
    fn rows(b: &CudaBatch) -> Vec<u64> {
        b.row_ids().to_vec()
    }
    fn read_back(b: &CudaBatch) -> Vec<Column> {
        b.tensors()
            .map(|t| {
                assert_ne!(t.device_ptr(), 0);
                assert!(t.slice().len() >= t.len());
                let bytes = t.to_host().unwrap();
                (t.name.into(), t.dtype.into(), t.shape(), bytes)
            })
            .collect()
    }
}

fn compare(dir: &Path, key: &MasterKey, o: &LoaderOptions) -> usize {
    device_common::compare::<DeviceLoader>(dir, key, o)
}

#[test]
fn device_batches_equal_host_batches() {
    if !gpu("device_batches_equal_host_batches") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 12-byte rows over 128-byte chunks: rows straddle chunks; several shards and keys.
    let key = make(dir.path(), 700, 3, 128, 6000);
    let mut n = 0;
    for (seed, batch, w, world, rank, drop_last, shuffle) in [
        (1, 32, 8, 1, 0, false, true),
        (2, 50, 3, 1, 0, false, true),
        (3, 64, 1, 2, 1, false, true),
        (4, 17, 2, 3, 2, true, true),
        (5, 100, 4, 1, 0, false, false),
        // The last rank's padding wraps to the epoch's first window (reloaded after eviction).
        (6, 33, 2, 3, 2, false, true),
    ] {
        let o = LoaderOptions {
            batch_size: batch,
            seed,
            window_blocks: w,
            world_size: world,
            rank,
            drop_last,
            shuffle,
            epochs: 2,
            ..Default::default()
        };
        n += compare(dir.path(), &key, &o);
    }
    // 16-byte rows, 4 KiB chunks: the vectorized gather path, bigger windows.
    let dir2 = tempfile::tempdir().unwrap();
    let key2 = make(dir2.path(), 5000, 4, 4096, 64 << 10);
    n += compare(
        dir2.path(),
        &key2,
        &LoaderOptions {
            batch_size: 256,
            seed: 9,
            ..Default::default()
        },
    );
    eprintln!("{n} device batches equal to the host loader's");
}

#[test]
fn tampered_chunk_is_an_integrity_error_and_nothing_after() {
    if gpu("tampered_chunk_is_an_integrity_error_and_nothing_after") {
        device_common::tamper_each_column::<DeviceLoader>();
    }
}

#[test]
fn zero_width_columns_are_b_by_0_tensors() {
    if gpu("zero_width_columns_are_b_by_0_tensors") {
        device_common::zero_width_columns::<DeviceLoader>();
    }
}

#[test]
fn resume_and_drop_mid_epoch() {
    if gpu("resume_and_drop_mid_epoch") {
        device_common::resume_and_drop_mid_epoch::<DeviceLoader>();
    }
}

#[test]
fn device_bench_reports_cuda_end_to_end() {
    if !gpu("device_bench_reports_cuda_end_to_end") {
        return;
    }
    let r = ciphershard::bench::loader::run(
        None,
        None,
        &ciphershard::bench::loader::BenchOptions {
            backend: Backend::Cuda,
            generated_rows: 8192,
            generated_features: 64,
            epochs: 1,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.backend, "cuda");
    assert!(r.encrypted.batches > 0);
    assert_eq!(r.encrypted.batches, r.plaintext_twin.batches);
    assert_eq!(
        r.encrypted.stats.delivered_bytes,
        r.plaintext_twin.stats.delivered_bytes
    );
    eprintln!(
        "device loader: encrypted {:.2} GB/s, twin {:.2} GB/s, ratio {:.2}",
        r.encrypted.gb_per_s, r.plaintext_twin.gb_per_s, r.ratio
    );
}

#[test]
fn without_a_device_the_error_is_clear() {
    if cuda::probe().is_ok() {
        eprintln!("without_a_device_the_error_is_clear: not applicable, a CUDA device is present");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = make(dir.path(), 50, 3, 128, 6000);
    match DeviceLoader::open(dir.path(), &key, 0, &LoaderOptions::default()) {
        Err(Error::BackendUnavailable { backend, reason }) => {
            assert_eq!(backend, "cuda");
            assert!(reason.contains("--backend cpu"), "{reason}");
        }
        other => panic!("expected BackendUnavailable, got {other:?}"),
    }
    let r = ciphershard::bench::loader::run(
        None,
        None,
        &ciphershard::bench::loader::BenchOptions {
            backend: Backend::Auto,
            generated_rows: 2048,
            generated_features: 16,
            epochs: 1,
            threads: 1,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        r.backend,
        ciphershard::cipher::auto_for_device_batches().name()
    );
    assert_ne!(r.backend, "auto");
}
