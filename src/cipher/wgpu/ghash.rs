//! The tag check on the GPU (`shaders/ghash.wgsl`): a key's GHASH tables in device memory, the
//! GHASH pass recorded before the CTR pass of the same submission, and the host's side of it:
//! combining the workgroups' partial sums and finishing the tag's GHASH state.
#![forbid(unsafe_code)]

use ghash::GHash;
use ghash::universal_hash::UniversalHash;
use zeroize::Zeroizing;

use super::context::{Context, Lane};
use super::failure::backend_err;
use super::params::{GHASH_GROUP_BLOCKS, GhashParams, ghash_groups};
use super::pipelines::entire;
use super::tables::{gf_mul, gf_pow, ghash_tables};
use crate::cipher::BLOCK_LEN;
use crate::error::Result;

/// One key's GHASH material on the device, and H on the host for combining.
pub(super) struct GpuGhash {
    /// Shoup table of H and reduction words; powers of H per GHASH invocation (key material).
    tables: ::wgpu::Buffer,
    powers: ::wgpu::Buffer,
    /// H as a big-endian integer.
    h: Zeroizing<u128>,
}

impl GpuGhash {
    /// Uploads the GHASH shader's tables for `h` (zeroed again by [`GpuGhash::clear`]).
    pub(super) fn upload(ctx: &Context, h: Zeroizing<u128>) -> GpuGhash {
        let (tables, powers) = ghash_tables(*h);
        let upload = |label, words: &[u32]| {
            let buf = ctx.device.create_buffer(&::wgpu::BufferDescriptor {
                label: Some(label),
                size: words.len() as u64 * 4,
                usage: ::wgpu::BufferUsages::STORAGE | ::wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            ctx.queue.write_buffer(&buf, 0, bytemuck::cast_slice(words));
            buf
        };
        GpuGhash {
            tables: upload("ghash_tables", &tables),
            powers: upload("ghash_powers", &powers),
            h,
        }
    }

    /// Records the GHASH pass over the first `blocks` blocks of `work` (the ciphertext, before
    /// the CTR pass runs in place); returns the number of partial sums it writes.
    pub(super) fn encode(
        &self,
        ctx: &Context,
        enc: &mut ::wgpu::CommandEncoder,
        lane: &Lane,
        work: &::wgpu::Buffer,
        blocks: u64,
    ) -> u64 {
        let groups = ghash_groups(blocks);
        let row_groups = groups.min(u64::from(ctx.max_workgroups));
        let params = GhashParams {
            blocks: blocks as u32,
            pad: (groups * GHASH_GROUP_BLOCKS - blocks) as u32,
            groups: groups as u32,
            row_groups: row_groups as u32,
        };
        ctx.queue
            .write_buffer(&lane.ghash_params, 0, bytemuck::bytes_of(&params));
        let bind = ctx.device.create_bind_group(&::wgpu::BindGroupDescriptor {
            label: Some("ghash"),
            layout: &ctx.ghash_layout,
            entries: &[
                ::wgpu::BindGroupEntry {
                    binding: 0,
                    resource: lane.ghash_params.as_entire_binding(),
                },
                ::wgpu::BindGroupEntry {
                    binding: 1,
                    resource: self.tables.as_entire_binding(),
                },
                ::wgpu::BindGroupEntry {
                    binding: 2,
                    resource: self.powers.as_entire_binding(),
                },
                ::wgpu::BindGroupEntry {
                    binding: 3,
                    resource: entire(work, blocks.max(1) * BLOCK_LEN as u64),
                },
                ::wgpu::BindGroupEntry {
                    binding: 4,
                    resource: entire(&lane.partials, groups * 16),
                },
            ],
        });
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&ctx.ghash_pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(row_groups as u32, groups.div_ceil(row_groups) as u32, 1);
        groups
    }

    /// Waits for `submission`, reads the `groups` partial sums and combines them (Horner's rule
    /// with H^(blocks per group)) into the GHASH sum of the piece's blocks.
    pub(super) fn combine(
        &self,
        ctx: &Context,
        lane: &Lane,
        submission: ::wgpu::SubmissionIndex,
        groups: u64,
    ) -> Result<Zeroizing<u128>> {
        let bytes = groups * 16;
        ctx.map_blocking(
            &lane.partials_readback,
            ::wgpu::MapMode::Read,
            bytes,
            Some(submission),
        )?;
        let step = Zeroizing::new(gf_pow(*self.h, GHASH_GROUP_BLOCKS));
        let mut sum = Zeroizing::new(0u128);
        {
            let view = lane
                .partials_readback
                .get_mapped_range(0..bytes)
                .map_err(|e| backend_err(format!("{}: GHASH readback view: {e}", ctx.adapter)))?;
            for p in view.chunks_exact(16) {
                let words: [u32; 4] = bytemuck::pod_read_unaligned(p);
                let part = (u128::from(words[0]) << 96)
                    | (u128::from(words[1]) << 64)
                    | (u128::from(words[2]) << 32)
                    | u128::from(words[3]);
                *sum = gf_mul(*sum, *step) ^ part;
            }
        }
        lane.partials_readback.unmap();
        Ok(sum)
    }

    /// The GCM tag's GHASH state from the GPU's `sum` over the `blocks` ciphertext blocks: the
    /// AAD's GHASH state shifted past them, plus the sum and the length block, times H (the
    /// tag is this XOR E(J0)).
    pub(super) fn tag_state(
        &self,
        aad: &[u8],
        ct_len: usize,
        sum: u128,
        blocks: u64,
    ) -> Zeroizing<u128> {
        let h = *self.h;
        let h_bytes = Zeroizing::new(h.to_be_bytes());
        let mut g = GHash::new(&(*h_bytes).into());
        g.update_padded(aad);
        let aad_state = Zeroizing::new(u128::from_be_bytes(g.finalize().into()));
        let lens = (u128::from(aad.len() as u64 * 8) << 64) | u128::from(ct_len as u64 * 8);
        Zeroizing::new(gf_mul(
            gf_mul(*aad_state, gf_pow(h, blocks)) ^ sum ^ lens,
            h,
        ))
    }

    /// Queues zeros over the key material (with them a tag could be forged); the caller
    /// submits, then [`GpuGhash::destroy`]s.
    pub(super) fn clear(&self, queue: &::wgpu::Queue) {
        for b in [&self.tables, &self.powers] {
            queue.write_buffer(b, 0, &vec![0u8; b.size() as usize]);
        }
    }

    /// Releases the device memory (after [`GpuGhash::clear`] was submitted).
    pub(super) fn destroy(&self) {
        self.tables.destroy();
        self.powers.destroy();
    }
}
