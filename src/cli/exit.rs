//! Exit statuses: the one place an error becomes a status (the table below is also the help
//! text's, and README's).

#![forbid(unsafe_code)]

use std::path::Path;

use ciphershard::error::Error;
use ciphershard::format::{KEYRING_FILE, MANIFEST_FILE};

/// Success; also when the reader of standard output went away (`ciphershard inspect ds | head`),
/// as ripgrep does: the reader had what it wanted, and `set -o pipefail` scripts do not fail.
pub const OK: u8 = 0;
/// Any other error: a file that cannot be read, a backend that is not available, a bad input
/// to `convert`, a format version this build does not read.
pub const ERROR: u8 = 1;
/// Tampering or corruption detected: a chunk or header tag fails, or one of a dataset's own
/// files (manifest, keyring, a shard) is missing, truncated, extended, malformed or disagrees
/// with the manifest.
pub const TAMPERED: u8 = 2;
/// Wrong key: no key given can open the dataset.
pub const WRONG_KEY: u8 = 3;
/// The command line is not understood (unknown option, bad value): sysexits' `EX_USAGE`, so
/// that it never reads as tampering (clap's own default is 2).
pub const USAGE: u8 = 64;

/// The table shown after `--help` and in README.
pub const HELP: &str = "\
Exit status:
  0      success (also when the reader of standard output closes it early, as `| head` does)
  1      error: a file cannot be read, a backend is unavailable, a bad input, an unsupported
         format version
  2      tampering or corruption: a chunk or header tag fails, or a dataset file (manifest,
         keyring, shard) is missing, truncated, extended, malformed or disagrees with the
         manifest
  3      wrong key: no key given can open the dataset
  64     usage: the command line is not understood (unknown option, bad value)
  128+N  stopped by signal N (130: Ctrl-C, 143: SIGTERM, 129: SIGHUP); decrypt, convert,
         bench and demo first remove what they wrote (partial export, shards, generated data)";

/// The exit status for `e`. `dataset` is the dataset directory the command works on, if any:
/// an error about one of its own files counts as tampering once its manifest exists (a missing
/// manifest means "not a dataset", status 1).
pub fn code(e: &Error, dataset: Option<&Path>) -> u8 {
    if let Some(sig) = super::interrupt::received() {
        return u8::try_from(128 + sig).unwrap_or(ERROR);
    }
    match e {
        Error::Integrity(_) | Error::HeaderIntegrity { .. } => TAMPERED,
        Error::WrongKey { .. } => WRONG_KEY,
        Error::Format { path, .. } if dataset_file(dataset, path) => TAMPERED,
        // A newer manifest or keyring is a version this build does not read; a shard whose
        // header the manifest accepted but which names another version or cipher was edited.
        Error::Unsupported { path, .. } if dataset_file(dataset, path) && is_shard(path) => {
            TAMPERED
        }
        Error::Io { path, source }
            if dataset_file(dataset, path)
                && !path.ends_with(MANIFEST_FILE)
                && matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::UnexpectedEof
                ) =>
        {
            TAMPERED
        }
        _ => ERROR,
    }
}

/// `true` when `path` is the manifest, the keyring or a shard of the dataset in `dir` and
/// that dataset's manifest is a regular file. For a folder in an object store the manifest is
/// taken as there: `Dataset::open` reads it before any other object, so an error about another
/// object of the folder comes after it was found.
fn dataset_file(dir: Option<&Path>, path: &Path) -> bool {
    let Some(dir) = dir else { return false };
    let in_dir = path.parent().is_some_and(|p| same_dir(p, dir));
    let named = path.ends_with(MANIFEST_FILE) || path.ends_with(KEYRING_FILE) || is_shard(path);
    in_dir
        && named
        && (ciphershard::store::as_url(dir).is_some() || dir.join(MANIFEST_FILE).is_file())
}

fn same_dir(a: &Path, b: &Path) -> bool {
    let empty = |p: &Path| p.as_os_str().is_empty() || p == Path::new(".");
    (empty(a) && empty(b)) || a == b || a.components().eq(b.components())
}

/// A shard's file name: `shard-NNNNN.safetensors` (docs/FORMAT.md).
fn is_shard(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("shard-"))
        .and_then(|n| n.strip_suffix(".safetensors"))
        .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// The dataset directory of a path naming a dataset or one of its shard files (as
/// `Dataset::open` resolves it); `None` when nothing has that name: a mistyped argument is not
/// a deleted shard.
pub fn dataset_dir(path: &Path) -> Option<&Path> {
    if ciphershard::store::as_url(path).is_some() {
        // An object-store folder, or the folder of the object it names (as `ObjectDir` does).
        let named_object = path
            .extension()
            .is_some_and(|e| e == "safetensors" || e == "json");
        return Some(if named_object {
            path.parent().unwrap_or(path)
        } else {
            path
        });
    }
    let meta = path.metadata().ok()?;
    Some(if meta.is_dir() {
        path
    } else {
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names() {
        assert!(is_shard(Path::new("ds/shard-00000.safetensors")));
        assert!(is_shard(Path::new("shard-123456.safetensors")));
        assert!(!is_shard(Path::new("ds/shard-.safetensors")));
        assert!(!is_shard(Path::new("ds/x.safetensors")));
        assert!(!is_shard(Path::new("ds/shard-0001.npy")));
    }

    #[test]
    fn directories_compare_by_components() {
        assert!(same_dir(Path::new("ds/"), Path::new("ds")));
        assert!(same_dir(Path::new(""), Path::new(".")));
        assert!(same_dir(Path::new("./ds"), Path::new("./ds/")));
        assert!(!same_dir(Path::new("ds/sub"), Path::new("ds")));
    }
}
