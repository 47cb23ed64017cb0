//! `keyring.json`: every shard's data key wrapped under each master key (docs/FORMAT.md section 3).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Serialize;

use super::json::{self, AnyString, FromJson, Hex, List, json_object};
use super::{MAX_KEY_WRAPS, MAX_SHARDS};
use crate::error::{Error, Result};
use crate::keys::{DataKey, MasterKey, WRAPPED_LEN};

const WHAT: &str = "keyring";
/// Key ids a wrong-key error lists at most.
const WRONG_KEY_IDS_SHOWN: usize = 16;

/// The data keys wrapped under one master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyWrap {
    /// Id of the master key ([`MasterKey::id`]).
    pub key_id: String,
    /// `data_keys[i]`: shard `i`'s data key, AES-KW wrapped.
    pub data_keys: Vec<[u8; WRAPPED_LEN]>,
}

/// The parsed `keyring.json`.
#[derive(Debug, Clone)]
pub struct Keyring {
    path: PathBuf,
    /// The dataset the keyring belongs to.
    pub dataset_id: [u8; 16],
    /// One entry per master key.
    pub wraps: Vec<KeyWrap>,
}

/// One wrapped data key: base64 of [`WRAPPED_LEN`] bytes, decoded where it is read.
struct Wrapped([u8; WRAPPED_LEN]);

impl<'de> serde::de::Visitor<'de> for Wrapped {
    type Value = Wrapped;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`data_keys` entries to be base64 of {WRAPPED_LEN} bytes")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Wrapped, E> {
        // Room for what 56 base64 digits can decode to; anything longer fails to fit.
        let mut out = [0u8; WRAPPED_LEN + 3];
        match B64.decode_slice(v, &mut out) {
            Ok(WRAPPED_LEN) => Ok(Wrapped(out[..WRAPPED_LEN].try_into().expect("length"))),
            _ => Err(E::invalid_value(
                serde::de::Unexpected::Str(&json::quote(v)),
                &self,
            )),
        }
    }
}

impl<'de> FromJson<'de> for Wrapped {
    fn read<D: serde::Deserializer<'de>>(
        d: D,
        _: &'static str,
    ) -> std::result::Result<Self, D::Error> {
        d.deserialize_str(Wrapped([0; WRAPPED_LEN]))
    }
}

/// The key wrap algorithm, which must be `A256KW` (checked where it is read: nothing kept).
struct A256Kw;

impl<'de> serde::de::Visitor<'de> for A256Kw {
    type Value = A256Kw;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("`alg` to be a string")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<A256Kw, E> {
        match v {
            "A256KW" => Ok(A256Kw),
            _ => Err(E::custom(format_args!(
                "unsupported key wrap algorithm '{}' (this build supports A256KW)",
                json::quote(v)
            ))),
        }
    }
}

impl<'de> FromJson<'de> for A256Kw {
    fn read<D: serde::Deserializer<'de>>(
        d: D,
        _: &'static str,
    ) -> std::result::Result<Self, D::Error> {
        d.deserialize_str(A256Kw)
    }
}

json_object! {
    // `alg` is checked as it is read (A256Kw), so not kept.
    #[allow(dead_code)]
    struct WrapJson {
        key_id: Hex<8>,
        alg: A256Kw,
        data_keys: List<Wrapped, MAX_SHARDS>,
    }
}

json_object! {
    // `format`, `version` (and `cipher`) are required here but checked by the probe that
    // runs first (json::check_format_version), so they are read and not kept.
    #[allow(dead_code)]
    struct KeyringJson {
        format: AnyString,
        version: u64,
        dataset_id: Hex<16>,
        wraps: List<WrapJson, MAX_KEY_WRAPS>,
    }
}

/// What `to_json` writes (field order is the file's).
#[derive(Serialize)]
struct WrapOut<'a> {
    key_id: &'a str,
    alg: &'a str,
    data_keys: Vec<String>,
}

#[derive(Serialize)]
struct KeyringOut<'a> {
    format: &'a str,
    version: u32,
    dataset_id: String,
    wraps: Vec<WrapOut<'a>>,
}

impl Keyring {
    /// A keyring with no wraps yet; `path` names it in errors.
    pub fn new(path: &Path, dataset_id: [u8; 16]) -> Self {
        Keyring {
            path: path.into(),
            dataset_id,
            wraps: Vec::new(),
        }
    }

    /// The file this keyring was read from (or will be written to).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Parses a keyring: typed and bounded (docs/FORMAT.md section 9), key ids unique.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self> {
        json::check_format_version(
            path,
            WHAT,
            bytes,
            "ciphershard-keyring",
            super::KEYRING_VERSION..=super::KEYRING_VERSION,
            None,
        )?;
        let j: KeyringJson = json::parse_object(path, WHAT, bytes)?;
        let wraps: Vec<KeyWrap> = j
            .wraps
            .0
            .into_vec()
            .into_iter()
            .map(|w| KeyWrap {
                key_id: hex::encode(w.key_id.0),
                data_keys: w.data_keys.0.into_vec().into_iter().map(|k| k.0).collect(),
            })
            .collect();
        // A hash set, not a comparison with every earlier entry: a keyring is read before any
        // key is needed, and may hold a million entries.
        if let Some(id) = json::first_repeat(wraps.iter().map(|w| w.key_id.as_str())) {
            return Err(Error::format(
                path,
                WHAT,
                format!("key id {id} is listed twice"),
            ));
        }
        if wraps.is_empty() {
            return Err(Error::format(
                path,
                WHAT,
                "no wrapped keys: nobody can open this dataset",
            ));
        }
        Ok(Keyring {
            path: path.into(),
            dataset_id: j.dataset_id.0,
            wraps,
        })
    }

    /// Serializes the keyring (compact JSON plus a trailing newline).
    pub fn to_json(&self) -> String {
        let j = KeyringOut {
            format: "ciphershard-keyring",
            version: super::KEYRING_VERSION,
            dataset_id: hex::encode(self.dataset_id),
            wraps: self
                .wraps
                .iter()
                .map(|w| WrapOut {
                    key_id: &w.key_id,
                    alg: "A256KW",
                    data_keys: w.data_keys.iter().map(|k| B64.encode(k)).collect(),
                })
                .collect(),
        };
        let mut s = serde_json::to_string(&j).expect("keyring serializes");
        s.push('\n');
        s
    }

    /// Ids of the master keys that can open the dataset.
    pub fn key_ids(&self) -> Vec<String> {
        self.wraps.iter().map(|w| w.key_id.clone()).collect()
    }

    /// The first of `keys` this keyring holds wraps for (a caller with several keys, such as
    /// `verify --key A --key B`, opens with whichever matches); none is [`Error::WrongKey`]
    /// naming every id tried and the ids that can open the dataset.
    pub fn find_key<'k>(&self, keys: &'k [MasterKey]) -> Result<&'k MasterKey> {
        let ids: Vec<String> = keys.iter().map(MasterKey::id).collect();
        if let Some(i) = ids
            .iter()
            .position(|id| self.wraps.iter().any(|w| &w.key_id == id))
        {
            return Ok(&keys[i]);
        }
        Err(self.wrong_key_ids(ids.join(", ")))
    }

    /// The error for a key this keyring does not hold: it names the keys that can open the
    /// dataset, the first [`WRONG_KEY_IDS_SHOWN`] of them (a crafted keyring may list a million:
    /// the message stays a line).
    fn wrong_key(&self, key: &MasterKey) -> Error {
        self.wrong_key_ids(key.id())
    }

    /// [`Keyring::wrong_key`] for the key id(s) `tried` (several joined by ", ").
    fn wrong_key_ids(&self, tried: String) -> Error {
        let shown: Vec<&str> = self
            .wraps
            .iter()
            .take(WRONG_KEY_IDS_SHOWN)
            .map(|w| w.key_id.as_str())
            .collect();
        let mut available = shown.join(", ");
        if self.wraps.len() > shown.len() {
            available.push_str(&format!(" and {} more", self.wraps.len() - shown.len()));
        }
        Error::WrongKey {
            path: self.path.clone(),
            key_id: tried,
            available,
        }
    }

    /// Unwraps shard `shard`'s data key with `key`; a key not in the keyring is
    /// [`Error::WrongKey`]. A wrap listed under `key`'s own id that does not authenticate was
    /// modified (the id is a hash of the key): a format error naming the keyring, tampering.
    pub fn unwrap(&self, key: &MasterKey, shard: usize) -> Result<DataKey> {
        let id = key.id();
        let w = self
            .wraps
            .iter()
            .find(|w| w.key_id == id)
            .ok_or_else(|| self.wrong_key(key))?;
        let wrapped = w.data_keys.get(shard).ok_or_else(|| {
            Error::format(
                &self.path,
                WHAT,
                format!("key {id} has no wrapped data key for shard {shard}"),
            )
        })?;
        key.unwrap(wrapped).ok_or_else(|| {
            Error::format(
                &self.path,
                WHAT,
                format!(
                    "the wrap of shard {shard}'s data key under key {id} fails its AES-KW \
                     integrity check: the keyring was edited or corrupted"
                ),
            )
        })
    }

    /// Adds (or replaces) the wraps of `data_keys` under `key`.
    pub fn set_wraps(&mut self, key: &MasterKey, data_keys: &[DataKey]) -> Result<()> {
        let id = key.id();
        let wrapped = data_keys
            .iter()
            .map(|dk| key.wrap(dk))
            .collect::<Result<Vec<_>>>()?;
        match self.wraps.iter_mut().find(|w| w.key_id == id) {
            Some(w) => w.data_keys = wrapped,
            None => self.wraps.push(KeyWrap {
                key_id: id,
                data_keys: wrapped,
            }),
        }
        Ok(())
    }
}
