//! The device loaders' plan, shared by the CUDA (`super::device`) and wgpu
//! (`super::wgpu_device`) paths and computed on the CPU: which chunks each shuffle window
//! touches, where they sit in a window buffer, the order the reader loads windows in, and for
//! each batch the (window offset, column offset) of every row to gather. It follows the host
//! [`super::Loader`]'s plan exactly, so a device batch equals the host batch (tested below).

use super::format_source::FormatSource;
use super::loader::longest_chunk;
use super::sampler::{Cursor, EpochPlan, RowRef};
use super::source::{ChunkSpec, ColumnInfo, RowSource};
use crate::error::{Error, Result};

/// A chunk: (shard, column, chunk index j).
pub(crate) type Key = (u32, u32, u64);

/// How a window buffer holds its chunks' plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) enum Packing {
    /// Back to back in key order, one buffer (CUDA: the kernels write plaintext to a separate
    /// buffer).
    Packed,
    /// Each chunk at its 16-byte aligned staging offset (wgpu: decrypted in place, whole
    /// blocks). Only a tensor's last chunk can be short, so a row spanning two chunks is still
    /// one contiguous range. A window above `piece_cap` bytes is split into [`Piece`]s of at
    /// most `piece_cap` bytes, one device buffer each (a storage binding has a size limit).
    #[cfg_attr(not(feature = "wgpu"), allow(dead_code))]
    Aligned { piece_cap: u64 },
}

/// Chunk keys covering rows `[r0, r0 + n)` of shard `s`, every column.
pub(crate) fn keys_for_rows(
    columns: &[ColumnInfo],
    chunk: u64,
    s: u32,
    r0: u64,
    n: u64,
    out: &mut Vec<Key>,
) {
    for (c, col) in columns.iter().enumerate() {
        let (a, b) = (r0 * col.row_bytes, (r0 + n) * col.row_bytes);
        if b > a {
            for j in a / chunk..=(b - 1) / chunk {
                out.push((s, c as u32, j));
            }
        }
    }
}

/// Most staging bytes one window can need (chunks padded to 16 bytes). Per column: W blocks of
/// `block_rows` rows span ceil(bytes / chunk) chunks each (+1 when blocks do not start on chunk
/// boundaries), the host loader's bound; and never more than the column's chunks in all shards
/// hold, so a huge chunk size or window over a small dataset does not size buffers by the
/// chunk size. Saturating: absurd options give a huge bound (refused by the caller), not a wrap.
pub(crate) fn window_byte_bound(
    columns: &[ColumnInfo],
    chunk_size: u64,
    block_rows: u64,
    window_blocks: u64,
    shard_rows: &[u64],
) -> u64 {
    let chunk16 = chunk_size.next_multiple_of(16);
    columns
        .iter()
        .map(|c| {
            let block_bytes = block_rows.saturating_mul(c.row_bytes);
            let aligned = block_bytes.is_multiple_of(chunk_size)
                || (block_bytes > 0 && chunk_size.is_multiple_of(block_bytes));
            let per_block = block_bytes.div_ceil(chunk_size) + u64::from(!aligned);
            let by_blocks = window_blocks
                .saturating_mul(per_block)
                .saturating_mul(chunk16);
            let total = shard_rows
                .iter()
                .map(|&r| {
                    // Every chunk of a tensor but its last is full.
                    let len = r.saturating_mul(c.row_bytes);
                    let full = len.div_ceil(chunk_size).max(1) - 1;
                    let last = len - full * chunk_size;
                    full.saturating_mul(chunk16)
                        .saturating_add(last.next_multiple_of(16))
                })
                .fold(0, u64::saturating_add);
            by_blocks.min(total)
        })
        .fold(0, u64::saturating_add)
        .max(16)
}

/// The chunks window `w` of `plan` touches, sorted (shard, column, chunk).
pub(crate) fn window_keys(
    columns: &[ColumnInfo],
    chunk: u64,
    plan: &EpochPlan,
    w: usize,
) -> Vec<Key> {
    let mut keys = Vec::new();
    for &(s, r0, n) in plan.window_blocks(w) {
        keys_for_rows(columns, chunk, s, r0, n, &mut keys);
    }
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Offset of each of a window's chunks in its buffer, sorted by key: a binary search per
/// gathered row is cheaper than hashing the key (2 × batch rows lookups per batch). Offsets are
/// into the window's pieces laid end to end; `pieces` holds where each piece starts.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ChunkOffsets {
    offsets: Vec<(Key, u64)>,
    pieces: Vec<u64>,
}

impl ChunkOffsets {
    pub(crate) fn get(&self, k: &Key) -> Option<u64> {
        self.offsets
            .binary_search_by(|(x, _)| x.cmp(k))
            .ok()
            .map(|i| self.offsets[i].1)
    }

    /// The piece holding window offset `at`, and the offset within that piece.
    pub(crate) fn locate(&self, at: u64) -> (usize, u64) {
        let p = self.pieces.partition_point(|&start| start <= at).max(1) - 1;
        (p, at - self.pieces.get(p).copied().unwrap_or(0))
    }

    pub(crate) fn piece_count(&self) -> usize {
        self.pieces.len().max(1)
    }
}

/// Bytes of one chunk present in a piece: the chunk itself at its home offset, or a copy of its
/// first `len` bytes extending the previous piece (see [`window_layout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Part {
    /// Index of the chunk in the window's keys.
    pub(crate) chunk: usize,
    /// Offset in the window (staging) of the part's first byte (16-byte aligned).
    pub(crate) at: usize,
    /// Bytes of the chunk (from its start) the part holds.
    pub(crate) len: usize,
}

/// A range of the window uploaded into one device buffer and decrypted by one dispatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Piece {
    /// Staging range: 16-byte aligned start, length a multiple of 16.
    pub(crate) range: std::ops::Range<usize>,
    /// Its chunks and extension prefixes, in staging order.
    pub(crate) parts: Vec<Part>,
}

/// Where a window's chunks go in staging and in the window's device buffer(s).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct WindowLayout {
    /// Staging offset of each chunk (16-byte aligned: the vectorized kernel path).
    pub(crate) staging_offs: Vec<usize>,
    /// Offset of each chunk's plaintext in the window buffer, in key order.
    pub(crate) dst_offs: Vec<u64>,
    /// The same, by key.
    pub(crate) offsets: ChunkOffsets,
    pub(crate) staging_len: usize,
    pub(crate) out_len: u64,
    /// The window's pieces (one with `Packing::Packed`, or when the window fits `piece_cap`).
    #[cfg_attr(not(feature = "wgpu"), allow(dead_code))]
    pub(crate) pieces: Vec<Piece>,
}

/// Bytes after chunk `i` that a piece ending with it must carry: the rest of the row holding
/// the chunk's last byte, taken from the same tensor's next chunks (`(index, bytes)` each).
fn overhang(
    columns: &[ColumnInfo],
    chunk: u64,
    keys: &[Key],
    specs: &[ChunkSpec],
    i: usize,
) -> Vec<(usize, usize)> {
    let (s, c, j) = keys[i];
    let rb = columns[c as usize].row_bytes;
    let end = j * chunk + specs[i].len as u64;
    if rb == 0 || end == 0 {
        return Vec::new();
    }
    let mut rest = ((end - 1) / rb + 1) * rb - end;
    let mut out = Vec::new();
    let mut k = i + 1;
    while rest > 0 && k < keys.len() && keys[k] == (s, c, j + (k - i) as u64) {
        let take = rest.min(specs[k].len as u64);
        out.push((k, take as usize));
        rest -= take;
        k += 1;
    }
    out
}

/// Most bytes a piece needs for one chunk and its overhang (the smallest usable `piece_cap`).
/// A column's chunks are never longer than its longest tensor (a small dataset written with
/// 256 MiB chunks has small chunks).
#[cfg_attr(not(feature = "wgpu"), allow(dead_code))]
pub(crate) fn piece_unit_bound(columns: &[ColumnInfo], chunk: u64, shard_rows: &[u64]) -> u64 {
    let pad16 = |n: u64| n.checked_next_multiple_of(16).unwrap_or(u64::MAX);
    columns
        .iter()
        .map(|c| {
            let longest = longest_chunk(c.row_bytes, shard_rows, chunk);
            let over = c.row_bytes.saturating_sub(1);
            // Each chunk the overhang touches is padded to 16 bytes.
            let parts = over.div_ceil(chunk.max(1)).saturating_add(1);
            pad16(longest)
                .saturating_add(pad16(over))
                .saturating_add(parts.saturating_mul(16))
        })
        .max()
        .unwrap_or(16)
}

/// Lays the chunks out in key order, so the consecutive chunks of one shard's column are
/// contiguous (every chunk but a tensor's last is full, and chunk sizes are multiples of 64):
/// a row straddling two chunks is one contiguous range of the window buffer.
///
/// `Packing::Aligned` over more than `piece_cap` bytes: pieces filled greedily in key order. A
/// piece may end between two chunks of one tensor, where a row can straddle; it then also
/// carries a copy of the next chunks' first bytes up to the end of that row (an extension, also
/// decrypted there: CTR over a chunk's prefix is the prefix of its plaintext), so every row
/// is contiguous in the piece of the chunk it starts in. Needs `piece_cap` at least
/// [`piece_unit_bound`]; below it a piece holds one chunk and may exceed the cap (the caller
/// checks).
pub(crate) fn window_layout(
    columns: &[ColumnInfo],
    chunk: u64,
    keys: &[Key],
    specs: &[ChunkSpec],
    packing: Packing,
) -> WindowLayout {
    let mut staging_offs = Vec::with_capacity(keys.len());
    let mut dst_offs = Vec::with_capacity(keys.len());
    let padded: usize = specs.iter().map(|s| s.len.next_multiple_of(16)).sum();
    let cap = match packing {
        Packing::Aligned { piece_cap } if padded as u64 > piece_cap => Some(piece_cap),
        _ => None,
    };
    let mut pieces = Vec::new();
    let (mut at, mut out) = (0usize, 0u64);
    let mut start = 0usize;
    let mut parts: Vec<Part> = Vec::new();
    // The overhang of the last chunk placed: what closing the piece after it must carry.
    let mut prev_ext: Vec<(usize, usize)> = Vec::new();
    let ext_len = |ext: &[(usize, usize)]| {
        ext.iter()
            .map(|&(_, n)| n.next_multiple_of(16))
            .sum::<usize>()
    };
    for (i, spec) in specs.iter().enumerate() {
        let p = spec.len.next_multiple_of(16);
        if let Some(cap) = cap {
            let ext = overhang(columns, chunk, keys, specs, i);
            if !parts.is_empty() && (at - start + p + ext_len(&ext)) as u64 > cap {
                // Close the piece after chunk i - 1, with its overhang (it fit when i - 1 came in).
                for &(k, n) in &prev_ext {
                    parts.push(Part {
                        chunk: k,
                        at,
                        len: n,
                    });
                    at += n.next_multiple_of(16);
                }
                pieces.push(Piece {
                    range: start..at,
                    parts: std::mem::take(&mut parts),
                });
                start = at;
            }
            prev_ext = ext;
        }
        staging_offs.push(at);
        dst_offs.push(match packing {
            Packing::Packed => out,
            Packing::Aligned { .. } => at as u64,
        });
        parts.push(Part {
            chunk: i,
            at: match packing {
                Packing::Packed => out as usize,
                Packing::Aligned { .. } => at,
            },
            len: spec.len,
        });
        at += p;
        out += spec.len as u64;
    }
    if matches!(packing, Packing::Aligned { .. }) {
        out = at as u64;
    }
    pieces.push(Piece {
        range: match packing {
            Packing::Packed => 0..out as usize,
            Packing::Aligned { .. } => start..at,
        },
        parts,
    });
    let mut offsets: Vec<(Key, u64)> = keys.iter().copied().zip(dst_offs.iter().copied()).collect();
    offsets.sort_unstable_by_key(|e| e.0);
    WindowLayout {
        staging_offs,
        dst_offs,
        offsets: ChunkOffsets {
            offsets,
            pieces: pieces.iter().map(|p| p.range.start as u64).collect(),
        },
        staging_len: at,
        out_len: out,
        pieces,
    }
}

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

/// Runs on each chunk right after its read (e.g. its tag check), on the reading thread.
pub(crate) type ChunkCheck<'a> = dyn Fn(Key, &ChunkSpec, &[u8]) -> Result<()> + Sync + 'a;

/// Reads chunks into a window's staging through the source's store.
pub(crate) struct ChunkReader<'a> {
    pub(crate) source: &'a FormatSource,
    /// Threads that `pread` one window's chunks.
    pub(crate) threads: usize,
}

impl ChunkReader<'_> {
    /// Reads every chunk into its staging range, the chunks dealt round-robin to `threads`
    /// scoped threads (one thread does not reach PCIe bandwidth copying from the page cache);
    /// `check` runs on each chunk right after its read, on the same thread (cache-hot).
    pub(crate) fn pread_all(
        &self,
        keys: &[Key],
        specs: &[ChunkSpec],
        offs: &[usize],
        staging: &mut [u8],

        check: &ChunkCheck<'_>,
    ) -> Result<()> {
        // Disjoint staging ranges, in order (offsets increase with the key order).
        let mut jobs: Vec<(Key, &ChunkSpec, &mut [u8])> = Vec::with_capacity(keys.len());
        let mut rest: &mut [u8] = staging;
        let mut pos = 0usize;
        for ((k, spec), &o) in keys.iter().zip(specs).zip(offs) {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(o - pos);
            let (dst, tail) = tail.split_at_mut(spec.len);
            rest = tail;
            pos = o + spec.len;
            jobs.push((*k, spec, dst));
        }
        let threads = self.threads.min(jobs.len()).max(1);
        if threads == 1 {
            return jobs
                .into_iter()
                .try_for_each(|(k, spec, dst)| self.pread_checked(k, spec, dst, check));
        }
        let mut lanes: Vec<Vec<(Key, &ChunkSpec, &mut [u8])>> =
            (0..threads).map(|_| Vec::new()).collect();
        for (i, j) in jobs.into_iter().enumerate() {
            lanes[i % threads].push(j);
        }
        std::thread::scope(|sc| {
            let handles: Vec<_> = lanes
                .into_iter()
                .map(|lane| {
                    sc.spawn(move || {
                        lane.into_iter()
                            .try_for_each(|(k, spec, dst)| self.pread_checked(k, spec, dst, check))
                    })
                })
                .collect();
            // The first error in chunk order of lanes; a panicking reader is an error too.
            let mut first = Ok(());
            for h in handles {
                let r = h
                    .join()
                    .unwrap_or_else(|_| Err(Error::Stopped("a pread thread panicked".into())));
                if first.is_ok() {
                    first = r;
                }
            }
            first
        })
    }

    fn pread_checked(
        &self,
        k: Key,
        spec: &ChunkSpec,
        dst: &mut [u8],
        check: &ChunkCheck<'_>,
    ) -> Result<()> {
        self.pread(k, spec, dst)?;
        check(k, spec, dst)
    }

    pub(crate) fn pread(&self, k: Key, spec: &ChunkSpec, dst: &mut [u8]) -> Result<()> {
        self.source
            .store()
            .read_at(k.0 as usize, spec.file_offset, dst)
    }
}

#[cfg(test)]
mod tests {
    //! The window layout and gather offsets, checked on the CPU (no GPU needed): windows are
    //! opened on the host into buffers laid out exactly as on the device, rows gathered with
    //! the same offsets, and every batch compared with the host loader's.
    use super::*;
    use crate::cipher::{Backend, ChunkParams};
    use crate::format::{ConvertInput, ConvertOptions, Dtype, convert};
    use crate::keys::MasterKey;
    use crate::pipeline::{Loader, LoaderOptions, SamplerConfig};
    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Instant;

    fn dataset(dir: &Path, rows: u64) -> MasterKey {
        let key = MasterKey::generate().unwrap();
        let col = |name: &str, dtype, shape: Vec<u64>, data: Vec<u8>| ConvertInput::InMemory {
            name: name.into(),
            dtype,
            shape,
            data,
        };
        let inputs = [
            col(
                "x",
                Dtype::F32,
                vec![rows, 3],
                (0..rows * 3)
                    .flat_map(|i| (i as f32).to_le_bytes())
                    .collect(),
            ),
            col(
                "y",
                Dtype::I32,
                vec![rows],
                (0..rows as i32)
                    .flat_map(|i| (i * 7).to_le_bytes())
                    .collect(),
            ),
            col(
                "z",
                Dtype::U8,
                vec![rows, 5],
                (0..rows * 5).map(|i| (i * 31 % 251) as u8).collect(),
            ),
            // Rows wider than a chunk: a row spans two or three chunks.
            col(
                "w",
                Dtype::U8,
                vec![rows, 200],
                (0..rows * 200).map(|i| (i * 13 % 253) as u8).collect(),
            ),
        ];
        let opts = ConvertOptions {
            keys: vec![key.clone()],
            chunk_size: 128,
            shard_size: 30_000,
            plain: vec!["y".into()],
            ..Default::default()
        };
        convert(&inputs, dir, &opts, &mut |_, _| {}).unwrap();
        key
    }

    /// Window `w` opened on the host into buffers with the device layout, one per piece.
    fn host_window(
        src: &FormatSource,
        plan: &EpochPlan,
        w: usize,
        bound: usize,
        packing: Packing,
    ) -> (Vec<Vec<u8>>, ChunkOffsets) {
        let keys = window_keys(src.columns(), src.chunk_size(), plan, w);
        let specs: Vec<ChunkSpec> = keys
            .iter()
            .map(|&(s, c, j)| src.chunk(s as usize, c as usize, j))
            .collect();
        let lay = window_layout(src.columns(), src.chunk_size(), &keys, &specs, packing);
        match packing {
            Packing::Aligned { piece_cap } if lay.pieces.len() > 1 => {
                for p in &lay.pieces {
                    assert!(p.range.len() as u64 <= piece_cap, "window {w}: {p:?}");
                    assert!(p.range.start.is_multiple_of(16) && p.range.len().is_multiple_of(16));
                }
                assert!(bound as u64 > piece_cap, "split although the window fits");
            }
            _ => assert!(
                lay.staging_len <= bound,
                "window {w}: {} > bound {bound}",
                lay.staging_len
            ),
        }
        let plain: Vec<Vec<u8>> = keys
            .iter()
            .zip(&specs)
            .map(|(k, spec)| {
                let mut chunk = vec![0u8; spec.len];
                src.store()
                    .read_at(k.0 as usize, spec.file_offset, &mut chunk)
                    .unwrap();
                let params = ChunkParams {
                    nonce: spec.nonce,
                    aad: &spec.aad,
                    tag: spec.tag,
                    encrypted: spec.encrypted,
                };
                let opener = src.opener(k.0 as usize);
                if spec.encrypted {
                    opener.open_in_place(&params, &mut chunk).unwrap();
                } else {
                    opener.verify(&params, &chunk).unwrap();
                }
                chunk
            })
            .collect();
        let mut homes = 0;
        let bufs = lay
            .pieces
            .iter()
            .map(|p| {
                let mut buf = vec![0u8; p.range.len()];
                for part in &p.parts {
                    let o = part.at - p.range.start;
                    buf[o..o + part.len].copy_from_slice(&plain[part.chunk][..part.len]);
                    if part.len == specs[part.chunk].len
                        && lay.dst_offs[part.chunk] == part.at as u64
                    {
                        homes += 1;
                    }
                }
                buf
            })
            .collect();
        assert_eq!(homes, keys.len(), "every chunk has one home");
        (bufs, lay.offsets)
    }

    /// The reader's window order is exactly what the gather loop asks for, batch by batch,
    /// including the last rank's padding that wraps to the epoch's first window.
    #[test]
    fn reader_load_order_matches_the_gather_loop() {
        let shard_rows = [1000u64, 37, 512, 999];
        for (batch, w_blocks, world, rank, block_rows, drop_last, first) in [
            (64u64, 4u64, 1u64, 0u64, 50u64, false, 0u64),
            (100, 1, 3, 2, 64, false, 0),
            (7, 2, 2, 1, 13, false, 5),
            (1000, 3, 4, 3, 100, false, 0),
            (33, 8, 3, 0, 10, true, 2),
            (2548, 2, 1, 0, 128, false, 0),
        ] {
            let cfg = SamplerConfig {
                seed: batch ^ rank,
                shuffle: true,
                block_rows,
                window_blocks: w_blocks,
                rank,
                world_size: world,
                batch_size: batch,
                drop_last,
            };
            for epoch in 0..2 {
                let plan = EpochPlan::new(&cfg, epoch, &shard_rows);
                let mut cur = Cursor::new(&plan);
                let (mut resident, mut asked) = (Vec::<usize>::new(), Vec::new());
                for k in first.min(plan.batches())..plan.batches() {
                    let (a, b) = plan.batch_positions(k);
                    let mut needed: Vec<usize> = (a..b).map(|p| cur.row_at(p).1).collect();
                    needed.sort_unstable();
                    needed.dedup();
                    assert_eq!(batch_windows(&plan, k), needed, "batch {k} of {cfg:?}");
                    resident.retain(|w| needed.contains(w));
                    for &w in &needed {
                        if !resident.contains(&w) {
                            resident.push(w);
                            asked.push(w);
                        }
                    }
                }
                assert_eq!(load_order(&plan, first), asked, "{cfg:?} epoch {epoch}");
            }
        }
    }

    /// Host-side cost of the device path's planning, per batch, at `ciphershard bench`'s
    /// geometry (262,144 rows of 1024 + 8 bytes, 2 MiB chunks, batch 1024, W = 8): the planner
    /// thread's row walk and offsets (`plan_batch`), the reader's window order and layouts. Run with
    /// `cargo test --release --lib window_plan::tests::host_side_costs -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing probe, run by hand in release"]
    fn host_side_costs_per_batch() {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::bench::loader::generate(dir.path(), 262_144, 256, 2 << 20).unwrap();
        let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
        let shard_rows: Vec<u64> = (0..src.shard_count()).map(|s| src.shard_rows(s)).collect();
        let widest = src.columns().iter().map(|c| c.row_bytes).max().unwrap();
        let cfg = SamplerConfig {
            seed: 1,
            shuffle: true,
            block_rows: src.chunk_size() / widest,
            window_blocks: 8,
            rank: 0,
            world_size: 1,
            batch_size: 1024,
            drop_last: false,
        };
        let epochs = 3;
        let t = Instant::now();
        let mut windows = 0;
        for epoch in 0..epochs {
            let plan = EpochPlan::new(&cfg, epoch, &shard_rows);
            for w in load_order(&plan, 0) {
                let keys = window_keys(src.columns(), src.chunk_size(), &plan, w);
                let specs: Vec<ChunkSpec> = keys
                    .iter()
                    .map(|&(s, c, j)| src.chunk(s as usize, c as usize, j))
                    .collect();
                std::hint::black_box(window_layout(
                    src.columns(),
                    src.chunk_size(),
                    &keys,
                    &specs,
                    Packing::Packed,
                ));
                windows += 1;
            }
        }
        let reader = t.elapsed();
        let t = Instant::now();
        let mut batches = 0u64;
        for epoch in 0..epochs {
            let plan = EpochPlan::new(&cfg, epoch, &shard_rows);
            let mut cur = Cursor::new(&plan);
            let mut layouts = Vec::new();
            for k in 0..plan.batches() {
                let bp = plan_batch(
                    &src,
                    &plan,
                    &mut cur,
                    &mut layouts,
                    epoch,
                    k,
                    Packing::Packed,
                )
                .unwrap();
                std::hint::black_box(&bp.pairs);
                batches += 1;
            }
        }
        let gather = t.elapsed();
        eprintln!(
            "reader planning: {windows} windows in {:.2} ms ({:.1} us/window); planner thread: \
             {batches} batches in {:.2} ms ({:.1} us/batch)",
            reader.as_secs_f64() * 1e3,
            reader.as_secs_f64() * 1e6 / windows as f64,
            gather.as_secs_f64() * 1e3,
            gather.as_secs_f64() * 1e6 / batches as f64
        );
    }

    /// Every batch of `o` rebuilt from windows laid out with each of `packings` (opened on the
    /// host, one buffer per piece) and the planner's offsets equals the host loader's batch.
    /// Returns how many windows were split into pieces.
    fn rebuild_host_batches(
        src: &Arc<FormatSource>,
        o: &LoaderOptions,
        packings: &[Packing],
    ) -> usize {
        let host: Vec<_> = Loader::new(src.clone(), o)
            .unwrap()
            .map(|b| b.unwrap())
            .collect();
        let shard_rows: Vec<u64> = (0..src.shard_count()).map(|s| src.shard_rows(s)).collect();
        let widest = src.columns().iter().map(|c| c.row_bytes).max().unwrap();
        let block_rows = o.block_rows.unwrap_or((src.chunk_size() / widest).max(1));
        let bound = window_byte_bound(
            src.columns(),
            src.chunk_size(),
            block_rows,
            o.window_blocks,
            &shard_rows,
        ) as usize;
        let cfg = SamplerConfig {
            seed: o.seed,
            shuffle: o.shuffle,
            block_rows,
            window_blocks: o.window_blocks,
            rank: o.rank,
            world_size: o.world_size,
            batch_size: o.batch_size as u64,
            drop_last: o.drop_last,
        };
        let mut split = 0;
        for &packing in packings {
            let mut hi = host.iter();
            for epoch in 0..o.epochs {
                let plan = EpochPlan::new(&cfg, epoch, &shard_rows);
                let mut cur = Cursor::new(&plan);
                let mut layouts = Vec::new();
                let mut windows: HashMap<usize, Vec<Vec<u8>>> = HashMap::new();
                for k in 0..plan.batches() {
                    // What the planner thread sends the gather thread.
                    let bp =
                        plan_batch(src, &plan, &mut cur, &mut layouts, epoch, k, packing).unwrap();
                    let h = hi.next().expect("as many batches as the host loader");
                    assert_eq!((bp.epoch, bp.index), (h.epoch(), h.index()));
                    assert_eq!(bp.row_ids, h.row_ids(), "{o:?}");
                    for &w in &bp.needed {
                        windows.entry(w).or_insert_with(|| {
                            let (bufs, offsets) = host_window(src, &plan, w, bound, packing);
                            // The reader's layout is the one the planner assumes.
                            assert_eq!(offsets, window_offsets(src, &plan, w, packing));
                            split += usize::from(bufs.len() > 1);
                            bufs
                        });
                    }
                    let mut got: Vec<Vec<u8>> = src
                        .columns()
                        .iter()
                        .map(|col| vec![0u8; bp.row_ids.len() * col.row_bytes as usize])
                        .collect();
                    let mut covered = vec![0usize; src.columns().len()];
                    for (c, w, piece, range) in &bp.jobs {
                        let buf = &windows[w][*piece];
                        let n = src.columns()[*c].row_bytes as usize;
                        for &(s, d) in &bp.pairs[range.clone()] {
                            let (s, d) = (s as usize, d as usize);
                            got[*c][d..d + n].copy_from_slice(&buf[s..s + n]);
                        }
                        covered[*c] += range.len();
                    }
                    for (c, col) in src.columns().iter().enumerate() {
                        assert_eq!(covered[c], bp.row_ids.len(), "every row gathered once");
                        assert_eq!(
                            got[c],
                            h.tensors().nth(c).unwrap().bytes,
                            "column {} {o:?} {packing:?}",
                            col.name
                        );
                    }
                }
            }
            assert!(hi.next().is_none());
        }
        split
    }

    #[test]
    fn window_layout_and_gather_offsets_rebuild_the_host_batches() {
        let dir = tempfile::tempdir().unwrap();
        let key = dataset(dir.path(), 700);
        let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
        assert!(src.shard_count() > 2);
        let shard_rows: Vec<u64> = (0..src.shard_count()).map(|s| src.shard_rows(s)).collect();
        let unit = piece_unit_bound(src.columns(), src.chunk_size(), &shard_rows);
        let packings = [
            Packing::Packed,
            Packing::Aligned {
                piece_cap: u64::MAX,
            },
            Packing::Aligned { piece_cap: unit },
            Packing::Aligned { piece_cap: 1000 },
            Packing::Aligned {
                piece_cap: 3 * unit,
            },
        ];
        for (seed, batch, w_blocks, world, rank, block_rows) in [
            (1u64, 32usize, 8u64, 1u64, 0u64, None),
            (2, 50, 3, 2, 1, None),
            (3, 300, 1, 1, 0, Some(7)),
            (4, 17, 2, 3, 2, Some(100)),
        ] {
            let o = LoaderOptions {
                batch_size: batch,
                seed,
                window_blocks: w_blocks,
                world_size: world,
                rank,
                block_rows,
                epochs: 2,
                ..Default::default()
            };
            let split = rebuild_host_batches(&src, &o, &packings);
            assert!(split > 0, "the small caps split windows ({o:?})");
        }
    }

    /// Random geometries (row sizes from 1 byte to several chunks, chunk and shard sizes, options,
    /// piece caps from the smallest usable up): every batch rebuilt from split windows equals
    /// the host loader's.
    #[test]
    fn random_geometries_rebuild_the_host_batches() {
        let mut rng = crate::cipher::conformance::SplitMix(0x9EC5);
        let row_sizes = [1u64, 3, 4, 5, 7, 12, 33, 64, 100, 130, 200, 300, 517];
        let mut split = 0;
        for case in 0..24 {
            let dir = tempfile::tempdir().unwrap();
            let key = MasterKey::generate().unwrap();
            let rows = 40 + rng.below(360);
            let inputs: Vec<ConvertInput> = (0..1 + rng.below(3))
                .map(|c| {
                    let rb = row_sizes[rng.below(row_sizes.len() as u64) as usize];
                    let mut data = vec![0u8; (rows * rb) as usize];
                    rng.fill(&mut data);
                    ConvertInput::InMemory {
                        name: format!("c{c}"),
                        dtype: Dtype::U8,
                        shape: vec![rows, rb],
                        data,
                    }
                })
                .collect();
            let plain = if rng.below(3) == 0 {
                vec!["c0".into()]
            } else {
                Vec::new()
            };
            let copts = ConvertOptions {
                keys: vec![key.clone()],
                chunk_size: 64 * (1 + rng.below(8)),
                shard_size: 2000 + rng.below(30_000),
                plain,
                ..Default::default()
            };
            convert(&inputs, dir.path(), &copts, &mut |_, _| {}).unwrap();
            let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
            let world = 1 + rng.below(3);
            let o = LoaderOptions {
                batch_size: 1 + rng.below(150) as usize,
                seed: case,
                window_blocks: 1 + rng.below(12),
                block_rows: (rng.below(2) == 0).then(|| 1 + rng.below(60)),
                shuffle: rng.below(4) != 0,
                world_size: world,
                rank: rng.below(world),
                drop_last: rng.below(3) == 0,
                epochs: 1 + rng.below(2),
                ..Default::default()
            };
            let shard_rows: Vec<u64> = (0..src.shard_count()).map(|s| src.shard_rows(s)).collect();
            let unit = piece_unit_bound(src.columns(), src.chunk_size(), &shard_rows);
            let packings = [
                Packing::Aligned { piece_cap: unit },
                Packing::Aligned {
                    piece_cap: unit + 16 * rng.below(unit / 8 + 1),
                },
                Packing::Aligned {
                    piece_cap: 2 * unit,
                },
            ];
            split += rebuild_host_batches(&src, &o, &packings);
        }
        assert!(split > 24, "windows were split ({split})");
    }

    /// A `u8` column of `row_bytes`-byte rows.
    fn col(row_bytes: u64) -> ColumnInfo {
        ColumnInfo {
            name: "c".into(),
            dtype: "U8".into(),
            elem_size: 1,
            row_shape: vec![row_bytes],
            row_bytes,
        }
    }

    #[test]
    fn piece_unit_bound_covers_a_chunk_and_its_overhang() {
        let rows = [1000, 20];
        // 128-byte chunks: + the 11 bytes a 12-byte row can overhang (padded), in at most 2 parts.
        assert_eq!(
            piece_unit_bound(&[col(12), col(5)], 128, &rows),
            128 + 16 + 2 * 16
        );
        // A 200-byte row overhangs up to 199 bytes over up to 3 chunks.
        assert_eq!(
            piece_unit_bound(&[col(5), col(200)], 128, &rows),
            128 + 208 + 3 * 16
        );
        // 256 MiB chunks over a small dataset: its chunks are as long as its tensors.
        assert_eq!(
            piece_unit_bound(&[col(12)], 256 << 20, &rows),
            12_000 + 16 + 2 * 16
        );
        // Absurd rows saturate instead of wrapping (open then refuses them).
        assert_eq!(
            piece_unit_bound(&[col(u64::MAX - 3)], 128, &[u64::MAX]),
            u64::MAX
        );
    }

    #[test]
    fn window_bound_follows_the_data_not_the_chunk_size() {
        let cols = [col(12), col(5)];
        // 256 MiB chunks over 2 × 100 rows: the bound is the data (padded), not 256 MiB.
        let b = window_byte_bound(&cols, 256 << 20, 1000, 8, &[100, 100]);
        assert_eq!(b, 2 * 1200 + 2 * 500u64.next_multiple_of(16));
        // Absurd windows saturate instead of wrapping, and are still capped by the data.
        assert_eq!(
            window_byte_bound(&cols, 64, 1 << 40, u64::MAX, &[100, 100]),
            b
        );
        assert_eq!(
            window_byte_bound(&[col(u64::MAX / 2)], 64, 3, u64::MAX, &[u64::MAX]),
            u64::MAX
        );
        // Small windows over big data: W blocks' chunks, as before.
        let w = window_byte_bound(&[col(1024)], 2 << 20, 2048, 8, &[1 << 20]);
        assert_eq!(w, 8 * (2 << 20));
    }
}
