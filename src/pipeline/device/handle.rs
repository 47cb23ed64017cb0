//! The consumer's side of a device loader: the producer thread, the batches it sends in plan
//! order, the position after the last one handed out, and the telemetry.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, bounded, select};

use super::batch::GpuBatch;
use super::engine::DeviceEngine;
use crate::error::{Error, Result};
use crate::pipeline::options::{LoaderOptions, LoaderState};
use crate::pipeline::source::ColumnInfo;
use crate::pipeline::telemetry::{Counters, DeviceCounters, add, ns_since};
use crate::store::CancelToken;

/// The plan's shape, for the handle's position.
pub(crate) struct Shape {
    pub(crate) block_rows: u64,
    pub(crate) total_rows: u64,
    pub(crate) batches_per_epoch: u64,
    /// Batches left to deliver from the start position.
    pub(crate) total: u64,
    pub(crate) columns: Arc<[ColumnInfo]>,
}

/// The consumer's side of a device loader: the producer thread, the batches it sends in plan
/// order, the position after the last one handed out, and the telemetry.
pub(crate) struct DeviceHandle<E: DeviceEngine> {
    rx: Receiver<Result<GpuBatch<E>>>,
    stop: Option<Sender<()>>,
    /// Cancels the loader threads' store reads when it shuts down (a network read in flight
    /// would otherwise hold up the join until it ends or times out).
    cancel: CancelToken,
    thread: Option<JoinHandle<()>>,
    remaining: u64,
    done: bool,
    pub(crate) state: LoaderState,
    pub(crate) batches_per_epoch: u64,
    pub(crate) counters: Arc<Counters>,
    pub(crate) device: Arc<DeviceCounters>,
    built: Instant,
    pub(crate) columns: Arc<[ColumnInfo]>,
}

impl<E: DeviceEngine> DeviceHandle<E> {
    /// Starts thread `name` running `run(batches, stop)`; its error, or a panic, is sent as the
    /// last item (never blocking once the handle is dropped).
    pub(crate) fn spawn(
        name: &str,
        opts: &LoaderOptions,
        shape: Shape,
        counters: Arc<Counters>,
        device: Arc<DeviceCounters>,
        built: Instant,
        run: impl FnOnce(&Sender<Result<GpuBatch<E>>>, &Receiver<()>) -> Result<()> + Send + 'static,
    ) -> Result<Self> {
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let (tx, rx) = bounded::<Result<GpuBatch<E>>>(opts.prefetch);
        let what = name.to_string();
        let cancel = CancelToken::new();
        let reads = cancel.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // Threads it starts enter the same token (`cancel::current`).
                let _reads = reads.enter();
                let r =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&tx, &stop_rx)));
                if let Err(e) = r.unwrap_or_else(|_| {
                    Err(Error::Stopped(format!("the {what} loader thread panicked")))
                }) {
                    select! {
                        send(tx, Err(e)) -> _ => {},
                        recv(stop_rx) -> _ => {},
                    }
                }
            })
            .map_err(|e| Error::Stopped(format!("cannot spawn thread {name}: {e}")))?;
        let mut h = DeviceHandle {
            rx,
            stop: Some(stop_tx),
            cancel,
            thread: Some(thread),
            remaining: shape.total,
            done: false,
            state: LoaderState::start(opts, shape.block_rows, shape.total_rows),
            batches_per_epoch: shape.batches_per_epoch,
            counters,
            device,
            built,
            columns: shape.columns,
        };
        h.state.normalize(h.batches_per_epoch);
        Ok(h)
    }

    /// Batches left to yield.
    pub(crate) fn remaining(&self) -> u64 {
        if self.done { 0 } else { self.remaining }
    }

    /// The next batch: `None` after the last one or after an error (yielded once).
    pub(crate) fn next_batch(&mut self) -> Option<Result<GpuBatch<E>>> {
        if self.done {
            return None;
        }
        if self.remaining == 0 {
            self.shutdown();
            return None;
        }
        let t = Instant::now();
        let item = self.rx.recv().unwrap_or_else(|_| {
            Err(Error::Stopped(
                "the device loader's thread exited before the epoch ended".into(),
            ))
        });
        add(&self.counters.consumer_wait_ns, ns_since(t));
        match item {
            Ok(b) => {
                self.remaining -= 1;
                add(&self.counters.delivered_bytes, b.bytes());
                if self.counters.batches.fetch_add(1, Relaxed) == 0 {
                    self.counters
                        .first_batch_ns
                        .store(ns_since(self.built), Relaxed);
                }
                self.state.epoch = b.epoch();
                self.state.batches_done_in_epoch = b.index() + 1;
                self.state.normalize(self.batches_per_epoch);
                Some(Ok(b))
            }
            Err(e) => {
                self.shutdown();
                Some(Err(e))
            }
        }
    }

    fn shutdown(&mut self) {
        self.done = true;
        self.stop.take();
        self.cancel.cancel();
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}

impl<E: DeviceEngine> Drop for DeviceHandle<E> {
    fn drop(&mut self) {
        self.done = true;
        self.stop.take();
        self.cancel.cancel();
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}
