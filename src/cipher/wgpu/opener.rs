//! [`WgpuOpener`]: one data key on the device, opening chunks from host memory. Each call takes
//! a lane of staging buffers (`context.rs`), uploads the chunk in pieces, runs the AES-CTR
//! kernel (and with the tag check on the GPU, the GHASH pass before it), checks the tag, and
//! only then reads the plaintext back into the caller's buffer.
#![forbid(unsafe_code)]

use std::sync::Arc;

use aes::Aes256;
use aes::cipher::{BlockCipherEncrypt, KeyInit};
use zeroize::{Zeroize, Zeroizing};

use super::context::Context;
use super::failure::{GPU_TIMEOUT, backend_err};
use super::ghash::GpuGhash;
use super::params::{Params, nonce_words};
use super::pipelines::entire;
use super::tables::{GhashStream, expand_key};
use crate::cipher::cpu::CpuCipher;
use crate::cipher::{BLOCK_LEN, ChunkOpener, ChunkParams, Cipher, NONCE_LEN, OpenError, TAG_LEN};
use crate::cipher::{ct_eq, same_len};
use crate::error::Result;
use crate::keys::DataKey;

/// How `gpu_ctr` checks a tag before releasing plaintext.
enum Gate<'g> {
    /// No check (CTR only: `ctr_apply`, `seal_in_place`).
    None,
    /// Called with the whole source on the calling thread while the GPU runs the first piece.
    Cpu(&'g mut dyn FnMut(&[u8]) -> bool),
    /// GHASH on the GPU (one piece, aligned start only): called with the GHASH sum over the
    /// padded source blocks alone (as if started from zero) and their count.
    Gpu(&'g mut dyn FnMut(u128, u64) -> bool),
}

/// Source and destination of one CTR pass: separate slices, or one buffer in place.
enum Io<'a> {
    Separate(&'a [u8], &'a mut [u8]),
    InPlace(&'a mut [u8]),
}

impl Io<'_> {
    fn src(&self) -> &[u8] {
        match self {
            Io::Separate(s, _) => s,
            Io::InPlace(b) => b,
        }
    }
    fn dst(&mut self) -> &mut [u8] {
        match self {
            Io::Separate(_, d) => d,
            Io::InPlace(b) => b,
        }
    }
}

/// A data key prepared on the device: round keys uploaded, H and the CPU tag check ready.
pub struct WgpuOpener {
    ctx: Arc<Context>,
    keys_buf: ::wgpu::Buffer,
    /// The GPU tag check's key material.
    ghash: GpuGhash,
    /// Check `open` tags on the GPU (single-piece chunks) rather than on the calling thread.
    gpu_ghash: bool,
    aes: Aes256,
    h: Zeroizing<[u8; 16]>,
    /// The CPU backend's opener: tag checks on the calling thread (aws-lc GHASH) and plain
    /// chunks.
    cpu: Box<dyn ChunkOpener>,
}

impl Drop for WgpuOpener {
    fn drop(&mut self) {
        // Overwrite the round keys in device memory before releasing it.
        // Likewise H's tables and powers: with them a tag could be forged.
        self.ctx.queue.write_buffer(&self.keys_buf, 0, &[0u8; 240]);
        self.ghash.clear(&self.ctx.queue);
        self.ctx.queue.submit([]);
        self.keys_buf.destroy();
        self.ghash.destroy();
    }
}

impl WgpuOpener {
    /// Prepares `key` on `ctx`'s device, with the tag check of `open` on the GPU (`gpu_ghash`)
    /// or on the calling thread.
    pub(super) fn new(ctx: Arc<Context>, key: &DataKey, gpu_ghash: bool) -> Result<WgpuOpener> {
        let round_keys = expand_key(key.as_bytes(), &ctx.sbox);
        let keys_buf = ctx.device.create_buffer(&::wgpu::BufferDescriptor {
            label: Some("aes_round_keys"),
            size: 240,
            usage: ::wgpu::BufferUsages::UNIFORM | ::wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        ctx.queue
            .write_buffer(&keys_buf, 0, bytemuck::cast_slice(&round_keys[..]));
        let aes = Aes256::new(key.as_bytes().into());
        let mut h = [0u8; 16];
        aes.encrypt_block((&mut h).into());
        let ghash = GpuGhash::upload(&ctx, Zeroizing::new(u128::from_be_bytes(h)));
        let cpu = CpuCipher::new().prepare(key)?;
        Ok(WgpuOpener {
            ctx,
            keys_buf,
            ghash,
            gpu_ghash,
            aes,
            h: Zeroizing::new(h),
            cpu,
        })
    }

    /// The tag from the GHASH state `s`: `s` XOR E(J0).
    fn mask(&self, nonce: &[u8; NONCE_LEN], mut s: [u8; 16]) -> [u8; TAG_LEN] {
        let mut j0 = [0u8; 16];
        j0[..12].copy_from_slice(nonce);
        j0[15] = 1;
        self.aes.encrypt_block((&mut j0).into());
        for (t, e) in s.iter_mut().zip(j0) {
            *t ^= e;
        }
        j0.zeroize();
        s
    }

    /// The GCM tag of `aad`/`ct` (or, for a plain chunk, the GMAC over `aad || data`).
    fn tag(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        data: &[u8],
        encrypted: bool,
    ) -> [u8; TAG_LEN] {
        let mut g = GhashStream::new(&self.h);
        g.absorb(aad);
        let s = if encrypted {
            g.pad();
            g.absorb(data);
            g.finish(aad.len(), data.len())
        } else {
            g.absorb(data);
            g.finish(aad.len() + data.len(), 0)
        };
        self.mask(nonce, s)
    }

    /// The CTR pipeline's bindings: this key's round keys, the table, the lane's parameters and
    /// the first `size` bytes of its `work` buffer. The parameters bound with it must say
    /// `blocks = size / 16` (the trusted kernel relies on it: `pipelines.rs`).
    fn ctr_bind_group(
        &self,
        params: &::wgpu::Buffer,
        work: &::wgpu::Buffer,
        size: u64,
    ) -> ::wgpu::BindGroup {
        let ctx = &*self.ctx;
        ctx.device.create_bind_group(&::wgpu::BindGroupDescriptor {
            label: Some("aes_ctr"),
            layout: &ctx.layout,
            entries: &[
                ::wgpu::BindGroupEntry {
                    binding: 0,
                    resource: self.keys_buf.as_entire_binding(),
                },
                ::wgpu::BindGroupEntry {
                    binding: 1,
                    resource: ctx.t0.as_entire_binding(),
                },
                ::wgpu::BindGroupEntry {
                    binding: 2,
                    resource: params.as_entire_binding(),
                },
                ::wgpu::BindGroupEntry {
                    binding: 3,
                    resource: entire(work, size),
                },
            ],
        })
    }

    /// The CTR kernel's grid and parameters for `blocks` blocks from counter `ctr` on.
    fn ctr_dispatch(&self, nonce: [u32; 3], ctr: u32, blocks: u64) -> ((u32, u32), Params) {
        let ctx = &*self.ctx;
        let workgroups = blocks.div_ceil(ctx.variant.span_blocks());
        let x = workgroups.min(u64::from(ctx.max_workgroups)) as u32;
        let y = workgroups.div_ceil(u64::from(x)) as u32;
        let params = Params {
            nonce_ctr: [nonce[0], nonce[1], nonce[2], ctr],
            blocks: blocks as u32,
            row_groups: x,
            _pad: [0; 2],
        };
        ((x, y), params)
    }

    /// XORs the CTR keystream over `io` starting `offset` bytes into the chunk. `gate` runs on
    /// the calling thread while the GPU works on the first piece; if it returns `false`, no byte
    /// is written to the destination, the GPU buffers are cleared and `Ok(false)` is returned.
    fn gpu_ctr(
        &self,
        nonce: &[u8; NONCE_LEN],
        offset: u64,
        io: &mut Io<'_>,
        mut gate: Gate<'_>,
    ) -> Result<bool> {
        if let Some(reason) = self.ctx.failure() {
            return Err(backend_err(reason));
        }
        let len = io.src().len() as u64;
        let head = offset % BLOCK_LEN as u64;
        let padded = (head + len).div_ceil(BLOCK_LEN as u64) * BLOCK_LEN as u64;
        let first_ctr = 2u32.wrapping_add((offset / BLOCK_LEN as u64) as u32);
        let nonce_words = nonce_words(nonce);
        let ctx = &*self.ctx;
        let mut bufs = ctx.lane();
        bufs.grow(&ctx.device, padded.min(ctx.piece_bytes), ctx.piece_bytes);
        let (upload, work, readback) = bufs.staging()?;
        if matches!(gate, Gate::Gpu(_)) && (head != 0 || padded > ctx.piece_bytes) {
            return Err(backend_err("GPU GHASH needs one aligned piece"));
        }
        let mut start = 0u64;
        while start < padded {
            let size = (padded - start).min(ctx.piece_bytes);
            let blocks = size / BLOCK_LEN as u64;
            // Stream position `start` in the padded stream is byte `start - head` of the source.
            let (src_from, src_to) = (
                (start.max(head) - head) as usize,
                ((start + size).min(head + len) - head) as usize,
            );
            let lead = (head.saturating_sub(start)) as usize; // zero bytes before the source
            self.stage(upload, &io.src()[src_from..src_to], lead, size)?;
            let ((groups, submission), failed) = ctx.error_scope(|| {
                let ctr = first_ctr.wrapping_add((start / 16) as u32);
                let ((x, y), params) = self.ctr_dispatch(nonce_words, ctr, blocks);
                ctx.queue
                    .write_buffer(&bufs.params, 0, bytemuck::bytes_of(&params));
                let bind = self.ctr_bind_group(&bufs.params, work, size);
                let mut enc = ctx.device.create_command_encoder(&Default::default());
                enc.copy_buffer_to_buffer(upload, 0, work, 0, size);
                let groups = if matches!(gate, Gate::Gpu(_)) {
                    Some(self.ghash.encode(ctx, &mut enc, &bufs, work, blocks))
                } else {
                    None
                };
                {
                    let mut pass = enc.begin_compute_pass(&Default::default());
                    pass.set_pipeline(&ctx.pipeline);
                    pass.set_bind_group(0, &bind, &[]);
                    pass.dispatch_workgroups(x, y, 1);
                }
                enc.copy_buffer_to_buffer(work, 0, readback, 0, size);
                if let Some(groups) = groups {
                    enc.copy_buffer_to_buffer(
                        &bufs.partials,
                        0,
                        &bufs.partials_readback,
                        0,
                        groups * 16,
                    );
                }
                (groups, ctx.queue.submit([enc.finish()]))
            });
            if let Some(e) = failed {
                return Err(backend_err(format!(
                    "{}: dispatch failed: {e}",
                    ctx.adapter
                )));
            }
            // Verify the tag (on the CPU while the GPU runs, or from the GPU's partial sums);
            // release nothing unless it holds.
            let verified = match std::mem::replace(&mut gate, Gate::None) {
                Gate::None => true,
                Gate::Cpu(g) => g(io.src()),
                Gate::Gpu(g) => {
                    let groups = groups.expect("encoded with the GHASH pass");
                    let sum = self.ghash.combine(ctx, &bufs, submission.clone(), groups)?;
                    g(*sum, blocks)
                }
            };
            if !verified {
                // The upload buffer holds ciphertext only (and cannot be a copy target).
                self.clear(&[work, readback]);
                return Ok(false);
            }
            self.read_back(
                readback,
                submission,
                size,
                lead,
                &mut io.dst()[src_from..src_to],
            )?;
            start += size;
        }
        Ok(true)
    }

    /// Writes one padded piece into the mapped `upload` buffer (created once, reused): `lead`
    /// zero bytes, then `body`, then zeros to the end of the last block `body` touches. Bytes
    /// past that are never read back.
    fn stage(&self, upload: &::wgpu::Buffer, body: &[u8], lead: usize, size: u64) -> Result<()> {
        self.ctx
            .map_blocking(upload, ::wgpu::MapMode::Write, size, None)?;
        {
            let mut view = upload
                .get_mapped_range_mut(0..size)
                .map_err(|e| backend_err(format!("{}: upload view: {e}", self.ctx.adapter)))?;
            let end = (lead + body.len())
                .next_multiple_of(BLOCK_LEN)
                .min(size as usize);
            view.slice(..lead).fill(0);
            view.slice(lead..lead + body.len()).copy_from_slice(body);
            view.slice(lead + body.len()..end).fill(0);
        }
        upload.unmap();
        Ok(())
    }

    /// Overwrites buffers that may hold plaintext (after a tag mismatch).
    fn clear(&self, buffers: &[&::wgpu::Buffer]) {
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        for b in buffers {
            enc.clear_buffer(b, 0, None);
        }
        self.ctx.queue.submit([enc.finish()]);
    }

    fn read_back(
        &self,
        readback: &::wgpu::Buffer,
        submission: ::wgpu::SubmissionIndex,
        size: u64,
        lead: usize,
        dst: &mut [u8],
    ) -> Result<()> {
        let ctx = &*self.ctx;
        ctx.map_blocking(readback, ::wgpu::MapMode::Read, size, Some(submission))?;
        {
            let view = readback
                .get_mapped_range(0..size)
                .map_err(|e| backend_err(format!("{}: readback view: {e}", ctx.adapter)))?;
            dst.copy_from_slice(&view[lead..lead + dst.len()]);
        }
        readback.unmap();
        Ok(())
    }

    /// Decrypts `io` if its tag verifies; the GPU pass overlaps the GHASH.
    fn open_io(&self, chunk: &ChunkParams<'_>, mut io: Io<'_>) -> Result<(), OpenError> {
        if !chunk.encrypted || io.src().is_empty() {
            let checked = self.cpu.verify(chunk, io.src());
            if checked.is_ok()
                && let Io::Separate(s, d) = &mut io
            {
                d.copy_from_slice(s);
            }
            return checked.inspect_err(|_| io.dst().zeroize());
        }
        let ct_len = io.src().len();
        let on_gpu = self.gpu_ghash && (ct_len as u64).next_multiple_of(16) <= self.ctx.piece_bytes;
        // The CPU check is the CPU backend's own (aws-lc GHASH, ~25 GB/s per core here,
        // against 5 for the RustCrypto GHASH of `tag`).
        let mut cpu_failure = None;
        let mut cpu_gate = |ct: &[u8]| match self.cpu.verify(chunk, ct) {
            Ok(()) => true,
            Err(e) => {
                cpu_failure = Some(e);
                false
            }
        };
        let mut gpu_gate = |sum: u128, blocks: u64| {
            let state = self.ghash.tag_state(chunk.aad, ct_len, sum, blocks);
            ct_eq(&self.mask(&chunk.nonce, state.to_be_bytes()), &chunk.tag)
        };
        let gate = if on_gpu {
            Gate::Gpu(&mut gpu_gate)
        } else {
            Gate::Cpu(&mut cpu_gate)
        };
        let result = self.gpu_ctr(&chunk.nonce, 0, &mut io, gate);
        match result {
            Ok(true) => Ok(()),
            Ok(false) => {
                io.dst().zeroize();
                Err(cpu_failure.unwrap_or(OpenError::TagMismatch))
            }
            Err(e) => {
                io.dst().zeroize();
                Err(OpenError::Backend(self.ctx.record_error(e)))
            }
        }
    }

    /// For benchmarks: CTR dispatches over whatever the lane's work buffer holds (grown by an
    /// earlier call such as `ctr_apply`), whole-buffer passes until `bytes` were processed, in
    /// one submission; waits for it. The kernel alone: no upload, no read-back.
    pub(crate) fn ctr_resident(&self, bytes: u64) -> Result<()> {
        let ctx = &*self.ctx;
        let bufs = ctx.lane();
        let work = bufs.resident_work()?;
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        let size = bytes.min(bufs.capacity);
        let mut done = 0u64;
        let bind = self.ctr_bind_group(&bufs.params, work, size);
        let ((x, y), params) = self.ctr_dispatch([1, 2, 3], 4, size / BLOCK_LEN as u64);
        ctx.queue
            .write_buffer(&bufs.params, 0, bytemuck::bytes_of(&params));
        while done < bytes {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&ctx.pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(x, y, 1);
            done += size;
        }
        let submission = ctx.queue.submit([enc.finish()]);
        ctx.device
            .poll(::wgpu::PollType::Wait {
                submission_index: Some(submission),
                timeout: Some(GPU_TIMEOUT),
            })
            .map_err(|e| backend_err(format!("{}: waiting for the GPU: {e}", ctx.adapter)))?;
        Ok(())
    }

    /// For benchmarks: the GHASH pass over `bytes` already in the lane's work buffer; waits,
    /// reads and combines the partial sums.
    pub(crate) fn ghash_resident(&self, bytes: u64) -> Result<u128> {
        let ctx = &*self.ctx;
        let bufs = ctx.lane();
        let work = bufs.resident_work()?;
        let blocks = bytes.min(bufs.capacity) / BLOCK_LEN as u64;
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        let groups = self.ghash.encode(ctx, &mut enc, &bufs, work, blocks);
        enc.copy_buffer_to_buffer(&bufs.partials, 0, &bufs.partials_readback, 0, groups * 16);
        let submission = ctx.queue.submit([enc.finish()]);
        Ok(*self.ghash.combine(ctx, &bufs, submission, groups)?)
    }
}

impl ChunkOpener for WgpuOpener {
    fn open(&self, chunk: &ChunkParams<'_>, src: &[u8], dst: &mut [u8]) -> Result<(), OpenError> {
        same_len("open", src, dst)?;
        self.open_io(chunk, Io::Separate(src, dst))
    }

    fn open_in_place(&self, chunk: &ChunkParams<'_>, buf: &mut [u8]) -> Result<(), OpenError> {
        self.open_io(chunk, Io::InPlace(buf))
    }

    fn verify(&self, chunk: &ChunkParams<'_>, src: &[u8]) -> Result<(), OpenError> {
        // Tag-only: nothing for the GPU to do; the CPU backend's GHASH is the fast one.
        self.cpu.verify(chunk, src)
    }

    fn ctr_apply(
        &self,
        nonce: &[u8; NONCE_LEN],
        offset: u64,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<()> {
        same_len("ctr_apply", src, dst)?;
        if src.is_empty() {
            return Ok(());
        }
        self.gpu_ctr(nonce, offset, &mut Io::Separate(src, dst), Gate::None)
            .map(|_| ())
            .map_err(|e| {
                dst.zeroize();
                self.ctx.record_error(e)
            })
    }

    fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        encrypted: bool,
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN]> {
        if encrypted && !buf.is_empty() {
            self.gpu_ctr(nonce, 0, &mut Io::InPlace(buf), Gate::None)
                .map_err(|e| self.ctx.record_error(e))?;
        }
        Ok(self.tag(nonce, aad, buf, encrypted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cipher::wgpu::{WgpuCipher, WgpuOptions};
    use crate::error::Error;

    /// The backend here, or `None` when there is no adapter (the integration tests enforce
    /// `CIPHERSHARD_REQUIRE_WGPU`).
    fn backend() -> Option<WgpuCipher> {
        WgpuCipher::new(WgpuOptions::default())
            .inspect_err(|e| eprintln!("skipping: {e}"))
            .ok()
    }

    #[test]
    fn lost_device_is_an_error_on_every_call() {
        let Some(c) = backend() else { return };
        let key = DataKey::from_bytes([5u8; 32]);
        let op = c.prepare(&key).unwrap();
        let rop = CpuCipher::new().prepare(&key).unwrap();
        let pt: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut ct = pt.clone();
        let tag = rop.seal_in_place(&[1; 12], b"a", true, &mut ct).unwrap();
        c.ctx.device.destroy();
        let _ = c.ctx.device.poll(::wgpu::PollType::Poll);
        // Every GPU call reports the failure, releases nothing and none panics.
        let params = ChunkParams {
            nonce: [1; 12],
            aad: b"a",
            tag,
            encrypted: true,
        };
        let mut out = vec![0xAAu8; pt.len()];
        let e = op.open(&params, &ct, &mut out).unwrap_err();
        assert!(
            matches!(e, OpenError::Backend(Error::Backend { .. })),
            "{e}"
        );
        assert!(out.iter().all(|&b| b == 0), "nothing released");
        let mut x = vec![0xAAu8; 100];
        assert!(op.ctr_apply(&[1; 12], 33, &ct[33..133], &mut x).is_err());
        assert!(x.iter().all(|&b| b == 0), "nothing released");
        let mut bad = ct.clone();
        bad[0] ^= 1;
        // A tampered chunk on a failed device is an error too (the recorded failure comes
        // first), and nothing is released.
        out.fill(0xAA);
        assert!(op.open(&params, &bad, &mut out).is_err());
        assert!(out.iter().all(|&b| b == 0));
        let err = c.health().unwrap_err();
        assert!(matches!(err, Error::Backend { .. }), "{err}");
        assert!(
            c.prepare(&key).is_err(),
            "prepare on a lost device must fail"
        );
    }
}
