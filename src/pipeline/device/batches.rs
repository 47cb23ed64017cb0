//! Each batch's gather plan, computed ahead by the planner thread: which windows it reads,
//! the order the reader loads windows in, and the (window offset, column offset) of every row.
//! It follows the host [`crate::pipeline::Loader`]'s plan exactly, so a device batch equals
//! the host batch (tested in `plan_tests`).

#![forbid(unsafe_code)]

use crossbeam_channel::Sender;

use super::windows::{ChunkOffsets, Packing, window_keys, window_layout};
use crate::error::{Error, Result};
use crate::pipeline::format_source::FormatSource;
use crate::pipeline::sampler::{Cursor, EpochPlan, RowRef, SamplerConfig};
use crate::pipeline::source::{ChunkSpec, RowSource};

/// Appends `(offset in the window buffer, offset in the batch column)` of every row of the
/// batch that comes from window `w`, for column `c` of `row_bytes` bytes.
pub(crate) fn gather_pairs(
    rows: &[(RowRef, usize)],
    w: usize,
    offsets: &ChunkOffsets,
    c: usize,
    row_bytes: u64,
    chunk: u64,
    pairs: &mut Vec<(u64, u64)>,
) -> Result<()> {
    // A 64-bit division per row dominated planning; chunk sizes are powers of two in practice.
    let shift = chunk.is_power_of_two().then(|| chunk.trailing_zeros());
    // Rows of one shard and chunk often follow each other (narrow columns): reuse the lookup.
    let mut last: Option<(u32, u64, u64)> = None;
    for (i, (r, rw)) in rows.iter().enumerate() {
        if *rw != w {
            continue;
        }
        let off = r.row * row_bytes;
        let (j, within) = match shift {
            Some(sh) => (off >> sh, off & (chunk - 1)),
            None => (off / chunk, off % chunk),
        };
        let base = match last {
            Some((s, lj, base)) if s == r.shard && lj == j => base,
            _ => {
                let base = offsets.get(&(r.shard, c as u32, j)).ok_or_else(|| {
                    Error::Stopped(format!(
                        "internal: chunk {j} of column {c} not in window {w}"
                    ))
                })?;
                last = Some((r.shard, j, base));
                base
            }
        };
        pairs.push((base + within, i as u64 * row_bytes));
    }
    Ok(())
}

/// The windows batch `k` of `plan` reads, sorted: its positions (wrapped into `0..N` for
/// padding) walked window by window.
pub(crate) fn batch_windows(plan: &EpochPlan, k: u64) -> Vec<usize> {
    let (a, b) = plan.batch_positions(k);
    let n = plan.total_rows().max(1);
    let mut v = Vec::new();
    let mut p = a;
    while p < b {
        let q = p % n;
        let w = plan.window_of(q);
        v.push(w);
        p += plan.window_start(w + 1) - q;
    }
    v.sort_unstable();
    v.dedup();
    v
}

/// The order in which the gather thread asks for windows from batch `first` on: a window stays
/// resident while consecutive batches use it and is loaded again if a later batch needs it
/// after an eviction (the padding of the last rank wraps to the epoch's start).
pub(crate) fn load_order(plan: &EpochPlan, first: u64) -> Vec<usize> {
    let mut order = Vec::new();
    let mut resident: Vec<usize> = Vec::new();
    for k in first..plan.batches() {
        let needed = batch_windows(plan, k);
        resident.retain(|w| needed.binary_search(w).is_ok());
        for &w in &needed {
            if !resident.contains(&w) {
                resident.push(w);
                order.push(w);
            }
        }
    }
    order
}

/// Everything the gather thread needs for one batch, computed on the CPU ahead of time by the
/// planner thread: which rows, from which windows, at which offsets.
pub(crate) struct BatchPlan {
    pub(crate) epoch: u64,
    pub(crate) index: u64,
    /// Windows the batch reads, sorted.
    pub(crate) needed: Vec<usize>,
    /// Global dataset row of each row, in batch order.
    pub(crate) row_ids: Vec<u64>,
    /// `(column, window, piece, range of pairs)`, one gather launch each.
    pub(crate) jobs: Vec<(usize, usize, usize, std::ops::Range<usize>)>,
    /// `(offset in the window piece's buffer, offset in the column buffer)` of every gathered
    /// row.
    pub(crate) pairs: Vec<(u64, u64)>,
}

/// Offsets of window `w`'s chunks in its buffer (the layout the reader uploads).
pub(crate) fn window_offsets(
    source: &FormatSource,
    plan: &EpochPlan,
    w: usize,
    packing: Packing,
) -> ChunkOffsets {
    let keys = window_keys(source.columns(), source.chunk_size(), plan, w);
    let specs: Vec<ChunkSpec> = keys
        .iter()
        .map(|&(s, c, j)| source.chunk(s as usize, c as usize, j))
        .collect();
    window_layout(
        source.columns(),
        source.chunk_size(),
        &keys,
        &specs,
        packing,
    )
    .offsets
}

/// Plans batch `k` of `plan`. `layouts` caches the offsets of the windows the previous batch
/// used (the others are dropped, as the gather thread evicts them).
pub(crate) fn plan_batch(
    source: &FormatSource,
    plan: &EpochPlan,
    cur: &mut Cursor<'_>,
    layouts: &mut Vec<(usize, ChunkOffsets)>,
    epoch: u64,
    k: u64,
    packing: Packing,
) -> Result<BatchPlan> {
    let (a, b) = plan.batch_positions(k);
    let rows: Vec<(RowRef, usize)> = (a..b).map(|p| cur.row_at(p)).collect();
    let mut needed: Vec<usize> = rows.iter().map(|r| r.1).collect();
    needed.sort_unstable();
    needed.dedup();
    layouts.retain(|(w, _)| needed.binary_search(w).is_ok());
    for &w in &needed {
        if !layouts.iter().any(|(x, _)| *x == w) {
            layouts.push((w, window_offsets(source, plan, w, packing)));
        }
    }
    let mut pairs = Vec::with_capacity(rows.len() * source.columns().len());
    let mut jobs = Vec::with_capacity(source.columns().len() * needed.len());
    for (c, col) in source.columns().iter().enumerate() {
        // A zero-width column has no chunks in any window and nothing to gather: its tensor
        // is `[B, 0]` (the engines' column buffers are never zero-sized, and no job is sent).
        if col.row_bytes == 0 {
            continue;
        }
        for (w, offsets) in layouts.iter() {
            let start = pairs.len();
            gather_pairs(
                &rows,
                *w,
                offsets,
                c,
                col.row_bytes,
                source.chunk_size(),
                &mut pairs,
            )?;
            if offsets.piece_count() == 1 {
                jobs.push((c, *w, 0, start..pairs.len()));
                continue;
            }
            // Rows by piece (stable: batch order within a piece), offsets made piece-relative.
            let mut located: Vec<(usize, (u64, u64))> = pairs[start..]
                .iter()
                .map(|&(src, dst)| {
                    let (p, within) = offsets.locate(src);
                    (p, (within, dst))
                })
                .collect();
            located.sort_by_key(|e| e.0);
            pairs.truncate(start);
            let mut i = 0;
            while i < located.len() {
                let p = located[i].0;
                let from = pairs.len();
                while i < located.len() && located[i].0 == p {
                    pairs.push(located[i].1);
                    i += 1;
                }
                jobs.push((c, *w, p, from..pairs.len()));
            }
        }
    }
    let row_ids = rows
        .iter()
        .map(|(r, _)| source.shard_row_start(r.shard as usize) + r.row)
        .collect();
    Ok(BatchPlan {
        epoch,
        index: k,
        needed,
        row_ids,
        jobs,
        pairs,
    })
}

/// The planner thread: every batch's rows and gather offsets, in order, ahead of the gather
/// thread (a bounded queue), so that thread only launches and hands out.
pub(crate) fn plan_batches(
    source: &FormatSource,
    cfg: &SamplerConfig,
    shard_rows: &[u64],
    (start_epoch, start_batch, epochs): (u64, u64, u64),
    packing: Packing,
    tx: Sender<Result<BatchPlan>>,
) {
    for epoch in start_epoch..epochs {
        let plan = EpochPlan::new(cfg, epoch, shard_rows);
        let mut cur = Cursor::new(&plan);
        let mut layouts = Vec::new();
        let first = if epoch == start_epoch { start_batch } else { 0 };
        for k in first..plan.batches() {
            let r = plan_batch(source, &plan, &mut cur, &mut layouts, epoch, k, packing);
            let ok = r.is_ok();
            if tx.send(r).is_err() || !ok {
                return;
            }
        }
    }
}
