//! CUDA backend check for a GPU machine: runs the conformance suite on the CUDA backend (once
//! per AES-CTR kernel variant), then measures every variant, GHASH, pinned H2D and the
//! end-to-end batch path (from pageable memory, and pread from a file into pinned staging), and
//! prints a markdown table. A variant that fails conformance or its output check is FAIL and
//! never selected.
//!
//! `cargo build --release --features cuda --example cuda_bench`
//! Usage: `cuda_bench [KERNEL_GIB] [E2E_GIB]` (defaults 4 and 2; the file path's folder from
//! `CIPHERSHARD_BENCH_DIR`, default /dev/shm, falling back to the temp folder), or
//! `cuda_bench --emit-ptx sm_90 FILE` to prebuild the kernels for `CIPHERSHARD_CUDA_PTX`.

use ciphershard::bench::cuda::{KernelBenchOptions, kernel_bench_with};
use ciphershard::cipher::cuda;
use ciphershard::cipher::{Cipher, conformance};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--emit-ptx") {
        // Needs NVRTC only: prebuild PTX for a machine without it (CIPHERSHARD_CUDA_PTX).
        let (Some(arch), Some(out)) = (args.get(2), args.get(3)) else {
            eprintln!(
                "usage: cuda_bench --emit-ptx ARCH FILE   (e.g. sm_90 .gpu/kernels_sm90.ptx)"
            );
            std::process::exit(2);
        };
        match cuda::compile_kernels(Some(arch)) {
            Ok(ptx) => {
                if let Err(e) = std::fs::write(out, ptx.to_src()) {
                    eprintln!("cuda_bench: {out}: {e}");
                    std::process::exit(1);
                }
                println!("wrote {out}");
                return;
            }
            Err(e) => {
                eprintln!("cuda_bench: {e}");
                std::process::exit(1);
            }
        }
    }
    let gib = |i: usize, d: f64| args.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(d);
    let (kernel_gib, e2e_gib) = (gib(1, 4.0), gib(2, 2.0));
    let cipher = match cuda::probe() {
        Ok(_) => match cuda::CudaCipher::new(0) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("cuda_bench: {e}");
                std::process::exit(2);
            }
        },
        Err(why) => {
            eprintln!("cuda_bench: CUDA not available: {why}");
            std::process::exit(2);
        }
    };
    println!("device: {}", cipher.describe());
    let t = std::time::Instant::now();
    // A device failure fails the call that met it (no CPU fallback), so the suite fails too.
    let conf = conformance::run(cipher.as_ref(), 60);
    match &conf {
        Ok(()) => println!(
            "conformance ({}): PASS ({:.1} s)",
            cipher.ctr_variant().name(),
            t.elapsed().as_secs_f64()
        ),
        Err(e) => println!("conformance ({}): FAIL: {e}", cipher.ctr_variant().name()),
    }
    // Every other CTR kernel variant must pass the suite too before its figures count.
    let default = cipher.ctr_variant();
    let mut opts = KernelBenchOptions {
        // Where the page-cache-hot benchmark file (ciphertext only) goes; default /dev/shm.
        file_dir: std::env::var_os("CIPHERSHARD_BENCH_DIR").map(Into::into),
        ..Default::default()
    };
    for (v, info) in cipher.ctr_variants() {
        let verdict = match info {
            Err(e) => Err(e),
            Ok(i) => {
                println!(
                    "variant {}: {} registers, {} bytes local memory",
                    v.name(),
                    i.registers,
                    i.local_bytes
                );
                if v == default {
                    conf.clone()
                } else {
                    let t = std::time::Instant::now();
                    let r = cipher
                        .set_ctr_variant(v)
                        .map_err(|e| e.to_string())
                        .and_then(|()| conformance::run(cipher.as_ref(), 20));
                    println!(
                        "conformance ({}): {} ({:.1} s)",
                        v.name(),
                        r.as_ref()
                            .map_or_else(|e| format!("FAIL: {e}"), |()| "PASS".into()),
                        t.elapsed().as_secs_f64()
                    );
                    r
                }
            }
        };
        if let Err(e) = verdict {
            opts.failed.push((v, format!("conformance: {e}")));
        }
    }
    if let Err(e) = cipher.set_ctr_variant(default) {
        eprintln!("cuda_bench: {e}");
        std::process::exit(1);
    }
    let bytes = |g: f64| (g * (1u64 << 30) as f64) as usize;
    match kernel_bench_with(&cipher, bytes(kernel_gib), bytes(e2e_gib), &opts) {
        Ok(r) => {
            println!();
            print!("{r}");
        }
        Err(e) => {
            println!("benchmark: FAIL: {e}");
            std::process::exit(1);
        }
    }
    if conf.is_err() {
        std::process::exit(1);
    }
}
