//! Throughput of `convert` against the floor it cannot beat in the same run: writing the same
//! bytes unencrypted (with the same fsync), and sealing them on one core with no I/O.
//!
//!     cargo bench --no-default-features --bench format

use std::hint::black_box;

use ciphershard::cipher::Cipher;
use ciphershard::cipher::cpu::CpuCipher;
use ciphershard::format::{ConvertInput, ConvertOptions, Dtype, convert};
use ciphershard::{DataKey, MasterKey};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const MIB: usize = 1 << 20;
const TOTAL: usize = 128 * MIB;

fn data() -> Vec<u8> {
    (0..TOTAL)
        .map(|i| (i as u32).wrapping_mul(2654435761) as u8)
        .collect()
}

fn bench(c: &mut Criterion) {
    let data = data();
    let mut g = c.benchmark_group("convert");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(TOTAL as u64));
    let input = vec![ConvertInput::InMemory {
        name: "x".into(),
        dtype: Dtype::F32,
        shape: vec![(TOTAL / 4096) as u64, 1024],
        data: data.clone(),
    }];
    let opts = ConvertOptions {
        keys: vec![MasterKey::from_bytes([1; 32])],
        shard_size: Some(64 * MIB as u64),
        ..Default::default()
    };
    g.bench_function("convert_encrypted_2MiB_chunks", |b| {
        b.iter(|| {
            let dir = tempfile::tempdir().unwrap();
            black_box(convert(&input, dir.path(), &opts, &mut |_, _| {}).unwrap());
        })
    });
    g.bench_function("baseline_write_plain_fsync", |b| {
        b.iter(|| {
            let dir = tempfile::tempdir().unwrap();
            for (i, part) in data.chunks(64 * MIB).enumerate() {
                let p = dir.path().join(format!("{i}.bin"));
                let f = std::fs::File::create(&p).unwrap();
                std::io::Write::write_all(&mut &f, part).unwrap();
                f.sync_all().unwrap();
            }
        })
    });
    let opener = CpuCipher::new()
        .prepare(&DataKey::from_bytes([2; 32]))
        .unwrap();
    let mut buf = data.clone();
    g.bench_function("seal_only_one_core", |b| {
        b.iter(|| {
            for (i, chunk) in buf.chunks_mut(2 * MIB).enumerate() {
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&(i as u64).to_be_bytes());
                black_box(
                    opener
                        .seal_in_place(&nonce, &[0u8; 89], true, chunk)
                        .unwrap(),
                );
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
