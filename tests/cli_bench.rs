//! `bench` (issue 20 item 3): an explicit backend that is not available is an error, never a
//! benchmark of the CPU, and an option that does not apply to what is benchmarked is refused
//! as a usage error naming it, not ignored.

mod cli_common;

use cli_common::*;

#[test]
fn options_that_do_not_apply_are_refused() {
    let f = small();
    let key = f.key.to_str().unwrap();
    let ds = f.ds.to_str().unwrap();
    for (args, names) in [
        (vec!["--cipher", "--threads", "2"], "--threads"),
        (vec!["--cipher", "--mode", "row-ctr"], "--mode"),
        (
            vec!["--cipher", "--no-kernel-figures"],
            "--no-kernel-figures",
        ),
        (vec!["--cipher", "--host-batches"], "--host-batches"),
        (vec!["--cipher", "--epochs", "1"], "--epochs"),
        (vec!["--cipher", "--batch-size", "8"], "--batch-size"),
        (vec!["--cipher", "--window-blocks", "2"], "--window-blocks"),
        (vec!["--cipher", "--key", key], "--key"),
        (vec![ds, "--cipher", "--key", key], "DATASET"),
        (vec!["--backend", "cpu", "--host-batches"], "--host-batches"),
        (
            vec!["--backend", "cpu", "--no-kernel-figures"],
            "--no-kernel-figures",
        ),
        (vec!["--key", key, "--backend", "cpu"], "--key"),
    ] {
        let out = run_bounded(cs().arg("bench").args(&args));
        let err = stderr(&out);
        assert_eq!(code(&out), 64, "{args:?}: {err}");
        assert!(
            err.contains(names),
            "{args:?}: does not name {names}: {err}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: benchmarked anyway");
    }
}

#[test]
fn an_unavailable_gpu_backend_is_an_error_with_cipher_too() {
    if ciphershard::cipher::cuda::probe().is_ok() {
        eprintln!("CUDA is available here: nothing to refuse");
        return;
    }
    let out = run_bounded(cs().args(["bench", "--cipher", "--backend", "cuda"]));
    let err = stderr(&out);
    assert_eq!(code(&out), 1, "{err}");
    assert!(err.contains("'cuda' is not available"), "{err}");
    assert!(
        out.stdout.is_empty(),
        "benchmarked something: {}",
        stdout(&out)
    );
}

/// `bench --cold` (issue 15): the shard files are evicted before each run and the raw
/// sequential read of the same files is reported beside the loader, in the JSON too; a URL
/// dataset is refused (it has no page cache to evict), as is the device loader.
#[test]
fn cold_bench_reports_the_raw_read_of_the_same_files() {
    let f = small();
    let shard_bytes: u64 = std::fs::read_dir(&f.ds)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("shard-")
        })
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(
        shard_bytes > 0,
        "no shard files found in {}",
        f.ds.display()
    );
    let out = run_bounded(keyed("bench", &f.key).arg(&f.ds).args([
        "--backend",
        "cpu",
        "--cold",
        "--json",
        "--batch-size",
        "16",
    ]));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cold = &v["cold"];
    assert_eq!(cold["raw_reads"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(cold["raw_read"]["bytes"].as_u64(), Some(shard_bytes), "{v}");
    assert!(cold["raw_read"]["gb_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(cold["encrypted_vs_raw"].as_f64().unwrap() > 0.0, "{v}");
    assert!(
        cold["eviction"].as_str().unwrap().contains("not checked"),
        "{v}"
    );
    // One epoch by default: only the first is cold.
    assert_eq!(
        v["encrypted"]["batches"].as_u64(),
        Some(100u64.div_ceil(16)),
        "{v}"
    );
    // Without --cold, no cold figures.
    let out = run_bounded(keyed("bench", &f.key).arg(&f.ds).args([
        "--backend",
        "cpu",
        "--json",
        "--epochs",
        "1",
    ]));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["cold"].is_null(), "{v}");
    // The text report names the raw read.
    let out = run_bounded(keyed("bench", &f.key).arg(&f.ds).args([
        "--backend",
        "cpu",
        "--cold",
        "--readahead-windows",
        "0",
    ]));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).contains("cold: raw sequential read"),
        "{}",
        stdout(&out)
    );
    for (args, names) in [
        (
            vec!["s3://bucket/ds/", "--cold", "--backend", "cpu"],
            "local datasets only",
        ),
        (vec!["--cold", "--backend", "cuda"], "--host-batches"),
        (vec!["--cipher", "--cold"], "--cold"),
        (vec!["--cipher", "--io-threads", "2"], "--io-threads"),
    ] {
        let out = run_bounded(cs().arg("bench").args(&args));
        let err = stderr(&out);
        assert_eq!(code(&out), 64, "{args:?}: {err}");
        assert!(
            err.contains(names),
            "{args:?}: does not name {names}: {err}"
        );
    }
}
