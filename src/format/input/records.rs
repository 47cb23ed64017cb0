//! Row-batch inputs: formats that are decoded batch by batch rather than read at byte ranges
//! (Parquet, Arrow IPC, JSONL, ragged columns held in memory), and the columns they yield.
//!
//! Such an input knows its exact row count when it is opened (from a footer, message headers
//! or a first pass), so the converter can lay out every shard before sealing any; it then
//! pulls batches in order and never holds more than one shard's rows and one batch.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::Path;

use zeroize::Zeroizing;

use crate::error::Result;
use crate::format::Dtype;

/// One column of a row-batch input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldSpec {
    /// Column name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Fixed columns: the shape of one row. Ragged columns: the shape of one element of a
    /// row's list (`[]` for a list of scalars, `[3]` for a list of 3-vectors).
    pub shape: Vec<u64>,
    /// Whether rows hold a variable number of elements (values + offsets).
    pub ragged: bool,
}

/// One column's rows in a [`RowBatch`].
#[derive(Debug)]
pub enum ColumnData {
    /// `rows × row bytes`, little-endian, C order.
    Fixed(Zeroizing<Vec<u8>>),
    /// A ragged column: row `i` is elements `offsets[i]..offsets[i + 1]` of `values`.
    Ragged {
        /// The rows' elements, concatenated: `offsets[rows]` elements, little-endian.
        values: Zeroizing<Vec<u8>>,
        /// `rows + 1` element offsets, `offsets[0] == 0`, non-decreasing.
        offsets: Zeroizing<Vec<u64>>,
    },
}

/// Some consecutive rows of every column of an input, in the input's field order.
#[derive(Debug)]
pub struct RowBatch {
    /// Rows in this batch (at least 1).
    pub rows: usize,
    /// One entry per field, in [`RecordInput::fields`] order.
    pub columns: Vec<ColumnData>,
}

/// An input decoded batch by batch.
pub trait RecordInput: Send {
    /// The file (for errors).
    fn path(&self) -> &Path;
    /// Its columns.
    fn fields(&self) -> &[FieldSpec];
    /// Its exact row count, known when it was opened.
    fn rows(&self) -> u64;
    /// About how many plaintext bytes its rows hold (for choosing rows per shard).
    fn estimated_bytes(&self) -> u64;
    /// The input's own string metadata, if its format has any.
    fn metadata(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
    /// The next rows in order, `None` after the last. Every batch's columns match
    /// [`fields`](RecordInput::fields); the batches together hold exactly
    /// [`rows`](RecordInput::rows) rows, or this returns an error naming the file.
    fn next_batch(&mut self) -> Result<Option<RowBatch>>;
}
