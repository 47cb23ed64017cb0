//! DLPack export: hands a buffer to NumPy, PyTorch or JAX without copying it.
//!
//! A `DLManagedTensor` (or `DLManagedTensorVersioned`, DLPack >= 1.0) is allocated together with
//! an `Arc` of the storage that owns the memory and the shape/stride arrays. The consumer calls
//! the deleter when its last view dies; the deleter drops the `Arc`, and when the last holder is
//! gone the storage returns its buffer to the loader's pool. The deleter needs no GIL: dropping
//! the storage touches only Rust state, so a consumer may free a tensor from any thread.
//!
//! The capsule protocol (<https://dmlc.github.io/dlpack/latest/python_spec.html>): the capsule
//! is named `dltensor` (or `dltensor_versioned`); a consumer that takes ownership renames it to
//! `used_dltensor[_versioned]`. The capsule's destructor calls the deleter only when the capsule
//! was never consumed, so every export is freed exactly once.
//!
//! Most of the binding's `unsafe` code is here (see lib.rs for the rest).

use std::ffi::{CStr, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

use pyo3::ffi;
use pyo3::prelude::*;

use crate::tensor::{DType, Storage};

/// `DLDeviceType::kDLCPU`.
pub const DEVICE_CPU: i32 = 1;
/// `DLDeviceType::kDLCUDA`.
pub const DEVICE_CUDA: i32 = 2;

/// The DLPack version this producer speaks (dtype codes up to 1.1's float8 kinds; strides
/// always set, as 1.2 requires).
const VERSION: DLPackVersion = DLPackVersion { major: 1, minor: 2 };
/// `DLPACK_FLAG_BITMASK_IS_COPIED`.
pub const FLAG_IS_COPIED: u64 = 1 << 1;

const NAME_LEGACY: &CStr = c"dltensor";
const NAME_VERSIONED: &CStr = c"dltensor_versioned";

/// Exports not yet released by their consumer (or by the capsule destructor). Tests read it to
/// prove every export is freed exactly once.
static LIVE_EXPORTS: AtomicIsize = AtomicIsize::new(0);

/// Number of DLPack exports whose deleter has not run yet.
pub fn live_exports() -> isize {
    LIVE_EXPORTS.load(Ordering::SeqCst)
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DLDevice {
    pub device_type: i32,
    pub device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLPackVersion {
    major: u32,
    minor: u32,
}

#[repr(C)]
struct DLManagedTensorVersioned {
    version: DLPackVersion,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DLTensor,
}

/// What one export keeps alive. Boxed, so the pointers inside the managed tensor (to `shape`
/// and `strides`, and `manager_ctx` to the box itself) stay valid until the deleter runs.
struct Export<M> {
    managed: M,
    _storage: Arc<dyn Storage>,
    shape: Vec<i64>,
    strides: Vec<i64>,
}

/// Where the exported bytes are and what they are.
pub struct ExportRequest {
    pub storage: Arc<dyn Storage>,
    pub region: usize,
    pub dtype: DType,
    pub shape: Vec<i64>,
    pub flags: u64,
}

fn dl_tensor(req: &ExportRequest, shape: &mut [i64], strides: &mut [i64]) -> DLTensor {
    let (ptr, len) = req.storage.region(req.region);
    DLTensor {
        // DLPack asks for NULL when the tensor holds no element.
        data: if len == 0 {
            std::ptr::null_mut()
        } else {
            ptr.cast()
        },
        device: req.storage.device(),
        ndim: shape.len() as i32,
        dtype: DLDataType {
            code: req.dtype.dl_code,
            bits: req.dtype.bits,
            lanes: 1,
        },
        shape: shape.as_mut_ptr(),
        strides: strides.as_mut_ptr(),
        byte_offset: 0,
    }
}

/// Row-major (C order) strides in elements.
fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1].max(1);
    }
    strides
}

unsafe extern "C" fn delete_legacy(m: *mut DLManagedTensor) {
    // SAFETY: `m` is the `managed` field of a leaked `Box<Export<DLManagedTensor>>` and
    // `manager_ctx` points to that box; the DLPack contract calls the deleter once.
    unsafe {
        let export = (*m).manager_ctx as *mut Export<DLManagedTensor>;
        drop(Box::from_raw(export));
    }
    LIVE_EXPORTS.fetch_sub(1, Ordering::SeqCst);
}

unsafe extern "C" fn delete_versioned(m: *mut DLManagedTensorVersioned) {
    // SAFETY: as in `delete_legacy`, for the versioned struct.
    unsafe {
        let export = (*m).manager_ctx as *mut Export<DLManagedTensorVersioned>;
        drop(Box::from_raw(export));
    }
    LIVE_EXPORTS.fetch_sub(1, Ordering::SeqCst);
}

/// Destructor of a capsule that may never have been consumed.
unsafe extern "C" fn capsule_destructor_legacy(capsule: *mut ffi::PyObject) {
    // SAFETY: called by Python with a live capsule. `PyCapsule_IsValid` never raises; it is
    // true only while the name is still `dltensor`, i.e. no consumer took ownership, in which
    // case the pointer is our `DLManagedTensor` and we must free it.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, NAME_LEGACY.as_ptr()) == 1 {
            let m =
                ffi::PyCapsule_GetPointer(capsule, NAME_LEGACY.as_ptr()) as *mut DLManagedTensor;
            if let Some(deleter) = (*m).deleter {
                deleter(m);
            }
        }
    }
}

unsafe extern "C" fn capsule_destructor_versioned(capsule: *mut ffi::PyObject) {
    // SAFETY: as in `capsule_destructor_legacy`, for `dltensor_versioned`.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, NAME_VERSIONED.as_ptr()) == 1 {
            let m = ffi::PyCapsule_GetPointer(capsule, NAME_VERSIONED.as_ptr())
                as *mut DLManagedTensorVersioned;
            if let Some(deleter) = (*m).deleter {
                deleter(m);
            }
        }
    }
}

/// Builds a DLPack capsule for `req`: versioned when the consumer asked for DLPack >= 1.0,
/// legacy otherwise.
pub fn export(py: Python<'_>, req: ExportRequest, versioned: bool) -> PyResult<Py<PyAny>> {
    let shape = req.shape.clone();
    let strides = contiguous_strides(&shape);
    LIVE_EXPORTS.fetch_add(1, Ordering::SeqCst);
    let raw = if versioned {
        let mut export = Box::new(Export {
            managed: DLManagedTensorVersioned {
                version: VERSION,
                manager_ctx: std::ptr::null_mut(),
                deleter: Some(delete_versioned),
                flags: req.flags,
                dl_tensor: DLTensor {
                    data: std::ptr::null_mut(),
                    device: DLDevice {
                        device_type: 0,
                        device_id: 0,
                    },
                    ndim: 0,
                    dtype: DLDataType {
                        code: 0,
                        bits: 0,
                        lanes: 0,
                    },
                    shape: std::ptr::null_mut(),
                    strides: std::ptr::null_mut(),
                    byte_offset: 0,
                },
            },
            _storage: req.storage.clone(),
            shape,
            strides,
        });
        let e = &mut *export;
        e.managed.dl_tensor = dl_tensor(&req, &mut e.shape, &mut e.strides);
        let raw = Box::into_raw(export);
        // SAFETY: `raw` is a valid, uniquely owned box; storing its own address lets the
        // deleter find it again.
        unsafe {
            (*raw).managed.manager_ctx = raw.cast();
            let m: *mut DLManagedTensorVersioned = &raw mut (*raw).managed;
            ffi::PyCapsule_New(
                m.cast(),
                NAME_VERSIONED.as_ptr(),
                Some(capsule_destructor_versioned),
            )
        }
        .pipe_check(|| {
            // SAFETY: the capsule was not created, so the export is still ours to free.
            unsafe { delete_versioned(&raw mut (*raw).managed) }
        })
    } else {
        let mut export = Box::new(Export {
            managed: DLManagedTensor {
                dl_tensor: DLTensor {
                    data: std::ptr::null_mut(),
                    device: DLDevice {
                        device_type: 0,
                        device_id: 0,
                    },
                    ndim: 0,
                    dtype: DLDataType {
                        code: 0,
                        bits: 0,
                        lanes: 0,
                    },
                    shape: std::ptr::null_mut(),
                    strides: std::ptr::null_mut(),
                    byte_offset: 0,
                },
                manager_ctx: std::ptr::null_mut(),
                deleter: Some(delete_legacy),
            },
            _storage: req.storage.clone(),
            shape,
            strides,
        });
        let e = &mut *export;
        e.managed.dl_tensor = dl_tensor(&req, &mut e.shape, &mut e.strides);
        let raw = Box::into_raw(export);
        // SAFETY: as above.
        unsafe {
            (*raw).managed.manager_ctx = raw.cast();
            let m: *mut DLManagedTensor = &raw mut (*raw).managed;
            ffi::PyCapsule_New(
                m.cast(),
                NAME_LEGACY.as_ptr(),
                Some(capsule_destructor_legacy),
            )
        }
        .pipe_check(|| {
            // SAFETY: the capsule was not created, so the export is still ours to free.
            unsafe { delete_legacy(&raw mut (*raw).managed) }
        })
    };
    match raw {
        // SAFETY: `PyCapsule_New` returned a new (owned) reference.
        Some(obj) => Ok(unsafe { Bound::from_owned_ptr(py, obj) }.unbind()),
        None => Err(PyErr::fetch(py)),
    }
}

trait PipeCheck {
    fn pipe_check(self, on_null: impl FnOnce()) -> Option<*mut ffi::PyObject>;
}

impl PipeCheck for *mut ffi::PyObject {
    fn pipe_check(self, on_null: impl FnOnce()) -> Option<*mut ffi::PyObject> {
        if self.is_null() {
            on_null();
            None
        } else {
            Some(self)
        }
    }
}
