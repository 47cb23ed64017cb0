//! CPU cipher throughput against aws-lc-rs and RustCrypto in the same run.
//!
//! `cargo bench --no-default-features --bench cipher` (about 1-2 minutes). Figures and the
//! machine they came from are in docs/BENCHMARKS.md.

use std::hint::black_box;
use std::io::Write;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ciphershard::DataKey;
use ciphershard::cipher::cpu::CpuCipher;
use ciphershard::cipher::cpu::reference::ReferenceCipher;
use ciphershard::cipher::{ChunkOpener, ChunkParams, Cipher};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use ctr::cipher::{KeyIvInit, StreamCipher};

const CHUNK: usize = 2 << 20;
const NONCE: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
const AAD: [u8; 89] = [0x5a; 89];

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
    let tag = opener.seal_in_place(&NONCE, &AAD, true, &mut ct);
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
    g.bench_function("ciphershard_open_mmap_to_buffer", |b| {
        b.iter(|| f.opener.open(&p, black_box(&map[..]), &mut dst).unwrap())
    });
    g.bench_function("ciphershard_open_buffer_to_buffer", |b| {
        b.iter(|| f.opener.open(&p, black_box(&f.ct), &mut dst).unwrap())
    });
    g.bench_function("ciphershard_open_in_place", |b| {
        b.iter_batched_ref(
            || f.ct.clone(),
            |buf| f.opener.open_in_place(&p, buf).unwrap(),
            BatchSize::LargeInput,
        )
    });
    g.bench_function("aws_lc_rs_open_in_place", |b| {
        b.iter_batched_ref(
            || f.ct.clone(),
            |buf| {
                aws.open_in_place_separate_tag(
                    Nonce::assume_unique_for_key(NONCE),
                    Aad::from(&AAD),
                    &f.tag,
                    buf,
                )
                .unwrap();
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("ciphershard_verify", |b| {
        b.iter(|| f.opener.verify(&p, black_box(&f.ct)).unwrap())
    });
    g.bench_function("ciphershard_ctr_apply", |b| {
        b.iter(|| f.opener.ctr_apply(&NONCE, 0, black_box(&f.ct), &mut dst))
    });
    g.bench_function("ciphershard_ctr_apply_offset_37", |b| {
        b.iter(|| {
            f.opener
                .ctr_apply(&NONCE, 37, black_box(&f.ct[37..]), &mut dst[37..])
        })
    });
    g.bench_function("rustcrypto_ctr_crate", |b| {
        b.iter(|| {
            let mut iv = [0u8; 16];
            iv[..12].copy_from_slice(&NONCE);
            iv[15] = 2;
            let mut c = ctr::Ctr32BE::<aes::Aes256>::new(f.key.as_bytes().into(), &iv.into());
            c.apply_keystream_b2b(black_box(&f.ct), &mut dst);
        })
    });
    g.bench_function("rustcrypto_aes_raw_blocks", |b| {
        use aes::cipher::{BlockCipherEncrypt, KeyInit};
        let aes = aes::Aes256::new(f.key.as_bytes().into());
        let mut blocks = vec![aes::Block::default(); CHUNK / 16];
        b.iter(|| aes.encrypt_blocks(black_box(&mut blocks)))
    });
    g.bench_function("ciphershard_seal_in_place", |b| {
        b.iter_batched_ref(
            || f.ct.clone(),
            |buf| f.opener.seal_in_place(&NONCE, &AAD, true, buf),
            BatchSize::LargeInput,
        )
    });
    g.bench_function("reference_open", |b| {
        let r = ReferenceCipher::new().prepare(&f.key).unwrap();
        b.iter(|| r.open(&p, black_box(&f.ct), &mut dst).unwrap())
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
    for n in [1usize, 2] {
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
