//! Benchmarks and sweeps of the wgpu backend, for `ciphershard bench --backend wgpu`,
//! `scripts/gpu-check.sh` and the tests that report figures: every AES-CTR kernel variant
//! (each checked against the CPU before it is timed), the host round trip, GHASH on the GPU
//! and on one CPU thread, verified `open` with each tag-check placement ([`kernel_bench`]), and
//! the device loader's GPU stages: window upload, window CTR, row gather ([`window_bench`]).
//!
//! The backend's `pub(crate)` primitives do the GPU work (`WgpuOpener::ctr_resident` and
//! `ghash_resident` over data already on the device, `WgpuCipher::with_kernel` for a device
//! per variant); this module times them.

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use zeroize::Zeroize;

use crate::cipher::conformance::SplitMix;
use crate::cipher::cpu::CpuCipher;
use crate::cipher::wgpu::{
    GatherJob, KernelVariant, WgpuBatchEngine, WgpuCipher, WgpuOptions, WindowChunk, backend_err,
};
use crate::cipher::{BLOCK_LEN, ChunkOpener, ChunkParams, Cipher, NONCE_LEN};
use crate::error::Result;
use crate::keys::DataKey;

/// One AES-CTR kernel variant's figure from [`kernel_bench`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct VariantBench {
    /// The variant (as named in the report, e.g. `wg256x1`).
    pub variant: String,
    /// Kernel only, GB/s; counted only after the variant's output matched the CPU backend.
    pub gbps: f64,
}

/// Throughput of the wgpu paths on this machine's adapter, in GB/s (10^9 bytes/s).
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelBench {
    /// The adapter measured.
    pub adapter: String,
    /// Table in workgroup memory (`true`) or read from the storage buffer.
    pub shared_table: bool,
    /// Bytes per pass.
    pub bytes: u64,
    /// Passes timed for the host round trip (after one warm-up pass).
    pub passes: u32,
    /// Every kernel variant, each checked against the CPU before it was timed.
    pub variants: Vec<VariantBench>,
    /// The fastest variant.
    pub best_variant: String,
    /// Kernel only, best variant: data resident on the device, dispatch + wait.
    pub kernel_gbps: f64,
    /// Host to host: upload, dispatch, readback into a host buffer (`ctr_apply`).
    pub round_trip_gbps: f64,
    /// GHASH on one CPU thread (the CPU tag-check placement).
    pub cpu_ghash_gbps: f64,
    /// GHASH on the GPU over data resident on the device: dispatch, wait, partial sums read
    /// back and combined.
    pub gpu_ghash_gbps: f64,
    /// `open` of one chunk of `bytes`, host to host, nothing released before the tag verified,
    /// with the tag check on the CPU (overlapped with the GPU pass).
    pub open_cpu_ghash_gbps: f64,
    /// The same with the tag check on the GPU.
    pub open_gpu_ghash_gbps: f64,
    /// Whether this adapter's default is the GPU tag check.
    pub gpu_ghash_default: bool,
    /// `open` with this adapter's default placement.
    pub open_gbps: f64,
    /// The device loader's GPU stages (window upload, window CTR, row gather).
    pub device_loader: WindowBench,
}

impl std::fmt::Display for KernelBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "wgpu on {} (table in {}, {} MiB per pass):",
            self.adapter,
            if self.shared_table {
                "workgroup memory"
            } else {
                "storage buffer"
            },
            self.bytes >> 20,
        )?;
        for v in &self.variants {
            writeln!(
                f,
                "  kernel {:<26} {:>9.3} GB/s (checked against the CPU)",
                v.variant, v.gbps
            )?;
        }
        writeln!(
            f,
            "  best kernel {} {:.3} GB/s; host round trip {:.3} GB/s",
            self.best_variant, self.kernel_gbps, self.round_trip_gbps
        )?;
        writeln!(
            f,
            "  GHASH: GPU {:.3} GB/s, CPU (one thread) {:.3} GB/s",
            self.gpu_ghash_gbps, self.cpu_ghash_gbps
        )?;
        writeln!(
            f,
            "  verified open: GHASH on GPU {:.3} GB/s, GHASH on CPU {:.3} GB/s (default here: {})",
            self.open_gpu_ghash_gbps,
            self.open_cpu_ghash_gbps,
            if self.gpu_ghash_default { "GPU" } else { "CPU" }
        )?;
        write!(f, "{}", self.device_loader)
    }
}

/// Passes of `f` for about 1.5 s (3 to 100, after a warm-up pass) and the seconds they took.
fn time_passes(f: &mut dyn FnMut() -> Result<()>) -> Result<(u32, f64)> {
    f()?; // warm-up: buffers, pipeline caches
    let (mut passes, t) = (0u32, Instant::now());
    while passes < 3 || (t.elapsed() < Duration::from_millis(1500) && passes < 100) {
        f()?;
        passes += 1;
    }
    Ok((passes, t.elapsed().as_secs_f64()))
}

/// GB/s of `bytes` per pass over the timed passes.
fn gbps(bytes: usize, (passes, secs): (u32, f64)) -> f64 {
    (bytes as f64 * f64::from(passes)) / secs / 1e9
}

/// Measures every kernel variant, GHASH on the GPU and the CPU, and verified `open` with each
/// tag-check placement on the default adapter (CPU adapters included), over `bytes` bytes
/// (rounded up to whole blocks).
pub fn kernel_bench(bytes: usize) -> Result<KernelBench> {
    let cipher = WgpuCipher::new(WgpuOptions::default())?;
    kernel_bench_on(&cipher, bytes)
}

/// [`kernel_bench`] on an existing backend: its table placement and piece size, each variant
/// on a device of its own.
pub fn kernel_bench_on(cipher: &WgpuCipher, bytes: usize) -> Result<KernelBench> {
    let bytes = bytes.max(BLOCK_LEN).div_ceil(BLOCK_LEN) * BLOCK_LEN;
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| backend_err(format!("bench key: {e}")))?;
    let data_key = DataKey::from_bytes(key);
    key.zeroize();
    // The reference, and the CPU tag check `open` uses (the CPU backend's verify: aws-lc GHASH).
    let reference = CpuCipher::new().prepare(&data_key)?;
    let nonce = [7u8; NONCE_LEN];
    let mut src = vec![0u8; bytes];
    getrandom::fill(&mut src).map_err(|e| backend_err(format!("bench data: {e}")))?;
    let mut dst = vec![0u8; bytes];
    let mut want = vec![0u8; bytes];
    // An offset whose counters cross 2^32 inside the pass, as a check of the counter arithmetic.
    let offset = crate::cipher::conformance::offset_for_counter(u32::MAX - 1000);
    reference.ctr_apply(&nonce, offset, &src, &mut want)?;

    // On a GPU one pass over `bytes` takes well under a millisecond, the size of a submit and
    // wait: several dispatches per submission keep that overhead out of the kernel figure.
    let repeat: u64 = if cipher.adapter().is_cpu() { 1 } else { 16 };
    let mut variants = Vec::new();
    for variant in KernelVariant::ALL {
        let c = cipher.with_kernel(variant)?;
        let op = c.prepare_opener(&data_key, cipher.gpu_ghash())?;
        dst.fill(0);
        op.ctr_apply(&nonce, offset, &src, &mut dst)?;
        if dst != want {
            return Err(backend_err(format!(
                "{}: kernel variant {} differs from the CPU backend",
                c.adapter(),
                c.kernel_variant()
            )));
        }
        let t = time_passes(&mut || op.ctr_resident(bytes as u64 * repeat))?;
        c.health()?;
        variants.push(VariantBench {
            variant: c.kernel_variant().to_string(),
            gbps: gbps(bytes * repeat as usize, t),
        });
    }
    let best = variants
        .iter()
        .max_by(|a, b| a.gbps.total_cmp(&b.gbps))
        .cloned()
        .ok_or_else(|| backend_err("no kernel variant"))?;

    let op = cipher.prepare_opener(&data_key, false)?;
    let round_trip = time_passes(&mut || op.ctr_apply(&nonce, 0, &src, &mut dst))?;
    let ghash_bytes = bytes.min(cipher.piece_bytes() as usize);
    let gpu_ghash = time_passes(&mut || op.ghash_resident(ghash_bytes as u64).map(|_| ()))?;
    let mut ct = src.clone();
    let tag = op.seal_in_place(&nonce, b"bench", true, &mut ct)?;
    let chunk = ChunkParams {
        nonce,
        aad: b"bench",
        tag,
        encrypted: true,
    };
    let own_tag = || backend_err("benchmark chunk failed its own tag");
    let cpu_ghash = time_passes(&mut || reference.verify(&chunk, &ct).map_err(|_| own_tag()))?;
    let mut open_with = |op: &dyn ChunkOpener| {
        time_passes(&mut || op.open(&chunk, &ct, &mut dst).map_err(|_| own_tag()))
    };
    let open_cpu = open_with(&op)?;
    let open_gpu = open_with(&cipher.prepare_opener(&data_key, true)?)?;
    cipher.health()?;
    let (open_cpu_ghash_gbps, open_gpu_ghash_gbps) = (gbps(bytes, open_cpu), gbps(bytes, open_gpu));
    let device_loader = window_bench(cipher, bytes)?;
    Ok(KernelBench {
        adapter: cipher.adapter().to_string(),
        shared_table: cipher.shared_table(),
        bytes: bytes as u64,
        passes: round_trip.0,
        kernel_gbps: best.gbps,
        best_variant: best.variant,
        variants,
        round_trip_gbps: gbps(bytes, round_trip),
        cpu_ghash_gbps: gbps(bytes, cpu_ghash),
        gpu_ghash_gbps: gbps(ghash_bytes, gpu_ghash),
        open_cpu_ghash_gbps,
        open_gpu_ghash_gbps,
        gpu_ghash_default: cipher.gpu_ghash(),
        open_gbps: if cipher.gpu_ghash() {
            open_gpu_ghash_gbps
        } else {
            open_cpu_ghash_gbps
        },
        device_loader,
    })
}

/// Throughput of the wgpu device loader's GPU stages ([`window_bench`]), each checked against
/// the CPU before it was timed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WindowBench {
    /// Bytes per pass (a window of 2 MiB chunks).
    pub bytes: u64,
    /// Upload through the mapped ring: host copy + GPU copy into the window, waited.
    pub upload_gbps: f64,
    /// The batch CTR kernel (`aes_ctr_batch.wgsl`) over the resident window, dispatch + wait.
    pub window_ctr_gbps: f64,
    /// The row gather (`gather.wgsl`), 1 KiB rows in random order from the window into one
    /// column buffer, dispatch + wait.
    pub gather_gbps: f64,
}

impl std::fmt::Display for WindowBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "  device loader stages ({} MiB window): upload {:.3} GB/s, window CTR {:.3} GB/s, \
             gather {:.3} GB/s",
            self.bytes >> 20,
            self.upload_gbps,
            self.window_ctr_gbps,
            self.gather_gbps
        )
    }
}

/// Measures the device loader's GPU stages on `cipher`'s adapter over a window of about
/// `bytes` bytes (2 MiB chunks, one key).
pub fn window_bench(cipher: &WgpuCipher, bytes: usize) -> Result<WindowBench> {
    const CHUNK: usize = 2 << 20;
    const ROW: usize = 1024;
    let bytes = bytes.max(CHUNK).next_multiple_of(CHUNK);
    let data_key = DataKey::generate()?;
    let engine = WgpuBatchEngine::new(cipher, &[&data_key])?;
    let cpu = CpuCipher::new().prepare(&data_key)?;
    let mut rng = SplitMix(0x57A6E5);
    let mut plain = vec![0u8; bytes];
    rng.fill(&mut plain);
    let mut staging = vec![0u8; bytes];
    let chunks: Vec<WindowChunk> = (0..bytes / CHUNK)
        .map(|i| {
            let mut nonce = [0u8; NONCE_LEN];
            nonce[..8].copy_from_slice(&(i as u64).to_be_bytes());
            let at = i * CHUNK..(i + 1) * CHUNK;
            cpu.ctr_apply(&nonce, 0, &plain[at.clone()], &mut staging[at])?;
            Ok(WindowChunk {
                offset: (i * CHUNK) as u64,
                len: CHUNK as u64,
                nonce,
                key: 0,
            })
        })
        .collect::<Result<_>>()?;
    let window = engine.create_buffer("bench_window", bytes as u64)?;
    let mut ring = engine.upload_ring(2, bytes as u64)?;
    let s = engine.upload_decrypt_ring(&mut ring, 1, &window, &staging, &chunks)?;
    engine.wait(s)?;
    if engine.read_buffer(&window, bytes as u64)? != plain {
        return Err(backend_err(format!(
            "{}: the window CTR kernel disagrees with the CPU",
            cipher.adapter()
        )));
    }
    let upload = time_passes(&mut || {
        let s = engine.upload_decrypt_ring(&mut ring, 1, &window, &staging, &[])?;
        engine.wait(s)
    })?;
    let ctr = time_passes(&mut || {
        let s = engine.decrypt_resident(&window, &chunks)?;
        engine.wait(s)
    })?;
    // The timed passes left the window in either state: upload and decrypt it once more.
    engine.upload_decrypt(&window, &staging, &chunks)?;
    let rows = bytes / ROW;
    let mut order: Vec<u64> = (0..rows as u64).collect();
    for i in (1..rows).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let pairs: Vec<(u64, u64)> = order
        .iter()
        .enumerate()
        .map(|(i, &r)| (r * ROW as u64, (i * ROW) as u64))
        .collect();
    let column = engine.create_buffer("bench_column", bytes as u64)?;
    let jobs = [GatherJob {
        src: &window,
        dst: 0,
        pairs: 0..pairs.len(),
        row_bytes: ROW as u64,
    }];
    let s = engine.gather(&jobs, &pairs, &[&column])?;
    engine.wait(s)?;
    let got = engine.read_buffer(&column, bytes as u64)?;
    if !order.iter().enumerate().all(|(i, &r)| {
        got[i * ROW..(i + 1) * ROW] == plain[r as usize * ROW..(r as usize + 1) * ROW]
    }) {
        return Err(backend_err(format!(
            "{}: the row gather disagrees with the host",
            cipher.adapter()
        )));
    }
    let gather = time_passes(&mut || {
        let s = engine.gather(&jobs, &pairs, &[&column])?;
        engine.wait(s)
    })?;
    engine.health()?;
    Ok(WindowBench {
        bytes: bytes as u64,
        upload_gbps: gbps(bytes, upload),
        window_ctr_gbps: gbps(bytes, ctr),
        gather_gbps: gbps(bytes, gather),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Host-side cost of the two upload paths per 16 MiB window (upload only, no CTR): run by
    /// hand, `cargo test --release --lib bench::wgpu::tests::measure_upload -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore = "timing probe, run by hand in release"]
    fn measure_upload_paths() {
        let Ok(c) = WgpuCipher::new(WgpuOptions::default()) else {
            eprintln!("skipping: no wgpu adapter");
            return;
        };
        let key = DataKey::from_bytes([3; 32]);
        let engine = WgpuBatchEngine::new(&c, &[&key]).unwrap();
        let bytes = 16usize << 20;
        let staging = vec![0x5au8; bytes];
        let windows: Vec<_> = (0..2)
            .map(|_| engine.create_buffer("w", bytes as u64).unwrap())
            .collect();
        let mut ring = engine.upload_ring(2, bytes as u64).unwrap();
        let rounds = 24;
        for pass in 0..2 {
            let mut line = format!("pass {pass}:");
            for (name, threads) in [("write_buffer", 0), ("ring x1", 1), ("ring x2", 2)] {
                let (mut host, t) = (0f64, std::time::Instant::now());
                let mut last = None;
                for r in 0..rounds {
                    let h = std::time::Instant::now();
                    let w = &windows[r % 2];
                    last = Some(if threads == 0 {
                        engine.upload_decrypt(w, &staging, &[]).unwrap()
                    } else {
                        engine
                            .upload_decrypt_ring(&mut ring, threads, w, &staging, &[])
                            .unwrap()
                    });
                    host += h.elapsed().as_secs_f64();
                }
                engine.wait(last.unwrap()).unwrap();
                let gbs = |s: f64| (rounds * bytes) as f64 / s / 1e9;
                line += &format!(
                    "  {name} host {:.2} GB/s (with GPU {:.2})",
                    gbs(host),
                    gbs(t.elapsed().as_secs_f64())
                );
            }
            eprintln!("{line}");
        }
    }
}
