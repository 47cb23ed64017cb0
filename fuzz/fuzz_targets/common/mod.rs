//! What the fuzz targets that write files share.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// This process's scratch directory for `target`: under `$CIPHERSHARD_FUZZ_DIR` (the fuzz
/// scripts make one in memory, under /dev/shm, and remove it afterwards), else in the
/// temporary directory. Created on first use.
pub fn scratch_dir(target: &str) -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let pid = std::process::id();
        let d = match std::env::var_os("CIPHERSHARD_FUZZ_DIR") {
            Some(d) => PathBuf::from(d).join(format!("{target}-{pid}")),
            None => std::env::temp_dir().join(format!("ciphershard-fuzz-{target}-{pid}")),
        };
        std::fs::create_dir_all(&d).expect("scratch directory");
        d
    })
}
