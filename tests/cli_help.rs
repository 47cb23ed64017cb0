//! What the binary tells people and shells about itself: choices and defaults in `--help`,
//! completion scripts and man pages generated from the same definitions, and the notation of
//! `inspect`'s text report.

mod cli_common;

use cli_common::*;

fn ok_stdout(args: &[&str]) -> String {
    let out = run(cs().args(args));
    assert_eq!(code(&out), 0, "{args:?}: {}", stderr(&out));
    stdout(&out)
}

#[test]
fn help_lists_the_choices_and_defaults() {
    for command in ["verify", "decrypt", "demo", "bench"] {
        let help = ok_stdout(&[command, "--help"]);
        assert!(
            help.contains("[possible values: auto, cpu, cuda, wgpu]"),
            "{command} --help does not list the backends:\n{help}"
        );
        assert!(help.contains("[default: auto]"), "{command}:\n{help}");
    }
    let bench = ok_stdout(&["bench", "--help"]);
    for default in [
        "[default: 8]",
        "[default: the number of CPUs]",
        "plaintext twin is",
    ] {
        assert!(
            bench.contains(default),
            "bench --help lacks {default:?}:\n{bench}"
        );
    }
    let inspect = ok_stdout(&["inspect", "--help"]);
    assert!(inspect.contains("half-open"), "{inspect}");
}

#[test]
fn a_backend_outside_the_choices_is_a_usage_error() {
    let out = run(cs().args(["verify", "--backend", "tpu", "ds"]));
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    assert!(stderr(&out).contains("possible values"), "{}", stderr(&out));
}

#[test]
fn completions_cover_every_subcommand() {
    let subcommands = [
        "keygen",
        "convert",
        "inspect",
        "verify",
        "rekey",
        "decrypt",
        "demo",
        "bench",
        "backends",
        "completions",
        "man",
    ];
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = ok_stdout(&["completions", shell]);
        for sub in subcommands {
            assert!(script.contains(sub), "{shell} completions lack {sub}");
        }
    }
    let bash = ok_stdout(&["completions", "bash"]);
    assert!(
        bash.contains("auto cpu cuda wgpu"),
        "backend choices not completed"
    );
    let out = run(cs().args(["completions", "tcsh"]));
    assert_eq!(code(&out), 64, "{}", stderr(&out));
}

#[test]
fn man_pages_for_the_tool_and_each_subcommand() {
    let page = ok_stdout(&["man"]);
    assert!(
        page.starts_with(".ie") || page.contains(".TH ciphershard 1"),
        "{page}"
    );
    assert!(page.contains(".TH ciphershard 1"), "{page}");
    assert!(
        page.contains("Exit status"),
        "the exit-status table is missing:\n{page}"
    );
    let convert = ok_stdout(&["man", "convert"]);
    assert!(convert.contains(".TH ciphershard-convert 1"), "{convert}");
    assert!(convert.contains("\\-\\-shard\\-size"), "{convert}");
    let out = run(cs().args(["man", "nope"]));
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("keygen, key-id, convert"),
        "{}",
        stderr(&out)
    );
}

/// Values and combinations the command line cannot mean are usage errors (64), refused before
/// anything runs, as clap's own are.
#[test]
fn values_and_combinations_that_cannot_apply_are_usage_errors() {
    let f = small();
    let key = f.key.to_str().unwrap();
    let ds = f.ds.to_str().unwrap();
    let shard = f.shard(0);
    let shard = shard.to_str().unwrap();
    let convert = |option: &'static str, value: &'static str| {
        vec![
            "convert", "--key", key, "x.npy", "--out", "o", option, value,
        ]
    };
    let bench = |option: &'static str| vec!["bench", ds, "--key", key, option, "0"];
    let cases: Vec<Vec<&str>> = vec![
        vec!["keygen", "--out", "-", "--json"],
        vec!["decrypt", "--key", key, shard, "--out", "-", "--json"],
        vec!["rekey", "--key", key, "--key", key, "--new-key", key, ds],
        vec!["key-id", "-", "-"],
        vec!["verify", "--key", "-", "--key", "-", ds],
        convert("--chunk-size", "100"),
        convert("--chunk-size", "0"),
        convert("--shard-size", "0"),
        bench("--threads"),
        bench("--batch-size"),
        bench("--epochs"),
        bench("--window-blocks"),
        vec!["demo", "--rows", "0"],
        vec!["man", "help"],
    ];
    for args in &cases {
        let out = run(cs().args(args).stdout(std::process::Stdio::piped()));
        assert_eq!(code(&out), 64, "{args:?}: {}", stderr(&out));
        assert!(stdout(&out).is_empty(), "{args:?}");
    }
    assert!(!std::path::Path::new("o").exists());
}

#[test]
fn inspect_prints_half_open_ranges() {
    // 100 rows in two shards: the second starts where the first ends.
    let f = small();
    let text = ok_stdout(&["inspect", f.ds.to_str().unwrap()]);
    let start = text
        .split("shard 1 ")
        .nth(1)
        .and_then(|s| s.split("rows ").nth(1));
    let split = start
        .and_then(|s| s.split("..").next())
        .expect("shard 1's rows");
    assert!(text.contains(&format!("rows 0..{split} ")), "{text}");
    assert!(text.contains(&format!("rows {split}..100 ")), "{text}");
    assert!(!text.contains("..+"), "{text}");
}
