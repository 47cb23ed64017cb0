//! The host loader's batches: one page-aligned, pooled buffer per column.

#![forbid(unsafe_code)]

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::pipeline::pool::{AlignedBuf, Element, PinHook, cast_slice};
use crate::pipeline::source::ColumnInfo;

/// One column of a batch: shape `[B, ...]`, the dataset's dtype, in a page-aligned buffer.
#[derive(Debug, Clone, Copy)]
pub struct Tensor<'a> {
    /// Column name.
    pub name: &'a str,
    /// safetensors dtype name.
    pub dtype: &'a str,
    rows: usize,
    row_shape: &'a [u64],
    /// The bytes, `B × row bytes`, little-endian.
    pub bytes: &'a [u8],
}

impl<'a> Tensor<'a> {
    /// Shape `[B, ...row shape]`.
    pub fn shape(&self) -> Vec<u64> {
        std::iter::once(self.rows as u64)
            .chain(self.row_shape.iter().copied())
            .collect()
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

/// A batch of decrypted, verified rows. Dropping it returns its buffers to the loader's pool.
pub struct Batch {
    pub(super) epoch: u64,
    pub(super) index: u64,
    pub(super) row_ids: Vec<u64>,
    pub(super) columns: Arc<[ColumnInfo]>,
    pub(super) bufs: Vec<AlignedBuf>,
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
    /// Rows in the batch (B).
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
        self.columns.iter().zip(&self.bufs).map(|(c, b)| Tensor {
            name: &c.name,
            dtype: &c.dtype,
            rows: self.row_ids.len(),
            row_shape: &c.row_shape,
            bytes: &b[..self.row_ids.len() * c.row_bytes as usize],
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
            .map(|(c, b)| {
                let n = rows * c.row_bytes as usize;
                (b[..n].as_mut_ptr(), n)
            })
            .collect()
    }
}
