//! `convert`: plaintext safetensors / NPY / in-memory tensors → an encrypted dataset.
//!
//! Streaming with bounded memory: inputs are read chunk by chunk at their offsets, a batch of at
//! most a few chunks (about 16 MiB, at least one chunk per thread) is sealed in parallel and written, and
//! only ciphertext (or the bytes of `--plain` tensors) reaches disk. Shards are written to a
//! temporary name, fsynced and renamed; the manifest is written last.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest, Sha256};

use super::input::{ConvertInput, Plan, plan};
use super::shard::{chunk_aad, chunk_nonce};
use super::{
    Column, DatasetKind, Descriptor, FORMAT_VERSION, HEADER_TAG_NONCE, KEYRING_FILE, KeyWrap,
    Keyring, MANIFEST_FILE, MAX_CHUNK_SIZE, MAX_CHUNKS_PER_SHARD, MAX_HEADER_LEN,
    MAX_JSON_FILE_LEN, MAX_KEY_WRAPS, MAX_METADATA_ENTRIES, MAX_SHARDS, Manifest, ShardEntry,
    TensorDesc, canonical_header, random_suffix, shard_file_name, sync_dir, write_atomic,
};
use crate::cipher::cpu::CpuCipher;
use crate::cipher::{Cipher, TAG_LEN};
use crate::error::{Error, Result};
use crate::keys::{DataKey, MasterKey, WRAPPED_LEN};

/// Options of [`convert`].
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Target shard size in bytes (rows are never split; default 1 GiB).
    pub shard_size: u64,
    /// Chunk size in bytes (multiple of 64; default 2 MiB).
    pub chunk_size: u64,
    /// Glob patterns (`*`, `?`) naming tensors to leave readable (still authenticated).
    pub plain: Vec<String>,
    /// Master keys that can open the dataset (at least one).
    pub keys: Vec<MasterKey>,
    /// User metadata (overrides the inputs' safetensors `__metadata__`).
    pub metadata: BTreeMap<String, String>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            shard_size: 1 << 30,
            chunk_size: 2 << 20,
            plain: Vec::new(),
            keys: Vec::new(),
            metadata: BTreeMap::new(),
        }
    }
}

/// What [`convert`] wrote.
#[derive(Debug, Clone)]
pub struct ConvertSummary {
    /// The new dataset's id.
    pub dataset_id: [u8; 16],
    /// Dataset or tensors.
    pub kind: DatasetKind,
    /// Shards written.
    pub shards: usize,
    /// Rows (0 for `tensors`).
    pub rows: u64,
    /// Columns / tensors per shard.
    pub columns: usize,
    /// Tensor bytes read (= tensor bytes written).
    pub bytes: u64,
    /// Bytes written including headers and JSON files.
    pub bytes_written: u64,
    /// Wall time.
    pub seconds: f64,
    /// Ids of the master keys that open it.
    pub key_ids: Vec<String>,
    /// Columns (tensors) stored encrypted, in dataset order.
    pub encrypted_columns: Vec<String>,
    /// Columns (tensors) left readable by `plain` patterns, in dataset order: anyone who can
    /// read the files can read these (they are authenticated, not encrypted).
    pub plain_columns: Vec<String>,
}

impl ConvertSummary {
    /// Tensor throughput in MB/s (10^6 bytes).
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.seconds.max(1e-9)
    }
}

/// `*` matches any run, `?` one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Removes what a failed conversion created.
struct Cleanup {
    paths: Vec<PathBuf>,
    committed: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !self.committed {
            for p in &self.paths {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// What an output directory holds of the names a conversion writes.
#[derive(Debug, Default)]
pub(crate) struct OutDir {
    /// It has a manifest: a complete dataset (a conversion writes its manifest last).
    pub manifest: bool,
    /// The files a conversion that never wrote its manifest left (it was killed, or the
    /// machine stopped): shards under their temporary names, complete shards (their headers
    /// parse), a keyring that parses, temporary keyring and manifest files. Sorted.
    pub leftovers: Vec<PathBuf>,
    /// Files at a conversion's names that are not such leftovers (a shard name whose file is
    /// not a shard, ...): a conversion must not replace them. Sorted.
    pub foreign: Vec<PathBuf>,
}

impl OutDir {
    /// The leftovers' names, the first few, for a message.
    pub fn leftover_names(&self) -> String {
        const SHOWN: usize = 3;
        let mut names: Vec<String> = self
            .leftovers
            .iter()
            .take(SHOWN)
            .map(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        if self.leftovers.len() > SHOWN {
            names.push(format!("{} more", self.leftovers.len() - SHOWN));
        }
        names.join(", ")
    }
}

/// `shard-NNNNN.safetensors` (any number of digits).
fn is_shard_name(name: &str) -> bool {
    name.strip_prefix("shard-")
        .and_then(|n| n.strip_suffix(".safetensors"))
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// A temporary name a conversion writes under: a shard's, the keyring's or the manifest's
/// name, `.tmp-` and 16 hex digits ([`random_suffix`]).
fn is_temp_name(name: &str) -> bool {
    name.rsplit_once(".tmp-").is_some_and(|(base, suffix)| {
        suffix.len() == 16
            && suffix.bytes().all(|b| b.is_ascii_hexdigit())
            && (base == MANIFEST_FILE || base == KEYRING_FILE || is_shard_name(base))
    })
}

/// Sorts the files of `dir` named as a conversion names its files into [`OutDir`]; other
/// files are not looked at. Symbolic links are never followed: one at such a name is foreign.
pub(crate) fn scan_out_dir(dir: &Path) -> Result<OutDir> {
    let mut found = OutDir::default();
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = || path.symlink_metadata().is_ok_and(|m| m.is_file());
        let ours = if name == MANIFEST_FILE {
            found.manifest = true;
            continue;
        } else if is_temp_name(&name) {
            is_file()
        } else if is_shard_name(&name) {
            is_file() && super::ShardHeader::read(&path).is_ok()
        } else if name == KEYRING_FILE {
            is_file()
                && super::read_bounded(&path, "keyring", MAX_JSON_FILE_LEN)
                    .and_then(|b| Keyring::parse(&path, &b))
                    .is_ok()
        } else if name.starts_with("shard-") {
            false
        } else {
            continue;
        };
        if ours {
            found.leftovers.push(path);
        } else {
            found.foreign.push(path);
        }
    }
    found.leftovers.sort();
    found.foreign.sort();
    Ok(found)
}

/// Creates `out_dir`, or checks that it holds nothing a conversion would write or replace.
fn refuse_existing_dataset(out_dir: &Path) -> Result<()> {
    if !out_dir.exists() {
        return std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e));
    }
    let found = scan_out_dir(out_dir)?;
    refuse_dataset_or_foreign(out_dir, &found)?;
    if !found.leftovers.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{} holds an interrupted conversion (no {MANIFEST_FILE}; left: {}): convert again with --force to remove these leftovers first, or choose another directory",
            out_dir.display(),
            found.leftover_names()
        )));
    }
    Ok(())
}

/// Refuses a complete dataset (never replaced) and files a conversion would replace that are
/// not its own leftovers.
fn refuse_dataset_or_foreign(out_dir: &Path, found: &OutDir) -> Result<()> {
    if found.manifest {
        return Err(Error::InvalidArgument(format!(
            "{} already holds a dataset ({MANIFEST_FILE}); choose an empty or new directory (a complete dataset is never replaced, not even with --force)",
            out_dir.display()
        )));
    }
    if let Some(f) = found.foreign.first() {
        return Err(Error::InvalidArgument(format!(
            "{} already holds {}, which a conversion would replace and which is not a leftover of one; choose an empty or new directory, or move it away",
            out_dir.display(),
            f.display()
        )));
    }
    Ok(())
}

/// Removes the leftovers of an interrupted conversion from `dir` (see [`OutDir::leftovers`];
/// nothing else: no other file, not the directory) and returns how many there were. Refuses,
/// removing nothing, a directory holding a complete dataset (one with a manifest) or a file at
/// one of a conversion's names that is not its leftover. A missing directory has none.
pub fn remove_interrupted_conversion(dir: &Path) -> Result<usize> {
    if dir.symlink_metadata().is_err() {
        return Ok(0);
    }
    let found = scan_out_dir(dir)?;
    refuse_dataset_or_foreign(dir, &found)?;
    for p in &found.leftovers {
        std::fs::remove_file(p).map_err(|e| Error::io(p, e))?;
    }
    sync_dir(dir);
    Ok(found.leftovers.len())
}

/// Readers refuse a manifest or keyring over [`MAX_JSON_FILE_LEN`]: refuses, before anything
/// is written, a dataset whose files would be. The keyring's length is exact (every wrapped
/// key is 56 base64 digits); the manifest's is a lower bound (each shard's numbers taken as
/// one digit; `manifest` has no shards yet), and the written text is checked again.
fn json_files_fit(out_dir: &Path, manifest: &Manifest, shards: u32, keys: usize) -> Result<()> {
    let (manifest_len, keyring_len) = json_lens(out_dir, manifest, shards, keys);
    for (name, len) in [(MANIFEST_FILE, manifest_len), (KEYRING_FILE, keyring_len)] {
        if len > MAX_JSON_FILE_LEN {
            return Err(too_big(out_dir, name, len));
        }
    }
    Ok(())
}

/// [`json_files_fit`]'s lengths: of the manifest (at least) and of the keyring (exactly).
fn json_lens(out_dir: &Path, manifest: &Manifest, shards: u32, keys: usize) -> (u64, u64) {
    let n = shards as u64;
    let base = manifest.to_json().len() as u64;
    let one = Manifest {
        shards: vec![ShardEntry {
            file: shard_file_name(0),
            row_start: 0,
            rows: 0,
            bytes: 0,
            header_digest: [0; 32],
        }],
        ..manifest.clone()
    };
    // Each shard's entry, and a comma between two.
    let entry = one.to_json().len() as u64 - base;
    let manifest_len = base + n * (entry + 1) - 1;
    let mut ring = Keyring::new(&out_dir.join(KEYRING_FILE), manifest.dataset_id);
    ring.wraps = (0..keys)
        .map(|i| KeyWrap {
            key_id: format!("{i:016x}"),
            data_keys: Vec::new(),
        })
        .collect();
    // Each wrapped key: 56 digits in quotes, and a comma between two.
    let wrapped = B64.encode([0u8; WRAPPED_LEN]).len() as u64 + 2;
    let keyring_len = ring.to_json().len() as u64 + keys as u64 * (n * (wrapped + 1) - 1);
    (manifest_len, keyring_len)
}

fn too_big(out_dir: &Path, name: &str, len: u64) -> Error {
    Error::InvalidArgument(format!(
        "{}: {name} would be over the {MAX_JSON_FILE_LEN}-byte limit readers accept ({len} bytes): raise the shard size{}",
        out_dir.display(),
        if name == KEYRING_FILE {
            " or give fewer keys"
        } else {
            ""
        }
    ))
}

/// A chunk buffer: zeroized on drop (it holds plaintext between read and seal).
type Buf = zeroize::Zeroizing<Vec<u8>>;

/// One chunk to seal.
struct Job {
    col: usize,
    src_offset: u64,
    len: usize,
    nonce: [u8; 12],
    aad: [u8; super::AAD_LEN],
    encrypted: bool,
}

/// Converts `inputs` into a new dataset in `out_dir` (created if needed; refused if it already
/// holds a dataset or a conversion's leftovers). `progress(done, total)` is called with tensor
/// bytes. See [`convert_with`].
pub fn convert(
    inputs: &[ConvertInput],
    out_dir: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertSummary> {
    convert_with(inputs, out_dir, opts, false, progress, &mut || Ok(()))
}

/// [`convert`], and:
/// - with `replace_interrupted`, the leftovers of an interrupted conversion in `out_dir` are
///   removed first ([`remove_interrupted_conversion`]), once the inputs have been checked;
/// - `checkpoint` is called before each batch of chunks and before the keyring and manifest
///   are written: an error it returns stops the conversion, removes every file it wrote and is
///   returned. The CLI stops on SIGINT, SIGTERM and SIGHUP this way.
pub fn convert_with(
    inputs: &[ConvertInput],
    out_dir: &Path,
    opts: &ConvertOptions,
    replace_interrupted: bool,
    progress: &mut dyn FnMut(u64, u64),
    checkpoint: &mut dyn FnMut() -> Result<()>,
) -> Result<ConvertSummary> {
    let start = Instant::now();
    if opts.keys.is_empty() {
        return Err(Error::InvalidArgument(
            "convert needs at least one master key".into(),
        ));
    }
    let cs = opts.chunk_size;
    if cs < 64 || !cs.is_multiple_of(64) || cs > MAX_CHUNK_SIZE {
        return Err(Error::InvalidArgument(format!(
            "chunk size {cs} must be a multiple of 64 between 64 and {MAX_CHUNK_SIZE}"
        )));
    }
    if opts.shard_size == 0 {
        return Err(Error::InvalidArgument("shard size must be positive".into()));
    }
    let encrypted = |name: &str| !opts.plain.iter().any(|p| glob_match(p, name));
    let Plan {
        kind,
        cols,
        sources,
        mut metadata,
    } = plan(inputs, &encrypted)?;
    metadata.extend(opts.metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(Error::InvalidArgument(format!(
            "{} metadata entries, more than the {MAX_METADATA_ENTRIES} a shard may hold (the inputs' __metadata__ and the given metadata together)",
            metadata.len()
        )));
    }
    let key_ids: HashSet<String> = opts.keys.iter().map(MasterKey::id).collect();
    if key_ids.len() > MAX_KEY_WRAPS {
        return Err(Error::InvalidArgument(format!(
            "{} master keys, more than the {MAX_KEY_WRAPS} a keyring may hold",
            key_ids.len()
        )));
    }

    let rows = if kind == DatasetKind::Dataset {
        cols[0].rows
    } else {
        0
    };
    // Sums and products of the columns' sizes below fit in u64: `plan` checked one row of all
    // columns, each column's rows x row bytes and their total (saturating only to show it).
    let row_bytes: u64 = cols
        .iter()
        .map(|c| c.row_bytes)
        .fold(0, u64::saturating_add);
    let rows_per_shard = if kind == DatasetKind::Tensors || row_bytes == 0 {
        rows.max(1)
    } else {
        (opts.shard_size / row_bytes).max(1)
    };
    let shard_count = rows.div_ceil(rows_per_shard).max(1);
    if shard_count > MAX_SHARDS as u64 {
        return Err(Error::InvalidArgument(format!(
            "{shard_count} shards, more than the {MAX_SHARDS} a manifest may list: raise the shard size"
        )));
    }
    // MAX_SHARDS < 2^32.
    let shard_count = shard_count as u32;
    let total: u64 = cols
        .iter()
        .flat_map(|c| c.pieces.iter().map(|p| p.len))
        .fold(0, u64::saturating_add);

    let mut dataset_id = [0u8; 16];
    getrandom::fill(&mut dataset_id)
        .map_err(|e| Error::Key(format!("operating system RNG failed: {e}")))?;
    let mut manifest = Manifest {
        dataset_id,
        kind,
        rows,
        chunk_size: cs,
        columns: cols
            .iter()
            .map(|c| Column {
                name: c.name.clone(),
                dtype: c.dtype,
                shape: c.shape.clone(),
                encrypted: c.encrypted,
            })
            .collect(),
        shards: Vec::new(),
    };
    json_files_fit(out_dir, &manifest, shard_count, key_ids.len())?;
    if replace_interrupted {
        remove_interrupted_conversion(out_dir)?;
    }
    refuse_existing_dataset(out_dir)?;
    let mut cleanup = Cleanup {
        paths: Vec::new(),
        committed: false,
    };
    let mut data_keys = Vec::with_capacity(shard_count as usize);
    let mut entries = Vec::with_capacity(shard_count as usize);
    let mut done = 0u64;
    let mut bytes_written = 0u64;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    for s in 0..shard_count {
        let r0 = s as u64 * rows_per_shard;
        let r1 = r0.saturating_add(rows_per_shard).min(rows);
        let (srows, row_start) = if kind == DatasetKind::Dataset {
            (r1 - r0, r0)
        } else {
            (0, 0)
        };
        // The tensors of this shard and where their bytes come from.
        let mut tensors = Vec::with_capacity(cols.len());
        let mut src_starts = Vec::with_capacity(cols.len());
        let (mut off, mut next_chunk) = (0u64, 0u64);
        for c in &cols {
            let (shape, len, src) = match kind {
                DatasetKind::Dataset => {
                    let mut shape = vec![srows];
                    shape.extend_from_slice(&c.shape);
                    (shape, srows * c.row_bytes, r0 * c.row_bytes)
                }
                DatasetKind::Tensors => (c.shape.clone(), c.pieces[0].len, 0),
            };
            let chunks = len.div_ceil(cs).max(1);
            tensors.push(TensorDesc {
                name: c.name.clone(),
                dtype: c.dtype,
                shape,
                offsets: (off, off + len),
                encrypted: c.encrypted,
                first_chunk: next_chunk,
                chunks,
            });
            src_starts.push(src);
            off += len;
            next_chunk += chunks;
        }
        // Each tag takes ~21.3 base64 bytes of header, and readers cap the header: check before
        // allocating the tag table.
        if next_chunk > MAX_CHUNKS_PER_SHARD || (next_chunk + 1) * 64 / 3 > MAX_HEADER_LEN {
            return Err(Error::InvalidArgument(format!(
                "shard {s} would have {next_chunk} chunks (limit {MAX_CHUNKS_PER_SHARD}, and their tags must fit the {MAX_HEADER_LEN}-byte header): raise the chunk size or lower the shard size"
            )));
        }
        let desc = Descriptor {
            version: FORMAT_VERSION,
            dataset_id,
            shard_index: s,
            shard_count,
            row_start,
            rows: srows,
            chunk_size: cs,
            tensors,
            metadata: metadata.clone(),
        };
        // A lower bound of the header's length, counted before anything is built: the descriptor
        // (escaped inside the header, never shorter), the tags, and each tensor's outer entry
        // (its quoted name and at least 50 bytes of fields). A header past the readers' limit
        // is refused here, not after building it (1,000,000 tensors took 800 MB to refuse).
        let lower = desc
            .json_len()
            .saturating_add((next_chunk + 1) * 64 / 3)
            .saturating_add(
                desc.tensors
                    .iter()
                    .map(|t| t.name.len() as u64 + 52)
                    .fold(0, u64::saturating_add),
            );
        if lower > MAX_HEADER_LEN {
            return Err(Error::InvalidArgument(format!(
                "shard {s} would have a header of more than {lower} bytes ({} tensors, {next_chunk} chunk tags), over the {MAX_HEADER_LEN}-byte limit readers accept: lower the shard size, raise the chunk size, or split the input",
                desc.tensors.len()
            )));
        }
        let desc_json = desc.to_json();
        let digest: [u8; 32] = Sha256::digest(desc_json.as_bytes()).into();
        let dk = DataKey::generate()?;
        let opener = CpuCipher::new().prepare(&dk)?;
        data_keys.push(dk);
        let mut tags = vec![0u8; TAG_LEN * (1 + next_chunk as usize)];
        tags[..TAG_LEN].copy_from_slice(&opener.seal_in_place(
            &HEADER_TAG_NONCE,
            desc_json.as_bytes(),
            false,
            &mut [],
        )?);
        let placeholder = canonical_header(
            &desc_json,
            &B64.encode(vec![0u8; tags.len()]),
            &desc.tensors,
        );
        // Readers refuse headers over MAX_HEADER_LEN (the tags live there): never write one.
        if placeholder.len() as u64 > MAX_HEADER_LEN {
            return Err(Error::InvalidArgument(format!(
                "shard {s} would have a {} byte header ({next_chunk} chunk tags), over the {MAX_HEADER_LEN}-byte limit: raise the chunk size or lower the shard size",
                placeholder.len()
            )));
        }

        let file_name = shard_file_name(s);
        let final_path = out_dir.join(&file_name);
        let tmp_path = out_dir.join(format!("{file_name}.tmp-{}", random_suffix()?));
        let file = File::create_new(&tmp_path).map_err(|e| Error::io(&tmp_path, e))?;
        cleanup.paths.push(tmp_path.clone());
        let io = |e| Error::io(&tmp_path, e);
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        w.write_all(&(placeholder.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&placeholder).map_err(io)?;

        // Jobs are generated lazily: a shard of tiny chunks must not hold a job per chunk.
        let mut jobs = desc.tensors.iter().enumerate().flat_map(|(ti, t)| {
            let (desc, digest, src) = (&desc, &digest, src_starts[ti]);
            (0..t.chunks).map(move |j| {
                let g = t.first_chunk + j;
                Job {
                    col: ti,
                    src_offset: src + j * cs,
                    len: (t.len() - j * cs).min(cs) as usize,
                    nonce: chunk_nonce(g),
                    aad: chunk_aad(
                        &desc.dataset_id,
                        digest,
                        s,
                        ti as u32,
                        j,
                        t.chunks,
                        g,
                        t.encrypted,
                    ),
                    encrypted: t.encrypted,
                }
            })
        });
        // Pipeline: while batch k is read and sealed (in parallel), batch k-1 is written.
        // Two buffer sets at most; buffers zeroize on drop, error paths included.
        // About 16 MiB a batch (one chunk per thread at least, unless chunks are huge), so
        // memory stays at two batches whatever the input size.
        let min_batch = if cs <= 8 << 20 { threads } else { 1 };
        let batch_len = ((16 << 20) / cs as usize).clamp(min_batch, 4096);
        let seal_batch = |batch: &[Job],
                          bufs: &mut [Buf],
                          tags: &mut [[u8; TAG_LEN]]|
         -> Result<()> {
            let work = |jobs: &[Job], bufs: &mut [Buf], tags: &mut [[u8; TAG_LEN]]| -> Result<()> {
                for ((job, buf), tag) in jobs.iter().zip(bufs.iter_mut()).zip(tags.iter_mut()) {
                    buf.resize(job.len, 0);
                    sources.read(&cols[job.col], job.src_offset, buf)?;
                    *tag = opener.seal_in_place(&job.nonce, &job.aad, job.encrypted, buf)?;
                }
                Ok(())
            };
            let batch_bytes: usize = batch.iter().map(|j| j.len).sum();
            if threads == 1 || batch_bytes < (256 << 10) {
                return work(batch, bufs, tags);
            }
            let per = batch.len().div_ceil(threads);
            std::thread::scope(|sc| {
                let handles: Vec<_> = batch
                    .chunks(per)
                    .zip(bufs.chunks_mut(per))
                    .zip(tags.chunks_mut(per))
                    .map(|((j, b), t)| sc.spawn(move || work(j, b, t)))
                    .collect();
                handles
                    .into_iter()
                    .try_for_each(|h| h.join().expect("sealing thread panicked"))
            })
        };
        let mut pool: Vec<Vec<Buf>> = Vec::new();
        let mut pending: Option<(Vec<Buf>, Vec<usize>)> = None;
        let mut g = 0usize;
        loop {
            checkpoint()?;
            let batch_jobs: Vec<Job> = jobs.by_ref().take(batch_len).collect();
            let batch = (!batch_jobs.is_empty()).then_some(&batch_jobs[..]);
            if batch.is_none() && pending.is_none() {
                break;
            }
            let mut cur = if batch.is_some() {
                pool.pop().unwrap_or_default()
            } else {
                Vec::new()
            };
            let mut batch_tags = vec![[0u8; TAG_LEN]; batch.map_or(0, <[Job]>::len)];
            if let Some(b) = batch {
                cur.resize_with(b.len(), Buf::default);
            }
            let to_write = pending.take();
            let (sealed, written) = std::thread::scope(|sc| {
                let writer = to_write.map(|(bufs, lens)| {
                    let (w, tmp_path) = (&mut w, &tmp_path);
                    sc.spawn(move || {
                        let mut n = 0u64;
                        for (buf, &len) in bufs.iter().zip(&lens) {
                            if let Err(e) = w.write_all(&buf[..len]) {
                                return (Err(Error::io(tmp_path, e)), bufs, n);
                            }
                            n += len as u64;
                        }
                        (Ok(()), bufs, n)
                    })
                });
                let sealed = batch.map_or(Ok(()), |b| seal_batch(b, &mut cur, &mut batch_tags));
                (
                    sealed,
                    writer.map(|h| h.join().expect("writer thread panicked")),
                )
            });
            if let Some((r, bufs, n)) = written {
                pool.push(bufs);
                r?;
                done += n;
                progress(done, total);
            }
            sealed?;
            if let Some(b) = batch {
                for t in &batch_tags {
                    tags[TAG_LEN * (1 + g)..TAG_LEN * (2 + g)].copy_from_slice(t);
                    g += 1;
                }
                pending = Some((cur, b.iter().map(|j| j.len).collect()));
            }
        }
        drop(pool);
        let header = canonical_header(&desc_json, &B64.encode(&tags), &desc.tensors);
        debug_assert_eq!(header.len(), placeholder.len());
        let mut file = w
            .into_inner()
            .map_err(|e| Error::io(&tmp_path, e.into_error()))?;
        file.seek(SeekFrom::Start(8)).map_err(io)?;
        file.write_all(&header).map_err(io)?;
        file.sync_all().map_err(io)?;
        let bytes = 8 + header.len() as u64 + desc.data_len();
        std::fs::rename(&tmp_path, &final_path).map_err(|e| Error::io(&final_path, e))?;
        cleanup.paths.push(final_path);
        bytes_written += bytes;
        entries.push(ShardEntry {
            file: file_name,
            row_start,
            rows: srows,
            bytes,
            header_digest: digest,
        });
    }

    checkpoint()?;
    let mut keyring = Keyring::new(&out_dir.join(KEYRING_FILE), dataset_id);
    for k in &opts.keys {
        keyring.set_wraps(k, &data_keys)?;
    }
    manifest.shards = entries;
    let (kjson, mjson) = (keyring.to_json(), manifest.to_json());
    // Estimated before anything was written; now exact (the cleanup removes the shards).
    for (name, json) in [(KEYRING_FILE, &kjson), (MANIFEST_FILE, &mjson)] {
        if json.len() as u64 > MAX_JSON_FILE_LEN {
            return Err(too_big(out_dir, name, json.len() as u64));
        }
    }
    let kpath = out_dir.join(KEYRING_FILE);
    write_atomic(&kpath, kjson.as_bytes())?;
    cleanup.paths.push(kpath);
    write_atomic(&out_dir.join(MANIFEST_FILE), mjson.as_bytes())?;
    cleanup.committed = true;
    sync_dir(out_dir);
    let names = |encrypted: bool| -> Vec<String> {
        cols.iter()
            .filter(|c| c.encrypted == encrypted)
            .map(|c| c.name.clone())
            .collect()
    };
    Ok(ConvertSummary {
        dataset_id,
        kind,
        shards: shard_count as usize,
        rows,
        columns: cols.len(),
        bytes: total,
        bytes_written: bytes_written + (kjson.len() + mjson.len()) as u64,
        seconds: start.elapsed().as_secs_f64(),
        key_ids: keyring.key_ids(),
        encrypted_columns: names(true),
        plain_columns: names(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keyring's length is predicted exactly, the manifest's from below (by the digits of
    /// each shard's numbers).
    #[test]
    fn json_lengths_are_predicted() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ds");
        let opts = ConvertOptions {
            shard_size: 100,
            chunk_size: 64,
            keys: (1..=3).map(|b| MasterKey::from_bytes([b; 32])).collect(),
            ..ConvertOptions::default()
        };
        let input = ConvertInput::InMemory {
            name: "x".into(),
            dtype: crate::format::Dtype::U16,
            shape: vec![1000, 3],
            data: vec![7; 6000],
        };
        let s = convert(&[input], &out, &opts, &mut |_, _| {}).unwrap();
        // 16 rows of 6 bytes a shard.
        assert_eq!(s.shards, 63);
        let len = |name| std::fs::metadata(out.join(name)).unwrap().len();
        let mpath = out.join(MANIFEST_FILE);
        let mut m = Manifest::parse(&mpath, &std::fs::read(&mpath).unwrap()).unwrap();
        m.shards.clear();
        let (manifest, keyring) = json_lens(&out, &m, 63, 3);
        assert_eq!(keyring, len(KEYRING_FILE));
        let actual = len(MANIFEST_FILE);
        assert!(
            manifest <= actual && actual - manifest < 63 * 8,
            "{manifest} vs {actual}"
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match("label*", "labels"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("*.bias", "layer.0.bias"));
        assert!(!glob_match("*.bias", "layer.0.weight"));
        assert!(glob_match("x*y*z", "xaaybbz"));
    }
}
