//! Fuzzes every parser of untrusted format input: shard headers (safetensors + descriptor +
//! tags), descriptor strings on their own (the header's canonical form makes them hard to reach
//! through it), manifest.json, keyring.json and NPY headers. The first byte picks the parser.
//! Any panic, hang or huge allocation is a bug; every input must give `Ok` or a clean `Err`.
//! The whole dataset-directory path is fuzz_targets/open_path.rs; convert's input readers
//! fuzz_targets/inputs.rs; convert to loader batches, end to end, fuzz_targets/load.rs.
//!
//!     cargo install cargo-fuzz && cd fuzz && cargo +nightly fuzz run parse -- -max_total_time=60
//!
//! CI runs every target briefly on the stable toolchain through `scripts/fuzz-smoke.sh`
//! (libFuzzer with SanitizerCoverage switched on by hand); `scripts/fuzz-long.sh` runs long
//! campaigns. Besides, `random_mutations_never_pass_or_panic` in tests/format_bad_input.rs.
#![no_main]

use std::path::Path;

use ciphershard::format::{Descriptor, Keyring, Manifest, ShardHeader, npy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz-input");
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 5 {
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
        3 => drop(npy::parse_header(path, rest)),
        _ => {
            if let Ok(s) = std::str::from_utf8(rest)
                && let Ok(d) = Descriptor::parse(path, s)
            {
                // Canonical form: what parsed serializes back to exactly the input.
                assert_eq!(d.to_json(), s);
            }
        }
    }
});
