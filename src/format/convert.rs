//! `convert`: plaintext safetensors / NPY / in-memory tensors → an encrypted dataset.
//!
//! Streaming with bounded memory: inputs are read chunk by chunk at their offsets, a batch of at
//! most a few chunks (about 16 MiB, at least one chunk per thread) is sealed in parallel and written, and
//! only ciphertext (or the bytes of `--plain` tensors) reaches disk. Shards are written to a
//! temporary name, fsynced and renamed (or, into an object store, uploaded in parts as they
//! are sealed; see [`super::output`]); the manifest is written last.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use super::input::{ConvertInput, Plan, plan};
use super::output::Output;
use super::seal::{Sealer, TensorPlan, lay_out, write_shard};
use super::{
    Column, DatasetKind, Descriptor, FORMAT_VERSION, KEYRING_FILE, KeyWrap, Keyring, Layout,
    MANIFEST_FILE, MAX_CHUNK_SIZE, MAX_JSON_FILE_LEN, MAX_KEY_WRAPS, MAX_METADATA_ENTRIES,
    MAX_SHARDS, Manifest, ShardEntry, shard_file_name, sync_dir,
};
use crate::error::{Error, Result};
use crate::keys::{MasterKey, WRAPPED_LEN};

/// The target shard size of inputs read at byte ranges (safetensors, `.npy`, fixed columns in
/// memory) unless one is given: they stream, and memory does not depend on it.
pub const DEFAULT_SHARD_SIZE: u64 = 1 << 30;

/// The target shard size of inputs decoded batch by batch (Parquet, Arrow, JSONL, ragged
/// columns) unless one is given. Their conversion holds each shard's plaintext whole until it
/// is sealed, and gathers the next shard while one is sealed: memory is about two shards plus
/// the decoder's. Shards are cut by the inputs' estimated bytes, which can be low (a Parquet
/// file's uncompressed size counts dictionary-encoded values as indices: 64 MiB made shards of
/// about 100 MB, a row group, of such a file); larger shards measured no faster, only larger
/// in memory (docs/BENCHMARKS.md, issue 14; docs/INPUTS.md, "Shards and memory").
pub const DEFAULT_ROWS_SHARD_SIZE: u64 = 64 << 20;

/// Options of [`convert`].
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Target shard size in bytes (rows are never split). `None`: [`DEFAULT_SHARD_SIZE`] for
    /// inputs read at byte ranges (safetensors, `.npy`, fixed columns in memory),
    /// [`DEFAULT_ROWS_SHARD_SIZE`] for inputs decoded batch by batch (Parquet, Arrow, JSONL,
    /// ragged columns), whose conversion holds about two shards' plaintext in memory.
    pub shard_size: Option<u64>,
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
            shard_size: None,
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
struct Cleanup<'a> {
    out: &'a Output,
    paths: Vec<PathBuf>,
    committed: bool,
}

impl Cleanup<'_> {
    /// Removes what was created (once); `Err` names what could not be removed.
    fn run(&mut self) -> Result<()> {
        if self.committed {
            return Ok(());
        }
        self.committed = true;
        self.out.remove(&std::mem::take(&mut self.paths))
    }
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = self.run();
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
pub(super) fn refuse_existing_dataset(out_dir: &Path) -> Result<()> {
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

/// What a conversion reads its shards from.
enum Job<'a> {
    /// Byte ranges of inputs (safetensors, `.npy`, fixed columns in memory).
    Ranges(Plan<'a>),
    /// Row batches (ragged columns, columnar files).
    Rows(super::convert_rows::RowsPlan<'a>),
}

/// Writes the shard `desc` describes (rows from `r0`, or the whole `tensors` file) from the
/// inputs' byte ranges.
fn write_range_shard(
    p: &Plan<'_>,
    r0: u64,
    mut desc: Descriptor,
    sealer: &mut Sealer<'_>,
) -> Result<(ShardEntry, crate::keys::DataKey)> {
    let srows = desc.rows;
    let mut plans = Vec::with_capacity(p.cols.len());
    let mut src_starts = Vec::with_capacity(p.cols.len());
    for c in &p.cols {
        let (shape, len, src) = match p.kind {
            DatasetKind::Dataset => {
                let mut shape = vec![srows];
                shape.extend_from_slice(&c.shape);
                (shape, srows * c.row_bytes, r0 * c.row_bytes)
            }
            DatasetKind::Tensors => (c.shape.clone(), c.pieces[0].len, 0),
        };
        plans.push(TensorPlan {
            name: c.name.clone(),
            dtype: c.dtype,
            shape,
            encrypted: c.encrypted,
            layout: Layout::Fixed,
            len,
        });
        src_starts.push(src);
    }
    desc.tensors = lay_out(plans, desc.chunk_size);
    let read = |t: usize, offset: u64, buf: &mut [u8]| {
        p.sources.read(&p.cols[t], src_starts[t] + offset, buf)
    };
    write_shard(&desc, &read, sealer)
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
    if opts.shard_size == Some(0) {
        return Err(Error::InvalidArgument("shard size must be positive".into()));
    }
    let encrypted = |name: &str| !opts.plain.iter().any(|p| glob_match(p, name));
    // Inputs read at byte ranges (safetensors, .npy, fixed columns in memory), or decoded
    // batch by batch (ragged columns, columnar files).
    let mut job = match super::convert_rows::open(inputs, &encrypted)? {
        Some(rows_plan) => Job::Rows(rows_plan),
        None => Job::Ranges(plan(inputs, &encrypted)?),
    };
    let (kind, mut metadata, columns) = match &mut job {
        Job::Ranges(p) => (
            p.kind,
            std::mem::take(&mut p.metadata),
            p.cols
                .iter()
                .map(|c| Column {
                    name: c.name.clone(),
                    dtype: c.dtype,
                    shape: c.shape.clone(),
                    encrypted: c.encrypted,
                    ragged: false,
                })
                .collect::<Vec<_>>(),
        ),
        Job::Rows(p) => (
            DatasetKind::Dataset,
            std::mem::take(&mut p.metadata),
            p.columns(),
        ),
    };
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

    let (rows, rows_per_shard, total) = match &job {
        Job::Ranges(Plan { kind, cols, .. }) => {
            let rows = if *kind == DatasetKind::Dataset {
                cols[0].rows
            } else {
                0
            };
            // Sums and products of the columns' sizes below fit in u64: `plan` checked one row
            // of all columns, each column's rows x row bytes and their total (saturating only
            // to show it).
            let row_bytes: u64 = cols
                .iter()
                .map(|c| c.row_bytes)
                .fold(0, u64::saturating_add);
            let rows_per_shard = if *kind == DatasetKind::Tensors || row_bytes == 0 {
                rows.max(1)
            } else {
                (opts.shard_size.unwrap_or(DEFAULT_SHARD_SIZE) / row_bytes).max(1)
            };
            let total: u64 = cols
                .iter()
                .flat_map(|c| c.pieces.iter().map(|p| p.len))
                .fold(0, u64::saturating_add);
            (rows, rows_per_shard, total)
        }
        Job::Rows(p) => (
            p.rows,
            p.rows_per_shard(opts.shard_size.unwrap_or(DEFAULT_ROWS_SHARD_SIZE)),
            p.estimated_bytes,
        ),
    };
    let shard_count = rows.div_ceil(rows_per_shard).max(1);
    if shard_count > MAX_SHARDS as u64 {
        // Named by the inputs: a file's header may claim more rows than it holds.
        let source = match &job {
            Job::Ranges(p) => p.cols.first().map(|c| c.input.display().to_string()),
            Job::Rows(p) => Some(p.inputs_named()),
        }
        .unwrap_or_default();
        return Err(Error::InvalidArgument(format!(
            "{source}: {rows} rows make {shard_count} shards, more than the {MAX_SHARDS} a manifest may list: raise the shard size"
        )));
    }
    // MAX_SHARDS < 2^32.
    let shard_count = shard_count as u32;

    let mut dataset_id = [0u8; 16];
    getrandom::fill(&mut dataset_id)
        .map_err(|e| Error::Key(format!("operating system RNG failed: {e}")))?;
    let manifest = Manifest {
        version: FORMAT_VERSION,
        dataset_id,
        kind,
        rows,
        chunk_size: cs,
        columns,
        shards: Vec::new(),
    };
    json_files_fit(out_dir, &manifest, shard_count, key_ids.len())?;
    let out = Output::new(out_dir)?;
    out.prepare(replace_interrupted)?;
    let mut cleanup = Cleanup {
        out: &out,
        paths: Vec::new(),
        committed: false,
    };
    let written = write_dataset(
        &mut job,
        &out,
        &mut cleanup.paths,
        Plan2 {
            opts,
            manifest,
            kind,
            rows,
            rows_per_shard,
            shard_count,
            total,
            metadata,
            dataset_id,
        },
        progress,
        checkpoint,
    );
    let (manifest, keyring, tensor_bytes, bytes_written) = match written {
        Ok(w) => {
            cleanup.committed = true;
            w
        }
        Err(e) => {
            // Removes every shard (and keyring) written; a store that refuses is named.
            return Err(match cleanup.run() {
                Ok(()) => e,
                Err(c) => Error::io(
                    out.path(),
                    std::io::Error::other(format!(
                        "{e}; and cleaning up what the conversion wrote failed, remove it by hand: {c}"
                    )),
                ),
            });
        }
    };
    let names = |encrypted: bool| -> Vec<String> {
        match &job {
            Job::Ranges(p) => p
                .cols
                .iter()
                .filter(|c| c.encrypted == encrypted)
                .map(|c| c.name.clone())
                .collect(),
            Job::Rows(p) => p.names(encrypted),
        }
    };
    Ok(ConvertSummary {
        dataset_id,
        kind,
        shards: shard_count as usize,
        rows,
        columns: manifest.columns.len(),
        bytes: match job {
            Job::Ranges(_) => total,
            Job::Rows(_) => tensor_bytes,
        },
        bytes_written,
        seconds: start.elapsed().as_secs_f64(),
        key_ids: keyring.key_ids(),
        encrypted_columns: names(true),
        plain_columns: names(false),
    })
}

/// What [`write_dataset`] needs of the plan [`convert_with`] made.
struct Plan2<'a> {
    opts: &'a ConvertOptions,
    manifest: Manifest,
    kind: DatasetKind,
    rows: u64,
    rows_per_shard: u64,
    shard_count: u32,
    total: u64,
    metadata: BTreeMap<String, String>,
    dataset_id: [u8; 16],
}

/// Writes every shard, the keyring and the manifest (last) into `out`, listing what it
/// created in `cleanup`. Returns the manifest, the keyring, the tensor bytes of row inputs and
/// the bytes written.
fn write_dataset(
    job: &mut Job<'_>,
    out: &Output,
    cleanup: &mut Vec<PathBuf>,
    plan: Plan2<'_>,
    progress: &mut dyn FnMut(u64, u64),
    checkpoint: &mut dyn FnMut() -> Result<()>,
) -> Result<(Manifest, Keyring, u64, u64)> {
    let Plan2 {
        opts,
        mut manifest,
        kind,
        rows,
        rows_per_shard,
        shard_count,
        total,
        metadata,
        dataset_id,
    } = plan;
    let cs = manifest.chunk_size;
    let mut data_keys = Vec::with_capacity(shard_count as usize);
    let mut entries = Vec::with_capacity(shard_count as usize);
    let mut done = 0u64;
    let mut tensor_bytes = 0u64;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let shard = |s: u32| {
        let r0 = s as u64 * rows_per_shard;
        let r1 = r0.saturating_add(rows_per_shard).min(rows);
        let (srows, row_start) = if kind == DatasetKind::Dataset {
            (r1 - r0, r0)
        } else {
            (0, 0)
        };
        let desc = Descriptor {
            version: FORMAT_VERSION,
            dataset_id,
            shard_index: s,
            shard_count,
            row_start,
            rows: srows,
            chunk_size: cs,
            tensors: Vec::new(),
            metadata: metadata.clone(),
        };
        (r0, desc)
    };
    let mut written = |n| {
        done += n;
        progress(done, total.max(done));
    };
    match job {
        Job::Ranges(p) => {
            for s in 0..shard_count {
                let (r0, desc) = shard(s);
                let mut sealer = Sealer {
                    out,
                    threads,
                    cleanup: &mut *cleanup,
                    written: &mut written,
                    checkpoint: &mut *checkpoint,
                };
                let (entry, dk) = write_range_shard(p, r0, desc, &mut sealer)?;
                data_keys.push(dk);
                entries.push(entry);
            }
        }
        // Decoded rows: gathered on this thread while the previous shard is sealed on others.
        Job::Rows(p) => {
            let shards = (0..shard_count)
                .map(|s| {
                    let (_, desc) = shard(s);
                    (desc.rows, desc)
                })
                .collect();
            let w = super::convert_pipeline::write_row_shards(
                p,
                shards,
                out,
                threads,
                &mut *cleanup,
                &mut written,
                &mut *checkpoint,
            )?;
            tensor_bytes = w.bytes;
            data_keys = w.data_keys;
            entries = w.entries;
        }
    }
    let bytes_written: u64 = entries.iter().map(|e| e.bytes).sum();

    checkpoint()?;
    let mut keyring = Keyring::new(&out.name_of(KEYRING_FILE), dataset_id);
    for k in &opts.keys {
        keyring.set_wraps(k, &data_keys)?;
    }
    manifest.shards = entries;
    let (kjson, mjson) = (keyring.to_json(), manifest.to_json());
    // Estimated before anything was written; now exact (the cleanup removes the shards).
    for (name, json) in [(KEYRING_FILE, &kjson), (MANIFEST_FILE, &mjson)] {
        if json.len() as u64 > MAX_JSON_FILE_LEN {
            return Err(too_big(&out.path(), name, json.len() as u64));
        }
    }
    out.write_keyring(kjson.as_bytes(), cleanup)?;
    out.write_manifest(mjson.as_bytes())?;
    let bytes_written = bytes_written + (kjson.len() + mjson.len()) as u64;
    Ok((manifest, keyring, tensor_bytes, bytes_written))
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
            shard_size: Some(100),
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
