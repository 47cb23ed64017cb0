//! What the loader needs from a dataset: shards of rows, columns, and sealed chunks.
//!
//! The pipeline is written against this small trait so that the sampler, the stages and the
//! failure paths can be tested on their own; [`super::FormatSource`] implements it over a real
//! `format::UnlockedDataset`.

#![forbid(unsafe_code)]

use crate::cipher::{ChunkOpener, NONCE_LEN, TAG_LEN};
use crate::error::ChunkLocation;
use crate::store::ShardStore;

/// Length of a chunk's associated data (docs/FORMAT.md, section 4.2).
pub const AAD_LEN: usize = 89;

/// One column of the dataset: every shard holds `rows × row_bytes` bytes of it, or, for a
/// ragged column, a variable number of elements per row ([`RowSource::row_offsets`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ColumnInfo {
    /// Tensor name.
    pub name: String,
    /// safetensors dtype name (`F32`, `I64`, ...).
    pub dtype: String,
    /// Bytes of one element.
    pub elem_size: usize,
    /// Shape of one row (the tensor's shape without its first dimension).
    pub row_shape: Vec<u64>,
    /// Bytes of one row (of one element, for a ragged column).
    pub row_bytes: u64,
    /// Rows hold a variable number of elements: `row_shape` and `row_bytes` are then an
    /// element's, and a shard's rows are delimited by [`RowSource::row_offsets`].
    #[serde(default)]
    pub ragged: bool,
}

impl ColumnInfo {
    /// Bytes `[a, b)` of shard `s`'s tensor of column `c` (this column) that rows
    /// `[r0, r0 + n)` occupy.
    pub fn byte_range(
        &self,
        source: &dyn RowSource,
        s: usize,
        c: usize,
        r0: u64,
        n: u64,
    ) -> (u64, u64) {
        if self.ragged {
            let o = source.row_offsets(s, c);
            (
                o[r0 as usize] * self.row_bytes,
                o[(r0 + n) as usize] * self.row_bytes,
            )
        } else {
            (r0 * self.row_bytes, (r0 + n) * self.row_bytes)
        }
    }
}

/// Where one chunk lives and how to open it.
#[derive(Debug, Clone)]
pub struct ChunkSpec {
    /// Offset of the chunk in the shard's bytes (read through [`RowSource::store`]).
    pub file_offset: u64,
    /// Chunk length in bytes.
    pub len: usize,
    /// The chunk's GCM nonce.
    pub nonce: [u8; NONCE_LEN],
    /// The chunk's associated data.
    pub aad: [u8; AAD_LEN],
    /// The stored tag.
    pub tag: [u8; TAG_LEN],
    /// Ciphertext (`true`) or authenticated plaintext (`false`).
    pub encrypted: bool,
}

/// A dataset of row-sharded columns whose chunks the loader reads, verifies and opens.
///
/// Column `c` of shard `s` is a tensor of `shard_rows(s) × columns()[c].row_bytes` bytes, split
/// into chunks of `chunk_size()` bytes (the last one shorter).
pub trait RowSource: Send + Sync {
    /// Number of shards.
    fn shard_count(&self) -> usize;
    /// Rows held by shard `s`.
    fn shard_rows(&self, s: usize) -> u64;
    /// Global index of shard `s`'s first row.
    fn shard_row_start(&self, s: usize) -> u64;
    /// Where the shards' bytes are read from (shard `s` of the store is shard `s` here).
    fn store(&self) -> &dyn ShardStore;
    /// The columns, in a fixed order.
    fn columns(&self) -> &[ColumnInfo];
    /// Bytes per chunk.
    fn chunk_size(&self) -> u64;
    /// Chunk `j` of column `c` in shard `s`.
    fn chunk(&self, s: usize, c: usize, j: u64) -> ChunkSpec;
    /// The prepared data key of shard `s`.
    fn opener(&self, s: usize) -> &dyn ChunkOpener;
    /// Names chunk `j` of column `c` in shard `s` for an integrity error.
    fn location(&self, s: usize, c: usize, j: u64) -> ChunkLocation;
    /// Ragged column `c`'s row offsets in shard `s`, authenticated and checked: `rows + 1`
    /// element offsets, 0 first, non-decreasing. Empty for a fixed column.
    fn row_offsets(&self, _s: usize, _c: usize) -> &[u64] {
        &[]
    }
    /// Total rows.
    fn total_rows(&self) -> u64 {
        (0..self.shard_count())
            .map(|s| self.shard_rows(s))
            .fold(0, u64::saturating_add)
    }
}
