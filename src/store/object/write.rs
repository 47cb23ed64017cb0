//! Writing into an object store folder (docs/STORAGE.md, "How it writes"): shards as multipart
//! uploads sent while they are sealed, small objects (keyring, manifest) as single puts with a
//! precondition, and the listing and removal that the refusal of a non-empty folder and the
//! cleanup of a failed conversion need.
//!
//! A shard starts with its length and header, and the header holds every chunk's tag, known
//! only once the last chunk is sealed. Local files write a placeholder and overwrite it; an
//! object cannot be overwritten in place, so part 0 of the upload (the header and the first
//! body bytes, a whole part) is held in memory and sent last: multipart parts may be sent in
//! any order and are assembled by their numbers. Every part but the last has the same size
//! (S3 wants at least 5 MiB, R2 equal sizes), and a few are in flight at once: memory is
//! about `PARTS_IN_FLIGHT + 2` parts per shard being written, whatever the shard's size.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::path::PathBuf;

use futures_util::StreamExt;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::{MultipartId, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use tokio::task::JoinHandle;

use super::client::store_error;
use super::{Inner, ObjectDir};
use crate::error::{Error, Result};

/// Parts of one shard being uploaded at once (besides the one being filled and part 0).
const PARTS_IN_FLIGHT: usize = 4;
/// S3's (and GCS's) most parts in one upload: larger shards get larger parts.
const MAX_PARTS: u64 = 10_000;

/// The version of an object that was read (its ETag, and its version id where the bucket
/// keeps versions): [`ObjectDir::put_if_unchanged`] replaces exactly that version or nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyringVersion(UpdateVersion);

impl ObjectDir {
    fn multipart_store(&self) -> Result<&std::sync::Arc<dyn MultipartStore>> {
        self.inner.multipart.as_ref().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: this store is read-only here (plain HTTP); write datasets to s3://, gs:// \
                 or az:// URLs, or to a local directory",
                crate::error::Untrusted(self.url())
            ))
        })
    }

    /// Refuses a store this build cannot write to (plain HTTP), before anything is sent.
    pub fn check_writable(&self) -> Result<()> {
        self.multipart_store().map(|_| ())
    }

    /// Names of the objects directly in the folder (not in folders under it), sorted.
    pub fn list_names(&self) -> Result<Vec<String>> {
        let inner = &self.inner;
        let url = PathBuf::from(self.url());
        let listed = inner.rt.block_on(async {
            inner
                .store
                .list_with_delimiter(Some(&inner.prefix))
                .await
                .map_err(|e| store_error(&url, e))
        })?;
        let mut names: Vec<String> = listed
            .objects
            .iter()
            .filter_map(|o| o.location.filename().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Writes the small object `name` (the keyring, the manifest) in one request, only if no
    /// object of that name exists yet where the store can tell (S3 and compatible stores that
    /// honour `If-None-Match`, GCS, Azure): two conversions into one folder cannot both
    /// complete.
    pub fn put_new(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        let (url, loc, inner) = (self.name_of(name), self.location(name), &self.inner);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        inner.rt.block_on(async {
            match inner.store.put_opts(&loc, bytes.into(), opts).await {
                Ok(_) => Ok(()),
                Err(object_store::Error::AlreadyExists { .. }) => Err(Error::io(
                    &url,
                    std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "the object appeared while this conversion ran (another conversion into \
                         the same folder?); nothing was replaced",
                    ),
                )),
                Err(e) => Err(store_error(&url, e)),
            }
        })
    }

    /// Reads the small object `name` as [`ObjectDir::read_small`] does, with the version read.
    pub fn read_versioned(
        &self,
        name: &str,
        what: &'static str,
        cap: u64,
    ) -> Result<(Vec<u8>, KeyringVersion)> {
        let (bytes, meta) = self.read_small_meta(name, what, cap)?;
        if meta.e_tag.is_none() && meta.version.is_none() {
            return Err(Error::io(
                self.name_of(name),
                std::io::Error::other(
                    "the store gave no ETag or version for this object, so it cannot be \
                     replaced conditionally; refusing to risk losing a concurrent change",
                ),
            ));
        }
        Ok((
            bytes,
            KeyringVersion(UpdateVersion {
                e_tag: meta.e_tag,
                version: meta.version,
            }),
        ))
    }

    /// Replaces `name` with `bytes` only if it is still the version `read` (S3: `If-Match`
    /// with its ETag). If it changed meanwhile, nothing is written and the error says so.
    pub fn put_if_unchanged(
        &self,
        name: &str,
        bytes: Vec<u8>,
        read: &KeyringVersion,
    ) -> Result<()> {
        let (url, loc, inner) = (self.name_of(name), self.location(name), &self.inner);
        let opts = PutOptions {
            mode: PutMode::Update(read.0.clone()),
            ..Default::default()
        };
        inner.rt.block_on(async {
            match inner.store.put_opts(&loc, bytes.into(), opts).await {
                Ok(_) => Ok(()),
                Err(object_store::Error::Precondition { .. })
                | Err(object_store::Error::NotFound { .. }) => Err(Error::io(
                    &url,
                    std::io::Error::other(
                        "the object changed since it was read (another rekey ran meanwhile?); \
                         nothing was written: run the command again",
                    ),
                )),
                Err(object_store::Error::NotImplemented { .. }) => Err(Error::io(
                    &url,
                    std::io::Error::other(
                        "this store is configured without conditional writes \
                         (AWS_CONDITIONAL_PUT=disabled?); refusing to replace the object \
                         unconditionally",
                    ),
                )),
                Err(e) => Err(store_error(&url, e)),
            }
        })
    }

    /// Starts writing the object `name`, `len` bytes whose first `head_len` (the shard's
    /// length and header) are given last, to [`ObjectShardUpload::finish`]. A shard that fits
    /// one part is sent with one put at the end; a larger one as a multipart upload, begun
    /// here. Dropped unfinished, the upload is aborted.
    pub fn create_upload(&self, name: &str, len: u64, head_len: u64) -> Result<ObjectShardUpload> {
        let mp = self.multipart_store()?.clone();
        let part_size = self
            .inner
            .settings
            .part_size
            .max(len.div_ceil(MAX_PARTS).next_multiple_of(1 << 20))
            .max(head_len.next_multiple_of(1 << 20));
        let (url, loc) = (self.name_of(name), self.location(name));
        let upload = if len > part_size {
            let inner = &self.inner;
            let id = inner.rt.block_on(async {
                mp.create_multipart(&loc)
                    .await
                    .map_err(|e| store_error(&url, e))
            })?;
            Some(id)
        } else {
            None
        };
        Ok(ObjectShardUpload {
            dir: self.clone(),
            mp,
            url,
            loc,
            len,
            head_len: head_len as usize,
            part_size: part_size as usize,
            first: Vec::new(),
            current: Vec::new(),
            sent: 0,
            upload,
            next_part: 1,
            in_flight: VecDeque::new(),
            parts: Vec::new(),
            done: false,
        })
    }
}

/// One shard being uploaded ([`ObjectDir::create_upload`]).
pub struct ObjectShardUpload {
    dir: ObjectDir,
    mp: std::sync::Arc<dyn MultipartStore>,
    url: PathBuf,
    loc: ObjectPath,
    len: u64,
    head_len: usize,
    part_size: usize,
    /// The body bytes of part 0 (sent last, behind the header).
    first: Vec<u8>,
    /// The part being filled.
    current: Vec<u8>,
    /// Body bytes given so far.
    sent: u64,
    /// `None`: the whole object is one part, sent with one put by `finish`.
    upload: Option<MultipartId>,
    next_part: usize,
    in_flight: VecDeque<JoinHandle<object_store::Result<(usize, PartId)>>>,
    /// Each sent part's id, by part number.
    parts: Vec<Option<PartId>>,
    done: bool,
}

// By hand: holds the client.
impl std::fmt::Debug for ObjectShardUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectShardUpload")
            .field("url", &self.url)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl ObjectShardUpload {
    /// The object's URL, for messages.
    pub fn url(&self) -> &std::path::Path {
        &self.url
    }

    /// Appends body bytes (everything after the header), sending each part once full.
    pub fn write(&mut self, mut bytes: &[u8]) -> Result<()> {
        self.sent += bytes.len() as u64;
        if self.head_len as u64 + self.sent > self.len {
            return Err(Error::io(
                &self.url,
                std::io::Error::other("more bytes written than the shard's length (a bug)"),
            ));
        }
        let first_cap = self.part_size - self.head_len;
        if self.first.len() < first_cap {
            let take = bytes.len().min(first_cap - self.first.len());
            self.first.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
        }
        while !bytes.is_empty() {
            if self.current.capacity() == 0 {
                self.current.reserve_exact(self.part_size);
            }
            let take = bytes.len().min(self.part_size - self.current.len());
            self.current.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.current.len() == self.part_size {
                let part = std::mem::take(&mut self.current);
                self.send(part)?;
            }
        }
        Ok(())
    }

    /// Sends the next part, waiting first for the oldest if too many are in flight.
    fn send(&mut self, data: Vec<u8>) -> Result<()> {
        let Some(id) = self.upload.clone() else {
            return Err(Error::io(
                &self.url,
                std::io::Error::other("a one-part shard outgrew its part (a bug)"),
            ));
        };
        while self.in_flight.len() >= PARTS_IN_FLIGHT {
            self.wait_oldest()?;
        }
        let idx = self.next_part;
        self.next_part += 1;
        self.spawn_part(id, idx, data);
        Ok(())
    }

    fn spawn_part(&mut self, id: MultipartId, idx: usize, data: Vec<u8>) {
        let (mp, loc) = (self.mp.clone(), self.loc.clone());
        self.in_flight
            .push_back(self.dir.inner.rt.spawn(async move {
                let part = mp.put_part(&loc, &id, idx, PutPayload::from(data)).await?;
                Ok((idx, part))
            }));
    }

    fn wait_oldest(&mut self) -> Result<()> {
        let Some(h) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let (idx, part) = self
            .dir
            .inner
            .rt
            .block_on(h)
            .map_err(|e| {
                Error::io(
                    &self.url,
                    std::io::Error::other(format!("a part upload task failed: {e}")),
                )
            })?
            .map_err(|e| store_error(&self.url, e))?;
        if self.parts.len() <= idx {
            self.parts.resize(idx + 1, None);
        }
        self.parts[idx] = Some(part);
        Ok(())
    }

    /// Sends part 0 (the 8-byte header length, `header` and the first body bytes), waits for
    /// every part and completes the upload: only then does the object exist.
    pub fn finish(mut self, header: &[u8]) -> Result<()> {
        if 8 + header.len() != self.head_len || self.head_len as u64 + self.sent != self.len {
            return Err(Error::io(
                &self.url,
                std::io::Error::other(
                    "the shard's header or body length differs from the one announced (a bug)",
                ),
            ));
        }
        let mut head = Vec::with_capacity(self.head_len + self.first.len());
        head.extend_from_slice(&(header.len() as u64).to_le_bytes());
        head.extend_from_slice(header);
        head.append(&mut self.first);
        let Some(id) = self.upload.clone() else {
            let inner: &Inner = &self.dir.inner;
            let (store, loc, url) = (&inner.store, &self.loc, &self.url);
            inner.rt.block_on(async {
                store
                    .put(loc, head.into())
                    .await
                    .map_err(|e| store_error(url, e))
            })?;
            self.done = true;
            return Ok(());
        };
        if !self.current.is_empty() {
            let last = std::mem::take(&mut self.current);
            self.send(last)?;
        }
        self.spawn_part(id.clone(), 0, head);
        while !self.in_flight.is_empty() {
            self.wait_oldest()?;
        }
        let parts: Vec<PartId> = self
            .parts
            .iter()
            .cloned()
            .collect::<Option<_>>()
            .filter(|p: &Vec<PartId>| p.len() == self.next_part)
            .ok_or_else(|| {
                Error::io(
                    &self.url,
                    std::io::Error::other("a part of the upload is missing (a bug)"),
                )
            })?;
        let (mp, loc, url) = (&self.mp, &self.loc, &self.url);
        self.dir.inner.rt.block_on(async {
            mp.complete_multipart(loc, &id, parts)
                .await
                .map_err(|e| store_error(url, e))
        })?;
        self.done = true;
        Ok(())
    }

    /// Aborts an unfinished upload: parts in flight are cancelled and the store told to drop
    /// the parts it holds. `Err` names the upload if the store could not be told (its parts
    /// then stay, invisible, until the bucket's lifecycle rule removes them).
    pub fn abort(mut self) -> Result<()> {
        self.abort_now()
    }

    fn abort_now(&mut self) -> Result<()> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        for h in self.in_flight.drain(..) {
            h.abort();
        }
        let Some(id) = self.upload.take() else {
            return Ok(());
        };
        let (mp, loc, url) = (&self.mp, &self.loc, &self.url);
        self.dir.inner.rt.block_on(async {
            mp.abort_multipart(loc, &id).await.map_err(|e| {
                let e = store_error(url, e);
                Error::io(
                    url,
                    std::io::Error::other(format!(
                        "could not abort the multipart upload (its parts stay, invisible, until \
                         the bucket's lifecycle rule for incomplete uploads removes them): {e}"
                    )),
                )
            })
        })
    }
}

impl Drop for ObjectShardUpload {
    fn drop(&mut self) {
        // Best effort; [`ObjectShardUpload::abort`] reports a failure.
        let _ = self.abort_now();
    }
}

/// Deletes every object of `names` in `dir`, many at a time; the names that could not be
/// deleted, with the cause.
pub(super) fn delete_all(dir: &ObjectDir, names: &[String]) -> Vec<String> {
    let inner = &dir.inner;
    inner.rt.block_on(async {
        futures_util::stream::iter(names.iter().map(|name| async move {
            let (url, loc) = (dir.name_of(name), dir.location(name));
            match inner.store.delete(&loc).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => Some(store_error(&url, e).to_string()),
            }
        }))
        .buffer_unordered(inner.settings.in_flight)
        .filter_map(|r| async move { r })
        .collect()
        .await
    })
}

impl ObjectDir {
    /// Deletes the objects `names` (best effort, many at once); `Err` lists those left.
    pub fn delete_many(&self, names: &[String]) -> Result<()> {
        let failed = delete_all(self, names);
        if failed.is_empty() {
            return Ok(());
        }
        Err(Error::io(
            PathBuf::from(self.url()),
            std::io::Error::other(format!(
                "could not delete {} object(s): {}",
                failed.len(),
                failed.join("; ")
            )),
        ))
    }
}
