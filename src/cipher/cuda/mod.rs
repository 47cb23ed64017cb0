//! CUDA backend: AES-256-CTR and a parallel GHASH on the GPU, through cudarc and NVRTC.
//!
//! The kernels (`kernels/aes_core.h` + `kernels/aes_gcm.cu`, and the row gather of device
//! batches, `kernels/gather.cu`) are compiled with NVRTC at first use (once per process, for the
//! device's compute capability) and loaded once per context (`compile.rs`). Two ways in:
//! - the [`Cipher`] / [`ChunkOpener`] trait on host buffers
//!   ([`CudaOpener`]: upload, verify + decrypt, download), so the conformance suite and
//!   cross-backend tests run on it exactly as on the CPU;
//! - [`BatchDecryptor`]: many chunks per batch from pinned staging buffers into a device buffer,
//!   with asynchronous copies on one stream per slot (double/triple buffering) and every tag
//!   checked before [`BatchDecryptor::wait`] hands the [`DeviceBatch`] out.
//!
//! The AES-CTR kernel has run-time selectable variants ([`CtrVariant`], `CIPHERSHARD_CUDA_CTR`);
//! [`crate::bench::cuda`] measures and checks them all in one run.
//!
//! Tags: GHASH runs on the GPU (segments folded in parallel, scaled by precomputed powers of H,
//! combined with `atomicXor`); only 16 bytes per chunk come back, and the host XORs `E_K(J0)`
//! and compares in constant time. No CUDA call is made before `is_culib_present` says the
//! driver library exists, so a machine without CUDA gets an error, never a panic.
//!
//! Files, one job each: `compile.rs` (sources → PTX → loaded kernels), `variants.rs` (the CTR
//! variants), `launch.rs` (every kernel launch and the `#[repr(C)]` parameters), `ffi.rs` (the
//! library probes and pinned allocation), `key.rs` ([`CudaKey`]), `opener.rs` ([`CudaOpener`]),
//! `batch.rs` ([`BatchDecryptor`]) with `staging.rs` (host copies into pinned staging), and
//! `gather.rs` ([`Gather`]). Unsafe code lives in `launch.rs` and `ffi.rs` only.
#![deny(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use cudarc::driver::{CudaContext, CudaStream, DriverError};

use super::{Backend, ChunkOpener, Cipher};
use crate::error::{Error, Result};
use crate::keys::DataKey;

mod batch;
mod compile;
mod ffi;
mod gather;
mod key;
mod launch;
mod opener;
mod staging;
mod variants;

pub use batch::{BatchChunk, BatchDecryptor, DeviceBatch, StagedChunk, Ticket, WaitError};
pub use compile::{PTX_ENV, compile_kernels, kernel_source};
pub use ffi::{driver_present, nvrtc_present};
pub use gather::{Gather, GatherJob};
pub use key::CudaKey;
pub use launch::MAX_CHUNKS_PER_LAUNCH;
pub use opener::CudaOpener;
pub use variants::{CTR_VARIANT_ENV, CtrVariant, KernelInfo};

/// What `crate::bench::cuda` uses of the backend, and nothing else does.
pub(crate) use ffi::alloc_pinned;
pub(crate) use launch::{ChunkDesc, DeviceDescs};

/// A device failure, saying what to do next.
pub(crate) fn backend_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Backend {
        backend: "cuda",
        reason: format!(
            "{what}: {e} (if the device ran out of memory use smaller batches; otherwise check `nvidia-smi`, \
             or use --backend cpu)"
        ),
    }
}

/// [`backend_err`] for a cudarc call, as a `map_err` argument.
pub(crate) fn drv(what: &'static str) -> impl Fn(DriverError) -> Error {
    move |e| backend_err(what, e)
}

/// Says whether a CUDA device answers, without panicking.
pub fn probe() -> std::result::Result<String, String> {
    if !driver_present() {
        return Err("no CUDA driver (libcuda.so not found): use --backend cpu".into());
    }
    if let Some(path) = compile::prebuilt_ptx_path() {
        if !path.is_file() {
            return Err(format!(
                "{PTX_ENV}={} is not a readable file: unset it or point it at a PTX file",
                path.display()
            ));
        }
    } else if !nvrtc_present() {
        return Err(
            "NVRTC library (libnvrtc.so) not found: install the CUDA toolkit or `pip install \
                    nvidia-cuda-nvrtc`, or set CIPHERSHARD_CUDA_PTX, or use --backend cpu"
                .into(),
        );
    }
    match CudaContext::device_count() {
        Ok(0) => return Err("the CUDA driver found no device: use --backend cpu".into()),
        Ok(_) => {}
        Err(e) => {
            return Err(format!(
                "the CUDA driver failed to initialize ({e}): use --backend cpu"
            ));
        }
    }
    let ctx = CudaContext::new(0)
        .map_err(|e| format!("cannot open CUDA device 0 ({e}): use --backend cpu"))?;
    let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
    let (ma, mi) = ctx.compute_capability().unwrap_or((0, 0));
    Ok(format!("{name} (compute capability {ma}.{mi})"))
}

/// Creates the CUDA backend on device 0.
pub fn create() -> Result<Arc<dyn Cipher>> {
    Ok(CudaCipher::new(0)?)
}

/// Context, stream and loaded kernels, shared by the cipher, its keys and batch decryptors.
struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    k: Arc<compile::Kernels>,
    name: String,
    /// Index into [`CtrVariant::ALL`] of the CTR kernel in use.
    ctr_variant: AtomicUsize,
}

impl Device {
    fn ctr_variant(&self) -> CtrVariant {
        CtrVariant::ALL[self.ctr_variant.load(Ordering::Relaxed)]
    }
}

/// The CUDA backend (one device).
pub struct CudaCipher {
    dev: Arc<Device>,
}

impl CudaCipher {
    /// Opens device `ordinal`, compiling (once per process) and loading the kernels.
    pub fn new(ordinal: usize) -> Result<Arc<CudaCipher>> {
        probe().map_err(|reason| Error::BackendUnavailable {
            backend: "cuda",
            reason,
        })?;
        let ctx = CudaContext::new(ordinal).map_err(drv("cannot open the CUDA device"))?;
        let k = compile::load(&ctx)?;
        if let Err(e) = &k.ctr[CtrVariant::Replicated.index()] {
            return Err(Error::Backend {
                backend: "cuda",
                reason: format!("{e} (use --backend cpu)"),
            });
        }
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let stream = ctx.new_stream().map_err(drv("creating a stream"))?;
        let cipher = CudaCipher {
            dev: Arc::new(Device {
                ctx,
                stream,
                k,
                name,
                ctr_variant: AtomicUsize::new(CtrVariant::DEFAULT.index()),
            }),
        };
        if let Some(v) = std::env::var(CTR_VARIANT_ENV)
            .ok()
            .filter(|v| !v.is_empty())
        {
            let variant = CtrVariant::parse(&v).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{CTR_VARIANT_ENV}={v}: unknown CTR kernel variant (one of: {})",
                    CtrVariant::ALL.map(CtrVariant::name).join(", ")
                ))
            })?;
            cipher.set_ctr_variant(variant)?;
        }
        Ok(Arc::new(cipher))
    }

    /// Selects the AES-CTR kernel used from now on by every key and batch of this device.
    pub fn set_ctr_variant(&self, v: CtrVariant) -> Result<()> {
        if let Err(e) = &self.dev.k.ctr[v.index()] {
            return Err(Error::BackendUnavailable {
                backend: "cuda",
                reason: format!("CTR kernel variant {}: {e}", v.name()),
            });
        }
        self.dev.ctr_variant.store(v.index(), Ordering::Relaxed);
        Ok(())
    }

    /// The AES-CTR kernel variant in use.
    pub fn ctr_variant(&self) -> CtrVariant {
        self.dev.ctr_variant()
    }

    /// Every CTR variant with its registers/spills, or why it cannot run on this device.
    pub fn ctr_variants(&self) -> Vec<(CtrVariant, std::result::Result<KernelInfo, String>)> {
        CtrVariant::ALL
            .iter()
            .zip(&self.dev.k.ctr)
            .map(|(&v, f)| {
                (
                    v,
                    f.as_ref().map(variants::kernel_info).map_err(Clone::clone),
                )
            })
            .collect()
    }

    /// Prepares a data key on the device (round keys, GHASH tables), for [`BatchDecryptor`].
    pub fn prepare_device(&self, key: &DataKey) -> Result<Arc<CudaKey>> {
        CudaKey::new(&self.dev, key).map(Arc::new)
    }

    /// A batch decryptor with `slots` buffers (2 = double, 3 = triple buffering), each holding
    /// up to `slot_bytes` of ciphertext.
    pub fn batch_decryptor(&self, slots: usize, slot_bytes: usize) -> Result<BatchDecryptor> {
        BatchDecryptor::new(&self.dev, slots, slot_bytes)
    }

    /// The context (for callers that allocate their own device memory).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.dev.ctx
    }

    /// The stream keys are prepared on and the trait-level opener runs on.
    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.dev.stream
    }
}

impl Cipher for CudaCipher {
    fn backend(&self) -> Backend {
        Backend::Cuda
    }
    fn describe(&self) -> String {
        format!(
            "{} ({}, AES T-tables in shared memory [{}], GHASH on the GPU)",
            self.dev.name,
            self.dev.k.arch,
            self.dev.ctr_variant().name()
        )
    }
    fn prepare(&self, key: &DataKey) -> Result<Box<dyn ChunkOpener>> {
        let dkey = Arc::new(CudaKey::new(&self.dev, key)?);
        Ok(Box::new(CudaOpener::new(dkey)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_and_create_fail_cleanly_without_a_driver() {
        if driver_present() {
            return;
        }
        let why = probe().unwrap_err();
        assert!(
            why.contains("libcuda") && why.contains("--backend cpu"),
            "{why}"
        );
        match create() {
            Err(Error::BackendUnavailable {
                backend: "cuda", ..
            }) => {}
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("created a CUDA backend without a driver"),
        }
    }
}
