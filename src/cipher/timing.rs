//! Short timings that choose between backends at run time: `auto` uses a GPU backend for
//! host-memory work (verify, decrypt, the host loader, where every chunk is a GPU round trip)
//! only where its verified `open` beats the CPU backend's; the wgpu backend also times where it
//! checks tags ([`super::wgpu::time_tag_checks`]).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::cpu::CpuCipher;
use super::{Backend, ChunkOpener, ChunkParams, Cipher, NONCE_LEN, OpenError, TAG_LEN};
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

/// `Backend::Auto`'s rule for a GPU backend: create it, keep it if its host path is at least
/// as fast as one CPU thread (timed once per process and backend), else say why not. A backend
/// already timed slower is not created again.
pub(crate) fn keep_for_auto(
    backend: Backend,
    create: impl FnOnce() -> Result<Arc<dyn Cipher>>,
) -> std::result::Result<Arc<dyn Cipher>, String> {
    type Verdicts = Mutex<Vec<(Backend, std::result::Result<HostPathCheck, String>)>>;
    static VERDICTS: Verdicts = Mutex::new(Vec::new());
    let known = |v: &Verdicts| {
        let v = v.lock().unwrap_or_else(|p| p.into_inner());
        v.iter()
            .find(|(b, _)| *b == backend)
            .map(|(_, r)| r.clone())
    };
    if let Some(verdict) = known(&VERDICTS) {
        decide(&verdict)?;
        return create().map_err(|e| e.to_string());
    }
    let gpu = create().map_err(|e| e.to_string())?;
    let verdict = host_path_check(gpu.as_ref()).map_err(|e| e.to_string());
    VERDICTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((backend, verdict.clone()));
    decide(&verdict).map(|()| gpu)
}

/// Keep (`Ok`) or why not.
fn decide(verdict: &std::result::Result<HostPathCheck, String>) -> std::result::Result<(), String> {
    match verdict {
        Ok(c) if c.gpu_wins() => Ok(()),
        Ok(c) => Err(format!(
            "slower than the CPU for host-memory work: {c} (--backend {} forces it)",
            c.backend
        )),
        Err(e) => Err(format!("its host-path check failed: {e}")),
    }
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

    /// A backend timed slower is passed over again without being created again. (Labelled CUDA:
    /// the verdict is process-wide, and `select_auto` only consults it when a CUDA driver
    /// answers, which no machine running the unit tests has.)
    #[test]
    fn a_passed_over_backend_is_not_created_again() {
        let created = std::sync::atomic::AtomicUsize::new(0);
        let create = || -> Result<Arc<dyn Cipher>> {
            created.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(Arc::new(SlowGpu))
        };
        let first = keep_for_auto(Backend::Cuda, create).err().unwrap();
        let again = keep_for_auto(Backend::Cuda, create).err().unwrap();
        assert!(first.contains("slower than the CPU"), "{first}");
        assert_eq!(first, again);
        assert_eq!(created.load(std::sync::atomic::Ordering::Relaxed), 1);
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
        let why = decide(&Ok(check.clone())).unwrap_err();
        assert!(
            why.contains("slower than the CPU") && why.contains("--backend wgpu"),
            "{why}"
        );
        let faster = HostPathCheck {
            gpu_gbps: check.cpu_gbps * 2.0,
            ..check
        };
        assert_eq!(decide(&Ok(faster)), Ok(()));
        let failed = decide(&Err("device lost".into())).unwrap_err();
        assert!(failed.contains("device lost"), "{failed}");
    }
}
