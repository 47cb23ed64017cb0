//! How the wgpu backend reports failures: the error constructors every file uses, and the
//! device's failure slot (the first GPU failure, after which every call fails fast with it).
#![forbid(unsafe_code)]

use std::sync::Mutex;
use std::time::Duration;

use crate::error::Error;

/// The backend's name in errors.
pub(super) const BACKEND: &str = "wgpu";

/// Longest we wait for one GPU submission before calling the device hung.
pub(super) const GPU_TIMEOUT: Duration = Duration::from_secs(60);

/// A failure of the device or of a GPU operation.
pub(crate) fn backend_err(reason: impl Into<String>) -> Error {
    Error::Backend {
        backend: BACKEND,
        reason: reason.into(),
    }
}

/// The backend cannot be used here (no adapter, a CPU adapter where a GPU is required, a
/// device that does not open or lacks what the kernel needs).
pub(super) fn unavailable(reason: String) -> Error {
    Error::BackendUnavailable {
        backend: BACKEND,
        reason,
    }
}

/// A bad argument, reported before anything is queued.
pub(super) fn invalid(reason: String) -> Error {
    Error::InvalidArgument(reason)
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keeps the first failure in `sink`.
pub(super) fn record(sink: &Mutex<Option<String>>, reason: String) {
    let mut f = lock(sink);
    if f.is_none() {
        *f = Some(reason);
    }
}
