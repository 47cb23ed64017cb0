//! The plaintext inputs of `convert`: the formats it reads ([`ConvertInput`]), one reader per
//! format in its own file, and the columns they are gathered into.
//!
//! A file reader opens its file, parses the header (bounded, every failure an [`Error`] naming
//! the file) and returns a `FileInput`: the open file and the tensors it holds at byte ranges.
//! The converter then streams those ranges with `Sources::read`, never the whole file.

#![forbid(unsafe_code)]

pub mod arrow_batches;
pub mod arrow_columns;
pub mod arrow_ipc;
pub mod jsonl;
pub mod npy;
pub mod parquet;
mod parquet_pages;
pub mod records;
pub mod safetensors;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::{
    DatasetKind, Dtype, MAX_RANK, MAX_TENSORS, open_regular, read_at, tensor_bytes,
};

/// One input of [`convert`](crate::format::convert()).
#[derive(Debug, Clone)]
pub enum ConvertInput {
    /// A safetensors file: its tensors are columns (or, alone and not a dataset, a `tensors` shard).
    Safetensors(PathBuf),
    /// An NPY file holding one column.
    Npy {
        /// Column name.
        column: String,
        /// The file.
        path: PathBuf,
    },
    /// A Parquet file: its columns (docs/INPUTS.md has the type mapping), decoded row group
    /// by row group.
    Parquet(PathBuf),
    /// An Arrow IPC file or stream (`datasets.save_to_disk` writes the stream format).
    ArrowIpc(PathBuf),
    /// A JSON Lines file: each named key's value, a list of integers, is a ragged column.
    Jsonl {
        /// The file.
        path: PathBuf,
        /// The keys to convert, each a column.
        columns: Vec<String>,
    },
    /// Arrow record batches held in memory (a `pyarrow.Table` or stream, from Python): their
    /// columns, mapped as a Parquet file's are.
    Arrow(arrow_batches::ArrowBatches),
    /// A ragged column held in memory: row `i` is elements `offsets[i]..offsets[i + 1]` of
    /// `values` (tests, the demo, Python).
    Ragged {
        /// Column name.
        name: String,
        /// Element type.
        dtype: Dtype,
        /// Shape of one element (`[]` for a list of scalars).
        shape: Vec<u64>,
        /// Little-endian bytes of every row's elements, concatenated.
        values: Vec<u8>,
        /// `rows + 1` element offsets: 0 first, non-decreasing, the element count last.
        offsets: Vec<u64>,
    },
    /// A column held in memory (tests, the demo).
    InMemory {
        /// Column name.
        name: String,
        /// Element type.
        dtype: Dtype,
        /// Full shape (first dimension = rows).
        shape: Vec<u64>,
        /// Little-endian bytes.
        data: Vec<u8>,
    },
}

impl ConvertInput {
    /// The input that file `path` is, by its extension: `.parquet`/`.pq` Parquet,
    /// `.arrow`/`.feather`/`.ipc`/`.arrows` Arrow IPC, `.jsonl`/`.ndjson` JSONL (its keys
    /// `columns` become columns), `.npy` one column named after the file, anything else
    /// safetensors.
    pub fn from_path(path: &Path, columns: &[String]) -> ConvertInput {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let path = path.to_path_buf();
        match ext.as_str() {
            "parquet" | "pq" => ConvertInput::Parquet(path),
            "arrow" | "feather" | "ipc" | "arrows" => ConvertInput::ArrowIpc(path),
            "jsonl" | "ndjson" => ConvertInput::Jsonl {
                path,
                columns: columns.to_vec(),
            },
            "npy" => ConvertInput::Npy {
                column: path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                path,
            },
            _ => ConvertInput::Safetensors(path),
        }
    }
}

/// A tensor held as a contiguous byte range of an input file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputTensor {
    /// Its name (the column's, for a dataset).
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Full shape (C order).
    pub shape: Vec<u64>,
    /// Where its bytes start in the file.
    pub offset: u64,
    /// Its length in bytes (what `dtype` and `shape` give).
    pub len: u64,
}

/// What a file reader returns: the file, open for reading its data, and what it holds.
struct FileInput {
    file: File,
    tensors: Vec<InputTensor>,
    /// The file's own metadata (safetensors `__metadata__`).
    metadata: BTreeMap<String, String>,
}

/// Opens input `path` for reading and returns it with its length. Like every file ciphershard
/// reads ([`open_regular`]): non-blocking, and refused unless it is a regular file, so a FIFO
/// (which would wait for a writer forever) or a directory is an error at once naming it.
fn open_file(path: &Path, what: &'static str) -> Result<(File, u64)> {
    let file = open_regular(path, what)?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    Ok((file, len))
}

/// Refuses a column (or tensor) that no shard may hold (docs/FORMAT.md section 9, the
/// constants readers use): an empty or reserved name, or more than [`MAX_RANK`] dimensions.
pub(super) fn check_column(path: &Path, name: &str, shape: &[u64]) -> Result<()> {
    if name.is_empty() || name == "__metadata__" {
        return Err(Error::InvalidArgument(format!(
            "{}: column name '{}' is empty or reserved",
            path.display(),
            crate::format::json::quote(name)
        )));
    }
    if shape.len() > MAX_RANK {
        return Err(Error::InvalidArgument(format!(
            "{}: '{}' has {} dimensions, more than the {MAX_RANK} a shard may hold",
            path.display(),
            crate::format::json::quote(name),
            shape.len()
        )));
    }
    Ok(())
}

/// Refuses input `path` (of metadata `meta`: its open file's, or the path's) when an earlier
/// input is the same file (same device and inode: another path to it, a hard link or a
/// symbolic link included).
pub(crate) fn refuse_same_file(
    seen: &mut HashMap<(u64, u64), PathBuf>,
    path: &Path,
    meta: &std::fs::Metadata,
) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let Some(first) = seen.insert((meta.dev(), meta.ino()), path.to_path_buf()) {
            return Err(Error::InvalidArgument(format!(
                "{}: given twice (also as {}): the same file cannot be two inputs",
                path.display(),
                first.display()
            )));
        }
    }
    #[cfg(not(unix))]
    let _ = (seen, path, meta);
    Ok(())
}

/// Where some bytes of a column come from.
#[derive(Debug)]
enum Source {
    File { file: usize, offset: u64 },
    Mem { input: usize },
}

/// Some bytes of a column.
#[derive(Debug)]
pub(super) struct Piece {
    source: Source,
    pub len: u64,
}

/// A column (dataset) or a tensor (tensors), and where its bytes come from.
#[derive(Debug)]
pub(super) struct Col {
    pub name: String,
    pub dtype: Dtype,
    /// Row shape (dataset) or full shape (tensors).
    pub shape: Vec<u64>,
    pub rows: u64,
    pub row_bytes: u64,
    pub encrypted: bool,
    /// The input of its first piece (for errors).
    pub input: PathBuf,
    /// From a `.npy` input, which holds one column named after its file: its name may not
    /// repeat (safetensors and in-memory inputs of the same name are concatenated by rows).
    pub single: bool,
    /// Its bytes, concatenated in input order.
    pub pieces: Vec<Piece>,
}

/// Inputs opened for reading.
pub(super) struct Sources<'a> {
    files: Vec<(PathBuf, File)>,
    inputs: &'a [ConvertInput],
}

impl Sources<'_> {
    /// Copies bytes `[offset, offset + dst.len())` of the column's concatenated pieces.
    pub(super) fn read(&self, col: &Col, mut offset: u64, mut dst: &mut [u8]) -> Result<()> {
        for p in &col.pieces {
            if dst.is_empty() {
                break;
            }
            if offset >= p.len {
                offset -= p.len;
                continue;
            }
            let n = ((p.len - offset) as usize).min(dst.len());
            let (head, tail) = dst.split_at_mut(n);
            match p.source {
                Source::File { file, offset: base } => {
                    let (path, f) = &self.files[file];
                    read_at(f, path, base + offset, head)?;
                }
                Source::Mem { input } => {
                    let ConvertInput::InMemory { data, .. } = &self.inputs[input] else {
                        unreachable!("Mem source is InMemory")
                    };
                    head.copy_from_slice(&data[offset as usize..offset as usize + n]);
                }
            }
            dst = tail;
            offset = 0;
        }
        Ok(())
    }
}

/// What [`plan`] decided.
pub(super) struct Plan<'a> {
    /// Dataset (columns share rows) or tensors (one file of unrelated tensors).
    pub kind: DatasetKind,
    /// The columns, in input order.
    pub cols: Vec<Col>,
    /// The inputs, opened for reading the columns' bytes.
    pub sources: Sources<'a>,
    /// The inputs' metadata, later inputs overriding earlier ones.
    pub metadata: BTreeMap<String, String>,
}

/// Plans columns from the inputs: which kind, which pieces. `encrypted(name)` says whether a
/// column is to be encrypted.
pub(super) fn plan<'a>(
    inputs: &'a [ConvertInput],
    encrypted: &dyn Fn(&str) -> bool,
) -> Result<Plan<'a>> {
    if inputs.is_empty() {
        return Err(Error::InvalidArgument("no input to convert".into()));
    }
    let mut files = Vec::new();
    // Each input file by device and inode: the same file given twice, by any path, is refused.
    let mut file_ids: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut meta = BTreeMap::new();
    // (name, dtype, full shape, source, input, from a .npy input) in input order.
    let mut items: Vec<(String, Dtype, Vec<u64>, Piece, PathBuf, bool)> = Vec::new();
    let mut first_names: Option<(PathBuf, Vec<String>)> = None;
    let mut lone_tensors = None;
    for (i, input) in inputs.iter().enumerate() {
        let (path, opened) = match input {
            ConvertInput::Safetensors(path) => {
                let opened = safetensors::open_input(path)?;
                let tensors = &opened.tensors;
                let mut names: Vec<String> = tensors.iter().map(|t| t.name.clone()).collect();
                names.sort();
                match &first_names {
                    None => first_names = Some((path.clone(), names)),
                    Some((p0, n0)) if *n0 != names => {
                        return Err(Error::InvalidArgument(format!(
                            "{} has tensors {names:?} but {} has {n0:?}: safetensors inputs are concatenated by rows and must hold the same columns",
                            path.display(),
                            p0.display()
                        )));
                    }
                    Some(_) => {}
                }
                let first = tensors[0].shape.first().copied();
                let is_dataset =
                    first.is_some() && tensors.iter().all(|t| t.shape.first().copied() == first);
                if !is_dataset {
                    if inputs.len() != 1 {
                        return Err(Error::InvalidArgument(format!(
                            "{}: its tensors do not share a first dimension (not a dataset); convert such a file (e.g. model weights) on its own",
                            path.display()
                        )));
                    }
                    lone_tensors = Some(());
                }
                (path, opened)
            }
            ConvertInput::Npy { column, path } => (path, npy::open_input(path, column)?),
            ConvertInput::Ragged { .. }
            | ConvertInput::Parquet(_)
            | ConvertInput::ArrowIpc(_)
            | ConvertInput::Arrow(_)
            | ConvertInput::Jsonl { .. } => {
                return Err(Error::InvalidArgument(
                    "row-batch inputs (ragged columns, Parquet, Arrow, JSONL) cannot be read as byte ranges"
                        .into(),
                ));
            }
            ConvertInput::InMemory {
                name,
                dtype,
                shape,
                data,
            } => {
                if tensor_bytes(*dtype, shape) != Some(data.len() as u64) {
                    return Err(Error::InvalidArgument(format!(
                        "in-memory column '{name}': {} bytes do not match dtype {dtype} and shape {shape:?}",
                        data.len()
                    )));
                }
                let piece = Piece {
                    source: Source::Mem { input: i },
                    len: data.len() as u64,
                };
                items.push((
                    name.clone(),
                    *dtype,
                    shape.clone(),
                    piece,
                    PathBuf::from("<memory>"),
                    false,
                ));
                continue;
            }
        };
        let file_meta = opened.file.metadata().map_err(|e| Error::io(path, e))?;
        refuse_same_file(&mut file_ids, path, &file_meta)?;
        let single = matches!(input, ConvertInput::Npy { .. });
        meta.extend(opened.metadata);
        files.push((path.clone(), opened.file));
        // Room for exactly these (doubling could reserve twice what a large input needs).
        items.reserve_exact(opened.tensors.len());
        for t in opened.tensors {
            let piece = Piece {
                source: Source::File {
                    file: files.len() - 1,
                    offset: t.offset,
                },
                len: t.len,
            };
            items.push((t.name, t.dtype, t.shape, piece, path.clone(), single));
        }
    }
    let sources = Sources { files, inputs };
    for (name, _, shape, _, path, _) in &items {
        check_column(path, name, shape)?;
    }
    if lone_tensors.is_some() {
        let cols = items
            .into_iter()
            .map(|(name, dtype, shape, piece, input, single)| Col {
                encrypted: encrypted(&name),
                input,
                single,
                row_bytes: 0,
                rows: 0,
                name,
                dtype,
                shape,
                pieces: vec![piece],
            })
            .collect();
        return Ok(Plan {
            kind: DatasetKind::Tensors,
            cols,
            sources,
            metadata: meta,
        });
    }
    let mut cols: Vec<Col> = Vec::new();
    // Column index by name: inputs may hold up to 2^20 tensors each, so no pairwise search.
    let mut index: HashMap<String, usize> = HashMap::new();
    for (name, dtype, shape, piece, path, single) in items {
        let Some((&rows, row_shape)) = shape.split_first() else {
            return Err(Error::InvalidArgument(format!(
                "{}: '{name}' is a scalar; a dataset's columns share a first dimension (the row count)",
                path.display()
            )));
        };
        // The whole shape's size fits (the readers checked it), but a tensor with no rows has
        // size 0 whatever its row shape: one row's size is checked on its own.
        let Some(row_bytes) = tensor_bytes(dtype, row_shape) else {
            return Err(Error::InvalidArgument(format!(
                "{}: tensor '{name}' of shape {shape:?}: one row of {row_shape:?} {dtype} is more than 2^64 bytes",
                path.display()
            )));
        };
        match index.get(&name).map(|&i| &mut cols[i]) {
            Some(c) => {
                // Safetensors (and in-memory) inputs share columns, their rows concatenated;
                // a .npy column's name repeating another column's is a mistake.
                if single || c.single {
                    return Err(Error::InvalidArgument(format!(
                        "column '{}' is given twice, by {} and by {}: a .npy input is one column named after its file; rename one",
                        crate::format::json::quote(&name),
                        c.input.display(),
                        path.display()
                    )));
                }
                if c.dtype != dtype || c.shape != row_shape {
                    return Err(Error::InvalidArgument(format!(
                        "{}: column '{name}' is {dtype} {row_shape:?} per row here but {} {:?} in an earlier input",
                        path.display(),
                        c.dtype,
                        c.shape
                    )));
                }
                // Rows of one row size summed over inputs: each input's bytes fit, their sum
                // need not (zero-width rows, or inputs claiming 2^63 bytes each).
                let total = c
                    .rows
                    .checked_add(rows)
                    .filter(|r| r.checked_mul(row_bytes).is_some());
                let Some(total) = total else {
                    return Err(Error::InvalidArgument(format!(
                        "{}: column '{name}' would hold more than 2^64 rows or bytes with this input's {rows} rows",
                        path.display()
                    )));
                };
                c.rows = total;
                c.pieces.push(piece);
            }
            None => {
                if cols.len() == MAX_TENSORS {
                    return Err(Error::InvalidArgument(format!(
                        "{}: more than {MAX_TENSORS} columns, the most a manifest may list",
                        path.display()
                    )));
                }
                index.insert(name.clone(), cols.len());
                cols.push(Col {
                    encrypted: encrypted(&name),
                    name,
                    dtype,
                    shape: row_shape.to_vec(),
                    rows,
                    row_bytes,
                    pieces: vec![piece],
                    input: path,
                    single,
                });
            }
        }
    }
    let rows = cols[0].rows;
    if let Some(c) = cols.iter().find(|c| c.rows != rows) {
        return Err(Error::InvalidArgument(format!(
            "columns have different row counts: '{}' ({}) has {rows}, '{}' ({}) has {}",
            cols[0].name,
            cols[0].input.display(),
            c.name,
            c.input.display(),
            c.rows
        )));
    }
    // The inputs, for errors about all the columns.
    let inputs = || {
        let mut seen = std::collections::HashSet::new();
        cols.iter()
            .filter(|c| seen.insert(&c.input))
            .map(|c| c.input.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    // Rows are only bounded by the data if some column's rows hold bytes: a dataset of
    // zero-width columns could claim 2^64 rows in a few bytes of header, and everything sized
    // by rows (the loader's plan) would follow. A zero-width column beside a normal one is
    // fine (delivered as a [B, 0] tensor).
    if cols.iter().all(|c| c.row_bytes == 0) {
        let names: Vec<&str> = cols.iter().map(|c| c.name.as_str()).collect();
        return Err(Error::InvalidArgument(format!(
            "{}: every column has zero-byte rows ({names:?}, {rows} rows): a dataset needs at least one column whose rows hold data",
            inputs()
        )));
    }
    // One row of all columns, and all the data, within u64 (each column's rows x row bytes
    // fits: checked above), so the converter's per-shard sums cannot wrap.
    let fits = cols.iter().try_fold((0u64, 0u64), |(row, total), c| {
        Some((
            row.checked_add(c.row_bytes)?,
            total.checked_add(c.rows.checked_mul(c.row_bytes)?)?,
        ))
    });
    if fits.is_none() {
        return Err(Error::InvalidArgument(format!(
            "{}: the columns together hold more than 2^64 bytes (per row or in all)",
            inputs()
        )));
    }
    Ok(Plan {
        kind: DatasetKind::Dataset,
        cols,
        sources,
        metadata: meta,
    })
}
