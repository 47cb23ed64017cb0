//! Maps `ciphershard::Error` onto the Python exception hierarchy of `ciphershard._errors`.
//!
//! The classes are defined in Python (multiple inheritance: `WrongKeyError` is also a
//! `KeyError`, `FormatError` a `ValueError`, ...); the message is the error's `Display`, the
//! same text as the CLI, which never contains key material.

use ciphershard::Error;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Converts a library result into a Python one.
pub trait IntoPyResult<T> {
    /// `Err(e)` becomes the matching `ciphershard` exception.
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for ciphershard::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py_err)
    }
}

/// The Python exception for `err`.
pub fn to_py_err(err: Error) -> PyErr {
    Python::attach(|py| build(py, &err).unwrap_or_else(|e| e))
}

/// Raises `class_name` from `ciphershard._errors` with `message`.
pub fn new_err(py: Python<'_>, class_name: &str, message: String) -> PyErr {
    let attempt = || -> PyResult<PyErr> {
        let class = py.import("ciphershard._errors")?.getattr(class_name)?;
        Ok(PyErr::from_value(class.call1((message,))?))
    };
    attempt().unwrap_or_else(|e| e)
}

fn build(py: Python<'_>, err: &Error) -> PyResult<PyErr> {
    let attrs = PyDict::new(py);
    let path = |p: &std::path::Path| p.display().to_string();
    let class = match err {
        Error::Io { path: p, source } => {
            attrs.set_item("path", path(p))?;
            if let Some(code) = source.raw_os_error() {
                attrs.set_item("errno", code)?;
            }
            "DatasetIOError"
        }
        Error::Format { path: p, .. } | Error::Unsupported { path: p, .. } => {
            attrs.set_item("path", path(p))?;
            "FormatError"
        }
        Error::WrongKey {
            path: p,
            key_id,
            available,
        } => {
            attrs.set_item("path", path(p))?;
            attrs.set_item("key_id", key_id)?;
            attrs.set_item("available", available)?;
            "WrongKeyError"
        }
        Error::Integrity(loc) => {
            attrs.set_item("path", path(&loc.path))?;
            attrs.set_item("tensor", &loc.tensor)?;
            attrs.set_item("chunk", loc.chunk)?;
            "IntegrityError"
        }
        Error::HeaderIntegrity { path: p, .. } => {
            attrs.set_item("path", path(p))?;
            "IntegrityError"
        }
        Error::Key(_) => "KeySourceError",
        Error::InvalidArgument(_) => "InvalidArgumentError",
        Error::BackendUnavailable { backend, .. } | Error::Backend { backend, .. } => {
            attrs.set_item("backend", *backend)?;
            "BackendError"
        }
        Error::Stopped(_) => "LoaderStoppedError",
    };
    let mut message = err.to_string();
    if class == "BackendError" {
        message = python_backend_advice(&message);
    }
    let class_obj = py.import("ciphershard._errors")?.getattr(class)?;
    let exc = class_obj.call1((message,))?;
    for (k, v) in attrs.iter() {
        exc.setattr(k.extract::<String>()?, v)?;
    }
    Ok(PyErr::from_value(exc))
}

/// The backends' advice is written for the command line ("use --backend cpu"); from Python the
/// same choice is the `backend="cpu"` argument.
pub(crate) fn python_backend_advice(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find("--backend ") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "--backend ".len()..];
        let name_len = after
            .find(|c: char| !c.is_ascii_alphanumeric())
            .unwrap_or(after.len());
        if name_len == 0 {
            out.push_str("--backend ");
        } else {
            out.push_str(&format!("backend=\"{}\"", &after[..name_len]));
        }
        rest = &after[name_len..];
    }
    out.push_str(rest);
    out
}
