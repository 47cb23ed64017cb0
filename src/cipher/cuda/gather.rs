//! Row gather on the GPU for device batches: copies shuffled rows out of a decrypted window
//! buffer into a batch's column buffers (`kernels/gather.cu`, in the same module as the AES
//! kernels: see `compile.rs`).
#![forbid(unsafe_code)]

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream};

use super::{compile, launch};
use crate::error::{Error, Result};

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
    /// The kernel in `ctx`: from the module a [`super::CudaCipher`] on `ctx` already loaded,
    /// else compiled (once per process) and loaded now.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Gather> {
        let func = compile::load(ctx)?
            .gather
            .clone()
            .map_err(|e| gather_err("loading the row gather kernel", e))?;
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
