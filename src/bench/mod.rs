//! Benchmarks and tuning sweeps, apart from the code they measure: the CLI's `bench`,
//! `scripts/gpu-check.sh` and the criterion benches use them; the backends expose what a
//! benchmark needs without containing one.
//!
//! - [`loader`]: the loader over an encrypted dataset and over its plaintext twin (the
//!   `twin` source wrapper), through the same pipeline, in one process.
//! - [`cold`]: page-cache eviction and the raw sequential read `bench --cold` compares with.
//! - [`cipher`]: the CPU backend against aws-lc-rs in one run.
//! - `cuda` (with the `cuda` feature): the CUDA kernels, every CTR variant checked against the
//!   CPU, and the batch path against its plaintext twin.
//! - `wgpu` (feature `wgpu`): the wgpu backend's kernel variants, tag-check placements, host
//!   round trip and device loader stages on this machine's adapter.

pub mod cipher;
pub mod cold;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod loader;
#[cfg(feature = "cuda")]
mod reader_pool;
mod twin;
#[cfg(feature = "wgpu")]
pub mod wgpu;
