//! The host loader: planner → worker threads (read, verify, decrypt into batch buffers) →
//! reorder → consumer, over bounded crossbeam channels.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};

use crate::error::{Error, Result};
use crate::pipeline::budget::BudgetPlan;
use crate::pipeline::options::{LoaderOptions, LoaderState, PlanSetup};
use crate::pipeline::pool::BufPool;
use crate::pipeline::source::{ColumnInfo, RowSource};
use crate::pipeline::telemetry::{Counters, LoaderStats, add};

mod batch;
mod chunks;
mod pack;
mod readahead;

use batch::SetPool;
pub use batch::{Batch, Padded, Tensor};
use chunks::{ChunkCache, Job, Shared, planner, worker};

/// The data loader: an iterator of `Result<Batch>`.
///
/// Failure semantics: the first error (I/O, integrity, internal) is yielded once as `Err`, then
/// the loader stops its threads and the iterator ends; [`Loader::state`] still points at the
/// failed batch, so a new loader resumed from it retries exactly there.
pub struct Loader {
    rx: Receiver<(u64, Result<Batch>)>,
    credits: Sender<()>,
    stop: Option<Sender<()>>,
    /// Cancels the workers' and I/O threads' store reads when the loader shuts down (a network
    /// read in flight would otherwise hold up the join until it ends or times out).
    cancel: crate::store::CancelToken,
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
    /// Token-budget batching: each epoch's count is found when the loader reaches it.
    budget: Option<(Arc<BudgetPlan>, Arc<dyn RowSource>)>,
    /// Epochs whose batches `total` includes: `start_epoch..counted_through`.
    counted_through: u64,
    /// How far it reads ahead (as asked, else the store's default).
    read_depth: crate::store::ReadDepth,
}

/// Bytes of column `c`'s tensor in shard `s` (of `rows` rows).
fn tensor_len(source: &dyn RowSource, col: &ColumnInfo, c: usize, s: usize, rows: u64) -> u64 {
    if col.ragged {
        let o = source.row_offsets(s, c);
        o.last().copied().unwrap_or(0).saturating_mul(col.row_bytes)
    } else {
        rows.saturating_mul(col.row_bytes)
    }
}

/// The most elements any `k` rows of ragged column `c` hold: the sum of its `k` longest rows
/// (a min-heap of `k` lengths over every row, once per loader).
fn most_elements(source: &dyn RowSource, c: usize, k: usize) -> u64 {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let mut heap: BinaryHeap<Reverse<u64>> = BinaryHeap::with_capacity(k + 1);
    for s in 0..source.shard_count() {
        for w in source.row_offsets(s, c).windows(2) {
            let len = w[1] - w[0];
            if heap.len() < k {
                heap.push(Reverse(len));
            } else if heap.peek().is_some_and(|Reverse(min)| *min < len) {
                heap.pop();
                heap.push(Reverse(len));
            }
        }
    }
    heap.into_iter()
        .map(|Reverse(l)| l)
        .fold(0, u64::saturating_add)
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
            mean_row_bytes,
            pack,
            budget,
        } = PlanSetup::new(source.as_ref(), opts)?;
        // What batches hold: every column's rows, or packed sequences of one column.
        let (out_columns, read_columns): (Arc<[ColumnInfo]>, Vec<usize>) = match &pack {
            Some(p) => (
                pack::packed_columns(&columns[p.column], p.seq_len),
                vec![p.column],
            ),
            None => (columns.clone(), (0..columns.len()).collect()),
        };
        let counters = Arc::new(Counters::default());
        let in_flight = opts.prefetch + opts.threads;
        // Reading ahead: as deep as asked, else as the store wants (a far store, deeper).
        let depth = source.store().read_depth();
        let readahead_windows = opts.readahead_windows.unwrap_or(depth.windows);
        let io_threads = opts.io_threads.unwrap_or(depth.io_threads);
        // One buffer per column: a full batch of rows, or for a ragged column the most
        // elements any batch can hold; then each ragged column's B + 1 row offsets.
        // A packed batch: its three tensors, sized by `packed_counts`.
        let offsets_sizes = out_columns
            .iter()
            .filter(|c| c.ragged)
            .map(|_| batch_rows.checked_add(1).and_then(|n| n.checked_mul(8)));
        // A ragged column's buffer holds the most elements any batch can: those of its
        // `batch_rows` longest rows, or a token budget (when smaller).
        let units: Vec<u64> = match &pack {
            Some(p) => pack::packed_counts(p).to_vec(),
            None => (0..columns.len())
                .map(|c| match (columns[c].ragged, &budget) {
                    (false, _) => batch_rows as u64,
                    (true, Some(b)) if b.column == c => {
                        b.max_tokens
                            .min(most_elements(source.as_ref(), c, batch_rows))
                    }
                    (true, _) => most_elements(source.as_ref(), c, batch_rows),
                })
                .collect(),
        };
        let sizes = out_columns
            .iter()
            .zip(&units)
            .map(|(c, &u)| {
                usize::try_from(u)
                    .ok()
                    .and_then(|u| usize::try_from(c.row_bytes).ok()?.checked_mul(u))
            })
            .chain(offsets_sizes)
            .zip(
                out_columns
                    .iter()
                    .chain(out_columns.iter().filter(|c| c.ragged)),
            )
            .map(|(n, c)| {
                n.filter(|&n| n < isize::MAX as usize).ok_or_else(|| {
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
            closed: Default::default(),
        });
        {
            let mut free = set_pool.free.lock().unwrap_or_else(|e| e.into_inner());
            // In flight, plus the one the consumer holds.
            for _ in 0..in_flight + 1 {
                free.push(set_pool.alloc()?);
            }
        }
        // Chunks held at once: the pinned window plus the windows the in-flight batches still
        // reach into. Per window and column: W blocks of `block_rows` rows each span
        // ceil(bytes / chunk) chunks (+1 when blocks do not start on chunk boundaries), but
        // never more than the column has in all shards (narrow columns share chunks). The pool
        // is allocated (and touched) once at that bound, so steady state allocates nothing
        // (tests/loader_soak.rs checks it); it only grows if the bound is ever exceeded.
        let window_chunks: u64 = read_columns
            .iter()
            .map(|&ci| (ci, (&columns[ci], mean_row_bytes[ci])))
            .map(|(ci, (c, row_bytes))| {
                // A ragged column's blocks hold about the mean row's bytes each (a skewed
                // window may need more: the pool then grows, counted in extra_allocations).
                let block_bytes = block_rows.saturating_mul(row_bytes);
                // Blocks start on chunk boundaries, or nest inside chunks.
                let aligned = block_bytes.is_multiple_of(chunk_size)
                    || (block_bytes > 0 && chunk_size.is_multiple_of(block_bytes));
                let per_block = block_bytes.div_ceil(chunk_size) + u64::from(!aligned);
                let total: u64 = (0..shard_rows.len())
                    .map(|s| {
                        tensor_len(source.as_ref(), c, ci, s, shard_rows[s])
                            .div_ceil(chunk_size)
                            .max(1)
                    })
                    .fold(0, u64::saturating_add);
                opts.window_blocks.saturating_mul(per_block).min(total)
            })
            .fold(0, u64::saturating_add);
        let window_rows = opts.window_blocks.saturating_mul(block_rows).max(1);
        // Packing also holds the next window, loaded ahead (`pack::planner`); the I/O threads
        // hold the windows they read ahead (`readahead`).
        let windows_in_flight = (in_flight.saturating_mul(batch_rows) as u64)
            .div_ceil(window_rows)
            .saturating_add(1)
            .saturating_add(u64::from(pack.is_some()))
            .saturating_add(readahead_windows);
        let bound =
            usize::try_from(window_chunks.saturating_mul(windows_in_flight)).unwrap_or(usize::MAX);
        // Buffers as long as the longest chunk there is, not `chunk_size`: a small dataset
        // written with 256 MiB chunks must not allocate 256 MiB per buffer.
        let longest_chunk = read_columns
            .iter()
            .map(|&ci| (ci, &columns[ci]))
            .flat_map(|(ci, c)| {
                let (source, shard_rows) = (source.as_ref(), &shard_rows);
                (0..shard_rows.len()).map(move |s| tensor_len(source, c, ci, s, shard_rows[s]))
            })
            .max()
            .unwrap_or(0)
            .clamp(1, chunk_size.max(1));
        let chunk_pool = Arc::new(BufPool::new(
            usize::try_from(longest_chunk).unwrap_or(usize::MAX),
            bound.min(4096),
            bound.saturating_add(opts.threads.saturating_mul(read_columns.len())),
            opts.pin_hook.clone(),
            counters.pool_bytes.clone(),
        )?);
        let shared = Arc::new(Shared {
            source,
            columns: columns.clone(),
            read_columns,
            pack: pack.clone().map(|p| (p, out_columns.clone())),
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
        let cancel = crate::store::CancelToken::new();
        for i in 0..opts.threads {
            let (sh, jobs, res, stop, cancel) = (
                shared.clone(),
                job_rx.clone(),
                res_tx.clone(),
                stop_rx.clone(),
                cancel.clone(),
            );
            let h = std::thread::Builder::new()
                .name(format!("cs-worker-{i}"))
                .spawn(move || {
                    let _reads = cancel.enter();
                    worker(&sh, &jobs, &res, &stop)
                })
                .map_err(|e| Error::Stopped(format!("cannot spawn worker thread: {e}")))?;
            threads.push(h);
        }
        drop(res_tx);
        // The I/O threads reading ahead, fed one shard's chunks of a window at a time.
        let groups = if readahead_windows > 0 {
            let (groups_tx, groups_rx) = unbounded();
            for i in 0..io_threads {
                let (sh, groups, stop, cancel) = (
                    shared.clone(),
                    groups_rx.clone(),
                    stop_rx.clone(),
                    cancel.clone(),
                );
                let h = std::thread::Builder::new()
                    .name(format!("cs-io-{i}"))
                    .spawn(move || {
                        // Reads ahead are cancelled with the workers' when the loader stops.
                        let _reads = cancel.enter();
                        readahead::io_thread(&sh, &groups, &stop)
                    })
                    .map_err(|e| Error::Stopped(format!("cannot spawn I/O thread: {e}")))?;
                threads.push(h);
            }
            Some(groups_tx)
        } else {
            None
        };
        let ahead = readahead::Ahead::new(readahead_windows, groups);
        {
            let (sh, cfg, budget) = (shared.clone(), cfg.clone(), budget.clone());
            let (epochs, se, sb) = (opts.epochs, opts.start_epoch, opts.start_batch);
            let h = std::thread::Builder::new()
                .name("cs-planner".into())
                .spawn(move || match &pack {
                    Some(p) => pack::planner(
                        &sh,
                        p,
                        &cfg,
                        &shard_rows,
                        se,
                        sb,
                        epochs,
                        &credit_rx,
                        &job_tx,
                        &stop_rx,
                        ahead,
                    ),
                    None => planner(
                        &sh,
                        &cfg,
                        budget.as_deref(),
                        &shard_rows,
                        se,
                        sb,
                        epochs,
                        &credit_rx,
                        &job_tx,
                        &stop_rx,
                        ahead,
                    ),
                })
                .map_err(|e| Error::Stopped(format!("cannot spawn planner thread: {e}")))?;
            threads.push(h);
        }
        let state = LoaderState::start(opts, block_rows, total_rows);
        let mut l = Loader {
            rx: res_rx,
            credits: credit_tx,
            stop: Some(stop_tx),
            cancel,
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
            columns: out_columns,
            set_pool,
            chunk_pool,
            budget: budget.map(|b| (b, shared.source.clone())),
            counted_through: opts.start_epoch.saturating_add(1),
            read_depth: crate::store::ReadDepth {
                windows: readahead_windows,
                io_threads,
            },
        };
        l.state.normalize(l.batches_per_epoch);
        l.count_epoch();
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

    /// How far this loader reads ahead of its workers: [`LoaderOptions::readahead_windows`]
    /// and `io_threads` where given, the store's [`crate::store::ReadDepth`] otherwise.
    pub fn read_depth(&self) -> crate::store::ReadDepth {
        self.read_depth
    }

    /// Buffers allocated after construction (0 in steady state when batches are dropped).
    pub fn extra_allocations(&self) -> u64 {
        self.set_pool.allocations.load(Relaxed) + self.chunk_pool.allocations.load(Relaxed)
    }

    /// The dataset's columns.
    pub fn columns(&self) -> &[ColumnInfo] {
        &self.columns
    }

    /// Batches per epoch for this rank: with a token budget, those of the current epoch (the
    /// count varies with each epoch's order).
    pub fn batches_per_epoch(&self) -> u64 {
        self.batches_per_epoch
    }

    /// With a token budget, sets `batches_per_epoch` to the current epoch's count.
    fn count_epoch(&mut self) {
        if let Some((b, source)) = &self.budget
            && self.state.epoch < self.epochs
        {
            self.batches_per_epoch = b.batches(source.as_ref(), self.state.epoch);
        }
    }

    /// Whether every batch has been handed out. With a token budget, `total` holds the epochs
    /// counted so far; reaching it counts the next one.
    fn at_end(&mut self) -> bool {
        if self.done {
            return true;
        }
        while self.next_seq >= self.total {
            match &self.budget {
                Some((b, source)) if self.counted_through < self.epochs => {
                    self.total += b.batches(source.as_ref(), self.counted_through);
                    self.counted_through += 1;
                }
                _ => return true,
            }
        }
        false
    }

    /// Batches left to yield (with a token budget: of the epochs counted so far, the current
    /// one included).
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
        self.cancel.cancel(); // and every read waiting on the network gives up
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
        if self.at_end() {
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
                let bytes: u64 = b
                    .tensors()
                    .map(|t| (t.bytes.len() + t.offsets_bytes().map_or(0, <[u8]>::len)) as u64)
                    .sum();
                add(&self.counters.delivered_bytes, bytes);
                if self.counters.batches.fetch_add(1, Relaxed) == 0 {
                    self.counters
                        .first_batch_ns
                        .store(self.built.elapsed().as_nanos() as u64, Relaxed);
                }
                self.state.epoch = b.epoch;
                self.state.batches_done_in_epoch = b.index + 1;
                let epoch = self.state.epoch;
                self.state.normalize(self.batches_per_epoch);
                if self.state.epoch != epoch {
                    self.count_epoch();
                }
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
        self.set_pool.close();
    }
}

impl Loader {
    /// Waits at most `timeout` for the next item. Returns `true` when [`Iterator::next`] will
    /// not block (a batch or an error is ready, or the iteration is over), `false` on timeout.
    /// The time waited counts as consumer wait in [`Loader::stats`].
    pub fn wait_next(&mut self, timeout: std::time::Duration) -> bool {
        if self.at_end() || self.reorder.contains_key(&self.next_seq) {
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
