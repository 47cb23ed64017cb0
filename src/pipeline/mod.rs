//! The loader pipeline: sampling plan → worker threads that read, verify and decrypt chunks
//! into pooled, page-aligned batch buffers → batches in plan order. See docs/LOADER.md.

pub mod loader;
pub mod pool;
pub mod sampler;
pub mod source;
pub mod telemetry;

pub use loader::{Batch, DecryptMode, Loader, LoaderOptions, LoaderState, Tensor};
pub use pool::{Element, HOST_ALIGN, PinHook};
pub use sampler::{RowRef, SamplerConfig, epoch_batches};
pub use source::{AAD_LEN, ChunkSpec, ColumnInfo, RowSource};
pub use telemetry::{DeviceStats, LoaderStats, StageStats};
#[cfg(feature = "cuda")]
pub mod device;
#[cfg(feature = "cuda")]
pub use device::{CudaBatch, CudaTensor, DeviceLoader};
pub mod format_source;
pub use format_source::FormatSource;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) mod device_shell;
#[cfg(feature = "wgpu")]
pub mod wgpu_device;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod window_plan;
#[cfg(feature = "wgpu")]
pub use wgpu_device::{WgpuBatch, WgpuDeviceLoader, WgpuTensor};
