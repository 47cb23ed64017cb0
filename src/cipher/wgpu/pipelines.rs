//! The WGSL sources and the compute pipelines built from them, once per device: the AES-CTR
//! kernel (`aes_core.wgsl` + `aes_ctr.wgsl`, per kernel variant), the GHASH partial sums
//! (`ghash.wgsl`), the window CTR kernel (`aes_core.wgsl` + `aes_ctr_batch.wgsl`) and the row
//! gather (`gather.wgsl`). A compile or validation error comes back as text (wgpu's default
//! would panic).
//!
//! The backend's one `unsafe` block lives here: the AES-CTR kernel may be built without wgpu's
//! runtime checks (see [`build_compute`]). Every other file of `cipher::wgpu` forbids unsafe
//! code (`mod.rs` denies it, as a `forbid` there would reach this file too); here it is allowed
//! on that one statement.

use std::borrow::Cow;
use std::num::NonZeroU64;

use super::params::{GHASH_SEGMENT, GatherParams};
use super::variants::{KernelVariant, unroll_rounds};

/// The AES-CTR kernel: the AES core shared by the CTR kernels (overrides, T-table, round
/// functions), then this kernel's entry file.
pub(super) const SHADER: &str = concat!(
    include_str!("../../../shaders/aes_core.wgsl"),
    include_str!("../../../shaders/aes_ctr.wgsl")
);
/// The AES-CTR kernel with its rounds unrolled (built once; the unchecked build accepts only
/// this text and [`SHADER`]).
static UNROLLED_SHADER: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| unroll_rounds(SHADER));
/// The GHASH shader (partial sums with powers of H).
const GHASH_SHADER: &str = include_str!("../../../shaders/ghash.wgsl");
/// The window CTR kernel: the AES core, then its entry file.
pub(super) const BATCH_SHADER: &str = concat!(
    include_str!("../../../shaders/aes_core.wgsl"),
    include_str!("../../../shaders/aes_ctr_batch.wgsl")
);
/// The row gather kernel.
const GATHER_SHADER: &str = include_str!("../../../shaders/gather.wgsl");

/// A pipeline and its bind-group layout, or why it did not build.
type Built = std::result::Result<(::wgpu::ComputePipeline, ::wgpu::BindGroupLayout), String>;

/// Compiles the AES-CTR WGSL `source` ([`SHADER`] but in tests) and builds its pipeline for
/// `variant`, with the T-table in workgroup memory (`shared_table`) or read from storage.
pub(super) fn build_pipeline(
    device: &::wgpu::Device,
    source: &str,
    shared_table: bool,
    variant: KernelVariant,
) -> Built {
    let (storage, uniform) = binding_types();
    let [shared, wg, copies] = core_constants(shared_table, variant);
    build_compute(
        device,
        "aes_ctr",
        &variant_source(source, variant),
        variant.entry_point(),
        &[uniform, storage(true), uniform, storage(false)],
        &[shared, wg, copies, ("LOOP", f64::from(variant.loop_blocks))],
        variant.runtime_checks,
    )
}

/// Builds the GHASH pipeline (`shaders/ghash.wgsl`).
pub(super) fn build_ghash_pipeline(device: &::wgpu::Device) -> Built {
    let (storage, uniform) = binding_types();
    build_compute(
        device,
        "ghash",
        GHASH_SHADER,
        "main",
        &[
            uniform,
            storage(true),
            storage(true),
            storage(true),
            storage(false),
        ],
        &[("SEGMENT", GHASH_SEGMENT as f64)],
        true,
    )
}

/// Builds the window CTR pipeline (`shaders/aes_ctr_batch.wgsl`) with the device's table
/// placement and `variant`'s workgroup size, table copies and unrolling. Always with runtime
/// checks: the trusted build is reserved for the standalone kernel.
pub(super) fn build_batch_pipeline(
    device: &::wgpu::Device,
    shared_table: bool,
    variant: KernelVariant,
) -> Built {
    let (storage, uniform) = binding_types();
    build_compute(
        device,
        "aes_ctr_batch",
        &variant_source(BATCH_SHADER, variant),
        "main",
        &[
            storage(true),
            storage(true),
            uniform,
            storage(true),
            storage(false),
        ],
        &core_constants(shared_table, variant),
        true,
    )
}

/// `source` (a CTR kernel), its rounds unrolled if `variant` says so.
fn variant_source(source: &str, variant: KernelVariant) -> Cow<'_, str> {
    if variant.unrolled {
        Cow::Owned(unroll_rounds(source))
    } else {
        Cow::Borrowed(source)
    }
}

/// The AES core's overrides (`aes_core.wgsl`): table placement, workgroup size, table copies.
fn core_constants(shared_table: bool, variant: KernelVariant) -> [(&'static str, f64); 3] {
    [
        ("shared_table", if shared_table { 1.0 } else { 0.0 }),
        ("WG", f64::from(variant.workgroup_size)),
        ("COPIES", f64::from(variant.table_copies)),
    ]
}

/// Builds the row gather pipeline (`shaders/gather.wgsl`); its parameters sit at dynamic
/// offsets of one uniform buffer, one entry per dispatch.
pub(super) fn build_gather_pipeline(device: &::wgpu::Device) -> Built {
    let (storage, _) = binding_types();
    let dynamic_uniform = ::wgpu::BindingType::Buffer {
        ty: ::wgpu::BufferBindingType::Uniform,
        has_dynamic_offset: true,
        min_binding_size: NonZeroU64::new(std::mem::size_of::<GatherParams>() as u64),
    };
    build_compute(
        device,
        "gather",
        GATHER_SHADER,
        "main",
        &[
            dynamic_uniform,
            storage(true),
            storage(true),
            storage(false),
        ],
        &[],
        true,
    )
}

/// Storage (read-only or not) and uniform binding types.
fn binding_types() -> (fn(bool) -> ::wgpu::BindingType, ::wgpu::BindingType) {
    fn storage(read_only: bool) -> ::wgpu::BindingType {
        ::wgpu::BindingType::Buffer {
            ty: ::wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        }
    }
    let uniform = ::wgpu::BindingType::Buffer {
        ty: ::wgpu::BufferBindingType::Uniform,
        has_dynamic_offset: false,
        min_binding_size: None,
    };
    (storage, uniform)
}

/// The first `size` bytes of `buffer` as a binding.
pub(super) fn entire(buffer: &::wgpu::Buffer, size: u64) -> ::wgpu::BindingResource<'_> {
    ::wgpu::BindingResource::Buffer(::wgpu::BufferBinding {
        buffer,
        offset: 0,
        size: NonZeroU64::new(size),
    })
}

/// Compiles `source` and builds a compute pipeline (entry point `entry_point`) whose bindings
/// 0.. have the given types. `runtime_checks: false` (wgpu's index clamping and loop bounding
/// off) is accepted for the AES-CTR kernel's text only.
fn build_compute(
    device: &::wgpu::Device,
    label: &str,
    source: &str,
    entry_point: &str,
    bindings: &[::wgpu::BindingType],
    constants: &[(&str, f64)],
    runtime_checks: bool,
) -> Built {
    // The text itself is compared, whichever builder above called: the GHASH, window CTR and
    // gather pipelines (all built with checks) cannot get an unchecked module for any other
    // source, nor can a caller outside this file (`build_compute` is private to it).
    if !runtime_checks && source != SHADER && source != UNROLLED_SHADER.as_str() {
        return Err(
            "only the AES-CTR kernel (aes_core.wgsl + aes_ctr.wgsl) may be built \
                    without runtime checks"
                .into(),
        );
    }
    let scope = device.push_error_scope(::wgpu::ErrorFilter::Validation);
    let desc = ::wgpu::ShaderModuleDescriptor {
        label: Some(label),
        source: ::wgpu::ShaderSource::Wgsl(source.into()),
    };
    #[expect(
        unsafe_code,
        reason = "the AES-CTR kernel's trusted build, the one unsafe block of cipher::wgpu"
    )]
    let module = if runtime_checks {
        device.create_shader_module(desc)
    } else {
        // SAFETY: `source` is the AES-CTR kernel (checked above against the text of
        // `aes_core.wgsl` + `aes_ctr.wgsl`, or that text through `unroll_rounds`, which writes
        // the round loop's body out 13 times with `r` a constant from 1 to 13 and changes
        // nothing else), whose every access is in range without wgpu's clamping and whose
        // every loop terminates:
        // - `t0[x]` and `t0_table[x]`: x is `w >> 24` or `(w >> k) & 0xff`, below 256; `t0`
        //   with 32 copies is read at `(x << 5) | lane`, lane = lid & 31: below 8192, its
        //   length; `load_table` writes `t0[x]`, x < 256, or `t0[w]`, w < 8192 (32 copies
        //   only), reading `t0_table[w >> 5]` < 256; the host binds the 1 KiB T-table
        //   (`context.rs`, `aes_t0`) at binding 1;
        // - `round_keys[r]`: r in 0..=14, the array has 15 entries (the unrolled text has the
        //   same statements with r a constant from 1 to 13); the host binds the key's 240
        //   bytes (`opener.rs`, `aes_round_keys`);
        // - `data[i]` (`main`, via `ctr_block`) and `data[idx[j]]` (`main4`, j < 4) only after
        //   `i < params.blocks`, and the host binds exactly `params.blocks` blocks: the only
        //   bind groups of this pipeline are made by `WgpuOpener::ctr_bind_group` (`opener.rs`)
        //   over `size` bytes of a lane's work buffer, and both of its callers, `gpu_ctr` and
        //   `ctr_resident`, write `blocks = size / 16` into the parameters they bind with it;
        // - `ks[j]`, `idx[j]`: j < 4 in a loop bounded by 4;
        // - loops: `r` to 14, `j` to 4, `it` to LOOP (at most 8: `KernelVariant::for_device`
        //   refuses more), the table copies to 256 or 8192 in steps of WG >= 64 (the same
        //   check admits workgroup sizes 64 to 1024 only).
        unsafe {
            device.create_shader_module_trusted(desc, ::wgpu::ShaderRuntimeChecks::unchecked())
        }
    };
    let entries: Vec<::wgpu::BindGroupLayoutEntry> = bindings
        .iter()
        .enumerate()
        .map(|(i, ty)| ::wgpu::BindGroupLayoutEntry {
            binding: i as u32,
            visibility: ::wgpu::ShaderStages::COMPUTE,
            ty: *ty,
            count: None,
        })
        .collect();
    let layout = device.create_bind_group_layout(&::wgpu::BindGroupLayoutDescriptor {
        label: Some(label),
        entries: &entries,
    });
    let pipeline_layout = device.create_pipeline_layout(&::wgpu::PipelineLayoutDescriptor {
        label: Some(label),
        bind_group_layouts: &[Some(&layout)],
        immediate_size: 0,
    });
    let pipeline = device.create_compute_pipeline(&::wgpu::ComputePipelineDescriptor {
        label: Some(label),
        layout: Some(&pipeline_layout),
        module: &module,
        entry_point: Some(entry_point),
        compilation_options: ::wgpu::PipelineCompilationOptions {
            constants,
            // Every workgroup array entry is written before a barrier precedes its first read.
            zero_initialize_workgroup_memory: false,
        },
        cache: None,
    });
    match pollster::block_on(scope.pop()) {
        Some(e) => Err(e.to_string()),
        None => Ok((pipeline, layout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cipher::wgpu::variants::ROUND_LOOP;
    use crate::cipher::wgpu::{WgpuCipher, WgpuOptions};

    #[test]
    fn unrolled_kernels_write_out_every_round() {
        for (name, source) in [("aes_ctr", SHADER), ("aes_ctr_batch", BATCH_SHADER)] {
            let loops = source.matches(ROUND_LOOP).count();
            assert!(loops > 0, "{name}: no round loop to unroll");
            let unrolled = unroll_rounds(source);
            assert!(!unrolled.contains(ROUND_LOOP), "{name}: a loop is left");
            for r in 1..14 {
                assert_eq!(
                    unrolled.matches(&format!("{{ let r = {r}u;")).count(),
                    loops,
                    "{name}: round {r}"
                );
            }
            assert!(!unrolled.contains("let r = 14u;") && !unrolled.contains("let r = 0u;"));
            // The text after the last loop is kept whole.
            assert!(unrolled.ends_with(&source[source.rfind("let k = round_keys[").unwrap()..]));
        }
    }

    #[test]
    fn only_the_aes_ctr_kernel_builds_unchecked() {
        let Ok(c) = WgpuCipher::new(WgpuOptions::default()) else {
            eprintln!("skipping: no wgpu adapter");
            return;
        };
        let device = &c.ctx.device;
        let err = build_compute(device, "ghash", GHASH_SHADER, "main", &[], &[], false)
            .expect_err("GHASH accepted without runtime checks");
        assert!(err.contains("only the AES-CTR kernel"), "{err}");
        let unchecked = KernelVariant {
            runtime_checks: false,
            ..KernelVariant::DEFAULT
        };
        build_pipeline(device, SHADER, true, unchecked).unwrap();
        // The AES-CTR text with one edit is another source.
        let edited = SHADER.replace("fn main(", "fn main( ");
        let err = build_pipeline(device, &edited, true, unchecked).unwrap_err();
        assert!(err.contains("only the AES-CTR kernel"), "{err}");
    }

    #[test]
    fn shader_compile_error_is_an_error_not_a_panic() {
        let Ok(c) = WgpuCipher::new(WgpuOptions::default()) else {
            eprintln!("skipping: no wgpu adapter");
            return;
        };
        let broken = SHADER.replace("fn main(", "fn main(oops ");
        let Err(err) = build_pipeline(&c.ctx.device, &broken, true, KernelVariant::DEFAULT) else {
            panic!("broken WGSL accepted")
        };
        assert!(!err.is_empty());
        // The device stays usable afterwards.
        build_pipeline(&c.ctx.device, SHADER, true, KernelVariant::DEFAULT).unwrap();
        c.health().unwrap();
    }
}
