//! Batches in device memory: one pooled buffer per column, returned to the loader's pool when
//! the batch is dropped. Backend-specific accessors (a CUDA pointer and stream, a wgpu buffer
//! and queue) live beside each engine.

#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};

use super::engine::DeviceEngine;
use crate::error::Result;
use crate::pipeline::source::ColumnInfo;

/// Column-buffer sets of finished batches, ready for reuse.
pub(crate) type BufferPool<B> = Arc<Mutex<Vec<Vec<B>>>>;

/// A batch of verified, decrypted rows in device memory. Its gathers had completed when it was
/// handed out. Dropping it returns its buffers to the loader's pool.
pub struct GpuBatch<E: DeviceEngine> {
    pub(crate) epoch: u64,
    pub(crate) index: u64,
    pub(crate) row_ids: Vec<u64>,
    pub(crate) columns: Arc<[ColumnInfo]>,
    pub(crate) bufs: Vec<E::Buffer>,
    pub(crate) engine: Arc<E>,
    pub(crate) pool: BufferPool<E::Buffer>,
}

impl<E: DeviceEngine> std::fmt::Debug for GpuBatch<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuBatch")
            .field("epoch", &self.epoch)
            .field("index", &self.index)
            .field("rows", &self.len())
            .finish_non_exhaustive()
    }
}

impl<E: DeviceEngine> GpuBatch<E> {
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
    pub fn tensors(&self) -> impl Iterator<Item = GpuTensor<'_, E>> {
        self.columns
            .iter()
            .zip(&self.bufs)
            .map(|(c, buf)| GpuTensor {
                name: &c.name,
                dtype: &c.dtype,
                rows: self.row_ids.len(),
                row_shape: &c.row_shape,
                len: self.row_ids.len() * c.row_bytes as usize,
                buf,
                engine: self.engine.as_ref(),
            })
    }
    /// The column named `name`.
    pub fn tensor(&self, name: &str) -> Option<GpuTensor<'_, E>> {
        self.tensors().find(|t| t.name == name)
    }
    /// Bytes of all its tensors.
    pub(crate) fn bytes(&self) -> u64 {
        self.tensors().map(|t| t.len() as u64).sum()
    }
}

impl<E: DeviceEngine> Drop for GpuBatch<E> {
    fn drop(&mut self) {
        let bufs = std::mem::take(&mut self.bufs);
        self.pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(bufs);
    }
}

/// One column of a device batch: shape `[B, ...]`, the dataset's dtype, in device memory.
pub struct GpuTensor<'a, E: DeviceEngine> {
    /// Column name.
    pub name: &'a str,
    /// safetensors dtype name.
    pub dtype: &'a str,
    pub(crate) rows: usize,
    pub(crate) row_shape: &'a [u64],
    pub(crate) len: usize,
    pub(crate) buf: &'a E::Buffer,
    pub(crate) engine: &'a E,
}

impl<E: DeviceEngine> Clone for GpuTensor<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<E: DeviceEngine> Copy for GpuTensor<'_, E> {}

impl<E: DeviceEngine> std::fmt::Debug for GpuTensor<'_, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuTensor")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape())
            .finish_non_exhaustive()
    }
}

impl<E: DeviceEngine> GpuTensor<'_, E> {
    /// Shape `[B, ...row shape]`.
    pub fn shape(&self) -> Vec<u64> {
        std::iter::once(self.rows as u64)
            .chain(self.row_shape.iter().copied())
            .collect()
    }
    /// Bytes of the tensor (`B × row bytes`) at the start of its buffer; the buffer may be
    /// longer (pooled at full batch size).
    pub fn len(&self) -> usize {
        self.len
    }
    /// `true` for a zero-byte tensor.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Copies the tensor to the host (tests, debugging).
    pub fn to_host(&self) -> Result<Vec<u8>> {
        if self.len == 0 {
            return Ok(Vec::new());
        }
        self.engine.read_back(self.buf, self.len)
    }
}
