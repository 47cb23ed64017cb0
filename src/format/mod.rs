//! The ciphershard on-disk format, version 2, reading version 1 too (docs/FORMAT.md): shard headers, the manifest, the
//! keyring, and the operations built on them (convert, verify, rekey, decrypt).
//!
//! Every parser here takes untrusted bytes: lengths are checked against the file size and a cap
//! before anything is allocated, and every failure is an [`Error`] naming the file.

#![forbid(unsafe_code)]

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

mod convert;
mod convert_pipeline;
mod convert_rows;
mod dataset;
mod input;
mod json;
mod keyring;
mod manifest;
mod output;
mod ragged;
mod report;
mod seal;
mod segments;
mod shard;

pub use convert::{
    ConvertOptions, ConvertSummary, DEFAULT_ROWS_SHARD_SIZE, DEFAULT_SHARD_SIZE, convert,
    convert_with, glob_match, remove_interrupted_conversion,
};
pub use dataset::{
    Dataset, RekeySummary, UnlockedDataset, VerifySummary, add_key, decrypt_shard,
    decrypt_shard_to, decrypt_shard_with, rekey, rekey_with, remove_key, verify,
};
pub use input::arrow_batches::ArrowBatches;
pub use input::parquet::quiet_guarded_panics;
pub use input::{ConvertInput, InputTensor, npy, safetensors as safetensors_input};
pub use keyring::{KeyWrap, Keyring};
pub use manifest::{Column, DatasetKind, Manifest, ShardEntry};
pub use ragged::{check_row_offsets, read_row_offsets};
pub use report::{INSPECT_SCHEMA, inspect, inspect_report, same_file};
pub use shard::{
    AAD_LEN, ChunkRef, Descriptor, HEADER_TAG_NONCE, Layout, OFFSETS_SUFFIX, ShardHeader,
    TensorDesc, canonical_header,
};

/// The format version this build writes (shard descriptors and manifests); it reads every
/// version from [`OLDEST_FORMAT_VERSION`] on. Version 2 added ragged columns.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this build reads.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// The keyring's version: unchanged since the first format (its layout did not change).
pub const KEYRING_VERSION: u32 = 1;
/// The only cipher this build reads and writes.
pub const CIPHER_NAME: &str = "AES-256-GCM";
/// Largest header (safetensors JSON) accepted, as safetensors itself does.
pub const MAX_HEADER_LEN: u64 = 100_000_000;
/// Fewest bytes a tensor takes in a shard header: its descriptor entry escaped inside the
/// header's `__metadata__` (at least 113 bytes besides its name), its outer entry (at least 52),
/// and its chunk tag (21). So a header holds fewer than `MAX_HEADER_LEN / 160` tensors.
pub(crate) const MIN_HEADER_BYTES_PER_TENSOR: u64 = 160;
/// Largest manifest.json / keyring.json accepted.
pub const MAX_JSON_FILE_LEN: u64 = 64 << 20;
/// Largest chunk: within GCM's per-invocation limit and its 32-bit block counter.
pub const MAX_CHUNK_SIZE: u64 = 256 << 20;
/// Largest number of chunks in a shard (GCM invocations per key, NIST SP 800-38D).
pub const MAX_CHUNKS_PER_SHARD: u64 = (1 << 32) - 2;
/// Most tensors in one shard, and so most columns in a manifest (a header needs over 150 bytes
/// per tensor, so a 100 MB header holds fewer than this anyway).
pub const MAX_TENSORS: usize = 1 << 20;
/// Most shards in a manifest (and wrapped data keys per master key in a keyring); a 64 MiB
/// manifest holds fewer than half as many.
pub const MAX_SHARDS: usize = 1 << 20;
/// Most master keys in a keyring: ample for the teams and recipients one dataset is shared
/// with, and it bounds the per-key structures a crafted keyring can make a reader build.
pub const MAX_KEY_WRAPS: usize = 4096;
/// Most entries in a shard's user metadata (and in its `__metadata__`): an entry costs about
/// ten times its JSON size in memory, so this one is kept far below what the header could hold.
pub const MAX_METADATA_ENTRIES: usize = 1 << 16;
/// Most dimensions of a tensor's shape (NumPy's own limit; the `.npy` reader has the same).
pub const MAX_RANK: usize = 64;
/// Manifest file name inside a dataset directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Keyring file name inside a dataset directory.
pub const KEYRING_FILE: &str = "keyring.json";

/// File name of shard `index`.
pub fn shard_file_name(index: u32) -> String {
    format!("shard-{index:05}.safetensors")
}

/// A tensor element type, named as safetensors names it.
#[allow(non_camel_case_types, missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    U16,
    U32,
    U64,
    BOOL,
    F8_E4M3,
    F8_E5M2,
}

impl Dtype {
    /// Every dtype, for tests and help texts.
    pub const ALL: [Dtype; 15] = [
        Dtype::F64,
        Dtype::F32,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I64,
        Dtype::I32,
        Dtype::I16,
        Dtype::I8,
        Dtype::U8,
        Dtype::U16,
        Dtype::U32,
        Dtype::U64,
        Dtype::BOOL,
        Dtype::F8_E4M3,
        Dtype::F8_E5M2,
    ];

    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
            Dtype::F32 | Dtype::I32 | Dtype::U32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 | Dtype::U16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::BOOL | Dtype::F8_E4M3 | Dtype::F8_E5M2 => 1,
        }
    }

    /// The safetensors name (`F32`, `BF16`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F64 => "F64",
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::I16 => "I16",
            Dtype::I8 => "I8",
            Dtype::U8 => "U8",
            Dtype::U16 => "U16",
            Dtype::U32 => "U32",
            Dtype::U64 => "U64",
            Dtype::BOOL => "BOOL",
            Dtype::F8_E4M3 => "F8_E4M3",
            Dtype::F8_E5M2 => "F8_E5M2",
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Dtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Dtype::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown dtype '{s}' (safetensors names: F32, BF16, ...)"
                ))
            })
    }
}

/// Byte length of a tensor, or `None` on overflow.
pub(crate) fn tensor_bytes(dtype: Dtype, shape: &[u64]) -> Option<u64> {
    shape
        .iter()
        .try_fold(dtype.size_bytes() as u64, |acc, &d| acc.checked_mul(d))
}

/// Reads exactly `buf.len()` bytes at `offset` without moving a shared cursor, so several
/// threads can read one file.
pub(crate) fn read_at(file: &File, path: &Path, offset: u64, buf: &mut [u8]) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileExt;
        file.read_exact_at(buf, offset)
            .map_err(|e| Error::io(path, e))
    }
    #[cfg(windows)]
    {
        use std::os::windows::fs::FileExt;
        let mut done = 0;
        while done < buf.len() {
            let n = file
                .seek_read(&mut buf[done..], offset + done as u64)
                .map_err(|e| Error::io(path, e))?;
            if n == 0 {
                return Err(Error::io(path, std::io::ErrorKind::UnexpectedEof.into()));
            }
            done += n;
        }
        Ok(())
    }
}

/// Opens a file of a dataset for reading without ever waiting: non-blocking on unix (opening a
/// FIFO for reading otherwise waits for a writer, forever), then anything but a regular file
/// (FIFO, socket, device, directory) is refused, judged on the opened descriptor itself, so a
/// path swapped for something else after an earlier check is caught too. Regular files ignore
/// the non-blocking flag: reads from them behave as usual.
pub(crate) fn open_regular(path: &Path, what: &'static str) -> Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::format(
            path,
            what,
            format!("not a regular file ({})", file_kind(&meta)),
        ));
    }
    Ok(file)
}

/// What kind of file `meta` describes, for "not a regular file" errors.
pub(crate) fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
    }
    if t.is_dir() {
        "a directory"
    } else if t.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

/// Reads a whole small file (manifest, keyring), refusing files larger than `cap` and anything
/// but a regular file ([`open_regular`]).
pub(crate) fn read_bounded(path: &Path, what: &'static str, cap: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = open_regular(path, what)?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > cap {
        return Err(Error::format(
            path,
            what,
            format!("file is {len} bytes, more than the {cap}-byte limit"),
        ));
    }
    let mut buf = Vec::with_capacity(len as usize);
    file.take(cap + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(path, e))?;
    if buf.len() as u64 > cap {
        return Err(Error::format(
            path,
            what,
            "file grew past the size limit while being read",
        ));
    }
    Ok(buf)
}

/// A random suffix for temporary file names.
pub(crate) fn random_suffix() -> Result<String> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| Error::Key(format!("operating system RNG failed: {e}")))?;
    Ok(hex::encode(b))
}

/// Fsyncs a directory so that renames inside it are durable (no-op where unsupported).
pub(crate) fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// `path`'s directory (`.` for a bare name) and a new temporary name in it, `NAME.tmp-` and 16
/// random hex digits: where a file is written before it is published under `path`.
pub(crate) fn temp_beside(path: &Path) -> Result<(&Path, PathBuf)> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((dir, dir.join(format!("{name}.tmp-{}", random_suffix()?))))
}

/// Writes `bytes` to `path` atomically: temp file in the same directory, fsync, rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let (dir, tmp) = temp_beside(path)?;
    let result = (|| {
        let mut f = File::create_new(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    } else {
        sync_dir(dir);
    }
    result
}
