//! Device-resident batches for the wgpu backend: window decryption and row gather on the GPU.
//!
//! The loader uploads a window of a shard (many verified chunks, 16-byte aligned) into a device
//! buffer and decrypts every chunk in place with one dispatch ([`WgpuBatchEngine::upload_decrypt`],
//! `shaders/aes_ctr_batch.wgsl`: one block per invocation, each chunk with its own key and
//! nonce). It then copies rows out of such windows into per-column batch buffers
//! ([`WgpuBatchEngine::gather`], `shaders/gather.wgsl`), so plaintext never returns to the host.
//!
//! The engine shares the device, queue, AES table, kernel variant and failure sink of a
//! [`WgpuCipher`]; its pipelines are built once, and its scratch buffers (chunk table, pairs,
//! parameters) are created once, grown on demand and reused. Each scratch set sits behind its own
//! mutex, held from the first queue write to the submission: `upload_decrypt` and `gather` may be
//! called from two threads, and queue writes are seen by the next submission whatever thread made
//! them.
//!
//! Every argument is validated before anything is queued ([`Error::InvalidArgument`]); failures
//! of the device itself (validation or out-of-memory inside an error scope, a lost device, a
//! timeout) come back as [`Error::Backend`] naming the adapter and the step, and are recorded so
//! that [`WgpuBatchEngine::health`] (and the cipher's) report them afterwards. Nothing panics.

use std::num::NonZeroU64;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use zeroize::Zeroizing;

use super::wgpu::{
    AdapterSummary, Context, GPU_TIMEOUT, WgpuCipher, backend_err, binding_types, build_compute,
    expand_key, lock, record,
};
use super::{BLOCK_LEN, NONCE_LEN};
use crate::error::{Error, Result};
use crate::keys::DataKey;

/// The batch CTR kernel: the AES core, then its entry file.
pub(super) const BATCH_SHADER: &str = concat!(
    include_str!("../../shaders/aes_core.wgsl"),
    include_str!("../../shaders/aes_ctr_batch.wgsl")
);
/// The row gather kernel.
const GATHER_SHADER: &str = include_str!("../../shaders/gather.wgsl");
/// Invocations per gather workgroup (the shader's `GATHER_WG`).
const GATHER_WG: u64 = 256;
/// Round-key bytes per key: 15 round keys of 16 bytes.
const ROUND_KEY_BYTES: u64 = 240;
/// Shaders address bytes with u32 offsets: no binding may reach 4 GiB.
const MAX_U32_BINDING: u64 = (1 << 32) - 16;
/// Invocations per gather dispatch at most, so that the grid's invocation index (with the last
/// row's padding) stays within u32; longer jobs are split into several dispatches.
const MAX_GATHER_INVOCATIONS: u64 = 1 << 31;
const BLOCK: u64 = BLOCK_LEN as u64;

/// One chunk of a window buffer to decrypt in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowChunk {
    /// Byte offset of the chunk in the window (a multiple of 16).
    pub offset: u64,
    /// Chunk length in bytes. The bytes after it up to the next 16-byte boundary are padding:
    /// they get keystream garbage.
    pub len: u64,
    /// The chunk's GCM nonce (its first block uses counter 2).
    pub nonce: [u8; NONCE_LEN],
    /// Index of the chunk's key in the engine's keys.
    pub key: u32,
}

/// One gather launch: rows `pairs[pairs]` from `src` into column buffer `dsts[dst]`.
#[derive(Debug, Clone)]
pub struct GatherJob<'a> {
    /// The window buffer the rows are read from.
    pub src: &'a ::wgpu::Buffer,
    /// Index of the destination column buffer in `dsts`.
    pub dst: usize,
    /// The job's (src byte offset, dst byte offset) pairs, as a range of the `pairs` slice.
    pub pairs: Range<usize>,
    /// Bytes per row (0: the job copies nothing).
    pub row_bytes: u64,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct BatchParams {
    blocks: u32,
    row_groups: u32,
    chunks: u32,
    _pad: u32,
}

/// `shaders/aes_ctr_batch.wgsl`'s `Chunk`.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ChunkEntry {
    first_block: u32,
    block_offset: u32,
    blocks: u32,
    key: u32,
    nonce: [u32; 3],
    _pad: u32,
}

/// `shaders/gather.wgsl`'s `GatherParams`.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct GatherParams {
    pair_start: u32,
    pairs: u32,
    row_bytes: u32,
    span: u32,
    row_groups: u32,
    _pad: [u32; 3],
}

/// A scratch buffer created on first use and replaced by a bigger one when too small (a
/// submission still using the old one keeps it alive).
struct Grown {
    label: &'static str,
    usage: ::wgpu::BufferUsages,
    buf: Option<::wgpu::Buffer>,
}

impl Grown {
    fn new(label: &'static str, usage: ::wgpu::BufferUsages) -> Self {
        Grown {
            label,
            usage,
            buf: None,
        }
    }

    /// A buffer of at least `need` bytes (call inside an error scope).
    fn ensure(&mut self, device: &::wgpu::Device, need: u64) -> &::wgpu::Buffer {
        if self.buf.as_ref().is_none_or(|b| b.size() < need) {
            self.buf = Some(device.create_buffer(&::wgpu::BufferDescriptor {
                label: Some(self.label),
                size: need.next_power_of_two().max(256),
                usage: self.usage,
                mapped_at_creation: false,
            }));
        }
        self.buf.as_ref().expect("created above")
    }
}

/// Scratch of `upload_decrypt`: its parameters and the chunk table.
struct DecryptScratch {
    params: ::wgpu::Buffer,
    chunks: Grown,
}

/// Scratch of `gather`: the per-dispatch parameters (dynamic offsets) and the pairs.
struct GatherScratch {
    params: Grown,
    pairs: Grown,
}

/// Host-visible upload buffers reused window after window ([`WgpuBatchEngine::upload_ring`]).
///
/// `queue.write_buffer` stages every call in freshly allocated memory, and first touch of fresh
/// memory runs at only 0.3-1.6 GB/s on the 2-vCPU VMs (the twin bench's write_buffer upload
/// reached 3.5 GB/s there). A ring slot is mapped once, written, unmapped and copied to the
/// window by the GPU, then mapped again behind that copy; with two slots the caller fills one
/// while the GPU copies the other.
pub struct UploadRing {
    slots: Vec<UploadSlot>,
    next: usize,
}

struct UploadSlot {
    buf: ::wgpu::Buffer,
    /// `Some` while a re-mapping is outstanding: its result, and the submission it follows.
    pending: Option<(
        std::sync::mpsc::Receiver<std::result::Result<(), ::wgpu::BufferAsyncError>>,
        ::wgpu::SubmissionIndex,
    )>,
}

impl std::fmt::Debug for UploadRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadRing")
            .field("slots", &self.slots.len())
            .field("slot_bytes", &self.slots.first().map(|s| s.buf.size()))
            .finish()
    }
}

impl Drop for UploadRing {
    fn drop(&mut self) {
        // Ciphertext only (tags were checked before upload): no need to clear it.
        for s in &self.slots {
            s.buf.destroy();
        }
    }
}

/// Where `upload_decrypt` takes the window's bytes from.
enum Upload<'a> {
    /// `queue.write_buffer` (wgpu's own staging).
    Queue,
    /// The next slot of a ring, filled by this many threads.
    Ring(&'a mut UploadRing, usize),
    /// Nothing to upload: the window already holds the bytes (benchmarks).
    Resident,
}

/// Window decryption and row gather on the wgpu device of a [`WgpuCipher`].
pub struct WgpuBatchEngine {
    ctx: Arc<Context>,
    /// Every key's 60 round-key words, key i at word 60 i (key material: zeroed on drop).
    keys: ::wgpu::Buffer,
    key_count: u32,
    ctr_pipeline: ::wgpu::ComputePipeline,
    ctr_layout: ::wgpu::BindGroupLayout,
    gather_pipeline: ::wgpu::ComputePipeline,
    gather_layout: ::wgpu::BindGroupLayout,
    /// See [`WgpuBatchEngine::max_binding_bytes`].
    max_binding: u64,
    /// Stride of the gather parameter entries (`min_uniform_buffer_offset_alignment`).
    param_stride: u64,
    /// Workgroups per grid dimension at most (lowered by tests to force 2-D grids).
    max_workgroups: u32,
    decrypt: Mutex<DecryptScratch>,
    gather: Mutex<GatherScratch>,
}

impl std::fmt::Debug for WgpuBatchEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuBatchEngine")
            .field("adapter", &self.ctx.adapter.name)
            .finish_non_exhaustive()
    }
}

fn invalid(reason: String) -> Error {
    Error::InvalidArgument(reason)
}

fn entire(buffer: &::wgpu::Buffer, size: u64) -> ::wgpu::BindingResource<'_> {
    ::wgpu::BindingResource::Buffer(::wgpu::BufferBinding {
        buffer,
        offset: 0,
        size: NonZeroU64::new(size),
    })
}

impl WgpuBatchEngine {
    /// Pipelines built once; every key's round keys uploaded (key index `i` is `keys[i]`).
    pub fn new(cipher: &WgpuCipher, keys: &[&DataKey]) -> Result<Self> {
        cipher.health()?;
        let ctx = cipher.ctx.clone();
        let adapter = ctx.adapter.clone();
        let limits = ctx.device.limits();
        let max_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size)
            .min(MAX_U32_BINDING);
        let key_count = u32::try_from(keys.len())
            .ok()
            .filter(|&n| u64::from(n.max(1)) * ROUND_KEY_BYTES <= max_binding)
            .ok_or_else(|| {
                invalid(format!(
                    "wgpu batch engine: {} keys do not fit one binding on {adapter}",
                    keys.len()
                ))
            })?;

        let (storage, uniform) = binding_types();
        let variant = ctx.variant;
        let unrolled;
        let source = if variant.unrolled {
            unrolled = super::wgpu::unroll_rounds(BATCH_SHADER);
            &unrolled
        } else {
            BATCH_SHADER
        };
        let (ctr_pipeline, ctr_layout) = build_compute(
            &ctx.device,
            "aes_ctr_batch",
            source,
            "main",
            &[
                storage(true),
                storage(true),
                uniform,
                storage(true),
                storage(false),
            ],
            &[
                ("shared_table", if ctx.shared_table { 1.0 } else { 0.0 }),
                ("WG", f64::from(variant.workgroup_size)),
                ("COPIES", f64::from(variant.table_copies)),
            ],
            // Always checked: the trusted build is reserved for the standalone kernel.
            true,
        )
        .map_err(|e| {
            backend_err(format!(
                "{adapter}: shader aes_ctr_batch.wgsl failed to build: {e}"
            ))
        })?;
        let dynamic_uniform = ::wgpu::BindingType::Buffer {
            ty: ::wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: true,
            min_binding_size: NonZeroU64::new(std::mem::size_of::<GatherParams>() as u64),
        };
        let (gather_pipeline, gather_layout) = build_compute(
            &ctx.device,
            "gather",
            GATHER_SHADER,
            "main",
            &[
                dynamic_uniform,
                storage(true),
                storage(true),
                storage(false),
            ],
            &[],
            true,
        )
        .map_err(|e| {
            backend_err(format!(
                "{adapter}: shader gather.wgsl failed to build: {e}"
            ))
        })?;

        // Exact capacity: extending never reallocates, so no unzeroed copy of a key is left.
        let mut words = Zeroizing::new(Vec::with_capacity(keys.len() * 60));
        for key in keys {
            words.extend_from_slice(&expand_key(key.as_bytes(), &cipher.sbox)[..]);
        }
        use ::wgpu::BufferUsages as U;
        let device = &ctx.device;
        let oom = device.push_error_scope(::wgpu::ErrorFilter::OutOfMemory);
        let validation = device.push_error_scope(::wgpu::ErrorFilter::Validation);
        let keys_buf = device.create_buffer(&::wgpu::BufferDescriptor {
            label: Some("batch_round_keys"),
            size: u64::from(key_count.max(1)) * ROUND_KEY_BYTES,
            usage: U::STORAGE | U::COPY_DST,
            mapped_at_creation: false,
        });
        if !words.is_empty() {
            ctx.queue
                .write_buffer(&keys_buf, 0, bytemuck::cast_slice(&words[..]));
        }
        let params = device.create_buffer(&::wgpu::BufferDescriptor {
            label: Some("batch_params"),
            size: std::mem::size_of::<BatchParams>() as u64,
            usage: U::UNIFORM | U::COPY_DST,
            mapped_at_creation: false,
        });
        let failed = pollster::block_on(validation.pop()).or(pollster::block_on(oom.pop()));
        if let Some(e) = failed {
            return Err(backend_err(format!(
                "{adapter}: creating the batch engine's buffers: {e}"
            )));
        }
        let param_stride = (std::mem::size_of::<GatherParams>() as u64)
            .next_multiple_of(u64::from(limits.min_uniform_buffer_offset_alignment.max(1)));
        Ok(WgpuBatchEngine {
            max_workgroups: ctx.max_workgroups,
            ctx,
            keys: keys_buf,
            key_count,
            ctr_pipeline,
            ctr_layout,
            gather_pipeline,
            gather_layout,
            max_binding,
            param_stride,
            decrypt: Mutex::new(DecryptScratch {
                params,
                chunks: Grown::new("batch_chunks", U::STORAGE | U::COPY_DST),
            }),
            gather: Mutex::new(GatherScratch {
                params: Grown::new("gather_params", U::UNIFORM | U::COPY_DST),
                pairs: Grown::new("gather_pairs", U::STORAGE | U::COPY_DST),
            }),
        })
    }

    /// The device (shared with the [`WgpuCipher`]).
    pub fn device(&self) -> &::wgpu::Device {
        &self.ctx.device
    }

    /// The queue (shared with the [`WgpuCipher`]).
    pub fn queue(&self) -> &::wgpu::Queue {
        &self.ctx.queue
    }

    /// The adapter in use.
    pub fn adapter(&self) -> &AdapterSummary {
        &self.ctx.adapter
    }

    /// Number of keys (key indices of [`WindowChunk::key`] run below it).
    pub fn key_count(&self) -> u32 {
        self.key_count
    }

    /// Largest buffer one binding may cover, bytes (min of the device's storage binding and
    /// buffer limits, and 4 GiB - 16 since shaders use u32 byte offsets).
    pub fn max_binding_bytes(&self) -> u64 {
        self.max_binding
    }

    /// Bytes one dispatch should cover ([`super::wgpu::WgpuOptions::max_piece_bytes`], default
    /// 128 MiB, never above the binding limit): the device loader splits bigger windows.
    pub fn piece_bytes(&self) -> u64 {
        self.ctx.piece_bytes.min(self.max_binding)
    }

    /// `STORAGE | COPY_DST | COPY_SRC` buffer of `bytes` rounded up to a multiple of 16 (at
    /// least 16). Too big for a binding, or out of memory: `Err`, never a panic. A failure here
    /// is not recorded as a device failure (the caller may retry smaller).
    pub fn create_buffer(&self, label: &str, bytes: u64) -> Result<::wgpu::Buffer> {
        let size = bytes.max(1).div_ceil(BLOCK) * BLOCK;
        if size > self.max_binding {
            return Err(invalid(format!(
                "buffer '{label}' of {bytes} bytes exceeds the largest binding on {} ({} bytes)",
                self.ctx.adapter, self.max_binding
            )));
        }
        let device = &self.ctx.device;
        let oom = device.push_error_scope(::wgpu::ErrorFilter::OutOfMemory);
        let validation = device.push_error_scope(::wgpu::ErrorFilter::Validation);
        use ::wgpu::BufferUsages as U;
        let buf = device.create_buffer(&::wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: U::STORAGE | U::COPY_DST | U::COPY_SRC,
            mapped_at_creation: false,
        });
        let failed = pollster::block_on(validation.pop()).or(pollster::block_on(oom.pop()));
        match failed {
            Some(e) => {
                buf.destroy();
                Err(backend_err(format!(
                    "{}: creating buffer '{label}' of {size} bytes: {e}",
                    self.ctx.adapter
                )))
            }
            None => Ok(buf),
        }
    }

    /// Runs `f` (queue writes, encoding, submission) inside validation and out-of-memory error
    /// scopes; an error there is recorded as a device failure and returned, naming `step`.
    fn scoped<T>(&self, step: &str, f: impl FnOnce() -> T) -> Result<T> {
        let device = &self.ctx.device;
        let oom = device.push_error_scope(::wgpu::ErrorFilter::OutOfMemory);
        let validation = device.push_error_scope(::wgpu::ErrorFilter::Validation);
        let out = f();
        let failed = pollster::block_on(validation.pop()).or(pollster::block_on(oom.pop()));
        match failed {
            Some(e) => Err(self.fail(format!("{step}: {e}"))),
            None => Ok(out),
        }
    }

    /// Records a device failure (the first one wins) and returns it as an error.
    fn fail(&self, reason: String) -> Error {
        let err = backend_err(format!("{}: {reason}", self.ctx.adapter));
        record(&self.ctx.failure, reason);
        err
    }

    /// Grid for `workgroups` workgroups: (x, y), x at most `max_workgroups`.
    fn grid(&self, workgroups: u64, what: &str) -> Result<(u32, u32)> {
        let max = u64::from(self.max_workgroups.max(1));
        let x = workgroups.clamp(1, max);
        let y = workgroups.div_ceil(x).max(1);
        if y > max {
            return Err(invalid(format!(
                "{what}: {workgroups} workgroups exceed the grid of {} ({max} x {max})",
                self.ctx.adapter
            )));
        }
        Ok((x as u32, y as u32))
    }

    /// `queue.write_buffer(staging -> window[0..])`, then one CTR dispatch over `chunks` in
    /// place, in one submission. Every chunk is validated first (16-byte aligned offset, inside
    /// `staging`, its padded end inside the window, a known key, no two chunks overlapping,
    /// block counts within u32): `Err(Error::InvalidArgument)` before anything is queued, or
    /// `Err(Error::Backend)` if the device fails. Empty `chunks`: upload only.
    pub fn upload_decrypt(
        &self,
        window: &::wgpu::Buffer,
        staging: &[u8],
        chunks: &[WindowChunk],
    ) -> Result<::wgpu::SubmissionIndex> {
        self.upload_with(Upload::Queue, window, staging, chunks)
    }

    /// Two host-visible upload buffers of `bytes` each (at most `max_buffer_size`), created
    /// mapped; see [`UploadRing`].
    pub fn upload_ring(&self, slots: usize, bytes: u64) -> Result<UploadRing> {
        self.health()?;
        let bytes = bytes.max(16).next_multiple_of(16);
        if bytes > self.ctx.device.limits().max_buffer_size {
            return Err(invalid(format!(
                "upload ring: {bytes} bytes per slot exceed the largest buffer on {}",
                self.ctx.adapter
            )));
        }
        let device = &self.ctx.device;
        let oom = device.push_error_scope(::wgpu::ErrorFilter::OutOfMemory);
        let validation = device.push_error_scope(::wgpu::ErrorFilter::Validation);
        let slots: Vec<UploadSlot> = (0..slots.max(1))
            .map(|_| UploadSlot {
                buf: device.create_buffer(&::wgpu::BufferDescriptor {
                    label: Some("ciphershard_upload"),
                    size: bytes,
                    usage: ::wgpu::BufferUsages::MAP_WRITE | ::wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: true,
                }),
                pending: None,
            })
            .collect();
        let failed = pollster::block_on(validation.pop()).or(pollster::block_on(oom.pop()));
        let ring = UploadRing { slots, next: 0 };
        match failed {
            // Not recorded as a device failure: the caller may retry smaller.
            Some(e) => Err(backend_err(format!(
                "{}: cannot allocate a {bytes}-byte upload buffer: {e}",
                self.ctx.adapter
            ))),
            None => Ok(ring),
        }
    }

    /// As [`upload_decrypt`](Self::upload_decrypt), but the bytes go through the next slot of
    /// `ring` (waiting for its previous copy to finish), written by `threads` threads, and a GPU
    /// copy into `window` precedes the CTR pass in the same submission.
    pub fn upload_decrypt_ring(
        &self,
        ring: &mut UploadRing,
        threads: usize,
        window: &::wgpu::Buffer,
        staging: &[u8],
        chunks: &[WindowChunk],
    ) -> Result<::wgpu::SubmissionIndex> {
        self.upload_with(Upload::Ring(ring, threads), window, staging, chunks)
    }

    /// The CTR pass alone over chunks already in `window` (benchmarks: no upload).
    pub fn decrypt_resident(
        &self,
        window: &::wgpu::Buffer,
        chunks: &[WindowChunk],
    ) -> Result<::wgpu::SubmissionIndex> {
        self.upload_with(Upload::Resident, window, &[], chunks)
    }

    /// Waits until `slot` is mapped again after its last copy.
    fn remap(&self, slot: &mut UploadSlot) -> Result<()> {
        if let Some((rx, after)) = slot.pending.take() {
            self.wait(after)?;
            match rx.recv_timeout(GPU_TIMEOUT) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(self.fail(format!("upload ring: mapping failed: {e}"))),
                Err(_) => return Err(self.fail("upload ring: a buffer never mapped".into())),
            }
        }
        Ok(())
    }

    /// Copies `staging` into the mapped `buf`, in `threads` disjoint ranges at once (each
    /// thread maps its own view; every range is written sequentially, friendly to
    /// write-combined memory).
    fn fill(&self, buf: &::wgpu::Buffer, staging: &[u8], threads: usize) -> Result<()> {
        if staging.is_empty() {
            return Ok(());
        }
        let copy = |offset: usize, part: &[u8]| -> Result<()> {
            let range = offset as u64..(offset + part.len()) as u64;
            buf.get_mapped_range_mut(range)
                .map_err(|e| self.fail(format!("upload ring: mapped view: {e}")))?
                .copy_from_slice(part);
            Ok(())
        };
        // Ranges of at least 1 MiB, on 64-byte boundaries (staging is a multiple of 16 bytes).
        let parts = threads.clamp(1, 16).min(staging.len().div_ceil(1 << 20));
        let step = staging.len().div_ceil(parts).next_multiple_of(64);
        if parts <= 1 {
            return copy(0, staging);
        }
        std::thread::scope(|sc| {
            let handles: Vec<_> = staging
                .chunks(step)
                .enumerate()
                .map(|(i, part)| sc.spawn(move || copy(i * step, part)))
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(self.fail("upload ring: a copy thread panicked".into()))
                })
            })
        })
    }

    fn upload_with(
        &self,
        upload: Upload<'_>,
        window: &::wgpu::Buffer,
        staging: &[u8],
        chunks: &[WindowChunk],
    ) -> Result<::wgpu::SubmissionIndex> {
        self.health()?;
        let staged = match upload {
            Upload::Resident => window.size(),
            _ => staging.len() as u64,
        };
        if !staged.is_multiple_of(4) {
            return Err(invalid(format!(
                "upload_decrypt: staging length {staged} is not a multiple of 4"
            )));
        }
        if staged > window.size() {
            return Err(invalid(format!(
                "upload_decrypt: staging of {staged} bytes exceeds the window buffer ({} bytes)",
                window.size()
            )));
        }
        use ::wgpu::BufferUsages as U;
        if staged > 0 && !window.usage().contains(U::COPY_DST) {
            return Err(invalid(
                "upload_decrypt: window buffer lacks COPY_DST".into(),
            ));
        }
        let mut table = Vec::with_capacity(chunks.len());
        let mut spans = Vec::with_capacity(chunks.len());
        let mut total = 0u64;
        for (i, c) in chunks.iter().enumerate() {
            let bad = |why: String| invalid(format!("upload_decrypt: chunk {i}: {why}"));
            if !c.offset.is_multiple_of(BLOCK) {
                return Err(bad(format!("offset {} is not a multiple of 16", c.offset)));
            }
            let end = c
                .offset
                .checked_add(c.len)
                .filter(|&e| e <= staged)
                .ok_or_else(|| {
                    bad(format!(
                        "bytes {}+{} lie outside the {staged} staged bytes",
                        c.offset, c.len
                    ))
                })?;
            if c.key >= self.key_count {
                return Err(bad(format!(
                    "key index {} but the engine has {} keys",
                    c.key, self.key_count
                )));
            }
            let padded_end = end.next_multiple_of(BLOCK);
            if padded_end > window.size() {
                return Err(bad(format!(
                    "its last block ends at byte {padded_end}, past the window buffer ({} bytes)",
                    window.size()
                )));
            }
            if c.len == 0 {
                continue;
            }
            let blocks = c.len.div_ceil(BLOCK);
            let block_offset = c.offset / BLOCK;
            if block_offset + blocks > u64::from(u32::MAX) || total + blocks > u64::from(u32::MAX) {
                return Err(bad("block counts exceed u32".into()));
            }
            spans.push((c.offset, padded_end, i));
            table.push(ChunkEntry {
                first_block: total as u32,
                block_offset: block_offset as u32,
                blocks: blocks as u32,
                key: c.key,
                nonce: [0, 4, 8]
                    .map(|k| u32::from_be_bytes(c.nonce[k..k + 4].try_into().expect("4 bytes"))),
                _pad: 0,
            });
            total += blocks;
        }
        spans.sort_unstable();
        if let Some(w) = spans.windows(2).find(|w| w[1].0 < w[0].1) {
            return Err(invalid(format!(
                "upload_decrypt: chunks {} and {} overlap",
                w[0].2, w[1].2
            )));
        }
        let bind_end = spans.iter().map(|s| s.1).max().unwrap_or(0);
        let mut grid = (0, 0);
        if total > 0 {
            if !window.usage().contains(U::STORAGE) {
                return Err(invalid(
                    "upload_decrypt: window buffer lacks STORAGE".into(),
                ));
            }
            if bind_end > self.max_binding {
                return Err(invalid(format!(
                    "upload_decrypt: chunks reach byte {bind_end}, past the largest binding on \
                     {} ({} bytes)",
                    self.ctx.adapter, self.max_binding
                )));
            }
            let table_bytes = (table.len() * std::mem::size_of::<ChunkEntry>()) as u64;
            if table_bytes > self.max_binding {
                return Err(invalid(format!(
                    "upload_decrypt: {} chunks exceed one binding",
                    table.len()
                )));
            }
            let wg = u64::from(self.ctx.variant.workgroup_size);
            grid = self.grid(total.div_ceil(wg), "upload_decrypt")?;
        }

        let ctx = &*self.ctx;
        // The ring slot to copy from, filled and unmapped before anything is encoded.
        let mut ring = match upload {
            Upload::Queue | Upload::Resident => None,
            Upload::Ring(ring, threads) => {
                if staged > ring.slots[ring.next].buf.size() {
                    return Err(invalid(format!(
                        "upload_decrypt: staging of {staged} bytes exceeds the upload ring's \
                         slots ({} bytes)",
                        ring.slots[ring.next].buf.size()
                    )));
                }
                let i = ring.next;
                self.remap(&mut ring.slots[i])?;
                self.fill(&ring.slots[i].buf, staging, threads)?;
                ring.slots[i].buf.unmap();
                Some((ring, i))
            }
        };
        let mut scratch = lock(&self.decrypt);
        let scratch = &mut *scratch;
        let submission = self.scoped("upload_decrypt", || {
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            match &ring {
                None if !staging.is_empty() => ctx.queue.write_buffer(window, 0, staging),
                Some((ring, i)) if staged > 0 => {
                    enc.copy_buffer_to_buffer(&ring.slots[*i].buf, 0, window, 0, staged)
                }
                _ => {}
            }
            if total == 0 {
                return ctx.queue.submit([enc.finish()]);
            }
            let params = BatchParams {
                blocks: total as u32,
                row_groups: grid.0,
                chunks: table.len() as u32,
                _pad: 0,
            };
            ctx.queue
                .write_buffer(&scratch.params, 0, bytemuck::bytes_of(&params));
            let table_bytes: &[u8] = bytemuck::cast_slice(&table);
            let chunk_buf = scratch.chunks.ensure(&ctx.device, table_bytes.len() as u64);
            ctx.queue.write_buffer(chunk_buf, 0, table_bytes);
            let bind = ctx.device.create_bind_group(&::wgpu::BindGroupDescriptor {
                label: Some("aes_ctr_batch"),
                layout: &self.ctr_layout,
                entries: &[
                    ::wgpu::BindGroupEntry {
                        binding: 0,
                        resource: self.keys.as_entire_binding(),
                    },
                    ::wgpu::BindGroupEntry {
                        binding: 1,
                        resource: ctx.t0.as_entire_binding(),
                    },
                    ::wgpu::BindGroupEntry {
                        binding: 2,
                        resource: scratch.params.as_entire_binding(),
                    },
                    ::wgpu::BindGroupEntry {
                        binding: 3,
                        resource: entire(chunk_buf, table_bytes.len() as u64),
                    },
                    ::wgpu::BindGroupEntry {
                        binding: 4,
                        resource: entire(window, bind_end),
                    },
                ],
            });
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&self.ctr_pipeline);
                pass.set_bind_group(0, &bind, &[]);
                pass.dispatch_workgroups(grid.0, grid.1, 1);
            }
            ctx.queue.submit([enc.finish()])
        })?;
        // Map the slot again behind its copy; the next use of the slot waits for it.
        if let Some((ring, i)) = ring.as_mut() {
            let (tx, rx) = std::sync::mpsc::channel();
            let slot = &mut ring.slots[*i];
            slot.buf.map_async(::wgpu::MapMode::Write, .., move |r| {
                let _ = tx.send(r);
            });
            slot.pending = Some((rx, submission.clone()));
            ring.next = (*i + 1) % ring.slots.len();
        }
        Ok(submission)
    }

    /// Checks a buffer a shader binds whole: a multiple of 4 bytes, within one binding, with
    /// the given usages.
    fn check_bound(
        &self,
        what: &str,
        buf: &::wgpu::Buffer,
        usage: ::wgpu::BufferUsages,
    ) -> Result<()> {
        if !buf.size().is_multiple_of(4) || buf.size() > self.max_binding {
            return Err(invalid(format!(
                "gather: {what} is {} bytes: not a multiple of 4 or above the largest binding \
                 ({} bytes)",
                buf.size(),
                self.max_binding
            )));
        }
        if !buf.usage().contains(usage) {
            return Err(invalid(format!("gather: {what} lacks usage {usage:?}")));
        }
        Ok(())
    }

    /// One submission: clears each `dsts` buffer, then one dispatch per job (a job longer than
    /// one dispatch can hold is split). Every job (its dst index, pair range, buffers) and every
    /// pair against its src and dst buffer sizes is validated first: `Err` before anything is
    /// queued.
    pub fn gather(
        &self,
        jobs: &[GatherJob<'_>],
        pairs: &[(u64, u64)],
        dsts: &[&::wgpu::Buffer],
    ) -> Result<::wgpu::SubmissionIndex> {
        self.health()?;
        use ::wgpu::BufferUsages as U;
        for (i, d) in dsts.iter().enumerate() {
            self.check_bound(&format!("dst buffer {i}"), d, U::STORAGE | U::COPY_DST)?;
        }
        // Pairs of every dispatch, packed, and each dispatch's (job, parameters, grid).
        let mut packed: Vec<[u32; 2]> = Vec::new();
        let mut pieces: Vec<(usize, GatherParams, (u32, u32))> = Vec::new();
        let max_wg = u64::from(self.max_workgroups.max(1));
        let max_invocations = MAX_GATHER_INVOCATIONS.min(max_wg * max_wg * GATHER_WG);
        for (j, job) in jobs.iter().enumerate() {
            let bad = |why: String| invalid(format!("gather: job {j}: {why}"));
            let dst = *dsts.get(job.dst).ok_or_else(|| {
                bad(format!(
                    "dst index {} but {} dst buffers",
                    job.dst,
                    dsts.len()
                ))
            })?;
            if job.pairs.start > job.pairs.end || job.pairs.end > pairs.len() {
                return Err(bad(format!(
                    "pairs {:?} outside the {} pairs given",
                    job.pairs,
                    pairs.len()
                )));
            }
            self.check_bound(&format!("job {j}'s src buffer"), job.src, U::STORAGE)?;
            if job.src == dst {
                return Err(bad("src and dst are the same buffer".into()));
            }
            let row = job.row_bytes;
            for (k, &(s, d)) in pairs[job.pairs.clone()].iter().enumerate() {
                let s_ok = s.checked_add(row).is_some_and(|e| e <= job.src.size());
                let d_ok = d.checked_add(row).is_some_and(|e| e <= dst.size());
                if !s_ok || !d_ok {
                    return Err(bad(format!(
                        "pair {} ({s}, {d}) of {row} bytes lies outside the src ({} bytes) or \
                         dst ({} bytes) buffer",
                        job.pairs.start + k,
                        job.src.size(),
                        dst.size()
                    )));
                }
            }
            if row == 0 || job.pairs.is_empty() {
                continue;
            }
            // Rows fit a u32-addressed buffer, so row and span fit u32 too.
            let span = row.div_ceil(4) + 1;
            let per_piece = (max_invocations / span).max(1) as usize;
            let mut start = job.pairs.start;
            while start < job.pairs.end {
                let end = (start + per_piece).min(job.pairs.end);
                let invocations = (end - start) as u64 * span;
                let grid = self.grid(invocations.div_ceil(GATHER_WG), "gather")?;
                let pair_start =
                    u32::try_from(packed.len()).map_err(|_| bad("more than 2^32 pairs".into()))?;
                packed.extend(pairs[start..end].iter().map(|&(s, d)| [s as u32, d as u32]));
                pieces.push((
                    j,
                    GatherParams {
                        pair_start,
                        pairs: (end - start) as u32,
                        row_bytes: row as u32,
                        span: span as u32,
                        row_groups: grid.0,
                        _pad: [0; 3],
                    },
                    grid,
                ));
                start = end;
            }
        }
        let pair_bytes: &[u8] = bytemuck::cast_slice(&packed);
        if pair_bytes.len() as u64 > self.max_binding {
            return Err(invalid(format!(
                "gather: {} pairs exceed one binding",
                packed.len()
            )));
        }
        let stride = self.param_stride as usize;
        let mut param_bytes = vec![0u8; pieces.len() * stride];
        for (k, (_, p, _)) in pieces.iter().enumerate() {
            param_bytes[k * stride..k * stride + std::mem::size_of::<GatherParams>()]
                .copy_from_slice(bytemuck::bytes_of(p));
        }

        let ctx = &*self.ctx;
        let mut scratch = lock(&self.gather);
        let scratch = &mut *scratch;
        self.scoped("gather", || {
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            for d in dsts {
                enc.clear_buffer(d, 0, None);
            }
            if !pieces.is_empty() {
                let params = scratch.params.ensure(&ctx.device, param_bytes.len() as u64);
                ctx.queue.write_buffer(params, 0, &param_bytes);
                let pairs_buf = scratch.pairs.ensure(&ctx.device, pair_bytes.len() as u64);
                ctx.queue.write_buffer(pairs_buf, 0, pair_bytes);
                let binds: Vec<::wgpu::BindGroup> = pieces
                    .iter()
                    .map(|&(j, _, _)| {
                        let (src, dst) = (jobs[j].src, dsts[jobs[j].dst]);
                        ctx.device.create_bind_group(&::wgpu::BindGroupDescriptor {
                            label: Some("gather"),
                            layout: &self.gather_layout,
                            entries: &[
                                ::wgpu::BindGroupEntry {
                                    binding: 0,
                                    resource: entire(
                                        params,
                                        std::mem::size_of::<GatherParams>() as u64,
                                    ),
                                },
                                ::wgpu::BindGroupEntry {
                                    binding: 1,
                                    resource: entire(pairs_buf, pair_bytes.len() as u64),
                                },
                                ::wgpu::BindGroupEntry {
                                    binding: 2,
                                    resource: src.as_entire_binding(),
                                },
                                ::wgpu::BindGroupEntry {
                                    binding: 3,
                                    resource: dst.as_entire_binding(),
                                },
                            ],
                        })
                    })
                    .collect();
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&self.gather_pipeline);
                for (k, ((_, _, grid), bind)) in pieces.iter().zip(&binds).enumerate() {
                    pass.set_bind_group(0, bind, &[(k * stride) as u32]);
                    pass.dispatch_workgroups(grid.0, grid.1, 1);
                }
            }
            ctx.queue.submit([enc.finish()])
        })
    }

    /// Waits (at most 60 s) for a submission; a lost device or a timeout is `Err`
    /// (and recorded).
    pub fn wait(&self, s: ::wgpu::SubmissionIndex) -> Result<()> {
        self.ctx
            .device
            .poll(::wgpu::PollType::Wait {
                submission_index: Some(s),
                timeout: Some(GPU_TIMEOUT),
            })
            .map_err(|e| self.fail(format!("waiting for the GPU failed (device lost?): {e}")))?;
        self.health()
    }

    /// Copies `buf[..len]` to the host (through a `MAP_READ` staging buffer) and waits.
    pub fn read_buffer(&self, buf: &::wgpu::Buffer, len: u64) -> Result<Vec<u8>> {
        self.health()?;
        let size = len.next_multiple_of(4);
        if size > buf.size() {
            return Err(invalid(format!(
                "read_buffer: {len} bytes (copied as {size}) from a buffer of {} bytes",
                buf.size()
            )));
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        if !buf.usage().contains(::wgpu::BufferUsages::COPY_SRC) {
            return Err(invalid("read_buffer: buffer lacks COPY_SRC".into()));
        }
        let ctx = &*self.ctx;
        let (readback, submission) = self.scoped("read_buffer", || {
            let readback = ctx.device.create_buffer(&::wgpu::BufferDescriptor {
                label: Some("batch_readback"),
                size,
                usage: ::wgpu::BufferUsages::MAP_READ | ::wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(buf, 0, &readback, 0, size);
            (readback, ctx.queue.submit([enc.finish()]))
        })?;
        let (tx, rx) = std::sync::mpsc::channel();
        readback.map_async(::wgpu::MapMode::Read, 0..size, move |r| {
            let _ = tx.send(r);
        });
        self.wait(submission)?;
        match rx.recv_timeout(GPU_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(self.fail(format!("read_buffer: mapping failed: {e}"))),
            Err(_) => return Err(self.fail("read_buffer: the buffer never mapped".into())),
        }
        let out = readback
            .get_mapped_range(0..size)
            .map_err(|e| self.fail(format!("read_buffer: mapped view: {e}")))?[..len as usize]
            .to_vec();
        readback.unmap();
        readback.destroy();
        Ok(out)
    }

    /// `Ok` while the device works; the first recorded failure (device lost, validation,
    /// out of memory in a submission, timeout) afterwards.
    pub fn health(&self) -> Result<()> {
        match lock(&self.ctx.failure).as_ref() {
            None => Ok(()),
            Some(reason) => Err(backend_err(format!("{}: {reason}", self.ctx.adapter))),
        }
    }
}

impl Drop for WgpuBatchEngine {
    fn drop(&mut self) {
        // Overwrite the round keys in device memory before releasing it.
        self.ctx
            .queue
            .write_buffer(&self.keys, 0, &vec![0u8; self.keys.size() as usize]);
        self.ctx.queue.submit([]);
        self.keys.destroy();
    }
}

/// Throughput of the wgpu device loader's GPU stages ([`window_bench`]), each checked against
/// the CPU before it was timed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WindowBench {
    /// Bytes per pass (a window of 2 MiB chunks).
    pub bytes: u64,
    /// Upload through the mapped ring: host copy + GPU copy into the window, waited.
    pub upload_gbps: f64,
    /// The batch CTR kernel (`aes_ctr_batch.wgsl`) over the resident window, dispatch + wait.
    pub window_ctr_gbps: f64,
    /// The row gather (`gather.wgsl`), 1 KiB rows in random order from the window into one
    /// column buffer, dispatch + wait.
    pub gather_gbps: f64,
}

impl std::fmt::Display for WindowBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "  device loader stages ({} MiB window): upload {:.3} GB/s, window CTR {:.3} GB/s, \
             gather {:.3} GB/s",
            self.bytes >> 20,
            self.upload_gbps,
            self.window_ctr_gbps,
            self.gather_gbps
        )
    }
}

/// Measures the device loader's GPU stages on `cipher`'s adapter over a window of about
/// `bytes` bytes (2 MiB chunks, one key).
pub fn window_bench(cipher: &WgpuCipher, bytes: usize) -> Result<WindowBench> {
    use super::conformance::SplitMix;
    use super::wgpu::{gbps, time_passes};
    use super::{Cipher, cpu::CpuCipher};
    const CHUNK: usize = 2 << 20;
    const ROW: usize = 1024;
    let bytes = bytes.max(CHUNK).next_multiple_of(CHUNK);
    let data_key = DataKey::generate()?;
    let engine = WgpuBatchEngine::new(cipher, &[&data_key])?;
    let cpu = CpuCipher::new().prepare(&data_key)?;
    let mut rng = SplitMix(0x57A6E5);
    let mut plain = vec![0u8; bytes];
    rng.fill(&mut plain);
    let mut staging = vec![0u8; bytes];
    let chunks: Vec<WindowChunk> = (0..bytes / CHUNK)
        .map(|i| {
            let mut nonce = [0u8; NONCE_LEN];
            nonce[..8].copy_from_slice(&(i as u64).to_be_bytes());
            let at = i * CHUNK..(i + 1) * CHUNK;
            cpu.ctr_apply(&nonce, 0, &plain[at.clone()], &mut staging[at])?;
            Ok(WindowChunk {
                offset: (i * CHUNK) as u64,
                len: CHUNK as u64,
                nonce,
                key: 0,
            })
        })
        .collect::<Result<_>>()?;
    let window = engine.create_buffer("bench_window", bytes as u64)?;
    let mut ring = engine.upload_ring(2, bytes as u64)?;
    let s = engine.upload_decrypt_ring(&mut ring, 1, &window, &staging, &chunks)?;
    engine.wait(s)?;
    if engine.read_buffer(&window, bytes as u64)? != plain {
        return Err(backend_err(format!(
            "{}: the window CTR kernel disagrees with the CPU",
            cipher.adapter()
        )));
    }
    let upload = time_passes(&mut || {
        let s = engine.upload_decrypt_ring(&mut ring, 1, &window, &staging, &[])?;
        engine.wait(s)
    })?;
    let ctr = time_passes(&mut || {
        let s = engine.decrypt_resident(&window, &chunks)?;
        engine.wait(s)
    })?;
    // The timed passes left the window in either state: upload and decrypt it once more.
    engine.upload_decrypt(&window, &staging, &chunks)?;
    let rows = bytes / ROW;
    let mut order: Vec<u64> = (0..rows as u64).collect();
    for i in (1..rows).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let pairs: Vec<(u64, u64)> = order
        .iter()
        .enumerate()
        .map(|(i, &r)| (r * ROW as u64, (i * ROW) as u64))
        .collect();
    let column = engine.create_buffer("bench_column", bytes as u64)?;
    let jobs = [GatherJob {
        src: &window,
        dst: 0,
        pairs: 0..pairs.len(),
        row_bytes: ROW as u64,
    }];
    let s = engine.gather(&jobs, &pairs, &[&column])?;
    engine.wait(s)?;
    let got = engine.read_buffer(&column, bytes as u64)?;
    if !order.iter().enumerate().all(|(i, &r)| {
        got[i * ROW..(i + 1) * ROW] == plain[r as usize * ROW..(r as usize + 1) * ROW]
    }) {
        return Err(backend_err(format!(
            "{}: the row gather disagrees with the host",
            cipher.adapter()
        )));
    }
    let gather = time_passes(&mut || {
        let s = engine.gather(&jobs, &pairs, &[&column])?;
        engine.wait(s)
    })?;
    engine.health()?;
    Ok(WindowBench {
        bytes: bytes as u64,
        upload_gbps: gbps(bytes, upload),
        window_ctr_gbps: gbps(bytes, ctr),
        gather_gbps: gbps(bytes, gather),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cipher::Cipher;
    use crate::cipher::conformance::SplitMix;
    use crate::cipher::cpu::CpuCipher;
    use crate::cipher::wgpu::{KernelVariant, WgpuOptions};

    /// The backend here (lavapipe included), or `None` with a message when there is no adapter.
    fn cipher(kernel: Option<KernelVariant>) -> Option<WgpuCipher> {
        WgpuCipher::new(WgpuOptions {
            allow_cpu_adapter: true,
            kernel,
            ..Default::default()
        })
        .inspect_err(|e| eprintln!("skipping: no wgpu adapter: {e}"))
        .ok()
    }

    fn random_keys(rng: &mut SplitMix, n: usize) -> Vec<DataKey> {
        (0..n)
            .map(|_| {
                let mut k = [0u8; 32];
                rng.fill(&mut k);
                DataKey::from_bytes(k)
            })
            .collect()
    }

    /// Lays out chunks of `lens` at 16-byte aligned offsets with random gaps, encrypts each on
    /// the CPU with a random key of `keys` and a distinct nonce; returns the staging bytes (gaps
    /// random), the chunks and their plaintexts.
    fn encrypted_window(
        rng: &mut SplitMix,
        keys: &[DataKey],
        lens: &[u64],
    ) -> (Vec<u8>, Vec<WindowChunk>, Vec<Vec<u8>>) {
        let mut chunks = Vec::new();
        let mut offset = 16 * rng.below(3);
        for (i, &len) in lens.iter().enumerate() {
            let mut nonce = [0u8; NONCE_LEN];
            rng.fill(&mut nonce);
            nonce[0] = i as u8; // distinct
            chunks.push(WindowChunk {
                offset,
                len,
                nonce,
                key: rng.below(keys.len() as u64) as u32,
            });
            offset = (offset + len).next_multiple_of(16) + 16 * rng.below(4);
        }
        let mut staging = vec![0u8; offset.next_multiple_of(16) as usize + 16];
        rng.fill(&mut staging);
        let mut plains = Vec::new();
        for c in &chunks {
            let mut pt = vec![0u8; c.len as usize];
            rng.fill(&mut pt);
            let op = CpuCipher::new().prepare(&keys[c.key as usize]).unwrap();
            let at = c.offset as usize..(c.offset + c.len) as usize;
            op.ctr_apply(&c.nonce, 0, &pt, &mut staging[at]).unwrap();
            plains.push(pt);
        }
        (staging, chunks, plains)
    }

    /// Decrypts the window on the device and checks every chunk against its plaintext, and
    /// that no byte past a chunk's last block changed.
    fn check_window(
        engine: &WgpuBatchEngine,
        staging: &[u8],
        chunks: &[WindowChunk],
        plains: &[Vec<u8>],
    ) {
        let window = engine
            .create_buffer("window", staging.len() as u64)
            .unwrap();
        let s = engine.upload_decrypt(&window, staging, chunks).unwrap();
        engine.wait(s).unwrap();
        let got = engine.read_buffer(&window, staging.len() as u64).unwrap();
        let mut touched = vec![false; staging.len()];
        for (i, (c, pt)) in chunks.iter().zip(plains).enumerate() {
            let at = c.offset as usize..(c.offset + c.len) as usize;
            assert!(got[at.clone()] == pt[..], "chunk {i} (len {})", c.len);
            let padded = c.offset as usize..(c.offset + c.len).next_multiple_of(16) as usize;
            touched[padded].iter_mut().for_each(|t| *t = true);
        }
        for (k, t) in touched.iter().enumerate() {
            assert!(
                *t || got[k] == staging[k],
                "byte {k} outside every chunk changed"
            );
        }
        engine.health().unwrap();
    }

    /// Windows of different sizes through a two-slot ring (each slot reused, so every
    /// re-mapping path runs) decrypt exactly as through `queue.write_buffer`.
    #[test]
    fn upload_ring_matches_cpu_across_reuse() {
        let Some(c) = cipher(None) else { return };
        let mut rng = SplitMix(0x5107);
        let keys = random_keys(&mut rng, 2);
        let key_refs: Vec<&DataKey> = keys.iter().collect();
        let engine = WgpuBatchEngine::new(&c, &key_refs).unwrap();
        let mut ring = engine.upload_ring(2, 4 << 20).unwrap();
        for round in 0..5u64 {
            // Up to ~3 MiB: several copy threads (1 MiB ranges at least) in some rounds.
            let lens = [
                1 + round * 7,
                4096,
                65536 + round,
                0,
                (round % 3) << 20,
                100_000 - round * 13,
            ];
            let (staging, chunks, plains) = encrypted_window(&mut rng, &keys, &lens);
            let window = engine
                .create_buffer("window", staging.len() as u64)
                .unwrap();
            let s = engine
                .upload_decrypt_ring(
                    &mut ring,
                    1 + round as usize % 3,
                    &window,
                    &staging,
                    &chunks,
                )
                .unwrap();
            engine.wait(s).unwrap();
            let got = engine.read_buffer(&window, staging.len() as u64).unwrap();
            for (i, (c, pt)) in chunks.iter().zip(&plains).enumerate() {
                let at = c.offset as usize..(c.offset + c.len) as usize;
                assert!(got[at] == pt[..], "round {round} chunk {i}");
            }
        }
        // Staging larger than a slot: an argument error, and the ring still works after it.
        let big = engine.create_buffer("big", 5 << 20).unwrap();
        let err = engine
            .upload_decrypt_ring(&mut ring, 2, &big, &vec![0u8; 5 << 20], &[])
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        let (staging, chunks, plains) = encrypted_window(&mut rng, &keys, &[5000]);
        let window = engine.create_buffer("w", staging.len() as u64).unwrap();
        let s = engine
            .upload_decrypt_ring(&mut ring, 3, &window, &staging, &chunks)
            .unwrap();
        engine.wait(s).unwrap();
        let got = engine.read_buffer(&window, staging.len() as u64).unwrap();
        let at = chunks[0].offset as usize..(chunks[0].offset + chunks[0].len) as usize;
        assert!(got[at] == plains[0][..]);
        engine.health().unwrap();
    }

    /// Host-side cost of the two upload paths per 16 MiB window (upload only, no CTR): run by
    /// hand, `cargo test --release --lib wgpu_batch::tests::measure_upload -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore = "timing probe, run by hand in release"]
    fn measure_upload_paths() {
        let Some(c) = cipher(None) else { return };
        let key = DataKey::from_bytes([3; 32]);
        let engine = WgpuBatchEngine::new(&c, &[&key]).unwrap();
        let bytes = 16usize << 20;
        let staging = vec![0x5au8; bytes];
        let windows: Vec<_> = (0..2)
            .map(|_| engine.create_buffer("w", bytes as u64).unwrap())
            .collect();
        let mut ring = engine.upload_ring(2, bytes as u64).unwrap();
        let rounds = 24;
        for pass in 0..2 {
            let mut line = format!("pass {pass}:");
            for (name, threads) in [("write_buffer", 0), ("ring x1", 1), ("ring x2", 2)] {
                let (mut host, t) = (0f64, std::time::Instant::now());
                let mut last = None;
                for r in 0..rounds {
                    let h = std::time::Instant::now();
                    let w = &windows[r % 2];
                    last = Some(if threads == 0 {
                        engine.upload_decrypt(w, &staging, &[]).unwrap()
                    } else {
                        engine
                            .upload_decrypt_ring(&mut ring, threads, w, &staging, &[])
                            .unwrap()
                    });
                    host += h.elapsed().as_secs_f64();
                }
                engine.wait(last.unwrap()).unwrap();
                let gbs = |s: f64| (rounds * bytes) as f64 / s / 1e9;
                line += &format!(
                    "  {name} host {:.2} GB/s (with GPU {:.2})",
                    gbs(host),
                    gbs(t.elapsed().as_secs_f64())
                );
            }
            eprintln!("{line}");
        }
    }

    #[test]
    fn upload_decrypt_matches_cpu() {
        let mut rng = SplitMix(0xBA7C);
        let keys = random_keys(&mut rng, 3);
        let key_refs: Vec<&DataKey> = keys.iter().collect();
        let lens = [1, 15, 16, 17, 4096, 65536 + 5, 0, 31, 33, 100, 2 << 20, 7];
        let (staging, chunks, plains) = encrypted_window(&mut rng, &keys, &lens);
        // The default kernel variant, the 512-wide bank-interleaved one, and one with the rounds
        // unrolled (the batch kernel keeps the runtime checks whatever the variant says).
        let banked = KernelVariant {
            workgroup_size: 512,
            blocks_per_invocation: 4,
            loop_blocks: 1,
            table_copies: 32,
            runtime_checks: true,
            unrolled: false,
        };
        let unrolled = KernelVariant {
            workgroup_size: 256,
            table_copies: 32,
            runtime_checks: false,
            unrolled: true,
            ..KernelVariant::DEFAULT
        };
        for kernel in [None, Some(banked), Some(unrolled)] {
            let Some(c) = cipher(kernel) else { return };
            let engine = WgpuBatchEngine::new(&c, &key_refs).unwrap();
            check_window(&engine, &staging, &chunks, &plains);
            // Chunks in any order in the table.
            let (mut ch, mut pl) = (chunks.clone(), plains.clone());
            ch.reverse();
            pl.reverse();
            check_window(&engine, &staging, &ch, &pl);
        }
    }

    #[test]
    fn upload_decrypt_with_a_two_dimensional_grid() {
        let Some(c) = cipher(None) else { return };
        let mut rng = SplitMix(0x2D);
        let keys = random_keys(&mut rng, 2);
        let key_refs: Vec<&DataKey> = keys.iter().collect();
        let mut engine = WgpuBatchEngine::new(&c, &key_refs).unwrap();
        // Eight workgroups per row (2048 blocks with 256 invocations per workgroup): about 6000
        // blocks need three rows.
        engine.max_workgroups = 8;
        let (staging, chunks, plains) =
            encrypted_window(&mut rng, &keys, &[65536 + 5, 3, 20_000, 16 * 700 + 1]);
        let blocks: u64 = chunks.iter().map(|c| c.len.div_ceil(16)).sum();
        assert!(blocks > 2 * 8 * 256, "{blocks} blocks fit in two rows");
        check_window(&engine, &staging, &chunks, &plains);
        // A grid that cannot hold the blocks even in 2-D is an error, not a truncated pass.
        engine.max_workgroups = 4;
        let window = engine.create_buffer("w", staging.len() as u64).unwrap();
        assert!(engine.upload_decrypt(&window, &staging, &chunks).is_err());
        engine.health().unwrap();
    }

    /// Host reference of one gather: zeros, then every job's rows copied.
    fn reference(
        windows: &[Vec<u8>],
        src_of: &[usize],
        jobs: &[(usize, Range<usize>, u64)],
        pairs: &[(u64, u64)],
        dst_sizes: &[usize],
    ) -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = dst_sizes.iter().map(|&n| vec![0u8; n]).collect();
        for (j, (dst, range, row)) in jobs.iter().enumerate() {
            for &(s, d) in &pairs[range.clone()] {
                let (s, d, r) = (s as usize, d as usize, *row as usize);
                out[*dst][d..d + r].copy_from_slice(&windows[src_of[j]][s..s + r]);
            }
        }
        out
    }

    #[test]
    fn gather_matches_host_reference() {
        let Some(c) = cipher(None) else { return };
        let mut engine = WgpuBatchEngine::new(&c, &[]).unwrap();
        let mut rng = SplitMix(0x6A7);
        let windows: Vec<Vec<u8>> = [40_000usize, 50_000]
            .iter()
            .map(|&n| {
                let mut w = vec![0u8; n];
                rng.fill(&mut w);
                w
            })
            .collect();
        let bufs: Vec<::wgpu::Buffer> = windows
            .iter()
            .map(|w| {
                let b = engine.create_buffer("window", w.len() as u64).unwrap();
                engine
                    .wait(engine.upload_decrypt(&b, w, &[]).unwrap())
                    .unwrap();
                b
            })
            .collect();
        // Columns: each row size goes to one of two dst buffers, packed back to back (rows of
        // neighbouring columns share boundary words) or after a gap (must stay zero).
        let mut jobs = Vec::new();
        let mut src_of = Vec::new();
        let mut pairs = Vec::new();
        let mut cursor = [3u64, 1u64];
        for (j, &row) in [1u64, 2, 3, 5, 8, 12, 17, 4099, 1, 3].iter().enumerate() {
            let dst = j % 2;
            let src = (j / 2) % 2;
            let rows = if row > 1000 { 5 } else { 37 };
            let base = cursor[dst] + rng.below(3) * rng.below(7);
            let mut order: Vec<u64> = (0..rows).collect();
            for k in (1..order.len()).rev() {
                order.swap(k, rng.below(k as u64 + 1) as usize);
            }
            let start = pairs.len();
            for &k in &order {
                let s = rng.below(windows[src].len() as u64 - row + 1);
                pairs.push((s, base + k * row));
            }
            cursor[dst] = base + rows * row;
            jobs.push((dst, start..pairs.len(), row));
            src_of.push(src);
        }
        let dst_sizes = [cursor[0] as usize + 21, cursor[1] as usize + 5];
        let dsts: Vec<::wgpu::Buffer> = dst_sizes
            .iter()
            .map(|&n| engine.create_buffer("column", n as u64).unwrap())
            .collect();
        let want = reference(&windows, &src_of, &jobs, &pairs, &dst_sizes);
        let gather_jobs: Vec<GatherJob<'_>> = jobs
            .iter()
            .zip(&src_of)
            .map(|((dst, range, row), &src)| GatherJob {
                src: &bufs[src],
                dst: *dst,
                pairs: range.clone(),
                row_bytes: *row,
            })
            .collect();
        let dst_refs: Vec<&::wgpu::Buffer> = dsts.iter().collect();
        // Default grid, then a 3-workgroup limit: 2-D grids, and the 4099-byte job split into
        // several dispatches.
        for max_workgroups in [engine.max_workgroups, 3] {
            engine.max_workgroups = max_workgroups;
            // Garbage in the columns first: gather must clear them.
            for d in &dsts {
                let mut junk = vec![0u8; d.size() as usize];
                rng.fill(&mut junk);
                engine
                    .wait(engine.upload_decrypt(d, &junk, &[]).unwrap())
                    .unwrap();
            }
            let s = engine.gather(&gather_jobs, &pairs, &dst_refs).unwrap();
            engine.wait(s).unwrap();
            for (i, d) in dsts.iter().enumerate() {
                let got = engine.read_buffer(d, dst_sizes[i] as u64).unwrap();
                let bad = got.iter().zip(&want[i]).position(|(a, b)| a != b);
                assert_eq!(bad, None, "dst {i}, max workgroups {max_workgroups}");
            }
        }
        engine.health().unwrap();
    }

    #[test]
    fn invalid_arguments_are_errors_and_the_device_stays_usable() {
        let Some(c) = cipher(None) else { return };
        let mut rng = SplitMix(0xE44);
        let keys = random_keys(&mut rng, 2);
        let key_refs: Vec<&DataKey> = keys.iter().collect();
        let engine = WgpuBatchEngine::new(&c, &key_refs).unwrap();
        let (staging, chunks, plains) = encrypted_window(&mut rng, &keys, &[100, 64, 17]);
        let window = engine.create_buffer("w", staging.len() as u64).unwrap();
        let invalid = |r: Result<::wgpu::SubmissionIndex>, what: &str| match r {
            Err(Error::InvalidArgument(m)) => eprintln!("{what}: {m}"),
            Err(e) => panic!("{what}: wrong error {e}"),
            Ok(_) => panic!("{what}: accepted"),
        };
        let with = |f: &dyn Fn(&mut WindowChunk)| {
            let mut ch = chunks.clone();
            f(&mut ch[1]);
            ch
        };
        let n = staging.len() as u64;
        invalid(
            engine.upload_decrypt(&window, &staging, &with(&|c| c.len = n)),
            "chunk outside the staging",
        );
        invalid(
            engine.upload_decrypt(&window, &staging, &with(&|c| c.offset = u64::MAX - 15)),
            "chunk offset overflowing",
        );
        invalid(
            engine.upload_decrypt(&window, &staging, &with(&|c| c.offset += 4)),
            "misaligned offset",
        );
        invalid(
            engine.upload_decrypt(&window, &staging, &with(&|c| c.key = 2)),
            "bad key index",
        );
        invalid(
            engine.upload_decrypt(&window, &staging, &with(&|c| c.offset = chunks[0].offset)),
            "overlapping chunks",
        );
        invalid(
            engine.upload_decrypt(&window, &staging[..staging.len() - 2], &[]),
            "staging not a multiple of 4",
        );
        let small = engine.create_buffer("small", 64).unwrap();
        invalid(
            engine.upload_decrypt(&small, &staging, &[]),
            "staging bigger than the window",
        );
        assert!(
            engine
                .create_buffer("huge", engine.max_binding_bytes() + 1)
                .is_err()
        );
        assert!(engine.read_buffer(&small, 65).is_err());

        let dst = engine.create_buffer("dst", 32).unwrap();
        let job = |src, dst, pairs: Range<usize>, row_bytes| GatherJob {
            src,
            dst,
            pairs,
            row_bytes,
        };
        let pairs = [(0u64, 0u64), (n - 8, 24), (n - 7, 0), (0, 25)];
        let gather =
            |jobs: &[GatherJob<'_>], dsts: &[&::wgpu::Buffer]| engine.gather(jobs, &pairs, dsts);
        invalid(
            gather(&[job(&window, 0, 2..3, 8)], &[&dst]),
            "pair outside src",
        );
        invalid(
            gather(&[job(&window, 0, 3..4, 8)], &[&dst]),
            "pair outside dst",
        );
        invalid(
            gather(&[job(&window, 1, 0..2, 8)], &[&dst]),
            "dst index out of range",
        );
        invalid(
            gather(&[job(&window, 0, 3..5, 8)], &[&dst]),
            "pair range outside pairs",
        );
        invalid(gather(&[job(&dst, 0, 0..1, 8)], &[&dst]), "src is dst");
        // A bad job after a good one: nothing is queued.
        invalid(
            gather(
                &[job(&window, 0, 0..2, 8), job(&window, 0, 2..3, 8)],
                &[&dst],
            ),
            "second job bad",
        );

        // Still usable: a valid decrypt and gather give the right bytes.
        engine.health().unwrap();
        c.health().unwrap();
        check_window(&engine, &staging, &chunks, &plains);
        let s = engine.upload_decrypt(&window, &staging, &chunks).unwrap();
        engine.wait(s).unwrap();
        let plain = engine.read_buffer(&window, n).unwrap();
        let s = gather(&[job(&window, 0, 0..2, 8)], &[&dst]).unwrap();
        engine.wait(s).unwrap();
        let got = engine.read_buffer(&dst, 32).unwrap();
        assert_eq!(got[..8], plain[..8]);
        assert_eq!(got[8..24], [0u8; 16]);
        assert_eq!(got[24..], plain[n as usize - 8..]);
    }

    #[test]
    fn engine_is_send_sync_and_debug_shows_only_the_adapter() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<WgpuBatchEngine>();
        let Some(c) = cipher(None) else { return };
        let key = DataKey::from_bytes([0x42; 32]);
        let engine = WgpuBatchEngine::new(&c, &[&key]).unwrap();
        let text = format!("{engine:?}");
        assert!(text.contains(&c.adapter().name), "{text}");
        assert!(!text.contains("keys"), "{text}");
    }

    #[test]
    fn lost_device_is_an_error_not_a_panic() {
        let Some(c) = cipher(None) else { return };
        let key = DataKey::from_bytes([7; 32]);
        let engine = WgpuBatchEngine::new(&c, &[&key]).unwrap();
        let window = engine.create_buffer("w", 4096).unwrap();
        let dst = engine.create_buffer("d", 64).unwrap();
        let s = engine.upload_decrypt(&window, &[0u8; 4096], &[]).unwrap();
        engine.device().destroy();
        let _ = engine.device().poll(::wgpu::PollType::Poll);
        let _ = engine.wait(s);
        let chunk = WindowChunk {
            offset: 0,
            len: 100,
            nonce: [1; NONCE_LEN],
            key: 0,
        };
        assert!(
            engine
                .upload_decrypt(&window, &[0u8; 4096], &[chunk])
                .is_err()
        );
        let job = GatherJob {
            src: &window,
            dst: 0,
            pairs: 0..1,
            row_bytes: 8,
        };
        assert!(engine.gather(&[job], &[(0, 0)], &[&dst]).is_err());
        assert!(engine.read_buffer(&window, 16).is_err());
        assert!(matches!(engine.health(), Err(Error::Backend { .. })));
        assert!(c.health().is_err(), "the cipher shares the failure");
        drop(engine); // zeroing the keys on a lost device must not panic either
    }

    #[test]
    fn decrypt_and_gather_from_two_threads() {
        let Some(c) = cipher(None) else { return };
        let mut rng = SplitMix(0x7707);
        let keys = random_keys(&mut rng, 2);
        let key_refs: Vec<&DataKey> = keys.iter().collect();
        let engine = WgpuBatchEngine::new(&c, &key_refs).unwrap();
        let (staging, chunks, plains) = encrypted_window(&mut rng, &keys, &[5000, 17, 30_000]);
        let mut src = vec![0u8; 4096];
        rng.fill(&mut src);
        let src_buf = engine.create_buffer("src", 4096).unwrap();
        engine
            .wait(engine.upload_decrypt(&src_buf, &src, &[]).unwrap())
            .unwrap();
        let pairs: Vec<(u64, u64)> = (0..100u64).map(|k| (k * 37 % 4000, k * 7)).collect();
        let mut want = vec![0u8; 700];
        for &(s, d) in &pairs {
            want[d as usize..d as usize + 7].copy_from_slice(&src[s as usize..s as usize + 7]);
        }
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for _ in 0..5 {
                    check_window(&engine, &staging, &chunks, &plains);
                }
            });
            scope.spawn(|| {
                let dst = engine.create_buffer("dst", 700).unwrap();
                let job = GatherJob {
                    src: &src_buf,
                    dst: 0,
                    pairs: 0..pairs.len(),
                    row_bytes: 7,
                };
                for _ in 0..5 {
                    let s = engine
                        .gather(std::slice::from_ref(&job), &pairs, &[&dst])
                        .unwrap();
                    engine.wait(s).unwrap();
                    assert!(engine.read_buffer(&dst, 700).unwrap() == want);
                }
            });
        });
        engine.health().unwrap();
    }
}
