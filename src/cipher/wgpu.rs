//! Portable GPU backend through wgpu (Vulkan, Metal, DX12): AES-256-CTR in WGSL
//! (`shaders/aes_ctr.wgsl`) and the GCM tag check either on the GPU (`shaders/ghash.wgsl`) or
//! on the calling thread overlapped with the GPU pass.
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
//! host reads those partial sums
//! (16 bytes per 64 KiB), combines them with powers of H, adds the AAD and length blocks and
//! compares tags in constant time, then reads the plaintext back. Chunks bigger than one piece
//! (128 MiB by default) check on the CPU instead (every piece would have to be held back).
//!
//! GHASH on the CPU (the default; on CPU-type adapters such as lavapipe the GPU GHASH only
//! competes for the same cores) runs on the calling thread through the CPU backend's
//! verify (aws-lc, 27 GB/s on one core here against 0.23 GB/s through lavapipe, `kernel_bench`
//! on 2 shared vCPUs) while the GPU decrypts the first piece.
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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aes::Aes256;
use aes::cipher::{BlockCipherEncrypt, KeyInit};
use ghash::GHash;
use ghash::universal_hash::UniversalHash;
use zeroize::{Zeroize, Zeroizing};

use super::cpu::CpuCipher;
use super::{BLOCK_LEN, Backend, ChunkOpener, ChunkParams, Cipher, NONCE_LEN, OpenError, TAG_LEN};
use crate::error::{Error, Result};
use crate::keys::DataKey;

const BACKEND: &str = "wgpu";
/// Piece sizes are multiples of this many blocks (the largest workgroup span of any variant
/// need not divide them: the kernels bound-check every block).
const WORKGROUP_SIZE: u64 = 256;
/// Default cap on one dispatch (lavapipe's binding limit): bounds the three staging buffers
/// (upload, work, readback) on adapters with huge limits, and keeps the grid within 65535
/// workgroups per dimension.
const DEFAULT_MAX_PIECE: u64 = 128 << 20;
/// Longest we wait for one GPU submission before calling the device hung.
pub(super) const GPU_TIMEOUT: Duration = Duration::from_secs(60);
/// The shader source, compiled once per context: the AES core shared by the CTR kernels
/// (overrides, T-table, round functions), then this kernel's entry file.
const SHADER: &str = concat!(
    include_str!("../../shaders/aes_core.wgsl"),
    include_str!("../../shaders/aes_ctr.wgsl")
);
/// The GHASH shader (partial sums with powers of H), compiled once per context.
const GHASH_SHADER: &str = include_str!("../../shaders/ghash.wgsl");
/// Ciphertext blocks per GHASH invocation (the shader's `SEGMENT`).
const GHASH_SEGMENT: u64 = 16;
/// GHASH invocations per workgroup (the shader's workgroup size).
const GHASH_WORKGROUP: u64 = 256;
/// Blocks per GHASH workgroup: the host combines one partial sum per this many blocks.
const GHASH_GROUP_BLOCKS: u64 = GHASH_SEGMENT * GHASH_WORKGROUP;

/// A summary of the adapter wgpu would use here.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    /// Adapter (device) name.
    pub name: String,
    /// Graphics API backend (Vulkan, Metal, Dx12, Gl).
    pub api: ::wgpu::Backend,
    /// Discrete, integrated, virtual, CPU...
    pub device_type: ::wgpu::DeviceType,
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({:?}, {:?})", self.name, self.api, self.device_type)
    }
}

impl AdapterSummary {
    /// `true` for software rasterizers (lavapipe, WARP, SwiftShader): slower than the CPU backend.
    pub fn is_cpu(&self) -> bool {
        self.device_type == ::wgpu::DeviceType::Cpu
    }
}

/// The process's one wgpu instance (created on first use): every backend, probe and device
/// comes from it, as wgpu intends. One instance per device ran out on the H200: its Vulkan
/// driver (580) found no adapter for the 29th instance a process had created and dropped.
fn instance() -> ::wgpu::Instance {
    static INSTANCE: std::sync::OnceLock<::wgpu::Instance> = std::sync::OnceLock::new();
    INSTANCE
        .get_or_init(|| {
            let mut desc = ::wgpu::InstanceDescriptor::new_without_display_handle_from_env();
            if std::env::var_os("WGPU_BACKEND").is_none() {
                // Vulkan, Metal, DX12: the APIs with compute shaders everywhere. (GL only if
                // asked for through WGPU_BACKEND; probing it on a headless box prints EGL
                // noise.)
                desc.backends = ::wgpu::Backends::PRIMARY;
            }
            ::wgpu::Instance::new(desc)
        })
        .clone()
}

fn request_adapter(instance: &::wgpu::Instance) -> std::result::Result<::wgpu::Adapter, String> {
    let adapter = pollster::block_on(instance.request_adapter(&::wgpu::RequestAdapterOptions {
        power_preference: ::wgpu::PowerPreference::HighPerformance,
        ..Default::default()
    }))
    .map_err(|e| {
        format!(
            "no wgpu adapter found ({e}); install a Vulkan driver (e.g. Debian: mesa-vulkan-drivers \
             libvulkan1) or use --backend cpu"
        )
    })?;
    let info = adapter.get_info();
    if !adapter
        .get_downlevel_capabilities()
        .flags
        .contains(::wgpu::DownlevelFlags::COMPUTE_SHADERS)
    {
        return Err(format!(
            "adapter {} has no compute shader support",
            info.name
        ));
    }
    Ok(adapter)
}

fn summarize(adapter: &::wgpu::Adapter) -> AdapterSummary {
    let info = adapter.get_info();
    AdapterSummary {
        name: info.name,
        api: info.backend,
        device_type: info.device_type,
    }
}

/// The adapter wgpu would use, or why there is none.
pub fn probe_adapter() -> std::result::Result<AdapterSummary, String> {
    request_adapter(&instance()).map(|a| summarize(&a))
}

/// Whether the adapter wgpu would pick is a real GPU (not a CPU-type driver such as lavapipe).
pub fn gpu_adapter_present() -> bool {
    probe_adapter().is_ok_and(|a| !a.is_cpu())
}

/// `Ok("adapter name (backend, device type)")`, or `Err(reason)`.
pub fn probe() -> std::result::Result<String, String> {
    probe_adapter().map(|a| a.to_string())
}

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

pub(super) fn backend_err(reason: impl Into<String>) -> Error {
    Error::Backend {
        backend: BACKEND,
        reason: reason.into(),
    }
}

/// FIPS-197 S-box, computed (multiplicative inverse in GF(2^8), then the affine map).
fn sbox_table() -> [u8; 256] {
    let mut sbox = [0u8; 256];
    let (mut p, mut q) = (1u8, 1u8);
    loop {
        // p *= 3, q /= 3: walk the multiplicative group with generator 3 and its inverse.
        p = p ^ (p << 1) ^ if p & 0x80 != 0 { 0x1b } else { 0 };
        q ^= q << 1;
        q ^= q << 2;
        q ^= q << 4;
        if q & 0x80 != 0 {
            q ^= 0x09;
        }
        let x = q ^ q.rotate_left(1) ^ q.rotate_left(2) ^ q.rotate_left(3) ^ q.rotate_left(4);
        sbox[p as usize] = x ^ 0x63;
        if p == 1 {
            break;
        }
    }
    sbox[0] = 0x63;
    sbox
}

fn xtime(x: u8) -> u8 {
    (x << 1) ^ if x & 0x80 != 0 { 0x1b } else { 0 }
}

/// T0[x] = (2s, s, s, 3s) big-endian, s = S(x). The shader derives T1..T3 and S from it.
fn t0_table(sbox: &[u8; 256]) -> [u32; 256] {
    let mut t = [0u32; 256];
    for (x, e) in t.iter_mut().enumerate() {
        let s = sbox[x];
        *e = u32::from_be_bytes([xtime(s), s, s, xtime(s) ^ s]);
    }
    t
}

/// AES-256 key expansion: 60 big-endian round-key words.
pub(super) fn expand_key(key: &[u8; 32], sbox: &[u8; 256]) -> Zeroizing<[u32; 60]> {
    let sub = |w: u32| u32::from_be_bytes(w.to_be_bytes().map(|b| sbox[b as usize]));
    let mut w = Zeroizing::new([0u32; 60]);
    for i in 0..8 {
        w[i] = u32::from_be_bytes(key[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    }
    let mut rcon = 1u8;
    for i in 8..60 {
        let mut t = w[i - 1];
        if i % 8 == 0 {
            t = sub(t.rotate_left(8)) ^ (u32::from(rcon) << 24);
            rcon = xtime(rcon);
        } else if i % 8 == 4 {
            t = sub(t);
        }
        w[i] = w[i - 8] ^ t;
    }
    w
}

/// Environment variable selecting the AES-CTR kernel variant ([`KernelVariant::parse`]) when
/// [`WgpuOptions::kernel`] is not set: one GPU run can compare loaders across variants.
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
    /// Measured per adapter by `kernel_bench`; off in [`KernelVariant::GPU_DEFAULT`] (H200 run 5).
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
    /// Every variant `kernel_bench` measures: the WebGPU-portable shapes, the bank-interleaved
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

    fn entry_point(&self) -> &'static str {
        if self.blocks_per_invocation == 4 {
            "main4"
        } else {
            "main"
        }
    }

    /// Blocks one workgroup covers.
    fn span_blocks(&self) -> u64 {
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
const ROUND_LOOP: &str = "for (var r = 1u; r < 14u; r++) {";

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

/// The AES-CTR kernel source with its rounds unrolled (built once; the unchecked build accepts
/// only this text and [`SHADER`]).
static UNROLLED_SHADER: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| unroll_rounds(SHADER));

/// Compiles the AES-CTR WGSL and builds its pipeline and bind-group layout; a compile or
/// validation error comes back as text (wgpu's default would panic).
fn build_pipeline(
    device: &::wgpu::Device,
    source: &str,
    shared_table: bool,
    variant: KernelVariant,
) -> std::result::Result<(::wgpu::ComputePipeline, ::wgpu::BindGroupLayout), String> {
    let (storage, uniform) = binding_types();
    let unrolled;
    let source = if variant.unrolled {
        unrolled = unroll_rounds(source);
        &unrolled
    } else {
        source
    };
    build_compute(
        device,
        "aes_ctr",
        source,
        variant.entry_point(),
        &[uniform, storage(true), uniform, storage(false)],
        &[
            ("shared_table", if shared_table { 1.0 } else { 0.0 }),
            ("WG", f64::from(variant.workgroup_size)),
            ("COPIES", f64::from(variant.table_copies)),
            ("LOOP", f64::from(variant.loop_blocks)),
        ],
        variant.runtime_checks,
    )
}

/// Builds the GHASH pipeline (`shaders/ghash.wgsl`).
fn build_ghash_pipeline(
    device: &::wgpu::Device,
    source: &str,
) -> std::result::Result<(::wgpu::ComputePipeline, ::wgpu::BindGroupLayout), String> {
    let (storage, uniform) = binding_types();
    build_compute(
        device,
        "ghash",
        source,
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

pub(super) fn binding_types() -> (fn(bool) -> ::wgpu::BindingType, ::wgpu::BindingType) {
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

/// Compiles `source` and builds a compute pipeline (entry point `entry_point`) whose bindings
/// 0.. have the given types.
pub(super) fn build_compute(
    device: &::wgpu::Device,
    label: &str,
    source: &str,
    entry_point: &str,
    bindings: &[::wgpu::BindingType],
    constants: &[(&str, f64)],
    runtime_checks: bool,
) -> std::result::Result<(::wgpu::ComputePipeline, ::wgpu::BindGroupLayout), String> {
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
    let module = if runtime_checks {
        device.create_shader_module(desc)
    } else {
        // SAFETY: `source` is the AES-CTR kernel (checked above), whose every access is in
        // range without wgpu's clamping and whose every loop terminates:
        // - `t0[x]` and `t0_table[x]`: x is `w >> 24` or `(w >> k) & 0xff`, below 256; `t0`
        //   with 32 copies is read at `(x << 5) | lane`, lane = lid & 31: below 8192, its
        //   length; `load_table` writes `t0[x]`, x < 256, or `t0[w]`, w < 8192 (32 copies
        //   only), reading `t0_table[w >> 5]` < 256;
        // - `round_keys[r]`: r in 0..=14, the array has 15 entries (the unrolled text has the
        //   same statements with r a constant from 1 to 13);
        // - `data[i]` (`main`, via `ctr_block`) and `data[idx[j]]` (`main4`, j < 4) only after
        //   `i < params.blocks`, and the host binds exactly `params.blocks` blocks (`gpu_ctr` and
        //   `kernel_only` write `blocks = size / 16` for a binding of `size` bytes);
        // - `ks[j]`, `idx[j]`: j < 4 in a loop bounded by 4;
        // - loops: `r` to 14, `j` to 4, `it` to LOOP (at most 8), the table copies to 256 or
        //   8192 in steps of WG >= 64.
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

/// GF(2^128) product in GCM's bit order, on 128-bit big-endian integers (the byte string read
/// big-endian). Branch-free: the secret operands steer no branch or index.
fn gf_mul(a: u128, b: u128) -> u128 {
    const R: u128 = 0xe1 << 120;
    let (mut z, mut v) = (0u128, b);
    for i in 0..128 {
        let bit = (a >> (127 - i)) & 1;
        z ^= v & bit.wrapping_neg();
        v = (v >> 1) ^ (R & (v & 1).wrapping_neg());
    }
    z
}

/// `h^e` by square and multiply (`e` is a public length; timing may depend on it).
fn gf_pow(h: u128, mut e: u64) -> u128 {
    // x^0 is the most significant bit: the field's one.
    let (mut acc, mut base) = (1u128 << 127, h);
    while e > 0 {
        if e & 1 == 1 {
            acc = gf_mul(acc, base);
        }
        base = gf_mul(base, base);
        e >>= 1;
    }
    acc
}

/// The GHASH shader's per-key tables: the 4-bit Shoup table of H, the x^4 reduction words
/// (not secret, but uploaded together) and the segment powers H^(SEGMENT * (255 - t)).
fn ghash_tables(h: u128) -> (Zeroizing<Vec<u32>>, Zeroizing<Vec<u32>>) {
    let words = |x: u128| {
        [
            (x >> 96) as u32,
            (x >> 64) as u32,
            (x >> 32) as u32,
            x as u32,
        ]
    };
    let mut tables = Zeroizing::new(Vec::with_capacity(16 * 4 + 16));
    for i in 0..16u128 {
        tables.extend(words(gf_mul(i << 124, h)));
    }
    for r in 0..16u128 {
        // r * x^4 for r below x^4's degree: what a 4-bit right shift drops, folded back in.
        let folded = gf_mul(r, 1u128 << 123);
        debug_assert_eq!(folded & ((1u128 << 96) - 1), 0);
        tables.push((folded >> 96) as u32);
    }
    let step = gf_pow(h, GHASH_SEGMENT);
    let mut powers = Zeroizing::new(vec![0u32; GHASH_WORKGROUP as usize * 4]);
    let mut p = 1u128 << 127;
    for t in (0..GHASH_WORKGROUP as usize).rev() {
        powers[4 * t..4 * t + 4].copy_from_slice(&words(p));
        p = gf_mul(p, step);
    }
    (tables, powers)
}

/// GHASH workgroups (partial sums) for `blocks` blocks.
fn ghash_groups(blocks: u64) -> u64 {
    blocks.div_ceil(GHASH_GROUP_BLOCKS).max(1)
}

/// How `gpu_ctr` checks a tag before releasing plaintext.
enum Gate<'g> {
    /// No check (CTR only: `ctr_apply`, `seal_in_place`).
    None,
    /// Called with the whole source on the calling thread while the GPU runs the first piece.
    Cpu(&'g mut dyn FnMut(&[u8]) -> bool),
    /// GHASH on the GPU (one piece, aligned start only): called with the GHASH sum over the
    /// padded source blocks alone (as if started from zero) and their count.
    Gpu(&'g mut dyn FnMut(u128, u64) -> bool),
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct GhashParams {
    blocks: u32,
    pad: u32,
    groups: u32,
    row_groups: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    nonce_ctr: [u32; 4],
    blocks: u32,
    row_groups: u32,
    _pad: [u32; 2],
}

/// Concurrent `open`/`ctr_apply` calls: each holds one lane for its whole round trip (upload,
/// dispatch, read-back), so calls from the host loader's threads overlap instead of queueing
/// on one set of buffers. A call is latency-bound (map, submit, wait): on the H200 the host
/// loader's eight threads sharing one set ran at 1.12 GB/s, below the 2.65 of a single verified
/// open in `kernel_bench` (different benches; docs/BENCHMARKS.md, run 3). Unmeasured on a GPU
/// since.
const LANES: usize = 4;

/// One call's buffers, reused across calls: staging grown on demand up to the piece size, and
/// its own CTR and GHASH parameters and GHASH partial sums (a `queue.write_buffer` is applied
/// at the next submission of *any* thread, so parameters cannot be shared between calls).
struct Lane {
    capacity: u64,
    upload: Option<::wgpu::Buffer>,
    work: Option<::wgpu::Buffer>,
    readback: Option<::wgpu::Buffer>,
    params: ::wgpu::Buffer,
    ghash_params: ::wgpu::Buffer,
    partials: ::wgpu::Buffer,
    partials_readback: ::wgpu::Buffer,
}

/// Everything created once per device and shared by all openers (and by
/// [`super::wgpu_batch::WgpuBatchEngine`], which reads the `pub(super)` fields).
pub(super) struct Context {
    pub(super) adapter: AdapterSummary,
    pub(super) device: ::wgpu::Device,
    pub(super) queue: ::wgpu::Queue,
    pipeline: ::wgpu::ComputePipeline,
    layout: ::wgpu::BindGroupLayout,
    pub(super) t0: ::wgpu::Buffer,
    /// GHASH partial sums (`shaders/ghash.wgsl`; each lane holds one 16-byte sum per workgroup
    /// of a piece, and its read-back copy).
    ghash_pipeline: ::wgpu::ComputePipeline,
    ghash_layout: ::wgpu::BindGroupLayout,
    /// Whether openers prepared from now on check tags on the GPU ([`WgpuOptions::gpu_ghash`],
    /// [`WgpuCipher::set_gpu_ghash`]).
    gpu_ghash: AtomicBool,
    /// Largest piece, in bytes (a multiple of the workgroup's span).
    pub(super) piece_bytes: u64,
    /// Whether the pipeline copies the table into workgroup memory.
    pub(super) shared_table: bool,
    /// The kernel variant the pipeline runs.
    pub(super) variant: KernelVariant,
    pub(super) max_workgroups: u32,
    lanes: Vec<Mutex<Lane>>,
    /// Set by the device-lost callback or the first failed GPU operation.
    pub(super) failure: Arc<Mutex<Option<String>>>,
}

/// The wgpu backend.
pub struct WgpuCipher {
    pub(super) ctx: Arc<Context>,
    pub(super) sbox: [u8; 256],
}

impl std::fmt::Debug for WgpuCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuCipher")
            .field("adapter", &self.ctx.adapter.to_string())
            .finish()
    }
}

impl WgpuCipher {
    /// Opens the best adapter and builds the device, pipeline and buffers.
    pub fn new(options: WgpuOptions) -> Result<Self> {
        let unavailable = |reason: String| Error::BackendUnavailable {
            backend: BACKEND,
            reason,
        };
        let instance = instance();
        let adapter = request_adapter(&instance).map_err(unavailable)?;
        let summary = summarize(&adapter);
        if summary.is_cpu() && !options.allow_cpu_adapter {
            return Err(unavailable(format!(
                "the only adapter, {summary}, is a CPU (software) driver: slower than the CPU backend"
            )));
        }
        let limits = adapter.limits();
        let (device, queue) =
            pollster::block_on(adapter.request_device(&::wgpu::DeviceDescriptor {
                label: Some("ciphershard"),
                required_limits: limits.clone(),
                ..Default::default()
            }))
            .map_err(|e| unavailable(format!("{summary}: cannot open the device: {e}")))?;

        let failure: Arc<Mutex<Option<String>>> = Arc::default();
        // Errors outside an error scope are recorded, never the default panic.
        let sink = failure.clone();
        device.on_uncaptured_error(Arc::new(move |e: ::wgpu::Error| {
            record(&sink, format!("uncaptured GPU error: {e}"));
        }));
        let sink = failure.clone();
        device.set_device_lost_callback(move |reason, msg| {
            record(&sink, format!("device lost ({reason:?}): {msg}"));
        });

        let shared_table = options.shared_table.unwrap_or(true);
        let (mut variant, chosen) = match options
            .kernel
            .map(Ok)
            .or_else(|| KernelVariant::from_env().transpose())
        {
            Some(v) => (v?, true),
            None if summary.is_cpu() => (KernelVariant::DEFAULT, false),
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
                "{summary}: kernel variant {variant} needs {} KiB of workgroup memory, the \
                 device has {} bytes",
                variant.table_copies, limits.max_compute_workgroup_storage_size
            )));
        }
        variant.workgroup_size = variant
            .workgroup_size
            .min(limits.max_compute_invocations_per_workgroup)
            .min(limits.max_compute_workgroup_size_x);
        let (pipeline, layout) =
            build_pipeline(&device, SHADER, shared_table, variant).map_err(|e| {
                backend_err(format!(
                    "{summary}: shader aes_ctr.wgsl failed to build: {e}"
                ))
            })?;

        let (ghash_pipeline, ghash_layout) =
            build_ghash_pipeline(&device, GHASH_SHADER).map_err(|e| {
                backend_err(format!("{summary}: shader ghash.wgsl failed to build: {e}"))
            })?;

        let sbox = sbox_table();
        let t0 = device.create_buffer(&::wgpu::BufferDescriptor {
            label: Some("aes_t0"),
            size: 1024,
            usage: ::wgpu::BufferUsages::STORAGE | ::wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        queue.write_buffer(&t0, 0, bytemuck::cast_slice(&t0_table(&sbox)));

        let span = WORKGROUP_SIZE * BLOCK_LEN as u64;
        let device_cap = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let cap = options
            .max_piece_bytes
            .unwrap_or(DEFAULT_MAX_PIECE)
            .min(device_cap);
        let piece_bytes = (cap / span) * span;
        if piece_bytes == 0 {
            return Err(Error::InvalidArgument(format!(
                "wgpu piece size {cap} bytes is below one workgroup's span ({span} bytes)"
            )));
        }
        let partials_bytes = ghash_groups(piece_bytes / BLOCK_LEN as u64) * 16;
        let make = |label, size, usage| {
            device.create_buffer(&::wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            })
        };
        use ::wgpu::BufferUsages as U;
        let lanes = (0..LANES)
            .map(|_| {
                Mutex::new(Lane {
                    capacity: 0,
                    upload: None,
                    work: None,
                    readback: None,
                    params: make(
                        "aes_params",
                        std::mem::size_of::<Params>() as u64,
                        U::UNIFORM | U::COPY_DST,
                    ),
                    ghash_params: make(
                        "ghash_params",
                        std::mem::size_of::<GhashParams>() as u64,
                        U::UNIFORM | U::COPY_DST,
                    ),
                    partials: make("ghash_partials", partials_bytes, U::STORAGE | U::COPY_SRC),
                    partials_readback: make(
                        "ghash_partials_readback",
                        partials_bytes,
                        U::MAP_READ | U::COPY_DST,
                    ),
                })
            })
            .collect();
        Ok(WgpuCipher {
            ctx: Arc::new(Context {
                adapter: summary,
                device,
                queue,
                pipeline,
                layout,
                t0,
                ghash_pipeline,
                ghash_layout,
                gpu_ghash: AtomicBool::new(options.gpu_ghash),
                piece_bytes,
                shared_table,
                variant,
                max_workgroups: limits.max_compute_workgroups_per_dimension.max(1),
                lanes,
                failure,
            }),
            sbox,
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
        self.health()?;
        Ok(Box::new(self.prepare_opener(key, gpu_ghash)?))
    }

    /// Bytes processed per dispatch at most.
    pub fn piece_bytes(&self) -> u64 {
        self.ctx.piece_bytes
    }

    /// `Ok` while the device works; the first GPU failure (device lost, mapping failure,
    /// validation error) as `Error::Backend` afterwards: every later GPU call fails with it.
    pub fn health(&self) -> Result<()> {
        match lock(&self.ctx.failure).as_ref() {
            None => Ok(()),
            Some(reason) => Err(backend_err(format!("{}: {reason}", self.ctx.adapter))),
        }
    }

    fn prepare_opener(&self, key: &DataKey, gpu_ghash: bool) -> Result<WgpuOpener> {
        let round_keys = expand_key(key.as_bytes(), &self.sbox);
        let keys_buf = self.ctx.device.create_buffer(&::wgpu::BufferDescriptor {
            label: Some("aes_round_keys"),
            size: 240,
            usage: ::wgpu::BufferUsages::UNIFORM | ::wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.ctx
            .queue
            .write_buffer(&keys_buf, 0, bytemuck::cast_slice(&round_keys[..]));
        let aes = Aes256::new(key.as_bytes().into());
        let mut h = [0u8; 16];
        aes.encrypt_block((&mut h).into());
        let h_int = Zeroizing::new(u128::from_be_bytes(h));
        let (tables, powers) = ghash_tables(*h_int);
        let upload = |label, words: &[u32]| {
            let buf = self.ctx.device.create_buffer(&::wgpu::BufferDescriptor {
                label: Some(label),
                size: words.len() as u64 * 4,
                usage: ::wgpu::BufferUsages::STORAGE | ::wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            self.ctx
                .queue
                .write_buffer(&buf, 0, bytemuck::cast_slice(words));
            buf
        };
        let ghash_tables = upload("ghash_tables", &tables);
        let ghash_powers = upload("ghash_powers", &powers);
        let cpu = CpuCipher::new().prepare(key)?;
        Ok(WgpuOpener {
            ctx: self.ctx.clone(),
            keys_buf,
            ghash_tables,
            ghash_powers,
            gpu_ghash,
            aes,
            h: Zeroizing::new(h),
            h_int,
            cpu,
        })
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

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Context {
    /// The first free lane (a single caller always gets lane 0, whose buffers stay grown), or
    /// if every lane is busy, a wait for one of them.
    fn lane(&self) -> std::sync::MutexGuard<'_, Lane> {
        for l in &self.lanes {
            match l.try_lock() {
                Ok(g) => return g,
                Err(std::sync::TryLockError::Poisoned(p)) => return p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
        }
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let i = NEXT.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        lock(&self.lanes[i])
    }
}

pub(super) fn record(sink: &Mutex<Option<String>>, reason: String) {
    let mut f = lock(sink);
    if f.is_none() {
        *f = Some(reason);
    }
}

/// A data key prepared on the device: round keys uploaded, H and the CPU tag check ready.
pub struct WgpuOpener {
    ctx: Arc<Context>,
    keys_buf: ::wgpu::Buffer,
    /// Shoup table of H and reduction words; powers of H per GHASH invocation (key material).
    ghash_tables: ::wgpu::Buffer,
    ghash_powers: ::wgpu::Buffer,
    /// Check `open` tags on the GPU (single-piece chunks) rather than on the calling thread.
    gpu_ghash: bool,
    aes: Aes256,
    h: Zeroizing<[u8; 16]>,
    /// H as a big-endian integer, for combining the GPU's partial sums.
    h_int: Zeroizing<u128>,
    /// The CPU backend's opener: tag checks on the calling thread (aws-lc GHASH) and plain
    /// chunks.
    cpu: Box<dyn ChunkOpener>,
}

impl Drop for WgpuOpener {
    fn drop(&mut self) {
        // Overwrite the round keys in device memory before releasing it.
        // Likewise H's tables and powers: with them a tag could be forged.
        self.ctx.queue.write_buffer(&self.keys_buf, 0, &[0u8; 240]);
        for b in [&self.ghash_tables, &self.ghash_powers] {
            self.ctx
                .queue
                .write_buffer(b, 0, &vec![0u8; b.size() as usize]);
        }
        self.ctx.queue.submit([]);
        self.keys_buf.destroy();
        self.ghash_tables.destroy();
        self.ghash_powers.destroy();
    }
}

/// Source and destination of one CTR pass: separate slices, or one buffer in place.
enum Io<'a> {
    Separate(&'a [u8], &'a mut [u8]),
    InPlace(&'a mut [u8]),
}

impl Io<'_> {
    fn src(&self) -> &[u8] {
        match self {
            Io::Separate(s, _) => s,
            Io::InPlace(b) => b,
        }
    }
    fn dst(&mut self) -> &mut [u8] {
        match self {
            Io::Separate(_, d) => d,
            Io::InPlace(b) => b,
        }
    }
}

/// GHASH over a byte stream with GCM's padding only where a field ends.
struct GhashStream {
    g: GHash,
    partial: [u8; 16],
    fill: usize,
}

impl GhashStream {
    fn new(h: &[u8; 16]) -> Self {
        GhashStream {
            g: GHash::new(&(*h).into()),
            partial: [0; 16],
            fill: 0,
        }
    }
    fn absorb(&mut self, mut data: &[u8]) {
        if self.fill > 0 {
            let take = (16 - self.fill).min(data.len());
            self.partial[self.fill..self.fill + take].copy_from_slice(&data[..take]);
            self.fill += take;
            data = &data[take..];
            if self.fill < 16 {
                return;
            }
            self.g.update(&[self.partial.into()]);
            self.fill = 0;
        }
        let whole = data.len() / 16 * 16;
        self.g.update_padded(&data[..whole]);
        self.partial[..data.len() - whole].copy_from_slice(&data[whole..]);
        self.fill = data.len() - whole;
    }
    /// Ends a field: zero-pads the last partial block.
    fn pad(&mut self) {
        if self.fill > 0 {
            self.partial[self.fill..].fill(0);
            self.g.update(&[self.partial.into()]);
            self.fill = 0;
        }
    }
    fn finish(mut self, aad_len: usize, ct_len: usize) -> [u8; 16] {
        self.pad();
        let mut lens = [0u8; 16];
        lens[..8].copy_from_slice(&(aad_len as u64 * 8).to_be_bytes());
        lens[8..].copy_from_slice(&(ct_len as u64 * 8).to_be_bytes());
        self.g.update(&[lens.into()]);
        self.partial.zeroize();
        self.g.finalize().into()
    }
}

fn ct_eq(a: &[u8; TAG_LEN], b: &[u8; TAG_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

impl WgpuOpener {
    /// The GCM tag of `aad`/`ct` (or, for a plain chunk, the GMAC over `aad || data`).
    fn tag(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        data: &[u8],
        encrypted: bool,
    ) -> [u8; TAG_LEN] {
        let mut g = GhashStream::new(&self.h);
        g.absorb(aad);
        let mut s = if encrypted {
            g.pad();
            g.absorb(data);
            g.finish(aad.len(), data.len())
        } else {
            g.absorb(data);
            g.finish(aad.len() + data.len(), 0)
        };
        let mut j0 = [0u8; 16];
        j0[..12].copy_from_slice(nonce);
        j0[15] = 1;
        self.aes.encrypt_block((&mut j0).into());
        for (t, e) in s.iter_mut().zip(j0) {
            *t ^= e;
        }
        j0.zeroize();
        s
    }

    /// The CTR pipeline's bindings: this key's round keys, the table, the lane's parameters and
    /// the first `size` bytes of its `work` buffer.
    fn ctr_bind_group(
        &self,
        params: &::wgpu::Buffer,
        work: &::wgpu::Buffer,
        size: u64,
    ) -> ::wgpu::BindGroup {
        let ctx = &*self.ctx;
        ctx.device.create_bind_group(&::wgpu::BindGroupDescriptor {
            label: Some("aes_ctr"),
            layout: &ctx.layout,
            entries: &[
                ::wgpu::BindGroupEntry {
                    binding: 0,
                    resource: self.keys_buf.as_entire_binding(),
                },
                ::wgpu::BindGroupEntry {
                    binding: 1,
                    resource: ctx.t0.as_entire_binding(),
                },
                ::wgpu::BindGroupEntry {
                    binding: 2,
                    resource: params.as_entire_binding(),
                },
                ::wgpu::BindGroupEntry {
                    binding: 3,
                    resource: ::wgpu::BindingResource::Buffer(::wgpu::BufferBinding {
                        buffer: work,
                        offset: 0,
                        size: std::num::NonZeroU64::new(size),
                    }),
                },
            ],
        })
    }

    /// XORs the CTR keystream over `io` starting `offset` bytes into the chunk. `gate` runs on
    /// the calling thread while the GPU works on the first piece; if it returns `false`, no byte
    /// is written to the destination, the GPU buffers are cleared and `Ok(false)` is returned.
    fn gpu_ctr(
        &self,
        nonce: &[u8; NONCE_LEN],
        offset: u64,
        io: &mut Io<'_>,
        mut gate: Gate<'_>,
    ) -> Result<bool> {
        if let Some(reason) = lock(&self.ctx.failure).as_ref() {
            return Err(backend_err(reason.clone()));
        }
        let len = io.src().len() as u64;
        let head = offset % BLOCK_LEN as u64;
        let padded = (head + len).div_ceil(BLOCK_LEN as u64) * BLOCK_LEN as u64;
        let first_ctr = 2u32.wrapping_add((offset / BLOCK_LEN as u64) as u32);
        let nonce_words =
            [0, 4, 8].map(|i| u32::from_be_bytes(nonce[i..i + 4].try_into().expect("4 bytes")));
        let ctx = &*self.ctx;
        let mut bufs = ctx.lane();
        let need = padded.min(ctx.piece_bytes);
        if bufs.capacity < need {
            let cap = need.next_power_of_two().min(ctx.piece_bytes);
            let make = |label, usage| {
                ctx.device.create_buffer(&::wgpu::BufferDescriptor {
                    label: Some(label),
                    size: cap,
                    usage,
                    mapped_at_creation: false,
                })
            };
            use ::wgpu::BufferUsages as U;
            bufs.upload = Some(make("aes_upload", U::MAP_WRITE | U::COPY_SRC));
            bufs.work = Some(make("aes_work", U::STORAGE | U::COPY_DST | U::COPY_SRC));
            bufs.readback = Some(make("aes_readback", U::MAP_READ | U::COPY_DST));
            bufs.capacity = cap;
        }
        let (upload, work, readback) = match (&bufs.upload, &bufs.work, &bufs.readback) {
            (Some(u), Some(w), Some(r)) => (u, w, r),
            _ => return Err(backend_err("staging buffers missing")),
        };
        if matches!(gate, Gate::Gpu(_)) && (head != 0 || padded > ctx.piece_bytes) {
            return Err(backend_err("GPU GHASH needs one aligned piece"));
        }
        let mut start = 0u64;
        while start < padded {
            let size = (padded - start).min(ctx.piece_bytes);
            let blocks = size / BLOCK_LEN as u64;
            // Stream position `start` in the padded stream is byte `start - head` of the source.
            let (src_from, src_to) = (
                (start.max(head) - head) as usize,
                ((start + size).min(head + len) - head) as usize,
            );
            let lead = (head.saturating_sub(start)) as usize; // zero bytes before the source
            self.stage(upload, &io.src()[src_from..src_to], lead, size)?;
            let scope_oom = ctx
                .device
                .push_error_scope(::wgpu::ErrorFilter::OutOfMemory);
            let scope = ctx.device.push_error_scope(::wgpu::ErrorFilter::Validation);
            let workgroups = blocks.div_ceil(ctx.variant.span_blocks());
            let x = workgroups.min(u64::from(ctx.max_workgroups)) as u32;
            let y = workgroups.div_ceil(u64::from(x)) as u32;
            let params = Params {
                nonce_ctr: [
                    nonce_words[0],
                    nonce_words[1],
                    nonce_words[2],
                    first_ctr.wrapping_add((start / 16) as u32),
                ],
                blocks: blocks as u32,
                row_groups: x,
                _pad: [0; 2],
            };
            ctx.queue
                .write_buffer(&bufs.params, 0, bytemuck::bytes_of(&params));
            let bind = self.ctr_bind_group(&bufs.params, work, size);
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(upload, 0, work, 0, size);
            let groups = if matches!(gate, Gate::Gpu(_)) {
                Some(self.encode_ghash(&mut enc, &bufs, work, blocks))
            } else {
                None
            };
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&ctx.pipeline);
                pass.set_bind_group(0, &bind, &[]);
                pass.dispatch_workgroups(x, y, 1);
            }
            enc.copy_buffer_to_buffer(work, 0, readback, 0, size);
            if let Some(groups) = groups {
                enc.copy_buffer_to_buffer(
                    &bufs.partials,
                    0,
                    &bufs.partials_readback,
                    0,
                    groups * 16,
                );
            }
            let submission = ctx.queue.submit([enc.finish()]);
            let validation = pollster::block_on(scope.pop());
            let oom = pollster::block_on(scope_oom.pop());
            if let Some(e) = validation.or(oom) {
                return Err(backend_err(format!(
                    "{}: dispatch failed: {e}",
                    ctx.adapter
                )));
            }
            // Verify the tag (on the CPU while the GPU runs, or from the GPU's partial sums);
            // release nothing unless it holds.
            let verified = match std::mem::replace(&mut gate, Gate::None) {
                Gate::None => true,
                Gate::Cpu(g) => g(io.src()),
                Gate::Gpu(g) => {
                    let groups = groups.expect("encoded with the GHASH pass");
                    let sum = self.combine_partials(&bufs, submission.clone(), groups)?;
                    g(*sum, blocks)
                }
            };
            if !verified {
                // The upload buffer holds ciphertext only (and cannot be a copy target).
                self.clear(&[work, readback]);
                return Ok(false);
            }
            self.read_back(
                readback,
                submission,
                size,
                lead,
                &mut io.dst()[src_from..src_to],
            )?;
            start += size;
        }
        Ok(true)
    }

    /// Records the GHASH pass over the first `blocks` blocks of `work` (the ciphertext, before
    /// the CTR pass runs in place); returns the number of partial sums it writes.
    fn encode_ghash(
        &self,
        enc: &mut ::wgpu::CommandEncoder,
        lane: &Lane,
        work: &::wgpu::Buffer,
        blocks: u64,
    ) -> u64 {
        let ctx = &*self.ctx;
        let groups = ghash_groups(blocks);
        let row_groups = groups.min(u64::from(ctx.max_workgroups));
        let params = GhashParams {
            blocks: blocks as u32,
            pad: (groups * GHASH_GROUP_BLOCKS - blocks) as u32,
            groups: groups as u32,
            row_groups: row_groups as u32,
        };
        ctx.queue
            .write_buffer(&lane.ghash_params, 0, bytemuck::bytes_of(&params));
        let bind = ctx.device.create_bind_group(&::wgpu::BindGroupDescriptor {
            label: Some("ghash"),
            layout: &ctx.ghash_layout,
            entries: &[
                ::wgpu::BindGroupEntry {
                    binding: 0,
                    resource: lane.ghash_params.as_entire_binding(),
                },
                ::wgpu::BindGroupEntry {
                    binding: 1,
                    resource: self.ghash_tables.as_entire_binding(),
                },
                ::wgpu::BindGroupEntry {
                    binding: 2,
                    resource: self.ghash_powers.as_entire_binding(),
                },
                ::wgpu::BindGroupEntry {
                    binding: 3,
                    resource: ::wgpu::BindingResource::Buffer(::wgpu::BufferBinding {
                        buffer: work,
                        offset: 0,
                        size: std::num::NonZeroU64::new(blocks.max(1) * BLOCK_LEN as u64),
                    }),
                },
                ::wgpu::BindGroupEntry {
                    binding: 4,
                    resource: ::wgpu::BindingResource::Buffer(::wgpu::BufferBinding {
                        buffer: &lane.partials,
                        offset: 0,
                        size: std::num::NonZeroU64::new(groups * 16),
                    }),
                },
            ],
        });
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&ctx.ghash_pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(row_groups as u32, groups.div_ceil(row_groups) as u32, 1);
        groups
    }

    /// Waits for `submission`, reads the `groups` partial sums and combines them (Horner's rule
    /// with H^(blocks per group)) into the GHASH sum of the piece's blocks.
    fn combine_partials(
        &self,
        lane: &Lane,
        submission: ::wgpu::SubmissionIndex,
        groups: u64,
    ) -> Result<Zeroizing<u128>> {
        let ctx = &*self.ctx;
        let bytes = groups * 16;
        self.map_blocking(
            &lane.partials_readback,
            ::wgpu::MapMode::Read,
            bytes,
            Some(submission),
        )?;
        let step = Zeroizing::new(gf_pow(*self.h_int, GHASH_GROUP_BLOCKS));
        let mut sum = Zeroizing::new(0u128);
        {
            let view = lane
                .partials_readback
                .get_mapped_range(0..bytes)
                .map_err(|e| backend_err(format!("{}: GHASH readback view: {e}", ctx.adapter)))?;
            for p in view.chunks_exact(16) {
                let words: [u32; 4] = bytemuck::pod_read_unaligned(p);
                let part = (u128::from(words[0]) << 96)
                    | (u128::from(words[1]) << 64)
                    | (u128::from(words[2]) << 32)
                    | u128::from(words[3]);
                *sum = gf_mul(*sum, *step) ^ part;
            }
        }
        lane.partials_readback.unmap();
        Ok(sum)
    }

    /// The GCM tag from the GPU's GHASH `sum` over the `blocks` ciphertext blocks: the AAD's
    /// GHASH state shifted past them, plus the sum, the length block, and E(J0).
    fn tag_from_sum(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        ct_len: usize,
        sum: u128,
        blocks: u64,
    ) -> [u8; TAG_LEN] {
        let mut g = GHash::new(&(*self.h).into());
        g.update_padded(aad);
        let aad_state = Zeroizing::new(u128::from_be_bytes(g.finalize().into()));
        let h = *self.h_int;
        let lens = (u128::from(aad.len() as u64 * 8) << 64) | u128::from(ct_len as u64 * 8);
        let state = Zeroizing::new(gf_mul(
            gf_mul(*aad_state, gf_pow(h, blocks)) ^ sum ^ lens,
            h,
        ));
        let mut j0 = [0u8; 16];
        j0[..12].copy_from_slice(nonce);
        j0[15] = 1;
        self.aes.encrypt_block((&mut j0).into());
        let mut s = state.to_be_bytes();
        for (t, e) in s.iter_mut().zip(j0) {
            *t ^= e;
        }
        j0.zeroize();
        s
    }

    /// Writes one padded piece into the mapped `upload` buffer (created once, reused): `lead`
    /// zero bytes, then `body`, then zeros to the end of the last block `body` touches. Bytes
    /// past that are never read back.
    fn stage(&self, upload: &::wgpu::Buffer, body: &[u8], lead: usize, size: u64) -> Result<()> {
        self.map_blocking(upload, ::wgpu::MapMode::Write, size, None)?;
        {
            let mut view = upload
                .get_mapped_range_mut(0..size)
                .map_err(|e| backend_err(format!("{}: upload view: {e}", self.ctx.adapter)))?;
            let end = (lead + body.len())
                .next_multiple_of(BLOCK_LEN)
                .min(size as usize);
            view.slice(..lead).fill(0);
            view.slice(lead..lead + body.len()).copy_from_slice(body);
            view.slice(lead + body.len()..end).fill(0);
        }
        upload.unmap();
        Ok(())
    }

    /// Overwrites buffers that may hold plaintext (after a tag mismatch).
    fn clear(&self, buffers: &[&::wgpu::Buffer]) {
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        for b in buffers {
            enc.clear_buffer(b, 0, None);
        }
        self.ctx.queue.submit([enc.finish()]);
    }

    /// Maps `buf[..size]` and waits (bounded) for it; `after` is the submission to wait for.
    fn map_blocking(
        &self,
        buf: &::wgpu::Buffer,
        mode: ::wgpu::MapMode,
        size: u64,
        after: Option<::wgpu::SubmissionIndex>,
    ) -> Result<()> {
        let ctx = &*self.ctx;
        let (tx, rx) = std::sync::mpsc::channel();
        buf.map_async(mode, 0..size, move |r| {
            let _ = tx.send(r);
        });
        ctx.device
            .poll(::wgpu::PollType::Wait {
                submission_index: after,
                timeout: Some(GPU_TIMEOUT),
            })
            .map_err(|e| backend_err(format!("{}: waiting for the GPU: {e}", ctx.adapter)))?;
        match rx.recv_timeout(GPU_TIMEOUT) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(backend_err(format!(
                "{}: mapping a buffer failed: {e}",
                ctx.adapter
            ))),
            Err(_) => Err(backend_err(format!(
                "{}: a buffer never mapped",
                ctx.adapter
            ))),
        }
    }

    fn read_back(
        &self,
        readback: &::wgpu::Buffer,
        submission: ::wgpu::SubmissionIndex,
        size: u64,
        lead: usize,
        dst: &mut [u8],
    ) -> Result<()> {
        let ctx = &*self.ctx;
        self.map_blocking(readback, ::wgpu::MapMode::Read, size, Some(submission))?;
        {
            let view = readback
                .get_mapped_range(0..size)
                .map_err(|e| backend_err(format!("{}: readback view: {e}", ctx.adapter)))?;
            dst.copy_from_slice(&view[lead..lead + dst.len()]);
        }
        readback.unmap();
        Ok(())
    }

    /// Decrypts `io` if its tag verifies; the GPU pass overlaps the GHASH.
    fn open_io(&self, chunk: &ChunkParams<'_>, mut io: Io<'_>) -> Result<(), OpenError> {
        if !chunk.encrypted || io.src().is_empty() {
            let checked = self.cpu.verify(chunk, io.src());
            if checked.is_ok()
                && let Io::Separate(s, d) = &mut io
            {
                d.copy_from_slice(s);
            }
            return checked.inspect_err(|_| io.dst().zeroize());
        }
        let ct_len = io.src().len();
        let on_gpu = self.gpu_ghash && (ct_len as u64).next_multiple_of(16) <= self.ctx.piece_bytes;
        // The CPU check is the CPU backend's own (aws-lc GHASH, ~25 GB/s per core here,
        // against 5 for the RustCrypto GHASH of `tag`).
        let mut cpu_failure = None;
        let mut cpu_gate = |ct: &[u8]| match self.cpu.verify(chunk, ct) {
            Ok(()) => true,
            Err(e) => {
                cpu_failure = Some(e);
                false
            }
        };
        let mut gpu_gate = |sum: u128, blocks: u64| {
            ct_eq(
                &self.tag_from_sum(&chunk.nonce, chunk.aad, ct_len, sum, blocks),
                &chunk.tag,
            )
        };
        let gate = if on_gpu {
            Gate::Gpu(&mut gpu_gate)
        } else {
            Gate::Cpu(&mut cpu_gate)
        };
        let result = self.gpu_ctr(&chunk.nonce, 0, &mut io, gate);
        match result {
            Ok(true) => Ok(()),
            Ok(false) => {
                io.dst().zeroize();
                Err(cpu_failure.unwrap_or(OpenError::TagMismatch))
            }
            Err(e) => {
                io.dst().zeroize();
                Err(OpenError::Backend(self.record_failure(e)))
            }
        }
    }

    /// Records a GPU failure as the device's (every later call fails fast with it) and returns
    /// it for the caller.
    fn record_failure(&self, e: Error) -> Error {
        record(&self.ctx.failure, e.to_string());
        e
    }
}

impl ChunkOpener for WgpuOpener {
    fn open(&self, chunk: &ChunkParams<'_>, src: &[u8], dst: &mut [u8]) -> Result<(), OpenError> {
        if src.len() != dst.len() {
            dst.zeroize();
            return Err(OpenError::Backend(Error::InvalidArgument(
                "open: source and destination lengths differ".into(),
            )));
        }
        self.open_io(chunk, Io::Separate(src, dst))
    }

    fn open_in_place(&self, chunk: &ChunkParams<'_>, buf: &mut [u8]) -> Result<(), OpenError> {
        self.open_io(chunk, Io::InPlace(buf))
    }

    fn verify(&self, chunk: &ChunkParams<'_>, src: &[u8]) -> Result<(), OpenError> {
        // Tag-only: nothing for the GPU to do; the CPU backend's GHASH is the fast one.
        self.cpu.verify(chunk, src)
    }

    fn ctr_apply(
        &self,
        nonce: &[u8; NONCE_LEN],
        offset: u64,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<()> {
        if src.len() != dst.len() {
            dst.zeroize();
            return Err(Error::InvalidArgument(
                "ctr_apply: source and destination lengths differ".into(),
            ));
        }
        if src.is_empty() {
            return Ok(());
        }
        self.gpu_ctr(nonce, offset, &mut Io::Separate(src, dst), Gate::None)
            .map(|_| ())
            .map_err(|e| {
                dst.zeroize();
                self.record_failure(e)
            })
    }

    fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        encrypted: bool,
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN]> {
        if encrypted && !buf.is_empty() {
            self.gpu_ctr(nonce, 0, &mut Io::InPlace(buf), Gate::None)
                .map_err(|e| self.record_failure(e))?;
        }
        Ok(self.tag(nonce, aad, buf, encrypted))
    }
}

/// One AES-CTR kernel variant's figure from [`kernel_bench`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct VariantBench {
    /// The variant (as named in the report, e.g. `wg256x1`).
    pub variant: String,
    /// Kernel only, GB/s; counted only after the variant's output matched the CPU backend.
    pub gbps: f64,
}

/// Throughput of the wgpu paths on this machine's adapter, in GB/s (10^9 bytes/s).
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelBench {
    /// The adapter measured.
    pub adapter: String,
    /// Table in workgroup memory (`true`) or read from the storage buffer.
    pub shared_table: bool,
    /// Bytes per pass.
    pub bytes: u64,
    /// Passes timed for the host round trip (after one warm-up pass).
    pub passes: u32,
    /// Every kernel variant, each checked against the CPU before it was timed.
    pub variants: Vec<VariantBench>,
    /// The fastest variant.
    pub best_variant: String,
    /// Kernel only, best variant: data resident on the device, dispatch + wait.
    pub kernel_gbps: f64,
    /// Host to host: upload, dispatch, readback into a host buffer (`ctr_apply`).
    pub round_trip_gbps: f64,
    /// GHASH on one CPU thread (the CPU tag-check placement).
    pub cpu_ghash_gbps: f64,
    /// GHASH on the GPU over data resident on the device: dispatch, wait, partial sums read
    /// back and combined.
    pub gpu_ghash_gbps: f64,
    /// `open` of one chunk of `bytes`, host to host, nothing released before the tag verified,
    /// with the tag check on the CPU (overlapped with the GPU pass).
    pub open_cpu_ghash_gbps: f64,
    /// The same with the tag check on the GPU.
    pub open_gpu_ghash_gbps: f64,
    /// Whether this adapter's default is the GPU tag check.
    pub gpu_ghash_default: bool,
    /// `open` with this adapter's default placement.
    pub open_gbps: f64,
    /// The device loader's GPU stages (window upload, window CTR, row gather).
    pub device_loader: super::wgpu_batch::WindowBench,
}

impl std::fmt::Display for KernelBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "wgpu on {} (table in {}, {} MiB per pass):",
            self.adapter,
            if self.shared_table {
                "workgroup memory"
            } else {
                "storage buffer"
            },
            self.bytes >> 20,
        )?;
        for v in &self.variants {
            writeln!(
                f,
                "  kernel {:<26} {:>9.3} GB/s (checked against the CPU)",
                v.variant, v.gbps
            )?;
        }
        writeln!(
            f,
            "  best kernel {} {:.3} GB/s; host round trip {:.3} GB/s",
            self.best_variant, self.kernel_gbps, self.round_trip_gbps
        )?;
        writeln!(
            f,
            "  GHASH: GPU {:.3} GB/s, CPU (one thread) {:.3} GB/s",
            self.gpu_ghash_gbps, self.cpu_ghash_gbps
        )?;
        writeln!(
            f,
            "  verified open: GHASH on GPU {:.3} GB/s, GHASH on CPU {:.3} GB/s (default here: {})",
            self.open_gpu_ghash_gbps,
            self.open_cpu_ghash_gbps,
            if self.gpu_ghash_default { "GPU" } else { "CPU" }
        )?;
        write!(f, "{}", self.device_loader)
    }
}

pub(super) fn time_passes(f: &mut dyn FnMut() -> Result<()>) -> Result<(u32, f64)> {
    f()?; // warm-up: buffers, pipeline caches
    let (mut passes, t) = (0u32, Instant::now());
    while passes < 3 || (t.elapsed() < Duration::from_millis(1500) && passes < 100) {
        f()?;
        passes += 1;
    }
    Ok((passes, t.elapsed().as_secs_f64()))
}

pub(super) fn gbps(bytes: usize, (passes, secs): (u32, f64)) -> f64 {
    (bytes as f64 * f64::from(passes)) / secs / 1e9
}

/// Measures every kernel variant, GHASH on the GPU and the CPU, and verified `open` with each
/// tag-check placement on the default adapter (CPU adapters included), over `bytes` bytes
/// (rounded up to whole blocks).
pub fn kernel_bench(bytes: usize) -> Result<KernelBench> {
    let cipher = WgpuCipher::new(WgpuOptions::default())?;
    kernel_bench_on(&cipher, bytes)
}

/// [`kernel_bench`] on an existing backend: its table placement and piece size, each variant
/// on a device of its own.
pub fn kernel_bench_on(cipher: &WgpuCipher, bytes: usize) -> Result<KernelBench> {
    let bytes = bytes.max(BLOCK_LEN).div_ceil(BLOCK_LEN) * BLOCK_LEN;
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| backend_err(format!("bench key: {e}")))?;
    let data_key = DataKey::from_bytes(key);
    key.zeroize();
    let reference = CpuCipher::new().prepare(&data_key)?;
    let nonce = [7u8; NONCE_LEN];
    let mut src = vec![0u8; bytes];
    getrandom::fill(&mut src).map_err(|e| backend_err(format!("bench data: {e}")))?;
    let mut dst = vec![0u8; bytes];
    let mut want = vec![0u8; bytes];
    // An offset whose counters cross 2^32 inside the pass, as a check of the counter arithmetic.
    let offset = super::conformance::offset_for_counter(u32::MAX - 1000);
    reference.ctr_apply(&nonce, offset, &src, &mut want)?;

    // On a GPU one pass over `bytes` takes well under a millisecond, the size of a submit and
    // wait: several dispatches per submission keep that overhead out of the kernel figure.
    let repeat: u64 = if cipher.ctx.adapter.is_cpu() { 1 } else { 16 };
    let mut variants = Vec::new();
    for variant in KernelVariant::ALL {
        let c = WgpuCipher::new(WgpuOptions {
            shared_table: Some(cipher.ctx.shared_table),
            max_piece_bytes: Some(cipher.ctx.piece_bytes),
            kernel: Some(variant),
            gpu_ghash: cipher.gpu_ghash(),
            allow_cpu_adapter: true,
        })?;
        let op = c.prepare_opener(&data_key, cipher.gpu_ghash())?;
        dst.fill(0);
        op.gpu_ctr(
            &nonce,
            offset,
            &mut Io::Separate(&src, &mut dst),
            Gate::None,
        )?;
        if dst != want {
            return Err(backend_err(format!(
                "{}: kernel variant {} differs from the CPU backend",
                c.ctx.adapter, c.ctx.variant
            )));
        }
        let t = time_passes(&mut || op.kernel_only(bytes as u64 * repeat))?;
        c.health()?;
        variants.push(VariantBench {
            variant: c.ctx.variant.to_string(),
            gbps: gbps(bytes * repeat as usize, t),
        });
    }
    let best = variants
        .iter()
        .max_by(|a, b| a.gbps.total_cmp(&b.gbps))
        .cloned()
        .ok_or_else(|| backend_err("no kernel variant"))?;

    let mut op = cipher.prepare_opener(&data_key, cipher.gpu_ghash())?;
    let round_trip = time_passes(&mut || {
        op.gpu_ctr(&nonce, 0, &mut Io::Separate(&src, &mut dst), Gate::None)
            .map(|_| ())
    })?;
    let ghash_bytes = bytes.min(cipher.ctx.piece_bytes as usize);
    let gpu_ghash = time_passes(&mut || op.ghash_only(ghash_bytes as u64).map(|_| ()))?;
    let mut ct = src.clone();
    let tag = op.seal_in_place(&nonce, b"bench", true, &mut ct)?;
    let chunk = ChunkParams {
        nonce,
        aad: b"bench",
        tag,
        encrypted: true,
    };
    // The CPU tag check `open` uses (the CPU backend's verify: aws-lc GHASH).
    let cpu_ghash = time_passes(&mut || {
        op.cpu
            .verify(&chunk, &ct)
            .map_err(|_| backend_err("benchmark chunk failed its own tag"))
    })?;
    let mut open_with = |op: &WgpuOpener| {
        time_passes(&mut || {
            op.open(&chunk, &ct, &mut dst)
                .map_err(|_| backend_err("benchmark chunk failed its own tag"))
        })
    };
    op.gpu_ghash = false;
    let open_cpu = open_with(&op)?;
    op.gpu_ghash = true;
    let open_gpu = open_with(&op)?;
    cipher.health()?;
    let (open_cpu_ghash_gbps, open_gpu_ghash_gbps) = (gbps(bytes, open_cpu), gbps(bytes, open_gpu));
    let device_loader = super::wgpu_batch::window_bench(cipher, bytes)?;
    Ok(KernelBench {
        adapter: cipher.ctx.adapter.to_string(),
        shared_table: cipher.ctx.shared_table,
        bytes: bytes as u64,
        passes: round_trip.0,
        kernel_gbps: best.gbps,
        best_variant: best.variant,
        variants,
        round_trip_gbps: gbps(bytes, round_trip),
        cpu_ghash_gbps: gbps(bytes, cpu_ghash),
        gpu_ghash_gbps: gbps(ghash_bytes, gpu_ghash),
        open_cpu_ghash_gbps,
        open_gpu_ghash_gbps,
        gpu_ghash_default: cipher.gpu_ghash(),
        open_gbps: if cipher.gpu_ghash() {
            open_gpu_ghash_gbps
        } else {
            open_cpu_ghash_gbps
        },
        device_loader,
    })
}

impl WgpuOpener {
    /// GHASH pass over `bytes` already in the work buffer, waits, combines the partial sums.
    fn ghash_only(&self, bytes: u64) -> Result<u128> {
        let ctx = &*self.ctx;
        let bufs = ctx.lane();
        let work = bufs
            .work
            .as_ref()
            .ok_or_else(|| backend_err("no work buffer yet"))?;
        let blocks = bytes.min(bufs.capacity) / BLOCK_LEN as u64;
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        let groups = self.encode_ghash(&mut enc, &bufs, work, blocks);
        enc.copy_buffer_to_buffer(&bufs.partials, 0, &bufs.partials_readback, 0, groups * 16);
        let submission = ctx.queue.submit([enc.finish()]);
        Ok(*self.combine_partials(&bufs, submission, groups)?)
    }
}

impl WgpuOpener {
    /// Dispatches over `bytes` already on the device (whatever the work buffer holds), waits.
    fn kernel_only(&self, bytes: u64) -> Result<()> {
        let ctx = &*self.ctx;
        let bufs = ctx.lane();
        let work = bufs
            .work
            .as_ref()
            .ok_or_else(|| backend_err("no work buffer yet"))?;
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        let size = bytes.min(bufs.capacity);
        let mut done = 0u64;
        // Whole-buffer passes until `bytes` were processed (the work buffer may be smaller).
        let bind = self.ctr_bind_group(&bufs.params, work, size);
        let blocks = size / BLOCK_LEN as u64;
        let workgroups = blocks.div_ceil(ctx.variant.span_blocks());
        let x = workgroups.min(u64::from(ctx.max_workgroups)) as u32;
        let y = workgroups.div_ceil(u64::from(x)) as u32;
        let params = Params {
            nonce_ctr: [1, 2, 3, 4],
            blocks: blocks as u32,
            row_groups: x,
            _pad: [0; 2],
        };
        ctx.queue
            .write_buffer(&bufs.params, 0, bytemuck::bytes_of(&params));
        while done < bytes {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&ctx.pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(x, y, 1);
            done += size;
        }
        let submission = ctx.queue.submit([enc.finish()]);
        ctx.device
            .poll(::wgpu::PollType::Wait {
                submission_index: Some(submission),
                timeout: Some(GPU_TIMEOUT),
            })
            .map_err(|e| backend_err(format!("{}: waiting for the GPU: {e}", ctx.adapter)))?;
        Ok(())
    }
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
    fn unrolled_kernels_write_out_every_round() {
        for (name, source) in [
            ("aes_ctr", SHADER),
            ("aes_ctr_batch", super::super::wgpu_batch::BATCH_SHADER),
        ] {
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
        // An unclosed loop is left as it is (the WGSL compiler reports it).
        let broken = format!("fn f() {{ {ROUND_LOOP} let x = 1u; ");
        assert_eq!(unroll_rounds(&broken), broken);
    }

    #[test]
    fn key_expansion_matches_fips197_a3() {
        // FIPS-197 appendix A.3: last round-key words of the AES-256 example key.
        let key: [u8; 32] =
            hex::decode("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
                .unwrap()
                .try_into()
                .unwrap();
        let w = expand_key(&key, &sbox_table());
        assert_eq!(w[8], 0x9ba35411);
        assert_eq!(w[59], 0x706c631e);
    }

    #[test]
    fn sbox_matches_known_entries() {
        let s = sbox_table();
        assert_eq!(
            (s[0x00], s[0x01], s[0x53], s[0xff]),
            (0x63, 0x7c, 0xed, 0x16)
        );
    }

    #[test]
    fn ghash_stream_matches_reference_gmac() {
        // The CPU backend's GMAC (aes-gcm over aad || data) for unaligned field lengths.
        let key = DataKey::from_bytes([9u8; 32]);
        let cpu = CpuCipher::new().prepare(&key).unwrap();
        let aes = Aes256::new(key.as_bytes().into());
        let mut h = [0u8; 16];
        aes.encrypt_block((&mut h).into());
        for (a, d) in [(0usize, 0usize), (89, 0), (89, 1000), (16, 33), (3, 5)] {
            let aad = vec![0x11u8; a];
            let mut data = vec![0x22u8; d];
            let want = cpu.seal_in_place(&[1; 12], &aad, false, &mut data).unwrap();
            let mut g = GhashStream::new(&h);
            g.absorb(&aad);
            g.absorb(&data);
            let mut got = g.finish(a + d, 0);
            let mut j0 = [0u8; 16];
            j0[..12].copy_from_slice(&[1; 12]);
            j0[15] = 1;
            aes.encrypt_block((&mut j0).into());
            got.iter_mut().zip(j0).for_each(|(t, e)| *t ^= e);
            assert_eq!(got, want, "aad {a} data {d}");
        }
    }

    #[test]
    fn gf_mul_and_pow_match_the_ghash_crate() {
        // One GHASH block with key b is a * b; a chain of n zero-free blocks checks powers.
        let mut rng = crate::cipher::conformance::SplitMix(7);
        for _ in 0..50 {
            let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
            rng.fill(&mut a);
            rng.fill(&mut b);
            let mut g = GHash::new(&b.into());
            g.update(&[a.into()]);
            let want = u128::from_be_bytes(g.finalize().into());
            assert_eq!(gf_mul(u128::from_be_bytes(a), u128::from_be_bytes(b)), want);
        }
        let h = 0x66e94bd4ef8a2c3b884cfa59ca342b2eu128;
        let mut p = 1u128 << 127;
        for e in 0..40u64 {
            assert_eq!(gf_pow(h, e), p, "h^{e}");
            p = gf_mul(p, h);
        }
        // The Shoup table's reduction words touch only the top word.
        let (tables, powers) = ghash_tables(h);
        assert_eq!(tables.len(), 80);
        assert_eq!(powers.len(), 1024);
    }

    /// The backend here, or `None` when there is no adapter (the integration tests enforce
    /// `CIPHERSHARD_REQUIRE_WGPU`).
    fn backend() -> Option<WgpuCipher> {
        WgpuCipher::new(WgpuOptions::default())
            .inspect_err(|e| eprintln!("skipping: {e}"))
            .ok()
    }

    #[test]
    fn shader_compile_error_is_an_error_not_a_panic() {
        let Some(c) = backend() else { return };
        let broken = SHADER.replace("fn main(", "fn main(oops ");
        let Err(err) = build_pipeline(&c.ctx.device, &broken, true, KernelVariant::DEFAULT) else {
            panic!("broken WGSL accepted")
        };
        assert!(!err.is_empty());
        // The device stays usable afterwards.
        build_pipeline(&c.ctx.device, SHADER, true, KernelVariant::DEFAULT).unwrap();
        c.health().unwrap();
    }

    #[test]
    fn lost_device_is_an_error_on_every_call() {
        let Some(c) = backend() else { return };
        let key = DataKey::from_bytes([5u8; 32]);
        let op = c.prepare(&key).unwrap();
        let rop = CpuCipher::new().prepare(&key).unwrap();
        let pt: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut ct = pt.clone();
        let tag = rop.seal_in_place(&[1; 12], b"a", true, &mut ct).unwrap();
        c.ctx.device.destroy();
        let _ = c.ctx.device.poll(::wgpu::PollType::Poll);
        // Every GPU call reports the failure, releases nothing and none panics.
        let params = ChunkParams {
            nonce: [1; 12],
            aad: b"a",
            tag,
            encrypted: true,
        };
        let mut out = vec![0xAAu8; pt.len()];
        let e = op.open(&params, &ct, &mut out).unwrap_err();
        assert!(
            matches!(e, OpenError::Backend(Error::Backend { .. })),
            "{e}"
        );
        assert!(out.iter().all(|&b| b == 0), "nothing released");
        let mut x = vec![0xAAu8; 100];
        assert!(op.ctr_apply(&[1; 12], 33, &ct[33..133], &mut x).is_err());
        assert!(x.iter().all(|&b| b == 0), "nothing released");
        let mut bad = ct.clone();
        bad[0] ^= 1;
        // Tags are still checked on the CPU: a tampered chunk is still a tag mismatch.
        assert!(matches!(
            op.open(&params, &bad, &mut out),
            Err(OpenError::TagMismatch)
        ));
        assert!(out.iter().all(|&b| b == 0));
        let err = c.health().unwrap_err();
        assert!(matches!(err, Error::Backend { .. }), "{err}");
        assert!(
            c.prepare(&key).is_err(),
            "prepare on a lost device must fail"
        );
    }
}
