//! The loader pipeline: sampling plan → worker threads that read, verify and decrypt chunks
//! into pooled, page-aligned batch buffers → batches in plan order. See docs/LOADER.md.
//!
//! - [`options`]: what every loader shares (options, state, setup, chunk keys);
//! - [`sampler`]: the shuffle plan (blocks, windows, ranks, batches); `budget`: batches cut by
//!   a token budget over that plan;
//! - [`host`]: the host loader (batches in host memory);
//! - [`device`]: the device loader (batches in GPU memory), one engine over a trait per
//!   GPU backend;
//! - [`source`] and [`format_source`]: what a loader reads (rows, columns, sealed chunks);
//! - [`pool`] and [`telemetry`]: buffer pools and per-stage counters.

mod budget;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub mod device;
pub mod format_source;
pub mod host;
pub mod options;
pub mod pool;
pub mod sampler;
pub mod source;
pub mod telemetry;

#[cfg(feature = "cuda")]
pub use device::{CudaBatch, CudaTensor, DeviceLoader};
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub use device::{GpuBatch, GpuLoader, GpuTensor};
#[cfg(feature = "wgpu")]
pub use device::{WgpuBatch, WgpuDeviceLoader, WgpuTensor};
pub use format_source::FormatSource;
pub use host::{Batch, Loader, Padded, Tensor};
pub use options::{DecryptMode, LoaderOptions, LoaderState, PackOptions, TokenBudget};
pub use pool::{Element, HOST_ALIGN, PinHook};
pub use sampler::{RowRef, SamplerConfig, epoch_batches};
pub use source::{AAD_LEN, ChunkSpec, ColumnInfo, RowSource};
pub use telemetry::{DeviceStats, LoaderStats, StageStats};
