//! The safetensors input reader: parses a plaintext `.safetensors` file's header (bounded) into
//! tensors at byte ranges of the file. The data is streamed by the converter.
//!
//! The header (up to [`MAX_HEADER_LEN`] bytes of JSON, read whole) is read straight into typed
//! entries with the caps of the dataset's own files (docs/FORMAT.md section 9): at most
//! [`MAX_TENSORS`] tensors, shapes of at most [`MAX_RANK`] dimensions, a `__metadata__` of at
//! most [`MAX_METADATA_ENTRIES`] strings. No generic JSON tree is built, so memory follows what
//! the header may hold (names, shapes, offsets; about 3.5 x its length at worst, measured by
//! tests/parse_memory.rs), not how it is nested. Fields of a tensor entry other than `dtype`,
//! `shape` and `data_offsets` are skipped without being built, as the safetensors crate does.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::Path;

use serde::de::{DeserializeSeed, Deserializer, Error as _, IgnoredAny, MapAccess, Visitor};

use super::{FileInput, InputTensor, open_file};
use crate::error::{Error, Result};
use crate::format::json::{self, DtypeName, Field, List, Pair, StrMap, Text};
use crate::format::{
    MAX_HEADER_LEN, MAX_METADATA_ENTRIES, MAX_RANK, MIN_HEADER_BYTES_PER_TENSOR, read_at,
    tensor_bytes,
};

/// Most tensors an input may hold: more could not be listed in one shard header (each takes
/// at least [`MIN_HEADER_BYTES_PER_TENSOR`] bytes of it), so they are refused while reading.
const MAX_INPUT_TENSORS: usize = (MAX_HEADER_LEN / MIN_HEADER_BYTES_PER_TENSOR) as usize;

const WHAT: &str = "safetensors header";

/// What a plaintext safetensors file's header holds, checked against the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputHeader {
    /// The tensors, sorted by offset in the file (then by name); at least one, names unique,
    /// each inside the data section and of the size its dtype and shape give, none overlapping.
    pub tensors: Vec<InputTensor>,
    /// The file's `__metadata__` (empty if it has none).
    pub metadata: BTreeMap<String, String>,
}

/// Opens a plaintext safetensors file and parses its header ([`parse_header`]).
pub(super) fn open_input(path: &Path) -> Result<FileInput> {
    let (file, file_len) = open_file(path, "safetensors input")?;
    let mut first = [0u8; 8];
    if file_len < 8 {
        return Err(truncated(path, file_len));
    }
    read_at(&file, path, 0, &mut first)?;
    let n = header_len(path, &first, file_len)?;
    // At most MAX_HEADER_LEN + 8 bytes, and no more than the file holds.
    let mut prefix = vec![0u8; 8 + n as usize];
    prefix[..8].copy_from_slice(&first);
    read_at(&file, path, 8, &mut prefix[8..])?;
    let h = parse_header(path, &prefix, file_len)?;
    Ok(FileInput {
        file,
        tensors: h.tensors,
        metadata: h.metadata,
    })
}

fn truncated(path: &Path, file_len: u64) -> Error {
    Error::format(path, WHAT, format!("truncated: {file_len} bytes"))
}

/// The header length `N` from the file's first 8 bytes, checked against the file's length and
/// [`MAX_HEADER_LEN`].
fn header_len(path: &Path, first: &[u8; 8], file_len: u64) -> Result<u64> {
    let n = u64::from_le_bytes(*first);
    if n > MAX_HEADER_LEN || n > file_len.saturating_sub(8) {
        return Err(Error::format(
            path,
            WHAT,
            format!(
                "header length {n} exceeds the file ({file_len} bytes) or the {MAX_HEADER_LEN}-byte limit"
            ),
        ));
    }
    Ok(n)
}

/// Parses the header of a plaintext safetensors file from its first bytes (`prefix`: the
/// 8-byte length `N` and at least the `N` header bytes; the whole file will do) given the
/// file's full length, and checks the tensors against the data section. Pure: no I/O, every
/// failure an [`Error`] naming `path` and the cause.
pub fn parse_header(path: &Path, prefix: &[u8], file_len: u64) -> Result<InputHeader> {
    if file_len < 8 {
        return Err(truncated(path, file_len));
    }
    let first: &[u8; 8] = prefix
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::format(path, WHAT, "fewer than 8 bytes given"))?;
    let n = header_len(path, first, file_len)?;
    let raw = prefix.get(8..8 + n as usize).ok_or_else(|| {
        Error::format(
            path,
            WHAT,
            "fewer header bytes given than the header length",
        )
    })?;
    let data_start = 8 + n;
    let mut read = Reading {
        path,
        data_start,
        // n <= file_len - 8 (header_len).
        data_len: file_len - data_start,
        tensors: Vec::new(),
        metadata: None,
        current: None,
        failed: None,
    };
    let parsed = json::parse(path, WHAT, raw, &mut read);
    if let Some(e) = read.failed {
        return Err(e);
    }
    parsed.map_err(|e| match (e, &read.current) {
        // A type error inside a tensor entry: say which tensor (serde names only the field).
        (Error::Format { path, what, reason }, Some(name))
            if !reason.starts_with("invalid JSON") =>
        {
            let reason = format!("tensor '{}': {reason}", json::quote(name));
            Error::Format { path, what, reason }
        }
        (e, _) => e,
    })?;
    let mut tensors = read.tensors;
    if tensors.is_empty() {
        return Err(Error::format(path, WHAT, "no tensors"));
    }
    // A JSON object may repeat a key; a file whose tensor names repeat is ambiguous.
    if let Some(name) = json::first_repeat(tensors.iter().map(|t| t.name.as_str())) {
        return Err(Error::format(
            path,
            WHAT,
            format!("tensor '{}' is listed twice", json::quote(name)),
        ));
    }
    // Names are unique, so the order is total (and needs no scratch buffer); ties in offset
    // (empty tensors) are broken by name, as they always were.
    tensors.sort_unstable_by(|a, b| (a.offset, a.len, &a.name).cmp(&(b.offset, b.len, &b.name)));
    for w in tensors.windows(2) {
        if w[1].offset < w[0].offset + w[0].len {
            return Err(Error::format(
                path,
                WHAT,
                format!(
                    "tensors '{}' and '{}' overlap",
                    json::quote(&w[0].name),
                    json::quote(&w[1].name)
                ),
            ));
        }
    }
    Ok(InputHeader {
        tensors,
        metadata: read.metadata.unwrap_or_default(),
    })
}

/// The header object while it is read: each tensor entry checked against the data section as
/// it is read and kept as an [`InputTensor`] (nothing else is built), `__metadata__` at most
/// once, the name of the entry being read (for type errors) and the first error that is not
/// serde's own (to return as it is).
struct Reading<'a> {
    path: &'a Path,
    data_start: u64,
    data_len: u64,
    tensors: Vec<InputTensor>,
    metadata: Option<BTreeMap<String, String>>,
    current: Option<String>,
    failed: Option<Error>,
}

impl Reading<'_> {
    /// Checks an entry against the data section.
    fn tensor(&self, name: String, (dtype, shape, [b, end]): EntryValue) -> Result<InputTensor> {
        let dtype = dtype.get(self.path)?;
        if end < b || end > self.data_len || tensor_bytes(dtype, &shape) != Some(end - b) {
            return Err(Error::format(
                self.path,
                WHAT,
                format!(
                    "tensor '{}': data_offsets [{b}, {end}] are out of range or do not match dtype {dtype} and shape {shape:?}",
                    json::quote(&name),
                ),
            ));
        }
        Ok(InputTensor {
            name,
            dtype,
            shape: shape.into_vec(),
            // end <= data_len = file length - data_start: no overflow.
            offset: self.data_start + b,
            len: end - b,
        })
    }
}

impl<'de> Visitor<'de> for &mut Reading<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a safetensors header (a JSON object)")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        while let Some(key) = map.next_key_seed(Field::<Text<'de>>::new("tensor name"))? {
            if key == "__metadata__" {
                if self.metadata.is_some() {
                    return Err(A::Error::duplicate_field("__metadata__"));
                }
                let m: StrMap<MAX_METADATA_ENTRIES> =
                    map.next_value_seed(Field::new("__metadata__"))?;
                self.metadata = Some(m.0);
                continue;
            }
            if self.tensors.len() == MAX_INPUT_TENSORS {
                return Err(A::Error::custom(format_args!(
                    "more than {MAX_INPUT_TENSORS} tensors, more than a shard header can list \
                     under the {MAX_HEADER_LEN}-byte limit readers accept: split the input"
                )));
            }
            // Grown by hand so the list never holds room past the cap (doubling 2^19 entries
            // would reserve 2^20: a third of this input's memory, for nothing).
            if self.tensors.len() == self.tensors.capacity() {
                let more = self.tensors.len().max(64);
                self.tensors
                    .reserve_exact(more.min(MAX_INPUT_TENSORS - self.tensors.len()));
            }
            self.current = Some(key.into_owned());
            let entry = map.next_value_seed(EntrySeed)?;
            let name = self.current.take().unwrap_or_default();
            match self.tensor(name, entry) {
                Ok(t) => self.tensors.push(t),
                Err(e) => {
                    // Returned as it is by parse_header; this only stops the parser.
                    self.failed = Some(e);
                    return Err(A::Error::custom("bad tensor entry"));
                }
            }
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for &mut Reading<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

/// One tensor entry: `dtype`, `shape` (at most [`MAX_RANK`] dimensions) and `data_offsets`,
/// each exactly once; other fields are skipped unread.
struct EntrySeed;

type EntryValue = (DtypeName, Box<[u64]>, [u64; 2]);

impl<'de> DeserializeSeed<'de> for EntrySeed {
    type Value = EntryValue;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<EntryValue, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EntrySeed {
    type Value = EntryValue;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a tensor entry (an object of dtype, shape and data_offsets)")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<EntryValue, A::Error> {
        const FIELDS: [&str; 3] = ["dtype", "shape", "data_offsets"];
        let mut dtype: Option<DtypeName> = None;
        let mut shape: Option<List<u64, MAX_RANK>> = None;
        let mut offsets: Option<Pair> = None;
        while let Some(k) = map.next_key_seed(json::Which(&FIELDS))? {
            match k {
                Some(0) if dtype.is_none() => {
                    dtype = Some(map.next_value_seed(Field::new("dtype"))?)
                }
                Some(1) if shape.is_none() => {
                    shape = Some(map.next_value_seed(Field::new("shape"))?)
                }
                Some(2) if offsets.is_none() => {
                    offsets = Some(map.next_value_seed(Field::new("data_offsets"))?)
                }
                Some(i) => return Err(A::Error::duplicate_field(FIELDS[i])),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok((
            dtype.ok_or_else(|| A::Error::missing_field("dtype"))?,
            shape.ok_or_else(|| A::Error::missing_field("shape"))?.0,
            offsets
                .ok_or_else(|| A::Error::missing_field("data_offsets"))?
                .0,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "in.safetensors";

    /// A file of `header` (padded to 8 bytes, as writers do) over `data` bytes.
    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut h = header.to_string();
        while !h.len().is_multiple_of(8) {
            h.push(' ');
        }
        let mut v = (h.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(h.as_bytes());
        v.resize(v.len() + data, 0);
        v
    }

    fn parse(header: &str, data: usize) -> Result<InputHeader> {
        let f = file(header, data);
        parse_header(Path::new(P), &f, f.len() as u64)
    }

    #[track_caller]
    fn refused(header: &str, data: usize, cause: &str) {
        let e = parse(header, data).unwrap_err().to_string();
        assert!(e.contains(P) && e.contains(cause), "{header:.200}: {e}");
    }

    /// What the safetensors crate writes (alignment padding, `__metadata__` first, tensors
    /// sorted by dtype then name) parses to the same tensors it reads back.
    #[test]
    fn reads_what_the_safetensors_crate_writes() {
        use ::safetensors::tensor::TensorView;
        let a: Vec<u8> = (0..24).collect();
        let b: Vec<u8> = (0..6).collect();
        let views = [
            (
                "a.weight",
                TensorView::new(::safetensors::Dtype::F32, vec![2, 3], &a).unwrap(),
            ),
            (
                "b",
                TensorView::new(::safetensors::Dtype::U8, vec![6], &b).unwrap(),
            ),
            (
                "empty",
                TensorView::new(::safetensors::Dtype::I64, vec![0, 4], &[]).unwrap(),
            ),
        ];
        let meta = std::collections::HashMap::from([("k".to_string(), "v \"q\"".to_string())]);
        let bytes = ::safetensors::serialize(views, Some(meta)).unwrap();
        let h = parse_header(Path::new(P), &bytes, bytes.len() as u64).unwrap();
        let st = ::safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let data_start = bytes.len()
            - st.tensors()
                .iter()
                .map(|(_, v)| v.data().len())
                .sum::<usize>();
        assert_eq!(h.tensors.len(), 3);
        for t in &h.tensors {
            let v = st.tensor(&t.name).unwrap();
            let shape: Vec<u64> = v.shape().iter().map(|&d| d as u64).collect();
            assert_eq!(
                (t.dtype.as_str(), &t.shape),
                (&*format!("{:?}", v.dtype()), &shape)
            );
            let at = t.offset as usize;
            assert!(at >= data_start);
            assert_eq!(&bytes[at..at + t.len as usize], v.data(), "{}", t.name);
        }
        assert_eq!(h.metadata["k"], "v \"q\"");
        // Sorted by offset, ties (the empty tensor) by name.
        assert!(h.tensors.windows(2).all(|w| {
            (w[0].offset, w[0].len, &w[0].name) < (w[1].offset, w[1].len, &w[1].name)
        }));
    }

    #[test]
    fn caps_shapes_and_metadata_like_the_dataset_files() {
        let rank = |r: usize| {
            format!(
                r#"{{"t":{{"dtype":"U8","shape":[{}],"data_offsets":[0,1]}}}}"#,
                vec!["1"; r].join(",")
            )
        };
        assert_eq!(
            parse(&rank(MAX_RANK), 1).unwrap().tensors[0].shape.len(),
            64
        );
        refused(
            &rank(MAX_RANK + 1),
            1,
            "tensor 't': `shape` holds more than 64 entries",
        );
        let meta = |n: usize| {
            let entries: Vec<String> = (0..n).map(|i| format!(r#""{i}":"""#)).collect();
            format!(
                r#"{{"__metadata__":{{{}}},"t":{{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}}}"#,
                entries.join(",")
            )
        };
        assert_eq!(
            parse(&meta(MAX_METADATA_ENTRIES), 1)
                .unwrap()
                .metadata
                .len(),
            65_536
        );
        refused(
            &meta(MAX_METADATA_ENTRIES + 1),
            1,
            "`__metadata__` holds more than 65536 entries",
        );
    }

    #[test]
    fn refuses_malformed_headers_naming_file_and_cause() {
        let t = r#""t":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}"#;
        for (header, cause) in [
            (r#"{"__metadata__":{"k":1},"t":{}}"#.to_string(), "`__metadata__` to be a string"),
            (r#"{"__metadata__":null}"#.into(), "`__metadata__` to be an object of strings"),
            (r#"{"__metadata__":{"k":{"x":"y"}}}"#.into(), "`__metadata__` to be a string"),
            (format!(r#"{{"__metadata__":{{}},"__metadata__":{{}},{t}}}"#), "duplicate field `__metadata__`"),
            (format!(r#"{{{t},{t}}}"#), "tensor 't' is listed twice"),
            (r#"{"t":{"dtype":"U8","shape":[2]}}"#.into(), "tensor 't': missing field `data_offsets`"),
            (r#"{"t":{"dtype":"U8","shape":"2","data_offsets":[0,2]}}"#.into(), "tensor 't': invalid type: string \"2\", expected `shape` to be an array"),
            (r#"{"t":{"dtype":"U8","shape":[-2],"data_offsets":[0,2]}}"#.into(), "tensor 't': invalid type: integer `-2`, expected `shape` to be a non-negative integer"),
            (r#"{"t":{"dtype":"U8","shape":[2],"data_offsets":[0,2,4]}}"#.into(), "tensor 't': invalid length 3"),
            (r#"{"t":{"dtype":"U8","dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#.into(), "duplicate field `dtype`"),
            (r#"{"t":[]}"#.into(), "tensor 't': invalid type: sequence, expected a tensor entry"),
            (r#"{"t":{"dtype":"Q7","shape":[2],"data_offsets":[0,2]}}"#.into(), "unsupported dtype 'Q7'"),
            (r#"{"t":{"dtype":"U8","shape":[3],"data_offsets":[0,2]}}"#.into(), "tensor 't': data_offsets [0, 2] are out of range or do not match"),
            (r#"{"t":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}"#.into(), "out of range"),
            (r#"{"t":{"dtype":"U8","shape":[0],"data_offsets":[2,1]}}"#.into(), "out of range"),
            (r#"{"t":{"dtype":"U8","shape":[4611686018427387904,4],"data_offsets":[0,0]}}"#.into(), "do not match"),
            (r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#.into(), "tensors 'a' and 'b' overlap"),
            (r#"{"__metadata__":{}}"#.into(), "no tensors"),
            ("{}".into(), "no tensors"),
            ("[]".into(), "expected a safetensors header"),
            (r#"{"t":{"dtype":"U8","#.into(), "invalid JSON"),
            (format!("{{{t}}} x"), "invalid JSON: trailing characters"),
        ] {
            refused(&header, 2, cause);
        }
        // A tensor's name in an error is cut short, and so is a wrong-typed string.
        let long = "n".repeat(10_000);
        let e = parse(
            &format!(r#"{{"{long}":{{"dtype":"U8","shape":[3],"data_offsets":[0,2]}}}}"#),
            2,
        )
        .unwrap_err()
        .to_string();
        assert!(e.len() < 500 && e.contains("tensor 'nnn"), "{e}");
        let e = parse(
            &format!(r#"{{"t":{{"dtype":"U8","shape":"{long}","data_offsets":[0,2]}}}}"#),
            2,
        )
        .unwrap_err()
        .to_string();
        assert!(e.len() < 600, "{e}");
    }

    #[test]
    fn skips_unknown_entry_fields_unbuilt() {
        // As the safetensors crate does; deep nesting there costs nothing.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let h = parse(
            &format!(r#"{{"t":{{"x":{deep},"dtype":"U8","shape":[2],"data_offsets":[0,2],"y":{{"z":1}}}}}}"#),
            2,
        )
        .unwrap();
        assert_eq!(h.tensors[0].shape, [2]);
    }

    #[test]
    fn header_length_is_checked_against_the_bytes_and_the_file() {
        let p = Path::new(P);
        let f = file(
            r#"{"t":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#,
            2,
        );
        parse_header(p, &f, f.len() as u64).unwrap();
        for (bytes, len, cause) in [
            (&f[..5], 5, "truncated: 5 bytes"),
            (&f[..5], 100, "fewer than 8 bytes given"),
            (&f[..20], f.len() as u64, "fewer header bytes given"),
            (&f[..], 20, "exceeds the file (20 bytes)"),
            (&f[..], 7, "truncated: 7 bytes"),
        ] {
            let e = parse_header(p, bytes, len).unwrap_err().to_string();
            assert!(e.contains(P) && e.contains(cause), "{e}");
        }
        let mut huge = f.clone();
        huge[..8].copy_from_slice(&(MAX_HEADER_LEN + 1).to_le_bytes());
        let e = parse_header(p, &huge, u64::MAX).unwrap_err().to_string();
        assert!(e.contains("100000000-byte limit"), "{e}");
        // Data past the last tensor is allowed (as it always was), and the offsets are
        // absolute in the file.
        let f2 = file(
            r#"{"t":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#,
            5,
        );
        let h = parse_header(p, &f2, f2.len() as u64).unwrap();
        assert_eq!(
            (h.tensors[0].offset, h.tensors[0].len),
            (f2.len() as u64 - 5 + 1, 2)
        );
    }
}
