//! Fuzzes `convert` on the row-batch inputs (docs/INPUTS.md): the first byte picks the format,
//! the rest is written as the input file in a scratch directory and converted with a fixed key:
//!   0: `in.parquet` (`ConvertInput::Parquet`);
//!   1: `in.arrow` (`ConvertInput::ArrowIpc`: file or stream format, told apart by its bytes);
//!   2: `in.jsonl` (`ConvertInput::Jsonl`, column `input_ids`).
//! Every input must end in `Ok` or a clean `Err` naming the file; a dataset that converted must
//! open, unlock and verify, with the rows `convert` reported.
//!
//! Panics. arrow-rs's Parquet decoder panics on some corrupt files, so `parquet.rs` runs it under
//! `catch_unwind` and turns such a panic into an error (docs/INPUTS.md, "Errors and corrupt
//! files"). libfuzzer-sys's panic hook aborts at once, which would make every caught panic a
//! finding. So while `convert` runs on this thread, a panic on it only has its message recorded,
//! and the target aborts itself (a finding, message on stderr) if the panic escapes `convert`;
//! a panic caught inside `convert` is by design, and counted (`CIPHERSHARD_FUZZ_VERBOSE=1`
//! prints each one's message). Any other panic (an assertion below, a sealing thread) goes to
//! libfuzzer-sys's hook as usual.
//! A file whose headers claim more rows than any dataset could hold (an Arrow IPC record batch
//! header or a Parquet footer saying 10^15 rows, counted without decoding) is refused by
//! `convert`'s layout step, naming the file like every other refusal.
//!
//! Seeds: small files of each format as pyarrow writes them, prefixed by their selector
//! (fuzz/seeds/records, written by scripts/fuzz_seeds_records.py).
#![no_main]

mod common;
// The format tests' helpers (the fixed key).
#[path = "../../tests/format_common/mod.rs"]
mod format_common;

use std::cell::{Cell, RefCell};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

use ciphershard::MasterKey;
use ciphershard::cipher::cpu::CpuCipher;
use ciphershard::format::{self, ConvertInput, ConvertOptions, Dataset};
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static Path {
    common::scratch_dir("records")
}

/// The fixed master key.
fn key() -> MasterKey {
    format_common::key(0x3c)
}

thread_local! {
    /// Whether `convert` is running on this thread (its panics are then only recorded).
    static IN_CONVERT: Cell<bool> = const { Cell::new(false) };
    /// The message of this thread's last recorded panic.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}
/// Panics caught inside `convert` (by the Parquet reader's guard).
static CAUGHT: AtomicU64 = AtomicU64::new(0);

/// Wraps libfuzzer-sys's aborting panic hook: a panic on a thread inside `convert` is only
/// recorded; any other goes to that hook.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let fuzzer_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_CONVERT.with(Cell::get) {
                return fuzzer_hook(info);
            }
            let msg = format!("{info}");
            if std::env::var_os("CIPHERSHARD_FUZZ_VERBOSE").is_some() {
                eprintln!("panic inside convert (caught unless the target aborts next): {msg}");
            }
            LAST_PANIC.with(|p| *p.borrow_mut() = Some(msg));
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    install_panic_hook();
    let (name, input): (&str, fn(&Path) -> ConvertInput) = match selector % 3 {
        0 => ("in.parquet", |p| ConvertInput::Parquet(p.into())),
        1 => ("in.arrow", |p| ConvertInput::ArrowIpc(p.into())),
        _ => ("in.jsonl", |p| ConvertInput::Jsonl {
            path: p.into(),
            columns: vec!["input_ids".into()],
        }),
    };
    let path = dir().join(name);
    // Unlink, then create (see open_path.rs: rewriting in place is far slower on ext4).
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, rest).expect("scratch write");
    let out = dir().join("out");
    let _ = std::fs::remove_dir_all(&out);
    let opts = ConvertOptions {
        shard_size: Some(4096),
        chunk_size: 256,
        keys: vec![key()],
        ..ConvertOptions::default()
    };
    LAST_PANIC.with(|p| *p.borrow_mut() = None);
    IN_CONVERT.with(|c| c.set(true));
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        format::convert(&[input(&path)], &out, &opts, &mut |_, _| {})
    }));
    IN_CONVERT.with(|c| c.set(false));
    let result = match result {
        Ok(r) => r,
        Err(_) => {
            let msg = LAST_PANIC.with(|p| p.borrow_mut().take());
            eprintln!(
                "a panic escaped convert ({name}): {}",
                msg.as_deref().unwrap_or("no message recorded")
            );
            std::process::abort();
        }
    };
    if LAST_PANIC.with(|p| p.borrow_mut().take()).is_some() {
        let n = CAUGHT.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            eprintln!("{n} panics caught inside convert so far (by design: parquet.rs's guard)");
        }
    }
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(name),
                "a refused input is not named: {msg}"
            );
            return;
        }
    };
    let ds = Dataset::open(&out).expect("a converted dataset opens");
    let ud = ds.unlock(&key(), &CpuCipher::new()).expect("and unlocks");
    format::verify(&ud, &mut |_, _| {}).expect("and verifies");
    let m = ud.dataset().manifest();
    let rows: u64 = m.shards.iter().map(|s| s.rows).sum();
    assert_eq!(
        (m.rows, rows),
        (summary.rows, summary.rows),
        "the manifest holds the rows convert reported"
    );
});
