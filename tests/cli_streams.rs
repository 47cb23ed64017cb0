//! `-` as an output (issue 20 item 4): `keygen --out -` and `decrypt --out -` write the key or
//! the plaintext to standard output, every message goes to standard error, and neither writes
//! to a terminal; `--key -` refuses a terminal instead of waiting without a prompt. A file
//! really named `-` is still reachable as `./-`.

mod cli_common;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::process::{Command, Output, Stdio};

use ciphershard::MasterKey;
use cli_common::*;

/// A pseudo-terminal: the controlling side (kept open while the child runs) and the terminal
/// side, to give a child as its standard input or output.
fn pty() -> (OwnedFd, File) {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let name = ptsname(&master, Vec::new()).unwrap();
    let term = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(name.to_str().unwrap())
        .unwrap();
    (master, term)
}

/// Runs `cmd` with its standard output on the terminal `term`.
fn to_terminal(cmd: &mut Command, term: File) -> Output {
    let child = cmd
        .stdout(Stdio::from(term))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    finish_bounded(child, cmd)
}

#[test]
fn keygen_out_dash_writes_the_key_to_standard_output_only() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(cs().current_dir(dir.path()).args(["keygen", "--out", "-"]));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(
        text.len(),
        65,
        "stdout holds the key and nothing else: {text:?}"
    );
    let key = MasterKey::parse(text.as_bytes()).unwrap();
    assert!(stderr(&out).contains(&key.id()), "{}", stderr(&out));
    assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
    // A file really named `-`.
    let out = run(cs()
        .current_dir(dir.path())
        .args(["keygen", "--out", "./-"]));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(names(dir.path()), ["-"]);
    assert!(stdout(&out).contains("key id"), "{}", stdout(&out));
    // Never onto a terminal.
    let (_master, term) = pty();
    let mut cmd = cs();
    cmd.current_dir(dir.path()).args(["keygen", "--out", "-"]);
    let out = to_terminal(&mut cmd, term);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("terminal"), "{}", stderr(&out));
    assert_eq!(names(dir.path()), ["-"]);
}

#[test]
fn decrypt_out_dash_streams_the_plaintext_and_refuses_a_terminal() {
    let f = small();
    let decrypt = |out: &str| {
        let mut c = cs();
        c.current_dir(f.tmp.path())
            .arg("decrypt")
            .arg("--key")
            .arg(&f.key)
            .args(["--backend", "cpu"])
            .arg(f.shard(0))
            .args(["--out", out]);
        c
    };
    let file = run(&mut decrypt("plain.safetensors"));
    assert_eq!(code(&file), 0, "{}", stderr(&file));
    let expected = std::fs::read(f.tmp.path().join("plain.safetensors")).unwrap();
    let piped = run(&mut decrypt("-"));
    assert_eq!(code(&piped), 0, "{}", stderr(&piped));
    assert!(
        piped.stdout == expected,
        "standard output is not the export"
    );
    assert!(
        stderr(&piped).contains("NOT encrypted"),
        "{}",
        stderr(&piped)
    );
    assert!(
        !f.tmp.path().join("-").exists(),
        "a file named '-' was created"
    );
    // `./-` is a file.
    let dash = run(&mut decrypt("./-"));
    assert_eq!(code(&dash), 0, "{}", stderr(&dash));
    assert_eq!(std::fs::read(f.tmp.path().join("-")).unwrap(), expected);
    std::fs::remove_file(f.tmp.path().join("-")).unwrap();
    // Never onto a terminal.
    let (_master, term) = pty();
    let out = to_terminal(&mut decrypt("-"), term);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("terminal"), "{}", stderr(&out));
    assert!(!f.tmp.path().join("-").exists());
}

#[test]
fn key_from_a_terminal_is_refused_at_once() {
    let f = small();
    let (_master, term) = pty();
    let out = run_bounded(
        cs().args(["verify", "--key", "-", "--backend", "cpu"])
            .arg(&f.ds)
            .stdin(Stdio::from(term)),
    );
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("standard input is a terminal"),
        "{}",
        stderr(&out)
    );
}
