//! What the real binary prints: untrusted names escaped, and a closed pipe ending a command
//! quietly.

mod cli_common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::Stdio;

use cli_common::*;

/// A tensor name and a metadata value with an ANSI colour sequence, a C1 CSI, DEL, a carriage
/// return and bidi overrides: what a crafted dataset could carry.
const EVIL_NAME: &str = "x\u{1b}[31mred\u{202e}gnp.exe\u{2066}\r";
const EVIL_VALUE: &str = "v\u{9b}2J\u{7f}\u{1b}]0;title\u{7}\u{200f}";

fn evil() -> Fixture {
    dataset_with(
        100,
        256,
        1000,
        EVIL_NAME,
        BTreeMap::from([("note\u{1b}[2J".to_string(), EVIL_VALUE.to_string())]),
    )
}

/// `true` when `s` holds a character that must not reach a terminal raw.
fn has_raw_controls(s: &str) -> bool {
    s.chars().any(|c| {
        (c.is_control() && c != '\n')
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    })
}

#[test]
fn inspect_text_escapes_names_and_metadata() {
    let f = evil();
    let out = run(cs().arg("inspect").arg(&f.ds));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(!has_raw_controls(&text), "{text:?}");
    assert!(
        text.contains("x\\u{1b}[31mred\\u{202e}gnp.exe\\u{2066}\\u{d}"),
        "{text}"
    );
    assert!(
        text.contains("v\\u{9b}2J\\u{7f}\\u{1b}]0;title\\u{7}\\u{200f}"),
        "{text}"
    );
    assert!(text.contains("note\\u{1b}[2J"), "{text}");
}

#[test]
fn inspect_json_is_terminal_safe_and_the_same_value() {
    let f = evil();
    let out = run(cs().args(["inspect", "--json"]).arg(&f.ds));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(!has_raw_controls(&text), "{text:?}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["columns"][0]["name"], EVIL_NAME);
    assert_eq!(v["shards"][0]["tensors"][0]["name"], EVIL_NAME);
    assert_eq!(v["shards"][0]["metadata"]["note\u{1b}[2J"], EVIL_VALUE);
}

#[test]
fn errors_escape_names_from_the_files() {
    let f = evil();
    // A modified chunk of the evil tensor (the first): the error names it.
    flip(&f.shard(0), data_start(&f.shard(0)) + 5);
    let out = verify(&f.key, &f.ds);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(!has_raw_controls(&err), "{err:?}");
    assert!(err.contains("\\u{1b}[31mred\\u{202e}"), "{err}");
}

/// `ciphershard inspect --json ds | head -1`: the reader goes away after one line.
#[test]
fn a_closed_pipe_ends_the_command_quietly() {
    // Enough shards that the output does not fit in a pipe's buffer (64 KiB).
    let f = dataset_with(2000, 64, 200, "x", BTreeMap::new());
    for args in [vec!["inspect", "--json"], vec!["inspect"]] {
        let mut child = cs()
            .args(&args)
            .arg(&f.ds)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(!first.is_empty());
        // The read end is closed here (dropped), as `head` closes it.
        let out = child.wait_with_output().unwrap();
        assert_eq!(code(&out), 0, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).is_empty(), "{args:?}: {}", stderr(&out));
    }
}
