//! Reading ahead (`LoaderOptions::readahead_windows`, docs/LOADER.md "Reading ahead"): the
//! planner holds the next windows' chunks from the moment it enters a window and hands them,
//! one shard's ranges at a time, to a few I/O threads, which read the ciphertext into pooled
//! buffers kept in the chunks' slots. The worker that later loads a chunk takes those bytes (or
//! waits for a read in progress) and verifies them as before; a chunk no I/O thread claimed in
//! time is read by the worker itself. So storage has reads outstanding while the workers
//! decrypt, however many decrypt threads there are, and the order of batches never depends on
//! which thread read what. Only ciphertext is read ahead: nothing is verified or decrypted here,
//! and a failed read is kept in the slot for the batch that needs the chunk to report.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, Weak};

use crossbeam_channel::{Receiver, Sender, select};

use super::chunks::{Shared, Slot, clone_error};
use crate::error::{Error, Result};
use crate::pipeline::options::{ChunkKey, stopped};
use crate::pipeline::pool::{AlignedBuf, BufPool};
use crate::pipeline::sampler::EpochPlan;

/// A chunk's ciphertext read ahead, returned to the pool if no worker takes it.
pub(super) struct ReadAhead {
    buf: Option<AlignedBuf>,
    pool: Arc<BufPool>,
}

impl ReadAhead {
    fn take(mut self) -> AlignedBuf {
        self.buf.take().expect("read-ahead buffer taken once")
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.put(b);
        }
    }
}

/// Where a chunk's read stands.
#[derive(Default)]
enum ReadState {
    /// Nobody has read it yet.
    #[default]
    Idle,
    /// An I/O thread is reading it.
    Reading,
    /// Read ahead (or failed), waiting for its worker.
    Ready(Result<ReadAhead>),
    /// A worker read it, or took what was read ahead.
    Taken,
}

/// The read-ahead half of a [`Slot`].
#[derive(Default)]
pub(super) struct ReadCell {
    state: Mutex<ReadState>,
    ready: Condvar,
}

impl ReadCell {
    /// Claims the chunk's read for an I/O thread: `false` if a worker or another read has it.
    fn claim(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*s, ReadState::Idle) {
            *s = ReadState::Reading;
            return true;
        }
        false
    }

    /// Stores a claimed chunk's read and wakes a worker waiting for it.
    fn fill(&self, r: Result<ReadAhead>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *s = ReadState::Ready(r);
        self.ready.notify_all();
    }

    /// For the worker loading the chunk: the bytes read ahead (waiting for a read in
    /// progress: the I/O thread always fills what it claimed), or `None`: read them yourself.
    pub(super) fn take(&self) -> Option<Result<AlignedBuf>> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match std::mem::replace(&mut *s, ReadState::Taken) {
                ReadState::Idle | ReadState::Taken => return None,
                ReadState::Ready(r) => return Some(r.map(ReadAhead::take)),
                ReadState::Reading => {
                    *s = ReadState::Reading;
                    s = self.ready.wait(s).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }
}

/// One shard's chunks of a window, for one I/O thread to read. The slots are weak: a group
/// waiting in the queue must not keep a chunk alive (with its verified buffer) after the
/// planner and the batches released it, or a lagging queue would hold buffers past the pool's
/// bound. A slot gone by the time its group is read was not needed ahead any more.
pub(super) struct ReadGroup {
    shard: u32,
    chunks: Vec<(ChunkKey, Weak<Slot>)>,
}

/// An I/O thread: reads each group's claimed chunks with one `read_ranges` call on its shard.
pub(super) fn io_thread(sh: &Shared, groups: &Receiver<ReadGroup>, stop: &Receiver<()>) {
    loop {
        if stopped(stop) {
            return;
        }
        let group = select! {
            recv(groups) -> g => match g { Ok(g) => g, Err(_) => return },
            recv(stop) -> _ => return,
        };
        let claimed: Vec<(ChunkKey, Arc<Slot>)> = group
            .chunks
            .iter()
            .filter_map(|(k, slot)| Some((*k, slot.upgrade()?)))
            .filter(|(_, slot)| slot.read.claim())
            .collect();
        let shard = group.shard;
        drop(group);
        if claimed.is_empty() {
            continue;
        }
        // Every claimed slot is filled below, whatever happens: a worker waiting for one of
        // them is never left waiting.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            read_group(sh, shard, &claimed)
        }))
        .unwrap_or_else(|_| Err(Error::Stopped("a loader I/O thread panicked".into())));
        match r {
            Ok(bufs) => {
                for ((_, slot), buf) in claimed.iter().zip(bufs) {
                    slot.read.fill(Ok(buf));
                }
            }
            // Every chunk of the failed request carries the error (one of them failed; a
            // batch needing any of them reports it, naming the shard).
            Err(e) => {
                for (_, slot) in &claimed {
                    slot.read.fill(Err(clone_error(&e)));
                }
            }
        }
    }
}

/// Reads the chunks of `claimed` (all of shard `s`) into pooled buffers.
fn read_group(sh: &Shared, s: u32, claimed: &[(ChunkKey, Arc<Slot>)]) -> Result<Vec<ReadAhead>> {
    let store = sh.source.store();
    let mut bufs = Vec::with_capacity(claimed.len());
    let mut lens = Vec::with_capacity(claimed.len());
    for (k, _) in claimed {
        let spec = sh.source.chunk(s as usize, k.1 as usize, k.2);
        let buf = ReadAhead {
            buf: Some(sh.chunk_pool.get()?),
            pool: sh.chunk_pool.clone(),
        };
        if spec.len > buf.buf.as_ref().map_or(0, |b| b.len()) {
            return Err(Error::format(
                store.name(s as usize),
                "shard",
                format!(
                    "chunk {} of column {} is longer than the chunk size",
                    k.2, k.1
                ),
            ));
        }
        lens.push((spec.file_offset, spec.len));
        bufs.push(buf);
    }
    let mut ranges: Vec<(u64, &mut [u8])> = bufs
        .iter_mut()
        .zip(&lens)
        .map(|(b, &(off, len))| (off, &mut b.buf.as_mut().expect("buffer")[..len]))
        .collect();
    store.read_ranges(s as usize, &mut ranges)?;
    Ok(bufs)
}

/// The planner's side: the windows held ahead of the one it is in.
pub(super) struct Ahead {
    windows: u64,
    /// Held windows (index, chunk keys), nearest first.
    held: VecDeque<(usize, Vec<ChunkKey>)>,
    groups: Option<Sender<ReadGroup>>,
}

impl Ahead {
    pub(super) fn new(windows: u64, groups: Option<Sender<ReadGroup>>) -> Ahead {
        Ahead {
            windows: if groups.is_some() { windows } else { 0 },
            held: VecDeque::new(),
            groups,
        }
    }

    /// The planner is in window `w` (already pinned): windows `w + 1 ..= w + readahead` of this
    /// epoch are held and queued for reading; windows at or before `w` are released (their
    /// chunks stay held by the pin and by the jobs that need them).
    pub(super) fn enter(&mut self, sh: &Shared, plan: &EpochPlan, w: usize) {
        let Some(groups) = &self.groups else {
            return;
        };
        while self.held.front().is_some_and(|(hw, _)| *hw <= w) {
            if let Some((_, keys)) = self.held.pop_front() {
                sh.cache.release(&keys);
            }
        }
        let last = w
            .saturating_add(self.windows as usize)
            .min(plan.windows().saturating_sub(1));
        let mut next = self.held.back().map_or(w + 1, |(hw, _)| hw + 1).max(w + 1);
        while next <= last {
            let keys = sh.window_keys(plan, next);
            let slots = sh.cache.acquire(&keys);
            // Keys are sorted: each shard's chunks are one run.
            let mut pairs = keys
                .iter()
                .copied()
                .zip(slots.iter().map(Arc::downgrade))
                .peekable();
            while let Some(first) = pairs.next() {
                let shard = first.0.0;
                let mut chunks = vec![first];
                while let Some(p) = pairs.next_if(|(k, _)| k.0 == shard) {
                    chunks.push(p);
                }
                // A closed channel (the I/O threads are gone: the loader stops) reads nothing.
                let _ = groups.send(ReadGroup { shard, chunks });
            }
            self.held.push_back((next, keys));
            next += 1;
        }
    }

    /// Releases every held window (the epoch ended: its windows are not the next epoch's).
    pub(super) fn clear(&mut self, sh: &Shared) {
        for (_, keys) in self.held.drain(..) {
            sh.cache.release(&keys);
        }
    }
}
