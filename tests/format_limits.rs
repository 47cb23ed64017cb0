//! Hardening of the untrusted-input path (issue 13): linear uniqueness checks, caps and
//! nesting limits on the JSON files, non-regular files refused promptly, and values from files
//! that would overflow u64 arithmetic reported as errors naming the file.

mod format_common;

use std::path::Path;
use std::time::{Duration, Instant};

use ciphershard::format::{self, Dataset, Keyring, Manifest, ShardHeader};
use ciphershard::{Error, Result};
use format_common::*;

#[track_caller]
fn assert_err_names(r: Result<impl std::fmt::Debug>, file: &str, cause: &str) -> Error {
    let e = r.expect_err("expected an error");
    let msg = e.to_string();
    assert!(msg.contains(file), "error does not name {file}: {msg}");
    assert!(msg.contains(cause), "error does not say '{cause}': {msg}");
    e
}

/// A keyring of `n` distinct key ids (one wrapped key each), the last one repeating the first
/// if `repeat`.
fn big_keyring(n: usize, repeat: bool) -> String {
    let wrapped = format!("\"{}==\"", "A".repeat(54)); // base64 of 40 zero bytes
    let mut s = String::from(
        r#"{"format":"ciphershard-keyring","version":1,"dataset_id":"00000000000000000000000000000000","wraps":["#,
    );
    for i in 0..n {
        let id = if repeat && i == n - 1 { 0 } else { i };
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(
            r#"{{"key_id":"{id:016x}","alg":"A256KW","data_keys":[{wrapped}]}}"#
        ));
    }
    s.push_str("]}\n");
    s
}

/// Issue 13 item 2: the duplicate key-id check compared every entry with every earlier one, so
/// 200,000 entries took hours (2 * 10^10 comparisons). A hash set makes it linear: this parses
/// in about a second in a debug build, well inside the bound, which the quadratic check cannot
/// meet by orders of magnitude.
#[test]
fn keyring_of_200k_entries_parses_in_linear_time() {
    let path = Path::new("keyring.json");
    for repeat in [false, true] {
        let text = big_keyring(200_000, repeat);
        let start = Instant::now();
        let r = Keyring::parse(path, text.as_bytes());
        let took = start.elapsed();
        if repeat {
            assert_err_names(r, "keyring.json", "key id 0000000000000000 is listed twice");
        } else {
            assert_eq!(r.unwrap().wraps.len(), 200_000);
        }
        assert!(
            took < Duration::from_secs(30),
            "200,000 keyring entries took {took:?}: quadratic?"
        );
    }
}

/// The same class elsewhere: tensor names in a shard, column names in a manifest.
#[test]
fn repeated_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    small_dataset(dir.path());
    let m = dir.path().join("manifest.json");
    let text = std::fs::read_to_string(&m)
        .unwrap()
        .replace(r#""name":"y""#, r#""name":"x""#);
    assert_err_names(
        Manifest::parse(&m, text.as_bytes()),
        "manifest.json",
        "column 'x' is listed twice",
    );
}
