//! [`CachedStore`]: a local, size-capped cache of a remote dataset's shard bytes, for runs
//! that read the same objects epoch after epoch (docs/STORAGE.md, "Ciphertext cache").
//!
//! - **What is cached.** Fixed, aligned blocks of each shard object ([`DEFAULT_BLOCK`] bytes;
//!   the last one shorter), exactly the bytes the store returned: the shard object as written by
//!   `convert`, ciphertext and its header. Decrypted bytes never pass through here: the cache
//!   sits below the loader, at the seam where bytes are still the object's. A read is served
//!   from whole blocks, so a block is fetched once whatever ranges the loader asks for.
//! - **Keys.** One folder per dataset id under the cache root; an entry's name is a hash of the
//!   shard's URL, its pinned identity (size, ETag, version, modification time) and the block
//!   size, then the block index. A replaced object has another ETag, hence other names: an
//!   entry of the old object is never read again, only evicted.
//! - **Entries.** A 48-byte header (magic, payload length, SHA-256 of the entry's name and
//!   payload) then the payload; files are 0600 in folders 0700, written under a temporary name
//!   and renamed into place, so a reader (this process or another) sees a whole entry or none.
//!   An entry whose length or checksum is wrong (a disk error, a crash before the data reached
//!   the disk, a file copied under another name) is deleted and the block fetched again: the
//!   chunk tags would catch it too, but as tampering, and the dataset would stay unreadable
//!   until someone emptied the cache. The checksum is not a security boundary; the tags are.
//! - **Eviction.** Least recently used first, over every dataset in the root, so the files
//!   total at most the cap. The index is rebuilt from the folder at open (modification times
//!   give the order, and a hit refreshes its file's time) and again after every eighth of the
//!   cap written, so other processes sharing the folder are accounted for.
//! - **Failures.** The cache never fails a read: an entry it cannot read is a miss, an entry it
//!   cannot write is counted and skipped. Opening it is where a bad folder is an error.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use super::{ShardIdentity, ShardStore};
use crate::error::{Error, Result};

/// Bytes per cached block: large enough that per-entry costs (a file, an open, a checksum
/// set-up) vanish beside the copy, small enough that a rank reading a fraction of a shard
/// fetches little it does not need (a read is rounded out to whole blocks).
pub const DEFAULT_BLOCK: u64 = 4 << 20;
/// The cap when only a folder is given.
pub const DEFAULT_CACHE_SIZE: u64 = 10 << 30;
/// Entry file header: magic, payload length (u64 LE), SHA-256 of name and payload.
const MAGIC: &[u8; 8] = b"CSCACHE1";
const HEADER: u64 = 48;
/// A temporary file older than this was left by a process that died while writing it.
const STALE_TEMP: Duration = Duration::from_secs(600);

/// Where the cache lives and how big it may grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSettings {
    /// The cache root (one folder per dataset id under it).
    pub dir: PathBuf,
    /// Most bytes its entry files may total.
    pub max_bytes: u64,
    /// Bytes per block (a power of two, 4 KiB to 64 MiB).
    pub block: u64,
}

/// Counters of a [`CachedStore`], in blocks and bytes since it opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    /// Blocks served from the cache.
    pub hits: u64,
    /// Blocks fetched from the store (not cached, or dropped as damaged).
    pub misses: u64,
    /// Bytes served from the cache.
    pub bytes_from_cache: u64,
    /// Bytes fetched from the store through the cache.
    pub bytes_fetched: u64,
    /// Entries removed to keep the cache under its cap.
    pub evictions: u64,
    /// Entries found damaged (wrong length or checksum), deleted and fetched again.
    pub damaged: u64,
    /// Entries that could not be written (disk full, permissions); the reads went on.
    pub write_failures: u64,
    /// Bytes the cache's files total now, as this process last counted them.
    pub bytes_on_disk: u64,
}

impl CacheStats {
    /// What happened between `earlier` and `self` (`bytes_on_disk` is `self`'s).
    pub fn since(&self, earlier: &CacheStats) -> CacheStats {
        CacheStats {
            hits: self.hits - earlier.hits,
            misses: self.misses - earlier.misses,
            bytes_from_cache: self.bytes_from_cache - earlier.bytes_from_cache,
            bytes_fetched: self.bytes_fetched - earlier.bytes_fetched,
            evictions: self.evictions - earlier.evictions,
            damaged: self.damaged - earlier.damaged,
            write_failures: self.write_failures - earlier.write_failures,
            bytes_on_disk: self.bytes_on_disk,
        }
    }
}

impl std::fmt::Display for CacheStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} hits ({:.1} MB), {} misses ({:.1} MB fetched), {} evictions, {} damaged, {} \
             write failures, {:.1} MB on disk",
            self.hits,
            self.bytes_from_cache as f64 / 1e6,
            self.misses,
            self.bytes_fetched as f64 / 1e6,
            self.evictions,
            self.damaged,
            self.write_failures,
            self.bytes_on_disk as f64 / 1e6
        )
    }
}

/// Parses a size, as every size option and setting reads it (`--cache-size`,
/// `CIPHERSHARD_CACHE_SIZE`, `convert --shard-size`, `--chunk-size`): a whole number of bytes,
/// or with a unit: `K`, `M`, `G`, `T` or `KiB` … `TiB` (powers of 1024), `KB` … `TB` (powers
/// of 1000), case-insensitive.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "kb" => 1_000,
        "m" | "mib" => 1 << 20,
        "mb" => 1_000_000,
        "g" | "gib" => 1 << 30,
        "gb" => 1_000_000_000,
        "t" | "tib" => 1 << 40,
        "tb" => 1_000_000_000_000,
        _ => 0,
    };
    let bad = || {
        format!(
            "expected a size such as 2MiB, 512M, 20G or 1T (bytes; K/M/G/T and KiB…TiB: powers \
             of 1024, KB…TB: powers of 1000), found '{}'",
            crate::error::escape_untrusted(s)
        )
    };
    if num.is_empty() || mult == 0 {
        return Err(bad());
    }
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(bad)
}

/// A [`ShardStore`] that keeps the blocks it reads through `inner` in a local cache.
pub struct CachedStore {
    inner: Arc<dyn ShardStore>,
    cache: Arc<Cache>,
    /// `shard_keys[s]`: the name prefix of shard `s`'s entries.
    shard_keys: Vec<String>,
    /// The dataset's folder under the root, relative to it.
    dataset: String,
}

impl std::fmt::Debug for CachedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedStore")
            .field("inner", &self.inner)
            .field("dir", &self.cache.settings.dir)
            .finish_non_exhaustive()
    }
}

/// The cache root's state, shared by every read.
struct Cache {
    settings: CacheSettings,
    index: Mutex<Index>,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    bytes_from_cache: AtomicU64,
    bytes_fetched: AtomicU64,
    evictions: AtomicU64,
    damaged: AtomicU64,
    write_failures: AtomicU64,
}

/// Every entry of the root this process knows of, with its recency.
#[derive(Default)]
struct Index {
    /// Relative path (`dataset/name`) → (file size, last use: larger is more recent).
    entries: HashMap<String, (u64, u64)>,
    total: u64,
    clock: u64,
    /// Bytes written since the folder was last scanned.
    written_since_scan: u64,
}

fn cache_error(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("ciphertext cache {}: {what}", path.display()))
}

impl CachedStore {
    /// Caches `inner`'s shards (of the dataset `dataset_id`) in `settings.dir`, creating the
    /// folders (0700) where missing. Refuses a folder that others may write to, a cap smaller
    /// than one block, or a block size that is not a power of two from 4 KiB to 64 MiB.
    pub fn open(
        inner: Arc<dyn ShardStore>,
        settings: &CacheSettings,
        dataset_id: &[u8],
    ) -> Result<Self> {
        let root = &settings.dir;
        let b = settings.block;
        if !b.is_power_of_two() || !(4 << 10..=64 << 20).contains(&b) {
            return Err(cache_error(
                root,
                format!("block size {b} is not a power of two from 4 KiB to 64 MiB"),
            ));
        }
        if settings.max_bytes < b + HEADER {
            return Err(cache_error(
                root,
                format!(
                    "a cap of {} bytes holds not even one block ({} MiB); give a larger size",
                    settings.max_bytes,
                    b >> 20
                ),
            ));
        }
        make_private_dir(root, true)?;
        let dataset = hex::encode(dataset_id);
        make_private_dir(&root.join(&dataset), false)?;
        let shard_keys = (0..inner.shard_count())
            .map(|s| shard_key(inner.name(s), inner.identity(s), b))
            .collect();
        let cache = Cache {
            settings: settings.clone(),
            index: Mutex::new(Index::default()),
            counters: Counters::default(),
        };
        {
            let mut index = cache.lock();
            cache.rescan(&mut index);
            // A smaller cap than last time: shrink now, not at the first write.
            cache.evict_to(&mut index, settings.max_bytes, "");
        }
        Ok(CachedStore {
            inner,
            cache: Arc::new(cache),
            shard_keys,
            dataset,
        })
    }

    /// The store under the cache.
    pub fn inner(&self) -> &Arc<dyn ShardStore> {
        &self.inner
    }

    fn entry_name(&self, s: usize, block: u64) -> String {
        format!("{}/{}.{block}", self.dataset, self.shard_keys[s])
    }
}

/// Creates `dir` (mode 0700) if missing; an existing one must be a folder that neither group
/// nor others may write to (they could plant entries: the tags would reject their bytes, but
/// the dataset would stop reading).
fn make_private_dir(dir: &Path, parents: bool) -> Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(parents);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    // Checked whether new or not: a recursive create succeeds on an existing folder.
    match b.create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(cache_error(dir, format!("cannot create it ({e})"))),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| cache_error(dir, e))?;
    if !meta.is_dir() {
        return Err(cache_error(dir, "not a folder"));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o022 != 0 {
            return Err(cache_error(
                dir,
                "the folder is writable by group or others; use a private folder (mode 0700)",
            ));
        }
    }
    Ok(())
}

/// The name prefix of a shard's entries: its URL, pinned identity and the block size, hashed.
fn shard_key(name: &Path, id: &ShardIdentity, block: u64) -> String {
    let mut h = Sha256::new();
    h.update(b"ciphershard cache v1\0");
    h.update(name.as_os_str().as_encoded_bytes());
    h.update(b"\0");
    h.update(id.len.to_le_bytes());
    h.update(id.version.as_bytes());
    h.update(b"\0");
    h.update(block.to_le_bytes());
    hex::encode(&h.finalize()[..16])
}

fn checksum(name: &str, payload: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\0");
    h.update(payload);
    h.finalize().into()
}

fn modified(meta: &std::fs::Metadata) -> SystemTime {
    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)
}

impl Cache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        // A panic elsewhere while holding it leaves an index that is at worst stale.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rebuilds the index from the folder: every entry of every dataset, oldest first by
    /// modification time. Removes temporary files left by dead writers.
    fn rescan(&self, index: &mut Index) {
        let root = &self.settings.dir;
        let mut found: Vec<(SystemTime, String, u64)> = Vec::new();
        let now = SystemTime::now();
        for d in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let Ok(dname) = d.file_name().into_string() else {
                continue;
            };
            if !d.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
                let Ok(fname) = f.file_name().into_string() else {
                    continue;
                };
                let Ok(meta) = f.metadata() else { continue };
                if !meta.is_file() {
                    continue;
                }
                if fname.starts_with(".tmp-") {
                    let age = now.duration_since(modified(&meta)).unwrap_or_default();
                    if age > STALE_TEMP {
                        let _ = std::fs::remove_file(f.path());
                    }
                    continue;
                }
                found.push((modified(&meta), format!("{dname}/{fname}"), meta.len()));
            }
        }
        found.sort();
        index.entries.clear();
        index.total = 0;
        for (i, (_, rel, len)) in found.into_iter().enumerate() {
            index.total += len;
            index.entries.insert(rel, (len, i as u64));
        }
        index.clock = index.entries.len() as u64;
        index.written_since_scan = 0;
    }

    /// Removes least recently used entries (never `keep`) until the total is at most `cap`.
    fn evict_to(&self, index: &mut Index, cap: u64, keep: &str) {
        while index.total > cap {
            let Some(victim) = index
                .entries
                .iter()
                .filter(|(k, _)| k.as_str() != keep)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
            else {
                return;
            };
            let (len, _) = index.entries.remove(&victim).expect("present");
            index.total -= len;
            match std::fs::remove_file(self.settings.dir.join(&victim)) {
                Ok(()) => {
                    self.counters.evictions.fetch_add(1, Ordering::Relaxed);
                }
                // Another process evicted it first.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(_) => {}
            }
        }
    }

    fn forget(&self, rel: &str) {
        let mut index = self.lock();
        if let Some((len, _)) = index.entries.remove(rel) {
            index.total -= len;
        }
    }

    /// Entry `rel` (header included: the payload is `[HEADER..]`, not moved down, which
    /// would copy the block once more) if it is whole and its payload `len` bytes long; a
    /// damaged entry is deleted (and counted), a missing one is `None`.
    fn get(&self, rel: &str, len: u64) -> Option<Vec<u8>> {
        let path = self.settings.dir.join(rel);
        let mut file = File::open(&path).ok()?;
        let mut buf = Vec::new();
        let whole = {
            use std::io::Read;
            let size = file.metadata().ok()?.len();
            size == HEADER + len && {
                buf.reserve_exact(size as usize);
                (&mut file).take(size + 1).read_to_end(&mut buf).is_ok() && buf.len() as u64 == size
            }
        };
        let name = rel.rsplit('/').next().unwrap_or(rel);
        let ok = whole
            && &buf[..8] == MAGIC
            && buf[8..16] == len.to_le_bytes()
            && buf[16..48] == checksum(name, &buf[HEADER as usize..]);
        if !ok {
            self.counters.damaged.fetch_add(1, Ordering::Relaxed);
            let _ = std::fs::remove_file(&path);
            self.forget(rel);
            return None;
        }
        // The modification time is the recency other processes and the next open see.
        let _ = file.set_modified(SystemTime::now());
        let mut index = self.lock();
        index.clock += 1;
        let clock = index.clock;
        if let Some(e) = index.entries.get_mut(rel) {
            e.1 = clock;
        } else {
            // Written by another process since the last scan.
            index.entries.insert(rel.to_string(), (HEADER + len, clock));
            index.total += HEADER + len;
        }
        Some(buf)
    }

    /// Stores `payload` as entry `rel`, making room first. Failures are counted, not raised.
    fn put(&self, rel: &str, payload: &[u8]) {
        let size = HEADER + payload.len() as u64;
        {
            let mut index = self.lock();
            index.written_since_scan += size;
            if index.written_since_scan > self.settings.max_bytes / 8 {
                self.rescan(&mut index);
            }
            if let Some((old, _)) = index.entries.remove(rel) {
                index.total -= old;
            }
            let cap = self.settings.max_bytes - size;
            self.evict_to(&mut index, cap, rel);
            // Counted before the write: a concurrent writer then makes room for both.
            index.clock += 1;
            let clock = index.clock;
            index.entries.insert(rel.to_string(), (size, clock));
            index.total += size;
        }
        if self.write_entry(rel, payload).is_err() {
            self.counters.write_failures.fetch_add(1, Ordering::Relaxed);
            self.forget(rel);
        }
    }

    fn write_entry(&self, rel: &str, payload: &[u8]) -> std::io::Result<()> {
        let path = self.settings.dir.join(rel);
        let dir = path.parent().expect("an entry lies in a dataset folder");
        let name = rel.rsplit('/').next().unwrap_or(rel);
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(std::io::Error::other)?;
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            hex::encode(nonce)
        ));
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let write = || -> std::io::Result<()> {
            let mut f = opts.open(&tmp)?;
            let mut head = [0u8; HEADER as usize];
            head[..8].copy_from_slice(MAGIC);
            head[8..16].copy_from_slice(&(payload.len() as u64).to_le_bytes());
            head[16..].copy_from_slice(&checksum(name, payload));
            f.write_all(&head)?;
            f.write_all(payload)?;
            // No fsync: an entry cut short by a crash fails its length or checksum and is
            // fetched again.
            std::fs::rename(&tmp, &path)
        };
        write().inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }

    fn stats(&self) -> CacheStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            hits: get(&c.hits),
            misses: get(&c.misses),
            bytes_from_cache: get(&c.bytes_from_cache),
            bytes_fetched: get(&c.bytes_fetched),
            evictions: get(&c.evictions),
            damaged: get(&c.damaged),
            write_failures: get(&c.write_failures),
            bytes_on_disk: self.lock().total,
        }
    }
}

impl ShardStore for CachedStore {
    fn shard_count(&self) -> usize {
        self.inner.shard_count()
    }

    fn name(&self, s: usize) -> &Path {
        self.inner.name(s)
    }

    fn identity(&self, s: usize) -> &ShardIdentity {
        self.inner.identity(s)
    }

    fn read_at(&self, s: usize, offset: u64, dst: &mut [u8]) -> Result<()> {
        self.read_ranges(s, &mut [(offset, dst)])
    }

    fn read_ranges(&self, s: usize, ranges: &mut [(u64, &mut [u8])]) -> Result<()> {
        let len = self.inner.identity(s).len;
        if ranges
            .iter()
            .any(|(o, d)| o.checked_add(d.len() as u64).is_none_or(|e| e > len))
        {
            // The store's own error names the shard and the range.
            return self.inner.read_ranges(s, ranges);
        }
        let bsize = self.cache.settings.block;
        let mut blocks: Vec<u64> = ranges
            .iter()
            .filter(|(_, d)| !d.is_empty())
            .flat_map(|(o, d)| *o / bsize..(*o + d.len() as u64).div_ceil(bsize))
            .collect();
        blocks.sort_unstable();
        blocks.dedup();
        let block_len = |b: u64| bsize.min(len - b * bsize);
        let c = &self.cache.counters;
        let mut missing = Vec::new();
        for b in blocks {
            match self.cache.get(&self.entry_name(s, b), block_len(b)) {
                Some(entry) => {
                    let bytes = &entry[HEADER as usize..];
                    c.hits.fetch_add(1, Ordering::Relaxed);
                    c.bytes_from_cache
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    super::scatter(b * bsize, bytes, ranges);
                }
                None => missing.push(b),
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        // One call for every missing block: the store coalesces neighbours into one request.
        let mut fetched: Vec<Vec<u8>> = missing
            .iter()
            .map(|&b| vec![0u8; block_len(b) as usize])
            .collect();
        {
            let mut want: Vec<(u64, &mut [u8])> = missing
                .iter()
                .zip(fetched.iter_mut())
                .map(|(&b, buf)| (b * bsize, buf.as_mut_slice()))
                .collect();
            self.inner.read_ranges(s, &mut want)?;
        }
        for (&b, bytes) in missing.iter().zip(&fetched) {
            c.misses.fetch_add(1, Ordering::Relaxed);
            c.bytes_fetched
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            super::scatter(b * bsize, bytes, ranges);
            self.cache.put(&self.entry_name(s, b), bytes);
        }
        Ok(())
    }

    fn check_unchanged(&self, s: usize) -> Result<()> {
        self.inner.check_unchanged(s)
    }

    fn cache_stats(&self) -> Option<CacheStats> {
        Some(self.cache.stats())
    }

    /// The store behind the cache: what it fetched (the misses).
    fn network(&self) -> Option<crate::store::NetworkStats> {
        self.inner.network()
    }

    /// The store's: a cold cache reads at its pace, a warm one costs a window ahead no more
    /// than a local disk's.
    fn read_depth(&self) -> crate::store::ReadDepth {
        self.inner.read_depth()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    #[test]
    fn sizes_parse_with_their_units_and_refuse_the_rest() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size(" 20GiB "), Ok(20 << 30));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert_eq!(parse_size("1gb"), Ok(1_000_000_000));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        for bad in ["", "M", "1.5G", "-1", "12X", "99999999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    /// Local files stand in for the remote store here (the cache only sees the seam); the
    /// real-server tests are in tests/store_cache.rs.
    #[test]
    fn blocks_round_out_reads_and_the_cap_holds() {
        let tmp = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..50_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let shard = tmp.path().join("s0");
        std::fs::write(&shard, &data).unwrap();
        let inner: Arc<dyn ShardStore> = Arc::new(LocalStore::open([shard]).unwrap());
        let settings = CacheSettings {
            dir: tmp.path().join("cache"),
            max_bytes: 3 * (4096 + HEADER),
            block: 4096,
        };
        let store = CachedStore::open(inner.clone(), &settings, &[1; 16]).unwrap();
        let (mut a, mut b) = (vec![0u8; 100], vec![0u8; 5000]);
        store
            .read_ranges(0, &mut [(4000, &mut a[..]), (45_000, &mut b[..])])
            .unwrap();
        assert_eq!(a, data[4000..4100]);
        assert_eq!(b, data[45_000..]);
        // Blocks 0, 1, 10, 11 and 12 (848 bytes, the shard's end): the cap holds three.
        let st = store.cache_stats().unwrap();
        assert_eq!((st.hits, st.misses, st.evictions), (0, 5, 2), "{st:?}");
        assert_eq!(st.bytes_on_disk, 2 * (4096 + HEADER) + 848 + HEADER);
        store.read_at(0, 45_000, &mut b).unwrap();
        assert_eq!(b, data[45_000..]);
        assert_eq!(store.cache_stats().unwrap().hits, 3);
        // Past the end: the store's own error.
        let e = store.read_at(0, 49_999, &mut a).unwrap_err();
        assert!(e.to_string().contains("outside the file"), "{e}");
        // A second open sees the entries (and the cap) of the first.
        let again = CachedStore::open(inner.clone(), &settings, &[1; 16]).unwrap();
        assert_eq!(
            again.cache_stats().unwrap().bytes_on_disk,
            2 * (4096 + HEADER) + 848 + HEADER
        );
        let smaller = CacheSettings {
            max_bytes: 4096 + HEADER,
            ..settings.clone()
        };
        let shrunk = CachedStore::open(inner.clone(), &smaller, &[1; 16]).unwrap();
        // The least recently used go first: block 12 was read last.
        assert_eq!(shrunk.cache_stats().unwrap().bytes_on_disk, 848 + HEADER);
        // Refused settings.
        for bad in [
            CacheSettings {
                max_bytes: 4000,
                ..settings.clone()
            },
            CacheSettings {
                block: 5000,
                ..settings.clone()
            },
        ] {
            let e = CachedStore::open(inner.clone(), &bad, &[1; 16]).unwrap_err();
            assert!(e.to_string().contains("ciphertext cache"), "{e}");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let open = tmp.path().join("open");
            std::fs::create_dir(&open).unwrap();
            std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
            let e = CachedStore::open(
                inner,
                &CacheSettings {
                    dir: open,
                    ..settings
                },
                &[1; 16],
            )
            .unwrap_err();
            assert!(e.to_string().contains("writable by group or others"), "{e}");
        }
    }
}
