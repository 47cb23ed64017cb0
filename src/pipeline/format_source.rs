//! [`RowSource`] over a real encrypted dataset (`format::UnlockedDataset`).

#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::Arc;

use super::source::{ChunkSpec, ColumnInfo, RowSource};
use crate::cipher::{Backend, ChunkOpener, Cipher};
use crate::error::{ChunkLocation, Error, Result};
use crate::format::{Dataset, DatasetKind, MANIFEST_FILE, UnlockedDataset, tensor_bytes};
use crate::keys::{DataKey, MasterKey};
use crate::store::{OpenOptions, ShardStore};

/// A dataset whose headers are authenticated and data keys prepared, seen as rows × columns.
pub struct FormatSource {
    ds: UnlockedDataset,
    columns: Vec<ColumnInfo>,
    /// `tensor_index[s][c]`: index of column `c` in shard `s`'s descriptor (its values
    /// tensor, for a ragged column).
    tensor_index: Vec<Vec<u32>>,
    /// `row_offsets[s][c]`: ragged column `c`'s checked row offsets in shard `s` (empty for a
    /// fixed column). Held for as long as the source: 8 bytes per row and ragged column.
    row_offsets: Vec<Vec<Vec<u64>>>,
}

impl std::fmt::Debug for FormatSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FormatSource")
            .field("dir", &self.ds.dataset().dir())
            .field("columns", &self.columns)
            .finish()
    }
}

impl FormatSource {
    /// Opens the dataset at `path` (directory or shard file), unwraps its data keys with `key`
    /// on `backend` and checks that every shard holds every column with its rows.
    pub fn open(path: &Path, key: &MasterKey, backend: Backend) -> Result<Arc<Self>> {
        Self::open_with(path, &OpenOptions::default(), key, backend)
    }

    /// [`FormatSource::open`] with object-store settings (`opts`) over the environment's.
    pub fn open_with(
        path: &Path,
        opts: &OpenOptions,
        key: &MasterKey,
        backend: Backend,
    ) -> Result<Arc<Self>> {
        let ds = Dataset::open_with(path, opts)?;
        let cipher = crate::cipher::select(backend)?;
        Ok(Arc::new(FormatSource::new(
            ds.unlock(key, cipher.as_ref())?,
        )?))
    }

    /// Wraps an unlocked dataset.
    pub fn new(ds: UnlockedDataset) -> Result<Self> {
        let d = ds.dataset();
        let m = d.manifest();
        if m.kind != DatasetKind::Dataset {
            return Err(Error::InvalidArgument(format!(
                "{}: holds arbitrary tensors (kind 'tensors'), not rows: the loader needs a dataset",
                d.dir().display()
            )));
        }
        let mpath = d.dir().join(MANIFEST_FILE);
        let columns: Vec<ColumnInfo> = m
            .columns
            .iter()
            .map(|c| {
                // The row shape comes from the manifest: its byte size may overflow u64 (a
                // zero-row dataset of [0, 2^62, 2^62] tensors is well-formed).
                let row_bytes = tensor_bytes(c.dtype, &c.shape).ok_or_else(|| {
                    Error::format(
                        d.dir().join(MANIFEST_FILE),
                        "manifest",
                        format!(
                            "column '{}': a row of shape {:?} is more than 2^64-1 bytes",
                            c.name, c.shape
                        ),
                    )
                })?;
                Ok(ColumnInfo {
                    name: c.name.clone(),
                    dtype: c.dtype.as_str().to_string(),
                    elem_size: c.dtype.size_bytes(),
                    row_shape: c.shape.clone(),
                    row_bytes,
                    ragged: c.ragged,
                })
            })
            .collect::<Result<_>>()?;
        // Rows are bounded by the data only if some column's rows hold bytes; a dataset of
        // zero-width columns (which `convert` never writes) could claim 2^64 rows, and the
        // loader's plan is sized by rows.
        if columns.iter().all(|c| !c.ragged && c.row_bytes == 0) {
            return Err(Error::format(
                &mpath,
                "dataset",
                format!(
                    "every column has zero-byte rows ({} rows): a dataset needs at least one column whose rows hold data",
                    m.rows
                ),
            ));
        }
        let mut tensor_index = Vec::new();
        // Checks the tags of chunks that hold no bytes (zero-width columns): no batch ever
        // reads them, so without this a changed tag would pass unnoticed (`verify` refuses
        // it). One GMAC over the chunk's associated data each, on the CPU (whatever the
        // backend), once per dataset.
        let cpu = crate::cipher::cpu::CpuCipher::new();
        for (s, h) in d.shards().iter().enumerate() {
            let empty: Vec<u32> = (0..h.descriptor.tensors.len() as u32)
                .filter(|&t| h.descriptor.tensors[t as usize].is_empty())
                .collect();
            if empty.is_empty() {
                continue;
            }
            let opener = cpu.prepare(ds.data_key(s))?;
            for c in empty.into_iter().flat_map(|t| h.chunks(t)) {
                opener
                    .verify(&c.params(), &[])
                    .map_err(|_| Error::Integrity(h.chunk_location(&c)))?;
            }
        }
        let mut row_offsets = Vec::new();
        for (s, h) in d.shards().iter().enumerate() {
            let rows = h.descriptor.rows;
            let mut idx = Vec::new();
            let mut offsets = Vec::new();
            // `Dataset::open` checked that the columns take the shard's tensors in order (a
            // ragged one two: values, row offsets): no lookup by name (a linear search per
            // column is quadratic in the column count).
            let mut ti = 0usize;
            for col in columns.iter() {
                let Some(t) = h.descriptor.tensors.get(ti).filter(|t| t.name == col.name) else {
                    return Err(Error::format(
                        &h.path,
                        "shard",
                        format!("column '{}' is missing", col.name),
                    ));
                };
                let this = ti as u32;
                ti += if col.ragged { 2 } else { 1 };
                if col.ragged {
                    // Authenticated and checked against the values before any row is read.
                    offsets.push(crate::format::read_row_offsets(&ds, s, this)?);
                    idx.push(this);
                    continue;
                }
                offsets.push(Vec::new());
                let holds = rows
                    .checked_mul(col.row_bytes)
                    .is_some_and(|n| t.offsets.1.checked_sub(t.offsets.0) == Some(n));
                if t.shape.first() != Some(&rows) || !holds {
                    return Err(Error::format(
                        &h.path,
                        "shard",
                        format!(
                            "tensor '{}' does not hold {rows} rows of {} bytes",
                            col.name, col.row_bytes
                        ),
                    ));
                }
                idx.push(this);
            }
            tensor_index.push(idx);
            row_offsets.push(offsets);
        }
        Ok(FormatSource {
            ds,
            columns,
            tensor_index,
            row_offsets,
        })
    }

    /// The unlocked dataset.
    pub fn dataset(&self) -> &UnlockedDataset {
        &self.ds
    }

    /// Shard `s`'s data key, unwrapped once when the dataset was unlocked: GPU backends
    /// prepare their own key material from it.
    pub fn data_key(&self, s: usize) -> &DataKey {
        self.ds.data_key(s)
    }
}

impl RowSource for FormatSource {
    fn shard_count(&self) -> usize {
        self.ds.dataset().shards().len()
    }
    fn shard_rows(&self, s: usize) -> u64 {
        self.ds.dataset().shards()[s].descriptor.rows
    }
    fn shard_row_start(&self, s: usize) -> u64 {
        self.ds.dataset().shards()[s].descriptor.row_start
    }
    fn store(&self) -> &dyn ShardStore {
        self.ds.dataset().store().as_ref()
    }
    fn columns(&self) -> &[ColumnInfo] {
        &self.columns
    }
    fn chunk_size(&self) -> u64 {
        self.ds.dataset().manifest().chunk_size
    }
    fn chunk(&self, s: usize, c: usize, j: u64) -> ChunkSpec {
        let r = self.ds.dataset().shards()[s].chunk(self.tensor_index[s][c], j);
        ChunkSpec {
            file_offset: r.file_offset,
            len: r.len,
            nonce: r.nonce,
            aad: r.aad,
            tag: r.tag,
            encrypted: r.encrypted,
        }
    }
    fn opener(&self, s: usize) -> &dyn ChunkOpener {
        self.ds.opener(s)
    }
    fn location(&self, s: usize, c: usize, j: u64) -> ChunkLocation {
        let h = &self.ds.dataset().shards()[s];
        h.chunk_location(&h.chunk(self.tensor_index[s][c], j))
    }
    fn row_offsets(&self, s: usize, c: usize) -> &[u64] {
        &self.row_offsets[s][c]
    }
}
