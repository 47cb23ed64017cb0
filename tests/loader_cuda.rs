//! The device loader (batches in CUDA memory) against the host loader: same seed, same rows,
//! same bytes once downloaded; tamper → `Err(Integrity)` naming the shard, tensor and chunk.
//! GPU tests print `SKIPPED` and return when no CUDA device answers (`cuda::probe`), so this
//! binary passes on a machine without a GPU and is the one to carry to the GPU box
//! (`cargo test --release --no-default-features --features cuda --test loader_cuda --no-run`).
#![cfg(feature = "cuda")]

use std::path::Path;

use ciphershard::cipher::{Backend, cuda};
use ciphershard::pipeline::{DeviceLoader, FormatSource, Loader, LoaderOptions, RowSource, bench};
use ciphershard::{Error, MasterKey};

mod device_common;
use device_common::make;

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

/// Every device batch equals the host loader's batch for the same options, byte for byte.
fn compare(dir: &Path, key: &MasterKey, o: &LoaderOptions) -> usize {
    let src = FormatSource::open(dir, key, Backend::Cpu).unwrap();
    let host: Vec<_> = Loader::new(src, o).unwrap().map(|b| b.unwrap()).collect();
    let mut dev = DeviceLoader::open(dir, key, 0, o).unwrap();
    assert_eq!(dev.batches_per_epoch() * o.epochs, host.len() as u64);
    let mut n = 0;
    for (h, d) in host.iter().zip(dev.by_ref()) {
        let d = d.unwrap();
        assert_eq!((d.epoch(), d.index()), (h.epoch(), h.index()));
        assert_eq!(d.row_ids(), h.row_ids(), "{o:?}");
        for (ht, dt) in h.tensors().zip(d.tensors()) {
            assert_eq!((ht.name, ht.dtype), (dt.name, dt.dtype));
            assert_eq!(ht.shape(), dt.shape());
            assert_ne!(dt.device_ptr(), 0);
            assert!(dt.slice().len() >= dt.len());
            assert_eq!(dt.to_host().unwrap(), ht.bytes, "column {} {o:?}", ht.name);
        }
        n += 1;
    }
    assert_eq!(n, host.len());
    assert!(dev.next().is_none());
    // The device telemetry accounts for every window and byte the loader read.
    let (ds, st) = (dev.device_stats(), dev.stats());
    assert!(ds.windows > 0 || n == 0, "{ds:?}");
    assert_eq!(ds.window_bytes, st.read.bytes, "{ds:?}");
    assert_eq!(
        st.verify.bytes, st.read.bytes,
        "every window read was verified: {st:?}"
    );
    assert_eq!(st.assemble.bytes, st.delivered_bytes);
    n
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
    if !gpu("tampered_chunk_is_an_integrity_error_and_nothing_after") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = make(dir.path(), 700, 3, 128, 6000);
    for col in [0usize, 1, 2] {
        let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
        let c = src.chunk(1, col, 2);
        let path = src.shard_path(1).to_path_buf();
        let tensor = src.columns()[col].name.clone();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[c.file_offset as usize + 5] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let o = LoaderOptions {
            batch_size: 40,
            seed: 11,
            ..Default::default()
        };
        let mut l = DeviceLoader::open(dir.path(), &key, 0, &o).unwrap();
        let mut err = None;
        let mut ok = 0;
        for b in l.by_ref() {
            match b {
                Ok(_) => ok += 1,
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        match err {
            Some(Error::Integrity(loc)) => {
                let msg = Error::Integrity(loc.clone()).to_string();
                assert!(msg.contains(&*path.to_string_lossy()), "{msg}");
                assert!(msg.contains(&tensor), "{msg}");
            }
            other => panic!("column {col}: expected an integrity error, got {other:?}"),
        }
        assert!(l.next().is_none(), "a batch after the integrity error");
        assert!(ok < l.batches_per_epoch() as usize);
        bytes[c.file_offset as usize + 5] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
    }
    // Restored: the whole epoch loads again.
    let o = LoaderOptions {
        batch_size: 40,
        seed: 11,
        ..Default::default()
    };
    let l = DeviceLoader::open(dir.path(), &key, 0, &o).unwrap();
    let per_epoch = l.batches_per_epoch();
    let mut n = 0;
    for b in l {
        b.unwrap();
        n += 1;
    }
    assert_eq!(n, per_epoch);
}

#[test]
fn resume_and_drop_mid_epoch() {
    if !gpu("resume_and_drop_mid_epoch") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = make(dir.path(), 700, 3, 128, 6000);
    let o = LoaderOptions {
        batch_size: 30,
        seed: 4,
        epochs: 2,
        ..Default::default()
    };
    let all: Vec<Vec<u64>> = DeviceLoader::open(dir.path(), &key, 0, &o)
        .unwrap()
        .map(|b| b.unwrap().row_ids().to_vec())
        .collect();
    let mut l = DeviceLoader::open(dir.path(), &key, 0, &o).unwrap();
    let head: Vec<Vec<u64>> = l
        .by_ref()
        .take(all.len() / 2 + 1)
        .map(|b| b.unwrap().row_ids().to_vec())
        .collect();
    let state = l.state();
    drop(l); // mid-epoch: joins its thread, no hang
    let tail: Vec<Vec<u64>> = DeviceLoader::open(dir.path(), &key, 0, &o.clone().resume(&state))
        .unwrap()
        .map(|b| b.unwrap().row_ids().to_vec())
        .collect();
    assert_eq!([head, tail].concat(), all);
}

#[test]
fn device_bench_reports_cuda_end_to_end() {
    if !gpu("device_bench_reports_cuda_end_to_end") {
        return;
    }
    let r = bench::run(
        None,
        None,
        &bench::BenchOptions {
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
    let r = bench::run(
        None,
        None,
        &bench::BenchOptions {
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
        ciphershard::cipher::select(Backend::Auto)
            .unwrap()
            .backend()
            .name()
    );
    assert_ne!(r.backend, "auto");
}
