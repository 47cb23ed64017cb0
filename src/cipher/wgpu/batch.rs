//! Device-resident batches: [`WgpuBatchEngine`] decrypts windows of a shard in device memory
//! and gathers rows out of them.
//!
//! The loader uploads a window of a shard (many verified chunks, 16-byte aligned) into a device
//! buffer and decrypts every chunk in place with one dispatch ([`WgpuBatchEngine::upload_decrypt`],
//! `shaders/aes_ctr_batch.wgsl`: one block per invocation, each chunk with its own key and
//! nonce). It then copies rows out of such windows into per-column batch buffers
//! ([`WgpuBatchEngine::gather`], `gather.rs`), so plaintext never returns to the host.
//!
//! The engine shares the device, queue, AES table, kernel variant and failure slot of a
//! [`WgpuCipher`]; its pipelines are built once, and its scratch buffers (chunk table, pairs,
//! parameters) are created once, grown on demand and reused. Each scratch set sits behind its own
//! mutex, held from the first queue write to the submission: `upload_decrypt` and `gather` may be
//! called from two threads, and queue writes are seen by the next submission whatever thread made
//! them.
//!
//! Every argument is validated before anything is queued ([`crate::error::Error::InvalidArgument`]); failures
//! of the device itself (validation or out-of-memory inside an error scope, a lost device, a
//! timeout) come back as [`crate::error::Error::Backend`] naming the adapter and the step, and are recorded so
//! that [`WgpuBatchEngine::health`] (and the cipher's) report them afterwards. Nothing panics.
#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};

use zeroize::Zeroizing;

use super::WgpuCipher;
use super::adapter::AdapterSummary;
use super::context::{Context, Grown};
use super::failure::{GPU_TIMEOUT, backend_err, invalid, lock};
use super::gather::{GatherJob, Gatherer};
use super::params::{BatchParams, ChunkEntry, nonce_words};
use super::pipelines::{build_batch_pipeline, entire};
use super::ring::UploadRing;
use super::tables::expand_key;
use crate::cipher::{BLOCK_LEN, NONCE_LEN};
use crate::error::Result;
use crate::keys::DataKey;

/// Round-key bytes per key: 15 round keys of 16 bytes.
const ROUND_KEY_BYTES: u64 = 240;
/// Shaders address bytes with u32 offsets: no binding may reach 4 GiB.
const MAX_U32_BINDING: u64 = (1 << 32) - 16;
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

/// Scratch of `upload_decrypt`: its parameters and the chunk table.
struct DecryptScratch {
    params: ::wgpu::Buffer,
    chunks: Grown,
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

/// A window's chunk table, checked: what one CTR dispatch needs.
struct ChunkTable {
    entries: Vec<ChunkEntry>,
    /// Blocks in all.
    blocks: u64,
    /// End of the last chunk's last block: the window bytes to bind.
    bind_end: u64,
}

/// Window decryption and row gather on the wgpu device of a [`WgpuCipher`].
pub struct WgpuBatchEngine {
    ctx: Arc<Context>,
    /// Every key's 60 round-key words, key i at word 60 i (key material: zeroed on drop).
    keys: ::wgpu::Buffer,
    key_count: u32,
    ctr_pipeline: ::wgpu::ComputePipeline,
    ctr_layout: ::wgpu::BindGroupLayout,
    gatherer: Gatherer,
    /// See [`WgpuBatchEngine::max_binding_bytes`].
    max_binding: u64,
    /// Workgroups per grid dimension at most (lowered by tests to force 2-D grids).
    pub(super) max_workgroups: u32,
    decrypt: Mutex<DecryptScratch>,
}

impl std::fmt::Debug for WgpuBatchEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuBatchEngine")
            .field("adapter", &self.ctx.adapter.name)
            .finish_non_exhaustive()
    }
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

        let (ctr_pipeline, ctr_layout) =
            build_batch_pipeline(&ctx.device, ctx.shared_table, ctx.variant).map_err(|e| {
                backend_err(format!(
                    "{adapter}: shader aes_ctr_batch.wgsl failed to build: {e}"
                ))
            })?;
        let gatherer = Gatherer::new(&ctx)?;

        // Exact capacity: extending never reallocates, so no unzeroed copy of a key is left.
        let mut words = Zeroizing::new(Vec::with_capacity(keys.len() * 60));
        for key in keys {
            words.extend_from_slice(&expand_key(key.as_bytes(), &ctx.sbox)[..]);
        }
        use ::wgpu::BufferUsages as U;
        let ((keys_buf, params), failed) = ctx.error_scope(|| {
            let keys_buf = ctx.device.create_buffer(&::wgpu::BufferDescriptor {
                label: Some("batch_round_keys"),
                size: u64::from(key_count.max(1)) * ROUND_KEY_BYTES,
                usage: U::STORAGE | U::COPY_DST,
                mapped_at_creation: false,
            });
            if !words.is_empty() {
                ctx.queue
                    .write_buffer(&keys_buf, 0, bytemuck::cast_slice(&words[..]));
            }
            let params = ctx.device.create_buffer(&::wgpu::BufferDescriptor {
                label: Some("batch_params"),
                size: std::mem::size_of::<BatchParams>() as u64,
                usage: U::UNIFORM | U::COPY_DST,
                mapped_at_creation: false,
            });
            (keys_buf, params)
        });
        if let Some(e) = failed {
            return Err(backend_err(format!(
                "{adapter}: creating the batch engine's buffers: {e}"
            )));
        }
        Ok(WgpuBatchEngine {
            max_workgroups: ctx.max_workgroups,
            ctx,
            keys: keys_buf,
            key_count,
            ctr_pipeline,
            ctr_layout,
            gatherer,
            max_binding,
            decrypt: Mutex::new(DecryptScratch {
                params,
                chunks: Grown::new("batch_chunks", U::STORAGE | U::COPY_DST),
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

    /// Bytes one dispatch should cover ([`super::WgpuOptions::max_piece_bytes`], default
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
        use ::wgpu::BufferUsages as U;
        let (buf, failed) = self.ctx.error_scope(|| {
            self.ctx.device.create_buffer(&::wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: U::STORAGE | U::COPY_DST | U::COPY_SRC,
                mapped_at_creation: false,
            })
        });
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

    /// `slots` host-visible upload buffers of `bytes` each (at most `max_buffer_size`), created
    /// mapped; see [`UploadRing`].
    pub fn upload_ring(&self, slots: usize, bytes: u64) -> Result<UploadRing> {
        self.health()?;
        UploadRing::new(&self.ctx, slots, bytes)
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

    /// Checks `chunks` against the `staged` bytes and the window, and builds their table.
    fn chunk_table(
        &self,
        chunks: &[WindowChunk],
        staged: u64,
        window: &::wgpu::Buffer,
    ) -> Result<ChunkTable> {
        let mut entries = Vec::with_capacity(chunks.len());
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
            entries.push(ChunkEntry {
                first_block: total as u32,
                block_offset: block_offset as u32,
                blocks: blocks as u32,
                key: c.key,
                nonce: nonce_words(&c.nonce),
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
        Ok(ChunkTable {
            entries,
            blocks: total,
            bind_end: spans.iter().map(|s| s.1).max().unwrap_or(0),
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
        let ChunkTable {
            entries: table,
            blocks: total,
            bind_end,
        } = self.chunk_table(chunks, staged, window)?;
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
            grid = self
                .ctx
                .grid(self.max_workgroups, total.div_ceil(wg), "upload_decrypt")?;
        }

        let ctx = &*self.ctx;
        // The ring slot to copy from, filled and unmapped before anything is encoded.
        let mut ring = match upload {
            Upload::Queue | Upload::Resident => None,
            Upload::Ring(ring, threads) => {
                let i = ring.fill_next(ctx, staging, staged, threads)?;
                Some((ring, i))
            }
        };
        let mut scratch = lock(&self.decrypt);
        let scratch = &mut *scratch;
        let submission = ctx.scoped("upload_decrypt", || {
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            match &ring {
                None if !staging.is_empty() => ctx.queue.write_buffer(window, 0, staging),
                Some((ring, i)) if staged > 0 => {
                    enc.copy_buffer_to_buffer(ring.buffer(*i), 0, window, 0, staged)
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
            ring.remap_behind(*i, submission.clone());
        }
        Ok(submission)
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
        self.gatherer.run(
            &self.ctx,
            self.max_binding,
            self.max_workgroups,
            jobs,
            pairs,
            dsts,
        )
    }

    /// Waits (at most 60 s) for a submission; a lost device or a timeout is `Err`
    /// (and recorded).
    pub fn wait(&self, s: ::wgpu::SubmissionIndex) -> Result<()> {
        self.ctx.wait(s)
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
        let (readback, submission) = ctx.scoped("read_buffer", || {
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
            Ok(Err(e)) => return Err(ctx.fail(format!("read_buffer: mapping failed: {e}"))),
            Err(_) => return Err(ctx.fail("read_buffer: the buffer never mapped".into())),
        }
        let out = readback
            .get_mapped_range(0..size)
            .map_err(|e| ctx.fail(format!("read_buffer: mapped view: {e}")))?[..len as usize]
            .to_vec();
        readback.unmap();
        readback.destroy();
        Ok(out)
    }

    /// `Ok` while the device works; the first recorded failure (device lost, validation,
    /// out of memory in a submission, timeout) afterwards.
    pub fn health(&self) -> Result<()> {
        self.ctx.health()
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
