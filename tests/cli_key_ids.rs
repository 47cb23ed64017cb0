//! Key ids through the real binary: `key-id` prints a key's id (never the key), `inspect` says
//! which key ids open a dataset, `verify` takes several keys, `rekey` onto a key already in the
//! keyring keeps every other key and lists none twice.

mod cli_common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use ciphershard::MasterKey;
use ciphershard::format::{self, Keyring};
use cli_common::*;

/// The fixture's key (`cli_common::dataset_with` writes `[7; 32]`).
fn fixture_key() -> MasterKey {
    MasterKey::from_bytes([7; 32])
}

fn key_file(dir: &Path, name: &str, b: u8) -> (PathBuf, MasterKey) {
    let k = MasterKey::from_bytes([b; 32]);
    let p = dir.join(name);
    k.write_new_file(&p).unwrap();
    (p, k)
}

/// `ciphershard verify --backend cpu` with one `--key` per entry of `keys`, run.
fn verify_keys(keys: &[&Path], ds: &Path) -> std::process::Output {
    let mut c = cs();
    c.arg("verify");
    for k in keys {
        c.arg("--key").arg(k);
    }
    run(c.args(["--backend", "cpu"]).arg(ds))
}

/// `ciphershard rekey --key OLD --new-key NEW DS`, run.
fn rekey(old: &Path, new: &Path, ds: &Path) -> std::process::Output {
    run(cs()
        .arg("rekey")
        .arg("--key")
        .arg(old)
        .arg("--new-key")
        .arg(new)
        .arg(ds))
}

fn ring_ids(ds: &Path) -> Vec<String> {
    let p = ds.join("keyring.json");
    Keyring::parse(&p, &std::fs::read(&p).unwrap())
        .unwrap()
        .key_ids()
}

#[test]
fn key_id_prints_ids_and_never_keys() {
    let f = small();
    let id = fixture_key().id();
    let hex = std::fs::read_to_string(&f.key).unwrap();
    let raw = f.tmp.path().join("raw.key");
    std::fs::write(&raw, [9u8; 32]).unwrap();
    let raw_id = MasterKey::from_bytes([9; 32]).id();

    let out = run(cs().arg("key-id").arg(&f.key).arg(&raw));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("{id}  {}\n{raw_id}  {}\n", f.key.display(), raw.display())
    );
    assert!(!stdout(&out).contains(hex.trim()));

    // Standard input and env:VAR, as --key takes them.
    let mut child = cs()
        .args(["key-id", "-", "env:THE_KEY", "--json"])
        .env("THE_KEY", &raw)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(hex.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        v,
        serde_json::json!({ "schema": "ciphershard.key-id/1", "keys": [
            { "source": "-", "key_id": id },
            { "source": "env:THE_KEY", "key_id": raw_id },
        ]})
    );
    assert!(!stdout(&out).contains(hex.trim()));

    // A source that is not a key fails the whole command, naming it; nothing is printed.
    let bad = f.tmp.path().join("bad.key");
    std::fs::write(&bad, "not a key").unwrap();
    let out = run(cs().arg("key-id").arg(&f.key).arg(&bad));
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("bad.key"), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    // A key pasted as a path is refused without being repeated.
    let out = run(cs().args(["key-id", HEX_KEY]));
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(!stderr(&out).contains(HEX_KEY), "{}", stderr(&out));
    // No source at all is a usage error.
    assert_eq!(code(&run(cs().arg("key-id"))), 64);
}

#[test]
fn inspect_says_which_key_ids_open_the_dataset() {
    let f = small();
    let (_, b) = key_file(f.tmp.path(), "b.key", 2);
    format::add_key(&f.ds, &fixture_key(), &b).unwrap();
    let out = run(cs().arg("inspect").arg(&f.ds));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let want = format!("opens with key ids {}, {}", fixture_key().id(), b.id());
    assert!(stdout(&out).contains(&want), "{}", stdout(&out));
    let out = run(cs().args(["inspect", "--json"]).arg(&f.ds));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        v["key_ids"],
        serde_json::json!([fixture_key().id(), b.id()])
    );
}

#[test]
fn verify_opens_with_whichever_key_matches() {
    let f = small();
    let (wrong1, w1) = key_file(f.tmp.path(), "w1.key", 1);
    let (wrong2, w2) = key_file(f.tmp.path(), "w2.key", 2);
    let out = verify_keys(&[&wrong1, &f.key], &f.ds);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("opened with key id {}", fixture_key().id())),
        "{}",
        stdout(&out)
    );
    let out = verify_keys(&[&wrong1, &wrong2], &f.ds);
    let err = stderr(&out);
    assert_eq!(code(&out), 3, "{err}");
    assert!(
        err.contains(&format!(
            "wrong key: none of master keys {}, {} can open this dataset (it is wrapped for: {})",
            w1.id(),
            w2.id(),
            fixture_key().id()
        )),
        "{err}"
    );
    // One key: the message is unchanged.
    let err = stderr(&verify(&wrong1, &f.ds));
    assert!(
        err.contains(&format!("wrong key: master key {} cannot open", w1.id())),
        "{err}"
    );
}

/// Decided: `rekey --key A --new-key B` with B already in the keyring removes A, rewraps B
/// where it is (listed once) and keeps every other key; the output says so and lists the ids
/// that open the dataset now.
#[test]
fn rekey_onto_a_key_already_there_keeps_the_others_and_says_so() {
    let f = small();
    let a = fixture_key();
    let (b_path, b) = key_file(f.tmp.path(), "b.key", 2);
    let (c_path, c) = key_file(f.tmp.path(), "c.key", 3);
    format::add_key(&f.ds, &a, &b).unwrap();
    format::add_key(&f.ds, &a, &c).unwrap();
    assert_eq!(ring_ids(&f.ds), [a.id(), b.id(), c.id()]);

    let out = rekey(&f.key, &b_path, &f.ds);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(ring_ids(&f.ds), [b.id(), c.id()]);
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "key {} removed; key {} already opened it and is listed once",
            a.id(),
            b.id()
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("opens with key ids {}, {}", b.id(), c.id())),
        "{text}"
    );
    assert_eq!(code(&verify(&b_path, &f.ds)), 0);
    assert_eq!(code(&verify(&c_path, &f.ds)), 0);
    assert_eq!(code(&verify(&f.key, &f.ds)), 3);

    // An ordinary rotation onto a new key lists the ids too.
    let (d_path, d) = key_file(f.tmp.path(), "d.key", 4);
    let out = rekey(&c_path, &d_path, &f.ds);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("opens with key ids {}, {}", b.id(), d.id())),
        "{}",
        stdout(&out)
    );
}
