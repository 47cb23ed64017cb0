//! Master keys, data keys, key ids and key wrapping (AES-KW, RFC 3394).
//!
//! Both key types zeroize on drop and redact themselves in `Debug`. A master key never comes
//! from the command line: it is read from a file, a file named by an environment variable, or
//! standard input.

#![forbid(unsafe_code)]

use std::io::Read;
use std::path::Path;

use aes_kw::KeyInit;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::{Error, Result};

/// Length in bytes of every key ciphershard uses (AES-256).
pub const KEY_LEN: usize = 32;
/// Length of a data key wrapped with AES-KW.
pub const WRAPPED_LEN: usize = KEY_LEN + 8;

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

    /// Reads a key from a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let contents = Zeroizing::new(std::fs::read(path).map_err(|e| Error::io(path, e))?);
        Self::parse(&contents).map_err(|e| match e {
            Error::Key(m) => Error::Key(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Reads a key from standard input (64 hex digits or 32 raw bytes).
    pub fn from_stdin() -> Result<Self> {
        let mut buf = Zeroizing::new(Vec::new());
        std::io::stdin()
            .take(4096)
            .read_to_end(&mut buf)
            .map_err(|e| Error::Key(format!("reading key from stdin: {e}")))?;
        Self::parse(&buf)
    }

    /// Reads a key from the file named by the environment variable `var`.
    pub fn from_env_file(var: &str) -> Result<Self> {
        let path = std::env::var_os(var)
            .ok_or_else(|| Error::Key(format!("environment variable {var} is not set")))?;
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
    fn parse_hex_and_raw() {
        let k = MasterKey::parse(format!("  {}\n", "ab".repeat(32)).as_bytes()).unwrap();
        assert_eq!(k.as_bytes(), &[0xab; 32]);
        assert_eq!(MasterKey::parse(&[9u8; 32]).unwrap().as_bytes(), &[9; 32]);
        assert!(MasterKey::parse(b"short").is_err());
    }
}
