//! A token dataset for the packing and token-budget tests: row `r` holds `len(r)` I32 tokens
//! `r * 1000 + j` in the ragged column `input_ids`, and its index in the I64 column `label`;
//! small chunks and shards so that rows span chunks and shards.
#![allow(dead_code)]

use ciphershard::MasterKey;
use ciphershard::format::{ConvertInput, ConvertOptions, Dtype, convert};

/// Converts `rows` rows of lengths `len` into `dir` under a new key, which it returns.
pub fn make_tokens(dir: &std::path::Path, rows: u64, len: fn(u64) -> u64) -> MasterKey {
    let key = MasterKey::generate().unwrap();
    let mut values = Vec::new();
    let mut offsets = vec![0u64];
    for r in 0..rows {
        for j in 0..len(r) as i32 {
            values.extend((r as i32 * 1000 + j).to_le_bytes());
        }
        offsets.push(offsets.last().unwrap() + len(r));
    }
    let inputs = [
        ConvertInput::Ragged {
            name: "input_ids".into(),
            dtype: Dtype::I32,
            shape: vec![],
            values,
            offsets,
        },
        ConvertInput::InMemory {
            name: "label".into(),
            dtype: Dtype::I64,
            shape: vec![rows],
            data: (0..rows as i64).flat_map(i64::to_le_bytes).collect(),
        },
    ];
    let opts = ConvertOptions {
        keys: vec![key.clone()],
        chunk_size: 512,
        shard_size: Some(3000),
        ..Default::default()
    };
    convert(&inputs, dir, &opts, &mut |_, _| {}).unwrap();
    key
}
