//! Arrow record batches held in memory as a `convert` input: what Python hands over for a
//! `pyarrow.Table`, a `RecordBatchReader` or a Hugging Face `datasets.Dataset` (any object with
//! the Arrow C stream interface), or what a Rust caller has decoded itself.
//!
//! Columns are mapped as [`arrow_columns`](super::arrow_columns) says, through the same
//! [`ArrowRecords`] as the Parquet and Arrow IPC readers, so types, refusals and error messages
//! are the same; errors name the input's label (for example `<pyarrow.Table>`) where a file
//! reader names its file.
//!
//! The converter lays out every shard before sealing any, so the exact row count must be known
//! first: a one-shot stream is therefore drained into memory when it is taken
//! ([`ArrowBatches::from_reader`]). For batches that share a table's buffers (the C stream of a
//! `pyarrow.Table` hands out views of its chunks, without a copy) that costs nothing; for a
//! stream that decodes or computes its batches, every batch is held at once: memory equal to
//! the data. Holding them also makes the input re-readable, so it stays `Clone`.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow_array::{RecordBatch, RecordBatchReader};
use arrow_schema::SchemaRef;

use super::arrow_columns::{self, ArrowRecords, arrow_error};
use super::records::RecordInput;
use crate::error::Result;

const WHAT: &str = "Arrow stream";

/// Arrow record batches of one schema, in memory, converted in order.
#[derive(Debug, Clone)]
pub struct ArrowBatches {
    /// What the batches are, where a file input names its path (errors, `RecordInput::path`).
    label: PathBuf,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
}

impl ArrowBatches {
    /// Batches `batches` of schema `schema`, named `label` in errors. A batch whose columns
    /// differ from the schema is refused when it is converted, naming its first row.
    pub fn new(label: impl Into<PathBuf>, schema: SchemaRef, batches: Vec<RecordBatch>) -> Self {
        ArrowBatches {
            label: label.into(),
            schema,
            batches,
        }
    }

    /// Drains `reader` into memory (every batch at once: see the module doc), naming it
    /// `label` in errors. A batch the reader fails to produce is an error naming `label`.
    pub fn from_reader(label: impl Into<PathBuf>, reader: impl RecordBatchReader) -> Result<Self> {
        let label = label.into();
        let schema = reader.schema();
        let batches = reader
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| arrow_error(&label, WHAT, e))?;
        Ok(ArrowBatches::new(label, schema, batches))
    }

    /// What the batches are called in errors.
    pub fn label(&self) -> &Path {
        &self.label
    }

    /// Their total row count.
    pub fn rows(&self) -> u64 {
        self.batches.iter().map(|b| b.num_rows() as u64).sum()
    }

    /// The batches as a row-batch input.
    pub(crate) fn open(&self) -> Result<Box<dyn RecordInput>> {
        let fields = arrow_columns::fields(&self.label, &self.schema)?;
        // The bytes the rows show (a slice of a larger buffer counts only its part).
        let mut estimated_bytes = 0u64;
        for b in &self.batches {
            for c in b.columns() {
                let n = c
                    .to_data()
                    .get_slice_memory_size()
                    .map_err(|e| arrow_error(&self.label, WHAT, e))?;
                estimated_bytes = estimated_bytes.saturating_add(n as u64);
            }
        }
        let metadata: BTreeMap<String, String> = self
            .schema
            .metadata()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let batches = self.batches.clone();
        Ok(ArrowRecords::boxed(
            &self.label,
            WHAT,
            fields,
            self.rows(),
            estimated_bytes,
            metadata,
            batches.into_iter().map(Ok),
        ))
    }
}

impl From<ArrowBatches> for super::ConvertInput {
    fn from(b: ArrowBatches) -> Self {
        super::ConvertInput::Arrow(b)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::builder::{Int32Builder, ListBuilder};
    use arrow_array::{ArrayRef, Int32Array, RecordBatchIterator, StringArray, StructArray};
    use arrow_schema::{ArrowError, DataType, Field, Schema};

    use super::super::arrow_columns::test_data::{batch, drain, expected};
    use super::*;

    #[test]
    fn batches_are_columns_like_a_file_input() {
        let parts = [batch(0..5), batch(5..5), batch(5..40).slice(3, 20)];
        let schema = parts[0].schema();
        let input = ArrowBatches::new("<table>", schema, parts.to_vec());
        assert_eq!(input.rows(), 25);
        let mut opened = input.open().unwrap();
        assert_eq!(opened.rows(), 25);
        assert_eq!(opened.path(), Path::new("<table>"));
        let (cols, sizes) = drain(opened.as_mut()).unwrap();
        assert_eq!(sizes, [5, 20]);
        let mut want = expected(0..5);
        for (w, more) in want.iter_mut().zip(expected(8..28)) {
            w.0.extend(more.0);
            if let (Some(a), Some(b)) = (&mut w.1, more.1) {
                let base = *a.last().unwrap();
                a.extend(b[1..].iter().map(|o| o + base));
            }
        }
        assert_eq!(cols, want);
        // Re-readable: a second open yields the same rows.
        let again = drain(input.open().unwrap().as_mut()).unwrap().0;
        assert_eq!(again, cols);
    }

    #[test]
    fn a_reader_is_drained_and_its_errors_name_the_label() {
        let b = batch(0..3);
        let ok = RecordBatchIterator::new([Ok(b.clone()), Ok(b.clone())], b.schema());
        assert_eq!(ArrowBatches::from_reader("<r>", ok).unwrap().rows(), 6);
        let failing = RecordBatchIterator::new(
            [Ok(b.clone()), Err(ArrowError::ComputeError("boom".into()))],
            b.schema(),
        );
        let e = ArrowBatches::from_reader("<r>", failing)
            .unwrap_err()
            .to_string();
        assert!(e.contains("<r>") && e.contains("boom"), "{e}");
    }

    #[test]
    fn refusals_name_the_label_and_the_column() {
        let one = |name: &str, a: ArrayRef| {
            let b = RecordBatch::try_from_iter([(name, a)]).unwrap();
            ArrowBatches::new("<pyarrow.Table>", b.schema(), vec![b])
        };
        let nulls = one("n", Arc::new(Int32Array::from(vec![Some(1), None])));
        let e = drain(nulls.open().unwrap().as_mut())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("<pyarrow.Table>: column 'n' has a null at row 1"),
            "{e}"
        );
        let s = StructArray::from(vec![(
            Arc::new(Field::new("x", DataType::Int32, false)),
            Arc::new(Int32Array::from(vec![1])) as ArrayRef,
        )]);
        let e = one("st", Arc::new(s)).open().err().unwrap().to_string();
        assert!(
            e.contains("<pyarrow.Table>: column 'st' has Arrow type Struct"),
            "{e}"
        );
        let mut list = ListBuilder::new(Int32Builder::new());
        list.append_value([Some(1)]);
        let ok = one("l", Arc::new(list.finish()));
        assert_eq!(ok.open().unwrap().fields()[0].name, "l");
        let texts = one("t", Arc::new(StringArray::from(vec!["a"])));
        let e = ArrowBatches::new("<x>", Arc::new(Schema::empty()), texts.batches)
            .open()
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no columns"), "{e}");
    }
}
