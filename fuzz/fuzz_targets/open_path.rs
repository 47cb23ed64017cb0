//! Fuzzes the whole open path of a dataset directory: the input is split at
//! [`SEPARATOR`] into `manifest.json`, `keyring.json` and one or two shard files, written into a
//! scratch directory, then `Dataset::open` (manifest/keyring/shard cross-checks), `unlock` with
//! the golden test key (tests/golden/key.hex, whose keyring the seed holds) and `verify` (every
//! chunk tag). Any panic, hang or huge allocation is a bug; every input must end in `Ok` or a
//! clean `Err` that names a file.
//!
//! Seed: the golden dataset joined with the separator (scripts/fuzz-smoke.sh builds it).
#![no_main]

mod common;

use std::path::Path;
use std::sync::OnceLock;

use ciphershard::MasterKey;
use ciphershard::cipher::cpu::CpuCipher;
use ciphershard::format::{self, Dataset};
use libfuzzer_sys::fuzz_target;

/// Between the files of one input (scripts/fuzz-smoke.sh joins the seed's files with it).
const SEPARATOR: &[u8] = b"\n--ciphershard-fuzz--\n";
const NAMES: [&str; 4] = [
    "manifest.json",
    "keyring.json",
    "shard-00000.safetensors",
    "shard-00001.safetensors",
];

fn dir() -> &'static Path {
    common::scratch_dir("open")
}

fn golden_key() -> &'static MasterKey {
    static KEY: OnceLock<MasterKey> = OnceLock::new();
    KEY.get_or_init(|| {
        MasterKey::parse(b"14d1d70bcfc62a4aad5b9773493778c9152d35e92956fb83a71cf0f255b082ac")
            .expect("the golden key parses")
    })
}

fn split<'a>(mut data: &'a [u8]) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    while parts.len() < NAMES.len() - 1 {
        match data.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
            Some(i) => {
                parts.push(&data[..i]);
                data = &data[i + SEPARATOR.len()..];
            }
            None => break,
        }
    }
    parts.push(data);
    parts
}

fuzz_target!(|data: &[u8]| {
    let d = dir();
    let parts = split(data);
    for (i, name) in NAMES.iter().enumerate() {
        let p = d.join(name);
        match parts.get(i) {
            Some(bytes) => {
                // Unlink, then create: rewriting in place by truncation makes ext4 flush the
                // file to disk on close (auto_da_alloc), a hundred times slower.
                let _ = std::fs::remove_file(&p);
                std::fs::write(&p, bytes).expect("scratch write")
            }
            None => {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
    let named = |e: &ciphershard::Error| {
        let msg = e.to_string();
        assert!(
            msg.contains(d.to_str().unwrap()) || msg.starts_with("key:"),
            "error names no file: {msg}"
        );
    };
    let ds = match Dataset::open(d) {
        Ok(ds) => ds,
        Err(e) => return named(&e),
    };
    // What was opened is self-consistent: chunks lie inside their files.
    for h in ds.shards() {
        for t in 0..h.descriptor.tensors.len() as u32 {
            for c in h.chunks(t) {
                assert!(c.file_offset + c.len as u64 <= h.file_len);
            }
        }
    }
    let ud = match ds.unlock(golden_key(), &CpuCipher::new()) {
        Ok(ud) => ud,
        Err(e) => return named(&e),
    };
    if let Err(e) = format::verify(&ud, &mut |_, _| {}) {
        named(&e);
    }
});
