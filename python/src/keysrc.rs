//! Where a master key comes from: a file path (`key_file=`) or an environment variable that
//! names a file (`key_env=`). Key bytes are never accepted as an argument, so they cannot end
//! up in a traceback, a `repr` or a shell history.

use std::path::PathBuf;

use ciphershard::MasterKey;
use pyo3::prelude::*;

use crate::errors::{IntoPyResult, new_err};

/// Reads the master key named by exactly one of `key_file` / `key_env`.
pub fn load_master_key(
    py: Python<'_>,
    key_file: Option<PathBuf>,
    key_env: Option<String>,
) -> PyResult<MasterKey> {
    match (key_file, key_env) {
        (Some(path), None) => py.detach(|| MasterKey::from_file(&path)).py(),
        (None, Some(var)) => py.detach(|| MasterKey::from_env_file(&var)).py(),
        (None, None) => Err(new_err(
            py,
            "KeySourceError",
            "no master key: pass key_file=PATH or key_env=VAR (a variable naming the key file)"
                .into(),
        )),
        (Some(_), Some(_)) => Err(new_err(
            py,
            "InvalidArgumentError",
            "pass key_file= or key_env=, not both".into(),
        )),
    }
}
