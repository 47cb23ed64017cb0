//! CPU backend: which library does what, chosen by measurement (docs/BENCHMARKS.md).
//!
//! - `open` / `open_in_place` / `seal_in_place` (encrypted chunks): **aws-lc-rs** AES-256-GCM.
//!   Its fused VAES + VPCLMULQDQ assembly is the fastest single-core GCM measured here, and
//!   `open_separate_gather` decrypts from the (memory-mapped) source into the caller's buffer in
//!   one pass, with no copy.
//! - `verify` and plain chunks' GMAC: aws-lc's GHASH over the ciphertext taken as associated
//!   data (module `gmac`), no decryption; for an encrypted chunk the tag then differs from the
//!   real one only in the length block, fixed up with one GF(2^128) multiply by H (RustCrypto
//!   `ghash`).
//! - `ctr_apply`: our own VAES-512 CTR (module `vaes`, 16 blocks per step, counters and XOR in
//!   registers) when the CPU has it; elsewhere RustCrypto **`aes`** 0.9 (VAES-256 / AES-NI /
//!   constant-time software, picked at run time) in a batched counter loop (module `ctr`).
//!   Both beat the `ctr` crate, whose generic per-block-group interface caps it well below
//!   the raw cipher speed.
//!
//! [`reference`](mod@reference) is the slow, independent RustCrypto `aes-gcm` + `ctr` implementation used to
//! cross-check every backend.

use aes::Aes256;
use aes::cipher::{Array, BlockCipherEncrypt, KeyInit};
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ghash::GHash;
use ghash::universal_hash::UniversalHash;
use zeroize::{Zeroize, Zeroizing};

use super::{
    Backend, ChunkOpener, ChunkParams, Cipher, NONCE_LEN, OpenError, TAG_LEN, ct_eq, same_len,
};
use crate::error::{Error, Result};
use crate::keys::DataKey;

pub mod ctr;
mod gmac;
pub mod reference;
mod vaes;

/// The fast CPU backend.
#[derive(Debug, Default, Clone)]
pub struct CpuCipher;

impl CpuCipher {
    /// Creates the CPU backend.
    pub fn new() -> Self {
        CpuCipher
    }
}

/// The AES instruction set RustCrypto `aes` uses on this CPU for CTR.
pub fn aes_instructions() -> &'static str {
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    {
        if std::arch::is_x86_feature_detected!("vaes")
            && std::arch::is_x86_feature_detected!("avx512f")
        {
            return "VAES-512";
        }
        if std::arch::is_x86_feature_detected!("vaes") {
            return "VAES-256";
        }
        if std::arch::is_x86_feature_detected!("aes") {
            return "AES-NI";
        }
        "software (constant-time bitsliced)"
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("aes") {
            return "ARMv8 AES";
        }
        "software (constant-time bitsliced)"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "x86", target_arch = "aarch64")))]
    {
        "software (constant-time bitsliced)"
    }
}

impl Cipher for CpuCipher {
    fn backend(&self) -> Backend {
        Backend::Cpu
    }
    fn describe(&self) -> String {
        let ctr = if vaes::VaesCtrKey::new(&[0; 32]).is_some() {
            "ciphershard VAES-512".to_string()
        } else {
            format!("RustCrypto aes, {}", aes_instructions())
        };
        format!("CPU (GCM: aws-lc-rs; CTR: {ctr})")
    }
    fn prepare(&self, key: &DataKey) -> Result<Box<dyn ChunkOpener>> {
        Ok(Box::new(CpuOpener::new(key)?))
    }
}

/// A data key prepared on the CPU: aws-lc GCM context, AES-256 round keys and the hash key H.
/// All of them are cleansed on drop (`DataKey`, `aes` with its `zeroize` feature, aws-lc's
/// context cleanup, `Zeroizing`).
pub struct CpuOpener {
    key: DataKey,
    gcm: LessSafeKey,
    aes: Aes256,
    /// VAES-512 CTR round keys, when this CPU has VAES-512.
    vaes: Option<vaes::VaesCtrKey>,
    /// GHASH key H = AES_K(0^128).
    h: Zeroizing<[u8; 16]>,
}

impl CpuOpener {
    /// Prepares `key`.
    pub fn new(key: &DataKey) -> Result<Self> {
        let unbound = UnboundKey::new(&AES_256_GCM, key.as_bytes())
            .map_err(|_| Error::InvalidArgument("aws-lc rejected a 256-bit AES-GCM key".into()))?;
        let aes = Aes256::new(key.as_bytes().into());
        let mut h = Zeroizing::new([0u8; 16]);
        let mut block = Array::from([0u8; 16]);
        aes.encrypt_block(&mut block);
        h.copy_from_slice(&block);
        block.as_mut_slice().zeroize();
        Ok(CpuOpener {
            key: key.clone(),
            gcm: LessSafeKey::new(unbound),
            aes,
            vaes: vaes::VaesCtrKey::new(key.as_bytes()),
            h,
        })
    }

    fn gmac(&self, nonce: &[u8; NONCE_LEN], parts: &[&[u8]]) -> Option<[u8; TAG_LEN]> {
        gmac::gmac(self.key.as_bytes(), nonce, parts)
    }

    /// The GCM tag of ciphertext `ct` without decrypting it.
    ///
    /// GHASH over `pad(aad) || pad(ct) || len(aad) || len(ct)` equals GHASH over the associated
    /// data `pad(aad) || ct` with an empty ciphertext, except for the final length block, which
    /// GHASH multiplies by H once. So `tag = tag' ^ (L ^ L')·H`.
    fn ciphertext_tag(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        ct: &[u8],
    ) -> Option<[u8; TAG_LEN]> {
        const ZEROS: [u8; 16] = [0; 16];
        let pad = (16 - aad.len() % 16) % 16;
        let mut tag = self.gmac(nonce, &[aad, &ZEROS[..pad], ct])?;
        let bits = |n: usize| (n as u64).wrapping_mul(8).to_be_bytes();
        let mut delta = [0u8; 16];
        delta[..8].copy_from_slice(&bits(aad.len()));
        delta[8..].copy_from_slice(&bits(ct.len()));
        let fake_aad_bits = bits(aad.len() + pad + ct.len());
        for i in 0..8 {
            delta[i] ^= fake_aad_bits[i];
        }
        let mut gh = GHash::new(&(*self.h).into());
        gh.update(&[delta.into()]);
        let fix = gh.finalize();
        for i in 0..TAG_LEN {
            tag[i] ^= fix[i];
        }
        Some(tag)
    }
}

/// The counter block GCM starts encrypting at: `nonce || 2`, advanced by `blocks` (mod 2^32).
pub fn ctr_start_block(nonce: &[u8; NONCE_LEN], blocks: u64) -> [u8; 16] {
    let mut iv = [0u8; 16];
    iv[..12].copy_from_slice(nonce);
    iv[12..].copy_from_slice(&(2u32.wrapping_add(blocks as u32)).to_be_bytes());
    iv
}

impl ChunkOpener for CpuOpener {
    fn open(&self, chunk: &ChunkParams<'_>, src: &[u8], dst: &mut [u8]) -> Result<(), OpenError> {
        same_len("open", src, dst)?;
        if !chunk.encrypted {
            // Copy first, then verify the private copy: a memory-mapped source may change
            // underneath, and only the verified bytes may be handed out.
            dst.copy_from_slice(src);
            return self.verify(chunk, dst).inspect_err(|_| dst.zeroize());
        }
        let nonce = Nonce::assume_unique_for_key(chunk.nonce);
        // One pass over `src`: aws-lc hashes and decrypts each block as it reads it.
        self.gcm
            .open_separate_gather(nonce, Aad::from(chunk.aad), src, &chunk.tag, dst)
            .map_err(|_| {
                dst.zeroize();
                OpenError::TagMismatch
            })
    }

    fn open_in_place(&self, chunk: &ChunkParams<'_>, buf: &mut [u8]) -> Result<(), OpenError> {
        if !chunk.encrypted {
            return self.verify(chunk, buf).inspect_err(|_| buf.zeroize());
        }
        let nonce = Nonce::assume_unique_for_key(chunk.nonce);
        match self
            .gcm
            .open_in_place_separate_tag(nonce, Aad::from(chunk.aad), &chunk.tag, buf)
        {
            Ok(_) => Ok(()),
            Err(_) => {
                buf.zeroize();
                Err(OpenError::TagMismatch)
            }
        }
    }

    fn verify(&self, chunk: &ChunkParams<'_>, src: &[u8]) -> Result<(), OpenError> {
        let tag = if chunk.encrypted {
            self.ciphertext_tag(&chunk.nonce, chunk.aad, src)
        } else {
            self.gmac(&chunk.nonce, &[chunk.aad, src])
        };
        match tag {
            Some(t) if ct_eq(&t, &chunk.tag) => Ok(()),
            Some(_) => Err(OpenError::TagMismatch),
            None => Err(OpenError::Backend(gmac_failed())),
        }
    }

    fn ctr_apply(
        &self,
        nonce: &[u8; NONCE_LEN],
        offset: u64,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<()> {
        same_len("ctr_apply", src, dst)?;
        match &self.vaes {
            Some(v) => v.xor(nonce, offset, src, dst),
            None => ctr::ctr32_xor(&self.aes, nonce, offset, src, dst),
        }
        Ok(())
    }

    fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        encrypted: bool,
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN]> {
        if !encrypted {
            return self.gmac(nonce, &[aad, buf]).ok_or_else(gmac_failed);
        }
        let tag = self
            .gcm
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), buf)
            .map_err(|_| Error::Backend {
                backend: "cpu",
                reason: "aws-lc refused to seal a chunk (longer than GCM allows per nonce?)".into(),
            })?;
        Ok(tag.as_ref().try_into().expect("AES-GCM tag is 16 bytes"))
    }
}

/// aws-lc's GMAC context could not be created (allocation failure).
fn gmac_failed() -> Error {
    Error::Backend {
        backend: "cpu",
        reason: "aws-lc GMAC failed (out of memory)".into(),
    }
}
