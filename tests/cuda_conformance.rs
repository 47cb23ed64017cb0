//! The conformance suite and a batch-API check on the CUDA backend. Skips, saying why, where no
//! CUDA device answers (the GPU check script runs this binary on the lent machine).
#![cfg(feature = "cuda")]

use std::sync::Arc;

use ciphershard::cipher::conformance::{self, SplitMix};
use ciphershard::cipher::cuda::{self, BatchChunk, CudaCipher, StagedChunk, WaitError};
use ciphershard::cipher::{ChunkParams, Cipher, cpu::CpuCipher};
use ciphershard::keys::DataKey;

fn device() -> Option<Arc<CudaCipher>> {
    if let Err(why) = cuda::probe() {
        eprintln!("SKIPPED: {why}");
        return None;
    }
    Some(CudaCipher::new(0).expect("CUDA backend on a machine where probe succeeded"))
}

#[test]
fn cuda_backend_conforms() {
    let Some(c) = device() else { return };
    // A device failure is an error of the call that met it (no CPU fallback), so a broken
    // device fails the suite rather than passing on the CPU.
    conformance::run(c.as_ref(), 60).unwrap();
}

#[test]
fn batch_decrypts_into_device_memory_and_rejects_tampering() {
    let Some(c) = device() else { return };
    let cpu = CpuCipher::new();
    let mut rng = SplitMix(7);
    let mut kb = [0u8; 32];
    rng.fill(&mut kb);
    let key = DataKey::from_bytes(kb);
    let rop = cpu.prepare(&key).unwrap();
    let dkey = c.prepare_device(&key).unwrap();
    let lens = [1usize << 20, 5, 0, 4096, 123_457, 16];
    let aad = vec![9u8; 89];
    let mut pts = Vec::new();
    let mut cts = Vec::new();
    let mut tags = Vec::new();
    for (i, &len) in lens.iter().enumerate() {
        let mut pt = vec![0u8; len];
        rng.fill(&mut pt);
        let mut ct = pt.clone();
        let nonce = [i as u8; 12];
        tags.push(rop.seal_in_place(&nonce, &aad, i != 3, &mut ct).unwrap());
        pts.push(pt);
        cts.push(ct);
    }
    let mut dec = c.batch_decryptor(3, 4 << 20).unwrap();
    let total: usize = lens.iter().sum();
    for tamper in [false, true] {
        let mut bad = cts[4].clone();
        if tamper {
            bad[100] ^= 0x20;
        }
        let mut at = 0;
        let chunks: Vec<BatchChunk> = (0..lens.len())
            .map(|i| {
                let data: &[u8] = if i == 4 { &bad } else { &cts[i] };
                let ch = BatchChunk {
                    key: &dkey,
                    params: ChunkParams {
                        nonce: [i as u8; 12],
                        aad: &aad,
                        tag: tags[i],
                        encrypted: i != 3,
                    },
                    data,
                    dst_offset: at,
                };
                at += lens[i];
                ch
            })
            .collect();
        let t = dec.submit(&chunks, total).unwrap();
        match dec.wait(t) {
            Ok(batch) => {
                assert!(!tamper, "tampered batch was handed out");
                let host = batch
                    .stream()
                    .clone_dtoh(&batch.slice().slice(..total))
                    .unwrap();
                let want: Vec<u8> = pts.concat();
                assert!(
                    host == want,
                    "device plaintext differs from the CPU reference"
                );
                assert_ne!(batch.device_ptr(), 0);
                dec.recycle(batch);
            }
            Err(WaitError::Tag { chunk }) => assert!(
                tamper && chunk == 4,
                "unexpected tag failure at chunk {chunk}"
            ),
            Err(WaitError::Device(e)) => panic!("device error: {e}"),
        }
    }
}

#[test]
fn every_ctr_variant_conforms_and_staged_batches_decrypt_with_each() {
    let Some(c) = device() else { return };
    let cpu = CpuCipher::new();
    let mut rng = SplitMix(11);
    let mut kb = [0u8; 32];
    rng.fill(&mut kb);
    let key = DataKey::from_bytes(kb);
    let rop = cpu.prepare(&key).unwrap();
    let dkey = c.prepare_device(&key).unwrap();
    // Lengths that span several thread blocks of every variant, odd tails, a plain chunk, and
    // staging offsets that are not 16-byte aligned (the byte path).
    let lens = [9usize << 20, 3, 0, 70_001, 1 << 20, 33];
    let aad = vec![5u8; 40];
    let mut pts = Vec::new();
    let mut cts = Vec::new();
    let mut tags = Vec::new();
    for (i, &len) in lens.iter().enumerate() {
        let mut pt = vec![0u8; len];
        rng.fill(&mut pt);
        let mut ct = pt.clone();
        tags.push(
            rop.seal_in_place(&[i as u8 + 1; 12], &aad, i != 1, &mut ct)
                .unwrap(),
        );
        pts.push(pt);
        cts.push(ct);
    }
    let total: usize = lens.iter().sum();
    let initial = c.ctr_variant();
    for (v, info) in c.ctr_variants() {
        if let Err(why) = info {
            eprintln!("variant {} unavailable here: {why}", v.name());
            continue;
        }
        c.set_ctr_variant(v).unwrap();
        conformance::run(c.as_ref(), 10).unwrap_or_else(|e| panic!("{}: {e}", v.name()));
        let mut dec = c.batch_decryptor(2, 16 << 20).unwrap();
        for tamper in [false, true] {
            let staging = dec.staging_mut().unwrap();
            let mut at = 0usize;
            let mut placed = Vec::new();
            for (i, ct) in cts.iter().enumerate() {
                at += i % 3; // misalign some chunks on purpose
                staging[at..at + ct.len()].copy_from_slice(ct);
                placed.push(at);
                at += ct.len();
            }
            if tamper {
                staging[placed[3] + 7] ^= 1;
            }
            let mut dst = 0;
            let chunks: Vec<StagedChunk> = (0..lens.len())
                .map(|i| {
                    let ch = StagedChunk {
                        key: &dkey,
                        params: ChunkParams {
                            nonce: [i as u8 + 1; 12],
                            aad: &aad,
                            tag: tags[i],
                            encrypted: i != 1,
                        },
                        staging_offset: placed[i],
                        len: lens[i],
                        dst_offset: dst,
                    };
                    dst += lens[i];
                    ch
                })
                .collect();
            let t = dec.submit_staged(&chunks, total).unwrap();
            match dec.wait(t) {
                Ok(batch) => {
                    assert!(!tamper, "{}: tampered staged batch handed out", v.name());
                    let host = batch
                        .stream()
                        .clone_dtoh(&batch.slice().slice(..total))
                        .unwrap();
                    assert!(
                        host == pts.concat(),
                        "{}: staged batch plaintext differs from the CPU reference",
                        v.name()
                    );
                    dec.recycle(batch);
                }
                Err(WaitError::Tag { chunk }) => {
                    assert!(tamper && chunk == 3, "{}: tag failure at {chunk}", v.name())
                }
                Err(WaitError::Device(e)) => panic!("{}: device error: {e}", v.name()),
            }
        }
        // Out-of-range staging is refused before anything is enqueued.
        let bad = [StagedChunk {
            key: &dkey,
            params: ChunkParams {
                nonce: [0; 12],
                aad: &aad,
                tag: [0; 16],
                encrypted: true,
            },
            staging_offset: (16 << 20) - 4,
            len: 8,
            dst_offset: 0,
        }];
        assert!(dec.submit_staged(&bad, 8).is_err());
    }
    c.set_ctr_variant(initial).unwrap();
}
