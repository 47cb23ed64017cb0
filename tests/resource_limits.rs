//! Issue 13's resource-limit test: every class of crafted input the hardening review found,
//! fed to the real `ciphershard` binary under `ulimit -v` (384 MiB of address space for the
//! readers, 512 MiB for `convert`) with a watchdog, ends in a clear error naming the file: no panic (exit 101), no abort or crash
//! (a signal), no hang, no allocation past the limit. Each case prints how long it took
//! (docs/SECURITY.md records them); the watchdog is a hang guard, not a speed target.
#![cfg(unix)]

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod format_common;
use format_common::npy_bytes;

/// Address space a reading command runs under, KiB (a normal `verify` needs well under 150 MiB;
/// the worst manifest or keyring a reader accepts is 64 MiB, parsed within 4× its size).
const READ_LIMIT_KIB: u64 = 384 << 10;
/// Address space `convert` runs under, KiB: its worst input header (100 MB, or 625,000 tensors,
/// each kept through its plan) peaked at 330 MB resident.
const CONVERT_LIMIT_KIB: u64 = 512 << 10;
/// Longer than this is a hang.
const WATCHDOG: Duration = Duration::from_secs(60);

struct Outcome {
    code: Option<i32>,
    signal: Option<i32>,
    stderr: String,
    took: Duration,
}

/// Runs `ciphershard args...` in `dir` under the address-space limit, killed at the watchdog.
fn run(dir: &Path, args: &[&str]) -> Outcome {
    let limit = if args.first() == Some(&"convert") {
        CONVERT_LIMIT_KIB
    } else {
        READ_LIMIT_KIB
    };
    let bin = env!("CARGO_BIN_EXE_ciphershard");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {limit} && exec \"$0\" \"$@\""))
        .arg(bin)
        .args(args)
        .current_dir(dir)
        .env("NODEVICE_SELECT", "1")
        .env("MALLOC_ARENA_MAX", "2")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > WATCHDOG {
            let _ = child.kill();
            panic!("ciphershard {args:?} still running after {WATCHDOG:?}: a hang");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = start.elapsed();
    let mut stderr = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    Outcome {
        code: status.code(),
        signal: status.signal(),
        stderr,
        took,
    }
}

/// `ciphershard args...` failed cleanly, naming `names` and saying `cause`.
#[track_caller]
fn refused(case: &str, dir: &Path, args: &[&str], names: &str, cause: &str) {
    let o = run(dir, args);
    eprintln!("{case}: exit {:?} in {:.2} s", o.code, o.took.as_secs_f64());
    assert_eq!(o.signal, None, "{case}: killed by a signal: {}", o.stderr);
    assert!(
        o.code.is_some_and(|c| c != 0 && c != 101),
        "{case}: exit {:?} (0 = accepted, 101 = panic): {}",
        o.code,
        o.stderr
    );
    assert!(
        o.stderr.contains(names) && o.stderr.contains(cause),
        "{case}: the error does not name '{names}' and say '{cause}': {}",
        o.stderr
    );
    assert!(
        !o.stderr.contains("panicked") && !o.stderr.contains("memory allocation"),
        "{case}: {}",
        o.stderr
    );
}

/// A safetensors file whose header is `header` (padded) followed by `data`.
fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut v = (h.len() as u64).to_le_bytes().to_vec();
    v.extend(h);
    v.extend_from_slice(data);
    v
}

/// `n` repetitions of `unit` joined by commas, inside `open`/`close`.
fn repeated(open: &str, unit: &str, n: usize, close: &str) -> String {
    let mut s = String::with_capacity(open.len() + n * (unit.len() + 1) + close.len());
    s.push_str(open);
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push_str(unit);
    }
    s.push_str(close);
    s
}

/// A small valid dataset in `dir/ds` with its key in `dir/k.key`.
fn dataset(dir: &Path) -> PathBuf {
    let rows = 500u64;
    let x: Vec<u8> = (0..rows * 16).map(|i| i as u8).collect();
    std::fs::write(dir.join("x.npy"), npy_bytes("|u1", "(500, 16)", &x)).unwrap();
    let o = run(dir, &["keygen", "--out", "k.key"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let o = run(dir, &["convert", "--key", "k.key", "x.npy", "--out", "ds"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    dir.join("ds")
}

#[test]
fn crafted_dataset_files_end_in_clear_errors_within_the_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ds = dataset(dir);
    let shard = ds.join("shard-00000.safetensors");
    let good_shard = std::fs::read(&shard).unwrap();
    let good_manifest = std::fs::read(ds.join("manifest.json")).unwrap();
    let good_keyring = std::fs::read(ds.join("keyring.json")).unwrap();
    let restore = || {
        std::fs::write(&shard, &good_shard).unwrap();
        std::fs::write(ds.join("manifest.json"), &good_manifest).unwrap();
        std::fs::write(ds.join("keyring.json"), &good_keyring).unwrap();
    };
    let verify = ["verify", "--key", "k.key", "ds"];

    // A shard header of ~95 MB of tiny arrays (a value tree of it took 1.1-1.7 GB).
    let header = repeated(
        "{\"t\":{\"dtype\":\"U8\",\"shape\":[",
        "[]",
        47_000_000,
        "]}}",
    );
    std::fs::write(&shard, safetensors(&header, &[])).unwrap();
    refused(
        "100 MB header of tiny arrays",
        dir,
        &verify,
        "shard-00000",
        "header",
    );
    // The same size of tiny objects in __metadata__.
    let header = repeated("{\"__metadata__\":{\"m\":[", "{}", 47_000_000, "]}}");
    std::fs::write(&shard, safetensors(&header, &[])).unwrap();
    refused(
        "100 MB header of tiny objects",
        dir,
        &verify,
        "shard-00000",
        "header",
    );
    restore();

    // A 60 MiB manifest of tiny objects, and one nested 200,000 deep.
    let manifest = repeated("{\"shards\":[", "{}", 30_000_000, "]}");
    std::fs::write(ds.join("manifest.json"), manifest).unwrap();
    refused(
        "60 MiB manifest of tiny objects",
        dir,
        &verify,
        "manifest.json",
        "manifest",
    );
    let nested = format!("{}{}", "[".repeat(200_000), "]".repeat(200_000));
    std::fs::write(ds.join("manifest.json"), nested).unwrap();
    refused(
        "manifest nested 200,000 deep",
        dir,
        &verify,
        "manifest.json",
        "manifest",
    );
    restore();

    // Keyrings: 200,000 entries (the duplicate check was quadratic: hours at 64 MiB), refused
    // at the cap on master keys; 4,000 entries (under it), whose wrong-key error lists a few
    // ids, not 4,000; one key wrapping 1,040,000 data keys, near the 64 MiB size cap.
    let text = String::from_utf8(good_keyring.clone()).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let wrap = serde_json::to_string(&v["wraps"][0]).unwrap();
    let own_id = v["wraps"][0]["key_id"].as_str().unwrap();
    let keyring_of = |n: usize| {
        let wraps: Vec<String> = (0..n)
            .map(|i| wrap.replacen(own_id, &format!("{i:016x}"), 1))
            .collect();
        let mut ring = v.clone();
        ring["wraps"] = serde_json::Value::Null;
        serde_json::to_string(&ring).unwrap().replace(
            "\"wraps\":null",
            &format!("\"wraps\":[{}]", wraps.join(",")),
        )
    };
    std::fs::write(ds.join("keyring.json"), keyring_of(200_000)).unwrap();
    refused(
        "keyring of 200,000 entries",
        dir,
        &verify,
        "keyring.json",
        "4096",
    );
    std::fs::write(ds.join("keyring.json"), keyring_of(4_000)).unwrap();
    refused(
        "keyring of 4,000 entries",
        dir,
        &verify,
        "keyring.json",
        "wrong key",
    );
    let o = run(dir, &verify);
    assert!(
        o.stderr.len() < 4096 && o.stderr.contains("more"),
        "the wrong-key error lists every key id: {} bytes",
        o.stderr.len()
    );
    let key = v["wraps"][0]["data_keys"][0].as_str().unwrap().to_string();
    let keys = vec![format!("\"{key}\""); 1_040_000].join(",");
    let mut ring = v.clone();
    ring["wraps"][0]["data_keys"] = serde_json::Value::Null;
    let ring = serde_json::to_string(&ring)
        .unwrap()
        .replace("\"data_keys\":null", &format!("\"data_keys\":[{keys}]"));
    assert!(
        ring.len() > 56 << 20 && ring.len() < 64 << 20,
        "{}",
        ring.len()
    );
    std::fs::write(ds.join("keyring.json"), ring).unwrap();
    refused(
        "keyring of 1,040,000 data keys",
        dir,
        &verify,
        "keyring.json",
        "data keys",
    );
    restore();

    // Larger than the caps: refused before reading.
    let big = std::fs::File::create(ds.join("keyring.json")).unwrap();
    big.set_len((64 << 20) + 1).unwrap();
    refused("keyring over 64 MiB", dir, &verify, "keyring.json", "limit");
    restore();

    // A FIFO where a file belongs: refused at once, not waited on.
    for name in ["manifest.json", "keyring.json", "shard-00000.safetensors"] {
        let p = ds.join(name);
        std::fs::remove_file(&p).unwrap();
        let ok = Command::new("mkfifo").arg(&p).status().unwrap();
        assert!(ok.success());
        refused(
            &format!("FIFO as {name}"),
            dir,
            &verify,
            name,
            "regular file",
        );
        std::fs::remove_file(&p).unwrap();
        restore();
    }

    // Key sources: an endless device, a pasted key (refused without being repeated).
    refused(
        "--key /dev/zero",
        dir,
        &["verify", "--key", "/dev/zero", "ds"],
        "/dev/zero",
        "regular file",
    );
    let pasted = "0f".repeat(32);
    let o = run(dir, &["verify", "--key", &pasted, "ds"]);
    assert!(o.code.is_some_and(|c| c != 0 && c != 101), "{}", o.stderr);
    assert!(
        !o.stderr.contains(&pasted),
        "the key was printed: {}",
        o.stderr
    );
}

#[test]
fn crafted_convert_inputs_end_in_clear_errors_within_the_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let o = run(dir, &["keygen", "--out", "k.key"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let convert = |input: &'static str| ["convert", "--key", "k.key", input, "--out", "out"];

    // [0, 2^62]: no bytes, a row size that overflows (it panicked).
    std::fs::write(
        dir.join("a.npy"),
        npy_bytes("<f4", "(0, 4611686018427387904)", &[]),
    )
    .unwrap();
    refused("npy [0, 2^62]", dir, &convert("a.npy"), "a.npy", "2^64");
    let st = safetensors(
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[0,4611686018427387904],\"data_offsets\":[0,0]}}",
        &[],
    );
    std::fs::write(dir.join("a.safetensors"), st).unwrap();
    refused(
        "safetensors [0, 2^62]",
        dir,
        &convert("a.safetensors"),
        "a.safetensors",
        "2^64",
    );
    // [2^52, 0]: 2^52 zero-width rows (the bench then allocated 6 GB and aborted).
    std::fs::write(
        dir.join("z.npy"),
        npy_bytes("|u1", "(4503599627370496, 0)", &[]),
    )
    .unwrap();
    refused(
        "npy [2^52, 0]",
        dir,
        &convert("z.npy"),
        "\"z\"",
        "zero-byte rows",
    );
    // An input header of ~95 MB of tiny arrays.
    let header = repeated("{\"__metadata__\":{\"m\":[", "[]", 47_000_000, "]}}");
    std::fs::write(dir.join("h.safetensors"), safetensors(&header, &[])).unwrap();
    refused(
        "input header of tiny arrays",
        dir,
        &convert("h.safetensors"),
        "h.safetensors",
        "header",
    );
    // Inputs of many valid, empty tensors: 1,000,000 (refused while reading: no shard header
    // could list them) and 600,000 (refused before the shard header is built).
    let mut header = String::from("{");
    for i in 0..1_000_000 {
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            "\"t{i}\":{{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}"
        ));
    }
    header.push('}');
    assert!(
        header.len() > 55_000_000 && header.len() < 100_000_000,
        "{}",
        header.len()
    );
    std::fs::write(dir.join("e.safetensors"), safetensors(&header, &[])).unwrap();
    refused(
        "input header of 1,000,000 empty tensors",
        dir,
        &convert("e.safetensors"),
        "e.safetensors",
        "split the input",
    );
    let header = header[..header.find(",\"t600000\"").unwrap()].to_string() + "}";
    std::fs::write(dir.join("e.safetensors"), safetensors(&header, &[])).unwrap();
    refused(
        "input header of 600,000 empty tensors",
        dir,
        &convert("e.safetensors"),
        "shard 0",
        "split the input",
    );
    // A FIFO as an input.
    let ok = Command::new("mkfifo")
        .arg(dir.join("f.npy"))
        .status()
        .unwrap();
    assert!(ok.success());
    refused(
        "FIFO input",
        dir,
        &convert("f.npy"),
        "f.npy",
        "regular file",
    );
}
