//! CPU cipher throughput against aws-lc-rs and RustCrypto in the same run.
//!
//! `cargo bench --no-default-features --bench cipher` (about 1 minute). Figures and the
//! machine they came from are in docs/BENCHMARKS.md.
//!
//! Single-core cases are timed in CPU time of the benchmarking thread (as `openssl speed`
//! does), so a shared, busy machine slows them less than wall time would; the multi-thread
//! group is wall time, the only honest clock for scaling. `CIPHERSHARD_BENCH_WALL=1` times
//! the single-core cases in wall time too (for a quiet machine).

use std::hint::black_box;
use std::io::Write;
use std::time::Duration;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ciphershard::DataKey;
use ciphershard::cipher::cpu::CpuCipher;
use ciphershard::cipher::cpu::reference::ReferenceCipher;
use ciphershard::cipher::{ChunkOpener, ChunkParams, Cipher};
use criterion::{Bencher, Criterion, Throughput, criterion_group, criterion_main};
use ctr::cipher::{KeyIvInit, StreamCipher};

const CHUNK: usize = 2 << 20;
const NONCE: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
const AAD: [u8; 89] = [0x5a; 89];

/// CPU time consumed by the calling thread.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID is always supported
    // on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Times `op` in thread CPU time (or wall time, see the module docs); `prep` runs before each
/// call, untimed.
fn cpu_timed<S>(
    b: &mut Bencher<'_>,
    state: &mut S,
    mut prep: impl FnMut(&mut S),
    mut op: impl FnMut(&mut S),
) {
    if std::env::var_os("CIPHERSHARD_BENCH_WALL").is_some() {
        return b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                prep(state);
                let t = std::time::Instant::now();
                op(state);
                total += t.elapsed();
            }
            total
        });
    }
    b.iter_custom(|iters| {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            prep(state);
            let t = thread_cpu_time();
            op(state);
            total += thread_cpu_time() - t;
        }
        total
    })
}

/// Times `iters` calls of `op` as one span (no per-call clock reads, which cost a syscall
/// each for the thread CPU clock and would distort small cases).
fn cpu_timed_loop<S>(b: &mut Bencher<'_>, state: &mut S, mut op: impl FnMut(&mut S)) {
    let wall = std::env::var_os("CIPHERSHARD_BENCH_WALL").is_some();
    b.iter_custom(|iters| {
        let (t, w) = (thread_cpu_time(), std::time::Instant::now());
        for _ in 0..iters {
            op(state);
        }
        if wall {
            w.elapsed()
        } else {
            thread_cpu_time() - t
        }
    })
}

struct Fixture {
    key: DataKey,
    opener: Box<dyn ChunkOpener>,
    ct: Vec<u8>,
    tag: [u8; 16],
}

fn fixture(len: usize) -> Fixture {
    let key = DataKey::from_bytes([0x42; 32]);
    let opener = CpuCipher::new().prepare(&key).unwrap();
    let mut ct: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
    let tag = opener.seal_in_place(&NONCE, &AAD, true, &mut ct).unwrap();
    Fixture {
        key,
        opener,
        ct,
        tag,
    }
}

fn params(f: &Fixture) -> ChunkParams<'_> {
    ChunkParams {
        nonce: NONCE,
        aad: &AAD,
        tag: f.tag,
        encrypted: true,
    }
}

fn single_core(c: &mut Criterion) {
    let f = fixture(CHUNK);
    let p = params(&f);
    let aws = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, f.key.as_bytes()).unwrap());

    // The ciphertext in a memory-mapped file, as the loader reads it.
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&f.ct).unwrap();
    // SAFETY: a private temporary file that nothing else writes while mapped.
    let map = unsafe { memmap2::Mmap::map(&file).unwrap() };

    let mut g = c.benchmark_group("cpu_2MiB");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    let mut dst = vec![0u8; CHUNK];
    let restore = |d: &mut Vec<u8>| d.copy_from_slice(&f.ct);
    g.bench_function("ciphershard_open_mmap_to_buffer", |b| {
        cpu_timed_loop(b, &mut dst, |d| {
            f.opener.open(&p, black_box(&map[..]), d).unwrap()
        })
    });
    g.bench_function("ciphershard_open_buffer_to_buffer", |b| {
        cpu_timed_loop(b, &mut dst, |d| {
            f.opener.open(&p, black_box(&f.ct), d).unwrap()
        })
    });
    g.bench_function("ciphershard_open_in_place", |b| {
        cpu_timed(b, &mut dst, restore, |d| {
            f.opener.open_in_place(&p, d).unwrap()
        })
    });
    g.bench_function("aws_lc_rs_open_in_place", |b| {
        cpu_timed(b, &mut dst, restore, |d| {
            aws.open_in_place_separate_tag(
                Nonce::assume_unique_for_key(NONCE),
                Aad::from(&AAD),
                &f.tag,
                d,
            )
            .unwrap();
        })
    });
    g.bench_function("ciphershard_verify", |b| {
        cpu_timed_loop(b, &mut dst, |_| {
            f.opener.verify(&p, black_box(&f.ct)).unwrap()
        })
    });
    g.bench_function("ciphershard_ctr_apply", |b| {
        cpu_timed_loop(b, &mut dst, |d| {
            f.opener.ctr_apply(&NONCE, 0, black_box(&f.ct), d).unwrap()
        })
    });
    g.bench_function("ciphershard_ctr_apply_offset_37", |b| {
        cpu_timed_loop(b, &mut dst, |d| {
            f.opener
                .ctr_apply(&NONCE, 37, black_box(&f.ct[37..]), &mut d[37..])
                .unwrap()
        })
    });
    g.bench_function("rustcrypto_ctr_crate", |b| {
        cpu_timed_loop(b, &mut dst, |d| {
            let mut iv = [0u8; 16];
            iv[..12].copy_from_slice(&NONCE);
            iv[15] = 2;
            let mut c = ctr::Ctr32BE::<aes::Aes256>::new(f.key.as_bytes().into(), &iv.into());
            c.apply_keystream_b2b(black_box(&f.ct), d);
        })
    });
    g.bench_function("rustcrypto_aes_raw_blocks_in_place", |b| {
        use aes::cipher::{BlockCipherEncrypt, KeyInit};
        let aes = aes::Aes256::new(f.key.as_bytes().into());
        let mut blocks = vec![aes::Block::default(); CHUNK / 16];
        cpu_timed(
            b,
            &mut blocks,
            |_| {},
            |bl| aes.encrypt_blocks(black_box(bl)),
        )
    });
    g.bench_function("ciphershard_seal_in_place", |b| {
        cpu_timed_loop(b, &mut dst, |d| {
            black_box(f.opener.seal_in_place(&NONCE, &AAD, true, d).unwrap());
        })
    });
    g.bench_function("aws_lc_rs_seal_in_place", |b| {
        cpu_timed_loop(b, &mut dst, |d| {
            let _ = black_box(
                aws.seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(NONCE),
                    Aad::from(&AAD),
                    d,
                )
                .unwrap(),
            );
        })
    });
    let r = ReferenceCipher::new().prepare(&f.key).unwrap();
    g.bench_function("reference_open", |b| {
        cpu_timed_loop(b, &mut dst, |d| r.open(&p, black_box(&f.ct), d).unwrap())
    });
    g.finish();

    // Row-sized pieces, as the loader decrypts them into batch slots.
    let mut g = c.benchmark_group("cpu_4KiB");
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("ciphershard_ctr_apply_offset_1000", |b| {
        cpu_timed_loop(b, &mut dst, |d| {
            f.opener
                .ctr_apply(&NONCE, 1000, black_box(&f.ct[..4096]), &mut d[..4096])
                .unwrap()
        })
    });
    g.finish();
}

fn threads(c: &mut Criterion) {
    // 16 chunks (32 MiB) opened from one buffer into another, split over 1 or 2 threads.
    const CHUNKS: usize = 16;
    let f = fixture(CHUNK);
    let p = params(&f);
    let src: Vec<u8> = f.ct.repeat(CHUNKS);
    let mut g = c.benchmark_group("cpu_open_threads_32MiB");
    g.throughput(Throughput::Bytes((CHUNK * CHUNKS) as u64));
    let mut dst = vec![0u8; CHUNK * CHUNKS];
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for n in [1usize, 2, 4].into_iter().filter(|&n| n <= cores.max(2)) {
        g.bench_function(format!("{n}_threads"), |b| {
            b.iter(|| {
                let per = CHUNKS.div_ceil(n) * CHUNK;
                std::thread::scope(|s| {
                    for (sc, dc) in src.chunks(per).zip(dst.chunks_mut(per)) {
                        let opener = &f.opener;
                        let p = &p;
                        s.spawn(move || {
                            for (x, y) in sc.chunks(CHUNK).zip(dc.chunks_mut(CHUNK)) {
                                opener.open(p, x, y).unwrap();
                            }
                        });
                    }
                })
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(2))
}

criterion_group! { name = benches; config = config(); targets = single_core, threads }
criterion_main!(benches);
