//! Ragged columns' row offsets (docs/FORMAT.md section 4.1): read, authenticated and checked
//! before any row of the column is handed out.

#![forbid(unsafe_code)]

use std::path::Path;

use super::{Layout, ShardHeader, UnlockedDataset};
use crate::error::{Error, Result};

const WHAT: &str = "ragged column";

/// Decodes and checks a ragged column's row offsets: `rows + 1` little-endian `I64`, the first
/// 0, non-decreasing, the last equal to the `elements` its values tensor holds. A lying
/// offsets tensor (written by someone holding the key) is an error naming the shard file, the
/// column and the first bad row, never an out-of-range read later.
pub fn check_row_offsets(
    path: &Path,
    column: &str,
    bytes: &[u8],
    rows: u64,
    elements: u64,
) -> Result<Vec<u64>> {
    let bad = |reason: String| {
        Error::format(
            path,
            WHAT,
            format!("column '{}': {reason}", crate::format::json::quote(column)),
        )
    };
    if rows.checked_add(1).and_then(|n| n.checked_mul(8)) != Some(bytes.len() as u64) {
        return Err(bad(format!(
            "{} bytes of row offsets for {rows} rows",
            bytes.len()
        )));
    }
    let mut offsets = Vec::with_capacity(bytes.len() / 8);
    let mut prev = 0u64;
    for (i, b) in bytes.chunks_exact(8).enumerate() {
        let v = i64::from_le_bytes(b.try_into().expect("8-byte chunk"));
        let Ok(v) = u64::try_from(v) else {
            return Err(bad(format!("row offset {i} is negative ({v})")));
        };
        if i == 0 && v != 0 {
            return Err(bad(format!("row offsets start at {v}, not 0")));
        }
        if v < prev {
            return Err(bad(format!(
                "row {} ends before it starts (offsets {prev} then {v})",
                i - 1
            )));
        }
        if v > elements {
            return Err(bad(format!(
                "row {} ends at element {v}, past the {elements} elements its values hold",
                i.saturating_sub(1)
            )));
        }
        offsets.push(v);
        prev = v;
    }
    if prev != elements {
        return Err(bad(format!(
            "the last row ends at element {prev}, but the values hold {elements} elements"
        )));
    }
    Ok(offsets)
}

/// Reads, authenticates (every chunk's tag) and checks the row offsets of the ragged tensor
/// `values` (its index in shard `shard`'s descriptor; the offsets tensor follows it).
pub fn read_row_offsets(ds: &UnlockedDataset, shard: usize, values: u32) -> Result<Vec<u64>> {
    let h: &ShardHeader = &ds.dataset().shards()[shard];
    let d = &h.descriptor;
    let v = &d.tensors[values as usize];
    let t = values + 1;
    debug_assert!(
        v.layout == Layout::Ragged && d.tensors[t as usize].layout == Layout::RowOffsets,
        "the descriptor's parser pairs values and offsets"
    );
    let store = ds.dataset().store();
    let mut bytes = zeroize::Zeroizing::new(vec![0u8; d.tensors[t as usize].len() as usize]);
    let mut at = 0;
    for c in h.chunks(t) {
        let buf = &mut bytes[at..at + c.len];
        store.read_at(shard, c.file_offset, buf)?;
        ds.opener(shard)
            .open_in_place(&c.params(), buf)
            .map_err(|e| e.at(|| h.chunk_location(&c)))?;
        at += c.len;
    }
    check_row_offsets(&h.path, &v.name, &bytes, d.rows, v.shape[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le(v: &[i64]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn accepts_and_refuses() {
        let p = Path::new("shard-00000.safetensors");
        assert_eq!(
            check_row_offsets(p, "ids", &le(&[0, 0, 3, 3, 7]), 4, 7).unwrap(),
            vec![0, 0, 3, 3, 7]
        );
        for (offsets, rows, elements, want) in [
            (vec![1, 3], 1, 3, "start at 1"),
            (vec![0, 2, 1], 2, 3, "row 1 ends before it starts"),
            (vec![0, 9], 1, 3, "row 0 ends at element 9, past the 3"),
            (vec![0, 2], 1, 3, "last row ends at element 2"),
            (vec![0, -1], 1, 3, "negative"),
            (vec![0, 3], 2, 3, "16 bytes of row offsets for 2 rows"),
        ] {
            let e = check_row_offsets(p, "ids", &le(&offsets), rows, elements)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(want) && e.contains("'ids'") && e.contains("shard-00000"),
                "{e}"
            );
        }
    }
}
