//! Stopping cleanly on SIGINT, SIGTERM and SIGHUP, for commands that leave something behind
//! when killed (`decrypt`'s partial plaintext export). The handler only records the signal
//! (signal-hook's flag, no hand-written `unsafe`); the command checks it between steps, cleans
//! up and returns an error, and the exit status is 128 + the signal (see [`super::exit`]).

#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use ciphershard::error::{Error, Result};
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
