//! Arrow columns as ciphershard columns: an Arrow [`Field`] as a [`FieldSpec`], an Arrow array
//! as a [`ColumnData`]. The Parquet and Arrow IPC readers both decode into Arrow record
//! batches and hand them here, so the two formats map types the same way.
//!
//! | Arrow type | column |
//! | --- | --- |
//! | `Int8`..`Int64`, `UInt8`..`UInt64`, `Float16`/`32`/`64` | fixed, row shape `[]`, the same dtype |
//! | `Boolean` | fixed `BOOL`, row shape `[]`, one byte per value (0 or 1) |
//! | `FixedSizeBinary(n)` | fixed `U8`, row shape `[n]` |
//! | `FixedSizeList(T, n)`, `T` one of the above (nested too) | fixed, row shape `[n]` + `T`'s shape |
//! | `List(T)`, `LargeList(T)`, `T` one of the above | ragged, element shape `T`'s shape |
//! | `Binary`, `LargeBinary`, `BinaryView`, `Utf8`, `LargeUtf8`, `Utf8View` | ragged `U8`, element shape `[]` |
//! | `Dictionary(K, V)` | decoded: as `V` |
//!
//! Everything else (structs, maps, unions, lists of variable lists, decimals, dates, times,
//! timestamps, intervals, the null type, list views, run-end encoding) is refused with an error
//! naming the file, the column and its Arrow type. So is any null, at any depth (a null row, or
//! a null element of a row's list), naming the first row that holds one: a shard has no nulls.
//!
//! Arrays may be slices (a non-zero array offset, list offsets that do not start at 0): only
//! the rows they show are copied, and ragged offsets are rebased to start at 0. Values are
//! written little-endian whatever the host. The copies are [`Zeroizing`]; the Arrow arrays
//! they are copied from are the decoder's, and are not.

#![forbid(unsafe_code)]
// Until the converter reads these inputs (issue 14, written beside them); remove with it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{ByteArrayType, ByteViewType};
use arrow_array::{
    Array, ArrayRef, GenericByteArray, GenericByteViewArray, OffsetSizeTrait, RecordBatch,
};
use arrow_buffer::ArrowNativeType;
use arrow_schema::{DataType, Field, Schema};
use zeroize::Zeroizing;

use super::records::{ColumnData, FieldSpec, RecordInput, RowBatch};
use crate::error::{Error, Result};
use crate::format::json::quote;
use crate::format::{Dtype, tensor_bytes};

/// A [`RecordInput`] over decoded Arrow record batches: what the Parquet and Arrow IPC readers
/// return. It checks every batch against the schema and the batches' total against the row
/// count read when the input was opened, and skips empty batches.
pub(super) struct ArrowRecords {
    path: PathBuf,
    what: &'static str,
    fields: Vec<FieldSpec>,
    rows: u64,
    estimated_bytes: u64,
    metadata: BTreeMap<String, String>,
    batches: Box<dyn Iterator<Item = Result<RecordBatch>> + Send>,
    /// Rows returned so far.
    delivered: u64,
}

impl ArrowRecords {
    /// Input `path`, a `what` ("Parquet file", for errors) of `rows` rows (from its footer or
    /// a first pass) holding columns `fields` ([`fields`] of its schema); `batches` decodes its
    /// record batches in order, each error naming the file.
    pub(super) fn boxed(
        path: &Path,
        what: &'static str,
        fields: Vec<FieldSpec>,
        rows: u64,
        estimated_bytes: u64,
        metadata: BTreeMap<String, String>,
        batches: impl Iterator<Item = Result<RecordBatch>> + Send + 'static,
    ) -> Box<dyn RecordInput> {
        Box::new(ArrowRecords {
            path: path.to_path_buf(),
            what,
            fields,
            rows,
            estimated_bytes,
            metadata,
            batches: Box::new(batches),
            delivered: 0,
        })
    }
}

impl RecordInput for ArrowRecords {
    fn path(&self) -> &Path {
        &self.path
    }

    fn fields(&self) -> &[FieldSpec] {
        &self.fields
    }

    fn rows(&self) -> u64 {
        self.rows
    }

    fn estimated_bytes(&self) -> u64 {
        self.estimated_bytes
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        self.metadata.clone()
    }

    fn next_batch(&mut self) -> Result<Option<RowBatch>> {
        loop {
            let Some(batch) = self.batches.next() else {
                if self.delivered != self.rows {
                    return Err(Error::format(
                        &self.path,
                        self.what,
                        format!(
                            "its batches end after {} rows, but it counts {}",
                            self.delivered, self.rows
                        ),
                    ));
                }
                return Ok(None);
            };
            let batch = batch?;
            let n = batch.num_rows() as u64;
            if n == 0 {
                continue;
            }
            if n > self.rows - self.delivered {
                return Err(Error::format(
                    &self.path,
                    self.what,
                    format!(
                        "its batches hold more than the {} rows it counts",
                        self.rows
                    ),
                ));
            }
            let rows = row_batch(&self.path, &self.fields, &batch, self.delivered)?;
            self.delivered += n;
            return Ok(Some(rows));
        }
    }
}

/// What [`field_spec`] accepts, for its refusals.
pub const SUPPORTED: &str = "integers, floats and booleans, fixed-size lists of them (nested \
     too) and fixed-size binary, lists and large lists of those, strings and binary (plain, \
     large or view), any of them dictionary-encoded, without nulls";

/// The columns of `schema`, in order. Refuses a schema without columns and duplicate names (a
/// shard's columns are named).
pub fn fields(path: &Path, schema: &Schema) -> Result<Vec<FieldSpec>> {
    if schema.fields().is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: the schema has no columns",
            path.display()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    let mut specs = Vec::with_capacity(schema.fields().len());
    for f in schema.fields() {
        if !seen.insert(f.name().as_str()) {
            return Err(Error::InvalidArgument(format!(
                "{}: column '{}' appears twice in the schema",
                path.display(),
                quote(f.name())
            )));
        }
        specs.push(field_spec(path, f)?);
    }
    Ok(specs)
}

/// The column that Arrow field `field` of input `path` becomes (see the module doc).
pub fn field_spec(path: &Path, field: &Field) -> Result<FieldSpec> {
    spec_of(field.name(), field.data_type())
        .ok_or_else(|| unsupported(path, field.name(), field.data_type()))
}

/// [`field_spec`] from a name and a type; `None` when the type is not supported.
fn spec_of(name: &str, data_type: &DataType) -> Option<FieldSpec> {
    let data_type = match data_type {
        DataType::Dictionary(_, value) => value.as_ref(),
        t => t,
    };
    let (dtype, shape, ragged) = match data_type {
        DataType::List(child) | DataType::LargeList(child) => {
            let (dtype, shape) = fixed_of(child.data_type())?;
            (dtype, shape, true)
        }
        DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView
        | DataType::Utf8
        | DataType::LargeUtf8
        | DataType::Utf8View => (Dtype::U8, Vec::new(), true),
        t => {
            let (dtype, shape) = fixed_of(t)?;
            (dtype, shape, false)
        }
    };
    Some(FieldSpec {
        name: name.to_string(),
        dtype,
        shape,
        ragged,
    })
}

/// The dtype and shape of one value of a fixed-size Arrow type; `None` for any other type.
fn fixed_of(data_type: &DataType) -> Option<(Dtype, Vec<u64>)> {
    let dtype = match data_type {
        DataType::Boolean => Dtype::BOOL,
        DataType::Int8 => Dtype::I8,
        DataType::Int16 => Dtype::I16,
        DataType::Int32 => Dtype::I32,
        DataType::Int64 => Dtype::I64,
        DataType::UInt8 => Dtype::U8,
        DataType::UInt16 => Dtype::U16,
        DataType::UInt32 => Dtype::U32,
        DataType::UInt64 => Dtype::U64,
        DataType::Float16 => Dtype::F16,
        DataType::Float32 => Dtype::F32,
        DataType::Float64 => Dtype::F64,
        DataType::FixedSizeBinary(n) => return Some((Dtype::U8, vec![u64::try_from(*n).ok()?])),
        DataType::FixedSizeList(child, n) => {
            let (dtype, mut shape) = fixed_of(child.data_type())?;
            shape.insert(0, u64::try_from(*n).ok()?);
            return Some((dtype, shape));
        }
        _ => return None,
    };
    Some((dtype, Vec::new()))
}

fn unsupported(path: &Path, name: &str, data_type: &DataType) -> Error {
    Error::InvalidArgument(format!(
        "{}: column '{}' has Arrow type {}, which ciphershard cannot store (supported: {SUPPORTED})",
        path.display(),
        quote(name),
        quote(&data_type.to_string())
    ))
}

/// The rows of Arrow record batch `batch` as columns `fields` (what [`fields`] gave for the
/// input's schema). `first_row`: the input's row at which `batch` starts, for errors.
pub fn row_batch(
    path: &Path,
    fields: &[FieldSpec],
    batch: &RecordBatch,
    first_row: u64,
) -> Result<RowBatch> {
    if batch.num_columns() != fields.len() {
        return Err(Error::format(
            path,
            "record batch",
            format!(
                "a batch at row {first_row} has {} columns, the schema {}",
                batch.num_columns(),
                fields.len()
            ),
        ));
    }
    let columns = fields
        .iter()
        .zip(batch.columns())
        .map(|(spec, array)| column(path, spec, array, first_row))
        .collect::<Result<_>>()?;
    Ok(RowBatch {
        rows: batch.num_rows(),
        columns,
    })
}

/// Copies the rows of `array` as column `spec`. `first_row`: the input's row at which `array`
/// starts, for errors. Refuses an array whose type does not map to `spec`, and any null.
pub fn column(
    path: &Path,
    spec: &FieldSpec,
    array: &ArrayRef,
    first_row: u64,
) -> Result<ColumnData> {
    let decoded;
    let array: &dyn Array = match array.as_any_dictionary_opt() {
        Some(dict) => {
            decoded = arrow_select::take::take(dict.values().as_ref(), dict.keys(), None)
                .map_err(|e| arrow_error(path, "dictionary column", e))?;
            decoded.as_ref()
        }
        None => array.as_ref(),
    };
    let found = spec_of(&spec.name, array.data_type());
    if found.as_ref() != Some(spec) {
        return Err(match found {
            None => unsupported(path, &spec.name, array.data_type()),
            Some(_) => Error::format(
                path,
                "record batch",
                format!(
                    "column '{}' is {} at row {first_row}, not the schema's type",
                    quote(&spec.name),
                    quote(&array.data_type().to_string())
                ),
            ),
        });
    }
    if let Some(row) = first_null_row(array) {
        return Err(Error::InvalidArgument(format!(
            "{}: column '{}' has a null at row {} (counting from 0; a null row or a null in its list): a shard holds no nulls, fill or drop them first",
            path.display(),
            quote(&spec.name),
            first_row + row as u64
        )));
    }
    let too_big = || {
        Error::InvalidArgument(format!(
            "{}: column '{}': a batch at row {first_row} holds more bytes than this machine can address",
            path.display(),
            quote(&spec.name)
        ))
    };
    // Bytes per row (fixed) or per element (ragged).
    let unit = tensor_bytes(spec.dtype, &spec.shape).ok_or_else(too_big)?;
    if !spec.ragged {
        let out = fixed(array, array.len(), unit).ok_or_else(too_big)?;
        return Ok(ColumnData::Fixed(out));
    }
    let (values, offsets) = match array.data_type() {
        DataType::List(_) => list(array.as_list::<i32>(), unit),
        DataType::LargeList(_) => list(array.as_list::<i64>(), unit),
        DataType::Binary => bytes(array.as_binary::<i32>()),
        DataType::LargeBinary => bytes(array.as_binary::<i64>()),
        DataType::Utf8 => bytes(array.as_string::<i32>()),
        DataType::LargeUtf8 => bytes(array.as_string::<i64>()),
        DataType::BinaryView => views(array.as_binary_view()),
        DataType::Utf8View => views(array.as_string_view()),
        _ => unreachable!("spec_of maps only these types to ragged columns"),
    }
    .ok_or_else(too_big)?;
    Ok(ColumnData::Ragged { values, offsets })
}

/// An Arrow error while decoding input `path`.
pub(super) fn arrow_error(path: &Path, what: &'static str, e: impl std::fmt::Display) -> Error {
    Error::format(path, what, e.to_string())
}

/// The first row of `array` (counting from its own start) that is null or holds a null at
/// any depth; `None` when there is none.
fn first_null_row(array: &dyn Array) -> Option<usize> {
    let own = array
        .nulls()
        .filter(|n| n.null_count() > 0)
        .and_then(|n| n.iter().position(|valid| !valid));
    let inner = match array.data_type() {
        DataType::FixedSizeList(_, n) if *n > 0 => {
            first_null_row(array.as_fixed_size_list().values().as_ref()).map(|i| i / *n as usize)
        }
        DataType::List(_) => list_null_row(array.as_list::<i32>()),
        DataType::LargeList(_) => list_null_row(array.as_list::<i64>()),
        _ => None,
    };
    match (own, inner) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The first row of list array `list` whose elements hold a null.
fn list_null_row<O: OffsetSizeTrait>(list: &arrow_array::GenericListArray<O>) -> Option<usize> {
    let offsets = list.value_offsets();
    let (start, end) = (offsets[0].as_usize(), offsets[offsets.len() - 1].as_usize());
    let element = first_null_row(list.values().slice(start, end - start).as_ref())?;
    // The row whose range holds element `start + element`: the last offset at or before it.
    Some(offsets.partition_point(|o| o.as_usize() <= start + element) - 1)
}

/// The first `count` values of fixed-size array `array` (a type [`fixed_of`] accepts),
/// `unit` bytes each, little-endian. `None` if they do not fit in memory.
///
/// The buffer is allocated once at its final size: a [`Zeroizing`] vector that grew would
/// leave its earlier allocations, plaintext, behind unzeroed.
fn fixed(array: &dyn Array, count: usize, unit: u64) -> Option<Zeroizing<Vec<u8>>> {
    let len = usize::try_from(unit).ok()?.checked_mul(count)?;
    let mut out = Zeroizing::new(Vec::new());
    out.try_reserve_exact(len).ok()?;
    append_fixed(array.slice(0, count).as_ref(), &mut out);
    debug_assert_eq!(out.len(), len, "unit is the size of one value");
    Some(out)
}

/// Appends the values of fixed-size array `array` (a type [`fixed_of`] accepts), row after
/// row, little-endian, into `out`, which has room for them.
fn append_fixed(array: &dyn Array, out: &mut Vec<u8>) {
    match array.data_type() {
        DataType::Boolean => out.extend(array.as_boolean().values().iter().map(u8::from)),
        DataType::FixedSizeBinary(_) => {
            out.extend_from_slice(array.as_fixed_size_binary().value_data());
        }
        DataType::FixedSizeList(_, n) => {
            let list = array.as_fixed_size_list();
            // A fixed-size list's values are exactly its rows' (arrow-rs slices them with it).
            let len = list.len() * *n as usize;
            append_fixed(list.values().slice(0, len).as_ref(), out);
        }
        t => {
            let width = t
                .primitive_width()
                .expect("fixed_of accepts only these and primitives");
            let data = array.to_data();
            let start = data.offset() * width;
            let at = out.len();
            out.extend_from_slice(&data.buffers()[0].as_slice()[start..start + data.len() * width]);
            if cfg!(target_endian = "big") {
                out[at..].chunks_exact_mut(width).for_each(<[u8]>::reverse);
            }
        }
    }
}

/// A ragged column's values and offsets.
type Ragged = (Zeroizing<Vec<u8>>, Zeroizing<Vec<u64>>);

/// The elements and rebased offsets of list array `list` (of a fixed-size element type of
/// `unit` bytes).
fn list<O: OffsetSizeTrait>(list: &arrow_array::GenericListArray<O>, unit: u64) -> Option<Ragged> {
    let offsets = rebase(list.value_offsets())?;
    let start = list.value_offsets()[0].as_usize();
    let count = offsets[offsets.len() - 1] as usize;
    let values = fixed(list.values().slice(start, count).as_ref(), count, unit)?;
    Some((values, offsets))
}

/// The bytes and rebased offsets of string or binary array `array`.
fn bytes<T: ByteArrayType>(array: &GenericByteArray<T>) -> Option<Ragged> {
    let offsets = rebase(array.value_offsets())?;
    let start = array.value_offsets()[0].as_usize();
    let data = &array.value_data()[start..start + offsets[offsets.len() - 1] as usize];
    let mut values = Zeroizing::new(Vec::new());
    values.try_reserve_exact(data.len()).ok()?;
    values.extend_from_slice(data);
    Some((values, offsets))
}

/// Arrow offsets (the `len + 1` of a slice) as element offsets from 0.
fn rebase<O: OffsetSizeTrait>(offsets: &[O]) -> Option<Zeroizing<Vec<u64>>> {
    let base = offsets[0].as_usize() as u64;
    let mut out = Zeroizing::new(Vec::new());
    out.try_reserve_exact(offsets.len()).ok()?;
    out.extend(offsets.iter().map(|o| o.as_usize() as u64 - base));
    Some(out)
}

/// The bytes and offsets of string or binary view array `array`.
fn views<T: ByteViewType + ?Sized>(array: &GenericByteViewArray<T>) -> Option<Ragged> {
    let mut offsets = Zeroizing::new(Vec::new());
    offsets.try_reserve_exact(array.len() + 1).ok()?;
    offsets.push(0);
    let mut end = 0u64;
    for len in array.lengths() {
        end += u64::from(len);
        offsets.push(end);
    }
    let mut values = Zeroizing::new(Vec::new());
    values.try_reserve_exact(usize::try_from(end).ok()?).ok()?;
    for i in 0..array.len() {
        values.extend_from_slice(array.value(i).as_ref());
    }
    Some((values, offsets))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::builder::{FixedSizeListBuilder, Int32Builder, ListBuilder};
    use arrow_array::types::{Float16Type, Int32Type, Int64Type};
    use arrow_array::*;
    use arrow_buffer::{Buffer, NullBuffer, OffsetBuffer, ScalarBuffer};
    use arrow_schema::{Field, Fields, TimeUnit};

    use super::*;

    const P: &str = "in.parquet";

    fn spec(name: &str, dtype: Dtype, shape: &[u64], ragged: bool) -> FieldSpec {
        FieldSpec {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            ragged,
        }
    }

    /// The column `array` becomes, its spec derived from its type.
    fn convert(array: ArrayRef) -> Result<(FieldSpec, ColumnData)> {
        convert_at(array, 0)
    }

    fn convert_at(array: ArrayRef, first_row: u64) -> Result<(FieldSpec, ColumnData)> {
        let field = Field::new("c", array.data_type().clone(), true);
        let s = field_spec(Path::new(P), &field)?;
        let data = column(Path::new(P), &s, &array, first_row)?;
        Ok((s, data))
    }

    fn fixed(data: ColumnData) -> Vec<u8> {
        match data {
            ColumnData::Fixed(v) => v.to_vec(),
            other => panic!("not fixed: {other:?}"),
        }
    }

    fn ragged(data: ColumnData) -> (Vec<u8>, Vec<u64>) {
        match data {
            ColumnData::Ragged { values, offsets } => (values.to_vec(), offsets.to_vec()),
            other => panic!("not ragged: {other:?}"),
        }
    }

    fn le<T: Copy, const N: usize>(values: &[T], f: fn(T) -> [u8; N]) -> Vec<u8> {
        values.iter().flat_map(|&v| f(v)).collect()
    }

    #[test]
    fn primitives_are_fixed_columns_of_little_endian_values() {
        let cases: Vec<(ArrayRef, Dtype, Vec<u8>)> = vec![
            (
                Arc::new(Int8Array::from(vec![-1, 2])),
                Dtype::I8,
                vec![0xff, 2],
            ),
            (
                Arc::new(Int16Array::from(vec![-2, 3])),
                Dtype::I16,
                le(&[-2i16, 3], i16::to_le_bytes),
            ),
            (
                Arc::new(Int32Array::from(vec![-3, 4])),
                Dtype::I32,
                le(&[-3i32, 4], i32::to_le_bytes),
            ),
            (
                Arc::new(Int64Array::from(vec![-4, 5])),
                Dtype::I64,
                le(&[-4i64, 5], i64::to_le_bytes),
            ),
            (
                Arc::new(UInt8Array::from(vec![250, 6])),
                Dtype::U8,
                vec![250, 6],
            ),
            (
                Arc::new(UInt16Array::from(vec![65535, 7])),
                Dtype::U16,
                le(&[65535u16, 7], u16::to_le_bytes),
            ),
            (
                Arc::new(UInt32Array::from(vec![1 << 31, 8])),
                Dtype::U32,
                le(&[1u32 << 31, 8], u32::to_le_bytes),
            ),
            (
                Arc::new(UInt64Array::from(vec![u64::MAX, 9])),
                Dtype::U64,
                le(&[u64::MAX, 9], u64::to_le_bytes),
            ),
            (
                Arc::new(Float32Array::from(vec![1.5, -0.0])),
                Dtype::F32,
                le(&[1.5f32, -0.0], f32::to_le_bytes),
            ),
            (
                Arc::new(Float64Array::from(vec![2.5, 1e300])),
                Dtype::F64,
                le(&[2.5f64, 1e300], f64::to_le_bytes),
            ),
            (
                // 1.0 and -2.0 as IEEE half floats.
                Arc::new(PrimitiveArray::<Float16Type>::new(
                    ScalarBuffer::new(Buffer::from_vec(vec![0x3c00u16, 0xc000]), 0, 2),
                    None,
                )),
                Dtype::F16,
                le(&[0x3c00u16, 0xc000], u16::to_le_bytes),
            ),
            (
                Arc::new(BooleanArray::from(vec![true, false, true])),
                Dtype::BOOL,
                vec![1, 0, 1],
            ),
        ];
        for (array, dtype, bytes) in cases {
            let t = array.data_type().clone();
            let (s, data) = convert(array).unwrap();
            assert_eq!(s, spec("c", dtype, &[], false), "{t}");
            assert_eq!(fixed(data), bytes, "{t}");
        }
    }

    #[test]
    fn sliced_fixed_arrays_copy_only_their_rows() {
        let a: ArrayRef = Arc::new(Int32Array::from(vec![1, 2, 3, 4, 5]).slice(1, 3));
        assert_eq!(
            fixed(convert(a).unwrap().1),
            le(&[2i32, 3, 4], i32::to_le_bytes)
        );
        // Bits of a boolean slice start mid-byte.
        let bools = BooleanArray::from((0..20).map(|i| i % 3 == 0).collect::<Vec<_>>());
        let a: ArrayRef = Arc::new(bools.slice(5, 7));
        let want: Vec<u8> = (5..12).map(|i| u8::from(i % 3 == 0)).collect();
        assert_eq!(fixed(convert(a).unwrap().1), want);
        // A fixed-size list sliced: its values follow.
        let a = fsl_i32(&[1, 2, 3, 4, 5, 6, 7, 8], 2).slice(1, 2);
        let (s, data) = convert(Arc::new(a)).unwrap();
        assert_eq!(s, spec("c", Dtype::I32, &[2], false));
        assert_eq!(fixed(data), le(&[3i32, 4, 5, 6], i32::to_le_bytes));
    }

    fn fsl_i32(values: &[i32], n: i32) -> FixedSizeListArray {
        let field = Arc::new(Field::new_list_field(DataType::Int32, false));
        FixedSizeListArray::new(field, n, Arc::new(Int32Array::from(values.to_vec())), None)
    }

    #[test]
    fn fixed_size_lists_and_binary_are_fixed_shapes() {
        // [2, 3] rows: a fixed-size list of 2 fixed-size lists of 3.
        let inner = fsl_i32(&(0..12).collect::<Vec<_>>(), 3);
        let outer = FixedSizeListArray::new(
            Arc::new(Field::new_list_field(inner.data_type().clone(), false)),
            2,
            Arc::new(inner),
            None,
        );
        let (s, data) = convert(Arc::new(outer.slice(1, 1))).unwrap();
        assert_eq!(s, spec("c", Dtype::I32, &[2, 3], false));
        assert_eq!(
            fixed(data),
            le(&(6..12).collect::<Vec<i32>>(), i32::to_le_bytes)
        );
        let bin =
            FixedSizeBinaryArray::try_from_iter([b"abc", b"def", b"ghi"].into_iter()).unwrap();
        let (s, data) = convert(Arc::new(bin.slice(1, 2))).unwrap();
        assert_eq!(s, spec("c", Dtype::U8, &[3], false));
        assert_eq!(fixed(data), b"defghi");
    }

    #[test]
    fn lists_are_ragged_with_offsets_rebased_to_zero() {
        let list = ListArray::from_iter_primitive::<Int32Type, _, _>([
            Some(vec![Some(1), Some(2)]),
            Some(vec![]),
            Some(vec![Some(3), Some(4), Some(5)]),
            Some(vec![Some(6)]),
        ]);
        // Rows 1..4: offsets 2, 2, 5, 6 in the array, 0, 0, 3, 4 in the column.
        let (s, data) = convert(Arc::new(list.slice(1, 3))).unwrap();
        assert_eq!(s, spec("c", Dtype::I32, &[], true));
        let (values, offsets) = ragged(data);
        assert_eq!(values, le(&[3i32, 4, 5, 6], i32::to_le_bytes));
        assert_eq!(offsets, [0, 0, 3, 4]);
        // A large list of 2-vectors: element shape [2], offsets count elements.
        let mut b = ListBuilder::new(FixedSizeListBuilder::new(Int32Builder::new(), 2));
        for row in [&[][..], &[[1, 2], [3, 4]], &[[5, 6]]] {
            for pair in row {
                b.values().values().append_slice(pair);
                b.values().append(true);
            }
            b.append(true);
        }
        let list = b.finish();
        let large = LargeListArray::new(
            Arc::new(Field::new_list_field(
                list.values().data_type().clone(),
                true,
            )),
            OffsetBuffer::new(ScalarBuffer::from(vec![0i64, 0, 2, 3])),
            list.values().clone(),
            None,
        );
        let (s, data) = convert(Arc::new(large.slice(1, 2))).unwrap();
        assert_eq!(s, spec("c", Dtype::I32, &[2], true));
        let (values, offsets) = ragged(data);
        assert_eq!(values, le(&[1i32, 2, 3, 4, 5, 6], i32::to_le_bytes));
        assert_eq!(offsets, [0, 2, 3]);
        // Only empty lists.
        let empty = ListArray::from_iter_primitive::<Int64Type, _, _>([Some(vec![]), Some(vec![])]);
        let (values, offsets) = ragged(convert(Arc::new(empty)).unwrap().1);
        assert_eq!((values.len(), offsets), (0, vec![0, 0, 0]));
    }

    #[test]
    fn strings_and_binary_are_ragged_bytes() {
        let s = StringArray::from(vec!["skip", "héllo", "", "x"]).slice(1, 3);
        let cases: Vec<ArrayRef> = vec![
            Arc::new(s),
            Arc::new(LargeStringArray::from(vec!["héllo", "", "x"])),
            Arc::new(BinaryArray::from(vec!["héllo".as_bytes(), b"", b"x"])),
            Arc::new(LargeBinaryArray::from(vec!["héllo".as_bytes(), b"", b"x"])),
            Arc::new(StringViewArray::from(vec!["héllo", "", "x"])),
            Arc::new(BinaryViewArray::from(vec!["héllo".as_bytes(), b"", b"x"])),
            // Longer than a view's 12 inline bytes: held in a data buffer.
            Arc::new(StringViewArray::from(vec!["skip me", "héllo", "", "x"]).slice(1, 3)),
        ];
        for a in cases {
            let t = a.data_type().clone();
            let (s, data) = convert(a).unwrap();
            assert_eq!(s, spec("c", Dtype::U8, &[], true), "{t}");
            let (values, offsets) = ragged(data);
            assert_eq!(values, "héllox".as_bytes(), "{t}");
            assert_eq!(offsets, [0, 6, 6, 7], "{t}");
        }
        let long = "a string longer than twelve bytes";
        let a = StringViewArray::from(vec![long, "b"]);
        let (values, offsets) = ragged(convert(Arc::new(a)).unwrap().1);
        assert_eq!(
            (values, offsets),
            (format!("{long}b").into_bytes(), vec![0, 33, 34])
        );
    }

    #[test]
    fn dictionaries_are_decoded() {
        let dict: DictionaryArray<Int32Type> = vec!["b", "a", "b", "ccc"].into_iter().collect();
        let (s, data) = convert(Arc::new(dict.slice(1, 3))).unwrap();
        assert_eq!(s, spec("c", Dtype::U8, &[], true));
        assert_eq!(ragged(data), (b"abccc".to_vec(), vec![0, 1, 2, 5]));
        let keys = Int8Array::from(vec![1, 0, 1]);
        let dict = DictionaryArray::new(keys, Arc::new(Int64Array::from(vec![10, 20])));
        let (s, data) = convert(Arc::new(dict)).unwrap();
        assert_eq!(s, spec("c", Dtype::I64, &[], false));
        assert_eq!(fixed(data), le(&[20i64, 10, 20], i64::to_le_bytes));
        // A null key is a null row.
        let keys = Int8Array::from(vec![Some(0), None]);
        let dict = DictionaryArray::new(keys, Arc::new(Int64Array::from(vec![10])));
        let e = convert_at(Arc::new(dict), 100).unwrap_err().to_string();
        assert!(e.contains("null at row 101"), "{e}");
    }

    #[test]
    fn nulls_are_refused_naming_file_column_and_first_row() {
        let null_row = |array: ArrayRef, first_row: u64, row: u64| {
            let e = convert_at(array, first_row).unwrap_err().to_string();
            assert!(e.contains(P) && e.contains("'c'"), "{e}");
            assert!(e.contains(&format!("null at row {row} ")), "{e}");
        };
        null_row(
            Arc::new(Int32Array::from(vec![Some(1), Some(2), None, None])),
            0,
            2,
        );
        // In a slice, rows count from the slice's start (plus the batch's first row).
        null_row(
            Arc::new(Int32Array::from(vec![None, Some(2), None]).slice(1, 2)),
            10,
            11,
        );
        null_row(Arc::new(StringArray::from(vec![Some("a"), None])), 0, 1);
        // A null element inside row 2's list, after an empty row 1.
        let list = ListArray::from_iter_primitive::<Int32Type, _, _>([
            Some(vec![Some(1)]),
            Some(vec![]),
            Some(vec![Some(3), None]),
            None,
        ]);
        null_row(Arc::new(list.clone()), 0, 2);
        null_row(Arc::new(list.slice(1, 3)), 0, 1);
        null_row(Arc::new(list.slice(3, 1)), 0, 0);
        // A null in a fixed-size list's values: row 1 of 2-vectors holds element 3.
        let field = Arc::new(Field::new_list_field(DataType::Int32, true));
        let values = Int32Array::from(vec![Some(1), Some(2), Some(3), None]);
        let fsl = FixedSizeListArray::new(field, 2, Arc::new(values), None);
        null_row(Arc::new(fsl), 0, 1);
        // A null row of a list whose own elements are fine comes first.
        let list = ListArray::new(
            Arc::new(Field::new_list_field(DataType::Int32, true)),
            OffsetBuffer::from_lengths([1, 1]),
            Arc::new(Int32Array::from(vec![Some(1), None])),
            Some(NullBuffer::from(vec![false, true])),
        );
        null_row(Arc::new(list), 0, 0);
    }

    #[test]
    fn unsupported_types_are_refused_naming_file_column_and_type() {
        let fields = Fields::from(vec![Field::new("x", DataType::Int32, false)]);
        let cases = [
            (DataType::Struct(fields), "Struct"),
            (
                DataType::List(Arc::new(Field::new_list_field(
                    DataType::List(Arc::new(Field::new_list_field(DataType::Int32, true))),
                    true,
                ))),
                "List(List(",
            ),
            (
                DataType::List(Arc::new(Field::new_list_field(DataType::Utf8, true))),
                "List(Utf8",
            ),
            (DataType::Decimal128(10, 2), "Decimal128(10, 2)"),
            (DataType::Timestamp(TimeUnit::Second, None), "Timestamp(s"),
            (DataType::Date32, "Date32"),
            (DataType::Null, "Null"),
        ];
        for (t, shown) in cases {
            let e = field_spec(Path::new(P), &Field::new("col", t.clone(), true))
                .unwrap_err()
                .to_string();
            assert!(e.contains(P) && e.contains("column 'col'"), "{e}");
            assert!(e.contains(shown), "{t}: {e}");
            assert!(e.contains("supported: integers"), "{e}");
        }
    }

    #[test]
    fn schemas_need_unique_columns() {
        let path = Path::new(P);
        let two = Schema::new(vec![
            Field::new("a", DataType::Int32, false),
            Field::new("b", DataType::Utf8, false),
        ]);
        let specs = fields(path, &two).unwrap();
        assert_eq!(specs[1], spec("b", Dtype::U8, &[], true));
        let same = Schema::new(vec![
            Field::new("a", DataType::Int32, false),
            Field::new("a", DataType::Int64, false),
        ]);
        let e = fields(path, &same).unwrap_err().to_string();
        assert!(e.contains("'a' appears twice"), "{e}");
        let e = fields(path, &Schema::empty()).unwrap_err().to_string();
        assert!(e.contains("no columns"), "{e}");
    }

    #[test]
    fn batches_must_match_the_schema() {
        let path = Path::new(P);
        let specs = vec![spec("a", Dtype::I32, &[], false)];
        let batch =
            RecordBatch::try_from_iter([("a", Arc::new(Int64Array::from(vec![1])) as ArrayRef)])
                .unwrap();
        let e = row_batch(path, &specs, &batch, 7).unwrap_err().to_string();
        assert!(e.contains("'a' is Int64 at row 7"), "{e}");
        let batch =
            RecordBatch::try_from_iter([("a", Arc::new(Int32Array::from(vec![1, 2])) as ArrayRef)])
                .unwrap();
        let rows = row_batch(path, &specs, &batch, 0).unwrap();
        assert_eq!(rows.rows, 2);
        assert_eq!(
            fixed(rows.columns.into_iter().next().unwrap()),
            le(&[1i32, 2], i32::to_le_bytes)
        );
    }
}

/// Data for the Parquet and Arrow IPC readers' tests: record batches of every supported kind of
/// column, what they become, and the columns an input yields.
#[cfg(test)]
pub(super) mod test_data {
    use std::ops::Range;
    use std::sync::Arc;

    use arrow_array::builder::{FixedSizeListBuilder, Float32Builder, Int32Builder, ListBuilder};
    use arrow_array::types::{Float16Type, Int32Type};
    use arrow_array::{
        ArrayRef, BooleanArray, DictionaryArray, Int64Array, LargeBinaryArray, PrimitiveArray,
        RecordBatch, StringArray,
    };
    use arrow_buffer::{Buffer, ScalarBuffer};

    use super::*;

    /// The sample columns: name, dtype, shape, ragged.
    pub const COLUMNS: [(&str, Dtype, &[u64], bool); 8] = [
        ("id", Dtype::I64, &[], false),
        ("tokens", Dtype::I32, &[], true),
        ("text", Dtype::U8, &[], true),
        ("flag", Dtype::BOOL, &[], false),
        ("emb", Dtype::F32, &[2], false),
        ("label", Dtype::U8, &[], true),
        ("half", Dtype::F16, &[], false),
        ("blob", Dtype::U8, &[], true),
    ];

    fn tokens(i: u64) -> Vec<i32> {
        (0..i % 5).map(|j| (i * 10 + j) as i32).collect()
    }

    fn text(i: u64) -> String {
        if i.is_multiple_of(7) {
            String::new()
        } else {
            format!("r{i}")
        }
    }

    fn label(i: u64) -> &'static str {
        ["a", "bb", "ccc"][i as usize % 3]
    }

    fn blob(i: u64) -> Vec<u8> {
        vec![i as u8; i as usize % 3]
    }

    /// Rows `rows` of the sample columns.
    pub fn batch(rows: Range<u64>) -> RecordBatch {
        let mut tok = ListBuilder::new(Int32Builder::new());
        let mut emb = FixedSizeListBuilder::new(Float32Builder::new(), 2);
        for i in rows.clone() {
            tok.values().append_slice(&tokens(i));
            tok.append(true);
            emb.values().append_slice(&[i as f32, -(i as f32)]);
            emb.append(true);
        }
        let n = rows.end - rows.start;
        let half = PrimitiveArray::<Float16Type>::new(
            ScalarBuffer::new(
                Buffer::from_vec(rows.clone().map(|i| i as u16).collect::<Vec<_>>()),
                0,
                n as usize,
            ),
            None,
        );
        // One dictionary for every batch: the IPC file format allows no other.
        let labels = DictionaryArray::<Int32Type>::new(
            rows.clone().map(|i| (i % 3) as i32).collect(),
            Arc::new(StringArray::from(vec![label(0), label(1), label(2)])),
        );
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter_values(rows.clone().map(|i| i as i64))),
            Arc::new(tok.finish()),
            Arc::new(StringArray::from_iter_values(rows.clone().map(text))),
            Arc::new(BooleanArray::from_iter(
                rows.clone().map(|i| Some(i % 2 == 0)),
            )),
            Arc::new(emb.finish()),
            Arc::new(labels),
            Arc::new(half),
            Arc::new(LargeBinaryArray::from_iter_values(rows.clone().map(blob))),
        ];
        RecordBatch::try_from_iter(COLUMNS.iter().map(|c| c.0).zip(columns)).unwrap()
    }

    /// One column's bytes and, ragged, its offsets.
    pub type Col = (Vec<u8>, Option<Vec<u64>>);

    /// What rows `rows` of the sample columns become.
    pub fn expected(rows: Range<u64>) -> Vec<Col> {
        let ragged = |rows: Range<u64>, f: &dyn Fn(u64) -> Vec<u8>, unit: u64| {
            let (mut values, mut offsets) = (Vec::new(), vec![0]);
            for i in rows {
                values.extend(f(i));
                offsets.push(values.len() as u64 / unit);
            }
            (values, Some(offsets))
        };
        let fixed = |f: &dyn Fn(u64) -> Vec<u8>| (rows.clone().flat_map(f).collect(), None);
        vec![
            fixed(&|i| (i as i64).to_le_bytes().to_vec()),
            ragged(
                rows.clone(),
                &|i| tokens(i).iter().flat_map(|v| v.to_le_bytes()).collect(),
                4,
            ),
            ragged(rows.clone(), &|i| text(i).into_bytes(), 1),
            fixed(&|i| vec![u8::from(i % 2 == 0)]),
            fixed(&|i| {
                [i as f32, -(i as f32)]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect()
            }),
            ragged(rows.clone(), &|i| label(i).as_bytes().to_vec(), 1),
            fixed(&|i| (i as u16).to_le_bytes().to_vec()),
            ragged(rows.clone(), &blob, 1),
        ]
    }

    /// Every batch of `input`, each checked against its fields, concatenated by column; and
    /// the batches' row counts.
    pub fn drain(input: &mut dyn RecordInput) -> Result<(Vec<Col>, Vec<usize>)> {
        let fields = input.fields().to_vec();
        let mut cols: Vec<Col> = fields
            .iter()
            .map(|f| (Vec::new(), f.ragged.then(|| vec![0])))
            .collect();
        let mut sizes = Vec::new();
        while let Some(batch) = input.next_batch()? {
            assert!(batch.rows > 0);
            assert_eq!(batch.columns.len(), fields.len());
            sizes.push(batch.rows);
            for ((f, col), data) in fields.iter().zip(&mut cols).zip(batch.columns) {
                let unit = tensor_bytes(f.dtype, &f.shape).unwrap() as usize;
                match (data, &mut col.1) {
                    (ColumnData::Fixed(v), None) => {
                        assert_eq!(v.len(), batch.rows * unit, "{}", f.name);
                        col.0.extend_from_slice(&v);
                    }
                    (ColumnData::Ragged { values, offsets }, Some(all)) => {
                        assert_eq!(offsets.len(), batch.rows + 1, "{}", f.name);
                        assert_eq!(offsets[0], 0, "{}", f.name);
                        assert!(offsets.is_sorted(), "{}", f.name);
                        assert_eq!(values.len() as u64, offsets[batch.rows] * unit as u64);
                        let base = all[all.len() - 1];
                        all.extend(offsets[1..].iter().map(|o| o + base));
                        col.0.extend_from_slice(&values);
                    }
                    (data, _) => panic!("{}: {data:?} does not match {f:?}", f.name),
                }
            }
        }
        Ok((cols, sizes))
    }

    /// The sample columns' specs.
    pub fn specs() -> Vec<FieldSpec> {
        COLUMNS
            .iter()
            .map(|&(name, dtype, shape, ragged)| FieldSpec {
                name: name.into(),
                dtype,
                shape: shape.to_vec(),
                ragged,
            })
            .collect()
    }
}
