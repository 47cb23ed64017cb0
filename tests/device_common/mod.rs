//! The dataset the device-loader tests (CUDA and wgpu) compare against the host loader.
#![allow(dead_code)]

use std::path::Path;

use ciphershard::MasterKey;
use ciphershard::format::{ConvertInput, ConvertOptions, Dtype, convert};

/// `x`: f32 × `features` per row (encrypted), `y`: i32 (plain, GMAC only), `z`: u8 × 5
/// (encrypted, odd row size so rows straddle chunks and take the byte path of the gather).
pub fn make(dir: &Path, rows: u64, features: u64, chunk: u64, shard: u64) -> MasterKey {
    let key = MasterKey::generate().unwrap();
    let x: Vec<u8> = (0..rows * features)
        .flat_map(|i| (i as f32 * 0.25 - 3.0).to_le_bytes())
        .collect();
    let y: Vec<u8> = (0..rows as i32)
        .flat_map(|i| (i * 7).to_le_bytes())
        .collect();
    let z: Vec<u8> = (0..rows * 5).map(|i| (i * 31 % 251) as u8).collect();
    let inputs = [
        ConvertInput::InMemory {
            name: "x".into(),
            dtype: Dtype::F32,
            shape: vec![rows, features],
            data: x,
        },
        ConvertInput::InMemory {
            name: "y".into(),
            dtype: Dtype::I32,
            shape: vec![rows],
            data: y,
        },
        ConvertInput::InMemory {
            name: "z".into(),
            dtype: Dtype::U8,
            shape: vec![rows, 5],
            data: z,
        },
    ];
    let opts = ConvertOptions {
        keys: vec![key.clone()],
        chunk_size: chunk,
        shard_size: shard,
        plain: vec!["y".into()],
        ..Default::default()
    };
    convert(&inputs, dir, &opts, &mut |_, _| {}).unwrap();
    key
}
