//! In-process cipher throughput, for `ciphershard bench --cipher`: the CPU backend's open,
//! verify, CTR and seal against aws-lc-rs's AES-256-GCM in the same process and the same run,
//! single core and on 1..=N threads. The criterion benches (benches/cipher.rs) are the
//! reference figures; this gives a user the same comparison on their own machine.

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use serde::Serialize;

use crate::cipher::cpu::CpuCipher;
use crate::cipher::{ChunkOpener, ChunkParams, Cipher};
use crate::error::{Error, Result};
use crate::keys::DataKey;

/// What to measure and for how long.
#[derive(Debug, Clone)]
pub struct CipherBenchOptions {
    /// Bytes per chunk (the format's default is 2 MiB).
    pub chunk_bytes: usize,
    /// Time spent on each single-core case (split into rounds; the median round is reported).
    pub time_per_case: Duration,
    /// Largest thread count for the multi-thread open (1..=this, doubling).
    pub max_threads: usize,
}

impl Default for CipherBenchOptions {
    fn default() -> Self {
        CipherBenchOptions {
            chunk_bytes: 2 << 20,
            time_per_case: Duration::from_millis(600),
            max_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// One measured case.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// Case name, e.g. `ciphershard_open` or `aws_lc_rs_open_in_place`.
    pub name: String,
    /// Threads used.
    pub threads: usize,
    /// Throughput in GB/s (10^9 bytes per second), median of the rounds.
    pub gb_per_s: f64,
    /// Fastest and slowest round, GB/s: the spread shows how noisy the machine was.
    pub min_gb_per_s: f64,
    /// See `min_gb_per_s`.
    pub max_gb_per_s: f64,
}

/// A throughput ratio between two cases of the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// `numerator / denominator`.
    pub name: String,
    /// The ratio of the medians.
    pub ratio: f64,
}

/// The whole report, serializable for `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct CipherBenchReport {
    /// CPU model (from /proc/cpuinfo where available).
    pub cpu: String,
    /// The CPU backend's description (libraries and instruction set used).
    pub backend: String,
    /// Bytes per chunk.
    pub chunk_bytes: usize,
    /// All measured cases.
    pub results: Vec<Measurement>,
    /// Ratios against the state of the art in the same run.
    pub ratios: Vec<Ratio>,
}

const NONCE: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const ROUNDS: usize = 7;

fn bench_err(what: &str) -> Error {
    Error::Backend {
        backend: "cpu",
        reason: format!("benchmark self-check failed: {what}"),
    }
}

/// Runs `op` (which processes `bytes` bytes per call) for about `time`, in `ROUNDS` rounds.
/// `prep` runs before each call, outside the timing (e.g. restoring a buffer for in-place ops).
fn measure<S>(
    name: &str,
    bytes: usize,
    time: Duration,
    state: &mut S,
    mut prep: impl FnMut(&mut S),
    mut op: impl FnMut(&mut S) -> bool,
) -> Result<Measurement> {
    let round_time = time / ROUNDS as u32;
    let mut rates = Vec::with_capacity(ROUNDS);
    prep(state);
    if !op(state) {
        return Err(bench_err(name));
    }
    for _ in 0..ROUNDS {
        let (mut busy, mut done) = (Duration::ZERO, 0u64);
        let round = Instant::now();
        while round.elapsed() < round_time || done == 0 {
            prep(state);
            let t = Instant::now();
            let ok = op(state);
            busy += t.elapsed();
            if !ok {
                return Err(bench_err(name));
            }
            done += bytes as u64;
        }
        rates.push(done as f64 / busy.as_secs_f64() / 1e9);
    }
    Ok(summary(name, 1, rates))
}

fn summary(name: &str, threads: usize, mut rates: Vec<f64>) -> Measurement {
    rates.sort_by(f64::total_cmp);
    Measurement {
        name: name.into(),
        threads,
        gb_per_s: rates[rates.len() / 2],
        min_gb_per_s: rates[0],
        max_gb_per_s: rates[rates.len() - 1],
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Measures the CPU backend against aws-lc-rs in this process. Fails only if a self-check
/// fails (an operation that must succeed did not), which would be a bug.
pub fn run_cpu(opts: &CipherBenchOptions) -> Result<CipherBenchReport> {
    if opts.chunk_bytes == 0 || opts.chunk_bytes > 1 << 30 {
        return Err(Error::InvalidArgument(format!(
            "chunk size {} not in 1..=1 GiB",
            opts.chunk_bytes
        )));
    }
    let n = opts.chunk_bytes;
    let t = opts.time_per_case;
    let cipher = CpuCipher::new();
    let mut kb = [0u8; 32];
    getrandom::fill(&mut kb).map_err(|e| Error::Key(format!("no system randomness: {e}")))?;
    let key = DataKey::from_bytes(kb);
    kb.fill(0);
    let opener = cipher.prepare(&key)?;
    let aws = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, key.as_bytes())
            .map_err(|_| bench_err("aws-lc-rs key setup"))?,
    );
    let aad = [0xA5u8; 89];
    let pt: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(29)).collect();
    let mut ct = pt.clone();
    let tag = opener.seal_in_place(&NONCE, &aad, true, &mut ct)?;
    let p = ChunkParams {
        nonce: NONCE,
        aad: &aad,
        tag,
        encrypted: true,
    };

    let mut results = Vec::new();
    let mut dst = vec![0u8; n];
    results.push(measure(
        "ciphershard_open",
        n,
        t,
        &mut dst,
        |_| {},
        |d| opener.open(&p, &ct, d).is_ok(),
    )?);
    results.push(measure(
        "ciphershard_open_in_place",
        n,
        t,
        &mut dst,
        |d| d.copy_from_slice(&ct),
        |d| opener.open_in_place(&p, d).is_ok(),
    )?);
    results.push(measure(
        "aws_lc_rs_open_in_place",
        n,
        t,
        &mut dst,
        |d| d.copy_from_slice(&ct),
        |d| {
            aws.open_in_place_separate_tag(
                Nonce::assume_unique_for_key(NONCE),
                Aad::from(&aad),
                &tag,
                d,
            )
            .is_ok()
        },
    )?);
    results.push(measure(
        "ciphershard_verify",
        n,
        t,
        &mut (),
        |_| {},
        |_| opener.verify(&p, &ct).is_ok(),
    )?);
    results.push(measure(
        "ciphershard_ctr_apply",
        n,
        t,
        &mut dst,
        |_| {},
        |d| opener.ctr_apply(&NONCE, 0, &ct, d).is_ok(),
    )?);
    results.push(measure(
        "ciphershard_seal_in_place",
        n,
        t,
        &mut dst,
        |_| {},
        |d| opener.seal_in_place(&NONCE, &aad, true, d).is_ok(),
    )?);
    results.push(measure(
        "aws_lc_rs_seal_in_place",
        n,
        t,
        &mut dst,
        |_| {},
        |d| {
            aws.seal_in_place_separate_tag(Nonce::assume_unique_for_key(NONCE), Aad::from(&aad), d)
                .is_ok()
        },
    )?);
    // The plaintext must come back: a benchmark of a broken cipher is worthless.
    if opener.open(&p, &ct, &mut dst).is_err() || dst != pt {
        return Err(bench_err("round trip"));
    }

    let mut threads = 1;
    while threads <= opts.max_threads.max(1) {
        results.push(open_threads(opener.as_ref(), &p, &ct, threads, t)?);
        threads *= 2;
    }

    let get = |name: &str| {
        results
            .iter()
            .find(|m| m.name == name && m.threads == 1)
            .map(|m| m.gb_per_s)
    };
    let mut ratios = Vec::new();
    for (num, den) in [
        ("ciphershard_open", "aws_lc_rs_open_in_place"),
        ("ciphershard_open_in_place", "aws_lc_rs_open_in_place"),
        ("ciphershard_verify", "aws_lc_rs_open_in_place"),
        ("ciphershard_ctr_apply", "aws_lc_rs_open_in_place"),
        ("ciphershard_seal_in_place", "aws_lc_rs_seal_in_place"),
    ] {
        if let (Some(a), Some(b)) = (get(num), get(den)) {
            ratios.push(Ratio {
                name: format!("{num} / {den}"),
                ratio: a / b,
            });
        }
    }
    Ok(CipherBenchReport {
        cpu: cpu_model(),
        backend: cipher.describe(),
        chunk_bytes: n,
        results,
        ratios,
    })
}

/// `threads` threads, each opening its own chunk copy buffer→buffer for `time`; aggregate rate.
fn open_threads(
    opener: &dyn ChunkOpener,
    p: &ChunkParams<'_>,
    ct: &[u8],
    threads: usize,
    time: Duration,
) -> Result<Measurement> {
    let mut rates = Vec::with_capacity(3);
    for _ in 0..3 {
        let start = Instant::now();
        let counts: Vec<Option<u64>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let src = ct.to_vec();
                        let mut dst = vec![0u8; ct.len()];
                        let mut done = 0u64;
                        let t = Instant::now();
                        while t.elapsed() < time / 3 {
                            opener.open(p, &src, &mut dst).ok()?;
                            done += src.len() as u64;
                        }
                        Some(done)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().ok().flatten())
                .collect()
        });
        let secs = start.elapsed().as_secs_f64();
        let total: u64 = counts
            .iter()
            .map(|c| c.ok_or_else(|| bench_err("threaded open")))
            .sum::<Result<u64>>()?;
        rates.push(total as f64 / secs / 1e9);
    }
    Ok(summary("ciphershard_open", threads, rates))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_has_every_case_and_serializes() {
        let opts = CipherBenchOptions {
            chunk_bytes: 4096 + 3,
            time_per_case: Duration::from_millis(20),
            max_threads: 2,
        };
        let r = run_cpu(&opts).unwrap();
        for name in [
            "ciphershard_open",
            "aws_lc_rs_open_in_place",
            "ciphershard_verify",
            "ciphershard_ctr_apply",
        ] {
            let m = r.results.iter().find(|m| m.name == name).unwrap();
            assert!(
                m.gb_per_s > 0.0 && m.min_gb_per_s <= m.gb_per_s && m.gb_per_s <= m.max_gb_per_s
            );
        }
        assert!(r.results.iter().any(|m| m.threads == 2));
        assert_eq!(r.ratios.len(), 5);
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("ciphershard_open_in_place"));
    }

    #[test]
    fn rejects_zero_chunk() {
        let opts = CipherBenchOptions {
            chunk_bytes: 0,
            ..Default::default()
        };
        assert!(matches!(run_cpu(&opts), Err(Error::InvalidArgument(_))));
    }
}
