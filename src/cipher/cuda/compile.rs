//! Kernel sources → PTX → one module loaded into a context: the loaded [`Kernels`].
//!
//! One way in for every kernel. The AES-CTR and GHASH kernels (`kernels/aes_core.h` +
//! `kernels/aes_gcm.cu`) and the row gather of device batches (`kernels/gather.cu`) are one
//! NVRTC source, compiled at first use for the device's compute capability (once per process
//! and architecture, [`compile_kernels`]) and loaded once per context ([`load`]). Why NVRTC for
//! the gather too, rather than checked-in PTX: the AES kernels are tuned per architecture and
//! already need NVRTC at run time, so a second path (a PTX file, its freshness test, its own load
//! and error) bought nothing; the device loader runs on its cipher's context, whose module is
//! already loaded, so it gains no dependency. One compile, one cache, one error path, and the
//! prebuilt-PTX override ([`PTX_ENV`]) carries the gather kernel as well.
#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex, Weak};

use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::{CompileOptions, Ptx};

use super::variants::{CtrVariant, load_ctr};
use super::{drv, nvrtc_present};
use crate::error::{Error, Result};

const CORE_H: &str = include_str!("../../../kernels/aes_core.h");
const AES_GCM_CU: &str = include_str!("../../../kernels/aes_gcm.cu");
const GATHER_CU: &str = include_str!("../../../kernels/gather.cu");
/// The only `#include` among the kernels (aes_gcm.cu's), resolved by putting the header first.
const CORE_INCLUDE: &str = "#include \"aes_core.h\"";

/// Environment variable naming a prebuilt PTX file (from `cuda_bench --emit-ptx`) to load
/// instead of compiling with NVRTC: for GPU machines that have the driver but no NVRTC.
pub const PTX_ENV: &str = "CIPHERSHARD_CUDA_PTX";

/// The full NVRTC source: the shared core header, the AES-GCM kernels, then the row gather.
pub fn kernel_source() -> String {
    format!(
        "{CORE_H}\n{}\n{GATHER_CU}",
        AES_GCM_CU.replace(CORE_INCLUDE, "")
    )
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
            "NVRTC could not compile the kernels (kernels/aes_gcm.cu, kernels/gather.cu): {e} \
             (this is a bug: use --backend cpu)"
        ),
    })
}

/// The file [`PTX_ENV`] names, if it is set.
pub(super) fn prebuilt_ptx_path() -> Option<std::path::PathBuf> {
    std::env::var_os(PTX_ENV)
        .filter(|v| !v.is_empty())
        .map(Into::into)
}

/// Whether `ptx` looks like ciphershard's kernels (what a prebuilt file must pass). A file from
/// before the gather kernel joined the module still passes: the cipher runs on it, and only
/// [`super::Gather::load`] fails, saying to regenerate it.
fn is_ciphershard_ptx(ptx: &str) -> bool {
    ptx.contains(".entry cs_ctr")
}

/// PTX per architecture, compiled at most once per process. A failure is kept too: NVRTC would
/// fail the same way again. A plain mutex (held while compiling, so a second caller for the same
/// architecture waits for the first rather than compiling again): this is a cold path.
static PTX: Mutex<Vec<(String, std::result::Result<Ptx, String>)>> = Mutex::new(Vec::new());

/// The PTX to load for `arch`: the prebuilt file when [`PTX_ENV`] is set, else NVRTC's.
fn ptx_for(arch: &str) -> Result<Ptx> {
    if let Some(path) = prebuilt_ptx_path() {
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        if !is_ciphershard_ptx(&text) {
            return Err(Error::format(
                &path,
                "PTX file",
                "no cs_ctr kernel: not ciphershard's kernels",
            ));
        }
        return Ok(Ptx::from_src(text));
    }
    let mut cache = PTX.lock().unwrap_or_else(|p| p.into_inner());
    let i = match cache.iter().position(|(a, _)| a == arch) {
        Some(i) => i,
        None => {
            let ptx = compile_kernels(Some(arch)).map_err(|e| e.to_string());
            cache.push((arch.to_string(), ptx));
            cache.len() - 1
        }
    };
    cache[i].1.clone().map_err(|reason| Error::Backend {
        backend: "cuda",
        reason,
    })
}

/// Every kernel of one module, loaded into one context.
pub(super) struct Kernels {
    /// The context the module is loaded into.
    pub(super) ctx: Arc<CudaContext>,
    /// The architecture the PTX was compiled for (`sm_90`...).
    pub(super) arch: String,
    pub(super) setup: CudaFunction,
    pub(super) hpowers: CudaFunction,
    /// One entry per [`CtrVariant::ALL`]: the loaded, configured kernel or why it is unusable.
    pub(super) ctr: Vec<std::result::Result<CudaFunction, String>>,
    pub(super) ghash: CudaFunction,
    /// The row gather, or why it is missing (a prebuilt PTX file older than this module).
    pub(super) gather: std::result::Result<CudaFunction, String>,
}

/// The modules loaded so far, one per live context: a cipher and the device loader's gather on
/// its context share one module (loading it again would JIT the AES kernels again).
static LOADED: Mutex<Vec<Weak<Kernels>>> = Mutex::new(Vec::new());

/// The kernels loaded into `ctx`: the module already loaded there while anything still holds
/// it, else the PTX for the device's architecture ([`ptx_for`]) loaded now.
pub(super) fn load(ctx: &Arc<CudaContext>) -> Result<Arc<Kernels>> {
    let mut loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    loaded.retain(|k| k.strong_count() > 0);
    if let Some(k) = loaded
        .iter()
        .filter_map(Weak::upgrade)
        .find(|k| Arc::ptr_eq(&k.ctx, ctx))
    {
        return Ok(k);
    }
    let k = Arc::new(load_module(ctx)?);
    loaded.push(Arc::downgrade(&k));
    Ok(k)
}

fn load_module(ctx: &Arc<CudaContext>) -> Result<Kernels> {
    let (ma, mi) = ctx
        .compute_capability()
        .map_err(drv("compute capability"))?;
    let arch = format!("sm_{ma}{mi}");
    let module = ctx.load_module(ptx_for(&arch)?).map_err(|e| Error::Backend {
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
    Ok(Kernels {
        setup: f("cs_setup")?,
        hpowers: f("cs_hpowers")?,
        ctr: CtrVariant::ALL
            .iter()
            .map(|&v| load_ctr(&module, v))
            .collect(),
        ghash: f("cs_ghash")?,
        gather: module.load_function("cs_gather_rows").map_err(|e| {
            format!(
                "cs_gather_rows missing from the kernels ({e}): if {PTX_ENV} is set, regenerate \
                 its file with `cuda_bench --emit-ptx`"
            )
        }),
        ctx: ctx.clone(),
        arch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_is_self_contained_and_holds_every_kernel() {
        let src = kernel_source();
        // aes_gcm.cu's include is resolved; the header's own <stdint.h> is for plain C only.
        for line in src
            .lines()
            .filter(|l| l.trim_start().starts_with("#include"))
        {
            assert!(line.contains("<stdint.h>"), "unresolved include: {line}");
        }
        assert!(AES_GCM_CU.contains(CORE_INCLUDE));
        for k in ["cs_setup(", "cs_hpowers(", "cs_ghash(", "cs_gather_rows("] {
            assert!(src.contains(k), "{k}");
        }
    }

    #[test]
    fn nvrtc_output_passes_the_prebuilt_ptx_check_with_the_gather_kernel() {
        assert!(!is_ciphershard_ptx(".entry cs_gather_rows("));
        if !nvrtc_present() {
            assert!(
                std::env::var_os("CIPHERSHARD_REQUIRE_NVRTC").is_none(),
                "CIPHERSHARD_REQUIRE_NVRTC is set but libnvrtc was not found on LD_LIBRARY_PATH"
            );
            eprintln!("SKIPPED: libnvrtc not found");
            return;
        }
        // What `cuda_bench --emit-ptx sm_90` writes.
        let ptx = compile_kernels(Some("sm_90")).unwrap().to_src();
        assert!(is_ciphershard_ptx(&ptx));
        assert!(ptx.contains(".entry cs_gather_rows"));
    }
}
