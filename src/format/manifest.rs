//! `manifest.json`: what a dataset holds (docs/FORMAT.md section 5).

#![forbid(unsafe_code)]

use std::path::Path;

use serde::Serialize;

use super::json::{self, AnyString, DtypeName, Hex, List, json_object};
use super::{
    Dtype, FORMAT_VERSION, MAX_RANK, MAX_SHARDS, MAX_TENSORS, OFFSETS_SUFFIX,
    OLDEST_FORMAT_VERSION, shard_file_name,
};
use crate::error::{Error, Result};

const WHAT: &str = "manifest";

/// Whether a dataset holds rows (columns sharing a first dimension) or arbitrary tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetKind {
    /// Every tensor's first dimension is the row count; rows are split across shards.
    Dataset,
    /// One shard of arbitrary tensors (e.g. model weights).
    Tensors,
}

impl DatasetKind {
    /// The manifest's name for the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetKind::Dataset => "dataset",
            DatasetKind::Tensors => "tensors",
        }
    }
}

/// One column (or, for a `tensors` dataset, one tensor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape of one row (`dataset`), of one element of a row (a ragged column), or the full
    /// shape (`tensors`).
    pub shape: Vec<u64>,
    /// Whether the column is encrypted.
    pub encrypted: bool,
    /// Whether rows hold a variable number of elements (format version 2): stored per shard
    /// as a values tensor and a row-offsets tensor.
    pub ragged: bool,
}

impl Column {
    /// How many tensors the column takes in each shard: 2 for a ragged one (values, row
    /// offsets), 1 otherwise.
    pub fn tensor_count(&self) -> usize {
        if self.ragged { 2 } else { 1 }
    }
}

/// One shard as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardEntry {
    /// File name inside the dataset directory (`shard-NNNNN.safetensors`).
    pub file: String,
    /// Global index of the shard's first row.
    pub row_start: u64,
    /// Rows in the shard.
    pub rows: u64,
    /// File size.
    pub bytes: u64,
    /// SHA-256 of the shard's descriptor string.
    pub header_digest: [u8; 32],
}

/// The parsed `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Format version (1 or 2; [`FORMAT_VERSION`] for a new dataset).
    pub version: u32,
    /// Dataset id shared by every shard.
    pub dataset_id: [u8; 16],
    /// Dataset or tensors.
    pub kind: DatasetKind,
    /// Total rows (0 for `tensors`).
    pub rows: u64,
    /// Bytes per chunk.
    pub chunk_size: u64,
    /// Columns, in shard tensor order.
    pub columns: Vec<Column>,
    /// Shards, in index order.
    pub shards: Vec<ShardEntry>,
}

json_object! {
    struct ColumnJsonV1 {
        name: Box<str>,
        dtype: DtypeName,
        shape: List<u64, MAX_RANK>,
        encrypted: bool,
    }
}

json_object! {
    struct ColumnJson {
        name: Box<str>,
        dtype: DtypeName,
        shape: List<u64, MAX_RANK>,
        encrypted: bool,
        ragged: bool,
    }
}

impl From<ColumnJsonV1> for ColumnJson {
    fn from(c: ColumnJsonV1) -> Self {
        ColumnJson {
            name: c.name,
            dtype: c.dtype,
            shape: c.shape,
            encrypted: c.encrypted,
            ragged: false,
        }
    }
}

json_object! {
    struct ShardJson {
        file: Box<str>,
        row_start: u64,
        rows: u64,
        bytes: u64,
        header_digest: Hex<32>,
    }
}

/// Declares a manifest's typed structure for one version's column entries: the versions
/// differ only there (version 2 added `ragged`).
macro_rules! manifest_json {
    ($name:ident, $column:ty) => {
        json_object! {
            // `format` and `version` are required here but checked by the probe that runs
            // first (json::check_format_version), so they are read and not kept.
            #[allow(dead_code)]
            struct $name {
                format: AnyString,
                version: u64,
                dataset_id: Hex<16>,
                kind: String,
                rows: u64,
                chunk_size: u64,
                columns: List<$column, MAX_TENSORS>,
                shards: List<ShardJson, MAX_SHARDS>,
            }
        }
    };
}
manifest_json!(ManifestJsonV1, ColumnJsonV1);
manifest_json!(ManifestJson, ColumnJson);

impl From<ManifestJsonV1> for ManifestJson {
    fn from(m: ManifestJsonV1) -> Self {
        let columns: Vec<ColumnJson> = m.columns.0.into_vec().into_iter().map(Into::into).collect();
        ManifestJson {
            format: m.format,
            version: m.version,
            dataset_id: m.dataset_id,
            kind: m.kind,
            rows: m.rows,
            chunk_size: m.chunk_size,
            columns: List(columns.into_boxed_slice()),
            shards: m.shards,
        }
    }
}

/// What `to_json` writes (field order is the file's).
#[derive(Serialize)]
struct ColumnOut<'a> {
    name: &'a str,
    dtype: &'a str,
    shape: &'a [u64],
    encrypted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    ragged: Option<bool>,
}

#[derive(Serialize)]
struct ShardOut<'a> {
    file: &'a str,
    row_start: u64,
    rows: u64,
    bytes: u64,
    header_digest: String,
}

#[derive(Serialize)]
struct ManifestOut<'a> {
    format: &'a str,
    version: u32,
    dataset_id: String,
    kind: &'a str,
    rows: u64,
    chunk_size: u64,
    columns: Vec<ColumnOut<'a>>,
    shards: Vec<ShardOut<'a>>,
}

impl Manifest {
    /// Parses and checks a manifest's syntax, typed and bounded (docs/FORMAT.md section 9);
    /// the dataset cross-check is [`super::Dataset::open`]'s.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self> {
        let version = json::check_format_version(
            path,
            WHAT,
            bytes,
            "ciphershard-dataset",
            OLDEST_FORMAT_VERSION..=FORMAT_VERSION,
            None,
        )?;
        let j: ManifestJson = if version == 1 {
            json::parse_object::<ManifestJsonV1>(path, WHAT, bytes)?.into()
        } else {
            json::parse_object(path, WHAT, bytes)?
        };
        let kind = match j.kind.as_str() {
            "dataset" => DatasetKind::Dataset,
            "tensors" => DatasetKind::Tensors,
            k => {
                return Err(Error::format(
                    path,
                    WHAT,
                    format!(
                        "kind '{}' is neither 'dataset' nor 'tensors'",
                        json::quote(k)
                    ),
                ));
            }
        };
        let columns = j
            .columns
            .0
            .into_vec()
            .into_iter()
            .map(|c| {
                Ok(Column {
                    name: c.name.into(),
                    dtype: c.dtype.get(path)?,
                    shape: c.shape.0.into(),
                    encrypted: c.encrypted,
                    ragged: c.ragged,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // The tensor names the columns take in each shard (a ragged column's row offsets too)
        // are unique: checked on the columns and their offsets' names together.
        let offsets_names: Vec<String> = columns
            .iter()
            .filter(|c| c.ragged)
            .map(|c| format!("{}{OFFSETS_SUFFIX}", c.name))
            .collect();
        let names = columns
            .iter()
            .map(|c| c.name.as_str())
            .chain(offsets_names.iter().map(String::as_str));
        if let Some(name) = json::first_repeat(names) {
            return Err(Error::format(
                path,
                WHAT,
                format!(
                    "column '{}' is listed twice (a ragged column 'c' also takes the name 'c{OFFSETS_SUFFIX}')",
                    json::quote(name)
                ),
            ));
        }
        if kind == DatasetKind::Tensors && columns.iter().any(|c| c.ragged) {
            return Err(Error::format(
                path,
                WHAT,
                "a 'tensors' dataset has no rows, so no ragged column",
            ));
        }
        if j.shards.0.is_empty() {
            return Err(Error::format(
                path,
                WHAT,
                format!("a dataset has between 1 and {MAX_SHARDS} shards"),
            ));
        }
        let shards = j
            .shards
            .0
            .into_vec()
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                // Shard files are named by index, never by an arbitrary path from the file.
                // (`i` < MAX_SHARDS < 2^32: the list's cap.)
                let want = shard_file_name(i as u32);
                if *s.file != want {
                    return Err(Error::format(
                        path,
                        WHAT,
                        format!(
                            "shard {i} is named '{}', expected '{want}'",
                            json::quote(&s.file),
                        ),
                    ));
                }
                Ok(ShardEntry {
                    header_digest: s.header_digest.0,
                    file: s.file.into(),
                    row_start: s.row_start,
                    rows: s.rows,
                    bytes: s.bytes,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Manifest {
            version,
            dataset_id: j.dataset_id.0,
            kind,
            rows: j.rows,
            chunk_size: j.chunk_size,
            columns,
            shards,
        })
    }

    /// Serializes the manifest (compact JSON plus a trailing newline).
    pub fn to_json(&self) -> String {
        let j = ManifestOut {
            format: "ciphershard-dataset",
            version: self.version,
            dataset_id: hex::encode(self.dataset_id),
            kind: self.kind.as_str(),
            rows: self.rows,
            chunk_size: self.chunk_size,
            columns: self
                .columns
                .iter()
                .map(|c| ColumnOut {
                    name: &c.name,
                    dtype: c.dtype.as_str(),
                    shape: &c.shape,
                    encrypted: c.encrypted,
                    ragged: (self.version >= 2).then_some(c.ragged),
                })
                .collect(),
            shards: self
                .shards
                .iter()
                .map(|s| ShardOut {
                    file: &s.file,
                    row_start: s.row_start,
                    rows: s.rows,
                    bytes: s.bytes,
                    header_digest: hex::encode(s.header_digest),
                })
                .collect(),
        };
        let mut s = serde_json::to_string(&j).expect("manifest serializes");
        s.push('\n');
        s
    }
}
