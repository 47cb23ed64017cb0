//! Row gather on the device (`shaders/gather.wgsl`): rows copied out of decrypted window
//! buffers into per-column batch buffers, so plaintext never returns to the host. The batch
//! engine owns one [`Gatherer`] and calls it from [`super::WgpuBatchEngine::gather`].
#![forbid(unsafe_code)]

use std::ops::Range;
use std::sync::Mutex;

use super::context::{Context, Grown};
use super::failure::{backend_err, invalid, lock};
use super::params::{GATHER_WG, GatherParams};
use super::pipelines::{build_gather_pipeline, entire};
use crate::error::Result;

/// Invocations per gather dispatch at most, so that the grid's invocation index (with the last
/// row's padding) stays within u32; longer jobs are split into several dispatches.
const MAX_GATHER_INVOCATIONS: u64 = 1 << 31;

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

/// Scratch of a gather: the per-dispatch parameters (dynamic offsets) and the pairs, held from
/// the first queue write to the submission.
struct GatherScratch {
    params: Grown,
    pairs: Grown,
}

/// The gather pipeline and its scratch buffers (created once, grown on demand).
pub(super) struct Gatherer {
    pipeline: ::wgpu::ComputePipeline,
    layout: ::wgpu::BindGroupLayout,
    /// Stride of the parameter entries (`min_uniform_buffer_offset_alignment`).
    param_stride: u64,
    scratch: Mutex<GatherScratch>,
}

impl Gatherer {
    /// Builds the pipeline on `ctx`'s device.
    pub(super) fn new(ctx: &Context) -> Result<Gatherer> {
        let (pipeline, layout) = build_gather_pipeline(&ctx.device).map_err(|e| {
            backend_err(format!(
                "{}: shader gather.wgsl failed to build: {e}",
                ctx.adapter
            ))
        })?;
        let align = ctx
            .device
            .limits()
            .min_uniform_buffer_offset_alignment
            .max(1);
        use ::wgpu::BufferUsages as U;
        Ok(Gatherer {
            pipeline,
            layout,
            param_stride: (std::mem::size_of::<GatherParams>() as u64)
                .next_multiple_of(u64::from(align)),
            scratch: Mutex::new(GatherScratch {
                params: Grown::new("gather_params", U::UNIFORM | U::COPY_DST),
                pairs: Grown::new("gather_pairs", U::STORAGE | U::COPY_DST),
            }),
        })
    }

    /// One submission: clears each `dsts` buffer, then one dispatch per job (a job longer than
    /// one dispatch can hold is split), grids at most `max_workgroups` wide. Every job (its dst
    /// index, pair range, buffers) and every pair against its src and dst buffer sizes is
    /// validated first, against bindings of at most `max_binding` bytes: `Err` before anything
    /// is queued.
    pub(super) fn run(
        &self,
        ctx: &Context,
        max_binding: u64,
        max_workgroups: u32,
        jobs: &[GatherJob<'_>],
        pairs: &[(u64, u64)],
        dsts: &[&::wgpu::Buffer],
    ) -> Result<::wgpu::SubmissionIndex> {
        use ::wgpu::BufferUsages as U;
        let check_bound = |what: &str, buf: &::wgpu::Buffer, usage: U| -> Result<()> {
            if !buf.size().is_multiple_of(4) || buf.size() > max_binding {
                return Err(invalid(format!(
                    "gather: {what} is {} bytes: not a multiple of 4 or above the largest \
                     binding ({max_binding} bytes)",
                    buf.size(),
                )));
            }
            if !buf.usage().contains(usage) {
                return Err(invalid(format!("gather: {what} lacks usage {usage:?}")));
            }
            Ok(())
        };
        for (i, d) in dsts.iter().enumerate() {
            check_bound(&format!("dst buffer {i}"), d, U::STORAGE | U::COPY_DST)?;
        }
        // Pairs of every dispatch, packed, and each dispatch's (job, parameters, grid).
        let mut packed: Vec<[u32; 2]> = Vec::new();
        let mut pieces: Vec<(usize, GatherParams, (u32, u32))> = Vec::new();
        let max_wg = u64::from(max_workgroups.max(1));
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
            check_bound(&format!("job {j}'s src buffer"), job.src, U::STORAGE)?;
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
                let grid = ctx.grid(max_workgroups, invocations.div_ceil(GATHER_WG), "gather")?;
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
        if pair_bytes.len() as u64 > max_binding {
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

        let mut scratch = lock(&self.scratch);
        let scratch = &mut *scratch;
        ctx.scoped("gather", || {
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
                            layout: &self.layout,
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
                pass.set_pipeline(&self.pipeline);
                for (k, ((_, _, grid), bind)) in pieces.iter().zip(&binds).enumerate() {
                    pass.set_bind_group(0, bind, &[(k * stride) as u32]);
                    pass.dispatch_workgroups(grid.0, grid.1, 1);
                }
            }
            ctx.queue.submit([enc.finish()])
        })
    }
}
