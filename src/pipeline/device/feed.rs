//! What an engine's reader thread is fed: every window the batches will need, in the order the
//! gather loop asks for them (across epochs), with its chunks and their layout, and the one way
//! to read them: through the source's store, several threads per window, each chunk's tag
//! optionally checked on the host right after its read.

#![forbid(unsafe_code)]

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use super::batches::load_order;
use super::windows::{Packing, WindowLayout, window_keys, window_layout};
use crate::cipher::ChunkParams;
use crate::error::{Error, Result};
use crate::pipeline::format_source::FormatSource;
use crate::pipeline::options::ChunkKey;
use crate::pipeline::sampler::{EpochPlan, SamplerConfig};
use crate::pipeline::source::{ChunkSpec, RowSource};
use crate::pipeline::telemetry::{Counters, DeviceCounters, add, ns_since};

/// Runs on each chunk right after its read (its tag check), on the reading thread.
type ChunkCheck<'a> = dyn Fn(ChunkKey, &ChunkSpec, &[u8]) -> Result<()> + Sync + 'a;

/// One window to read: its chunks (sorted by key) and where they go.
pub struct WindowRead {
    pub(crate) epoch: u64,
    pub(crate) w: usize,
    pub(crate) keys: Vec<ChunkKey>,
    pub(crate) specs: Vec<ChunkSpec>,
    pub(crate) layout: WindowLayout,
}

impl WindowRead {
    /// Bytes of its chunks.
    pub(crate) fn bytes(&self) -> u64 {
        self.specs.iter().map(|s| s.len as u64).sum()
    }
}

/// The reader thread's view of a loader (see the module docs).
pub struct WindowFeed<'a> {
    pub(crate) source: &'a FormatSource,
    pub(crate) cfg: &'a SamplerConfig,
    pub(crate) shard_rows: &'a [u64],
    /// (start epoch, start batch, epochs).
    pub(crate) span: (u64, u64, u64),
    pub(crate) packing: Packing,
    /// Threads that read one window's chunks.
    pub(crate) threads: usize,
    /// The benchmarks' plaintext twin (`crate::bench`): no tag check, no decryption.
    pub(crate) twin: bool,
    pub(crate) counters: &'a Counters,
    pub(crate) device: &'a DeviceCounters,
}

impl WindowFeed<'_> {
    /// Every window in the gather loop's [`load_order`], across epochs.
    pub(crate) fn windows(&self) -> impl Iterator<Item = WindowRead> + '_ {
        let (start_epoch, start_batch, epochs) = self.span;
        (start_epoch..epochs).flat_map(move |epoch| {
            let plan = EpochPlan::new(self.cfg, epoch, self.shard_rows);
            let first = if epoch == start_epoch { start_batch } else { 0 };
            // Lazily: a window's chunks and layout are computed just before it is read.
            let order = load_order(&plan, first);
            order.into_iter().map(move |w| self.window(&plan, epoch, w))
        })
    }

    fn window(&self, plan: &EpochPlan, epoch: u64, w: usize) -> WindowRead {
        let columns = self.source.columns();
        let chunk = self.source.chunk_size();
        let keys = window_keys(columns, chunk, plan, w);
        let specs: Vec<ChunkSpec> = keys
            .iter()
            .map(|&(s, c, j)| self.source.chunk(s as usize, c as usize, j))
            .collect();
        let layout = window_layout(columns, chunk, &keys, &specs, self.packing);
        WindowRead {
            epoch,
            w,
            keys,
            specs,
            layout,
        }
    }

    /// Reads every chunk of `win` into `staging` at its layout's staging offset, the chunks
    /// dealt round-robin to the feed's threads (one thread does not reach PCIe bandwidth copying
    /// from the page cache). With `check_tags`, each chunk's tag is checked on the host right
    /// after its read, on the same thread (cache-hot): a mismatch is an integrity error naming
    /// the chunk. Counts the read (and check) time and bytes.
    pub(crate) fn read(
        &self,
        win: &WindowRead,
        staging: &mut [u8],
        check_tags: bool,
    ) -> Result<()> {
        let t0 = Instant::now();
        let verify_ns = AtomicU64::new(0);
        let check = |k: ChunkKey, spec: &ChunkSpec, bytes: &[u8]| -> Result<()> {
            if !check_tags {
                return Ok(());
            }
            let t = Instant::now();
            let params = ChunkParams {
                nonce: spec.nonce,
                aad: &spec.aad,
                tag: spec.tag,
                encrypted: spec.encrypted,
            };
            let r = self.source.opener(k.0 as usize).verify(&params, bytes);
            add(&verify_ns, ns_since(t));
            r.map_err(|e| e.at(|| self.location(k)))
        };
        self.read_all(win, staging, &check)?;
        let total = win.bytes();
        let verified = verify_ns.into_inner();
        let read = ns_since(t0).saturating_sub(verified);
        add(&self.counters.read_ns, read);
        add(&self.device.read_ns, read);
        add(&self.counters.read_bytes, total);
        add(&self.device.window_bytes, total);
        add(&self.counters.chunks_loaded, win.keys.len() as u64);
        if check_tags {
            add(&self.counters.verify_ns, verified);
            add(&self.counters.verify_bytes, total);
        }
        Ok(())
    }

    fn read_all(&self, win: &WindowRead, staging: &mut [u8], check: &ChunkCheck<'_>) -> Result<()> {
        // Disjoint staging ranges, in order (offsets increase with the key order).
        let mut jobs: Vec<(ChunkKey, &ChunkSpec, &mut [u8])> = Vec::with_capacity(win.keys.len());
        let mut rest: &mut [u8] = staging;
        let mut pos = 0usize;
        for ((k, spec), &o) in win
            .keys
            .iter()
            .zip(&win.specs)
            .zip(&win.layout.staging_offs)
        {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(o - pos);
            let (dst, tail) = tail.split_at_mut(spec.len);
            rest = tail;
            pos = o + spec.len;
            jobs.push((*k, spec, dst));
        }
        let store = self.source.store();
        let read_one = |(k, spec, dst): (ChunkKey, &ChunkSpec, &mut [u8])| -> Result<()> {
            store.read_at(k.0 as usize, spec.file_offset, dst)?;
            check(k, spec, dst)
        };
        let threads = self.threads.min(jobs.len()).max(1);
        if threads == 1 {
            return jobs.into_iter().try_for_each(read_one);
        }
        let mut lanes: Vec<Vec<(ChunkKey, &ChunkSpec, &mut [u8])>> =
            (0..threads).map(|_| Vec::new()).collect();
        for (i, j) in jobs.into_iter().enumerate() {
            lanes[i % threads].push(j);
        }
        let cancel = crate::store::cancel::current();
        std::thread::scope(|sc| {
            let handles: Vec<_> = lanes
                .into_iter()
                .map(|lane| {
                    let cancel = cancel.clone();
                    sc.spawn(move || {
                        // The reader's token: a dropped loader cancels these reads too.
                        let _reads = cancel.as_ref().map(|c| c.enter());
                        lane.into_iter().try_for_each(read_one)
                    })
                })
                .collect();
            // The first error in lane order; a panicking reader is an error too.
            let mut first = Ok(());
            for h in handles {
                let r = h
                    .join()
                    .unwrap_or_else(|_| Err(Error::Stopped("a read thread panicked".into())));
                if first.is_ok() {
                    first = r;
                }
            }
            first
        })
    }

    /// The integrity error for chunk `k` (a tag that did not verify).
    // Engines that check tags on the device (CUDA) report mismatches by chunk key.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn integrity(&self, k: ChunkKey) -> Error {
        Error::Integrity(self.location(k))
    }

    fn location(&self, (s, c, j): ChunkKey) -> crate::error::ChunkLocation {
        self.source.location(s as usize, c as usize, j)
    }
}
