//! The host loader's batches: one page-aligned, pooled buffer per column.

#![forbid(unsafe_code)]

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::pipeline::pool::{AlignedBuf, Element, PinHook, cast_slice};
use crate::pipeline::source::ColumnInfo;

/// One column of a batch: shape `[B, ...]`, the dataset's dtype, in a page-aligned buffer. A
/// ragged column is its rows' elements concatenated, shape `[E, ...element shape]`, with
/// [`Tensor::offsets`] delimiting the rows.
#[derive(Debug, Clone, Copy)]
pub struct Tensor<'a> {
    /// Column name.
    pub name: &'a str,
    /// safetensors dtype name.
    pub dtype: &'a str,
    /// First dimension: `B` rows, or `E` elements of a ragged column.
    rows: usize,
    row_shape: &'a [u64],
    /// The bytes, `B × row bytes` (ragged: `E ×` element bytes), little-endian.
    pub bytes: &'a [u8],
    /// A ragged column's `B + 1` row offsets (little-endian `I64`, page-aligned).
    offsets: Option<&'a [u8]>,
}

impl<'a> Tensor<'a> {
    /// Shape `[B, ...row shape]`, or `[E, ...element shape]` for a ragged column.
    pub fn shape(&self) -> Vec<u64> {
        std::iter::once(self.rows as u64)
            .chain(self.row_shape.iter().copied())
            .collect()
    }
    /// Whether the column is ragged (rows of varying length).
    pub fn is_ragged(&self) -> bool {
        self.offsets.is_some()
    }
    /// A ragged column's row offsets: `B + 1` element offsets, 0 first, `E` last; row `i` of
    /// the batch is elements `offsets[i]..offsets[i + 1]` (the `cu_seqlens` convention of
    /// variable-length attention kernels, in `i64`). `None` for a fixed column.
    pub fn offsets(&self) -> Option<&'a [i64]> {
        self.offsets
            .map(|b| cast_slice(b, "I64").expect("an aligned I64 buffer"))
    }
    /// The offsets' bytes (little-endian `I64`), for zero-copy export.
    pub fn offsets_bytes(&self) -> Option<&'a [u8]> {
        self.offsets
    }

    /// A ragged column's rows as a dense `[B, W, ...element shape]` block (a copy), zeros after
    /// each row's end, and a `[B, W]` mask (1 where a row has an element). `W` is `width`, or
    /// the batch's longest row when `None`; a row longer than `width` is cut to it (the mask
    /// shows where). `None` for a fixed column.
    pub fn padded(&self, width: Option<usize>) -> Option<Padded> {
        let offsets = self.offsets()?;
        let elem = self.row_shape.iter().product::<u64>() as usize * dtype_size(self.dtype);
        let rows = offsets.len() - 1;
        let longest = offsets
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0);
        let width = width.unwrap_or(longest);
        let mut values = vec![0u8; rows * width * elem];
        let mut mask = vec![0u8; rows * width];
        for (i, w) in offsets.windows(2).enumerate() {
            let n = ((w[1] - w[0]) as usize).min(width);
            let src = &self.bytes[w[0] as usize * elem..(w[0] as usize + n) * elem];
            values[i * width * elem..(i * width + n) * elem].copy_from_slice(src);
            mask[i * width..i * width + n].fill(1);
        }
        Some(Padded {
            width,
            values,
            mask,
        })
    }
    /// Typed view; `None` if `T` does not match the dtype.
    pub fn as_slice<T: Element>(&self) -> Option<&'a [T]> {
        cast_slice(self.bytes, self.dtype)
    }
    /// Pointer to the first byte (page-aligned), valid while the batch lives.
    pub fn as_ptr(&self) -> *const u8 {
        self.bytes.as_ptr()
    }
}

/// A ragged column padded to a dense block ([`Tensor::padded`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Padded {
    /// Elements per row (`W`).
    pub width: usize,
    /// `[B, W, ...element shape]`, little-endian, zeros after each row's end.
    pub values: Vec<u8>,
    /// `[B, W]`: 1 where the row has an element, 0 in the padding.
    pub mask: Vec<u8>,
}

/// Bytes of one element of a safetensors dtype name (1 for names this build does not know,
/// which never reach a batch).
fn dtype_size(dtype: &str) -> usize {
    dtype
        .parse::<crate::format::Dtype>()
        .map_or(1, crate::format::Dtype::size_bytes)
}

/// A batch of decrypted, verified rows. Dropping it returns its buffers to the loader's pool.
pub struct Batch {
    pub(super) epoch: u64,
    pub(super) index: u64,
    pub(super) row_ids: Vec<u64>,
    pub(super) columns: Arc<[ColumnInfo]>,
    /// One buffer per column (a ragged column's values), then one per ragged column for its
    /// row offsets, in column order.
    pub(super) bufs: Vec<AlignedBuf>,
    /// Per column: the elements this batch holds of a ragged column (0 for a fixed one).
    pub(super) elements: Vec<u64>,
    /// Per column, the first dimension when it is not the batch's row count (a packed batch:
    /// sequences, sequences, cu_seqlens entries); empty otherwise.
    pub(super) first_dims: Vec<usize>,
    pub(super) pool: Arc<SetPool>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("epoch", &self.epoch)
            .field("index", &self.index)
            .field("rows", &self.len())
            .finish()
    }
}

impl Batch {
    /// Rows in the batch (B); for a packed batch, the rows whose tokens it holds, wholly or in
    /// part (its sequences are the first dimension of its tensors).
    pub fn len(&self) -> usize {
        self.row_ids.len()
    }
    /// `true` for an empty batch (never yielded).
    pub fn is_empty(&self) -> bool {
        self.row_ids.is_empty()
    }
    /// Epoch this batch belongs to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// Index of the batch within its epoch (for this rank).
    pub fn index(&self) -> u64 {
        self.index
    }
    /// Global dataset row index of each row, in batch order.
    pub fn row_ids(&self) -> &[u64] {
        &self.row_ids
    }
    /// The column tensors, in the dataset's column order.
    pub fn tensors(&self) -> impl Iterator<Item = Tensor<'_>> {
        let rows = self.row_ids.len();
        let mut ragged = self.columns.len();
        self.columns
            .iter()
            .zip(&self.bufs)
            .zip(&self.elements)
            .enumerate()
            .map(move |(i, ((c, b), &e))| {
                let rows = self.first_dims.get(i).copied().unwrap_or(rows);
                if c.ragged {
                    let offsets = &self.bufs[ragged][..8 * (rows + 1)];
                    ragged += 1;
                    Tensor {
                        name: &c.name,
                        dtype: &c.dtype,
                        rows: e as usize,
                        row_shape: &c.row_shape,
                        bytes: &b[..e as usize * c.row_bytes as usize],
                        offsets: Some(offsets),
                    }
                } else {
                    Tensor {
                        name: &c.name,
                        dtype: &c.dtype,
                        rows,
                        row_shape: &c.row_shape,
                        bytes: &b[..rows * c.row_bytes as usize],
                        offsets: None,
                    }
                }
            })
    }
    /// The column named `name`.
    pub fn tensor(&self, name: &str) -> Option<Tensor<'_>> {
        self.tensors().find(|t| t.name == name)
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.bufs));
    }
}

/// Pool of batch buffer sets (one buffer per column, sized for a full batch).
pub(super) struct SetPool {
    pub(super) sizes: Vec<usize>,
    pub(super) cap: usize,
    pub(super) free: Mutex<Vec<Vec<AlignedBuf>>>,
    pub(super) pin: Option<Arc<dyn PinHook>>,
    pub(super) counter: Arc<std::sync::atomic::AtomicU64>,
    pub(super) allocations: std::sync::atomic::AtomicU64,
    /// Set when the loader is gone: sets returned afterwards (batches the consumer still held)
    /// are freed instead of kept for a pipeline that will never ask for them.
    pub(super) closed: std::sync::atomic::AtomicBool,
}

impl SetPool {
    pub(super) fn alloc(&self) -> Result<Vec<AlignedBuf>> {
        self.sizes
            .iter()
            .map(|&n| AlignedBuf::new(n, self.pin.clone(), Some(self.counter.clone())))
            .collect()
    }
    pub(super) fn get(&self) -> Result<Vec<AlignedBuf>> {
        if let Some(s) = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(s);
        }
        // Only when the consumer keeps batches alive beyond the prefetch depth.
        self.allocations.fetch_add(1, Relaxed);
        self.alloc()
    }
    pub(super) fn put(&self, s: Vec<AlignedBuf>) {
        if self.closed.load(Relaxed) {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < self.cap && s.len() == self.sizes.len() {
            free.push(s);
        }
    }
    /// Frees the idle sets and every set returned from now on: a batch the consumer keeps past
    /// its loader then holds only its own buffers, not the whole preallocated pool.
    pub(super) fn close(&self) {
        self.closed.store(true, Relaxed);
        let idle = std::mem::take(&mut *self.free.lock().unwrap_or_else(|e| e.into_inner()));
        drop(idle);
    }
}

// Hooks for consumers that hand batches to other runtimes (the Python binding): a writable
// view for zero-copy export, and a bounded wait so the caller can stay responsive (Ctrl-C).

impl Batch {
    /// Writable base pointer and byte length (`len() ×` row bytes) of each column's buffer, in
    /// column order. The memory stays valid and in place until the batch is dropped (then it
    /// returns to the pool), so a zero-copy consumer (a DLPack tensor) that keeps the batch
    /// alive may read and write through these pointers.
    pub fn column_ptrs_mut(&mut self) -> Vec<(*mut u8, usize)> {
        let rows = self.row_ids.len();
        self.columns
            .iter()
            .zip(self.bufs.iter_mut())
            .zip(&self.elements)
            .enumerate()
            .map(|(i, ((c, b), &e))| {
                let rows = self.first_dims.get(i).copied().unwrap_or(rows);
                let n = if c.ragged { e as usize } else { rows } * c.row_bytes as usize;
                (b[..n].as_mut_ptr(), n)
            })
            .collect()
    }

    /// Writable base pointer and byte length of each ragged column's row offsets (`B + 1`
    /// little-endian `I64`), in column order, `None` for fixed columns; valid as
    /// [`Batch::column_ptrs_mut`]'s.
    pub fn offsets_ptrs_mut(&mut self) -> Vec<Option<(*mut u8, usize)>> {
        let n = 8 * (self.row_ids.len() + 1);
        let mut offsets = self.bufs[self.columns.len()..].iter_mut();
        self.columns
            .iter()
            .map(|c| {
                c.ragged.then(|| {
                    let b = offsets
                        .next()
                        .expect("one offsets buffer per ragged column");
                    (b[..n].as_mut_ptr(), n)
                })
            })
            .collect()
    }
}
