//! Property tests: the fast CPU backend against the independent RustCrypto reference, over
//! random keys, lengths (empty, 1 byte, not multiples of 16), offsets, counter wrap and chunk
//! splits; tampering always rejected with the destination zeroed.

use aes::cipher::KeyInit;
use ciphershard::DataKey;
use ciphershard::cipher::conformance::{self, offset_for_counter};
use ciphershard::cipher::cpu::reference::ReferenceCipher;
use ciphershard::cipher::cpu::{CpuCipher, ctr::ctr32_xor};
use ciphershard::cipher::{ChunkOpener, ChunkParams, Cipher, OpenError};
use proptest::prelude::*;

fn openers(key: [u8; 32]) -> (Box<dyn ChunkOpener>, Box<dyn ChunkOpener>) {
    let key = DataKey::from_bytes(key);
    (
        CpuCipher::new().prepare(&key).unwrap(),
        ReferenceCipher::new().prepare(&key).unwrap(),
    )
}

fn length() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        Just(1),
        Just(15),
        Just(16),
        Just(17),
        Just(255),
        0usize..5000,
        5000usize..70_000
    ]
}

fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    conformance::SplitMix(seed).fill(&mut v);
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Seal, open (buffer and in place) and verify agree with the reference, for encrypted
    /// and plain chunks, any AAD length.
    #[test]
    fn seal_open_verify_match_reference(
        key in any::<[u8; 32]>(), nonce in any::<[u8; 12]>(), len in length(),
        aad_len in 0usize..120, seed in any::<u64>(), encrypted in any::<bool>(),
    ) {
        let (fast, reference) = openers(key);
        let pt = bytes(len, seed);
        let aad = bytes(aad_len, !seed);
        let mut ct = pt.clone();
        let tag = reference.seal_in_place(&nonce, &aad, encrypted, &mut ct).unwrap();
        let mut ct_fast = pt.clone();
        prop_assert_eq!(fast.seal_in_place(&nonce, &aad, encrypted, &mut ct_fast).unwrap(), tag);
        prop_assert_eq!(&ct_fast, &ct);
        if !encrypted {
            prop_assert_eq!(&ct, &pt);
        }

        let p = ChunkParams { nonce, aad: &aad, tag, encrypted };
        prop_assert!(fast.verify(&p, &ct).is_ok());
        let mut out = vec![0xEEu8; len];
        prop_assert!(fast.open(&p, &ct, &mut out).is_ok());
        prop_assert_eq!(&out, &pt);
        let mut buf = ct.clone();
        prop_assert!(fast.open_in_place(&p, &mut buf).is_ok());
        prop_assert_eq!(&buf, &pt);
    }

    /// Any flipped bit in the bytes, the AAD or the tag is rejected by open, open_in_place and
    /// verify, and the destination is all zeros afterwards.
    #[test]
    fn tampering_rejected_and_zeroed(
        key in any::<[u8; 32]>(), nonce in any::<[u8; 12]>(), len in length(),
        seed in any::<u64>(), encrypted in any::<bool>(), target in 0u8..3, at in any::<usize>(), bit in 0u8..8,
    ) {
        let (fast, _) = openers(key);
        let mut ct = bytes(len, seed);
        let mut aad = bytes(89, !seed);
        let mut tag = fast.seal_in_place(&nonce, &aad, encrypted, &mut ct).unwrap();
        match target {
            0 if len > 0 => ct[at % len] ^= 1 << bit,
            1 => aad[at % 89] ^= 1 << bit,
            _ => tag[at % 16] ^= 1 << bit,
        }
        let p = ChunkParams { nonce, aad: &aad, tag, encrypted };
        prop_assert!(matches!(fast.verify(&p, &ct), Err(OpenError::TagMismatch)));
        let mut out = vec![0xEEu8; len];
        prop_assert!(matches!(fast.open(&p, &ct, &mut out), Err(OpenError::TagMismatch)));
        prop_assert!(out.iter().all(|&b| b == 0));
        let mut buf = ct.clone();
        prop_assert!(matches!(fast.open_in_place(&p, &mut buf), Err(OpenError::TagMismatch)));
        prop_assert!(buf.iter().all(|&b| b == 0));
    }

    /// ctr_apply from any byte offset, including across the 32-bit counter wrap, equals the
    /// reference; so does the portable (non-VAES) loop.
    #[test]
    fn ctr_apply_matches_reference(
        key in any::<[u8; 32]>(), nonce in any::<[u8; 12]>(), len in length(), seed in any::<u64>(),
        offset in prop_oneof![0u64..100_000, (0u32..40, 0u64..16).prop_map(|(k, b)| offset_for_counter(u32::MAX - k) + b)],
    ) {
        let (fast, reference) = openers(key);
        let src = bytes(len, seed);
        let mut want = vec![0u8; len];
        reference.ctr_apply(&nonce, offset, &src, &mut want).unwrap();
        let mut got = vec![0u8; len];
        fast.ctr_apply(&nonce, offset, &src, &mut got).unwrap();
        prop_assert_eq!(&got, &want);
        let aes = aes::Aes256::new(&key.into());
        let mut portable = vec![0u8; len];
        ctr32_xor(&aes, &nonce, offset, &src, &mut portable);
        prop_assert_eq!(&portable, &want);
    }

    /// Decrypting a verified chunk piecewise with ctr_apply at random split points gives the
    /// same plaintext as one open (the loader's row-range path).
    #[test]
    fn piecewise_ctr_equals_open(
        key in any::<[u8; 32]>(), nonce in any::<[u8; 12]>(), len in 1usize..40_000,
        seed in any::<u64>(), cuts in proptest::collection::vec(any::<usize>(), 0..6),
    ) {
        let (fast, _) = openers(key);
        let pt = bytes(len, seed);
        let mut ct = pt.clone();
        let tag = fast.seal_in_place(&nonce, &[], true, &mut ct).unwrap();
        let p = ChunkParams { nonce, aad: &[], tag, encrypted: true };
        prop_assert!(fast.verify(&p, &ct).is_ok());
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (len + 1)).collect();
        points.extend([0, len]);
        points.sort_unstable();
        let mut out = vec![0u8; len];
        for w in points.windows(2) {
            fast.ctr_apply(&nonce, w[0] as u64, &ct[w[0]..w[1]], &mut out[w[0]..w[1]]).unwrap();
        }
        prop_assert_eq!(&out, &pt);
    }
}

/// NIST SP 800-38A F.5.1 (CTR-AES128.Encrypt) through the portable CTR loop, which is generic
/// over the block cipher. (The VAES-512 path and the backend are AES-256 only; F.5.5 covers
/// them in the conformance suite.)
#[test]
fn sp800_38a_f51_aes128_portable_ctr() {
    let key = hex::decode("2b7e151628aed2a6abf7158809cf4f3c").unwrap();
    let counter_block = hex::decode("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff").unwrap();
    let pt = hex::decode("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e5130c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710").unwrap();
    let ct = hex::decode("874d6191b620e3261bef6864990db6ce9806f66b7970fdff8617187bb9fffdff5ae4df3edbd5d35e5b4f09020db03eab1e031dda2fbe03d1792170a0f3009cee").unwrap();
    let aes = aes::Aes128::new_from_slice(&key).unwrap();
    let nonce: [u8; 12] = counter_block[..12].try_into().unwrap();
    let ctr = u32::from_be_bytes(counter_block[12..].try_into().unwrap());
    for start in [0usize, 5, 16, 33] {
        let mut out = vec![0u8; pt.len() - start];
        ctr32_xor(
            &aes,
            &nonce,
            offset_for_counter(ctr) + start as u64,
            &pt[start..],
            &mut out,
        );
        assert_eq!(
            hex::encode(&out),
            hex::encode(&ct[start..]),
            "F.5.1 from byte {start}"
        );
    }
}

/// The whole conformance suite, as every backend runs it.
#[test]
fn cpu_backend_conformance() {
    conformance::run(&CpuCipher::new(), 200).unwrap();
}
