//! `bench --cold`: the dataset's shard files evicted from the page cache before every run, and
//! the raw sequential read rate of the same files (evicted first too) measured beside the
//! loader's, so a loader figure can be set against what the disk gives.
//!
//! Eviction is `posix_fadvise(POSIX_FADV_DONTNEED)` on each whole file: no root needed, but
//! advisory. The kernel drops the clean pages no one has mapped or locked; dirty pages (a file
//! just written) are written back first by [`evict`] (`fdatasync`) so they can be dropped. Which
//! pages stayed resident is not checked (that needs `mincore` over a mapping, which this crate
//! does not make): a raw read far above the disk's rate says eviction did not take.

#![forbid(unsafe_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{Error, Result};

/// How the files were evicted, for the report.
pub const EVICTION: &str = "posix_fadvise(POSIX_FADV_DONTNEED) on every shard file before each \
run; advisory: residency is not checked";

/// The raw sequential read of a dataset's shard files, one after the other.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RawRead {
    /// Bytes read (every shard file, whole).
    pub bytes: u64,
    /// Wall seconds.
    pub seconds: f64,
    /// GB (10^9 bytes) per second.
    pub gb_per_s: f64,
}

/// Drops `paths`' pages from the page cache (advice, see the module docs).
pub fn evict(paths: &[PathBuf]) -> Result<()> {
    for p in paths {
        let f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
        // Dirty pages cannot be dropped: write them back first (a freshly converted dataset).
        f.sync_data().map_err(|e| Error::io(p, e))?;
        advise_dont_need(&f).map_err(|e| Error::io(p, e))?;
    }
    Ok(())
}

#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
fn advise_dont_need(f: &std::fs::File) -> std::io::Result<()> {
    rustix::fs::fadvise(f, 0, None, rustix::fs::Advice::DontNeed).map_err(std::io::Error::from)
}

#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
fn advise_dont_need(_: &std::fs::File) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "evicting a file from the page cache (posix_fadvise) is not available on this system",
    ))
}

/// Reads every file of `paths` once, sequentially, in 8 MiB reads (the kernel's readahead sees
/// one stream), discarding the bytes: what a plain `cat` of the shards would take.
pub fn raw_read(paths: &[PathBuf]) -> Result<RawRead> {
    let mut buf = vec![0u8; 8 << 20];
    let mut bytes = 0u64;
    let t = Instant::now();
    for p in paths {
        let mut f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
        loop {
            let n = f.read(&mut buf).map_err(|e| Error::io(p, e))?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
        }
        std::hint::black_box(&buf);
    }
    let seconds = t.elapsed().as_secs_f64();
    Ok(RawRead {
        bytes,
        seconds,
        gb_per_s: bytes as f64 / seconds.max(1e-12) / 1e9,
    })
}

/// Evicts `paths`, then reads them raw.
pub fn cold_raw_read(paths: &[PathBuf]) -> Result<RawRead> {
    evict(paths)?;
    raw_read(paths)
}

/// `--cold` needs files whose pages this machine caches: a URL has none.
pub fn refuse_url(dataset: &Path) -> Result<()> {
    if let Some(url) = crate::store::as_url(dataset) {
        return Err(Error::InvalidArgument(format!(
            "--cold applies to local datasets only: {} is read over the network, with no page \
             cache to evict (the loader's network figures are its cold figures)",
            crate::store::scrub(url)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_and_reads_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = (0..3)
            .map(|i| {
                let p = dir.path().join(format!("s{i}"));
                std::fs::write(&p, vec![i as u8; 3 << 20 | 17]).unwrap();
                p
            })
            .collect();
        let r = cold_raw_read(&paths).unwrap();
        assert_eq!(r.bytes, 3 * (3 << 20 | 17));
        assert!(r.gb_per_s > 0.0);
        let e = evict(&[dir.path().join("missing")]).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        let e = refuse_url(Path::new("s3://bucket/ds/")).unwrap_err();
        assert!(e.to_string().contains("local datasets only"), "{e}");
        refuse_url(dir.path()).unwrap();
    }
}
