//! The calls into the CUDA libraries that Rust cannot check and that are not kernel launches
//! (those are all in `launch.rs`): looking for the driver and NVRTC libraries, and allocating
//! pinned host memory.

#![allow(unsafe_code)] // the probes and pinned allocation (see above); `mod.rs` denies it elsewhere

use std::sync::Arc;

use cudarc::driver::{CudaContext, DeviceRepr, DriverError, PinnedHostSlice};

/// Whether the CUDA driver library (libcuda) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names; no CUDA call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether the NVRTC library can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Element types of pinned buffers: plain words, for which every bit pattern is a value.
pub(crate) trait AnyBits: DeviceRepr {}
impl AnyBits for u8 {}
impl AnyBits for u32 {}

/// `len` elements of page-locked host memory in `ctx` (write-combined, cudarc's default).
/// The contents are whatever the driver left there: write before reading.
pub(crate) fn alloc_pinned<T: AnyBits>(
    ctx: &Arc<CudaContext>,
    len: usize,
) -> Result<PinnedHostSlice<T>, DriverError> {
    // SAFETY: cudarc marks this unsafe because the memory is not initialized as a `T`: `T` is u8
    // or u32 (`AnyBits`), for which any bytes are a valid value. Every caller also writes before
    // it reads: staging is filled before its upload, tag accumulators are the target of a full
    // device-to-host copy, the benchmark's buffer is zero-filled.
    unsafe { ctx.alloc_pinned::<T>(len) }
}
