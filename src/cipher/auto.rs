//! `Backend::Auto`, decided in one place, once per process: which backend serves host-memory
//! work (verify, decrypt, the host loader, where every chunk is a GPU round trip), which one the
//! device loaders use, and where the wgpu backend checks tags. The decisions rest on short
//! timings taken here (tens of milliseconds) and are passed into the backends; constructors
//! never time anything.
//!
//! - Host-memory work ([`select_auto`]): CUDA when a device answers, then wgpu on a real
//!   (non-CPU) adapter, each only if its verified `open` beats one CPU thread
//!   ([`host_path_check`]); else the CPU. The chosen backend is built once and shared.
//! - Device batches ([`auto_for_device_batches`]): the first GPU, no host-path timing (a device
//!   loader uploads whole windows and never reads plaintext back).
//! - wgpu tag checks ([`wgpu_tags_on_gpu`]): on a real GPU, a verified open timed with the tag
//!   checked on the CPU and on the GPU, the faster kept for every wgpu backend of the process;
//!   CPU-type adapters (lavapipe) check on the CPU untimed.

#![forbid(unsafe_code)]

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use super::cpu::CpuCipher;
use super::{Backend, ChunkOpener, ChunkParams, Cipher, NONCE_LEN, OpenError, TAG_LEN, cuda, wgpu};
use crate::error::{Error, Result};
use crate::keys::DataKey;

/// Chunk size of the timed opens: the format's default (the host loader opens chunk by chunk).
const CHECK_CHUNK_BYTES: usize = 2 << 20;

const SAMPLE_AAD: &[u8] = b"ciphershard timing sample";

/// Chunks of [`CHECK_CHUNK_BYTES`] sealed on the CPU under a fresh random key.
pub(crate) struct SealedSample {
    pub(crate) key: DataKey,
    chunks: Vec<([u8; NONCE_LEN], [u8; TAG_LEN], Vec<u8>)>,
}

impl SealedSample {
    pub(crate) fn new(n: usize) -> Result<Self> {
        let key = DataKey::generate()?;
        let sealer = CpuCipher::new().prepare(&key)?;
        let chunks = (0..n)
            .map(|i| {
                let mut nonce = [0u8; NONCE_LEN];
                nonce[..8].copy_from_slice(&(i as u64).to_le_bytes());
                let mut buf: Vec<u8> = (0..CHECK_CHUNK_BYTES).map(|b| (b * 7 + i) as u8).collect();
                let tag = sealer.seal_in_place(&nonce, SAMPLE_AAD, true, &mut buf)?;
                Ok((nonce, tag, buf))
            })
            .collect::<Result<_>>()?;
        Ok(SealedSample { key, chunks })
    }

    /// GB/s of verified opens of every chunk through `opener`, best of `rounds` after a warm-up.
    pub(crate) fn open_rate(&self, opener: &dyn ChunkOpener, rounds: usize) -> Result<f64> {
        let mut out = vec![0u8; CHECK_CHUNK_BYTES];
        let mut best = f64::INFINITY;
        for round in 0..=rounds {
            let t = Instant::now();
            for (nonce, tag, ct) in &self.chunks {
                let params = ChunkParams {
                    nonce: *nonce,
                    aad: SAMPLE_AAD,
                    tag: *tag,
                    encrypted: true,
                };
                opener.open(&params, ct, &mut out).map_err(|e| match e {
                    OpenError::TagMismatch => Error::Stopped(
                        "timing sample: a chunk sealed on the CPU did not open".into(),
                    ),
                    OpenError::Backend(e) => e,
                })?;
            }
            if round > 0 {
                best = best.min(t.elapsed().as_secs_f64());
            }
        }
        Ok((self.chunks.len() * CHECK_CHUNK_BYTES) as f64 / best.max(1e-9) / 1e9)
    }
}

/// A verified `open` of the same chunks (8 × 2 MiB) through a GPU backend and through the CPU
/// backend on one thread, best of three rounds after a warm-up.
#[derive(Debug, Clone, PartialEq)]
pub struct HostPathCheck {
    /// The GPU backend timed.
    pub backend: Backend,
    /// GB/s through it (upload, tag check, CTR, read-back).
    pub gpu_gbps: f64,
    /// GB/s through the CPU backend, one thread.
    pub cpu_gbps: f64,
}

impl HostPathCheck {
    /// Whether the GPU backend opens chunks at least as fast as one CPU thread. One thread
    /// against one: the host loader runs several, and the CPU scales with them at least as well
    /// as a GPU's round trips do, so a GPU that loses here loses there too.
    pub fn gpu_wins(&self) -> bool {
        self.gpu_gbps >= self.cpu_gbps
    }
}

impl std::fmt::Display for HostPathCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "verified open of 2 MiB chunks at {:.2} GB/s through {}, {:.2} GB/s on one CPU thread",
            self.gpu_gbps, self.backend, self.cpu_gbps
        )
    }
}

/// Times [`HostPathCheck`] for `gpu` (16 MiB, sealed with a fresh random key; tens of
/// milliseconds on a GPU).
pub fn host_path_check(gpu: &dyn Cipher) -> Result<HostPathCheck> {
    let sample = SealedSample::new(8)?;
    let cpu_gbps = sample.open_rate(CpuCipher::new().prepare(&sample.key)?.as_ref(), 3)?;
    let gpu_gbps = sample.open_rate(gpu.prepare(&sample.key)?.as_ref(), 3)?;
    Ok(HostPathCheck {
        backend: gpu.backend(),
        gpu_gbps,
        cpu_gbps,
    })
}

/// What `auto` picked for host-memory work, and why it passed over each backend it did not.
struct HostChoice {
    cipher: Arc<dyn Cipher>,
    passed: Vec<(Backend, String)>,
}

/// A backend `auto` may try: its name and how to build it (or why it is not available).
type Candidate<'a> = (Backend, Box<dyn FnOnce() -> Result<Arc<dyn Cipher>> + 'a>);

/// The first candidate whose host path (timed by `check`, [`host_path_check`] outside tests) is
/// at least as fast as one CPU thread, else the CPU backend; each candidate is built at most
/// once (and kept when chosen).
fn choose(
    candidates: Vec<Candidate<'_>>,
    check: impl Fn(&dyn Cipher) -> Result<HostPathCheck>,
) -> HostChoice {
    let mut passed = Vec::new();
    for (backend, create) in candidates {
        let verdict = create().and_then(|gpu| {
            let check = check(gpu.as_ref())?;
            Ok((gpu, check))
        });
        match verdict {
            Ok((gpu, check)) if check.gpu_wins() => return HostChoice { cipher: gpu, passed },
            Ok((_, check)) => passed.push((
                backend,
                format!("slower than the CPU for host-memory work: {check} (--backend {backend} forces it)"),
            )),
            // The reason alone: "backend 'wgpu' is not available" would contradict a
            // backend that is available for an explicit `--backend` and that `auto` only
            // passed over (a CPU-type adapter, say).
            Err(Error::BackendUnavailable { reason, .. }) => passed.push((backend, reason)),
            Err(e) => passed.push((backend, e.to_string())),
        }
    }
    HostChoice {
        cipher: Arc::new(CpuCipher::new()),
        passed,
    }
}

/// The process's host-memory choice, decided on first use.
fn host_choice() -> &'static HostChoice {
    static CHOICE: OnceLock<HostChoice> = OnceLock::new();
    CHOICE.get_or_init(|| {
        let mut candidates: Vec<Candidate<'_>> = Vec::new();
        match cuda::probe() {
            Ok(_) => candidates.push((Backend::Cuda, Box::new(cuda::create))),
            Err(why) => candidates.push((
                Backend::Cuda,
                Box::new(move || {
                    Err(Error::BackendUnavailable {
                        backend: "cuda",
                        reason: why,
                    })
                }),
            )),
        }
        candidates.push((Backend::Wgpu, Box::new(|| wgpu_placed(false))));
        choose(candidates, host_path_check)
    })
}

/// What `Backend::Auto` picks for host-memory work (verify, decrypt, the host loader), and why
/// it passed over each GPU backend it did not pick: CUDA when a device answers, then wgpu on a
/// real GPU adapter (never a CPU-type one such as lavapipe), each only if its verified `open`
/// beats one CPU thread ([`host_path_check`]); else the CPU. Decided once per process: later
/// calls return the same backend.
pub fn select_auto() -> (Arc<dyn Cipher>, Vec<(Backend, String)>) {
    let c = host_choice();
    (c.cipher.clone(), c.passed.clone())
}

/// What `auto` means where batches stay in device memory (the device loaders, and so
/// `ciphershard bench` without `--host-batches`): CUDA when a device answers, then wgpu on a
/// real GPU adapter, then the CPU. No host-path timing here, unlike [`select_auto`]: a device
/// loader uploads whole windows and never reads plaintext back.
pub fn auto_for_device_batches() -> Backend {
    if cuda::probe().is_ok() {
        Backend::Cuda
    } else if wgpu::gpu_adapter_present() {
        Backend::Wgpu
    } else {
        Backend::Cpu
    }
}

/// The wgpu backend as [`super::select`] and `auto` hand it out: where its openers check tags
/// decided by [`wgpu_tags_on_gpu`]. `allow_cpu_adapter: false` refuses lavapipe and the like.
#[cfg(feature = "wgpu")]
pub(crate) fn wgpu_placed(allow_cpu_adapter: bool) -> Result<Arc<dyn Cipher>> {
    let c = wgpu::WgpuCipher::new(wgpu::WgpuOptions {
        allow_cpu_adapter,
        ..wgpu::WgpuOptions::default()
    })?;
    c.set_gpu_ghash(wgpu_tags_on_gpu(&c));
    Ok(Arc::new(c))
}

/// Not compiled in: the stub says so.
#[cfg(not(feature = "wgpu"))]
pub(crate) fn wgpu_placed(allow_cpu_adapter: bool) -> Result<Arc<dyn Cipher>> {
    if allow_cpu_adapter {
        wgpu::create()
    } else {
        wgpu::create_gpu_only()
    }
}

/// Where a real GPU's `open` checks tags: a verified open of 4 × 2 MiB timed with the tag
/// check on the CPU and on the GPU (best of two rounds after a warm-up each).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TagCheckChoice {
    /// GB/s with the tag checked on the calling thread (aws-lc GHASH), overlapped with the GPU.
    pub cpu_tags_gbps: f64,
    /// GB/s with the tag checked on the GPU (partial sums read back first).
    pub gpu_tags_gbps: f64,
}

impl TagCheckChoice {
    /// Whether the GPU check is at least as fast.
    pub fn gpu_wins(&self) -> bool {
        self.gpu_tags_gbps >= self.cpu_tags_gbps
    }
}

impl std::fmt::Display for TagCheckChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tags checked on the {} (verified open {:.2} GB/s that way, {:.2} the other)",
            if self.gpu_wins() { "GPU" } else { "CPU" },
            self.gpu_tags_gbps.max(self.cpu_tags_gbps),
            self.gpu_tags_gbps.min(self.cpu_tags_gbps)
        )
    }
}

/// Times both tag-check placements on `cipher` (see [`TagCheckChoice`]; tens of milliseconds).
#[cfg(feature = "wgpu")]
pub fn time_tag_checks(cipher: &wgpu::WgpuCipher) -> Result<TagCheckChoice> {
    let sample = SealedSample::new(4)?;
    let cpu_tags_gbps = sample.open_rate(
        cipher
            .prepare_with_tag_placement(&sample.key, false)?
            .as_ref(),
        2,
    )?;
    let gpu_tags_gbps = sample.open_rate(
        cipher
            .prepare_with_tag_placement(&sample.key, true)?
            .as_ref(),
        2,
    )?;
    Ok(TagCheckChoice {
        cpu_tags_gbps,
        gpu_tags_gbps,
    })
}

/// The process's tag-check timing, taken on the first real GPU a wgpu backend opened.
static TAG_CHECKS: OnceLock<std::result::Result<TagCheckChoice, String>> = OnceLock::new();

/// Whether a wgpu backend on `cipher`'s adapter should check tags on the GPU: never on a
/// CPU-type adapter (lavapipe: a GPU GHASH only competes for the same cores), else the faster
/// of the two placements, timed once per process ([`time_tag_checks`]); a failed timing keeps
/// the CPU (its reason in [`wgpu_tag_check_choice`]).
#[cfg(feature = "wgpu")]
pub fn wgpu_tags_on_gpu(cipher: &wgpu::WgpuCipher) -> bool {
    if cipher.adapter().is_cpu() {
        return false;
    }
    TAG_CHECKS
        .get_or_init(|| time_tag_checks(cipher).map_err(|e| e.to_string()))
        .as_ref()
        .is_ok_and(TagCheckChoice::gpu_wins)
}

/// The tag-check timing behind [`wgpu_tags_on_gpu`], once a real GPU was timed (for
/// `ciphershard backends`): the figures, or why the timing failed.
pub fn wgpu_tag_check_choice() -> Option<std::result::Result<TagCheckChoice, String>> {
    TAG_CHECKS.get().cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU backend behind a 2 ms round trip per call, reported as a GPU backend.
    struct SlowGpu;
    struct SlowOpener(Box<dyn ChunkOpener>);

    impl Cipher for SlowGpu {
        fn backend(&self) -> Backend {
            Backend::Wgpu
        }
        fn describe(&self) -> String {
            "slow".into()
        }
        fn prepare(&self, key: &DataKey) -> Result<Box<dyn ChunkOpener>> {
            Ok(Box::new(SlowOpener(CpuCipher::new().prepare(key)?)))
        }
    }

    impl ChunkOpener for SlowOpener {
        fn open(
            &self,
            chunk: &ChunkParams<'_>,
            src: &[u8],
            dst: &mut [u8],
        ) -> std::result::Result<(), OpenError> {
            std::thread::sleep(std::time::Duration::from_millis(2));
            self.0.open(chunk, src, dst)
        }
        fn open_in_place(
            &self,
            chunk: &ChunkParams<'_>,
            buf: &mut [u8],
        ) -> std::result::Result<(), OpenError> {
            self.0.open_in_place(chunk, buf)
        }
        fn verify(
            &self,
            chunk: &ChunkParams<'_>,
            src: &[u8],
        ) -> std::result::Result<(), OpenError> {
            self.0.verify(chunk, src)
        }
        fn ctr_apply(
            &self,
            nonce: &[u8; NONCE_LEN],
            offset: u64,
            src: &[u8],
            dst: &mut [u8],
        ) -> Result<()> {
            self.0.ctr_apply(nonce, offset, src, dst)
        }
        fn seal_in_place(
            &self,
            nonce: &[u8; NONCE_LEN],
            aad: &[u8],
            encrypted: bool,
            buf: &mut [u8],
        ) -> Result<[u8; TAG_LEN]> {
            self.0.seal_in_place(nonce, aad, encrypted, buf)
        }
    }

    /// The first candidate that wins is kept (built once), those before it are passed over
    /// with the reason, those after it are never built; with none winning, the CPU.
    #[test]
    fn choose_keeps_the_first_winner_and_says_why_it_passed_the_others() {
        let built = std::sync::atomic::AtomicUsize::new(0);
        let slow = || -> Result<Arc<dyn Cipher>> {
            built.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(Arc::new(SlowGpu))
        };
        let missing = || -> Result<Arc<dyn Cipher>> {
            Err(Error::BackendUnavailable {
                backend: "cuda",
                reason: "no driver here".into(),
            })
        };
        let c = choose(
            vec![
                (Backend::Cuda, Box::new(missing)),
                (Backend::Wgpu, Box::new(slow)),
            ],
            host_path_check,
        );
        assert_eq!(c.cipher.backend(), Backend::Cpu);
        assert_eq!(built.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(c.passed.len(), 2);
        // The reason itself, not "backend 'cuda' is not available: ...": `ciphershard
        // backends` prints it under a backend it may have just listed as available.
        assert_eq!(c.passed[0].1, "no driver here", "{:?}", c.passed);
        assert!(
            c.passed[1].1.contains("slower than the CPU")
                && c.passed[1].1.contains("--backend wgpu"),
            "{:?}",
            c.passed
        );
        // A winner stops the search (a fixed check: timings are noisy).
        let wins = |c: &dyn Cipher| {
            Ok(HostPathCheck {
                backend: c.backend(),
                gpu_gbps: 2.0,
                cpu_gbps: 1.0,
            })
        };
        let never = || -> Result<Arc<dyn Cipher>> { panic!("built after a winner") };
        let c = choose(
            vec![
                (
                    Backend::Cuda,
                    Box::new(|| Ok(Arc::new(CpuCipher::new()) as Arc<dyn Cipher>)),
                ),
                (Backend::Wgpu, Box::new(never)),
            ],
            wins,
        );
        assert!(c.passed.is_empty());
    }

    /// The process decides once: every call returns the very same backend.
    #[test]
    fn select_auto_is_decided_once_per_process() {
        let (a, why_a) = select_auto();
        let (b, why_b) = select_auto();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(why_a, why_b);
    }

    #[test]
    fn a_slower_gpu_path_is_passed_over_with_its_figures() {
        // 2 MiB per 2 ms is at most 1 GB/s; one CPU thread opens several GB/s.
        let check = host_path_check(&SlowGpu).unwrap();
        assert_eq!(check.backend, Backend::Wgpu);
        assert!(
            check.gpu_gbps < 1.1 && check.cpu_gbps > check.gpu_gbps,
            "{check:?}"
        );
        assert!(!check.gpu_wins());
        let faster = HostPathCheck {
            gpu_gbps: check.cpu_gbps * 2.0,
            ..check
        };
        assert!(faster.gpu_wins());
    }
}
