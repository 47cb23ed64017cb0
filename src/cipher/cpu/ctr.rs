//! AES-256-CTR with GCM's 32-bit counter, as a tight batched loop over RustCrypto `aes`.
//!
//! `aes` 0.9 picks VAES-512 / VAES-256 / AES-NI at run time and encrypts 64 blocks per
//! instruction group, but the `ctr` crate feeds it through a generic per-block-group
//! interface (~7.6 GB/s here). Here a whole batch of counter blocks is built once, encrypted
//! with one `encrypt_blocks_b2b` call and XORed in wide words, which keeps the VAES pipeline full.

#![forbid(unsafe_code)]

use aes::cipher::consts::U16;
use aes::cipher::{Array, BlockCipherEncrypt};
use zeroize::Zeroize;

use crate::cipher::{BLOCK_LEN, NONCE_LEN};

/// Counter blocks per batch: 4 KiB of keystream, a multiple of the 64-block VAES-512 group,
/// small enough to stay in L1 next to the data.
const BATCH: usize = 256;

type Block = Array<u8, U16>;

/// Generic over the block cipher so the same loop is checked against SP 800-38A F.5.1
/// (AES-128); the backend uses it with AES-256.
///
/// XORs the AES-256-CTR keystream of `nonce` (counter block `nonce || 2 + offset/16`, 32-bit
/// big-endian counter wrapping modulo 2^32 as GCM's inc32) into `dst = src ^ keystream`,
/// starting `offset` bytes into the keystream.
///
/// # Panics
/// If `src` and `dst` differ in length (a caller bug, not an input error).
pub fn ctr32_xor<C: BlockCipherEncrypt<BlockSize = U16>>(
    aes: &C,
    nonce: &[u8; NONCE_LEN],
    offset: u64,
    src: &[u8],
    dst: &mut [u8],
) {
    assert_eq!(
        src.len(),
        dst.len(),
        "ctr_apply: source and destination lengths differ"
    );
    if src.is_empty() {
        return;
    }
    let mut counter = 2u32.wrapping_add((offset / BLOCK_LEN as u64) as u32);
    let skip = (offset % BLOCK_LEN as u64) as usize;
    let mut one = Block::default();
    let keystream_block = |counter: u32, ks: &mut Block| {
        ks[..NONCE_LEN].copy_from_slice(nonce);
        ks[NONCE_LEN..].copy_from_slice(&counter.to_be_bytes());
        aes.encrypt_block(ks);
    };

    let mut pos = 0;
    // A start inside a block: one keystream block, use its tail.
    if skip != 0 {
        keystream_block(counter, &mut one);
        let n = (BLOCK_LEN - skip).min(src.len());
        xor_into(&src[..n], &one[skip..skip + n], &mut dst[..n]);
        pos = n;
        counter = counter.wrapping_add(1);
    }

    // Whole blocks: the keystream is generated in `dst` itself (counter blocks encrypted in
    // place, a batch at a time so it is still in L1), then `src` is XORed over it.
    let (blocks, _) = Block::slice_as_chunks_mut(&mut dst[pos..]);
    let whole = blocks.len() * BLOCK_LEN;
    for (batch, s) in blocks
        .chunks_mut(BATCH)
        .zip(src[pos..pos + whole].chunks(BATCH * BLOCK_LEN))
    {
        for (i, b) in batch.iter_mut().enumerate() {
            b[..NONCE_LEN].copy_from_slice(nonce);
            b[NONCE_LEN..].copy_from_slice(&counter.wrapping_add(i as u32).to_be_bytes());
        }
        aes.encrypt_blocks(batch);
        counter = counter.wrapping_add(batch.len() as u32);
        xor_in_place(Array::slice_as_flattened_mut(batch), s);
    }
    pos += whole;

    // A partial last block.
    if pos < src.len() {
        keystream_block(counter, &mut one);
        let n = src.len() - pos;
        xor_into(&src[pos..], &one[..n], &mut dst[pos..]);
    }
    // Keystream is key-derived material: do not leave it on the stack.
    one.as_mut_slice().zeroize();
}

/// `dst ^= src`, 16 bytes per step (compiles to vector XORs).
#[inline(always)]
fn xor_in_place(dst: &mut [u8], src: &[u8]) {
    debug_assert_eq!(dst.len(), src.len());
    for (d, s) in dst.chunks_exact_mut(16).zip(src.chunks_exact(16)) {
        let v = u128::from_ne_bytes((&*d).try_into().unwrap())
            ^ u128::from_ne_bytes(s.try_into().unwrap());
        d.copy_from_slice(&v.to_ne_bytes());
    }
}

/// `dst = a ^ b`, 64 bytes per step so the compiler emits wide vector XORs.
#[inline(always)]
fn xor_into(a: &[u8], b: &[u8], dst: &mut [u8]) {
    debug_assert!(a.len() == b.len() && b.len() == dst.len());
    let mut d = dst.chunks_exact_mut(64);
    let mut x = a.chunks_exact(64);
    let mut y = b.chunks_exact(64);
    for ((d, x), y) in (&mut d).zip(&mut x).zip(&mut y) {
        for i in 0..64 {
            d[i] = x[i] ^ y[i];
        }
    }
    for ((d, x), y) in d
        .into_remainder()
        .iter_mut()
        .zip(x.remainder())
        .zip(y.remainder())
    {
        *d = x ^ y;
    }
}
