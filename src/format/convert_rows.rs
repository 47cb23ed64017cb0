//! `convert` for row-batch inputs ([`RecordInput`]: Parquet, Arrow IPC, JSONL, Arrow batches
//! and ragged columns in memory): rows are pulled batch by batch, gathered into one shard's
//! tensors (byte ranges of the decoded batches, held without a copy, and row offsets rebased
//! into zeroized buffers), and the shard is sealed from them.
//!
//! Every input knows its exact row count when opened, so the shard layout (rows per shard,
//! shard count) is fixed before anything is sealed, as each shard's descriptor needs it; rows
//! per shard come from the inputs' estimated bytes per row, so a shard of long rows is larger
//! than one of short rows. Memory: one shard's plaintext (its batches) here; the shard loop
//! (`convert_pipeline.rs`) seals one shard while the next is gathered, so about two shards.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::Arc;

use zeroize::Zeroizing;

use super::input::records::{ColumnData, FieldSpec, RecordInput, RowBatch};
use super::input::{ConvertInput, check_column};
use super::seal::{Sealer, TensorPlan, lay_out, write_shard};
use super::segments::{Pieces, Segments};
use super::{Column, Descriptor, Dtype, Layout, MAX_TENSORS, OFFSETS_SUFFIX, ShardEntry};
use crate::error::{Error, Result};
use crate::keys::DataKey;

/// Rows gathered from in-memory batches at most this many at a time.
const MEM_BATCH_ROWS: usize = 1 << 16;

/// A conversion from row-batch inputs, opened and checked.
pub(super) struct RowsPlan<'a> {
    /// The inputs, in order; their rows are appended.
    inputs: VecDeque<Box<dyn RecordInput + 'a>>,
    /// The columns, with per-column element sizes.
    fields: Vec<Field>,
    /// All rows.
    pub rows: u64,
    /// About how many plaintext bytes the shards will hold (offsets included).
    pub estimated_bytes: u64,
    /// The inputs' metadata, later inputs overriding earlier ones.
    pub metadata: BTreeMap<String, String>,
    /// The current batch and its next row.
    batch: Option<(Arc<RowBatch>, usize)>,
    /// The input the current batch came from (for errors).
    batch_input: std::path::PathBuf,
}

struct Field {
    spec: FieldSpec,
    encrypted: bool,
    /// Bytes of one row (fixed) or of one element (ragged).
    unit_bytes: u64,
}

/// Whether `input` is decoded batch by batch.
fn is_rows_input(input: &ConvertInput) -> bool {
    matches!(
        input,
        ConvertInput::Ragged { .. }
            | ConvertInput::Parquet(_)
            | ConvertInput::ArrowIpc(_)
            | ConvertInput::Arrow(_)
            | ConvertInput::Jsonl { .. }
    )
}

/// Opens an input decoded batch by batch that stands alone (a file, or Arrow batches in
/// memory), and says whether it is a file; `None` for any other input.
fn open_records(input: &ConvertInput) -> Option<Result<(Box<dyn RecordInput>, bool)>> {
    let file = |r: Result<Box<dyn RecordInput>>| r.map(|i| (i, true));
    Some(match input {
        ConvertInput::Parquet(p) => file(super::input::parquet::open(p)),
        ConvertInput::ArrowIpc(p) => file(super::input::arrow_ipc::open(p)),
        ConvertInput::Jsonl { path, columns } => file(super::input::jsonl::open(path, columns)),
        ConvertInput::Arrow(batches) => batches.open().map(|i| (i, false)),
        _ => return None,
    })
}

/// Opens `inputs` as a row-batch conversion, or returns `None` when none of them is a
/// row-batch input (then they are converted from byte ranges). Refuses a mix of row-batch
/// inputs with byte-range ones (safetensors, `.npy`).
pub(super) fn open<'a>(
    inputs: &'a [ConvertInput],
    encrypted: &dyn Fn(&str) -> bool,
) -> Result<Option<RowsPlan<'a>>> {
    if !inputs.iter().any(is_rows_input) {
        return Ok(None);
    }
    let in_memory = |i: &ConvertInput| {
        matches!(
            i,
            ConvertInput::InMemory { .. } | ConvertInput::Ragged { .. }
        )
    };
    let opened: Vec<Box<dyn RecordInput + 'a>> = if inputs.iter().all(in_memory) {
        vec![Box::new(MemTable::new(inputs)?)]
    } else if inputs.iter().all(|i| is_rows_input(i) && !in_memory(i)) {
        // Files and Arrow batches are appended by rows, in order; the same file twice is
        // refused.
        let mut seen = std::collections::HashMap::new();
        let mut opened = Vec::with_capacity(inputs.len());
        for i in inputs {
            let (input, is_file) = open_records(i).expect("a row-batch input")?;
            if is_file {
                let path = input.path();
                let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
                super::input::refuse_same_file(&mut seen, path, &meta)?;
            }
            opened.push(input);
        }
        opened
    } else {
        return Err(Error::InvalidArgument(
            "row-batch inputs (Parquet, Arrow, JSONL, Arrow tables) cannot be mixed with safetensors, .npy or in-memory NumPy inputs: convert them separately".into(),
        ));
    };
    let first = &opened[0];
    let specs = first.fields().to_vec();
    for other in &opened[1..] {
        if other.fields() != specs.as_slice() {
            return Err(Error::InvalidArgument(format!(
                "{} has columns {} but {} has {}: inputs are appended by rows and must hold the same columns",
                other.path().display(),
                describe(other.fields()),
                first.path().display(),
                describe(&specs)
            )));
        }
    }
    let path = first.path().to_path_buf();
    if specs.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: no columns to convert",
            path.display()
        )));
    }
    let tensors: usize = specs.iter().map(|f| if f.ragged { 2 } else { 1 }).sum();
    if tensors > MAX_TENSORS {
        return Err(Error::InvalidArgument(format!(
            "{}: {tensors} tensors per shard, more than the {MAX_TENSORS} a shard may hold",
            path.display()
        )));
    }
    let mut names = HashSet::new();
    let mut fields = Vec::with_capacity(specs.len());
    for spec in specs {
        check_column(&path, &spec.name, &spec.shape)?;
        let offsets_name = format!("{}{OFFSETS_SUFFIX}", spec.name);
        let taken = [Some(spec.name.clone()), spec.ragged.then_some(offsets_name)];
        for name in taken.into_iter().flatten() {
            if !names.insert(name.clone()) {
                return Err(Error::InvalidArgument(format!(
                    "{}: column '{}' is given twice (a ragged column 'c' also takes the name 'c{OFFSETS_SUFFIX}' for its row offsets); rename one",
                    path.display(),
                    crate::format::json::quote(&name)
                )));
            }
        }
        let unit_bytes = super::tensor_bytes(spec.dtype, &spec.shape).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: column '{}': one {} of shape {:?} is more than 2^64 bytes",
                path.display(),
                crate::format::json::quote(&spec.name),
                if spec.ragged { "element" } else { "row" },
                spec.shape
            ))
        })?;
        // An element of no bytes would make the element count unbounded by the data.
        if spec.ragged && unit_bytes == 0 {
            return Err(Error::InvalidArgument(format!(
                "{}: ragged column '{}' has elements of shape {:?} {}, which hold no bytes",
                path.display(),
                crate::format::json::quote(&spec.name),
                spec.shape,
                spec.dtype
            )));
        }
        fields.push(Field {
            encrypted: encrypted(&spec.name),
            spec,
            unit_bytes,
        });
    }
    // Rows are bounded by the data only if some column's rows take bytes (a ragged column's
    // take at least their offset).
    if fields.iter().all(|f| !f.spec.ragged && f.unit_bytes == 0) {
        return Err(Error::InvalidArgument(format!(
            "{}: every column has zero-byte rows: a dataset needs at least one column whose rows hold data",
            path.display()
        )));
    }
    let mut rows = 0u64;
    let mut estimated_bytes = 0u64;
    let mut metadata = BTreeMap::new();
    let ragged = fields.iter().filter(|f| f.spec.ragged).count() as u64;
    for i in &opened {
        rows = rows.checked_add(i.rows()).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: the inputs hold more than 2^64 rows",
                i.path().display()
            ))
        })?;
        estimated_bytes = estimated_bytes
            .saturating_add(i.estimated_bytes())
            .saturating_add(i.rows().saturating_mul(8 * ragged));
        metadata.extend(i.metadata());
    }
    Ok(Some(RowsPlan {
        inputs: opened.into(),
        fields,
        rows,
        estimated_bytes,
        metadata,
        batch: None,
        batch_input: path,
    }))
}

fn describe(fields: &[FieldSpec]) -> String {
    let list: Vec<String> = fields
        .iter()
        .map(|f| {
            format!(
                "{} {}{:?}{}",
                crate::format::json::quote(&f.name),
                f.dtype,
                f.shape,
                if f.ragged { " ragged" } else { "" }
            )
        })
        .collect();
    format!("[{}]", list.join(", "))
}

/// One column of the shard being gathered.
enum Gathered {
    Fixed(Pieces),
    Ragged {
        values: Pieces,
        /// Little-endian `I64` row offsets, `rows + 1` of them once the shard is complete.
        offsets: Segments,
        /// Elements so far (the last offset).
        elements: u64,
    },
}

/// A shard's rows, gathered and laid out: what [`GatheredShard::seal`] writes. Its plaintext
/// is zeroized when it is dropped.
pub(super) struct GatheredShard {
    /// The shard's descriptor, tensors laid out.
    pub desc: Descriptor,
    /// Each tensor's bytes, in the descriptor's order.
    bufs: Vec<TensorBytes>,
    /// Tensor bytes (all of `bufs`).
    pub bytes: u64,
}

/// A gathered tensor's bytes.
enum TensorBytes {
    /// Ranges of the decoded batches (fixed columns, ragged values).
    Pieces(Pieces),
    /// Bytes made here (ragged row offsets, rebased to the shard).
    Segments(Segments),
}

impl TensorBytes {
    fn len(&self) -> usize {
        match self {
            TensorBytes::Pieces(p) => p.len(),
            TensorBytes::Segments(s) => s.len(),
        }
    }

    fn read(&self, at: usize, buf: &mut [u8]) {
        match self {
            TensorBytes::Pieces(p) => p.read(at, buf),
            TensorBytes::Segments(s) => s.read(at, buf),
        }
    }
}

impl GatheredShard {
    /// Seals and writes the shard. Returns the manifest entry and the data key.
    pub fn seal(&self, sealer: &mut Sealer<'_>) -> Result<(ShardEntry, DataKey)> {
        let read = |t: usize, offset: u64, buf: &mut [u8]| {
            self.bufs[t].read(offset as usize, buf);
            Ok(())
        };
        write_shard(&self.desc, &read, sealer)
    }
}

impl RowsPlan<'_> {
    /// The manifest's columns.
    pub fn columns(&self) -> Vec<Column> {
        self.fields
            .iter()
            .map(|f| Column {
                name: f.spec.name.clone(),
                dtype: f.spec.dtype,
                shape: f.spec.shape.clone(),
                encrypted: f.encrypted,
                ragged: f.spec.ragged,
            })
            .collect()
    }

    /// Columns stored encrypted (`true`) or plain (`false`), by name.
    pub fn names(&self, encrypted: bool) -> Vec<String> {
        self.fields
            .iter()
            .filter(|f| f.encrypted == encrypted)
            .map(|f| f.spec.name.clone())
            .collect()
    }

    /// The inputs, for errors about all of them (the first few names).
    pub fn inputs_named(&self) -> String {
        let mut names: Vec<String> = self
            .inputs
            .iter()
            .take(3)
            .map(|i| i.path().display().to_string())
            .collect();
        if self.inputs.len() > 3 {
            names.push(format!("{} more", self.inputs.len() - 3));
        }
        names.join(", ")
    }

    /// Rows per shard for a target shard size: the estimated bytes per row into it.
    pub fn rows_per_shard(&self, shard_size: u64) -> u64 {
        if self.estimated_bytes == 0 {
            return self.rows.max(1);
        }
        let per = shard_size as u128 * self.rows as u128 / self.estimated_bytes as u128;
        per.clamp(1, self.rows.max(1) as u128) as u64
    }

    /// Gathers the next `rows` rows into the shard `desc` describes (its tensors are filled in
    /// here), ready to seal. `between` is called before each input batch: an error it returns
    /// stops the gathering and is returned.
    pub fn gather_next_shard(
        &mut self,
        rows: u64,
        mut desc: Descriptor,
        between: &mut dyn FnMut() -> Result<()>,
    ) -> Result<GatheredShard> {
        let mut cols: Vec<Gathered> = self
            .fields
            .iter()
            .map(|f| {
                if f.spec.ragged {
                    let mut offsets = Segments::default();
                    offsets.extend_from_slice(&0i64.to_le_bytes());
                    Gathered::Ragged {
                        values: Pieces::default(),
                        offsets,
                        elements: 0,
                    }
                } else {
                    Gathered::Fixed(Pieces::default())
                }
            })
            .collect();
        let mut left = rows;
        while left > 0 {
            between()?;
            self.load_batch()?;
            let (batch, at) = self.batch.as_ref().expect("loaded");
            let (batch, at) = (batch, *at);
            let n = ((batch.rows - at) as u64).min(left) as usize;
            for (column, (g, f)) in cols.iter_mut().zip(&self.fields).enumerate() {
                append_rows(g, batch, column, f, at, at + n);
            }
            left -= n as u64;
            let next = at + n;
            if next == batch.rows {
                self.batch = None;
            } else if let Some((_, at)) = &mut self.batch {
                *at = next;
            }
        }
        let mut plans = Vec::with_capacity(cols.len() * 2);
        let mut bufs: Vec<TensorBytes> = Vec::with_capacity(cols.len() * 2);
        for (g, f) in cols.into_iter().zip(&self.fields) {
            let spec = &f.spec;
            match g {
                Gathered::Fixed(bytes) => {
                    plans.push(TensorPlan {
                        name: spec.name.clone(),
                        dtype: spec.dtype,
                        shape: std::iter::once(rows)
                            .chain(spec.shape.iter().copied())
                            .collect(),
                        encrypted: f.encrypted,
                        layout: Layout::Fixed,
                        len: bytes.len() as u64,
                    });
                    bufs.push(TensorBytes::Pieces(bytes));
                }
                Gathered::Ragged {
                    values,
                    offsets,
                    elements,
                } => {
                    plans.push(TensorPlan {
                        name: spec.name.clone(),
                        dtype: spec.dtype,
                        shape: std::iter::once(elements)
                            .chain(spec.shape.iter().copied())
                            .collect(),
                        encrypted: f.encrypted,
                        layout: Layout::Ragged,
                        len: values.len() as u64,
                    });
                    plans.push(TensorPlan {
                        name: format!("{}{OFFSETS_SUFFIX}", spec.name),
                        dtype: Dtype::I64,
                        shape: vec![rows + 1],
                        encrypted: f.encrypted,
                        layout: Layout::RowOffsets,
                        len: offsets.len() as u64,
                    });
                    bufs.push(TensorBytes::Pieces(values));
                    bufs.push(TensorBytes::Segments(offsets));
                }
            }
        }
        let bytes: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        desc.tensors = lay_out(plans, desc.chunk_size);
        Ok(GatheredShard { desc, bufs, bytes })
    }

    /// Pulls (and checks) the next batch when the current one is used up.
    fn load_batch(&mut self) -> Result<()> {
        while self.batch.is_none() {
            let Some(input) = self.inputs.front_mut() else {
                return Err(Error::InvalidArgument(format!(
                    "{}: the inputs ended before the rows they announced",
                    self.batch_input.display()
                )));
            };
            self.batch_input = input.path().to_path_buf();
            match input.next_batch()? {
                Some(b) if b.rows > 0 => {
                    check_batch(&self.batch_input, &self.fields, &b)?;
                    self.batch = Some((Arc::new(b), 0));
                }
                Some(_) => {}
                None => {
                    self.inputs.pop_front();
                }
            }
        }
        Ok(())
    }
}

/// Appends rows `a..b` of column `column` of `batch` to `g`: its bytes by reference, ragged
/// row offsets rebased to the shard. The batch was checked ([`check_batch`]).
fn append_rows(
    g: &mut Gathered,
    batch: &Arc<RowBatch>,
    column: usize,
    f: &Field,
    a: usize,
    b: usize,
) {
    match (g, &batch.columns[column]) {
        (Gathered::Fixed(out), ColumnData::Fixed(_)) => {
            let rb = f.unit_bytes as usize;
            out.push(batch, column, a * rb..b * rb);
        }
        (
            Gathered::Ragged {
                values: out,
                offsets: out_offsets,
                elements,
            },
            ColumnData::Ragged { offsets, .. },
        ) => {
            let eb = f.unit_bytes as usize;
            let (first, last) = (offsets[a], offsets[b]);
            out.push(batch, column, first as usize * eb..last as usize * eb);
            let base = *elements;
            let mut le = Zeroizing::new(Vec::with_capacity(8 * (b - a)));
            for &o in &offsets[a + 1..=b] {
                le.extend_from_slice(&((base + o - first) as i64).to_le_bytes());
            }
            out_offsets.extend_from_slice(&le);
            *elements = base + (last - first);
        }
        _ => unreachable!("check_batch matched the columns to the fields"),
    }
}

/// Checks that a batch's columns are what the input's fields say, so a reader's mistake is an
/// error naming the input, never a wrong shard or a panic.
fn check_batch(path: &Path, fields: &[Field], b: &RowBatch) -> Result<()> {
    let bad = |field: &Field, what: String| {
        Error::InvalidArgument(format!(
            "{}: column '{}': {what}",
            path.display(),
            crate::format::json::quote(&field.spec.name)
        ))
    };
    if b.columns.len() != fields.len() {
        return Err(Error::InvalidArgument(format!(
            "{}: a batch holds {} columns, the input announced {}",
            path.display(),
            b.columns.len(),
            fields.len()
        )));
    }
    for (c, f) in b.columns.iter().zip(fields) {
        match c {
            ColumnData::Fixed(bytes) if !f.spec.ragged => {
                if (b.rows as u64).checked_mul(f.unit_bytes) != Some(bytes.len() as u64) {
                    return Err(bad(
                        f,
                        format!(
                            "{} bytes for {} rows of {} bytes",
                            bytes.len(),
                            b.rows,
                            f.unit_bytes
                        ),
                    ));
                }
            }
            ColumnData::Ragged { values, offsets } if f.spec.ragged => {
                if offsets.len() != b.rows + 1 || offsets[0] != 0 {
                    return Err(bad(
                        f,
                        format!(
                            "{} row offsets for {} rows (or the first is not 0)",
                            offsets.len(),
                            b.rows
                        ),
                    ));
                }
                if let Some(r) = offsets.windows(2).position(|w| w[1] < w[0]) {
                    return Err(bad(f, format!("row offsets decrease at row {r}")));
                }
                let last = offsets[b.rows];
                if last.checked_mul(f.unit_bytes) != Some(values.len() as u64)
                    || last > i64::MAX as u64
                {
                    return Err(bad(
                        f,
                        format!(
                            "{} value bytes for {last} elements of {} bytes",
                            values.len(),
                            f.unit_bytes
                        ),
                    ));
                }
            }
            _ => {
                return Err(bad(
                    f,
                    "a batch's column is not of the announced kind".into(),
                ));
            }
        }
    }
    Ok(())
}

/// In-memory columns (fixed and ragged) side by side, as one row-batch input.
struct MemTable<'a> {
    fields: Vec<FieldSpec>,
    inputs: Vec<&'a ConvertInput>,
    rows: u64,
    bytes: u64,
    next: u64,
}

impl<'a> MemTable<'a> {
    fn new(inputs: &'a [ConvertInput]) -> Result<Self> {
        let mut fields = Vec::new();
        let mut rows = None;
        let mut bytes = 0u64;
        for input in inputs {
            let (spec, n, len) = match input {
                ConvertInput::InMemory {
                    name,
                    dtype,
                    shape,
                    data,
                } => {
                    if super::tensor_bytes(*dtype, shape) != Some(data.len() as u64) {
                        return Err(mem_error(
                            name,
                            format!(
                                "{} bytes do not match dtype {dtype} and shape {shape:?}",
                                data.len()
                            ),
                        ));
                    }
                    let Some((&n, row)) = shape.split_first() else {
                        return Err(mem_error(name, "is a scalar; a dataset's columns share a first dimension (the row count)".into()));
                    };
                    let spec = FieldSpec {
                        name: name.clone(),
                        dtype: *dtype,
                        shape: row.to_vec(),
                        ragged: false,
                    };
                    (spec, n, data.len())
                }
                ConvertInput::Ragged {
                    name,
                    dtype,
                    shape,
                    values,
                    offsets,
                } => {
                    let unit = super::tensor_bytes(*dtype, shape);
                    let ok = offsets.first() == Some(&0)
                        && offsets.windows(2).all(|w| w[0] <= w[1])
                        && unit.and_then(|u| offsets.last()?.checked_mul(u))
                            == Some(values.len() as u64);
                    if !ok {
                        return Err(mem_error(
                            name,
                            format!(
                                "{} offsets do not start at 0, increase and end at the {} value bytes' element count",
                                offsets.len(),
                                values.len()
                            ),
                        ));
                    }
                    let spec = FieldSpec {
                        name: name.clone(),
                        dtype: *dtype,
                        shape: shape.clone(),
                        ragged: true,
                    };
                    (spec, offsets.len() as u64 - 1, values.len())
                }
                _ => unreachable!("only in-memory inputs"),
            };
            match rows {
                Some(r) if r != n => {
                    return Err(mem_error(
                        &spec.name,
                        format!("has {n} rows, an earlier in-memory column {r}"),
                    ));
                }
                _ => rows = Some(n),
            }
            bytes = bytes.saturating_add(len as u64);
            fields.push(spec);
        }
        Ok(MemTable {
            fields,
            inputs: inputs.iter().collect(),
            rows: rows.unwrap_or(0),
            bytes,
            next: 0,
        })
    }
}

fn mem_error(name: &str, what: String) -> Error {
    Error::InvalidArgument(format!(
        "in-memory column '{}' {what}",
        crate::format::json::quote(name)
    ))
}

impl RecordInput for MemTable<'_> {
    fn path(&self) -> &Path {
        Path::new("<memory>")
    }
    fn fields(&self) -> &[FieldSpec] {
        &self.fields
    }
    fn rows(&self) -> u64 {
        self.rows
    }
    fn estimated_bytes(&self) -> u64 {
        self.bytes
    }
    fn next_batch(&mut self) -> Result<Option<RowBatch>> {
        let (a, b) = (
            self.next,
            (self.next + MEM_BATCH_ROWS as u64).min(self.rows),
        );
        if a == b {
            return Ok(None);
        }
        self.next = b;
        let (a, b) = (a as usize, b as usize);
        let columns = self
            .inputs
            .iter()
            .map(|input| match input {
                ConvertInput::InMemory {
                    data, shape, dtype, ..
                } => {
                    let rb = super::tensor_bytes(*dtype, &shape[1..]).expect("checked") as usize;
                    ColumnData::Fixed(Zeroizing::new(data[a * rb..b * rb].to_vec()))
                }
                ConvertInput::Ragged {
                    values,
                    offsets,
                    dtype,
                    shape,
                    ..
                } => {
                    let eb = super::tensor_bytes(*dtype, shape).expect("checked") as usize;
                    let (first, last) = (offsets[a], offsets[b]);
                    ColumnData::Ragged {
                        values: Zeroizing::new(
                            values[first as usize * eb..last as usize * eb].to_vec(),
                        ),
                        offsets: Zeroizing::new(offsets[a..=b].iter().map(|o| o - first).collect()),
                    }
                }
                _ => unreachable!("only in-memory inputs"),
            })
            .collect();
        Ok(Some(RowBatch {
            rows: b - a,
            columns,
        }))
    }
}
