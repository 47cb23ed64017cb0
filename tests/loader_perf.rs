//! Throughput of the loader vs its plaintext twin (not a timed test: `#[ignore]`, run with
//! `cargo test --release --no-default-features --test loader_perf -- --ignored --nocapture`).
//! Prints one JSON BenchReport per configuration; figures are reported, never asserted.
use ciphershard::bench::loader::{BenchOptions, generate, run_source};
use ciphershard::pipeline::DecryptMode;
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
    let mut l = Loader::new(srcd.clone(), &LoaderOptions::default()).unwrap();
    let t = std::time::Instant::now();
    l.next().unwrap().unwrap();
    println!(
        "first batch after build: {:?} (+ build {:.1} ms)",
        t.elapsed(),
        l.stats().first_batch_ns as f64 / 1e6 - t.elapsed().as_secs_f64() * 1e3
    );
    drop(l);

    // Anonymous memory over EPOCHS epochs (default 10) with default options (prefetch 4,
    // batch 256, W = 8): the bound is prefetch × batch bytes + 64 MiB.
    let epochs: u64 = std::env::var("EPOCHS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let base = rss_anon();
    let o = LoaderOptions {
        epochs,
        ..Default::default()
    };
    let batch_bytes = o.batch_size as u64 * (256 * 4 + 8);
    let mut l = Loader::new(srcd.clone(), &o).unwrap();
    let mut samples = Vec::new();
    let mut last_epoch = 0;
    for b in l.by_ref() {
        let b = b.unwrap();
        if b.epoch() != last_epoch {
            samples.push((rss_anon() - base) >> 20);
            last_epoch = b.epoch();
        }
    }
    println!(
        "anon memory above baseline per epoch (MiB): {samples:?}; bound prefetch x batch + 64 MiB = {} MiB; pool {} MiB",
        (4 * batch_bytes + (64 << 20)) >> 20,
        l.stats().pool_bytes >> 20
    );
}

fn rss_anon() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}
