#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod bench;
pub mod cipher;
pub mod error;
pub mod format;
pub mod keys;
pub mod pipeline;
pub mod store;

pub use cipher::Backend;
pub use error::{Error, Result};
pub use keys::{DataKey, MasterKey};
