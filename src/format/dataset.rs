//! A dataset directory: open (no key), unlock (with a key), verify, rekey, decrypt.

#![forbid(unsafe_code)]

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::{
    Column, DatasetKind, KEYRING_FILE, Keyring, Layout, MANIFEST_FILE, MAX_JSON_FILE_LEN, Manifest,
    ShardHeader, read_bounded, sync_dir, tensor_bytes, write_atomic,
};
use crate::cipher::cpu::CpuCipher;
use crate::cipher::{ChunkOpener, Cipher};
use crate::error::{Error, Result};
use crate::keys::{DataKey, MasterKey};
use crate::store::{CachedStore, LocalStore, OpenOptions, ShardStore};

/// A dataset directory whose manifest, keyring and shard headers parse and agree with each
/// other (docs/FORMAT.md section 5). Nothing is authenticated until [`Dataset::unlock`].
#[derive(Debug, Clone)]
pub struct Dataset {
    dir: PathBuf,
    manifest: Manifest,
    /// Shared, not copied, by the unlocked datasets made from this one (a keyring and the
    /// headers' tag lists can be tens of MB).
    keyring: Arc<Keyring>,
    shards: Arc<[ShardHeader]>,
    /// Where the shards' bytes are read from (headers included).
    store: Arc<dyn ShardStore>,
}

fn mismatch(path: &Path, what: String) -> Error {
    Error::HeaderIntegrity {
        path: path.into(),
        what: format!(
            "manifest/shard mismatch: {what} (a dataset file was modified, replaced or taken \
             from another dataset)"
        ),
    }
}

/// The error for a path that is no dataset (no manifest where one would be): it names the
/// path and says what a dataset is, rather than "manifest.json: No such file".
fn not_a_dataset(path: &Path, is_dir: bool, dir: &Path) -> Error {
    let where_ = if is_dir {
        "it holds no manifest.json".to_string()
    } else {
        format!(
            "no manifest.json beside it in {}/",
            crate::error::Untrusted(dir.display())
        )
    };
    Error::io(
        path,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "not a ciphershard dataset: {where_} (a dataset is a directory written by \
                 `ciphershard convert`: manifest.json, keyring.json and shard-NNNNN.safetensors \
                 files; name that directory or one of its shards)"
            ),
        ),
    )
}

/// A dataset's rows are bounded by its data only if some column's rows hold bytes (a dataset
/// of zero-width columns, which `convert` never writes, could claim 2^64 rows, and every plan
/// is sized by rows); and one row of each column must have a size that fits 64 bits.
fn check_row_sizes(mpath: &Path, manifest: &Manifest) -> Result<()> {
    let mut widest = 0u64;
    for c in &manifest.columns {
        let bytes = tensor_bytes(c.dtype, &c.shape).ok_or_else(|| {
            Error::format(
                mpath,
                "manifest",
                format!(
                    "column '{}': one row of shape {:?} is more than 2^64-1 bytes",
                    c.name, c.shape
                ),
            )
        })?;
        widest = widest.max(bytes);
    }
    // A ragged column's rows hold at least their 8-byte row offset.
    if widest == 0 && !manifest.columns.iter().any(|c| c.ragged) {
        return Err(Error::format(
            mpath,
            "manifest",
            format!(
                "every column has zero-byte rows ({} rows): a dataset needs at least one column \
                 whose rows hold data",
                manifest.rows
            ),
        ));
    }
    Ok(())
}

/// The error for a directory holding a conversion's leftovers but no manifest, if `dir` is one.
fn interrupted_conversion(dir: &Path, mpath: &Path) -> Option<Error> {
    let found = super::convert::scan_out_dir(dir).ok()?;
    if found.leftovers.is_empty() {
        return None;
    }
    // A conversion writes its keyring just before its manifest: with the keyring there, the
    // manifest may as well have been deleted from a complete dataset.
    let keyring_left = found.leftovers.iter().any(|p| p.ends_with(KEYRING_FILE));
    let what = if keyring_left {
        "a dataset whose manifest was deleted, or an interrupted conversion that stopped just before writing it"
    } else {
        "an interrupted conversion"
    };
    Some(Error::io(
        mpath,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "no such file: {} is {what} (left: {}); to convert again into \
                 it, run the same `ciphershard convert` with --force, which removes these files \
                 (the data encrypted in them is then gone)",
                crate::error::Untrusted(dir.display()),
                found.leftover_names(),
            ),
        ),
    ))
}

impl Dataset {
    /// Opens a dataset directory, or the directory of a shard file. Parses the manifest, the
    /// keyring and every shard header and cross-checks them.
    ///
    /// A path written as a URL (`s3://bucket/prefix/`, `gs://…`, `az://…`, `https://…`;
    /// [`crate::store::as_url`]) opens the dataset in that object store folder
    /// (docs/STORAGE.md).
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, &OpenOptions::default())
    }

    /// [`Dataset::open`] with `opts`: object-store settings over the environment's. Settings
    /// given for a local path are refused (they would be silently ignored).
    pub fn open_with(path: &Path, opts: &OpenOptions) -> Result<Self> {
        if let Some(url) = crate::store::as_url(path) {
            return Self::open_url(url, opts);
        }
        if opts.has_storage() {
            return Err(Error::InvalidArgument(format!(
                "{}: storage options apply to object-store URLs (s3://, gs://, az://, https://), \
                 not to a local path",
                path.display()
            )));
        }
        // The environment's cache ($CIPHERSHARD_CACHE_DIR) is for URLs alone; one asked for
        // in code is refused here rather than ignored.
        if opts.has_cache() {
            return Err(Error::InvalidArgument(format!(
                "{}: the ciphertext cache applies to object-store URLs (s3://, gs://, az://, \
                 https://); a local dataset is read from its own files",
                path.display()
            )));
        }
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let dir = if meta.is_dir() {
            path.to_path_buf()
        } else {
            path.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf()
        };
        let mpath = dir.join(MANIFEST_FILE);
        let bytes = read_bounded(&mpath, "manifest", MAX_JSON_FILE_LEN).map_err(|e| match e {
            Error::Io { source, .. }
                if source.kind() == std::io::ErrorKind::NotFound && !mpath.exists() =>
            {
                interrupted_conversion(&dir, &mpath)
                    .unwrap_or_else(|| not_a_dataset(path, meta.is_dir(), &dir))
            }
            e => e,
        })?;
        let manifest = Manifest::parse(&mpath, &bytes)?;
        let kpath = dir.join(KEYRING_FILE);
        let read_keyring = || read_bounded(&kpath, "keyring", MAX_JSON_FILE_LEN);
        let open_store = |m: &Manifest| -> Result<Arc<dyn ShardStore>> {
            Ok(Arc::new(LocalStore::open(
                m.shards.iter().map(|e| dir.join(&e.file)),
            )?))
        };
        Self::assemble(
            dir.clone(),
            mpath,
            manifest,
            kpath.clone(),
            read_keyring,
            open_store,
        )
    }

    /// Opens the dataset in the object store folder `url`: the manifest and keyring are read
    /// whole (size-capped as local ones are), every shard is pinned (size, ETag) with one HEAD
    /// and its header read with ranged GETs.
    fn open_url(url: &str, opts: &OpenOptions) -> Result<Self> {
        let folder = crate::store::ObjectDir::open_with(url, opts)?;
        let dir = PathBuf::from(folder.url());
        let mpath = folder.name_of(MANIFEST_FILE);
        let bytes = folder
            .read_small(MANIFEST_FILE, "manifest", MAX_JSON_FILE_LEN)
            .map_err(|e| match e {
                Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                    Error::io(
                        &mpath,
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            format!(
                                "not a ciphershard dataset: no {MANIFEST_FILE} in {} (a dataset \
                                 is a folder written by `ciphershard convert`: {MANIFEST_FILE}, \
                                 {KEYRING_FILE} and shard-NNNNN.safetensors objects)",
                                crate::error::Untrusted(folder.url())
                            ),
                        ),
                    )
                }
                e => e,
            })?;
        let manifest = Manifest::parse(&mpath, &bytes)?;
        let kpath = folder.name_of(KEYRING_FILE);
        let read_keyring = || folder.read_small(KEYRING_FILE, "keyring", MAX_JSON_FILE_LEN);
        let cache = opts.cache_settings()?;
        let open_store = |m: &Manifest| -> Result<Arc<dyn ShardStore>> {
            let names: Vec<String> = m.shards.iter().map(|e| e.file.clone()).collect();
            Ok(Arc::new(folder.shards(&names)?))
        };
        let mut ds = Self::assemble(dir, mpath, manifest, kpath, read_keyring, open_store)?;
        // After the headers: they are read with one small request each, which a cache would
        // round out to a whole block of every shard (`inspect` and a rank reading a few
        // shards would fetch far more than they read).
        if let Some(c) = cache {
            ds.store = Arc::new(CachedStore::open(
                ds.store.clone(),
                &c,
                &ds.manifest.dataset_id,
            )?);
        }
        Ok(ds)
    }

    /// The rest of [`Dataset::open`], wherever the files are: parses the keyring, opens the
    /// shard store, reads every header and cross-checks them all.
    fn assemble(
        dir: PathBuf,
        mpath: PathBuf,
        manifest: Manifest,
        kpath: PathBuf,
        read_keyring: impl FnOnce() -> Result<Vec<u8>>,
        open_store: impl FnOnce(&Manifest) -> Result<Arc<dyn ShardStore>>,
    ) -> Result<Self> {
        if manifest.kind == DatasetKind::Dataset {
            check_row_sizes(&mpath, &manifest)?;
        }
        let keyring = Keyring::parse(&kpath, &read_keyring()?)?;
        if keyring.dataset_id != manifest.dataset_id {
            // Either file may be the edited one: name both ids, blame neither.
            return Err(Error::HeaderIntegrity {
                path: kpath,
                what: format!(
                    "{KEYRING_FILE}/{MANIFEST_FILE} mismatch: the keyring is for dataset {}, the \
                     manifest says {} (one of them was modified, replaced or taken from another \
                     dataset)",
                    hex::encode(keyring.dataset_id),
                    hex::encode(manifest.dataset_id)
                ),
            });
        }
        for w in &keyring.wraps {
            if w.data_keys.len() != manifest.shards.len() {
                return Err(Error::format(
                    &kpath,
                    "keyring",
                    format!(
                        "key {} wraps {} data keys for {} shards",
                        w.key_id,
                        w.data_keys.len(),
                        manifest.shards.len()
                    ),
                ));
            }
        }
        let store = open_store(&manifest)?;
        let mut shards = Vec::with_capacity(manifest.shards.len());
        let mut next_row = 0u64;
        let tensor_count: usize = manifest.columns.iter().map(Column::tensor_count).sum();
        for (i, entry) in manifest.shards.iter().enumerate() {
            let spath = store.name(i).to_path_buf();
            let h = ShardHeader::read_from_vouched(store.as_ref(), i, &entry.header_digest)?;
            let d = &h.descriptor;
            let check = |ok: bool, what: &str| {
                if ok {
                    Ok(())
                } else {
                    Err(mismatch(&spath, what.to_string()))
                }
            };
            check(
                d.dataset_id == manifest.dataset_id,
                "the shard belongs to another dataset",
            )?;
            check(
                d.shard_index as usize == i,
                &format!(
                    "shard holds index {}, manifest lists it as {i}",
                    d.shard_index
                ),
            )?;
            check(
                d.shard_count as usize == manifest.shards.len(),
                &format!(
                    "shard says the dataset has {} shards, manifest lists {}",
                    d.shard_count,
                    manifest.shards.len()
                ),
            )?;
            check(
                h.digest == entry.header_digest,
                "header digest differs from the manifest's",
            )?;
            check(
                h.file_len == entry.bytes,
                &format!(
                    "file is {} bytes, manifest says {}",
                    h.file_len, entry.bytes
                ),
            )?;
            check(
                d.row_start == entry.row_start && d.rows == entry.rows,
                "row range differs from the manifest's",
            )?;
            check(
                d.chunk_size == manifest.chunk_size,
                "chunk size differs from the manifest's",
            )?;
            check(
                d.version == manifest.version,
                &format!(
                    "shard is format version {}, manifest version {}",
                    d.version, manifest.version
                ),
            )?;
            check(
                d.tensors.len() == tensor_count,
                "tensor count differs from the manifest's columns",
            )?;
            // Each column is one tensor, or a ragged one two (values, then row offsets,
            // whose form the descriptor's parser checked): the column's tensor is the first.
            let mut tensors = d.tensors.iter();
            for c in &manifest.columns {
                let t = tensors.next().expect("tensor count checked");
                if c.ragged {
                    tensors.next();
                }
                let want_layout = if c.ragged {
                    Layout::Ragged
                } else {
                    Layout::Fixed
                };
                let shape_ok = match manifest.kind {
                    DatasetKind::Dataset if c.ragged => t.shape[1..] == c.shape[..],
                    DatasetKind::Dataset => {
                        t.shape.first() == Some(&d.rows) && t.shape[1..] == c.shape[..]
                    }
                    DatasetKind::Tensors => t.shape == c.shape,
                };
                check(
                    t.name == c.name
                        && t.dtype == c.dtype
                        && t.encrypted == c.encrypted
                        && t.layout == want_layout
                        && shape_ok,
                    &format!("tensor '{}' differs from column '{}'", t.name, c.name),
                )?;
            }
            match manifest.kind {
                DatasetKind::Dataset => check(
                    d.row_start == next_row,
                    "rows are not contiguous across shards",
                )?,
                DatasetKind::Tensors => check(
                    manifest.shards.len() == 1 && d.rows == 0 && d.row_start == 0,
                    "a 'tensors' dataset is one shard without rows",
                )?,
            }
            // Row counts come from the files: their sum is checked, never wrapped.
            next_row = next_row.checked_add(d.rows).ok_or_else(|| {
                mismatch(
                    &spath,
                    "rows overflow: the shards hold more than 2^64-1 rows in all".into(),
                )
            })?;
            shards.push(h);
        }
        if next_row != manifest.rows {
            return Err(mismatch(
                &mpath,
                format!(
                    "shards hold {next_row} rows, manifest says {}",
                    manifest.rows
                ),
            ));
        }
        Ok(Dataset {
            dir,
            manifest,
            keyring: Arc::new(keyring),
            shards: shards.into(),
            store,
        })
    }

    /// The dataset directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    /// Every shard header, in index order.
    pub fn shards(&self) -> &[ShardHeader] {
        &self.shards
    }
    /// The keyring.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }
    /// Where the shards' bytes are read from.
    pub fn store(&self) -> &Arc<dyn ShardStore> {
        &self.store
    }

    /// Unwraps every data key (the only place a dataset's keys are unwrapped), prepares an
    /// opener per shard on `cipher` and verifies every header tag. The unwrapped keys stay in
    /// the result (zeroized when it is dropped) for backends that prepare their own key
    /// material from them ([`UnlockedDataset::data_key`]).
    pub fn unlock(&self, key: &MasterKey, cipher: &dyn Cipher) -> Result<UnlockedDataset> {
        let data_keys = (0..self.shards.len())
            .map(|i| self.keyring.unwrap(key, i))
            .collect::<Result<Vec<DataKey>>>()?;
        let mut openers = Vec::with_capacity(data_keys.len());
        for (h, dk) in self.shards.iter().zip(&data_keys) {
            let opener = cipher.prepare(dk)?;
            h.verify_header_tag(opener.as_ref())?;
            openers.push(opener);
        }
        Ok(UnlockedDataset {
            dataset: self.clone(),
            data_keys,
            openers,
        })
    }
}

/// A dataset whose data keys are unwrapped and whose headers are authenticated.
pub struct UnlockedDataset {
    dataset: Dataset,
    /// Zeroized on drop (`DataKey`).
    data_keys: Vec<DataKey>,
    openers: Vec<Box<dyn ChunkOpener>>,
}

impl std::fmt::Debug for UnlockedDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnlockedDataset")
            .field("dir", &self.dataset.dir)
            .field("openers", &"<redacted>")
            .finish()
    }
}

impl UnlockedDataset {
    /// The opener (prepared data key) of shard `shard`.
    pub fn opener(&self, shard: usize) -> &dyn ChunkOpener {
        self.openers[shard].as_ref()
    }
    /// The unwrapped data key of shard `shard`, for a backend that prepares its own key
    /// material (a GPU batch engine).
    pub fn data_key(&self, shard: usize) -> &DataKey {
        &self.data_keys[shard]
    }
    /// The dataset.
    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }
}

/// What [`verify`] checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VerifySummary {
    /// Shards checked.
    pub shards: usize,
    /// Chunk tags checked.
    pub chunks: u64,
    /// Bytes of tensor data checked.
    pub bytes: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Checks every chunk tag of every shard; the first failure is [`Error::Integrity`] naming the
/// shard, tensor and chunk.
pub fn verify(ds: &UnlockedDataset, progress: &mut dyn FnMut(u64, u64)) -> Result<VerifySummary> {
    let start = Instant::now();
    // Only a progress total: saturating rather than checked (each term is a file's length).
    let total: u64 = ds
        .dataset
        .shards
        .iter()
        .fold(0u64, |a, h| a.saturating_add(h.descriptor.data_len()));
    let (mut done, mut chunks) = (0u64, 0u64);
    let mut scratch = zeroize::Zeroizing::new(Vec::new());
    for (i, h) in ds.dataset.shards.iter().enumerate() {
        let store = ds.dataset.store();
        store.check_unchanged(i)?;
        for t in 0..h.descriptor.tensors.len() as u32 {
            for c in h.chunks(t) {
                scratch.resize(c.len, 0);
                store.read_at(i, c.file_offset, &mut scratch)?;
                ds.opener(i)
                    .verify(&c.params(), &scratch)
                    .map_err(|e| e.at(|| h.chunk_location(&c)))?;
                done += c.len as u64;
                chunks += 1;
                progress(done, total);
            }
            // A ragged column's offsets must also describe its values: checked once its tags
            // (values and offsets) are.
            if h.descriptor.tensors[t as usize].layout == Layout::RowOffsets {
                super::read_row_offsets(ds, i, t - 1)?;
            }
        }
    }
    Ok(VerifySummary {
        shards: ds.dataset.shards.len(),
        chunks,
        bytes: done,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Writes shard `shard` as a plain safetensors file at `out` (explicit export: the only place
/// ciphershard writes plaintext). Every chunk is verified before its bytes are written. The
/// file is written under a temporary name created with mode 0600 and never replaced or
/// reused, then published under `out` without replacing anything (a file that appears at
/// `out` meanwhile is left alone and the export fails); on any failure the temporary file is
/// removed. The user metadata is kept as `__metadata__`. See [`decrypt_shard_with`].
pub fn decrypt_shard(ds: &UnlockedDataset, shard: usize, out: &Path) -> Result<()> {
    decrypt_shard_with(ds, shard, out, &mut || Ok(()))
}

/// [`decrypt_shard`], calling `checkpoint` before each chunk and before publishing: an error
/// it returns stops the export, removes the temporary file and is returned. The CLI stops on
/// SIGINT, SIGTERM and SIGHUP this way.
pub fn decrypt_shard_with(
    ds: &UnlockedDataset,
    shard: usize,
    out: &Path,
    checkpoint: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    let h = shard_of(ds, shard)?;
    // An early, friendly refusal; the publish below refuses again, atomically.
    if out.symlink_metadata().is_ok() {
        return Err(refuse_overwrite(out));
    }
    let (dir, tmp_name) = super::temp_beside(out)?;
    ds.dataset.store().check_unchanged(shard)?;
    let mut tmp = PrivateTemp::create(tmp_name)?;
    let tmp_path = tmp.path.clone();
    let mut w = std::io::BufWriter::with_capacity(1 << 20, &tmp.file);
    write_plaintext(ds, shard, h, &mut w, &tmp_path, checkpoint)?;
    drop(w);
    tmp.file.sync_all().map_err(|e| Error::io(&tmp_path, e))?;
    checkpoint()?;
    tmp.publish(out)?;
    sync_dir(dir);
    Ok(())
}

/// [`decrypt_shard_with`] into a stream (`ciphershard decrypt --out -`: standard output), not
/// a file; `name` names it in errors. Each chunk is authenticated before its plaintext is
/// written, so only authenticated bytes are ever written; but what was written before an
/// error (a later chunk that fails, a checkpoint's stop) stays written: the output is then
/// incomplete, and the error says so.
pub fn decrypt_shard_to(
    ds: &UnlockedDataset,
    shard: usize,
    w: &mut dyn Write,
    name: &Path,
    checkpoint: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    let h = shard_of(ds, shard)?;
    ds.dataset.store().check_unchanged(shard)?;
    write_plaintext(ds, shard, h, w, name, checkpoint)
}

fn shard_of(ds: &UnlockedDataset, shard: usize) -> Result<&ShardHeader> {
    ds.dataset.shards.get(shard).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "shard {shard} does not exist (the dataset has {})",
            ds.dataset.shards.len()
        ))
    })
}

/// Writes shard `shard` (header `h`) as a plaintext safetensors file into `w` (named `name`
/// in errors), calling `checkpoint` before each chunk, and flushes it.
fn write_plaintext(
    ds: &UnlockedDataset,
    shard: usize,
    h: &ShardHeader,
    w: &mut dyn Write,
    name: &Path,
    checkpoint: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    let d = &h.descriptor;
    let mut header = String::from("{");
    if !d.metadata.is_empty() {
        header.push_str("\"__metadata__\":");
        header.push_str(&serde_json::to_string(&d.metadata).expect("metadata serializes"));
        header.push(',');
    }
    for (i, t) in d.tensors.iter().enumerate() {
        if i > 0 {
            header.push(',');
        }
        let entry = serde_json::json!({"dtype": t.dtype.as_str(), "shape": t.shape, "data_offsets": [t.offsets.0, t.offsets.1]});
        header.push_str(&serde_json::to_string(&t.name).expect("name serializes"));
        header.push(':');
        header.push_str(&entry.to_string());
    }
    header.push('}');
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    // Ragged columns' offsets are checked before a byte is written: an export whose offsets
    // do not describe its values would mislead whoever reads it.
    for (t, tensor) in d.tensors.iter().enumerate() {
        if tensor.layout == Layout::Ragged {
            super::read_row_offsets(ds, shard, t as u32)?;
        }
    }
    let store = ds.dataset.store();
    let io = |e| Error::io(name, e);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(header.as_bytes()).map_err(io)?;
    let mut buf = zeroize::Zeroizing::new(Vec::new());
    for t in 0..d.tensors.len() as u32 {
        for c in h.chunks(t) {
            checkpoint()?;
            buf.resize(c.len, 0);
            store.read_at(shard, c.file_offset, &mut buf)?;
            ds.opener(shard)
                .open_in_place(&c.params(), &mut buf)
                .map_err(|e| e.at(|| h.chunk_location(&c)))?;
            w.write_all(&buf).map_err(io)?;
        }
    }
    w.flush().map_err(io)
}

fn refuse_overwrite(out: &Path) -> Error {
    Error::io(
        out,
        std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "refusing to overwrite an existing file",
        ),
    )
}

/// A new file only its owner can read (mode 0600, created exclusively: never an existing file
/// or a link planted at its name), removed when dropped unless published: on an error, a
/// panic, or a signal the CLI turns into an error.
struct PrivateTemp {
    path: PathBuf,
    file: File,
    published: bool,
}

impl PrivateTemp {
    fn create(path: PathBuf) -> Result<Self> {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let file = opts.open(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Self {
            path,
            file,
            published: false,
        })
    }

    /// Gives the file the name `out` instead of its own, failing with `AlreadyExists` (and leaving `out` alone)
    /// when something already has that name: `renameat2(RENAME_NOREPLACE)` on Linux; where the
    /// file system does not support it (or elsewhere), a hard link, which fails the same way,
    /// then the temporary name is removed.
    fn publish(&mut self, out: &Path) -> Result<()> {
        let already = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                refuse_overwrite(out)
            } else {
                Error::io(out, e)
            }
        };
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            use rustix::fs::{CWD, RenameFlags, renameat_with};
            use rustix::io::Errno;
            match renameat_with(CWD, &self.path, CWD, out, RenameFlags::NOREPLACE) {
                Ok(()) => {
                    self.published = true;
                    return Ok(());
                }
                // The file system (or an old kernel) lacks RENAME_NOREPLACE: link instead.
                Err(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {}
                Err(e) => return Err(already(e.into())),
            }
        }
        std::fs::hard_link(&self.path, out).map_err(already)?;
        // On failure `drop` tries once more.
        std::fs::remove_file(&self.path).map_err(|e| {
            Error::io(
                &self.path,
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "exported to {} but could not remove this second name of the plaintext: {e}",
                        out.display()
                    ),
                ),
            )
        })?;
        self.published = true;
        Ok(())
    }
}

impl Drop for PrivateTemp {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Unwraps every data key with `key` and checks it against the shard header tags (so a
/// rewrap never propagates a corrupt key).
fn checked_data_keys(ds: &Dataset, key: &MasterKey) -> Result<Vec<DataKey>> {
    Ok(ds.unlock(key, &CpuCipher::new())?.data_keys)
}

/// What [`rekey`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RekeySummary {
    /// The new key was already in the keyring: its wraps were rewritten where they were (never
    /// listed twice), so the dataset now opens with one key fewer.
    pub new_key_was_present: bool,
    /// Ids of the master keys that open the dataset now, in keyring order.
    pub key_ids: Vec<String>,
}

/// Rotates a master key: rewraps every data key from `old` to `new` and replaces
/// keyring.json atomically. No shard byte changes; until the rename, `old` still opens it.
/// Every other key keeps opening the dataset; a `new` key that is already in the keyring is
/// not listed twice (the result: `old` removed, see [`RekeySummary::new_key_was_present`]).
///
/// In an object store the keyring is replaced with a conditional write: only if it is still
/// the version read (its ETag), so two concurrent rekeys cannot silently lose one; the one
/// that comes second fails, writing nothing, and says to run it again.
pub fn rekey(dir: &Path, old: &MasterKey, new: &MasterKey) -> Result<RekeySummary> {
    rekey_with(dir, old, new, &mut || Ok(()))
}

/// [`rekey`], with `before_write` called once the new keyring is made, just before it is
/// written: an error it returns stops the rekey. Lets a test change the keyring in between.
pub fn rekey_with(
    dir: &Path,
    old: &MasterKey,
    new: &MasterKey,
    before_write: &mut dyn FnMut() -> Result<()>,
) -> Result<RekeySummary> {
    if old.id() == new.id() {
        return Err(Error::InvalidArgument("the new key is the old key".into()));
    }
    update_keyring(dir, before_write, |ds, ring| {
        let keys = checked_data_keys(ds, old)?;
        // An object store's keyring is read apart from the dataset: it may have lost `old`
        // since (a concurrent rekey); never add a key on the strength of a removed one.
        if !ring.wraps.iter().any(|w| w.key_id == old.id()) {
            return Err(keyring_changed(ring.path()));
        }
        let new_key_was_present = ring.wraps.iter().any(|w| w.key_id == new.id());
        ring.wraps.retain(|w| w.key_id != old.id());
        ring.set_wraps(new, &keys)?;
        Ok(RekeySummary {
            new_key_was_present,
            key_ids: ring.key_ids(),
        })
    })
}

/// Opens the dataset in `dir`, lets `change` edit its keyring, and writes the keyring back:
/// atomically (a rename) for a local directory; for an object store only if the keyring is
/// still the version that was read, which is read first (the edit starts from those bytes).
fn update_keyring<T>(
    dir: &Path,
    before_write: &mut dyn FnMut() -> Result<()>,
    change: impl FnOnce(&Dataset, &mut Keyring) -> Result<T>,
) -> Result<T> {
    let Some(url) = crate::store::as_url(dir) else {
        let ds = Dataset::open(dir)?;
        let mut ring = Keyring::clone(&ds.keyring);
        let out = change(&ds, &mut ring)?;
        before_write()?;
        write_atomic(&ds.dir.join(KEYRING_FILE), ring.to_json().as_bytes())?;
        return Ok(out);
    };
    let folder = crate::store::ObjectDir::open(url)?;
    folder.check_writable()?;
    let (bytes, version) = folder.read_versioned(KEYRING_FILE, "keyring", MAX_JSON_FILE_LEN)?;
    let ds = Dataset::open(dir)?;
    let mut ring = Keyring::parse(ds.keyring.path(), &bytes)?;
    if ring.dataset_id != ds.manifest.dataset_id {
        return Err(keyring_changed(ring.path()));
    }
    let out = change(&ds, &mut ring)?;
    before_write()?;
    folder.put_if_unchanged(KEYRING_FILE, ring.to_json().into_bytes(), &version)?;
    Ok(out)
}

fn keyring_changed(path: &Path) -> Error {
    Error::io(
        path,
        std::io::Error::other(
            "the keyring changed while this command ran (another rekey?); nothing was \
             written: run the command again",
        ),
    )
}

/// Lets `added` open the dataset too (`existing` must already open it).
pub fn add_key(dir: &Path, existing: &MasterKey, added: &MasterKey) -> Result<()> {
    update_keyring(dir, &mut || Ok(()), |ds, ring| {
        let keys = checked_data_keys(ds, existing)?;
        ring.set_wraps(added, &keys)
    })
}

/// Removes the wraps of key `key_id`; refuses to remove the last key.
pub fn remove_key(dir: &Path, key_id: &str) -> Result<()> {
    update_keyring(dir, &mut || Ok(()), |_, ring| {
        if !ring.wraps.iter().any(|w| w.key_id == key_id) {
            return Err(Error::InvalidArgument(format!(
                "key {key_id} is not in {}",
                ring.path().display()
            )));
        }
        if ring.wraps.len() == 1 {
            return Err(Error::InvalidArgument(
                "refusing to remove the only key: the dataset would be unreadable".into(),
            ));
        }
        ring.wraps.retain(|w| w.key_id != key_id);
        Ok(())
    })
}
