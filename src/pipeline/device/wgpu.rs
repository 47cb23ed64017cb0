//! The wgpu device engine (Vulkan, Metal, DX12). The reader thread `pread`s every chunk a
//! window touches into a host staging buffer, each chunk's GCM tag checked on the CPU right
//! after its read, on the reading thread (GHASH only, ~25 GB/s per core: cheaper than a GPU
//! round trip for the tag); only then an uploader thread (`cs-wgpu-upload`) copies it through a
//! mapped ring into a device window buffer and queues one CTR dispatch over all its chunks
//! (`shaders/aes_ctr_batch.wgsl`, in place, a key per shard) — a buffer and dispatch per piece
//! when the window exceeds the piece size (a binding limit; `windows::window_layout`). So the
//! device never holds a byte of unverified plaintext, and a tampered chunk stops the loader
//! with an error naming it before anything of its window is decrypted. Gathers
//! (`shaders/gather.wgsl`, one dispatch per column and window piece, one submission per batch)
//! are fenced by their submission index.
//!
//! Ordering comes from the single wgpu queue: a window buffer evicted by the gather loop is
//! rewritten by the reader only in a later submission than the gathers that read it, and a
//! batch's buffers, returned to the pool when the batch is dropped, are overwritten only by a
//! later submission than any work the consumer queued on them (the consumer must use this
//! loader's [`device`](GpuLoader::device) and [`queue`](GpuLoader::queue)).

#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, bounded};

use super::GpuLoader;
use super::batch::{GpuBatch, GpuTensor};
use super::engine::{DeviceEngine, GatherJob, Geometry, Window};
use super::feed::{WindowFeed, WindowRead};
use super::windows::{Packing, piece_unit_bound};
use crate::cipher::cpu::CpuCipher;
use crate::cipher::wgpu::{
    GatherJob as WgpuGatherJob, UploadRing, WgpuBatchEngine, WgpuCipher, WgpuOptions, WindowChunk,
};
use crate::error::{Error, Result};
use crate::format::Dataset;
use crate::keys::MasterKey;
use crate::pipeline::format_source::FormatSource;
use crate::pipeline::options::LoaderOptions;
use crate::pipeline::source::{ColumnInfo, RowSource};
use crate::pipeline::telemetry::{add, ns_since};
use crate::store::OpenOptions;

/// Host-visible upload slots: the reader fills one while the GPU copies the other.
const UPLOAD_SLOTS: usize = 2;
/// Threads copying a window into its upload slot on a host with fewer than
/// [`UPLOAD_THREADS_FROM_CORES`] cores: one. On the 2-vCPU VMs one thread already saturates
/// memory (16 MiB windows: 14.7-17.3 GB/s with one, 10.6-12.8 with two).
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

/// What one loader's reader needs: window and piece sizes, and upload threads.
pub struct WgpuConfig {
    /// Most staging bytes a window needs without pieces (its chunks padded to 16 bytes).
    window_bytes: u64,
    /// Most bytes of one window piece (`Packing::Aligned`'s `piece_cap`).
    piece_cap: u64,
    /// Threads copying a window into its upload slot.
    upload_threads: usize,
}

impl WgpuConfig {
    /// Size of every window piece buffer and upload ring slot: the whole window when it fits
    /// one piece (then it is never split), else the piece cap.
    fn piece_bytes(&self) -> u64 {
        self.window_bytes.min(self.piece_cap)
    }
}

/// A window read and verified on the host, on its way to the uploader.
struct Staged {
    window: Window<::wgpu::Buffer>,
    staging: Vec<u8>,
    /// Per piece: its staging range (16-byte aligned, a multiple of 16 long) and its chunks to
    /// decrypt, at offsets within the piece.
    pieces: Vec<(std::ops::Range<usize>, Vec<WindowChunk>)>,
}

impl DeviceEngine for WgpuBatchEngine {
    type Buffer = ::wgpu::Buffer;
    type WindowBuf = ::wgpu::Buffer;
    type Fence = ::wgpu::SubmissionIndex;
    type Config = WgpuConfig;

    const THREAD_NAME: &'static str = "cs-wgpu";
    const WINDOWS_AHEAD: usize = 1;
    const EVICT_WAITS_FOR_GATHERS: bool = false;

    fn key_count(&self) -> usize {
        WgpuBatchEngine::key_count(self) as usize
    }

    fn configure(&self, g: &Geometry<'_>) -> Result<(Packing, WgpuConfig)> {
        let cap = self.max_binding_bytes();
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        // A window above the piece size is split into pieces, one buffer and dispatch each;
        // a piece holds at least one chunk and the rest of the row its last byte belongs to.
        let unit = piece_unit_bound(g.columns, g.chunk_size, g.shard_rows);
        if unit > cap {
            return Err(Error::InvalidArgument(format!(
                "a {:.1} MiB chunk and the row it ends in need {:.1} MiB, above what {} can \
                 bind at once ({:.1} MiB): convert with a smaller chunk_size",
                mib(g.chunk_size),
                mib(unit),
                self.adapter(),
                mib(cap)
            )));
        }
        let piece_cap = self.piece_bytes().max(unit).min(cap);
        if let Some(c) = g
            .columns
            .iter()
            .find(|c| c.row_bytes.saturating_mul(g.batch_rows as u64) > cap)
        {
            return Err(Error::InvalidArgument(format!(
                "column {} of a {}-row batch needs {:.1} MiB, above what {} can bind at once \
                 ({:.1} MiB): lower batch_size",
                c.name,
                g.batch_rows,
                mib(c.row_bytes.saturating_mul(g.batch_rows as u64)),
                self.adapter(),
                mib(cap)
            )));
        }
        Ok((
            Packing::Aligned { piece_cap },
            WgpuConfig {
                window_bytes: g.window_bytes,
                piece_cap,
                upload_threads: upload_threads()?,
            },
        ))
    }

    /// Reads and uploads in two stages so that reading overlaps uploading: this thread reads
    /// and verifies window k+1 into one host staging buffer while the uploader thread
    /// (`cs-wgpu-upload`) copies window k from the other into the upload ring, queues its CTR
    /// pass and sends it on.
    fn read_windows(
        &self,
        config: &WgpuConfig,
        feed: WindowFeed<'_>,
        tx: Sender<Result<Window<::wgpu::Buffer>>>,
        recycle: Receiver<::wgpu::Buffer>,
    ) {
        let mut ring = match self.upload_ring(UPLOAD_SLOTS, config.piece_bytes()) {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        // Ciphertext only (tags are checked in cached host memory before any upload).
        let (back_tx, back_rx) = crossbeam_channel::unbounded::<Vec<u8>>();
        for _ in 0..2 {
            let _ = back_tx.send(vec![0u8; config.window_bytes as usize]);
        }
        let (job_tx, job_rx) = bounded::<Result<Staged>>(1);
        let feed = &feed;
        std::thread::scope(|sc| {
            let upload = move || {
                for job in job_rx {
                    let r = job.and_then(|st| self.upload(config, feed, &mut ring, st, &back_tx));
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
            for win in feed.windows() {
                free.extend(recycle.try_iter());
                // None left: the uploader stopped (error or loader dropped).
                let Ok(staging) = back_rx.recv() else {
                    break;
                };
                let r = self.stage(config, feed, win, staging, &mut free);
                let ok = r.is_ok();
                if job_tx.send(r).is_err() || !ok {
                    break;
                }
            }
            drop(job_tx);
            drop(back_rx);
            let _ = uploader.join();
        });
    }

    fn alloc_column(&self, column: &ColumnInfo, bytes: u64) -> Result<::wgpu::Buffer> {
        self.create_buffer(&format!("ciphershard_batch_{}", column.name), bytes)
    }

    fn gather(
        &self,
        jobs: &[GatherJob<'_, ::wgpu::Buffer>],
        pairs: &[(u64, u64)],
        dsts: &mut [::wgpu::Buffer],
    ) -> Result<::wgpu::SubmissionIndex> {
        let jobs: Vec<WgpuGatherJob<'_>> = jobs
            .iter()
            .map(|j| WgpuGatherJob {
                src: j.src,
                dst: j.dst,
                pairs: j.pairs.clone(),
                row_bytes: j.row_bytes,
            })
            .collect();
        let dsts: Vec<&::wgpu::Buffer> = dsts.iter().collect();
        WgpuBatchEngine::gather(self, &jobs, pairs, &dsts)
    }

    fn wait(&self, fence: ::wgpu::SubmissionIndex) -> Result<()> {
        WgpuBatchEngine::wait(self, fence)
    }

    fn quiesce(&self) {
        // Submission order already keeps every gather ahead of any later reuse.
    }

    fn read_back(&self, buf: &::wgpu::Buffer, len: usize) -> Result<Vec<u8>> {
        self.read_buffer(buf, len as u64)
    }
}

impl WgpuBatchEngine {
    /// Reads window `win`'s chunks into `staging`, checking every tag, fills the pieces'
    /// extensions and picks a device buffer per piece (recycled or new).
    fn stage(
        &self,
        config: &WgpuConfig,
        feed: &WindowFeed<'_>,
        win: WindowRead,
        mut staging: Vec<u8>,
        free: &mut Vec<::wgpu::Buffer>,
    ) -> Result<Staged> {
        let piece_bytes = config.piece_bytes();
        let layout = &win.layout;
        if let Some(p) = layout
            .pieces
            .iter()
            .find(|p| p.range.len() as u64 > piece_bytes)
        {
            return Err(Error::Stopped(format!(
                "internal: a piece of window {} needs {} bytes, buffers hold {piece_bytes}",
                win.w,
                p.range.len()
            )));
        }
        // Split windows carry extensions beyond the bound: grow once, then reused.
        if layout.staging_len > staging.len() {
            staging.resize(layout.staging_len, 0);
        }
        feed.read(&win, &mut staging, !feed.twin)?;
        let offs = &layout.staging_offs;
        // The padding after each chunk's last byte: zeros, not a previous window's bytes.
        for (spec, &o) in win.specs.iter().zip(offs) {
            staging[o + spec.len..o + spec.len.next_multiple_of(16)].fill(0);
        }
        // Extensions: copies of verified ciphertext (the chunk's own tag held above).
        for part in layout.pieces.iter().flat_map(|p| &p.parts) {
            let home = offs[part.chunk];
            if part.at != home {
                staging.copy_within(home..home + part.len, part.at);
                staging[part.at + part.len..part.at + part.len.next_multiple_of(16)].fill(0);
            }
        }
        let mut bufs = Vec::with_capacity(layout.pieces.len());
        for _ in &layout.pieces {
            bufs.push(match free.pop() {
                Some(b) => b,
                None => self.create_buffer("ciphershard_window", piece_bytes)?,
            });
        }
        let pieces = layout
            .pieces
            .iter()
            .map(|p| {
                let chunks = if feed.twin {
                    Vec::new()
                } else {
                    p.parts
                        .iter()
                        .filter(|part| win.specs[part.chunk].encrypted && part.len > 0)
                        .map(|part| WindowChunk {
                            offset: (part.at - p.range.start) as u64,
                            len: part.len as u64,
                            nonce: win.specs[part.chunk].nonce,
                            key: win.keys[part.chunk].0,
                        })
                        .collect()
                };
                // An empty window still uploads one block (a binding is never empty).
                let end = p.range.end.max(p.range.start + 16);
                (p.range.start..end, chunks)
            })
            .collect();
        Ok(Staged {
            window: Window {
                epoch: win.epoch,
                w: win.w,
                pieces: bufs,
            },
            staging,
            pieces,
        })
    }

    /// Copies a verified window into the upload ring, piece by piece, and queues each piece's
    /// CTR pass; hands the staging buffer back to the reader.
    fn upload(
        &self,
        config: &WgpuConfig,
        feed: &WindowFeed<'_>,
        ring: &mut UploadRing,
        st: Staged,
        back: &Sender<Vec<u8>>,
    ) -> Result<Window<::wgpu::Buffer>> {
        let t = Instant::now();
        let r = st
            .pieces
            .iter()
            .zip(&st.window.pieces)
            .try_for_each(|((range, chunks), buf)| {
                self.upload_decrypt_ring(
                    ring,
                    config.upload_threads,
                    buf,
                    &st.staging[range.clone()],
                    chunks,
                )
                .map(|_| ())
            });
        let _ = back.send(st.staging);
        r?;
        let ns = ns_since(t);
        add(&feed.device.submit_ns, ns);
        add(&feed.counters.decrypt_ns, ns);
        add(
            &feed.counters.decrypt_bytes,
            st.pieces
                .iter()
                .flat_map(|(_, chunks)| chunks)
                .map(|c| c.len)
                .sum(),
        );
        add(&feed.device.windows, 1);
        add(&feed.device.window_pieces, st.pieces.len() as u64);
        Ok(st.window)
    }
}

/// The loader into wgpu device buffers (see [`GpuLoader`]).
pub type WgpuDeviceLoader = GpuLoader<WgpuBatchEngine>;
/// A batch in wgpu device buffers.
pub type WgpuBatch = GpuBatch<WgpuBatchEngine>;
/// One column of a [`WgpuBatch`].
pub type WgpuTensor<'a> = GpuTensor<'a, WgpuBatchEngine>;

impl GpuLoader<WgpuBatchEngine> {
    /// Opens the dataset at `path` with `key` (headers authenticated and tags checked on the
    /// CPU), uploads every shard's round keys to the adapter `wgpu` picks and starts the
    /// loader; `opts.threads` threads read and verify a window's chunks.
    pub fn open(
        path: &Path,
        key: &MasterKey,
        wgpu: WgpuOptions,
        opts: &LoaderOptions,
    ) -> Result<WgpuDeviceLoader> {
        Self::open_as(path, &OpenOptions::default(), key, wgpu, opts, false)
    }

    /// [`open`](Self::open) with object-store settings (`store`) over the environment's.
    pub fn open_with(
        path: &Path,
        store: &OpenOptions,
        key: &MasterKey,
        wgpu: WgpuOptions,
        opts: &LoaderOptions,
    ) -> Result<Self> {
        Self::open_as(path, store, key, wgpu, opts, false)
    }

    /// [`open`](Self::open), or with `twin` the benchmarks' plaintext twin (`crate::bench`).
    pub(crate) fn open_as(
        path: &Path,
        store: &OpenOptions,
        key: &MasterKey,
        wgpu: WgpuOptions,
        opts: &LoaderOptions,
        twin: bool,
    ) -> Result<WgpuDeviceLoader> {
        // Tags are checked by the reader on the CPU: the openers' placement does not matter.
        let cipher = WgpuCipher::new(wgpu)?;
        let unlocked = Dataset::open_with(path, store)?.unlock(key, &CpuCipher::new())?;
        let source = Arc::new(FormatSource::new(unlocked)?);
        let data_keys: Vec<_> = (0..source.shard_count())
            .map(|s| source.data_key(s))
            .collect();
        let engine = WgpuBatchEngine::new(&cipher, &data_keys)?;
        GpuLoader::start(source, Arc::new(engine), opts, twin)
    }

    /// Starts a loader over `source` (whose CPU openers check the tags) with `engine` holding
    /// every shard's key, in shard order.
    pub fn new(
        source: Arc<FormatSource>,
        engine: Arc<WgpuBatchEngine>,
        opts: &LoaderOptions,
    ) -> Result<WgpuDeviceLoader> {
        GpuLoader::start(source, engine, opts, false)
    }

    /// The device the batches live on.
    pub fn device(&self) -> &::wgpu::Device {
        self.engine().device()
    }

    /// The queue the loader submits on; use it for work on the batches.
    pub fn queue(&self) -> &::wgpu::Queue {
        self.engine().queue()
    }

    /// The adapter, for reports.
    pub fn adapter(&self) -> String {
        self.engine().adapter().to_string()
    }
}

impl GpuBatch<WgpuBatchEngine> {
    /// The device the buffers live on (queue work on [`queue`](Self::queue)).
    pub fn device(&self) -> &::wgpu::Device {
        self.engine.device()
    }
    /// The queue the loader writes on: work submitted here is ordered after the gathers.
    pub fn queue(&self) -> &::wgpu::Queue {
        self.engine.queue()
    }
}

impl<'a> GpuTensor<'a, WgpuBatchEngine> {
    /// The pooled device buffer (`STORAGE | COPY_SRC | COPY_DST`), valid while the batch lives.
    pub fn buffer(&self) -> &'a ::wgpu::Buffer {
        self.buf
    }
}
