//! AES-256-CTR with GCM's 32-bit counter on VAES-512: 16 blocks per step, counters built and
//! keystream XORed in registers (no keystream buffer in memory).
//!
//! Used only when the CPU has AVX-512F/BW, VAES and AES-NI (checked at run time by
//! [`VaesCtrKey::new`]); otherwise the CPU backend uses the portable loop in `super::ctr`.
//! All `unsafe` of this module is the intrinsics, each call guarded by that detection.

#![allow(unsafe_code)] // the VAES-512 intrinsics, each call behind run-time CPU detection; the crate denies it elsewhere

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::x86_64::*;

    use zeroize::Zeroize;

    use crate::cipher::{BLOCK_LEN, NONCE_LEN};

    /// Expanded AES-256 round keys for the VAES path; zeroized on drop.
    pub struct VaesCtrKey {
        round_keys: [[u8; 16]; 15],
    }

    impl Drop for VaesCtrKey {
        fn drop(&mut self) {
            self.round_keys.zeroize();
        }
    }

    fn detected() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("vaes")
            && is_x86_feature_detected!("aes")
    }

    impl VaesCtrKey {
        /// Expands `key`, or `None` if this CPU lacks VAES-512.
        pub fn new(key: &[u8; 32]) -> Option<Self> {
            if !detected() {
                return None;
            }
            let mut round_keys = [[0u8; 16]; 15];
            // SAFETY: AES-NI was detected just above.
            unsafe { expand_key(key, &mut round_keys) };
            Some(VaesCtrKey { round_keys })
        }

        /// `dst = src ^ keystream`, keystream of counter blocks `nonce || 2 + offset/16 ...`
        /// (inc32, wrapping mod 2^32) starting `offset` bytes in.
        pub fn xor(&self, nonce: &[u8; NONCE_LEN], offset: u64, src: &[u8], dst: &mut [u8]) {
            assert_eq!(
                src.len(),
                dst.len(),
                "ctr_apply: source and destination lengths differ"
            );
            let mut counter = 2u32.wrapping_add((offset / BLOCK_LEN as u64) as u32);
            let skip = (offset % BLOCK_LEN as u64) as usize;
            let mut pos = 0;
            let mut ks = [0u8; 64];
            if skip != 0 && !src.is_empty() {
                // SAFETY: VAES-512 was detected when this key was created (`new`).
                unsafe { keystream4(&self.round_keys, nonce, counter, &mut ks) };
                let n = (BLOCK_LEN - skip).min(src.len());
                for i in 0..n {
                    dst[i] = src[i] ^ ks[skip + i];
                }
                pos = n;
                counter = counter.wrapping_add(1);
            }
            let whole = (src.len() - pos) / 64 * 64;
            if whole > 0 {
                // SAFETY: VAES-512 detected at `new`; both ranges are in bounds and `whole`
                // is a multiple of 64 bytes, as `xor_groups` requires.
                unsafe {
                    xor_groups(
                        &self.round_keys,
                        nonce,
                        counter,
                        &src[pos..pos + whole],
                        &mut dst[pos..pos + whole],
                    )
                };
                counter = counter.wrapping_add((whole / BLOCK_LEN) as u32);
                pos += whole;
            }
            if pos < src.len() {
                // SAFETY: as above.
                unsafe { keystream4(&self.round_keys, nonce, counter, &mut ks) };
                for (i, d) in dst[pos..].iter_mut().enumerate() {
                    *d = src[pos + i] ^ ks[i];
                }
            }
            ks.zeroize();
        }
    }

    macro_rules! expand_step {
        ($rk:ident, $a:ident, $b:ident, $i:expr, $rcon:literal) => {{
            let t = _mm_shuffle_epi32(_mm_aeskeygenassist_si128($b, $rcon), 0xff);
            $a = mix($a, t);
            $rk[$i] = $a;
            if $i + 1 < 15 {
                let t = _mm_shuffle_epi32(_mm_aeskeygenassist_si128($a, 0), 0xaa);
                $b = mix($b, t);
                $rk[$i + 1] = $b;
            }
        }};
    }

    #[target_feature(enable = "aes,sse2")]
    fn mix(k: __m128i, t: __m128i) -> __m128i {
        let mut k = k;
        k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
        k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
        k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
        _mm_xor_si128(k, t)
    }

    /// FIPS 197 AES-256 key expansion with AESKEYGENASSIST (constant time).
    #[target_feature(enable = "aes,sse2")]
    fn expand_key(key: &[u8; 32], out: &mut [[u8; 16]; 15]) {
        // SAFETY: unaligned loads of 16 bytes from a 32-byte array.
        let (mut a, mut b) = unsafe {
            (
                _mm_loadu_si128(key.as_ptr().cast()),
                _mm_loadu_si128(key.as_ptr().add(16).cast()),
            )
        };
        let mut rk = [_mm_setzero_si128(); 15];
        rk[0] = a;
        rk[1] = b;
        expand_step!(rk, a, b, 2, 0x01);
        expand_step!(rk, a, b, 4, 0x02);
        expand_step!(rk, a, b, 6, 0x04);
        expand_step!(rk, a, b, 8, 0x08);
        expand_step!(rk, a, b, 10, 0x10);
        expand_step!(rk, a, b, 12, 0x20);
        expand_step!(rk, a, b, 14, 0x40);
        for (o, k) in out.iter_mut().zip(rk.iter()) {
            // SAFETY: 16-byte unaligned store into a 16-byte array.
            unsafe { _mm_storeu_si128(o.as_mut_ptr().cast(), *k) };
        }
        // Clear the key schedule from the registers' spill slots.
        rk = [_mm_setzero_si128(); 15];
        std::hint::black_box(&rk);
    }

    /// Shuffle that byte-reverses the last 32-bit word of each block: counters are kept
    /// little-endian in registers (plain 32-bit adds wrap as inc32 does) and swapped to GCM's
    /// big-endian just before encryption.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn bswap_ctr_mask() -> __m512i {
        let lane: [i8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 15, 14, 13, 12];
        let mut all = [0i8; 64];
        for (i, b) in all.iter_mut().enumerate() {
            *b = lane[i % 16];
        }
        // SAFETY: 64-byte unaligned load from a 64-byte array.
        unsafe { _mm512_loadu_si512(all.as_ptr().cast()) }
    }

    /// Four counter blocks `counter .. counter+3` in register order (little-endian counter).
    #[target_feature(enable = "avx512f")]
    fn counters(nonce: &[u8; NONCE_LEN], counter: u32) -> __m512i {
        let mut block = [0u8; 16];
        block[..12].copy_from_slice(nonce);
        block[12..].copy_from_slice(&counter.to_le_bytes());
        // SAFETY: 16-byte unaligned load from a 16-byte array.
        let one = unsafe { _mm_loadu_si128(block.as_ptr().cast()) };
        _mm512_add_epi32(
            _mm512_broadcast_i32x4(one),
            _mm512_set_epi32(3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0),
        )
    }

    #[target_feature(enable = "avx512f")]
    fn load_keys(rk: &[[u8; 16]; 15]) -> [__m512i; 15] {
        let mut k = [_mm512_setzero_si512(); 15];
        for (z, r) in k.iter_mut().zip(rk.iter()) {
            // SAFETY: 16-byte unaligned load from a 16-byte array.
            *z = _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(r.as_ptr().cast()) });
        }
        k
    }

    #[target_feature(enable = "avx512f,vaes")]
    fn encrypt(k: &[__m512i; 15], x: __m512i) -> __m512i {
        let mut x = _mm512_xor_si512(x, k[0]);
        for key in &k[1..14] {
            x = _mm512_aesenc_epi128(x, *key);
        }
        _mm512_aesenclast_epi128(x, k[14])
    }

    /// 64 bytes of keystream (blocks `counter .. counter+3`) into `out`.
    #[target_feature(enable = "avx512f,avx512bw,vaes")]
    fn keystream4(rk: &[[u8; 16]; 15], nonce: &[u8; NONCE_LEN], counter: u32, out: &mut [u8; 64]) {
        let k = load_keys(rk);
        let x = encrypt(
            &k,
            _mm512_shuffle_epi8(counters(nonce, counter), bswap_ctr_mask()),
        );
        // SAFETY: 64-byte unaligned store into a 64-byte array.
        unsafe { _mm512_storeu_si512(out.as_mut_ptr().cast(), x) };
    }

    /// `dst = src ^ keystream` for `src.len()` a multiple of 64, 16 blocks per step.
    #[target_feature(enable = "avx512f,avx512bw,vaes")]
    fn xor_groups(
        rk: &[[u8; 16]; 15],
        nonce: &[u8; NONCE_LEN],
        counter: u32,
        src: &[u8],
        dst: &mut [u8],
    ) {
        debug_assert!(src.len() == dst.len() && src.len().is_multiple_of(64));
        let k = load_keys(rk);
        let mask = bswap_ctr_mask();
        let four = _mm512_set_epi32(4, 0, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0);
        let sixteen = _mm512_set_epi32(16, 0, 0, 0, 16, 0, 0, 0, 16, 0, 0, 0, 16, 0, 0, 0);
        let mut c = counters(nonce, counter);
        let mut big_d = dst.chunks_exact_mut(256);
        let mut big_s = src.chunks_exact(256);
        for (d, s) in (&mut big_d).zip(&mut big_s) {
            let c1 = _mm512_add_epi32(c, four);
            let c2 = _mm512_add_epi32(c1, four);
            let c3 = _mm512_add_epi32(c2, four);
            let mut x0 = _mm512_xor_si512(_mm512_shuffle_epi8(c, mask), k[0]);
            let mut x1 = _mm512_xor_si512(_mm512_shuffle_epi8(c1, mask), k[0]);
            let mut x2 = _mm512_xor_si512(_mm512_shuffle_epi8(c2, mask), k[0]);
            let mut x3 = _mm512_xor_si512(_mm512_shuffle_epi8(c3, mask), k[0]);
            for key in &k[1..14] {
                x0 = _mm512_aesenc_epi128(x0, *key);
                x1 = _mm512_aesenc_epi128(x1, *key);
                x2 = _mm512_aesenc_epi128(x2, *key);
                x3 = _mm512_aesenc_epi128(x3, *key);
            }
            x0 = _mm512_aesenclast_epi128(x0, k[14]);
            x1 = _mm512_aesenclast_epi128(x1, k[14]);
            x2 = _mm512_aesenclast_epi128(x2, k[14]);
            x3 = _mm512_aesenclast_epi128(x3, k[14]);
            // SAFETY: `s` and `d` are exactly 256 bytes (chunks_exact); unaligned 64-byte
            // loads and stores at offsets 0, 64, 128, 192 stay inside them.
            unsafe {
                let sp = s.as_ptr();
                let dp = d.as_mut_ptr();
                _mm512_storeu_si512(
                    dp.cast(),
                    _mm512_xor_si512(x0, _mm512_loadu_si512(sp.cast())),
                );
                _mm512_storeu_si512(
                    dp.add(64).cast(),
                    _mm512_xor_si512(x1, _mm512_loadu_si512(sp.add(64).cast())),
                );
                _mm512_storeu_si512(
                    dp.add(128).cast(),
                    _mm512_xor_si512(x2, _mm512_loadu_si512(sp.add(128).cast())),
                );
                _mm512_storeu_si512(
                    dp.add(192).cast(),
                    _mm512_xor_si512(x3, _mm512_loadu_si512(sp.add(192).cast())),
                );
            }
            c = _mm512_add_epi32(c, sixteen);
        }
        for (d, s) in big_d
            .into_remainder()
            .chunks_exact_mut(64)
            .zip(big_s.remainder().chunks_exact(64))
        {
            let x = encrypt(&k, _mm512_shuffle_epi8(c, mask));
            // SAFETY: `s` and `d` are exactly 64 bytes (chunks_exact).
            unsafe {
                _mm512_storeu_si512(
                    d.as_mut_ptr().cast(),
                    _mm512_xor_si512(x, _mm512_loadu_si512(s.as_ptr().cast())),
                )
            };
            c = _mm512_add_epi32(c, four);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub use imp::VaesCtrKey;

/// Stand-in on other architectures: never available.
#[cfg(not(target_arch = "x86_64"))]
pub struct VaesCtrKey;

#[cfg(not(target_arch = "x86_64"))]
impl VaesCtrKey {
    /// Always `None` off x86-64.
    pub fn new(_key: &[u8; 32]) -> Option<Self> {
        None
    }
    /// Never called (no instance exists).
    pub fn xor(
        &self,
        _nonce: &[u8; crate::cipher::NONCE_LEN],
        _offset: u64,
        _src: &[u8],
        _dst: &mut [u8],
    ) {
        unreachable!("VaesCtrKey cannot be constructed off x86-64")
    }
}
