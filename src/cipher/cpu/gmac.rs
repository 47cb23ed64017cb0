//! GHASH-speed tags without decrypting, through aws-lc's EVP AES-256-GCM interface.
//!
//! aws-lc hashes associated data with the same VPCLMULQDQ GHASH it uses for GCM, and its EVP
//! interface accepts the associated data in several pieces. So a GCM computation with empty
//! plaintext and AAD = `part_0 || part_1 || ...` computes a GMAC over those pieces straight from
//! where they lie (a memory map, a caller's buffer): no copy, no keystream.
//!
//! This is the only file of the CPU backend with `unsafe`: four calls into aws-lc's C API.

#![allow(unsafe_code)] // four calls into aws-lc's C API (see above); the crate denies it elsewhere

use std::os::raw::c_int;

use aws_lc_sys::{
    EVP_CIPHER_CTX, EVP_CIPHER_CTX_ctrl, EVP_CIPHER_CTX_free, EVP_CIPHER_CTX_new,
    EVP_CTRL_GCM_GET_TAG, EVP_EncryptFinal_ex, EVP_EncryptInit_ex, EVP_EncryptUpdate,
    EVP_aes_256_gcm,
};

use crate::cipher::{NONCE_LEN, TAG_LEN};

/// Largest piece handed to one `EVP_EncryptUpdate` call (its length is a C `int`).
const MAX_PIECE: usize = 1 << 30;

/// An aws-lc cipher context, freed (and its key schedule cleansed by aws-lc) on drop.
struct Ctx(*mut EVP_CIPHER_CTX);

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from `EVP_CIPHER_CTX_new`, is non-null (checked at creation)
        // and is freed exactly once, here. `EVP_CIPHER_CTX_free` cleans the key schedule.
        unsafe { EVP_CIPHER_CTX_free(self.0) }
    }
}

/// The AES-256-GCM tag of an empty plaintext with associated data `parts` concatenated, i.e.
/// `GMAC(key, nonce, parts[0] || parts[1] || ...)`. `None` only if aws-lc fails (allocation).
pub fn gmac(key: &[u8; 32], nonce: &[u8; NONCE_LEN], parts: &[&[u8]]) -> Option<[u8; TAG_LEN]> {
    // SAFETY: plain constructor; a null return is handled below.
    let ctx = Ctx(unsafe { EVP_CIPHER_CTX_new() });
    if ctx.0.is_null() {
        return None;
    }
    // SAFETY: `ctx.0` is a live context; `EVP_aes_256_gcm()` is a static cipher; `key` is 32
    // bytes (AES-256) and `nonce` 12 bytes, GCM's default IV length for this cipher. aws-lc
    // copies both during the call.
    let ok = unsafe {
        EVP_EncryptInit_ex(
            ctx.0,
            EVP_aes_256_gcm(),
            std::ptr::null_mut(),
            key.as_ptr(),
            nonce.as_ptr(),
        )
    };
    if ok != 1 {
        return None;
    }
    for part in parts {
        for piece in part.chunks(MAX_PIECE) {
            let mut out_len: c_int = 0;
            // SAFETY: a null `out` makes GCM treat `in` as associated data (aws-lc e_aes.c,
            // `aes_gcm_cipher`): it only reads `piece.len()` bytes from `piece`, a live slice,
            // and the length fits a C int (at most MAX_PIECE). `out_len` is a valid pointer.
            let ok = unsafe {
                EVP_EncryptUpdate(
                    ctx.0,
                    std::ptr::null_mut(),
                    &mut out_len,
                    piece.as_ptr(),
                    piece.len() as c_int,
                )
            };
            if ok != 1 {
                return None;
            }
        }
    }
    let mut out_len: c_int = 0;
    let mut scratch = [0u8; 16];
    // SAFETY: GCM's final writes no output bytes (`scratch` has room for a block anyway);
    // `out_len` is a valid pointer.
    if unsafe { EVP_EncryptFinal_ex(ctx.0, scratch.as_mut_ptr(), &mut out_len) } != 1 {
        return None;
    }
    let mut tag = [0u8; TAG_LEN];
    // SAFETY: GET_TAG copies `TAG_LEN` bytes into `tag`, which is exactly that long.
    let ok = unsafe {
        EVP_CIPHER_CTX_ctrl(
            ctx.0,
            EVP_CTRL_GCM_GET_TAG as c_int,
            TAG_LEN as c_int,
            tag.as_mut_ptr().cast(),
        )
    };
    (ok == 1).then_some(tag)
}
