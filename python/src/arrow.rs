//! Arrow data from Python as a `convert` input, with no per-row Python: any object with the
//! Arrow PyCapsule stream interface (`__arrow_c_stream__`: pyarrow's `Table`, `RecordBatch` and
//! `RecordBatchReader`, and other Arrow libraries' tables), and a Hugging Face
//! `datasets.Dataset` (which wraps a pyarrow `Table`).
//!
//! The stream is imported through the Arrow C stream interface and drained into
//! [`ArrowBatches`] before conversion starts (the converter needs the exact row count first).
//! A pyarrow `Table`'s stream hands out views of its chunks, so draining it copies nothing;
//! a reader that decodes or computes its batches has them all in memory at once.

use std::ffi::CStr;

use arrow_array::ffi_stream::{FFI_ArrowArrayStream, RecordBatchStreamReader};
use ciphershard::format::{ArrowBatches, ConvertInput};
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PySlice};

use crate::errors::IntoPyResult;

/// The capsule name the Arrow PyCapsule interface gives a stream.
const STREAM_CAPSULE: &CStr = c"arrow_array_stream";

/// `value` as a `convert` input when it is Arrow data (see the module doc); `None` when it is
/// not.
pub fn arrow_input(value: &Bound<'_, PyAny>) -> PyResult<Option<ConvertInput>> {
    let py = value.py();
    let source = if value.hasattr("__arrow_c_stream__")? {
        value.clone()
    } else if is_hf_dataset(value)? {
        // `datasets.Dataset` (5.x) has no `__arrow_c_stream__`. Its rows as a pyarrow Table,
        // with its indices mapping (after `select`, `shuffle`, ...) applied: `ds.data.table`
        // would ignore it. Without one this is a zero-copy slice of the whole table.
        value
            .call_method1("with_format", ("arrow",))?
            .get_item(PySlice::full(py))?
    } else {
        return Ok(None);
    };
    let label = format!("<{}>", type_label(value)?);
    let capsule = source.call_method1("__arrow_c_stream__", (py.None(),))?;
    let capsule = capsule.cast::<PyCapsule>()?;
    let ptr = capsule.pointer_checked(Some(STREAM_CAPSULE))?;
    // SAFETY: a capsule named "arrow_array_stream" holds a pointer to an initialized
    // `ArrowArrayStream` (the Arrow PyCapsule interface), which has the C layout of
    // `FFI_ArrowArrayStream`, and `capsule` keeps it allocated during the call. `from_raw` moves
    // the stream out and leaves a released one (a null `release`) in its place, so the
    // capsule's destructor, which releases a stream only when `release` is set, does nothing
    // and the stream is released once, by the reader.
    let stream = unsafe { FFI_ArrowArrayStream::from_raw(ptr.as_ptr().cast()) };
    let reader = RecordBatchStreamReader::try_new(stream)
        .map_err(|e| ciphershard::Error::format(&label, "Arrow stream", e.to_string()))
        .py()?;
    // Without the GIL: pyarrow takes it itself when a batch comes from Python code.
    let batches = py
        .detach(|| ArrowBatches::from_reader(&label, reader))
        .py()?;
    Ok(Some(ConvertInput::Arrow(batches)))
}

/// Whether `value` looks like a Hugging Face `datasets.Dataset` (checked by its module and
/// attributes, so `datasets` is never imported here).
fn is_hf_dataset(value: &Bound<'_, PyAny>) -> PyResult<bool> {
    let t = value.get_type();
    let module: String = t.module()?.extract()?;
    Ok(module.split('.').next() == Some("datasets")
        && value.hasattr("with_format")?
        && value.hasattr("features")?)
}

/// `pyarrow.Table` for a `pyarrow.lib.Table`: the package and the class, for errors.
fn type_label(value: &Bound<'_, PyAny>) -> PyResult<String> {
    let t = value.get_type();
    let module: String = t.module()?.extract()?;
    let name: String = t.qualname()?.extract()?;
    let package = module.split('.').next().unwrap_or_default();
    Ok(format!("{package}.{name}"))
}
