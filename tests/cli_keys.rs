//! Key sources through the real binary: every read is capped, nothing but a regular file is
//! read (no hang on a FIFO, no gigabytes from /dev/zero), and a key pasted where a key file is
//! expected is refused without being repeated, whichever way it arrives.

mod cli_common;

use std::io::Write;
use std::process::{Command, Stdio};

use cli_common::*;

fn verify_with(f: &Fixture, key_arg: &str) -> Command {
    let mut c = cs();
    c.arg("verify")
        .args(["--key", key_arg, "--backend", "cpu"])
        .arg(&f.ds);
    c
}

#[track_caller]
fn refused(out: std::process::Output, says: &str) -> String {
    let err = stderr(&out);
    assert_eq!(code(&out), 1, "{err}");
    assert!(err.contains(says), "stderr does not say '{says}': {err}");
    err
}

#[test]
fn devices_fifos_and_big_files_are_refused_unread() {
    let f = small();
    let err = refused(
        run_bounded(&mut verify_with(&f, "/dev/zero")),
        "not a regular file",
    );
    assert!(err.contains("/dev/zero"), "{err}");
    // A FIFO nobody writes to: opening it for reading would block forever.
    let fifo = f.tmp.path().join("key.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    refused(
        run_bounded(&mut verify_with(&f, fifo.to_str().unwrap())),
        "not a regular file",
    );
    // A regular file over the cap.
    let big = f.tmp.path().join("big.key");
    std::fs::write(&big, vec![b' '; 5000]).unwrap();
    refused(
        run_bounded(&mut verify_with(&f, big.to_str().unwrap())),
        "more than 4096 bytes",
    );
    // A directory.
    refused(
        run_bounded(&mut verify_with(&f, f.tmp.path().to_str().unwrap())),
        "not a regular file",
    );
}

#[test]
fn standard_input_is_capped_and_still_works() {
    let f = small();
    let with_stdin = |input: &[u8]| {
        let mut child = verify_with(&f, "-")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The command may stop reading early (and close the pipe): that is what is tested.
        let _ = child.stdin.take().unwrap().write_all(input);
        child.wait_with_output().unwrap()
    };
    // More than the cap: refused as too long, not as "holds 4096 bytes".
    refused(with_stdin(&[b'a'; 10_000]), "more than 4096 bytes");
    let out = with_stdin(&std::fs::read(&f.key).unwrap());
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

/// The base64 of the 32 bytes of [`HEX_KEY`] (standard alphabet, padded).
const B64_KEY: &str = "ABEiM0RVZneImaq7zN3u/wARIjNEVWZ3iJmqu8zd7v8=";

#[track_caller]
fn refused_unrepeated(out: std::process::Output, secret: &str) {
    let err = stderr(&out);
    let all = format!("{err}{}", stdout(&out));
    assert_ne!(code(&out), 0, "{err}");
    assert!(!all.contains(secret), "the key was repeated: {all}");
    assert!(
        !all.contains(&secret[..16]),
        "part of the key was repeated: {all}"
    );
    assert!(err.contains("looks like a key"), "{err}");
}

#[test]
fn a_key_pasted_as_a_key_file_is_refused_without_repeating_it() {
    let f = small();
    for secret in [
        HEX_KEY,
        &HEX_KEY.to_uppercase(),
        &format!("0x{HEX_KEY}"),
        &format!("{HEX_KEY}\n"),
        B64_KEY,
        B64_KEY.trim_end_matches('='),
        "ABEiM0RVZneImaq7zN3u_wARIjNEVWZ3iJmqu8zd7v8",
    ] {
        // --key KEY
        refused_unrepeated(run(&mut verify_with(&f, secret)), secret.trim());
        // --key env:VAR, VAR holding the key itself
        refused_unrepeated(
            run(verify_with(&f, "env:CS_TEST_KEY").env("CS_TEST_KEY", secret)),
            secret.trim(),
        );
        // --key env:KEY (the key as the variable's name)
        refused_unrepeated(
            run(&mut verify_with(&f, &format!("env:{secret}"))),
            secret.trim(),
        );
        // CIPHERSHARD_KEY_FILE=KEY
        refused_unrepeated(
            run(cs()
                .args(["verify", "--backend", "cpu"])
                .arg(&f.ds)
                .env("CIPHERSHARD_KEY_FILE", secret)),
            secret.trim(),
        );
        // rekey --new-key KEY
        refused_unrepeated(
            run(cs()
                .arg("rekey")
                .arg("--key")
                .arg(&f.key)
                .args(["--new-key", secret])
                .arg(&f.ds)),
            secret.trim(),
        );
    }
}

#[test]
fn a_key_in_a_usage_error_is_redacted() {
    let f = small();
    // A stray positional argument: clap would repeat it in "unexpected argument '...'".
    let out = run(cs()
        .arg("verify")
        .arg("--key")
        .arg(&f.key)
        .arg(&f.ds)
        .arg(HEX_KEY));
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    assert!(!stderr(&out).contains(HEX_KEY), "{}", stderr(&out));
    assert!(stderr(&out).contains("redacted"), "{}", stderr(&out));
}

#[test]
fn a_file_that_really_has_such_a_name_is_read_as_dot_slash_name() {
    let f = small();
    let dir = f.tmp.path();
    std::fs::copy(&f.key, dir.join(HEX_KEY)).unwrap();
    let out = run(verify_with(&f, &format!("./{HEX_KEY}")).current_dir(dir));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}
