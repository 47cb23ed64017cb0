//! Where a conversion's files go: a local directory, or a folder of an object store. The
//! converters write shards, the keyring and the manifest through [`Output`] and do not care
//! which. Local shards are written under a temporary name, their header overwritten once the
//! tags are known, fsynced and renamed; object shards are multipart uploads whose header part
//! is sent last (`store::ObjectShardUpload`). Either way the manifest is written last, so a
//! reader never takes a half-written dataset for a complete one.

#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::convert::{refuse_existing_dataset, remove_interrupted_conversion};
use super::{KEYRING_FILE, MANIFEST_FILE, random_suffix, sync_dir, write_atomic};
use crate::error::{Error, Result};
use crate::store::{ObjectDir, ObjectShardUpload};

/// A conversion's destination.
pub(crate) enum Output {
    Local(PathBuf),
    Object(ObjectDir),
}

/// One shard being written.
pub(crate) enum ShardOut {
    Local {
        w: BufWriter<File>,
        tmp: PathBuf,
        path: PathBuf,
    },
    Object(ObjectShardUpload),
}

/// `shard-NNNNN.safetensors`, `keyring.json`: the objects a conversion writes besides the
/// manifest (and which `--force` may remove when no manifest is there).
fn is_conversion_object(name: &str) -> bool {
    name == KEYRING_FILE
        || name
            .strip_prefix("shard-")
            .and_then(|n| n.strip_suffix(".safetensors"))
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

impl Output {
    /// `out_dir`, or the object store folder it names when written as a URL. Sends nothing.
    pub fn new(out_dir: &Path) -> Result<Self> {
        match crate::store::as_url(out_dir) {
            Some(url) => {
                // Reading, a URL naming a shard or manifest opens its folder; writing, it would
                // write beside the object named: refuse rather than guess.
                let last = url.trim_end_matches('/').rsplit('/').next().unwrap_or("");
                if !url.ends_with('/')
                    && (last.ends_with(".json") || last.ends_with(".safetensors"))
                {
                    return Err(Error::InvalidArgument(format!(
                        "--out {}: name the dataset's folder (ending in /), not an object in it",
                        crate::error::Untrusted(url)
                    )));
                }
                let dir = ObjectDir::open(url)?;
                dir.check_writable()?;
                Ok(Output::Object(dir))
            }
            None => Ok(Output::Local(out_dir.to_path_buf())),
        }
    }

    /// The destination, for messages.
    pub fn path(&self) -> PathBuf {
        match self {
            Output::Local(d) => d.clone(),
            Output::Object(o) => PathBuf::from(o.url()),
        }
    }

    /// Where `name` goes, for messages and for the cleanup list.
    pub fn name_of(&self, name: &str) -> PathBuf {
        match self {
            Output::Local(d) => d.join(name),
            Output::Object(o) => o.name_of(name),
        }
    }

    /// Checks (or creates) the destination: refuses one holding a dataset, or files a
    /// conversion would replace. With `replace_interrupted`, an interrupted conversion's
    /// leftovers are removed first (locally: shards whose header parses, keyrings that parse,
    /// temporary files; in an object store: `shard-N.safetensors` and `keyring.json` objects
    /// beside no manifest).
    pub fn prepare(&self, replace_interrupted: bool) -> Result<()> {
        match self {
            Output::Local(d) => {
                if replace_interrupted {
                    remove_interrupted_conversion(d)?;
                }
                refuse_existing_dataset(d)
            }
            Output::Object(o) => {
                let names = o.list_names()?;
                if names.iter().any(|n| n == MANIFEST_FILE) {
                    return Err(Error::InvalidArgument(format!(
                        "{} already holds a dataset ({MANIFEST_FILE}); choose an empty or new folder (a complete dataset is never replaced, not even with --force)",
                        crate::error::Untrusted(o.url())
                    )));
                }
                let ours: Vec<String> = names
                    .into_iter()
                    .filter(|n| is_conversion_object(n))
                    .collect();
                if ours.is_empty() {
                    return Ok(());
                }
                if replace_interrupted {
                    return o.delete_many(&ours);
                }
                Err(Error::InvalidArgument(format!(
                    "{} already holds {} object(s) a conversion would replace ({}), with no {MANIFEST_FILE}: an interrupted conversion's leftovers or someone else's objects; convert again with --force to remove them first, or choose another folder",
                    crate::error::Untrusted(o.url()),
                    ours.len(),
                    crate::error::Untrusted(&ours[..ours.len().min(3)].join(", "))
                )))
            }
        }
    }

    /// Starts shard `name`, `len` bytes long, whose 8-byte length and header (`placeholder`'s
    /// length; its content is replaced by [`ShardOut::finish`]) come first. Whatever it
    /// creates is listed in `cleanup`.
    pub fn create_shard(
        &self,
        name: &str,
        placeholder: &[u8],
        len: u64,
        cleanup: &mut Vec<PathBuf>,
    ) -> Result<ShardOut> {
        match self {
            Output::Local(d) => {
                let path = d.join(name);
                let tmp = d.join(format!("{name}.tmp-{}", random_suffix()?));
                let file = File::create_new(&tmp).map_err(|e| Error::io(&tmp, e))?;
                cleanup.push(tmp.clone());
                let mut w = BufWriter::with_capacity(1 << 20, file);
                let io = |e| Error::io(&tmp, e);
                w.write_all(&(placeholder.len() as u64).to_le_bytes())
                    .map_err(io)?;
                w.write_all(placeholder).map_err(io)?;
                Ok(ShardOut::Local { w, tmp, path })
            }
            Output::Object(o) => Ok(ShardOut::Object(o.create_upload(
                name,
                len,
                8 + placeholder.len() as u64,
            )?)),
        }
    }

    /// Writes the keyring (after every shard, before the manifest).
    pub fn write_keyring(&self, json: &[u8], cleanup: &mut Vec<PathBuf>) -> Result<()> {
        self.write_small(KEYRING_FILE, json, cleanup)
    }

    /// Writes the manifest: the dataset is complete once it is there.
    pub fn write_manifest(&self, json: &[u8]) -> Result<()> {
        self.write_small(MANIFEST_FILE, json, &mut Vec::new())?;
        if let Output::Local(d) = self {
            sync_dir(d);
        }
        Ok(())
    }

    fn write_small(&self, name: &str, bytes: &[u8], cleanup: &mut Vec<PathBuf>) -> Result<()> {
        let path = self.name_of(name);
        match self {
            Output::Local(_) => write_atomic(&path, bytes)?,
            Output::Object(o) => o.put_new(name, bytes.to_vec())?,
        }
        cleanup.push(path);
        Ok(())
    }

    /// Removes `paths` (what a failed conversion created; listed by the calls above). `Err`
    /// names what could not be removed.
    pub fn remove(&self, paths: &[PathBuf]) -> Result<()> {
        match self {
            Output::Local(_) => {
                for p in paths {
                    let _ = std::fs::remove_file(p);
                }
                Ok(())
            }
            Output::Object(o) => {
                let names: Vec<String> = paths
                    .iter()
                    .filter_map(|p| p.to_str()?.strip_prefix(o.url()).map(str::to_string))
                    .collect();
                o.delete_many(&names)
            }
        }
    }
}

impl ShardOut {
    /// The shard, for messages.
    pub fn name(&self) -> &Path {
        match self {
            ShardOut::Local { tmp, .. } => tmp,
            ShardOut::Object(u) => u.url(),
        }
    }

    /// Appends body bytes.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        match self {
            ShardOut::Local { w, tmp, .. } => w.write_all(bytes).map_err(|e| Error::io(&*tmp, e)),
            ShardOut::Object(u) => u.write(bytes),
        }
    }

    /// Puts the real `header` in place of the placeholder and makes the shard visible under
    /// its name (locally: fsynced and renamed; in a store: the upload completed), listed in
    /// `cleanup`.
    pub fn finish(self, header: &[u8], cleanup: &mut Vec<PathBuf>) -> Result<()> {
        match self {
            ShardOut::Local { w, tmp, path } => {
                let io = |e| Error::io(&tmp, e);
                let mut file = w.into_inner().map_err(|e| io(e.into_error()))?;
                file.seek(SeekFrom::Start(8)).map_err(io)?;
                file.write_all(header).map_err(io)?;
                file.sync_all().map_err(io)?;
                std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
                cleanup.push(path);
            }
            ShardOut::Object(u) => {
                let url = u.url().to_path_buf();
                u.finish(header)?;
                cleanup.push(url);
            }
        }
        Ok(())
    }
}
