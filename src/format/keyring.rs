//! `keyring.json`: every shard's data key wrapped under each master key (docs/FORMAT.md section 3).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use super::shard::{J, check_fields, check_format_version, parse_hex};
use crate::error::{Error, Result};
use crate::keys::{DataKey, MasterKey, WRAPPED_LEN};

const WHAT: &str = "keyring";

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

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WrapJson {
    key_id: String,
    alg: String,
    data_keys: Vec<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyringJson {
    format: String,
    version: u32,
    dataset_id: String,
    wraps: Vec<WrapJson>,
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

    /// Parses a keyring.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::format(path, WHAT, format!("invalid JSON: {e}")))?;
        check_format_version(path, WHAT, &v, "ciphershard-keyring")?;
        use J::*;
        check_fields(
            path,
            WHAT,
            "",
            &v,
            &[
                ("format", Str),
                ("version", Uint),
                ("dataset_id", Str),
                ("wraps", Arr),
            ],
        )?;
        for (i, w) in v["wraps"].as_array().into_iter().flatten().enumerate() {
            check_fields(
                path,
                WHAT,
                &format!("wraps[{i}]: "),
                w,
                &[("key_id", Str), ("alg", Str), ("data_keys", Arr)],
            )?;
        }
        let j: KeyringJson =
            serde_json::from_value(v).map_err(|e| Error::format(path, WHAT, e.to_string()))?;
        let mut wraps: Vec<KeyWrap> = Vec::with_capacity(j.wraps.len());
        for w in j.wraps {
            if w.alg != "A256KW" {
                return Err(Error::Unsupported {
                    path: path.into(),
                    what: "key wrap algorithm",
                    found: w.alg,
                    supported: "A256KW".into(),
                });
            }
            parse_hex::<8>(path, WHAT, "key_id", &w.key_id)?;
            if wraps.iter().any(|o| o.key_id == w.key_id) {
                return Err(Error::format(
                    path,
                    WHAT,
                    format!("key id {} is listed twice", w.key_id),
                ));
            }
            let data_keys = w
                .data_keys
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let b = B64
                        .decode(s)
                        .ok()
                        .filter(|b| b.len() == WRAPPED_LEN)
                        .ok_or_else(|| {
                            Error::format(
                                path,
                                WHAT,
                                format!(
                                    "key {}: data_keys[{i}] is not base64 of {WRAPPED_LEN} bytes",
                                    w.key_id
                                ),
                            )
                        })?;
                    Ok(b.try_into().expect("length checked"))
                })
                .collect::<Result<Vec<_>>>()?;
            wraps.push(KeyWrap {
                key_id: w.key_id,
                data_keys,
            });
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
            dataset_id: parse_hex::<16>(path, WHAT, "dataset_id", &j.dataset_id)?,
            wraps,
        })
    }

    /// Serializes the keyring (compact JSON plus a trailing newline).
    pub fn to_json(&self) -> String {
        let j = KeyringJson {
            format: "ciphershard-keyring".into(),
            version: super::FORMAT_VERSION,
            dataset_id: hex::encode(self.dataset_id),
            wraps: self
                .wraps
                .iter()
                .map(|w| WrapJson {
                    key_id: w.key_id.clone(),
                    alg: "A256KW".into(),
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

    fn wrong_key(&self, key: &MasterKey) -> Error {
        Error::WrongKey {
            path: self.path.clone(),
            key_id: key.id(),
            available: self.key_ids().join(", "),
        }
    }

    /// Unwraps shard `shard`'s data key with `key`; a key not in the keyring, or a wrap that
    /// does not authenticate, is [`Error::WrongKey`].
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
        key.unwrap(wrapped).ok_or_else(|| self.wrong_key(key))
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
