//! [`ShardStore`] over an object store (S3 and S3-compatible stores, GCS, Azure, plain
//! HTTP(S)) through the `object_store` crate; docs/STORAGE.md is the user's side of it.
//!
//! - **Identity.** Every shard is HEAD-ed when the store opens (many at a time); its size and
//!   ETag (and version, where the store keeps versions) are pinned. Every GET carries
//!   `If-Match: <etag>` (and the version), and its answer is checked again here (size, ETag,
//!   the range returned), so a server that ignores `If-Match` still cannot slip another
//!   object's bytes in: a shard replaced after open is an error naming it.
//! - **Requests.** `read_ranges` sorts the ranges, coalesces those less than
//!   [`COALESCE_GAP`] apart into one ranged GET (at most [`MAX_REQUEST`] bytes), and keeps up
//!   to `in_flight` GETs going at once. Bodies are streamed straight into the caller's
//!   buffers: memory is what the caller handed in, whatever the object sizes.
//! - **Failures.** Ranged GETs go through a client with `object_store`'s retries off and our
//!   own loop (retry.rs): throttling (429, 503 SlowDown), 5xx, connection errors, resets and
//!   bodies cut short are tried again with exponential backoff and full jitter, within a
//!   bounded budget (a retry count and a total time); a body cut short resumes where it
//!   stopped. 4xx answers are final (412: the object was replaced). Each attempt has a
//!   first-byte timeout, a stalled-body timeout and an overall timeout. Then the error names
//!   the object's URL, the attempts and the last cause, scrubbed of anything that could be a
//!   credential (see [`scrub`]). HEADs and small reads keep `object_store`'s own retries.
//! - **Telemetry.** Every GET and HEAD, the bytes, retries, failures and times to first byte
//!   are counted per opened store ([`crate::store::NetworkStats`]).
//!
//! A small multi-thread tokio runtime owned by the store drives the requests; the synchronous
//! seam blocks the calling thread on them (`block_on`), so any number of loader threads read
//! at once. A read gives up as soon as the calling thread's
//! [`crate::store::CancelToken`] is cancelled (a dropped loader), dropping its requests.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, ObjectStoreScheme};

use crate::error::{Error, Result};
use crate::store::network::NetCounters;

mod client;
mod read;
mod retry;
mod write;

use crate::store::OpenOptions;
pub use client::register_secret;
pub use client::scrub;
use client::{build_store, redact_url, store_error};
pub use read::ObjectStoreShards;
use read::{Pin, get_into};
pub use write::{KeyringVersion, ObjectShardUpload};

/// Ranges closer than this are fetched by one request (the gap's bytes are read and dropped).
pub const COALESCE_GAP: u64 = 1 << 20;
/// A coalesced request grows no longer than this.
pub const MAX_REQUEST: u64 = 64 << 20;

/// Settings read from the environment (docs/STORAGE.md): `CIPHERSHARD_STORE_IN_FLIGHT`
/// (requests at once per `read_ranges`, default 16), `CIPHERSHARD_STORE_TIMEOUT` (seconds per
/// request, default 30), `CIPHERSHARD_STORE_RETRIES` (default 5),
/// `CIPHERSHARD_STORE_RETRY_SECONDS` (the total time one request may spend retrying, default
/// 60), `CIPHERSHARD_STORE_FIRST_BYTE_TIMEOUT` (seconds from sending a GET to its answer,
/// default 15), `CIPHERSHARD_STORE_STALL_TIMEOUT` (seconds a body may send nothing, default
/// 15), `CIPHERSHARD_STORE_PART_SIZE` (MiB per part of a shard's multipart upload, default 8,
/// at least 5: S3's smallest part).
#[derive(Debug, Clone)]
struct Settings {
    in_flight: usize,
    part_size: u64,
    timeout: Duration,
    retries: usize,
    retry_time: Duration,
    first_byte_timeout: Duration,
    stall_timeout: Duration,
}

impl Settings {
    fn from_env() -> Result<Self> {
        fn num(var: &str, default: u64, max: u64) -> Result<u64> {
            match std::env::var(var) {
                Err(_) => Ok(default),
                Ok(v) => match v.trim().parse::<u64>() {
                    Ok(n) if n <= max => Ok(n),
                    _ => Err(Error::InvalidArgument(format!(
                        "${var}: expected a whole number from 0 to {max}, found '{}'",
                        crate::error::escape_untrusted(&v)
                    ))),
                },
            }
        }
        Ok(Settings {
            in_flight: num("CIPHERSHARD_STORE_IN_FLIGHT", 16, 1024)?.max(1) as usize,
            part_size: num("CIPHERSHARD_STORE_PART_SIZE", 8, 5 << 10)?.max(5) << 20,
            timeout: Duration::from_secs(num("CIPHERSHARD_STORE_TIMEOUT", 30, 3600)?.max(1)),
            retries: num("CIPHERSHARD_STORE_RETRIES", 5, 100)? as usize,
            retry_time: Duration::from_secs(num("CIPHERSHARD_STORE_RETRY_SECONDS", 60, 3600)?),
            first_byte_timeout: Duration::from_secs(
                num("CIPHERSHARD_STORE_FIRST_BYTE_TIMEOUT", 15, 3600)?.max(1),
            ),
            stall_timeout: Duration::from_secs(
                num("CIPHERSHARD_STORE_STALL_TIMEOUT", 15, 3600)?.max(1),
            ),
        })
    }
}

/// `Some(url)` when `path` is written as a URL (`s3://…`, `gs://…`, `https://…`): a scheme of
/// two or more letters, digits, `+`, `-` or `.` before `://`. A local directory whose name
/// looks like that is `./s3:/…`.
pub fn as_url(path: &Path) -> Option<&str> {
    let s = path.to_str()?;
    let (scheme, _) = s.split_once("://")?;
    let ok = scheme.len() >= 2
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    ok.then_some(s)
}

/// A dataset's folder in an object store: where its manifest, keyring and shards are.
#[derive(Clone)]
pub struct ObjectDir {
    inner: Arc<Inner>,
}

struct Inner {
    /// HEADs and whole small objects: `object_store` retries these itself.
    store: Arc<dyn ObjectStore>,
    /// The same client's multipart interface (S3, GCS, Azure); `None` for plain HTTP, which
    /// is read-only here.
    multipart: Option<Arc<dyn object_store::multipart::MultipartStore>>,
    /// Ranged GETs: no retries of `object_store`'s; read.rs runs and counts them.
    reads: Arc<dyn ObjectStore>,
    net: NetCounters,
    /// The folder's URL with a trailing `/`, as the user wrote it (never credentials: a URL
    /// holding a user, password or query string is refused).
    url: String,
    prefix: ObjectPath,
    settings: Settings,
    rt: tokio::runtime::Runtime,
}

// By hand: the client's own Debug may hold credentials.
impl std::fmt::Debug for ObjectDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectDir")
            .field("url", &self.inner.url)
            .finish_non_exhaustive()
    }
}

impl ObjectDir {
    /// The folder named by `url` (or the folder of the object it names, when it ends in
    /// `.safetensors` or `.json`). Builds the client from the environment; sends nothing yet.
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with(url, &OpenOptions::default())
    }

    /// [`ObjectDir::open`] with the client's settings from `opts` over the environment's.
    pub fn open_with(url: &str, opts: &OpenOptions) -> Result<Self> {
        let bad = |why: &str| {
            Error::InvalidArgument(format!(
                "{}: {why}",
                crate::error::escape_untrusted(&redact_url(url))
            ))
        };
        let mut parsed = url::Url::parse(url).map_err(|e| bad(&format!("not a URL ({e})")))?;
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(bad(
                "credentials in a URL are refused (they would be printed in messages); use the \
                 store's environment variables (docs/STORAGE.md)",
            ));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(bad(
                "a query string or fragment in a dataset URL is refused (a signed URL or SAS \
                 token would be printed in messages); use the store's environment variables",
            ));
        }
        // The folder: a URL naming a shard or the manifest opens the dataset around it.
        let path = parsed.path().to_string();
        let last = path.rsplit('/').next().unwrap_or("");
        let folder = if last.ends_with(".safetensors") || last.ends_with(".json") {
            path[..path.len() - last.len()].to_string()
        } else if path.ends_with('/') || path.is_empty() {
            path
        } else {
            format!("{path}/")
        };
        parsed.set_path(&folder);
        let settings = Settings::from_env()?;
        let (scheme, prefix) =
            ObjectStoreScheme::parse(&parsed).map_err(|e| bad(&scrub(&e.to_string())))?;
        let (store, multipart) =
            build_store(&scheme, &parsed, &settings, opts, true).map_err(|e| bad(&e))?;
        let (reads, _) =
            build_store(&scheme, &parsed, &settings, opts, false).map_err(|e| bad(&e))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ciphershard-store")
            .enable_all()
            .build()
            .map_err(|e| Error::io(PathBuf::from(parsed.as_str()), e))?;
        Ok(ObjectDir {
            inner: Arc::new(Inner {
                store,
                multipart,
                reads,
                net: NetCounters::default(),
                url: parsed.to_string(),
                prefix,
                settings,
                rt,
            }),
        })
    }

    /// The folder's URL, ending in `/`.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The URL of `name` in the folder, as a path for messages.
    pub fn name_of(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("{}{name}", self.inner.url))
    }

    fn location(&self, name: &str) -> ObjectPath {
        self.inner.prefix.clone().join(name)
    }

    /// Reads the whole of the small object `name` (manifest, keyring), refusing one larger
    /// than `cap` before reading it. `Err` of kind `NotFound` when there is no such object.
    pub fn read_small(&self, name: &str, what: &'static str, cap: u64) -> Result<Vec<u8>> {
        Ok(self.read_small_meta(name, what, cap)?.0)
    }

    /// [`Self::read_small`], and the object's metadata (size, ETag, version) as of that read:
    /// the GET carried `If-Match` with the HEAD's ETag, so the bytes are that version's.
    fn read_small_meta(
        &self,
        name: &str,
        what: &'static str,
        cap: u64,
    ) -> Result<(Vec<u8>, object_store::ObjectMeta)> {
        let url = self.name_of(name);
        let loc = self.location(name);
        let inner = &self.inner;
        inner.rt.block_on(async {
            inner.net.head();
            let meta = inner
                .store
                .head(&loc)
                .await
                .map_err(|e| store_error(&url, e))?;
            if meta.size > cap {
                return Err(Error::format(
                    &url,
                    what,
                    format!(
                        "object is {} bytes, more than the {cap}-byte limit",
                        meta.size
                    ),
                ));
            }
            let mut buf = vec![0u8; meta.size as usize];
            if meta.size > 0 {
                let pin = Pin::of(&meta);
                get_into(inner, &url, &loc, &pin, 0, &mut [(0, &mut buf[..])]).await?;
            }
            Ok((buf, meta))
        })
    }
}
