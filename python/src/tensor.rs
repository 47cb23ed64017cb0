//! `ciphershard.Tensor`: a view of one column of a decrypted batch that exports through DLPack.

use std::sync::Arc;

use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::dlpack::{self, DEVICE_CPU, DLDevice, ExportRequest, FLAG_IS_COPIED};

/// An element type as DLPack and the array libraries name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DType {
    /// `DLDataTypeCode`.
    pub dl_code: u8,
    /// Bits per element.
    pub bits: u8,
    /// The NumPy/PyTorch-style name (`float32`, `bfloat16`, ...).
    pub name: &'static str,
    /// The safetensors name (`F32`, `BF16`, ...).
    pub safetensors: &'static str,
}

const INT: u8 = 0;
const UINT: u8 = 1;
const FLOAT: u8 = 2;
const BFLOAT: u8 = 4;
const BOOL: u8 = 6;
const FLOAT8_E4M3FN: u8 = 10;
const FLOAT8_E5M2: u8 = 12;

/// Every dtype a shard can hold (docs/FORMAT.md), with its DLPack code.
pub const DTYPES: [DType; 15] = [
    DType {
        dl_code: FLOAT,
        bits: 64,
        name: "float64",
        safetensors: "F64",
    },
    DType {
        dl_code: FLOAT,
        bits: 32,
        name: "float32",
        safetensors: "F32",
    },
    DType {
        dl_code: FLOAT,
        bits: 16,
        name: "float16",
        safetensors: "F16",
    },
    DType {
        dl_code: BFLOAT,
        bits: 16,
        name: "bfloat16",
        safetensors: "BF16",
    },
    DType {
        dl_code: INT,
        bits: 64,
        name: "int64",
        safetensors: "I64",
    },
    DType {
        dl_code: INT,
        bits: 32,
        name: "int32",
        safetensors: "I32",
    },
    DType {
        dl_code: INT,
        bits: 16,
        name: "int16",
        safetensors: "I16",
    },
    DType {
        dl_code: INT,
        bits: 8,
        name: "int8",
        safetensors: "I8",
    },
    DType {
        dl_code: UINT,
        bits: 8,
        name: "uint8",
        safetensors: "U8",
    },
    DType {
        dl_code: UINT,
        bits: 16,
        name: "uint16",
        safetensors: "U16",
    },
    DType {
        dl_code: UINT,
        bits: 32,
        name: "uint32",
        safetensors: "U32",
    },
    DType {
        dl_code: UINT,
        bits: 64,
        name: "uint64",
        safetensors: "U64",
    },
    DType {
        dl_code: BOOL,
        bits: 8,
        name: "bool",
        safetensors: "BOOL",
    },
    // safetensors' F8_E4M3 is the OCP "fn" variant (no infinities), as torch.float8_e4m3fn.
    DType {
        dl_code: FLOAT8_E4M3FN,
        bits: 8,
        name: "float8_e4m3fn",
        safetensors: "F8_E4M3",
    },
    DType {
        dl_code: FLOAT8_E5M2,
        bits: 8,
        name: "float8_e5m2",
        safetensors: "F8_E5M2",
    },
];

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        self.bits as usize / 8
    }

    /// Looks a dtype up by its NumPy-style or safetensors name.
    pub fn from_name(name: &str) -> Option<DType> {
        DTYPES
            .iter()
            .copied()
            .find(|d| d.name == name || d.safetensors == name)
    }
}

/// Memory that tensors view. Implementations own the bytes (a pool buffer held by a batch, or
/// a private copy); the bytes stay valid and in place for as long as the storage lives.
pub trait Storage: Send + Sync + 'static {
    /// Base pointer and byte length of region `index` (a batch has one region per column).
    fn region(&self, index: usize) -> (*mut u8, usize);
    /// Where the bytes live.
    fn device(&self) -> DLDevice;
    /// The storage one DLPack export holds (`me` is this storage). Host memory needs no stream
    /// bookkeeping, so by default the export shares `me`; device storage wraps it to learn when
    /// the consumer's stream is done with the buffer (python/src/cuda.rs).
    fn consumer_view(
        &self,
        me: Arc<dyn Storage>,
        _stream: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Arc<dyn Storage>> {
        Ok(me)
    }
}

/// A private host copy (for `__dlpack__(copy=True)` and `Tensor` built from Python bytes).
pub struct OwnedStorage {
    // u64 elements: 8-byte alignment for every dtype.
    words: Box<[u64]>,
    len: usize,
    // Bytes are written through this pointer by consumers; it is derived once from the
    // uniquely owned box and never turned back into a Rust reference.
    ptr: *mut u8,
}

// SAFETY: `OwnedStorage` owns its allocation; the raw pointer is only handed to consumers,
// which synchronise their own accesses (as with any shared NumPy/PyTorch buffer).
unsafe impl Send for OwnedStorage {}
// SAFETY: as above; no method reads or writes the bytes through `&self`.
unsafe impl Sync for OwnedStorage {}

impl OwnedStorage {
    /// Copies `bytes` into a fresh allocation.
    pub fn copy_of(bytes: &[u8]) -> Self {
        let mut words = vec![0u64; bytes.len().div_ceil(8)].into_boxed_slice();
        let ptr = words.as_mut_ptr().cast::<u8>();
        // SAFETY: `words` holds at least `bytes.len()` bytes and does not overlap `bytes`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, bytes.len()) };
        Self {
            words,
            len: bytes.len(),
            ptr,
        }
    }
}

impl Storage for OwnedStorage {
    fn region(&self, _index: usize) -> (*mut u8, usize) {
        let _ = &self.words;
        (self.ptr, self.len)
    }
    fn device(&self) -> DLDevice {
        DLDevice {
            device_type: DEVICE_CPU,
            device_id: 0,
        }
    }
}

/// One decrypted column of a batch, shape `[B, ...]`, viewing the loader's buffer.
///
/// Pass it to `torch.from_dlpack`, `numpy.from_dlpack` or `jax.dlpack.from_dlpack`: no byte is
/// copied. The buffer goes back to the loader's pool when this object and every array made
/// from it are gone.
#[pyclass(frozen, module = "ciphershard", name = "Tensor")]
pub struct Tensor {
    storage: Arc<dyn Storage>,
    region: usize,
    dtype: DType,
    shape: Vec<i64>,
}

impl Tensor {
    /// A tensor over `storage`'s region `region`. The region must hold exactly
    /// `dtype.size() * product(shape)` bytes.
    pub fn new(
        storage: Arc<dyn Storage>,
        region: usize,
        dtype: DType,
        shape: Vec<i64>,
    ) -> PyResult<Self> {
        let (_, len) = storage.region(region);
        let want = shape.iter().try_fold(dtype.size() as i64, |acc, &d| {
            if d < 0 { None } else { acc.checked_mul(d) }
        });
        if want != Some(len as i64) {
            return Err(PyValueError::new_err(format!(
                "a {} tensor of shape {:?} needs {:?} bytes, the buffer holds {len}",
                dtype.name, shape, want
            )));
        }
        Ok(Self {
            storage,
            region,
            dtype,
            shape,
        })
    }

    fn nbytes(&self) -> usize {
        self.storage.region(self.region).1
    }
}

fn device_name(d: DLDevice) -> String {
    match d.device_type {
        DEVICE_CPU => "cpu".to_string(),
        dlpack::DEVICE_CUDA => format!("cuda:{}", d.device_id),
        other => format!("dlpack-device-{other}:{}", d.device_id),
    }
}

#[pymethods]
impl Tensor {
    /// Builds a tensor from a private copy of `data` (bytes-like). For tests and small
    /// hand-made inputs; batches from a `Loader` never copy.
    #[staticmethod]
    #[pyo3(signature = (data, dtype, shape))]
    fn from_bytes(data: &[u8], dtype: &str, shape: Vec<i64>) -> PyResult<Self> {
        let dt = DType::from_name(dtype)
            .ok_or_else(|| PyValueError::new_err(format!("unknown dtype '{dtype}'")))?;
        Tensor::new(Arc::new(OwnedStorage::copy_of(data)), 0, dt, shape)
    }

    /// The shape, `(batch, ...)`.
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.shape)
    }

    /// Element type name, as NumPy and PyTorch spell it (`float32`, `bfloat16`, ...).
    #[getter]
    fn dtype(&self) -> &'static str {
        self.dtype.name
    }

    /// Number of dimensions.
    #[getter]
    fn ndim(&self) -> usize {
        self.shape.len()
    }

    /// Size in bytes.
    #[getter(nbytes)]
    fn py_nbytes(&self) -> usize {
        self.nbytes()
    }

    /// `cpu` or `cuda:N`.
    #[getter]
    fn device(&self) -> String {
        device_name(self.storage.device())
    }

    /// Address of the first element (the loader's buffer: exports share it).
    fn data_ptr(&self) -> usize {
        self.storage.region(self.region).0 as usize
    }

    fn __len__(&self) -> usize {
        self.shape.first().copied().unwrap_or(0) as usize
    }

    fn __repr__(&self) -> String {
        format!(
            "ciphershard.Tensor(shape={:?}, dtype={}, device={})",
            self.shape,
            self.dtype.name,
            device_name(self.storage.device())
        )
    }

    /// `(device_type, device_id)` as DLPack numbers them (`(1, 0)` for host memory).
    fn __dlpack_device__(&self) -> (i32, i32) {
        let d = self.storage.device();
        (d.device_type, d.device_id)
    }

    /// Exports the tensor as a DLPack capsule (the Python array API protocol).
    ///
    /// `stream` must be `None` (or -1) for host tensors. For CUDA tensors it is the consumer's
    /// stream (`None`: legacy default; `-1`: no synchronisation): the data is already complete,
    /// and the buffer is reused only after the work queued on that stream when the export is
    /// released has finished (see python/src/cuda.rs). `max_version >= (1, 0)` gets a versioned
    /// capsule. `copy=True` exports a private copy; otherwise the export shares the buffer.
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__(
        &self,
        py: Python<'_>,
        stream: Option<Bound<'_, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let device = self.storage.device();
        if device.device_type == DEVICE_CPU
            && let Some(s) = &stream
            && !s.is_none()
            && s.extract::<i64>().ok() != Some(-1)
        {
            return Err(PyBufferError::new_err(
                "stream must be None for a host (CPU) tensor",
            ));
        }
        if let Some((t, id)) = dl_device
            && (t, id) != (device.device_type, device.device_id)
        {
            return Err(PyBufferError::new_err(format!(
                "cannot export a {} tensor to DLPack device ({t}, {id}) (no cross-device copy)",
                device_name(device)
            )));
        }
        let versioned = matches!(max_version, Some((major, _)) if major >= 1);
        let (storage, region, flags): (Arc<dyn Storage>, usize, u64) = if copy == Some(true) {
            if device.device_type != DEVICE_CPU {
                return Err(PyBufferError::new_err(
                    "copy=True is only supported for host tensors",
                ));
            }
            let (ptr, len) = self.storage.region(self.region);
            // SAFETY: the storage keeps `len` bytes at `ptr` alive while `self` lives.
            let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
            (Arc::new(OwnedStorage::copy_of(bytes)), 0, FLAG_IS_COPIED)
        } else {
            let view = self
                .storage
                .consumer_view(self.storage.clone(), stream.as_ref())?;
            (view, self.region, 0)
        };
        dlpack::export(
            py,
            ExportRequest {
                storage,
                region,
                dtype: self.dtype,
                shape: self.shape.clone(),
                flags,
            },
            versioned,
        )
    }

    /// A NumPy array viewing the same memory (`numpy.from_dlpack(self)`).
    fn numpy<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        slf.py()
            .import("numpy")?
            .call_method1("from_dlpack", (slf,))
    }

    /// A PyTorch tensor viewing the same memory (`torch.from_dlpack(self)`).
    fn torch<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        slf.py()
            .import("torch")?
            .call_method1("from_dlpack", (slf,))
    }

    /// NumPy's `__array__` protocol: `numpy.asarray(tensor)` views the buffer (no copy)
    /// unless a different `dtype` or `copy=True` is requested.
    #[pyo3(signature = (dtype=None, copy=None))]
    fn __array__<'py>(
        slf: &Bound<'py, Self>,
        dtype: Option<Bound<'py, PyAny>>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let np = slf.py().import("numpy")?;
        let mut arr = np.call_method1("from_dlpack", (slf,))?;
        if let Some(dt) = dtype {
            let kw = PyDict::new(slf.py());
            kw.set_item("copy", copy.unwrap_or(false))?;
            arr = arr.call_method("astype", (dt,), Some(&kw))?;
        } else if copy == Some(true) {
            arr = arr.call_method0("copy")?;
        }
        Ok(arr)
    }
}
