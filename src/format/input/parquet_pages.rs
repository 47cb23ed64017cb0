//! Every page header of a Parquet file read and checked before arrow-rs decodes a page.
//!
//! arrow-rs allocates a page's buffer from the size its header claims before it decompresses
//! anything, so a 1.5 KB crafted file whose header claims a 2 GiB page makes it allocate 2 GB
//! (docs/SECURITY.md, "Found by fuzzing"). This walks each column chunk's pages (thrift compact
//! headers, read with a small parser that skips what it does not need) and refuses, naming the
//! file, row group and column, a page that claims more than [`MAX_PAGE_BYTES`] uncompressed, a
//! negative size, or bytes beyond its column chunk. It reads only the headers (a buffered
//! reader over each chunk, page bodies skipped), so its cost is a small fraction of decoding.

#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use parquet::file::metadata::ParquetMetaData;

use crate::error::{Error, Result};

const WHAT: &str = "Parquet file";
/// Most bytes one page may claim uncompressed. Writers cut pages at about 1 MiB (arrow-rs,
/// pyarrow and parquet-mr's defaults) and dictionary pages at about the same; 256 MiB leaves
/// room for any page a real writer makes and bounds what a header can make the decoder allocate.
pub const MAX_PAGE_BYTES: i64 = 256 << 20;
/// Deepest nesting of thrift structs and containers the parser follows (a page header nests
/// three levels: header, data page header, statistics).
const MAX_DEPTH: u32 = 16;
/// Most bytes one page header may take (headers carry min/max statistics; real ones are tens
/// of bytes to a few KiB).
const MAX_HEADER_BYTES: u64 = 16 << 20;

/// The sizes a page header gives, and the header's own length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PageSizes {
    uncompressed: i64,
    compressed: i64,
    header_len: u64,
}

/// Checks every page header of every column chunk in `meta` against the file.
pub(super) fn check_pages(
    path: &Path,
    file: File,
    file_len: u64,
    meta: &ParquetMetaData,
) -> Result<()> {
    let refuse = |rg: usize, col: &str, why: String| {
        Error::format(path, WHAT, format!("row group {rg}, column {col}: {why}"))
    };
    let mut reader = BufReader::with_capacity(64 << 10, file);
    for (rg, group) in meta.row_groups().iter().enumerate() {
        for chunk in group.columns() {
            let col = chunk.column_path().string();
            // Where arrow-rs reads the chunk (`ColumnChunkMetaData::byte_range`, which asserts
            // what is checked here).
            let start = chunk
                .dictionary_page_offset()
                .unwrap_or(chunk.data_page_offset());
            let (Ok(start), Ok(len)) =
                (u64::try_from(start), u64::try_from(chunk.compressed_size()))
            else {
                return Err(refuse(
                    rg,
                    &col,
                    "its footer gives a negative offset or size".into(),
                ));
            };
            let end = start.checked_add(len).filter(|&e| e <= file_len).ok_or_else(|| {
                refuse(rg, &col, format!("its pages at bytes {start}..+{len} lie outside the {file_len}-byte file"))
            })?;
            reader
                .seek(SeekFrom::Start(start))
                .map_err(|e| Error::io(path, e))?;
            let mut pos = start;
            while pos < end {
                let mut limited = (&mut reader).take((end - pos).min(MAX_HEADER_BYTES));
                let page = read_page_header(&mut limited).map_err(|why| {
                    refuse(
                        rg,
                        &col,
                        format!("the page header at byte {pos} is unreadable: {why}"),
                    )
                })?;
                if page.uncompressed < 0 || page.compressed < 0 {
                    return Err(refuse(
                        rg,
                        &col,
                        format!("the page at byte {pos} claims a negative size"),
                    ));
                }
                if page.uncompressed > MAX_PAGE_BYTES {
                    return Err(refuse(
                        rg,
                        &col,
                        format!(
                            "the page at byte {pos} claims {} bytes uncompressed, more than the {MAX_PAGE_BYTES} a page may hold here",
                            page.uncompressed
                        ),
                    ));
                }
                let next = (pos + page.header_len)
                    .checked_add(page.compressed as u64)
                    .filter(|&n| n <= end)
                    .ok_or_else(|| {
                        refuse(rg, &col, format!("the page at byte {pos} runs past its column chunk (which ends at byte {end})"))
                    })?;
                reader
                    .seek_relative(page.compressed)
                    .map_err(|e| Error::io(path, e))?;
                pos = next;
            }
        }
    }
    Ok(())
}

/// A thrift compact-protocol reader over a page header, counting the bytes it consumes.
struct Compact<'a, R: Read> {
    r: &'a mut R,
    read: u64,
}

/// Thrift compact type ids.
mod ty {
    pub const TRUE: u8 = 1;
    pub const FALSE: u8 = 2;
    pub const BYTE: u8 = 3;
    pub const I16: u8 = 4;
    pub const I32: u8 = 5;
    pub const I64: u8 = 6;
    pub const DOUBLE: u8 = 7;
    pub const BINARY: u8 = 8;
    pub const LIST: u8 = 9;
    pub const SET: u8 = 10;
    pub const MAP: u8 = 11;
    pub const STRUCT: u8 = 12;
}

type Parse<T> = std::result::Result<T, String>;

impl<R: Read> Compact<'_, R> {
    fn byte(&mut self) -> Parse<u8> {
        let mut b = [0u8; 1];
        self.r
            .read_exact(&mut b)
            .map_err(|_| "it ends early".to_string())?;
        self.read += 1;
        Ok(b[0])
    }

    fn varint(&mut self) -> Parse<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("a varint longer than 10 bytes".into())
    }

    fn zigzag(&mut self) -> Parse<i64> {
        let v = self.varint()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }

    fn skip_bytes(&mut self, n: u64) -> Parse<()> {
        let copied = std::io::copy(&mut (&mut *self.r).take(n), &mut std::io::sink())
            .map_err(|e| e.to_string())?;
        if copied != n {
            return Err("it ends early".into());
        }
        self.read += n;
        Ok(())
    }

    /// Skips one element of a list, set or map: a boolean there takes a byte (so every element
    /// takes at least one, and a huge count cannot spin without reading).
    fn skip_element(&mut self, t: u8, depth: u32) -> Parse<()> {
        match t {
            ty::TRUE | ty::FALSE => self.byte().map(drop),
            _ => self.skip(t, depth),
        }
    }

    /// Skips one value of compact type `t`.
    fn skip(&mut self, t: u8, depth: u32) -> Parse<()> {
        if depth > MAX_DEPTH {
            return Err(format!("nested more than {MAX_DEPTH} levels deep"));
        }
        match t {
            ty::TRUE | ty::FALSE => Ok(()),
            ty::BYTE => self.byte().map(drop),
            ty::I16 | ty::I32 | ty::I64 => self.varint().map(drop),
            ty::DOUBLE => self.skip_bytes(8),
            ty::BINARY => {
                let n = self.varint()?;
                self.skip_bytes(n)
            }
            ty::LIST | ty::SET => {
                let h = self.byte()?;
                let n = match h >> 4 {
                    15 => self.varint()?,
                    n => u64::from(n),
                };
                for _ in 0..n {
                    self.skip_element(h & 0x0f, depth + 1)?;
                }
                Ok(())
            }
            ty::MAP => {
                let n = self.varint()?;
                if n == 0 {
                    return Ok(());
                }
                let kv = self.byte()?;
                for _ in 0..n {
                    self.skip_element(kv >> 4, depth + 1)?;
                    self.skip_element(kv & 0x0f, depth + 1)?;
                }
                Ok(())
            }
            ty::STRUCT => self.fields(depth + 1, |_, _, _| Ok(false)),
            other => Err(format!("an unknown thrift type {other}")),
        }
    }

    /// Reads a struct's fields up to its stop byte; `take(self, id, type)` reads the fields it
    /// wants (returning `true`), the others are skipped.
    fn fields(
        &mut self,
        depth: u32,
        mut take: impl FnMut(&mut Self, i16, u8) -> Parse<bool>,
    ) -> Parse<()> {
        let mut id: i16 = 0;
        loop {
            let h = self.byte()?;
            if h == 0 {
                return Ok(());
            }
            let t = h & 0x0f;
            id = match h >> 4 {
                0 => i16::try_from(self.zigzag()?).map_err(|_| "a field id out of range")?,
                delta => id.wrapping_add(i16::from(delta)),
            };
            if !take(self, id, t)? {
                self.skip(t, depth)?;
            }
        }
    }
}

/// Reads one `PageHeader` (parquet.thrift): field 2 `uncompressed_page_size` and field 3
/// `compressed_page_size` (both required `i32`), the others skipped.
fn read_page_header(r: &mut impl Read) -> Parse<PageSizes> {
    let mut p = Compact { r, read: 0 };
    let (mut uncompressed, mut compressed) = (None, None);
    p.fields(0, |p, id, t| match (id, t) {
        (2, ty::I32) => {
            uncompressed = Some(p.zigzag()?);
            Ok(true)
        }
        (3, ty::I32) => {
            compressed = Some(p.zigzag()?);
            Ok(true)
        }
        _ => Ok(false),
    })?;
    match (uncompressed, compressed) {
        (Some(uncompressed), Some(compressed)) => Ok(PageSizes {
            uncompressed,
            compressed,
            header_len: p.read,
        }),
        _ => Err("it lacks the page's sizes".into()),
    }
}

/// The length and compressed size of the page header at the start of `bytes` (for tests that
/// craft headers).
#[cfg(test)]
pub(super) fn header_at(bytes: &[u8]) -> Parse<(usize, i64)> {
    let p = read_page_header(&mut &bytes[..])?;
    Ok((p.header_len as usize, p.compressed))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compact-protocol page header: type, sizes, crc, then a data page header struct with a
    /// nested statistics struct holding binaries, a list and a map to skip.
    fn header(uncompressed: i32, compressed: i32) -> Vec<u8> {
        let zz = |v: i64| -> Vec<u8> {
            let mut u = ((v << 1) ^ (v >> 63)) as u64;
            let mut out = Vec::new();
            loop {
                let b = (u & 0x7f) as u8;
                u >>= 7;
                if u == 0 {
                    out.push(b);
                    return out;
                }
                out.push(b | 0x80);
            }
        };
        let mut h = vec![0x15];
        h.extend(zz(0)); // 1: type DATA_PAGE
        h.push(0x15);
        h.extend(zz(uncompressed.into())); // 2
        h.push(0x15);
        h.extend(zz(compressed.into())); // 3
        h.push(0x15);
        h.extend(zz(12345)); // 4: crc
        h.push(0x1c); // 5: data_page_header (struct)
        h.push(0x15);
        h.extend(zz(100)); // num_values
        h.push(0x4c); // 5 (delta 4): statistics (struct)
        h.extend([0x18, 3, b'a', b'b', b'c']); // binary
        h.extend([0x19, 0x35]); // list of 3 i32
        h.extend(zz(1));
        h.extend(zz(2));
        h.extend(zz(3));
        h.extend([0x1b, 1, 0x58]); // map of 1: i32 -> binary
        h.extend(zz(7));
        h.extend([1, b'x']);
        h.extend([0x11, 0x12]); // bools
        h.push(0x06); // long-form field id: i64
        h.extend(zz(300));
        h.extend(zz(-5));
        h.push(0); // end statistics
        h.push(0); // end data page header
        h.push(0); // end page header
        h
    }

    #[test]
    fn reads_sizes_and_skips_the_rest() {
        let h = header(1 << 20, 4000);
        let got = read_page_header(&mut h.as_slice()).unwrap();
        assert_eq!(
            got,
            PageSizes {
                uncompressed: 1 << 20,
                compressed: 4000,
                header_len: h.len() as u64
            }
        );
    }

    #[test]
    fn refuses_truncated_deep_and_incomplete_headers() {
        let h = header(10, 10);
        for cut in 0..h.len() {
            assert!(read_page_header(&mut &h[..cut]).is_err(), "cut at {cut}");
        }
        // Structs nested past the limit.
        let mut deep = vec![0x1c; 100];
        deep.extend([0; 100]);
        let e = read_page_header(&mut deep.as_slice()).unwrap_err();
        assert!(e.contains("nested"), "{e}");
        // A header without its sizes.
        let e = read_page_header(&mut [0x15, 0, 0].as_slice()).unwrap_err();
        assert!(e.contains("sizes"), "{e}");
        // A map of a huge count of booleans reads a byte per element, and ends with the input.
        let e = read_page_header(&mut [0x1b, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x11, 1, 1].as_slice())
            .unwrap_err();
        assert!(e.contains("ends early"), "{e}");
        // A binary claiming more bytes than there are.
        let e = read_page_header(&mut [0x18, 0xff, 0xff, 0x03, 1].as_slice()).unwrap_err();
        assert!(e.contains("ends early"), "{e}");
    }
}
