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

/// One column of the dataset: every shard holds `rows × row_bytes` bytes of it.
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
    /// Bytes of one row.
    pub row_bytes: u64,
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
    /// Total rows.
    fn total_rows(&self) -> u64 {
        (0..self.shard_count())
            .map(|s| self.shard_rows(s))
            .fold(0, u64::saturating_add)
    }
}
