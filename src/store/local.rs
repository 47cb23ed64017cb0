//! [`ShardStore`] over local files: each shard stat-ed when the store opens and opened once on
//! first use (a dataset of thousands of shards holds no descriptor for the ones nobody reads),
//! read with positioned reads (no shared cursor, so any number of threads read one file), never
//! memory-mapped (a file changed underneath can neither crash the process with SIGBUS nor slip
//! unverified bytes into a buffer that was already checked).

#![forbid(unsafe_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::{ShardIdentity, ShardStore};
use crate::error::{Error, Result};
use crate::format::{file_kind, open_regular};

/// Local shard files, opened once.
#[derive(Debug)]
pub struct LocalStore {
    shards: Vec<LocalShard>,
}

#[derive(Debug)]
struct LocalShard {
    path: PathBuf,
    /// Opened on first use; kept open from then on (a file deleted afterwards still reads).
    file: OnceLock<File>,
    identity: ShardIdentity,
}

impl LocalStore {
    /// Pins the identity of every file of `paths` (shard `i` is `paths[i]`); each is opened
    /// when first read or checked.
    pub fn open(paths: impl IntoIterator<Item = PathBuf>) -> Result<Self> {
        let shards = paths
            .into_iter()
            .map(|path| {
                let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
                if !meta.is_file() {
                    return Err(Error::format(
                        &path,
                        "shard",
                        format!("not a regular file ({})", file_kind(&meta)),
                    ));
                }
                let identity = ShardIdentity {
                    len: meta.len(),
                    version: version_of(&meta),
                };
                Ok(LocalShard {
                    path,
                    file: OnceLock::new(),
                    identity,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LocalStore { shards })
    }
}

impl LocalShard {
    fn file(&self) -> Result<&File> {
        if let Some(f) = self.file.get() {
            return Ok(f);
        }
        // Non-blocking, and checked on the descriptor: the path may have been swapped for a
        // FIFO since `LocalStore::open` looked at it.
        let f = open_regular(&self.path, "shard")?;
        // Two threads may race to open it: one descriptor wins, the other is closed.
        Ok(self.file.get_or_init(|| f))
    }
}

#[cfg(unix)]
fn version_of(meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "mtime {}.{:09}, inode {}",
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ino()
    )
}

#[cfg(not(unix))]
fn version_of(meta: &std::fs::Metadata) -> String {
    match meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
    {
        Some(d) => format!("mtime {}.{:09}", d.as_secs(), d.subsec_nanos()),
        None => String::new(),
    }
}

impl ShardStore for LocalStore {
    fn shard_count(&self) -> usize {
        self.shards.len()
    }

    fn name(&self, s: usize) -> &Path {
        &self.shards[s].path
    }

    fn identity(&self, s: usize) -> &ShardIdentity {
        &self.shards[s].identity
    }

    fn read_at(&self, s: usize, offset: u64, dst: &mut [u8]) -> Result<()> {
        let shard = &self.shards[s];
        let end = offset.checked_add(dst.len() as u64);
        if end.is_none_or(|e| e > shard.identity.len) {
            return Err(Error::format(
                &shard.path,
                "shard",
                format!(
                    "bytes {offset}..+{} lie outside the file ({} bytes)",
                    dst.len(),
                    shard.identity.len
                ),
            ));
        }
        read_exact_at(shard.file()?, offset, dst).map_err(|e| {
            let e = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                std::io::Error::new(
                    e.kind(),
                    "shard file is shorter than its header says (truncated while open?)",
                )
            } else {
                e
            };
            Error::io(&shard.path, e)
        })
    }

    /// Hints every range to the kernel first (`WILLNEED`: it starts reading them all, so the
    /// disk has them outstanding together), then reads them in turn.
    fn read_ranges(&self, s: usize, ranges: &mut [(u64, &mut [u8])]) -> Result<()> {
        if ranges.len() > 1 {
            let file = self.shards[s].file()?;
            for (offset, dst) in ranges.iter() {
                will_need(file, *offset, dst.len() as u64);
            }
        }
        ranges
            .iter_mut()
            .try_for_each(|(offset, dst)| self.read_at(s, *offset, dst))
    }

    fn check_unchanged(&self, s: usize) -> Result<()> {
        let shard = &self.shards[s];
        let len = shard
            .file()?
            .metadata()
            .map_err(|e| Error::io(&shard.path, e))?
            .len();
        if len != shard.identity.len {
            return Err(Error::format(
                &shard.path,
                "shard",
                format!(
                    "file is {len} bytes but its header says {} (truncated or appended)",
                    shard.identity.len
                ),
            ));
        }
        Ok(())
    }
}

/// Asks the kernel to start reading `len` bytes at `offset` into the page cache. Advice only:
/// where it fails or does not exist, the read that follows simply does the work.
#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
fn will_need(file: &File, offset: u64, len: u64) {
    if let Some(len) = std::num::NonZeroU64::new(len) {
        let _ = rustix::fs::fadvise(file, offset, Some(len), rustix::fs::Advice::WillNeed);
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
fn will_need(_: &File, _: u64, _: u64) {}

/// Reads exactly `buf.len()` bytes at `offset` without moving a shared cursor.
fn read_exact_at(file: &File, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileExt;
        file.read_exact_at(buf, offset)
    }
    #[cfg(windows)]
    {
        use std::os::windows::fs::FileExt;
        let mut done = 0;
        while done < buf.len() {
            let n = file.seek_read(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_ranges_and_names_the_file_on_every_failure() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard-0");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&data)
            .unwrap();
        let store = LocalStore::open([path.clone()]).unwrap();
        assert_eq!(store.shard_count(), 1);
        assert_eq!(store.identity(0).len, 10_000);
        assert!(!store.identity(0).version.is_empty());
        let mut buf = vec![0u8; 100];
        store.read_at(0, 9_900, &mut buf).unwrap();
        assert_eq!(buf, data[9_900..]);
        let (mut a, mut b) = (vec![0u8; 3], vec![0u8; 5]);
        store
            .read_ranges(0, &mut [(0, &mut a[..]), (17, &mut b[..])])
            .unwrap();
        assert_eq!((a.as_slice(), b.as_slice()), (&data[..3], &data[17..22]));
        // Past the pinned length: refused before any read.
        let e = store.read_at(0, 9_950, &mut buf).unwrap_err();
        assert!(e.to_string().contains("outside the file"), "{e}");
        assert!(e.to_string().contains("shard-0"), "{e}");
        let e = store.read_at(0, u64::MAX, &mut buf).unwrap_err();
        assert!(e.to_string().contains("outside the file"), "{e}");
        // Truncated while open: the read and the identity check both say so.
        store.check_unchanged(0).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(5_000)
            .unwrap();
        let e = store.read_at(0, 9_900, &mut buf).unwrap_err();
        assert!(e.to_string().contains("truncated while open"), "{e}");
        let e = store.check_unchanged(0).unwrap_err();
        assert!(e.to_string().contains("header says 10000"), "{e}");
        // A missing file names itself; so does one deleted before its first use.
        let e = LocalStore::open([dir.path().join("nope")]).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let gone = dir.path().join("gone");
        std::fs::write(&gone, b"12345678").unwrap();
        let store = LocalStore::open([gone.clone()]).unwrap();
        std::fs::remove_file(&gone).unwrap();
        let e = store.read_at(0, 0, &mut buf[..4]).unwrap_err();
        assert!(e.to_string().contains("gone"), "{e}");
    }
}
