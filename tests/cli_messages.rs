//! Error and status messages of the real binary read as what happened: tampering says so, a
//! path that is no dataset says what a dataset is, `backends` does not contradict itself.

mod cli_common;

use cli_common::*;

#[track_caller]
fn tampered(out: std::process::Output) -> String {
    let err = stderr(&out);
    assert_eq!(code(&out), 2, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Not "... shard belongs to another dataset was modified" nor "manifest says 10001 was
    // modified": the clause says what disagrees, then what that means.
    assert!(!err.trim_end().ends_with("was modified"), "{err}");
    err
}

#[test]
fn a_shard_of_another_dataset_says_so() {
    let f = small();
    let other = small();
    let d = f.copy("mixed");
    std::fs::copy(other.shard(0), d.join("shard-00000.safetensors")).unwrap();
    let err = tampered(verify(&f.key, &d));
    assert!(
        err.contains("shard-00000.safetensors: integrity check failed: manifest/shard mismatch: the shard belongs to another dataset (a dataset file was modified, replaced or taken from another dataset)"),
        "{err}"
    );
}

#[test]
fn a_manifest_size_that_differs_names_both_sizes() {
    let f = small();
    let d = f.copy("size");
    let n = std::fs::metadata(d.join("shard-00000.safetensors"))
        .unwrap()
        .len();
    replace(
        &d.join("manifest.json"),
        format!("\"bytes\":{n}").as_bytes(),
        format!("\"bytes\":{}", n + 1).as_bytes(),
    );
    let err = tampered(verify(&f.key, &d));
    assert!(
        err.contains(&format!(
            "file is {n} bytes, manifest says {} (a dataset file was modified",
            n + 1
        )),
        "{err}"
    );
}

/// The manifest vouches for each shard header by its digest: an edited cipher name is a
/// header that was modified, not a cipher this build does not support.
#[test]
fn an_edited_cipher_name_is_tampering_not_an_unsupported_cipher() {
    let f = small();
    let d = f.copy("cipher");
    replace(
        &d.join("shard-00001.safetensors"),
        b"AES-256-GCM",
        b"AES-246-GCM",
    );
    let err = tampered(verify(&f.key, &d));
    assert!(
        err.contains("shard-00001.safetensors: integrity check failed: the shard header was modified: its descriptor does not match the header digest the manifest records for this shard"),
        "{err}"
    );
    assert!(!err.contains("unsupported"), "{err}");
    // An edited layout field (the descriptor no longer parses) reads the same way.
    let d = f.copy("layout");
    replace(
        &d.join("shard-00000.safetensors"),
        br#"\"chunk_size\":256"#,
        br#"\"chunk_size\":320"#,
    );
    let err = tampered(verify(&f.key, &d));
    assert!(err.contains("the shard header was modified"), "{err}");
    // A lone shard (no manifest vouches for it) still reports what it reads.
    let lone = f.tmp.path().join("lone");
    std::fs::create_dir(&lone).unwrap();
    let copy = lone.join("shard-00001.safetensors");
    std::fs::copy(f.tmp.path().join("cipher/shard-00001.safetensors"), &copy).unwrap();
    let out = run(cs().arg("inspect").arg(&copy));
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("unsupported cipher 'AES-246-GCM'"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_file_that_is_no_dataset_is_named_and_a_dataset_explained() {
    let f = small();
    let dir = f.tmp.path().join("arrays");
    std::fs::create_dir(&dir).unwrap();
    let npy = dir.join("data.npy");
    std::fs::write(&npy, b"\x93NUMPY\x01\x00 not a dataset").unwrap();
    let inspect = |target: &std::path::Path| run(cs().arg("inspect").arg(target));
    for (target, out) in [
        (&npy, verify(&f.key, &npy)),
        (&dir, verify(&f.key, &dir)),
        (&npy, inspect(&npy)),
        (&dir, inspect(&dir)),
    ] {
        let err = stderr(&out);
        assert_eq!(code(&out), 1, "{err}");
        assert!(
            err.starts_with(&format!(
                "error: {}: not a ciphershard dataset:",
                target.display()
            )),
            "{err}"
        );
        assert!(
            err.contains("a dataset is a directory written by `ciphershard convert`"),
            "{err}"
        );
        assert!(!err.contains("No such file"), "{err}");
    }
}

/// What `auto` passed over is said as such: never "backend 'wgpu' is not available" under a
/// backend listed as available a line above.
#[test]
fn backends_says_why_auto_passed_a_backend_over() {
    let out = run(cs().arg("backends"));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    let after_auto: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("auto"))
        .skip(1)
        .take_while(|l| l.starts_with(' '))
        .collect();
    for l in &after_auto {
        assert!(l.trim_start().starts_with("passed over "), "{text}");
        assert!(!l.contains("is not available"), "{text}");
    }
}

/// A wrapped data key edited in keyring.json: the key's own id is listed, so the key is right
/// and the wrap was modified: tampering (2), not "wrong key" (3) naming the key it lists.
#[test]
fn an_edited_key_wrap_is_tampering_not_a_wrong_key() {
    let f = small();
    let keyring = f.ds.join("keyring.json");
    let text = std::fs::read_to_string(&keyring).unwrap();
    let at = text.find("\"data_keys\":[\"").expect("a wrapped key") + 14;
    let mut bytes = text.into_bytes();
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    std::fs::write(&keyring, bytes).unwrap();
    let err = tampered(verify(&f.key, &f.ds));
    assert!(err.contains("keyring.json"), "{err}");
    assert!(err.contains("fails its AES-KW integrity check"), "{err}");
    assert!(!err.contains("wrong key"), "{err}");
}

/// A dataset id edited in manifest.json: the keyring and the manifest disagree, and the
/// message names both ids instead of blaming the keyring.
#[test]
fn keyring_and_manifest_that_disagree_are_both_named() {
    let f = small();
    let manifest = f.ds.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let at = text.find("\"dataset_id\":\"").expect("a dataset id") + 14;
    let mut bytes = text.into_bytes();
    bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
    std::fs::write(&manifest, bytes).unwrap();
    let err = tampered(verify(&f.key, &f.ds));
    assert!(err.contains("keyring.json/manifest.json mismatch"), "{err}");
    assert!(!err.contains("keyring belongs to another dataset"), "{err}");
}
