//! Hardening of the untrusted-input path (issue 13): linear uniqueness checks, caps and
//! nesting limits on the JSON files, non-regular files refused promptly, and values from files
//! that would overflow u64 arithmetic reported as errors naming the file.

mod format_common;

use std::path::Path;
use std::time::{Duration, Instant};

use ciphershard::format::{self, Dataset, Dtype, Keyring, Layout, Manifest, ShardHeader};
use format_common::*;

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
/// 200,000 entries took hours (2 * 10^10 comparisons). Two fixes: a hash set makes the check
/// linear (a keyring at the entry cap, a duplicate last, parses in milliseconds), and the cap
/// on master keys (4096) refuses 200,000 entries while reading, before any check.
#[test]
fn keyring_entries_are_capped_and_checked_in_linear_time() {
    let path = Path::new("keyring.json");
    for repeat in [false, true] {
        let text = big_keyring(ciphershard::format::MAX_KEY_WRAPS, repeat);
        let start = Instant::now();
        let r = Keyring::parse(path, text.as_bytes());
        let took = start.elapsed();
        if repeat {
            assert_err_names(r, "keyring.json", "key id 0000000000000000 is listed twice");
        } else {
            assert_eq!(r.unwrap().wraps.len(), ciphershard::format::MAX_KEY_WRAPS);
        }
        assert!(
            took < Duration::from_secs(30),
            "a keyring at the cap took {took:?}: quadratic?"
        );
    }
    let text = big_keyring(200_000, false);
    let start = Instant::now();
    assert_err_names(
        Keyring::parse(path, text.as_bytes()),
        "keyring.json",
        "4096",
    );
    assert!(start.elapsed() < Duration::from_secs(30));
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

/// Runs `f` on a thread and fails the test if it has not returned within 20 s (a hang would
/// otherwise stall the whole suite).
fn promptly<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{what} hung"))
}

/// Replaces `path` with a FIFO (nobody ever writes to it).
#[cfg(unix)]
fn make_fifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    let ok = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo runs")
        .success();
    assert!(ok, "mkfifo {}", path.display());
}

/// Issue 13 item 6: a FIFO named manifest.json, keyring.json or a shard hung `inspect` and
/// `verify` forever (opening a FIFO for reading waits for a writer). Every dataset file is
/// opened non-blocking and refused unless it is a regular file.
#[cfg(unix)]
#[test]
fn fifos_in_a_dataset_are_refused_promptly() {
    for name in ["manifest.json", "keyring.json", "shard-00001.safetensors"] {
        let dir = tempfile::tempdir().unwrap();
        small_dataset(dir.path());
        make_fifo(&dir.path().join(name));
        let d = dir.path().to_path_buf();
        let r = promptly(name, move || Dataset::open(&d).map(drop));
        assert_err_names(r, name, "not a regular file (a FIFO)");
    }
    // A directory or a device in the manifest's place: refused the same way.
    let dir = tempfile::tempdir().unwrap();
    small_dataset(dir.path());
    let m = dir.path().join("manifest.json");
    std::fs::remove_file(&m).unwrap();
    std::fs::create_dir(&m).unwrap();
    assert_err_names(
        Dataset::open(dir.path()),
        "manifest.json",
        "not a regular file (a directory)",
    );
    std::fs::remove_dir(&m).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &m).unwrap();
    assert_err_names(
        Dataset::open(dir.path()),
        "manifest.json",
        "not a regular file (a device)",
    );
}

/// A shard swapped for a FIFO after the dataset was opened (its identity pinned, its file not
/// yet opened): the lazy open does not block either.
#[cfg(unix)]
#[test]
fn shard_swapped_for_a_fifo_after_open_is_refused_promptly() {
    let dir = tempfile::tempdir().unwrap();
    small_dataset(dir.path());
    let p = dir.path().join(format::shard_file_name(0));
    let store = ciphershard::store::LocalStore::open([p.clone()]).unwrap();
    make_fifo(&p);
    let r = promptly("read of a swapped shard", move || {
        use ciphershard::store::ShardStore;
        store.read_at(0, 0, &mut [0u8; 8])
    });
    assert_err_names(r, "shard-00000", "not a regular file (a FIFO)");
    // And ShardHeader::read on a FIFO path (the store's own stat refuses it).
    let r = promptly("header read of a FIFO", move || {
        ShardHeader::read(&p).map(drop)
    });
    assert_err_names(r, "shard-00000", "not a regular file (a FIFO)");
}

/// One shard of a hand-made dataset: its rows and its tensors (name, dtype, full shape).
struct Craft {
    row_start: u64,
    rows: u64,
    tensors: Vec<(&'static str, Dtype, Vec<u64>)>,
}

/// Writes a dataset that `convert` would not (or no longer) write, but whose every file is
/// well-formed: canonical headers, real header tags and wrapped data keys under `key` (chunk
/// tags are zero: only opening and unlocking are exercised).
fn craft(dir: &Path, rows: u64, columns: &[(&'static str, Dtype, Vec<u64>)], shards: &[Craft]) {
    use base64::Engine;
    use ciphershard::cipher::Cipher;
    use ciphershard::cipher::cpu::CpuCipher;
    use ciphershard::format::{Column, DatasetKind, Descriptor, ShardEntry, TensorDesc};
    use sha2::Digest;
    let dataset_id = [5u8; 16];
    let mut entries = Vec::new();
    let mut data_keys = Vec::new();
    for (i, s) in shards.iter().enumerate() {
        let (mut off, mut g) = (0u64, 0u64);
        let tensors: Vec<TensorDesc> = s
            .tensors
            .iter()
            .map(|(name, dtype, shape)| {
                let len = shape
                    .iter()
                    .try_fold(dtype.size_bytes() as u64, |a, &d| a.checked_mul(d))
                    .unwrap();
                let chunks = len.div_ceil(64).max(1);
                let t = TensorDesc {
                    name: name.to_string(),
                    dtype: *dtype,
                    shape: shape.clone(),
                    offsets: (off, off + len),
                    encrypted: true,
                    first_chunk: g,
                    chunks,
                    layout: Layout::Fixed,
                };
                (off, g) = (off + len, g + chunks);
                t
            })
            .collect();
        let d = Descriptor {
            version: 1,
            dataset_id,
            shard_index: i as u32,
            shard_count: shards.len() as u32,
            row_start: s.row_start,
            rows: s.rows,
            chunk_size: 64,
            tensors,
            metadata: Default::default(),
        };
        let desc = d.to_json();
        let dk = ciphershard::DataKey::generate().unwrap();
        let opener = CpuCipher::new().prepare(&dk).unwrap();
        let mut tags = opener
            .seal_in_place(&format::HEADER_TAG_NONCE, desc.as_bytes(), false, &mut [])
            .unwrap()
            .to_vec();
        tags.resize(16 * (1 + g as usize), 0);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&tags);
        let header = format::canonical_header(&desc, &b64, &d.tensors);
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(&header);
        file.resize(file.len() + off as usize, 0);
        std::fs::write(dir.join(format::shard_file_name(i as u32)), &file).unwrap();
        entries.push(ShardEntry {
            file: format::shard_file_name(i as u32),
            row_start: s.row_start,
            rows: s.rows,
            bytes: file.len() as u64,
            header_digest: sha2::Sha256::digest(desc.as_bytes()).into(),
        });
        data_keys.push(dk);
    }
    let kpath = dir.join("keyring.json");
    let mut ring = Keyring::new(&kpath, dataset_id);
    ring.set_wraps(&key(1), &data_keys).unwrap();
    std::fs::write(&kpath, ring.to_json()).unwrap();
    let m = Manifest {
        version: 1,
        dataset_id,
        kind: DatasetKind::Dataset,
        rows,
        chunk_size: 64,
        columns: columns
            .iter()
            .map(|(name, dtype, shape)| Column {
                name: name.to_string(),
                dtype: *dtype,
                shape: shape.clone(),
                encrypted: true,
                ragged: false,
            })
            .collect(),
        shards: entries,
    };
    std::fs::write(dir.join("manifest.json"), m.to_json()).unwrap();
}

/// Issue 13 item 12: shard row counts summed across shards wrapped silently in release builds
/// (and panicked in debug builds): two shards of 2^63 zero-width rows passed as a dataset of 0
/// rows. Only zero-width columns allow such row counts (rows are bounded by the file's bytes
/// otherwise), and a dataset of only zero-width columns is refused before its shards are read;
/// the sum is checked as well.
#[test]
fn row_counts_that_overflow_u64_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let half = 1u64 << 63;
    craft(
        dir.path(),
        0,
        &[("x", Dtype::U8, vec![0])],
        &[
            Craft {
                row_start: 0,
                rows: half,
                tensors: vec![("x", Dtype::U8, vec![half, 0])],
            },
            Craft {
                row_start: half,
                rows: half,
                tensors: vec![("x", Dtype::U8, vec![half, 0])],
            },
        ],
    );
    assert_err_names(Dataset::open(dir.path()), "manifest.json", "zero-byte rows");
    // The same files with a sum that fits are refused for the same reason, not for the sum.
    let dir = tempfile::tempdir().unwrap();
    craft(
        dir.path(),
        half + 1,
        &[("x", Dtype::U8, vec![0])],
        &[
            Craft {
                row_start: 0,
                rows: half,
                tensors: vec![("x", Dtype::U8, vec![half, 0])],
            },
            Craft {
                row_start: half,
                rows: 1,
                tensors: vec![("x", Dtype::U8, vec![1, 0])],
            },
        ],
    );
    assert_err_names(Dataset::open(dir.path()), "manifest.json", "zero-byte rows");
}

/// Item 12 in the loader: a row's byte size was `shape.product() * size`, which overflows for
/// a well-formed zero-row dataset of [0, 2^62, 2^62] tensors (the whole tensor is 0 bytes).
#[test]
fn row_sizes_that_overflow_u64_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let big = 1u64 << 62;
    craft(
        dir.path(),
        0,
        &[("x", Dtype::U8, vec![big, big])],
        &[Craft {
            row_start: 0,
            rows: 0,
            tensors: vec![("x", Dtype::U8, vec![0, big, big])],
        }],
    );
    assert_err_names(
        Dataset::open(dir.path()),
        "manifest.json",
        "more than 2^64-1 bytes",
    );
}

/// Item 3: every value has a fixed JSON type, so nothing nests deeper than the format does:
/// `__metadata__` (and the descriptor's `metadata`) hold strings only, unknown fields are
/// refused before their value is read, and a 200,000-deep nesting is refused without recursion.
#[test]
fn nested_structures_are_refused_where_the_format_has_none() {
    let dir = tempfile::tempdir().unwrap();
    small_dataset(dir.path());
    let p = dir.path().join(format::shard_file_name(0));
    let file = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&file[8..8 + n]).unwrap().trim_end();
    let reparse = |h: &str| {
        let mut h = h.to_string();
        while !h.len().is_multiple_of(8) {
            h.push(' ');
        }
        let mut f = (h.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(h.as_bytes());
        f.extend_from_slice(&file[8 + n..]);
        ShardHeader::parse(&p, &f).map(drop)
    };
    reparse(header).unwrap();
    let nested = header.replacen(
        r#"{"__metadata__":{"#,
        r#"{"__metadata__":{"extra":{"a":[1,{"b":2}]},"#,
        1,
    );
    assert_err_names(
        reparse(&nested),
        "shard-00000",
        "expected `__metadata__` to be a string",
    );
    let nested = header.replacen(r#"\"source\":\"test\""#, r#"\"source\":{}"#, 1);
    assert_ne!(nested, header);
    assert_err_names(
        reparse(&nested),
        "shard-00000",
        "expected `metadata` to be a string",
    );
    let deep = 200_000;
    let nested = header.replacen(
        r#"{"__metadata__":{"#,
        &format!(
            r#"{{"__metadata__":{{"extra":{}{}"#,
            "[".repeat(deep),
            "]".repeat(deep) + ","
        ),
        1,
    );
    assert_err_names(reparse(&nested), "shard-00000", "__metadata__");
    // Manifest and keyring: deep nesting under an unknown field or in place of a list.
    let m = dir.path().join("manifest.json");
    let text = std::fs::read_to_string(&m).unwrap();
    for (edit, cause) in [
        (
            text.replacen(
                '{',
                &format!(r#"{{"x":{}{},"#, "[".repeat(deep), "]".repeat(deep)),
                1,
            ),
            "unknown field `x`",
        ),
        (
            text.replacen(
                r#""columns":["#,
                &format!(r#""columns":[{}{},"#, "[".repeat(deep), "]".repeat(deep)),
                1,
            ),
            "expected `columns` to be an object",
        ),
    ] {
        assert_err_names(Manifest::parse(&m, edit.as_bytes()), "manifest.json", cause);
    }
    let k = dir.path().join("keyring.json");
    let text = std::fs::read_to_string(&k).unwrap();
    let edit = text.replacen(
        r#""wraps":["#,
        &format!(
            r#""wraps":[{}{},"#,
            "{\"a\":".repeat(deep),
            "0".to_string() + &"}".repeat(deep)
        ),
        1,
    );
    assert_err_names(
        Keyring::parse(&k, edit.as_bytes()),
        "keyring.json",
        "unknown field `a`",
    );
}

/// Item 3: the caps on counts are checked while reading (the metadata map, a shape's rank).
#[test]
fn counts_over_the_caps_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    small_dataset(dir.path());
    let m = dir.path().join("manifest.json");
    let text = std::fs::read_to_string(&m).unwrap();
    let rank = |r: usize| {
        let shape = vec!["1"; r].join(",");
        text.replacen(r#""shape":[3]"#, &format!(r#""shape":[{shape}]"#), 1)
    };
    assert_ne!(rank(64), text);
    Manifest::parse(&m, rank(64).as_bytes()).unwrap();
    assert_err_names(
        Manifest::parse(&m, rank(65).as_bytes()),
        "manifest.json",
        "`shape` holds more than 64 entries",
    );
    let p = dir.path().join(format::shard_file_name(0));
    let mut h = ShardHeader::read(&p).unwrap().descriptor;
    h.metadata = (0..=format::MAX_METADATA_ENTRIES)
        .map(|i| (i.to_string(), String::new()))
        .collect();
    assert_err_names(
        format::Descriptor::parse(&p, &h.to_json()),
        "shard-00000",
        "`metadata` holds more than 65536 entries",
    );
    h.metadata.pop_first();
    format::Descriptor::parse(&p, &h.to_json()).unwrap();
}

/// Issue 13 items 6 and the input side: `convert fifo.npy` (or a FIFO named `.safetensors`)
/// waited forever for a writer. Inputs are opened like dataset files: non-blocking, regular
/// files only, so the error comes at once and names the file.
#[cfg(unix)]
#[test]
fn fifos_as_convert_inputs_are_refused_promptly() {
    use format::ConvertInput;
    let dir = tempfile::tempdir().unwrap();
    for name in ["in.npy", "in.safetensors"] {
        let p = dir.path().join(name);
        make_fifo(&p);
        let input = if name.ends_with(".npy") {
            ConvertInput::Npy {
                column: "x".into(),
                path: p.clone(),
            }
        } else {
            ConvertInput::Safetensors(p.clone())
        };
        let out = dir.path().join(format!("out-{name}"));
        let r = promptly(name, move || {
            convert_quiet(&[input], &out, &opts(64, 1 << 20, &[])).map(drop)
        });
        assert_err_names(r, name, "not a regular file (a FIFO)");
    }
    let p = dir.path().join("in.npy");
    let r = promptly("npy::read_header", move || {
        format::npy::read_header(&p).map(drop)
    });
    assert_err_names(r, "in.npy", "not a regular file (a FIFO)");
    // A directory in an input's place is refused the same way (it used to fail on the read).
    let d = dir.path().join("dir.safetensors");
    std::fs::create_dir(&d).unwrap();
    assert_err_names(
        convert_quiet(
            &[ConvertInput::Safetensors(d)],
            &dir.path().join("out-dir"),
            &opts(64, 1 << 20, &[]),
        ),
        "dir.safetensors",
        "not a regular file (a directory)",
    );
}

/// What `convert` writes, readers must open: it refuses, before writing anything, what
/// docs/FORMAT.md section 9 caps (the same constants): ranks over 64, more than 65,536 metadata
/// entries (the inputs' and the options' together), more than 2^20 columns or shards, names a
/// shard may not hold, and a manifest or keyring over 64 MiB.
#[test]
fn convert_refuses_what_readers_refuse() {
    use format::{ConvertInput, MAX_METADATA_ENTRIES, MAX_RANK, MAX_SHARDS, MAX_TENSORS};
    let dir = tempfile::tempdir().unwrap();
    let out = std::cell::Cell::new(0);
    let out = || {
        out.set(out.get() + 1);
        dir.path().join(format!("out{}", out.get()))
    };
    // Converts and opens.
    let accept = |inputs: &[ConvertInput], o: &format::ConvertOptions| {
        let d = out();
        convert_quiet(inputs, &d, o).unwrap();
        Dataset::open(&d).unwrap();
    };
    // Refuses, saying `cause`, with nothing written.
    let refuse = |inputs: &[ConvertInput], o: &format::ConvertOptions, cause: &str| {
        let d = out();
        let e = convert_quiet(inputs, &d, o).unwrap_err().to_string();
        assert!(e.contains(cause), "'{cause}' not in: {e}");
        assert!(!d.exists() || std::fs::read_dir(&d).unwrap().count() == 0);
    };
    let small = opts(64, 1 << 20, &[]);

    // Rank: 64 dimensions convert and open; 65 are refused (in memory and from an NPY file).
    accept(&[column("r", Dtype::U8, &[1; MAX_RANK], 1)], &small);
    let r65 = [column("r", Dtype::U8, &[1; MAX_RANK + 1], 1)];
    refuse(&r65, &small, "'r' has 65 dimensions, more than the 64");
    let npy = dir.path().join("r65.npy");
    let shape = format!("({},)", vec!["1"; 65].join(","));
    std::fs::write(&npy, npy_bytes("|u1", &shape, &[0])).unwrap();
    let npy = ConvertInput::Npy {
        column: "r".into(),
        path: npy,
    };
    refuse(
        &[npy],
        &small,
        "r65.npy: malformed NPY header: 'shape' has 65 entries: more than 64 dimensions",
    );

    // Names a shard may not hold.
    for bad in ["", "__metadata__"] {
        refuse(
            &[column(bad, Dtype::U8, &[4], 1)],
            &small,
            "empty or reserved",
        );
    }

    // Metadata: the inputs' and the options' entries together.
    let meta = |from: usize, n: usize| -> std::collections::BTreeMap<String, String> {
        (from..from + n)
            .map(|i| (i.to_string(), String::new()))
            .collect()
    };
    let st = dir.path().join("meta.safetensors");
    let header = serde_json::json!({
        "__metadata__": meta(0, 40_000),
        "x": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
    })
    .to_string();
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(&[0; 4]);
    std::fs::write(&st, v).unwrap();
    let st = [ConvertInput::Safetensors(st)];
    let mut o = opts(64, 1 << 20, &[]);
    o.metadata = meta(40_000, MAX_METADATA_ENTRIES - 40_000);
    accept(&st, &o);
    o.metadata = meta(39_999, MAX_METADATA_ENTRIES - 40_000 + 2);
    refuse(&st, &o, "65537 metadata entries, more than the 65536");

    // Shards: one row per shard.
    let one_row_each = opts(64, 1, &[]);
    let rows = MAX_SHARDS as u64 + 1;
    let x = |rows: u64| [column("x", Dtype::U8, &[rows], 1)];
    refuse(
        &x(rows),
        &one_row_each,
        "1048577 shards, more than the 1048576",
    );

    // The manifest (about 150 bytes a shard) and the keyring (59 bytes a shard per key) must
    // each stay within 64 MiB.
    refuse(
        &x(500_000),
        &one_row_each,
        "manifest.json would be over the 67108864-byte limit",
    );
    let mut three_keys = opts(64, 1, &[]);
    three_keys.keys = vec![key(1), key(2), key(3)];
    refuse(
        &x(400_000),
        &three_keys,
        "keyring.json would be over the 67108864-byte limit",
    );

    // Columns: 2^20 + 1 in memory.
    let many: Vec<ConvertInput> = (0..=MAX_TENSORS)
        .map(|i| column(&format!("{i:x}"), Dtype::U8, &[1], 1))
        .collect();
    refuse(&many, &small, "more than 1048576 columns");
}

/// Columns are matched by name across inputs with a hash map: `plan` compared each tensor
/// with every earlier column, so an input of 200,000 tensors took minutes before anything was
/// checked. (The output directory already holds a dataset, so convert stops right after the
/// plan.)
#[test]
fn convert_plans_many_columns_in_linear_time() {
    let dir = tempfile::tempdir().unwrap();
    small_dataset(dir.path());
    let n = 200_000;
    let entries: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#""{i:x}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{}]}}"#,
                i + 1
            )
        })
        .collect();
    let header = format!("{{{}}}", entries.join(","));
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.resize(v.len() + n, 0);
    let st = dir.path().join("wide.safetensors");
    std::fs::write(&st, v).unwrap();
    let start = Instant::now();
    let r = convert_quiet(
        &[format::ConvertInput::Safetensors(st)],
        dir.path(),
        &opts(64, 1 << 20, &[]),
    );
    let took = start.elapsed();
    assert!(
        r.unwrap_err()
            .to_string()
            .contains("already holds a dataset")
    );
    assert!(
        took < Duration::from_secs(30),
        "planning 200,000 columns took {took:?}: quadratic?"
    );
}
