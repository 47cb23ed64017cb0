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
//! - **Failures.** Each request has a timeout; throttling and transient errors are retried by
//!   `object_store` with exponential backoff and decorrelated jitter, within a bounded budget
//!   (a retry count and a total time), and a body cut short is fetched again within the same
//!   count. Then the error names the object's URL and the last cause, scrubbed of anything
//!   that could be a credential (see [`scrub`]).
//!
//! A small multi-thread tokio runtime owned by the store drives the requests; the synchronous
//! seam blocks the calling thread on them (`block_on`), so any number of loader threads read
//! at once and a dropped store cancels nothing that is still needed.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientConfigKey, ClientOptions, GetOptions, GetRange, ObjectStore,
    ObjectStoreExt, ObjectStoreScheme, RetryConfig,
};

use super::{ShardIdentity, ShardStore};
use crate::error::{Error, Result};

/// Ranges closer than this are fetched by one request (the gap's bytes are read and dropped).
pub const COALESCE_GAP: u64 = 1 << 20;
/// A coalesced request grows no longer than this.
pub const MAX_REQUEST: u64 = 64 << 20;

/// Settings read from the environment (docs/STORAGE.md): `CIPHERSHARD_STORE_IN_FLIGHT`
/// (requests at once per `read_ranges`, default 16), `CIPHERSHARD_STORE_TIMEOUT` (seconds per
/// request, default 30), `CIPHERSHARD_STORE_RETRIES` (default 5),
/// `CIPHERSHARD_STORE_RETRY_SECONDS` (the total time one request may spend retrying, default
/// 60).
#[derive(Debug, Clone)]
struct Settings {
    in_flight: usize,
    timeout: Duration,
    retries: usize,
    retry_time: Duration,
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
            timeout: Duration::from_secs(num("CIPHERSHARD_STORE_TIMEOUT", 30, 3600)?.max(1)),
            retries: num("CIPHERSHARD_STORE_RETRIES", 5, 100)? as usize,
            retry_time: Duration::from_secs(num("CIPHERSHARD_STORE_RETRY_SECONDS", 60, 3600)?),
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
    store: Arc<dyn ObjectStore>,
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
        let store = build_store(&scheme, &parsed, &settings).map_err(|e| bad(&e))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ciphershard-store")
            .enable_all()
            .build()
            .map_err(|e| Error::io(PathBuf::from(parsed.as_str()), e))?;
        Ok(ObjectDir {
            inner: Arc::new(Inner {
                store,
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
        let url = self.name_of(name);
        let loc = self.location(name);
        let inner = &self.inner;
        inner.rt.block_on(async {
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
            Ok(buf)
        })
    }

    /// Pins every shard of `names` (shard `i` is `names[i]`, relative to the folder): one HEAD
    /// each, `in_flight` at a time.
    pub fn shards(&self, names: &[String]) -> Result<ObjectStoreShards> {
        let inner = &self.inner;
        let heads = inner.rt.block_on(async {
            futures_util::stream::iter(names.iter().map(|name| {
                let url = self.name_of(name);
                let loc = self.location(name);
                async move {
                    let meta = inner
                        .store
                        .head(&loc)
                        .await
                        .map_err(|e| store_error(&url, e))?;
                    Ok::<_, Error>(ObjectShard {
                        identity: ShardIdentity {
                            len: meta.size,
                            version: describe(&meta),
                        },
                        pin: Pin::of(&meta),
                        url,
                        loc,
                    })
                }
            }))
            .buffered(inner.settings.in_flight)
            .collect::<Vec<_>>()
            .await
        });
        Ok(ObjectStoreShards {
            dir: self.clone(),
            shards: heads.into_iter().collect::<Result<_>>()?,
        })
    }
}

/// What a GET must match: the object as HEAD saw it.
#[derive(Debug, Clone)]
struct Pin {
    size: u64,
    e_tag: Option<String>,
    version: Option<String>,
    /// RFC 3339; compared only where the store gives no ETag.
    last_modified: String,
}

impl Pin {
    fn of(meta: &object_store::ObjectMeta) -> Self {
        Pin {
            size: meta.size,
            e_tag: meta.e_tag.clone(),
            version: meta.version.clone(),
            last_modified: meta.last_modified.to_rfc3339(),
        }
    }
}

fn describe(meta: &object_store::ObjectMeta) -> String {
    let mut v = Vec::new();
    if let Some(e) = &meta.e_tag {
        v.push(format!("etag {e}"));
    }
    if let Some(ver) = &meta.version {
        v.push(format!("version {ver}"));
    }
    v.push(format!("modified {}", meta.last_modified.to_rfc3339()));
    v.join(", ")
}

/// A dataset's shards in an object store, each pinned at open.
#[derive(Debug)]
pub struct ObjectStoreShards {
    dir: ObjectDir,
    shards: Vec<ObjectShard>,
}

#[derive(Debug)]
struct ObjectShard {
    url: PathBuf,
    loc: ObjectPath,
    identity: ShardIdentity,
    pin: Pin,
}

/// The error for an object that no longer matches what was pinned.
fn replaced(url: &Path, what: String) -> Error {
    Error::format(
        url,
        "shard",
        format!(
            "the object was replaced or changed since the dataset was opened ({what}); \
             reopen the dataset"
        ),
    )
}

/// Fetches the ranges of `dst` (sorted by offset, all within `start..end` where `start` is
/// the first offset) with one ranged GET, streaming the body into them. A body cut short is
/// fetched again (the whole request) within the retry count.
async fn get_into(
    inner: &Inner,
    url: &Path,
    loc: &ObjectPath,
    pin: &Pin,
    start: u64,
    dst: &mut [(u64, &mut [u8])],
) -> Result<()> {
    let end = dst
        .iter()
        .map(|(o, d)| o + d.len() as u64)
        .max()
        .unwrap_or(start);
    let mut attempt = 0;
    loop {
        let options = GetOptions {
            if_match: pin.e_tag.clone(),
            version: pin.version.clone(),
            range: Some(GetRange::Bounded(start..end)),
            ..Default::default()
        };
        let res = match inner.store.get_opts(loc, options).await {
            Ok(r) => r,
            Err(object_store::Error::Precondition { .. }) => {
                return Err(replaced(
                    url,
                    format!(
                        "the store no longer has {}",
                        pin.e_tag.as_deref().unwrap_or("the pinned version")
                    ),
                ));
            }
            Err(e) => return Err(store_error(url, e)),
        };
        // Checked here too: a server that ignores If-Match must not mix objects.
        if res.meta.size != pin.size {
            return Err(replaced(
                url,
                format!("{} bytes when opened, {} now", pin.size, res.meta.size),
            ));
        }
        if pin.e_tag.is_some() && res.meta.e_tag != pin.e_tag {
            return Err(replaced(
                url,
                format!(
                    "etag {} when opened, {} now",
                    pin.e_tag.as_deref().unwrap_or(""),
                    res.meta.e_tag.as_deref().unwrap_or("none")
                ),
            ));
        }
        if pin.e_tag.is_none() && res.meta.last_modified.to_rfc3339() != pin.last_modified {
            return Err(replaced(url, "modification time changed".into()));
        }
        if res.range != (start..end) {
            return Err(Error::format(
                url,
                "shard",
                format!(
                    "the store answered bytes {:?} to a request for {start}..{end}",
                    res.range
                ),
            ));
        }
        let mut body = res.into_stream();
        let mut pos = start;
        let mut failure = None;
        while let Some(part) = body.next().await {
            let bytes = match part {
                Ok(b) => b,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            };
            let (lo, hi) = (pos, pos + bytes.len() as u64);
            if hi > end {
                return Err(Error::format(
                    url,
                    "shard",
                    format!("the store sent more than the {start}..{end} asked for"),
                ));
            }
            for (off, d) in dst.iter_mut() {
                let (a, b) = ((*off).max(lo), (*off + d.len() as u64).min(hi));
                if a < b {
                    d[(a - *off) as usize..(b - *off) as usize]
                        .copy_from_slice(&bytes[(a - lo) as usize..(b - lo) as usize]);
                }
            }
            pos = hi;
        }
        let cause = match failure {
            None if pos == end => return Ok(()),
            None => format!(
                "the body ended after {} of {} bytes",
                pos - start,
                end - start
            ),
            Some(e) => scrub(&error_chain(&e)),
        };
        if attempt >= inner.settings.retries {
            return Err(Error::io(
                url,
                std::io::Error::other(format!(
                    "reading bytes {start}..{end} failed after {} attempts: {cause}",
                    attempt + 1
                )),
            ));
        }
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(100 << attempt.min(6))).await;
    }
}

impl ShardStore for ObjectStoreShards {
    fn shard_count(&self) -> usize {
        self.shards.len()
    }

    fn name(&self, s: usize) -> &Path {
        &self.shards[s].url
    }

    fn identity(&self, s: usize) -> &ShardIdentity {
        &self.shards[s].identity
    }

    fn read_at(&self, s: usize, offset: u64, dst: &mut [u8]) -> Result<()> {
        self.read_ranges(s, &mut [(offset, dst)])
    }

    fn read_ranges(&self, s: usize, ranges: &mut [(u64, &mut [u8])]) -> Result<()> {
        let shard = &self.shards[s];
        let len = shard.identity.len;
        for (offset, dst) in ranges.iter() {
            if offset.checked_add(dst.len() as u64).is_none_or(|e| e > len) {
                return Err(Error::format(
                    &shard.url,
                    "shard",
                    format!(
                        "bytes {offset}..+{} lie outside the object ({len} bytes)",
                        dst.len()
                    ),
                ));
            }
        }
        let mut sorted: Vec<(u64, &mut [u8])> = ranges
            .iter_mut()
            .filter(|(_, d)| !d.is_empty())
            .map(|(o, d)| (*o, &mut **d))
            .collect();
        sorted.sort_by_key(|(o, _)| *o);
        // Groups of ranges that one GET fetches.
        let mut groups: Vec<Vec<(u64, &mut [u8])>> = Vec::new();
        let mut group_end = 0u64;
        for (o, d) in sorted {
            let e = o + d.len() as u64;
            match groups.last_mut() {
                Some(g)
                    if o <= group_end.saturating_add(COALESCE_GAP)
                        && e.max(group_end) - g[0].0 <= MAX_REQUEST =>
                {
                    g.push((o, d));
                    group_end = group_end.max(e);
                }
                _ => {
                    groups.push(vec![(o, d)]);
                    group_end = e;
                }
            }
        }
        let inner = &self.dir.inner;
        inner.rt.block_on(async {
            let mut requests =
                futures_util::stream::iter(groups.into_iter().map(|mut g| {
                    let start = g[0].0;
                    async move {
                        get_into(inner, &shard.url, &shard.loc, &shard.pin, start, &mut g).await
                    }
                }))
                .buffer_unordered(inner.settings.in_flight);
            // The first error ends the read; dropping the stream cancels the other requests.
            while let Some(r) = requests.next().await {
                r?;
            }
            Ok(())
        })
    }

    fn check_unchanged(&self, s: usize) -> Result<()> {
        let shard = &self.shards[s];
        let inner = &self.dir.inner;
        let meta = inner
            .rt
            .block_on(inner.store.head(&shard.loc))
            .map_err(|e| store_error(&shard.url, e))?;
        let pin = &shard.pin;
        if meta.size != pin.size {
            return Err(replaced(
                &shard.url,
                format!("{} bytes when opened, {} now", pin.size, meta.size),
            ));
        }
        if meta.e_tag != pin.e_tag || meta.version != pin.version {
            return Err(replaced(
                &shard.url,
                format!(
                    "etag {} when opened, {} now",
                    pin.e_tag.as_deref().unwrap_or("none"),
                    meta.e_tag.as_deref().unwrap_or("none")
                ),
            ));
        }
        Ok(())
    }
}

/// Builds the client for `url`: our defaults (timeouts, retry budget) first, then the
/// store's standard environment variables over them (`AWS_*`, `GOOGLE_*`, `AZURE_*`).
fn build_store(
    scheme: &ObjectStoreScheme,
    url: &url::Url,
    s: &Settings,
) -> std::result::Result<Arc<dyn ObjectStore>, String> {
    let client = ClientOptions::new()
        .with_timeout(s.timeout)
        .with_connect_timeout(Duration::from_secs(10));
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            base: 2.0,
        },
        max_retries: s.retries,
        retry_timeout: s.retry_time,
    };
    let env = |prefix: &str| -> Vec<(String, String)> {
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect()
    };
    let built: std::result::Result<Arc<dyn ObjectStore>, object_store::Error> = match scheme {
        ObjectStoreScheme::AmazonS3 => {
            let mut b = object_store::aws::AmazonS3Builder::new()
                .with_client_options(client)
                .with_retry(retry);
            for (k, v) in env("AWS_") {
                if let Ok(key) = k.parse() {
                    b = b.with_config(key, v);
                }
            }
            b.with_url(url.as_str()).build().map(|s| Arc::new(s) as _)
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            let mut b = object_store::gcp::GoogleCloudStorageBuilder::new()
                .with_client_options(client)
                .with_retry(retry);
            for (k, v) in env("GOOGLE_") {
                if let Ok(key) = k.parse() {
                    b = b.with_config(key, v);
                }
            }
            b.with_url(url.as_str()).build().map(|s| Arc::new(s) as _)
        }
        ObjectStoreScheme::MicrosoftAzure => {
            let mut b = object_store::azure::MicrosoftAzureBuilder::new()
                .with_client_options(client)
                .with_retry(retry);
            for (k, v) in env("AZURE_") {
                if let Ok(key) = k.parse() {
                    b = b.with_config(key, v);
                }
            }
            b.with_url(url.as_str()).build().map(|s| Arc::new(s) as _)
        }
        ObjectStoreScheme::Http => object_store::http::HttpBuilder::new()
            .with_client_options(client)
            .with_config(
                ClientConfigKey::AllowHttp,
                (url.scheme() == "http").to_string(),
            )
            .with_retry(retry)
            .with_url(&url[..url::Position::BeforePath])
            .build()
            .map(|s| Arc::new(s) as _),
        other => {
            return Err(format!(
                "{other:?} URLs are not object stores; name a local dataset by its path"
            ));
        }
    };
    built.map_err(|e| scrub(&error_chain(&e)))
}

/// `e` and its sources, joined by ": ".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// An `object_store` error as ours: the object's URL and the scrubbed cause, with an
/// `io::ErrorKind` that says what happened (a missing object is `NotFound`, refused
/// credentials `PermissionDenied`).
fn store_error(url: &Path, e: object_store::Error) -> Error {
    use std::io::ErrorKind;
    let (kind, hint) = match &e {
        object_store::Error::NotFound { .. } => (ErrorKind::NotFound, "no such object"),
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => (
            ErrorKind::PermissionDenied,
            "the store refused the credentials (check AWS_*/GOOGLE_*/AZURE_* variables or the \
             instance's role; docs/STORAGE.md)",
        ),
        _ => (ErrorKind::Other, "request failed"),
    };
    let mut cause = scrub(&error_chain(&e));
    // Some stores answer 403 as a generic error: say what it means all the same.
    let kind = if kind == ErrorKind::Other
        && (cause.contains("403") || cause.contains("SignatureDoesNotMatch"))
    {
        cause = format!(
            "the store refused the credentials (check AWS_*/GOOGLE_*/AZURE_* variables; \
             docs/STORAGE.md): {cause}"
        );
        ErrorKind::PermissionDenied
    } else {
        if kind != ErrorKind::Other {
            cause = format!("{hint}: {cause}");
        }
        kind
    };
    Error::io(url, std::io::Error::new(kind, cause))
}

/// Removes from an error text whatever could be a credential: query strings and user info of
/// URLs (signatures, SAS tokens), XML bodies beyond their `Code` and `Message` (S3's
/// `SignatureDoesNotMatch` echoes the signed request, session token included), the values of
/// credential-looking environment variables; and caps the length.
pub fn scrub(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(600));
    // XML bodies: keep <Code> and <Message>, drop the rest.
    let mut rest = text;
    while let Some(i) = rest.find('<') {
        out.push_str(&rest[..i]);
        let xml = &rest[i..];
        let code = tag(xml, "Code");
        let msg = tag(xml, "Message");
        if code.is_some() || msg.is_some() {
            out.push_str(&format!(
                "{} {}",
                code.unwrap_or_default(),
                msg.unwrap_or_default()
            ));
        }
        // Skip to the end of the body: the last '>' of this text.
        match xml.rfind('>') {
            Some(j) => rest = &xml[j + 1..],
            None => rest = "",
        }
    }
    out.push_str(rest);
    // URLs: drop user info and query strings.
    let mut cleaned = String::with_capacity(out.len());
    for word in out.split_inclusive(char::is_whitespace) {
        if word.contains("://") {
            let (w, ws) = match word.find(char::is_whitespace) {
                Some(i) => word.split_at(i),
                None => (word, ""),
            };
            cleaned.push_str(&redact_url(w));
            cleaned.push_str(ws);
        } else {
            cleaned.push_str(word);
        }
    }
    for (k, v) in std::env::vars_os() {
        let (Some(k), Some(v)) = (k.to_str(), v.to_str()) else {
            continue;
        };
        let k = k.to_ascii_uppercase();
        let secret = ["SECRET", "TOKEN", "PASSWORD", "SAS", "KEY", "CREDENTIAL"]
            .iter()
            .any(|w| k.contains(w));
        if secret && v.len() >= 8 && cleaned.contains(v) {
            cleaned = cleaned.replace(v, "[redacted]");
        }
    }
    const CAP: usize = 600;
    if cleaned.len() > CAP {
        let mut cut = CAP;
        while !cleaned.is_char_boundary(cut) {
            cut -= 1;
        }
        cleaned.truncate(cut);
        cleaned.push('…');
    }
    cleaned
}

fn tag(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let i = xml.find(&open)? + open.len();
    let j = xml[i..].find('<')? + i;
    Some(xml[i..j].chars().take(200).collect())
}

/// `url` without user info, query or fragment (unparseable text is cut at `?` and `@`).
fn redact_url(url: &str) -> String {
    let cut = url.split(['?', '#']).next().unwrap_or("");
    match cut.split_once("://") {
        Some((scheme, rest)) => match rest.split('/').next().and_then(|h| h.rfind('@')) {
            Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
            None => cut.to_string(),
        },
        None => cut.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_told_from_paths() {
        assert_eq!(as_url(Path::new("s3://b/p/")), Some("s3://b/p/"));
        assert_eq!(as_url(Path::new("https://h/x")), Some("https://h/x"));
        assert_eq!(as_url(Path::new("ds/")), None);
        assert_eq!(as_url(Path::new("./s3://b")), None);
        assert_eq!(as_url(Path::new("C://x")), None);
    }

    #[test]
    fn scrub_keeps_the_cause_and_drops_secrets() {
        let t = "Error performing GET https://u:pw@h/b/k?X-Amz-Signature=abc in 1s: \
                 <?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code>\
                 <Message>no</Message><CanonicalRequest>x-amz-security-token:SECRET\
                 </CanonicalRequest></Error> tail";
        let s = scrub(t);
        assert!(s.contains("https://h/b/k"), "{s}");
        assert!(s.contains("SignatureDoesNotMatch no"), "{s}");
        assert!(s.ends_with(" tail"), "{s}");
        for bad in ["pw", "Signature=", "SECRET", "CanonicalRequest"] {
            assert!(!s.contains(bad), "{bad} in {s}");
        }
    }

    #[test]
    fn credentials_in_urls_are_refused_unprinted() {
        for url in ["s3://k:hunter2@b/p/", "https://h/p/?sig=hunter2"] {
            let e = ObjectDir::open(url).unwrap_err().to_string();
            assert!(!e.contains("hunter2"), "{e}");
        }
    }
}
