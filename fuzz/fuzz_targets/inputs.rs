//! Fuzzes what `convert` reads from an input file. The first byte picks:
//!   0: the safetensors input header parser on its own (`safetensors_input::parse_header`, the
//!      rest of the input being the whole file);
//!   1: the NPY header parser on its own (`npy::parse_header`);
//!   2, 3: the rest written as `in.safetensors` (2) or `in.npy` (3) in a scratch directory and
//!      converted into a dataset there, with a fixed key: a refusal must name the input; a
//!      dataset must open, verify and hold exactly the input's tensor bytes.
//! Any panic, hang or huge allocation is a bug; every input must end in `Ok` or a clean `Err`.
//!
//! Seeds: a small safetensors file (as the safetensors crate writes) and a small `.npy` file
//! under each selector (fuzz/seeds/inputs, laid out by scripts/fuzz-common.sh).
#![no_main]

mod common;
// The format tests' helpers (reading a whole tensor back).
#[path = "../../tests/format_common/mod.rs"]
mod format_common;

use std::path::Path;

use ciphershard::MasterKey;
use ciphershard::cipher::cpu::CpuCipher;
use ciphershard::format::{
    self, ConvertInput, ConvertOptions, Dataset, DatasetKind, InputTensor, npy, safetensors_input,
};
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static Path {
    common::scratch_dir("inputs")
}

/// The fixed master key.
fn key() -> MasterKey {
    format_common::key(0x5a)
}

/// Converts `input` (at `path`) and checks the dataset against `tensors` (what the input's
/// header parser says the file holds), or checks that the refusal names the input.
fn convert_and_check(
    path: &Path,
    input: ConvertInput,
    file: &[u8],
    tensors: Option<&[InputTensor]>,
) {
    let out = dir().join("out");
    let _ = std::fs::remove_dir_all(&out);
    let opts = ConvertOptions {
        shard_size: Some(256),
        chunk_size: 64,
        keys: vec![key()],
        ..ConvertOptions::default()
    };
    let summary = match format::convert(&[input], &out, &opts, &mut |_, _| {}) {
        Ok(s) => s,
        Err(e) => {
            let msg = e.to_string();
            let name = path.file_name().unwrap().to_str().unwrap();
            assert!(msg.contains(name), "a refused input is not named: {msg}");
            return;
        }
    };
    let tensors = tensors.expect("what converted was parsed by the header parser");
    let ds = Dataset::open(&out).expect("a converted dataset opens");
    let ud = ds.unlock(&key(), &CpuCipher::new()).expect("and unlocks");
    format::verify(&ud, &mut |_, _| {}).expect("and verifies");
    assert_eq!(summary.columns, tensors.len());
    for t in tensors {
        let want = &file[t.offset as usize..(t.offset + t.len) as usize];
        let mut got = Vec::new();
        for (s, h) in ud.dataset().shards().iter().enumerate() {
            let (ti, desc) = h.tensor(&t.name).expect("every input tensor is a column");
            assert_eq!(desc.dtype, t.dtype);
            match summary.kind {
                DatasetKind::Dataset => assert_eq!(desc.shape[1..], t.shape[1..]),
                DatasetKind::Tensors => assert_eq!(desc.shape, t.shape),
            }
            got.extend(format_common::read_tensor(&ud, s, ti).expect("a converted chunk opens"));
        }
        assert!(got == want, "column '{}' differs from the input", t.name);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let fake = Path::new("fuzz-input");
    match selector % 4 {
        0 => {
            if let Ok(h) = safetensors_input::parse_header(fake, rest, rest.len() as u64) {
                // What parsed lies inside the file, sorted, and matches dtype and shape.
                assert!(!h.tensors.is_empty());
                for t in &h.tensors {
                    assert!(
                        t.offset
                            .checked_add(t.len)
                            .is_some_and(|e| e <= rest.len() as u64)
                    );
                    let elems = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
                    assert_eq!(
                        elems.and_then(|n| n.checked_mul(t.dtype.size_bytes() as u64)),
                        Some(t.len)
                    );
                }
                for w in h.tensors.windows(2) {
                    assert!(w[0].offset + w[0].len <= w[1].offset);
                }
            }
        }
        1 => {
            if let Ok(h) = npy::parse_header(fake, rest) {
                assert!(h.data_offset as usize <= rest.len());
            }
        }
        2 => {
            let path = dir().join("in.safetensors");
            let _ = std::fs::remove_file(&path);
            std::fs::write(&path, rest).expect("scratch write");
            let parsed = safetensors_input::parse_header(&path, rest, rest.len() as u64).ok();
            let input = ConvertInput::Safetensors(path.clone());
            convert_and_check(&path, input, rest, parsed.as_ref().map(|h| &h.tensors[..]));
        }
        _ => {
            let path = dir().join("in.npy");
            let _ = std::fs::remove_file(&path);
            std::fs::write(&path, rest).expect("scratch write");
            let parsed = npy::read_header(&path).ok().map(|h| {
                vec![InputTensor {
                    name: "x".into(),
                    dtype: h.dtype,
                    shape: h.shape,
                    offset: h.data_offset,
                    len: h.data_len,
                }]
            });
            let input = ConvertInput::Npy {
                column: "x".into(),
                path: path.clone(),
            };
            convert_and_check(&path, input, rest, parsed.as_deref());
        }
    }
});
