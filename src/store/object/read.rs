//! Reading shards from an object store: pinned identities, coalesced ranged GETs with many in
//! flight, bodies streamed into the caller's buffers (the module docs of `object` say how).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStoreExt};

use std::time::{Duration, Instant};

use super::client::{error_chain, scrub, store_error};
use super::retry::{Backoff, Verdict, verdict};
use super::{COALESCE_GAP, Inner, MAX_REQUEST, ObjectDir};
use crate::error::{Error, Result};
use crate::store::{CancelToken, NetworkStats, ReadDepth, ShardIdentity, ShardStore};

/// What a GET must match: the object as HEAD saw it.
#[derive(Debug, Clone)]
pub(super) struct Pin {
    size: u64,
    e_tag: Option<String>,
    version: Option<String>,
    /// RFC 3339; compared only where the store gives no ETag.
    last_modified: String,
}

impl Pin {
    pub(super) fn of(meta: &object_store::ObjectMeta) -> Self {
        Pin {
            size: meta.size,
            e_tag: meta.e_tag.clone(),
            version: meta.version.clone(),
            last_modified: meta.last_modified.to_rfc3339(),
        }
    }
}

pub(super) fn describe(meta: &object_store::ObjectMeta) -> String {
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

impl ObjectDir {
    /// Pins every shard of `names` (shard `i` is `names[i]`, relative to the folder): one HEAD
    /// each, `in_flight` at a time.
    pub fn shards(&self, names: &[String]) -> Result<ObjectStoreShards> {
        let inner = &self.inner;
        let heads = inner.rt.block_on(async {
            futures_util::stream::iter(names.iter().map(|name| {
                let url = self.name_of(name);
                let loc = self.location(name);
                async move {
                    inner.net.head();
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

/// A dataset's shards in an object store, each pinned at open.
#[derive(Debug)]
pub struct ObjectStoreShards {
    dir: ObjectDir,
    shards: Vec<ObjectShard>,
}

#[derive(Debug)]
pub(super) struct ObjectShard {
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

/// How one attempt at a GET failed.
enum Failure {
    /// Not worth trying again: the error to return.
    Final(Error),
    /// Worth trying again within the budget.
    Transient { cause: String, timed_out: bool },
}

/// Fetches the ranges of `dst` (sorted by offset, all within `start..end` where `start` is
/// the first offset) with ranged GETs, streaming the body into them: one GET, unless it fails
/// transiently, when it is tried again (from the first byte not yet received) with backoff,
/// within the retry count and the total retry time.
pub(super) async fn get_into(
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
    let s = &inner.settings;
    let began = Instant::now();
    let mut backoff = Backoff::default();
    let mut pos = start;
    let mut attempts = 0usize;
    loop {
        attempts += 1;
        let once = attempt(inner, url, loc, pin, start, end, &mut pos, dst);
        let (cause, timed_out) = match tokio::time::timeout(s.timeout, once).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(Failure::Final(e))) => {
                inner.net.failed(false);
                inner.net.error();
                return Err(e);
            }
            Ok(Err(Failure::Transient { cause, timed_out })) => (cause, timed_out),
            Err(_) => (
                format!(
                    "the request took longer than {} s (CIPHERSHARD_STORE_TIMEOUT)",
                    s.timeout.as_secs()
                ),
                true,
            ),
        };
        inner.net.failed(timed_out);
        let wait = backoff.next();
        if attempts > s.retries || began.elapsed() + wait > s.retry_time {
            inner.net.error();
            let kind = if timed_out {
                std::io::ErrorKind::TimedOut
            } else {
                std::io::ErrorKind::Other
            };
            return Err(Error::io(
                url,
                std::io::Error::new(
                    kind,
                    format!(
                        "reading bytes {start}..{end}: gave up after {attempts} attempts in \
                         {:.1} s (retry budget: CIPHERSHARD_STORE_RETRIES={}, \
                         CIPHERSHARD_STORE_RETRY_SECONDS={}); last cause: {cause}",
                        began.elapsed().as_secs_f64(),
                        s.retries,
                        s.retry_time.as_secs()
                    ),
                ),
            ));
        }
        inner.net.retry();
        tokio::time::sleep(wait).await;
    }
}

/// One GET of `*pos..end`, its answer checked against the pin and its body streamed into
/// `dst`; `*pos` advances past every byte received, so a retry asks only for the rest.
#[allow(clippy::too_many_arguments)]
async fn attempt(
    inner: &Inner,
    url: &Path,
    loc: &ObjectPath,
    pin: &Pin,
    start: u64,
    end: u64,
    pos: &mut u64,
    dst: &mut [(u64, &mut [u8])],
) -> std::result::Result<(), Failure> {
    let s = &inner.settings;
    let options = GetOptions {
        if_match: pin.e_tag.clone(),
        version: pin.version.clone(),
        range: Some(GetRange::Bounded(*pos..end)),
        ..Default::default()
    };
    inner.net.get();
    let sent = Instant::now();
    let res = match tokio::time::timeout(s.first_byte_timeout, inner.reads.get_opts(loc, options))
        .await
    {
        Err(_) => {
            return Err(Failure::Transient {
                cause: format!(
                    "no answer within {} s (CIPHERSHARD_STORE_FIRST_BYTE_TIMEOUT)",
                    s.first_byte_timeout.as_secs()
                ),
                timed_out: true,
            });
        }
        Ok(Ok(r)) => r,
        Ok(Err(object_store::Error::Precondition { .. })) => {
            return Err(Failure::Final(replaced(
                url,
                format!(
                    "the store no longer has {}",
                    pin.e_tag.as_deref().unwrap_or("the pinned version")
                ),
            )));
        }
        Ok(Err(e)) => {
            let chain = scrub(&error_chain(&e));
            return Err(match verdict(&e, &chain) {
                Verdict::Permanent => Failure::Final(store_error(url, e)),
                Verdict::Transient => Failure::Transient {
                    timed_out: chain.contains("timed out") || chain.contains("imeout"),
                    cause: chain,
                },
            });
        }
    };
    inner.net.first_byte(sent.elapsed());
    // Checked here too: a server that ignores If-Match must not mix objects.
    if res.meta.size != pin.size {
        return Err(Failure::Final(replaced(
            url,
            format!("{} bytes when opened, {} now", pin.size, res.meta.size),
        )));
    }
    if pin.e_tag.is_some() && res.meta.e_tag != pin.e_tag {
        return Err(Failure::Final(replaced(
            url,
            format!(
                "etag {} when opened, {} now",
                pin.e_tag.as_deref().unwrap_or(""),
                res.meta.e_tag.as_deref().unwrap_or("none")
            ),
        )));
    }
    if pin.e_tag.is_none() && res.meta.last_modified.to_rfc3339() != pin.last_modified {
        return Err(Failure::Final(replaced(
            url,
            "modification time changed".into(),
        )));
    }
    if res.range != (*pos..end) {
        return Err(Failure::Final(Error::format(
            url,
            "shard",
            format!(
                "the store answered bytes {:?} to a request for {}..{end}",
                res.range, *pos
            ),
        )));
    }
    let mut body = res.into_stream();
    loop {
        let part = match tokio::time::timeout(s.stall_timeout, body.next()).await {
            Err(_) => {
                return Err(Failure::Transient {
                    cause: format!(
                        "the body stalled: no bytes for {} s after {} of {} bytes \
                         (CIPHERSHARD_STORE_STALL_TIMEOUT)",
                        s.stall_timeout.as_secs(),
                        *pos - start,
                        end - start
                    ),
                    timed_out: true,
                });
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(Failure::Transient {
                    cause: format!(
                        "the body broke after {} of {} bytes: {}",
                        *pos - start,
                        end - start,
                        scrub(&error_chain(&e))
                    ),
                    timed_out: false,
                });
            }
            Ok(Some(Ok(bytes))) => bytes,
        };
        inner.net.bytes(part.len() as u64);
        let (lo, hi) = (*pos, *pos + part.len() as u64);
        if hi > end {
            return Err(Failure::Final(Error::format(
                url,
                "shard",
                format!("the store sent more than the {start}..{end} asked for"),
            )));
        }
        crate::store::scatter(lo, &part, dst);
        *pos = hi;
    }
    if *pos == end {
        Ok(())
    } else {
        Err(Failure::Transient {
            cause: format!(
                "the body ended after {} of {} bytes",
                *pos - start,
                end - start
            ),
            timed_out: false,
        })
    }
}

/// Runs `fut` until it ends or the calling thread's cancel token (if any) is cancelled; a
/// cancelled read drops its requests and is an error naming `url`.
async fn unless_cancelled<T>(
    url: &Path,
    cancel: Option<CancelToken>,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let Some(cancel) = cancel else {
        return fut.await;
    };
    let stopped = || {
        Error::Stopped(format!(
            "a read of {} was cancelled (the loader was dropped)",
            url.display()
        ))
    };
    if cancel.is_cancelled() {
        return Err(stopped());
    }
    // Polled, not woken: a cancelled read is noticed within one tick, and the token stays a
    // plain flag that any thread may set without a runtime.
    let watch = async {
        while !cancel.is_cancelled() {
            tokio::time::sleep(CANCEL_TICK).await;
        }
    };
    futures_util::pin_mut!(fut);
    futures_util::pin_mut!(watch);
    match futures_util::future::select(fut, watch).await {
        futures_util::future::Either::Left((r, _)) => r,
        futures_util::future::Either::Right(_) => Err(stopped()),
    }
}

/// How often a waiting read looks at its cancel token.
const CANCEL_TICK: Duration = Duration::from_millis(20);

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
        let cancel = crate::store::cancel::current();
        inner
            .rt
            .block_on(unless_cancelled(&shard.url, cancel, async {
                let mut requests = futures_util::stream::iter(groups.into_iter().map(|mut g| {
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
            }))
    }

    fn check_unchanged(&self, s: usize) -> Result<()> {
        let shard = &self.shards[s];
        let inner = &self.dir.inner;
        inner.net.head();
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

    fn network(&self) -> Option<NetworkStats> {
        Some(self.dir.inner.net.snapshot())
    }

    fn read_depth(&self) -> ReadDepth {
        ReadDepth::REMOTE
    }
}
