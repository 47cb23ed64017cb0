//! The loader: planner → worker threads (read, verify, decrypt into batch buffers) → reorder
//! → consumer, over bounded crossbeam channels.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, bounded, select, unbounded};
use zeroize::Zeroize;

use super::pool::{AlignedBuf, BufPool, Element, PinHook, cast_slice};
use super::sampler::{Cursor, EpochPlan, RowRef, SamplerConfig};
use super::source::{ColumnInfo, RowSource};
use super::telemetry::{Counters, LoaderStats, add};
use crate::cipher::{ChunkParams, NONCE_LEN};
use crate::error::{Error, Result};

/// How chunk bytes become batch bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum DecryptMode {
    /// Verify the whole chunk's tag on the private ciphertext copy, then AES-CTR-decrypt only
    /// the rows each batch needs straight into the batch buffer (no plaintext intermediate).
    RowCtr,
    /// Open (verify + decrypt, one fused GCM pass) the whole private copy in place, then copy
    /// rows into the batch. Plaintext sits in a private pooled buffer (zeroized on release).
    #[default]
    ChunkOpen,
}

/// How to build a loader.
#[derive(Clone)]
pub struct LoaderOptions {
    /// Rows per batch.
    pub batch_size: usize,
    /// Seed of the shuffle.
    pub seed: u64,
    /// Shuffle blocks and rows (`false`: dataset order).
    pub shuffle: bool,
    /// Epochs to run (the iterator ends after epoch `epochs - 1`).
    pub epochs: u64,
    /// This process's rank.
    pub rank: u64,
    /// Number of processes.
    pub world_size: u64,
    /// See [`SamplerConfig::drop_last`].
    pub drop_last: bool,
    /// Batches in flight ahead of the consumer (bounds memory: about `prefetch × batch bytes`).
    pub prefetch: usize,
    /// Worker threads.
    pub threads: usize,
    /// Blocks per shuffle window: larger shuffles better and holds more chunks in memory.
    pub window_blocks: u64,
    /// Rows per block; `None`: the rows of one chunk of the widest column.
    pub block_rows: Option<u64>,
    /// Decryption strategy.
    pub mode: DecryptMode,
    /// Epoch to start at (resumption).
    pub start_epoch: u64,
    /// Batches of `start_epoch` already consumed (resumption).
    pub start_batch: u64,
    /// Called for every host buffer allocated/freed (page-locking hook for GPU transfers).
    pub pin_hook: Option<Arc<dyn PinHook>>,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        LoaderOptions {
            batch_size: 256,
            seed: 0,
            shuffle: true,
            epochs: 1,
            rank: 0,
            world_size: 1,
            drop_last: false,
            prefetch: 4,
            threads: 2,
            window_blocks: 8,
            block_rows: None,
            mode: DecryptMode::default(),
            start_epoch: 0,
            start_batch: 0,
            pin_hook: None,
        }
    }
}

impl std::fmt::Debug for LoaderOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoaderOptions")
            .field("batch_size", &self.batch_size)
            .field("seed", &self.seed)
            .field("shuffle", &self.shuffle)
            .field("epochs", &self.epochs)
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("drop_last", &self.drop_last)
            .field("prefetch", &self.prefetch)
            .field("threads", &self.threads)
            .field("window_blocks", &self.window_blocks)
            .field("block_rows", &self.block_rows)
            .field("mode", &self.mode)
            .field("start_epoch", &self.start_epoch)
            .field("start_batch", &self.start_batch)
            .finish_non_exhaustive()
    }
}

/// Where a loader stands: everything the order depends on plus the position. Serializable;
/// [`LoaderOptions::resume`] continues exactly after the last batch handed out.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoaderState {
    /// Shuffle seed.
    pub seed: u64,
    /// Current epoch.
    pub epoch: u64,
    /// Batches of `epoch` already handed out.
    pub batches_done_in_epoch: u64,
    /// Rank.
    pub rank: u64,
    /// World size.
    pub world_size: u64,
    /// Rows per batch.
    pub batch_size: u64,
    /// Shuffle on.
    pub shuffle: bool,
    /// drop_last.
    pub drop_last: bool,
    /// Blocks per window.
    pub window_blocks: u64,
    /// Rows per block.
    pub block_rows: u64,
    /// Rows in the dataset (checked on resume).
    pub total_rows: u64,
}

impl LoaderState {
    /// The position a loader built with `opts` starts at.
    pub(crate) fn start(opts: &LoaderOptions, block_rows: u64, total_rows: u64) -> Self {
        LoaderState {
            seed: opts.seed,
            epoch: opts.start_epoch,
            batches_done_in_epoch: opts.start_batch,
            rank: opts.rank,
            world_size: opts.world_size,
            batch_size: opts.batch_size as u64,
            shuffle: opts.shuffle,
            drop_last: opts.drop_last,
            window_blocks: opts.window_blocks,
            block_rows,
            total_rows,
        }
    }

    /// A position at the end of an epoch is the start of the next one.
    pub(crate) fn normalize(&mut self, batches_per_epoch: u64) {
        if batches_per_epoch > 0 && self.batches_done_in_epoch >= batches_per_epoch {
            self.epoch += 1;
            self.batches_done_in_epoch = 0;
        }
    }
}

impl LoaderOptions {
    /// Options that continue from `state` (keeping this value's threads, prefetch, mode,
    /// epochs and hook; the order-defining fields come from the state).
    pub fn resume(mut self, state: &LoaderState) -> Self {
        self.seed = state.seed;
        self.start_epoch = state.epoch;
        self.start_batch = state.batches_done_in_epoch;
        self.rank = state.rank;
        self.world_size = state.world_size;
        self.batch_size = state.batch_size as usize;
        self.shuffle = state.shuffle;
        self.drop_last = state.drop_last;
        self.window_blocks = state.window_blocks;
        self.block_rows = Some(state.block_rows);
        self
    }
}

/// One column of a batch: shape `[B, ...]`, the dataset's dtype, in a page-aligned buffer.
#[derive(Debug, Clone, Copy)]
pub struct Tensor<'a> {
    /// Column name.
    pub name: &'a str,
    /// safetensors dtype name.
    pub dtype: &'a str,
    rows: usize,
    row_shape: &'a [u64],
    /// The bytes, `B × row bytes`, little-endian.
    pub bytes: &'a [u8],
}

impl<'a> Tensor<'a> {
    /// Shape `[B, ...row shape]`.
    pub fn shape(&self) -> Vec<u64> {
        std::iter::once(self.rows as u64)
            .chain(self.row_shape.iter().copied())
            .collect()
    }
    /// Typed view; `None` if `T` does not match the dtype.
    pub fn as_slice<T: Element>(&self) -> Option<&'a [T]> {
        cast_slice(self.bytes, self.dtype)
    }
    /// Pointer to the first byte (page-aligned), valid while the batch lives.
    pub fn as_ptr(&self) -> *const u8 {
        self.bytes.as_ptr()
    }
}

/// A batch of decrypted, verified rows. Dropping it returns its buffers to the loader's pool.
pub struct Batch {
    epoch: u64,
    index: u64,
    row_ids: Vec<u64>,
    columns: Arc<[ColumnInfo]>,
    bufs: Vec<AlignedBuf>,
    pool: Arc<SetPool>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("epoch", &self.epoch)
            .field("index", &self.index)
            .field("rows", &self.len())
            .finish()
    }
}

impl Batch {
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
    /// The column tensors, in the dataset's column order.
    pub fn tensors(&self) -> impl Iterator<Item = Tensor<'_>> {
        self.columns.iter().zip(&self.bufs).map(|(c, b)| Tensor {
            name: &c.name,
            dtype: &c.dtype,
            rows: self.row_ids.len(),
            row_shape: &c.row_shape,
            bytes: &b[..self.row_ids.len() * c.row_bytes as usize],
        })
    }
    /// The column named `name`.
    pub fn tensor(&self, name: &str) -> Option<Tensor<'_>> {
        self.tensors().find(|t| t.name == name)
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.bufs));
    }
}

/// Pool of batch buffer sets (one buffer per column, sized for a full batch).
struct SetPool {
    sizes: Vec<usize>,
    cap: usize,
    free: Mutex<Vec<Vec<AlignedBuf>>>,
    pin: Option<Arc<dyn PinHook>>,
    counter: Arc<std::sync::atomic::AtomicU64>,
    allocations: std::sync::atomic::AtomicU64,
}

impl SetPool {
    fn alloc(&self) -> Vec<AlignedBuf> {
        self.sizes
            .iter()
            .map(|&n| AlignedBuf::new(n, self.pin.clone(), Some(self.counter.clone())))
            .collect()
    }
    fn get(&self) -> Vec<AlignedBuf> {
        if let Some(s) = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return s;
        }
        // Only when the consumer keeps batches alive beyond the prefetch depth.
        self.allocations.fetch_add(1, Relaxed);
        self.alloc()
    }
    fn put(&self, s: Vec<AlignedBuf>) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < self.cap && s.len() == self.sizes.len() {
            free.push(s);
        }
    }
}

type Key = (u32, u32, u64); // shard, column, chunk j

/// A chunk read into a private buffer and verified (or opened).
struct Loaded {
    buf: Option<AlignedBuf>,
    len: usize,
    nonce: [u8; NONCE_LEN],
    /// The buffer holds ciphertext still to be CTR-decrypted.
    ciphertext: bool,
    plaintext_held: bool,
    pool: Arc<BufPool>,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        if let Some(mut b) = self.buf.take() {
            if self.plaintext_held {
                b[..self.len].zeroize();
            }
            self.pool.put(b);
        }
    }
}

#[derive(Default)]
struct Slot {
    cell: OnceLock<Result<Loaded, Error>>,
}

/// Verified chunks shared by the batches that need them, refcounted by the planner.
#[derive(Default)]
struct ChunkCache {
    map: Mutex<HashMap<Key, (Arc<Slot>, usize)>>,
}

impl ChunkCache {
    fn acquire(&self, keys: &[Key]) -> Vec<Arc<Slot>> {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        keys.iter()
            .map(|k| {
                let e = m.entry(*k).or_default();
                e.1 += 1;
                e.0.clone()
            })
            .collect()
    }
    fn release(&self, keys: &[Key]) {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        for k in keys {
            if let Some(e) = m.get_mut(k) {
                e.1 -= 1;
                if e.1 == 0 {
                    m.remove(k);
                }
            }
        }
    }
}

/// A copy of an error for a second batch that hit the same failed chunk.
fn clone_error(e: &Error) -> Error {
    match e {
        Error::Integrity(loc) => Error::Integrity(loc.clone()),
        Error::Io { path, source } => Error::io(
            path.clone(),
            std::io::Error::new(source.kind(), source.to_string()),
        ),
        Error::Format { path, what, reason } => Error::format(path.clone(), what, reason.clone()),
        other => Error::Stopped(other.to_string()),
    }
}

struct Job {
    seq: u64,
    epoch: u64,
    index: u64,
    rows: Vec<RowRef>,
    keys: Vec<Key>,
    slots: Vec<Arc<Slot>>,
}

struct Shared {
    source: Arc<dyn RowSource>,
    columns: Arc<[ColumnInfo]>,
    chunk_size: u64,
    mode: DecryptMode,
    cache: ChunkCache,
    chunk_pool: Arc<BufPool>,
    set_pool: Arc<SetPool>,
    counters: Arc<Counters>,
}

/// Chunk keys covering rows `[r0, r0 + n)` of shard `s`, every column.
fn keys_for_rows(sh: &Shared, s: u32, r0: u64, n: u64, out: &mut Vec<Key>) {
    for (c, col) in sh.columns.iter().enumerate() {
        let (a, b) = (r0 * col.row_bytes, (r0 + n) * col.row_bytes);
        if b > a {
            for j in a / sh.chunk_size..=(b - 1) / sh.chunk_size {
                out.push((s, c as u32, j));
            }
        }
    }
}

impl Shared {
    fn load(&self, k: Key) -> Result<Loaded> {
        let (s, c, j) = (k.0 as usize, k.1 as usize, k.2);
        let spec = self.source.chunk(s, c, j);
        let mut buf = self.chunk_pool.get();
        let t0 = Instant::now();
        let store = self.source.store();
        if spec.len > buf.len() {
            self.chunk_pool.put(buf);
            return Err(Error::format(
                store.name(s),
                "shard",
                format!("chunk {j} of column {c} is longer than the chunk size"),
            ));
        }
        if let Err(e) = store.read_at(s, spec.file_offset, &mut buf[..spec.len]) {
            self.chunk_pool.put(buf);
            return Err(e);
        }
        let t1 = Instant::now();
        add(&self.counters.read_ns, (t1 - t0).as_nanos() as u64);
        add(&self.counters.read_bytes, spec.len as u64);
        add(&self.counters.chunks_loaded, 1);
        let params = ChunkParams {
            nonce: spec.nonce,
            aad: &spec.aad,
            tag: spec.tag,
            encrypted: spec.encrypted,
        };
        let opener = self.source.opener(s);
        let mut loaded = Loaded {
            buf: None,
            len: spec.len,
            nonce: spec.nonce,
            ciphertext: false,
            plaintext_held: false,
            pool: self.chunk_pool.clone(),
        };
        let ok = match (self.mode, spec.encrypted) {
            (DecryptMode::ChunkOpen, true) => {
                let r = opener.open_in_place(&params, &mut buf[..spec.len]);
                add(&self.counters.decrypt_ns, t1.elapsed().as_nanos() as u64);
                add(&self.counters.decrypt_bytes, spec.len as u64);
                loaded.plaintext_held = true;
                r
            }
            (DecryptMode::RowCtr, true) | (_, false) => {
                let r = opener.verify(&params, &buf[..spec.len]);
                add(&self.counters.verify_ns, t1.elapsed().as_nanos() as u64);
                add(&self.counters.verify_bytes, spec.len as u64);
                loaded.ciphertext = spec.encrypted;
                r
            }
        };
        loaded.buf = Some(buf);
        ok.map_err(|e| e.at(|| self.source.location(s, c, j)))?;
        Ok(loaded)
    }

    fn run(&self, job: &Job) -> Result<Batch> {
        // Stage 1: every chunk the batch touches is read and verified (once, shared). Consecutive
        // batches of a window need the same chunks; each job starts at a different one, so the
        // workers load a new window's chunks in parallel instead of queueing behind one loader.
        let n = job.keys.len();
        let first = if n == 0 {
            0
        } else {
            (job.seq as usize).wrapping_mul(7) % n
        };
        for i in (first..n).chain(0..first) {
            if let Err(e) = job.slots[i].cell.get_or_init(|| self.load(job.keys[i])) {
                return Err(clone_error(e));
            }
        }
        // Stage 2: rows into the batch buffers, coalescing runs of consecutive source rows.
        let mut bufs = self.set_pool.get();
        let mut runs: Vec<(RowRef, usize, u64)> = Vec::new(); // (first row, batch pos, count)
        for (i, r) in job.rows.iter().enumerate() {
            match runs.last_mut() {
                Some((f, p, n))
                    if f.shard == r.shard && f.row + *n == r.row && *p + *n as usize == i =>
                {
                    *n += 1
                }
                _ => runs.push((*r, i, 1)),
            }
        }
        for (c, col) in self.columns.iter().enumerate() {
            let rb = col.row_bytes;
            // One clock read per column and batch: per-row timing costs more than a row copy.
            let (mut dec_b, mut asm_b) = (0u64, 0u64);
            let t = Instant::now();
            let dst_all = &mut bufs[c];
            for &(first, pos, n) in &runs {
                let opener = self.source.opener(first.shard as usize);
                let mut off = first.row * rb;
                let end = off + n * rb;
                let mut d = pos * rb as usize;
                while off < end {
                    let j = off / self.chunk_size;
                    let in_chunk = off % self.chunk_size;
                    let len = (self.chunk_size - in_chunk).min(end - off) as usize;
                    let key = (first.shard, c as u32, j);
                    let idx = job.keys.binary_search(&key).map_err(|_| {
                        Error::Stopped(format!("internal: chunk {key:?} not planned"))
                    })?;
                    let Some(Ok(l)) = job.slots[idx].cell.get() else {
                        return Err(Error::Stopped("internal: chunk not loaded".into()));
                    };
                    let src = &l.buf.as_ref().expect("loaded buffer")
                        [in_chunk as usize..in_chunk as usize + len];
                    let dst = &mut dst_all[d..d + len];
                    if l.ciphertext {
                        opener.ctr_apply(&l.nonce, in_chunk, src, dst)?;
                        dec_b += len as u64;
                    } else {
                        dst.copy_from_slice(src);
                        asm_b += len as u64;
                    }
                    off += len as u64;
                    d += len;
                }
            }
            // A column's chunks are all encrypted or all plain: the time is one stage's.
            let ns = t.elapsed().as_nanos() as u64;
            let stage = if dec_b > 0 {
                &self.counters.decrypt_ns
            } else {
                &self.counters.assemble_ns
            };
            add(stage, ns);
            add(&self.counters.decrypt_bytes, dec_b);
            add(&self.counters.assemble_bytes, asm_b);
        }
        let row_ids = job
            .rows
            .iter()
            .map(|r| self.source.shard_row_start(r.shard as usize) + r.row)
            .collect();
        Ok(Batch {
            epoch: job.epoch,
            index: job.index,
            row_ids,
            columns: self.columns.clone(),
            bufs,
            pool: self.set_pool.clone(),
        })
    }
}

/// The data loader: an iterator of `Result<Batch>`.
///
/// Failure semantics: the first error (I/O, integrity, internal) is yielded once as `Err`, then
/// the loader stops its threads and the iterator ends; [`Loader::state`] still points at the
/// failed batch, so a new loader resumed from it retries exactly there.
pub struct Loader {
    rx: Receiver<(u64, Result<Batch>)>,
    credits: Sender<()>,
    stop: Option<Sender<()>>,
    threads: Vec<JoinHandle<()>>,
    reorder: BTreeMap<u64, Result<Batch>>,
    next_seq: u64,
    total: u64,
    done: bool,
    state: LoaderState,
    batches_per_epoch: u64,
    epochs: u64,
    counters: Arc<Counters>,
    built: Instant,
    columns: Arc<[ColumnInfo]>,
    set_pool: Arc<SetPool>,
    chunk_pool: Arc<BufPool>,
}

/// Bytes of the longest chunk of a column of `row_bytes`-byte rows: `chunk_size`, or its
/// longest tensor when that is shorter (at least 1).
pub(crate) fn longest_chunk(row_bytes: u64, shard_rows: &[u64], chunk_size: u64) -> u64 {
    shard_rows
        .iter()
        .map(|&r| r.saturating_mul(row_bytes))
        .max()
        .unwrap_or(0)
        .clamp(1, chunk_size.max(1))
}

/// Most batches a loader may hold in flight (`prefetch`).
pub const MAX_PREFETCH: usize = 4096;
/// Most worker threads a loader may start.
pub const MAX_THREADS: usize = 1024;

/// What the host and the device loaders both derive from a source and options before they start:
/// the plan's configuration and size, and every shard opened once and checked against the length
/// its authenticated header gives.
pub(crate) struct PlanSetup {
    pub(crate) columns: Arc<[ColumnInfo]>,
    pub(crate) chunk_size: u64,
    pub(crate) block_rows: u64,
    pub(crate) shard_rows: Vec<u64>,
    pub(crate) total_rows: u64,
    pub(crate) cfg: SamplerConfig,
    pub(crate) batches_per_epoch: u64,
    /// Batches left to deliver from the start position.
    pub(crate) total: u64,
    /// Most rows one batch can hold: `batch_size`, but never more than the dataset has (so an
    /// absurd batch size sizes no buffer beyond the data).
    pub(crate) batch_rows: usize,
}

impl PlanSetup {
    pub(crate) fn new(source: &dyn RowSource, opts: &LoaderOptions) -> Result<Self> {
        if opts.batch_size == 0
            || opts.threads == 0
            || opts.prefetch == 0
            || opts.window_blocks == 0
        {
            return Err(Error::InvalidArgument(
                "batch_size, threads, prefetch and window_blocks must be at least 1".into(),
            ));
        }
        // Channels and buffer sets are sized by these up front: refuse absurd values rather
        // than abort on an allocation.
        if opts.prefetch > MAX_PREFETCH || opts.threads > MAX_THREADS {
            return Err(Error::InvalidArgument(format!(
                "prefetch {} / threads {}: at most {MAX_PREFETCH} batches in flight and \
                 {MAX_THREADS} threads",
                opts.prefetch, opts.threads
            )));
        }
        if opts.world_size == 0 || opts.rank >= opts.world_size {
            return Err(Error::InvalidArgument(format!(
                "rank {} is not below world_size {}",
                opts.rank, opts.world_size
            )));
        }
        let columns: Arc<[ColumnInfo]> = source.columns().to_vec().into();
        let chunk_size = source.chunk_size();
        if chunk_size == 0 {
            return Err(Error::InvalidArgument("chunk_size is 0".into()));
        }
        let widest = columns
            .iter()
            .map(|c| c.row_bytes)
            .max()
            .unwrap_or(1)
            .max(1);
        let block_rows = opts
            .block_rows
            .unwrap_or((chunk_size / widest).max(1))
            .max(1);
        let shard_rows: Vec<u64> = (0..source.shard_count())
            .map(|s| source.shard_rows(s))
            .collect();
        let total_rows: u64 = shard_rows.iter().sum();
        let cfg = SamplerConfig {
            seed: opts.seed,
            shuffle: opts.shuffle,
            block_rows,
            window_blocks: opts.window_blocks,
            rank: opts.rank,
            world_size: opts.world_size,
            batch_size: opts.batch_size as u64,
            drop_last: opts.drop_last,
        };
        let batches_per_epoch = EpochPlan::new(&cfg, 0, &shard_rows).batches();
        if opts.start_batch > batches_per_epoch {
            return Err(Error::InvalidArgument(format!(
                "resume position {} is past the epoch's {batches_per_epoch} batches (different dataset?)",
                opts.start_batch
            )));
        }
        let total = if opts.start_epoch >= opts.epochs {
            0
        } else {
            (opts.epochs - opts.start_epoch) * batches_per_epoch - opts.start_batch
        };
        // Every shard still as it was when its store pinned it (length from its header).
        let store = source.store();
        if store.shard_count() != source.shard_count() {
            return Err(Error::InvalidArgument(format!(
                "the source has {} shards, its store {}",
                source.shard_count(),
                store.shard_count()
            )));
        }
        for s in 0..source.shard_count() {
            store.check_unchanged(s)?;
        }
        Ok(PlanSetup {
            columns,
            chunk_size,
            block_rows,
            shard_rows,
            total_rows,
            cfg,
            batches_per_epoch,
            total,
            batch_rows: opts
                .batch_size
                .min(usize::try_from(total_rows.max(1)).unwrap_or(usize::MAX)),
        })
    }
}

impl Loader {
    /// Builds a loader over `source` and starts its threads.
    pub fn new(source: Arc<dyn RowSource>, opts: &LoaderOptions) -> Result<Self> {
        let built = Instant::now();
        let PlanSetup {
            columns,
            chunk_size,
            block_rows,
            shard_rows,
            total_rows,
            cfg,
            batches_per_epoch,
            total,
            batch_rows,
        } = PlanSetup::new(source.as_ref(), opts)?;
        let counters = Arc::new(Counters::default());
        let in_flight = opts.prefetch + opts.threads;
        let sizes = columns
            .iter()
            .map(|c| {
                usize::try_from(c.row_bytes)
                    .ok()
                    .and_then(|b| b.checked_mul(batch_rows))
                    .filter(|&n| n < isize::MAX as usize)
                    .ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "a batch of {batch_rows} rows of column {} does not fit in memory",
                            c.name
                        ))
                    })
            })
            .collect::<Result<Vec<usize>>>()?;
        let set_pool = Arc::new(SetPool {
            sizes,
            cap: in_flight + 2,
            free: Mutex::new(Vec::new()),
            pin: opts.pin_hook.clone(),
            counter: counters.pool_bytes.clone(),
            allocations: Default::default(),
        });
        {
            let mut free = set_pool.free.lock().unwrap_or_else(|e| e.into_inner());
            // In flight, plus the one the consumer holds.
            for _ in 0..in_flight + 1 {
                free.push(set_pool.alloc());
            }
        }
        // Chunks held at once: the pinned window plus the windows the in-flight batches still
        // reach into. Per window and column: W blocks of `block_rows` rows each span
        // ceil(bytes / chunk) chunks (+1 when blocks do not start on chunk boundaries), but
        // never more than the column has in all shards (narrow columns share chunks). The pool
        // is allocated (and touched) once at that bound, so steady state allocates nothing
        // (tests/loader_soak.rs checks it); it only grows if the bound is ever exceeded.
        let window_chunks: u64 = columns
            .iter()
            .map(|c| {
                let block_bytes = block_rows * c.row_bytes;
                // Blocks start on chunk boundaries, or nest inside chunks.
                let aligned = block_bytes.is_multiple_of(chunk_size)
                    || (block_bytes > 0 && chunk_size.is_multiple_of(block_bytes));
                let per_block = block_bytes.div_ceil(chunk_size) + u64::from(!aligned);
                let total: u64 = shard_rows
                    .iter()
                    .map(|&r| (r * c.row_bytes).div_ceil(chunk_size).max(1))
                    .sum();
                opts.window_blocks.saturating_mul(per_block).min(total)
            })
            .fold(0, u64::saturating_add);
        let window_rows = opts.window_blocks.saturating_mul(block_rows).max(1);
        let windows_in_flight = (in_flight.saturating_mul(batch_rows) as u64)
            .div_ceil(window_rows)
            .saturating_add(1);
        let bound =
            usize::try_from(window_chunks.saturating_mul(windows_in_flight)).unwrap_or(usize::MAX);
        // Buffers as long as the longest chunk there is, not `chunk_size`: a small dataset
        // written with 256 MiB chunks must not allocate 256 MiB per buffer.
        let longest_chunk = columns
            .iter()
            .map(|c| longest_chunk(c.row_bytes, &shard_rows, chunk_size))
            .max()
            .unwrap_or(1);
        let chunk_pool = Arc::new(BufPool::new(
            longest_chunk as usize,
            bound.min(4096),
            bound.saturating_add(opts.threads * columns.len()),
            opts.pin_hook.clone(),
            counters.pool_bytes.clone(),
        ));
        let shared = Arc::new(Shared {
            source,
            columns: columns.clone(),
            chunk_size,
            mode: opts.mode,
            cache: ChunkCache::default(),
            chunk_pool: chunk_pool.clone(),
            set_pool: set_pool.clone(),
            counters: counters.clone(),
        });
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let (credit_tx, credit_rx) = bounded::<()>(in_flight);
        for _ in 0..in_flight {
            let _ = credit_tx.try_send(());
        }
        let (job_tx, job_rx) = bounded::<Job>(opts.threads);
        let (res_tx, res_rx) = unbounded::<(u64, Result<Batch>)>();
        let mut threads = Vec::new();
        for i in 0..opts.threads {
            let (sh, jobs, res, stop) = (
                shared.clone(),
                job_rx.clone(),
                res_tx.clone(),
                stop_rx.clone(),
            );
            let h = std::thread::Builder::new()
                .name(format!("cs-worker-{i}"))
                .spawn(move || worker(&sh, &jobs, &res, &stop))
                .map_err(|e| Error::Stopped(format!("cannot spawn worker thread: {e}")))?;
            threads.push(h);
        }
        drop(res_tx);
        {
            let (sh, cfg) = (shared.clone(), cfg.clone());
            let (epochs, se, sb) = (opts.epochs, opts.start_epoch, opts.start_batch);
            let h = std::thread::Builder::new()
                .name("cs-planner".into())
                .spawn(move || {
                    planner(
                        &sh,
                        &cfg,
                        &shard_rows,
                        se,
                        sb,
                        epochs,
                        &credit_rx,
                        &job_tx,
                        &stop_rx,
                    )
                })
                .map_err(|e| Error::Stopped(format!("cannot spawn planner thread: {e}")))?;
            threads.push(h);
        }
        let state = LoaderState::start(opts, block_rows, total_rows);
        let mut l = Loader {
            rx: res_rx,
            credits: credit_tx,
            stop: Some(stop_tx),
            threads,
            reorder: BTreeMap::new(),
            next_seq: 0,
            total,
            done: false,
            state,
            batches_per_epoch,
            epochs: opts.epochs,
            counters,
            built,
            columns,
            set_pool,
            chunk_pool,
        };
        l.state.normalize(l.batches_per_epoch);
        Ok(l)
    }

    /// Builds a loader that continues from `state` (checked against the dataset's row count).
    pub fn resume(
        source: Arc<dyn RowSource>,
        opts: &LoaderOptions,
        state: &LoaderState,
    ) -> Result<Self> {
        if source.total_rows() != state.total_rows {
            return Err(Error::InvalidArgument(format!(
                "loader state is for a dataset of {} rows, this one has {}",
                state.total_rows,
                source.total_rows()
            )));
        }
        Loader::new(source, &opts.clone().resume(state))
    }

    /// The position after the last batch handed out.
    pub fn state(&self) -> LoaderState {
        self.state.clone()
    }

    /// Telemetry so far.
    pub fn stats(&self) -> LoaderStats {
        let mut s = self.counters.snapshot();
        let _ = (&self.chunk_pool, &self.set_pool);
        s.pool_bytes = self.counters.pool_bytes.load(Relaxed);
        s
    }

    /// Buffers allocated after construction (0 in steady state when batches are dropped).
    pub fn extra_allocations(&self) -> u64 {
        self.set_pool.allocations.load(Relaxed) + self.chunk_pool.allocations.load(Relaxed)
    }

    /// The dataset's columns.
    pub fn columns(&self) -> &[ColumnInfo] {
        &self.columns
    }

    /// Batches per epoch for this rank.
    pub fn batches_per_epoch(&self) -> u64 {
        self.batches_per_epoch
    }

    /// Batches left to yield.
    pub fn remaining(&self) -> u64 {
        if self.done {
            0
        } else {
            self.total - self.next_seq
        }
    }

    fn shutdown(&mut self) {
        self.done = true;
        self.stop.take(); // disconnects the stop channel: every blocked select wakes up
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }

    /// Epochs this loader was built to run to.
    pub fn epochs(&self) -> u64 {
        self.epochs
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.done {
            return None;
        }
        if self.next_seq >= self.total {
            self.shutdown();
            return None;
        }
        let t = Instant::now();
        let item = loop {
            if let Some(r) = self.reorder.remove(&self.next_seq) {
                break r;
            }
            match self.rx.recv() {
                Ok((seq, r)) => {
                    self.reorder.insert(seq, r);
                }
                Err(_) => {
                    break Err(Error::Stopped(
                        "the loader's threads exited before the epoch ended".into(),
                    ));
                }
            }
        };
        add(
            &self.counters.consumer_wait_ns,
            t.elapsed().as_nanos() as u64,
        );
        match item {
            Ok(b) => {
                self.next_seq += 1;
                let _ = self.credits.try_send(());
                let bytes: u64 = b.tensors().map(|t| t.bytes.len() as u64).sum();
                add(&self.counters.delivered_bytes, bytes);
                if self.counters.batches.fetch_add(1, Relaxed) == 0 {
                    self.counters
                        .first_batch_ns
                        .store(self.built.elapsed().as_nanos() as u64, Relaxed);
                }
                self.state.epoch = b.epoch;
                self.state.batches_done_in_epoch = b.index + 1;
                self.state.normalize(self.batches_per_epoch);
                Some(Ok(b))
            }
            Err(e) => {
                self.shutdown();
                Some(Err(e))
            }
        }
    }
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("state", &self.state)
            .field("remaining", &self.remaining())
            .finish_non_exhaustive()
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The loader was dropped (the stop channel is disconnected).
fn stopped(stop: &Receiver<()>) -> bool {
    matches!(
        stop.try_recv(),
        Err(crossbeam_channel::TryRecvError::Disconnected)
    )
}

fn worker(
    sh: &Shared,
    jobs: &Receiver<Job>,
    res: &Sender<(u64, Result<Batch>)>,
    stop: &Receiver<()>,
) {
    loop {
        if stopped(stop) {
            return;
        }
        let job = select! {
            recv(jobs) -> j => match j { Ok(j) => j, Err(_) => return },
            recv(stop) -> _ => return,
        };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sh.run(&job)))
            .unwrap_or_else(|_| Err(Error::Stopped("a loader worker panicked".into())));
        sh.cache.release(&job.keys);
        if res.send((job.seq, r)).is_err() {
            return;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn planner(
    sh: &Shared,
    cfg: &SamplerConfig,
    shard_rows: &[u64],
    start_epoch: u64,
    start_batch: u64,
    epochs: u64,
    credits: &Receiver<()>,
    jobs: &Sender<Job>,
    stop: &Receiver<()>,
) {
    let mut seq = 0u64;
    let mut pinned: Option<(usize, Vec<Key>)> = None;
    for epoch in start_epoch..epochs {
        let plan = EpochPlan::new(cfg, epoch, shard_rows);
        let mut cur = Cursor::new(&plan);
        let first = if epoch == start_epoch { start_batch } else { 0 };
        for k in first..plan.batches() {
            // `select!` picks at random among ready operations: check the stop signal first so
            // a dropped loader never dispatches more work.
            if stopped(stop) {
                return;
            }
            select! {
                recv(credits) -> c => if c.is_err() { return },
                recv(stop) -> _ => return,
            }
            let (a, b) = plan.batch_positions(k);
            let mut rows = Vec::with_capacity((b - a) as usize);
            let mut keys = Vec::new();
            let mut old_pin = None;
            for p in a..b {
                let (row, w) = cur.row_at(p);
                if pinned.as_ref().is_none_or(|(pw, _)| *pw != w) {
                    // Hold the whole window's chunks while the planner is inside it, so each is
                    // read and verified once per window however batches interleave.
                    let mut wk = Vec::new();
                    for &(s, r0, n) in plan.window_blocks(w) {
                        keys_for_rows(sh, s, r0, n, &mut wk);
                    }
                    wk.sort_unstable();
                    wk.dedup();
                    let _ = sh.cache.acquire(&wk);
                    if let Some(old) = pinned.replace((w, wk)) {
                        old_pin.get_or_insert_with(Vec::new).push(old.1);
                    }
                }
                keys_for_rows(sh, row.shard, row.row, 1, &mut keys);
                rows.push(row);
            }
            keys.sort_unstable();
            keys.dedup();
            let slots = sh.cache.acquire(&keys);
            let job = Job {
                seq,
                epoch,
                index: k,
                rows,
                keys,
                slots,
            };
            select! {
                send(jobs, job) -> r => if r.is_err() { return },
                recv(stop) -> _ => return,
            }
            seq += 1;
            for old in old_pin.into_iter().flatten() {
                sh.cache.release(&old);
            }
        }
        if let Some((_, old)) = pinned.take() {
            sh.cache.release(&old);
        }
    }
}

// Hooks for consumers that hand batches to other runtimes (the Python binding): a writable
// view for zero-copy export, and a bounded wait so the caller can stay responsive (Ctrl-C).

impl Batch {
    /// Writable base pointer and byte length (`len() ×` row bytes) of each column's buffer, in
    /// column order. The memory stays valid and in place until the batch is dropped (then it
    /// returns to the pool), so a zero-copy consumer (a DLPack tensor) that keeps the batch
    /// alive may read and write through these pointers.
    pub fn column_ptrs_mut(&mut self) -> Vec<(*mut u8, usize)> {
        let rows = self.row_ids.len();
        self.columns
            .iter()
            .zip(self.bufs.iter_mut())
            .map(|(c, b)| {
                let n = rows * c.row_bytes as usize;
                (b[..n].as_mut_ptr(), n)
            })
            .collect()
    }
}

impl Loader {
    /// Waits at most `timeout` for the next item. Returns `true` when [`Iterator::next`] will
    /// not block (a batch or an error is ready, or the iteration is over), `false` on timeout.
    /// The time waited counts as consumer wait in [`Loader::stats`].
    pub fn wait_next(&mut self, timeout: std::time::Duration) -> bool {
        if self.done || self.next_seq >= self.total || self.reorder.contains_key(&self.next_seq) {
            return true;
        }
        let t = Instant::now();
        let deadline = t + timeout;
        let ready = loop {
            match self.rx.recv_deadline(deadline) {
                Ok((seq, r)) => {
                    self.reorder.insert(seq, r);
                    if self.reorder.contains_key(&self.next_seq) {
                        break true;
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => break false,
                // `next` reports the disconnection as an error without blocking.
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break true,
            }
        };
        add(
            &self.counters.consumer_wait_ns,
            t.elapsed().as_nanos() as u64,
        );
        ready
    }
}
