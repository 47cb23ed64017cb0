//! Throughput of the loader vs its plaintext twin (not a timed test: `#[ignore]`, run with
//! `cargo test --release --no-default-features --test loader_perf -- --ignored --nocapture`).
//! Prints one JSON BenchReport per configuration; figures are reported, never asserted.
use ciphershard::pipeline::DecryptMode;
use ciphershard::pipeline::bench::{BenchOptions, generate, run_source};
use ciphershard::pipeline::{FormatSource, Loader, LoaderOptions, RowSource};

#[test]
#[ignore]
fn loader_throughput() {
    let rows: u64 = std::env::var("ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(262_144);
    // KEEP_DATASET=DIR keeps the generated dataset and its key (DIR.key) for
    // scripts/python_baseline.py; otherwise a temporary directory.
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::env::var_os("KEEP_DATASET")
        .map(std::path::PathBuf::from)
        .unwrap_or(tmp.path().join("ds"));
    let key = generate(&dir, rows, 256, 2 << 20).unwrap();
    if std::env::var_os("KEEP_DATASET").is_some() {
        key.write_new_file(&dir.with_extension("key")).unwrap();
    }
    let src = FormatSource::open(&dir, &key, ciphershard::Backend::Cpu).unwrap();
    let threads: Vec<usize> = std::env::var("THREADS")
        .map(|v| v.split(',').map(|t| t.parse().unwrap()).collect())
        .unwrap_or(vec![1, 2]);
    for t in threads {
        for mode in [DecryptMode::ChunkOpen, DecryptMode::RowCtr] {
            let o = BenchOptions {
                threads: t,
                mode,
                epochs: 2,
                ..Default::default()
            };
            let r = run_source(src.clone(), "generated", &o).unwrap();
            println!("{}", serde_json::to_string(&r).unwrap());
            println!(
                "threads {t} {mode:?}: encrypted {:.2} GB/s, twin {:.2} GB/s, ratio {:.2}, read amp {:.3}, first batch {:.1} ms, pool {} MiB",
                r.encrypted.gb_per_s,
                r.plaintext_twin.gb_per_s,
                r.ratio,
                r.encrypted.stats.read_amplification,
                r.encrypted.stats.first_batch_ns as f64 / 1e6,
                r.encrypted.stats.pool_bytes >> 20
            );
        }
    }
    // Time to first batch on a warm page cache, default options.
    let srcd: std::sync::Arc<dyn RowSource> = src;
    let mut l = Loader::new(srcd, &LoaderOptions::default()).unwrap();
    let t = std::time::Instant::now();
    l.next().unwrap().unwrap();
    println!(
        "first batch after build: {:?} (+ build {:.1} ms)",
        t.elapsed(),
        l.stats().first_batch_ns as f64 / 1e6 - t.elapsed().as_secs_f64() * 1e3
    );
}
