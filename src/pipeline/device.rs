//! Device-memory batches: the loader's plan, with chunks verified and decrypted on a CUDA GPU
//! and rows gathered into pooled device buffers. See docs/LOADER.md, "Device batches".
//!
//! Two threads. The *reader* (`cs-device-read`) walks the windows in the order the batches
//! will need them, across epochs: `pread` of every chunk a window touches straight into the
//! pinned staging of the next [`BatchDecryptor`] slot (three) → one asynchronous host-to-device
//! copy → GHASH (tags) and AES-CTR on the GPU into a device *window* buffer; only when every
//! slot is busy does it wait for the oldest window, whose tags `wait` checks (on a mismatch
//! the window is zeroed and nothing is handed out), and send it on. So window k+2 is read
//! while k+1 is on the GPU and batches are gathered from k. The *producer* (`cs-device`)
//! gathers each batch from the resident, verified windows into pooled column buffers with
//! `cs_gather_rows` (`kernels/gather.cu`: one upload of row offsets per batch, one launch per
//! column and window), records an event, and hands out the previous batch once its event has
//! completed: a batch is complete in device memory when it is handed out. Same plan as the
//! host [`super::Loader`]: the same seed gives the same rows in the same order, so a device
//! batch downloaded equals the host loader's batch.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, bounded, select};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr};

use super::device_shell::{DeviceBatchMeta, DeviceHandle, Shape, plan_batches, stopped};
use super::format_source::FormatSource;
use super::loader::{DecryptMode, LoaderOptions, LoaderState, PlanSetup};
use super::sampler::{EpochPlan, SamplerConfig};
use super::source::{ChunkSpec, ColumnInfo, RowSource};
use super::telemetry::{Counters, DeviceCounters, DeviceStats, LoaderStats, add, ns_since};
use super::window_plan::{
    BatchPlan, ChunkReader, Key, Packing, WindowLayout, load_order, window_byte_bound, window_keys,
    window_layout,
};
use crate::cipher::cuda::{
    BatchDecryptor, CudaCipher, CudaKey, DeviceBatch, Gather, GatherJob, StagedChunk, Ticket,
    WaitError,
};
use crate::cipher::{ChunkParams, cpu::CpuCipher};
use crate::error::{Error, Result};
use crate::format::Dataset;
use crate::keys::MasterKey;

fn dev_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Backend {
        backend: "cuda",
        reason: format!(
            "{what}: {e} (out of device memory: use a smaller batch or window; otherwise check \
             `nvidia-smi`, or use the host loader with --backend cpu)"
        ),
    }
}

/// One column of a device batch: shape `[B, ...]`, the dataset's dtype, in device memory.
#[derive(Debug, Clone, Copy)]
pub struct CudaTensor<'a> {
    /// Column name.
    pub name: &'a str,
    /// safetensors dtype name.
    pub dtype: &'a str,
    rows: usize,
    row_shape: &'a [u64],
    len: usize,
    buf: &'a CudaSlice<u8>,
    stream: &'a Arc<CudaStream>,
}

impl<'a> CudaTensor<'a> {
    /// Shape `[B, ...row shape]`.
    pub fn shape(&self) -> Vec<u64> {
        std::iter::once(self.rows as u64)
            .chain(self.row_shape.iter().copied())
            .collect()
    }
    /// Bytes of the tensor (`B × row bytes`); the buffer may be longer (pooled at full batch).
    pub fn len(&self) -> usize {
        self.len
    }
    /// `true` for a zero-byte tensor.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The pooled device buffer (at least [`len`](Self::len) bytes).
    pub fn slice(&self) -> &'a CudaSlice<u8> {
        self.buf
    }
    /// Raw device pointer (`CUdeviceptr`) for DLPack; valid while the batch lives. The data is
    /// complete: its gathers had finished (event waited) before the batch was handed out.
    pub fn device_ptr(&self) -> u64 {
        let (p, _sync) = self.buf.device_ptr(self.stream);
        p
    }
    /// The stream the tensor was written on (DLPack's stream argument).
    pub fn stream(&self) -> &'a Arc<CudaStream> {
        self.stream
    }
    /// Copies the tensor to the host (tests, debugging).
    pub fn to_host(&self) -> Result<Vec<u8>> {
        let mut v = vec![0u8; self.len];
        if self.len > 0 {
            self.stream
                .memcpy_dtoh(&self.buf.slice(..self.len), &mut v[..])
                .map_err(|e| dev_err("device-to-host copy", e))?;
            self.stream
                .synchronize()
                .map_err(|e| dev_err("device-to-host copy", e))?;
        }
        Ok(v)
    }
}

type SetPool = Arc<Mutex<Vec<Vec<CudaSlice<u8>>>>>;

/// A batch of verified, decrypted rows in device memory. Dropping it returns its device
/// buffers to the loader's pool.
pub struct CudaBatch {
    epoch: u64,
    index: u64,
    row_ids: Vec<u64>,
    columns: Arc<[ColumnInfo]>,
    bufs: Vec<CudaSlice<u8>>,
    stream: Arc<CudaStream>,
    pool: SetPool,
}

impl std::fmt::Debug for CudaBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBatch")
            .field("epoch", &self.epoch)
            .field("index", &self.index)
            .field("rows", &self.len())
            .finish()
    }
}

impl CudaBatch {
    /// Rows in the batch (B).
    pub fn len(&self) -> usize {
        self.row_ids.len()
    }
    /// `true` for an empty batch (never yielded).
    pub fn is_empty(&self) -> bool {
        self.row_ids.is_empty()
    }
    /// Epoch this batch belongs to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// Index of the batch within its epoch (for this rank).
    pub fn index(&self) -> u64 {
        self.index
    }
    /// Global dataset row index of each row, in batch order.
    pub fn row_ids(&self) -> &[u64] {
        &self.row_ids
    }
    /// The stream every column was written on (its gathers already complete).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// The column tensors, in the dataset's column order.
    pub fn tensors(&self) -> impl Iterator<Item = CudaTensor<'_>> {
        self.columns
            .iter()
            .zip(&self.bufs)
            .map(|(c, b)| CudaTensor {
                name: &c.name,
                dtype: &c.dtype,
                rows: self.row_ids.len(),
                row_shape: &c.row_shape,
                len: self.row_ids.len() * c.row_bytes as usize,
                buf: b,
                stream: &self.stream,
            })
    }
    /// The column named `name`.
    pub fn tensor(&self, name: &str) -> Option<CudaTensor<'_>> {
        self.tensors().find(|t| t.name == name)
    }
}

impl Drop for CudaBatch {
    fn drop(&mut self) {
        let bufs = std::mem::take(&mut self.bufs);
        self.pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(bufs);
    }
}

/// The loader into device memory: an iterator of `Result<CudaBatch>` with the host
/// [`super::Loader`]'s plan, state and failure semantics (the first error is yielded once, then
/// the loader stops; [`state`](Self::state) points at the failed batch).
pub struct DeviceLoader {
    inner: DeviceHandle<CudaBatch>,
}

impl std::fmt::Debug for DeviceLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceLoader")
            .field("state", &self.inner.state)
            .field("remaining", &self.inner.remaining())
            .finish_non_exhaustive()
    }
}

/// Pinned staging slots of the reader: window k is gathered from while k+1 is verified and
/// decrypted on the GPU and k+2 is read from the shards.
const WINDOW_SLOTS: usize = 3;

/// Everything the loader's threads share: the producer thread gathers batches, a reader
/// thread it spawns reads, uploads and verifies windows.
struct Producer {
    source: Arc<FormatSource>,
    files: Vec<File>,
    keys: Vec<Arc<CudaKey>>,
    cipher: Arc<CudaCipher>,
    columns: Arc<[ColumnInfo]>,
    chunk_size: u64,
    twin: bool,
    /// Threads that `pread` a window's chunks into staging.
    threads: usize,
    batch_size: usize,
    slot_bytes: usize,
    counters: Arc<Counters>,
    device: Arc<DeviceCounters>,
    pool: SetPool,
}

/// A verified, decrypted window resident on the device.
struct Window {
    epoch: u64,
    w: usize,
    /// Laid out by [`window_layout`]: the planner's [`window_offsets`] say where each chunk is.
    buf: DeviceBatch,
}

/// A window submitted to the GPU and not yet waited for.
struct InFlight {
    epoch: u64,
    w: usize,
    keys: Vec<Key>,
    total: u64,
    submitted: Instant,
    ticket: Ticket,
}

/// A gathered batch whose gathers may still run on the GPU: handed out once `done` completes.
struct Gathered {
    batch: CudaBatch,
    done: CudaEvent,
}

impl DeviceLoader {
    /// Opens the dataset at `path` with `key` (headers authenticated on the CPU), prepares every
    /// shard's data key on CUDA device `ordinal` and starts the loader. `opts.mode ==
    /// DecryptMode::TwinNoCrypto` (bench only) skips verification and decryption; `threads`
    /// is the number of threads that `pread` a window's chunks into pinned staging (besides the
    /// reader, planner and gather threads; see the module docs).
    pub fn open(
        path: &Path,
        key: &MasterKey,
        ordinal: usize,
        opts: &LoaderOptions,
    ) -> Result<DeviceLoader> {
        let cipher = CudaCipher::new(ordinal)?;
        let ds = Dataset::open(path)?;
        let unlocked = ds.unlock(key, &CpuCipher::new())?;
        let mut keys = Vec::with_capacity(ds.shards().len());
        for s in 0..ds.shards().len() {
            let dk = ds.keyring().unwrap(key, s)?; // zeroized on drop
            keys.push(cipher.prepare_device(&dk)?);
        }
        let source = Arc::new(FormatSource::new(unlocked)?);
        DeviceLoader::new(source, keys, cipher, opts)
    }

    /// Starts a device loader over `source` with each shard's key prepared on `cipher`'s device.
    pub fn new(
        source: Arc<FormatSource>,
        keys: Vec<Arc<CudaKey>>,
        cipher: Arc<CudaCipher>,
        opts: &LoaderOptions,
    ) -> Result<DeviceLoader> {
        let built = Instant::now();
        if keys.len() != source.shard_count() {
            return Err(Error::InvalidArgument(format!(
                "{} device keys for {} shards",
                keys.len(),
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
        let slot_bytes = usize::try_from(window_bytes)
            .ok()
            .filter(|&b| b < isize::MAX as usize / 4)
            .ok_or_else(|| Error::InvalidArgument("window too large for this machine".into()))?;
        let counters = Arc::new(Counters::default());
        let device = Arc::new(DeviceCounters::default());
        let producer = Producer {
            source,
            files,
            keys,
            cipher,
            columns: columns.clone(),
            chunk_size,
            twin: opts.mode == DecryptMode::TwinNoCrypto,
            threads: opts.threads,
            batch_size: batch_rows,
            slot_bytes,
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
        let (epochs, se, sb) = (opts.epochs, opts.start_epoch, opts.start_batch);
        let inner = DeviceHandle::spawn(
            "cs-device",
            opts,
            shape,
            counters,
            device,
            built,
            move |tx, stop| producer.run(&cfg, &shard_rows, se, sb, epochs, tx, stop),
        )?;
        Ok(DeviceLoader { inner })
    }

    /// The position after the last batch handed out (resume with [`LoaderOptions::resume`]).
    pub fn state(&self) -> LoaderState {
        self.inner.state.clone()
    }

    /// Telemetry so far, in the host loader's stages: `read` = `pread` into pinned staging,
    /// `verify` = time the reader was blocked on a window's upload + GHASH + CTR and tag check
    /// (GPU time not hidden), `decrypt` = submission to verified (wall, overlapped), `assemble`
    /// = gathers (enqueue + completion wait). [`device_stats`](Self::device_stats) splits them.
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
}

impl Iterator for DeviceLoader {
    type Item = Result<CudaBatch>;

    fn next(&mut self) -> Option<Result<CudaBatch>> {
        self.inner.next_batch()
    }
}

impl DeviceBatchMeta for CudaBatch {
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
    /// Runs the reader thread and the gather loop until the last batch, an error or a stop.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        cfg: &SamplerConfig,
        shard_rows: &[u64],
        start_epoch: u64,
        start_batch: u64,
        epochs: u64,
        tx: &Sender<Result<CudaBatch>>,
        stop: &Receiver<()>,
    ) -> Result<()> {
        let ctx = self.cipher.context().clone();
        let stream = ctx
            .new_stream()
            .map_err(|e| dev_err("creating a stream", e))?;
        let gather = Gather::load(&ctx)?;
        let (win_tx, win_rx) = bounded::<Result<Window>>(1);
        let (plan_tx, plan_rx) = bounded::<Result<BatchPlan>>(16);
        let (recycle_tx, recycle_rx) = crossbeam_channel::unbounded::<DeviceBatch>();
        std::thread::scope(|sc| {
            let reader = std::thread::Builder::new()
                .name("cs-device-read".into())
                .spawn_scoped(sc, || {
                    self.read_windows(
                        cfg,
                        shard_rows,
                        (start_epoch, start_batch, epochs),
                        win_tx,
                        recycle_rx,
                    )
                })
                .map_err(|e| Error::Stopped(format!("cannot spawn the device reader: {e}")))?;
            let planner = std::thread::Builder::new()
                .name("cs-device-plan".into())
                .spawn_scoped(sc, || {
                    plan_batches(
                        &self.source,
                        cfg,
                        shard_rows,
                        (start_epoch, start_batch, epochs),
                        Packing::Packed,
                        plan_tx,
                    )
                })
                .map_err(|e| Error::Stopped(format!("cannot spawn the device planner: {e}")))?;
            let mut resident: Vec<Window> = Vec::new();
            let mut pending: Option<Gathered> = None;
            let r = self.gather_loop(
                cfg,
                shard_rows,
                (start_epoch, start_batch, epochs),
                (plan_rx, win_rx, &recycle_tx),
                (&gather, &stream),
                (&mut resident, &mut pending),
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
            // No gather may still read a window when its memory is freed or reused.
            let _ = stream.synchronize();
            drop(pending);
            drop(resident);
            drop(recycle_tx);
            // The reader and planner stop at their next send (the receivers are gone).
            let _ = reader.join();
            let _ = planner.join();
            r
        })
    }

    /// The gather side: for each batch, the windows it needs (received verified from the
    /// reader, in [`load_order`]), one upload of row offsets and a gather per column and
    /// window, an event recorded; the previous batch is handed out once its event completes,
    /// so the GPU gathers batch k while batch k-1 is handed out. `Ok(false)`: stopped.
    #[allow(clippy::too_many_arguments)]
    fn gather_loop(
        &self,
        cfg: &SamplerConfig,
        shard_rows: &[u64],
        (start_epoch, start_batch, epochs): (u64, u64, u64),
        (plans, windows, recycle): (
            Receiver<Result<BatchPlan>>,
            Receiver<Result<Window>>,
            &Sender<DeviceBatch>,
        ),
        (gather, stream): (&Gather, &Arc<CudaStream>),
        (resident, pending): (&mut Vec<Window>, &mut Option<Gathered>),
        (tx, stop): (&Sender<Result<CudaBatch>>, &Receiver<()>),
    ) -> Result<bool> {
        for epoch in start_epoch..epochs {
            let batches = EpochPlan::new(cfg, epoch, shard_rows).batches();
            let first = if epoch == start_epoch { start_batch } else { 0 };
            for k in first..batches {
                let bp = match plans.recv() {
                    Ok(Ok(bp)) => bp,
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {
                        return Err(Error::Stopped(
                            "the device loader's planner thread exited early".into(),
                        ));
                    }
                };
                if (bp.epoch, bp.index) != (epoch, k) {
                    return Err(Error::Stopped(format!(
                        "internal: planner sent batch {} of epoch {}, expected {k} of {epoch}",
                        bp.index, bp.epoch
                    )));
                }
                let needed = &bp.needed;
                let keep = |r: &Window| r.epoch == epoch && needed.binary_search(&r.w).is_ok();
                if !resident.iter().all(keep) {
                    // The pending batch's gathers may still read a window about to be reused.
                    if let Some(g) = pending.take()
                        && !self.hand_out(g, tx, stop)?
                    {
                        return Ok(false);
                    }
                    let mut i = 0;
                    while i < resident.len() {
                        if keep(&resident[i]) {
                            i += 1;
                        } else {
                            // The reader may have finished: then the buffer is just freed.
                            let _ = recycle.send(resident.swap_remove(i).buf);
                        }
                    }
                }
                for &w in needed {
                    if resident.iter().any(|r| r.w == w) {
                        continue;
                    }
                    let t = Instant::now();
                    let win = match windows.recv() {
                        Ok(Ok(win)) => win,
                        Ok(Err(e)) => return Err(e),
                        Err(_) => {
                            return Err(Error::Stopped(
                                "the device loader's reader thread exited early".into(),
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
                let batch = self.gather_batch(bp, resident, gather, stream)?;
                let done = stream
                    .record_event(None)
                    .map_err(|e| dev_err("recording a gather event", e))?;
                if let Some(g) = pending.replace(Gathered { batch, done })
                    && !self.hand_out(g, tx, stop)?
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
        tx: &Sender<Result<CudaBatch>>,
        stop: &Receiver<()>,
    ) -> Result<bool> {
        let t = Instant::now();
        g.done
            .synchronize()
            .map_err(|e| dev_err("gathering rows", e))?;
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

    /// The reader side: every window in the gather thread's [`load_order`], across epochs,
    /// read into the next free pinned slot and submitted; with every slot busy, the oldest
    /// window is waited for (tags checked) and sent. Errors are sent in order, after the
    /// windows before them.
    fn read_windows(
        &self,
        cfg: &SamplerConfig,
        shard_rows: &[u64],
        (start_epoch, start_batch, epochs): (u64, u64, u64),
        tx: Sender<Result<Window>>,
        recycle: Receiver<DeviceBatch>,
    ) {
        let mut dec = match self.cipher.batch_decryptor(WINDOW_SLOTS, self.slot_bytes) {
            Ok(d) => d,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let mut inflight: std::collections::VecDeque<InFlight> = Default::default();
        // Finishes the in-flight windows in order, sending each; after a failed send or an
        // error it still waits for the rest (their buffers must not be freed mid-copy).
        let flush = |inflight: &mut std::collections::VecDeque<InFlight>,
                     dec: &mut BatchDecryptor,
                     mut open: bool|
         -> bool {
            while let Some(f) = inflight.pop_front() {
                let r = self.finish(f, dec);
                if open {
                    // An error is sent too (in its place), then nothing after it.
                    let ok = r.is_ok();
                    open = tx.send(r).is_ok() && ok;
                }
            }
            open
        };
        for epoch in start_epoch..epochs {
            let plan = EpochPlan::new(cfg, epoch, shard_rows);
            let first = if epoch == start_epoch { start_batch } else { 0 };
            for w in load_order(&plan, first) {
                while let Ok(b) = recycle.try_recv() {
                    dec.recycle(b);
                }
                if inflight.len() >= WINDOW_SLOTS
                    && let Some(f) = inflight.pop_front()
                {
                    let r = self.finish(f, &mut dec);
                    let ok = r.is_ok();
                    if tx.send(r).is_err() || !ok {
                        flush(&mut inflight, &mut dec, false);
                        return;
                    }
                }
                match self.submit_window(&plan, epoch, w, &mut dec) {
                    Ok(f) => inflight.push_back(f),
                    Err(e) => {
                        if flush(&mut inflight, &mut dec, true) {
                            let _ = tx.send(Err(e));
                        }
                        return;
                    }
                }
            }
        }
        flush(&mut inflight, &mut dec, true);
    }

    /// Reads every chunk window `w` touches into the decryptor's next pinned slot and enqueues
    /// its upload and GPU verification + decryption (for the twin, upload and copy) without
    /// waiting.
    fn submit_window(
        &self,
        plan: &EpochPlan,
        epoch: u64,
        w: usize,
        dec: &mut BatchDecryptor,
    ) -> Result<InFlight> {
        let keys = window_keys(&self.columns, self.chunk_size, plan, w);
        let specs: Vec<ChunkSpec> = keys
            .iter()
            .map(|&(s, c, j)| self.source.chunk(s as usize, c as usize, j))
            .collect();
        let WindowLayout {
            staging_offs,
            dst_offs,
            offsets: _,
            staging_len: at,
            out_len: out,
            pieces: _,
        } = window_layout(
            &self.columns,
            self.chunk_size,
            &keys,
            &specs,
            Packing::Packed,
        );
        if at > self.slot_bytes {
            return Err(Error::Stopped(format!(
                "internal: window {w} needs {at} bytes of staging, bound was {}",
                self.slot_bytes
            )));
        }
        let t0 = Instant::now();
        ChunkReader {
            source: &self.source,
            files: &self.files,
            threads: self.threads,
        }
        .pread_all(
            &keys,
            &specs,
            &staging_offs,
            dec.staging_mut()?,
            &|_, _, _| Ok(()),
        )?;
        let t1 = Instant::now();
        let read = (t1 - t0).as_nanos() as u64;
        add(&self.counters.read_ns, read);
        add(&self.device.read_ns, read);
        let total: u64 = specs.iter().map(|s| s.len as u64).sum();
        add(&self.counters.read_bytes, total);
        add(&self.device.window_bytes, total);
        add(&self.counters.chunks_loaded, keys.len() as u64);
        let out_len = (out as usize).max(16);
        let chunks: Vec<StagedChunk<'_>> = keys
            .iter()
            .zip(&specs)
            .zip(staging_offs.iter().zip(&dst_offs))
            .map(|((k, spec), (&o, &d))| StagedChunk {
                key: &self.keys[k.0 as usize],
                params: ChunkParams {
                    nonce: spec.nonce,
                    aad: &spec.aad,
                    tag: spec.tag,
                    encrypted: spec.encrypted,
                },
                staging_offset: o,
                len: spec.len,
                dst_offset: d as usize,
            })
            .collect();
        let ticket = if self.twin {
            dec.submit_staged_plain(&chunks, out_len)?
        } else {
            dec.submit_staged(&chunks, out_len)?
        };
        add(&self.device.submit_ns, ns_since(t1));
        Ok(InFlight {
            epoch,
            w,
            keys,
            total,
            submitted: t1,
            ticket,
        })
    }

    /// Waits for a submitted window: upload and kernels done, every tag checked (the twin
    /// checks none).
    fn finish(&self, f: InFlight, dec: &mut BatchDecryptor) -> Result<Window> {
        let t = Instant::now();
        let buf = match dec.wait(f.ticket) {
            Ok(b) => b,
            Err(WaitError::Tag { chunk }) => {
                let (s, c, j) = f.keys[chunk];
                return Err(Error::Integrity(
                    self.source.location(s as usize, c as usize, j),
                ));
            }
            Err(WaitError::Device(e)) => return Err(e),
        };
        let waited = ns_since(t);
        add(&self.counters.verify_ns, waited);
        add(&self.counters.verify_bytes, f.total);
        add(&self.device.gpu_wait_ns, waited);
        let latency = f.submitted.elapsed().as_nanos() as u64;
        add(&self.counters.decrypt_ns, latency);
        add(&self.counters.decrypt_bytes, f.total);
        add(&self.device.window_latency_ns, latency);
        add(&self.device.windows, 1);
        add(&self.device.window_pieces, 1);
        Ok(Window {
            epoch: f.epoch,
            w: f.w,
            buf,
        })
    }
    /// Enqueues the gathers of a planned batch from the resident windows into a pooled
    /// column-buffer set: one upload of every row offset, one launch per column and window.
    fn gather_batch(
        &self,
        bp: BatchPlan,
        resident: &[Window],
        gather: &Gather,
        stream: &Arc<CudaStream>,
    ) -> Result<CudaBatch> {
        let t = Instant::now();
        let pooled = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut bufs = match pooled {
            Some(b) => b,
            None => self
                .columns
                .iter()
                .map(|c| {
                    stream
                        .alloc_zeros::<u8>((self.batch_size * c.row_bytes as usize).max(16))
                        .map_err(|e| dev_err("allocating a device batch buffer", e))
                })
                .collect::<Result<Vec<_>>>()?,
        };
        let jobs = bp
            .jobs
            .iter()
            .map(|(c, w, _piece, range)| {
                // One piece per window with `Packing::Packed`.
                let win = resident.iter().find(|r| r.w == *w).ok_or_else(|| {
                    Error::Stopped(format!("internal: window {w} not resident for a gather"))
                })?;
                Ok(GatherJob {
                    src: win.buf.slice(),
                    dst: *c,
                    pairs: range.clone(),
                    row_bytes: self.columns[*c].row_bytes,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Ranges are checked against the window and column buffers before any launch.
        gather.gather_many(stream, &jobs, &bp.pairs, &mut bufs)?;
        let ns = ns_since(t);
        add(&self.counters.assemble_ns, ns);
        add(&self.device.gather_ns, ns);
        let rows = bp.row_ids.len() as u64;
        let bytes: u64 = self.columns.iter().map(|c| c.row_bytes * rows).sum();
        add(&self.counters.assemble_bytes, bytes);
        Ok(CudaBatch {
            epoch: bp.epoch,
            index: bp.index,
            row_ids: bp.row_ids,
            columns: self.columns.clone(),
            bufs,
            stream: stream.clone(),
            pool: self.pool.clone(),
        })
    }
}
