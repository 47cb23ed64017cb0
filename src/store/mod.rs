//! The storage seam: where a dataset's shard bytes live, seen as "read these byte ranges of
//! shard `i`". Headers, the host loader, the window planner and both device loaders read shards
//! only through [`ShardStore`]; local files ([`LocalStore`]) are its first implementation, and a
//! non-file source (an object store, an in-memory set for tests) is one more implementation.
//!
//! Each shard's identity (its length and a version) is pinned when the store is opened. Reads
//! past the pinned length are errors naming the shard, a shard found shorter while reading is
//! an error ("truncated while open"), and [`ShardStore::check_unchanged`] re-checks the
//! identity before a new pass over the data (a loader's start, `verify`, `decrypt`). Content
//! changes are the tags' business: every chunk is authenticated.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use crate::error::Result;

mod cache;
pub mod cancel;
mod local;
mod network;
mod object;

pub use cache::{
    CacheSettings, CacheStats, CachedStore, DEFAULT_BLOCK, DEFAULT_CACHE_SIZE, parse_size,
};
pub use cancel::CancelToken;
pub use local::LocalStore;
pub use network::NetworkStats;
pub use object::{KeyringVersion, ObjectDir, ObjectShardUpload, ObjectStoreShards, as_url, scrub};

/// How to open a dataset beyond its path: settings for the object-store client, applied over
/// the environment's (`AWS_*`, `GOOGLE_*`, `AZURE_*`). Built with [`OpenOptions::storage`];
/// `Dataset::open` is `Dataset::open_with` these at their default (nothing set).
///
/// Values may be credentials: they are zeroized when dropped, never shown by `Debug`, and
/// scrubbed from every error message like the environment's credentials.
#[derive(Clone, Default)]
pub struct OpenOptions {
    storage: Vec<(String, zeroize::Zeroizing<String>)>,
    cache: CacheChoice,
}

/// Whether an object-store dataset reads through a local ciphertext cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum CacheChoice {
    /// As `CIPHERSHARD_CACHE_DIR` and `CIPHERSHARD_CACHE_SIZE` say (none when unset).
    #[default]
    FromEnv,
    Off,
    On(CacheSettings),
}

impl OpenOptions {
    /// Nothing set: the environment alone configures object stores.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets one object-store setting by the `object_store` crate's key name, as its
    /// environment variable would (`aws_endpoint`, `aws_access_key_id`,
    /// `aws_secret_access_key`, `aws_region`, `aws_allow_http`, `google_service_account`,
    /// `azure_storage_account_name`, …; case-insensitive). A key the URL's store does not
    /// know is refused when the dataset is opened.
    pub fn storage(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let value = zeroize::Zeroizing::new(value.into());
        object::register_secret(&value);
        self.storage.push((key.into().to_ascii_lowercase(), value));
        self
    }

    /// The storage settings, in the order they were set.
    pub(crate) fn storage_entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.storage.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Whether any storage setting is given (they apply to URLs only).
    pub fn has_storage(&self) -> bool {
        !self.storage.is_empty()
    }

    /// Keeps the shard bytes read from an object store in a local cache under `dir` (created
    /// 0700 if missing), at most `max_bytes` in all, least recently used evicted first; later
    /// opens of the same objects read them from there (docs/STORAGE.md, "Ciphertext cache").
    /// The cache holds the objects' bytes (ciphertext), never plaintext. Overrides
    /// `CIPHERSHARD_CACHE_DIR`; refused for a local path.
    pub fn cache(mut self, dir: impl Into<PathBuf>, max_bytes: u64) -> Self {
        let block = match &self.cache {
            CacheChoice::On(c) => c.block,
            _ => DEFAULT_BLOCK,
        };
        self.cache = CacheChoice::On(CacheSettings {
            dir: dir.into(),
            max_bytes,
            block,
        });
        self
    }

    /// The cache's block size (after [`OpenOptions::cache`]): bytes fetched and stored as one
    /// entry, a power of two from 4 KiB to 64 MiB, default [`DEFAULT_BLOCK`] (4 MiB).
    pub fn cache_block_size(mut self, bytes: u64) -> Self {
        if let CacheChoice::On(c) = &mut self.cache {
            c.block = bytes;
        }
        self
    }

    /// [`OpenOptions::cache`] from whichever of `dir` and `max_bytes` are given, the other
    /// from `CIPHERSHARD_CACHE_DIR` / `CIPHERSHARD_CACHE_SIZE` (or [`DEFAULT_CACHE_SIZE`]), as
    /// the CLI's `--cache-dir`/`--cache-size` and Python's `cache_dir`/`cache_size` do. Neither
    /// given: unchanged (the environment decides when the dataset opens). A size with no
    /// folder anywhere is refused.
    pub fn cache_over_env(self, dir: Option<PathBuf>, max_bytes: Option<u64>) -> Result<Self> {
        if dir.is_none() && max_bytes.is_none() {
            return Ok(self);
        }
        let env = cache_from_env()?;
        let dir = match (dir, &env) {
            (Some(d), _) => d,
            (None, Some(e)) => e.dir.clone(),
            (None, None) => {
                return Err(crate::error::Error::InvalidArgument(
                    "a cache size needs a cache folder: give --cache-dir DIR (Python: \
                     cache_dir), or set CIPHERSHARD_CACHE_DIR"
                        .into(),
                ));
            }
        };
        let size = max_bytes
            .or(env.map(|e| e.max_bytes))
            .unwrap_or(DEFAULT_CACHE_SIZE);
        Ok(self.cache(dir, size))
    }

    /// No cache, whatever `CIPHERSHARD_CACHE_DIR` says.
    pub fn no_cache(mut self) -> Self {
        self.cache = CacheChoice::Off;
        self
    }

    /// Whether a cache was asked for in code (not by the environment).
    pub fn has_cache(&self) -> bool {
        matches!(self.cache, CacheChoice::On(_))
    }

    /// The cache an object-store dataset opened with these options reads through: the one set
    /// in code, else `CIPHERSHARD_CACHE_DIR` (capped at `CIPHERSHARD_CACHE_SIZE`, default
    /// [`DEFAULT_CACHE_SIZE`]), else none.
    pub fn cache_settings(&self) -> Result<Option<CacheSettings>> {
        match &self.cache {
            CacheChoice::On(c) => Ok(Some(c.clone())),
            CacheChoice::Off => Ok(None),
            CacheChoice::FromEnv => cache_from_env(),
        }
    }
}

fn cache_from_env() -> Result<Option<CacheSettings>> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let size = match var("CIPHERSHARD_CACHE_SIZE") {
        None => None,
        Some(v) => Some(parse_size(&v).map_err(|e| {
            crate::error::Error::InvalidArgument(format!("$CIPHERSHARD_CACHE_SIZE: {e}"))
        })?),
    };
    match (var("CIPHERSHARD_CACHE_DIR"), size) {
        (Some(dir), size) => Ok(Some(CacheSettings {
            dir: PathBuf::from(dir),
            max_bytes: size.unwrap_or(DEFAULT_CACHE_SIZE),
            block: DEFAULT_BLOCK,
        })),
        (None, Some(_)) => Err(crate::error::Error::InvalidArgument(
            "$CIPHERSHARD_CACHE_SIZE is set but $CIPHERSHARD_CACHE_DIR is not: the cache needs \
             a folder"
                .into(),
        )),
        (None, None) => Ok(None),
    }
}

// By hand: the values may be credentials.
impl std::fmt::Debug for OpenOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenOptions")
            .field(
                "storage_keys",
                &self.storage.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("cache", &self.cache)
            .finish()
    }
}

/// What a shard was when its store was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardIdentity {
    /// Length in bytes.
    pub len: u64,
    /// What else identifies this version of the shard: modification time and inode for a local
    /// file (an ETag or object version for an object store). Informational for local files:
    /// their content is checked by the tags, their length by [`ShardStore::check_unchanged`].
    pub version: String,
}

/// How far the host loader reads ahead of its workers on a store, unless told otherwise
/// ([`crate::pipeline::LoaderOptions::readahead_windows`] and `io_threads`): deep enough to
/// keep the store busy while the workers decrypt, no deeper (each window read ahead is one
/// more window of chunk buffers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReadDepth {
    /// Shuffle windows read ahead.
    pub windows: u64,
    /// Threads reading them; each reads one shard's ranges of a window at a time.
    pub io_threads: usize,
}

impl ReadDepth {
    /// Local files: a window ahead keeps a disk's queue filled while the workers decrypt
    /// (page-cache reads are memory copies, which more threads do not speed up).
    pub const LOCAL: ReadDepth = ReadDepth {
        windows: 1,
        io_threads: 4,
    };
    /// An object store: every request waits a round trip (tens of ms to a cloud store) before
    /// its first byte, so more must be outstanding: 8 windows, read by 16 threads (each waits
    /// on one shard's GETs of a window). docs/BENCHMARKS.md "Issue 15: object storage" has
    /// the measurements behind these numbers.
    pub const REMOTE: ReadDepth = ReadDepth {
        windows: 8,
        io_threads: 16,
    };
}

/// Byte-range reads of a dataset's shards.
pub trait ShardStore: Send + Sync + std::fmt::Debug {
    /// Number of shards.
    fn shard_count(&self) -> usize;

    /// Names shard `s` in errors and reports (its path, or its URL).
    fn name(&self, s: usize) -> &Path;

    /// Shard `s` as it was when the store was opened.
    fn identity(&self, s: usize) -> &ShardIdentity;

    /// Reads `dst.len()` bytes of shard `s` at `offset`. A range past the pinned length, or a
    /// shard that turns out shorter, is an error naming the shard.
    fn read_at(&self, s: usize, offset: u64, dst: &mut [u8]) -> Result<()>;

    /// Reads several ranges of shard `s`, each into its buffer (object stores coalesce nearby
    /// ranges into one request; local files read each in turn).
    fn read_ranges(&self, s: usize, ranges: &mut [(u64, &mut [u8])]) -> Result<()> {
        ranges
            .iter_mut()
            .try_for_each(|(offset, dst)| self.read_at(s, *offset, dst))
    }

    /// `Err` naming the shard if it no longer matches its pinned identity (for local files:
    /// its length changed, truncated or appended since the store was opened).
    fn check_unchanged(&self, s: usize) -> Result<()>;

    /// Network counters since the store was opened, for a store that fetches over a network
    /// (`None` for local files).
    fn network(&self) -> Option<NetworkStats> {
        None
    }

    /// The counters of a local ciphertext cache in front of the store ([`CachedStore`]);
    /// `None` for a store read without one.
    fn cache_stats(&self) -> Option<CacheStats> {
        None
    }

    /// How far the host loader reads ahead on this store by default.
    fn read_depth(&self) -> ReadDepth {
        ReadDepth::LOCAL
    }
}

/// Copies the part of `block` (bytes from `block_start` of a shard) that overlaps each range
/// into it: a cached block, or a part of a GET's body.
pub(crate) fn scatter(block_start: u64, block: &[u8], ranges: &mut [(u64, &mut [u8])]) {
    let block_end = block_start + block.len() as u64;
    for (off, dst) in ranges.iter_mut() {
        let (a, b) = (
            (*off).max(block_start),
            (*off + dst.len() as u64).min(block_end),
        );
        if a < b {
            dst[(a - *off) as usize..(b - *off) as usize]
                .copy_from_slice(&block[(a - block_start) as usize..(b - block_start) as usize]);
        }
    }
}
