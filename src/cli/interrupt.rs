//! Stopping cleanly on SIGINT, SIGTERM and SIGHUP, for commands that leave something behind
//! when killed (`decrypt`'s partial plaintext export, `convert`'s shards, the dataset `bench`
//! and `demo` generate). The handler only records the signal (signal-hook's flag, no
//! hand-written `unsafe`); the command checks it between steps, cleans up and returns an
//! error, or ([`remove_on_signal`]) a watcher thread removes a scratch directory and exits.
//! The exit status is 128 + the signal (see [`super::exit`]).

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ciphershard::error::{Error, Result, Untrusted};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// The last signal received since [`catch`] (0: none).
static RECEIVED: AtomicUsize = AtomicUsize::new(0);

/// From now on SIGINT, SIGTERM and SIGHUP only record themselves: the caller must call
/// [`check`] often enough to stop soon after one.
pub fn catch() -> Result<()> {
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        signal_hook::flag::register_usize(sig, &RECEIVED, sig as usize)
            .map_err(|e| Error::Stopped(format!("cannot handle signal {sig}: {e}")))?;
    }
    Ok(())
}

/// The signal received since [`catch`], if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        sig => i32::try_from(sig).ok(),
    }
}

/// An error once a signal has been received, naming `output`, the file the command was
/// writing (which it removes before returning the error).
pub fn check(output: &Path) -> Result<()> {
    stopped(output, "the partial output was removed")
}

/// [`check`] for an output that cannot be removed (standard output): it says that what was
/// written is incomplete.
pub fn check_stream(output: &Path) -> Result<()> {
    stopped(output, "the output is incomplete")
}

fn name(sig: i32) -> &'static str {
    signal_hook::low_level::signal_name(sig).unwrap_or("a signal")
}

fn stopped(output: &Path, outcome: &str) -> Result<()> {
    match received() {
        None => Ok(()),
        Some(sig) => Err(Error::io(
            output,
            std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                format!("stopped by {}; {outcome}", name(sig)),
            ),
        )),
    }
}

/// After [`catch`], for work the command cannot check between steps (a benchmark inside the
/// library): a thread that, once a signal is received, removes `dir` (the scratch directory
/// of ciphertext the work writes, whatever is in it by then) and ends the process with status
/// 128 + the signal.
pub fn remove_on_signal(dir: PathBuf) {
    std::thread::spawn(move || {
        let sig = loop {
            if let Some(sig) = received() {
                break sig;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The work may still be adding files while the directory goes: try again until it is gone.
        for _ in 0..50 {
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => break,
            }
        }
        let _ = writeln!(
            std::io::stderr(),
            "error: stopped by {}; removed {}",
            name(sig),
            Untrusted(dir.display())
        );
        std::process::exit(128 + sig);
    });
}
