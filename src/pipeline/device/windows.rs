//! Where a shuffle window's chunks go: which chunks a window touches, their place in a window
//! buffer (packed, or 16-byte aligned and split into pieces under a binding limit), and the
//! byte bounds that size staging and device buffers. Computed on the CPU; shared by every
//! device engine.

#![forbid(unsafe_code)]

use crate::pipeline::options::{ChunkKey as Key, push_chunk_keys};
use crate::pipeline::sampler::EpochPlan;
use crate::pipeline::source::{ChunkSpec, ColumnInfo};

/// How a window buffer holds its chunks' plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub enum Packing {
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

/// Bytes of the longest chunk of a column of `row_bytes`-byte rows: `chunk_size`, or its
/// longest tensor when that is shorter (at least 1).
fn longest_chunk(row_bytes: u64, shard_rows: &[u64], chunk_size: u64) -> u64 {
    shard_rows
        .iter()
        .map(|&r| r.saturating_mul(row_bytes))
        .max()
        .unwrap_or(0)
        .clamp(1, chunk_size.max(1))
}

/// [`keys_for_rows`] for fixed-shape columns only (the device loaders, which refuse ragged
/// ones).
fn keys_for_fixed_rows(
    columns: &[ColumnInfo],
    chunk: u64,
    s: u32,
    r0: u64,
    n: u64,
    out: &mut Vec<Key>,
) {
    for (c, col) in columns.iter().enumerate() {
        debug_assert!(!col.ragged, "device loaders refuse ragged columns");
        let (a, b) = (r0 * col.row_bytes, (r0 + n) * col.row_bytes);
        push_chunk_keys(s, c, a, b, chunk, out);
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
        keys_for_fixed_rows(columns, chunk, s, r0, n, &mut keys);
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
