//! `decrypt`, the one command that writes plaintext: the export is created 0600, never
//! replaces a file (not even one that appears while it is written), and leaves no partial
//! plaintext behind after an error or a signal.

mod cli_common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ciphershard::Error;
use ciphershard::cipher::cpu::CpuCipher;
use ciphershard::format::{self, Dataset, UnlockedDataset};
use cli_common::*;

fn decrypt(f: &Fixture, shard: &Path, out: &Path) -> Command {
    let mut c = cs();
    c.arg("decrypt")
        .arg("--key")
        .arg(&f.key)
        .args(["--backend", "cpu"])
        .arg(shard)
        .arg("--out")
        .arg(out);
    c
}

/// The fixture's dataset, unlocked for the library's decrypt.
fn unlocked(f: &Fixture) -> UnlockedDataset {
    Dataset::open(&f.ds)
        .unwrap()
        .unlock(
            &ciphershard::MasterKey::from_file(&f.key).unwrap(),
            &CpuCipher::new(),
        )
        .unwrap()
}

/// The library's decrypt of shard 0 into `out`, running `act` at its `at`-th checkpoint (the
/// checkpoints come before each chunk and before publishing).
fn decrypt_acting_at(
    ud: &UnlockedDataset,
    out: &Path,
    at: usize,
    mut act: impl FnMut() -> ciphershard::Result<()>,
) -> ciphershard::Result<()> {
    let mut calls = 0;
    format::decrypt_shard_with(ud, 0, out, &mut || {
        calls += 1;
        if calls == at { act() } else { Ok(()) }
    })
}

fn out_dir(f: &Fixture) -> PathBuf {
    let d = f.tmp.path().join("out");
    std::fs::create_dir(&d).unwrap();
    d
}

#[test]
fn the_export_is_0600_and_holds_the_plaintext() {
    let f = small();
    let dir = out_dir(&f);
    let out = dir.join("plain.safetensors");
    let res = run(&mut decrypt(&f, &f.shard(0), &out));
    assert_eq!(code(&res), 0, "{}", stderr(&res));
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "export mode {mode:o}");
    assert_eq!(names(&dir), ["plain.safetensors"]);
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let x = st.tensor("x").unwrap();
    let rows = x.shape()[0];
    assert_eq!(x.data(), &cli_common::bytes(100 * 16, 1)[..rows * 16]);
}

#[test]
fn an_error_leaves_no_partial_export() {
    let f = small();
    let dir = out_dir(&f);
    let out = dir.join("plain.safetensors");
    // The last chunk fails: everything before it was written to the temporary file.
    flip(&f.shard(0), -1);
    let res = run(&mut decrypt(&f, &f.shard(0), &out));
    assert_eq!(code(&res), 2, "{}", stderr(&res));
    assert!(names(&dir).is_empty(), "left behind: {:?}", names(&dir));
}

/// A file created at the export's name while the export is written (after the early "exists?"
/// check) is neither replaced nor touched, and the temporary file goes away.
#[test]
fn a_file_appearing_at_the_target_meanwhile_is_not_replaced() {
    let f = small();
    let dir = out_dir(&f);
    let out = dir.join("plain.safetensors");
    let ud = unlocked(&f);
    let r = decrypt_acting_at(&ud, &out, 2, || {
        std::fs::write(&out, b"someone else's file").unwrap();
        Ok(())
    });
    let Err(Error::Io { path, source }) = r else {
        panic!("expected a refusal, got {r:?}");
    };
    assert_eq!(path, out);
    assert_eq!(source.kind(), std::io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&out).unwrap(), b"someone else's file");
    assert_eq!(names(&dir), ["plain.safetensors"]);
    // A dangling symbolic link planted there is refused the same way (not followed).
    std::fs::remove_file(&out).unwrap();
    let r = decrypt_acting_at(&ud, &out, 2, || {
        std::os::unix::fs::symlink(dir.join("elsewhere"), &out).unwrap();
        Ok(())
    });
    assert!(
        matches!(r, Err(Error::Io { ref source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists),
        "{r:?}"
    );
    assert_eq!(names(&dir), ["plain.safetensors"]);
    assert!(!dir.join("elsewhere").exists());
}

#[test]
fn a_stop_requested_by_the_checkpoint_removes_the_temporary_file() {
    let f = small();
    let dir = out_dir(&f);
    let out = dir.join("plain.safetensors");
    let ud = unlocked(&f);
    let r = decrypt_acting_at(&ud, &out, 3, || {
        assert_eq!(names(&dir).len(), 1, "the temporary file exists by now");
        Err(Error::Stopped("test".into()))
    });
    assert!(matches!(r, Err(Error::Stopped(_))), "{r:?}");
    assert!(names(&dir).is_empty(), "left behind: {:?}", names(&dir));
}

/// SIGINT or SIGTERM while the plaintext is being written: the partial file is removed and
/// the status is 128 + the signal. The child is stopped (SIGSTOP) as soon as its temporary
/// file appears, signalled, then continued, so the signal lands mid-export every time.
#[test]
fn a_signal_removes_the_partial_export() {
    use rustix::process::Signal;
    // 32 MiB in 64 KiB chunks: hundreds of chunks still to go when the signal lands.
    let f = dataset_with(2 << 20, 64 << 10, 1 << 30, "x", BTreeMap::new());
    for (sig, status, name) in [(Signal::INT, 130, "SIGINT"), (Signal::TERM, 143, "SIGTERM")] {
        let dir = f.tmp.path().join(format!("out-{status}"));
        std::fs::create_dir(&dir).unwrap();
        let child = signal_when(
            decrypt(&f, &f.shard(0), &dir.join("plain.safetensors")),
            sig,
            || {
                let partial = names(&dir);
                assert!(partial.iter().all(|n| n.contains(".tmp-")), "{partial:?}");
                !partial.is_empty()
            },
        );
        let res = child.wait_with_output().unwrap();
        assert_eq!(code(&res), status, "{name}: {}", stderr(&res));
        assert!(stderr(&res).contains(name), "{}", stderr(&res));
        assert!(
            names(&dir).is_empty(),
            "{name}: left behind {:?}",
            names(&dir)
        );
    }
}
