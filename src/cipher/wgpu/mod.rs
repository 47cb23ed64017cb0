//! Portable GPU backend through wgpu (Vulkan, Metal, DX12): AES-256-CTR in WGSL
//! (`shaders/aes_ctr.wgsl`) and the GCM tag check either on the GPU (`shaders/ghash.wgsl`) or
//! on the calling thread overlapped with the GPU pass; and, for device-resident batches,
//! window decryption and row gather on the GPU ([`WgpuBatchEngine`]).
//!
//! Nothing is released before the tag verified: the plaintext stays in GPU / mapped staging
//! memory and is copied into the caller's buffer only afterwards. On a mismatch the destination
//! is zeroed and the GPU buffers holding plaintext are cleared.
//!
//! Where the tag is checked is a setting ([`WgpuOptions::gpu_ghash`],
//! [`WgpuCipher::set_gpu_ghash`]), the CPU by default; constructing the backend times nothing.
//!
//! GHASH on the GPU: in the same submission as the CTR pass, before it, each invocation runs
//! Horner's rule over 16 ciphertext blocks with a 4-bit Shoup table of H in workgroup memory and
//! multiplies by its power of H (uploaded per key); each workgroup XOR-reduces its sums. The
//! host reads those partial sums (16 bytes per 64 KiB), combines them with powers of H, adds
//! the AAD and length blocks and compares tags in constant time, then reads the plaintext back.
//! Chunks bigger than one piece (128 MiB by default) check on the CPU instead (every piece
//! would have to be held back).
//!
//! GHASH on the CPU (the default; on CPU-type adapters such as lavapipe the GPU GHASH only
//! competes for the same cores) runs on the calling thread through the CPU backend's
//! verify (aws-lc, 27 GB/s on one core here against 0.23 GB/s through lavapipe,
//! `bench::wgpu::kernel_bench` on 2 shared vCPUs) while the GPU decrypts the first piece.
//!
//! The device, pipeline, bind-group layout and T-table live in one context created once per
//! [`WgpuCipher`] and reused, with four *lanes* of upload/work/readback buffers and parameters:
//! concurrent calls (the host loader's threads) each take a free lane, so their round trips
//! overlap. Chunks bigger than a piece (128 MiB, or the device's
//! `max_storage_buffer_binding_size` if lower) are dispatched in pieces.
//!
//! If the device is lost or a GPU operation fails, the call returns the error (its destination
//! zeroed), and the failure is recorded ([`WgpuCipher::health`]) so every later call on the
//! device fails fast with it. Nothing panics.
//!
//! # Files
//!
//! Each file has one job; they depend on each other in this order only (none on a later one),
//! and on the types this file defines:
//!
//! - `failure.rs`: error constructors and the device's failure slot;
//! - `params.rs`: the `#[repr(C)]` parameter structs and shapes shared with the WGSL;
//! - `tables.rs`: S-box, T-table, key expansion, GF(2^128) arithmetic, streaming GHASH;
//! - `adapter.rs`: the process's wgpu instance, the adapter, opening its device;
//! - `variants.rs`: the AES-CTR kernel variants and the `unrolled` source rewriting;
//! - `pipelines.rs`: the shader sources and pipeline builds (the one `unsafe` block);
//! - `context.rs`: what a device shares (pipelines, T-table, lanes) and the GPU call helpers;
//! - `ghash.rs`: the tag check on the GPU;
//! - `opener.rs`: [`WgpuOpener`], chunks opened from host memory;
//! - `ring.rs`, `gather.rs`, `batch.rs`: [`UploadRing`], the row gather, [`WgpuBatchEngine`].
//!
//! Benchmarks and sweeps of this backend live in `crate::bench::wgpu`; the backend exposes the
//! primitives they time (`pub(crate)`) without containing them.

// `forbid` here would reach `pipelines.rs`, whose trusted shader module is the one `unsafe`
// block of the backend (allowed there on that statement alone); every other file forbids it.
#![deny(unsafe_code)]

mod adapter;
mod batch;
#[cfg(test)]
mod batch_tests;
mod context;
mod failure;
mod gather;
mod ghash;
mod opener;
mod params;
mod pipelines;
mod ring;
mod tables;
mod variants;

use std::sync::Arc;
use std::sync::atomic::Ordering;

pub use adapter::{AdapterSummary, gpu_adapter_present, probe, probe_adapter};
pub use batch::{WgpuBatchEngine, WindowChunk};
pub(crate) use failure::backend_err;
pub use gather::GatherJob;
pub use opener::WgpuOpener;
pub use ring::UploadRing;
pub use variants::{KERNEL_VARIANT_ENV, KernelVariant};

use super::{Backend, ChunkOpener, Cipher};
use crate::error::Result;
use crate::keys::DataKey;
use context::Context;

/// Creates the wgpu backend on the best adapter, whatever its type (an explicit
/// `--backend wgpu` does use a CPU adapter such as lavapipe).
pub fn create() -> Result<Arc<dyn Cipher>> {
    Ok(Arc::new(WgpuCipher::new(WgpuOptions::default())?))
}

/// Creates the wgpu backend on a real GPU only: refuses a CPU-type adapter (lavapipe and the
/// like are slower than the CPU backend). Times nothing: `Backend::Auto`'s selection
/// ([`super::select_auto`]) does that, and sets where tags are checked.
pub fn create_gpu_only() -> Result<Arc<dyn Cipher>> {
    Ok(Arc::new(WgpuCipher::new(WgpuOptions {
        allow_cpu_adapter: false,
        ..WgpuOptions::default()
    })?))
}

/// Construction options for [`WgpuCipher`].
#[derive(Debug, Clone)]
pub struct WgpuOptions {
    /// Accept an adapter of `DeviceType::Cpu`.
    pub allow_cpu_adapter: bool,
    /// Cap on the bytes processed per dispatch (default 128 MiB, never above the device's
    /// storage binding limit): the openers' pieces, and the device loader's window pieces (a
    /// window above it is split, its buffers and upload slots sized by it; at least one chunk
    /// plus a row). Lower it to force piecewise dispatch (tests) or to bound the staging memory.
    pub max_piece_bytes: Option<u64>,
    /// Copy the AES table into workgroup memory (`None`/`Some(true)`, the usual GPU layout) or
    /// read it from the storage buffer (`Some(false)`). On lavapipe the two measured the same
    /// within the noise (0.05-0.14 GB/s each, alternating runs); kept to compare on real GPUs.
    pub shared_table: Option<bool>,
    /// The AES-CTR kernel variant (default: [`KERNEL_VARIANT_ENV`] if set, else
    /// [`KernelVariant::GPU_DEFAULT`] on a GPU and [`KernelVariant::DEFAULT`] on a CPU adapter).
    pub kernel: Option<KernelVariant>,
    /// Where the tag check of `open` runs: `true` on the GPU (`shaders/ghash.wgsl`, partial sums
    /// read back before any plaintext is), `false` (the default) on one CPU thread overlapped
    /// with the GPU pass. The GPU check costs a second mapping round trip per call, the CPU
    /// check a GHASH pass (aws-lc, ~25 GB/s per core here) that overlaps the GPU's work; on the
    /// H200 the CPU check was the faster (docs/BENCHMARKS.md, run 5), and on CPU-type adapters
    /// (lavapipe) a GPU GHASH only competes for the same cores. The backend never times this
    /// itself: the process-wide auto-selection decides and passes it in (or calls
    /// [`WgpuCipher::set_gpu_ghash`]).
    pub gpu_ghash: bool,
}

impl Default for WgpuOptions {
    fn default() -> Self {
        WgpuOptions {
            allow_cpu_adapter: true,
            max_piece_bytes: None,
            shared_table: None,
            kernel: None,
            gpu_ghash: false,
        }
    }
}

/// The wgpu backend.
pub struct WgpuCipher {
    ctx: Arc<Context>,
}

impl std::fmt::Debug for WgpuCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuCipher")
            .field("adapter", &self.ctx.adapter.to_string())
            .finish()
    }
}

impl WgpuCipher {
    /// Opens the best adapter and builds the device, pipeline and buffers. Times nothing.
    pub fn new(options: WgpuOptions) -> Result<Self> {
        Ok(WgpuCipher {
            ctx: Arc::new(Context::open(&options)?),
        })
    }

    /// The adapter in use.
    pub fn adapter(&self) -> &AdapterSummary {
        &self.ctx.adapter
    }

    /// Whether openers prepared now check tags on the GPU (see [`WgpuOptions::gpu_ghash`]).
    pub fn gpu_ghash(&self) -> bool {
        self.ctx.gpu_ghash.load(Ordering::Relaxed)
    }

    /// Where openers prepared from now on check tags: on the GPU (`true`) or on the calling
    /// thread (see [`WgpuOptions::gpu_ghash`]). Openers prepared before keep their placement.
    pub fn set_gpu_ghash(&self, on: bool) {
        self.ctx.gpu_ghash.store(on, Ordering::Relaxed);
    }

    /// [`Cipher::prepare`] with the tag check of `open` on the GPU (`gpu_ghash`) or on the
    /// calling thread, whatever this backend's setting: what a timing of the two placements
    /// needs.
    pub fn prepare_with_tag_placement(
        &self,
        key: &DataKey,
        gpu_ghash: bool,
    ) -> Result<Box<dyn ChunkOpener>> {
        Ok(Box::new(self.prepare_opener(key, gpu_ghash)?))
    }

    /// Bytes processed per dispatch at most.
    pub fn piece_bytes(&self) -> u64 {
        self.ctx.piece_bytes
    }

    /// `Ok` while the device works; the first GPU failure (device lost, mapping failure,
    /// validation error) as `Error::Backend` afterwards: every later GPU call fails with it.
    pub fn health(&self) -> Result<()> {
        self.ctx.health()
    }

    /// The concrete opener behind [`WgpuCipher::prepare_with_tag_placement`] (benchmarks use
    /// its `pub(crate)` primitives).
    pub(crate) fn prepare_opener(&self, key: &DataKey, gpu_ghash: bool) -> Result<WgpuOpener> {
        self.health()?;
        WgpuOpener::new(self.ctx.clone(), key, gpu_ghash)
    }

    /// A new backend on the same adapter with this one's table placement, piece size and tag
    /// placement, running `kernel` (a device of its own: benchmarks compare variants).
    pub(crate) fn with_kernel(&self, kernel: KernelVariant) -> Result<WgpuCipher> {
        WgpuCipher::new(WgpuOptions {
            shared_table: Some(self.ctx.shared_table),
            max_piece_bytes: Some(self.ctx.piece_bytes),
            kernel: Some(kernel),
            gpu_ghash: self.gpu_ghash(),
            allow_cpu_adapter: true,
        })
    }

    /// The kernel variant the device runs (after fitting it to the device).
    pub(crate) fn kernel_variant(&self) -> KernelVariant {
        self.ctx.variant
    }

    /// Whether the kernels copy the AES table into workgroup memory.
    pub(crate) fn shared_table(&self) -> bool {
        self.ctx.shared_table
    }
}

impl Cipher for WgpuCipher {
    fn backend(&self) -> Backend {
        Backend::Wgpu
    }
    fn describe(&self) -> String {
        format!("wgpu: {}", self.ctx.adapter)
    }
    fn prepare(&self, key: &DataKey) -> Result<Box<dyn ChunkOpener>> {
        self.prepare_with_tag_placement(key, self.gpu_ghash())
    }
}
