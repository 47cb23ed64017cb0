//! Native part of the `ciphershard` Python package (`ciphershard._ciphershard`).
//!
//! The Python package (python/ciphershard/) re-exports these classes and adds the pure-Python
//! pieces (exception classes, the PyTorch `IterableDataset` adapter). Unsafe code lives in
//! `dlpack.rs`, the `Storage` impls of `tensor.rs`, `loader.rs` and `cuda.rs`, the one-copy
//! read of a NumPy array in `dataset.rs` and the Arrow C stream import in `arrow.rs`; each
//! block has a `SAFETY:` comment.

use pyo3::prelude::*;

mod arrow;
#[cfg(feature = "cuda")]
mod cuda;
mod dataset;
mod dlpack;
mod errors;
mod keysrc;
mod loader;
mod tensor;

/// Number of DLPack exports whose consumer has not released them yet (for leak tests).
#[pyfunction]
fn _live_dlpack_exports() -> isize {
    dlpack::live_exports()
}

/// Backends and whether each is usable here: ``{"cuda": (False, "why"), "cpu": (True, "...")}``.
#[pyfunction]
fn backends() -> Vec<(String, bool, String)> {
    ciphershard::cipher::availability()
        .into_iter()
        .map(|a| match a.status {
            Ok(d) => (a.backend.name().to_string(), true, d),
            Err(why) => (
                a.backend.name().to_string(),
                false,
                errors::python_backend_advice(&why),
            ),
        })
        .collect()
}

#[pymodule]
fn _ciphershard(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    ciphershard::format::quiet_guarded_panics();
    m.add_class::<tensor::Tensor>()?;
    m.add_class::<dataset::PyDataset>()?;
    m.add_class::<loader::PyLoader>()?;
    m.add_function(wrap_pyfunction!(dataset::convert, m)?)?;
    m.add_function(wrap_pyfunction!(dataset::inspect, m)?)?;
    m.add_function(wrap_pyfunction!(dataset::generate_key, m)?)?;
    m.add_function(wrap_pyfunction!(backends, m)?)?;
    m.add_function(wrap_pyfunction!(loader::_bench_native, m)?)?;
    m.add_function(wrap_pyfunction!(loader::_wait_like_next, m)?)?;
    m.add_function(wrap_pyfunction!(_live_dlpack_exports, m)?)?;
    Ok(())
}
