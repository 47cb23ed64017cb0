//! Helpers shared by the format tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use ciphershard::cipher::cpu::CpuCipher;
use ciphershard::format::{
    ConvertInput, ConvertOptions, ConvertSummary, Dataset, Dtype, UnlockedDataset, convert,
};
use ciphershard::{Error, MasterKey, Result};

pub fn key(b: u8) -> MasterKey {
    MasterKey::from_bytes([b; 32])
}

/// Deterministic pseudo-random bytes.
pub fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn column(name: &str, dtype: Dtype, shape: &[u64], seed: u64) -> ConvertInput {
    let n = shape.iter().product::<u64>() as usize * dtype.size_bytes();
    ConvertInput::InMemory {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
        data: bytes(n, seed),
    }
}

pub fn opts(chunk_size: u64, shard_size: u64, plain: &[&str]) -> ConvertOptions {
    ConvertOptions {
        shard_size: Some(shard_size),
        chunk_size,
        plain: plain.iter().map(|s| s.to_string()).collect(),
        keys: vec![key(1)],
        metadata: BTreeMap::from([("source".to_string(), "test".to_string())]),
    }
}

pub fn convert_quiet(
    inputs: &[ConvertInput],
    dir: &Path,
    o: &ConvertOptions,
) -> Result<ConvertSummary> {
    convert(inputs, dir, o, &mut |_, _| {})
}

/// A small two-shard dataset: `x` F32 [10, 3] encrypted, `y` U8 [10] plain, chunk 64, shard 64 bytes.
pub fn small_dataset(dir: &Path) -> ConvertSummary {
    let inputs = [
        column("x", Dtype::F32, &[10, 3], 1),
        column("y", Dtype::U8, &[10], 2),
    ];
    convert_quiet(&inputs, dir, &opts(64, 80, &["y"])).expect("convert")
}

pub fn unlock(dir: &Path, k: &MasterKey) -> Result<UnlockedDataset> {
    Dataset::open(dir)?.unlock(k, &CpuCipher::new())
}

/// Decrypts one whole tensor of one shard.
pub fn read_tensor(ud: &UnlockedDataset, shard: usize, tensor: u32) -> Result<Vec<u8>> {
    let h = &ud.dataset().shards()[shard];
    let file = std::fs::read(&h.path).map_err(|e| Error::io(&h.path, e))?;
    let mut out = Vec::new();
    for c in h.chunks(tensor) {
        let src = file
            .get(c.file_offset as usize..c.file_offset as usize + c.len)
            .ok_or_else(|| Error::format(&h.path, "shard", "short"))?;
        let mut buf = vec![0u8; c.len];
        ud.opener(shard)
            .open(&c.params(), src, &mut buf)
            .map_err(|_| Error::Integrity(h.chunk_location(&c)))?;
        out.extend_from_slice(&buf);
    }
    Ok(out)
}

/// Concatenates every shard's rows of column `tensor`.
pub fn read_column(ud: &UnlockedDataset, tensor: u32) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for s in 0..ud.dataset().shards().len() {
        out.extend(read_tensor(ud, s, tensor)?);
    }
    Ok(out)
}

/// Asserts `r` is an error whose message names `file` and says `cause`.
#[track_caller]
pub fn assert_err_names(r: Result<impl std::fmt::Debug>, file: &str, cause: &str) -> Error {
    let e = r.expect_err("expected an error");
    let msg = e.to_string();
    assert!(msg.contains(file), "error does not name {file}: {msg}");
    assert!(msg.contains(cause), "error does not say '{cause}': {msg}");
    e
}

/// The bytes of an NPY (version 1) file: `descr` and `shape` (a Python tuple) over `data`.
pub fn npy_bytes(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut v = b"\x93NUMPY\x01\x00".to_vec();
    v.extend_from_slice(&(h.len() as u16).to_le_bytes());
    v.extend_from_slice(h.as_bytes());
    v.extend_from_slice(data);
    v
}
