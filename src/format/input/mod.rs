//! Plaintext input formats that `convert` reads, one reader per file.

#![forbid(unsafe_code)]

pub mod npy;
