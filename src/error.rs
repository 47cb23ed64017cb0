//! The crate's one error type.
//!
//! Every variant that concerns a file carries its path, so the message a user sees names the
//! file and the cause. Key material never appears in an error.
//!
//! Messages carry text read from files ciphershard did not write or has not yet authenticated
//! (tensor names, metadata, dtype strings, file names): every string field is displayed through
//! [`Untrusted`], so a crafted name cannot move the cursor, recolour the terminal or reorder
//! the line with bidi controls in a terminal or a log viewer.

#![forbid(unsafe_code)]

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::path::PathBuf;

/// `true` for characters that must not reach a terminal raw: C0 and C1 controls and DEL
/// (escape sequences, carriage returns, backspaces), Unicode bidi controls (which reorder what
/// a reader sees) and the Unicode line and paragraph separators.
pub fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{200E}'
                | '\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2066}'..='\u{2069}'
                | '\u{2028}'
                | '\u{2029}'
        )
}

/// Displays untrusted text with every [`is_unsafe_char`] written as `\u{..}`; other text,
/// backslashes included, is unchanged (so escaping twice changes nothing). Honours width and
/// alignment (`{:<24}`), measured on the escaped text.
#[derive(Debug, Clone, Copy)]
pub struct Untrusted<T>(pub T);

/// Writes into `W` with every [`is_unsafe_char`] escaped.
struct Escaping<'a, W: fmt::Write + ?Sized>(&'a mut W);

impl<W: fmt::Write + ?Sized> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(at) = rest.find(is_unsafe_char) {
            let c = rest[at..].chars().next().expect("found a char there");
            self.0.write_str(&rest[..at])?;
            write!(self.0, "\\u{{{:x}}}", c as u32)?;
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

impl<T: fmt::Display> fmt::Display for Untrusted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.width().is_none() && f.precision().is_none() {
            write!(Escaping(f), "{}", self.0)
        } else {
            let mut escaped = String::new();
            write!(Escaping(&mut escaped), "{}", self.0)?;
            f.pad(&escaped)
        }
    }
}

/// `s` with every [`is_unsafe_char`] escaped (borrowed when there is none).
pub fn escape_untrusted(s: &str) -> Cow<'_, str> {
    if !s.contains(is_unsafe_char) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(Untrusted(s).to_string())
}

/// Where in a shard an integrity failure was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkLocation {
    /// The shard file.
    pub path: PathBuf,
    /// Tensor name.
    pub tensor: String,
    /// Chunk index within the tensor.
    pub chunk: u64,
}

impl std::fmt::Display for ChunkLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: tensor '{}', chunk {}",
            Untrusted(self.path.display()),
            Untrusted(&self.tensor),
            self.chunk
        )
    }
}

/// Everything that can go wrong in ciphershard.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O error on a named file.
    #[error("{}: {source}", Untrusted(.path.display()))]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a well-formed ciphershard shard, manifest or keyring.
    #[error("{}: malformed {what}: {}", Untrusted(.path.display()), Untrusted(.reason))]
    Format {
        /// The file.
        path: PathBuf,
        /// Which structure (header, descriptor, manifest, keyring, ...).
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The file uses a format version or cipher this build does not understand.
    #[error(
        "{}: unsupported {what} '{}' (this build supports {supported})",
        Untrusted(.path.display()),
        Untrusted(.found)
    )]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is unsupported (version, cipher, key wrap algorithm, dtype).
        what: &'static str,
        /// The value found.
        found: String,
        /// What this build supports.
        supported: String,
    },
    /// No key in the keyring matches the master key(s) given.
    #[error(
        "{}: wrong key: {} (it is wrapped for: {})",
        Untrusted(.path.display()),
        tried_keys(.key_id),
        Untrusted(.available)
    )]
    WrongKey {
        /// The keyring or shard.
        path: PathBuf,
        /// Id of the key that was tried (several, joined by ", ", when several were).
        key_id: String,
        /// Ids of the keys that can open it.
        available: String,
    },
    /// An authentication tag did not verify: the data was tampered with or corrupted.
    #[error(
        "integrity check failed: {0}: the chunk was modified, truncated or moved (no plaintext was released)"
    )]
    Integrity(ChunkLocation),
    /// The shard header or dataset metadata failed authentication.
    #[error("{}: integrity check failed: {}", Untrusted(.path.display()), Untrusted(.what))]
    HeaderIntegrity {
        /// The file.
        path: PathBuf,
        /// What failed and how, as a clause ("the shard header was modified: ...",
        /// "manifest/shard mismatch: ...").
        what: String,
    },
    /// A key file or key source is unusable.
    #[error("key: {}", Untrusted(.0))]
    Key(String),
    /// Invalid argument or configuration from the caller.
    #[error("invalid argument: {}", Untrusted(.0))]
    InvalidArgument(String),
    /// The requested backend is not available here.
    #[error("backend '{backend}' is not available: {}", Untrusted(.reason))]
    BackendUnavailable {
        /// Backend name.
        backend: &'static str,
        /// Why, and what to do instead.
        reason: String,
    },
    /// A GPU backend failed at run time.
    #[error("{backend} backend error: {}", Untrusted(.reason))]
    Backend {
        /// Backend name.
        backend: &'static str,
        /// What failed and what to do next.
        reason: String,
    },
    /// The loader was stopped or its pipeline shut down.
    #[error("loader stopped: {}", Untrusted(.0))]
    Stopped(String),
}

/// "master key ID cannot open this dataset", or for several ids "none of master keys A, B can
/// open this dataset".
fn tried_keys(ids: &str) -> String {
    if ids.contains(", ") {
        format!("none of master keys {ids} can open this dataset")
    } else {
        format!("master key {ids} cannot open this dataset")
    }
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A malformed-structure error on `path`.
    pub fn format(path: impl Into<PathBuf>, what: &'static str, reason: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            what,
            reason: reason.into(),
        }
    }
}

/// Crate result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_text_is_escaped() {
        let evil = "a\u{1b}[31mb\u{9b}c\u{7f}\u{202e}d\u{2066}\r\n\\u{1b}é";
        let shown = Untrusted(evil).to_string();
        assert_eq!(
            shown,
            "a\\u{1b}[31mb\\u{9b}c\\u{7f}\\u{202e}d\\u{2066}\\u{d}\\u{a}\\u{1b}é"
        );
        assert!(!shown.contains(is_unsafe_char));
        assert_eq!(
            escape_untrusted(&shown),
            shown,
            "escaping twice changes nothing"
        );
        assert!(matches!(escape_untrusted("plain é"), Cow::Borrowed(_)));
        assert_eq!(format!("[{:<6}]", Untrusted("\u{1b}")), "[\\u{1b}]");
        assert_eq!(format!("[{:<8}]", Untrusted("a\u{1b}")), "[a\\u{1b} ]");
    }

    #[test]
    fn messages_escape_file_derived_text() {
        let e = Error::Integrity(ChunkLocation {
            path: "ds/shard-\u{1b}[2J.safetensors".into(),
            tensor: "x\u{202e}gnp".into(),
            chunk: 3,
        });
        let m = e.to_string();
        assert!(!m.contains(is_unsafe_char), "{m}");
        assert!(m.contains("x\\u{202e}gnp"), "{m}");
        let e = Error::format("f", "manifest", "column 'a\u{1b}]0;t\u{7}'");
        assert!(!e.to_string().contains(is_unsafe_char), "{e}");
        let e = Error::Unsupported {
            path: "f".into(),
            what: "dtype",
            found: "F\u{85}32".into(),
            supported: "F32".into(),
        };
        assert!(!e.to_string().contains(is_unsafe_char), "{e}");
    }
}
