//! Shard files: the safetensors header, the ciphershard descriptor, tags and chunk addressing.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    CIPHER_NAME, Dtype, FORMAT_VERSION, MAX_CHUNK_SIZE, MAX_CHUNKS_PER_SHARD, MAX_HEADER_LEN,
    tensor_bytes,
};
use crate::cipher::{ChunkOpener, ChunkParams, NONCE_LEN, OpenError, TAG_LEN};
use crate::error::{ChunkLocation, Error, Result};
use crate::store::{LocalStore, ShardStore};

/// Length of a chunk's associated data.
pub const AAD_LEN: usize = 89;
/// Nonce of the header tag: all-FF, which no chunk nonce (`0000_0000 || u64 g`, g < 2^32) has.
pub const HEADER_TAG_NONCE: [u8; NONCE_LEN] = [0xFF; NONCE_LEN];
const AAD_MAGIC: &[u8; 8] = b"CSHARD01";
const WHAT_HEADER: &str = "shard header";
const WHAT_DESC: &str = "descriptor (__metadata__.ciphershard)";

/// One tensor of a shard, as its descriptor lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorDesc {
    /// Tensor name (the safetensors key).
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<u64>,
    /// `[begin, end)` byte offsets relative to the data section.
    pub offsets: (u64, u64),
    /// Ciphertext (`true`) or authenticated plaintext (`false`).
    pub encrypted: bool,
    /// Global index of the tensor's first chunk in the shard.
    pub first_chunk: u64,
    /// Number of chunks (`max(1, ceil(len / chunk_size))`).
    pub chunks: u64,
}

impl TensorDesc {
    /// Byte length of the tensor.
    pub fn len(&self) -> u64 {
        self.offsets.1 - self.offsets.0
    }
    /// Whether the tensor holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The authenticated description of a shard (`__metadata__["ciphershard"]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// Format version (1).
    pub version: u32,
    /// Random id shared by every shard of a dataset.
    pub dataset_id: [u8; 16],
    /// Position of this shard in the dataset.
    pub shard_index: u32,
    /// Number of shards in the dataset.
    pub shard_count: u32,
    /// Global index of the shard's first row (0 for a `tensors` dataset).
    pub row_start: u64,
    /// Rows in this shard (0 for a `tensors` dataset).
    pub rows: u64,
    /// Bytes per chunk.
    pub chunk_size: u64,
    /// Tensors in offset order.
    pub tensors: Vec<TensorDesc>,
    /// The user's metadata.
    pub metadata: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorJson {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    offsets: [u64; 2],
    encrypted: bool,
    first_chunk: u64,
    chunks: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DescriptorJson {
    format: String,
    version: u32,
    cipher: String,
    dataset_id: String,
    shard_index: u32,
    shard_count: u32,
    row_start: u64,
    rows: u64,
    chunk_size: u64,
    tensors: Vec<TensorJson>,
    metadata: BTreeMap<String, String>,
}

/// Checks the `format`, `version` and `cipher` fields before anything else, so that a future
/// version gets "unsupported version" rather than a schema error.
pub(crate) fn check_format_version(
    path: &Path,
    what: &'static str,
    v: &serde_json::Value,
    format: &str,
) -> Result<()> {
    let obj = v
        .as_object()
        .ok_or_else(|| Error::format(path, what, "not a JSON object"))?;
    match obj.get("format").and_then(|f| f.as_str()) {
        Some(f) if f == format => {}
        Some(f) => {
            return Err(Error::format(
                path,
                what,
                format!("format is '{f}', expected '{format}'"),
            ));
        }
        None => return Err(Error::format(path, what, "missing string field 'format'")),
    }
    match obj.get("version") {
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(FORMAT_VERSION as u64) => Ok(()),
        Some(other) => Err(Error::Unsupported {
            path: path.into(),
            what: "format version",
            found: other.to_string(),
            supported: FORMAT_VERSION.to_string(),
        }),
        None => Err(Error::format(path, what, "missing field 'version'")),
    }
}

/// JSON types a field may be required to have.
#[derive(Clone, Copy)]
pub(crate) enum J {
    Str,
    Uint,
    Bool,
    Arr,
    Obj,
}

/// Checks that `v` (an object) has each field with the right JSON type, so that a schema error
/// names the field (serde's own type errors do not).
pub(crate) fn check_fields(
    path: &Path,
    what: &'static str,
    ctx: &str,
    v: &serde_json::Value,
    fields: &[(&str, J)],
) -> Result<()> {
    let obj = v
        .as_object()
        .ok_or_else(|| Error::format(path, what, format!("{ctx}not a JSON object")))?;
    for &(name, kind) in fields {
        let f = obj
            .get(name)
            .ok_or_else(|| Error::format(path, what, format!("{ctx}missing field `{name}`")))?;
        let (ok, want) = match kind {
            J::Str => (f.is_string(), "a string"),
            J::Uint => (f.is_u64(), "a non-negative integer"),
            J::Bool => (f.is_boolean(), "true or false"),
            J::Arr => (f.is_array(), "an array"),
            J::Obj => (f.is_object(), "an object"),
        };
        if !ok {
            return Err(Error::format(
                path,
                what,
                format!("{ctx}field `{name}` must be {want}, found {f}"),
            ));
        }
    }
    if let Some(k) = obj.keys().find(|k| !fields.iter().any(|(n, _)| n == k)) {
        return Err(Error::format(
            path,
            what,
            format!("{ctx}unknown field `{k}`"),
        ));
    }
    Ok(())
}

pub(crate) fn parse_hex<const N: usize>(
    path: &Path,
    what: &'static str,
    field: &str,
    s: &str,
) -> Result<[u8; N]> {
    let mut out = [0u8; N];
    if s.len() != 2 * N
        || s.bytes().any(|b| b.is_ascii_uppercase())
        || hex::decode_to_slice(s, &mut out).is_err()
    {
        return Err(Error::format(
            path,
            what,
            format!("'{field}' must be {} lower-case hex digits", 2 * N),
        ));
    }
    Ok(out)
}

impl Descriptor {
    /// Total number of chunks in the shard.
    pub fn total_chunks(&self) -> u64 {
        self.tensors.last().map_or(0, |t| t.first_chunk + t.chunks)
    }

    /// Length of the data section.
    pub fn data_len(&self) -> u64 {
        self.tensors.last().map_or(0, |t| t.offsets.1)
    }

    /// The canonical JSON encoding (keys in spec order, compact): the exact bytes stored and
    /// digested.
    pub fn to_json(&self) -> String {
        let j = DescriptorJson {
            format: "ciphershard".into(),
            version: self.version,
            cipher: CIPHER_NAME.into(),
            dataset_id: hex::encode(self.dataset_id),
            shard_index: self.shard_index,
            shard_count: self.shard_count,
            row_start: self.row_start,
            rows: self.rows,
            chunk_size: self.chunk_size,
            tensors: self
                .tensors
                .iter()
                .map(|t| TensorJson {
                    name: t.name.clone(),
                    dtype: t.dtype.as_str().into(),
                    shape: t.shape.clone(),
                    offsets: [t.offsets.0, t.offsets.1],
                    encrypted: t.encrypted,
                    first_chunk: t.first_chunk,
                    chunks: t.chunks,
                })
                .collect(),
            metadata: self.metadata.clone(),
        };
        serde_json::to_string(&j).expect("descriptor serializes")
    }

    /// Parses and validates a descriptor string; it must be in canonical form.
    pub fn parse(path: &Path, s: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(s)
            .map_err(|e| Error::format(path, WHAT_DESC, format!("invalid JSON: {e}")))?;
        check_format_version(path, WHAT_DESC, &v, "ciphershard")?;
        if let Some(c) = v.get("cipher").and_then(|c| c.as_str())
            && c != CIPHER_NAME
        {
            return Err(Error::Unsupported {
                path: path.into(),
                what: "cipher",
                found: c.into(),
                supported: CIPHER_NAME.into(),
            });
        }
        use J::*;
        check_fields(
            path,
            WHAT_DESC,
            "",
            &v,
            &[
                ("format", Str),
                ("version", Uint),
                ("cipher", Str),
                ("dataset_id", Str),
                ("shard_index", Uint),
                ("shard_count", Uint),
                ("row_start", Uint),
                ("rows", Uint),
                ("chunk_size", Uint),
                ("tensors", Arr),
                ("metadata", Obj),
            ],
        )?;
        for (i, t) in v["tensors"].as_array().into_iter().flatten().enumerate() {
            check_fields(
                path,
                WHAT_DESC,
                &format!("tensors[{i}]: "),
                t,
                &[
                    ("name", Str),
                    ("dtype", Str),
                    ("shape", Arr),
                    ("offsets", Arr),
                    ("encrypted", Bool),
                    ("first_chunk", Uint),
                    ("chunks", Uint),
                ],
            )?;
        }
        let j: DescriptorJson =
            serde_json::from_value(v).map_err(|e| Error::format(path, WHAT_DESC, e.to_string()))?;
        let bad = |reason: String| Error::format(path, WHAT_DESC, reason);
        let dataset_id = parse_hex::<16>(path, WHAT_DESC, "dataset_id", &j.dataset_id)?;
        if j.shard_count == 0 || j.shard_index >= j.shard_count {
            return Err(bad(format!(
                "shard_index {} is not below shard_count {}",
                j.shard_index, j.shard_count
            )));
        }
        if j.chunk_size < 64 || !j.chunk_size.is_multiple_of(64) || j.chunk_size > MAX_CHUNK_SIZE {
            return Err(bad(format!(
                "chunk_size {} must be a multiple of 64 between 64 and {MAX_CHUNK_SIZE}",
                j.chunk_size
            )));
        }
        if j.tensors.is_empty() {
            return Err(bad("a shard must hold at least one tensor".into()));
        }
        let mut tensors = Vec::with_capacity(j.tensors.len());
        let mut names = std::collections::HashSet::new();
        let (mut end, mut next_chunk) = (0u64, 0u64);
        for t in j.tensors {
            if t.name.is_empty() || t.name == "__metadata__" || !names.insert(t.name.clone()) {
                return Err(bad(format!(
                    "tensor name '{}' is empty, reserved or repeated",
                    t.name
                )));
            }
            let dtype: Dtype = t.dtype.parse().map_err(|_| Error::Unsupported {
                path: path.into(),
                what: "dtype",
                found: t.dtype.clone(),
                supported: "the safetensors dtypes".into(),
            })?;
            let [b, e] = t.offsets;
            if b != end || e < b {
                return Err(bad(format!(
                    "tensor '{}': offsets [{b}, {e}] are not contiguous with the previous tensor (expected to start at {end})",
                    t.name
                )));
            }
            let len = e - b;
            if tensor_bytes(dtype, &t.shape) != Some(len) {
                return Err(bad(format!(
                    "tensor '{}': {len} bytes do not match dtype {dtype} and shape {:?}",
                    t.name, t.shape
                )));
            }
            let chunks = len.div_ceil(j.chunk_size).max(1);
            if t.chunks != chunks || t.first_chunk != next_chunk {
                return Err(bad(format!(
                    "tensor '{}': chunk layout (first_chunk {}, chunks {}) should be ({next_chunk}, {chunks})",
                    t.name, t.first_chunk, t.chunks
                )));
            }
            next_chunk += chunks;
            if next_chunk > MAX_CHUNKS_PER_SHARD {
                return Err(bad(format!(
                    "more than {MAX_CHUNKS_PER_SHARD} chunks in one shard"
                )));
            }
            end = e;
            tensors.push(TensorDesc {
                name: t.name,
                dtype,
                shape: t.shape,
                offsets: (b, e),
                encrypted: t.encrypted,
                first_chunk: t.first_chunk,
                chunks,
            });
        }
        let d = Descriptor {
            version: j.version,
            dataset_id,
            shard_index: j.shard_index,
            shard_count: j.shard_count,
            row_start: j.row_start,
            rows: j.rows,
            chunk_size: j.chunk_size,
            tensors,
            metadata: j.metadata,
        };
        if d.to_json() != s {
            return Err(bad(
                "not in canonical form (keys reordered, spaces or escapes changed)".into(),
            ));
        }
        Ok(d)
    }
}

/// The full safetensors header for a descriptor string and its tags: the canonical encoding
/// (docs/FORMAT.md section 4), padded with spaces to a multiple of 8.
pub fn canonical_header(descriptor_json: &str, tags_b64: &str, tensors: &[TensorDesc]) -> Vec<u8> {
    let mut h =
        String::with_capacity(descriptor_json.len() + tags_b64.len() + 64 * tensors.len() + 64);
    h.push_str("{\"__metadata__\":{\"ciphershard\":");
    h.push_str(&serde_json::to_string(descriptor_json).expect("string serializes"));
    h.push_str(",\"ciphershard.tags\":\"");
    h.push_str(tags_b64);
    h.push_str("\"}");
    for t in tensors {
        h.push(',');
        h.push_str(&serde_json::to_string(&t.name).expect("string serializes"));
        h.push_str(":{\"dtype\":\"");
        h.push_str(t.dtype.as_str());
        h.push_str("\",\"shape\":[");
        for (i, d) in t.shape.iter().enumerate() {
            if i > 0 {
                h.push(',');
            }
            h.push_str(&d.to_string());
        }
        h.push_str(&format!(
            "],\"data_offsets\":[{},{}]}}",
            t.offsets.0, t.offsets.1
        ));
    }
    h.push('}');
    while !h.len().is_multiple_of(8) {
        h.push(' ');
    }
    h.into_bytes()
}

/// Builds a chunk's associated data (docs/FORMAT.md section 4.2).
#[allow(clippy::too_many_arguments)]
pub(crate) fn chunk_aad(
    dataset_id: &[u8; 16],
    digest: &[u8; 32],
    shard_index: u32,
    tensor_index: u32,
    j: u64,
    chunks: u64,
    g: u64,
    encrypted: bool,
) -> [u8; AAD_LEN] {
    let mut a = [0u8; AAD_LEN];
    a[0..8].copy_from_slice(AAD_MAGIC);
    a[8..24].copy_from_slice(dataset_id);
    a[24..56].copy_from_slice(digest);
    a[56..60].copy_from_slice(&shard_index.to_be_bytes());
    a[60..64].copy_from_slice(&tensor_index.to_be_bytes());
    a[64..72].copy_from_slice(&j.to_be_bytes());
    a[72..80].copy_from_slice(&chunks.to_be_bytes());
    a[80..88].copy_from_slice(&g.to_be_bytes());
    a[88] = encrypted as u8;
    a
}

/// A chunk's nonce: `00000000 || u64(g)`.
pub(crate) fn chunk_nonce(g: u64) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[4..].copy_from_slice(&g.to_be_bytes());
    n
}

/// One chunk, with everything needed to read and open it.
#[derive(Debug, Clone)]
pub struct ChunkRef {
    /// Index of the tensor in the descriptor.
    pub tensor_index: u32,
    /// Chunk index within the tensor (`j`).
    pub index: u64,
    /// Global chunk index in the shard (`g`).
    pub global: u64,
    /// Absolute offset of the chunk in the shard file.
    pub file_offset: u64,
    /// Chunk length in bytes.
    pub len: usize,
    /// Byte offset of the chunk inside its tensor.
    pub tensor_offset: u64,
    /// GCM nonce.
    pub nonce: [u8; NONCE_LEN],
    /// Associated data.
    pub aad: [u8; AAD_LEN],
    /// Stored tag.
    pub tag: [u8; TAG_LEN],
    /// Ciphertext or authenticated plaintext.
    pub encrypted: bool,
}

impl ChunkRef {
    /// The parameters a [`ChunkOpener`] needs.
    pub fn params(&self) -> ChunkParams<'_> {
        ChunkParams {
            nonce: self.nonce,
            aad: &self.aad,
            tag: self.tag,
            encrypted: self.encrypted,
        }
    }
}

/// A parsed, validated shard header. Validated means well-formed and self-consistent; it is
/// authenticated once [`ShardHeader::verify_header_tag`] succeeds with the shard's data key.
#[derive(Debug, Clone)]
pub struct ShardHeader {
    /// The shard file.
    pub path: PathBuf,
    /// The descriptor.
    pub descriptor: Descriptor,
    /// SHA-256 of the descriptor string (bound into every chunk's AAD).
    pub digest: [u8; 32],
    /// Absolute offset of the data section (`8 + N`).
    pub data_start: u64,
    /// Length of the shard file.
    pub file_len: u64,
    descriptor_json: String,
    header_tag: [u8; TAG_LEN],
    tags: Vec<[u8; TAG_LEN]>,
}

impl ShardHeader {
    /// Opens and parses a shard file, reading only its header (bounded: the header length is
    /// checked against the file size and [`MAX_HEADER_LEN`] before it is read).
    pub fn read(path: &Path) -> Result<Self> {
        Self::read_from(&LocalStore::open([path.to_path_buf()])?, 0)
    }

    /// Reads and parses the header of shard `s` of `store` (the shard's pinned length is the
    /// file length the header must describe).
    pub fn read_from(store: &dyn ShardStore, s: usize) -> Result<Self> {
        let path = store.name(s);
        let file_len = store.identity(s).len;
        let n = header_len(path, file_len, |buf| store.read_at(s, 0, buf))?;
        let mut prefix = vec![0u8; 8 + n as usize];
        prefix[..8].copy_from_slice(&n.to_le_bytes());
        store.read_at(s, 8, &mut prefix[8..])?;
        Self::parse_prefix(path, &prefix, file_len)
    }

    /// Parses a shard held whole in memory (`file` is the entire file; its length is the file
    /// length). `path` only names the file in errors.
    pub fn parse(path: &Path, file: &[u8]) -> Result<Self> {
        Self::parse_prefix(path, file, file.len() as u64)
    }

    /// Parses the first bytes of a shard (at least `8 + N`) given the file's full length.
    pub fn parse_prefix(path: &Path, prefix: &[u8], file_len: u64) -> Result<Self> {
        let n = header_len(path, file_len, |buf| {
            buf.copy_from_slice(prefix.get(..8).ok_or_else(|| truncated(path, file_len))?);
            Ok(())
        })?;
        let raw = prefix.get(8..8 + n as usize).ok_or_else(|| {
            Error::format(
                path,
                WHAT_HEADER,
                "fewer header bytes given than the header length",
            )
        })?;
        let text = std::str::from_utf8(raw)
            .map_err(|_| Error::format(path, WHAT_HEADER, "header is not UTF-8"))?;
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::format(path, WHAT_HEADER, format!("invalid JSON: {e}")))?;
        let meta = v
            .get("__metadata__")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                Error::format(
                    path,
                    WHAT_HEADER,
                    "no __metadata__ object: not a ciphershard shard",
                )
            })?;
        let field = |k: &str| {
            meta.get(k).and_then(|s| s.as_str()).ok_or_else(|| {
                Error::format(
                    path,
                    WHAT_HEADER,
                    format!("__metadata__ has no string '{k}'"),
                )
            })
        };
        let descriptor_json = field("ciphershard")?.to_owned();
        let tags_b64 = field("ciphershard.tags")?.to_owned();
        let descriptor = Descriptor::parse(path, &descriptor_json)?;
        let total = descriptor.total_chunks();
        let tag_bytes = B64.decode(&tags_b64).map_err(|e| {
            Error::format(
                path,
                WHAT_HEADER,
                format!("ciphershard.tags is not base64: {e}"),
            )
        })?;
        if tag_bytes.len() as u64 != (total + 1) * TAG_LEN as u64 {
            return Err(Error::format(
                path,
                WHAT_HEADER,
                format!(
                    "ciphershard.tags holds {} bytes, expected 16 x (1 + {total} chunks)",
                    tag_bytes.len()
                ),
            ));
        }
        if canonical_header(&descriptor_json, &tags_b64, &descriptor.tensors) != raw {
            return Err(Error::format(
                path,
                WHAT_HEADER,
                "header is not byte-identical to its canonical encoding (edited header or not written by ciphershard)",
            ));
        }
        let data_start = 8 + n;
        let expect = data_start + descriptor.data_len();
        if file_len != expect {
            return Err(Error::format(
                path,
                WHAT_HEADER,
                format!(
                    "file is {file_len} bytes but its header describes {expect} bytes ({})",
                    if file_len < expect {
                        "truncated"
                    } else {
                        "bytes appended"
                    }
                ),
            ));
        }
        let mut tags: Vec<[u8; TAG_LEN]> = tag_bytes
            .chunks_exact(TAG_LEN)
            .map(|c| c.try_into().expect("16-byte chunk"))
            .collect();
        let header_tag = tags.remove(0);
        let digest: [u8; 32] = Sha256::digest(descriptor_json.as_bytes()).into();
        Ok(ShardHeader {
            path: path.into(),
            descriptor,
            digest,
            data_start,
            file_len,
            descriptor_json,
            header_tag,
            tags,
        })
    }

    /// The descriptor string exactly as stored (the header digest's input).
    pub fn descriptor_json(&self) -> &str {
        &self.descriptor_json
    }

    /// Checks the header tag with the shard's prepared data key.
    pub fn verify_header_tag(&self, opener: &dyn ChunkOpener) -> Result<()> {
        let params = ChunkParams {
            nonce: HEADER_TAG_NONCE,
            aad: self.descriptor_json.as_bytes(),
            tag: self.header_tag,
            encrypted: false,
        };
        opener.verify(&params, &[]).map_err(|e| match e {
            OpenError::TagMismatch => Error::HeaderIntegrity {
                path: self.path.clone(),
                what: "shard header (header tag does not verify with this shard's data key)".into(),
            },
            OpenError::Backend(e) => e,
        })
    }

    /// Looks a tensor up by name.
    pub fn tensor(&self, name: &str) -> Option<(u32, &TensorDesc)> {
        self.descriptor
            .tensors
            .iter()
            .enumerate()
            .find(|(_, t)| t.name == name)
            .map(|(i, t)| (i as u32, t))
    }

    /// Chunk `j` of tensor `tensor_index`. Panics if either index is out of range (a caller
    /// bug: indices come from this header, never from the file).
    pub fn chunk(&self, tensor_index: u32, j: u64) -> ChunkRef {
        let d = &self.descriptor;
        let t = &d.tensors[tensor_index as usize];
        assert!(
            j < t.chunks,
            "chunk {j} out of range for tensor '{}' ({} chunks)",
            t.name,
            t.chunks
        );
        let g = t.first_chunk + j;
        let tensor_offset = j * d.chunk_size;
        let len = (t.len() - tensor_offset).min(d.chunk_size) as usize;
        ChunkRef {
            tensor_index,
            index: j,
            global: g,
            file_offset: self.data_start + t.offsets.0 + tensor_offset,
            len,
            tensor_offset,
            nonce: chunk_nonce(g),
            aad: chunk_aad(
                &d.dataset_id,
                &self.digest,
                d.shard_index,
                tensor_index,
                j,
                t.chunks,
                g,
                t.encrypted,
            ),
            tag: self.tags[g as usize],
            encrypted: t.encrypted,
        }
    }

    /// Every chunk of a tensor, in order.
    pub fn chunks(&self, tensor_index: u32) -> impl Iterator<Item = ChunkRef> + '_ {
        let n = self.descriptor.tensors[tensor_index as usize].chunks;
        (0..n).map(move |j| self.chunk(tensor_index, j))
    }

    /// Where a chunk is, for [`Error::Integrity`].
    pub fn chunk_location(&self, c: &ChunkRef) -> ChunkLocation {
        ChunkLocation {
            path: self.path.clone(),
            tensor: self.descriptor.tensors[c.tensor_index as usize]
                .name
                .clone(),
            chunk: c.index,
        }
    }
}

fn truncated(path: &Path, file_len: u64) -> Error {
    Error::format(
        path,
        WHAT_HEADER,
        format!("truncated: the file is {file_len} bytes, too short for a safetensors header"),
    )
}

/// Reads the 8-byte header length through `read8` and bounds it by the file and the cap.
fn header_len(
    path: &Path,
    file_len: u64,
    read8: impl FnOnce(&mut [u8]) -> Result<()>,
) -> Result<u64> {
    if file_len < 8 {
        return Err(truncated(path, file_len));
    }
    let mut b = [0u8; 8];
    read8(&mut b)?;
    let n = u64::from_le_bytes(b);
    if n > MAX_HEADER_LEN {
        return Err(Error::format(
            path,
            WHAT_HEADER,
            format!("header length {n} exceeds the {MAX_HEADER_LEN}-byte limit"),
        ));
    }
    if n > file_len - 8 {
        return Err(Error::format(
            path,
            WHAT_HEADER,
            format!(
                "header length {n} is larger than the file ({file_len} bytes): truncated or corrupt"
            ),
        ));
    }
    Ok(n)
}
