//! Native part of the `ciphershard` Python package (`ciphershard._ciphershard`).
//!
//! The Python package (python/ciphershard/) re-exports these classes and adds the pure-Python
//! pieces (exception classes, the PyTorch `IterableDataset` adapter). Unsafe code lives in
//! `dlpack.rs` and the `Storage` impls of `tensor.rs` and `loader.rs`.

use pyo3::prelude::*;

mod dlpack;
mod errors;
mod keysrc;
mod tensor;

/// Number of DLPack exports whose consumer has not released them yet (for leak tests).
#[pyfunction]
fn _live_dlpack_exports() -> isize {
    dlpack::live_exports()
}

#[pymodule]
fn _ciphershard(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<tensor::Tensor>()?;
    m.add_function(wrap_pyfunction!(_live_dlpack_exports, m)?)?;
    Ok(())
}
