//! Sequence packing (`LoaderOptions::pack`, docs/LOADER.md "Packing"): the planner walks the
//! epoch's rows as one stream of tokens and gives each batch the rows its `B × L` tokens come
//! from (the first one entered `skip` tokens in); a worker lays those tokens into `[B, L]` and
//! writes each sequence piece's boundaries (`cu_seqlens`) and positions.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use super::batch::Batch;
use super::chunks::{Job, Shared, dispatch, take_credit};
use super::readahead::Ahead;
use crate::error::{Error, Result};
use crate::pipeline::options::{ChunkKey, PackPlan, push_chunk_keys};
use crate::pipeline::sampler::{Cursor, EpochPlan, RowRef, SamplerConfig};
use crate::pipeline::source::ColumnInfo;

/// The packed batch's tensors: the tokens `[B, L, ...element]`, `position_ids` `I64 [B, L]`
/// and `cu_seqlens` `I32 [pieces + 1]`.
pub(super) fn packed_columns(column: &ColumnInfo, seq_len: u64) -> Arc<[ColumnInfo]> {
    let tokens = ColumnInfo {
        name: column.name.clone(),
        dtype: column.dtype.clone(),
        elem_size: column.elem_size,
        row_shape: std::iter::once(seq_len)
            .chain(column.row_shape.iter().copied())
            .collect(),
        row_bytes: seq_len * column.row_bytes,
        ragged: false,
    };
    let positions = ColumnInfo {
        name: "position_ids".into(),
        dtype: "I64".into(),
        elem_size: 8,
        row_shape: vec![seq_len],
        row_bytes: 8 * seq_len,
        ragged: false,
    };
    let cu = ColumnInfo {
        name: "cu_seqlens".into(),
        dtype: "I32".into(),
        elem_size: 4,
        row_shape: vec![],
        row_bytes: 4,
        ragged: false,
    };
    vec![tokens, positions, cu].into()
}

/// How many of each packed tensor's first dimension a batch buffer holds: `B` sequences of
/// tokens and of positions, and at most `B × L + B + 1` boundaries (each token could start a
/// piece, and each of the `B` sequences cuts one more).
pub(super) fn packed_counts(pack: &PackPlan) -> [u64; 3] {
    let n = pack.sequences;
    [n, n, n * pack.seq_len + n + 1]
}

/// Tokens in row `r` of the packed column.
fn row_len(sh: &Shared, c: usize, r: RowRef) -> u64 {
    let o = sh.source.row_offsets(r.shard as usize, c);
    o[r.row as usize + 1] - o[r.row as usize]
}

/// The packing planner: like the row planner (windows pinned while the stream is inside them,
/// credits, stop), with batches cut by tokens.
#[allow(clippy::too_many_arguments)]
pub(super) fn planner(
    sh: &Shared,
    pack: &PackPlan,
    cfg: &SamplerConfig,
    shard_rows: &[u64],
    start_epoch: u64,
    start_batch: u64,
    epochs: u64,
    credits: &Receiver<()>,
    jobs: &Sender<Job>,
    stop: &Receiver<()>,
    mut read_ahead: Ahead,
) {
    let c = pack.column;
    let per_batch = pack.sequences * pack.seq_len;
    let elem = sh.columns[c].row_bytes;
    let mut seq = 0u64;
    let mut pinned: Option<(usize, Vec<ChunkKey>)> = None;
    // The next window's chunks, held from when the stream enters a window until it enters the
    // next, and those of them not yet handed to a job to load ahead.
    let mut ahead: Option<(usize, Vec<ChunkKey>)> = None;
    let mut to_warm: Vec<ChunkKey> = Vec::new();
    for epoch in start_epoch..epochs {
        let plan = EpochPlan::new(cfg, epoch, shard_rows);
        let mut cur = Cursor::new(&plan);
        let first = if epoch == start_epoch { start_batch } else { 0 };
        // The stream position: the next row `p`, and the tokens of the rows before it.
        let (mut p, mut before) = (0u64, 0u64);
        for k in first..pack.batches_per_epoch {
            if !take_credit(credits, stop) {
                return;
            }
            let t0 = pack.rank_start + k * per_batch;
            let t1 = t0 + per_batch;
            // Rows wholly before this batch's first token (a resumed loader skips here).
            loop {
                let (row, _) = cur.row_at(p);
                let len = row_len(sh, c, row);
                if before + len > t0 {
                    break;
                }
                before += len;
                p += 1;
            }
            let skip = t0 - before;
            let (mut rows, mut keys, mut old_pin) = (Vec::new(), Vec::new(), None);
            let (mut q, mut at) = (p, before);
            while at < t1 {
                let (row, w) = cur.row_at(q);
                sh.pin_window(&plan, w, &mut pinned, &mut old_pin);
                read_ahead.enter(sh, &plan, w);
                let len = row_len(sh, c, row);
                if len > 0 {
                    // Only the tokens this batch takes: a long row split across batches is
                    // read piece by piece, not whole for every batch.
                    let a = if rows.is_empty() { skip } else { 0 };
                    let b = len.min(a + (t1 - at.max(t0)));
                    let base = sh.source.row_offsets(row.shard as usize, c)[row.row as usize];
                    push_chunk_keys(
                        row.shard,
                        c,
                        (base + a) * elem,
                        (base + b) * elem,
                        sh.chunk_size,
                        &mut keys,
                    );
                    rows.push(row);
                }
                at += len;
                q += 1;
            }
            keys.sort_unstable();
            keys.dedup();
            let slots = sh.cache.acquire(&keys);
            // Entered a new window: hold the next one and queue its chunks to load ahead.
            if let Some((w, _)) = &pinned
                && ahead.as_ref().is_none_or(|(aw, _)| *aw != w + 1)
            {
                if let Some((_, old)) = ahead.take() {
                    sh.cache.release(&old);
                }
                to_warm.clear();
                if w + 1 < plan.windows() {
                    let next = sh.window_keys(&plan, w + 1);
                    let _ = sh.cache.acquire(&next);
                    to_warm.extend(next.iter().rev());
                    ahead = Some((w + 1, next));
                }
            }
            // Two chunks a job: the next window is loaded within its first few batches'
            // worth of this one.
            let warm_keys: Vec<ChunkKey> = (0..2).map_while(|_| to_warm.pop()).collect();
            let warm = warm_keys
                .iter()
                .copied()
                .zip(sh.cache.acquire(&warm_keys))
                .collect();
            let job = Job {
                seq,
                epoch,
                index: k,
                rows,
                skip,
                warm,
                keys,
                slots,
            };
            if !dispatch(sh, jobs, stop, job, old_pin) {
                return;
            }
            seq += 1;
        }
        if let Some((_, old)) = pinned.take() {
            sh.cache.release(&old);
        }
        // Windows are an epoch's: the next epoch's first one is not this one's next.
        if let Some((_, old)) = ahead.take() {
            sh.cache.release(&old);
        }
        to_warm.clear();
        read_ahead.clear(sh);
    }
}

/// Lays a packing job's tokens into `[B, L]`: each row's piece (the first from `skip`, the
/// last cut at the batch's end) after the previous one, a piece that reaches the end of a
/// sequence continuing at the start of the next as a new piece; `cu_seqlens` gets every
/// piece's end, `position_ids` count from 0 in each piece.
pub(super) fn assemble(
    sh: &Shared,
    (pack, columns): &(PackPlan, Arc<[ColumnInfo]>),
    job: &Job,
) -> Result<Batch> {
    let c = pack.column;
    let elem = sh.columns[c].row_bytes;
    let (l, total) = (pack.seq_len, pack.sequences * pack.seq_len);
    let mut bufs = sh.set_pool.get()?;
    let t = Instant::now();
    let (mut dec_b, mut asm_b) = (0u64, 0u64);
    let mut pos = 0u64;
    let mut cu: Vec<i32> = vec![0];
    let (tokens, rest) = bufs.split_at_mut(1);
    let (tokens, positions) = (&mut tokens[0], &mut rest[0]);
    for (i, &row) in job.rows.iter().enumerate() {
        if pos == total {
            break;
        }
        let len = row_len(sh, c, row);
        let a = if i == 0 { job.skip } else { 0 };
        let b = len.min(a + (total - pos));
        let base = sh.source.row_offsets(row.shard as usize, c)[row.row as usize];
        let dst = &mut tokens[(pos * elem) as usize..((pos + b - a) * elem) as usize];
        let (dec, asm) =
            sh.copy_range(job, row.shard, c, (base + a) * elem, (base + b) * elem, dst)?;
        dec_b += dec;
        asm_b += asm;
        // Pieces: cut where a sequence ends.
        let end = pos + (b - a);
        while pos < end {
            let stop = end.min((pos / l + 1) * l);
            let piece = &mut positions[(pos * 8) as usize..(stop * 8) as usize];
            for (n, dst) in piece.chunks_exact_mut(8).enumerate() {
                dst.copy_from_slice(&(n as i64).to_le_bytes());
            }
            // `total` fits in i32 (PackPlan checked it).
            cu.push(stop as i32);
            pos = stop;
        }
    }
    sh.count_copy(t, dec_b, asm_b);
    if pos != total {
        return Err(Error::Stopped(format!(
            "internal: a packed batch holds {pos} of its {total} tokens"
        )));
    }
    for (dst, v) in bufs[2].chunks_exact_mut(4).zip(&cu) {
        dst.copy_from_slice(&v.to_le_bytes());
    }
    let row_ids = job
        .rows
        .iter()
        .map(|r| sh.source.shard_row_start(r.shard as usize) + r.row)
        .collect();
    let b = pack.sequences as usize;
    Ok(Batch {
        epoch: job.epoch,
        index: job.index,
        row_ids,
        columns: columns.clone(),
        bufs,
        elements: vec![0; 3],
        first_dims: vec![b, b, cu.len()],
        pool: sh.set_pool.clone(),
    })
}
