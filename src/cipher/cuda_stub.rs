//! Stand-in when the `cuda` feature is off: same functions, each saying it was not compiled in.

#![forbid(unsafe_code)]

use crate::error::{Error, Result};

/// Not compiled in.
pub fn probe() -> std::result::Result<String, String> {
    Err("this build of ciphershard was compiled without the 'cuda' feature".into())
}

/// Not compiled in.
pub fn create() -> Result<std::sync::Arc<dyn super::Cipher>> {
    Err(Error::BackendUnavailable {
        backend: "cuda",
        reason: probe().unwrap_err(),
    })
}
