//! [`BatchDecryptor`]: many chunks per batch from pinned staging into device memory, with
//! asynchronous copies on one stream per slot (double/triple buffering) and every tag checked
//! before [`BatchDecryptor::wait`] hands the [`DeviceBatch`] out. Chunks come either as host
//! slices ([`BatchDecryptor::submit`], copied into staging) or already read into the slot's
//! pinned staging by the caller ([`BatchDecryptor::staging_mut`] +
//! [`BatchDecryptor::submit_staged`]: one copy out of the page cache).
#![forbid(unsafe_code)]

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, PinnedHostSlice};

use super::ffi::alloc_pinned;
use super::key::{CudaKey, acc_bytes};
use super::launch::{ChunkDesc, DeviceDescs, MAX_CHUNKS_PER_LAUNCH};
use super::staging::parallel_copy;
use super::{Device, backend_err, drv};
use crate::cipher::ChunkParams;
use crate::cipher::ct_eq;
use crate::error::{Error, Result};

/// One chunk of a batch: its key, GCM parameters, ciphertext (e.g. a slice of the mapped shard)
/// and where its plaintext goes in the batch's device buffer.
pub struct BatchChunk<'a> {
    /// The shard's data key, prepared with
    /// [`CudaCipher::prepare_device`](super::CudaCipher::prepare_device).
    pub key: &'a Arc<CudaKey>,
    /// GCM nonce, associated data and stored tag; `encrypted: false` for plain (GMAC) chunks.
    pub params: ChunkParams<'a>,
    /// The stored chunk bytes.
    pub data: &'a [u8],
    /// Byte offset of this chunk's plaintext in the output device buffer.
    pub dst_offset: usize,
}

/// One chunk of a batch whose stored bytes the caller already wrote into the slot's pinned
/// staging buffer ([`BatchDecryptor::staging_mut`]).
pub struct StagedChunk<'a> {
    /// The shard's data key, prepared with
    /// [`CudaCipher::prepare_device`](super::CudaCipher::prepare_device).
    pub key: &'a Arc<CudaKey>,
    /// GCM nonce, associated data and stored tag; `encrypted: false` for plain (GMAC) chunks.
    pub params: ChunkParams<'a>,
    /// Where the chunk's bytes start in the staging buffer (16-byte aligned is fastest).
    pub staging_offset: usize,
    /// The chunk's length in bytes.
    pub len: usize,
    /// Byte offset of this chunk's plaintext in the output device buffer.
    pub dst_offset: usize,
}

/// What the kernels need of a chunk once its bytes are on the device.
struct Meta<'a> {
    key: &'a Arc<CudaKey>,
    params: ChunkParams<'a>,
    len: usize,
    dst_offset: usize,
}

/// A batch whose every tag verified: plaintext in device memory.
pub struct DeviceBatch {
    buf: CudaSlice<u8>,
    len: usize,
    stream: Arc<CudaStream>,
}

impl DeviceBatch {
    /// The device buffer (at least [`len`](Self::len) bytes).
    pub fn slice(&self) -> &CudaSlice<u8> {
        &self.buf
    }
    /// Plaintext length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Raw device pointer (`CUdeviceptr`) for DLPack export; valid while `self` lives. The data
    /// is complete on [`stream`](Self::stream) (already synchronized when handed out).
    pub fn device_ptr(&self) -> u64 {
        let (p, _sync) = self.buf.device_ptr(&self.stream);
        p
    }
    /// The stream the batch was produced on (`cu_stream()` for DLPack's stream argument).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

struct Pending {
    out: CudaSlice<u8>,
    out_len: usize,
    expected: Vec<[u8; 16]>,
}

struct Slot {
    stream: Arc<CudaStream>,
    staging: PinnedHostSlice<u8>,
    aad_host: Vec<u8>,
    d_src: CudaSlice<u8>,
    d_aad: CudaSlice<u8>,
    /// Pinned so the 16-byte-per-chunk GHASH download stays asynchronous; same length as
    /// `d_acc` (the whole buffer is copied).
    acc_host: PinnedHostSlice<u32>,
    d_acc: CudaSlice<u32>,
    pending: Option<Pending>,
}

/// Staging is filled and uploaded in groups of about this many bytes.
const STAGE_GROUP_BYTES: usize = 16 << 20;

/// Device and pinned host GHASH accumulators of at least `words` words (a power of two).
fn acc_buffers(
    dev: &Device,
    stream: &Arc<CudaStream>,
    words: usize,
) -> Result<(CudaSlice<u32>, PinnedHostSlice<u32>)> {
    let n = words.next_power_of_two();
    let d = stream
        .alloc_zeros::<u32>(n)
        .map_err(drv("device allocation"))?;
    // Read only after a full device-to-host copy into it.
    let h = alloc_pinned::<u32>(&dev.ctx, n).map_err(drv("allocating pinned memory"))?;
    Ok((d, h))
}

/// Ticket for a submitted batch; pass it to [`BatchDecryptor::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(usize);

/// Decrypts batches of chunks into device memory with `slots`-deep buffering: while batch *n*
/// is decrypted on its slot's stream, batch *n+1* is copied to pinned staging and uploaded on
/// another. Every chunk's tag is verified before `wait` returns the batch; on a mismatch the
/// device plaintext is zeroed and nothing is handed out.
pub struct BatchDecryptor {
    dev: Arc<Device>,
    slots: Vec<Slot>,
    next: usize,
    slot_bytes: usize,
    pool: Vec<CudaSlice<u8>>,
}

impl BatchDecryptor {
    pub(super) fn new(dev: &Arc<Device>, slots: usize, slot_bytes: usize) -> Result<Self> {
        if slots == 0 || slot_bytes == 0 {
            return Err(Error::InvalidArgument(
                "batch decryptor needs at least one slot of non-zero size".into(),
            ));
        }
        let mut v = Vec::with_capacity(slots);
        for _ in 0..slots {
            let stream = dev.ctx.new_stream().map_err(drv("creating a stream"))?;
            // Read only after bytes were written into it (the staging region of each chunk is
            // filled before its upload is enqueued).
            let staging = alloc_pinned::<u8>(&dev.ctx, slot_bytes)
                .map_err(drv("allocating pinned staging memory"))?;
            let d_src = stream
                .alloc_zeros::<u8>(slot_bytes)
                .map_err(drv("allocating device staging memory"))?;
            let d_aad = stream
                .alloc_zeros::<u8>(16)
                .map_err(drv("device allocation"))?;
            let (d_acc, acc_host) = acc_buffers(dev, &stream, 64)?;
            v.push(Slot {
                stream,
                staging,
                aad_host: Vec::new(),
                d_src,
                d_aad,
                acc_host,
                d_acc,
                pending: None,
            });
        }
        Ok(BatchDecryptor {
            dev: dev.clone(),
            slots: v,
            next: 0,
            slot_bytes,
            pool: Vec::new(),
        })
    }

    /// Returns a finished batch's device buffer to the pool.
    pub fn recycle(&mut self, batch: DeviceBatch) {
        if self.pool.len() < 2 * self.slots.len() {
            self.pool.push(batch.buf);
        }
    }

    fn take_buffer(&mut self, stream: &Arc<CudaStream>, len: usize) -> Result<CudaSlice<u8>> {
        if let Some(i) = self.pool.iter().position(|b| b.len() >= len) {
            return Ok(self.pool.swap_remove(i));
        }
        stream
            .alloc_zeros::<u8>(len.max(16))
            .map_err(drv("allocating the batch's device buffer"))
    }

    /// Enqueues a batch: copies the chunks into the next slot's pinned staging buffer, uploads
    /// them asynchronously and launches GHASH and AES-CTR. `out_len` is the size of the
    /// plaintext device buffer. Fails if the slot's previous batch was not yet `wait`ed.
    pub fn submit(&mut self, chunks: &[BatchChunk<'_>], out_len: usize) -> Result<Ticket> {
        self.submit_inner(chunks, out_len, true)
    }

    /// [`submit`](Self::submit), or with `decrypt: false` the benchmarks' plaintext twin: the
    /// bytes are staged, uploaded and copied to the output as they are, through the very same
    /// staging, upload and buffers, without verification or decryption.
    pub(crate) fn submit_inner(
        &mut self,
        chunks: &[BatchChunk<'_>],
        out_len: usize,
        decrypt: bool,
    ) -> Result<Ticket> {
        let idx = self.next;
        self.check_slot_free(idx, chunks.len())?;
        // Layout in staging: each chunk at a 16-byte aligned offset; check everything first.
        let mut src_offs = Vec::with_capacity(chunks.len());
        let mut at = 0usize;
        for c in chunks {
            src_offs.push(at);
            at = at.saturating_add(c.data.len().next_multiple_of(16));
        }
        if at > self.slot_bytes {
            return Err(Error::InvalidArgument(format!(
                "batch needs {at} bytes of staging, slot holds {}",
                self.slot_bytes
            )));
        }
        let metas: Vec<Meta> = chunks
            .iter()
            .map(|c| Meta {
                key: c.key,
                params: c.params,
                len: c.data.len(),
                dst_offset: c.dst_offset,
            })
            .collect();
        self.check_metas(&metas, out_len)?;
        let stream = self.slots[idx].stream.clone();
        let out = self.take_buffer(&stream, out_len)?;
        let slot = &mut self.slots[idx];
        {
            // Copy into pinned staging with several threads, a group of ~16 MiB at a time, and
            // enqueue each group's upload as soon as it is staged so copying and PCIe overlap.
            let staging = slot
                .staging
                .as_mut_slice()
                .map_err(drv("pinned staging buffer"))?;
            let mut g0 = 0;
            while g0 < chunks.len() {
                let a = src_offs[g0];
                let mut g1 = g0 + 1;
                while g1 < chunks.len() && src_offs[g1] - a < STAGE_GROUP_BYTES {
                    g1 += 1;
                }
                let b = if g1 < chunks.len() { src_offs[g1] } else { at };
                let datas: Vec<&[u8]> = chunks[g0..g1].iter().map(|c| c.data).collect();
                parallel_copy(&datas, &src_offs[g0..g1], a, &mut staging[a..b]);
                if b > a {
                    stream
                        .memcpy_htod(&staging[a..b], &mut slot.d_src.slice_mut(a..b))
                        .map_err(drv("host-to-device copy"))?;
                }
                g0 = g1;
            }
        }
        self.enqueue(idx, &metas, &src_offs, out, out_len, decrypt)
    }

    /// The pinned staging buffer of the slot the next submission uses (`slot_bytes` long), for
    /// callers that read chunk bytes straight into it (e.g. `pread` from the shard: one copy
    /// from the page cache instead of two), then call [`submit_staged`](Self::submit_staged).
    /// Fails while that slot still holds a batch that was not [`wait`](Self::wait)ed.
    pub fn staging_mut(&mut self) -> Result<&mut [u8]> {
        let idx = self.next;
        self.check_slot_free(idx, 0)?;
        self.slots[idx]
            .staging
            .as_mut_slice()
            .map_err(drv("pinned staging buffer"))
    }

    /// Enqueues a batch whose bytes the caller already wrote into
    /// [`staging_mut`](Self::staging_mut): uploads the staged range asynchronously and launches GHASH and
    /// AES-CTR, exactly as [`submit`](Self::submit). Chunks at 16-byte aligned staging offsets
    /// take the vectorized path.
    pub fn submit_staged(&mut self, chunks: &[StagedChunk<'_>], out_len: usize) -> Result<Ticket> {
        self.submit_staged_inner(chunks, out_len, true)
    }

    /// [`submit_staged`](Self::submit_staged) without verification or decryption: the staged
    /// bytes are uploaded and copied to the output as they are (the benchmarks' plaintext twin,
    /// through the very same staging, upload and buffers).
    pub(crate) fn submit_staged_plain(
        &mut self,
        chunks: &[StagedChunk<'_>],
        out_len: usize,
    ) -> Result<Ticket> {
        self.submit_staged_inner(chunks, out_len, false)
    }

    /// [`submit_staged`](Self::submit_staged), or with `decrypt: false`
    /// [`submit_staged_plain`](Self::submit_staged_plain).
    pub(crate) fn submit_staged_inner(
        &mut self,
        chunks: &[StagedChunk<'_>],
        out_len: usize,
        decrypt: bool,
    ) -> Result<Ticket> {
        let idx = self.next;
        self.check_slot_free(idx, chunks.len())?;
        let mut end = 0usize;
        for (i, c) in chunks.iter().enumerate() {
            match c.staging_offset.checked_add(c.len) {
                Some(e) if e <= self.slot_bytes => end = end.max(e),
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "chunk {i}: staging range beyond the slot's {} bytes",
                        self.slot_bytes
                    )));
                }
            }
        }
        let metas: Vec<Meta> = chunks
            .iter()
            .map(|c| Meta {
                key: c.key,
                params: c.params,
                len: c.len,
                dst_offset: c.dst_offset,
            })
            .collect();
        self.check_metas(&metas, out_len)?;
        let src_offs: Vec<usize> = chunks.iter().map(|c| c.staging_offset).collect();
        let stream = self.slots[idx].stream.clone();
        let out = self.take_buffer(&stream, out_len)?;
        let slot = &mut self.slots[idx];
        if end > 0 {
            let staging = slot
                .staging
                .as_slice()
                .map_err(drv("pinned staging buffer"))?;
            stream
                .memcpy_htod(&staging[..end], &mut slot.d_src.slice_mut(..end))
                .map_err(drv("host-to-device copy"))?;
        }
        self.enqueue(idx, &metas, &src_offs, out, out_len, decrypt)
    }

    fn check_slot_free(&self, idx: usize, chunks: usize) -> Result<()> {
        if self.slots[idx].pending.is_some() {
            return Err(Error::InvalidArgument(
                "batch slot still holds an unconsumed batch: call wait() first".into(),
            ));
        }
        if chunks > MAX_CHUNKS_PER_LAUNCH {
            return Err(Error::InvalidArgument(format!(
                "at most {MAX_CHUNKS_PER_LAUNCH} chunks per batch"
            )));
        }
        Ok(())
    }

    fn check_metas(&self, metas: &[Meta<'_>], out_len: usize) -> Result<()> {
        for (i, c) in metas.iter().enumerate() {
            if !Arc::ptr_eq(c.key.device(), &self.dev) {
                return Err(Error::InvalidArgument(format!(
                    "chunk {i}: key prepared on another CUDA device"
                )));
            }
            if c.dst_offset.checked_add(c.len).is_none_or(|e| e > out_len) {
                return Err(Error::InvalidArgument(format!(
                    "chunk {i}: destination range beyond the batch buffer"
                )));
            }
        }
        Ok(())
    }

    /// Enqueues GHASH + CTR (or the plaintext twin's copies) for chunks already uploaded to
    /// the slot's device staging at `src_offs`, and marks the slot pending.
    fn enqueue(
        &mut self,
        idx: usize,
        chunks: &[Meta<'_>],
        src_offs: &[usize],
        mut out: CudaSlice<u8>,
        out_len: usize,
        decrypt: bool,
    ) -> Result<Ticket> {
        let stream = self.slots[idx].stream.clone();
        let slot = &mut self.slots[idx];
        let mut expected = Vec::with_capacity(chunks.len());
        if decrypt && !chunks.is_empty() {
            slot.aad_host.clear();
            let mut descs = Vec::with_capacity(chunks.len());
            for (c, &o) in chunks.iter().zip(src_offs) {
                let aad_off = slot.aad_host.len() as u64;
                slot.aad_host.extend_from_slice(c.params.aad);
                descs.push(
                    ChunkDesc::new(&c.params.nonce, o as u64, c.dst_offset as u64, c.len as u64)
                        .aad(aad_off, c.params.aad.len() as u64)
                        .plain(!c.params.encrypted),
                );
                expected.push(c.key.expected_ghash(&c.params.nonce, &c.params.tag));
            }
            if slot.d_aad.len() < slot.aad_host.len() {
                slot.d_aad = stream
                    .alloc_zeros::<u8>(slot.aad_host.len().next_power_of_two())
                    .map_err(drv("device allocation"))?;
            }
            if !slot.aad_host.is_empty() {
                stream
                    .memcpy_htod(
                        &slot.aad_host[..],
                        &mut slot.d_aad.slice_mut(..slot.aad_host.len()),
                    )
                    .map_err(drv("host-to-device copy"))?;
            }
            if slot.d_acc.len() < 4 * chunks.len() {
                (slot.d_acc, slot.acc_host) = acc_buffers(&self.dev, &stream, 4 * chunks.len())?;
            }
            stream
                .memset_zeros(&mut slot.d_acc)
                .map_err(drv("memset"))?;
            // One launch pair per run of chunks that share a key.
            let mut start = 0;
            while start < chunks.len() {
                let key = chunks[start].key;
                let mut end = start + 1;
                while end < chunks.len() && Arc::ptr_eq(chunks[end].key, key) {
                    end += 1;
                }
                let run = &chunks[start..end];
                let d_desc = DeviceDescs::upload(&stream, &descs[start..end])?;
                // The GHASH kernel indexes the accumulators by chunk within the launch: pass the
                // run's sub-view.
                key.ghash(
                    &stream,
                    &d_desc,
                    &slot.d_src.as_view(),
                    &slot.d_aad.as_view(),
                    &mut slot.d_acc.slice_mut(4 * start..4 * end),
                )?;
                // Plain chunks in the run have their bytes copied instead (below); CTR skips
                // nothing, so give it only encrypted chunks' descriptors.
                let enc: Vec<ChunkDesc> = run
                    .iter()
                    .zip(&descs[start..end])
                    .filter(|(c, _)| c.params.encrypted)
                    .map(|(_, d)| *d)
                    .collect();
                if enc.iter().map(ChunkDesc::ctr_blocks).max().unwrap_or(0) > 0 {
                    let d_enc = DeviceDescs::upload(&stream, &enc)?;
                    key.ctr(
                        &stream,
                        &d_enc,
                        &slot.d_src.as_view(),
                        &mut out.as_view_mut(),
                    )?;
                }
                for (j, c) in run.iter().enumerate() {
                    if !c.params.encrypted && c.len != 0 {
                        let o = src_offs[start + j];
                        stream
                            .memcpy_dtod(
                                &slot.d_src.slice(o..o + c.len),
                                &mut out.slice_mut(c.dst_offset..c.dst_offset + c.len),
                            )
                            .map_err(drv("device copy"))?;
                    }
                }
                start = end;
            }
            stream
                .memcpy_dtoh(&slot.d_acc, &mut slot.acc_host)
                .map_err(drv("device-to-host copy"))?;
        } else {
            // Plaintext twin (benchmarks): the same staging and upload, then a device copy.
            for (c, &o) in chunks.iter().zip(src_offs) {
                if c.len != 0 {
                    stream
                        .memcpy_dtod(
                            &slot.d_src.slice(o..o + c.len),
                            &mut out.slice_mut(c.dst_offset..c.dst_offset + c.len),
                        )
                        .map_err(drv("device copy"))?;
                }
            }
        }
        slot.pending = Some(Pending {
            out,
            out_len,
            expected,
        });
        self.next = (idx + 1) % self.slots.len();
        Ok(Ticket(idx))
    }

    /// Waits for a submitted batch and checks every tag. On success the plaintext is in device
    /// memory; on a mismatch the buffer is zeroed and `Err((chunk index, TagMismatch))` says which
    /// chunk failed (the caller maps it to `Error::Integrity` with the file and tensor); device
    /// failures are [`WaitError::Device`].
    pub fn wait(&mut self, ticket: Ticket) -> std::result::Result<DeviceBatch, WaitError> {
        let slot = self
            .slots
            .get_mut(ticket.0)
            .ok_or_else(|| WaitError::Device(Error::InvalidArgument("unknown ticket".into())))?;
        let Some(mut p) = slot.pending.take() else {
            return Err(WaitError::Device(Error::InvalidArgument(
                "no batch pending on this ticket".into(),
            )));
        };
        if let Err(e) = slot.stream.synchronize() {
            let _ = slot.stream.memset_zeros(&mut p.out);
            return Err(WaitError::Device(backend_err("batch decryption", e)));
        }
        let mut bad = None;
        match slot.acc_host.as_slice() {
            Ok(acc) => {
                for (i, exp) in p.expected.iter().enumerate() {
                    if !ct_eq(&acc_bytes(&acc[4 * i..4 * i + 4]), exp) && bad.is_none() {
                        bad = Some(i);
                    }
                }
            }
            Err(e) => {
                let _ = slot.stream.memset_zeros(&mut p.out);
                return Err(WaitError::Device(backend_err("reading tags back", e)));
            }
        }
        if let Some(i) = bad {
            let _ = slot.stream.memset_zeros(&mut p.out);
            let _ = slot.stream.synchronize();
            self.pool.push(p.out);
            return Err(WaitError::Tag { chunk: i });
        }
        Ok(DeviceBatch {
            buf: p.out,
            len: p.out_len,
            stream: slot.stream.clone(),
        })
    }
}

/// Why [`BatchDecryptor::wait`] handed nothing out.
#[derive(Debug)]
pub enum WaitError {
    /// Chunk `chunk` (index in the submitted slice) failed its tag; the batch was zeroed.
    Tag {
        /// Index of the first failing chunk.
        chunk: usize,
    },
    /// The device failed.
    Device(Error),
}

impl std::fmt::Display for WaitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WaitError::Tag { chunk } => {
                write!(f, "chunk {chunk} of the batch failed its integrity check")
            }
            WaitError::Device(e) => write!(f, "{e}"),
        }
    }
}
