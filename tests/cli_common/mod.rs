//! Helpers for the tests that run the real `ciphershard` binary.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ciphershard::MasterKey;
use ciphershard::format::{self, ConvertInput, ConvertOptions, Dtype};

#[path = "../format_common/mod.rs"]
mod format_common;
#[allow(unused_imports)] // each test binary uses its own share of the helpers
pub use format_common::{bytes, npy_bytes};

/// A key of 64 hex digits that tests paste where a key *file* is expected.
pub const HEX_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// The binary under test, with an environment that does not depend on the caller's: no key
/// file from the environment, the CPU backend unless a test asks for another.
pub fn cs() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ciphershard"));
    c.env_remove("CIPHERSHARD_KEY_FILE").stdin(Stdio::null());
    c
}

/// `ciphershard COMMAND --key KEY`.
pub fn keyed(command: &str, key: &Path) -> Command {
    let mut c = cs();
    c.arg(command).arg("--key").arg(key);
    c
}

/// `ciphershard verify --key KEY --backend cpu DATASET`, run.
pub fn verify(key: &Path, ds: &Path) -> Output {
    run(keyed("verify", key).args(["--backend", "cpu"]).arg(ds))
}

/// Runs `cmd` to completion.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("the ciphershard binary runs")
}

/// Runs `cmd` with its standard output and error piped, killing it (and failing) after 60 s:
/// a command that waits on something (a FIFO, a terminal) or ignores an option and runs a
/// benchmark must not hang the suite.
pub fn run_bounded(cmd: &mut Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    finish_bounded(child, cmd)
}

/// Waits for `child` (spawned from `cmd`), killing it (and failing) after 60 s.
pub fn finish_bounded(mut child: Child, cmd: &Command) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("{cmd:?} did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// Starts `cmd`, waits until `ready()` (failing after 60 s or if the child ends first), stops
/// the child, signals it and continues it, so the signal lands mid-work every time.
pub fn signal_when(
    mut cmd: Command,
    sig: rustix::process::Signal,
    ready: impl Fn() -> bool,
) -> Child {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use rustix::process::{Pid, Signal, kill_process};
    let pid = Pid::from_child(&child);
    let start = Instant::now();
    while !ready() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the signal"
        );
        assert!(start.elapsed() < Duration::from_secs(60), "never ready");
        std::thread::sleep(Duration::from_millis(2));
    }
    kill_process(pid, Signal::STOP).unwrap();
    kill_process(pid, sig).unwrap();
    kill_process(pid, Signal::CONT).unwrap();
    child
}

/// The names in `dir`, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The exit status (panics when the process was killed by a signal).
pub fn code(out: &Output) -> i32 {
    out.status
        .code()
        .unwrap_or_else(|| panic!("killed by a signal: {out:?}"))
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A dataset directory and the key file that opens it, in a temporary directory.
pub struct Fixture {
    pub tmp: tempfile::TempDir,
    pub key: PathBuf,
    pub ds: PathBuf,
}

impl Fixture {
    pub fn shard(&self, i: u32) -> PathBuf {
        self.ds.join(format::shard_file_name(i))
    }

    /// A copy of the dataset in a fresh directory, for a test that damages it.
    pub fn copy(&self, name: &str) -> PathBuf {
        let to = self.tmp.path().join(name);
        std::fs::create_dir(&to).unwrap();
        for e in std::fs::read_dir(&self.ds).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
        to
    }
}

/// A dataset of `rows` rows: `x` F32 [rows, 4] (encrypted) and `y` U8 [rows] (plain), with the
/// given chunk and shard sizes, tensor name for `x` and metadata; key file `key` (mode 0600).
pub fn dataset_with(
    rows: u64,
    chunk_size: u64,
    shard_size: u64,
    x_name: &str,
    metadata: BTreeMap<String, String>,
) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let key_path = tmp.path().join("master.key");
    let key = MasterKey::from_bytes([7; 32]);
    key.write_new_file(&key_path).unwrap();
    let ds = tmp.path().join("ds");
    let inputs = [
        ConvertInput::InMemory {
            name: x_name.into(),
            dtype: Dtype::F32,
            shape: vec![rows, 4],
            data: bytes(rows as usize * 16, 1),
        },
        ConvertInput::InMemory {
            name: "y".into(),
            dtype: Dtype::U8,
            shape: vec![rows],
            data: bytes(rows as usize, 2),
        },
    ];
    let opts = ConvertOptions {
        shard_size: Some(shard_size),
        chunk_size,
        plain: vec!["y".into()],
        keys: vec![key],
        metadata,
    };
    format::convert(&inputs, &ds, &opts, &mut |_, _| {}).expect("convert");
    Fixture {
        tmp,
        key: key_path,
        ds,
    }
}

/// A small two-shard dataset (100 rows, 256-byte chunks).
pub fn small() -> Fixture {
    dataset_with(100, 256, 1000, "x", BTreeMap::new())
}

/// Flips bit 0 of byte `at` of `path` (negative: from the end).
pub fn flip(path: &Path, at: i64) {
    let mut b = std::fs::read(path).unwrap();
    let i = if at < 0 {
        b.len() - at.unsigned_abs() as usize
    } else {
        at as usize
    };
    b[i] ^= 1;
    std::fs::write(path, b).unwrap();
}

/// Where a shard's tensor data starts (after the length prefix and the header).
pub fn data_start(path: &Path) -> i64 {
    let b = std::fs::read(path).unwrap();
    8 + i64::from_le_bytes(b[..8].try_into().unwrap())
}

/// Replaces the first `from` in `path` by `to` (same length: offsets stay valid).
pub fn replace(path: &Path, from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let mut b = std::fs::read(path).unwrap();
    let i = b
        .windows(from.len())
        .position(|w| w == from)
        .unwrap_or_else(|| panic!("{} lacks {:?}", path.display(), from));
    b[i..i + from.len()].copy_from_slice(to);
    std::fs::write(path, b).unwrap();
}
