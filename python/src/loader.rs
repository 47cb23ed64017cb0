//! `ciphershard.Loader`: the Rust prefetching loader as a Python iterator of
//! `dict[str, Tensor]` (or of `torch.Tensor` with `as_torch=True`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ciphershard::pipeline::{Batch, Loader, LoaderOptions, LoaderState, LoaderStats, StageStats};
use pyo3::exceptions::PyStopIteration;
use pyo3::prelude::*;
use pyo3::sync::MutexExt;
use pyo3::types::PyDict;

use crate::dataset::{PyDataset, parse_backend};
use crate::dlpack::DEVICE_CPU;
use crate::dlpack::DLDevice;
use crate::errors::{IntoPyResult, new_err};
use crate::tensor::{DType, OwnedStorage, Storage, Tensor};

/// How long one GIL-free wait lasts before signals (Ctrl-C) are checked.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Waits without the GIL, in slices, so other Python threads run and Ctrl-C gets through:
/// `poll` waits at most about [`SIGNAL_POLL`] and returns `true` when the wait is over; pending
/// signal handlers run between slices (a `KeyboardInterrupt` ends the wait with that error).
fn wait_interruptibly<F: FnMut() -> bool + Send>(py: Python<'_>, mut poll: F) -> PyResult<()> {
    loop {
        if py.detach(&mut poll) {
            return Ok(());
        }
        py.check_signals()?;
    }
}

/// Sleeps `seconds` exactly the way `Loader.__next__` waits for a batch (the same
/// [`wait_interruptibly`]): lets tests check GIL release and Ctrl-C without a slow pipeline.
#[pyfunction]
pub fn _wait_like_next(py: Python<'_>, seconds: f64) -> PyResult<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs_f64(seconds.max(0.0));
    wait_interruptibly(py, || {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        std::thread::sleep(left.min(SIGNAL_POLL));
        std::time::Instant::now() >= deadline
    })
}

/// Tag stored in `state_dict()` so a foreign dict is rejected clearly.
const STATE_FORMAT: &str = "ciphershard.loader_state/1";

/// A batch's column buffers, kept alive by every tensor (and DLPack export) that views them.
/// Dropping the last holder drops the `Batch`, which returns the buffers to the loader's pool.
struct BatchStorage {
    regions: Vec<(*mut u8, usize)>,
    batch: Option<Batch>,
    /// The process whose loader made the batch (see [`Drop`]).
    owner_pid: u32,
}

impl Drop for BatchStorage {
    fn drop(&mut self) {
        // In a forked child the batch's pool belongs to threads that do not exist there (its
        // lock may even be held forever): the child's copy of the buffers is leaked instead.
        if std::process::id() != self.owner_pid {
            std::mem::forget(self.batch.take());
        }
    }
}

// SAFETY: the pointers address buffers owned by `batch`, which is `Send + Sync` and keeps them
// allocated and in place until it is dropped together with this struct. `BatchStorage` never
// reads or writes the bytes itself; consumers synchronise their own accesses.
unsafe impl Send for BatchStorage {}
// SAFETY: see `Send`.
unsafe impl Sync for BatchStorage {}

impl Storage for BatchStorage {
    fn region(&self, index: usize) -> (*mut u8, usize) {
        self.regions[index]
    }
    fn device(&self) -> DLDevice {
        DLDevice {
            device_type: DEVICE_CPU,
            device_id: 0,
        }
    }
}

/// Iterates decrypted batches of a :class:`Dataset`.
///
/// Each batch is a ``dict`` mapping column names to :class:`Tensor` objects of shape
/// ``[B, ...]`` that view the loader's buffers (DLPack, no copy); with ``as_torch=True`` the
/// values are ``torch.Tensor`` views made by ``torch.from_dlpack``.
///
/// Epochs: with ``epochs=None`` (default) each ``iter(loader)`` runs one epoch, the next one
/// each time (like ``torch.utils.data.DataLoader``); with ``epochs=N`` one iteration streams
/// every remaining batch of epochs ``0..N`` without a pause between epochs. Breaking out of a
/// ``for`` loop and iterating again continues where it stopped.
///
/// ``rank``/``world_size`` default to the ``RANK``/``WORLD_SIZE`` environment variables
/// (set by ``torchrun``), else 0/1.
///
/// Errors: an integrity or I/O failure raises (``IntegrityError``...) and ends the iteration;
/// ``state_dict()`` then still points at the failed batch. A batch whose conversion raised
/// (Ctrl-C inside ``torch.from_dlpack``) is not lost: the next ``next()`` hands it out.
///
/// Batches are writable: each owns its buffers until its last view is freed, so a write
/// changes that batch only. ``len()`` and ``state_dict()`` start nothing. A loader inherited
/// through ``fork()`` raises ``LoaderStoppedError`` in the child (``close()`` does nothing there).
///
/// Thread-safe: calls from several Python threads are serialised (``stats()`` from a monitoring
/// thread waits, with the GIL released, until a concurrent ``next()`` has its batch).
#[pyclass(frozen, module = "ciphershard", name = "Loader")]
pub struct PyLoader {
    dataset: Py<PyDataset>,
    /// Name, dtype, row shape (element shape for a ragged column), ragged.
    columns: Vec<(String, DType, Vec<i64>, bool)>,
    /// `torch.nested.nested_tensor_from_jagged`, with ``as_torch`` and a ragged column.
    nested: Option<Py<PyAny>>,
    /// ``pad=``: ragged columns also as dense blocks, to the batch's longest row (`Some(None)`)
    /// or a fixed width.
    pad: Option<Option<usize>>,
    as_torch: Option<Py<PyAny>>,
    /// `Some(ordinal)`: batches decrypted into CUDA device `ordinal`'s memory.
    device: Option<usize>,
    /// The process that built the loader: its pipeline's threads exist only there.
    owner_pid: u32,
    inner: Mutex<Inner>,
}

/// A batch taken from the pipeline but not yet handed to the caller: its conversion raised
/// (typically a Ctrl-C inside ``torch.from_dlpack``), so the next ``next()`` hands it out.
struct Undelivered {
    rows: i64,
    storage: Arc<dyn Storage>,
    /// With ``pad=``: each ragged column's padded copy (name, width, values, mask).
    padded: Vec<(String, ciphershard::pipeline::Padded)>,
    /// The position before this batch: what ``state_dict()`` reports while it is held.
    state_before: LoaderState,
}

/// The running pipeline: host batches, or CUDA device batches.
enum Active {
    Host(Loader),
    #[cfg(feature = "cuda")]
    Device(ciphershard::pipeline::DeviceLoader),
}

/// One batch from either pipeline.
enum AnyBatch {
    Host(Batch),
    #[cfg(feature = "cuda")]
    Device(ciphershard::pipeline::CudaBatch),
}

impl Active {
    fn state(&self) -> LoaderState {
        match self {
            Active::Host(l) => l.state(),
            #[cfg(feature = "cuda")]
            Active::Device(l) => l.state(),
        }
    }
    fn stats(&self) -> LoaderStats {
        match self {
            Active::Host(l) => l.stats(),
            #[cfg(feature = "cuda")]
            Active::Device(l) => l.stats(),
        }
    }
    fn batches_per_epoch(&self) -> u64 {
        match self {
            Active::Host(l) => l.batches_per_epoch(),
            #[cfg(feature = "cuda")]
            Active::Device(l) => l.batches_per_epoch(),
        }
    }
    /// Waits (without the GIL, Ctrl-C checked between slices on the host path) for the next
    /// batch. The device loader has no timed wait: its wait is GIL-free but not interruptible.
    fn next(&mut self, py: Python<'_>) -> PyResult<Option<ciphershard::Result<AnyBatch>>> {
        match self {
            Active::Host(loader) => {
                // A ready batch is taken without releasing the GIL; otherwise wait without it.
                if !loader.wait_next(Duration::ZERO) {
                    wait_interruptibly(py, || loader.wait_next(SIGNAL_POLL))?;
                }
                Ok(loader.next().map(|r| r.map(AnyBatch::Host)))
            }
            #[cfg(feature = "cuda")]
            Active::Device(loader) => {
                let item = py.detach(|| loader.next());
                Ok(item.map(|r| r.map(AnyBatch::Device)))
            }
        }
    }
}

/// The mutable part of a loader.
struct Inner {
    opts: LoaderOptions,
    backend: Option<ciphershard::Backend>,
    epochs: Option<u64>,
    state: Option<LoaderState>,
    active: Option<Active>,
    /// Telemetry of the pipelines that already ended.
    finished: Option<LoaderStats>,
    closed: bool,
    /// Batches per epoch once known (`len()` plans it without starting a pipeline).
    batches_per_epoch: Option<u64>,
    undelivered: Option<Undelivered>,
}

fn env_u64(name: &str) -> PyResult<Option<u64>> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse::<u64>().map(Some).map_err(|_| {
            pyo3::exceptions::PyValueError::new_err(format!(
                "environment variable {name}={v:?} is not a non-negative integer"
            ))
        }),
        _ => Ok(None),
    }
}

fn add_stage(a: &mut StageStats, b: &StageStats) {
    a.bytes += b.bytes;
    a.ns += b.ns;
    a.gbps = if a.ns == 0 {
        0.0
    } else {
        a.bytes as f64 / a.ns as f64
    };
}

fn merge_stats(total: &mut LoaderStats, s: &LoaderStats) {
    add_stage(&mut total.read, &s.read);
    add_stage(&mut total.verify, &s.verify);
    add_stage(&mut total.decrypt, &s.decrypt);
    add_stage(&mut total.assemble, &s.assemble);
    total.consumer_wait_ns += s.consumer_wait_ns;
    total.batches += s.batches;
    total.delivered_bytes += s.delivered_bytes;
    total.chunks_loaded += s.chunks_loaded;
    let ratio = |x: u64| {
        if total.delivered_bytes == 0 {
            0.0
        } else {
            x as f64 / total.delivered_bytes as f64
        }
    };
    total.read_amplification = ratio(total.read.bytes);
    total.decrypt_amplification = ratio(total.decrypt.bytes);
    total.pool_bytes = s.pool_bytes;
    total.first_batch_ns = s.first_batch_ns;
}

fn json_to_py<'py>(py: Python<'py>, json: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (json,))
}

fn py_to_json(obj: &Bound<'_, PyAny>) -> PyResult<String> {
    obj.py()
        .import("json")?
        .call_method1("dumps", (obj,))?
        .extract()
}

impl Inner {
    /// The position after the last batch handed to the caller.
    fn current_state(&self) -> Option<LoaderState> {
        if let Some(u) = &self.undelivered {
            return Some(u.state_before.clone());
        }
        self.active
            .as_ref()
            .map(Active::state)
            .or_else(|| self.state.clone())
    }

    /// The position and the batches per epoch, without starting a pipeline: from the running
    /// one, else planned from the options (opening the shards, no threads and no buffers).
    fn position(
        &mut self,
        py: Python<'_>,
        dataset: &PyDataset,
        device: Option<usize>,
    ) -> PyResult<(LoaderState, u64)> {
        if let Some(active) = &self.active {
            self.batches_per_epoch = Some(active.batches_per_epoch());
        }
        // A token budget's count varies by epoch: planned anew for a stopped loader's epoch.
        let cached = self
            .batches_per_epoch
            .filter(|_| self.active.is_some() || self.opts.budget.is_none());
        if let (Some(state), Some(per_epoch)) = (self.current_state(), cached) {
            return Ok((state, per_epoch));
        }
        let opts = match &self.state {
            Some(s) => self.opts.clone().resume(s),
            None => self.opts.clone(),
        };
        // The plan depends on the shards only; a device loader plans with the host cipher.
        let backend = match device {
            Some(_) => Some(ciphershard::Backend::Cpu),
            None => self.backend,
        };
        let (source, _) = dataset.source(py, backend)?;
        let (planned, per_epoch) = py
            .detach(|| LoaderState::planned(source.as_ref(), &opts))
            .py()?;
        self.batches_per_epoch = Some(per_epoch);
        Ok((self.current_state().unwrap_or(planned), per_epoch))
    }

    /// Ends the running pipeline (joining its threads), keeping its position and telemetry.
    fn stop_active(&mut self, py: Python<'_>) {
        if let Some(l) = self.active.take() {
            self.state = Some(l.state());
            let s = l.stats();
            match &mut self.finished {
                Some(total) => merge_stats(total, &s),
                None => self.finished = Some(s),
            }
            py.detach(move || drop(l));
        }
    }

    /// Starts a pipeline at the current position.
    fn start(
        &mut self,
        py: Python<'_>,
        dataset: &PyDataset,
        device: Option<usize>,
    ) -> PyResult<()> {
        let mut opts = self.opts.clone();
        let state = self.state.clone();
        let start_epoch = state.as_ref().map_or(0, |s| s.epoch);
        opts.epochs = match self.epochs {
            Some(n) => n,
            None => start_epoch + 1,
        };
        if let Some(ordinal) = device {
            #[cfg(feature = "cuda")]
            {
                let loader = py
                    .detach(|| dataset.open_device(ordinal, &opts, state.as_ref()))
                    .py()?;
                self.active = Some(Active::Device(loader));
                return Ok(());
            }
            #[cfg(not(feature = "cuda"))]
            return Err(no_cuda_build(py, ordinal));
        }
        let (source, _) = dataset.source(py, self.backend)?;
        let loader = py
            .detach(|| match &state {
                Some(s) => Loader::resume(source.clone(), &opts, s),
                None => Loader::new(source.clone(), &opts),
            })
            .py()?;
        self.active = Some(Active::Host(loader));
        Ok(())
    }
}

#[cfg(not(feature = "cuda"))]
fn no_cuda_build(py: Python<'_>, ordinal: usize) -> PyErr {
    new_err(
        py,
        "InvalidArgumentError",
        format!("device=\"cuda:{ordinal}\": this build of ciphershard has no CUDA support"),
    )
}

/// Parses `device`: `None`/`"cpu"` → host batches, `"cuda"`/`"cuda:N"` → device `N` (0).
fn parse_device(py: Python<'_>, device: Option<&str>) -> PyResult<Option<usize>> {
    let bad = || {
        new_err(
            py,
            "InvalidArgumentError",
            format!(
                "device={:?}: expected \"cpu\", \"cuda\" or \"cuda:N\"",
                device.unwrap_or_default()
            ),
        )
    };
    match device.map(str::trim) {
        None | Some("cpu") => Ok(None),
        Some("cuda") => Ok(Some(0)),
        Some(d) => match d.strip_prefix("cuda:") {
            Some(n) => n.parse::<usize>().map(Some).map_err(|_| bad()),
            None => Err(bad()),
        },
    }
}

impl PyLoader {
    fn lock(&self, py: Python<'_>) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock_py_attached(py)
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses every use in a process forked from the one that built the loader: the
    /// pipeline's threads were not copied into it.
    fn refuse_if_forked(&self, py: Python<'_>) -> PyResult<()> {
        let pid = std::process::id();
        if pid == self.owner_pid {
            return Ok(());
        }
        Err(new_err(
            py,
            "LoaderStoppedError",
            format!(
                "loader: inherited through fork() (built in process {}, this is {pid}); its \
                 threads run only in the parent: build a new Loader in this process",
                self.owner_pid
            ),
        ))
    }

    /// Takes the next batch from the pipeline (or the one a failed conversion left).
    fn take_next(&self, py: Python<'_>) -> PyResult<Undelivered> {
        self.refuse_if_forked(py)?;
        let mut inner = self.lock(py);
        if inner.closed {
            return Err(new_err(py, "LoaderStoppedError", "loader: closed".into()));
        }
        if let Some(kept) = inner.undelivered.take() {
            return Ok(kept);
        }
        if inner.active.is_none() {
            inner.start(py, self.dataset.get(), self.device)?;
        }
        let loader = inner.active.as_mut().expect("started above");
        let state_before = loader.state();
        match loader.next(py)? {
            Some(Ok(batch)) => {
                let padded = match (&batch, self.pad) {
                    (AnyBatch::Host(b), Some(width)) => b
                        .tensors()
                        .filter_map(|t| Some((t.name.to_string(), t.padded(width)?)))
                        .collect(),
                    _ => Vec::new(),
                };
                let (rows, storage) = self.storage(batch);
                Ok(Undelivered {
                    rows,
                    storage,
                    padded,
                    state_before,
                })
            }
            Some(Err(e)) => {
                inner.stop_active(py);
                Err(crate::errors::to_py_err(e))
            }
            None => {
                inner.stop_active(py);
                Err(PyStopIteration::new_err(()))
            }
        }
    }

    /// Rows and the shared column buffers of a batch.
    fn storage(&self, batch: AnyBatch) -> (i64, Arc<dyn Storage>) {
        match batch {
            AnyBatch::Host(mut batch) => {
                let rows = batch.len() as i64;
                // One region per column, then each ragged column's row offsets.
                let mut regions = batch.column_ptrs_mut();
                regions.extend(batch.offsets_ptrs_mut().into_iter().flatten());
                let storage = Arc::new(BatchStorage {
                    regions,
                    batch: Some(batch),
                    owner_pid: self.owner_pid,
                });
                (rows, storage)
            }
            #[cfg(feature = "cuda")]
            AnyBatch::Device(batch) => {
                let rows = batch.len() as i64;
                let ordinal = self.device.unwrap_or(0) as i32;
                let storage = Arc::new(crate::cuda::DeviceBatchStorage::new(batch, ordinal));
                (rows, storage)
            }
        }
    }

    /// The batch as a dict of tensors (``torch.Tensor`` with ``as_torch``).
    fn batch_dict<'py>(
        &self,
        py: Python<'py>,
        batch: &Undelivered,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (rows, storage) = (batch.rows, &batch.storage);
        let out = PyDict::new(py);
        let export = |t: Tensor| -> PyResult<Bound<'py, PyAny>> {
            let t = Bound::new(py, t)?.into_any();
            match &self.as_torch {
                Some(from_dlpack) => from_dlpack.bind(py).call1((t,)),
                None => Ok(t),
            }
        };
        let mut ragged = self.columns.len();
        for (i, (name, dtype, row_shape, is_ragged)) in self.columns.iter().enumerate() {
            if !is_ragged {
                // The first dimension is the batch's rows, or what the buffer holds (a packed
                // batch's cu_seqlens vary in length).
                let row_bytes = row_shape.iter().product::<i64>() * dtype.size() as i64;
                let first = match storage.region(i).1 as i64 {
                    len if row_bytes > 0 && len % row_bytes == 0 => len / row_bytes,
                    _ => rows,
                };
                let shape: Vec<i64> = std::iter::once(first)
                    .chain(row_shape.iter().copied())
                    .collect();
                out.set_item(
                    name,
                    export(Tensor::new(storage.clone(), i, *dtype, shape)?)?,
                )?;
                continue;
            }
            // A ragged column: its values [E, ...element shape] under its name, its B + 1
            // int64 row offsets under `NAME.offsets`, and with as_torch a jagged nested
            // tensor over both (no copy) under `NAME.nested`.
            let elem_bytes = row_shape.iter().product::<i64>() * dtype.size() as i64;
            let (_, len) = storage.region(i);
            let elements = if elem_bytes == 0 {
                0
            } else {
                len as i64 / elem_bytes
            };
            let shape: Vec<i64> = std::iter::once(elements)
                .chain(row_shape.iter().copied())
                .collect();
            let values = export(Tensor::new(storage.clone(), i, *dtype, shape)?)?;
            let offsets = export(Tensor::new(
                storage.clone(),
                ragged,
                DType::from_name("I64").expect("I64 maps"),
                vec![rows + 1],
            )?)?;
            ragged += 1;
            if let Some(nested) = &self.nested {
                let kw = pyo3::types::PyDict::new(py);
                kw.set_item("offsets", &offsets)?;
                out.set_item(
                    format!("{name}.nested"),
                    nested.bind(py).call((&values,), Some(&kw))?,
                )?;
            }
            out.set_item(name, values)?;
            out.set_item(format!("{name}.offsets"), offsets)?;
        }
        // pad=: each ragged column as a dense [B, W, ...] copy and its [B, W] mask.
        for (name, p) in &batch.padded {
            let Some((_, dtype, elem, _)) = self.columns.iter().find(|c| &c.0 == name) else {
                continue;
            };
            let b = rows;
            let w = p.width as i64;
            let shape: Vec<i64> = [b, w].into_iter().chain(elem.iter().copied()).collect();
            let values: Arc<dyn Storage> = Arc::new(OwnedStorage::copy_of(&p.values));
            let mask: Arc<dyn Storage> = Arc::new(OwnedStorage::copy_of(&p.mask));
            let bool_dt = DType::from_name("BOOL").expect("BOOL maps");
            out.set_item(
                format!("{name}.padded"),
                export(Tensor::new(values, 0, *dtype, shape)?)?,
            )?;
            out.set_item(
                format!("{name}.mask"),
                export(Tensor::new(mask, 0, bool_dt, vec![b, w])?)?,
            )?;
        }
        Ok(out)
    }
}

#[pymethods]
impl PyLoader {
    #[new]
    #[pyo3(signature = (
        dataset, batch_size, *, shuffle=true, seed=0, epochs=None, prefetch=4, threads=None,
        backend=None, rank=None, world_size=None, drop_last=false, window_blocks=8,
        block_rows=None, state=None, as_torch=false, device=None, pack=None, seq_len=None,
        pad=None, budget=None, max_tokens=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        dataset: Py<PyDataset>,
        batch_size: usize,
        shuffle: bool,
        seed: u64,
        epochs: Option<u64>,
        prefetch: usize,
        threads: Option<usize>,
        backend: Option<&str>,
        rank: Option<u64>,
        world_size: Option<u64>,
        drop_last: bool,
        window_blocks: u64,
        block_rows: Option<u64>,
        state: Option<Bound<'_, PyAny>>,
        as_torch: bool,
        device: Option<&str>,
        pack: Option<String>,
        seq_len: Option<u64>,
        pad: Option<Bound<'_, PyAny>>,
        budget: Option<String>,
        max_tokens: Option<u64>,
    ) -> PyResult<Self> {
        // pad="longest" or a width.
        let pad = match pad {
            None => None,
            Some(p) if p.extract::<String>().is_ok_and(|s| s == "longest") => Some(None),
            Some(p) => match p.extract::<usize>() {
                Ok(w) if w > 0 => Some(Some(w)),
                _ => {
                    return Err(new_err(
                        py,
                        "InvalidArgumentError",
                        "pad is \"longest\" or a positive width".into(),
                    ));
                }
            },
        };
        let device = parse_device(py, device)?;
        let pack = match (pack, seq_len) {
            (Some(column), Some(seq_len)) => {
                Some(ciphershard::pipeline::options::PackOptions { column, seq_len })
            }
            (None, None) => None,
            _ => {
                return Err(new_err(
                    py,
                    "InvalidArgumentError",
                    "pack and seq_len go together: pack=\"input_ids\", seq_len=2048".into(),
                ));
            }
        };
        let budget = match (budget, max_tokens) {
            (Some(column), Some(max_tokens)) => {
                Some(ciphershard::pipeline::TokenBudget { column, max_tokens })
            }
            (None, None) => None,
            _ => {
                return Err(new_err(
                    py,
                    "InvalidArgumentError",
                    "budget and max_tokens go together: budget=\"input_ids\", max_tokens=16384"
                        .into(),
                ));
            }
        };
        let rank = match rank {
            Some(r) => r,
            None => env_u64("RANK")?.unwrap_or(0),
        };
        let world_size = match world_size {
            Some(w) => w,
            None => env_u64("WORLD_SIZE")?.unwrap_or(1),
        };
        let threads = threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .clamp(1, 8)
        });
        let backend = backend.map(parse_backend).transpose()?;
        if device.is_some()
            && !matches!(
                backend,
                None | Some(ciphershard::Backend::Cuda | ciphershard::Backend::Auto)
            )
        {
            return Err(new_err(
                py,
                "InvalidArgumentError",
                "device=\"cuda\" decrypts on the GPU: backend must be None, \"auto\" or \"cuda\""
                    .into(),
            ));
        }
        let mut columns: Vec<(String, DType, Vec<i64>, bool)> = dataset
            .get()
            .columns()
            .into_iter()
            .map(|(n, d, s, r)| (n, d, s.into_iter().map(|x| x as i64).collect(), r))
            .collect();
        // A packed batch: the packed column [B, L, ...], position ids [B, L] and cu_seqlens.
        if let Some(p) = &pack
            && let Some((name, dtype, elem, _)) = columns.iter().find(|c| c.0 == p.column)
        {
            let l = p.seq_len as i64;
            let tokens: Vec<i64> = std::iter::once(l).chain(elem.iter().copied()).collect();
            let dt = |n: &str| DType::from_name(n).expect("maps");
            columns = vec![
                (name.clone(), *dtype, tokens, false),
                ("position_ids".into(), dt("I64"), vec![l], false),
                ("cu_seqlens".into(), dt("I32"), vec![], false),
            ];
        }
        let nested = if as_torch && columns.iter().any(|c| c.3) {
            Some(
                py.import("torch.nested")?
                    .getattr("nested_tensor_from_jagged")?
                    .unbind(),
            )
        } else {
            None
        };
        let as_torch = if as_torch {
            Some(py.import("torch")?.getattr("from_dlpack")?.unbind())
        } else {
            None
        };
        let opts = LoaderOptions {
            batch_size,
            seed,
            shuffle,
            epochs: epochs.unwrap_or(1),
            rank,
            world_size,
            drop_last,
            prefetch,
            threads,
            window_blocks,
            block_rows,
            pack,
            budget,
            ..LoaderOptions::default()
        };
        if batch_size == 0 || prefetch == 0 || threads == 0 || window_blocks == 0 {
            return Err(new_err(
                py,
                "InvalidArgumentError",
                "batch_size, prefetch, threads and window_blocks must be at least 1".into(),
            ));
        }
        if world_size == 0 || rank >= world_size {
            return Err(new_err(
                py,
                "InvalidArgumentError",
                format!("rank {rank} is not below world_size {world_size}"),
            ));
        }
        let loader = PyLoader {
            dataset,
            columns,
            as_torch,
            nested,
            pad,
            device,
            owner_pid: std::process::id(),
            inner: Mutex::new(Inner {
                opts,
                backend,
                epochs,
                state: None,
                active: None,
                finished: None,
                closed: false,
                batches_per_epoch: None,
                undelivered: None,
            }),
        };
        if let Some(s) = state {
            loader.load_state_dict(py, &s)?;
        }
        Ok(loader)
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyResult<PyRef<'_, Self>> {
        let py = slf.py();
        slf.refuse_if_forked(py)?;
        {
            let mut inner = slf.lock(py);
            if inner.closed {
                return Err(new_err(py, "LoaderStoppedError", "loader: closed".into()));
            }
            if inner.active.is_none() {
                inner.start(py, slf.dataset.get(), slf.device)?;
            }
        }
        Ok(slf)
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let batch = self.take_next(py)?;
        // Converted without the lock: the conversion runs Python code (signal handlers too).
        self.batch_dict(py, &batch).inspect_err(|_| {
            // The batch left the pipeline and counts as done there: keep it for the next call.
            let mut inner = self.lock(py);
            if !inner.closed {
                inner.undelivered = Some(batch);
            }
        })
    }

    /// Batches per epoch for this rank (starts nothing).
    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        self.refuse_if_forked(py)?;
        let mut inner = self.lock(py);
        let (_, per_epoch) = inner.position(py, self.dataset.get(), self.device)?;
        Ok(per_epoch as usize)
    }

    /// Epoch of the next batch.
    #[getter]
    fn epoch(&self, py: Python<'_>) -> PyResult<u64> {
        self.refuse_if_forked(py)?;
        Ok(self.lock(py).current_state().map_or(0, |s| s.epoch))
    }

    /// A small JSON-compatible dict: everything the order depends on plus the position after
    /// the last batch handed out. ``Loader(ds, ..., state=d)`` or ``load_state_dict(d)``
    /// continues exactly there.
    fn state_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.refuse_if_forked(py)?;
        let mut inner = self.lock(py);
        // Not started yet: the plan settles the automatic block size; nothing is started.
        let (state, _) = inner.position(py, self.dataset.get(), self.device)?;
        drop(inner);
        let json = serde_json::json!({ "format": STATE_FORMAT, "loader": state }).to_string();
        json_to_py(py, &json)
    }

    /// Restores a position saved by :meth:`state_dict` (stops a running pipeline; the next
    /// iteration starts from the restored position).
    fn load_state_dict(&self, py: Python<'_>, state: &Bound<'_, PyAny>) -> PyResult<()> {
        let json = py_to_json(state)?;
        let bad = |why: String| new_err(py, "InvalidArgumentError", format!("loader state: {why}"));
        let v: serde_json::Value = serde_json::from_str(&json).map_err(|e| bad(e.to_string()))?;
        if v.get("format").and_then(|f| f.as_str()) != Some(STATE_FORMAT) {
            return Err(bad(format!(
                "not a ciphershard loader state (expected format '{STATE_FORMAT}')"
            )));
        }
        let s: LoaderState =
            serde_json::from_value(v["loader"].clone()).map_err(|e| bad(e.to_string()))?;
        if s.block_rows == 0 {
            return Err(bad("block_rows is 0".into()));
        }
        self.refuse_if_forked(py)?;
        let mut inner = self.lock(py);
        // Resuming applies the state's order: options that say otherwise would be ignored.
        let mismatches = s.mismatches(&inner.opts);
        if !mismatches.is_empty() {
            return Err(bad(format!(
                "saved with other options: {}; pass the options it was saved with",
                mismatches.join(", ")
            )));
        }
        inner.stop_active(py);
        inner.undelivered = None;
        inner.batches_per_epoch = None;
        inner.state = Some(s);
        Ok(())
    }

    /// Telemetry as a dict: per-stage ``{"bytes", "ns", "gbps"}`` for ``read``, ``verify``,
    /// ``decrypt``, ``assemble``; ``consumer_wait_ns``, ``batches``, ``delivered_bytes``,
    /// ``chunks_loaded``, ``read_amplification``, ``decrypt_amplification``, ``pool_bytes``,
    /// ``first_batch_ns``. Summed over every epoch this object ran.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.refuse_if_forked(py)?;
        let inner = self.lock(py);
        let mut total = inner.finished.clone().unwrap_or_default();
        if let Some(l) = &inner.active {
            merge_stats(&mut total, &l.stats());
        }
        drop(inner);
        let json = serde_json::to_string(&total)
            .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.to_string()))?;
        json_to_py(py, &json)
    }

    /// Stops the pipeline and joins its threads. Tensors already handed out stay valid.
    /// In a process forked from the loader's, it does nothing (the threads are the parent's).
    fn close(&self, py: Python<'_>) {
        if std::process::id() != self.owner_pid {
            return;
        }
        let mut inner = self.lock(py);
        inner.stop_active(py);
        inner.undelivered = None;
        inner.closed = true;
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) {
        self.close(py);
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let forked = std::process::id() != self.owner_pid;
        if forked {
            return "ciphershard.Loader(<inherited through fork(), unusable>)".into();
        }
        let inner = self.lock(py);
        let s = inner.current_state();
        format!(
            "ciphershard.Loader(batch_size={}, shuffle={}, seed={}, rank={}, world_size={}, epoch={}, batches_done_in_epoch={})",
            inner.opts.batch_size,
            if inner.opts.shuffle { "True" } else { "False" },
            inner.opts.seed,
            inner.opts.rank,
            inner.opts.world_size,
            s.as_ref().map_or(0, |s| s.epoch),
            s.as_ref().map_or(0, |s| s.batches_done_in_epoch)
        )
    }
}

impl Drop for PyLoader {
    fn drop(&mut self) {
        // In a forked child the pipeline's threads do not exist: joining them is undefined
        // (it panicked), and its locks may be held forever. Leak the child's copy instead;
        // `get_mut` takes no lock.
        if std::process::id() != self.owner_pid {
            let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
            std::mem::forget(inner.active.take());
            std::mem::forget(inner.undelivered.take());
        }
    }
}

/// Runs the Rust bench (`ciphershard bench`'s library function) over `dataset` with the same
/// loader options a Python run would use, returning its report as a dict. For
/// python/benches/bench_loader.py: the binding's overhead is Python's batches/s over this.
#[pyfunction]
#[pyo3(signature = (dataset, batch_size, *, epochs=1, threads=2, prefetch=4, window_blocks=8))]
pub fn _bench_native<'py>(
    py: Python<'py>,
    dataset: &Bound<'py, PyDataset>,
    batch_size: usize,
    epochs: u64,
    threads: usize,
    prefetch: usize,
    window_blocks: u64,
) -> PyResult<Bound<'py, PyAny>> {
    use ciphershard::bench::loader::{BenchOptions, run_source};
    let (source, backend) = dataset.get().source(py, None)?;
    let opts = BenchOptions {
        backend,
        threads,
        batch_size,
        epochs,
        prefetch,
        window_blocks,
        ..BenchOptions::default()
    };
    let name = dataset.get().path_string();
    let report = py.detach(|| run_source(source, &name, &opts)).py()?;
    let json = serde_json::to_string(&report)
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.to_string()))?;
    json_to_py(py, &json)
}
