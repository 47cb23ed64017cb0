//! The AES-CTR kernel's variants (workgroup size, blocks per invocation, table layout,
//! runtime checks, unrolled rounds): the table every benchmark measures, the defaults, how a
//! device's variant is chosen, and the source rewriting behind `unrolled`.
#![forbid(unsafe_code)]

use super::adapter::AdapterSummary;
use super::failure::unavailable;
use crate::error::{Error, Result};

/// Environment variable selecting the AES-CTR kernel variant ([`KernelVariant::parse`]) when
/// [`super::WgpuOptions::kernel`] is not set: one GPU run can compare loaders across variants.
pub const KERNEL_VARIANT_ENV: &str = "CIPHERSHARD_WGPU_KERNEL";

/// A variant of the AES-CTR kernel (`shaders/aes_ctr.wgsl`), chosen at pipeline creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct KernelVariant {
    /// Invocations per workgroup: 256 or 512 (capped by the device's limit).
    pub workgroup_size: u32,
    /// Blocks per invocation: 1 (`main`) or 4 (`main4`, four independent blocks for ILP).
    pub blocks_per_invocation: u32,
    /// With one block per invocation: blocks each invocation encrypts one after another (1 to
    /// 8), so more blocks share the workgroup's table copy (32 KiB when banked).
    pub loop_blocks: u32,
    /// Copies of the table in workgroup memory: 1, or 32 interleaved one per bank (32 KiB; the
    /// CUDA kernel's conflict-free layout). Ignored when the table is read from storage.
    pub table_copies: u32,
    /// wgpu's shader runtime checks (index clamping, loop bounding), on by default. `false`
    /// builds the module as trusted: the AES kernel's indices are in range by construction
    /// (see `build_compute`), and each clamp costs an integer instruction per table lookup on
    /// a kernel that is integer-bound on NVIDIA (docs/BENCHMARKS.md, kernel technique).
    /// Measured per adapter by `bench::wgpu::kernel_bench`; off in [`KernelVariant::GPU_DEFAULT`] (H200 run 5).
    pub runtime_checks: bool,
    /// The 13 middle rounds written out in the source instead of a loop:
    /// every round key then has a constant index, and no loop is left to the driver's compiler.
    pub unrolled: bool,
}

/// Shorthand for the variant table below.
const fn variant(
    workgroup_size: u32,
    blocks_per_invocation: u32,
    loop_blocks: u32,
    table_copies: u32,
    runtime_checks: bool,
    unrolled: bool,
) -> KernelVariant {
    KernelVariant {
        workgroup_size,
        blocks_per_invocation,
        loop_blocks,
        table_copies,
        runtime_checks,
        unrolled,
    }
}

impl KernelVariant {
    /// The default on CPU (software) adapters, and the most portable shape: one block per
    /// invocation, 256 invocations, 1 KiB of workgroup memory, runtime checks on.
    pub const DEFAULT: KernelVariant = variant(256, 1, 1, 1, true, false);
    /// The default on GPUs: four blocks per invocation, 512 invocations, the bank-interleaved
    /// table (32 KiB; one copy where the device has less workgroup memory), built without
    /// runtime checks (every index is in range by construction: see `build_compute`). Fastest
    /// of the 17 variants on the H200 (Vulkan, driver 580, 2026-11-27): 244.8 GB/s against
    /// 184.8 for [`KernelVariant::DEFAULT`] and 193.7 for the same shape with checks
    /// (docs/BENCHMARKS.md, run 5).
    pub const GPU_DEFAULT: KernelVariant = variant(512, 4, 1, 32, false, false);
    /// Every variant `bench::wgpu::kernel_bench` measures: the WebGPU-portable shapes, the bank-interleaved
    /// table (CUDA's conflict-free layout, 32 KiB) filled once per 256 to 2048 blocks, and
    /// without wgpu's runtime checks and with the rounds unrolled, the two changes that cut
    /// integer instructions on an integer-bound kernel.
    pub const ALL: [KernelVariant; 17] = [
        KernelVariant::DEFAULT,
        variant(512, 1, 1, 1, true, false),
        variant(256, 4, 1, 1, true, false),
        variant(512, 4, 1, 1, true, false),
        variant(256, 1, 1, 32, true, false),
        variant(256, 4, 1, 32, true, false),
        variant(512, 4, 1, 32, true, false),
        variant(256, 1, 8, 32, true, false),
        variant(512, 1, 1, 1, false, false),
        variant(256, 1, 1, 32, false, false),
        variant(256, 4, 1, 32, false, false),
        variant(512, 4, 1, 32, false, false),
        variant(256, 1, 4, 32, false, false),
        variant(256, 1, 1, 32, true, true),
        variant(256, 1, 1, 32, false, true),
        variant(256, 1, 8, 32, false, true),
        variant(512, 4, 1, 32, false, true),
    ];

    /// The variant of [`KernelVariant::ALL`] with this name (as [`Display`] writes it, e.g.
    /// `wg256x1-banked`).
    ///
    /// [`Display`]: std::fmt::Display
    pub fn parse(name: &str) -> Option<KernelVariant> {
        KernelVariant::ALL
            .into_iter()
            .find(|v| v.to_string() == name)
    }

    /// The variant named by [`KERNEL_VARIANT_ENV`], if set; an unknown name is an error.
    fn from_env() -> Result<Option<KernelVariant>> {
        let Some(name) = std::env::var(KERNEL_VARIANT_ENV)
            .ok()
            .filter(|v| !v.is_empty())
        else {
            return Ok(None);
        };
        KernelVariant::parse(&name).map(Some).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{KERNEL_VARIANT_ENV}={name}: unknown wgpu kernel variant (one of: {})",
                KernelVariant::ALL.map(|v| v.to_string()).join(", ")
            ))
        })
    }

    /// The variant a device runs: `requested` (from [`super::WgpuOptions::kernel`]), else
    /// [`KERNEL_VARIANT_ENV`], else [`KernelVariant::GPU_DEFAULT`] on a GPU and
    /// [`KernelVariant::DEFAULT`] on a CPU adapter; checked for a shape the kernels support
    /// and fitted to the device: one table copy when the table is read from storage, or when
    /// the GPU default's 32 KiB table does not fit the workgroup memory, and the workgroup no
    /// wider than the device allows.
    pub(super) fn for_device(
        requested: Option<KernelVariant>,
        shared_table: bool,
        adapter: &AdapterSummary,
        limits: &::wgpu::Limits,
    ) -> Result<KernelVariant> {
        let (mut variant, chosen) = match requested
            .map(Ok)
            .or_else(|| KernelVariant::from_env().transpose())
        {
            Some(v) => (v?, true),
            None if adapter.is_cpu() => (KernelVariant::DEFAULT, false),
            None => (KernelVariant::GPU_DEFAULT, false),
        };
        if !matches!(variant.blocks_per_invocation, 1 | 4)
            || !matches!(variant.workgroup_size, 64 | 128 | 256 | 512 | 1024)
            || !matches!(variant.table_copies, 1 | 32)
            || !(1..=8).contains(&variant.loop_blocks)
            || (variant.loop_blocks > 1 && variant.blocks_per_invocation != 1)
        {
            return Err(Error::InvalidArgument(format!(
                "wgpu kernel variant {variant}: blocks per invocation must be 1 or 4, the \
                 workgroup size a power of two from 64 to 1024, table copies 1 or 32, and \
                 blocks in a loop 1 to 8 (with one block per invocation)"
            )));
        }
        if !shared_table {
            variant.table_copies = 1;
        }
        if !chosen && variant.table_copies * 1024 > limits.max_compute_workgroup_storage_size {
            // The GPU default's 32 KiB table where a device offers less (WebGPU's minimum is
            // 16 KiB): one copy, bank conflicts and all.
            variant.table_copies = 1;
        }
        if variant.table_copies * 1024 > limits.max_compute_workgroup_storage_size {
            return Err(unavailable(format!(
                "{adapter}: kernel variant {variant} needs {} KiB of workgroup memory, the \
                 device has {} bytes",
                variant.table_copies, limits.max_compute_workgroup_storage_size
            )));
        }
        variant.workgroup_size = variant
            .workgroup_size
            .min(limits.max_compute_invocations_per_workgroup)
            .min(limits.max_compute_workgroup_size_x);
        Ok(variant)
    }

    pub(super) fn entry_point(&self) -> &'static str {
        if self.blocks_per_invocation == 4 {
            "main4"
        } else {
            "main"
        }
    }

    /// Blocks one workgroup covers.
    pub(super) fn span_blocks(&self) -> u64 {
        u64::from(self.workgroup_size)
            * u64::from(self.blocks_per_invocation)
            * u64::from(self.loop_blocks)
    }
}

impl std::fmt::Display for KernelVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "wg{}x{}{}{}{}{}",
            self.workgroup_size,
            self.blocks_per_invocation,
            if self.loop_blocks > 1 {
                format!("-loop{}", self.loop_blocks)
            } else {
                String::new()
            },
            if self.table_copies == 32 {
                "-banked"
            } else {
                ""
            },
            if self.runtime_checks {
                ""
            } else {
                "-unchecked"
            },
            if self.unrolled { "-unrolled" } else { "" }
        )
    }
}

/// The loop over AES's 13 middle rounds as the CTR kernels write it.
pub(super) const ROUND_LOOP: &str = "for (var r = 1u; r < 14u; r++) {";

/// `source` with every [`ROUND_LOOP`] written out as 13 blocks `{ let r = Nu; <body> }`: the
/// same statements with constant round indices (the variants' `unrolled` option). The body
/// ends at the brace that closes the loop's own.
pub(super) fn unroll_rounds(source: &str) -> String {
    let mut out = String::with_capacity(source.len() * 8);
    let mut rest = source;
    while let Some(at) = rest.find(ROUND_LOOP) {
        out.push_str(&rest[..at]);
        let body_start = at + ROUND_LOOP.len();
        let mut depth = 1usize;
        let mut body_end = None;
        for (i, ch) in rest[body_start..].char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        body_end = Some(body_start + i);
                        break;
                    }
                }
                _ => {}
            }
        }
        // An unclosed loop: leave the text to the WGSL compiler, which reports it.
        let Some(body_end) = body_end else {
            out.push_str(&rest[at..]);
            return out;
        };
        let body = &rest[body_start..body_end];
        for r in 1..14 {
            out.push_str(&format!("{{ let r = {r}u;{body}}}\n    "));
        }
        rest = &rest[body_end + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_parse_by_their_names() {
        for v in KernelVariant::ALL {
            assert_eq!(KernelVariant::parse(&v.to_string()), Some(v));
        }
        let names: std::collections::HashSet<String> =
            KernelVariant::ALL.iter().map(|v| v.to_string()).collect();
        assert_eq!(
            names.len(),
            KernelVariant::ALL.len(),
            "two variants share a name"
        );
        // Both defaults are measured (and conformance-tested) with the rest.
        assert!(KernelVariant::ALL.contains(&KernelVariant::DEFAULT));
        assert!(KernelVariant::ALL.contains(&KernelVariant::GPU_DEFAULT));
        assert_eq!(KernelVariant::parse("wg256x3"), None);
        assert_eq!(KernelVariant::parse(""), None);
    }

    #[test]
    fn an_unclosed_round_loop_is_left_to_the_compiler() {
        // The WGSL compiler reports it.
        let broken = format!("fn f() {{ {ROUND_LOOP} let x = 1u; ");
        assert_eq!(unroll_rounds(&broken), broken);
    }
}
