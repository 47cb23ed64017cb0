//! `--json` and `--quiet` on every command that reports something: one JSON object naming its
//! schema for scripts, or nothing at all; the exit status says the same in every style.

mod cli_common;

use std::process::{Command, Output};

use cli_common::*;
use serde_json::Value;

/// Runs `cmd` with `--json`: exit 0 and exactly one JSON object of schema `ciphershard.NAME/1`.
fn json_report(cmd: &mut Command, name: &str) -> Value {
    let out = run(cmd.arg("--json"));
    assert_eq!(code(&out), 0, "{name}: {}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("{name}: not one JSON value ({e}):\n{}", stdout(&out)));
    assert_eq!(v["schema"], format!("ciphershard.{name}/1"), "{v}");
    v
}

/// Runs `cmd` with `--quiet`: exit 0, nothing on standard output or standard error.
fn quiet(cmd: &mut Command, name: &str) -> Output {
    let out = run(cmd.arg("--quiet"));
    assert_eq!(code(&out), 0, "{name}: {}", stderr(&out));
    assert!(
        stdout(&out).is_empty(),
        "{name} --quiet printed: {}",
        stdout(&out)
    );
    assert!(
        stderr(&out).is_empty(),
        "{name} --quiet printed: {}",
        stderr(&out)
    );
    out
}

#[test]
fn every_report_is_one_json_object_with_its_schema() {
    let f = small();
    let dir = f.tmp.path();

    let keygen = json_report(
        cs().arg("keygen").arg("--out").arg(dir.join("new.key")),
        "keygen",
    );
    assert_eq!(
        keygen["key_id"].as_str().map(str::len),
        Some(16),
        "{keygen}"
    );
    assert!(
        !keygen
            .to_string()
            .contains(&std::fs::read_to_string(dir.join("new.key")).unwrap())
    );

    let npy = dir.join("z.npy");
    std::fs::write(&npy, npy_bytes("<f4", "(10, 3)", &bytes(120, 3))).unwrap();
    let convert = json_report(
        keyed("convert", &f.key)
            .arg(&npy)
            .arg("--out")
            .arg(dir.join("ds2")),
        "convert",
    );
    assert_eq!(
        (convert["rows"].as_u64(), convert["columns"].as_u64()),
        (Some(10), Some(1))
    );
    assert_eq!(convert["encrypted_columns"], serde_json::json!(["z"]));

    let inspect = json_report(cs().arg("inspect").arg(&f.ds), "inspect");
    assert_eq!(inspect["rows"], 100);
    assert_eq!(inspect["columns"][0]["dtype"], "F32");

    let verify = json_report(
        keyed("verify", &f.key)
            .args(["--backend", "cpu"])
            .arg(&f.ds),
        "verify",
    );
    assert_eq!(verify["ok"], true);
    assert_eq!(verify["shards"], inspect["shard_count"]);

    let backends = json_report(cs().arg("backends"), "backends");
    let cpu = backends["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "cpu");
    assert_eq!(
        cpu.map(|b| &b["available"]),
        Some(&Value::Bool(true)),
        "{backends}"
    );

    let out = dir.join("plain.safetensors");
    let decrypt = json_report(
        keyed("decrypt", &f.key)
            .args(["--backend", "cpu"])
            .arg(f.shard(0))
            .arg("--out")
            .arg(&out),
        "decrypt",
    );
    assert_eq!(decrypt["bytes"], std::fs::metadata(&out).unwrap().len());

    let rekey = json_report(
        keyed("rekey", &f.key)
            .arg("--new-key")
            .arg(dir.join("new.key"))
            .arg(&f.ds),
        "rekey",
    );
    assert_eq!(rekey["new_key_id"], keygen["key_id"]);
}

#[test]
fn quiet_prints_nothing_and_keeps_the_exit_status() {
    let f = small();
    let dir = f.tmp.path();
    quiet(
        cs().arg("keygen").arg("--out").arg(dir.join("q.key")),
        "keygen",
    );
    quiet(cs().arg("inspect").arg(&f.ds), "inspect");
    quiet(
        keyed("verify", &f.key)
            .args(["--backend", "cpu"])
            .arg(&f.ds),
        "verify",
    );
    quiet(cs().arg("backends"), "backends");
    // A failure still says why on standard error, with its own status.
    flip(&f.shard(0), -3);
    let out = run(keyed("verify", &f.key)
        .args(["--backend", "cpu", "--quiet"])
        .arg(&f.ds));
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stdout(&out).is_empty() && !stderr(&out).is_empty());
    // Both at once is a contradiction: a usage error.
    let out = run(cs().args(["backends", "--json", "--quiet"]));
    assert_eq!(code(&out), 64, "{}", stderr(&out));
}

#[test]
fn json_never_shares_standard_output_with_a_key_or_plaintext() {
    let f = small();
    let keygen = run(cs()
        .args(["keygen", "--out", "-", "--json"])
        .stdout(std::process::Stdio::piped()));
    let decrypt = run(keyed("decrypt", &f.key)
        .arg(f.shard(0))
        .args(["--out", "-", "--json", "--backend", "cpu"])
        .stdout(std::process::Stdio::piped()));
    for (name, out) in [("keygen", keygen), ("decrypt", decrypt)] {
        assert_eq!(code(&out), 64, "{name}: {}", stderr(&out));
        assert!(stdout(&out).is_empty(), "{name} wrote to standard output");
        assert!(
            stderr(&out).contains("standard output carries the"),
            "{name}: {}",
            stderr(&out)
        );
    }
}
