//! Where row-batch conversion gathers a shard's tensors before sealing them: [`Pieces`],
//! ranges of the decoded batches themselves (no copy), and [`Segments`], a growing plaintext
//! buffer held as zeroized segments (for the row offsets, which are rebased).

#![forbid(unsafe_code)]

use std::ops::Range;
use std::sync::Arc;

use zeroize::Zeroizing;

use super::input::records::{ColumnData, RowBatch};

/// A tensor's bytes as consecutive byte ranges of decoded batches' columns (a fixed column's
/// bytes, or a ragged column's values), held without a copy. A batch is shared by the shards
/// its rows go to and zeroized when the last of them drops it (its buffers are `Zeroizing`).
#[derive(Default)]
pub(super) struct Pieces {
    /// Each piece's first byte's offset in the tensor, and the piece.
    parts: Vec<(usize, Piece)>,
    len: usize,
}

struct Piece {
    batch: Arc<RowBatch>,
    column: usize,
    bytes: Range<usize>,
}

impl Piece {
    fn bytes(&self) -> &[u8] {
        match &self.batch.columns[self.column] {
            ColumnData::Fixed(b) => &b[self.bytes.clone()],
            ColumnData::Ragged { values, .. } => &values[self.bytes.clone()],
        }
    }
}

impl Pieces {
    /// Appends bytes `bytes` of column `column` of `batch` (a fixed column's bytes, or a ragged
    /// column's values; the range lies inside them).
    pub(super) fn push(&mut self, batch: &Arc<RowBatch>, column: usize, bytes: Range<usize>) {
        if bytes.is_empty() {
            return;
        }
        let n = bytes.len();
        let piece = Piece {
            batch: Arc::clone(batch),
            column,
            bytes,
        };
        debug_assert_eq!(piece.bytes().len(), n);
        self.parts.push((self.len, piece));
        self.len += n;
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Copies bytes `at..at + buf.len()` into `buf` (they lie inside `0..len`).
    pub(super) fn read(&self, at: usize, buf: &mut [u8]) {
        if buf.is_empty() {
            return;
        }
        let mut i = self.parts.partition_point(|(start, _)| *start <= at) - 1;
        let (mut off, mut done) = (at - self.parts[i].0, 0);
        while done < buf.len() {
            let s = self.parts[i].1.bytes();
            let n = (s.len() - off).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&s[off..off + n]);
            done += n;
            i += 1;
            off = 0;
        }
    }
}

/// Bytes of the first and of the largest segments of [`Segments`].
const FIRST_SEGMENT: usize = 64 << 10;
const MAX_SEGMENT: usize = 16 << 20;

/// A growing byte buffer held as segments, each allocated once at its final size (64 KiB for
/// the first, each next one twice the last, up to 16 MiB) and zeroed when dropped. A
/// [`Zeroizing`] vector that grew would leave copies of the plaintext behind in the memory each
/// reallocation frees.
#[derive(Default)]
pub(super) struct Segments {
    /// Each segment's first byte's offset, and the segment (full but the last).
    segs: Vec<(usize, Zeroizing<Vec<u8>>)>,
    /// The last segment's size, once allocated.
    last_cap: usize,
    len: usize,
}

impl Segments {
    pub(super) fn extend_from_slice(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self
                .segs
                .last()
                .is_none_or(|(_, s)| s.len() == self.last_cap)
            {
                self.last_cap = (2 * self.last_cap).clamp(FIRST_SEGMENT, MAX_SEGMENT);
                let seg = Zeroizing::new(Vec::with_capacity(self.last_cap));
                self.segs.push((self.len, seg));
            }
            let (_, seg) = self.segs.last_mut().expect("pushed");
            let n = (self.last_cap - seg.len()).min(data.len());
            seg.extend_from_slice(&data[..n]);
            data = &data[n..];
            self.len += n;
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Copies bytes `at..at + buf.len()` into `buf` (they lie inside `0..len`).
    pub(super) fn read(&self, at: usize, buf: &mut [u8]) {
        if buf.is_empty() {
            // The one chunk of an empty tensor (no segment at all).
            return;
        }
        let mut i = self.segs.partition_point(|(start, _)| *start <= at) - 1;
        let (mut off, mut done) = (at - self.segs[i].0, 0);
        while done < buf.len() {
            let s = &self.segs[i].1;
            let n = (s.len() - off).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&s[off..off + n]);
            done += n;
            i += 1;
            off = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_read_across_batches() {
        let batch = |fixed: Vec<u8>, values: Vec<u8>| {
            Arc::new(RowBatch {
                rows: 1,
                columns: vec![
                    ColumnData::Fixed(Zeroizing::new(fixed)),
                    ColumnData::Ragged {
                        values: Zeroizing::new(values),
                        offsets: Zeroizing::new(vec![0, 1]),
                    },
                ],
            })
        };
        let (a, b) = (
            batch((0..10).collect(), (100..110).collect()),
            batch((10..20).collect(), vec![]),
        );
        let mut p = Pieces::default();
        p.read(0, &mut []);
        p.push(&a, 0, 2..10);
        p.push(&b, 1, 0..0);
        p.push(&a, 1, 0..3);
        p.push(&b, 0, 0..10);
        let want: Vec<u8> = (2..10).chain(100..103).chain(10..20).collect();
        assert_eq!(p.len(), want.len());
        for at in 0..want.len() {
            for n in 0..=want.len() - at {
                let mut buf = vec![0; n];
                p.read(at, &mut buf);
                assert_eq!(buf, want[at..at + n], "{at} + {n}");
            }
        }
    }

    #[test]
    fn segments_hold_bytes_across_segment_boundaries() {
        let data: Vec<u8> = (0u32..40 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect();
        let mut s = Segments::default();
        // An empty tensor's one chunk, read before any segment exists (found by fuzzing).
        s.read(0, &mut []);
        let mut at = 0;
        for (k, step) in [1, 65535, 3, 1 << 20, 7 << 20].iter().cycle().enumerate() {
            let end = (at + step + k).min(data.len());
            s.extend_from_slice(&data[at..end]);
            at = end;
            if at == data.len() {
                break;
            }
        }
        assert_eq!(s.len(), data.len());
        assert!(s.segs.iter().all(|(_, seg)| seg.len() <= MAX_SEGMENT));
        assert_eq!(s.segs[0].1.len(), FIRST_SEGMENT);
        let reads = [
            (0, 10),
            (65530, 20),
            (196600, 300000),
            (data.len() - 5, 5),
            (1000, 35 << 20),
        ];
        for (start, len) in reads {
            let mut buf = vec![0u8; len];
            s.read(start, &mut buf);
            assert!(buf == data[start..start + len], "{start} + {len}");
        }
    }
}
