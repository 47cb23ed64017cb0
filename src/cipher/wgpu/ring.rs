//! [`UploadRing`]: host-visible upload buffers the batch engine copies windows through, each
//! slot mapped once, filled by one or more threads, copied to the window by the GPU and mapped
//! again behind that copy.
#![forbid(unsafe_code)]

use super::context::Context;
use super::failure::{GPU_TIMEOUT, backend_err, invalid};
use crate::error::Result;

/// Host-visible upload buffers reused window after window
/// ([`super::WgpuBatchEngine::upload_ring`]).
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

impl UploadRing {
    /// `slots` (at least one) upload buffers of `bytes` each, rounded up to a multiple of 16
    /// and at most `max_buffer_size`, created mapped. A failure here is not recorded as a
    /// device failure (the caller may retry smaller).
    pub(super) fn new(ctx: &Context, slots: usize, bytes: u64) -> Result<UploadRing> {
        let bytes = bytes.max(16).next_multiple_of(16);
        if bytes > ctx.device.limits().max_buffer_size {
            return Err(invalid(format!(
                "upload ring: {bytes} bytes per slot exceed the largest buffer on {}",
                ctx.adapter
            )));
        }
        let (slots, failed) = ctx.error_scope(|| {
            (0..slots.max(1))
                .map(|_| UploadSlot {
                    buf: ctx.device.create_buffer(&::wgpu::BufferDescriptor {
                        label: Some("ciphershard_upload"),
                        size: bytes,
                        usage: ::wgpu::BufferUsages::MAP_WRITE | ::wgpu::BufferUsages::COPY_SRC,
                        mapped_at_creation: true,
                    }),
                    pending: None,
                })
                .collect::<Vec<_>>()
        });
        let ring = UploadRing { slots, next: 0 };
        match failed {
            Some(e) => Err(backend_err(format!(
                "{}: cannot allocate a {bytes}-byte upload buffer: {e}",
                ctx.adapter
            ))),
            None => Ok(ring),
        }
    }

    /// Waits until the next slot is mapped again after its last copy, fills it with `staging`
    /// (`staged` bytes, at most a slot's size) from `threads` threads and unmaps it; returns
    /// the slot's index, for [`UploadRing::buffer`] and then [`UploadRing::remap_behind`].
    pub(super) fn fill_next(
        &mut self,
        ctx: &Context,
        staging: &[u8],
        staged: u64,
        threads: usize,
    ) -> Result<usize> {
        let i = self.next;
        if staged > self.slots[i].buf.size() {
            return Err(invalid(format!(
                "upload_decrypt: staging of {staged} bytes exceeds the upload ring's slots ({} \
                 bytes)",
                self.slots[i].buf.size()
            )));
        }
        remap(ctx, &mut self.slots[i])?;
        fill(ctx, &self.slots[i].buf, staging, threads)?;
        self.slots[i].buf.unmap();
        Ok(i)
    }

    /// Slot `i`'s buffer.
    pub(super) fn buffer(&self, i: usize) -> &::wgpu::Buffer {
        &self.slots[i].buf
    }

    /// Maps slot `i` again behind `submission` (its copy into a window) and makes the next
    /// slot current; the next use of slot `i` waits for the mapping.
    pub(super) fn remap_behind(&mut self, i: usize, submission: ::wgpu::SubmissionIndex) {
        let (tx, rx) = std::sync::mpsc::channel();
        let slot = &mut self.slots[i];
        slot.buf.map_async(::wgpu::MapMode::Write, .., move |r| {
            let _ = tx.send(r);
        });
        slot.pending = Some((rx, submission));
        self.next = (i + 1) % self.slots.len();
    }
}

/// Waits until `slot` is mapped again after its last copy.
fn remap(ctx: &Context, slot: &mut UploadSlot) -> Result<()> {
    if let Some((rx, after)) = slot.pending.take() {
        ctx.wait(after)?;
        match rx.recv_timeout(GPU_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(ctx.fail(format!("upload ring: mapping failed: {e}"))),
            Err(_) => return Err(ctx.fail("upload ring: a buffer never mapped".into())),
        }
    }
    Ok(())
}

/// Copies `staging` into the mapped `buf`, in `threads` disjoint ranges at once (each thread
/// maps its own view; every range is written sequentially, friendly to write-combined memory).
fn fill(ctx: &Context, buf: &::wgpu::Buffer, staging: &[u8], threads: usize) -> Result<()> {
    if staging.is_empty() {
        return Ok(());
    }
    let copy = |offset: usize, part: &[u8]| -> Result<()> {
        let range = offset as u64..(offset + part.len()) as u64;
        buf.get_mapped_range_mut(range)
            .map_err(|e| ctx.fail(format!("upload ring: mapped view: {e}")))?
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
            h.join()
                .unwrap_or_else(|_| Err(ctx.fail("upload ring: a copy thread panicked".into())))
        })
    })
}
