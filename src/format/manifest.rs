//! `manifest.json`: what a dataset holds (docs/FORMAT.md section 5).

#![forbid(unsafe_code)]

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::shard::{J, check_fields, check_format_version, parse_hex};
use super::{Dtype, shard_file_name};
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
    /// Shape of one row (`dataset`) or the full shape (`tensors`).
    pub shape: Vec<u64>,
    /// Whether the column is encrypted.
    pub encrypted: bool,
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

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ColumnJson {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    encrypted: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShardJson {
    file: String,
    row_start: u64,
    rows: u64,
    bytes: u64,
    header_digest: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestJson {
    format: String,
    version: u32,
    dataset_id: String,
    kind: String,
    rows: u64,
    chunk_size: u64,
    columns: Vec<ColumnJson>,
    shards: Vec<ShardJson>,
}

impl Manifest {
    /// Parses and checks a manifest's syntax (the dataset cross-check is [`super::Dataset::open`]'s).
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::format(path, WHAT, format!("invalid JSON: {e}")))?;
        check_format_version(path, WHAT, &v, "ciphershard-dataset")?;
        use J::*;
        check_fields(
            path,
            WHAT,
            "",
            &v,
            &[
                ("format", Str),
                ("version", Uint),
                ("dataset_id", Str),
                ("kind", Str),
                ("rows", Uint),
                ("chunk_size", Uint),
                ("columns", Arr),
                ("shards", Arr),
            ],
        )?;
        for (i, c) in v["columns"].as_array().into_iter().flatten().enumerate() {
            check_fields(
                path,
                WHAT,
                &format!("columns[{i}]: "),
                c,
                &[
                    ("name", Str),
                    ("dtype", Str),
                    ("shape", Arr),
                    ("encrypted", Bool),
                ],
            )?;
        }
        for (i, s) in v["shards"].as_array().into_iter().flatten().enumerate() {
            check_fields(
                path,
                WHAT,
                &format!("shards[{i}]: "),
                s,
                &[
                    ("file", Str),
                    ("row_start", Uint),
                    ("rows", Uint),
                    ("bytes", Uint),
                    ("header_digest", Str),
                ],
            )?;
        }
        let j: ManifestJson =
            serde_json::from_value(v).map_err(|e| Error::format(path, WHAT, e.to_string()))?;
        let kind = match j.kind.as_str() {
            "dataset" => DatasetKind::Dataset,
            "tensors" => DatasetKind::Tensors,
            k => {
                return Err(Error::format(
                    path,
                    WHAT,
                    format!("kind '{k}' is neither 'dataset' nor 'tensors'"),
                ));
            }
        };
        let columns = j
            .columns
            .into_iter()
            .map(|c| {
                let dtype = c.dtype.parse().map_err(|_| Error::Unsupported {
                    path: path.into(),
                    what: "dtype",
                    found: c.dtype.clone(),
                    supported: "the safetensors dtypes".into(),
                })?;
                Ok(Column {
                    name: c.name,
                    dtype,
                    shape: c.shape,
                    encrypted: c.encrypted,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if j.shards.is_empty() || j.shards.len() > u32::MAX as usize {
            return Err(Error::format(
                path,
                WHAT,
                "a dataset has between 1 and 2^32-1 shards",
            ));
        }
        let shards = j
            .shards
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                // Shard files are named by index, never by an arbitrary path from the file.
                if s.file != shard_file_name(i as u32) {
                    return Err(Error::format(
                        path,
                        WHAT,
                        format!(
                            "shard {i} is named '{}', expected '{}'",
                            s.file,
                            shard_file_name(i as u32)
                        ),
                    ));
                }
                Ok(ShardEntry {
                    header_digest: parse_hex::<32>(path, WHAT, "header_digest", &s.header_digest)?,
                    file: s.file,
                    row_start: s.row_start,
                    rows: s.rows,
                    bytes: s.bytes,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Manifest {
            dataset_id: parse_hex::<16>(path, WHAT, "dataset_id", &j.dataset_id)?,
            kind,
            rows: j.rows,
            chunk_size: j.chunk_size,
            columns,
            shards,
        })
    }

    /// Serializes the manifest (compact JSON plus a trailing newline).
    pub fn to_json(&self) -> String {
        let j = ManifestJson {
            format: "ciphershard-dataset".into(),
            version: super::FORMAT_VERSION,
            dataset_id: hex::encode(self.dataset_id),
            kind: self.kind.as_str().into(),
            rows: self.rows,
            chunk_size: self.chunk_size,
            columns: self
                .columns
                .iter()
                .map(|c| ColumnJson {
                    name: c.name.clone(),
                    dtype: c.dtype.as_str().into(),
                    shape: c.shape.clone(),
                    encrypted: c.encrypted,
                })
                .collect(),
            shards: self
                .shards
                .iter()
                .map(|s| ShardJson {
                    file: s.file.clone(),
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
