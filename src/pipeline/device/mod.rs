//! Device-memory batches: the host loader's plan, with windows of chunks verified and decrypted
//! on a GPU and rows gathered into pooled device buffers. See docs/LOADER.md, "Device batches".
//!
//! One loader, [`GpuLoader`], over one seam, `DeviceEngine` (`engine.rs`), implemented by
//! each GPU backend in its own file: `cuda.rs` ([`DeviceLoader`], [`CudaBatch`]) and `wgpu.rs`
//! ([`WgpuDeviceLoader`], [`WgpuBatch`]). The rest is shared: the window layout and its byte
//! bounds (`windows.rs`), each batch's gather plan (`batches.rs`), the reader's feed of windows
//! and its reads through the source's store (`feed.rs`), the producer that gathers and hands
//! out batches (`producer.rs`), the iterator handle (`handle.rs`) and the batch and tensor
//! types (`batch.rs`). Same plan as the host [`crate::pipeline::Loader`]: the same seed gives
//! the same rows in the same order, so a device batch downloaded equals the host batch.

#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::pipeline::format_source::FormatSource;
use crate::pipeline::options::{LoaderOptions, LoaderState, PlanSetup};
use crate::pipeline::source::{ColumnInfo, RowSource};
use crate::pipeline::telemetry::{Counters, DeviceCounters, DeviceStats, LoaderStats};

mod batch;
mod batches;
#[cfg(feature = "cuda")]
mod cuda;
mod engine;
mod feed;
mod handle;
#[cfg(test)]
mod plan_tests;
mod producer;
#[cfg(feature = "wgpu")]
mod wgpu;
mod windows;

pub use batch::{GpuBatch, GpuTensor};
#[cfg(feature = "cuda")]
pub use cuda::{CudaBatch, CudaEngine, CudaTensor, DeviceLoader};
#[cfg(feature = "wgpu")]
pub use wgpu::{UPLOAD_THREADS_ENV, WgpuBatch, WgpuDeviceLoader, WgpuTensor};

pub(crate) use engine::DeviceEngine;
use engine::Geometry;
use handle::{DeviceHandle, Shape};
use producer::Producer;
use windows::window_byte_bound;

/// The loader into device memory: an iterator of `Result<GpuBatch<E>>` with the host
/// [`crate::pipeline::Loader`]'s plan, state and failure semantics (the first error is yielded
/// once, then the loader stops; [`state`](Self::state) points at the failed batch).
pub struct GpuLoader<E: DeviceEngine> {
    inner: DeviceHandle<E>,
    engine: Arc<E>,
}

impl<E: DeviceEngine> std::fmt::Debug for GpuLoader<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuLoader")
            .field("engine", &E::THREAD_NAME)
            .field("state", &self.inner.state)
            .field("remaining", &self.inner.remaining())
            .finish_non_exhaustive()
    }
}

/// The device loaders deliver fixed-shape columns only: a ragged column (rows of varying
/// length) is refused when a loader is built, naming it.
pub fn refuse_ragged(source: &dyn RowSource) -> Result<()> {
    match source.columns().iter().find(|c| c.ragged) {
        Some(c) => Err(Error::InvalidArgument(format!(
            "column '{}' is ragged (rows of varying length): the device loaders deliver fixed-shape columns only; load it with the host loader (backend cpu) and copy its values and offsets to the device",
            crate::error::escape_untrusted(&c.name)
        ))),
        None => Ok(()),
    }
}

impl<E: DeviceEngine> GpuLoader<E> {
    /// Starts a loader over `source` with `engine` holding every shard's key (in shard order);
    /// with `twin`, the benchmarks' plaintext twin (`crate::bench`): the same reads, staging,
    /// uploads and gathers with no tag check and no decryption.
    pub(crate) fn start(
        source: Arc<FormatSource>,
        engine: Arc<E>,
        opts: &LoaderOptions,
        twin: bool,
    ) -> Result<Self> {
        let built = Instant::now();
        if opts.pack.is_some() {
            return Err(Error::InvalidArgument(
                "pack: sequence packing is done by the host loader (backend cpu); the device loaders deliver rows".into(),
            ));
        }
        if opts.budget.is_some() {
            return Err(Error::InvalidArgument(
                "budget: token-budget batches are cut by the host loader (backend cpu); the device loaders deliver batches of batch_size rows".into(),
            ));
        }
        refuse_ragged(source.as_ref())?;
        if engine.key_count() != source.shard_count() {
            return Err(Error::InvalidArgument(format!(
                "{} keys on the device for {} shards",
                engine.key_count(),
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
            batch_rows,
            ..
        } = PlanSetup::new(source.as_ref(), opts)?;
        let window_bytes = window_byte_bound(
            &columns,
            chunk_size,
            block_rows,
            opts.window_blocks,
            &shard_rows,
        );
        usize::try_from(window_bytes)
            .ok()
            .filter(|&b| b < isize::MAX as usize / 4)
            .ok_or_else(|| Error::InvalidArgument("window too large for this machine".into()))?;
        let (packing, config) = engine.configure(&Geometry {
            columns: &columns,
            chunk_size,
            shard_rows: &shard_rows,
            window_bytes,
            batch_rows,
        })?;
        let counters = Arc::new(Counters::default());
        let device = Arc::new(DeviceCounters::default());
        let producer = Producer {
            source,
            engine: engine.clone(),
            config,
            packing,
            columns: columns.clone(),
            threads: opts.threads,
            twin,
            batch_rows,
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
        let span = (opts.start_epoch, opts.start_batch, opts.epochs);
        let inner = DeviceHandle::spawn(
            E::THREAD_NAME,
            opts,
            shape,
            counters,
            device,
            built,
            move |tx, stop| producer.run(&cfg, &shard_rows, span, tx, stop),
        )?;
        Ok(GpuLoader { inner, engine })
    }

    /// The position after the last batch handed out (resume with [`LoaderOptions::resume`]).
    pub fn state(&self) -> LoaderState {
        self.inner.state.clone()
    }

    /// Telemetry in the host loader's stages (`read` = reads into staging, `verify` = tag
    /// checks, `decrypt` = the window's decryption, `assemble` = gathers);
    /// [`device_stats`](Self::device_stats) splits them by thread.
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

    /// The engine (device, keys) the batches come from.
    pub fn engine(&self) -> &Arc<E> {
        &self.engine
    }
}

impl<E: DeviceEngine> Iterator for GpuLoader<E> {
    type Item = Result<GpuBatch<E>>;

    fn next(&mut self) -> Option<Result<GpuBatch<E>>> {
        self.inner.next_batch()
    }
}
