//! The cipher seam: one backend enum over one trait, chosen at run time.
//!
//! Every chunk of a shard is standard AES-256-GCM (see docs/FORMAT.md). A backend prepares a
//! per-shard data key once ([`Cipher::prepare`]) and then opens chunks with it. GCM is AES-CTR
//! (counter starting at `nonce || 2`) plus a GHASH tag over the ciphertext, so a backend may
//! verify the tag and decrypt in separate passes, or decrypt only part of a chunk
//! ([`ChunkOpener::ctr_apply`]) once the whole chunk's tag has been checked.
//!
//! Contract for every backend: **no unverified plaintext leaves `open`**. If the tag does not
//! verify, the destination is zeroed before `Err(OpenError::TagMismatch)` is returned; a backend
//! failure is an error too (`OpenError::Backend`), never a silent fallback.

use crate::error::{Error, Result};
use crate::keys::DataKey;

pub use auto::{auto_for_device_batches, select_auto};

pub mod auto;
pub mod conformance;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub.rs"]
pub mod cuda;
#[cfg(feature = "wgpu")]
pub mod wgpu;
#[cfg(not(feature = "wgpu"))]
#[path = "wgpu_stub.rs"]
pub mod wgpu;

/// GCM nonce length (96 bits).
pub const NONCE_LEN: usize = 12;
/// GCM tag length (128 bits).
pub const TAG_LEN: usize = 16;
/// AES block length.
pub const BLOCK_LEN: usize = 16;

/// Why a chunk was not opened. Either way no byte of unverified plaintext was released: the
/// destination was zeroed.
#[derive(Debug)]
pub enum OpenError {
    /// The chunk's authentication tag did not verify (tampered, corrupted or moved data, or
    /// the wrong key).
    TagMismatch,
    /// The backend failed (device lost, out of memory, a failed launch): the chunk's integrity
    /// is unknown. Stop with this error; `--backend cpu` is the way round a failing device.
    Backend(Error),
}

impl OpenError {
    /// The crate error for this failure at `location` (the chunk's file, tensor and index).
    pub fn at(self, location: impl FnOnce() -> crate::error::ChunkLocation) -> Error {
        match self {
            OpenError::TagMismatch => Error::Integrity(location()),
            OpenError::Backend(e) => e,
        }
    }

    /// `true` for [`OpenError::TagMismatch`].
    pub fn is_tag_mismatch(&self) -> bool {
        matches!(self, OpenError::TagMismatch)
    }
}

impl From<Error> for OpenError {
    fn from(e: Error) -> Self {
        OpenError::Backend(e)
    }
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::TagMismatch => f.write_str("authentication tag mismatch"),
            OpenError::Backend(e) => write!(f, "{e}"),
        }
    }
}

/// `Ok` when `src` and `dst` have the same length; otherwise `dst` is zeroed and the error
/// names `call`: every opener's first check.
pub(crate) fn same_len(call: &str, src: &[u8], dst: &mut [u8]) -> Result<()> {
    if src.len() == dst.len() {
        return Ok(());
    }
    zeroize::Zeroize::zeroize(dst);
    Err(Error::InvalidArgument(format!(
        "{call}: source and destination lengths differ"
    )))
}

/// Constant-time equality of two tags (or GHASH values): every backend's tag check.
pub(crate) fn ct_eq(a: &[u8; TAG_LEN], b: &[u8; TAG_LEN]) -> bool {
    let mut d = 0u8;
    for i in 0..TAG_LEN {
        d |= a[i] ^ b[i];
    }
    std::hint::black_box(d) == 0
}

/// What a backend needs to open one chunk, besides its bytes.
#[derive(Debug, Clone, Copy)]
pub struct ChunkParams<'a> {
    /// The chunk's 96-bit GCM nonce.
    pub nonce: [u8; NONCE_LEN],
    /// The chunk's associated data (docs/FORMAT.md, "Associated data").
    pub aad: &'a [u8],
    /// The stored tag.
    pub tag: [u8; TAG_LEN],
    /// `true`: the bytes are GCM ciphertext. `false`: a plain (readable) chunk whose tag is a
    /// GMAC over `aad || bytes` (GCM with empty plaintext); opening it only verifies and copies.
    pub encrypted: bool,
}

/// A data key prepared by a backend (round keys expanded, H computed, uploaded...).
/// Dropping it zeroizes the key material it holds.
///
/// Every method reports a backend failure as an error (no fallback, no side channel): a
/// device that fails mid-call never passes as a working one, and the caller stops with the
/// error.
pub trait ChunkOpener: Send + Sync {
    /// Verifies and decrypts a whole chunk from `src` into `dst` (same length).
    /// On any error `dst` is zeroed.
    fn open(&self, chunk: &ChunkParams<'_>, src: &[u8], dst: &mut [u8]) -> Result<(), OpenError>;

    /// Verifies and decrypts a whole chunk in place. On any error `buf` is zeroed.
    fn open_in_place(&self, chunk: &ChunkParams<'_>, buf: &mut [u8]) -> Result<(), OpenError>;

    /// Checks the tag of a whole chunk (ciphertext, or plain bytes for a plain chunk) without
    /// decrypting it. Constant-time comparison.
    fn verify(&self, chunk: &ChunkParams<'_>, src: &[u8]) -> Result<(), OpenError>;

    /// Raw AES-256-CTR: XORs the keystream of the chunk with this `nonce`, starting
    /// `offset` bytes into the chunk (counter block `nonce || 2 + offset/16`, 32-bit wrapping
    /// as GCM specifies), into `dst`. No authentication: call only on bytes whose chunk tag
    /// was verified from the same private copy. On an error `dst` is zeroed.
    fn ctr_apply(
        &self,
        nonce: &[u8; NONCE_LEN],
        offset: u64,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<()>;

    /// Encrypts a chunk in place (or, for a plain chunk, leaves it) and returns its tag.
    fn seal_in_place(
        &self,
        chunk_nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        encrypted: bool,
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN]>;
}

/// A cipher backend.
pub trait Cipher: Send + Sync {
    /// Which backend this is.
    fn backend(&self) -> Backend;
    /// Human-readable description (CPU features, device name...).
    fn describe(&self) -> String;
    /// Prepares a per-shard data key.
    fn prepare(&self, key: &DataKey) -> Result<Box<dyn ChunkOpener>>;
}

/// The backends, and `Auto` to pick the best available one at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backend {
    /// For host-memory work: CUDA, then wgpu on a real GPU, each only if it opens chunks faster
    /// than one CPU thread, else the CPU ([`select_auto`]). For device batches: the first GPU
    /// ([`auto_for_device_batches`]).
    #[default]
    Auto,
    /// AES-NI / VAES on the CPU.
    Cpu,
    /// NVIDIA GPUs through CUDA (cudarc, NVRTC-compiled kernels).
    Cuda,
    /// Any GPU through wgpu (Vulkan, Metal, DX12).
    Wgpu,
}

impl Backend {
    /// Lower-case name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
            Backend::Wgpu => "wgpu",
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Backend::Auto),
            "cpu" => Ok(Backend::Cpu),
            "cuda" => Ok(Backend::Cuda),
            "wgpu" => Ok(Backend::Wgpu),
            other => Err(Error::InvalidArgument(format!(
                "unknown backend '{other}' (choose auto, cpu, cuda or wgpu)"
            ))),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a backend can be used here, and if not, why.
#[derive(Debug, Clone)]
pub struct Availability {
    /// The backend.
    pub backend: Backend,
    /// `Ok(description)` or `Err(reason it is not available, and what to do)`.
    pub status: std::result::Result<String, String>,
}

/// Lists every concrete backend and whether it is available here.
pub fn availability() -> Vec<Availability> {
    vec![
        Availability {
            backend: Backend::Cuda,
            status: cuda::probe(),
        },
        Availability {
            backend: Backend::Wgpu,
            status: wgpu::probe(),
        },
        Availability {
            backend: Backend::Cpu,
            status: Ok(cpu::CpuCipher::new().describe()),
        },
    ]
}

/// Creates the requested backend. `Auto` picks CUDA, then wgpu, then the CPU
/// ([`select_auto`]); an explicit backend that is not available is an error, never a silent
/// fallback.
pub fn select(backend: Backend) -> Result<std::sync::Arc<dyn Cipher>> {
    match backend {
        Backend::Cpu => Ok(std::sync::Arc::new(cpu::CpuCipher::new())),
        Backend::Cuda => cuda::create(),
        Backend::Wgpu => auto::wgpu_placed(true),
        Backend::Auto => Ok(select_auto().0),
    }
}
