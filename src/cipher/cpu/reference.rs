//! Reference CPU implementation on RustCrypto `aes-gcm` and `ctr`: simple and slow, kept
//! reachable so the fast backend ([`super::CpuCipher`]) and the GPU backends can be
//! cross-checked against an independent implementation.

#![forbid(unsafe_code)]

use aes::Aes256;
use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use ctr::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use zeroize::Zeroize;

use super::ctr_start_block;
use crate::cipher::ct_eq;
use crate::cipher::{Backend, ChunkOpener, ChunkParams, Cipher, NONCE_LEN, OpenError, TAG_LEN};
use crate::error::Result;
use crate::keys::DataKey;

type Ctr32 = ctr::Ctr32BE<Aes256>;

/// The reference CPU backend.
#[derive(Debug, Default, Clone)]
pub struct ReferenceCipher;

impl ReferenceCipher {
    /// Creates the reference backend.
    pub fn new() -> Self {
        ReferenceCipher
    }
}

impl Cipher for ReferenceCipher {
    fn backend(&self) -> Backend {
        Backend::Cpu
    }
    fn describe(&self) -> String {
        "CPU reference (RustCrypto aes-gcm, ctr)".into()
    }
    fn prepare(&self, key: &DataKey) -> Result<Box<dyn ChunkOpener>> {
        Ok(Box::new(ReferenceOpener {
            gcm: Aes256Gcm::new(key.as_bytes().into()),
            key: key.clone(),
        }))
    }
}

/// A data key prepared by the reference backend.
pub struct ReferenceOpener {
    gcm: Aes256Gcm,
    key: DataKey,
}

impl ReferenceOpener {
    fn gmac(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], data: &[u8]) -> [u8; TAG_LEN] {
        let mut full = Vec::with_capacity(aad.len() + data.len());
        full.extend_from_slice(aad);
        full.extend_from_slice(data);
        let tag = self
            .gcm
            .encrypt_inout_detached(&Nonce::from(*nonce), &full, (&mut [][..]).into())
            .expect("GMAC input within GCM limits");
        tag.into()
    }
}

impl ChunkOpener for ReferenceOpener {
    fn open(&self, chunk: &ChunkParams<'_>, src: &[u8], dst: &mut [u8]) -> Result<(), OpenError> {
        assert_eq!(
            src.len(),
            dst.len(),
            "open: source and destination lengths differ"
        );
        dst.copy_from_slice(src);
        self.open_in_place(chunk, dst)
    }

    fn open_in_place(&self, chunk: &ChunkParams<'_>, buf: &mut [u8]) -> Result<(), OpenError> {
        if !chunk.encrypted {
            return self.verify(chunk, buf).inspect_err(|_| buf.zeroize());
        }
        let r = self.gcm.decrypt_inout_detached(
            &Nonce::from(chunk.nonce),
            chunk.aad,
            buf.into(),
            &Tag::from(chunk.tag),
        );
        r.map_err(|_| {
            buf.zeroize();
            OpenError::TagMismatch
        })
    }

    fn verify(&self, chunk: &ChunkParams<'_>, src: &[u8]) -> Result<(), OpenError> {
        let tag = if chunk.encrypted {
            // Tag of the ciphertext: re-encrypting would need a copy; compute GCM over a
            // scratch copy (reference path only).
            let mut scratch = src.to_vec();
            let ok = self
                .gcm
                .decrypt_inout_detached(
                    &Nonce::from(chunk.nonce),
                    chunk.aad,
                    (&mut scratch[..]).into(),
                    &Tag::from(chunk.tag),
                )
                .is_ok();
            scratch.zeroize();
            return if ok {
                Ok(())
            } else {
                Err(OpenError::TagMismatch)
            };
        } else {
            self.gmac(&chunk.nonce, chunk.aad, src)
        };
        if ct_eq(&tag, &chunk.tag) {
            Ok(())
        } else {
            Err(OpenError::TagMismatch)
        }
    }

    fn ctr_apply(
        &self,
        nonce: &[u8; NONCE_LEN],
        offset: u64,
        src: &[u8],
        dst: &mut [u8],
    ) -> crate::Result<()> {
        assert_eq!(src.len(), dst.len());
        // Start at the block that holds `offset` (GCM's inc32 wraps modulo 2^32), then skip
        // into it.
        let iv = ctr_start_block(nonce, offset / 16);
        let mut c = Ctr32::new(self.key.as_bytes().into(), &iv.into());
        c.seek(offset % 16);
        dst.copy_from_slice(src);
        c.apply_keystream(dst);
        Ok(())
    }

    fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        encrypted: bool,
        buf: &mut [u8],
    ) -> crate::Result<[u8; TAG_LEN]> {
        if !encrypted {
            return Ok(self.gmac(nonce, aad, buf));
        }
        Ok(self
            .gcm
            .encrypt_inout_detached(&Nonce::from(*nonce), aad, buf.into())
            .expect("chunk within GCM limits")
            .into())
    }
}
