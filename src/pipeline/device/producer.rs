//! The device loader's threads, for any [`DeviceEngine`]. The *producer* (the handle's thread)
//! starts a *reader* (the engine's [`DeviceEngine::read_windows`]: windows read, verified and
//! decrypted into device memory in the order the batches need them) and a *planner* (every
//! batch's rows and gather offsets, computed ahead on the CPU), then gathers each batch from
//! the resident windows into a pooled column-buffer set and hands batch k-1 out once its
//! gathers completed while batch k's run.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, bounded, select};

use super::batch::{BufferPool, GpuBatch};
use super::batches::{BatchPlan, plan_batches};
use super::engine::{DeviceEngine, GatherJob, Window};
use super::feed::WindowFeed;
use super::windows::Packing;
use crate::error::{Error, Result};
use crate::pipeline::format_source::FormatSource;
use crate::pipeline::options::stopped;
use crate::pipeline::sampler::{EpochPlan, SamplerConfig};
use crate::pipeline::source::ColumnInfo;
use crate::pipeline::telemetry::{Counters, DeviceCounters, add, ns_since};

/// What the producer thread shares with the reader and planner it starts.
pub(crate) struct Producer<E: DeviceEngine> {
    pub(crate) source: Arc<FormatSource>,
    pub(crate) engine: Arc<E>,
    pub(crate) config: E::Config,
    pub(crate) packing: Packing,
    pub(crate) columns: Arc<[ColumnInfo]>,
    /// Threads that read one window's chunks.
    pub(crate) threads: usize,
    pub(crate) twin: bool,
    /// Rows of a full batch (column buffers are sized by it).
    pub(crate) batch_rows: usize,
    pub(crate) counters: Arc<Counters>,
    pub(crate) device: Arc<DeviceCounters>,
    pub(crate) pool: BufferPool<E::Buffer>,
}

/// A batch whose gathers were enqueued: handed out once `done` completed.
struct Gathered<E: DeviceEngine> {
    batch: GpuBatch<E>,
    done: E::Fence,
}

type Span = (u64, u64, u64);

impl<E: DeviceEngine> Producer<E> {
    /// Runs the reader and planner threads and the gather loop until the last batch, an error
    /// or a stop.
    pub(crate) fn run(
        &self,
        cfg: &SamplerConfig,
        shard_rows: &[u64],
        span: Span,
        tx: &Sender<Result<GpuBatch<E>>>,
        stop: &Receiver<()>,
    ) -> Result<()> {
        let (win_tx, win_rx) = bounded::<Result<Window<E::WindowBuf>>>(E::WINDOWS_AHEAD);
        let (plan_tx, plan_rx) = bounded::<Result<BatchPlan>>(16);
        let (recycle_tx, recycle_rx) = crossbeam_channel::unbounded::<E::WindowBuf>();
        let cancel = crate::store::cancel::current();
        std::thread::scope(|sc| {
            let reader = std::thread::Builder::new()
                .name(format!("{}-read", E::THREAD_NAME))
                .spawn_scoped(sc, || {
                    // The loader's reads end when it is dropped (`DeviceHandle`).
                    let _reads = cancel.as_ref().map(|c| c.enter());
                    let feed = WindowFeed {
                        source: &self.source,
                        cfg,
                        shard_rows,
                        span,
                        packing: self.packing,
                        threads: self.threads,
                        twin: self.twin,
                        counters: &self.counters,
                        device: &self.device,
                    };
                    self.engine
                        .read_windows(&self.config, feed, win_tx, recycle_rx)
                })
                .map_err(|e| Error::Stopped(format!("cannot spawn the device reader: {e}")))?;
            let planner = std::thread::Builder::new()
                .name(format!("{}-plan", E::THREAD_NAME))
                .spawn_scoped(sc, || {
                    plan_batches(&self.source, cfg, shard_rows, span, self.packing, plan_tx)
                })
                .map_err(|e| Error::Stopped(format!("cannot spawn the device planner: {e}")))?;
            let mut resident: Vec<Window<E::WindowBuf>> = Vec::new();
            let mut pending: Option<Gathered<E>> = None;
            let r = self.gather_loop(
                cfg,
                shard_rows,
                span,
                (plan_rx, win_rx, &recycle_tx),
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
            self.engine.quiesce();
            drop(pending);
            drop(resident);
            drop(recycle_tx);
            // The reader and planner stop at their next send (the receivers are gone).
            let _ = reader.join();
            let _ = planner.join();
            r
        })
    }

    /// For each batch: the windows it needs (received verified from the reader, in the load
    /// order), its gathers enqueued, and the previous batch handed out once its gathers
    /// completed. `Ok(false)`: stopped.
    #[allow(clippy::type_complexity)] // the three channel ends the loop runs between
    fn gather_loop(
        &self,
        cfg: &SamplerConfig,
        shard_rows: &[u64],
        (start_epoch, start_batch, epochs): Span,
        (plans, windows, recycle): (
            Receiver<Result<BatchPlan>>,
            Receiver<Result<Window<E::WindowBuf>>>,
            &Sender<E::WindowBuf>,
        ),
        (resident, pending): (&mut Vec<Window<E::WindowBuf>>, &mut Option<Gathered<E>>),
        (tx, stop): (&Sender<Result<GpuBatch<E>>>, &Receiver<()>),
    ) -> Result<bool> {
        for epoch in start_epoch..epochs {
            let batches = EpochPlan::new(cfg, epoch, shard_rows).batches();
            let first = if epoch == start_epoch { start_batch } else { 0 };
            for k in first..batches {
                let bp = match plans.recv() {
                    Ok(r) => r?,
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
                let keep = |r: &Window<E::WindowBuf>| {
                    r.epoch == epoch && needed.binary_search(&r.w).is_ok()
                };
                if !resident.iter().all(keep) {
                    // The pending batch's gathers may still read a window about to be reused.
                    if E::EVICT_WAITS_FOR_GATHERS
                        && let Some(g) = pending.take()
                        && !self.hand_out(g, tx, stop)?
                    {
                        return Ok(false);
                    }
                    let mut i = 0;
                    while i < resident.len() {
                        if keep(&resident[i]) {
                            i += 1;
                        } else {
                            // The reader may have finished: then the buffers are just freed.
                            for buf in resident.swap_remove(i).pieces {
                                let _ = recycle.send(buf);
                            }
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
                let g = self.gather_batch(bp, resident)?;
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
        g: Gathered<E>,
        tx: &Sender<Result<GpuBatch<E>>>,
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

    /// Enqueues the gathers of a planned batch from the resident windows into a pooled
    /// column-buffer set: one upload of every row offset, one launch per column and window
    /// piece.
    fn gather_batch(
        &self,
        bp: BatchPlan,
        resident: &[Window<E::WindowBuf>],
    ) -> Result<Gathered<E>> {
        let t = Instant::now();
        let pooled = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut bufs = match pooled {
            Some(b) => b,
            None => self
                .columns
                .iter()
                .map(|c| {
                    self.engine
                        .alloc_column(c, self.batch_rows as u64 * c.row_bytes)
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
                    .and_then(|r| r.pieces.get(*piece))
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
        // Ranges are checked against the window and column buffers before any launch.
        let done = self.engine.gather(&jobs, &bp.pairs, &mut bufs)?;
        let ns = ns_since(t);
        add(&self.counters.assemble_ns, ns);
        add(&self.device.gather_ns, ns);
        let rows = bp.row_ids.len() as u64;
        let bytes: u64 = self.columns.iter().map(|c| c.row_bytes * rows).sum();
        add(&self.counters.assemble_bytes, bytes);
        Ok(Gathered {
            batch: GpuBatch {
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
