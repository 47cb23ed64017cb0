//! Device-resident batches on the wgpu backend (Vulkan, Metal, DX12): the loader's plan, with
//! chunks decrypted on the GPU and rows gathered into pooled `wgpu::Buffer`s. See
//! docs/LOADER.md, "Device batches".
//!
//! Three threads, as on CUDA ([`super::DeviceLoader`]), over the same plan
//! (`pipeline/window_plan.rs`). The *reader* (`cs-wgpu-read`) walks the windows in the order the
//! batches will need them: `pread` of every chunk a window touches into a host staging buffer,
//! each chunk's GCM tag checked on the CPU right after its read, on the reading thread (GHASH
//! only, ~25 GB/s per core: cheaper than a GPU round trip for the tag); only then the uploader
//! thread (`cs-wgpu-upload`) copies it through a mapped ring into a device window buffer and
//! queues one CTR dispatch over all its chunks (`shaders/aes_ctr_batch.wgsl`, in place, a key
//! per shard) — a buffer and dispatch per piece when the window exceeds the piece size (a
//! binding limit; `window_plan::window_layout`). So the device never holds a byte
//! of unverified plaintext, and a tampered chunk stops the loader with an error naming it
//! before anything of its window is decrypted. The *planner* (`cs-wgpu-plan`) computes every
//! batch's rows and offsets. The *producer* (`cs-wgpu`) gathers each batch from the resident
//! windows into pooled column buffers (`shaders/gather.wgsl`, one dispatch per column and
//! window, one submission per batch) and hands out batch k-1 once its submission completed
//! while batch k's gathers run.
//!
//! Ordering comes from the single wgpu queue: a window buffer evicted by the producer is
//! rewritten by the reader only in a later submission than the gathers that read it, and a
//! batch's buffers, returned to the pool when the batch is dropped, are overwritten only by a
//! later submission than any work the consumer queued on them (the consumer must use this
//! loader's [`device`](WgpuDeviceLoader::device) and [`queue`](WgpuDeviceLoader::queue)).

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, bounded, select};

use super::device_shell::{DeviceBatchMeta, DeviceHandle, Shape, plan_batches, stopped};
use super::format_source::FormatSource;
use super::loader::{DecryptMode, LoaderOptions, LoaderState, PlanSetup};
use super::sampler::{EpochPlan, SamplerConfig};
use super::source::{ChunkSpec, ColumnInfo, RowSource};
use super::telemetry::{Counters, DeviceCounters, DeviceStats, LoaderStats, add, ns_since};
use super::window_plan::{
    BatchPlan, ChunkReader, Key, Packing, WindowLayout, load_order, piece_unit_bound,
    window_byte_bound, window_keys, window_layout,
};
use crate::cipher::wgpu::{
    GatherJob, UploadRing, WgpuBatchEngine, WgpuCipher, WgpuOptions, WindowChunk,
};
use crate::cipher::{ChunkParams, cpu::CpuCipher};
use crate::error::{Error, Result};
use crate::format::Dataset;
use crate::keys::MasterKey;

/// Verified windows the reader may hold ready ahead of the producer.
const WINDOWS_AHEAD: usize = 1;
/// Host-visible upload slots: the reader fills one while the GPU copies the other.
const UPLOAD_SLOTS: usize = 2;
/// Threads copying a window into its upload slot on a host with fewer than
/// [`UPLOAD_THREADS_FROM_CORES`] cores: one. On the 2-vCPU VMs one thread already saturates
/// memory (16 MiB windows: 14.7-17.3 GB/s with one, 10.6-12.8 with two;
/// `bench::wgpu::tests::measure_upload_paths`).
const UPLOAD_THREADS: usize = 1;
/// From this many cores on, two upload threads: on the 16-core H200 box the device loader ran
/// at 9.80 GB/s steady with two, 7.48 with one, 8.31 with four (docs/BENCHMARKS.md, run 5).
const UPLOAD_THREADS_FROM_CORES: usize = 8;
/// Environment variable overriding the upload thread count (1 to 16), a tuning knob.
pub const UPLOAD_THREADS_ENV: &str = "CIPHERSHARD_WGPU_UPLOAD_THREADS";

fn upload_threads() -> Result<usize> {
    match std::env::var(UPLOAD_THREADS_ENV) {
        Ok(v) if !v.is_empty() => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=16).contains(n))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{UPLOAD_THREADS_ENV}={v}: expected a thread count from 1 to 16"
                ))
            }),
        _ => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            Ok(if cores >= UPLOAD_THREADS_FROM_CORES {
                2
            } else {
                UPLOAD_THREADS
            })
        }
    }
}

/// One column of a device batch: shape `[B, ...]`, the dataset's dtype, in a `wgpu::Buffer`.
#[derive(Debug, Clone, Copy)]
pub struct WgpuTensor<'a> {
    /// Column name.
    pub name: &'a str,
    /// safetensors dtype name.
    pub dtype: &'a str,
    rows: usize,
    row_shape: &'a [u64],
    len: usize,
    buf: &'a ::wgpu::Buffer,
    engine: &'a WgpuBatchEngine,
}

impl<'a> WgpuTensor<'a> {
    /// Shape `[B, ...row shape]`.
    pub fn shape(&self) -> Vec<u64> {
        std::iter::once(self.rows as u64)
            .chain(self.row_shape.iter().copied())
            .collect()
    }
    /// Bytes of the tensor (`B × row bytes`) at the start of the buffer; the buffer may be
    /// longer (pooled at full batch, rounded up to 16 bytes).
    pub fn len(&self) -> usize {
        self.len
    }
    /// `true` for a zero-byte tensor.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The pooled device buffer (`STORAGE | COPY_SRC | COPY_DST`), valid while the batch lives.
    pub fn buffer(&self) -> &'a ::wgpu::Buffer {
        self.buf
    }
    /// Copies the tensor to the host (tests, debugging).
    pub fn to_host(&self) -> Result<Vec<u8>> {
        if self.len == 0 {
            return Ok(Vec::new());
        }
        self.engine.read_buffer(self.buf, self.len as u64)
    }
}

type SetPool = Arc<Mutex<Vec<Vec<::wgpu::Buffer>>>>;

/// A batch of verified, decrypted rows in device memory. Its gathers had completed when it was
/// handed out. Dropping it returns its buffers to the loader's pool.
pub struct WgpuBatch {
    epoch: u64,
    index: u64,
    row_ids: Vec<u64>,
    columns: Arc<[ColumnInfo]>,
    bufs: Vec<::wgpu::Buffer>,
    engine: Arc<WgpuBatchEngine>,
    pool: SetPool,
}

impl std::fmt::Debug for WgpuBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuBatch")
            .field("epoch", &self.epoch)
            .field("index", &self.index)
            .field("rows", &self.row_ids.len())
            .finish_non_exhaustive()
    }
}

impl WgpuBatch {
    /// Rows in the batch.
    pub fn len(&self) -> usize {
        self.row_ids.len()
    }
    /// `true` if the batch has no rows.
    pub fn is_empty(&self) -> bool {
        self.row_ids.is_empty()
    }
    /// Epoch of the batch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// Index of the batch within its epoch (this rank).
    pub fn index(&self) -> u64 {
        self.index
    }
    /// Global dataset row of each row, in batch order.
    pub fn row_ids(&self) -> &[u64] {
        &self.row_ids
    }
    /// The device the buffers live on (queue work on [`queue`](Self::queue)).
    pub fn device(&self) -> &::wgpu::Device {
        self.engine.device()
    }
    /// The queue the loader writes on: work submitted here is ordered after the gathers.
    pub fn queue(&self) -> &::wgpu::Queue {
        self.engine.queue()
    }
    /// The columns, in dataset order.
    pub fn tensors(&self) -> impl Iterator<Item = WgpuTensor<'_>> {
        self.columns
            .iter()
            .zip(&self.bufs)
            .map(|(c, buf)| WgpuTensor {
                name: &c.name,
                dtype: &c.dtype,
                rows: self.row_ids.len(),
                row_shape: &c.row_shape,
                len: self.row_ids.len() * c.row_bytes as usize,
                buf,
                engine: &self.engine,
            })
    }
    /// The column named `name`.
    pub fn tensor(&self, name: &str) -> Option<WgpuTensor<'_>> {
        self.tensors().find(|t| t.name == name)
    }
}

impl Drop for WgpuBatch {
    fn drop(&mut self) {
        let bufs = std::mem::take(&mut self.bufs);
        self.pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(bufs);
    }
}

/// Yields [`WgpuBatch`]es: the host [`super::Loader`]'s plan (same seed, same rows, same
/// order), decrypted on a wgpu adapter into device buffers.
pub struct WgpuDeviceLoader {
    inner: DeviceHandle<WgpuBatch>,
    engine: Arc<WgpuBatchEngine>,
}

impl std::fmt::Debug for WgpuDeviceLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuDeviceLoader")
            .field("adapter", &self.engine.adapter().to_string())
            .field("state", &self.inner.state)
            .field("remaining", &self.inner.remaining())
            .finish_non_exhaustive()
    }
}

/// What the producer thread shares with the reader and planner it spawns.
struct Producer {
    source: Arc<FormatSource>,
    files: Vec<File>,
    engine: Arc<WgpuBatchEngine>,
    columns: Arc<[ColumnInfo]>,
    chunk_size: u64,
    twin: bool,
    threads: usize,
    /// Threads copying a window into its upload slot.
    upload_threads: usize,
    batch_size: usize,
    /// Most staging bytes a window needs without pieces (its chunks padded to 16 bytes).
    window_bytes: u64,
    /// Most bytes of one window piece (`Packing::Aligned`'s `piece_cap`).
    piece_cap: u64,
    counters: Arc<Counters>,
    device: Arc<DeviceCounters>,
    pool: SetPool,
}

/// A verified window whose upload and decryption are queued (queue order makes it ready for
/// any later gather).
struct Window {
    epoch: u64,
    w: usize,
    /// One buffer per piece of the window's layout.
    bufs: Vec<::wgpu::Buffer>,
}

/// A window read and verified on the host, on its way to the uploader.
struct Staged {
    window: Window,
    staging: Vec<u8>,
    /// Per piece: its staging range (16-byte aligned, a multiple of 16 long) and its chunks to
    /// decrypt, at offsets within the piece.
    pieces: Vec<(std::ops::Range<usize>, Vec<WindowChunk>)>,
}

/// A batch whose gathers were submitted: handed out once `done` completed.
struct Gathered {
    batch: WgpuBatch,
    done: ::wgpu::SubmissionIndex,
}

impl WgpuDeviceLoader {
    /// Opens the dataset at `path` with `key` (headers authenticated and tags checked on the
    /// CPU), uploads every shard's round keys to the adapter `wgpu` picks and starts the
    /// loader. `opts.mode == DecryptMode::TwinNoCrypto` (bench only) skips verification and
    /// decryption; `opts.threads` threads `pread` and verify a window's chunks.
    pub fn open(
        path: &Path,
        key: &MasterKey,
        wgpu: WgpuOptions,
        opts: &LoaderOptions,
    ) -> Result<WgpuDeviceLoader> {
        let cipher = WgpuCipher::new(wgpu)?;
        let ds = Dataset::open(path)?;
        let unlocked = ds.unlock(key, &CpuCipher::new())?;
        let data_keys = (0..ds.shards().len())
            .map(|s| ds.keyring().unwrap(key, s))
            .collect::<Result<Vec<_>>>()?; // zeroized on drop
        let engine = WgpuBatchEngine::new(&cipher, &data_keys.iter().collect::<Vec<_>>())?;
        drop(data_keys);
        let source = Arc::new(FormatSource::new(unlocked)?);
        WgpuDeviceLoader::new(source, Arc::new(engine), opts)
    }

    /// Starts a loader over `source` (whose CPU openers check the tags) with `engine` holding
    /// every shard's key, in shard order.
    pub fn new(
        source: Arc<FormatSource>,
        engine: Arc<WgpuBatchEngine>,
        opts: &LoaderOptions,
    ) -> Result<WgpuDeviceLoader> {
        let built = Instant::now();
        if engine.key_count() as usize != source.shard_count() {
            return Err(Error::InvalidArgument(format!(
                "{} keys on the device for {} shards",
                engine.key_count(),
                source.shard_count()
            )));
        }
        let PlanSetup {
            columns,
            chunk_size,
            block_rows,
            shard_rows,
            total_rows,
            cfg,
            batches_per_epoch,
            total,
            files,
            batch_rows,
        } = PlanSetup::new(source.as_ref(), opts)?;
        let window_bytes = window_byte_bound(
            &columns,
            chunk_size,
            block_rows,
            opts.window_blocks,
            &shard_rows,
        );
        let cap = engine.max_binding_bytes();
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        // A window above the piece size is split into pieces, one buffer and dispatch each;
        // a piece holds at least one chunk and the rest of the row its last byte belongs to.
        let unit = piece_unit_bound(&columns, chunk_size, &shard_rows);
        if unit > cap {
            return Err(Error::InvalidArgument(format!(
                "a {:.1} MiB chunk and the row it ends in need {:.1} MiB, above what {} can \
                 bind at once ({:.1} MiB): convert with a smaller chunk_size",
                mib(chunk_size),
                mib(unit),
                engine.adapter(),
                mib(cap)
            )));
        }
        let piece_cap = engine.piece_bytes().max(unit).min(cap);
        if let Some(c) = columns
            .iter()
            .find(|c| c.row_bytes.saturating_mul(batch_rows as u64) > cap)
        {
            return Err(Error::InvalidArgument(format!(
                "column {} of a {}-row batch needs {:.1} MiB, above what {} can bind at once \
                 ({:.1} MiB): lower batch_size",
                c.name,
                batch_rows,
                mib(c.row_bytes.saturating_mul(batch_rows as u64)),
                engine.adapter(),
                mib(cap)
            )));
        }
        usize::try_from(window_bytes)
            .map_err(|_| Error::InvalidArgument("window too large for this machine".into()))?;
        let counters = Arc::new(Counters::default());
        let device = Arc::new(DeviceCounters::default());
        let producer = Producer {
            source,
            files,
            engine: engine.clone(),
            columns: columns.clone(),
            chunk_size,
            twin: opts.mode == DecryptMode::TwinNoCrypto,
            threads: opts.threads,
            upload_threads: upload_threads()?,
            batch_size: batch_rows,
            window_bytes,
            piece_cap,
            counters: counters.clone(),
            device: device.clone(),
            pool: Arc::new(Mutex::new(Vec::new())),
        };
        let shape = Shape {
            block_rows,
            total_rows,
            batches_per_epoch,
            total,
            columns,
        };
        let span = (opts.start_epoch, opts.start_batch, opts.epochs);
        let inner = DeviceHandle::spawn(
            "cs-wgpu",
            opts,
            shape,
            counters,
            device,
            built,
            move |tx, stop| producer.run(&cfg, &shard_rows, span, tx, stop),
        )?;
        Ok(WgpuDeviceLoader { inner, engine })
    }

    /// The position after the last batch handed out (resume with [`LoaderOptions::resume`]).
    pub fn state(&self) -> LoaderState {
        self.inner.state.clone()
    }

    /// Telemetry in the host loader's stages: `read` = `pread` into staging, `verify` = tag
    /// checks on the CPU, `decrypt` = queueing the upload and CTR dispatch, `assemble` =
    /// gathers (enqueue + completion wait). [`device_stats`](Self::device_stats) splits them.
    pub fn stats(&self) -> LoaderStats {
        self.inner.counters.snapshot()
    }

    /// The device path's own telemetry (reader and gather threads, wall nanoseconds).
    pub fn device_stats(&self) -> DeviceStats {
        self.inner.device.snapshot()
    }

    /// The dataset's columns.
    pub fn columns(&self) -> &[ColumnInfo] {
        &self.inner.columns
    }

    /// Batches per epoch for this rank.
    pub fn batches_per_epoch(&self) -> u64 {
        self.inner.batches_per_epoch
    }

    /// Batches left to yield.
    pub fn remaining(&self) -> u64 {
        self.inner.remaining()
    }

    /// The device the batches live on.
    pub fn device(&self) -> &::wgpu::Device {
        self.engine.device()
    }

    /// The queue the loader submits on; use it for work on the batches.
    pub fn queue(&self) -> &::wgpu::Queue {
        self.engine.queue()
    }

    /// The adapter, for reports.
    pub fn adapter(&self) -> String {
        self.engine.adapter().to_string()
    }
}

impl Iterator for WgpuDeviceLoader {
    type Item = Result<WgpuBatch>;

    fn next(&mut self) -> Option<Result<WgpuBatch>> {
        self.inner.next_batch()
    }
}

impl DeviceBatchMeta for WgpuBatch {
    fn epoch(&self) -> u64 {
        self.epoch
    }
    fn index(&self) -> u64 {
        self.index
    }
    fn bytes(&self) -> u64 {
        self.tensors().map(|t| t.len() as u64).sum()
    }
}

impl Producer {
    /// Runs the reader and planner threads and the gather loop until the last batch, an error
    /// or a stop.
    fn run(
        &self,
        cfg: &SamplerConfig,
        shard_rows: &[u64],
        span: (u64, u64, u64),
        tx: &Sender<Result<WgpuBatch>>,
        stop: &Receiver<()>,
    ) -> Result<()> {
        let (win_tx, win_rx) = bounded::<Result<Window>>(WINDOWS_AHEAD);
        let (plan_tx, plan_rx) = bounded::<Result<BatchPlan>>(16);
        let (recycle_tx, recycle_rx) = crossbeam_channel::unbounded::<::wgpu::Buffer>();
        std::thread::scope(|sc| {
            let reader = std::thread::Builder::new()
                .name("cs-wgpu-read".into())
                .spawn_scoped(sc, || {
                    self.read_windows(cfg, shard_rows, span, win_tx, recycle_rx)
                })
                .map_err(|e| Error::Stopped(format!("cannot spawn the wgpu reader: {e}")))?;
            let planner = std::thread::Builder::new()
                .name("cs-wgpu-plan".into())
                .spawn_scoped(sc, || {
                    plan_batches(
                        &self.source,
                        cfg,
                        shard_rows,
                        span,
                        Packing::Aligned {
                            piece_cap: self.piece_cap,
                        },
                        plan_tx,
                    )
                })
                .map_err(|e| Error::Stopped(format!("cannot spawn the wgpu planner: {e}")))?;
            let mut pending: Option<Gathered> = None;
            let r = self.gather_loop(
                cfg,
                shard_rows,
                span,
                (plan_rx, win_rx, &recycle_tx),
                &mut pending,
                (tx, stop),
            );
            // Batches gathered before a failure are complete and valid: hand them out first.
            let r = match r {
                Ok(false) => Ok(()),
                r => match pending.take() {
                    Some(g) => self.hand_out(g, tx, stop).and(r.map(|_| ())),
                    None => r.map(|_| ()),
                },
            };
            drop(pending);
            drop(recycle_tx);
            // The reader and planner stop at their next send (the receivers are gone).
            let _ = reader.join();
            let _ = planner.join();
            r
        })
    }

    /// For each batch: the windows it needs (received verified from the reader, in
    /// [`load_order`]), its gathers submitted, and the previous batch handed out once its
    /// submission completed. `Ok(false)`: stopped.
    fn gather_loop(
        &self,
        cfg: &SamplerConfig,
        shard_rows: &[u64],
        (start_epoch, start_batch, epochs): (u64, u64, u64),
        (plans, windows, recycle): (
            Receiver<Result<BatchPlan>>,
            Receiver<Result<Window>>,
            &Sender<::wgpu::Buffer>,
        ),
        pending: &mut Option<Gathered>,
        (tx, stop): (&Sender<Result<WgpuBatch>>, &Receiver<()>),
    ) -> Result<bool> {
        let mut resident: Vec<Window> = Vec::new();
        for epoch in start_epoch..epochs {
            let batches = EpochPlan::new(cfg, epoch, shard_rows).batches();
            let first = if epoch == start_epoch { start_batch } else { 0 };
            for k in first..batches {
                let bp = match plans.recv() {
                    Ok(r) => r?,
                    Err(_) => {
                        return Err(Error::Stopped(
                            "the wgpu loader's planner thread exited early".into(),
                        ));
                    }
                };
                if (bp.epoch, bp.index) != (epoch, k) {
                    return Err(Error::Stopped(format!(
                        "internal: planner sent batch {} of epoch {}, expected {k} of {epoch}",
                        bp.index, bp.epoch
                    )));
                }
                // Evicted windows go back to the reader; its rewrite of one is a later
                // submission than the gathers that read it (queue order).
                let needed = &bp.needed;
                let mut i = 0;
                while i < resident.len() {
                    let r = &resident[i];
                    if r.epoch == epoch && needed.binary_search(&r.w).is_ok() {
                        i += 1;
                    } else {
                        // The reader may have finished: then the buffers are just dropped.
                        for buf in resident.swap_remove(i).bufs {
                            let _ = recycle.send(buf);
                        }
                    }
                }
                for &w in needed {
                    if resident.iter().any(|r| r.w == w) {
                        continue;
                    }
                    let t = Instant::now();
                    let win = match windows.recv() {
                        Ok(r) => r?,
                        Err(_) => {
                            return Err(Error::Stopped(
                                "the wgpu loader's reader thread exited early".into(),
                            ));
                        }
                    };
                    add(&self.device.window_wait_ns, ns_since(t));
                    if win.epoch != epoch || win.w != w {
                        return Err(Error::Stopped(format!(
                            "internal: reader sent window {} of epoch {}, batch {k} needs window \
                             {w} of epoch {epoch}",
                            win.w, win.epoch
                        )));
                    }
                    resident.push(win);
                }
                let g = self.gather_batch(bp, &resident)?;
                if let Some(prev) = pending.replace(g)
                    && !self.hand_out(prev, tx, stop)?
                {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Waits for a batch's gathers and sends it. `Ok(false)`: the loader was dropped.
    fn hand_out(
        &self,
        g: Gathered,
        tx: &Sender<Result<WgpuBatch>>,
        stop: &Receiver<()>,
    ) -> Result<bool> {
        let t = Instant::now();
        self.engine.wait(g.done)?;
        let ns = ns_since(t);
        add(&self.counters.assemble_ns, ns);
        add(&self.device.batch_sync_ns, ns);
        if stopped(stop) {
            return Ok(false);
        }
        let t = Instant::now();
        select! {
            send(tx, Ok(g.batch)) -> r => if r.is_err() { return Ok(false) },
            recv(stop) -> _ => return Ok(false),
        }
        add(&self.device.send_wait_ns, ns_since(t));
        Ok(true)
    }

    /// Every window in the gather loop's [`load_order`], across epochs, in two stages so that
    /// reading overlaps uploading: this thread `pread`s and verifies window k+1 into one host
    /// staging buffer while the uploader thread (`cs-wgpu-upload`) copies window k from the
    /// other into the upload ring and queues its CTR pass, then sends it on. An error is sent
    /// in its place, then nothing more.
    fn read_windows(
        &self,
        cfg: &SamplerConfig,
        shard_rows: &[u64],
        (start_epoch, start_batch, epochs): (u64, u64, u64),
        tx: Sender<Result<Window>>,
        recycle: Receiver<::wgpu::Buffer>,
    ) {
        let mut ring = match self.engine.upload_ring(UPLOAD_SLOTS, self.piece_bytes()) {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        // Ciphertext only (tags are checked in cached host memory before any upload).
        let (back_tx, back_rx) = crossbeam_channel::unbounded::<Vec<u8>>();
        for _ in 0..2 {
            let _ = back_tx.send(vec![0u8; self.window_bytes as usize]);
        }
        let (job_tx, job_rx) = bounded::<Result<Staged>>(1);
        std::thread::scope(|sc| {
            let upload = move || {
                for job in job_rx {
                    let r = job.and_then(|st| self.upload(&mut ring, st, &back_tx));
                    let ok = r.is_ok();
                    if tx.send(r).is_err() || !ok {
                        return;
                    }
                }
            };
            let uploader = match std::thread::Builder::new()
                .name("cs-wgpu-upload".into())
                .spawn_scoped(sc, upload)
            {
                Ok(h) => h,
                Err(e) => {
                    // `tx` went into the closure: the gather loop sees the reader end early.
                    eprintln!("ciphershard: cannot spawn the wgpu upload thread: {e}");
                    return;
                }
            };
            let mut free: Vec<::wgpu::Buffer> = Vec::new();
            'windows: for epoch in start_epoch..epochs {
                let plan = EpochPlan::new(cfg, epoch, shard_rows);
                let first = if epoch == start_epoch { start_batch } else { 0 };
                for w in load_order(&plan, first) {
                    free.extend(recycle.try_iter());
                    // None left: the uploader stopped (error or loader dropped).
                    let Ok(staging) = back_rx.recv() else {
                        break 'windows;
                    };
                    let r = self.read_window(&plan, epoch, w, staging, &mut free);
                    let ok = r.is_ok();
                    if job_tx.send(r).is_err() || !ok {
                        break 'windows;
                    }
                }
            }
            drop(job_tx);
            drop(back_rx);
            let _ = uploader.join();
        });
    }

    /// Size of every window piece buffer and upload ring slot: the whole window when it fits
    /// one piece (then it is never split), else the piece cap.
    fn piece_bytes(&self) -> u64 {
        self.window_bytes.min(self.piece_cap)
    }

    /// Reads window `w`'s chunks into `staging`, checking every tag, fills the pieces'
    /// extensions and picks a device buffer per piece (recycled or new).
    fn read_window(
        &self,
        plan: &EpochPlan,
        epoch: u64,
        w: usize,
        mut staging: Vec<u8>,
        free: &mut Vec<::wgpu::Buffer>,
    ) -> Result<Staged> {
        let keys = window_keys(&self.columns, self.chunk_size, plan, w);
        let specs: Vec<ChunkSpec> = keys
            .iter()
            .map(|&(s, c, j)| self.source.chunk(s as usize, c as usize, j))
            .collect();
        let WindowLayout {
            staging_offs,
            staging_len,
            pieces,
            ..
        } = window_layout(
            &self.columns,
            self.chunk_size,
            &keys,
            &specs,
            Packing::Aligned {
                piece_cap: self.piece_cap,
            },
        );
        let piece_bytes = self.piece_bytes();
        if let Some(p) = pieces.iter().find(|p| p.range.len() as u64 > piece_bytes) {
            return Err(Error::Stopped(format!(
                "internal: a piece of window {w} needs {} bytes, buffers hold {piece_bytes}",
                p.range.len()
            )));
        }
        // Split windows carry extensions beyond the bound: grow once, then reused.
        if staging_len > staging.len() {
            staging.resize(staging_len, 0);
        }
        let t0 = Instant::now();
        let verify_ns = std::sync::atomic::AtomicU64::new(0);
        let check = |k: Key, spec: &ChunkSpec, ct: &[u8]| -> Result<()> {
            if self.twin {
                return Ok(());
            }
            let t = Instant::now();
            let params = ChunkParams {
                nonce: spec.nonce,
                aad: &spec.aad,
                tag: spec.tag,
                encrypted: spec.encrypted,
            };
            let r = self.source.opener(k.0 as usize).verify(&params, ct);
            add(&verify_ns, ns_since(t));
            r.map_err(|e| e.at(|| self.source.location(k.0 as usize, k.1 as usize, k.2)))
        };
        ChunkReader {
            source: &self.source,
            files: &self.files,
            threads: self.threads,
        }
        .pread_all(&keys, &specs, &staging_offs, &mut staging, &check)?;
        // The padding after each chunk's last byte: zeros, not a previous window's bytes.
        for (spec, &o) in specs.iter().zip(&staging_offs) {
            staging[o + spec.len..o + spec.len.next_multiple_of(16)].fill(0);
        }
        // Extensions: copies of verified ciphertext (the chunk's own tag held above).
        for part in pieces.iter().flat_map(|p| &p.parts) {
            let home = staging_offs[part.chunk];
            if part.at != home {
                staging.copy_within(home..home + part.len, part.at);
                staging[part.at + part.len..part.at + part.len.next_multiple_of(16)].fill(0);
            }
        }
        let total: u64 = specs.iter().map(|s| s.len as u64).sum();
        let verified = verify_ns.into_inner();
        let read = ns_since(t0).saturating_sub(verified);
        add(&self.counters.read_ns, read);
        add(&self.device.read_ns, read);
        add(&self.counters.read_bytes, total);
        add(&self.device.window_bytes, total);
        add(&self.counters.chunks_loaded, keys.len() as u64);
        if !self.twin {
            add(&self.counters.verify_ns, verified);
            add(&self.counters.verify_bytes, total);
        }
        let mut bufs = Vec::with_capacity(pieces.len());
        for _ in &pieces {
            bufs.push(match free.pop() {
                Some(b) => b,
                None => self
                    .engine
                    .create_buffer("ciphershard_window", piece_bytes)?,
            });
        }
        let pieces = pieces
            .into_iter()
            .map(|p| {
                let chunks = if self.twin {
                    Vec::new()
                } else {
                    p.parts
                        .iter()
                        .filter(|part| specs[part.chunk].encrypted && part.len > 0)
                        .map(|part| WindowChunk {
                            offset: (part.at - p.range.start) as u64,
                            len: part.len as u64,
                            nonce: specs[part.chunk].nonce,
                            key: keys[part.chunk].0,
                        })
                        .collect()
                };
                // An empty window still uploads one block (a binding is never empty).
                let end = p.range.end.max(p.range.start + 16);
                (p.range.start..end, chunks)
            })
            .collect();
        Ok(Staged {
            window: Window { epoch, w, bufs },
            staging,
            pieces,
        })
    }

    /// Copies a verified window into the upload ring, piece by piece, and queues each piece's
    /// CTR pass; hands the staging buffer back to the reader.
    fn upload(&self, ring: &mut UploadRing, st: Staged, back: &Sender<Vec<u8>>) -> Result<Window> {
        let t = Instant::now();
        let r = st
            .pieces
            .iter()
            .zip(&st.window.bufs)
            .try_for_each(|((range, chunks), buf)| {
                self.engine
                    .upload_decrypt_ring(
                        ring,
                        self.upload_threads,
                        buf,
                        &st.staging[range.clone()],
                        chunks,
                    )
                    .map(|_| ())
            });
        let _ = back.send(st.staging);
        r?;
        let ns = ns_since(t);
        add(&self.device.submit_ns, ns);
        add(&self.counters.decrypt_ns, ns);
        add(
            &self.counters.decrypt_bytes,
            st.pieces
                .iter()
                .flat_map(|(_, chunks)| chunks)
                .map(|c| c.len)
                .sum(),
        );
        add(&self.device.windows, 1);
        add(&self.device.window_pieces, st.pieces.len() as u64);
        Ok(st.window)
    }

    /// Submits the gathers of a planned batch from the resident windows into a pooled
    /// column-buffer set: one dispatch per column and window, one submission.
    fn gather_batch(&self, bp: BatchPlan, resident: &[Window]) -> Result<Gathered> {
        let t = Instant::now();
        let pooled = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let bufs = match pooled {
            Some(b) => b,
            None => self
                .columns
                .iter()
                .map(|c| {
                    self.engine.create_buffer(
                        &format!("ciphershard_batch_{}", c.name),
                        self.batch_size as u64 * c.row_bytes,
                    )
                })
                .collect::<Result<Vec<_>>>()?,
        };
        let jobs = bp
            .jobs
            .iter()
            .filter(|(_, _, _, range)| !range.is_empty())
            .map(|(c, w, piece, range)| {
                let src = resident
                    .iter()
                    .find(|r| r.w == *w)
                    .and_then(|r| r.bufs.get(*piece))
                    .ok_or_else(|| {
                        Error::Stopped(format!(
                            "internal: piece {piece} of window {w} not resident for a gather"
                        ))
                    })?;
                Ok(GatherJob {
                    src,
                    dst: *c,
                    pairs: range.clone(),
                    row_bytes: self.columns[*c].row_bytes,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let dsts: Vec<&::wgpu::Buffer> = bufs.iter().collect();
        let done = self.engine.gather(&jobs, &bp.pairs, &dsts)?;
        let ns = ns_since(t);
        add(&self.counters.assemble_ns, ns);
        add(&self.device.gather_ns, ns);
        let rows = bp.row_ids.len() as u64;
        let bytes: u64 = self.columns.iter().map(|c| c.row_bytes * rows).sum();
        add(&self.counters.assemble_bytes, bytes);
        Ok(Gathered {
            batch: WgpuBatch {
                epoch: bp.epoch,
                index: bp.index,
                row_ids: bp.row_ids,
                columns: self.columns.clone(),
                bufs,
                engine: self.engine.clone(),
                pool: self.pool.clone(),
            },
            done,
        })
    }
}
