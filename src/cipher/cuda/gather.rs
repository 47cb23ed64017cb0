//! Row gather on the GPU for device batches: copies shuffled rows out of a decrypted window
//! buffer into a batch's column buffer in one launch (`kernels/gather.cu`).
//!
//! The kernel ships as PTX (`kernels/gather.ptx`, NVRTC 13.0 output for `compute_75`, which the
//! driver JIT-compiles for any newer card), so the device loader needs no NVRTC at run time.
//! A unit test recompiles `gather.cu` with NVRTC 13.0 when present and checks the PTX is current.
#![forbid(unsafe_code)]

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream};
use cudarc::nvrtc::Ptx;

use super::launch;
use crate::error::{Error, Result};

/// The gather kernel's source.
pub const GATHER_CU: &str = include_str!("../../../kernels/gather.cu");
/// The gather kernel compiled by NVRTC 13.0 for `compute_75`.
pub const GATHER_PTX: &str = include_str!("../../../kernels/gather.ptx");
/// NVRTC options that produce [`GATHER_PTX`] from [`GATHER_CU`].
pub const GATHER_NVRTC_OPTIONS: [&str; 2] = ["--std=c++17", "--gpu-architecture=compute_75"];

/// An error of the gather path, saying what to do next.
pub(super) fn gather_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Backend {
        backend: "cuda",
        reason: format!(
            "{what}: {e} (if the device ran out of memory use smaller batches; otherwise check \
             `nvidia-smi`, or use the host loader)"
        ),
    }
}

/// The loaded `cs_gather_rows` kernel of one context.
pub struct Gather {
    func: CudaFunction,
}

impl Gather {
    /// Loads the kernel into `ctx` from the embedded PTX.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Gather> {
        let module = ctx
            .load_module(Ptx::from_src(GATHER_PTX))
            .map_err(|e| gather_err("loading kernels/gather.ptx", e))?;
        let func = module
            .load_function("cs_gather_rows")
            .map_err(|e| gather_err("cs_gather_rows missing from kernels/gather.ptx", e))?;
        Ok(Gather { func })
    }

    /// Enqueues on `stream` the copy of `pairs.len()` rows of `row_bytes` bytes: row `r` from
    /// `src[pairs[r].0..]` to `dst[pairs[r].1..]`. Every range is checked against both buffers
    /// first; nothing is launched for an empty list.
    pub fn gather(
        &self,
        stream: &Arc<CudaStream>,
        src: &CudaSlice<u8>,
        dst: &mut CudaSlice<u8>,
        pairs: &[(u64, u64)],
        row_bytes: u64,
    ) -> Result<()> {
        if pairs.is_empty() || row_bytes == 0 {
            return Ok(());
        }
        let job = GatherJob {
            src,
            dst: 0,
            pairs: 0..pairs.len(),
            row_bytes,
        };
        launch::gather_rows(&self.func, stream, &[job], pairs, std::slice::from_mut(dst))
    }

    /// Enqueues every job of a batch on `stream` with one upload of all their offsets (instead
    /// of one allocation and upload per launch). `pairs[i] = (source offset, destination
    /// offset)`; every range is checked against its buffers before anything is enqueued.
    pub fn gather_many(
        &self,
        stream: &Arc<CudaStream>,
        jobs: &[GatherJob<'_>],
        pairs: &[(u64, u64)],
        dsts: &mut [CudaSlice<u8>],
    ) -> Result<()> {
        launch::gather_rows(&self.func, stream, jobs, pairs, dsts)
    }
}

/// One launch of a batch gather: rows `pairs` (a range of the flat pair list given to
/// [`Gather::gather_many`]) of `row_bytes` bytes from `src` into destination buffer `dst`.
pub struct GatherJob<'a> {
    /// The source (a verified window buffer).
    pub src: &'a CudaSlice<u8>,
    /// Index of the destination in the `dsts` given to [`Gather::gather_many`].
    pub dst: usize,
    /// Range of pairs (not words) in the flat pair list.
    pub pairs: std::ops::Range<usize>,
    /// Bytes per row.
    pub row_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_ptx_is_current() {
        assert!(GATHER_PTX.contains(".entry cs_gather_rows"));
        if !super::super::nvrtc_present() {
            eprintln!("SKIPPED freshness check: libnvrtc not found");
            return;
        }
        let opts = cudarc::nvrtc::CompileOptions {
            options: GATHER_NVRTC_OPTIONS.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(GATHER_CU, opts)
            .unwrap_or_else(|e| panic!("kernels/gather.cu does not compile: {e}"));
        let fresh = ptx.to_src();
        if !fresh.contains("release 13.0,") {
            eprintln!("SKIPPED freshness check: NVRTC is not 13.0 (kernel compiles)");
            return;
        }
        let body = |s: &str| {
            s.lines()
                .filter(|l| !l.starts_with("//"))
                .map(str::trim_end)
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            body(&fresh),
            body(GATHER_PTX),
            "kernels/gather.ptx is stale: regenerate it from kernels/gather.cu with NVRTC 13.0 \
             ({GATHER_NVRTC_OPTIONS:?})"
        );
    }
}
