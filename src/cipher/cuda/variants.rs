//! The AES-CTR kernel variants ([`CtrVariant`]): names, kernels, launch shapes, and loading a
//! variant's function with the shared memory it needs.
#![forbid(unsafe_code)]

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule};

/// Environment variable selecting the AES-CTR kernel variant ([`CtrVariant::name`]) at start-up.
pub const CTR_VARIANT_ENV: &str = "CIPHERSHARD_CUDA_CTR";

/// AES-256-CTR kernel variants (kernels/aes_gcm.cu), selectable at run time so one GPU run can
/// measure them all ([`kernel_bench`](crate::bench::cuda::kernel_bench)) and the fastest
/// verified one can be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtrVariant {
    /// Round 1: Te0 replicated per lane (32 KiB), two integer ops per lookup address.
    Replicated,
    /// Wide Te0/Te2 rows (64 KiB), one `__byte_perm` per lookup address; 512 threads.
    Wide2x512,
    /// As `Wide2x512` with 256-thread blocks (up to 3 per SM).
    Wide2x256,
    /// As `Wide2x256` with the round keys in registers (fewer shared loads, 2 blocks per SM).
    Wide2RegKeys,
    /// Four wide tables (128 KiB), no rotations; 1024 threads (registers capped at 64).
    Wide4x1024,
    /// Four wide tables, 512 threads (no register cap: no spills).
    Wide4x512,
}

impl CtrVariant {
    /// Every variant, in the order the benchmark runs them.
    pub const ALL: [CtrVariant; 6] = [
        CtrVariant::Replicated,
        CtrVariant::Wide2x512,
        CtrVariant::Wide2x256,
        CtrVariant::Wide2RegKeys,
        CtrVariant::Wide4x1024,
        CtrVariant::Wide4x512,
    ];
    /// The fastest verified variant on the H200 run of 2026-11-27 (docs/BENCHMARKS.md, run 2):
    /// 479.6 GB/s against 278.9 for `t1-replicated`.
    pub const DEFAULT: CtrVariant = CtrVariant::Wide2x512;

    /// Short name (for [`CTR_VARIANT_ENV`] and reports).
    pub fn name(self) -> &'static str {
        match self {
            CtrVariant::Replicated => "t1-replicated",
            CtrVariant::Wide2x512 => "w2-prmt-512",
            CtrVariant::Wide2x256 => "w2-prmt-256",
            CtrVariant::Wide2RegKeys => "w2-prmt-256-rk-regs",
            CtrVariant::Wide4x1024 => "w4-prmt-1024",
            CtrVariant::Wide4x512 => "w4-prmt-512",
        }
    }

    /// The variant called `name`.
    pub fn parse(name: &str) -> Option<CtrVariant> {
        Self::ALL.into_iter().find(|v| v.name() == name)
    }

    /// Position in [`CtrVariant::ALL`].
    pub(super) fn index(self) -> usize {
        Self::ALL
            .iter()
            .position(|v| *v == self)
            .expect("listed in ALL")
    }

    /// The kernel's name in the module.
    fn kernel(self) -> &'static str {
        match self {
            CtrVariant::Replicated => "cs_ctr",
            CtrVariant::Wide2x512 => "cs_ctr_w2",
            CtrVariant::Wide2x256 => "cs_ctr_w2b",
            CtrVariant::Wide2RegKeys => "cs_ctr_w2r",
            CtrVariant::Wide4x1024 => "cs_ctr_w4",
            CtrVariant::Wide4x512 => "cs_ctr_w4b",
        }
    }

    /// Threads per block: the kernel's `__launch_bounds__`.
    pub(super) fn threads(self) -> u32 {
        match self {
            CtrVariant::Replicated | CtrVariant::Wide2x256 | CtrVariant::Wide2RegKeys => 256,
            CtrVariant::Wide2x512 | CtrVariant::Wide4x512 => 512,
            CtrVariant::Wide4x1024 => 1024,
        }
    }

    /// Dynamic shared memory (the wide tables), bytes.
    pub(super) fn dynamic_smem(self) -> u32 {
        match self {
            CtrVariant::Replicated => 0,
            CtrVariant::Wide2x512 | CtrVariant::Wide2x256 | CtrVariant::Wide2RegKeys => 64 << 10,
            CtrVariant::Wide4x1024 | CtrVariant::Wide4x512 => 128 << 10,
        }
    }
}

/// Registers and local memory (spills) of a loaded kernel, from the driver.
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelInfo {
    /// Registers per thread.
    pub registers: i32,
    /// Local memory per thread in bytes (non-zero means register spills or a stack).
    pub local_bytes: i32,
}

/// What the driver says about a loaded kernel (`-1` where it does not answer).
pub(super) fn kernel_info(f: &CudaFunction) -> KernelInfo {
    use cudarc::driver::sys::CUfunction_attribute as A;
    KernelInfo {
        registers: f.get_attribute(A::CU_FUNC_ATTRIBUTE_NUM_REGS).unwrap_or(-1),
        local_bytes: f
            .get_attribute(A::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)
            .unwrap_or(-1),
    }
}

/// Loads a CTR variant's kernel and raises its dynamic shared-memory limit when it needs one.
pub(super) fn load_ctr(
    module: &Arc<CudaModule>,
    v: CtrVariant,
) -> std::result::Result<CudaFunction, String> {
    let f = module
        .load_function(v.kernel())
        .map_err(|e| format!("kernel {} missing from the module: {e}", v.kernel()))?;
    if v.dynamic_smem() > 0 {
        use cudarc::driver::sys::CUfunction_attribute as A;
        f.set_attribute(
            A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            v.dynamic_smem() as i32,
        )
        .map_err(|e| {
            format!(
                "the device cannot give {} KiB of shared memory to one block: {e}",
                v.dynamic_smem() >> 10
            )
        })?;
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctr_variants_have_unique_names_and_kernels_and_sane_launches() {
        let src = super::super::kernel_source();
        for v in CtrVariant::ALL {
            assert_eq!(CtrVariant::parse(v.name()), Some(v));
            assert_eq!(CtrVariant::ALL[v.index()], v);
            let k = v.kernel();
            assert!(
                src.contains(&format!("{k}(")) || src.contains(&format!("CS_CTR_WIDE({k},")),
                "{k}"
            );
            assert!(v.threads() % 32 == 0 && v.threads() <= 1024);
            assert!(v.dynamic_smem() <= 128 << 10);
        }
        let mut names: Vec<_> = CtrVariant::ALL.iter().map(|v| v.kernel()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CtrVariant::ALL.len());
        assert_eq!(CtrVariant::parse("nope"), None);
    }
}
