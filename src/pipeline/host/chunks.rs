//! The host loader's threads: the planner hands each batch's rows and chunk keys to the
//! workers; a worker reads every chunk the batch touches into a private pooled buffer through
//! the source's store, verifies (or opens) it once for every batch that shares it, then copies
//! (or CTR-decrypts) the rows into the batch's buffers.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, select};
use zeroize::Zeroize;

use super::batch::{Batch, SetPool};
use super::readahead::{Ahead, ReadCell};
use crate::cipher::{ChunkParams, NONCE_LEN};
use crate::error::{Error, Result};
use crate::pipeline::budget::BudgetPlan;
use crate::pipeline::options::{ChunkKey, DecryptMode, PackPlan, keys_for_rows, stopped};
use crate::pipeline::pool::{AlignedBuf, BufPool};
use crate::pipeline::sampler::{Cursor, EpochPlan, RowRef, SamplerConfig};
use crate::pipeline::source::{ColumnInfo, RowSource};
use crate::pipeline::telemetry::{Counters, add};

/// A chunk read into a private buffer and verified (or opened).
pub(super) struct Loaded {
    pub(super) buf: Option<AlignedBuf>,
    pub(super) len: usize,
    pub(super) nonce: [u8; NONCE_LEN],
    /// The buffer holds ciphertext still to be CTR-decrypted.
    pub(super) ciphertext: bool,
    pub(super) plaintext_held: bool,
    pub(super) pool: Arc<BufPool>,
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
pub(super) struct Slot {
    pub(super) cell: OnceLock<Result<Loaded, Error>>,
    /// The chunk's ciphertext when an I/O thread read it ahead (`readahead`).
    pub(super) read: ReadCell,
}

/// Verified chunks shared by the batches that need them, refcounted by the planner.
#[derive(Default)]
pub(super) struct ChunkCache {
    map: Mutex<HashMap<ChunkKey, (Arc<Slot>, usize)>>,
}

impl ChunkCache {
    pub(super) fn acquire(&self, keys: &[ChunkKey]) -> Vec<Arc<Slot>> {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        keys.iter()
            .map(|k| {
                let e = m.entry(*k).or_default();
                e.1 += 1;
                e.0.clone()
            })
            .collect()
    }
    pub(super) fn release(&self, keys: &[ChunkKey]) {
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
pub(super) fn clone_error(e: &Error) -> Error {
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

pub(super) struct Job {
    pub(super) seq: u64,
    pub(super) epoch: u64,
    pub(super) index: u64,
    pub(super) rows: Vec<RowRef>,
    /// Packing: tokens of the first row that the previous batch took.
    pub(super) skip: u64,
    /// Packing: chunks of the next window for this job's worker to load after it sends its
    /// batch (each held by one count of its own, released once loaded), so a window's chunks
    /// are opened while the previous window's batches are assembled rather than by the first
    /// batches that need them, all at once, on the consumer's critical path.
    pub(super) warm: Vec<(ChunkKey, Arc<Slot>)>,
    pub(super) keys: Vec<ChunkKey>,
    pub(super) slots: Vec<Arc<Slot>>,
}

pub(super) struct Shared {
    pub(super) source: Arc<dyn RowSource>,
    /// The source's columns.
    pub(super) columns: Arc<[ColumnInfo]>,
    /// The columns whose chunks batches read: every one, or the packed one.
    pub(super) read_columns: Vec<usize>,
    /// Sequence packing, and the packed batch's tensors (tokens, position ids, cu_seqlens).
    pub(super) pack: Option<(PackPlan, Arc<[ColumnInfo]>)>,
    pub(super) chunk_size: u64,
    pub(super) mode: DecryptMode,
    pub(super) cache: ChunkCache,
    pub(super) chunk_pool: Arc<BufPool>,
    pub(super) set_pool: Arc<SetPool>,
    pub(super) counters: Arc<Counters>,
}

impl Shared {
    /// Reads (or takes the bytes read ahead into `slot`), then verifies or opens chunk `k`.
    fn load(&self, k: ChunkKey, slot: &Slot) -> Result<Loaded> {
        let (s, c, j) = (k.0 as usize, k.1 as usize, k.2);
        let spec = self.source.chunk(s, c, j);
        // The read stage counts the time spent waiting for bytes read ahead.
        let t0 = Instant::now();
        let mut buf = match slot.read.take() {
            Some(r) => r?,
            None => {
                let mut buf = self.chunk_pool.get()?;
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
                buf
            }
        };
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

    /// Stage 1: every chunk the batch touches is read and verified (once, shared). Consecutive
    /// batches of a window need the same chunks; each job starts at a different one, so the
    /// workers load a new window's chunks in parallel instead of queueing behind one loader.
    fn load_chunks(&self, job: &Job) -> Result<()> {
        let n = job.keys.len();
        let first = if n == 0 {
            0
        } else {
            (job.seq as usize).wrapping_mul(7) % n
        };
        for i in (first..n).chain(0..first) {
            let slot = &job.slots[i];
            if let Err(e) = slot.cell.get_or_init(|| self.load(job.keys[i], slot)) {
                return Err(clone_error(e));
            }
        }
        Ok(())
    }

    /// Copies (or CTR-decrypts) bytes `[off, end)` of column `c`'s tensor in shard `s` into
    /// `dst` from the job's loaded chunks. Returns the bytes decrypted and the bytes copied.
    pub(super) fn copy_range(
        &self,
        job: &Job,
        s: u32,
        c: usize,
        mut off: u64,
        end: u64,
        dst: &mut [u8],
    ) -> Result<(u64, u64)> {
        let opener = self.source.opener(s as usize);
        let (mut dec_b, mut asm_b) = (0u64, 0u64);
        let mut d = 0usize;
        while off < end {
            let j = off / self.chunk_size;
            let in_chunk = off % self.chunk_size;
            let len = (self.chunk_size - in_chunk).min(end - off) as usize;
            let key = (s, c as u32, j);
            let idx = job
                .keys
                .binary_search(&key)
                .map_err(|_| Error::Stopped(format!("internal: chunk {key:?} not planned")))?;
            let Some(Ok(l)) = job.slots[idx].cell.get() else {
                return Err(Error::Stopped("internal: chunk not loaded".into()));
            };
            let src =
                &l.buf.as_ref().expect("loaded buffer")[in_chunk as usize..in_chunk as usize + len];
            let dst = &mut dst[d..d + len];
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
        Ok((dec_b, asm_b))
    }

    /// Adds one column's copy time to the stage it belongs to (a column's chunks are all
    /// encrypted or all plain).
    pub(super) fn count_copy(&self, started: Instant, dec_b: u64, asm_b: u64) {
        let ns = started.elapsed().as_nanos() as u64;
        let stage = if dec_b > 0 {
            &self.counters.decrypt_ns
        } else {
            &self.counters.assemble_ns
        };
        add(stage, ns);
        add(&self.counters.decrypt_bytes, dec_b);
        add(&self.counters.assemble_bytes, asm_b);
    }

    /// Window `w`'s chunks (every read column), sorted.
    pub(super) fn window_keys(&self, plan: &EpochPlan, w: usize) -> Vec<ChunkKey> {
        let mut wk = Vec::new();
        for &(s, r0, n) in plan.window_blocks(w) {
            keys_for_rows(
                self.source.as_ref(),
                &self.columns,
                &self.read_columns,
                self.chunk_size,
                s,
                r0,
                n,
                &mut wk,
            );
        }
        wk.sort_unstable();
        wk.dedup();
        wk
    }

    /// Holds window `w`'s chunks (every read column) in the cache while the planner is inside
    /// it, so each is read and verified once per window however batches interleave. The
    /// window it replaces goes to `old_pin`, released once the batch that left it is sent.
    pub(super) fn pin_window(
        &self,
        plan: &EpochPlan,
        w: usize,
        pinned: &mut Option<(usize, Vec<ChunkKey>)>,
        old_pin: &mut Option<Vec<Vec<ChunkKey>>>,
    ) {
        if pinned.as_ref().is_some_and(|(pw, _)| *pw == w) {
            return;
        }
        let wk = self.window_keys(plan, w);
        let _ = self.cache.acquire(&wk);
        if let Some(old) = pinned.replace((w, wk)) {
            old_pin.get_or_insert_with(Vec::new).push(old.1);
        }
    }

    fn run(&self, job: &Job) -> Result<Batch> {
        self.load_chunks(job)?;
        if let Some(pack) = &self.pack {
            return super::pack::assemble(self, pack, job);
        }
        // Stage 2: rows into the batch buffers, coalescing runs of consecutive source rows.
        let mut bufs = self.set_pool.get()?;
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
        let ncols = self.columns.len();
        let mut elements = vec![0u64; ncols];
        let mut ragged_seen = 0;
        // A ragged column's element offsets within the batch, per batch row (and the total).
        let mut starts: Vec<u64> = Vec::new();
        for (c, col) in self.columns.iter().enumerate() {
            let rb = col.row_bytes;
            // One clock read per column and batch: per-row timing costs more than a row copy.
            let (mut dec_b, mut asm_b) = (0u64, 0u64);
            let t = Instant::now();
            if col.ragged {
                // The batch's row offsets: each row's length from its shard's checked offsets.
                starts.clear();
                let mut cum = 0u64;
                for r in &job.rows {
                    let o = self.source.row_offsets(r.shard as usize, c);
                    starts.push(cum);
                    cum += o[r.row as usize + 1] - o[r.row as usize];
                }
                starts.push(cum);
                if (cum * rb) as usize > bufs[c].len() {
                    return Err(Error::Stopped(format!(
                        "internal: a batch of column {} holds {cum} elements, more than its buffer",
                        col.name
                    )));
                }
                let out = &mut bufs[ncols + ragged_seen];
                ragged_seen += 1;
                for (dst, v) in out.chunks_exact_mut(8).zip(&starts) {
                    dst.copy_from_slice(&(*v as i64).to_le_bytes());
                }
                elements[c] = cum;
            }
            let dst_all = &mut bufs[c];
            for &(first, pos, n) in &runs {
                let (off, end) =
                    col.byte_range(self.source.as_ref(), first.shard as usize, c, first.row, n);
                let d = if col.ragged {
                    (starts[pos] * rb) as usize
                } else {
                    pos * rb as usize
                };
                let (dec, asm) =
                    self.copy_range(job, first.shard, c, off, end, &mut dst_all[d..])?;
                dec_b += dec;
                asm_b += asm;
            }
            self.count_copy(t, dec_b, asm_b);
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
            elements,
            first_dims: Vec::new(),
            pool: self.set_pool.clone(),
        })
    }
}

pub(super) fn worker(
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
        for (key, slot) in &job.warm {
            if stopped(stop) {
                break;
            }
            // An error stays in the slot, for the batch that needs the chunk to report.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                slot.cell.get_or_init(|| sh.load(*key, slot))
            }));
        }
        for (key, _) in &job.warm {
            sh.cache.release(std::slice::from_ref(key));
        }
    }
}

/// Waits for a credit (room for one more batch in flight); `false` once the loader stops.
pub(super) fn take_credit(credits: &Receiver<()>, stop: &Receiver<()>) -> bool {
    // `select!` picks at random among ready operations: check the stop signal first so a
    // dropped loader never dispatches more work.
    if stopped(stop) {
        return false;
    }
    select! {
        recv(credits) -> c => c.is_ok(),
        recv(stop) -> _ => false,
    }
}

/// Sends `job` to the workers, then releases the windows the planner left while planning it
/// (held until now so that their chunks stay cached for the job); `false` once the loader
/// stops.
pub(super) fn dispatch(
    sh: &Shared,
    jobs: &Sender<Job>,
    stop: &Receiver<()>,
    job: Job,
    old_pin: Option<Vec<Vec<ChunkKey>>>,
) -> bool {
    select! {
        send(jobs, job) -> r => if r.is_err() { return false },
        recv(stop) -> _ => return false,
    }
    for old in old_pin.into_iter().flatten() {
        sh.cache.release(&old);
    }
    true
}

#[allow(clippy::too_many_arguments)]
pub(super) fn planner(
    sh: &Shared,
    cfg: &SamplerConfig,
    budget: Option<&BudgetPlan>,
    shard_rows: &[u64],
    start_epoch: u64,
    start_batch: u64,
    epochs: u64,
    credits: &Receiver<()>,
    jobs: &Sender<Job>,
    stop: &Receiver<()>,
    mut ahead: Ahead,
) {
    let mut seq = 0u64;
    let mut pinned: Option<(usize, Vec<ChunkKey>)> = None;
    for epoch in start_epoch..epochs {
        let plan = EpochPlan::new(cfg, epoch, shard_rows);
        let mut cur = Cursor::new(&plan);
        let first = if epoch == start_epoch { start_batch } else { 0 };
        // A token budget cuts the epoch's order its own way; otherwise batches of rows.
        let starts = budget.map(|b| b.starts(sh.source.as_ref(), epoch));
        let batches = starts
            .as_ref()
            .map_or(plan.batches(), |s| s.len() as u64 - 1);
        for k in first..batches {
            if !take_credit(credits, stop) {
                return;
            }
            let (a, b) = match &starts {
                Some(s) => (s[k as usize], s[k as usize + 1]),
                None => plan.batch_positions(k),
            };
            let mut rows = Vec::with_capacity((b - a) as usize);
            let mut keys = Vec::new();
            let mut old_pin = None;
            for p in a..b {
                let (row, w) = cur.row_at(p);
                sh.pin_window(&plan, w, &mut pinned, &mut old_pin);
                ahead.enter(sh, &plan, w);
                keys_for_rows(
                    sh.source.as_ref(),
                    &sh.columns,
                    &sh.read_columns,
                    sh.chunk_size,
                    row.shard,
                    row.row,
                    1,
                    &mut keys,
                );
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
                skip: 0,
                warm: Vec::new(),
                keys,
                slots,
            };
            if !dispatch(sh, jobs, stop, job, old_pin) {
                return;
            }
            seq += 1;
        }
        if let Some((_, old)) = pinned.take() {
            sh.cache.release(&old);
        }
        ahead.clear(sh);
    }
}
