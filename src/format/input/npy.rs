//! NPY header parsing (format versions 1, 2 and 3): little-endian numeric dtypes and bool, C
//! order only. Only the header is parsed here; the data is streamed by the converter.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use super::{FileInput, InputTensor, open_file};
use crate::error::{Error, Result};
use crate::format::{Dtype, MAX_RANK, tensor_bytes};

const WHAT: &str = "NPY header";
/// Largest NPY header accepted.
pub const MAX_NPY_HEADER: usize = 1 << 20;

/// A parsed NPY header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    /// Element type.
    pub dtype: Dtype,
    /// Shape (C order).
    pub shape: Vec<u64>,
    /// Offset of the data in the file.
    pub data_offset: u64,
    /// Data length in bytes.
    pub data_len: u64,
}

/// Reads and parses the header of an NPY file; checks the file holds exactly the data.
pub fn read_header(path: &Path) -> Result<NpyHeader> {
    open_header(path).map(|(_, h)| h)
}

/// Opens an NPY file as the input of one column named `column`.
pub(super) fn open_input(path: &Path, column: &str) -> Result<FileInput> {
    let (file, h) = open_header(path)?;
    Ok(FileInput {
        file,
        tensors: vec![InputTensor {
            name: column.to_string(),
            dtype: h.dtype,
            shape: h.shape,
            offset: h.data_offset,
            len: h.data_len,
        }],
        metadata: BTreeMap::new(),
    })
}

/// [`read_header`], keeping the file open for reading the data.
fn open_header(path: &Path) -> Result<(File, NpyHeader)> {
    let (mut f, file_len) = open_file(path, "NPY file")?;
    let mut pre = [0u8; 12];
    let n = (file_len.min(12)) as usize;
    f.read_exact(&mut pre[..n])
        .map_err(|e| Error::io(path, e))?;
    let (hlen, start) = header_extent(path, &pre[..n])?;
    if (start + hlen) as u64 > file_len {
        return Err(Error::format(
            path,
            WHAT,
            "header length runs past the end of the file",
        ));
    }
    // The header may end before the 12 bytes already read (version 1, length 0 or 1).
    let mut buf = vec![0u8; start + hlen];
    let k = n.min(buf.len());
    buf[..k].copy_from_slice(&pre[..k]);
    if buf.len() > n {
        f.read_exact(&mut buf[n..])
            .map_err(|e| Error::io(path, e))?;
    }
    let h = parse_header(path, &buf)?;
    // The data length comes from the shape: up to 2^64 - 1, so the sum is checked.
    let described = h.data_offset.checked_add(h.data_len);
    if described != Some(file_len) {
        return Err(Error::format(
            path,
            WHAT,
            format!(
                "file is {file_len} bytes, header describes {} (truncated or extra bytes)",
                described.map_or("more than 2^64".into(), |n| n.to_string())
            ),
        ));
    }
    Ok((f, h))
}

/// Header length and where the header text starts.
fn header_extent(path: &Path, b: &[u8]) -> Result<(usize, usize)> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err(Error::format(
            path,
            WHAT,
            "not an NPY file (no \\x93NUMPY magic)",
        ));
    }
    let (len, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => {
            return Err(Error::Unsupported {
                path: path.into(),
                what: "NPY version",
                found: v.to_string(),
                supported: "1, 2, 3".into(),
            });
        }
    };
    if len > MAX_NPY_HEADER {
        return Err(Error::format(
            path,
            WHAT,
            format!("header of {len} bytes exceeds the {MAX_NPY_HEADER}-byte limit"),
        ));
    }
    Ok((len, start))
}

/// Parses an NPY header from the file's first bytes (magic through the end of the header).
pub fn parse_header(path: &Path, bytes: &[u8]) -> Result<NpyHeader> {
    let (len, start) = header_extent(path, bytes)?;
    let text = bytes
        .get(start..start + len)
        .ok_or_else(|| Error::format(path, WHAT, "truncated header"))?;
    let text =
        std::str::from_utf8(text).map_err(|_| Error::format(path, WHAT, "header is not text"))?;
    let bad = |r: &str| Error::format(path, WHAT, r.to_string());
    let mut p = Lit {
        s: text.as_bytes(),
        i: 0,
    };
    p.expect(b'{').ok_or_else(|| bad("expected a dict"))?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    loop {
        p.ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string().ok_or_else(|| bad("expected a quoted key"))?;
        p.expect(b':').ok_or_else(|| bad("expected ':'"))?;
        p.ws();
        match key.as_str() {
            "descr" => {
                descr = Some(p.string().ok_or_else(|| {
                    bad("'descr' must be a string (structured dtypes are not supported)")
                })?)
            }
            "fortran_order" => {
                fortran = Some(
                    p.boolean()
                        .ok_or_else(|| bad("'fortran_order' must be True or False"))?,
                )
            }
            "shape" => {
                shape = Some(
                    p.tuple()
                        .ok_or_else(|| bad("'shape' must be a tuple of integers"))?,
                )
            }
            k => return Err(bad(&format!("unexpected key '{k}'"))),
        }
        p.ws();
        if !p.eat(b',') {
            p.expect(b'}').ok_or_else(|| bad("expected ',' or '}'"))?;
            break;
        }
    }
    let descr = descr.ok_or_else(|| bad("missing 'descr'"))?;
    if fortran.ok_or_else(|| bad("missing 'fortran_order'"))? {
        return Err(bad(
            "Fortran-order arrays are not supported: save with np.ascontiguousarray first",
        ));
    }
    let shape = shape.ok_or_else(|| bad("missing 'shape'"))?;
    if shape.len() > MAX_RANK {
        return Err(bad(&format!(
            "'shape' has {} entries: more than {MAX_RANK} dimensions (NumPy's limit, and the format's)",
            shape.len()
        )));
    }
    let dtype = match descr.as_str() {
        "<f8" => Dtype::F64,
        "<f4" => Dtype::F32,
        "<f2" => Dtype::F16,
        "<i8" => Dtype::I64,
        "<i4" => Dtype::I32,
        "<i2" => Dtype::I16,
        "|i1" | "<i1" => Dtype::I8,
        "<u8" => Dtype::U64,
        "<u4" => Dtype::U32,
        "<u2" => Dtype::U16,
        "|u1" | "<u1" => Dtype::U8,
        "|b1" => Dtype::BOOL,
        d if d.starts_with('>') => {
            return Err(bad(&format!(
                "big-endian dtype '{d}' is not supported: convert with .astype('<...')"
            )));
        }
        d => {
            return Err(Error::Unsupported {
                path: path.into(),
                what: "NPY dtype",
                found: d.into(),
                supported: "little-endian f2/f4/f8, i1-i8, u1-u8 and b1".into(),
            });
        }
    };
    let data_len = tensor_bytes(dtype, &shape).ok_or_else(|| bad("shape overflows"))?;
    Ok(NpyHeader {
        dtype,
        shape,
        data_offset: (start + len) as u64,
        data_len,
    })
}

/// A tiny reader for the Python literal in an NPY header.
struct Lit<'a> {
    s: &'a [u8],
    i: usize,
}

impl Lit<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: u8) -> Option<()> {
        self.eat(c).then_some(())
    }
    fn string(&mut self) -> Option<String> {
        self.ws();
        let q = *self.s.get(self.i)?;
        if q != b'\'' && q != b'"' {
            return None;
        }
        let rest = &self.s[self.i + 1..];
        let end = rest.iter().position(|&c| c == q)?;
        self.i += end + 2;
        String::from_utf8(rest[..end].to_vec()).ok()
    }
    fn boolean(&mut self) -> Option<bool> {
        for (word, v) in [(&b"True"[..], true), (&b"False"[..], false)] {
            if self.s[self.i..].starts_with(word) {
                self.i += word.len();
                return Some(v);
            }
        }
        None
    }
    fn tuple(&mut self) -> Option<Vec<u64>> {
        self.expect(b'(')?;
        let mut out = Vec::new();
        loop {
            if self.eat(b')') {
                return Some(out);
            }
            self.ws();
            let start = self.i;
            while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                self.i += 1;
            }
            if start == self.i {
                return None;
            }
            out.push(
                std::str::from_utf8(&self.s[start..self.i])
                    .ok()?
                    .parse()
                    .ok()?,
            );
            if !self.eat(b',') {
                self.expect(b')')?;
                return Some(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(dict: &str) -> Vec<u8> {
        let mut h = dict.to_string();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        let mut v = b"\x93NUMPY\x01\x00".to_vec();
        v.extend_from_slice(&(h.len() as u16).to_le_bytes());
        v.extend_from_slice(h.as_bytes());
        v
    }

    #[test]
    fn parses_numpy_headers() {
        let p = Path::new("x.npy");
        let bytes = npy("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }");
        let h = parse_header(p, &bytes).unwrap();
        assert_eq!(
            (h.dtype, h.shape.clone(), h.data_len),
            (Dtype::F32, vec![3, 4], 48)
        );
        assert_eq!(
            h.data_offset,
            bytes.len() as u64,
            "data starts right after the padded header"
        );
        let h = parse_header(
            p,
            &npy("{'descr': '|b1', 'fortran_order': False, 'shape': (5,), }"),
        )
        .unwrap();
        assert_eq!((h.dtype, h.shape), (Dtype::BOOL, vec![5]));
        let h = parse_header(
            p,
            &npy("{'descr': '<i8', 'fortran_order': False, 'shape': (), }"),
        )
        .unwrap();
        assert!(h.shape.is_empty());
    }

    #[test]
    fn rejects_fortran_big_endian_and_garbage() {
        let p = Path::new("x.npy");
        let e = parse_header(
            p,
            &npy("{'descr': '<f4', 'fortran_order': True, 'shape': (3, 4), }"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("Fortran"), "{e}");
        let e = parse_header(
            p,
            &npy("{'descr': '>f4', 'fortran_order': False, 'shape': (3,), }"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("big-endian"), "{e}");
        assert!(
            parse_header(
                p,
                &npy("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (3,), }")
            )
            .is_err()
        );
        assert!(parse_header(p, b"\x93NUMPY\x01\x00\xff\xff{").is_err());
        assert!(parse_header(p, b"garbage").is_err());
    }
}
