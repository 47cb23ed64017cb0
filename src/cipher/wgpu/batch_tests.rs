//! The batch engine's tests: window decryption against the CPU backend (every upload path,
//! kernel variants, 2-D grids), row gather against a host reference, argument checks, a lost
//! device, and two threads at once.
#![forbid(unsafe_code)]

use std::ops::Range;

use super::{GatherJob, KernelVariant, WgpuBatchEngine, WgpuCipher, WgpuOptions, WindowChunk};
use crate::cipher::conformance::SplitMix;
use crate::cipher::cpu::CpuCipher;
use crate::cipher::{Cipher, NONCE_LEN};
use crate::error::{Error, Result};
use crate::keys::DataKey;

/// The backend here (lavapipe included), or `None` with a message when there is no adapter.
fn cipher(kernel: Option<KernelVariant>) -> Option<WgpuCipher> {
    WgpuCipher::new(WgpuOptions {
        allow_cpu_adapter: true,
        kernel,
        ..Default::default()
    })
    .inspect_err(|e| eprintln!("skipping: no wgpu adapter: {e}"))
    .ok()
}

fn random_keys(rng: &mut SplitMix, n: usize) -> Vec<DataKey> {
    (0..n)
        .map(|_| {
            let mut k = [0u8; 32];
            rng.fill(&mut k);
            DataKey::from_bytes(k)
        })
        .collect()
}

/// Lays out chunks of `lens` at 16-byte aligned offsets with random gaps, encrypts each on
/// the CPU with a random key of `keys` and a distinct nonce; returns the staging bytes (gaps
/// random), the chunks and their plaintexts.
fn encrypted_window(
    rng: &mut SplitMix,
    keys: &[DataKey],
    lens: &[u64],
) -> (Vec<u8>, Vec<WindowChunk>, Vec<Vec<u8>>) {
    let mut chunks = Vec::new();
    let mut offset = 16 * rng.below(3);
    for (i, &len) in lens.iter().enumerate() {
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill(&mut nonce);
        nonce[0] = i as u8; // distinct
        chunks.push(WindowChunk {
            offset,
            len,
            nonce,
            key: rng.below(keys.len() as u64) as u32,
        });
        offset = (offset + len).next_multiple_of(16) + 16 * rng.below(4);
    }
    let mut staging = vec![0u8; offset.next_multiple_of(16) as usize + 16];
    rng.fill(&mut staging);
    let mut plains = Vec::new();
    for c in &chunks {
        let mut pt = vec![0u8; c.len as usize];
        rng.fill(&mut pt);
        let op = CpuCipher::new().prepare(&keys[c.key as usize]).unwrap();
        let at = c.offset as usize..(c.offset + c.len) as usize;
        op.ctr_apply(&c.nonce, 0, &pt, &mut staging[at]).unwrap();
        plains.push(pt);
    }
    (staging, chunks, plains)
}

/// Decrypts the window on the device and checks every chunk against its plaintext, and
/// that no byte past a chunk's last block changed.
fn check_window(
    engine: &WgpuBatchEngine,
    staging: &[u8],
    chunks: &[WindowChunk],
    plains: &[Vec<u8>],
) {
    let window = engine
        .create_buffer("window", staging.len() as u64)
        .unwrap();
    let s = engine.upload_decrypt(&window, staging, chunks).unwrap();
    engine.wait(s).unwrap();
    let got = engine.read_buffer(&window, staging.len() as u64).unwrap();
    let mut touched = vec![false; staging.len()];
    for (i, (c, pt)) in chunks.iter().zip(plains).enumerate() {
        let at = c.offset as usize..(c.offset + c.len) as usize;
        assert!(got[at.clone()] == pt[..], "chunk {i} (len {})", c.len);
        let padded = c.offset as usize..(c.offset + c.len).next_multiple_of(16) as usize;
        touched[padded].iter_mut().for_each(|t| *t = true);
    }
    for (k, t) in touched.iter().enumerate() {
        assert!(
            *t || got[k] == staging[k],
            "byte {k} outside every chunk changed"
        );
    }
    engine.health().unwrap();
}

/// Windows of different sizes through a two-slot ring (each slot reused, so every
/// re-mapping path runs) decrypt exactly as through `queue.write_buffer`.
#[test]
fn upload_ring_matches_cpu_across_reuse() {
    let Some(c) = cipher(None) else { return };
    let mut rng = SplitMix(0x5107);
    let keys = random_keys(&mut rng, 2);
    let key_refs: Vec<&DataKey> = keys.iter().collect();
    let engine = WgpuBatchEngine::new(&c, &key_refs).unwrap();
    let mut ring = engine.upload_ring(2, 4 << 20).unwrap();
    for round in 0..5u64 {
        // Up to ~3 MiB: several copy threads (1 MiB ranges at least) in some rounds.
        let lens = [
            1 + round * 7,
            4096,
            65536 + round,
            0,
            (round % 3) << 20,
            100_000 - round * 13,
        ];
        let (staging, chunks, plains) = encrypted_window(&mut rng, &keys, &lens);
        let window = engine
            .create_buffer("window", staging.len() as u64)
            .unwrap();
        let s = engine
            .upload_decrypt_ring(
                &mut ring,
                1 + round as usize % 3,
                &window,
                &staging,
                &chunks,
            )
            .unwrap();
        engine.wait(s).unwrap();
        let got = engine.read_buffer(&window, staging.len() as u64).unwrap();
        for (i, (c, pt)) in chunks.iter().zip(&plains).enumerate() {
            let at = c.offset as usize..(c.offset + c.len) as usize;
            assert!(got[at] == pt[..], "round {round} chunk {i}");
        }
    }
    // Staging larger than a slot: an argument error, and the ring still works after it.
    let big = engine.create_buffer("big", 5 << 20).unwrap();
    let err = engine
        .upload_decrypt_ring(&mut ring, 2, &big, &vec![0u8; 5 << 20], &[])
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    let (staging, chunks, plains) = encrypted_window(&mut rng, &keys, &[5000]);
    let window = engine.create_buffer("w", staging.len() as u64).unwrap();
    let s = engine
        .upload_decrypt_ring(&mut ring, 3, &window, &staging, &chunks)
        .unwrap();
    engine.wait(s).unwrap();
    let got = engine.read_buffer(&window, staging.len() as u64).unwrap();
    let at = chunks[0].offset as usize..(chunks[0].offset + chunks[0].len) as usize;
    assert!(got[at] == plains[0][..]);
    engine.health().unwrap();
}

#[test]
fn upload_decrypt_matches_cpu() {
    let mut rng = SplitMix(0xBA7C);
    let keys = random_keys(&mut rng, 3);
    let key_refs: Vec<&DataKey> = keys.iter().collect();
    let lens = [1, 15, 16, 17, 4096, 65536 + 5, 0, 31, 33, 100, 2 << 20, 7];
    let (staging, chunks, plains) = encrypted_window(&mut rng, &keys, &lens);
    // The default kernel variant, the 512-wide bank-interleaved one, and one with the rounds
    // unrolled (the batch kernel keeps the runtime checks whatever the variant says).
    let banked = KernelVariant {
        workgroup_size: 512,
        blocks_per_invocation: 4,
        loop_blocks: 1,
        table_copies: 32,
        runtime_checks: true,
        unrolled: false,
    };
    let unrolled = KernelVariant {
        workgroup_size: 256,
        table_copies: 32,
        runtime_checks: false,
        unrolled: true,
        ..KernelVariant::DEFAULT
    };
    for kernel in [None, Some(banked), Some(unrolled)] {
        let Some(c) = cipher(kernel) else { return };
        let engine = WgpuBatchEngine::new(&c, &key_refs).unwrap();
        check_window(&engine, &staging, &chunks, &plains);
        // Chunks in any order in the table.
        let (mut ch, mut pl) = (chunks.clone(), plains.clone());
        ch.reverse();
        pl.reverse();
        check_window(&engine, &staging, &ch, &pl);
    }
}

#[test]
fn upload_decrypt_with_a_two_dimensional_grid() {
    let Some(c) = cipher(None) else { return };
    let mut rng = SplitMix(0x2D);
    let keys = random_keys(&mut rng, 2);
    let key_refs: Vec<&DataKey> = keys.iter().collect();
    let mut engine = WgpuBatchEngine::new(&c, &key_refs).unwrap();
    // Eight workgroups per row (2048 blocks with 256 invocations per workgroup): about 6000
    // blocks need three rows.
    engine.max_workgroups = 8;
    let (staging, chunks, plains) =
        encrypted_window(&mut rng, &keys, &[65536 + 5, 3, 20_000, 16 * 700 + 1]);
    let blocks: u64 = chunks.iter().map(|c| c.len.div_ceil(16)).sum();
    assert!(blocks > 2 * 8 * 256, "{blocks} blocks fit in two rows");
    check_window(&engine, &staging, &chunks, &plains);
    // A grid that cannot hold the blocks even in 2-D is an error, not a truncated pass.
    engine.max_workgroups = 4;
    let window = engine.create_buffer("w", staging.len() as u64).unwrap();
    assert!(engine.upload_decrypt(&window, &staging, &chunks).is_err());
    engine.health().unwrap();
}

/// Host reference of one gather: zeros, then every job's rows copied.
fn reference(
    windows: &[Vec<u8>],
    src_of: &[usize],
    jobs: &[(usize, Range<usize>, u64)],
    pairs: &[(u64, u64)],
    dst_sizes: &[usize],
) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = dst_sizes.iter().map(|&n| vec![0u8; n]).collect();
    for (j, (dst, range, row)) in jobs.iter().enumerate() {
        for &(s, d) in &pairs[range.clone()] {
            let (s, d, r) = (s as usize, d as usize, *row as usize);
            out[*dst][d..d + r].copy_from_slice(&windows[src_of[j]][s..s + r]);
        }
    }
    out
}

#[test]
fn gather_matches_host_reference() {
    let Some(c) = cipher(None) else { return };
    let mut engine = WgpuBatchEngine::new(&c, &[]).unwrap();
    let mut rng = SplitMix(0x6A7);
    let windows: Vec<Vec<u8>> = [40_000usize, 50_000]
        .iter()
        .map(|&n| {
            let mut w = vec![0u8; n];
            rng.fill(&mut w);
            w
        })
        .collect();
    let bufs: Vec<::wgpu::Buffer> = windows
        .iter()
        .map(|w| {
            let b = engine.create_buffer("window", w.len() as u64).unwrap();
            engine
                .wait(engine.upload_decrypt(&b, w, &[]).unwrap())
                .unwrap();
            b
        })
        .collect();
    // Columns: each row size goes to one of two dst buffers, packed back to back (rows of
    // neighbouring columns share boundary words) or after a gap (must stay zero).
    let mut jobs = Vec::new();
    let mut src_of = Vec::new();
    let mut pairs = Vec::new();
    let mut cursor = [3u64, 1u64];
    for (j, &row) in [1u64, 2, 3, 5, 8, 12, 17, 4099, 1, 3].iter().enumerate() {
        let dst = j % 2;
        let src = (j / 2) % 2;
        let rows = if row > 1000 { 5 } else { 37 };
        let base = cursor[dst] + rng.below(3) * rng.below(7);
        let mut order: Vec<u64> = (0..rows).collect();
        for k in (1..order.len()).rev() {
            order.swap(k, rng.below(k as u64 + 1) as usize);
        }
        let start = pairs.len();
        for &k in &order {
            let s = rng.below(windows[src].len() as u64 - row + 1);
            pairs.push((s, base + k * row));
        }
        cursor[dst] = base + rows * row;
        jobs.push((dst, start..pairs.len(), row));
        src_of.push(src);
    }
    let dst_sizes = [cursor[0] as usize + 21, cursor[1] as usize + 5];
    let dsts: Vec<::wgpu::Buffer> = dst_sizes
        .iter()
        .map(|&n| engine.create_buffer("column", n as u64).unwrap())
        .collect();
    let want = reference(&windows, &src_of, &jobs, &pairs, &dst_sizes);
    let gather_jobs: Vec<GatherJob<'_>> = jobs
        .iter()
        .zip(&src_of)
        .map(|((dst, range, row), &src)| GatherJob {
            src: &bufs[src],
            dst: *dst,
            pairs: range.clone(),
            row_bytes: *row,
        })
        .collect();
    let dst_refs: Vec<&::wgpu::Buffer> = dsts.iter().collect();
    // Default grid, then a 3-workgroup limit: 2-D grids, and the 4099-byte job split into
    // several dispatches.
    for max_workgroups in [engine.max_workgroups, 3] {
        engine.max_workgroups = max_workgroups;
        // Garbage in the columns first: gather must clear them.
        for d in &dsts {
            let mut junk = vec![0u8; d.size() as usize];
            rng.fill(&mut junk);
            engine
                .wait(engine.upload_decrypt(d, &junk, &[]).unwrap())
                .unwrap();
        }
        let s = engine.gather(&gather_jobs, &pairs, &dst_refs).unwrap();
        engine.wait(s).unwrap();
        for (i, d) in dsts.iter().enumerate() {
            let got = engine.read_buffer(d, dst_sizes[i] as u64).unwrap();
            let bad = got.iter().zip(&want[i]).position(|(a, b)| a != b);
            assert_eq!(bad, None, "dst {i}, max workgroups {max_workgroups}");
        }
    }
    engine.health().unwrap();
}

#[test]
fn invalid_arguments_are_errors_and_the_device_stays_usable() {
    let Some(c) = cipher(None) else { return };
    let mut rng = SplitMix(0xE44);
    let keys = random_keys(&mut rng, 2);
    let key_refs: Vec<&DataKey> = keys.iter().collect();
    let engine = WgpuBatchEngine::new(&c, &key_refs).unwrap();
    let (staging, chunks, plains) = encrypted_window(&mut rng, &keys, &[100, 64, 17]);
    let window = engine.create_buffer("w", staging.len() as u64).unwrap();
    let invalid = |r: Result<::wgpu::SubmissionIndex>, what: &str| match r {
        Err(Error::InvalidArgument(m)) => eprintln!("{what}: {m}"),
        Err(e) => panic!("{what}: wrong error {e}"),
        Ok(_) => panic!("{what}: accepted"),
    };
    let with = |f: &dyn Fn(&mut WindowChunk)| {
        let mut ch = chunks.clone();
        f(&mut ch[1]);
        ch
    };
    let n = staging.len() as u64;
    invalid(
        engine.upload_decrypt(&window, &staging, &with(&|c| c.len = n)),
        "chunk outside the staging",
    );
    invalid(
        engine.upload_decrypt(&window, &staging, &with(&|c| c.offset = u64::MAX - 15)),
        "chunk offset overflowing",
    );
    invalid(
        engine.upload_decrypt(&window, &staging, &with(&|c| c.offset += 4)),
        "misaligned offset",
    );
    invalid(
        engine.upload_decrypt(&window, &staging, &with(&|c| c.key = 2)),
        "bad key index",
    );
    invalid(
        engine.upload_decrypt(&window, &staging, &with(&|c| c.offset = chunks[0].offset)),
        "overlapping chunks",
    );
    invalid(
        engine.upload_decrypt(&window, &staging[..staging.len() - 2], &[]),
        "staging not a multiple of 4",
    );
    let small = engine.create_buffer("small", 64).unwrap();
    invalid(
        engine.upload_decrypt(&small, &staging, &[]),
        "staging bigger than the window",
    );
    assert!(
        engine
            .create_buffer("huge", engine.max_binding_bytes() + 1)
            .is_err()
    );
    assert!(engine.read_buffer(&small, 65).is_err());

    let dst = engine.create_buffer("dst", 32).unwrap();
    let job = |src, dst, pairs: Range<usize>, row_bytes| GatherJob {
        src,
        dst,
        pairs,
        row_bytes,
    };
    let pairs = [(0u64, 0u64), (n - 8, 24), (n - 7, 0), (0, 25)];
    let gather =
        |jobs: &[GatherJob<'_>], dsts: &[&::wgpu::Buffer]| engine.gather(jobs, &pairs, dsts);
    invalid(
        gather(&[job(&window, 0, 2..3, 8)], &[&dst]),
        "pair outside src",
    );
    invalid(
        gather(&[job(&window, 0, 3..4, 8)], &[&dst]),
        "pair outside dst",
    );
    invalid(
        gather(&[job(&window, 1, 0..2, 8)], &[&dst]),
        "dst index out of range",
    );
    invalid(
        gather(&[job(&window, 0, 3..5, 8)], &[&dst]),
        "pair range outside pairs",
    );
    invalid(gather(&[job(&dst, 0, 0..1, 8)], &[&dst]), "src is dst");
    // A bad job after a good one: nothing is queued.
    invalid(
        gather(
            &[job(&window, 0, 0..2, 8), job(&window, 0, 2..3, 8)],
            &[&dst],
        ),
        "second job bad",
    );

    // Still usable: a valid decrypt and gather give the right bytes.
    engine.health().unwrap();
    c.health().unwrap();
    check_window(&engine, &staging, &chunks, &plains);
    let s = engine.upload_decrypt(&window, &staging, &chunks).unwrap();
    engine.wait(s).unwrap();
    let plain = engine.read_buffer(&window, n).unwrap();
    let s = gather(&[job(&window, 0, 0..2, 8)], &[&dst]).unwrap();
    engine.wait(s).unwrap();
    let got = engine.read_buffer(&dst, 32).unwrap();
    assert_eq!(got[..8], plain[..8]);
    assert_eq!(got[8..24], [0u8; 16]);
    assert_eq!(got[24..], plain[n as usize - 8..]);
}

#[test]
fn engine_is_send_sync_and_debug_shows_only_the_adapter() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<WgpuBatchEngine>();
    let Some(c) = cipher(None) else { return };
    let key = DataKey::from_bytes([0x42; 32]);
    let engine = WgpuBatchEngine::new(&c, &[&key]).unwrap();
    let text = format!("{engine:?}");
    assert!(text.contains(&c.adapter().name), "{text}");
    assert!(!text.contains("keys"), "{text}");
}

#[test]
fn lost_device_is_an_error_not_a_panic() {
    let Some(c) = cipher(None) else { return };
    let key = DataKey::from_bytes([7; 32]);
    let engine = WgpuBatchEngine::new(&c, &[&key]).unwrap();
    let window = engine.create_buffer("w", 4096).unwrap();
    let dst = engine.create_buffer("d", 64).unwrap();
    let s = engine.upload_decrypt(&window, &[0u8; 4096], &[]).unwrap();
    engine.device().destroy();
    let _ = engine.device().poll(::wgpu::PollType::Poll);
    let _ = engine.wait(s);
    let chunk = WindowChunk {
        offset: 0,
        len: 100,
        nonce: [1; NONCE_LEN],
        key: 0,
    };
    assert!(
        engine
            .upload_decrypt(&window, &[0u8; 4096], &[chunk])
            .is_err()
    );
    let job = GatherJob {
        src: &window,
        dst: 0,
        pairs: 0..1,
        row_bytes: 8,
    };
    assert!(engine.gather(&[job], &[(0, 0)], &[&dst]).is_err());
    assert!(engine.read_buffer(&window, 16).is_err());
    assert!(matches!(engine.health(), Err(Error::Backend { .. })));
    assert!(c.health().is_err(), "the cipher shares the failure");
    drop(engine); // zeroing the keys on a lost device must not panic either
}

#[test]
fn decrypt_and_gather_from_two_threads() {
    let Some(c) = cipher(None) else { return };
    let mut rng = SplitMix(0x7707);
    let keys = random_keys(&mut rng, 2);
    let key_refs: Vec<&DataKey> = keys.iter().collect();
    let engine = WgpuBatchEngine::new(&c, &key_refs).unwrap();
    let (staging, chunks, plains) = encrypted_window(&mut rng, &keys, &[5000, 17, 30_000]);
    let mut src = vec![0u8; 4096];
    rng.fill(&mut src);
    let src_buf = engine.create_buffer("src", 4096).unwrap();
    engine
        .wait(engine.upload_decrypt(&src_buf, &src, &[]).unwrap())
        .unwrap();
    let pairs: Vec<(u64, u64)> = (0..100u64).map(|k| (k * 37 % 4000, k * 7)).collect();
    let mut want = vec![0u8; 700];
    for &(s, d) in &pairs {
        want[d as usize..d as usize + 7].copy_from_slice(&src[s as usize..s as usize + 7]);
    }
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for _ in 0..5 {
                check_window(&engine, &staging, &chunks, &plains);
            }
        });
        scope.spawn(|| {
            let dst = engine.create_buffer("dst", 700).unwrap();
            let job = GatherJob {
                src: &src_buf,
                dst: 0,
                pairs: 0..pairs.len(),
                row_bytes: 7,
            };
            for _ in 0..5 {
                let s = engine
                    .gather(std::slice::from_ref(&job), &pairs, &[&dst])
                    .unwrap();
                engine.wait(s).unwrap();
                assert!(engine.read_buffer(&dst, 700).unwrap() == want);
            }
        });
    });
    engine.health().unwrap();
}
