//! Exit statuses of the real binary on real (tampered) datasets: 2 for every detected
//! tampering, 3 for a wrong key, 64 for a command line that is not understood, 1 otherwise
//! (the table in `ciphershard --help` and README).

mod cli_common;

use std::path::Path;

use cli_common::*;

#[track_caller]
fn expect(out: std::process::Output, want: i32, says: &str) {
    let err = stderr(&out);
    assert_eq!(code(&out), want, "stderr: {err}");
    assert!(err.contains(says), "stderr does not say '{says}': {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn success_is_0() {
    let f = small();
    expect(verify(&f.key, &f.ds), 0, "");
}

/// Every tampering the README lists, on a copy of one dataset each.
#[test]
fn every_detected_tampering_is_2() {
    let f = small();
    type Damage = fn(&Path);
    let cases: [(&str, Damage, &str); 12] = [
        (
            "chunk",
            |d| flip(&d.join("shard-00000.safetensors"), -3),
            "integrity check failed",
        ),
        (
            "header byte",
            |d| flip(&d.join("shard-00000.safetensors"), 20),
            "shard-00000",
        ),
        (
            "header field",
            |d| {
                replace(
                    &d.join("shard-00000.safetensors"),
                    br#"\"chunk_size\":256"#,
                    br#"\"chunk_size\":320"#,
                )
            },
            "shard-00000",
        ),
        (
            "cipher name",
            |d| {
                replace(
                    &d.join("shard-00001.safetensors"),
                    b"AES-256-GCM",
                    b"AES-246-GCM",
                )
            },
            "shard-00001",
        ),
        (
            "tensor name",
            |d| replace(&d.join("shard-00000.safetensors"), br#""x":{"#, br#""z":{"#),
            "shard-00000",
        ),
        (
            "truncated",
            |d| {
                let p = d.join("shard-00001.safetensors");
                let n = std::fs::metadata(&p).unwrap().len();
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .set_len(n - 1)
                    .unwrap();
            },
            "shard-00001",
        ),
        (
            "appended",
            |d| {
                use std::io::Write;
                let p = d.join("shard-00000.safetensors");
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&p)
                    .unwrap()
                    .write_all(b"x")
                    .unwrap();
            },
            "shard-00000",
        ),
        (
            "deleted shard",
            |d| std::fs::remove_file(d.join("shard-00001.safetensors")).unwrap(),
            "shard-00001",
        ),
        (
            "manifest path",
            |d| replace(&d.join("manifest.json"), b"shard-00001", b"shard-00009"),
            "manifest.json",
        ),
        (
            "manifest rows",
            |d| replace(&d.join("manifest.json"), b"\"rows\":100", b"\"rows\":101"),
            "manifest",
        ),
        (
            "manifest byte",
            |d| flip(&d.join("manifest.json"), 10),
            "manifest.json",
        ),
        (
            "deleted keyring",
            |d| std::fs::remove_file(d.join("keyring.json")).unwrap(),
            "keyring.json",
        ),
    ];
    for (i, (name, damage, says)) in cases.into_iter().enumerate() {
        let d = f.copy(&format!("t{i}"));
        damage(&d);
        let out = verify(&f.key, &d);
        assert_eq!(code(&out), 2, "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{name}: {}", stderr(&out));
    }
}

/// The other commands that read a dataset classify the same way.
#[test]
fn inspect_decrypt_rekey_and_bench_say_2_too() {
    let f = small();
    let d = f.copy("t");
    std::fs::remove_file(d.join("shard-00001.safetensors")).unwrap();
    expect(run(cs().arg("inspect").arg(&d)), 2, "shard-00001");
    let d = f.copy("u");
    flip(&d.join("shard-00000.safetensors"), 20);
    let out = run(cs()
        .arg("decrypt")
        .arg("--key")
        .arg(&f.key)
        .args(["--backend", "cpu"])
        .arg(d.join("shard-00001.safetensors"))
        .arg("--out")
        .arg(f.tmp.path().join("plain.safetensors")));
    expect(out, 2, "shard-00000");
    let new_key = f.tmp.path().join("new.key");
    ciphershard::MasterKey::generate()
        .unwrap()
        .write_new_file(&new_key)
        .unwrap();
    let out = run(cs()
        .arg("rekey")
        .arg("--key")
        .arg(&f.key)
        .arg("--new-key")
        .arg(&new_key)
        .arg(&d));
    expect(out, 2, "shard-00000");
    let d = f.copy("v");
    flip(&d.join("shard-00001.safetensors"), -1);
    let out = run(cs().arg("bench").arg(&d).arg("--key").arg(&f.key).args([
        "--backend",
        "cpu",
        "--epochs",
        "1",
        "--threads",
        "1",
    ]));
    expect(out, 2, "integrity check failed");
}

#[test]
fn wrong_key_is_3() {
    let f = small();
    let other = f.tmp.path().join("other.key");
    ciphershard::MasterKey::generate()
        .unwrap()
        .write_new_file(&other)
        .unwrap();
    expect(verify(&other, &f.ds), 3, "wrong key");
}

#[test]
fn usage_errors_are_64_and_help_is_0() {
    let f = small();
    let key = f.key.to_str().unwrap();
    let ds = f.ds.to_str().unwrap();
    for args in [
        vec!["verify", "--kye", key, ds],
        vec!["verify", "--key", key, "--backend", "foo", ds],
        vec!["verify", "--key", key],
        vec![
            "convert",
            "--key",
            key,
            "x.npy",
            "--out",
            ds,
            "--chunk-size",
            "2XB",
        ],
        vec!["frobnicate"],
        vec![],
    ] {
        let out = run(cs().args(&args));
        assert_eq!(code(&out), 64, "{args:?}: {}", stderr(&out));
    }
    let out = run(cs().arg("--help"));
    assert_eq!(code(&out), 0);
    assert!(stdout(&out).contains("Exit status:"), "{}", stdout(&out));
    assert!(stdout(&out).contains("64"), "{}", stdout(&out));
}

#[test]
fn other_errors_are_1() {
    let f = small();
    // Not a dataset: no manifest beside it.
    let empty = f.tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    expect(verify(&f.key, &empty), 1, "manifest.json");
    expect(verify(&f.key, &f.tmp.path().join("absent")), 1, "absent");
    // A shard that does not exist, named on the command line: a typo, not a deleted shard.
    let out = run(cs()
        .arg("decrypt")
        .arg("--key")
        .arg(&f.key)
        .args(["--backend", "cpu"])
        .arg(f.ds.join("shard-00007.safetensors"))
        .arg("--out")
        .arg(f.tmp.path().join("p.safetensors")));
    expect(out, 1, "shard-00007");
    // A missing key file.
    expect(verify(&f.tmp.path().join("no.key"), &f.ds), 1, "no.key");
    // decrypt refuses to overwrite.
    let out = run(cs()
        .arg("decrypt")
        .arg("--key")
        .arg(&f.key)
        .args(["--backend", "cpu"])
        .arg(f.shard(0))
        .arg("--out")
        .arg(&f.key));
    expect(out, 1, "refusing to overwrite");
    // An explicit backend that is not available here (no CUDA on a CI machine).
    if ciphershard::cipher::select(ciphershard::Backend::Cuda).is_err() {
        let out = run(keyed("verify", &f.key)
            .args(["--backend", "cuda"])
            .arg(&f.ds));
        expect(out, 1, "not available");
    }
}
