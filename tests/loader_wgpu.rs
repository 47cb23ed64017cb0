//! The wgpu device loader (batches in `wgpu::Buffer`s) against the host loader: same seed,
//! same rows, same bytes once read back; tamper → `Err(Integrity)` naming the shard, tensor
//! and chunk, and nothing after. Runs on whatever adapter is here (in CI: lavapipe, Mesa's CPU
//! Vulkan driver); without one each test prints why it skipped, unless
//! `CIPHERSHARD_REQUIRE_WGPU=1`, which turns a missing adapter into a failure.
#![cfg(feature = "wgpu")]

use std::path::Path;

use ciphershard::cipher::Backend;
use ciphershard::cipher::wgpu::WgpuOptions;
use ciphershard::pipeline::{
    DeviceStats, FormatSource, Loader, LoaderOptions, LoaderState, LoaderStats, RowSource,
    WgpuBatch, WgpuDeviceLoader,
};
use ciphershard::{Error, MasterKey};

mod device_common;
mod tokens_common;
use device_common::{Column, DeviceUnderTest, make};

/// Lavapipe is a CPU adapter: allowed here (correctness), never picked by `auto`.
fn options() -> WgpuOptions {
    WgpuOptions {
        allow_cpu_adapter: true,
        ..WgpuOptions::default()
    }
}

fn adapter(test: &str) -> bool {
    match ciphershard::cipher::wgpu::probe_adapter() {
        Ok(a) => {
            eprintln!("{test}: on {a}");
            true
        }
        Err(why) => {
            if std::env::var("CIPHERSHARD_REQUIRE_WGPU").is_ok_and(|v| v == "1") {
                panic!("CIPHERSHARD_REQUIRE_WGPU=1 but no wgpu adapter: {why}");
            }
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

thread_local! {
    /// `WgpuOptions::max_piece_bytes` of the loaders this test thread opens (`None`: default).
    static PIECE_BYTES: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

fn open(dir: &Path, key: &MasterKey, o: &LoaderOptions) -> WgpuDeviceLoader {
    let wgpu = WgpuOptions {
        max_piece_bytes: PIECE_BYTES.get(),
        ..options()
    };
    WgpuDeviceLoader::open(dir, key, wgpu, o).unwrap()
}

impl DeviceUnderTest for WgpuDeviceLoader {
    type Batch = WgpuBatch;
    fn open_at(dir: &Path, key: &MasterKey, o: &LoaderOptions) -> Self {
        open(dir, key, o)
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
    fn place(b: &WgpuBatch) -> (u64, u64) {
        (b.epoch(), b.index())
    }
    fn rows(b: &WgpuBatch) -> Vec<u64> {
        b.row_ids().to_vec()
    }
    fn read_back(b: &WgpuBatch) -> Vec<Column> {
        b.tensors()
            .map(|t| {
                assert!(t.buffer().size() >= t.len() as u64);
                let bytes = t.to_host().unwrap();
                (t.name.into(), t.dtype.into(), t.shape(), bytes)
            })
            .collect()
    }
}

fn compare(dir: &Path, key: &MasterKey, o: &LoaderOptions) -> usize {
    device_common::compare::<WgpuDeviceLoader>(dir, key, o)
}

#[test]
fn device_batches_equal_host_batches() {
    if !adapter("device_batches_equal_host_batches") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 12-, 4- and 5-byte rows over 128-byte chunks: rows straddle chunks and share 32-bit
    // words of the batch buffers; several shards and keys.
    let key = make(dir.path(), 700, 3, 128, 6000);
    let mut n = 0;
    for (seed, batch, w, world, rank, drop_last, shuffle, block_rows, threads) in [
        (1, 32, 8, 1, 0, false, true, None, 2),
        (2, 50, 3, 1, 0, false, true, None, 1),
        (3, 64, 1, 2, 1, false, true, None, 3),
        (4, 17, 2, 3, 2, true, true, None, 2),
        (5, 100, 4, 1, 0, false, false, None, 2),
        // The last rank's padding wraps to the epoch's first window (reloaded after eviction).
        (6, 33, 2, 3, 2, false, true, None, 2),
        // Tiny windows: one batch gathers from many resident windows.
        (7, 90, 1, 1, 0, false, true, Some(3), 2),
    ] {
        let o = LoaderOptions {
            batch_size: batch,
            seed,
            window_blocks: w,
            world_size: world,
            rank,
            drop_last,
            shuffle,
            block_rows,
            threads,
            epochs: 2,
            ..Default::default()
        };
        n += compare(dir.path(), &key, &o);
    }
    // 16-byte rows, 4 KiB chunks: word-aligned rows, bigger windows.
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
    eprintln!("{n} wgpu device batches equal to the host loader's");
}

/// `WgpuOptions::max_piece_bytes` for the split-window test: one workgroup's span (256
/// invocations × 16 bytes), the smallest allowed.
const SMALL_PIECE: u64 = 4096;

/// Windows above the piece size (a binding limit: 128 MiB on lavapipe) are split, a piece
/// ending mid-tensor carrying the rest of its last row; the batches still equal the host's.
#[test]
fn windows_above_the_piece_size_are_split() {
    if !adapter("windows_above_the_piece_size_are_split") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 12-byte rows (x) and, below, 160-byte rows: wider than the 128-byte chunks.
    let key = make(dir.path(), 3000, 3, 128, 20_000);
    let wide = tempfile::tempdir().unwrap();
    let wide_key = make(wide.path(), 1000, 40, 128, 50_000);
    PIECE_BYTES.set(Some(SMALL_PIECE));
    let mut n = 0;
    for (d, k, seed, batch, w, shuffle, block_rows) in [
        (dir.path(), &key, 1, 64, 16, true, None),
        (dir.path(), &key, 2, 200, 64, false, None),
        (dir.path(), &key, 3, 37, 8, true, Some(50)),
        (wide.path(), &wide_key, 4, 48, 16, true, None),
        (wide.path(), &wide_key, 5, 100, 40, false, Some(7)),
    ] {
        let o = LoaderOptions {
            batch_size: batch,
            seed,
            window_blocks: w,
            shuffle,
            block_rows,
            epochs: 2,
            ..Default::default()
        };
        let (batches, ds) = device_common::compare_stats::<WgpuDeviceLoader>(d, k, &o);
        n += batches;
        assert!(
            ds.window_pieces > ds.windows,
            "windows were split: {ds:?} ({o:?})"
        );
    }
    eprintln!("{n} batches from split windows equal to the host loader's");
}

#[test]
fn tampered_chunk_is_an_integrity_error_and_nothing_after() {
    if adapter("tampered_chunk_is_an_integrity_error_and_nothing_after") {
        device_common::tamper_each_column::<WgpuDeviceLoader>();
    }
}

#[test]
fn wrong_key_is_refused_before_any_device_work() {
    if !adapter("wrong_key_is_refused_before_any_device_work") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    make(dir.path(), 100, 3, 128, 6000);
    let other = MasterKey::generate().unwrap();
    let err = WgpuDeviceLoader::open(dir.path(), &other, options(), &LoaderOptions::default())
        .unwrap_err();
    assert!(matches!(err, Error::WrongKey { .. }), "{err}");
}

#[test]
fn zero_width_columns_are_b_by_0_tensors() {
    if adapter("zero_width_columns_are_b_by_0_tensors") {
        device_common::zero_width_columns::<WgpuDeviceLoader>();
    }
}

#[test]
fn resume_and_drop_mid_epoch() {
    if adapter("resume_and_drop_mid_epoch") {
        device_common::resume_and_drop_mid_epoch::<WgpuDeviceLoader>();
    }
}

#[test]
fn batches_held_by_the_consumer_are_not_overwritten() {
    if !adapter("batches_held_by_the_consumer_are_not_overwritten") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = make(dir.path(), 700, 3, 128, 6000);
    let o = LoaderOptions {
        batch_size: 25,
        seed: 8,
        prefetch: 1,
        ..Default::default()
    };
    let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
    let host: Vec<_> = Loader::new(src, &o).unwrap().map(|b| b.unwrap()).collect();
    // Hold every batch until the end: the pool must allocate, never reuse a held buffer.
    let held: Vec<_> = open(dir.path(), &key, &o).map(|b| b.unwrap()).collect();
    assert_eq!(held.len(), host.len());
    for (h, d) in host.iter().zip(&held) {
        for (ht, dt) in h.tensors().zip(d.tensors()) {
            assert_eq!(dt.to_host().unwrap(), ht.bytes);
        }
    }
}

#[test]
fn wgpu_bench_runs_the_device_loader() {
    if !adapter("wgpu_bench_runs_the_device_loader") {
        return;
    }
    let r = ciphershard::bench::loader::run(
        None,
        None,
        &ciphershard::bench::loader::BenchOptions {
            backend: Backend::Wgpu,
            generated_rows: 4096,
            generated_features: 64,
            epochs: 1,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.backend, "wgpu");
    assert!(r.encrypted.batches > 0);
    assert_eq!(r.encrypted.batches, r.plaintext_twin.batches);
    assert_eq!(
        r.encrypted.stats.delivered_bytes,
        r.plaintext_twin.stats.delivered_bytes
    );
    assert!(r.encrypted.device.is_some());
    eprintln!(
        "wgpu device loader: encrypted {:.3} GB/s, twin {:.3} GB/s, ratio {:.2}",
        r.encrypted.gb_per_s, r.plaintext_twin.gb_per_s, r.ratio
    );
}

#[test]
fn lost_device_mid_epoch_is_an_error_then_the_end() {
    if !adapter("lost_device_mid_epoch_is_an_error_then_the_end") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = make(dir.path(), 700, 3, 128, 6000);
    let o = LoaderOptions {
        batch_size: 20,
        seed: 3,
        prefetch: 1,
        ..Default::default()
    };
    let mut l = open(dir.path(), &key, &o);
    let first = l.next().unwrap().unwrap();
    drop(first);
    l.device().destroy();
    // Batches already complete may still come; then one device error, then the end.
    let mut err = None;
    for b in l.by_ref() {
        if let Err(e) = b {
            err = Some(e);
            break;
        }
    }
    match err {
        Some(Error::Backend { backend, reason }) => {
            assert_eq!(backend, "wgpu");
            eprintln!("device lost: {reason}");
        }
        other => panic!("expected a wgpu backend error, got {other:?}"),
    }
    assert!(l.next().is_none());
}

#[test]
fn keys_must_match_the_shards() {
    if !adapter("keys_must_match_the_shards") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = make(dir.path(), 700, 3, 128, 6000);
    let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
    assert!(src.shard_count() > 1);
    let cipher = ciphershard::cipher::wgpu::WgpuCipher::new(options()).unwrap();
    let one = ciphershard::DataKey::from_bytes([9; 32]);
    let engine = ciphershard::cipher::wgpu::WgpuBatchEngine::new(&cipher, &[&one]).unwrap();
    let err = WgpuDeviceLoader::new(src, std::sync::Arc::new(engine), &LoaderOptions::default())
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
}

/// A training step's view: the consumer's own compute pass on the loader's queue reads each
/// batch buffer as handed out (the sum of column z's bytes) and agrees with the host loader,
/// while the loader keeps producing the next batches.
#[test]
fn a_consumer_kernel_on_the_loaders_queue_sees_each_batch() {
    if !adapter("a_consumer_kernel_on_the_loaders_queue_sees_each_batch") {
        return;
    }
    const SUM: &str = r#"
struct P { len: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> data: array<u32>;
@group(0) @binding(2) var<storage, read_write> total: atomic<u32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
    let w = g.x;
    if (w * 4u >= p.len) { return; }
    let v = data[w];
    var s = 0u;
    for (var b = 0u; b < 4u; b++) {
        if (w * 4u + b < p.len) { s += (v >> (8u * b)) & 0xffu; }
    }
    atomicAdd(&total, s);
}
"#;
    let dir = tempfile::tempdir().unwrap();
    let key = make(dir.path(), 700, 3, 128, 6000);
    let o = LoaderOptions {
        batch_size: 50,
        seed: 21,
        epochs: 2,
        ..Default::default()
    };
    let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
    let expected: Vec<u32> = Loader::new(src, &o)
        .unwrap()
        .map(|b| {
            let b = b.unwrap();
            b.tensor("z")
                .unwrap()
                .bytes
                .iter()
                .map(|&v| u32::from(v))
                .sum()
        })
        .collect();
    let loader = open(dir.path(), &key, &o);
    let (device, queue) = (loader.device().clone(), loader.queue().clone());
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("consumer_sum"),
        source: wgpu::ShaderSource::Wgsl(SUM.into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("consumer_sum"),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let buffer = |usage, size| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage,
            mapped_at_creation: false,
        })
    };
    use wgpu::BufferUsages as U;
    let params = buffer(U::UNIFORM | U::COPY_DST, 16);
    let total = buffer(U::STORAGE | U::COPY_SRC | U::COPY_DST, 4);
    let readback = buffer(U::MAP_READ | U::COPY_DST, 4);
    let mut got = Vec::new();
    for b in loader {
        let b = b.unwrap();
        let z = b.tensor("z").unwrap();
        queue.write_buffer(&params, 0, &(z.len() as u32).to_le_bytes());
        queue.write_buffer(&total, 0, &0u32.to_le_bytes());
        let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: params.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: z.buffer().as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: total.as_entire_binding(),
                },
            ],
        });
        let mut enc = device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups((z.len() as u32).div_ceil(4).div_ceil(64).max(1), 1, 1);
        }
        enc.copy_buffer_to_buffer(&total, 0, &readback, 0, 4);
        queue.submit([enc.finish()]);
        drop(b); // back to the pool: any later gather into it is queued after this pass
        let (tx, rx) = std::sync::mpsc::channel();
        readback.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
        rx.recv().unwrap().unwrap();
        let v = readback.get_mapped_range(..).unwrap();
        got.push(u32::from_le_bytes(v[..4].try_into().unwrap()));
        drop(v);
        readback.unmap();
    }
    assert_eq!(got, expected);
}

/// Ragged columns, packing and token budgets are the host loader's: the device loader refuses
/// each when built, naming what to use instead.
#[test]
fn ragged_packing_and_budgets_are_refused_by_name() {
    if !adapter("ragged_packing_and_budgets_are_refused_by_name") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = tokens_common::make_tokens(dir.path(), 200, |r| r % 7);
    let refusal = |o: LoaderOptions| {
        WgpuDeviceLoader::open(dir.path(), &key, options(), &o)
            .expect_err("refused")
            .to_string()
    };
    let e = refusal(LoaderOptions::default());
    assert!(e.contains("'input_ids' is ragged"), "{e}");
    let e = refusal(LoaderOptions {
        pack: Some(ciphershard::pipeline::PackOptions {
            column: "input_ids".into(),
            seq_len: 16,
        }),
        ..Default::default()
    });
    assert!(
        e.contains("pack: sequence packing is done by the host loader"),
        "{e}"
    );
    let e = refusal(LoaderOptions {
        budget: Some(ciphershard::pipeline::TokenBudget {
            column: "input_ids".into(),
            max_tokens: 64,
        }),
        ..Default::default()
    });
    assert!(
        e.contains("budget: token-budget batches are cut by the host loader"),
        "{e}"
    );
}
