//! The seam between the device loader and a GPU backend. The loader (plan, planner, producer,
//! batches, pools, hand-out) is written once over [`DeviceEngine`]; a backend says how a
//! window's chunks reach its memory verified and decrypted, how rows are gathered into batch
//! buffers, and how to wait for that. CUDA and wgpu each implement it in their own file of
//! this folder; a new device backend is one more implementation.

#![forbid(unsafe_code)]

use crossbeam_channel::{Receiver, Sender};

use super::feed::WindowFeed;
use super::windows::Packing;
use crate::error::Result;
use crate::pipeline::source::ColumnInfo;

/// The plan's geometry, which an engine checks against its limits and sizes buffers by.
// The CUDA engine needs only the window size; the wgpu engine checks binding limits.
#[cfg_attr(not(feature = "wgpu"), allow(dead_code))]
pub struct Geometry<'a> {
    pub(crate) columns: &'a [ColumnInfo],
    pub(crate) chunk_size: u64,
    pub(crate) shard_rows: &'a [u64],
    /// Most staging bytes one window needs (its chunks, each padded to 16 bytes).
    pub(crate) window_bytes: u64,
    /// Most rows one batch holds.
    pub(crate) batch_rows: usize,
}

/// A window whose every chunk verified, decrypted into device memory: one buffer per piece of
/// its layout (one, unless the engine splits windows under a binding limit).
pub struct Window<B> {
    pub(crate) epoch: u64,
    pub(crate) w: usize,
    pub(crate) pieces: Vec<B>,
}

/// One gather launch: the rows `pairs` (a range of the batch's pair list) of `row_bytes` bytes
/// each, from window piece `src` into the batch's column `dst`.
pub struct GatherJob<'a, B> {
    pub(crate) src: &'a B,
    pub(crate) dst: usize,
    pub(crate) pairs: std::ops::Range<usize>,
    pub(crate) row_bytes: u64,
}

/// A GPU backend as the device loader drives it. Implemented by this crate's backends only
/// (the trait is not nameable outside the crate).
pub trait DeviceEngine: Send + Sync + Sized + 'static {
    /// A batch column's buffer in device memory.
    type Buffer: Send + Sync + 'static;
    /// A piece of a decrypted window in device memory.
    type WindowBuf: Send + 'static;
    /// Completion of a batch's gathers.
    type Fence: Send;
    /// What one loader's reader needs beyond the engine (slot and piece sizes, threads).
    type Config: Send + Sync + 'static;

    /// Prefix of the loader's thread names (`-read`, `-plan` are appended for the reader and
    /// the planner).
    const THREAD_NAME: &'static str;
    /// Verified windows the reader may hold ready ahead of the gather loop.
    const WINDOWS_AHEAD: usize;
    /// `true` when a window buffer may be reused only after the pending batch's gathers
    /// completed (CUDA: the reader refills it on another stream); `false` when submission order
    /// already protects it (wgpu: one queue).
    const EVICT_WAITS_FOR_GATHERS: bool;

    /// Shards whose keys the engine holds (must equal the source's shard count).
    fn key_count(&self) -> usize;

    /// Checks the geometry against the device's limits; the window packing and the reader's
    /// configuration.
    fn configure(&self, geometry: &Geometry<'_>) -> Result<(Packing, Self::Config)>;

    /// Runs on the reader thread: every window of `feed`, in order, read through the source's
    /// store, verified (no byte of unverified plaintext in device memory is ever gathered) and
    /// decrypted into device memory, sent on `tx`; an error is sent in its place, then nothing
    /// more. Buffers of evicted windows come back on `recycle`.
    fn read_windows(
        &self,
        config: &Self::Config,
        feed: WindowFeed<'_>,
        tx: Sender<Result<Window<Self::WindowBuf>>>,
        recycle: Receiver<Self::WindowBuf>,
    );

    /// A buffer for one column of a full batch (`bytes` of it).
    fn alloc_column(&self, column: &ColumnInfo, bytes: u64) -> Result<Self::Buffer>;

    /// Enqueues a batch's gathers (`pairs[i] = (offset in the window piece, offset in the
    /// column)`; every range checked against its buffers before anything runs) into `dsts`.
    fn gather(
        &self,
        jobs: &[GatherJob<'_, Self::WindowBuf>],
        pairs: &[(u64, u64)],
        dsts: &mut [Self::Buffer],
    ) -> Result<Self::Fence>;

    /// Waits until the gathers behind `fence` completed.
    fn wait(&self, fence: Self::Fence) -> Result<()>;

    /// Waits until no gather can still read a window (before window memory is freed).
    fn quiesce(&self);

    /// The first `len` bytes of `buf`, copied to the host (tests, debugging).
    fn read_back(&self, buf: &Self::Buffer, len: usize) -> Result<Vec<u8>>;
}
