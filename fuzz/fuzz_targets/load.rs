//! Fuzzes the whole path from `convert` to the host loader's batches. The input is a compact
//! description of a small dataset and of how to load it (read byte by byte, zeros once it runs
//! out): one to three columns of any dtype and row shapes of rank 0 to 2 (zero-width ones
//! too, beside a first column that is never zero-width), up to 300 rows of pseudo-random bytes,
//! chunk and shard sizes, `--plain` columns (or `*`), and loader options (batch size, window
//! blocks, block rows, threads 1-2, prefetch, shuffle and seed, drop_last, world size 1-3).
//! It is converted with a fixed key into a scratch directory, and every rank's batches are
//! checked row by row against the input (and, without drop_last, that every row is seen).
//! Then one byte of one shard is flipped at a chosen offset and the data loaded again on one
//! rank: each batch handed out must still be exactly right, and there must be an error naming
//! the shard's file. Any panic, hang, wrong batch, unnoticed flip or error naming no file is a
//! bug.
//!
//! Seeds: a few descriptions under fuzz/seeds/load (laid out by scripts/fuzz-common.sh).
#![no_main]

mod common;
// The format tests' helpers (pseudo-random bytes).
#[path = "../../tests/format_common/mod.rs"]
mod format_common;
use format_common::bytes;

use std::path::Path;

use ciphershard::MasterKey;
use ciphershard::cipher::Backend;
use ciphershard::format::{self, ConvertInput, ConvertOptions, Dtype};
use ciphershard::pipeline::{FormatSource, Loader, LoaderOptions};
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static Path {
    common::scratch_dir("load")
}

/// The fixed master key.
fn key() -> MasterKey {
    format_common::key(0xa5)
}

/// The description, read a byte at a time; zeros once it runs out.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
}

/// A column: name, its rows' bytes (row after row) and the bytes of one row.
struct Col {
    name: String,
    data: Vec<u8>,
    row_bytes: usize,
}

/// Runs a loader over the dataset and checks every batch against `cols`; returns the rows
/// handed out, or the first error.
fn load(opts: &LoaderOptions, cols: &[Col]) -> (Vec<u64>, Option<ciphershard::Error>) {
    let mut seen = Vec::new();
    let src = match FormatSource::open(&dir().join("ds"), &key(), Backend::Cpu) {
        Ok(s) => s,
        Err(e) => return (seen, Some(e)),
    };
    let loader = match Loader::new(src, opts) {
        Ok(l) => l,
        Err(e) => return (seen, Some(e)),
    };
    for b in loader {
        let b = match b {
            Ok(b) => b,
            Err(e) => return (seen, Some(e)),
        };
        assert!(!b.is_empty() && b.len() <= opts.batch_size);
        let tensors: Vec<_> = b.tensors().collect();
        assert_eq!(tensors.len(), cols.len());
        for (t, c) in tensors.iter().zip(cols) {
            assert_eq!(t.name, c.name);
            assert_eq!(t.bytes.len(), b.len() * c.row_bytes);
            for (i, &r) in b.row_ids().iter().enumerate() {
                let (r, n) = (r as usize, c.row_bytes);
                assert!(
                    t.bytes[i * n..(i + 1) * n] == c.data[r * n..(r + 1) * n],
                    "row {r} of column '{}' differs from the input",
                    c.name
                );
            }
        }
        seen.extend_from_slice(b.row_ids());
    }
    (seen, None)
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader(data);
    let ncols = 1 + r.u8() as usize % 3;
    let rows = 1 + r.u16() as u64 % 300;
    let seed = r.u32() as u64;
    let mut cols = Vec::new();
    let mut inputs = Vec::new();
    for i in 0..ncols {
        let dtype = Dtype::ALL[r.u8() as usize % Dtype::ALL.len()];
        let rank = r.u8() as usize % 3;
        // The first column's rows always hold bytes (a dataset needs one such column).
        let row_shape: Vec<u64> = (0..rank)
            .map(|_| {
                let d = r.u8() as u64 % 4;
                if i == 0 { d % 3 + 1 } else { d }
            })
            .collect();
        let row_bytes = row_shape.iter().product::<u64>() as usize * dtype.size_bytes();
        let name = format!("c{i}");
        let col = bytes(rows as usize * row_bytes, seed + i as u64);
        let mut shape = vec![rows];
        shape.extend(&row_shape);
        inputs.push(ConvertInput::InMemory {
            name: name.clone(),
            dtype,
            shape,
            data: col.clone(),
        });
        cols.push(Col {
            name,
            data: col,
            row_bytes,
        });
    }
    let chunk_size = 64 * (1 + r.u8() as u64 % 4);
    let shard_size = 1 + r.u16() as u64 % 4096;
    let plain_mask = r.u8();
    let plain: Vec<String> = if plain_mask & 0x80 != 0 {
        vec!["*".into()]
    } else {
        cols.iter()
            .enumerate()
            .filter(|(i, _)| plain_mask >> i & 1 == 1)
            .map(|(_, c)| c.name.clone())
            .collect()
    };
    let block = r.u8();
    let mut opts = LoaderOptions {
        batch_size: 1 + r.u8() as usize % 40,
        window_blocks: 1 + r.u8() as u64 % 4,
        block_rows: (block % 3 == 0).then_some(1 + block as u64 / 3 % 32),
        threads: 1 + r.u8() as usize % 2,
        prefetch: 1 + r.u8() as usize % 3,
        shuffle: r.u8() & 1 == 1,
        seed: r.u8() as u64,
        drop_last: r.u8() & 1 == 1,
        world_size: 1 + r.u8() as u64 % 3,
        ..LoaderOptions::default()
    };
    let (tamper_shard, tamper_at, tamper_mask) = (r.u8() as usize, r.u32() as u64, r.u8() | 1);

    let out = dir().join("ds");
    let _ = std::fs::remove_dir_all(&out);
    let convert = ConvertOptions {
        shard_size: Some(shard_size),
        chunk_size,
        plain,
        keys: vec![key()],
        ..ConvertOptions::default()
    };
    let summary =
        format::convert(&inputs, &out, &convert, &mut |_, _| {}).expect("a valid dataset converts");
    assert_eq!(summary.rows, rows);

    // Every rank: the right rows, each exactly the input's.
    let mut all = vec![false; rows as usize];
    for rank in 0..opts.world_size {
        opts.rank = rank;
        let (seen, err) = load(&opts, &cols);
        if let Some(e) = err {
            panic!("loading an intact dataset failed: {e}");
        }
        let per = if opts.drop_last {
            rows / opts.world_size / opts.batch_size as u64 * opts.batch_size as u64
        } else {
            rows.div_ceil(opts.world_size)
        };
        assert_eq!(seen.len() as u64, per, "rank {rank} of {}", opts.world_size);
        for r in seen {
            all[r as usize] = true;
        }
    }
    if !opts.drop_last {
        assert!(all.iter().all(|&s| s), "a row was never loaded");
    }

    // One byte flipped: never a wrong batch; an error names the file.
    let shard = tamper_shard % summary.shards;
    let path = out.join(format::shard_file_name(shard as u32));
    let mut file = std::fs::read(&path).expect("shard");
    let at = (tamper_at % file.len() as u64) as usize;
    file[at] ^= tamper_mask;
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, &file).expect("scratch write");
    opts.rank = 0;
    opts.world_size = 1;
    opts.drop_last = false;
    // Every byte of a shard is covered by a check the loader makes before it hands out rows
    // (header digest and tag, canonical form, chunk tags, empty chunks' too), and every row is
    // loaded here: so there must be an error.
    let (_, err) = load(&opts, &cols);
    let msg = err.expect("a flipped byte went unnoticed").to_string();
    assert!(
        msg.contains(&format::shard_file_name(shard as u32)),
        "an error after a flipped byte names no shard: {msg}"
    );
});
