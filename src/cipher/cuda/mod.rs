//! CUDA backend: AES-256-CTR and a parallel GHASH on the GPU, through cudarc and NVRTC.
//!
//! The kernels (`kernels/aes_core.h` + `kernels/aes_gcm.cu`) are compiled with NVRTC at first
//! use (once per process, for the device's compute capability) and loaded once per context.
//! Two ways in:
//! - the [`Cipher`] / [`ChunkOpener`] trait on host buffers (upload, verify + decrypt, download),
//!   so the conformance suite and cross-backend tests run on it exactly as on the CPU;
//! - [`BatchDecryptor`]: many chunks per batch from pinned staging buffers into a device buffer,
//!   with asynchronous copies on one stream per slot (double/triple buffering) and every tag
//!   checked before [`BatchDecryptor::wait`] hands the [`DeviceBatch`] out. Chunks come either as
//!   host slices ([`BatchDecryptor::submit`], copied into staging) or already read into the
//!   slot's pinned staging by the caller ([`BatchDecryptor::staging_mut`] +
//!   [`BatchDecryptor::submit_staged`]: one copy out of the page cache).
//!
//! The AES-CTR kernel has run-time selectable variants ([`CtrVariant`], `CIPHERSHARD_CUDA_CTR`);
//! [`kernel_bench_with`] measures and checks them all in one run.
//!
//! Tags: GHASH runs on the GPU (segments folded in parallel, scaled by precomputed powers of H,
//! combined with `atomicXor`); only 16 bytes per chunk come back, and the host XORs `E_K(J0)`
//! and compares in constant time. No CUDA call is made before `is_culib_present` says the
//! driver library exists, so a machine without CUDA gets an error, never a panic.

use std::sync::{Arc, Mutex, OnceLock};

use aes::Aes256;
use aes::cipher::{BlockCipherEncrypt, KeyInit};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DriverError, LaunchConfig,
    PinnedHostSlice, PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, Ptx};
use zeroize::Zeroize;

use super::{Backend, ChunkOpener, ChunkParams, Cipher, NONCE_LEN, OpenError, TAG_LEN};
use crate::error::{Error, Result};
use crate::keys::DataKey;

mod gather;

pub use gather::{GATHER_CU, GATHER_NVRTC_OPTIONS, GATHER_PTX, Gather, GatherJob};

const CORE_H: &str = include_str!("../../../kernels/aes_core.h");
const KERNELS_CU: &str = include_str!("../../../kernels/aes_gcm.cu");
/// GHASH segment length in blocks (`CS_SEG_BLOCKS` in aes_core.h).
const SEG_BLOCKS: u64 = 32;
const DESC_WORDS: usize = 8;
const THREADS: u32 = 256;
/// Most chunks in one launch (grid.y limit).
pub const MAX_CHUNKS_PER_LAUNCH: usize = 65_535;

fn backend_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Backend {
        backend: "cuda",
        reason: format!(
            "{what}: {e} (if the device ran out of memory use smaller batches; otherwise check `nvidia-smi`, \
             or use --backend cpu)"
        ),
    }
}

fn drv(what: &'static str) -> impl Fn(DriverError) -> Error {
    move |e| backend_err(what, e)
}

/// The full NVRTC source: the shared core header followed by the kernels.
pub fn kernel_source() -> String {
    format!(
        "{CORE_H}\n{}",
        KERNELS_CU.replace("#include \"aes_core.h\"", "")
    )
}

/// Whether the CUDA driver library (libcuda) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names; no CUDA call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether the NVRTC library can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles the kernels to PTX for `arch` (e.g. `"sm_90"`; `None`: NVRTC's default).
/// Needs only NVRTC, no GPU. Errors name the missing library or carry the compile log.
pub fn compile_kernels(arch: Option<&str>) -> Result<Ptx> {
    if !nvrtc_present() {
        return Err(Error::BackendUnavailable {
            backend: "cuda",
            reason: "NVRTC library (libnvrtc.so) not found: install the CUDA toolkit or `pip install \
                     nvidia-cuda-nvrtc` and put its lib folder on LD_LIBRARY_PATH, or use --backend cpu"
                .into(),
        });
    }
    let mut options = vec!["--std=c++17".to_string()];
    if let Some(a) = arch {
        options.push(format!("--gpu-architecture={a}"));
    }
    let opts = CompileOptions {
        options,
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(kernel_source(), opts).map_err(|e| Error::Backend {
        backend: "cuda",
        reason: format!(
            "NVRTC could not compile kernels/aes_gcm.cu: {e} (this is a bug: use --backend cpu)"
        ),
    })
}

/// Environment variable naming a prebuilt PTX file (from `cuda_bench --emit-ptx`) to load
/// instead of compiling with NVRTC: for GPU machines that have the driver but no NVRTC.
pub const PTX_ENV: &str = "CIPHERSHARD_CUDA_PTX";

fn prebuilt_ptx_path() -> Option<std::path::PathBuf> {
    std::env::var_os(PTX_ENV)
        .filter(|v| !v.is_empty())
        .map(Into::into)
}

/// Says whether a CUDA device answers, without panicking.
pub fn probe() -> std::result::Result<String, String> {
    if !driver_present() {
        return Err("no CUDA driver (libcuda.so not found): use --backend cpu".into());
    }
    if let Some(path) = prebuilt_ptx_path() {
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

struct Kernels {
    setup: CudaFunction,
    hpowers: CudaFunction,
    /// One entry per [`CtrVariant::ALL`]: the loaded, configured kernel or why it is unusable.
    ctr: Vec<std::result::Result<CudaFunction, String>>,
    ghash: CudaFunction,
}

/// Environment variable selecting the AES-CTR kernel variant ([`CtrVariant::name`]) at start-up.
pub const CTR_VARIANT_ENV: &str = "CIPHERSHARD_CUDA_CTR";

/// AES-256-CTR kernel variants (kernels/aes_gcm.cu), selectable at run time so one GPU run can
/// measure them all ([`kernel_bench`]) and the fastest verified one can be chosen.
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

    fn index(self) -> usize {
        Self::ALL
            .iter()
            .position(|v| *v == self)
            .expect("listed in ALL")
    }

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

    fn threads(self) -> u32 {
        match self {
            CtrVariant::Replicated | CtrVariant::Wide2x256 | CtrVariant::Wide2RegKeys => 256,
            CtrVariant::Wide2x512 | CtrVariant::Wide4x512 => 512,
            CtrVariant::Wide4x1024 => 1024,
        }
    }

    /// Dynamic shared memory (the wide tables), bytes.
    fn dynamic_smem(self) -> u32 {
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

fn kernel_info(f: &CudaFunction) -> KernelInfo {
    use cudarc::driver::sys::CUfunction_attribute as A;
    KernelInfo {
        registers: f.get_attribute(A::CU_FUNC_ATTRIBUTE_NUM_REGS).unwrap_or(-1),
        local_bytes: f
            .get_attribute(A::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)
            .unwrap_or(-1),
    }
}

/// Loads a CTR variant's kernel and raises its dynamic shared-memory limit when it needs one.
fn load_ctr(
    module: &Arc<cudarc::driver::CudaModule>,
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

/// Context, stream and loaded kernels, shared by the cipher, its keys and batch decryptors.
struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    k: Kernels,
    name: String,
    arch: String,
    /// Index into [`CtrVariant::ALL`] of the CTR kernel in use.
    ctr_variant: std::sync::atomic::AtomicUsize,
}

impl Device {
    fn ctr_variant(&self) -> CtrVariant {
        CtrVariant::ALL[self.ctr_variant.load(std::sync::atomic::Ordering::Relaxed)]
    }
}

static PTX: OnceLock<std::result::Result<(String, Ptx), String>> = OnceLock::new();

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
        let (ma, mi) = ctx
            .compute_capability()
            .map_err(drv("compute capability"))?;
        let arch = format!("sm_{ma}{mi}");
        let ptx = if let Some(path) = prebuilt_ptx_path() {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            if !text.contains(".entry cs_ctr") {
                return Err(Error::format(
                    &path,
                    "PTX file",
                    "no cs_ctr kernel: not ciphershard's kernels",
                ));
            }
            Ptx::from_src(text)
        } else {
            let ptx = PTX.get_or_init(|| {
                compile_kernels(Some(&arch))
                    .map(|p| (arch.clone(), p))
                    .map_err(|e| e.to_string())
            });
            match ptx {
                Ok((a, p)) if *a == arch => p.clone(),
                Ok(_) => compile_kernels(Some(&arch))?,
                Err(e) => {
                    return Err(Error::Backend {
                        backend: "cuda",
                        reason: e.clone(),
                    });
                }
            }
        };
        let module = ctx.load_module(ptx).map_err(|e| Error::Backend {
            backend: "cuda",
            reason: format!(
                "loading the kernels for {arch}: {e} (CUDA_ERROR_UNSUPPORTED_PTX_VERSION means NVRTC is \
                 newer than the driver: update the driver, or set {PTX_ENV} to PTX from a matching \
                 NVRTC; otherwise use --backend cpu)"
            ),
        })?;
        let f = |n: &str| {
            module
                .load_function(n)
                .map_err(drv("kernel missing from module"))
        };
        let k = Kernels {
            setup: f("cs_setup")?,
            hpowers: f("cs_hpowers")?,
            ctr: CtrVariant::ALL
                .iter()
                .map(|&v| load_ctr(&module, v))
                .collect(),
            ghash: f("cs_ghash")?,
        };
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
                arch,
                ctr_variant: std::sync::atomic::AtomicUsize::new(CtrVariant::DEFAULT.index()),
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
        self.dev
            .ctr_variant
            .store(v.index(), std::sync::atomic::Ordering::Relaxed);
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
            .map(|(&v, f)| (v, f.as_ref().map(kernel_info).map_err(Clone::clone)))
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
}

impl Cipher for CudaCipher {
    fn backend(&self) -> Backend {
        Backend::Cuda
    }
    fn describe(&self) -> String {
        format!(
            "{} ({}, AES T-tables in shared memory [{}], GHASH on the GPU)",
            self.dev.name,
            self.dev.arch,
            self.dev.ctr_variant().name()
        )
    }
    fn prepare(&self, key: &DataKey) -> Result<Box<dyn ChunkOpener>> {
        let dkey = Arc::new(CudaKey::new(&self.dev, key)?);
        Ok(Box::new(CudaOpener {
            key: dkey,
            lock: Mutex::new(()),
        }))
    }
}

fn grid_x(units: u64) -> u32 {
    units.div_ceil(u64::from(THREADS)).clamp(1, 1 << 20) as u32
}

/// AES blocks each CTR thread handles (amortizes the shared-table fill per thread block).
const CTR_BLOCKS_PER_THREAD: u64 = 32;

fn ctr_grid_x(blocks: u64, threads: u32) -> u32 {
    blocks
        .div_ceil(CTR_BLOCKS_PER_THREAD)
        .div_ceil(u64::from(threads))
        .clamp(1, 1 << 20) as u32
}

/// A data key prepared on the device. Its device copies (round keys, H tables, powers of H) are
/// zeroed when it is dropped.
pub struct CudaKey {
    dev: Arc<Device>,
    te0: CudaSlice<u32>,
    rk: CudaSlice<u32>,
    htab: CudaSlice<u64>,
    hseg: CudaSlice<u64>,
    hpow: Mutex<(CudaSlice<u64>, u64)>,
    /// Host AES for `E_K(J0)` per chunk (zeroized on drop by the `aes` crate).
    aes: Aes256,
}

impl CudaKey {
    fn new(dev: &Arc<Device>, key: &DataKey) -> Result<CudaKey> {
        let s = &dev.stream;
        let mut raw = s
            .clone_htod(key.as_bytes().as_slice())
            .map_err(drv("uploading the key"))?;
        let mut te0 = s
            .alloc_zeros::<u32>(256)
            .map_err(drv("allocating key tables"))?;
        let mut rk = s
            .alloc_zeros::<u32>(60)
            .map_err(drv("allocating key tables"))?;
        let mut htab = s
            .alloc_zeros::<u64>(32)
            .map_err(drv("allocating key tables"))?;
        let mut hseg = s
            .alloc_zeros::<u64>(2)
            .map_err(drv("allocating key tables"))?;
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: cs_setup reads 32 key bytes and writes 256 + 60 + 32 + 2 words, exactly the
        // sizes allocated above; launched with 256 threads as it requires.
        let launched = unsafe {
            s.launch_builder(&dev.k.setup)
                .arg(&raw)
                .arg(&mut te0)
                .arg(&mut rk)
                .arg(&mut htab)
                .arg(&mut hseg)
                .launch(cfg)
        };
        let zeroed = s.memset_zeros(&mut raw);
        launched.map_err(drv("key setup kernel"))?;
        zeroed.map_err(drv("zeroing the uploaded key"))?;
        let hpow = s
            .alloc_zeros::<u64>(2)
            .map_err(drv("allocating key tables"))?;
        let aes = Aes256::new(key.as_bytes().into());
        let k = CudaKey {
            dev: dev.clone(),
            te0,
            rk,
            htab,
            hseg,
            hpow: Mutex::new((hpow, 1)),
            aes,
        };
        k.ensure_powers(1 << 12)?;
        Ok(k)
    }

    /// Makes sure `hpow` holds `(H^32)^s` for every `s < segments`.
    fn ensure_powers(&self, segments: u64) -> Result<()> {
        let mut g = self.hpow.lock().unwrap_or_else(|p| p.into_inner());
        if g.1 >= segments {
            return Ok(());
        }
        let count = segments.next_power_of_two();
        let s = &self.dev.stream;
        let mut fresh = s
            .alloc_zeros::<u64>(2 * count as usize)
            .map_err(drv("allocating powers of H"))?;
        let cfg = LaunchConfig {
            grid_dim: (grid_x(count), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: cs_hpowers writes entries [0, count) of `fresh`, which holds 2*count words.
        unsafe {
            s.launch_builder(&self.dev.k.hpowers)
                .arg(&self.hseg)
                .arg(&mut fresh)
                .arg(&0u64)
                .arg(&count)
                .launch(cfg)
        }
        .map_err(drv("powers-of-H kernel"))?;
        let mut old = std::mem::replace(&mut g.0, fresh);
        let _ = s.memset_zeros(&mut old);
        g.1 = count;
        Ok(())
    }

    /// The GHASH value the device must produce for this tag: `tag XOR E_K(nonce || 1)`.
    fn expected_ghash(&self, nonce: &[u8; NONCE_LEN], tag: &[u8; TAG_LEN]) -> [u8; TAG_LEN] {
        let mut j0 = [0u8; 16];
        j0[..12].copy_from_slice(nonce);
        j0[15] = 1;
        let mut b = j0.into();
        self.aes.encrypt_block(&mut b);
        let mut out = [0u8; TAG_LEN];
        for i in 0..TAG_LEN {
            out[i] = b[i] ^ tag[i];
        }
        b.zeroize();
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_ghash(
        &self,
        s: &CudaStream,
        desc: &CudaSlice<u64>,
        n: usize,
        max_seg: u64,
        src: &CudaSlice<u8>,
        aad: &CudaSlice<u8>,
        acc: &mut CudaSlice<u32>,
    ) -> Result<()> {
        self.ensure_powers(max_seg)?;
        let g = self.hpow.lock().unwrap_or_else(|p| p.into_inner());
        let cfg = LaunchConfig {
            grid_dim: (grid_x(max_seg), n as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every descriptor's ranges were checked against `src`/`aad` by the caller, `acc`
        // holds 4 words per chunk, and `hpow` holds at least `max_seg` powers (ensured above).
        unsafe {
            s.launch_builder(&self.dev.k.ghash)
                .arg(&self.htab)
                .arg(&g.0)
                .arg(desc)
                .arg(src)
                .arg(aad)
                .arg(acc)
                .launch(cfg)
        }
        .map(|_| ())
        .map_err(drv("GHASH kernel launch"))
    }

    fn launch_ctr(
        &self,
        s: &CudaStream,
        desc: &CudaSlice<u64>,
        n: usize,
        max_blocks: u64,
        src: &CudaSlice<u8>,
        dst: &mut CudaSlice<u8>,
    ) -> Result<()> {
        let v = self.dev.ctr_variant();
        let f = self.dev.k.ctr[v.index()]
            .as_ref()
            .map_err(|e| backend_err("AES-CTR kernel", e))?;
        let cfg = LaunchConfig {
            grid_dim: (ctr_grid_x(max_blocks, v.threads()), n as u32, 1),
            block_dim: (v.threads(), 1, 1),
            shared_mem_bytes: v.dynamic_smem(),
        };
        // SAFETY: every descriptor's source and destination ranges were checked against `src`
        // and `dst` by the caller; te0/rk hold 256/60 words; the block size and dynamic shared
        // memory are the ones this variant's kernel was built and configured for.
        unsafe {
            s.launch_builder(f)
                .arg(&self.te0)
                .arg(&self.rk)
                .arg(desc)
                .arg(src)
                .arg(dst)
                .launch(cfg)
        }
        .map(|_| ())
        .map_err(drv("AES-CTR kernel launch"))
    }
}

impl Drop for CudaKey {
    fn drop(&mut self) {
        let s = &self.dev.stream;
        let _ = s.memset_zeros(&mut self.rk);
        let _ = s.memset_zeros(&mut self.htab);
        let _ = s.memset_zeros(&mut self.hseg);
        let g = self.hpow.get_mut().unwrap_or_else(|p| p.into_inner());
        let _ = s.memset_zeros(&mut g.0);
        let _ = s.synchronize();
    }
}

/// One chunk's descriptor words (see aes_core.h).
#[allow(clippy::too_many_arguments)] // one argument per descriptor field
fn descriptor(
    src: u64,
    dst: u64,
    len: u64,
    offset: u64,
    nonce: &[u8; NONCE_LEN],
    aad_off: u64,
    aad_len: u64,
    plain: bool,
) -> [u64; DESC_WORDS] {
    let n0 = u64::from_le_bytes(nonce[..8].try_into().expect("8 bytes"));
    let n1 = u64::from(u32::from_le_bytes(nonce[8..].try_into().expect("4 bytes")));
    [
        src,
        dst,
        len,
        offset,
        n0,
        n1,
        aad_off,
        aad_len | (u64::from(plain) << 48),
    ]
}

fn ghash_segments(aad_len: u64, len: u64, plain: bool) -> u64 {
    let blocks = if plain {
        (aad_len + len).div_ceil(16) + 1
    } else {
        aad_len.div_ceil(16) + len.div_ceil(16) + 1
    };
    blocks.div_ceil(SEG_BLOCKS)
}

fn acc_bytes(acc: &[u32]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, w) in acc.iter().take(4).enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&w.to_be_bytes());
    }
    out
}

fn ct_eq(a: &[u8; 16], b: &[u8; 16]) -> bool {
    a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The trait-level opener: one chunk at a time through host buffers.
pub struct CudaOpener {
    key: Arc<CudaKey>,
    lock: Mutex<()>,
}

enum Mode {
    Verify,
    Ctr,
    Seal,
}

impl CudaOpener {
    /// Uploads `data`, runs the kernels `mode` needs, returns (output bytes, GHASH value).
    /// `open` calls it twice (verify, then decrypt) so no plaintext is downloaded before the
    /// tag has been checked.
    fn run(
        &self,
        mode: Mode,
        nonce: &[u8; NONCE_LEN],
        offset: u64,
        aad: &[u8],
        plain: bool,
        data: &[u8],
    ) -> Result<(Vec<u8>, [u8; 16])> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let k = &self.key;
        let s = &k.dev.stream;
        let len = data.len();
        let mut d_src = s
            .alloc_zeros::<u8>(len.max(16))
            .map_err(drv("device allocation"))?;
        if len > 0 {
            s.memcpy_htod(data, &mut d_src.slice_mut(..len))
                .map_err(drv("host-to-device copy"))?;
        }
        let mut d_aad = s
            .alloc_zeros::<u8>(aad.len().max(16))
            .map_err(drv("device allocation"))?;
        if !aad.is_empty() {
            s.memcpy_htod(aad, &mut d_aad.slice_mut(..aad.len()))
                .map_err(drv("host-to-device copy"))?;
        }
        let desc = descriptor(0, 0, len as u64, offset, nonce, 0, aad.len() as u64, plain);
        let d_desc = s
            .clone_htod(&desc[..])
            .map_err(drv("host-to-device copy"))?;
        let mut acc = s.alloc_zeros::<u32>(4).map_err(drv("device allocation"))?;
        let mut d_dst = s
            .alloc_zeros::<u8>(len.max(16))
            .map_err(drv("device allocation"))?;
        let blocks = (offset % 16 + len as u64).div_ceil(16);
        let segs = ghash_segments(aad.len() as u64, len as u64, plain);
        let mut out = Vec::new();
        match mode {
            Mode::Verify => k.launch_ghash(s, &d_desc, 1, segs, &d_src, &d_aad, &mut acc)?,
            Mode::Ctr => k.launch_ctr(s, &d_desc, 1, blocks, &d_src, &mut d_dst)?,
            Mode::Seal => {
                if plain {
                    k.launch_ghash(s, &d_desc, 1, segs, &d_src, &d_aad, &mut acc)?;
                } else {
                    k.launch_ctr(s, &d_desc, 1, blocks, &d_src, &mut d_dst)?;
                    k.launch_ghash(s, &d_desc, 1, segs, &d_dst, &d_aad, &mut acc)?;
                }
            }
        }
        let accv = s.clone_dtoh(&acc).map_err(drv("device-to-host copy"))?;
        if matches!(mode, Mode::Ctr | Mode::Seal) && !plain && len > 0 {
            out = s
                .clone_dtoh(&d_dst.slice(..len))
                .map_err(drv("device-to-host copy"))?;
        }
        let _ = s.memset_zeros(&mut d_dst);
        Ok((out, acc_bytes(&accv)))
    }
}

impl ChunkOpener for CudaOpener {
    fn open(&self, chunk: &ChunkParams<'_>, src: &[u8], dst: &mut [u8]) -> Result<(), OpenError> {
        if src.len() != dst.len() {
            dst.zeroize();
            return Err(OpenError::Backend(Error::InvalidArgument(
                "open: source and destination lengths differ".into(),
            )));
        }
        // Verify first, on the device; only then decrypt and copy plaintext out.
        let verified = self.verify(chunk, src);
        if let Err(e) = verified {
            dst.zeroize();
            return Err(e);
        }
        if !chunk.encrypted {
            dst.copy_from_slice(src);
            return Ok(());
        }
        match self.run(Mode::Ctr, &chunk.nonce, 0, chunk.aad, false, src) {
            Ok((pt, _)) => {
                dst.copy_from_slice(&pt);
                Ok(())
            }
            Err(e) => {
                dst.zeroize();
                Err(OpenError::Backend(e))
            }
        }
    }

    fn open_in_place(&self, chunk: &ChunkParams<'_>, buf: &mut [u8]) -> Result<(), OpenError> {
        let src = zeroize::Zeroizing::new(buf.to_vec());
        self.open(chunk, &src, buf)
    }

    fn verify(&self, chunk: &ChunkParams<'_>, src: &[u8]) -> Result<(), OpenError> {
        let (_, ghash) = self.run(
            Mode::Verify,
            &chunk.nonce,
            0,
            chunk.aad,
            !chunk.encrypted,
            src,
        )?;
        if ct_eq(&ghash, &self.key.expected_ghash(&chunk.nonce, &chunk.tag)) {
            Ok(())
        } else {
            Err(OpenError::TagMismatch)
        }
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
        match self.run(Mode::Ctr, nonce, offset, &[], false, src) {
            Ok((out, _)) => {
                dst.copy_from_slice(&out);
                Ok(())
            }
            Err(e) => {
                dst.zeroize();
                Err(e)
            }
        }
    }

    fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        encrypted: bool,
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN]> {
        let (out, ghash) = self.run(Mode::Seal, nonce, 0, aad, !encrypted, buf)?;
        if encrypted {
            buf.copy_from_slice(&out);
        }
        // tag = GHASH ^ E_K(J0) = expected_ghash(nonce, ghash)
        Ok(self.key.expected_ghash(nonce, &ghash))
    }
}

// ---------------------------------------------------------------------------------------------
// Batch API for the loader.

/// One chunk of a batch: its key, GCM parameters, ciphertext (e.g. a slice of the mapped shard)
/// and where its plaintext goes in the batch's device buffer.
pub struct BatchChunk<'a> {
    /// The shard's data key, prepared with [`CudaCipher::prepare_device`].
    pub key: &'a Arc<CudaKey>,
    /// GCM nonce, associated data and stored tag; `encrypted: false` for plain (GMAC) chunks.
    pub params: ChunkParams<'a>,
    /// The stored chunk bytes.
    pub data: &'a [u8],
    /// Byte offset of this chunk's plaintext in the output device buffer.
    pub dst_offset: usize,
}

/// One chunk of a batch whose stored bytes the caller already wrote into the slot's pinned
/// staging buffer ([`BatchDecryptor::staging_mut`]).
pub struct StagedChunk<'a> {
    /// The shard's data key, prepared with [`CudaCipher::prepare_device`].
    pub key: &'a Arc<CudaKey>,
    /// GCM nonce, associated data and stored tag; `encrypted: false` for plain (GMAC) chunks.
    pub params: ChunkParams<'a>,
    /// Where the chunk's bytes start in the staging buffer (16-byte aligned is fastest).
    pub staging_offset: usize,
    /// The chunk's length in bytes.
    pub len: usize,
    /// Byte offset of this chunk's plaintext in the output device buffer.
    pub dst_offset: usize,
}

/// What the kernels need of a chunk once its bytes are on the device.
struct Meta<'a> {
    key: &'a Arc<CudaKey>,
    params: ChunkParams<'a>,
    len: usize,
    dst_offset: usize,
}

/// A batch whose every tag verified: plaintext in device memory.
pub struct DeviceBatch {
    buf: CudaSlice<u8>,
    len: usize,
    stream: Arc<CudaStream>,
}

impl DeviceBatch {
    /// The device buffer (at least [`len`](Self::len) bytes).
    pub fn slice(&self) -> &CudaSlice<u8> {
        &self.buf
    }
    /// Plaintext length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Raw device pointer (`CUdeviceptr`) for DLPack export; valid while `self` lives. The data
    /// is complete on [`stream`](Self::stream) (already synchronized when handed out).
    pub fn device_ptr(&self) -> u64 {
        let (p, _sync) = self.buf.device_ptr(&self.stream);
        p
    }
    /// The stream the batch was produced on (`cu_stream()` for DLPack's stream argument).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

struct Pending {
    out: CudaSlice<u8>,
    out_len: usize,
    expected: Vec<[u8; 16]>,
}

struct Slot {
    stream: Arc<CudaStream>,
    staging: PinnedHostSlice<u8>,
    aad_host: Vec<u8>,
    d_src: CudaSlice<u8>,
    d_aad: CudaSlice<u8>,
    /// Pinned so the 16-byte-per-chunk GHASH download stays asynchronous; same length as
    /// `d_acc` (the whole buffer is copied).
    acc_host: PinnedHostSlice<u32>,
    d_acc: CudaSlice<u32>,
    pending: Option<Pending>,
}

/// Staging is filled and uploaded in groups of about this many bytes.
const STAGE_GROUP_BYTES: usize = 16 << 20;

/// Copies each chunk's bytes to `region[offs[i] - base..]`, split in pieces of at most 1 MiB
/// over a few threads (one thread cannot saturate PCIe with memcpy).
fn parallel_copy(datas: &[&[u8]], offs: &[usize], base: usize, region: &mut [u8]) {
    const PIECE: usize = 1 << 20;
    let mut pieces: Vec<(&[u8], &mut [u8])> = Vec::new();
    let mut rest: &mut [u8] = region;
    let mut pos = base;
    for (&data, &o) in datas.iter().zip(offs) {
        let r = std::mem::take(&mut rest);
        let (_, tail) = r.split_at_mut(o - pos);
        let (mut dst, tail) = tail.split_at_mut(data.len());
        rest = tail;
        pos = o + data.len();
        let mut src = data;
        while !src.is_empty() {
            let n = src.len().min(PIECE);
            let (s0, s1) = src.split_at(n);
            let (d0, d1) = std::mem::take(&mut dst).split_at_mut(n);
            pieces.push((s0, d0));
            src = s1;
            dst = d1;
        }
    }
    let total: usize = pieces.iter().map(|p| p.0.len()).sum();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8)
        .min(pieces.len());
    if threads <= 1 || total < 4 * PIECE {
        for (s, d) in pieces {
            d.copy_from_slice(s);
        }
        return;
    }
    let mut lanes: Vec<Vec<(&[u8], &mut [u8])>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, p) in pieces.into_iter().enumerate() {
        lanes[i % threads].push(p);
    }
    std::thread::scope(|sc| {
        for lane in lanes {
            sc.spawn(move || {
                for (s, d) in lane {
                    d.copy_from_slice(s);
                }
            });
        }
    });
}

/// Device and pinned host GHASH accumulators of at least `words` words (a power of two).
fn acc_buffers(
    dev: &Device,
    stream: &Arc<CudaStream>,
    words: usize,
) -> Result<(CudaSlice<u32>, PinnedHostSlice<u32>)> {
    let n = words.next_power_of_two();
    let d = stream
        .alloc_zeros::<u32>(n)
        .map_err(drv("device allocation"))?;
    // SAFETY: the pinned buffer is only read after a full device-to-host copy into it.
    let h = unsafe { dev.ctx.alloc_pinned::<u32>(n) }.map_err(drv("allocating pinned memory"))?;
    Ok((d, h))
}

/// Ticket for a submitted batch; pass it to [`BatchDecryptor::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(usize);

/// Decrypts batches of chunks into device memory with `slots`-deep buffering: while batch *n*
/// is decrypted on its slot's stream, batch *n+1* is copied to pinned staging and uploaded on
/// another. Every chunk's tag is verified before `wait` returns the batch; on a mismatch the
/// device plaintext is zeroed and nothing is handed out.
pub struct BatchDecryptor {
    dev: Arc<Device>,
    slots: Vec<Slot>,
    next: usize,
    slot_bytes: usize,
    pool: Vec<CudaSlice<u8>>,
}

impl BatchDecryptor {
    fn new(dev: &Arc<Device>, slots: usize, slot_bytes: usize) -> Result<Self> {
        if slots == 0 || slot_bytes == 0 {
            return Err(Error::InvalidArgument(
                "batch decryptor needs at least one slot of non-zero size".into(),
            ));
        }
        let mut v = Vec::with_capacity(slots);
        for _ in 0..slots {
            let stream = dev.ctx.new_stream().map_err(drv("creating a stream"))?;
            // SAFETY: the pinned buffer is only read after bytes were written into it (the
            // staging region of each chunk is filled before its upload is enqueued).
            let staging = unsafe { dev.ctx.alloc_pinned::<u8>(slot_bytes) }
                .map_err(drv("allocating pinned staging memory"))?;
            let d_src = stream
                .alloc_zeros::<u8>(slot_bytes)
                .map_err(drv("allocating device staging memory"))?;
            let d_aad = stream
                .alloc_zeros::<u8>(16)
                .map_err(drv("device allocation"))?;
            let (d_acc, acc_host) = acc_buffers(dev, &stream, 64)?;
            v.push(Slot {
                stream,
                staging,
                aad_host: Vec::new(),
                d_src,
                d_aad,
                acc_host,
                d_acc,
                pending: None,
            });
        }
        Ok(BatchDecryptor {
            dev: dev.clone(),
            slots: v,
            next: 0,
            slot_bytes,
            pool: Vec::new(),
        })
    }

    /// Returns a finished batch's device buffer to the pool.
    pub fn recycle(&mut self, batch: DeviceBatch) {
        if self.pool.len() < 2 * self.slots.len() {
            self.pool.push(batch.buf);
        }
    }

    fn take_buffer(&mut self, stream: &Arc<CudaStream>, len: usize) -> Result<CudaSlice<u8>> {
        if let Some(i) = self.pool.iter().position(|b| b.len() >= len) {
            return Ok(self.pool.swap_remove(i));
        }
        stream
            .alloc_zeros::<u8>(len.max(16))
            .map_err(drv("allocating the batch's device buffer"))
    }

    /// Enqueues a batch: copies the chunks into the next slot's pinned staging buffer, uploads
    /// them asynchronously and launches GHASH and AES-CTR. `out_len` is the size of the
    /// plaintext device buffer. Fails if the slot's previous batch was not yet `wait`ed.
    pub fn submit(&mut self, chunks: &[BatchChunk<'_>], out_len: usize) -> Result<Ticket> {
        self.submit_inner(chunks, out_len, true)
    }

    fn submit_inner(
        &mut self,
        chunks: &[BatchChunk<'_>],
        out_len: usize,
        decrypt: bool,
    ) -> Result<Ticket> {
        let idx = self.next;
        self.check_slot_free(idx, chunks.len())?;
        // Layout in staging: each chunk at a 16-byte aligned offset; check everything first.
        let mut src_offs = Vec::with_capacity(chunks.len());
        let mut at = 0usize;
        for c in chunks {
            src_offs.push(at);
            at = at.saturating_add(c.data.len().next_multiple_of(16));
        }
        if at > self.slot_bytes {
            return Err(Error::InvalidArgument(format!(
                "batch needs {at} bytes of staging, slot holds {}",
                self.slot_bytes
            )));
        }
        let metas: Vec<Meta> = chunks
            .iter()
            .map(|c| Meta {
                key: c.key,
                params: c.params,
                len: c.data.len(),
                dst_offset: c.dst_offset,
            })
            .collect();
        self.check_metas(&metas, out_len)?;
        let stream = self.slots[idx].stream.clone();
        let out = self.take_buffer(&stream, out_len)?;
        let slot = &mut self.slots[idx];
        {
            // Copy into pinned staging with several threads, a group of ~16 MiB at a time, and
            // enqueue each group's upload as soon as it is staged so copying and PCIe overlap.
            let staging = slot
                .staging
                .as_mut_slice()
                .map_err(drv("pinned staging buffer"))?;
            let mut g0 = 0;
            while g0 < chunks.len() {
                let a = src_offs[g0];
                let mut g1 = g0 + 1;
                while g1 < chunks.len() && src_offs[g1] - a < STAGE_GROUP_BYTES {
                    g1 += 1;
                }
                let b = if g1 < chunks.len() { src_offs[g1] } else { at };
                let datas: Vec<&[u8]> = chunks[g0..g1].iter().map(|c| c.data).collect();
                parallel_copy(&datas, &src_offs[g0..g1], a, &mut staging[a..b]);
                if b > a {
                    stream
                        .memcpy_htod(&staging[a..b], &mut slot.d_src.slice_mut(a..b))
                        .map_err(drv("host-to-device copy"))?;
                }
                g0 = g1;
            }
        }
        self.enqueue(idx, &metas, &src_offs, out, out_len, decrypt)
    }

    /// The pinned staging buffer of the slot the next submission uses (`slot_bytes` long), for
    /// callers that read chunk bytes straight into it (e.g. `pread` from the shard: one copy
    /// from the page cache instead of two), then call [`submit_staged`](Self::submit_staged).
    /// Fails while that slot still holds a batch that was not [`wait`](Self::wait)ed.
    pub fn staging_mut(&mut self) -> Result<&mut [u8]> {
        let idx = self.next;
        self.check_slot_free(idx, 0)?;
        self.slots[idx]
            .staging
            .as_mut_slice()
            .map_err(drv("pinned staging buffer"))
    }

    /// Enqueues a batch whose bytes the caller already wrote into
    /// [`staging_mut`](Self::staging_mut): uploads the staged range asynchronously and launches GHASH and
    /// AES-CTR, exactly as [`submit`](Self::submit). Chunks at 16-byte aligned staging offsets
    /// take the vectorized path.
    pub fn submit_staged(&mut self, chunks: &[StagedChunk<'_>], out_len: usize) -> Result<Ticket> {
        self.submit_staged_inner(chunks, out_len, true)
    }

    /// [`submit_staged`](Self::submit_staged) without verification or decryption: the staged
    /// bytes are uploaded and copied to the output as they are (the benchmarks' plaintext twin,
    /// through the very same staging, upload and buffers).
    pub fn submit_staged_plain(
        &mut self,
        chunks: &[StagedChunk<'_>],
        out_len: usize,
    ) -> Result<Ticket> {
        self.submit_staged_inner(chunks, out_len, false)
    }

    fn submit_staged_inner(
        &mut self,
        chunks: &[StagedChunk<'_>],
        out_len: usize,
        decrypt: bool,
    ) -> Result<Ticket> {
        let idx = self.next;
        self.check_slot_free(idx, chunks.len())?;
        let mut end = 0usize;
        for (i, c) in chunks.iter().enumerate() {
            match c.staging_offset.checked_add(c.len) {
                Some(e) if e <= self.slot_bytes => end = end.max(e),
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "chunk {i}: staging range beyond the slot's {} bytes",
                        self.slot_bytes
                    )));
                }
            }
        }
        let metas: Vec<Meta> = chunks
            .iter()
            .map(|c| Meta {
                key: c.key,
                params: c.params,
                len: c.len,
                dst_offset: c.dst_offset,
            })
            .collect();
        self.check_metas(&metas, out_len)?;
        let src_offs: Vec<usize> = chunks.iter().map(|c| c.staging_offset).collect();
        let stream = self.slots[idx].stream.clone();
        let out = self.take_buffer(&stream, out_len)?;
        let slot = &mut self.slots[idx];
        if end > 0 {
            let staging = slot
                .staging
                .as_slice()
                .map_err(drv("pinned staging buffer"))?;
            stream
                .memcpy_htod(&staging[..end], &mut slot.d_src.slice_mut(..end))
                .map_err(drv("host-to-device copy"))?;
        }
        self.enqueue(idx, &metas, &src_offs, out, out_len, decrypt)
    }

    fn check_slot_free(&self, idx: usize, chunks: usize) -> Result<()> {
        if self.slots[idx].pending.is_some() {
            return Err(Error::InvalidArgument(
                "batch slot still holds an unconsumed batch: call wait() first".into(),
            ));
        }
        if chunks > MAX_CHUNKS_PER_LAUNCH {
            return Err(Error::InvalidArgument(format!(
                "at most {MAX_CHUNKS_PER_LAUNCH} chunks per batch"
            )));
        }
        Ok(())
    }

    fn check_metas(&self, metas: &[Meta<'_>], out_len: usize) -> Result<()> {
        for (i, c) in metas.iter().enumerate() {
            if !Arc::ptr_eq(&c.key.dev, &self.dev) {
                return Err(Error::InvalidArgument(format!(
                    "chunk {i}: key prepared on another CUDA device"
                )));
            }
            if c.dst_offset.checked_add(c.len).is_none_or(|e| e > out_len) {
                return Err(Error::InvalidArgument(format!(
                    "chunk {i}: destination range beyond the batch buffer"
                )));
            }
        }
        Ok(())
    }

    /// Enqueues GHASH + CTR (or the plaintext twin's copies) for chunks already uploaded to
    /// the slot's device staging at `src_offs`, and marks the slot pending.
    fn enqueue(
        &mut self,
        idx: usize,
        chunks: &[Meta<'_>],
        src_offs: &[usize],
        mut out: CudaSlice<u8>,
        out_len: usize,
        decrypt: bool,
    ) -> Result<Ticket> {
        let stream = self.slots[idx].stream.clone();
        let slot = &mut self.slots[idx];
        let mut expected = Vec::with_capacity(chunks.len());
        if decrypt && !chunks.is_empty() {
            slot.aad_host.clear();
            let mut descs: Vec<u64> = Vec::with_capacity(chunks.len() * DESC_WORDS);
            for (c, &o) in chunks.iter().zip(src_offs) {
                let aad_off = slot.aad_host.len() as u64;
                slot.aad_host.extend_from_slice(c.params.aad);
                descs.extend(descriptor(
                    o as u64,
                    c.dst_offset as u64,
                    c.len as u64,
                    0,
                    &c.params.nonce,
                    aad_off,
                    c.params.aad.len() as u64,
                    !c.params.encrypted,
                ));
                expected.push(c.key.expected_ghash(&c.params.nonce, &c.params.tag));
            }
            if slot.d_aad.len() < slot.aad_host.len() {
                slot.d_aad = stream
                    .alloc_zeros::<u8>(slot.aad_host.len().next_power_of_two())
                    .map_err(drv("device allocation"))?;
            }
            if !slot.aad_host.is_empty() {
                stream
                    .memcpy_htod(
                        &slot.aad_host[..],
                        &mut slot.d_aad.slice_mut(..slot.aad_host.len()),
                    )
                    .map_err(drv("host-to-device copy"))?;
            }
            if slot.d_acc.len() < 4 * chunks.len() {
                (slot.d_acc, slot.acc_host) = acc_buffers(&self.dev, &stream, 4 * chunks.len())?;
            }
            stream
                .memset_zeros(&mut slot.d_acc)
                .map_err(drv("memset"))?;
            // One launch pair per run of chunks that share a key.
            let mut start = 0;
            while start < chunks.len() {
                let key = chunks[start].key;
                let mut end = start + 1;
                while end < chunks.len() && Arc::ptr_eq(chunks[end].key, key) {
                    end += 1;
                }
                let d_desc = stream
                    .clone_htod(&descs[start * DESC_WORDS..end * DESC_WORDS])
                    .map_err(drv("host-to-device copy"))?;
                let run = &chunks[start..end];
                let max_seg = run
                    .iter()
                    .map(|c| {
                        ghash_segments(c.params.aad.len() as u64, c.len as u64, !c.params.encrypted)
                    })
                    .max()
                    .unwrap_or(1);
                let max_blocks = run
                    .iter()
                    .filter(|c| c.params.encrypted)
                    .map(|c| (c.len as u64).div_ceil(16))
                    .max()
                    .unwrap_or(0);
                let mut acc_run = slot.d_acc.slice_mut(4 * start..4 * end);
                let acc_ref = &mut acc_run;
                // The ghash kernel indexes acc by chunk within the launch: pass the sub-view.
                key.ensure_powers(max_seg)?;
                {
                    let g = key.hpow.lock().unwrap_or_else(|p| p.into_inner());
                    let cfg = LaunchConfig {
                        grid_dim: (grid_x(max_seg), run.len() as u32, 1),
                        block_dim: (THREADS, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    // SAFETY: descriptors were built from ranges checked above (staging layout,
                    // dst within out_len, aad within d_aad); acc_run holds 4 words per chunk.
                    unsafe {
                        stream
                            .launch_builder(&self.dev.k.ghash)
                            .arg(&key.htab)
                            .arg(&g.0)
                            .arg(&d_desc)
                            .arg(&slot.d_src)
                            .arg(&slot.d_aad)
                            .arg(acc_ref)
                            .launch(cfg)
                    }
                    .map_err(drv("GHASH kernel launch"))?;
                }
                if max_blocks > 0 {
                    // Plain chunks in the run have their bytes copied instead (below); CTR
                    // skips nothing, so give it only encrypted chunks' descriptors.
                    let enc: Vec<u64> = run
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| c.params.encrypted)
                        .flat_map(|(j, _)| {
                            descs[(start + j) * DESC_WORDS..(start + j + 1) * DESC_WORDS]
                                .iter()
                                .copied()
                        })
                        .collect();
                    let d_enc = stream
                        .clone_htod(&enc[..])
                        .map_err(drv("host-to-device copy"))?;
                    key.launch_ctr(
                        &stream,
                        &d_enc,
                        enc.len() / DESC_WORDS,
                        max_blocks,
                        &slot.d_src,
                        &mut out,
                    )?;
                }
                for (j, c) in run.iter().enumerate() {
                    if !c.params.encrypted && c.len != 0 {
                        let o = src_offs[start + j];
                        stream
                            .memcpy_dtod(
                                &slot.d_src.slice(o..o + c.len),
                                &mut out.slice_mut(c.dst_offset..c.dst_offset + c.len),
                            )
                            .map_err(drv("device copy"))?;
                    }
                }
                start = end;
            }
            stream
                .memcpy_dtoh(&slot.d_acc, &mut slot.acc_host)
                .map_err(drv("device-to-host copy"))?;
        } else {
            // Plaintext twin (benchmarks): the same staging and upload, then a device copy.
            for (c, &o) in chunks.iter().zip(src_offs) {
                if c.len != 0 {
                    stream
                        .memcpy_dtod(
                            &slot.d_src.slice(o..o + c.len),
                            &mut out.slice_mut(c.dst_offset..c.dst_offset + c.len),
                        )
                        .map_err(drv("device copy"))?;
                }
            }
        }
        slot.pending = Some(Pending {
            out,
            out_len,
            expected,
        });
        self.next = (idx + 1) % self.slots.len();
        Ok(Ticket(idx))
    }

    /// Waits for a submitted batch and checks every tag. On success the plaintext is in device
    /// memory; on a mismatch the buffer is zeroed and `Err((chunk index, TagMismatch))` says which
    /// chunk failed (the caller maps it to `Error::Integrity` with the file and tensor); device
    /// failures are [`WaitError::Device`].
    pub fn wait(&mut self, ticket: Ticket) -> std::result::Result<DeviceBatch, WaitError> {
        let slot = self
            .slots
            .get_mut(ticket.0)
            .ok_or_else(|| WaitError::Device(Error::InvalidArgument("unknown ticket".into())))?;
        let Some(mut p) = slot.pending.take() else {
            return Err(WaitError::Device(Error::InvalidArgument(
                "no batch pending on this ticket".into(),
            )));
        };
        if let Err(e) = slot.stream.synchronize() {
            let _ = slot.stream.memset_zeros(&mut p.out);
            return Err(WaitError::Device(backend_err("batch decryption", e)));
        }
        let mut bad = None;
        match slot.acc_host.as_slice() {
            Ok(acc) => {
                for (i, exp) in p.expected.iter().enumerate() {
                    if !ct_eq(&acc_bytes(&acc[4 * i..4 * i + 4]), exp) && bad.is_none() {
                        bad = Some(i);
                    }
                }
            }
            Err(e) => {
                let _ = slot.stream.memset_zeros(&mut p.out);
                return Err(WaitError::Device(backend_err("reading tags back", e)));
            }
        }
        if let Some(i) = bad {
            let _ = slot.stream.memset_zeros(&mut p.out);
            let _ = slot.stream.synchronize();
            self.pool.push(p.out);
            return Err(WaitError::Tag { chunk: i });
        }
        Ok(DeviceBatch {
            buf: p.out,
            len: p.out_len,
            stream: slot.stream.clone(),
        })
    }
}

/// Why [`BatchDecryptor::wait`] handed nothing out.
#[derive(Debug)]
pub enum WaitError {
    /// Chunk `chunk` (index in the submitted slice) failed its tag; the batch was zeroed.
    Tag {
        /// Index of the first failing chunk.
        chunk: usize,
    },
    /// The device failed.
    Device(Error),
}

impl std::fmt::Display for WaitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WaitError::Tag { chunk } => {
                write!(f, "chunk {chunk} of the batch failed its integrity check")
            }
            WaitError::Device(e) => write!(f, "{e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Benchmarks (used by examples/cuda_bench.rs, scripts/gpu-check.sh and `ciphershard bench`).

/// One AES-CTR kernel variant's figures from [`kernel_bench_with`].
#[derive(Debug, Clone)]
pub struct VariantFigures {
    /// The variant.
    pub variant: CtrVariant,
    /// Registers and local memory (spills) per thread; `None` if the variant cannot run here.
    pub info: Option<KernelInfo>,
    /// AES-256-CTR kernel alone, GB/s.
    pub ctr_gbps: f64,
    /// GHASH then this CTR kernel (tag verification + decryption), GB/s.
    pub ctr_ghash_gbps: f64,
    /// `Ok` only if this variant's output in this run matched the CPU (and the caller's
    /// conformance run, when given); a variant with `Err` is never selected.
    pub check: std::result::Result<(), String>,
}

/// Throughput figures measured by [`kernel_bench`], in GB/s (10^9 bytes per second).
#[derive(Debug, Clone)]
pub struct KernelBenchReport {
    /// Device description.
    pub device: String,
    /// Bytes processed per kernel figure (device-resident).
    pub kernel_bytes: usize,
    /// Every CTR variant, in [`CtrVariant::ALL`] order.
    pub variants: Vec<VariantFigures>,
    /// The fastest verified variant (by CTR + GHASH), used for the end-to-end figures.
    pub best: Option<CtrVariant>,
    /// AES-256-CTR kernel alone, best verified variant.
    pub ctr_gbps: f64,
    /// GHASH kernel alone.
    pub ghash_gbps: f64,
    /// GHASH + CTR (tag verification and decryption) back to back, best verified variant.
    pub ctr_ghash_gbps: f64,
    /// Pinned host-to-device copy.
    pub h2d_pinned_gbps: f64,
    /// Bytes per end-to-end figure.
    pub e2e_bytes: usize,
    /// Pageable host ciphertext → pinned staging → device plaintext, every tag verified.
    pub e2e_encrypted_gbps: f64,
    /// The plaintext twin through the same staging path (copy only).
    pub e2e_plain_gbps: f64,
    /// File read with `pread` by `file_threads` threads straight into pinned staging → device
    /// plaintext, verified ([`BatchDecryptor::submit_staged`]); `Err` says why it did not run.
    pub file_encrypted_gbps: std::result::Result<f64, String>,
    /// The plaintext twin of the file path.
    pub file_plain_gbps: f64,
    /// Threads reading the file.
    pub file_threads: usize,
    /// Where the (page-cache-hot) benchmark file was.
    pub file_dir: String,
}

impl Default for KernelBenchReport {
    fn default() -> Self {
        KernelBenchReport {
            device: String::new(),
            kernel_bytes: 0,
            variants: Vec::new(),
            best: None,
            ctr_gbps: 0.0,
            ghash_gbps: 0.0,
            ctr_ghash_gbps: 0.0,
            h2d_pinned_gbps: 0.0,
            e2e_bytes: 0,
            e2e_encrypted_gbps: 0.0,
            e2e_plain_gbps: 0.0,
            file_encrypted_gbps: Err("not run".into()),
            file_plain_gbps: 0.0,
            file_threads: 0,
            file_dir: String::new(),
        }
    }
}

impl Default for VariantFigures {
    fn default() -> Self {
        VariantFigures {
            variant: CtrVariant::DEFAULT,
            info: None,
            ctr_gbps: 0.0,
            ctr_ghash_gbps: 0.0,
            check: Err("not measured".into()),
        }
    }
}

impl std::fmt::Display for KernelBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        let best = self.best.map_or("none", CtrVariant::name);
        writeln!(f, "| measurement ({}) | GB/s |", self.device)?;
        writeln!(f, "|---|---|")?;
        for v in &self.variants {
            let info = v.info.map_or(String::new(), |i| {
                format!(", {} regs, {} B local", i.registers, i.local_bytes)
            });
            match &v.check {
                Ok(()) => writeln!(
                    f,
                    "| CTR variant {}{info}: CTR alone / CTR + GHASH | {:.1} / {:.1} |",
                    v.variant.name(),
                    v.ctr_gbps,
                    v.ctr_ghash_gbps
                )?,
                Err(e) => writeln!(
                    f,
                    "| CTR variant {}{info} | FAIL: {} |",
                    v.variant.name(),
                    e.replace('|', "/").chars().take(160).collect::<String>()
                )?,
            }
        }
        writeln!(
            f,
            "| AES-256-CTR kernel ({:.2} GiB in device memory), best verified variant {best} | {:.1} |",
            gib(self.kernel_bytes),
            self.ctr_gbps
        )?;
        writeln!(f, "| GHASH kernel alone | {:.1} |", self.ghash_gbps)?;
        writeln!(
            f,
            "| AES-256-CTR + GHASH tag verification ({best}) | {:.1} |",
            self.ctr_ghash_gbps
        )?;
        writeln!(
            f,
            "| pinned host-to-device copy | {:.1} |",
            self.h2d_pinned_gbps
        )?;
        writeln!(
            f,
            "| end-to-end encrypted, old path ({:.2} GiB pageable → pinned staging → device plaintext, verified) | {:.1} |",
            gib(self.e2e_bytes),
            self.e2e_encrypted_gbps
        )?;
        writeln!(
            f,
            "| end-to-end plaintext twin, old path | {:.1} |",
            self.e2e_plain_gbps
        )?;
        match &self.file_encrypted_gbps {
            Ok(g) => {
                writeln!(
                    f,
                    "| end-to-end encrypted, new path (file in {}, pread ×{} → pinned staging → device, verified) | {:.1} |",
                    self.file_dir, self.file_threads, g
                )?;
                writeln!(
                    f,
                    "| end-to-end plaintext twin, new path | {:.1} |",
                    self.file_plain_gbps
                )?;
            }
            Err(e) => writeln!(
                f,
                "| end-to-end, new path (pread into pinned staging) | FAIL: {e} |"
            )?,
        }
        let ratios = |name: &str, enc: f64, plain: f64| -> String {
            format!(
                "{name}: encrypted/plaintext = {:.3}; encrypted/pinned H2D = {:.3}",
                enc / plain.max(1e-9),
                enc / self.h2d_pinned_gbps.max(1e-9)
            )
        };
        if self.e2e_plain_gbps > 0.0 && self.h2d_pinned_gbps > 0.0 {
            writeln!(
                f,
                "| ratios {} | |",
                ratios("old path", self.e2e_encrypted_gbps, self.e2e_plain_gbps)
            )?;
        }
        if let Ok(g) = self.file_encrypted_gbps
            && self.file_plain_gbps > 0.0
            && self.h2d_pinned_gbps > 0.0
        {
            writeln!(
                f,
                "| ratios {} | |",
                ratios("new path", g, self.file_plain_gbps)
            )?;
        }
        Ok(())
    }
}

/// Options of [`kernel_bench_with`].
#[derive(Debug, Clone, Default)]
pub struct BenchOptions {
    /// Variants that already failed a check (e.g. the conformance suite run by the caller): they
    /// are reported as FAIL with this reason and never selected.
    pub failed: Vec<(CtrVariant, String)>,
    /// Threads reading the benchmark file (0: the machine's parallelism, at most 16).
    pub file_threads: usize,
    /// Folder for the benchmark file (`None`: /dev/shm if writable, else the temp folder).
    pub file_dir: Option<std::path::PathBuf>,
}

/// [`kernel_bench_with`] with default options.
pub fn kernel_bench(
    cipher: &CudaCipher,
    kernel_bytes: usize,
    e2e_bytes: usize,
) -> Result<KernelBenchReport> {
    kernel_bench_with(cipher, kernel_bytes, e2e_bytes, &BenchOptions::default())
}

/// Measures every CTR variant (CTR alone and with GHASH, each checked against the CPU on the
/// very output it produced) on `kernel_bytes` of device memory (chunks of 4 MiB), then GHASH,
/// pinned H2D, and the end-to-end batch path on `e2e_bytes` of ciphertext with the fastest
/// verified variant selected: from pageable memory (old path) and from a page-cache-hot file
/// read with `pread` straight into pinned staging (new path). Takes seconds; for benchmarks.
/// Leaves the fastest verified variant selected on `cipher`.
pub fn kernel_bench_with(
    cipher: &CudaCipher,
    kernel_bytes: usize,
    e2e_bytes: usize,
    opts: &BenchOptions,
) -> Result<KernelBenchReport> {
    const CHUNK: usize = 4 << 20;
    let dev = &cipher.dev;
    let s = &dev.stream;
    let timed = |f: &mut dyn FnMut() -> Result<()>, reps: usize| -> Result<f64> {
        f()?; // warm-up
        let start = dev
            .ctx
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(drv("event"))?;
        let end = dev
            .ctx
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(drv("event"))?;
        start.record(s).map_err(drv("event"))?;
        for _ in 0..reps {
            f()?;
        }
        end.record(s).map_err(drv("event"))?;
        end.synchronize().map_err(drv("synchronize"))?;
        Ok(f64::from(start.elapsed_ms(&end).map_err(drv("event timing"))?) / 1e3 / reps as f64)
    };
    let mut kb = [0u8; 32];
    getrandom::fill(&mut kb).map_err(|e| backend_err("random key", e))?;
    let key = DataKey::from_bytes(kb);
    kb.zeroize();
    let cpu = super::cpu::CpuCipher::new().prepare(&key)?;
    let dkey = CudaKey::new(dev, &key)?;
    let n = (kernel_bytes / CHUNK).clamp(1, MAX_CHUNKS_PER_LAUNCH);
    let bytes = n * CHUNK;
    let src = s
        .alloc_zeros::<u8>(bytes)
        .map_err(drv("allocating benchmark input (lower the size)"))?;
    let mut dst = s
        .alloc_zeros::<u8>(bytes)
        .map_err(drv("allocating benchmark output (lower the size)"))?;
    let aad = s.alloc_zeros::<u8>(96).map_err(drv("device allocation"))?;
    let mut acc = s
        .alloc_zeros::<u32>(4 * n)
        .map_err(drv("device allocation"))?;
    let nonce_of = |i: usize| {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&(i as u64).to_be_bytes());
        nonce
    };
    let mut descs = Vec::with_capacity(n * DESC_WORDS);
    for i in 0..n {
        descs.extend(descriptor(
            (i * CHUNK) as u64,
            (i * CHUNK) as u64,
            CHUNK as u64,
            0,
            &nonce_of(i),
            0,
            89,
            false,
        ));
    }
    let d_desc = s
        .clone_htod(&descs[..])
        .map_err(drv("host-to-device copy"))?;
    let blocks = (CHUNK / 16) as u64;
    let segs = ghash_segments(89, CHUNK as u64, false);
    let mut r = KernelBenchReport {
        device: cipher.describe(),
        kernel_bytes: bytes,
        e2e_bytes,
        file_encrypted_gbps: Err("not run".into()),
        ..Default::default()
    };
    // The input is zeros, so the output must be the keystream: check the first and last chunk
    // of the very buffer the timed launches wrote.
    let zeros = vec![0u8; CHUNK];
    let mut want = vec![0u8; CHUNK];
    let mut check_output = |dst: &CudaSlice<u8>| -> std::result::Result<(), String> {
        for i in [0, n - 1] {
            let got = s
                .clone_dtoh(&dst.slice(i * CHUNK..(i + 1) * CHUNK))
                .map_err(|e| format!("reading the output back: {e}"))?;
            cpu.ctr_apply(&nonce_of(i), 0, &zeros, &mut want)
                .map_err(|e| e.to_string())?;
            if let Some(p) = got.iter().zip(&want).position(|(a, b)| a != b) {
                return Err(format!(
                    "output differs from the CPU keystream in chunk {i} at byte {p}"
                ));
            }
        }
        Ok(())
    };
    let initial = cipher.ctr_variant();
    for (v, info) in cipher.ctr_variants() {
        let mut fig = VariantFigures {
            variant: v,
            info: info.as_ref().ok().copied(),
            ..Default::default()
        };
        if let Some((_, why)) = opts.failed.iter().find(|(f, _)| *f == v) {
            fig.check = Err(why.clone());
            r.variants.push(fig);
            continue;
        }
        if let Err(e) = info {
            fig.check = Err(e);
            r.variants.push(fig);
            continue;
        }
        cipher.set_ctr_variant(v)?;
        let measured = (|| -> Result<(f64, f64)> {
            s.memset_zeros(&mut dst).map_err(drv("memset"))?;
            let t_ctr = timed(
                &mut || dkey.launch_ctr(s, &d_desc, n, blocks, &src, &mut dst),
                5,
            )?;
            let t_both = timed(
                &mut || {
                    dkey.launch_ghash(s, &d_desc, n, segs, &src, &aad, &mut acc)?;
                    dkey.launch_ctr(s, &d_desc, n, blocks, &src, &mut dst)
                },
                5,
            )?;
            Ok((bytes as f64 / t_ctr / 1e9, bytes as f64 / t_both / 1e9))
        })();
        match measured {
            Ok((c, b)) => {
                fig.ctr_gbps = c;
                fig.ctr_ghash_gbps = b;
                fig.check = check_output(&dst);
            }
            Err(e) => fig.check = Err(e.to_string()),
        }
        r.variants.push(fig);
    }
    let best = r
        .variants
        .iter()
        .filter(|v| v.check.is_ok())
        .max_by(|a, b| a.ctr_ghash_gbps.total_cmp(&b.ctr_ghash_gbps));
    if let Some(b) = best {
        r.best = Some(b.variant);
        r.ctr_gbps = b.ctr_gbps;
        r.ctr_ghash_gbps = b.ctr_ghash_gbps;
        cipher.set_ctr_variant(b.variant)?;
    } else {
        cipher.set_ctr_variant(initial)?;
    }
    r.device = cipher.describe();
    let t = timed(
        &mut || dkey.launch_ghash(s, &d_desc, n, segs, &src, &aad, &mut acc),
        5,
    )?;
    r.ghash_gbps = bytes as f64 / t / 1e9;
    drop((src, dst, acc));

    // Pinned host-to-device bandwidth.
    let h2d_len = 256usize << 20;
    // SAFETY: the pinned buffer is zero-filled before any read.
    let mut pinned =
        unsafe { dev.ctx.alloc_pinned::<u8>(h2d_len) }.map_err(drv("allocating pinned memory"))?;
    pinned.as_mut_slice().map_err(drv("pinned memory"))?.fill(0);
    let mut d_h2d = s
        .alloc_zeros::<u8>(h2d_len)
        .map_err(drv("device allocation"))?;
    let t = timed(
        &mut || {
            s.memcpy_htod(&pinned, &mut d_h2d)
                .map_err(drv("host-to-device copy"))
        },
        8,
    )?;
    r.h2d_pinned_gbps = h2d_len as f64 / t / 1e9;
    drop((pinned, d_h2d));

    // End to end: pageable host ciphertext (as from a mapped shard) through the batch path.
    let chunks_total = (e2e_bytes / CHUNK).max(1);
    let mut host = vec![0u8; chunks_total * CHUNK];
    let aad_host = [7u8; 89];
    let mut tags = Vec::with_capacity(chunks_total);
    for (i, c) in host.chunks_mut(CHUNK).enumerate() {
        let nonce = nonce_of(i);
        tags.push((nonce, cpu.seal_in_place(&nonce, &aad_host, true, c)?));
    }
    let dkey = Arc::new(dkey);
    let per_batch = 16usize;
    const SLOTS: usize = 3;
    let mut dec = BatchDecryptor::new(dev, SLOTS, per_batch * CHUNK)?;
    let params = |i: usize| ChunkParams {
        nonce: tags[i].0,
        aad: &aad_host,
        tag: tags[i].1,
        encrypted: true,
    };
    // Every plaintext byte is zero: check the first MiB of the first batch came out so.
    let first_batch_ok = |batch: &DeviceBatch| -> Result<()> {
        let head = batch
            .stream()
            .clone_dtoh(&batch.slice().slice(..(1 << 20).min(batch.len())))
            .map_err(drv("device-to-host copy"))?;
        if head.iter().any(|&b| b != 0) {
            return Err(backend_err(
                "benchmark batch",
                "decrypted bytes differ from the plaintext",
            ));
        }
        Ok(())
    };
    for decrypt in [true, false] {
        let t0 = std::time::Instant::now();
        let mut inflight = std::collections::VecDeque::new();
        let mut done = 0usize;
        let mut finish = |dec: &mut BatchDecryptor, tk| -> Result<()> {
            let batch = dec
                .wait(tk)
                .map_err(|e| backend_err("benchmark batch", e))?;
            if decrypt && done == 0 {
                first_batch_ok(&batch)?;
            }
            done += 1;
            dec.recycle(batch);
            Ok(())
        };
        for (b, group) in host.chunks(per_batch * CHUNK).enumerate() {
            let chunks: Vec<BatchChunk> = group
                .chunks(CHUNK)
                .enumerate()
                .map(|(j, data)| BatchChunk {
                    key: &dkey,
                    params: params(b * per_batch + j),
                    data,
                    dst_offset: j * CHUNK,
                })
                .collect();
            if inflight.len() == SLOTS {
                finish(&mut dec, inflight.pop_front().expect("in flight"))?;
            }
            inflight.push_back(dec.submit_inner(&chunks, group.len(), decrypt)?);
        }
        while let Some(tk) = inflight.pop_front() {
            finish(&mut dec, tk)?;
        }
        let g = host.len() as f64 / t0.elapsed().as_secs_f64() / 1e9;
        if decrypt {
            r.e2e_encrypted_gbps = g;
        } else {
            r.e2e_plain_gbps = g;
        }
    }

    // End to end, new path: the same ciphertext in a page-cache-hot file, read with pread by
    // several threads straight into the slot's pinned staging (submit_staged).
    r.file_threads = if opts.file_threads > 0 {
        opts.file_threads
    } else {
        std::thread::available_parallelism().map_or(4, |n| n.get().min(16))
    };
    let dir = opts.file_dir.clone().unwrap_or_else(|| {
        let shm = std::path::Path::new("/dev/shm");
        if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        }
    });
    r.file_dir = dir.display().to_string();
    let file_run = (|| -> Result<(f64, f64)> {
        let bench_file = BenchFile::create(&dir, &host).or_else(|e| {
            // /dev/shm may be small in a container: fall back to the temp folder.
            let tmp = std::env::temp_dir();
            if tmp == dir {
                return Err(e);
            }
            r.file_dir = tmp.display().to_string();
            BenchFile::create(&tmp, &host)
        })?;
        drop(std::mem::take(&mut host));
        let file = bench_file
            .file
            .try_clone()
            .map_err(|e| Error::io(&bench_file.path, e))?;
        let readers = ReaderPool::new(file, &bench_file.path, r.file_threads);
        let nbatches = chunks_total.div_ceil(per_batch);
        let mut out = [0.0f64; 2];
        // Pass 0 warms the page cache (and is not reported); passes 1, 2 are timed.
        for pass in 0..3 {
            let decrypt = pass != 2;
            let t0 = std::time::Instant::now();
            let mut inflight = std::collections::VecDeque::new();
            let mut done = 0usize;
            let mut finish = |dec: &mut BatchDecryptor, tk| -> Result<()> {
                let batch = dec
                    .wait(tk)
                    .map_err(|e| backend_err("benchmark batch (file path)", e))?;
                if decrypt && done == 0 {
                    first_batch_ok(&batch)?;
                }
                done += 1;
                dec.recycle(batch);
                Ok(())
            };
            for b in 0..nbatches {
                if inflight.len() == SLOTS {
                    finish(&mut dec, inflight.pop_front().expect("in flight"))?;
                }
                let first = b * per_batch;
                let count = per_batch.min(chunks_total - first);
                let len = count * CHUNK;
                let staging = dec.staging_mut()?;
                readers.read((first * CHUNK) as u64, &mut staging[..len])?;
                let chunks: Vec<StagedChunk> = (0..count)
                    .map(|j| StagedChunk {
                        key: &dkey,
                        params: params(first + j),
                        staging_offset: j * CHUNK,
                        len: CHUNK,
                        dst_offset: j * CHUNK,
                    })
                    .collect();
                inflight.push_back(dec.submit_staged_inner(&chunks, len, decrypt)?);
            }
            while let Some(tk) = inflight.pop_front() {
                finish(&mut dec, tk)?;
            }
            if pass > 0 {
                out[pass - 1] = (chunks_total * CHUNK) as f64 / t0.elapsed().as_secs_f64() / 1e9;
            }
        }
        Ok((out[0], out[1]))
    })();
    match file_run {
        Ok((enc, plain)) => {
            r.file_encrypted_gbps = Ok(enc);
            r.file_plain_gbps = plain;
        }
        Err(e) => r.file_encrypted_gbps = Err(e.to_string()),
    }
    Ok(r)
}

/// The benchmark's ciphertext file (never plaintext), removed when dropped.
struct BenchFile {
    path: std::path::PathBuf,
    file: std::fs::File,
}

impl BenchFile {
    fn create(dir: &std::path::Path, bytes: &[u8]) -> Result<BenchFile> {
        use std::io::Write;
        let path = dir.join(format!("ciphershard-cuda-bench-{}.bin", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let bench_file = BenchFile {
            path,
            file: file.try_clone().map_err(|e| Error::io(dir, e))?,
        };
        file.write_all(bytes)
            .map_err(|e| Error::io(&bench_file.path, e))?;
        Ok(bench_file)
    }
}

impl Drop for BenchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Persistent reader threads for the file benchmark (spawning threads for every 64 MiB batch
/// would cost a visible share of the time being measured): [`ReaderPool::read`] splits a buffer
/// into contiguous pieces, one `pread` per piece, and returns once every piece is in.
struct ReaderPool {
    jobs: Option<crossbeam_channel::Sender<ReadJob>>,
    done: crossbeam_channel::Receiver<std::io::Result<()>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    path: std::path::PathBuf,
}

struct ReadJob {
    ptr: *mut u8,
    len: usize,
    offset: u64,
}

// SAFETY: a job's region is written only by the one worker that receives it, and
// `ReaderPool::read` does not return before every job it sent has reported back (or every worker
// is gone), so the region is neither aliased nor released while a worker writes into it.
unsafe impl Send for ReadJob {}

impl ReaderPool {
    fn new(file: std::fs::File, path: &std::path::Path, threads: usize) -> ReaderPool {
        use std::os::unix::fs::FileExt;
        let file = Arc::new(file);
        let (jobs, rx) = crossbeam_channel::unbounded::<ReadJob>();
        let (done_tx, done) = crossbeam_channel::unbounded();
        let workers = (0..threads.max(1))
            .map(|_| {
                let (rx, done_tx, file) = (rx.clone(), done_tx.clone(), file.clone());
                std::thread::spawn(move || {
                    for job in rx {
                        // SAFETY: see `ReadJob`: this worker is the only writer of the region,
                        // which stays alive and unaliased until `read` has this job's report.
                        let buf = unsafe { std::slice::from_raw_parts_mut(job.ptr, job.len) };
                        if done_tx.send(file.read_exact_at(buf, job.offset)).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        ReaderPool {
            jobs: Some(jobs),
            done,
            workers,
            path: path.to_path_buf(),
        }
    }

    /// Fills `buf` from the file at `offset`, one piece per worker.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let jobs = self.jobs.as_ref().expect("pool is open");
        let piece = buf
            .len()
            .div_ceil(self.workers.len())
            .next_multiple_of(64 << 10)
            .max(1);
        let mut sent = 0usize;
        for (i, p) in buf.chunks_mut(piece).enumerate() {
            let job = ReadJob {
                ptr: p.as_mut_ptr(),
                len: p.len(),
                offset: offset + (i * piece) as u64,
            };
            if jobs.send(job).is_err() {
                break;
            }
            sent += 1;
        }
        let mut result = Ok(());
        for _ in 0..sent {
            match self.done.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    if result.is_ok() {
                        result = Err(Error::io(&self.path, e));
                    }
                }
                // Every worker is gone: nothing can still be writing into `buf`.
                Err(_) => {
                    return Err(backend_err(
                        "reading the benchmark file",
                        "the reader threads stopped",
                    ));
                }
            }
        }
        if sent * piece < buf.len() {
            return Err(backend_err(
                "reading the benchmark file",
                "the reader threads stopped",
            ));
        }
        result
    }
}

impl Drop for ReaderPool {
    fn drop(&mut self) {
        drop(self.jobs.take());
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_copy_places_every_chunk_at_its_offset() {
        let mut rng = super::super::conformance::SplitMix(3);
        for case in 0..20 {
            let n = 1 + rng.below(12) as usize;
            let mut datas = Vec::new();
            for _ in 0..n {
                let len = if case % 2 == 0 {
                    rng.below(3 << 20)
                } else {
                    rng.below(100)
                } as usize;
                let mut d = vec![0u8; len];
                rng.fill(&mut d);
                datas.push(d);
            }
            let base = 16 * rng.below(4) as usize;
            let mut offs = Vec::new();
            let mut at = base;
            for d in &datas {
                offs.push(at);
                at += d.len().next_multiple_of(16);
            }
            let mut region = vec![0xEEu8; at - base];
            let refs: Vec<&[u8]> = datas.iter().map(|d| d.as_slice()).collect();
            parallel_copy(&refs, &offs, base, &mut region);
            let mut want = vec![0xEEu8; at - base];
            for (d, &o) in datas.iter().zip(&offs) {
                want[o - base..o - base + d.len()].copy_from_slice(d);
            }
            assert!(region == want, "case {case}: staging layout differs");
        }
    }

    #[test]
    fn descriptor_matches_the_kernel_layout() {
        let nonce = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
        let d = descriptor(16, 32, 100, 7, &nonce, 48, 89, true);
        assert_eq!(d[..4], [16, 32, 100, 7]);
        assert_eq!(d[4], 0x0807_0605_0403_0201);
        assert_eq!(d[5], 0x0c0b_0a09);
        assert_eq!(d[6], 48);
        assert_eq!(d[7], 89 | 1 << 48);
        // Blocks: 6 AAD + 7 data + 1 length = 14 -> one 32-block segment; plain: 12 + 1.
        assert_eq!(ghash_segments(89, 100, false), 1);
        assert_eq!(ghash_segments(0, 32 * 16, false), 2);
        assert_eq!(
            ghash_segments(89, 4 << 20, false),
            (6 + (1 << 18) + 1u64).div_ceil(32)
        );
    }

    #[test]
    fn ctr_variants_have_unique_names_and_kernels_and_sane_launches() {
        for v in CtrVariant::ALL {
            assert_eq!(CtrVariant::parse(v.name()), Some(v));
            let src = kernel_source();
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
        // Enough threads for every block: grid.x * threads * 32 >= blocks.
        for blocks in [1u64, 31, 32, 33, 262_144, 1 << 30] {
            for v in CtrVariant::ALL {
                let g = u64::from(ctr_grid_x(blocks, v.threads()));
                assert!(g * u64::from(v.threads()) * CTR_BLOCKS_PER_THREAD >= blocks);
                assert!(g >= 1);
            }
        }
    }

    #[test]
    fn bench_report_prints_a_line_per_variant_and_marks_failures() {
        let mut r = KernelBenchReport {
            device: "dev".into(),
            best: Some(CtrVariant::Wide2x512),
            file_encrypted_gbps: Ok(30.0),
            file_plain_gbps: 31.0,
            h2d_pinned_gbps: 50.0,
            e2e_plain_gbps: 18.0,
            e2e_encrypted_gbps: 17.0,
            ..Default::default()
        };
        for v in CtrVariant::ALL {
            r.variants.push(VariantFigures {
                variant: v,
                info: Some(KernelInfo {
                    registers: 48,
                    local_bytes: 0,
                }),
                ctr_gbps: 100.0,
                ctr_ghash_gbps: 80.0,
                check: if v == CtrVariant::Wide4x1024 {
                    Err("conformance: bad | tag".into())
                } else {
                    Ok(())
                },
            });
        }
        let text = r.to_string();
        for v in CtrVariant::ALL {
            assert!(text.contains(v.name()), "{text}");
        }
        assert!(text.contains(
            "| CTR variant w4-prmt-1024, 48 regs, 0 B local | FAIL: conformance: bad / tag |"
        ));
        assert!(text.contains("best verified variant w2-prmt-512"));
        assert!(
            text.contains("new path: encrypted/plaintext = 0.968"),
            "{text}"
        );
        assert!(text.lines().all(|l| l.starts_with('|')));
    }

    #[test]
    fn reader_pool_reads_every_byte_at_its_place() {
        use std::io::Write;
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..3_000_017u32).map(|i| (i * 7 + i / 251) as u8).collect();
        f.write_all(&data).unwrap();
        for threads in [1, 5, 16] {
            let pool = ReaderPool::new(f.try_clone().unwrap(), std::path::Path::new("t"), threads);
            for (off, len) in [(0, 0), (0, 100), (13, 2_000_000), (1 << 20, 1_900_000)] {
                let mut buf = vec![0u8; len];
                pool.read(off as u64, &mut buf).unwrap();
                assert!(buf == data[off..off + len], "threads {threads} off {off}");
            }
            let mut past = vec![0u8; 10];
            let e = pool.read(data.len() as u64 - 5, &mut past).unwrap_err();
            assert!(e.to_string().contains('t'), "{e}");
        }
    }

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
