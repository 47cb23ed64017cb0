#![doc = include_str!("../README.md")]
// Lint policy. Every public item is documented; `unsafe` is denied crate-wide and allowed only
// in the few files that need it (each says why at its top, each block has a `SAFETY:`
// comment); every other file forbids it outright:
//   src/pipeline/pool.rs        aligned host buffers and their typed views
//   src/cipher/cpu/vaes.rs      VAES-512 intrinsics, behind run-time CPU detection
//   src/cipher/cpu/gmac.rs      four calls into aws-lc's C API
//   src/cipher/cuda/launch.rs   CUDA kernel launches (argument types and bounds checked first)
//   src/cipher/cuda/ffi.rs      driver/NVRTC probes and pinned allocation
//   src/cipher/wgpu/pipelines.rs  the AES-CTR shader built without wgpu's runtime checks
//   src/bench/reader_pool.rs    a benchmark's reader threads writing into pinned staging
// (The `ciphershard` binary keeps its own policy in src/main.rs: one `set_var` before any thread
// starts, to quiet Mesa's device-select layer.)
// Lints allowed where they occur, each with its reason beside it: `clippy::too_many_arguments`
// where the arguments are one per field of a wire format (a chunk descriptor, a chunk's AAD);
// `dead_code` under `cfg(not(feature = ...))` for items that serve one GPU backend only;
// `non_camel_case_types` for dtype names spelled as safetensors spells them.
#![deny(missing_docs)]
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

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
