//! The AES and GHASH arithmetic the host does for the kernels: the S-box and T-table the
//! shaders read, AES-256 key expansion (round keys uploaded per key), GF(2^128) products and
//! powers (the GPU GHASH's per-key tables, and combining its partial sums), and a streaming
//! GHASH for tags computed on the host.
#![forbid(unsafe_code)]

use ghash::GHash;
use ghash::universal_hash::UniversalHash;
use zeroize::{Zeroize, Zeroizing};

use super::params::{GHASH_SEGMENT, GHASH_WORKGROUP};

/// FIPS-197 S-box, computed (multiplicative inverse in GF(2^8), then the affine map).
pub(super) fn sbox_table() -> [u8; 256] {
    let mut sbox = [0u8; 256];
    let (mut p, mut q) = (1u8, 1u8);
    loop {
        // p *= 3, q /= 3: walk the multiplicative group with generator 3 and its inverse.
        p = p ^ (p << 1) ^ if p & 0x80 != 0 { 0x1b } else { 0 };
        q ^= q << 1;
        q ^= q << 2;
        q ^= q << 4;
        if q & 0x80 != 0 {
            q ^= 0x09;
        }
        let x = q ^ q.rotate_left(1) ^ q.rotate_left(2) ^ q.rotate_left(3) ^ q.rotate_left(4);
        sbox[p as usize] = x ^ 0x63;
        if p == 1 {
            break;
        }
    }
    sbox[0] = 0x63;
    sbox
}

fn xtime(x: u8) -> u8 {
    (x << 1) ^ if x & 0x80 != 0 { 0x1b } else { 0 }
}

/// `T0[x] = (2s, s, s, 3s)` big-endian, `s = S(x)`. The shader derives T1..T3 and S from it.
pub(super) fn t0_table(sbox: &[u8; 256]) -> [u32; 256] {
    let mut t = [0u32; 256];
    for (x, e) in t.iter_mut().enumerate() {
        let s = sbox[x];
        *e = u32::from_be_bytes([xtime(s), s, s, xtime(s) ^ s]);
    }
    t
}

/// AES-256 key expansion: 60 big-endian round-key words.
pub(super) fn expand_key(key: &[u8; 32], sbox: &[u8; 256]) -> Zeroizing<[u32; 60]> {
    let sub = |w: u32| u32::from_be_bytes(w.to_be_bytes().map(|b| sbox[b as usize]));
    let mut w = Zeroizing::new([0u32; 60]);
    for i in 0..8 {
        w[i] = u32::from_be_bytes(key[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    }
    let mut rcon = 1u8;
    for i in 8..60 {
        let mut t = w[i - 1];
        if i % 8 == 0 {
            t = sub(t.rotate_left(8)) ^ (u32::from(rcon) << 24);
            rcon = xtime(rcon);
        } else if i % 8 == 4 {
            t = sub(t);
        }
        w[i] = w[i - 8] ^ t;
    }
    w
}

/// GF(2^128) product in GCM's bit order, on 128-bit big-endian integers (the byte string read
/// big-endian). Branch-free: the secret operands steer no branch or index.
pub(super) fn gf_mul(a: u128, b: u128) -> u128 {
    const R: u128 = 0xe1 << 120;
    let (mut z, mut v) = (0u128, b);
    for i in 0..128 {
        let bit = (a >> (127 - i)) & 1;
        z ^= v & bit.wrapping_neg();
        v = (v >> 1) ^ (R & (v & 1).wrapping_neg());
    }
    z
}

/// `h^e` by square and multiply (`e` is a public length; timing may depend on it).
pub(super) fn gf_pow(h: u128, mut e: u64) -> u128 {
    // x^0 is the most significant bit: the field's one.
    let (mut acc, mut base) = (1u128 << 127, h);
    while e > 0 {
        if e & 1 == 1 {
            acc = gf_mul(acc, base);
        }
        base = gf_mul(base, base);
        e >>= 1;
    }
    acc
}

/// The GHASH shader's per-key tables: the 4-bit Shoup table of H, the x^4 reduction words
/// (not secret, but uploaded together) and the segment powers H^(SEGMENT * (255 - t)).
pub(super) fn ghash_tables(h: u128) -> (Zeroizing<Vec<u32>>, Zeroizing<Vec<u32>>) {
    let words = |x: u128| {
        [
            (x >> 96) as u32,
            (x >> 64) as u32,
            (x >> 32) as u32,
            x as u32,
        ]
    };
    let mut tables = Zeroizing::new(Vec::with_capacity(16 * 4 + 16));
    for i in 0..16u128 {
        tables.extend(words(gf_mul(i << 124, h)));
    }
    for r in 0..16u128 {
        // r * x^4 for r below x^4's degree: what a 4-bit right shift drops, folded back in.
        let folded = gf_mul(r, 1u128 << 123);
        debug_assert_eq!(folded & ((1u128 << 96) - 1), 0);
        tables.push((folded >> 96) as u32);
    }
    let step = gf_pow(h, GHASH_SEGMENT);
    let mut powers = Zeroizing::new(vec![0u32; GHASH_WORKGROUP as usize * 4]);
    let mut p = 1u128 << 127;
    for t in (0..GHASH_WORKGROUP as usize).rev() {
        powers[4 * t..4 * t + 4].copy_from_slice(&words(p));
        p = gf_mul(p, step);
    }
    (tables, powers)
}

/// GHASH over a byte stream with GCM's padding only where a field ends.
pub(super) struct GhashStream {
    g: GHash,
    partial: [u8; 16],
    fill: usize,
}

impl GhashStream {
    pub(super) fn new(h: &[u8; 16]) -> Self {
        GhashStream {
            g: GHash::new(&(*h).into()),
            partial: [0; 16],
            fill: 0,
        }
    }
    pub(super) fn absorb(&mut self, mut data: &[u8]) {
        if self.fill > 0 {
            let take = (16 - self.fill).min(data.len());
            self.partial[self.fill..self.fill + take].copy_from_slice(&data[..take]);
            self.fill += take;
            data = &data[take..];
            if self.fill < 16 {
                return;
            }
            self.g.update(&[self.partial.into()]);
            self.fill = 0;
        }
        let whole = data.len() / 16 * 16;
        self.g.update_padded(&data[..whole]);
        self.partial[..data.len() - whole].copy_from_slice(&data[whole..]);
        self.fill = data.len() - whole;
    }
    /// Ends a field: zero-pads the last partial block.
    pub(super) fn pad(&mut self) {
        if self.fill > 0 {
            self.partial[self.fill..].fill(0);
            self.g.update(&[self.partial.into()]);
            self.fill = 0;
        }
    }
    pub(super) fn finish(mut self, aad_len: usize, ct_len: usize) -> [u8; 16] {
        self.pad();
        let mut lens = [0u8; 16];
        lens[..8].copy_from_slice(&(aad_len as u64 * 8).to_be_bytes());
        lens[8..].copy_from_slice(&(ct_len as u64 * 8).to_be_bytes());
        self.g.update(&[lens.into()]);
        self.partial.zeroize();
        self.g.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use aes::Aes256;
    use aes::cipher::{BlockCipherEncrypt, KeyInit};

    use super::*;
    use crate::cipher::Cipher;
    use crate::cipher::cpu::CpuCipher;
    use crate::keys::DataKey;

    #[test]
    fn key_expansion_matches_fips197_a3() {
        // FIPS-197 appendix A.3: last round-key words of the AES-256 example key.
        let key: [u8; 32] =
            hex::decode("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
                .unwrap()
                .try_into()
                .unwrap();
        let w = expand_key(&key, &sbox_table());
        assert_eq!(w[8], 0x9ba35411);
        assert_eq!(w[59], 0x706c631e);
    }

    #[test]
    fn sbox_matches_known_entries() {
        let s = sbox_table();
        assert_eq!(
            (s[0x00], s[0x01], s[0x53], s[0xff]),
            (0x63, 0x7c, 0xed, 0x16)
        );
    }

    #[test]
    fn ghash_stream_matches_reference_gmac() {
        // The CPU backend's GMAC (aes-gcm over aad || data) for unaligned field lengths.
        let key = DataKey::from_bytes([9u8; 32]);
        let cpu = CpuCipher::new().prepare(&key).unwrap();
        let aes = Aes256::new(key.as_bytes().into());
        let mut h = [0u8; 16];
        aes.encrypt_block((&mut h).into());
        for (a, d) in [(0usize, 0usize), (89, 0), (89, 1000), (16, 33), (3, 5)] {
            let aad = vec![0x11u8; a];
            let mut data = vec![0x22u8; d];
            let want = cpu.seal_in_place(&[1; 12], &aad, false, &mut data).unwrap();
            let mut g = GhashStream::new(&h);
            g.absorb(&aad);
            g.absorb(&data);
            let mut got = g.finish(a + d, 0);
            let mut j0 = [0u8; 16];
            j0[..12].copy_from_slice(&[1; 12]);
            j0[15] = 1;
            aes.encrypt_block((&mut j0).into());
            got.iter_mut().zip(j0).for_each(|(t, e)| *t ^= e);
            assert_eq!(got, want, "aad {a} data {d}");
        }
    }

    #[test]
    fn gf_mul_and_pow_match_the_ghash_crate() {
        // One GHASH block with key b is a * b; a chain of n zero-free blocks checks powers.
        let mut rng = crate::cipher::conformance::SplitMix(7);
        for _ in 0..50 {
            let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
            rng.fill(&mut a);
            rng.fill(&mut b);
            let mut g = GHash::new(&b.into());
            g.update(&[a.into()]);
            let want = u128::from_be_bytes(g.finalize().into());
            assert_eq!(gf_mul(u128::from_be_bytes(a), u128::from_be_bytes(b)), want);
        }
        let h = 0x66e94bd4ef8a2c3b884cfa59ca342b2eu128;
        let mut p = 1u128 << 127;
        for e in 0..40u64 {
            assert_eq!(gf_pow(h, e), p, "h^{e}");
            p = gf_mul(p, h);
        }
        // The Shoup table's reduction words touch only the top word.
        let (tables, powers) = ghash_tables(h);
        assert_eq!(tables.len(), 80);
        assert_eq!(powers.len(), 1024);
    }
}
