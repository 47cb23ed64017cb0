//! The safetensors input reader: parses a plaintext `.safetensors` file's header (bounded) into
//! tensors at byte ranges of the file. The data is streamed by the converter.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::Path;

use super::{FileInput, FileTensor, open_file};
use crate::error::{Error, Result};
use crate::format::{Dtype, MAX_HEADER_LEN, read_at, tensor_bytes};

const WHAT: &str = "safetensors header";

/// Opens a plaintext safetensors file and parses its header (bounded by the file and
/// [`MAX_HEADER_LEN`]); checks that the tensors lie inside the data section, match their dtype
/// and shape, and do not overlap. Tensors come sorted by offset; there is at least one.
pub(super) fn open_input(path: &Path) -> Result<FileInput> {
    let (file, file_len) = open_file(path, "safetensors input")?;
    if file_len < 8 {
        return Err(Error::format(
            path,
            WHAT,
            format!("truncated: {file_len} bytes"),
        ));
    }
    let mut b = [0u8; 8];
    read_at(&file, path, 0, &mut b)?;
    let n = u64::from_le_bytes(b);
    if n > MAX_HEADER_LEN || n > file_len - 8 {
        return Err(Error::format(
            path,
            WHAT,
            format!(
                "header length {n} exceeds the file ({file_len} bytes) or the {MAX_HEADER_LEN}-byte limit"
            ),
        ));
    }
    let mut h = vec![0u8; n as usize];
    read_at(&file, path, 8, &mut h)?;
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&h)
        .map_err(|e| Error::format(path, WHAT, format!("invalid JSON: {e}")))?;
    let data_len = file_len - 8 - n;
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::new();
    for (name, entry) in v {
        if name == "__metadata__" {
            let m: BTreeMap<String, String> = serde_json::from_value(entry).map_err(|_| {
                Error::format(path, WHAT, "__metadata__ must map strings to strings")
            })?;
            metadata = m;
            continue;
        }
        #[derive(serde::Deserialize)]
        struct Entry {
            dtype: String,
            shape: Vec<u64>,
            data_offsets: [u64; 2],
        }
        let e: Entry = serde_json::from_value(entry)
            .map_err(|e| Error::format(path, WHAT, format!("tensor '{name}': {e}")))?;
        let dtype: Dtype = e.dtype.parse().map_err(|_| Error::Unsupported {
            path: path.into(),
            what: "dtype",
            found: e.dtype.clone(),
            supported: "the safetensors dtypes".into(),
        })?;
        let [b, end] = e.data_offsets;
        if end < b || end > data_len || tensor_bytes(dtype, &e.shape) != Some(end - b) {
            return Err(Error::format(
                path,
                WHAT,
                format!(
                    "tensor '{name}': data_offsets [{b}, {end}] are out of range or do not match dtype {dtype} and shape {:?}",
                    e.shape
                ),
            ));
        }
        tensors.push(FileTensor {
            name,
            dtype,
            shape: e.shape,
            offset: 8 + n + b,
            len: end - b,
        });
    }
    tensors.sort_by_key(|t| (t.offset, t.len));
    for w in tensors.windows(2) {
        if w[1].offset < w[0].offset + w[0].len {
            return Err(Error::format(
                path,
                WHAT,
                format!("tensors '{}' and '{}' overlap", w[0].name, w[1].name),
            ));
        }
    }
    if tensors.is_empty() {
        return Err(Error::format(path, WHAT, "no tensors"));
    }
    Ok(FileInput {
        file,
        tensors,
        metadata,
    })
}
