//! Reading shards from an object store: pinned identities, coalesced ranged GETs with many in
//! flight, bodies streamed into the caller's buffers (the module docs of `object` say how).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStoreExt};

use std::time::Duration;

use super::client::{error_chain, scrub, store_error};
use super::{COALESCE_GAP, Inner, MAX_REQUEST, ObjectDir};
use crate::error::{Error, Result};
use crate::store::{ShardIdentity, ShardStore};

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

/// Fetches the ranges of `dst` (sorted by offset, all within `start..end` where `start` is
/// the first offset) with one ranged GET, streaming the body into them. A body cut short is
/// fetched again (the whole request) within the retry count.
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
