//! Shapes at the edges, from `convert` to every loader: shape products that overflow (also
//! hidden behind a zero row count), scalars and empty tensors, and zero-width columns. The rule
//! for the last (docs/FORMAT.md, section 5): a dataset needs at least one column whose rows hold
//! bytes, so its row count is bounded by its data; zero-width columns beside such a column load
//! as `[B, 0]` tensors. And `convert`'s summary says which columns are readable.

use std::path::{Path, PathBuf};

use ciphershard::MasterKey;
use ciphershard::cipher::Backend;
use ciphershard::format::{self, ConvertInput, DatasetKind, Dtype, Layout};
use ciphershard::pipeline::{FormatSource, Loader, LoaderOptions};

#[path = "format_common/mod.rs"]
mod format_common;
use format_common::*;

#[path = "device_common/mod.rs"]
mod device_common;

/// A plaintext safetensors file holding `tensors` (name, dtype, shape, data offsets) over
/// `data` bytes.
fn safetensors(
    dir: &Path,
    name: &str,
    tensors: &[(&str, &str, &[u64], [u64; 2])],
    data: usize,
) -> PathBuf {
    let entries: Vec<String> = tensors
        .iter()
        .map(|(n, d, s, o)| {
            format!(
                r#""{n}":{{"dtype":"{d}","shape":{s:?},"data_offsets":[{},{}]}}"#,
                o[0], o[1]
            )
        })
        .collect();
    let header = format!("{{{}}}", entries.join(","));
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.resize(v.len() + data, 7);
    let p = dir.join(name);
    std::fs::write(&p, v).unwrap();
    p
}

/// An NPY file of `descr` and `shape` (a Python tuple) over `data` bytes.
fn npy(dir: &Path, name: &str, descr: &str, shape: &str, data: usize) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, npy_bytes(descr, shape, &vec![3; data])).unwrap();
    p
}

/// A key file holding `[b; 32]` in hex (mode 0600), as the command line reads keys.
fn key_file(dir: &Path, b: u8) -> PathBuf {
    let p = dir.join(format!("k{b}.hex"));
    std::fs::write(&p, format!("{}\n", format!("{b:02x}").repeat(32))).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    p
}

/// Runs the `ciphershard` binary.
fn cli<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ciphershard"))
        .args(args)
        .env("NODEVICE_SELECT", "1")
        .output()
        .unwrap()
}

fn mem(name: &str, dtype: Dtype, shape: &[u64], data: Vec<u8>) -> ConvertInput {
    ConvertInput::InMemory {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
        data,
    }
}

/// `convert` refuses `inputs` with an error whose message holds every one of `needles`, and
/// leaves nothing behind.
fn refused(inputs: &[ConvertInput], needles: &[&str]) -> String {
    let out = tempfile::tempdir().unwrap();
    let o = out.path().join("ds");
    let e = convert_quiet(inputs, &o, &opts(64, 1 << 20, &[]))
        .map(|s| s.rows)
        .expect_err("converted");
    let msg = e.to_string();
    for n in needles {
        assert!(msg.contains(n), "'{n}' not in: {msg}");
    }
    assert!(!o.exists() || std::fs::read_dir(&o).unwrap().count() == 0);
    msg
}

/// `[0, 2^62]`: the whole tensor has 0 bytes (valid), one row has 2^64 (it panicked at an
/// `expect` before): an error naming the file and the tensor, for each input format.
#[test]
fn zero_rows_of_an_overflowing_row_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let big = 1u64 << 62;
    let st = safetensors(
        d,
        "rows0.safetensors",
        &[("a", "F32", &[0, big], [0, 0])],
        0,
    );
    refused(
        &[ConvertInput::Safetensors(st)],
        &["rows0.safetensors", "'a'", "2^64"],
    );
    let st = safetensors(
        d,
        "u8.safetensors",
        &[("b", "U8", &[0, big, big], [0, 0])],
        0,
    );
    refused(
        &[ConvertInput::Safetensors(st)],
        &["u8.safetensors", "'b'", "2^64"],
    );
    let n = npy(d, "rows0.npy", "<f4", &format!("(0, {big})"), 0);
    refused(
        &[ConvertInput::Npy {
            column: "c".into(),
            path: n,
        }],
        &["rows0.npy", "'c'", "2^64"],
    );
    refused(&[mem("m", Dtype::F32, &[0, big], vec![])], &["'m'", "2^64"]);
}

/// Shapes whose whole size overflows are refused by every reader; an NPY data length of
/// 2^64 - 1 no longer overflows the "header + data = file" check (a panic in debug builds).
#[test]
fn overflowing_shapes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let st = safetensors(
        d,
        "wide.safetensors",
        &[("a", "U8", &[1 << 63, 2], [0, 0])],
        0,
    );
    refused(
        &[ConvertInput::Safetensors(st)],
        &["wide.safetensors", "'a'"],
    );
    for (file, shape) in [
        ("wide.npy", format!("({}, 2)", 1u64 << 63)),
        ("max.npy", format!("({},)", u64::MAX)),
        ("max2.npy", format!("({}, 1)", u64::MAX - 127)),
    ] {
        let n = npy(d, file, "|u1", &shape, 16);
        refused(
            &[ConvertInput::Npy {
                column: "c".into(),
                path: n,
            }],
            &[file],
        );
    }
    refused(&[mem("m", Dtype::U8, &[1 << 63, 2], vec![])], &["'m'"]);
    // Row counts summed over inputs: each fits, the sum does not.
    let z = || mem("z", Dtype::U8, &[1 << 63, 0], vec![]);
    refused(&[z(), z()], &["'z'", "2^64 rows"]);
}

/// A scalar cannot be a dataset's column (its first dimension is the row count), but a lone
/// safetensors file of tensors may hold one; `[0]` is a dataset of no rows, which loads as no
/// batch.
#[test]
fn scalars_and_empty_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let n = npy(d, "scalar.npy", "<i8", "()", 8);
    refused(
        &[ConvertInput::Npy {
            column: "s".into(),
            path: n,
        }],
        &["scalar.npy", "scalar"],
    );
    refused(&[mem("s", Dtype::I64, &[], vec![0; 8])], &["'s'", "scalar"]);
    let st = safetensors(
        d,
        "weights.safetensors",
        &[("w", "F32", &[2, 2], [0, 16]), ("t", "I64", &[], [16, 24])],
        24,
    );
    let s = convert_quiet(
        &[ConvertInput::Safetensors(st)],
        &d.join("weights"),
        &opts(64, 1 << 20, &[]),
    )
    .unwrap();
    assert_eq!((s.kind, s.rows, s.columns), (DatasetKind::Tensors, 0, 2));

    let out = d.join("empty");
    let s = convert_quiet(
        &[mem("e", Dtype::U8, &[0], vec![])],
        &out,
        &opts(64, 1 << 20, &[]),
    )
    .unwrap();
    assert_eq!((s.kind, s.rows, s.shards), (DatasetKind::Dataset, 0, 1));
    let src = FormatSource::open(&out, &key(1), Backend::Cpu).unwrap();
    let mut l = Loader::new(src, &LoaderOptions::default()).unwrap();
    assert!(l.next().is_none());
}

/// A dataset of only zero-width columns is refused at conversion, whatever the row count
/// (2^52 rows of `[2^52, 0]` converted and verified, then `bench` aborted on a 6 GB plan).
#[test]
fn only_zero_width_columns_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for rows in [4, 1 << 40, 1 << 52] {
        refused(
            &[mem("z", Dtype::U8, &[rows, 0], vec![])],
            &["zero-byte rows", "\"z\""],
        );
    }
    refused(
        &[
            mem("a", Dtype::F32, &[9, 0], vec![]),
            mem("b", Dtype::I16, &[9, 3, 0], vec![]),
        ],
        &["zero-byte rows", "\"a\", \"b\""],
    );
    let n = npy(d, "z.npy", "|u1", &format!("({}, 0)", 1u64 << 52), 0);
    refused(
        &[ConvertInput::Npy {
            column: "z".into(),
            path: n,
        }],
        &["z.npy: ", "zero-byte rows"],
    );
    let st = safetensors(
        d,
        "z.safetensors",
        &[
            ("a", "U8", &[1 << 40, 0], [0, 0]),
            ("b", "F64", &[1 << 40, 2, 0], [0, 0]),
        ],
        0,
    );
    refused(
        &[ConvertInput::Safetensors(st)],
        &["z.safetensors: ", "zero-byte rows"],
    );
}

/// Zero-width columns beside a normal one: converted, verified, and delivered by the host
/// loader as `[B, 0]` (and `[B, 2, 0]`) tensors with every other column's values intact.
#[test]
fn zero_width_columns_beside_a_normal_one_load_as_empty_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let key = device_common::make_zero_width(dir.path(), 300);
    format::verify(&unlock(dir.path(), &key).unwrap(), &mut |_, _| {}).unwrap();
    let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
    let o = LoaderOptions {
        batch_size: 64,
        seed: 3,
        epochs: 2,
        ..Default::default()
    };
    let mut rows = 0;
    for b in Loader::new(src, &o).unwrap() {
        let b = b.unwrap();
        let n = b.len() as u64;
        let shapes: Vec<_> = b
            .tensors()
            .map(|t| (t.name, t.shape(), t.bytes.len()))
            .collect();
        assert_eq!(
            shapes,
            [
                ("e", vec![n, 0], 0),
                ("x", vec![n, 3], n as usize * 12),
                ("p", vec![n, 2, 0], 0)
            ]
        );
        assert!(b.tensor("e").unwrap().as_slice::<u8>().unwrap().is_empty());
        let x: &[f32] = b.tensor("x").unwrap().as_slice().unwrap();
        for (i, &r) in b.row_ids().iter().enumerate() {
            assert_eq!(x[i * 3], (r * 3) as f32 * 0.5);
        }
        rows += n;
    }
    assert_eq!(rows, 600);
    // The bench touched the first byte of the first column, here zero-width: it panicked.
    let bench = ciphershard::bench::loader::BenchOptions {
        epochs: 1,
        batch_size: 50,
        ..Default::default()
    };
    let r = ciphershard::bench::loader::run(Some(dir.path()), Some(&key), &bench).unwrap();
    assert_eq!((r.rows, r.epoch_bytes), (300, 300 * 12));
}

/// Writes, as a tool holding `key` could, a one-shard dataset of `rows` rows whose every
/// tensor holds no bytes (`rows` is 0 or every column is zero-width): authentic (every tag
/// verifies) however absurd its shapes. `convert` refuses to write these; readers must refuse
/// (or bound) them too.
fn forge(dir: &Path, key: &MasterKey, rows: u64, cols: &[(&str, Dtype, &[u64])]) {
    use base64::Engine;
    use ciphershard::DataKey;
    use ciphershard::cipher::{Cipher, cpu::CpuCipher};
    use ciphershard::format::{
        AAD_LEN, Column, Descriptor, HEADER_TAG_NONCE, KEYRING_FILE, Keyring, MANIFEST_FILE,
        Manifest, ShardEntry, TensorDesc, canonical_header, shard_file_name,
    };
    use sha2::Digest;
    std::fs::create_dir_all(dir).unwrap();
    let dataset_id = [0x5a; 16];
    let chunk_size = 2 << 20;
    let tensors: Vec<TensorDesc> = cols
        .iter()
        .enumerate()
        .map(|(i, (name, dtype, row))| TensorDesc {
            name: name.to_string(),
            dtype: *dtype,
            shape: [&[rows][..], row].concat(),
            offsets: (0, 0),
            encrypted: true,
            first_chunk: i as u64,
            chunks: 1,
            layout: Layout::Fixed,
        })
        .collect();
    let desc = Descriptor {
        version: 1,
        dataset_id,
        shard_index: 0,
        shard_count: 1,
        row_start: 0,
        rows,
        chunk_size,
        tensors: tensors.clone(),
        metadata: Default::default(),
    };
    let json = desc.to_json();
    let digest: [u8; 32] = sha2::Sha256::digest(json.as_bytes()).into();
    let dk = DataKey::generate().unwrap();
    let opener = CpuCipher::new().prepare(&dk).unwrap();
    let mut tags = opener
        .seal_in_place(&HEADER_TAG_NONCE, json.as_bytes(), false, &mut [])
        .unwrap()
        .to_vec();
    // The one (empty) chunk of each tensor t: j = 0, chunks = 1, g = t (FORMAT.md 4.2).
    for t in 0..cols.len() as u64 {
        let mut aad = Vec::with_capacity(AAD_LEN);
        aad.extend_from_slice(b"CSHARD01");
        aad.extend_from_slice(&dataset_id);
        aad.extend_from_slice(&digest);
        aad.extend_from_slice(&0u32.to_be_bytes()); // shard
        aad.extend_from_slice(&(t as u32).to_be_bytes()); // tensor
        aad.extend_from_slice(&0u64.to_be_bytes()); // j
        aad.extend_from_slice(&1u64.to_be_bytes()); // chunks
        aad.extend_from_slice(&t.to_be_bytes()); // g
        aad.push(1); // encrypted
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&t.to_be_bytes());
        tags.extend_from_slice(&opener.seal_in_place(&nonce, &aad, true, &mut []).unwrap());
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(&tags);
    let header = canonical_header(&json, &b64, &tensors);
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&header);
    let name = shard_file_name(0);
    std::fs::write(dir.join(&name), &file).unwrap();
    let mut keyring = Keyring::new(&dir.join(KEYRING_FILE), dataset_id);
    keyring.set_wraps(key, &[dk]).unwrap();
    std::fs::write(dir.join(KEYRING_FILE), keyring.to_json()).unwrap();
    let manifest = Manifest {
        version: 1,
        dataset_id,
        kind: DatasetKind::Dataset,
        rows,
        chunk_size,
        columns: cols
            .iter()
            .map(|(name, dtype, row)| Column {
                name: name.to_string(),
                dtype: *dtype,
                shape: row.to_vec(),
                encrypted: true,
                ragged: false,
            })
            .collect(),
        shards: vec![ShardEntry {
            file: name,
            row_start: 0,
            rows,
            bytes: file.len() as u64,
            header_digest: digest,
        }],
    };
    std::fs::write(dir.join(MANIFEST_FILE), manifest.to_json()).unwrap();
}

/// An authentic dataset of 2^52 zero-width rows (what `convert` wrote before it refused them):
/// opening it is refused (a dataset needs a column whose rows hold bytes), so no reader, loader
/// or bench plans 2^52 rows (a 6 GB allocation, then an abort); every command exits with an
/// error naming the manifest, never a panic or abort.
#[test]
fn crafted_zero_width_dataset_is_refused_by_every_reader() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let k = key(9);
    forge(&ds, &k, 1 << 52, &[("z", Dtype::U8, &[0])]);
    let names_manifest = |e: ciphershard::Error| {
        let msg = e.to_string();
        assert!(
            msg.contains("manifest.json") && msg.contains("zero-byte rows"),
            "{msg}"
        );
    };
    names_manifest(format::Dataset::open(&ds).unwrap_err());
    names_manifest(FormatSource::open(&ds, &k, Backend::Cpu).unwrap_err());
    let bench = ciphershard::bench::loader::BenchOptions::default();
    names_manifest(ciphershard::bench::loader::run(Some(&ds), Some(&k), &bench).unwrap_err());

    // The command line: every command fails with a message (not 101 for a panic nor a signal
    // for an abort).
    let key_file = key_file(dir.path(), 9);
    let (ds_s, key_s) = (ds.to_str().unwrap(), key_file.to_str().unwrap());
    for args in [vec!["inspect", ds_s], vec!["verify", "--key", key_s, ds_s]] {
        let out = cli(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code().is_some_and(|c| c != 0 && c != 101)
                && stderr.contains("zero-byte rows"),
            "{out:?}"
        );
    }
    let out = cli(&[
        "bench",
        ds_s,
        "--key",
        key_s,
        "--backend",
        "cpu",
        "--epochs",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code().is_some_and(|c| c != 0 && c != 101) && stderr.contains("zero-byte rows"),
        "{out:?}"
    );
}

/// Authentic datasets of no rows whose row shapes overflow: one row of 2^64 bytes (the
/// loader's row-size product overflowed: a panic in debug builds, a wrapped size in release),
/// refused when the dataset is opened; or two columns whose rows add up to 2^64 bytes, which
/// open and verify in bounded time and which the loaders refuse, whatever the backend.
#[test]
fn crafted_rows_beyond_64_bits_are_refused_by_the_loaders() {
    let dir = tempfile::tempdir().unwrap();
    let k = key(9);
    let unlock_and_verify = |ds: &Path| {
        format::verify(&unlock(ds, &k).unwrap(), &mut |_, _| {}).unwrap();
    };
    let one = dir.path().join("one");
    forge(&one, &k, 0, &[("a", Dtype::F32, &[1 << 62])]);
    let msg = format::Dataset::open(&one).unwrap_err().to_string();
    assert!(
        msg.contains("manifest.json") && msg.contains("'a'") && msg.contains("2^64"),
        "{msg}"
    );
    let two = dir.path().join("two");
    forge(
        &two,
        &k,
        0,
        &[("a", Dtype::U8, &[1 << 63]), ("b", Dtype::U16, &[1 << 62])],
    );
    unlock_and_verify(&two);
    let src = FormatSource::open(&two, &k, Backend::Cpu).unwrap();
    let msg = Loader::new(src, &LoaderOptions::default())
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("2^64 bytes"), "{msg}");
}

/// The summary names the readable (plain) and the encrypted columns; with `--plain '*'` the
/// command line warns that nothing is encrypted.
#[test]
fn summary_lists_readable_and_encrypted_columns() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = || {
        [
            column("x", Dtype::F32, &[10, 3], 1),
            column("label", Dtype::U8, &[10], 2),
            column("mask", Dtype::U8, &[10, 2], 3),
        ]
    };
    for (i, (plain, readable, encrypted)) in [
        (&[][..], &[][..], &["x", "label", "mask"][..]),
        (&["label"][..], &["label"][..], &["x", "mask"][..]),
        (&["*"][..], &["x", "label", "mask"][..], &[][..]),
        (&["?", "x", "*a*"][..], &["x", "label", "mask"][..], &[][..]),
    ]
    .into_iter()
    .enumerate()
    {
        let s = convert_quiet(
            &inputs(),
            &dir.path().join(format!("ds{i}")),
            &opts(64, 1 << 20, plain),
        )
        .unwrap();
        assert_eq!(s.plain_columns, readable, "{plain:?}");
        assert_eq!(s.encrypted_columns, encrypted, "{plain:?}");
    }

    let st = safetensors(
        dir.path(),
        "in.safetensors",
        &[("x", "U8", &[4, 2], [0, 8]), ("y", "U8", &[4], [8, 12])],
        12,
    );
    let key_file = key_file(dir.path(), 1);
    let convert = |out: &str, plain: &str| {
        let out = dir.path().join(out);
        let (k, st, out) = (key_file.as_os_str(), st.as_os_str(), out.as_os_str());
        cli(&[
            "convert".as_ref(),
            "--key".as_ref(),
            k,
            st,
            "--out".as_ref(),
            out,
            "--plain".as_ref(),
            plain.as_ref(),
        ])
    };
    let out = convert("all", "*");
    assert!(out.status.success(), "{out:?}");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(stdout.contains("encrypted columns: none"), "{stdout}");
    assert!(
        stdout.contains(r#"readable columns (--plain: authenticated, not encrypted): "x", "y""#),
        "{stdout}"
    );
    assert!(
        stderr.contains("warning: every column is readable"),
        "{stderr}"
    );
    let out = convert("some", "y");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(stdout.contains(r#"encrypted columns: "x""#), "{stdout}");
    assert!(!stderr.contains("warning"), "{stderr}");
}

/// Errors about the columns together name the inputs they come from (found while fuzzing
/// convert's inputs: they named only the columns).
#[test]
fn dataset_level_refusals_name_the_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = npy(d, "a.npy", "|u1", "(3,)", 3);
    let b = npy(d, "b.npy", "<f4", "(4, 2)", 32);
    refused(
        &[
            ConvertInput::Npy {
                column: "a".into(),
                path: a,
            },
            ConvertInput::Npy {
                column: "b".into(),
                path: b,
            },
        ],
        &[
            "different row counts",
            "'a' (",
            "a.npy) has 3",
            "'b' (",
            "b.npy) has 4",
        ],
    );
}

/// Found by fuzz_targets/load.rs: the tag of a zero-width column's chunk (which holds no
/// bytes, so no batch ever reads it) could be changed without the loader noticing, while
/// `verify` refused the shard. The loader checks those tags when it opens the dataset.
#[test]
fn a_changed_tag_of_an_empty_chunk_fails_the_loader() {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as B64;
    for column in ["e", "p"] {
        let dir = tempfile::tempdir().unwrap();
        let key = device_common::make_zero_width(dir.path(), 300);
        let p = dir.path().join(format::shard_file_name(1));
        let h = format::ShardHeader::read(&p).unwrap();
        let (_, t) = h.tensor(column).unwrap();
        assert_eq!((t.len(), t.chunks), (0, 1));
        let mut file = std::fs::read(&p).unwrap();
        let text = String::from_utf8_lossy(&file).into_owned();
        let key_at = text.find("\"ciphershard.tags\":\"").unwrap() + 20;
        let end = key_at + text[key_at..].find('"').unwrap();
        let mut tags = B64.decode(&text[key_at..end]).unwrap();
        tags[16 * (1 + t.first_chunk as usize)] ^= 1;
        let b64 = B64.encode(&tags);
        assert_eq!(b64.len(), end - key_at);
        file[key_at..end].copy_from_slice(b64.as_bytes());
        std::fs::write(&p, &file).unwrap();
        let ud = unlock(dir.path(), &key).unwrap();
        assert!(format::verify(&ud, &mut |_, _| {}).is_err());
        let o = LoaderOptions {
            batch_size: 64,
            ..Default::default()
        };
        let r = FormatSource::open(dir.path(), &key, Backend::Cpu)
            .and_then(|src| Loader::new(src, &o)?.try_for_each(|b| b.map(drop)));
        let e = r.expect_err("a changed tag went unnoticed").to_string();
        assert!(
            e.contains("shard-00001") && e.contains(&format!("tensor '{column}'")),
            "{e}"
        );
    }
}
