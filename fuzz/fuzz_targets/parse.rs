//! Fuzzes every parser of untrusted format input: shard headers (safetensors + descriptor +
//! tags), manifest.json, keyring.json and NPY headers. Any panic, hang or huge allocation is a
//! bug; every input must give `Ok` or a clean `Err`.
//!
//!     cargo install cargo-fuzz && cd fuzz && cargo +nightly fuzz run parse -- -max_total_time=60
//!
//! CI runs it for 30 s on the stable toolchain through `scripts/fuzz-smoke.sh` (libFuzzer with
//! SanitizerCoverage switched on by hand), besides `random_mutations_never_pass_or_panic` in
//! tests/format_bad_input.rs.
#![no_main]

use std::path::Path;

use ciphershard::format::{Keyring, Manifest, ShardHeader, npy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz-input");
    let Some((&selector, rest)) = data.split_first() else { return };
    match selector % 4 {
        0 => {
            if let Ok(h) = ShardHeader::parse(path, rest) {
                // A parsed header must address only bytes inside the file.
                for t in 0..h.descriptor.tensors.len() as u32 {
                    for c in h.chunks(t) {
                        assert!(c.file_offset + c.len as u64 <= h.file_len);
                    }
                }
            }
        }
        1 => drop(Manifest::parse(path, rest)),
        2 => drop(Keyring::parse(path, rest)),
        _ => drop(npy::parse_header(path, rest)),
    }
});
