//! `ciphershard bench`: the loader over an encrypted dataset and over its plaintext twin,
//! through the same pipeline, in the same process.
//!
//! The plaintext twin is the same shard files read by the same pipeline (same sampler, same
//! reads, same pools, same row copies) with verification and decryption left out: the host
//! loader over a `bench::twin` source wrapper, the device loaders built as their twin
//! (same staging, uploads and gathers, no tag check, no decryption). The ratio therefore
//! isolates the cost of authenticated decryption.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::cipher::Backend;
use crate::error::{Error, Result};
use crate::format::{ConvertInput, ConvertOptions, Dtype, convert};
use crate::keys::MasterKey;
use crate::pipeline::{
    DecryptMode, DeviceStats, FormatSource, Loader, LoaderOptions, LoaderStats, RowSource,
};
use crate::store::NetworkStats;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Cipher backend for the encrypted run.
    pub backend: Backend,
    /// Worker threads.
    pub threads: usize,
    /// Rows per batch.
    pub batch_size: usize,
    /// Epochs per run.
    pub epochs: u64,
    /// Batches in flight.
    pub prefetch: usize,
    /// Blocks per shuffle window.
    pub window_blocks: u64,
    /// Decrypt strategy of the encrypted run.
    pub mode: DecryptMode,
    /// Rows of the generated dataset (no dataset given).
    pub generated_rows: u64,
    /// f32 features per row of the generated dataset.
    pub generated_features: u64,
    /// GPU backends: bench the host [`crate::pipeline::Loader`] (per-chunk openers) instead of the
    /// device loader.
    pub host_batches: bool,
    /// Pack a ragged column into `[batch_size, seq_len]` sequences (host loader only).
    pub pack: Option<crate::pipeline::options::PackOptions>,
    /// Cut batches by a ragged column's tokens (host loader only).
    pub budget: Option<crate::pipeline::TokenBudget>,
    /// Evict the shard files from the page cache before every run and measure their raw
    /// sequential read beside the loader (`bench --cold`; local datasets, host loader).
    pub cold: bool,
    /// Windows the host loader reads ahead ([`LoaderOptions::readahead_windows`]; `None`: the
    /// store's).
    pub readahead_windows: Option<u64>,
    /// The host loader's I/O threads ([`LoaderOptions::io_threads`]; `None`: the store's).
    pub io_threads: Option<usize>,
    /// How to open the dataset (object-store settings, the ciphertext cache).
    pub open: crate::store::OpenOptions,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            backend: Backend::Cpu,
            threads: 2,
            batch_size: 512,
            epochs: 3,
            prefetch: 4,
            window_blocks: 8,
            mode: DecryptMode::default(),
            generated_rows: 262_144,
            generated_features: 256,
            host_batches: false,
            pack: None,
            budget: None,
            cold: false,
            readahead_windows: None,
            io_threads: None,
            open: Default::default(),
        }
    }
}

impl BenchOptions {
    /// The loader options every run of the bench uses (a fixed seed: the same batches).
    fn loader_options(&self) -> LoaderOptions {
        LoaderOptions {
            batch_size: self.batch_size,
            epochs: self.epochs,
            threads: self.threads,
            prefetch: self.prefetch,
            window_blocks: self.window_blocks,
            mode: self.mode,
            seed: 1,
            pack: self.pack.clone(),
            budget: self.budget.clone(),
            readahead_windows: self.readahead_windows,
            io_threads: self.io_threads,
            ..Default::default()
        }
    }
}

/// One run of the loader.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunReport {
    /// Wall seconds from building the loader to the last batch.
    pub seconds: f64,
    /// Batches consumed.
    pub batches: u64,
    /// Batches per second.
    pub batches_per_s: f64,
    /// Delivered GB (10^9 bytes) per second.
    pub gb_per_s: f64,
    /// Per-stage telemetry.
    pub stats: LoaderStats,
    /// Seconds to build the loader (device: context, kernels, keys, pinned staging).
    #[serde(default)]
    pub setup_seconds: f64,
    /// Seconds from the start to the first batch handed out (setup included).
    #[serde(default)]
    pub first_batch_seconds: f64,
    /// Steady state: GB/s of every batch after the first, over the time from the first batch
    /// to the last (0 with fewer than two batches).
    #[serde(default)]
    pub steady_gb_per_s: f64,
    /// The device loader's own telemetry (device runs only).
    #[serde(default)]
    pub device: Option<DeviceStats>,
    /// Network requests of this run (datasets in an object store only).
    #[serde(default)]
    pub network: Option<NetworkRun>,
    /// The ciphertext cache's counters over this run (host loader over a URL with a cache).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<crate::store::CacheStats>,
    /// How far the host loader read ahead (as asked, else the store's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_ahead: Option<crate::store::ReadDepth>,
}

/// What one run fetched over the network.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NetworkRun {
    /// The store's counters over the run.
    #[serde(flatten)]
    pub stats: NetworkStats,
    /// Bytes fetched per epoch.
    pub bytes_per_epoch: u64,
    /// Bytes of the dataset's shard objects.
    pub dataset_bytes: u64,
    /// Read amplification over the network: bytes fetched per epoch ÷ the shards' bytes.
    pub amplification: f64,
}

impl NetworkRun {
    fn new(stats: NetworkStats, epochs: u64, store: &dyn crate::store::ShardStore) -> Self {
        let dataset_bytes = (0..store.shard_count())
            .map(|s| store.identity(s).len)
            .fold(0, u64::saturating_add);
        let bytes_per_epoch = stats.bytes_fetched / epochs.max(1);
        NetworkRun {
            amplification: bytes_per_epoch as f64 / dataset_bytes.max(1) as f64,
            stats,
            bytes_per_epoch,
            dataset_bytes,
        }
    }
}

impl std::fmt::Display for NetworkRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\nnetwork: {:.1} MB fetched per epoch of {:.1} MB of shards: amplification {:.3}",
            self.stats,
            self.bytes_per_epoch as f64 / 1e6,
            self.dataset_bytes as f64 / 1e6,
            self.amplification
        )
    }
}

/// Times a run: setup, first batch, and the steady state after it.
struct Clock {
    start: Instant,
    setup: f64,
    first: Option<(Instant, u64)>,
}

impl Clock {
    fn start() -> Clock {
        Clock {
            start: Instant::now(),
            setup: 0.0,
            first: None,
        }
    }
    fn built(&mut self) {
        self.setup = self.start.elapsed().as_secs_f64();
    }
    /// A batch of `bytes` was handed out.
    fn batch(&mut self, bytes: u64) {
        if self.first.is_none() {
            self.first = Some((Instant::now(), bytes));
        }
    }
    fn report(&self, batches: u64, stats: LoaderStats, device: Option<DeviceStats>) -> RunReport {
        let seconds = self.start.elapsed().as_secs_f64();
        let (first_batch_seconds, steady_gb_per_s) = match self.first {
            Some((t, first_bytes)) if batches > 1 => {
                let s = t.elapsed().as_secs_f64();
                let bytes = stats.delivered_bytes.saturating_sub(first_bytes);
                (
                    (t - self.start).as_secs_f64(),
                    bytes as f64 / s.max(1e-12) / 1e9,
                )
            }
            Some((t, _)) => ((t - self.start).as_secs_f64(), 0.0),
            None => (0.0, 0.0),
        };
        RunReport {
            seconds,
            batches,
            batches_per_s: batches as f64 / seconds,
            gb_per_s: stats.delivered_bytes as f64 / seconds / 1e9,
            stats,
            setup_seconds: self.setup,
            first_batch_seconds,
            steady_gb_per_s,
            device,
            network: None,
            cache: None,
            read_ahead: None,
        }
    }
}

/// The bench result (`--json` prints it).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BenchReport {
    /// The dataset directory, or "generated".
    pub dataset: String,
    /// Backend of the encrypted run.
    pub backend: String,
    /// Rows in the dataset.
    pub rows: u64,
    /// Bytes of one epoch's rows (all columns).
    pub epoch_bytes: u64,
    /// Worker threads.
    pub threads: usize,
    /// Rows per batch.
    pub batch_size: usize,
    /// Decrypt strategy.
    pub mode: DecryptMode,
    /// The encrypted run.
    pub encrypted: RunReport,
    /// The plaintext twin's run.
    pub plaintext_twin: RunReport,
    /// encrypted GB/s ÷ twin GB/s.
    pub ratio: f64,
    /// encrypted steady-state GB/s ÷ twin steady-state GB/s (start-up excluded).
    #[serde(default)]
    pub steady_ratio: f64,
    /// Packing, if the bench packed a ragged column: its batches hold `tokens_per_batch` tokens
    /// (GB/s count the tokens, position ids and cu_seqlens delivered).
    #[serde(default)]
    pub pack: Option<crate::pipeline::options::PackOptions>,
    /// Tokens per packed batch (`batch_size × seq_len`; 0 without packing).
    #[serde(default)]
    pub tokens_per_batch: u64,
    /// Token-budget batching, if the bench cut batches by a ragged column's tokens.
    #[serde(default)]
    pub budget: Option<crate::pipeline::TokenBudget>,
    /// Network requests of the whole bench since the dataset was opened (opening and all runs
    /// together; object stores only).
    #[serde(default)]
    pub network: Option<NetworkStats>,
    /// `--cold`: every run started with the shard files evicted from the page cache.
    #[serde(default)]
    pub cold: Option<ColdReport>,
}

/// What `bench --cold` adds: the raw sequential read of the same files, also evicted first.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ColdReport {
    /// How the files were evicted (advisory: residency is not checked).
    pub eviction: String,
    /// The faster of the raw reads (one before each encrypted run).
    pub raw_read: super::cold::RawRead,
    /// Every raw read, in the order run (alternating with the loader's runs).
    pub raw_reads: Vec<super::cold::RawRead>,
    /// Encrypted run's delivered GB/s ÷ the raw read's GB/s.
    pub encrypted_vs_raw: f64,
    /// The twin's delivered GB/s ÷ the raw read's GB/s.
    pub twin_vs_raw: f64,
}

fn run_once(src: Arc<dyn RowSource>, opts: &LoaderOptions) -> Result<RunReport> {
    let net_before = src.store().network();
    let cache_before = src.store().cache_stats();
    let mut clock = Clock::start();
    let mut l = Loader::new(src.clone(), opts)?;
    clock.built();
    let mut batches = 0u64;
    for b in l.by_ref() {
        let b = b?;
        clock.batch(b.tensors().map(|t| t.bytes.len() as u64).sum());
        // The first byte of the first column (which may be zero-width: `[B, 0]`).
        std::hint::black_box(b.tensors().next().and_then(|t| t.bytes.first().copied()));
        batches += 1;
    }
    let mut report = clock.report(batches, l.stats(), None);
    report.read_ahead = Some(l.read_depth());
    if let (Some(before), Some(after)) = (net_before, src.store().network()) {
        report.network = Some(NetworkRun::new(
            after.since(&before),
            opts.epochs,
            src.store(),
        ));
    }
    report.cache = src
        .store()
        .cache_stats()
        .zip(cache_before)
        .map(|(now, before)| now.since(&before));
    Ok(report)
}

/// Takes every batch of a device loader, timing each; the number of batches.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn drain<E: crate::pipeline::device::DeviceEngine>(
    batches: impl Iterator<Item = Result<crate::pipeline::GpuBatch<E>>>,
    clock: &mut Clock,
) -> Result<u64> {
    let mut n = 0u64;
    for b in batches {
        let b = b?;
        clock.batch(b.bytes());
        std::hint::black_box(&b);
        n += 1;
    }
    Ok(n)
}

/// One run of a device loader (CUDA device 0, or the wgpu adapter): batches land in device
/// memory.
#[cfg_attr(
    not(all(feature = "cuda", feature = "wgpu")),
    allow(unused_variables, unused_mut, unreachable_code)
)]
fn run_device_once(
    backend: Backend,
    path: &Path,
    open: &crate::store::OpenOptions,
    key: &MasterKey,
    opts: &LoaderOptions,
    twin: bool,
) -> Result<RunReport> {
    let mut clock = Clock::start();
    let (batches, stats, device) = match backend {
        #[cfg(feature = "cuda")]
        Backend::Cuda => {
            let mut l = crate::pipeline::DeviceLoader::open_as(path, open, key, 0, opts, twin)?;
            clock.built();
            let n = drain(l.by_ref(), &mut clock)?;
            // The loader's threads were joined when the last batch was taken.
            (n, l.stats(), l.device_stats())
        }
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => {
            let wgpu = crate::cipher::wgpu::WgpuOptions::default();
            let mut l =
                crate::pipeline::WgpuDeviceLoader::open_as(path, open, key, wgpu, opts, twin)?;
            clock.built();
            let n = drain(l.by_ref(), &mut clock)?;
            (n, l.stats(), l.device_stats())
        }
        other => {
            return Err(Error::BackendUnavailable {
                backend: "device",
                reason: format!(
                    "no device loader for backend {} in this build",
                    other.name()
                ),
            });
        }
    };
    Ok(clock.report(batches, stats, Some(device)))
}

/// The bench into device memory: encrypted (pread → pinned staging → H2D → GPU verify and
/// decrypt → gather) against the twin (the same pread, pinned staging, H2D, device copy and
/// gather, no verify or decrypt), encrypted run twice around the twin, the faster steady state
/// kept. Each run reports its setup (context, kernels, keys, staging), first-batch latency and
/// steady state (first batch to last) apart, as short runs are dominated by setup. On wgpu the
/// same, with the tags checked on the CPU after `pread` and the CTR pass on the adapter.
fn run_device(
    backend: Backend,
    path: &Path,
    key: &MasterKey,
    name: &str,
    opts: &BenchOptions,
) -> Result<BenchReport> {
    // The device loaders have one decryption path: `mode` is the host loader's.
    let lo = LoaderOptions {
        mode: DecryptMode::default(),
        ..opts.loader_options()
    };
    let warm = run_device_once(backend, path, &opts.open, key, &lo, false)?;
    let twin = run_device_once(backend, path, &opts.open, key, &lo, true)?;
    let again = run_device_once(backend, path, &opts.open, key, &lo, false)?;
    // The first run also compiles the kernels (setup): keep the faster steady state.
    let enc = if again.steady_gb_per_s > warm.steady_gb_per_s {
        again
    } else {
        warm
    };
    let ds = crate::format::Dataset::open_with(path, &opts.open)?;
    // Sizes from the (already loaded) dataset's headers, saturating: a report, not a bound.
    let rows: u64 = ds
        .shards()
        .iter()
        .map(|h| h.descriptor.rows)
        .fold(0, u64::saturating_add);
    let row_bytes: u64 = ds
        .manifest()
        .columns
        .iter()
        .map(|c| crate::format::tensor_bytes(c.dtype, &c.shape).unwrap_or(u64::MAX))
        .fold(0, u64::saturating_add);
    Ok(BenchReport {
        dataset: name.to_string(),
        backend: backend.name().into(),
        rows,
        epoch_bytes: rows.saturating_mul(row_bytes),
        threads: opts.threads,
        batch_size: opts.batch_size,
        mode: DecryptMode::ChunkOpen,
        ratio: enc.gb_per_s / twin.gb_per_s.max(1e-12),
        steady_ratio: enc.steady_gb_per_s / twin.steady_gb_per_s.max(1e-12),
        encrypted: enc,
        plaintext_twin: twin,
        pack: None,
        tokens_per_batch: 0,
        budget: None,
        network: None,
        cold: None,
    })
}

/// Runs the bench over a source (encrypted run, then the twin, then the encrypted run again;
/// the report keeps the faster of the two encrypted runs so page-cache warm-up does not count).
///
/// With `opts.cold`, the shard files are evicted from the page cache before each run, and a raw
/// sequential read of them (evicted first) precedes each encrypted run: raw, encrypted, twin,
/// raw, encrypted.
pub fn run_source(src: Arc<dyn RowSource>, name: &str, opts: &BenchOptions) -> Result<BenchReport> {
    let lo = opts.loader_options();
    let store = src.store();
    let paths: Vec<PathBuf> = (0..store.shard_count())
        .map(|s| store.name(s).to_path_buf())
        .collect();
    if opts.cold {
        super::cold::refuse_url(Path::new(name))?;
        if let Some(p) = paths.first() {
            super::cold::refuse_url(p)?;
        }
    }
    let mut raw_reads = Vec::new();
    let mut run = |src: Arc<dyn RowSource>, raw_first: bool| -> Result<RunReport> {
        if opts.cold {
            if raw_first {
                raw_reads.push(super::cold::cold_raw_read(&paths)?);
            }
            super::cold::evict(&paths)?;
        }
        run_once(src, &lo)
    };
    let warm = run(src.clone(), true)?;
    let twin = run(super::twin::TwinSource::new(src.clone()), false)?;
    let again = run(src.clone(), true)?;
    let enc = if again.seconds < warm.seconds {
        again
    } else {
        warm
    };
    let cold = raw_reads
        .iter()
        .max_by(|a, b| a.gb_per_s.total_cmp(&b.gb_per_s))
        .cloned()
        .map(|raw| ColdReport {
            eviction: super::cold::EVICTION.into(),
            encrypted_vs_raw: enc.gb_per_s / raw.gb_per_s.max(1e-12),
            twin_vs_raw: twin.gb_per_s / raw.gb_per_s.max(1e-12),
            raw_read: raw,
            raw_reads: raw_reads.clone(),
        });
    // Fixed columns: rows x row bytes; a ragged column: its values (and its offsets, as
    // delivered: 8 bytes per row), summed over the shards.
    let epoch_bytes = src
        .columns()
        .iter()
        .enumerate()
        .map(|(c, col)| {
            if col.ragged {
                (0..src.shard_count())
                    .map(|s| {
                        let last = src.row_offsets(s, c).last().copied().unwrap_or(0);
                        last.saturating_mul(col.row_bytes)
                            .saturating_add(src.shard_rows(s).saturating_mul(8))
                    })
                    .fold(0, u64::saturating_add)
            } else {
                src.total_rows().saturating_mul(col.row_bytes)
            }
        })
        .fold(0, u64::saturating_add);
    Ok(BenchReport {
        dataset: name.to_string(),
        backend: opts.backend.name().to_string(),
        rows: src.total_rows(),
        epoch_bytes,
        threads: opts.threads,
        batch_size: opts.batch_size,
        mode: opts.mode,
        ratio: enc.gb_per_s / twin.gb_per_s.max(1e-12),
        steady_ratio: enc.steady_gb_per_s / twin.steady_gb_per_s.max(1e-12),
        encrypted: enc,
        plaintext_twin: twin,
        tokens_per_batch: opts
            .pack
            .as_ref()
            .map_or(0, |p| p.seq_len.saturating_mul(opts.batch_size as u64)),
        pack: opts.pack.clone(),
        budget: opts.budget.clone(),
        network: src.store().network(),
        cold,
    })
}

/// Generates a synthetic encrypted dataset in `dir` (f32 features + i64 label, both encrypted;
/// plaintext exists only in memory) and returns its key.
pub fn generate(dir: &Path, rows: u64, features: u64, chunk_size: u64) -> Result<MasterKey> {
    generate_with(dir, rows, features, chunk_size, &mut |_, _| {})
}

/// [`generate`], reporting convert's progress (bytes done, bytes in all).
pub fn generate_with(
    dir: &Path,
    rows: u64,
    features: u64,
    chunk_size: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MasterKey> {
    let key = MasterKey::generate()?;
    let mut rng = crate::cipher::conformance::SplitMix(0xBE7C_4000);
    let mut x = vec![0u8; (rows * features * 4) as usize];
    for v in x.chunks_exact_mut(4) {
        v.copy_from_slice(&((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32).to_le_bytes());
    }
    let y: Vec<u8> = (0..rows)
        .flat_map(|_| (rng.next_u64() % 10).to_le_bytes())
        .collect();
    let inputs = [
        ConvertInput::InMemory {
            name: "x".into(),
            dtype: Dtype::F32,
            shape: vec![rows, features],
            data: x,
        },
        ConvertInput::InMemory {
            name: "y".into(),
            dtype: Dtype::I64,
            shape: vec![rows],
            data: y,
        },
    ];
    let opts = ConvertOptions {
        keys: vec![key.clone()],
        chunk_size,
        shard_size: Some(64 << 20),
        ..Default::default()
    };
    convert(&inputs, dir, &opts, progress)?;
    Ok(key)
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the bench over the dataset at `dataset` opened with `key`, or, when `dataset` is
/// `None`, over a generated one in a temporary directory (ciphertext only; removed after).
pub fn run(
    dataset: Option<&Path>,
    key: Option<&MasterKey>,
    opts: &BenchOptions,
) -> Result<BenchReport> {
    run_with_scratch(dataset, key, opts, &scratch_dir()?, &mut |_, _| {})
}

/// A new name in the temporary directory for [`run_with_scratch`]'s generated dataset.
pub fn scratch_dir() -> Result<PathBuf> {
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|e| Error::Stopped(format!("OS RNG: {e}")))?;
    Ok(std::env::temp_dir().join(format!("ciphershard-bench-{}", hex::encode(id))))
}

/// [`run`], generating the dataset (when `dataset` is `None`) in the new directory `scratch`,
/// removed after: a caller that must remove it on a signal knows its name. `generating`
/// reports the generation's progress (bytes done, bytes in all).
pub fn run_with_scratch(
    dataset: Option<&Path>,
    key: Option<&MasterKey>,
    opts: &BenchOptions,
    scratch: &Path,
    generating: &mut dyn FnMut(u64, u64),
) -> Result<BenchReport> {
    // Name the backend actually used (`auto` resolves here); GPU backends bench their device
    // loader, so `auto` prefers a GPU as the device loaders do, unless host batches are asked
    // for (then it is the host loader's `auto`, with its host-path check).
    let backend = match opts.backend {
        Backend::Auto if opts.host_batches => crate::cipher::select(Backend::Auto)?.backend(),
        Backend::Auto => crate::cipher::auto_for_device_batches(),
        b => b,
    };
    let opts = &BenchOptions {
        backend,
        ..opts.clone()
    };
    // Before generating a dataset: say at once why there is no device.
    if backend == Backend::Cuda {
        crate::cipher::cuda::probe().map_err(|reason| Error::BackendUnavailable {
            backend: "cuda",
            reason,
        })?;
    }
    if backend == Backend::Wgpu {
        crate::cipher::wgpu::probe().map_err(|reason| Error::BackendUnavailable {
            backend: "wgpu",
            reason,
        })?;
    }
    // GPU backends bench their device loader (batches stay in device memory).
    let device_loader = matches!(backend, Backend::Cuda | Backend::Wgpu) && !opts.host_batches;
    if opts.cold {
        if let Some(p) = dataset {
            super::cold::refuse_url(p)?;
        }
        if device_loader {
            return Err(Error::InvalidArgument(
                "--cold measures the host loader: with --backend cuda|wgpu add --host-batches"
                    .into(),
            ));
        }
    }
    match dataset {
        Some(p) => {
            let key = key.ok_or_else(|| Error::Key("bench over a dataset needs its key".into()))?;
            if device_loader {
                return run_device(backend, p, key, &p.display().to_string(), opts);
            }
            let src = FormatSource::open_with(p, &opts.open, key, opts.backend)?;
            run_source(src, &p.display().to_string(), opts)
        }
        None => {
            let dir = TempDir(scratch.to_path_buf());
            let key = generate_with(
                &dir.0,
                opts.generated_rows,
                opts.generated_features,
                2 << 20,
                generating,
            )?;
            if device_loader {
                return run_device(backend, &dir.0, &key, "generated", opts);
            }
            let src = FormatSource::open(&dir.0, &key, opts.backend)?;
            run_source(src, "generated", opts)
        }
    }
}
