//! Conformance suite run against every backend: known-answer vectors from the standards,
//! counter seek and wrap, and a randomized cross-check against the CPU reference.
//!
//! Each backend's tests call [`run`]; one body, every device (as candle's `test_device!`).

#![forbid(unsafe_code)]

use super::{ChunkParams, Cipher, NONCE_LEN, OpenError};
use crate::keys::DataKey;

fn h(s: &str) -> Vec<u8> {
    hex::decode(s.replace(' ', "")).expect("valid hex in test vector")
}

fn arr<const N: usize>(s: &str) -> [u8; N] {
    h(s).try_into().expect("vector length")
}

/// One GCM known-answer vector (McGrew & Viega, "The Galois/Counter Mode of Operation", AES-256
/// test cases 13-16).
pub struct GcmVector {
    /// Key.
    pub key: &'static str,
    /// 96-bit IV.
    pub iv: &'static str,
    /// Plaintext.
    pub pt: &'static str,
    /// Associated data.
    pub aad: &'static str,
    /// Ciphertext.
    pub ct: &'static str,
    /// Tag.
    pub tag: &'static str,
}

/// The GCM spec's AES-256 vectors with 96-bit IVs.
pub const GCM_VECTORS: &[GcmVector] = &[
    GcmVector {
        key: "0000000000000000000000000000000000000000000000000000000000000000",
        iv: "000000000000000000000000",
        pt: "",
        aad: "",
        ct: "",
        tag: "530f8afbc74536b9a963b4f1c4cb738b",
    },
    GcmVector {
        key: "0000000000000000000000000000000000000000000000000000000000000000",
        iv: "000000000000000000000000",
        pt: "00000000000000000000000000000000",
        aad: "",
        ct: "cea7403d4d606b6e074ec5d3baf39d18",
        tag: "d0d1c8a799996bf0265b98b5d48ab919",
    },
    GcmVector {
        key: "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
        iv: "cafebabefacedbaddecaf888",
        pt: "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255",
        aad: "",
        ct: "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad",
        tag: "b094dac5d93471bdec1a502270e3cc6c",
    },
    GcmVector {
        key: "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
        iv: "cafebabefacedbaddecaf888",
        pt: "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        aad: "feedfacedeadbeeffeedfacedeadbeefabaddad2",
        ct: "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
        tag: "76fc6ece0f4e1768cddf8853bb2d551b",
    },
];

/// NIST SP 800-38A F.5.5 (CTR-AES256.Encrypt): key, initial counter block, plaintext, ciphertext.
pub const SP800_38A_F55: (&str, &str, &str, &str) = (
    "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4",
    "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff",
    "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e5130c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710",
    "601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c52b0930daa23de94ce87017ba2d84988ddfc9c58db67aada613c2dd08457941a6",
);

/// Byte offset into a chunk whose first counter block is `nonce || ctr32` (GCM starts at 2).
pub fn offset_for_counter(ctr32: u32) -> u64 {
    u64::from(ctr32.wrapping_sub(2)) * 16
}

/// Small deterministic generator for the randomized cases (no dependency on `rand`'s API).
pub struct SplitMix(pub u64);
impl SplitMix {
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(what()) }
}

/// Runs the whole suite against `cipher`, comparing with the CPU reference where there is no
/// published vector. `random_cases` sets how many randomized chunks to try.
pub fn run(cipher: &dyn Cipher, random_cases: usize) -> Result<(), String> {
    let name = cipher.backend().name();
    let reference = super::cpu::reference::ReferenceCipher::new();

    // GCM spec vectors: open, open_in_place, verify, seal, and tamper rejection.
    for (i, v) in GCM_VECTORS.iter().enumerate() {
        let key = DataKey::from_bytes(arr(v.key));
        let op = cipher
            .prepare(&key)
            .map_err(|e| format!("{name}: prepare: {e}"))?;
        let (pt, ct, aad) = (h(v.pt), h(v.ct), h(v.aad));
        let params = ChunkParams {
            nonce: arr(v.iv),
            aad: &aad,
            tag: arr(v.tag),
            encrypted: true,
        };
        let mut out = vec![0u8; ct.len()];
        op.open(&params, &ct, &mut out)
            .map_err(|e| format!("{name}: GCM vector {i}: open: {e}"))?;
        check(out == pt, || {
            format!("{name}: GCM vector {i}: wrong plaintext")
        })?;
        let mut buf = ct.clone();
        op.open_in_place(&params, &mut buf)
            .map_err(|e| format!("{name}: GCM vector {i}: in place: {e}"))?;
        check(buf == pt, || {
            format!("{name}: GCM vector {i}: in place: wrong plaintext")
        })?;
        op.verify(&params, &ct)
            .map_err(|e| format!("{name}: GCM vector {i}: verify: {e}"))?;
        let mut sealed = pt.clone();
        let tag = op
            .seal_in_place(&params.nonce, &aad, true, &mut sealed)
            .map_err(|e| format!("{name}: GCM vector {i}: seal: {e}"))?;
        check(sealed == ct && tag == params.tag, || {
            format!("{name}: GCM vector {i}: seal differs")
        })?;
        let mut bad = params;
        bad.tag[0] ^= 1;
        let mut out2 = vec![0xAAu8; ct.len()];
        check(
            matches!(op.open(&bad, &ct, &mut out2), Err(OpenError::TagMismatch)),
            || format!("{name}: GCM vector {i}: bad tag accepted"),
        )?;
        check(out2.iter().all(|&b| b == 0), || {
            format!("{name}: GCM vector {i}: output not zeroed on failure")
        })?;
    }

    // SP 800-38A F.5.5 through ctr_apply: nonce = first 12 bytes of the counter block, and the
    // offset that makes the first counter equal its last 4 bytes.
    let (k, iv, pt, ct) = SP800_38A_F55;
    let op = cipher
        .prepare(&DataKey::from_bytes(arr(k)))
        .map_err(|e| format!("{name}: {e}"))?;
    let iv = h(iv);
    let nonce: [u8; NONCE_LEN] = iv[..12].try_into().unwrap();
    let ctr = u32::from_be_bytes(iv[12..].try_into().unwrap());
    let (pt, ct) = (h(pt), h(ct));
    let mut out = vec![0u8; pt.len()];
    op.ctr_apply(&nonce, offset_for_counter(ctr), &pt, &mut out)
        .map_err(|e| format!("{name}: ctr_apply: {e}"))?;
    check(out == ct, || {
        format!("{name}: SP 800-38A F.5.5 CTR mismatch")
    })?;
    // Mid-vector seek: start at block 2 and at an unaligned byte.
    for start in [16usize, 32, 37, 63] {
        let mut part = vec![0u8; pt.len() - start];
        op.ctr_apply(
            &nonce,
            offset_for_counter(ctr) + start as u64,
            &pt[start..],
            &mut part,
        )
        .map_err(|e| format!("{name}: ctr_apply: {e}"))?;
        check(part == ct[start..], || {
            format!("{name}: F.5.5 seek to byte {start} mismatch")
        })?;
    }

    // Randomized cross-check against the reference, including counter wrap and tiny lengths.
    let mut rng = SplitMix(0xC1F4_E25A_u64 ^ random_cases as u64);
    let lens = [0usize, 1, 15, 16, 17, 31, 64, 255, 4096, 65_537];
    for case in 0..random_cases.max(lens.len()) {
        let mut kb = [0u8; 32];
        rng.fill(&mut kb);
        let key = DataKey::from_bytes(kb);
        let op = cipher.prepare(&key).map_err(|e| format!("{name}: {e}"))?;
        let rop = reference.prepare(&key).map_err(|e| e.to_string())?;
        let len = if case < lens.len() {
            lens[case]
        } else {
            rng.below(300_000) as usize
        };
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill(&mut nonce);
        let mut aad = vec![0u8; 89];
        rng.fill(&mut aad);
        let mut pt = vec![0u8; len];
        rng.fill(&mut pt);
        let encrypted = case % 5 != 4;
        let mut ct = pt.clone();
        let tag = rop
            .seal_in_place(&nonce, &aad, encrypted, &mut ct)
            .map_err(|e| e.to_string())?;
        let mut ct2 = pt.clone();
        let tag2 = op
            .seal_in_place(&nonce, &aad, encrypted, &mut ct2)
            .map_err(|e| format!("{name}: case {case}: seal: {e}"))?;
        check(ct2 == ct && tag2 == tag, || {
            format!("{name}: case {case}: seal differs from reference (len {len})")
        })?;
        let params = ChunkParams {
            nonce,
            aad: &aad,
            tag,
            encrypted,
        };
        let mut out = vec![0u8; len];
        op.open(&params, &ct, &mut out)
            .map_err(|e| format!("{name}: case {case}: open (len {len}): {e}"))?;
        check(out == pt, || {
            format!("{name}: case {case}: open wrong plaintext (len {len})")
        })?;
        op.verify(&params, &ct)
            .map_err(|e| format!("{name}: case {case}: verify: {e}"))?;
        if len > 0 {
            let mut bad = ct.clone();
            let at = rng.below(len as u64) as usize;
            bad[at] ^= 1 << rng.below(8);
            let mut out = vec![0x55u8; len];
            check(
                matches!(
                    op.open(&params, &bad, &mut out),
                    Err(OpenError::TagMismatch)
                ),
                || format!("{name}: case {case}: flipped byte {at} accepted"),
            )?;
            check(out.iter().all(|&b| b == 0), || {
                format!("{name}: case {case}: not zeroed after failure")
            })?;
            check(
                matches!(op.verify(&params, &bad), Err(OpenError::TagMismatch)),
                || format!("{name}: case {case}: verify accepted flipped byte"),
            )?;
        }
        if encrypted && len > 0 {
            // Seek: decrypt a random sub-range, counters near the 32-bit wrap.
            let a = rng.below(len as u64) as usize;
            let b = a + rng.below((len - a) as u64 + 1) as usize;
            let mut part = vec![0u8; b - a];
            op.ctr_apply(&nonce, a as u64, &ct[a..b], &mut part)
                .map_err(|e| format!("{name}: case {case}: ctr_apply: {e}"))?;
            check(part == pt[a..b], || {
                format!("{name}: case {case}: ctr seek {a}..{b} mismatch")
            })?;
            let near_wrap = offset_for_counter(u32::MAX - rng.below(4) as u32) + rng.below(16);
            let span = (len - a).min(200);
            let mut x = vec![0u8; span];
            let mut y = vec![0u8; span];
            op.ctr_apply(&nonce, near_wrap, &pt[a..a + span], &mut x)
                .map_err(|e| format!("{name}: case {case}: ctr_apply: {e}"))?;
            rop.ctr_apply(&nonce, near_wrap, &pt[a..a + span], &mut y)
                .map_err(|e| e.to_string())?;
            check(x == y, || {
                format!("{name}: case {case}: counter wrap mismatch")
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_backend_conforms() {
        super::run(&super::super::cpu::CpuCipher::new(), 40).unwrap();
    }
}
