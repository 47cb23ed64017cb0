//! `convert` and interrupted runs (issue 20 items 6 and 8): a signal removes what a
//! conversion or a bench wrote, a directory left by a conversion that was killed anyway is
//! named for what it is, `convert --force` replaces only such leftovers, and an input given
//! twice is refused before anything is written.

mod cli_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use cli_common::*;
use rustix::process::Signal;

/// An `.npy` file of `rows` rows of 64 f32.
fn npy(dir: &Path, name: &str, rows: usize) -> PathBuf {
    let p = dir.join(name);
    let data = bytes(rows * 256, 3);
    std::fs::write(&p, npy_bytes("<f4", &format!("({rows}, 64)"), &data)).unwrap();
    p
}

fn convert(key: &Path, inputs: &[&Path], out: &Path) -> Command {
    let mut c = keyed("convert", key);
    c.args(inputs).arg("--out").arg(out);
    c
}

/// What a conversion killed with SIGKILL leaves: a complete shard and a partial one under its
/// temporary name, no keyring, no manifest; and a file of the user's.
fn interrupted(f: &Fixture, name: &str) -> PathBuf {
    let d = f.copy(name);
    std::fs::remove_file(d.join("manifest.json")).unwrap();
    std::fs::remove_file(d.join("keyring.json")).unwrap();
    let partial = d.join("shard-00001.safetensors.tmp-0123456789abcdef");
    std::fs::rename(d.join("shard-00001.safetensors"), &partial).unwrap();
    let b = std::fs::read(&partial).unwrap();
    std::fs::write(&partial, &b[..b.len() / 2]).unwrap();
    std::fs::write(d.join("notes.txt"), b"mine").unwrap();
    d
}

#[test]
fn an_interrupted_conversion_is_named_and_force_replaces_only_its_leftovers() {
    let f = small();
    let d = interrupted(&f, "interrupted");
    let x = npy(f.tmp.path(), "x.npy", 10);
    for out in [
        verify(&f.key, &d),
        run(cs().arg("inspect").arg(&d)),
        run(&mut convert(&f.key, &[&x], &d)),
    ] {
        let err = stderr(&out);
        assert_eq!(code(&out), 1, "{err}");
        assert!(err.contains("interrupted conversion"), "{err}");
    }
    let out = run(&mut convert(&f.key, &[&x], &d));
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    // --force: the leftovers go, the user's file stays, the new dataset verifies.
    let out = run(convert(&f.key, &[&x], &d).arg("--force"));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        names(&d),
        [
            "keyring.json",
            "manifest.json",
            "notes.txt",
            "shard-00000.safetensors"
        ]
    );
    assert_eq!(std::fs::read(d.join("notes.txt")).unwrap(), b"mine");
    let out = verify(&f.key, &d);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // A complete dataset is never replaced, --force or not.
    let before = names(&f.ds);
    let out = run(convert(&f.key, &[&x], &f.ds).arg("--force"));
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("already holds a dataset"),
        "{}",
        stderr(&out)
    );
    assert_eq!(names(&f.ds), before);
    assert_eq!(code(&verify(&f.key, &f.ds)), 0);
    // A file at a shard's name that is not a shard of ciphershard's is not a leftover: --force
    // refuses and deletes nothing.
    let d = interrupted(&f, "interrupted-foreign");
    std::fs::write(d.join("shard-00003.safetensors"), b"not a shard").unwrap();
    let before = names(&d);
    let out = run(convert(&f.key, &[&x], &d).arg("--force"));
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("shard-00003.safetensors"),
        "{}",
        stderr(&out)
    );
    assert_eq!(names(&d), before);
}

#[test]
fn a_signal_stops_convert_and_removes_what_it_wrote() {
    let f = small();
    // 64 MiB in 1 MiB shards of 64 KiB chunks: many shards still to go when the signal lands.
    let x = npy(f.tmp.path(), "big.npy", 1 << 18);
    for (sig, status, name) in [(Signal::TERM, 143, "SIGTERM"), (Signal::INT, 130, "SIGINT")] {
        let out = f.tmp.path().join(format!("ds-{status}"));
        let mut cmd = convert(&f.key, &[&x], &out);
        cmd.args(["--shard-size", "1MiB", "--chunk-size", "64KiB"]);
        let child = signal_when(cmd, sig, || {
            out.is_dir() && names(&out).iter().any(|n| n.contains(".tmp-"))
        });
        let res = child.wait_with_output().unwrap();
        assert_eq!(code(&res), status, "{name}: {}", stderr(&res));
        assert!(stderr(&res).contains(name), "{}", stderr(&res));
        // The directory was convert's own: it goes too.
        assert!(!out.exists(), "{name}: left behind {:?}", names(&out));
    }
}

#[test]
fn a_signal_stops_bench_and_removes_its_generated_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = cs();
    cmd.env("TMPDIR", tmp.path())
        .args(["bench", "--backend", "cpu", "--epochs", "50"]);
    let child = signal_when(cmd, Signal::TERM, || !names(tmp.path()).is_empty());
    let res = child.wait_with_output().unwrap();
    assert_eq!(code(&res), 143, "{}", stderr(&res));
    assert!(
        names(tmp.path()).is_empty(),
        "left behind {:?}",
        names(tmp.path())
    );
}

#[test]
fn the_same_input_twice_is_refused_before_writing() {
    let f = small();
    let x = npy(f.tmp.path(), "x.npy", 10);
    let dotted = f.tmp.path().join(".").join("x.npy");
    let out = f.tmp.path().join("ds2");
    for inputs in [[x.as_path(), x.as_path()], [x.as_path(), dotted.as_path()]] {
        let res = run(&mut convert(&f.key, &inputs, &out));
        let err = stderr(&res);
        assert_eq!(code(&res), 1, "{err}");
        assert!(
            err.contains("x.npy") && err.contains("given twice"),
            "{err}"
        );
        assert!(!out.exists(), "{} was created", out.display());
    }
}

/// A `--plain` pattern that matches no column is said (a typo leaves the column encrypted).
#[test]
fn a_plain_pattern_that_matches_nothing_is_said() {
    let f = small();
    let x = npy(f.tmp.path(), "x.npy", 10);
    let out = run(convert(&f.key, &[&x], &f.tmp.path().join("p"))
        .args(["--plain", "lable*", "--plain", "x", "--json"]));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("--plain \"lable*\" matched no column"),
        "{err}"
    );
    assert!(!err.contains("--plain \"x\""), "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["unmatched_plain_patterns"], serde_json::json!(["lable*"]));
}
