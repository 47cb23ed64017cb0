//! Standard output for every command. Lines go through [`line`] (the `outln!` macro), which
//! returns write errors instead of panicking as `println!` does: a closed pipe
//! (`ciphershard inspect --json ds | head`) then ends the command quietly with status 0 (see
//! [`super::exit`]), and a full disk is an ordinary error naming standard output.

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use ciphershard::error::{Error, Result, is_unsafe_char};

/// The name standard output goes by in errors.
pub const STDOUT: &str = "<standard output>";

/// How a command reports: text for people (the default), one JSON object for scripts, or
/// nothing at all. Errors and warnings go to standard error whichever is chosen.
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct OutputArgs {
    /// Print one JSON object on standard output instead of text; its `schema` field names the
    /// report and its version (README, "Output for scripts").
    #[arg(long, conflicts_with = "quiet")]
    pub json: bool,
    /// Print nothing on success and draw no progress bar: the exit status tells.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// Set once by `main` from the command's [`OutputArgs`]: progress bars stay hidden.
static QUIET: AtomicBool = AtomicBool::new(false);

/// Hides progress bars for the rest of the process (`--quiet`).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether `--quiet` was given.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// The report schema's name for `command`: `ciphershard.verify/1`. Bumped when a field changes
/// meaning or goes away (fields may be added within a version).
pub fn schema(command: &str) -> String {
    format!("ciphershard.{command}/1")
}

/// Prints a command's report as chosen: `value` (with its `schema` field set) as JSON, `text`
/// for people, or nothing.
pub fn report(
    how: OutputArgs,
    command: &str,
    mut value: serde_json::Value,
    text: impl FnOnce() -> Result<()>,
) -> Result<()> {
    if how.quiet {
        return Ok(());
    }
    if !how.json {
        return text();
    }
    if let serde_json::Value::Object(fields) = &mut value {
        fields.insert("schema".into(), schema(command).into());
    }
    line(format_args!("{}", json(&value)))
}

/// Writes one line to standard output: `outln!("{x} ...")?`.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::output::line(format_args!($($arg)*))
    };
}

/// Writes `args` and a newline to standard output.
pub fn line(args: std::fmt::Arguments<'_>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .map_err(|e| Error::io(STDOUT, e))
}

/// Writes `data` as it is to standard output.
pub fn bytes(data: &[u8]) -> Result<()> {
    std::io::stdout()
        .lock()
        .write_all(data)
        .map_err(|e| Error::io(STDOUT, e))
}

/// Flushes standard output (its last bytes may still be buffered when a command returns).
pub fn flush() -> Result<()> {
    std::io::stdout().flush().map_err(|e| Error::io(STDOUT, e))
}

/// `true` for a write to standard output that failed because its reader went away.
pub fn is_closed_pipe(e: &Error) -> bool {
    matches!(e, Error::Io { path, source }
        if path.as_path() == Path::new(STDOUT) && source.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Pretty JSON that is also safe in a terminal. serde_json escapes C0 controls in strings but
/// writes DEL, C1 controls and bidi controls raw; those are escaped as `\uXXXX` too (still the
/// same JSON value). Outside strings JSON text is ASCII without DEL, so every such character
/// found is inside a string.
pub fn json(value: &serde_json::Value) -> String {
    let text = serde_json::to_string_pretty(value).expect("a JSON value serializes");
    if !text.chars().any(|c| c >= '\u{7f}' && is_unsafe_char(c)) {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if c >= '\u{7f}' && is_unsafe_char(c) {
            // Every such character is in the Basic Multilingual Plane: one \u escape.
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escapes_del_c1_and_bidi_and_stays_the_same_value() {
        let v = serde_json::json!({ "name": "a\u{1b}[31m\u{7f}\u{9b}\u{202e}b\n", "ok": "é" });
        let text = json(&v);
        assert!(
            !text.contains(|c: char| c >= '\u{7f}' && is_unsafe_char(c)),
            "{text}"
        );
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(text.contains('é'), "{text}");
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, v);
    }
}
