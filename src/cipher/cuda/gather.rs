//! Row gather on the GPU for device batches: copies shuffled rows out of a decrypted window
//! buffer into a batch's column buffer in one launch (`kernels/gather.cu`).
//!
//! The kernel ships as PTX (`kernels/gather.ptx`, NVRTC 13.0 output for `compute_75`, which the
//! driver JIT-compiles for any newer card), so the device loader needs no NVRTC at run time.
//! A unit test recompiles `gather.cu` with NVRTC 13.0 when present and checks the PTX is current.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use crate::error::{Error, Result};

/// The gather kernel's source.
pub const GATHER_CU: &str = include_str!("../../../kernels/gather.cu");
/// The gather kernel compiled by NVRTC 13.0 for `compute_75`.
pub const GATHER_PTX: &str = include_str!("../../../kernels/gather.ptx");
/// NVRTC options that produce [`GATHER_PTX`] from [`GATHER_CU`].
pub const GATHER_NVRTC_OPTIONS: [&str; 2] = ["--std=c++17", "--gpu-architecture=compute_75"];

const THREADS: u32 = 128;

fn err(what: &str, e: impl std::fmt::Display) -> Error {
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
            .map_err(|e| err("loading kernels/gather.ptx", e))?;
        let func = module
            .load_function("cs_gather_rows")
            .map_err(|e| err("cs_gather_rows missing from kernels/gather.ptx", e))?;
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
        check_pairs(pairs, row_bytes, src.len() as u64, dst.len() as u64)?;
        let flat: Vec<u64> = pairs.iter().flat_map(|&(s, d)| [s, d]).collect();
        let rows = u32::try_from(pairs.len())
            .map_err(|_| Error::InvalidArgument("more than 2^32 rows in one gather".into()))?;
        let d_pairs = stream
            .clone_htod(&flat[..])
            .map_err(|e| err("uploading gather offsets", e))?;
        let cfg = LaunchConfig {
            grid_dim: (rows.min(1 << 20), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel reads `row_bytes` at each `pairs[r].0` of `src` and writes them at
        // `pairs[r].1` of `dst`; every such range was checked above to lie inside its buffer,
        // and `d_pairs` holds exactly 2 × rows offsets. Argument types match the kernel's
        // signature (pointer, pointer, pointer, unsigned int, unsigned long long).
        unsafe {
            stream
                .launch_builder(&self.func)
                .arg(src)
                .arg(dst)
                .arg(&d_pairs)
                .arg(&rows)
                .arg(&row_bytes)
                .launch(cfg)
        }
        .map_err(|e| err("gather kernel launch", e))?;
        Ok(())
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

impl Gather {
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
        for (n, job) in jobs.iter().enumerate() {
            let dst = dsts.get(job.dst).ok_or_else(|| {
                Error::InvalidArgument(format!("gather job {n}: no destination {}", job.dst))
            })?;
            let rows = pairs.get(job.pairs.clone()).ok_or_else(|| {
                Error::InvalidArgument(format!("gather job {n}: pair range out of the list"))
            })?;
            check_pairs(rows, job.row_bytes, job.src.len() as u64, dst.len() as u64)?;
            u32::try_from(rows.len())
                .map_err(|_| Error::InvalidArgument("more than 2^32 rows in one gather".into()))?;
        }
        if pairs.is_empty() {
            return Ok(());
        }
        let flat: Vec<u64> = pairs.iter().flat_map(|&(s, d)| [s, d]).collect();
        let d_pairs = stream
            .clone_htod(&flat[..])
            .map_err(|e| err("uploading gather offsets", e))?;
        for job in jobs {
            if job.pairs.is_empty() || job.row_bytes == 0 {
                continue;
            }
            let rows = job.pairs.len() as u32; // checked above
            let view = d_pairs.slice(2 * job.pairs.start..2 * job.pairs.end);
            let dst = &mut dsts[job.dst];
            let cfg = LaunchConfig {
                grid_dim: (rows.min(1 << 20), 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: as in `gather`: every (offset + row_bytes) of this job was checked above
            // against `job.src` and `dst`, `view` holds exactly 2 × rows offsets, and the
            // argument types match the kernel's signature.
            unsafe {
                stream
                    .launch_builder(&self.func)
                    .arg(job.src)
                    .arg(dst)
                    .arg(&view)
                    .arg(&rows)
                    .arg(&job.row_bytes)
                    .launch(cfg)
            }
            .map_err(|e| err("gather kernel launch", e))?;
        }
        Ok(())
    }
}

/// Every row range `[offset, offset + row_bytes)` inside its buffer.
fn check_pairs(pairs: &[(u64, u64)], row_bytes: u64, sl: u64, dl: u64) -> Result<()> {
    for (i, &(s, d)) in pairs.iter().enumerate() {
        if s.checked_add(row_bytes).is_none_or(|e| e > sl)
            || d.checked_add(row_bytes).is_none_or(|e| e > dl)
        {
            return Err(Error::InvalidArgument(format!(
                "gather row {i}: range outside the source ({sl} B) or destination ({dl} B)"
            )));
        }
    }
    Ok(())
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
