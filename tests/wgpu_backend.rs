//! The wgpu backend against the conformance suite and the CPU reference, on whatever adapter is
//! here (in CI: lavapipe). Without an adapter each test prints why it skipped, unless
//! `CIPHERSHARD_REQUIRE_WGPU=1`, which turns a missing adapter into a failure.
#![cfg(feature = "wgpu")]

use ciphershard::cipher::conformance::{self, SplitMix};
use ciphershard::cipher::wgpu::{KernelVariant, WgpuCipher, WgpuOptions};
use ciphershard::cipher::{ChunkOpener, ChunkParams, Cipher, OpenError, cpu::CpuCipher};
use ciphershard::{Backend, DataKey};

/// A random key prepared on `c` and on the CPU backend (the reference).
fn openers(c: &WgpuCipher, rng: &mut SplitMix) -> (Box<dyn ChunkOpener>, Box<dyn ChunkOpener>) {
    let mut kb = [0u8; 32];
    rng.fill(&mut kb);
    let key = DataKey::from_bytes(kb);
    (
        c.prepare(&key).unwrap(),
        CpuCipher::new().prepare(&key).unwrap(),
    )
}

/// The backend, or `None` (after printing why) when no adapter exists and none is required.
fn backend(options: WgpuOptions) -> Option<WgpuCipher> {
    match WgpuCipher::new(options) {
        Ok(c) => Some(c),
        Err(e) => {
            if std::env::var("CIPHERSHARD_REQUIRE_WGPU").is_ok_and(|v| v == "1") {
                panic!("CIPHERSHARD_REQUIRE_WGPU=1 but the wgpu backend is unavailable: {e}");
            }
            eprintln!("skipping wgpu test: {e}");
            None
        }
    }
}

#[test]
fn wgpu_backend_conforms() {
    // Both table placements (the GPU default, workgroup memory, and the storage buffer) and
    // both tag-check placements (GHASH on the GPU, GHASH on the calling thread).
    for (shared_table, gpu_ghash) in [(true, true), (false, false), (true, false)] {
        let options = WgpuOptions {
            shared_table: Some(shared_table),
            gpu_ghash,
            ..WgpuOptions::default()
        };
        let Some(c) = backend(options) else { return };
        eprintln!(
            "wgpu adapter: {} (shared table: {shared_table}, GPU GHASH: {gpu_ghash})",
            c.describe()
        );
        assert_eq!(c.gpu_ghash(), gpu_ghash);
        conformance::run(&c, 24).unwrap();
        c.health().unwrap();
    }
}

#[test]
fn every_kernel_variant_conforms() {
    // Each variant (workgroup size, blocks per invocation) against the suite and against the
    // CPU at offsets whose blocks straddle workgroup spans and the 2^32 counter wrap.
    for variant in KernelVariant::ALL {
        let Some(c) = backend(WgpuOptions {
            kernel: Some(variant),
            ..WgpuOptions::default()
        }) else {
            return;
        };
        eprintln!("kernel variant {variant}");
        conformance::run(&c, 6).unwrap_or_else(|e| panic!("variant {variant}: {e}"));
        let key = DataKey::from_bytes([0x17; 32]);
        let (op, rop) = (
            c.prepare(&key).unwrap(),
            CpuCipher::new().prepare(&key).unwrap(),
        );
        let mut rng = SplitMix(u64::from(
            variant.workgroup_size
                + variant.blocks_per_invocation
                + variant.loop_blocks
                + variant.table_copies,
        ));
        for (offset, len) in [
            (0u64, 16 * 2048 + 5),
            (7, 16 * 4096 * 2 + 33),
            (
                conformance::offset_for_counter(u32::MAX - 3000) + 3,
                100_000,
            ),
        ] {
            let mut src = vec![0u8; len];
            rng.fill(&mut src);
            let (mut x, mut y) = (vec![0u8; len], vec![0u8; len]);
            op.ctr_apply(&[9; 12], offset, &src, &mut x).unwrap();
            rop.ctr_apply(&[9; 12], offset, &src, &mut y).unwrap();
            assert!(
                x == y,
                "variant {variant}: offset {offset} len {len} differs"
            );
        }
        c.health().unwrap();
    }
    for bad in [
        KernelVariant {
            blocks_per_invocation: 3,
            ..KernelVariant::DEFAULT
        },
        KernelVariant {
            blocks_per_invocation: 4,
            loop_blocks: 2,
            ..KernelVariant::DEFAULT
        },
        KernelVariant {
            loop_blocks: 9,
            ..KernelVariant::DEFAULT
        },
    ] {
        let c = WgpuCipher::new(WgpuOptions {
            kernel: Some(bad),
            ..WgpuOptions::default()
        });
        assert!(c.is_err(), "the unsupported variant {bad} was accepted");
    }
}

#[test]
fn gpu_ghash_matches_cpu_tags_and_rejects_tampering() {
    let Some(c) = backend(WgpuOptions {
        gpu_ghash: true,
        max_piece_bytes: Some(1 << 20),
        ..WgpuOptions::default()
    }) else {
        return;
    };
    let mut rng = SplitMix(0x6ba5);
    // Lengths around the shader's segment (16 blocks) and workgroup (4096 blocks) spans, the
    // piece size (1 MiB: one piece, the GPU path) and past it (several pieces: the CPU path).
    let lens = [
        1usize,
        15,
        16,
        17,
        255,
        256,
        257,
        65_535,
        65_536,
        65_537,
        1 << 20,
        (1 << 20) + 1,
        3_000_000,
    ];
    for (case, &len) in lens.iter().enumerate() {
        let (op, rop) = openers(&c, &mut rng);
        let mut nonce = [0u8; 12];
        rng.fill(&mut nonce);
        let mut pt = vec![0u8; len];
        rng.fill(&mut pt);
        let aad: Vec<u8> = (0..(case * 7) as u8).collect();
        let mut ct = pt.clone();
        let tag = rop.seal_in_place(&nonce, &aad, true, &mut ct).unwrap();
        let params = ChunkParams {
            nonce,
            aad: &aad,
            tag,
            encrypted: true,
        };
        let mut out = vec![0u8; len];
        op.open(&params, &ct, &mut out).unwrap();
        assert!(out == pt, "len {len}: open differs");
        let mut inplace = ct.clone();
        op.open_in_place(&params, &mut inplace).unwrap();
        assert!(inplace == pt, "len {len}: open_in_place differs");
        // One flipped bit anywhere (first, middle, last byte), in the AAD or the tag: rejected,
        // nothing released.
        for at in [0, len / 2, len - 1] {
            let mut bad = ct.clone();
            bad[at] ^= 0x01;
            let mut out = vec![0x77u8; len];
            assert!(
                matches!(
                    op.open(&params, &bad, &mut out),
                    Err(OpenError::TagMismatch)
                ),
                "len {len} at {at}"
            );
            assert!(out.iter().all(|&b| b == 0), "len {len}: bytes released");
            assert!(matches!(
                op.open_in_place(&params, &mut bad),
                Err(OpenError::TagMismatch)
            ));
            assert!(
                bad.iter().all(|&b| b == 0),
                "len {len}: bytes left in place"
            );
        }
        let mut bad_tag = params;
        bad_tag.tag[15] ^= 0x40;
        assert!(matches!(
            op.open(&bad_tag, &ct, &mut out),
            Err(OpenError::TagMismatch)
        ));
        let wrong_aad = [aad.as_slice(), b"x"].concat();
        let bad_aad = ChunkParams {
            aad: &wrong_aad,
            ..params
        };
        assert!(matches!(
            op.open(&bad_aad, &ct, &mut out),
            Err(OpenError::TagMismatch)
        ));
    }
    c.health().unwrap();
}

#[test]
fn piecewise_dispatch_matches_cpu() {
    // A 4 KiB piece limit forces many dispatches (the same code path as lavapipe's 128 MiB
    // binding cap on a > 128 MiB chunk), with seeks that start and end mid-block and mid-piece.
    let Some(c) = backend(WgpuOptions {
        max_piece_bytes: Some(4096),
        ..WgpuOptions::default()
    }) else {
        return;
    };
    assert_eq!(c.piece_bytes(), 4096);
    let key = DataKey::from_bytes([0x42; 32]);
    let (op, rop) = (
        c.prepare(&key).unwrap(),
        CpuCipher::new().prepare(&key).unwrap(),
    );
    let mut rng = SplitMix(99);
    let mut pt = vec![0u8; 50_000];
    rng.fill(&mut pt);
    let nonce = [3u8; 12];
    let aad = b"piecewise";
    let mut ct = pt.clone();
    let tag = rop.seal_in_place(&nonce, aad, true, &mut ct).unwrap();
    let params = ChunkParams {
        nonce,
        aad,
        tag,
        encrypted: true,
    };
    let mut out = vec![0u8; pt.len()];
    op.open(&params, &ct, &mut out).unwrap();
    assert!(out == pt, "piecewise open differs from the plaintext");
    let mut inplace = ct.clone();
    op.open_in_place(&params, &mut inplace).unwrap();
    assert!(inplace == pt, "piecewise open_in_place differs");
    let mut sealed = pt.clone();
    assert_eq!(
        op.seal_in_place(&nonce, aad, true, &mut sealed).unwrap(),
        tag
    );
    assert!(sealed == ct, "piecewise seal differs");
    for (a, b) in [
        (1usize, 4097usize),
        (4095, 12_289),
        (17, 49_999),
        (8192, 8193),
    ] {
        let mut x = vec![0u8; b - a];
        op.ctr_apply(&nonce, a as u64, &ct[a..b], &mut x).unwrap();
        assert!(x == pt[a..b], "piecewise seek {a}..{b} differs");
    }
    // Tampering in the last piece: rejected, nothing released.
    let mut bad = ct.clone();
    bad[49_000] ^= 0x80;
    let mut out = vec![0x77u8; pt.len()];
    assert!(matches!(
        op.open(&params, &bad, &mut out),
        Err(OpenError::TagMismatch)
    ));
    assert!(out.iter().all(|&b| b == 0));
    c.health().unwrap();
}

#[test]
fn random_chunks_match_cpu_backend() {
    for gpu_ghash in [true, false] {
        random_chunks_match_cpu_backend_with(gpu_ghash);
    }
}

/// Eight threads open chunks through one cipher at once (the host loader's pattern), each
/// call taking its own lane of buffers and parameters: every result equals the CPU's, and a
/// tampered chunk among them is refused with its destination zeroed.
#[test]
fn concurrent_opens_match_cpu_backend() {
    for gpu_ghash in [true, false] {
        let Some(c) = backend(WgpuOptions {
            gpu_ghash,
            ..WgpuOptions::default()
        }) else {
            return;
        };
        std::thread::scope(|sc| {
            for t in 0..8u64 {
                let c = &c;
                sc.spawn(move || {
                    let mut rng = SplitMix(0xC0C0 + t);
                    let (op, rop) = openers(c, &mut rng);
                    for case in 0..12 {
                        let len = 16 + rng.below(70_000) as usize;
                        let mut nonce = [0u8; 12];
                        rng.fill(&mut nonce);
                        let mut pt = vec![0u8; len];
                        rng.fill(&mut pt);
                        let mut ct = pt.clone();
                        let tag = rop.seal_in_place(&nonce, b"aad", true, &mut ct).unwrap();
                        let tampered = case % 5 == 4;
                        if tampered {
                            ct[len / 2] ^= 1;
                        }
                        let params = ChunkParams {
                            nonce,
                            aad: b"aad",
                            tag,
                            encrypted: true,
                        };
                        let mut out = vec![0xAAu8; len];
                        let r = op.open(&params, &ct, &mut out);
                        if tampered {
                            assert!(
                                matches!(r, Err(OpenError::TagMismatch)),
                                "thread {t} case {case}"
                            );
                            assert!(out.iter().all(|&b| b == 0), "thread {t} case {case}");
                        } else {
                            r.unwrap();
                            assert!(out == pt, "thread {t} case {case}: differs from the CPU");
                        }
                    }
                });
            }
        });
        c.health().unwrap();
    }
}

fn random_chunks_match_cpu_backend_with(gpu_ghash: bool) {
    let Some(c) = backend(WgpuOptions {
        max_piece_bytes: Some(64 * 1024),
        gpu_ghash,
        ..WgpuOptions::default()
    }) else {
        return;
    };
    let mut rng = SplitMix(0x5eed);
    for case in 0..40 {
        let (op, rop) = openers(&c, &mut rng);
        let len = rng.below(200_000) as usize;
        let mut nonce = [0u8; 12];
        rng.fill(&mut nonce);
        let mut pt = vec![0u8; len];
        rng.fill(&mut pt);
        let offset = rng.below(1 << 40);
        let (mut x, mut y) = (vec![0u8; len], vec![0u8; len]);
        op.ctr_apply(&nonce, offset, &pt, &mut x).unwrap();
        rop.ctr_apply(&nonce, offset, &pt, &mut y).unwrap();
        assert!(
            x == y,
            "case {case}: ctr_apply at offset {offset}, len {len} differs from the CPU"
        );
        let encrypted = case % 3 != 0;
        let mut ct = pt.clone();
        let tag = rop
            .seal_in_place(&nonce, b"aad", encrypted, &mut ct)
            .unwrap();
        let params = ChunkParams {
            nonce,
            aad: b"aad",
            tag,
            encrypted,
        };
        op.open_in_place(&params, &mut ct).unwrap();
        assert!(ct == pt, "case {case}: open_in_place differs");
    }
    c.health().unwrap();
}

#[test]
fn explicit_selection_and_auto_policy() {
    let Some(c) = backend(WgpuOptions::default()) else {
        return;
    };
    let explicit = ciphershard::cipher::select(Backend::Wgpu).unwrap();
    assert_eq!(explicit.backend(), Backend::Wgpu);
    let auto = ciphershard::cipher::select(Backend::Auto).unwrap();
    if c.adapter().is_cpu() {
        // A software adapter is slower than the CPU backend: Auto must not pick it.
        assert_ne!(
            auto.backend(),
            Backend::Wgpu,
            "Auto picked the CPU adapter {}",
            c.adapter()
        );
        // Nor for device batches (bench, device loaders).
        assert_ne!(
            ciphershard::cipher::auto_for_device_batches(),
            Backend::Wgpu
        );
    } else if ciphershard::cipher::cuda::probe().is_err() {
        assert_eq!(
            ciphershard::cipher::auto_for_device_batches(),
            Backend::Wgpu
        );
    }
    let probed = ciphershard::cipher::wgpu::probe().unwrap();
    assert!(
        probed.contains(&c.adapter().name),
        "probe '{probed}' names another adapter"
    );
    // Auto says why it passed wgpu over (`ciphershard backends` prints it).
    let (picked, passed) = ciphershard::cipher::select_auto();
    assert_eq!(picked.backend(), auto.backend());
    if auto.backend() != Backend::Wgpu {
        let why = passed.iter().find(|(b, _)| *b == Backend::Wgpu);
        assert!(why.is_some_and(|(_, w)| !w.is_empty()), "{passed:?}");
    }
}

/// Where `open` checks tags: the CPU unless told otherwise, never timed by the backend (its
/// description says nothing of a timing); both placements open the same chunks and refuse a
/// tampered one, whatever the backend's setting, and `set_gpu_ghash` applies to openers
/// prepared afterwards.
#[test]
fn both_tag_placements_open_through_prepare_with_tag_placement() {
    let Some(c) = backend(WgpuOptions::default()) else {
        return;
    };
    assert!(!c.gpu_ghash(), "tags are checked on the CPU by default");
    assert_eq!(c.describe(), format!("wgpu: {}", c.adapter()));
    let mut rng = SplitMix(0x7a6);
    let mut kb = [0u8; 32];
    rng.fill(&mut kb);
    let key = DataKey::from_bytes(kb);
    let rop = CpuCipher::new().prepare(&key).unwrap();
    let mut pt = vec![0u8; 300_001];
    rng.fill(&mut pt);
    let mut ct = pt.clone();
    let tag = rop
        .seal_in_place(&[4; 12], b"placement", true, &mut ct)
        .unwrap();
    let params = ChunkParams {
        nonce: [4; 12],
        aad: b"placement",
        tag,
        encrypted: true,
    };
    for gpu in [true, false] {
        let op = c.prepare_with_tag_placement(&key, gpu).unwrap();
        let mut out = vec![0u8; pt.len()];
        op.open(&params, &ct, &mut out).unwrap();
        assert!(out == pt, "GPU GHASH {gpu}: open differs");
        let mut bad = ct.clone();
        bad[150_000] ^= 0x10;
        assert!(
            matches!(
                op.open(&params, &bad, &mut out),
                Err(OpenError::TagMismatch)
            ),
            "GPU GHASH {gpu}: tampered chunk opened"
        );
        assert!(
            out.iter().all(|&b| b == 0),
            "GPU GHASH {gpu}: bytes released"
        );
    }
    c.set_gpu_ghash(true);
    assert!(c.gpu_ghash());
    let mut out = vec![0u8; pt.len()];
    c.prepare(&key)
        .unwrap()
        .open(&params, &ct, &mut out)
        .unwrap();
    assert!(out == pt);
    c.set_gpu_ghash(false);
    assert!(!c.gpu_ghash());
    c.health().unwrap();
}

/// The check `auto` runs on a real GPU before using it for host-memory work: both paths open
/// the same sealed chunks; a software adapter loses to one CPU thread by far.
#[test]
fn host_path_check_measures_both_paths() {
    let Some(c) = backend(WgpuOptions::default()) else {
        return;
    };
    let check = ciphershard::cipher::auto::host_path_check(&c).unwrap();
    assert_eq!(check.backend, Backend::Wgpu);
    eprintln!("on {}: {check}", c.adapter());
    assert!(
        check.gpu_gbps.is_finite() && check.gpu_gbps > 0.0,
        "{check:?}"
    );
    assert!(
        check.cpu_gbps.is_finite() && check.cpu_gbps > 0.0,
        "{check:?}"
    );
    if c.adapter().is_cpu() {
        assert!(!check.gpu_wins(), "{check}");
    }
}

#[test]
fn kernel_bench_reports_throughput() {
    let Some(c) = backend(WgpuOptions::default()) else {
        return;
    };
    let report = ciphershard::bench::wgpu::kernel_bench_on(&c, 1 << 20).unwrap();
    eprintln!("{report}");
    assert_eq!(report.variants.len(), KernelVariant::ALL.len());
    assert!(report.variants.iter().all(|v| v.gbps > 0.0));
    for figure in [
        report.kernel_gbps,
        report.round_trip_gbps,
        report.cpu_ghash_gbps,
        report.gpu_ghash_gbps,
        report.open_cpu_ghash_gbps,
        report.open_gpu_ghash_gbps,
    ] {
        assert!(figure > 0.0 && figure.is_finite(), "{report}");
    }
    assert_eq!(report.gpu_ghash_default, c.gpu_ghash());
}

/// Throughput figures for the report (not a timed test: it asserts nothing about speed).
/// `cargo test --release --test wgpu_backend measure -- --ignored --nocapture`;
/// `CIPHERSHARD_BENCH_MIB` sets the size (default 64).
#[test]
#[ignore = "measurement, run by hand"]
fn measure_throughput() {
    let mib: usize = std::env::var("CIPHERSHARD_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let mut kernel = 0.0f64;
    for shared_table in [true, false] {
        let options = WgpuOptions {
            shared_table: Some(shared_table),
            ..WgpuOptions::default()
        };
        let Some(c) = backend(options) else { return };
        let report = ciphershard::bench::wgpu::kernel_bench_on(&c, mib << 20).unwrap();
        println!("{report}");
        kernel = kernel.max(report.kernel_gbps);
    }
    // The CPU backend's CTR over the same size, same run, for the ratio.
    let key = DataKey::from_bytes([1; 32]);
    let rop = CpuCipher::new().prepare(&key).unwrap();
    let src = vec![0x5au8; mib << 20];
    let mut dst = vec![0u8; src.len()];
    let t = std::time::Instant::now();
    let mut passes = 0u32;
    while passes < 3 || t.elapsed().as_secs_f64() < 1.5 {
        rop.ctr_apply(&[7; 12], 0, &src, &mut dst).unwrap();
        passes += 1;
    }
    let cpu = (src.len() as f64 * f64::from(passes)) / t.elapsed().as_secs_f64() / 1e9;
    println!(
        "CPU backend AES-256-CTR: {cpu:.3} GB/s; best wgpu kernel / CPU = {:.3}",
        kernel / cpu
    );
}

#[cfg(target_os = "linux")]
#[test]
fn created_and_dropped_backends_release_their_resources() {
    // On the H200 (driver 580) the test binaries ran out of adapters after some 60 backends
    // had come and gone ("vulkan drivers/libraries could not be loaded"): each one used to make
    // its own Vulkan instance. Open file descriptors must stay flat over many of them.
    let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let Some(first) = backend(WgpuOptions::default()) else {
        return;
    };
    drop(first);
    let before = fds();
    for i in 0..48 {
        let c = backend(WgpuOptions::default())
            .unwrap_or_else(|| panic!("backend {i} could not be created"));
        let key = DataKey::from_bytes([i as u8; 32]);
        let mut out = vec![0u8; 4096];
        c.prepare(&key)
            .unwrap()
            .ctr_apply(&[1; 12], 0, &[0u8; 4096], &mut out)
            .unwrap();
    }
    let after = fds();
    assert!(
        after <= before + 8,
        "48 backends created and dropped left {} more open file descriptors",
        after - before
    );
}
