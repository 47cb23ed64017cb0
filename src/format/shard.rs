//! Shard files: the safetensors header, the ciphershard descriptor, tags and chunk addressing.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::json::{self, AnyString, DtypeName, Hex, List, Pair, StrMap, json_object};
use super::{
    CIPHER_NAME, Dtype, FORMAT_VERSION, MAX_CHUNK_SIZE, MAX_CHUNKS_PER_SHARD, MAX_HEADER_LEN,
    MAX_METADATA_ENTRIES, MAX_RANK, MAX_TENSORS, OLDEST_FORMAT_VERSION, tensor_bytes,
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

/// What a tensor of a shard holds (the descriptor's `layout`, format version 2; every tensor
/// of a version-1 shard is [`Layout::Fixed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// A fixed-shape column (first dimension = the shard's rows) or, in a `tensors` shard, any
    /// tensor.
    Fixed,
    /// A ragged column's values: every row's elements concatenated, first dimension = the
    /// element count.
    Ragged,
    /// The row offsets of the ragged tensor just before it: `I64`, shape `[rows + 1]`.
    RowOffsets,
}

impl Layout {
    /// The descriptor's name for the layout.
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::Fixed => "fixed",
            Layout::Ragged => "ragged",
            Layout::RowOffsets => "row_offsets",
        }
    }
}

/// Suffix of a ragged column's offsets tensor name: column `c` is stored as tensors `c` (its
/// values) and `c.offsets`.
pub const OFFSETS_SUFFIX: &str = ".offsets";

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
    /// What it holds.
    pub layout: Layout,
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
    /// Format version (1 or 2).
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

json_object! {
    struct TensorJsonV1 {
        name: Box<str>,
        dtype: DtypeName,
        shape: List<u64, MAX_RANK>,
        offsets: Pair,
        encrypted: bool,
        first_chunk: u64,
        chunks: u64,
    }
}

json_object! {
    struct TensorJson {
        name: Box<str>,
        dtype: DtypeName,
        shape: List<u64, MAX_RANK>,
        offsets: Pair,
        encrypted: bool,
        first_chunk: u64,
        chunks: u64,
        layout: Box<str>,
    }
}

impl From<TensorJsonV1> for TensorJson {
    fn from(t: TensorJsonV1) -> Self {
        TensorJson {
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
            offsets: t.offsets,
            encrypted: t.encrypted,
            first_chunk: t.first_chunk,
            chunks: t.chunks,
            layout: Layout::Fixed.as_str().into(),
        }
    }
}

/// Declares a descriptor's typed structure for one version's tensor entries: the versions
/// differ only there (version 2 added `layout`).
macro_rules! descriptor_json {
    ($name:ident, $tensor:ty) => {
        json_object! {
            // `format`, `version` (and `cipher`) are required here but checked by the probe
            // that runs first (json::check_format_version), so they are read and not kept.
            #[allow(dead_code)]
            struct $name {
                format: AnyString,
                version: u32,
                cipher: AnyString,
                dataset_id: Hex<16>,
                shard_index: u32,
                shard_count: u32,
                row_start: u64,
                rows: u64,
                chunk_size: u64,
                tensors: List<$tensor, MAX_TENSORS>,
                metadata: StrMap<MAX_METADATA_ENTRIES>,
            }
        }
    };
}
descriptor_json!(DescriptorJsonV1, TensorJsonV1);
descriptor_json!(DescriptorJson, TensorJson);

impl From<DescriptorJsonV1> for DescriptorJson {
    fn from(d: DescriptorJsonV1) -> Self {
        // Converted in place, one entry at a time: a header of a million tensors holds one
        // list at a time.
        let tensors: Vec<TensorJson> = d.tensors.0.into_vec().into_iter().map(Into::into).collect();
        DescriptorJson {
            format: d.format,
            version: d.version,
            cipher: d.cipher,
            dataset_id: d.dataset_id,
            shard_index: d.shard_index,
            shard_count: d.shard_count,
            row_start: d.row_start,
            rows: d.rows,
            chunk_size: d.chunk_size,
            tensors: List(tensors.into_boxed_slice()),
            metadata: d.metadata,
        }
    }
}

/// The canonical descriptor, serialized from borrowed fields (keys in spec order).
struct DescriptorOut<'a>(&'a Descriptor);
struct TensorsOut<'a>(&'a [TensorDesc], u32);
struct TensorOut<'a>(&'a TensorDesc, u32);

impl Serialize for DescriptorOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let d = self.0;
        let mut st = s.serialize_struct("Descriptor", 11)?;
        st.serialize_field("format", "ciphershard")?;
        st.serialize_field("version", &d.version)?;
        st.serialize_field("cipher", CIPHER_NAME)?;
        st.serialize_field("dataset_id", &hex::encode(d.dataset_id))?;
        st.serialize_field("shard_index", &d.shard_index)?;
        st.serialize_field("shard_count", &d.shard_count)?;
        st.serialize_field("row_start", &d.row_start)?;
        st.serialize_field("rows", &d.rows)?;
        st.serialize_field("chunk_size", &d.chunk_size)?;
        st.serialize_field("tensors", &TensorsOut(&d.tensors, d.version))?;
        st.serialize_field("metadata", &d.metadata)?;
        st.end()
    }
}

impl Serialize for TensorsOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|t| TensorOut(t, self.1)))
    }
}

impl Serialize for TensorOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let t = self.0;
        let mut st = s.serialize_struct("Tensor", 8)?;
        st.serialize_field("name", &t.name)?;
        st.serialize_field("dtype", t.dtype.as_str())?;
        st.serialize_field("shape", &t.shape)?;
        st.serialize_field("offsets", &[t.offsets.0, t.offsets.1])?;
        st.serialize_field("encrypted", &t.encrypted)?;
        st.serialize_field("first_chunk", &t.first_chunk)?;
        st.serialize_field("chunks", &t.chunks)?;
        if self.1 >= 2 {
            st.serialize_field("layout", t.layout.as_str())?;
        }
        st.end()
    }
}

/// A writer that compares what is written with `expected` instead of storing it: canonical
/// form is checked without building a second copy of a header (up to 100 MB).
struct SameAs<'a> {
    rest: &'a [u8],
    same: bool,
}

impl<'a> SameAs<'a> {
    fn new(expected: &'a [u8]) -> Self {
        SameAs {
            rest: expected,
            same: true,
        }
    }
    fn push(&mut self, b: &[u8]) {
        match self.rest.strip_prefix(b) {
            Some(r) if self.same => self.rest = r,
            _ => self.same = false,
        }
    }
    /// Whether exactly `expected` was written.
    fn matched(&self) -> bool {
        self.same && self.rest.is_empty()
    }
}

impl std::io::Write for SameAs<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.push(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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
        serde_json::to_string(&DescriptorOut(self)).expect("descriptor serializes")
    }

    /// The length of [`to_json`](Self::to_json), counted without building it.
    pub(crate) fn json_len(&self) -> u64 {
        struct Count(u64);
        impl std::io::Write for Count {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0 += b.len() as u64;
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut c = Count(0);
        serde_json::to_writer(&mut c, &DescriptorOut(self)).expect("descriptor serializes");
        c.0
    }

    /// Whether `s` is exactly this descriptor's canonical encoding (compared as it is
    /// produced: no second copy).
    fn is_canonical(&self, s: &str) -> bool {
        let mut w = SameAs::new(s.as_bytes());
        serde_json::to_writer(&mut w, &DescriptorOut(self)).is_ok() && w.matched()
    }

    /// Parses and validates a descriptor string (typed and bounded, docs/FORMAT.md section 9);
    /// it must be in canonical form.
    pub fn parse(path: &Path, s: &str) -> Result<Self> {
        let version = json::check_format_version(
            path,
            WHAT_DESC,
            s.as_bytes(),
            "ciphershard",
            OLDEST_FORMAT_VERSION..=FORMAT_VERSION,
            Some(CIPHER_NAME),
        )?;
        let j: DescriptorJson = if version == 1 {
            json::parse_object::<DescriptorJsonV1>(path, WHAT_DESC, s.as_bytes())?.into()
        } else {
            json::parse_object(path, WHAT_DESC, s.as_bytes())?
        };
        let bad = |reason: String| Error::format(path, WHAT_DESC, reason);
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
        if j.tensors.0.is_empty() {
            return Err(bad("a shard must hold at least one tensor".into()));
        }
        let (mut end, mut next_chunk) = (0u64, 0u64);
        // Collected in place (the same allocation): a header of a million tensors holds one
        // list at a time.
        let tensors = j
            .tensors
            .0
            .into_vec()
            .into_iter()
            .map(|t| {
                if t.name.is_empty() || &*t.name == "__metadata__" {
                    return Err(bad(format!(
                        "tensor name '{}' is empty or reserved",
                        json::quote(&t.name)
                    )));
                }
                let dtype = t.dtype.get(path)?;
                let layout = match &*t.layout {
                    "fixed" => Layout::Fixed,
                    "ragged" => Layout::Ragged,
                    "row_offsets" => Layout::RowOffsets,
                    other => {
                        return Err(bad(format!(
                            "tensor '{}': layout '{}' is none of fixed, ragged, row_offsets",
                            json::quote(&t.name),
                            json::quote(other)
                        )));
                    }
                };
                let [b, e] = t.offsets.0;
                if b != end || e < b {
                    return Err(bad(format!(
                        "tensor '{}': offsets [{b}, {e}] are not contiguous with the previous tensor (expected to start at {end})",
                        json::quote(&t.name)
                    )));
                }
                let len = e - b;
                if tensor_bytes(dtype, &t.shape.0) != Some(len) {
                    return Err(bad(format!(
                        "tensor '{}': {len} bytes do not match dtype {dtype} and shape {:?}",
                        json::quote(&t.name),
                        t.shape.0
                    )));
                }
                let chunks = len.div_ceil(j.chunk_size).max(1);
                if t.chunks != chunks || t.first_chunk != next_chunk {
                    return Err(bad(format!(
                        "tensor '{}': chunk layout (first_chunk {}, chunks {}) should be ({next_chunk}, {chunks})",
                        json::quote(&t.name),
                        t.first_chunk,
                        t.chunks
                    )));
                }
                next_chunk = next_chunk
                    .checked_add(chunks)
                    .filter(|&n| n <= MAX_CHUNKS_PER_SHARD)
                    .ok_or_else(|| {
                        bad(format!(
                            "more than {MAX_CHUNKS_PER_SHARD} chunks in one shard"
                        ))
                    })?;
                end = e;
                Ok(TensorDesc {
                    name: t.name.into(),
                    dtype,
                    shape: t.shape.0.into(),
                    offsets: (b, e),
                    encrypted: t.encrypted,
                    first_chunk: t.first_chunk,
                    chunks,
                    layout,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        check_ragged_pairs(&tensors, j.rows).map_err(bad)?;
        // A hash set over borrowed names: linear, whatever the tensor count.
        if let Some(name) = json::first_repeat(tensors.iter().map(|t| t.name.as_str())) {
            return Err(bad(format!(
                "tensor name '{}' is repeated",
                json::quote(name)
            )));
        }
        let d = Descriptor {
            version: j.version,
            dataset_id: j.dataset_id.0,
            shard_index: j.shard_index,
            shard_count: j.shard_count,
            row_start: j.row_start,
            rows: j.rows,
            chunk_size: j.chunk_size,
            tensors,
            metadata: j.metadata.0,
        };
        if !d.is_canonical(s) {
            return Err(bad(
                "not in canonical form (keys reordered, spaces or escapes changed)".into(),
            ));
        }
        Ok(d)
    }
}

/// Checks the layouts of a shard's tensors (docs/FORMAT.md section 4.1): each ragged tensor
/// (rank 1 or more) is followed by its row offsets, named after it with [`OFFSETS_SUFFIX`],
/// `I64` of shape `[rows + 1]`, encrypted as it is; row offsets follow nothing else. What the
/// offsets hold is checked when they are read (after their tag).
fn check_ragged_pairs(tensors: &[TensorDesc], rows: u64) -> std::result::Result<(), String> {
    let mut prev: Option<&TensorDesc> = None;
    for t in tensors {
        let name = json::quote(&t.name);
        match t.layout {
            Layout::Ragged if t.shape.is_empty() => {
                return Err(format!(
                    "ragged tensor '{name}' is a scalar: its first dimension counts elements"
                ));
            }
            Layout::RowOffsets => {
                let Some(values) = prev.filter(|p| p.layout == Layout::Ragged) else {
                    return Err(format!(
                        "row offsets '{name}' do not follow a ragged tensor"
                    ));
                };
                let want_name = format!("{}{OFFSETS_SUFFIX}", values.name);
                let want_shape = rows.checked_add(1).map(|n| vec![n]);
                if t.name != want_name
                    || t.dtype != Dtype::I64
                    || Some(&t.shape) != want_shape.as_ref()
                    || t.encrypted != values.encrypted
                {
                    return Err(format!(
                        "row offsets '{name}' of ragged tensor '{}' must be named '{}', I64 of shape [{rows} + 1] and encrypted as the values are",
                        json::quote(&values.name),
                        json::quote(&want_name)
                    ));
                }
            }
            _ => {}
        }
        if let Some(p) = prev.filter(|p| p.layout == Layout::Ragged)
            && t.layout != Layout::RowOffsets
        {
            return Err(format!(
                "ragged tensor '{}' is not followed by its row offsets",
                json::quote(&p.name)
            ));
        }
        prev = Some(t);
    }
    match prev {
        Some(p) if p.layout == Layout::Ragged => Err(format!(
            "ragged tensor '{}' is not followed by its row offsets",
            json::quote(&p.name)
        )),
        _ => Ok(()),
    }
}

/// The full safetensors header for a descriptor string and its tags: the canonical encoding
/// (docs/FORMAT.md section 4), padded with spaces to a multiple of 8.
pub fn canonical_header(descriptor_json: &str, tags_b64: &str, tensors: &[TensorDesc]) -> Vec<u8> {
    let mut h =
        Vec::with_capacity(descriptor_json.len() + tags_b64.len() + 64 * tensors.len() + 64);
    write_canonical_header(&mut h, descriptor_json, tags_b64, tensors)
        .expect("writing to a Vec cannot fail");
    h
}

/// Writes [`canonical_header`] to `w` (a file, a buffer, or a comparison with a header read).
fn write_canonical_header(
    w: &mut impl std::io::Write,
    descriptor_json: &str,
    tags_b64: &str,
    tensors: &[TensorDesc],
) -> std::io::Result<()> {
    struct Counted<'a, W> {
        w: &'a mut W,
        n: usize,
    }
    impl<W: std::io::Write> std::io::Write for Counted<'_, W> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let n = self.w.write(b)?;
            self.n += n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.w.flush()
        }
    }
    use std::io::Write as _;
    let mut w = Counted { w, n: 0 };
    w.write_all(b"{\"__metadata__\":{\"ciphershard\":")?;
    serde_json::to_writer(&mut w, descriptor_json)?;
    w.write_all(b",\"ciphershard.tags\":\"")?;
    w.write_all(tags_b64.as_bytes())?;
    w.write_all(b"\"}")?;
    for t in tensors {
        w.write_all(b",")?;
        serde_json::to_writer(&mut w, &t.name)?;
        write!(w, ":{{\"dtype\":\"{}\",\"shape\":[", t.dtype)?;
        for (i, d) in t.shape.iter().enumerate() {
            write!(w, "{}{d}", if i > 0 { "," } else { "" })?;
        }
        write!(w, "],\"data_offsets\":[{},{}]}}", t.offsets.0, t.offsets.1)?;
    }
    w.write_all(b"}")?;
    let pad = (8 - w.n % 8) % 8;
    w.write_all(&b"        "[..pad])
}

/// The two strings a reader keeps from a shard's outer safetensors header; the tensor entries
/// are not kept (the canonical-form check compares them with the descriptor's), and nothing
/// else may sit in `__metadata__` but strings.
#[derive(Default)]
struct OuterHeader<'de> {
    metadata: bool,
    descriptor: Option<String>,
    tags: Option<json::Text<'de>>,
}

impl<'de> serde::de::Visitor<'de> for &mut OuterHeader<'de> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a safetensors header (a JSON object)")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<(), A::Error> {
        use serde::de::Error as _;
        let mut entries = 0usize;
        while let Some(k) = map.next_key_seed(json::Which(&["__metadata__"]))? {
            entries += 1;
            if entries > MAX_TENSORS + 1 {
                return Err(A::Error::custom(format_args!(
                    "more than {MAX_TENSORS} tensors (the limit)"
                )));
            }
            if k.is_none() {
                // A tensor entry: checked byte for byte against the canonical encoding of
                // the descriptor's tensors, so it is skipped here rather than built.
                map.next_value::<serde::de::IgnoredAny>()?;
            } else if std::mem::replace(&mut self.metadata, true) {
                return Err(A::Error::duplicate_field("__metadata__"));
            } else {
                map.next_value_seed(MetadataVisitor(&mut *self))?;
            }
        }
        Ok(())
    }
}

/// The whole header.
impl<'de> serde::de::DeserializeSeed<'de> for &mut OuterHeader<'de> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

/// `__metadata__`'s value: strings only, at most [`MAX_METADATA_ENTRIES`].
impl<'de> serde::de::DeserializeSeed<'de> for MetadataVisitor<'_, 'de> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

struct MetadataVisitor<'a, 'de>(&'a mut OuterHeader<'de>);

impl<'de> serde::de::Visitor<'de> for MetadataVisitor<'_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("`__metadata__` to be an object of strings")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<(), A::Error> {
        use serde::de::Error as _;
        let mut entries = 0usize;
        while let Some(k) = map.next_key_seed(json::Which(&["ciphershard", "ciphershard.tags"]))? {
            entries += 1;
            if entries > MAX_METADATA_ENTRIES {
                return Err(A::Error::custom(format_args!(
                    "`__metadata__` holds more than {MAX_METADATA_ENTRIES} entries (the limit)"
                )));
            }
            match k {
                Some(0) if self.0.descriptor.is_some() => {
                    return Err(A::Error::duplicate_field("ciphershard"));
                }
                Some(0) => {
                    self.0.descriptor = Some(map.next_value_seed(json::Field::new("ciphershard"))?)
                }
                Some(_) if self.0.tags.is_some() => {
                    return Err(A::Error::duplicate_field("ciphershard.tags"));
                }
                Some(_) => {
                    self.0.tags = Some(map.next_value_seed(json::Field::new("ciphershard.tags"))?)
                }
                None => {
                    map.next_value_seed(json::Field::<json::AnyString>::new("__metadata__"))?;
                }
            }
        }
        Ok(())
    }
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
    /// The header tag, then one tag per chunk in global chunk order, 16 bytes each.
    tags: Vec<u8>,
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
        Self::read_vouched(store, s, None)
    }

    /// [`ShardHeader::read_from`] for a shard whose manifest records `digest` as its header
    /// digest: a descriptor that differs from it was modified, and is reported as such
    /// ([`Error::HeaderIntegrity`]) before anything in it is read, so an edited version or
    /// cipher name never reads as a format this build does not support.
    pub fn read_from_vouched(store: &dyn ShardStore, s: usize, digest: &[u8; 32]) -> Result<Self> {
        Self::read_vouched(store, s, Some(digest))
    }

    fn read_vouched(store: &dyn ShardStore, s: usize, digest: Option<&[u8; 32]>) -> Result<Self> {
        let path = store.name(s);
        let file_len = store.identity(s).len;
        let n = header_len(path, file_len, |buf| store.read_at(s, 0, buf))?;
        let mut prefix = vec![0u8; 8 + n as usize];
        prefix[..8].copy_from_slice(&n.to_le_bytes());
        store.read_at(s, 8, &mut prefix[8..])?;
        Self::parse_vouched(path, &prefix, file_len, digest)
    }

    /// Parses a shard held whole in memory (`file` is the entire file; its length is the file
    /// length). `path` only names the file in errors.
    pub fn parse(path: &Path, file: &[u8]) -> Result<Self> {
        Self::parse_prefix(path, file, file.len() as u64)
    }

    /// Parses the first bytes of a shard (at least `8 + N`) given the file's full length.
    pub fn parse_prefix(path: &Path, prefix: &[u8], file_len: u64) -> Result<Self> {
        Self::parse_vouched(path, prefix, file_len, None)
    }

    /// [`ShardHeader::parse_prefix`], checking the descriptor against the header digest
    /// `vouched` (the manifest's) first when one is given.
    fn parse_vouched(
        path: &Path,
        prefix: &[u8],
        file_len: u64,
        vouched: Option<&[u8; 32]>,
    ) -> Result<Self> {
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
        let mut outer = OuterHeader::default();
        json::parse(path, WHAT_HEADER, raw, &mut outer)?;
        if !outer.metadata {
            return Err(Error::format(
                path,
                WHAT_HEADER,
                "no __metadata__ object: not a ciphershard shard",
            ));
        }
        let missing = |k: &str| {
            Error::format(
                path,
                WHAT_HEADER,
                format!("__metadata__ has no string '{k}'"),
            )
        };
        let descriptor_json = outer.descriptor.ok_or_else(|| missing("ciphershard"))?;
        let tags_b64 = outer.tags.ok_or_else(|| missing("ciphershard.tags"))?;
        let digest: [u8; 32] = Sha256::digest(descriptor_json.as_bytes()).into();
        // A descriptor the manifest does not vouch for that does not even parse (an edited
        // version or cipher name, a flipped byte) was modified: say so rather than report a
        // format this build does not read. One that parses goes on to the manifest's
        // cross-checks, which say how it differs.
        let descriptor = Descriptor::parse(path, &descriptor_json).map_err(|e| {
            let found = match &e {
                Error::Unsupported { what, found, .. } => format!("it reads {what} '{found}'"),
                Error::Format { reason, .. } => reason.clone(),
                other => other.to_string(),
            };
            match vouched {
                Some(v) if *v != digest => Error::HeaderIntegrity {
                    path: path.into(),
                    what: format!(
                        "the shard header was modified: its descriptor does not match the \
                         header digest the manifest records for this shard ({found})"
                    ),
                },
                _ => e,
            }
        })?;
        let total = descriptor.total_chunks();
        let tags = B64.decode(tags_b64.as_bytes()).map_err(|e| {
            Error::format(
                path,
                WHAT_HEADER,
                format!("ciphershard.tags is not base64: {e}"),
            )
        })?;
        if tags.len() as u64 != (total + 1) * TAG_LEN as u64 {
            return Err(Error::format(
                path,
                WHAT_HEADER,
                format!(
                    "ciphershard.tags holds {} bytes, expected 16 x (1 + {total} chunks)",
                    tags.len()
                ),
            ));
        }
        let mut same = SameAs::new(raw);
        if write_canonical_header(&mut same, &descriptor_json, &tags_b64, &descriptor.tensors)
            .is_err()
            || !same.matched()
        {
            return Err(Error::format(
                path,
                WHAT_HEADER,
                "header is not byte-identical to its canonical encoding (edited header or not written by ciphershard)",
            ));
        }
        let data_start = 8 + n;
        // data_len <= MAX_CHUNKS_PER_SHARD * MAX_CHUNK_SIZE < 2^61, but checked all the same.
        let expect = data_start
            .checked_add(descriptor.data_len())
            .ok_or_else(|| Error::format(path, WHAT_HEADER, "data section length overflows"))?;
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
        Ok(ShardHeader {
            path: path.into(),
            descriptor,
            digest,
            data_start,
            file_len,
            descriptor_json,
            tags,
        })
    }

    /// Tag `i` of the table (0: the header tag; `g + 1`: chunk `g`'s).
    fn tag(&self, i: usize) -> [u8; TAG_LEN] {
        self.tags[TAG_LEN * i..TAG_LEN * (i + 1)]
            .try_into()
            .expect("16-byte slice")
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
            tag: self.tag(0),
            encrypted: false,
        };
        opener.verify(&params, &[]).map_err(|e| match e {
            OpenError::TagMismatch => Error::HeaderIntegrity {
                path: self.path.clone(),
                what: "the shard header was modified: its header tag does not verify with this \
                       shard's data key"
                    .into(),
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
            tag: self.tag(g as usize + 1),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, dtype: Dtype, shape: &[u64], layout: Layout) -> TensorDesc {
        TensorDesc {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            offsets: (0, 0),
            encrypted: true,
            first_chunk: 0,
            chunks: 1,
            layout,
        }
    }

    /// Every ragged tensor is followed by its row offsets, named, typed and shaped as the
    /// format says; offsets follow nothing else.
    #[test]
    fn ragged_pairs() {
        use Layout::*;
        let ok = [
            tensor("x", Dtype::F32, &[3, 2], Fixed),
            tensor("ids", Dtype::I32, &[7], Ragged),
            tensor("ids.offsets", Dtype::I64, &[4], RowOffsets),
        ];
        check_ragged_pairs(&ok, 3).unwrap();
        let cases: Vec<(Vec<TensorDesc>, &str)> = vec![
            (vec![ok[1].clone()], "not followed by its row offsets"),
            (
                vec![ok[1].clone(), ok[0].clone()],
                "not followed by its row offsets",
            ),
            (
                vec![ok[0].clone(), ok[2].clone()],
                "do not follow a ragged tensor",
            ),
            (vec![ok[2].clone()], "do not follow a ragged tensor"),
            (
                vec![tensor("ids", Dtype::I32, &[], Ragged), ok[2].clone()],
                "is a scalar",
            ),
            (
                vec![
                    ok[1].clone(),
                    tensor("other.offsets", Dtype::I64, &[4], RowOffsets),
                ],
                "must be named 'ids.offsets'",
            ),
            (
                vec![
                    ok[1].clone(),
                    tensor("ids.offsets", Dtype::I32, &[4], RowOffsets),
                ],
                "I64 of shape [3 + 1]",
            ),
            (
                vec![
                    ok[1].clone(),
                    tensor("ids.offsets", Dtype::I64, &[3], RowOffsets),
                ],
                "I64 of shape [3 + 1]",
            ),
            (
                vec![
                    ok[1].clone(),
                    TensorDesc {
                        encrypted: false,
                        ..ok[2].clone()
                    },
                ],
                "encrypted as the values are",
            ),
        ];
        for (tensors, want) in cases {
            let e = check_ragged_pairs(&tensors, 3).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    /// A version-1 descriptor is written back without `layout` (its canonical form), a
    /// version-2 one with it; each parses only under its own version's rules.
    #[test]
    fn layout_is_in_version_2_only() {
        let mut d = Descriptor {
            version: 1,
            dataset_id: [1; 16],
            shard_index: 0,
            shard_count: 1,
            row_start: 0,
            rows: 2,
            chunk_size: 64,
            tensors: vec![TensorDesc {
                offsets: (0, 8),
                ..tensor("x", Dtype::F32, &[2], Layout::Fixed)
            }],
            metadata: BTreeMap::new(),
        };
        let v1 = d.to_json();
        assert!(!v1.contains("layout"), "{v1}");
        assert_eq!(Descriptor::parse(Path::new("s"), &v1).unwrap(), d);
        d.version = 2;
        let v2 = d.to_json();
        assert!(v2.contains(r#""layout":"fixed""#), "{v2}");
        assert_eq!(Descriptor::parse(Path::new("s"), &v2).unwrap(), d);
        // Version 1 with a layout, version 2 without: unknown and missing fields.
        let e = Descriptor::parse(
            Path::new("s"),
            &v2.replace(r#""version":2"#, r#""version":1"#),
        )
        .unwrap_err();
        assert!(e.to_string().contains("layout"), "{e}");
        let e = Descriptor::parse(
            Path::new("s"),
            &v1.replace(r#""version":1"#, r#""version":2"#),
        )
        .unwrap_err();
        assert!(e.to_string().contains("layout"), "{e}");
        let e = Descriptor::parse(Path::new("s"), &v2.replace(r#""fixed""#, r#""jagged""#))
            .unwrap_err();
        assert!(e.to_string().contains("layout 'jagged'"), "{e}");
    }
}
