//! Stand-in when the `wgpu` feature is off: same functions, each saying it was not compiled in.

#![forbid(unsafe_code)]

use crate::error::{Error, Result};

/// Not compiled in.
pub fn probe() -> std::result::Result<String, String> {
    Err("this build of ciphershard was compiled without the 'wgpu' feature".into())
}

/// Not compiled in.
pub fn gpu_adapter_present() -> bool {
    false
}

/// Not compiled in.
pub fn create() -> Result<std::sync::Arc<dyn super::Cipher>> {
    Err(Error::BackendUnavailable {
        backend: "wgpu",
        reason: probe().unwrap_err(),
    })
}

/// Not compiled in.
pub fn create_gpu_only() -> Result<std::sync::Arc<dyn super::Cipher>> {
    create()
}
