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
