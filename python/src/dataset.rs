//! `ciphershard.Dataset`, `convert`, `inspect` and `generate_key`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ciphershard::format::{self, ConvertInput, ConvertOptions, Dtype};
use ciphershard::pipeline::FormatSource;
use ciphershard::{Backend, MasterKey};
use pyo3::prelude::*;
use pyo3::sync::MutexExt;
use pyo3::types::{PyDict, PyList};

use crate::errors::{IntoPyResult, new_err};
use crate::keysrc::load_master_key;
use crate::tensor::DType;

/// Parses a backend name (`auto`, `cpu`, `cuda`, `wgpu`).
pub fn parse_backend(name: &str) -> PyResult<Backend> {
    name.parse::<Backend>().py()
}

/// An encrypted dataset opened with a master key.
///
/// ``Dataset(path, key_file=None, key_env=None, backend="auto")``: ``path`` is a dataset
/// directory (or one of its shard files); the master key is read from ``key_file`` or from the
/// file named by the environment variable ``key_env``. Opening reads and authenticates every
/// shard header and unwraps the data keys, so a wrong key raises ``WrongKeyError`` here.
/// The key stays in Rust memory (zeroized when the dataset is freed) and never appears in
/// ``repr``.
#[pyclass(frozen, module = "ciphershard", name = "Dataset")]
pub struct PyDataset {
    path: PathBuf,
    /// Object-store settings given as ``storage_options`` (values zeroized, never printed).
    store: ciphershard::store::OpenOptions,
    key: MasterKey,
    backend: Backend,
    /// Unlocked sources per requested backend, with the backend each resolved to (the
    /// default one is opened eagerly).
    sources: Mutex<HashMap<Backend, (Arc<FormatSource>, Backend)>>,
    manifest: format::Manifest,
    cipher_description: String,
    /// The backend `auto` resolved to (or the one asked for).
    resolved: Backend,
}

impl PyDataset {
    /// The row source for `backend` (`None`: the dataset's own), unlocking it on first use,
    /// and the concrete backend it decrypts with.
    pub fn source(
        &self,
        py: Python<'_>,
        backend: Option<Backend>,
    ) -> PyResult<(Arc<FormatSource>, Backend)> {
        let backend = backend.unwrap_or(self.backend);
        // Locked with the GIL released: the unlock below detaches while holding this lock.
        let mut map = self
            .sources
            .lock_py_attached(py)
            .unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(&backend) {
            return Ok(s.clone());
        }
        let (src, _, resolved) = py
            .detach(|| open_source(&self.path, &self.store, &self.key, backend))
            .py()?;
        map.insert(backend, (src.clone(), resolved));
        Ok((src, resolved))
    }

    /// Starts a CUDA device loader on device `ordinal` (headers re-authenticated, data keys
    /// prepared on the device), resuming from `state` when given. Call without the GIL.
    #[cfg(feature = "cuda")]
    pub fn open_device(
        &self,
        ordinal: usize,
        opts: &ciphershard::pipeline::LoaderOptions,
        state: Option<&ciphershard::pipeline::LoaderState>,
    ) -> ciphershard::Result<ciphershard::pipeline::DeviceLoader> {
        use ciphershard::pipeline::DeviceLoader;
        let opts = match state {
            Some(s) => {
                let rows = self.manifest.rows;
                if rows != s.total_rows {
                    return Err(ciphershard::Error::InvalidArgument(format!(
                        "loader state is for a dataset of {} rows, this one has {rows}",
                        s.total_rows
                    )));
                }
                opts.clone().resume(s)
            }
            None => opts.clone(),
        };
        DeviceLoader::open_with(&self.path, &self.store, &self.key, ordinal, &opts)
    }

    /// The dataset directory as text.
    pub fn path_string(&self) -> String {
        self.path.display().to_string()
    }

    /// The dataset's columns (name, dtype, per-row shape).
    pub fn columns(&self) -> Vec<(String, DType, Vec<u64>, bool)> {
        self.manifest
            .columns
            .iter()
            .map(|c| (c.name.clone(), dtype_of(c.dtype), c.shape.clone(), c.ragged))
            .collect()
    }
}

fn dtype_of(d: Dtype) -> DType {
    DType::from_name(d.as_str()).expect("every format dtype has a DLPack mapping")
}

fn open_source(
    path: &std::path::Path,
    store: &ciphershard::store::OpenOptions,
    key: &MasterKey,
    backend: Backend,
) -> ciphershard::Result<(Arc<FormatSource>, String, Backend)> {
    let cipher = ciphershard::cipher::select(backend)?;
    let ds = format::Dataset::open_with(path, store)?;
    let unlocked = ds.unlock(key, cipher.as_ref())?;
    Ok((
        Arc::new(FormatSource::new(unlocked)?),
        cipher.describe(),
        cipher.backend(),
    ))
}

#[pymethods]
impl PyDataset {
    #[new]
    #[pyo3(signature = (path, *, key_file=None, key_env=None, backend="auto", storage_options=None, cache_dir=None, cache_size=None))]
    #[allow(clippy::too_many_arguments)] // Python keyword arguments
    fn new(
        py: Python<'_>,
        path: PathBuf,
        key_file: Option<PathBuf>,
        key_env: Option<String>,
        backend: &str,
        storage_options: Option<std::collections::BTreeMap<String, String>>,
        cache_dir: Option<PathBuf>,
        cache_size: Option<CacheSize>,
    ) -> PyResult<Self> {
        let backend = parse_backend(backend)?;
        let key = load_master_key(py, key_file, key_env)?;
        let store = storage_options
            .unwrap_or_default()
            .into_iter()
            .fold(ciphershard::store::OpenOptions::new(), |o, (k, v)| {
                o.storage(k, v)
            });
        let store = with_cache(store, cache_dir, cache_size).py()?;
        let (source, description, resolved) = py
            .detach(|| open_source(&path, &store, &key, backend))
            .py()?;
        let dir = source_dir(&path);
        let manifest = source.dataset().dataset().manifest().clone();
        let mut sources = HashMap::new();
        sources.insert(backend, (source, resolved));
        Ok(PyDataset {
            path: dir,
            store,
            key,
            backend,
            sources: Mutex::new(sources),
            manifest,
            cipher_description: description,
            resolved,
        })
    }

    /// The dataset directory (a ``pathlib.Path``), or its URL as text for a dataset in an
    /// object store (``pathlib`` would fold the ``//`` of ``s3://``).
    #[getter]
    fn path<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match ciphershard::store::as_url(&self.path) {
            Some(url) => Ok(url.into_pyobject(py)?.into_any()),
            None => Ok(self.path.clone().into_pyobject(py)?.into_any()),
        }
    }

    /// Number of rows.
    #[getter]
    fn rows(&self) -> u64 {
        self.manifest.rows
    }

    fn __len__(&self) -> usize {
        self.manifest.rows as usize
    }

    /// Number of shard files.
    #[getter]
    fn num_shards(&self) -> usize {
        self.manifest.shards.len()
    }

    /// Column descriptions: ``{name: {"dtype": "float32", "shape": [per-row dims], "encrypted":
    /// bool, "ragged": bool}}`` (a ragged column's ``shape`` is that of one element of a row).
    #[getter]
    fn columns_info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for c in &self.manifest.columns {
            let d = PyDict::new(py);
            d.set_item("dtype", dtype_of(c.dtype).name)?;
            d.set_item("shape", c.shape.clone())?;
            d.set_item("encrypted", c.encrypted)?;
            d.set_item("ragged", c.ragged)?;
            out.set_item(&c.name, d)?;
        }
        Ok(out)
    }

    /// Column names, in dataset order.
    #[getter]
    fn column_names(&self) -> Vec<String> {
        self.manifest
            .columns
            .iter()
            .map(|c| c.name.clone())
            .collect()
    }

    /// Id of the master key in use (safe to log: it reveals nothing about the key).
    #[getter]
    fn key_id(&self) -> String {
        self.key.id()
    }

    /// The backend in use, e.g. ``"cpu"`` (what ``"auto"`` resolved to).
    #[getter]
    fn backend(&self) -> &'static str {
        self.resolved.name()
    }

    /// What the backend is (CPU features, device name).
    #[getter]
    fn backend_description(&self) -> String {
        self.cipher_description.clone()
    }

    /// The ciphertext cache's counters since this dataset opened (its default backend's
    /// reads), or ``None`` when it reads without a cache.
    fn cache_stats<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        use ciphershard::pipeline::RowSource;
        let (src, _) = self.source(py, None)?;
        let Some(c) = src.store().cache_stats() else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        for (k, v) in [
            ("hits", c.hits),
            ("misses", c.misses),
            ("bytes_from_cache", c.bytes_from_cache),
            ("bytes_fetched", c.bytes_fetched),
            ("evictions", c.evictions),
            ("damaged", c.damaged),
            ("write_failures", c.write_failures),
            ("bytes_on_disk", c.bytes_on_disk),
        ] {
            d.set_item(k, v)?;
        }
        Ok(Some(d))
    }

    /// Checks every chunk's tag; raises ``IntegrityError`` at the first failure. Returns
    /// ``{"shards", "chunks", "bytes", "seconds"}``.
    fn verify<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let key = &self.key;
        let path = &self.path;
        let summary = py
            .detach(|| {
                let cipher = ciphershard::cipher::select(Backend::Cpu)?;
                let ds =
                    format::Dataset::open_with(path, &self.store)?.unlock(key, cipher.as_ref())?;
                format::verify(&ds, &mut |_, _| {})
            })
            .py()?;
        let d = PyDict::new(py);
        d.set_item("shards", summary.shards)?;
        d.set_item("chunks", summary.chunks)?;
        d.set_item("bytes", summary.bytes)?;
        d.set_item("seconds", summary.seconds)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "ciphershard.Dataset({:?}, rows={}, columns={:?}, shards={}, key_id={}, backend={})",
            self.path.display().to_string(),
            self.manifest.rows,
            self.column_names(),
            self.manifest.shards.len(),
            self.key.id(),
            self.resolved
        )
    }
}

/// ``cache_size``: bytes, or text such as ``"20G"``.
#[derive(FromPyObject)]
enum CacheSize {
    Bytes(u64),
    Text(String),
}

/// `opts` with the cache that ``cache_dir``/``cache_size`` ask for (the size alone takes its
/// folder from ``$CIPHERSHARD_CACHE_DIR``); neither: the environment decides.
fn with_cache(
    opts: ciphershard::store::OpenOptions,
    dir: Option<PathBuf>,
    size: Option<CacheSize>,
) -> ciphershard::Result<ciphershard::store::OpenOptions> {
    let size =
        match size {
            None => None,
            Some(CacheSize::Bytes(n)) => Some(n),
            Some(CacheSize::Text(t)) => Some(ciphershard::store::parse_size(&t).map_err(|e| {
                ciphershard::error::Error::InvalidArgument(format!("cache_size: {e}"))
            })?),
        };
    opts.cache_over_env(dir, size)
}

fn source_dir(path: &std::path::Path) -> PathBuf {
    if path.is_file() {
        path.parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| path.to_path_buf())
    } else {
        path.to_path_buf()
    }
}

/// Writes a new random master key to ``path`` (hex, mode 0600; refuses to overwrite) and
/// returns its key id.
#[pyfunction]
pub fn generate_key(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    py.detach(|| {
        let key = MasterKey::generate()?;
        key.write_new_file(&path)?;
        Ok(key.id())
    })
    .py()
}

/// One `convert` input taken from Python: a NumPy-style array (via the buffer protocol), a
/// path to a `.npy` file, or a ragged column as a `(values, offsets)` pair of arrays.
fn convert_input(name: &str, value: &Bound<'_, PyAny>) -> PyResult<ConvertInput> {
    if let Ok(path) = value.extract::<PathBuf>() {
        return Ok(ConvertInput::Npy {
            column: name.to_string(),
            path,
        });
    }
    if let Ok(pair) = value.cast::<pyo3::types::PyTuple>() {
        let py = value.py();
        let [values, offsets] = pair.iter().collect::<Vec<_>>().try_into().map_err(|_| {
            new_err(
                py,
                "InvalidArgumentError",
                format!("column '{name}': a ragged column is a (values, offsets) pair"),
            )
        })?;
        let (dtype, shape, values) = array_bytes(name, &values)?;
        let Some(elem) = shape.get(1..) else {
            return Err(new_err(
                py,
                "InvalidArgumentError",
                format!("column '{name}': ragged values need a first dimension (the elements)"),
            ));
        };
        let np = py.import("numpy")?;
        let offsets: Vec<u64> = np
            .call_method1("asarray", (offsets, "uint64"))?
            .call_method0("tolist")?
            .extract()
            .map_err(|_| {
                new_err(
                    py,
                    "InvalidArgumentError",
                    format!("column '{name}': offsets must be non-negative integers"),
                )
            })?;
        return Ok(ConvertInput::Ragged {
            name: name.to_string(),
            dtype,
            shape: elem.to_vec(),
            values,
            offsets,
        });
    }
    let (dtype, shape, data) = array_bytes(name, value)?;
    Ok(ConvertInput::InMemory {
        name: name.to_string(),
        dtype,
        shape,
        data,
    })
}

/// An array's dtype, shape and little-endian bytes (C order).
fn array_bytes(name: &str, value: &Bound<'_, PyAny>) -> PyResult<(Dtype, Vec<u64>, Vec<u8>)> {
    let py = value.py();
    let np = py.import("numpy").map_err(|_| {
        new_err(
            py,
            "InvalidArgumentError",
            format!("column '{name}': convert needs NumPy installed to read arrays"),
        )
    })?;
    let kw = PyDict::new(py);
    kw.set_item("order", "C")?;
    let arr = np.call_method("asarray", (value,), Some(&kw))?;
    let dtype_name: String = arr.getattr("dtype")?.getattr("name")?.extract()?;
    let byteorder: String = arr.getattr("dtype")?.getattr("byteorder")?.extract()?;
    if byteorder == ">" {
        return Err(new_err(
            py,
            "InvalidArgumentError",
            format!(
                "column '{name}': big-endian arrays are not supported (use arr.astype(arr.dtype.newbyteorder('<')))"
            ),
        ));
    }
    let dt = DType::from_name(&dtype_name).ok_or_else(|| {
        new_err(
            py,
            "InvalidArgumentError",
            format!("column '{name}': dtype {dtype_name} has no safetensors equivalent"),
        )
    })?;
    let dtype: Dtype = dt.safetensors.parse().py()?;
    let shape: Vec<u64> = arr.getattr("shape")?.extract()?;
    if shape.is_empty() {
        return Err(new_err(
            py,
            "InvalidArgumentError",
            format!("column '{name}': a 0-d array has no rows"),
        ));
    }
    let nbytes: usize = arr.getattr("nbytes")?.extract()?;
    let (addr, _readonly): (usize, bool) = arr
        .getattr("__array_interface__")?
        .get_item("data")?
        .extract()?;
    let data = if nbytes == 0 {
        Vec::new()
    } else {
        // SAFETY: `arr` is a C-contiguous NumPy array (asarray(order="C")) that we hold a
        // reference to, so its `nbytes` bytes at `addr` stay allocated during the copy. One
        // copy instead of two (`tobytes()` then `to_vec()`).
        unsafe { std::slice::from_raw_parts(addr as *const u8, nbytes) }.to_vec()
    };
    Ok((dtype, shape, data))
}

/// One `convert` input that is not a dict of columns: a file path (its format by its
/// extension) or Arrow data (a pyarrow `Table`, `RecordBatch` or `RecordBatchReader`, a
/// `datasets.Dataset`, anything with `__arrow_c_stream__`).
fn whole_input(value: &Bound<'_, PyAny>, jsonl_columns: &[String]) -> PyResult<ConvertInput> {
    if let Ok(path) = value.extract::<PathBuf>() {
        return Ok(ConvertInput::from_path(&path, jsonl_columns));
    }
    if let Some(input) = crate::arrow::arrow_input(value)? {
        return Ok(input);
    }
    Err(new_err(
        value.py(),
        "InvalidArgumentError",
        format!(
            "convert takes a dict {{name: array, .npy path or (values, offsets)}}, a file path (.parquet, .arrow, .jsonl, .npy, safetensors), Arrow data (pyarrow Table, RecordBatch or RecordBatchReader, datasets.Dataset, any object with __arrow_c_stream__) or a list of paths and Arrow data; not a {}",
            value.get_type().qualname()?
        ),
    ))
}

/// Encrypts columns into a new dataset directory.
///
/// ``data`` is one of:
///
/// - a dict mapping column names to arrays (anything ``numpy.ascontiguousarray`` accepts; the
///   first dimension is the row), to ``.npy`` paths, or, for a ragged column (rows of varying
///   length), to a ``(values, offsets)`` pair: row ``i`` is ``values[offsets[i]:offsets[i+1]]``;
/// - a file path, by its extension: ``.parquet``, ``.arrow`` (Arrow IPC file or stream, what
///   ``datasets.save_to_disk`` writes), ``.jsonl`` (its keys ``columns``, each a list of
///   integers per line, become ragged columns), ``.npy``, otherwise safetensors;
/// - Arrow data, read in Rust through the Arrow C stream interface (no per-row Python): a
///   ``pyarrow.Table``, ``RecordBatch`` or ``RecordBatchReader``, a Hugging Face
///   ``datasets.Dataset``, or any object with ``__arrow_c_stream__``. Arrow types map as for
///   Parquet (``list<int32>`` and strings become ragged columns, fixed-size lists fixed ones;
///   nulls and structs are refused naming the column). The exact row count is needed before
///   conversion starts, so a stream is read to its end first: free for a Table (its batches
///   are views of its memory), but a ``RecordBatchReader`` has all its batches in memory at
///   once;
/// - a list of paths and Arrow data, appended by rows (they must hold the same columns).
///
/// Returns a summary dict. Plaintext never reaches disk; a failed convert leaves no shard
/// under its final name.
#[pyfunction]
#[pyo3(signature = (data, /, *, out, key_file=None, key_env=None, columns=Vec::new(), chunk_size=2 << 20, shard_size=None, plain=Vec::new(), metadata=BTreeMap::new()))]
#[allow(clippy::too_many_arguments)]
pub fn convert<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    out: PathBuf,
    key_file: Option<PathBuf>,
    key_env: Option<String>,
    columns: Vec<String>,
    chunk_size: u64,
    shard_size: Option<u64>,
    plain: Vec<String>,
    metadata: BTreeMap<String, String>,
) -> PyResult<Bound<'py, PyDict>> {
    let key = load_master_key(py, key_file, key_env)?;
    let mut inputs = Vec::new();
    if let Ok(dict) = data.cast::<PyDict>() {
        for (k, v) in dict.iter() {
            let name: String = k.extract()?;
            inputs.push(convert_input(&name, &v)?);
        }
    } else if let Ok(list) = data.cast::<PyList>() {
        for item in list.iter() {
            inputs.push(whole_input(&item, &columns)?);
        }
    } else {
        inputs.push(whole_input(data, &columns)?);
    }
    let jsonl = inputs
        .iter()
        .any(|i| matches!(i, ConvertInput::Jsonl { .. }));
    match (jsonl, columns.is_empty()) {
        (true, true) => {
            return Err(new_err(
                py,
                "InvalidArgumentError",
                "a JSONL input needs columns=[KEY, ...]: the keys whose lists of integers become columns".into(),
            ));
        }
        (false, false) => {
            return Err(new_err(
                py,
                "InvalidArgumentError",
                "columns= applies only to JSONL inputs (.jsonl, .ndjson): other inputs name their own columns".into(),
            ));
        }
        _ => {}
    }
    let opts = ConvertOptions {
        shard_size,
        chunk_size,
        plain,
        keys: vec![key],
        metadata,
    };
    let summary = py
        .detach(|| format::convert(&inputs, &out, &opts, &mut |_, _| {}))
        .py()?;
    let d = PyDict::new(py);
    d.set_item("path", out)?;
    d.set_item("dataset_id", hex_encode(&summary.dataset_id))?;
    d.set_item("kind", summary.kind.as_str())?;
    d.set_item("shards", summary.shards)?;
    d.set_item("rows", summary.rows)?;
    d.set_item("columns", summary.columns)?;
    d.set_item("bytes", summary.bytes)?;
    d.set_item("bytes_written", summary.bytes_written)?;
    d.set_item("seconds", summary.seconds)?;
    d.set_item("mb_per_s", summary.mb_per_s())?;
    d.set_item("key_ids", summary.key_ids)?;
    Ok(d)
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Describes a dataset without a key: manifest, columns, shards and their tensors, key ids.
/// Parses and cross-checks every header (no tag is verified without a key).
#[pyfunction]
pub fn inspect<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyAny>> {
    // The CLI's `inspect --json` report, the same schema (ciphershard::format::report).
    let report = py.detach(|| format::inspect(&path)).py()?;
    let text = serde_json::to_string(&report)
        .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
    py.import("json")?.call_method1("loads", (text,))
}
