//! Master keys, data keys, key ids and key wrapping (AES-KW, RFC 3394).
//!
//! Both key types zeroize on drop and redact themselves in `Debug`. A master key never comes
//! from the command line: it is read from a file, a file named by an environment variable, or
//! standard input.

#![forbid(unsafe_code)]

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};

use aes_kw::KeyInit;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::{Error, Result};

/// Length in bytes of every key ciphershard uses (AES-256).
pub const KEY_LEN: usize = 32;
/// Length of a data key wrapped with AES-KW.
pub const WRAPPED_LEN: usize = KEY_LEN + 8;
/// Most bytes read from a key source (file or standard input): a key is 64 hex digits or 32
/// raw bytes; the rest is room for whitespace. A larger source is refused, unread.
pub const MAX_KEY_SOURCE_LEN: usize = 4096;

/// `true` when `s`, given where a key *source* is expected (a key file path, an environment
/// variable naming one), looks like key material itself: 64 hex digits (optionally `0x`), the
/// base64 of 32 bytes (standard or URL-safe, padded or not), or bytes that are not text (a
/// control character, or invalid UTF-8 in a string short enough to be a raw key). Surrounding
/// whitespace is ignored. A real file with such a name can still be named as `./NAME`.
pub fn looks_like_key(s: &OsStr) -> bool {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let bytes = s.as_encoded_bytes();
    if bytes
        .iter()
        .any(|&b| b < 0x20 && !b.is_ascii_whitespace() || b == 0x7f)
    {
        return true;
    }
    let Some(text) = s.to_str() else {
        return bytes.len() <= 2 * KEY_LEN;
    };
    let t = text.trim();
    let hex = t.strip_prefix("0x").unwrap_or(t);
    if hex.len() == 2 * KEY_LEN && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return true;
    }
    matches!(t.len(), 43 | 44)
        && [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
            .iter()
            .any(|engine| {
                engine
                    .decode(t)
                    .map(Zeroizing::new)
                    .is_ok_and(|k| k.len() == KEY_LEN)
            })
}

/// `text` with every word that [`looks_like_key`] replaced by `<redacted: looks like a key>`
/// (a word: a run of hex and base64 characters; its `/`-separated parts are checked too). For
/// messages that repeat what a user typed, such as a command-line parser's.
pub fn redact_keys(text: &str) -> std::borrow::Cow<'_, str> {
    const REDACTED: &str = "<redacted: looks like a key>";
    let is_word = |c: char| c.is_ascii_alphanumeric() || "+/=_-".contains(c);
    let key_like = |w: &str| looks_like_key(OsStr::new(w));
    let mut out = String::new();
    let mut copied = 0;
    let mut rest = text;
    while let Some(start) = rest.find(is_word) {
        let len = rest[start..]
            .find(|c| !is_word(c))
            .unwrap_or(rest.len() - start);
        let word = &rest[start..start + len];
        let base = text.len() - rest.len() + start;
        if key_like(word) {
            out.push_str(&text[copied..base]);
            out.push_str(REDACTED);
            copied = base + len;
        } else if word.contains('/') {
            let mut at = base;
            for part in word.split('/') {
                if key_like(part) {
                    out.push_str(&text[copied..at]);
                    out.push_str(REDACTED);
                    copied = at + part.len();
                }
                at += part.len() + 1;
            }
        }
        rest = &rest[start + len..];
    }
    if copied == 0 {
        return std::borrow::Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    std::borrow::Cow::Owned(out)
}

/// `path` as errors about a key source show it: every run that could be (most of) a key
/// replaced by `<redacted>`, so that a key pasted with quotes, a prefix or a digit too many
/// (which [`looks_like_key`] does not refuse) is still never repeated. A run: 16 or more hex
/// digits, or 40 or more base64 characters mixing digits, upper and lower case.
pub fn shown_key_source(path: &Path) -> PathBuf {
    let is_b64 = |c: char| c.is_ascii_alphanumeric() || "+/=_-".contains(c);
    let mixed_b64 = |run: &str| {
        run.len() >= 40
            && run.bytes().any(|b| b.is_ascii_digit())
            && run.bytes().any(|b| b.is_ascii_uppercase())
            && run.bytes().any(|b| b.is_ascii_lowercase())
    };
    // Base64-alphabet runs first (`KEY=<hex>` is one), then hex runs inside what is left.
    let text = replace_runs(&path.to_string_lossy(), is_b64, mixed_b64);
    PathBuf::from(replace_runs(
        &text,
        |c| c.is_ascii_hexdigit(),
        |run| run.len() >= 16,
    ))
}

/// `text` with every maximal run of characters that satisfy `in_run` and that `secret` picks
/// replaced by `<redacted>`.
fn replace_runs(
    text: &str,
    in_run: impl Fn(char) -> bool,
    secret: impl Fn(&str) -> bool,
) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(&in_run) {
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let len = rest.find(|c| !in_run(c)).unwrap_or(rest.len());
        let run = &rest[..len];
        out.push_str(if secret(run) { "<redacted>" } else { run });
        rest = &rest[len..];
    }
    out.push_str(rest);
    out
}

/// Refuses `value`, given as `what`, when it [`looks_like_key`]: the error says so without
/// repeating it (it would otherwise be echoed into terminals and logs by a "No such file"
/// error). The one check every key source goes through.
pub fn refuse_key_like(what: &str, value: &OsStr) -> Result<()> {
    if looks_like_key(value) {
        return Err(Error::Key(format!(
            "{what} looks like a key, not the name of a key file (not shown, not used): put the \
             key in a file (`ciphershard keygen --out FILE` makes one, mode 0600) and name that \
             file; a key typed on a command line or kept in the environment may be logged, so \
             treat it as exposed and rotate it (`ciphershard rekey`); a file that really has such \
             a name can be given as ./NAME"
        )));
    }
    Ok(())
}

/// Reads at most [`MAX_KEY_SOURCE_LEN`] bytes from `r` into zeroized memory allocated once
/// (growing a vector would leave copies of the key behind); `None` when there is more.
fn read_capped(mut r: impl Read) -> std::io::Result<Option<Zeroizing<Vec<u8>>>> {
    let mut buf = Zeroizing::new(vec![0u8; MAX_KEY_SOURCE_LEN + 1]);
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if n > MAX_KEY_SOURCE_LEN {
        return Ok(None);
    }
    buf.truncate(n);
    Ok(Some(buf))
}

/// A key file's bytes. Opened non-blocking so a FIFO with no writer cannot hang the open, then
/// refused unless it is a regular file of at most [`MAX_KEY_SOURCE_LEN`] bytes.
fn read_key_file(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    let shown = shown_key_source(path);
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let file = opts.open(path).map_err(|e| Error::io(&shown, e))?;
    let meta = file.metadata().map_err(|e| Error::io(&shown, e))?;
    if !meta.is_file() {
        return Err(Error::Key(format!(
            "{}: not a regular file (a pipe, a device or a directory): a key file holds 64 hex \
             digits or 32 raw bytes; to pass a key through a pipe use --key - (standard input)",
            shown.display()
        )));
    }
    let too_big = || {
        Error::Key(format!(
            "{}: more than {MAX_KEY_SOURCE_LEN} bytes: not a key file (a key file holds 64 hex \
             digits or 32 raw bytes)",
            shown.display()
        ))
    };
    if meta.len() > MAX_KEY_SOURCE_LEN as u64 {
        return Err(too_big());
    }
    read_capped(file)
        .map_err(|e| Error::io(&shown, e))?
        .ok_or_else(too_big)
}

/// A 256-bit master key: wraps the per-shard data keys.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey([u8; KEY_LEN]);

/// A 256-bit per-shard data key: encrypts and authenticates the shard's chunks.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DataKey([u8; KEY_LEN]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey(id={}, <redacted>)", self.id())
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

fn random_bytes() -> Result<[u8; KEY_LEN]> {
    let mut k = [0u8; KEY_LEN];
    getrandom::fill(&mut k).map_err(|e| Error::Key(format!("operating system RNG failed: {e}")))?;
    Ok(k)
}

impl MasterKey {
    /// A fresh random master key from the operating system's RNG.
    pub fn generate() -> Result<Self> {
        Ok(Self(random_bytes()?))
    }

    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// The raw key bytes (for the cipher backends).
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The key id: the first 8 bytes of SHA-256("ciphershard key id v1" || key), in hex.
    /// It identifies a key in a keyring without revealing anything useful about it.
    pub fn id(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"ciphershard key id v1");
        h.update(self.0);
        hex::encode(&h.finalize()[..8])
    }

    /// Parses a key file's contents: 64 hex digits (surrounding whitespace allowed) or 32 raw bytes.
    pub fn parse(contents: &[u8]) -> Result<Self> {
        let text = std::str::from_utf8(contents).ok().map(str::trim);
        if let Some(t) = text
            && t.len() == 2 * KEY_LEN
        {
            let mut k = Zeroizing::new([0u8; KEY_LEN]);
            hex::decode_to_slice(t, &mut *k)
                .map_err(|_| Error::Key("key file is 64 characters but not hex".into()))?;
            return Ok(Self(*k));
        }
        if contents.len() == KEY_LEN {
            let mut k = [0u8; KEY_LEN];
            k.copy_from_slice(contents);
            return Ok(Self(k));
        }
        Err(Error::Key(format!(
            "a key file holds 64 hex digits or 32 raw bytes; this one holds {} bytes",
            contents.len()
        )))
    }

    /// Reads a key from a file: a regular file of at most [`MAX_KEY_SOURCE_LEN`] bytes. Anything
    /// else (a pipe, a device such as `/dev/zero`, a directory) is refused without blocking or
    /// reading it, and a path that looks like a key itself is refused without repeating it
    /// ([`looks_like_key`]).
    pub fn from_file(path: &Path) -> Result<Self> {
        refuse_key_like("the key file path", path.as_os_str())?;
        let contents = read_key_file(path)?;
        Self::parse(&contents).map_err(|e| match e {
            Error::Key(m) => Error::Key(format!("{}: {m}", shown_key_source(path).display())),
            other => other,
        })
    }

    /// Reads a key from standard input (64 hex digits or 32 raw bytes, at most
    /// [`MAX_KEY_SOURCE_LEN`] bytes in all). Refused at once when standard input is a
    /// terminal: a read would wait without a prompt, and typing 64 hex digits is no way in.
    pub fn from_stdin() -> Result<Self> {
        use std::io::IsTerminal;
        if std::io::stdin().is_terminal() {
            return Err(Error::Key(
                "standard input is a terminal; pipe the key in or name a key file".into(),
            ));
        }
        let buf = read_capped(std::io::stdin().lock())
            .map_err(|e| Error::Key(format!("reading key from standard input: {e}")))?
            .ok_or_else(|| {
                Error::Key(format!(
                    "standard input holds more than {MAX_KEY_SOURCE_LEN} bytes: not a key \
                     (64 hex digits or 32 raw bytes)"
                ))
            })?;
        Self::parse(&buf)
    }

    /// Reads a key from the file named by the environment variable `var`. A variable that
    /// holds what looks like a key itself is refused without repeating it.
    pub fn from_env_file(var: &str) -> Result<Self> {
        refuse_key_like("the environment variable name", OsStr::new(var))?;
        let path = std::env::var_os(var)
            .ok_or_else(|| Error::Key(format!("environment variable {var} is not set")))?;
        refuse_key_like(&format!("${var}"), &path)?;
        Self::from_file(Path::new(&path))
    }

    /// Key source by name: `-` reads standard input, `env:VAR` reads the file named by `$VAR`,
    /// anything else is a file path.
    pub fn from_source(source: &str) -> Result<Self> {
        if source == "-" {
            Self::from_stdin()
        } else if let Some(var) = source.strip_prefix("env:") {
            Self::from_env_file(var)
        } else {
            Self::from_file(Path::new(source))
        }
    }

    /// Writes the key as hex to a new file with mode 0600. Fails if the file exists.
    pub fn write_new_file(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(path).map_err(|e| Error::io(path, e))?;
        let mut text = Zeroizing::new(hex::encode(self.0));
        text.push('\n');
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io(path, e))
    }

    /// Wraps a data key under this master key with AES-KW (RFC 3394).
    pub fn wrap(&self, dk: &DataKey) -> Result<[u8; WRAPPED_LEN]> {
        let kek = aes_kw::KwAes256::new(&self.0.into());
        let mut out = [0u8; WRAPPED_LEN];
        kek.wrap_key(&dk.0, &mut out)
            .map_err(|e| Error::Key(format!("AES-KW wrap failed: {e:?}")))?;
        Ok(out)
    }

    /// Unwraps a data key; `None` when the wrap does not authenticate under this key.
    pub fn unwrap(&self, wrapped: &[u8]) -> Option<DataKey> {
        if wrapped.len() != WRAPPED_LEN {
            return None;
        }
        let kek = aes_kw::KwAes256::new(&self.0.into());
        let mut out = [0u8; KEY_LEN];
        match kek.unwrap_key(wrapped, &mut out) {
            Ok(_) => Some(DataKey(out)),
            Err(_) => {
                out.zeroize();
                None
            }
        }
    }
}

impl DataKey {
    /// A fresh random data key (one per shard).
    pub fn generate() -> Result<Self> {
        Ok(Self(random_bytes()?))
    }

    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// The raw key bytes (for the cipher backends).
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts() {
        let k = MasterKey::from_bytes([0x41; 32]);
        let s = format!("{k:?}");
        assert!(!s.contains("4141"), "{s}");
        assert!(!format!("{:?}", DataKey::from_bytes([0x41; 32])).contains("41"));
    }

    #[test]
    fn rfc3394_vector_4_6() {
        // RFC 3394 section 4.6: 256 bits of key data with a 256-bit KEK.
        let kek: [u8; 32] =
            hex::decode("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F")
                .unwrap()
                .try_into()
                .unwrap();
        let data: [u8; 32] =
            hex::decode("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F")
                .unwrap()
                .try_into()
                .unwrap();
        let expect =
            "28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21";
        let mk = MasterKey::from_bytes(kek);
        let w = mk.wrap(&DataKey::from_bytes(data)).unwrap();
        assert_eq!(hex::encode_upper(w), expect);
        assert_eq!(mk.unwrap(&w).unwrap().as_bytes(), &data);
        assert!(MasterKey::from_bytes([7; 32]).unwrap(&w).is_none());
    }

    #[test]
    fn key_sources_in_errors_never_show_key_material() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let b64 = "ABEiM0RVZneImaq7zN3u/wARIjNEVWZ3iJmqu8zd7v8=";
        let cases = [
            format!("\"{hex}\""),
            format!("'{hex}'"),
            format!("KEY={hex}"),
            format!("{hex};"),
            format!("hex:{hex}"),
            hex[..63].to_string(),
            format!("{hex}0"),
            format!("{} {}", &hex[..20], &hex[20..]),
            format!("\"{b64}\""),
            b64.replace('A', "B"),
            format!("/keys/{hex}.key"),
        ];
        for case in cases {
            let shown = shown_key_source(Path::new(&case)).display().to_string();
            assert!(shown.contains("<redacted>"), "{case} -> {shown}");
            for window in hex.as_bytes().windows(16).chain(b64.as_bytes().windows(16)) {
                let w = std::str::from_utf8(window).unwrap();
                assert!(!shown.contains(w), "{case} -> {shown} shows {w}");
            }
            let Err(e) = MasterKey::from_file(Path::new(&case)) else {
                panic!("{case}: no such file, yet a key");
            };
            assert!(!e.to_string().contains(&hex[..16]), "{e}");
        }
        for ordinary in [
            "master.key",
            "/etc/ciphershard/prod-2026.key",
            "./keys/a_b-c.key",
        ] {
            assert_eq!(shown_key_source(Path::new(ordinary)), Path::new(ordinary));
        }
    }

    #[test]
    fn key_like_strings() {
        let hex = "ab".repeat(32);
        let like = |s: &str| looks_like_key(OsStr::new(s));
        assert!(like(&hex));
        assert!(like(&format!(" 0x{}\n", hex.to_uppercase())));
        assert!(like("ABEiM0RVZneImaq7zN3u/wARIjNEVWZ3iJmqu8zd7v8="));
        assert!(like("ABEiM0RVZneImaq7zN3u_wARIjNEVWZ3iJmqu8zd7v8"));
        assert!(like("raw\u{1}bytes"));
        assert!(!like("master.key"));
        assert!(!like("/home/me/keys/master.key"));
        assert!(!like(&format!("./{hex}")));
        assert!(!like(&"ab".repeat(31)));
        assert!(!like("production-training-master-key-v2.key"));
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStrExt;
            assert!(looks_like_key(OsStr::from_bytes(&[0xff; 32])));
        }
    }

    #[test]
    fn redaction() {
        let hex = "cd".repeat(32);
        let text = format!("error: unexpected argument '{hex}' found; ds/{hex} and ok.key");
        let r = redact_keys(&text);
        assert!(!r.contains(&hex), "{r}");
        assert_eq!(r.matches("<redacted: looks like a key>").count(), 2, "{r}");
        assert!(r.ends_with("and ok.key"), "{r}");
        assert!(matches!(
            redact_keys("nothing here"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn capped_reads() {
        let read = |n: usize| read_capped(&vec![b' '; n][..]).unwrap().map(|b| b.len());
        assert_eq!(read(0), Some(0));
        assert_eq!(read(MAX_KEY_SOURCE_LEN), Some(MAX_KEY_SOURCE_LEN));
        assert_eq!(read(MAX_KEY_SOURCE_LEN + 1), None);
        assert_eq!(read(10 * MAX_KEY_SOURCE_LEN), None);
    }

    #[test]
    fn parse_hex_and_raw() {
        let k = MasterKey::parse(format!("  {}\n", "ab".repeat(32)).as_bytes()).unwrap();
        assert_eq!(k.as_bytes(), &[0xab; 32]);
        assert_eq!(MasterKey::parse(&[9u8; 32]).unwrap().as_bytes(), &[9; 32]);
        assert!(MasterKey::parse(b"short").is_err());
    }
}
