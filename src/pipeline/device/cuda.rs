//! The CUDA device engine. The reader `pread`s every chunk a window touches straight into the
//! pinned staging of the next [`BatchDecryptor`] slot (three) → one asynchronous host-to-device
//! copy → GHASH (tags) and AES-CTR on the GPU into a device window buffer; only when every slot
//! is busy does it wait for the oldest window, whose tags `wait` checks (on a mismatch the
//! window is zeroed and nothing is handed out), and send it on. So window k+2 is read while
//! k+1 is on the GPU and batches are gathered from k. Gathers run on the engine's own stream
//! with `cs_gather_rows` (one upload of row offsets per batch, one launch per column and
//! window); a recorded event is each batch's fence.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr};

use super::GpuLoader;
use super::batch::{GpuBatch, GpuTensor};
use super::engine::{DeviceEngine, GatherJob, Geometry, Window};
use super::feed::{WindowFeed, WindowRead};
use super::windows::Packing;
use crate::cipher::ChunkParams;
use crate::cipher::cpu::CpuCipher;
use crate::cipher::cuda::{
    BatchDecryptor, CudaCipher, CudaKey, DeviceBatch, Gather, GatherJob as CudaGatherJob,
    StagedChunk, Ticket, WaitError, backend_err,
};
use crate::error::{Error, Result};
use crate::format::Dataset;
use crate::keys::MasterKey;
use crate::pipeline::format_source::FormatSource;
use crate::pipeline::options::{ChunkKey, LoaderOptions};
use crate::pipeline::source::{ColumnInfo, RowSource};
use crate::pipeline::telemetry::{add, ns_since};
use crate::store::OpenOptions;

/// Pinned staging slots of the reader: window k is gathered from while k+1 is verified and
/// decrypted on the GPU and k+2 is read from the shards.
const WINDOW_SLOTS: usize = 3;

/// A CUDA device with every shard's key prepared on it, and the stream and kernel the loader
/// gathers batches with.
pub struct CudaEngine {
    cipher: Arc<CudaCipher>,
    keys: Vec<Arc<CudaKey>>,
    stream: Arc<CudaStream>,
    gather: Gather,
}

impl CudaEngine {
    /// An engine on `cipher`'s device with `keys` (shard `i`'s key at `i`).
    pub fn new(cipher: Arc<CudaCipher>, keys: Vec<Arc<CudaKey>>) -> Result<CudaEngine> {
        let ctx = cipher.context().clone();
        let stream = ctx
            .new_stream()
            .map_err(|e| backend_err("creating a stream", e))?;
        let gather = Gather::load(&ctx)?;
        Ok(CudaEngine {
            cipher,
            keys,
            stream,
            gather,
        })
    }

    /// The stream batches are gathered on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

/// The reader's window size: every window fits one pinned staging slot.
pub struct CudaConfig {
    slot_bytes: usize,
}

/// A window submitted to the GPU and not yet waited for.
struct InFlight {
    epoch: u64,
    w: usize,
    keys: Vec<ChunkKey>,
    total: u64,
    submitted: Instant,
    ticket: Ticket,
}

impl DeviceEngine for CudaEngine {
    type Buffer = CudaSlice<u8>;
    type WindowBuf = DeviceBatch;
    type Fence = CudaEvent;
    type Config = CudaConfig;

    const THREAD_NAME: &'static str = "cs-device";
    const WINDOWS_AHEAD: usize = 1;
    const EVICT_WAITS_FOR_GATHERS: bool = true;

    fn key_count(&self) -> usize {
        self.keys.len()
    }

    fn configure(&self, g: &Geometry<'_>) -> Result<(Packing, CudaConfig)> {
        // Bounded by the caller (`GpuLoader::start`): the window fits this machine's memory.
        let slot_bytes = g.window_bytes as usize;
        Ok((Packing::Packed, CudaConfig { slot_bytes }))
    }

    fn read_windows(
        &self,
        config: &CudaConfig,
        feed: WindowFeed<'_>,
        tx: Sender<Result<Window<DeviceBatch>>>,
        recycle: Receiver<DeviceBatch>,
    ) {
        let mut dec = match self.cipher.batch_decryptor(WINDOW_SLOTS, config.slot_bytes) {
            Ok(d) => d,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let mut inflight: VecDeque<InFlight> = VecDeque::new();
        // Finishes the in-flight windows in order, sending each; after a failed send or an
        // error it still waits for the rest (their buffers must not be freed mid-copy).
        let flush =
            |inflight: &mut VecDeque<InFlight>, dec: &mut BatchDecryptor, mut open: bool| {
                while let Some(f) = inflight.pop_front() {
                    let r = self.finish(&feed, f, dec);
                    if open {
                        // An error is sent too (in its place), then nothing after it.
                        let ok = r.is_ok();
                        open = tx.send(r).is_ok() && ok;
                    }
                }
                open
            };
        for win in feed.windows() {
            while let Ok(b) = recycle.try_recv() {
                dec.recycle(b);
            }
            if inflight.len() >= WINDOW_SLOTS
                && let Some(f) = inflight.pop_front()
            {
                let r = self.finish(&feed, f, &mut dec);
                let ok = r.is_ok();
                if tx.send(r).is_err() || !ok {
                    flush(&mut inflight, &mut dec, false);
                    return;
                }
            }
            match self.submit(config, &feed, win, &mut dec) {
                Ok(f) => inflight.push_back(f),
                Err(e) => {
                    if flush(&mut inflight, &mut dec, true) {
                        let _ = tx.send(Err(e));
                    }
                    return;
                }
            }
        }
        flush(&mut inflight, &mut dec, true);
    }

    fn alloc_column(&self, _column: &ColumnInfo, bytes: u64) -> Result<CudaSlice<u8>> {
        self.stream
            .alloc_zeros::<u8>((bytes as usize).max(16))
            .map_err(|e| backend_err("allocating a device batch buffer", e))
    }

    fn gather(
        &self,
        jobs: &[GatherJob<'_, DeviceBatch>],
        pairs: &[(u64, u64)],
        dsts: &mut [CudaSlice<u8>],
    ) -> Result<CudaEvent> {
        let jobs: Vec<CudaGatherJob<'_>> = jobs
            .iter()
            .map(|j| CudaGatherJob {
                src: j.src.slice(),
                dst: j.dst,
                pairs: j.pairs.clone(),
                row_bytes: j.row_bytes,
            })
            .collect();
        self.gather.gather_many(&self.stream, &jobs, pairs, dsts)?;
        self.stream
            .record_event(None)
            .map_err(|e| backend_err("recording a gather event", e))
    }

    fn wait(&self, fence: CudaEvent) -> Result<()> {
        fence
            .synchronize()
            .map_err(|e| backend_err("gathering rows", e))
    }

    fn quiesce(&self) {
        let _ = self.stream.synchronize();
    }

    fn read_back(&self, buf: &CudaSlice<u8>, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.stream
            .memcpy_dtoh(&buf.slice(..len), &mut v[..])
            .map_err(|e| backend_err("device-to-host copy", e))?;
        self.stream
            .synchronize()
            .map_err(|e| backend_err("device-to-host copy", e))?;
        Ok(v)
    }
}

impl CudaEngine {
    /// Reads every chunk window `win` touches into the decryptor's next pinned slot and enqueues
    /// its upload and GPU verification + decryption (for the twin, upload and copy) without
    /// waiting.
    fn submit(
        &self,
        config: &CudaConfig,
        feed: &WindowFeed<'_>,
        win: WindowRead,
        dec: &mut BatchDecryptor,
    ) -> Result<InFlight> {
        let at = win.layout.staging_len;
        if at > config.slot_bytes {
            return Err(Error::Stopped(format!(
                "internal: window {} needs {at} bytes of staging, bound was {}",
                win.w, config.slot_bytes
            )));
        }
        feed.read(&win, dec.staging_mut()?, false)?;
        let t1 = Instant::now();
        let total = win.bytes();
        let out_len = (win.layout.out_len as usize).max(16);
        let chunks: Vec<StagedChunk<'_>> = win
            .keys
            .iter()
            .zip(&win.specs)
            .zip(win.layout.staging_offs.iter().zip(&win.layout.dst_offs))
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
        let ticket = if feed.twin {
            dec.submit_staged_plain(&chunks, out_len)?
        } else {
            dec.submit_staged(&chunks, out_len)?
        };
        add(&feed.device.submit_ns, ns_since(t1));
        Ok(InFlight {
            epoch: win.epoch,
            w: win.w,
            keys: win.keys,
            total,
            submitted: t1,
            ticket,
        })
    }

    /// Waits for a submitted window: upload and kernels done, every tag checked (the twin
    /// checks none).
    fn finish(
        &self,
        feed: &WindowFeed<'_>,
        f: InFlight,
        dec: &mut BatchDecryptor,
    ) -> Result<Window<DeviceBatch>> {
        let t = Instant::now();
        let buf = match dec.wait(f.ticket) {
            Ok(b) => b,
            Err(WaitError::Tag { chunk }) => return Err(feed.integrity(f.keys[chunk])),
            Err(WaitError::Device(e)) => return Err(e),
        };
        let waited = ns_since(t);
        add(&feed.counters.verify_ns, waited);
        add(&feed.counters.verify_bytes, f.total);
        add(&feed.device.gpu_wait_ns, waited);
        let latency = f.submitted.elapsed().as_nanos() as u64;
        add(&feed.counters.decrypt_ns, latency);
        add(&feed.counters.decrypt_bytes, f.total);
        add(&feed.device.window_latency_ns, latency);
        add(&feed.device.windows, 1);
        add(&feed.device.window_pieces, 1);
        Ok(Window {
            epoch: f.epoch,
            w: f.w,
            pieces: vec![buf],
        })
    }
}

/// The loader into CUDA device memory (see [`GpuLoader`]).
pub type DeviceLoader = GpuLoader<CudaEngine>;
/// A batch in CUDA device memory.
pub type CudaBatch = GpuBatch<CudaEngine>;
/// One column of a [`CudaBatch`].
pub type CudaTensor<'a> = GpuTensor<'a, CudaEngine>;

impl GpuLoader<CudaEngine> {
    /// Opens the dataset at `path` with `key` (headers authenticated on the CPU), prepares every
    /// shard's data key on CUDA device `ordinal` and starts the loader; `opts.threads` threads
    /// read a window's chunks into pinned staging (besides the reader, planner and gather
    /// threads; see the module docs).
    pub fn open(
        path: &Path,
        key: &MasterKey,
        ordinal: usize,
        opts: &LoaderOptions,
    ) -> Result<DeviceLoader> {
        Self::open_as(path, &OpenOptions::default(), key, ordinal, opts, false)
    }

    /// [`open`](Self::open) with object-store settings (`store`) over the environment's.
    pub fn open_with(
        path: &Path,
        store: &OpenOptions,
        key: &MasterKey,
        ordinal: usize,
        opts: &LoaderOptions,
    ) -> Result<Self> {
        Self::open_as(path, store, key, ordinal, opts, false)
    }

    /// [`open`](Self::open), or with `twin` the benchmarks' plaintext twin (`crate::bench`).
    pub(crate) fn open_as(
        path: &Path,
        store: &OpenOptions,
        key: &MasterKey,
        ordinal: usize,
        opts: &LoaderOptions,
        twin: bool,
    ) -> Result<DeviceLoader> {
        let cipher = CudaCipher::new(ordinal)?;
        let unlocked = Dataset::open_with(path, store)?.unlock(key, &CpuCipher::new())?;
        let source = Arc::new(FormatSource::new(unlocked)?);
        let keys = (0..source.shard_count())
            .map(|s| cipher.prepare_device(source.data_key(s)))
            .collect::<Result<Vec<_>>>()?;
        let engine = CudaEngine::new(cipher, keys)?;
        GpuLoader::start(source, Arc::new(engine), opts, twin)
    }

    /// Starts a device loader over `source` with each shard's key prepared on `cipher`'s device.
    pub fn new(
        source: Arc<FormatSource>,
        keys: Vec<Arc<CudaKey>>,
        cipher: Arc<CudaCipher>,
        opts: &LoaderOptions,
    ) -> Result<DeviceLoader> {
        GpuLoader::start(
            source,
            Arc::new(CudaEngine::new(cipher, keys)?),
            opts,
            false,
        )
    }
}

impl GpuBatch<CudaEngine> {
    /// The stream every column was written on (its gathers already complete).
    pub fn stream(&self) -> &Arc<CudaStream> {
        self.engine.stream()
    }
}

impl<'a> GpuTensor<'a, CudaEngine> {
    /// The pooled device buffer (at least [`len`](Self::len) bytes).
    pub fn slice(&self) -> &'a CudaSlice<u8> {
        self.buf
    }
    /// Raw device pointer (`CUdeviceptr`) for DLPack; valid while the batch lives. The data is
    /// complete: its gathers had finished (event waited) before the batch was handed out.
    pub fn device_ptr(&self) -> u64 {
        let (p, _sync) = self.buf.device_ptr(self.engine.stream());
        p
    }
    /// The stream the tensor was written on (DLPack's stream argument).
    pub fn stream(&self) -> &'a Arc<CudaStream> {
        self.engine.stream()
    }
}
