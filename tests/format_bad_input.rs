//! The bad-input catalogue (issue 2): every case returns a clear error naming the file, none
//! panics, none allocates from an untrusted length, none hands out unverified plaintext.

mod format_common;

use std::path::{Path, PathBuf};

use ciphershard::cipher::Cipher;
use ciphershard::cipher::cpu::CpuCipher;
use ciphershard::format::{self, Dataset, Keyring, Manifest, ShardHeader, npy};
use ciphershard::{Error, Result};
use format_common::*;

fn shard(dir: &Path, i: u32) -> PathBuf {
    dir.join(format::shard_file_name(i))
}

/// Opens, unlocks with key 1 and verifies every chunk: the whole reader path.
fn full_check(dir: &Path) -> Result<()> {
    let ud = unlock(dir, &key(1))?;
    format::verify(&ud, &mut |_, _| {})?;
    Ok(())
}

/// Rewrites a shard's header text with `f`, re-padding and fixing the length prefix.
fn rewrite_header(path: &Path, f: impl FnOnce(String) -> String) {
    let file = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let mut h = f(String::from_utf8(file[8..8 + n].to_vec())
        .unwrap()
        .trim_end()
        .to_string());
    while !h.len().is_multiple_of(8) {
        h.push(' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(&file[8 + n..]);
    std::fs::write(path, out).unwrap();
}

fn with_dataset(f: impl FnOnce(&Path)) {
    let dir = tempfile::tempdir().unwrap();
    small_dataset(dir.path());
    full_check(dir.path()).expect("the pristine dataset is good");
    f(dir.path());
}

#[test]
fn truncated_shard() {
    with_dataset(|d| {
        let p = shard(d, 1);
        let full = std::fs::read(&p).unwrap();
        std::fs::write(&p, &full[..full.len() - 1]).unwrap();
        assert_err_names(Dataset::open(d), "shard-00001", "truncated");
        for cut in [0, 4, 8, 20] {
            std::fs::write(&p, &full[..cut]).unwrap();
            assert_err_names(ShardHeader::read(&p), "shard-00001", "");
            assert_err_names(Dataset::open(d), "shard-00001", "");
        }
    });
}

#[test]
fn header_length_larger_than_file_or_absurd() {
    with_dataset(|d| {
        let p = shard(d, 0);
        let mut file = std::fs::read(&p).unwrap();
        for n in [
            file.len() as u64,
            u64::MAX,
            100_000_001,
            (file.len() - 7) as u64,
        ] {
            file[..8].copy_from_slice(&n.to_le_bytes());
            std::fs::write(&p, &file).unwrap();
            let e = assert_err_names(ShardHeader::read(&p), "shard-00000", "header length");
            assert!(matches!(e, Error::Format { .. }));
            assert_err_names(
                ShardHeader::parse(&p, &file),
                "shard-00000",
                "header length",
            );
        }
    });
}

#[test]
fn malformed_json() {
    with_dataset(|d| {
        let p = shard(d, 0);
        rewrite_header(&p, |h| h.replacen('{', "[", 1));
        assert_err_names(Dataset::open(d), "shard-00000", "");
        rewrite_header(&p, |h| h[..h.len() - 2].to_string());
        assert_err_names(Dataset::open(d), "shard-00000", "invalid JSON");
    });
    with_dataset(|d| {
        std::fs::write(d.join("manifest.json"), b"{\"format\":").unwrap();
        assert_err_names(Dataset::open(d), "manifest.json", "invalid JSON");
    });
    with_dataset(|d| {
        std::fs::write(d.join("keyring.json"), b"\xff\xfe").unwrap();
        assert_err_names(Dataset::open(d), "keyring.json", "invalid JSON");
    });
}

#[test]
fn offsets_out_of_range_overlapping_or_not_contiguous() {
    // x is F32 [6, 3] = 72 bytes at [0, 72]; y is U8 [6] at [72, 78].
    for (from, to, cause) in [
        (
            r#"\"offsets\":[72,78]"#,
            r#"\"offsets\":[70,76]"#,
            "not contiguous",
        ),
        (
            r#"\"offsets\":[72,78]"#,
            r#"\"offsets\":[74,80]"#,
            "not contiguous",
        ),
        (
            r#"\"offsets\":[72,78]"#,
            r#"\"offsets\":[72,90]"#,
            "do not match",
        ),
        (
            r#"\"offsets\":[0,72]"#,
            r#"\"offsets\":[0,18446744073709551615]"#,
            "do not match",
        ),
        (
            r#"\"offsets\":[72,78]"#,
            r#"\"offsets\":[78,72]"#,
            "not contiguous",
        ),
    ] {
        with_dataset(|d| {
            let p = shard(d, 0);
            rewrite_header(&p, |h| {
                assert!(h.contains(from));
                h.replace(from, to)
            });
            assert_err_names(Dataset::open(d), "shard-00000", cause);
        });
    }
    // The safetensors-level offsets disagreeing with the descriptor: canonical-form check.
    with_dataset(|d| {
        rewrite_header(&shard(d, 0), |h| {
            h.replace("\"data_offsets\":[72,78]", "\"data_offsets\":[72,79]")
        });
        assert_err_names(Dataset::open(d), "shard-00000", "canonical");
    });
}

#[test]
fn unknown_version_or_cipher() {
    // In a dataset the manifest vouches for each header (its digest): an edited version or
    // cipher is a modified header. Read alone, the shard says what it names.
    with_dataset(|d| {
        rewrite_header(&shard(d, 0), |h| {
            h.replace(r#"\"version\":2"#, r#"\"version\":3"#)
        });
        let e = assert_err_names(
            Dataset::open(d),
            "shard-00000",
            "the shard header was modified",
        );
        assert!(matches!(e, Error::HeaderIntegrity { .. }), "{e}");
        assert!(e.to_string().contains("version '3'"), "{e}");
        let e = assert_err_names(
            ShardHeader::read(&shard(d, 0)),
            "shard-00000",
            "unsupported format version '3'",
        );
        assert!(matches!(e, Error::Unsupported { .. }));
    });
    with_dataset(|d| {
        rewrite_header(&shard(d, 0), |h| h.replace("AES-256-GCM", "AES-128-GCM"));
        let e = assert_err_names(
            Dataset::open(d),
            "shard-00000",
            "the shard header was modified",
        );
        assert!(e.to_string().contains("cipher 'AES-128-GCM'"), "{e}");
        assert_err_names(
            ShardHeader::read(&shard(d, 0)),
            "shard-00000",
            "unsupported cipher 'AES-128-GCM'",
        );
    });
    with_dataset(|d| {
        let m = d.join("manifest.json");
        let t = std::fs::read_to_string(&m)
            .unwrap()
            .replace("\"version\":2", "\"version\":99");
        std::fs::write(&m, t).unwrap();
        assert_err_names(
            Dataset::open(d),
            "manifest.json",
            "unsupported format version",
        );
    });
    with_dataset(|d| {
        let k = d.join("keyring.json");
        let t = std::fs::read_to_string(&k)
            .unwrap()
            .replace("A256KW", "A128KW");
        std::fs::write(&k, t).unwrap();
        assert_err_names(
            Dataset::open(d),
            "keyring.json",
            "unsupported key wrap algorithm",
        );
    });
}

#[test]
fn missing_or_malformed_metadata_fields() {
    let cases: [(&dyn Fn(String) -> String, &str); 8] = [
        (
            &|h| h.replace("\"ciphershard.tags\"", "\"ciphershard.tagz\""),
            "ciphershard.tags",
        ),
        (
            &|h| h.replace("\"__metadata__\"", "\"__metadata_x\""),
            "__metadata__",
        ),
        (&|h| h.replace(r#"\"rows\":6,"#, ""), "missing field `rows`"),
        (
            &|h| h.replace(r#"\"chunk_size\":64"#, r#"\"chunk_size\":100"#),
            "chunk_size",
        ),
        (
            &|h| h.replace(r#"\"chunk_size\":64"#, r#"\"chunk_size\":\"64\""#),
            "chunk_size",
        ),
        (
            &|h| h.replace(r#"\"shard_index\":0"#, r#"\"shard_index\":7"#),
            "shard_index",
        ),
        (
            &|h| h.replace(r#"\"dtype\":\"F32\""#, r#"\"dtype\":\"F31\""#),
            "dtype",
        ),
        (
            &|h| h.replace(r#"\"dataset_id\":\""#, r#"\"dataset_id\":\"zz"#),
            "dataset_id",
        ),
    ];
    for (edit, cause) in cases {
        with_dataset(|d| {
            rewrite_header(&shard(d, 0), |h| {
                let e = edit(h.clone());
                assert_ne!(e, h, "edit for '{cause}' changed nothing");
                e
            });
            assert_err_names(Dataset::open(d), "shard-00000", cause);
        });
    }
    with_dataset(|d| {
        rewrite_header(&shard(d, 0), |h| {
            let i = h.find("\"ciphershard.tags\":\"").unwrap() + 20;
            format!("{}!{}", &h[..i], &h[i + 1..])
        });
        assert_err_names(Dataset::open(d), "shard-00000", "base64");
    });
}

#[test]
fn wrong_key() {
    with_dataset(|d| {
        let e = assert_err_names(unlock(d, &key(9)), "keyring.json", "wrong key");
        let Error::WrongKey {
            key_id, available, ..
        } = e
        else {
            panic!()
        };
        assert_eq!((key_id, available), (key(9).id(), key(1).id()));
        // The right key id with a corrupted wrap: the keyring was modified (the id is a hash of
        // the key, so the key is right), never a bad data key and never "wrong key".
        let k = d.join("keyring.json");
        let ring = Keyring::parse(&k, &std::fs::read(&k).unwrap()).unwrap();
        let mut bad = ring.clone();
        bad.wraps[0].data_keys[1][5] ^= 1;
        std::fs::write(&k, bad.to_json()).unwrap();
        let e = assert_err_names(unlock(d, &key(1)), "keyring.json", "AES-KW integrity check");
        assert!(matches!(e, Error::Format { .. }), "{e}");
    });
}

/// Flips bit 0 of every byte in `[from, to)` of `file` (one at a time) and asserts the whole
/// reader path fails with an error naming `name`.
fn flip_every_byte(d: &Path, file: &Path, from: usize, to: usize, name: &str) {
    let orig = std::fs::read(file).unwrap();
    for i in from..to.min(orig.len()) {
        let mut m = orig.clone();
        m[i] ^= 1;
        std::fs::write(file, &m).unwrap();
        let r = full_check(d);
        let msg = match r {
            Ok(()) => panic!("flipping byte {i} of {} went undetected", file.display()),
            Err(e) => e.to_string(),
        };
        assert!(
            msg.contains(name),
            "byte {i}: error does not name {name}: {msg}"
        );
    }
    std::fs::write(file, &orig).unwrap();
}

#[test]
fn flipped_bit_in_every_region() {
    with_dataset(|d| {
        let p = shard(d, 0);
        let h = ShardHeader::read(&p).unwrap();
        // Header length and header (descriptor, tags, tensor entries, padding).
        flip_every_byte(d, &p, 0, h.data_start as usize, "shard-00000");
        // Every data byte: each chunk, encrypted and plain.
        flip_every_byte(
            d,
            &p,
            h.data_start as usize,
            h.file_len as usize,
            "shard-00000",
        );
        flip_every_byte(d, &d.join("manifest.json"), 0, usize::MAX, "");
        flip_every_byte(d, &d.join("keyring.json"), 0, usize::MAX, "");
        full_check(d).expect("restored");
    });
}

#[test]
fn chunk_tamper_names_shard_tensor_and_chunk() {
    with_dataset(|d| {
        let p = shard(d, 0);
        let h = ShardHeader::read(&p).unwrap();
        for (t, j) in [(0u32, 0u64), (0, 1), (1, 0)] {
            let c = h.chunk(t, j);
            let orig = std::fs::read(&p).unwrap();
            let mut m = orig.clone();
            m[c.file_offset as usize + c.len - 1] ^= 0x80;
            std::fs::write(&p, &m).unwrap();
            let ud = unlock(d, &key(1)).unwrap();
            match format::verify(&ud, &mut |_, _| {}) {
                Err(Error::Integrity(loc)) => {
                    assert_eq!(loc.path, p);
                    assert_eq!(
                        (loc.tensor.as_str(), loc.chunk),
                        (h.descriptor.tensors[t as usize].name.as_str(), j)
                    );
                }
                other => panic!("expected Integrity, got {other:?}"),
            }
            // Opening that chunk releases nothing.
            let mut dst = vec![0xAAu8; c.len];
            let src = &m[c.file_offset as usize..c.file_offset as usize + c.len];
            assert!(ud.opener(0).open(&c.params(), src, &mut dst).is_err());
            assert!(dst.iter().all(|&b| b == 0), "no unverified plaintext");
            std::fs::write(&p, &orig).unwrap();
        }
    });
}

/// `x` U8 [256], chunk 64, 128-byte shards: 2 shards of 2 equal chunks.
fn swap_dataset(dir: &Path) {
    convert_quiet(
        &[column("x", ciphershard::format::Dtype::U8, &[256], 5)],
        dir,
        &opts(64, 128, &[]),
    )
    .unwrap();
}

#[test]
fn chunks_swapped_within_and_across_shards() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    swap_dataset(d);
    full_check(d).unwrap();
    let (p0, p1) = (shard(d, 0), shard(d, 1));
    let h0 = ShardHeader::read(&p0).unwrap();
    let (a, b) = (
        h0.chunk(0, 0).file_offset as usize,
        h0.chunk(0, 1).file_offset as usize,
    );
    let orig0 = std::fs::read(&p0).unwrap();
    let orig1 = std::fs::read(&p1).unwrap();

    let mut m = orig0.clone();
    m.copy_within(a..a + 64, b);
    m[a..a + 64].copy_from_slice(&orig0[b..b + 64]);
    std::fs::write(&p0, &m).unwrap();
    assert!(matches!(full_check(d), Err(Error::Integrity(ref l)) if l.path == p0 && l.chunk == 0));
    std::fs::write(&p0, &orig0).unwrap();

    let h1 = ShardHeader::read(&p1).unwrap();
    let c = h1.chunk(0, 0).file_offset as usize;
    let mut m0 = orig0.clone();
    let mut m1 = orig1.clone();
    m0[a..a + 64].copy_from_slice(&orig1[c..c + 64]);
    m1[c..c + 64].copy_from_slice(&orig0[a..a + 64]);
    std::fs::write(&p0, &m0).unwrap();
    std::fs::write(&p1, &m1).unwrap();
    let e = assert_err_names(full_check(d), "shard-00000", "integrity check failed");
    assert!(matches!(e, Error::Integrity(_)));

    // Whole shards swapped (renamed into each other's place).
    std::fs::write(&p0, &orig1).unwrap();
    std::fs::write(&p1, &orig0).unwrap();
    assert_err_names(full_check(d), "shard-00000", "manifest/shard mismatch");
}

#[test]
fn appended_bytes_and_dropped_shard() {
    with_dataset(|d| {
        let p = shard(d, 1);
        let mut f = std::fs::read(&p).unwrap();
        f.push(0);
        std::fs::write(&p, &f).unwrap();
        assert_err_names(Dataset::open(d), "shard-00001", "appended");
        f.pop();
        std::fs::write(&p, &f).unwrap();
        std::fs::remove_file(&p).unwrap();
        assert_err_names(Dataset::open(d), "shard-00001", "No such file");
    });
    with_dataset(|d| {
        // Drop the last shard from the manifest and the keyring consistently.
        let m = d.join("manifest.json");
        let mut man = Manifest::parse(&m, &std::fs::read(&m).unwrap()).unwrap();
        man.shards.pop();
        man.rows = man.shards.iter().map(|s| s.rows).sum();
        std::fs::write(&m, man.to_json()).unwrap();
        let k = d.join("keyring.json");
        let mut ring = Keyring::parse(&k, &std::fs::read(&k).unwrap()).unwrap();
        ring.wraps[0].data_keys.pop();
        std::fs::write(&k, ring.to_json()).unwrap();
        assert_err_names(
            Dataset::open(d),
            "shard-00000",
            "dataset has 2 shards, manifest lists 1",
        );
    });
}

#[test]
fn shard_from_another_dataset() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    small_dataset(a.path());
    small_dataset(b.path());
    std::fs::copy(shard(b.path(), 1), shard(a.path(), 1)).unwrap();
    assert_err_names(Dataset::open(a.path()), "shard-00001", "another dataset");
}

/// Bounded randomized mutation of a whole small dataset in memory: the CI stand-in for the
/// fuzzer. Every mutation must end in `Err`, never a panic or an `Ok`.
#[test]
fn random_mutations_never_pass_or_panic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    small_dataset(d);
    let p = shard(d, 0);
    let orig = std::fs::read(&p).unwrap();
    let k = d.join("keyring.json");
    let ring = Keyring::parse(&k, &std::fs::read(&k).unwrap()).unwrap();
    let dk = ring.unwrap(&key(1), 0).unwrap();
    let opener = CpuCipher::new().prepare(&dk).unwrap();
    let check = |bytes: &[u8]| -> Result<()> {
        let h = ShardHeader::parse(&p, bytes)?;
        h.verify_header_tag(opener.as_ref())?;
        for t in 0..h.descriptor.tensors.len() as u32 {
            for c in h.chunks(t) {
                let src = &bytes[c.file_offset as usize..c.file_offset as usize + c.len];
                opener
                    .verify(&c.params(), src)
                    .map_err(|_| Error::Integrity(h.chunk_location(&c)))?;
            }
        }
        Ok(())
    };
    check(&orig).unwrap();
    let mut rng = 0x1234_5678_9abc_def1u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let start = std::time::Instant::now();
    let mut n = 0;
    while n < 20_000 && start.elapsed().as_secs() < 4 {
        let mut m = orig.clone();
        match next() % 8 {
            0 => m.truncate((next() % orig.len() as u64) as usize),
            1 => m.extend((0..1 + next() % 16).map(|_| next() as u8)),
            2 => {
                // Header length field only.
                let i = (next() % 8) as usize;
                m[i] ^= 1 + (next() % 255) as u8;
            }
            _ => {
                for _ in 0..1 + next() % 4 {
                    let i = (next() % orig.len() as u64) as usize;
                    m[i] ^= 1 + (next() % 255) as u8;
                }
            }
        }
        if m == orig {
            continue;
        }
        let r = check(&m);
        assert!(r.is_err(), "mutation {n} passed every check");
        assert!(r.unwrap_err().to_string().contains("shard-00000"));
        n += 1;
    }
    assert!(n > 500, "only {n} mutations ran");
    // Garbage into the other parsers: errors, no panics.
    for len in [0usize, 1, 7, 8, 9, 64, 300] {
        for s in 0..50 {
            let g = bytes(len, s);
            let path = Path::new("garbage");
            let _ = Manifest::parse(path, &g);
            let _ = Keyring::parse(path, &g);
            let _ = npy::parse_header(path, &g);
            let _ = ShardHeader::parse(path, &g).map(|_| panic!("garbage parsed as a shard"));
        }
    }
}

/// Bad plaintext inputs to `convert`: clear errors naming the input, and nothing written.
#[test]
fn bad_convert_inputs() {
    use ciphershard::format::ConvertInput;
    let dir = tempfile::tempdir().unwrap();
    let st = |name: &str, header: &str, data: &[u8]| {
        let p = dir.path().join(name);
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        std::fs::write(&p, v).unwrap();
        p
    };
    let cases = [
        (
            st(
                "overlap.safetensors",
                r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
                &[0; 8],
            ),
            "overlap",
        ),
        (
            st(
                "range.safetensors",
                r#"{"a":{"dtype":"U8","shape":[9],"data_offsets":[0,9]}}"#,
                &[0; 8],
            ),
            "out of range",
        ),
        (
            st(
                "shape.safetensors",
                r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
            "do not match",
        ),
        (
            st("json.safetensors", r#"{"a":{"dtype":"U8","#, &[0; 8]),
            "invalid JSON",
        ),
        (
            st(
                "dtype.safetensors",
                r#"{"a":{"dtype":"Q7","shape":[8],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
            "unsupported dtype",
        ),
        (
            st(
                "meta.safetensors",
                r#"{"__metadata__":{"k":1},"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
            "__metadata__",
        ),
    ];
    for (p, cause) in cases {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let out = dir.path().join(format!("out-{name}"));
        assert_err_names(
            convert_quiet(
                &[ConvertInput::Safetensors(p)],
                &out,
                &opts(64, 1 << 20, &[]),
            ),
            &name,
            cause,
        );
        assert!(!out.exists() || std::fs::read_dir(&out).unwrap().count() == 0);
    }
    let huge = dir.path().join("huge.safetensors");
    let mut v = u64::MAX.to_le_bytes().to_vec();
    v.extend_from_slice(b"{}");
    std::fs::write(&huge, v).unwrap();
    assert_err_names(
        convert_quiet(
            &[ConvertInput::Safetensors(huge)],
            &dir.path().join("o"),
            &opts(64, 1 << 20, &[]),
        ),
        "huge.safetensors",
        "header length",
    );
    let npy = dir.path().join("f.npy");
    let mut h = "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }".to_string();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut v = b"\x93NUMPY\x01\x00".to_vec();
    v.extend_from_slice(&(h.len() as u16).to_le_bytes());
    v.extend_from_slice(h.as_bytes());
    v.extend_from_slice(&[0; 16]);
    std::fs::write(&npy, &v).unwrap();
    let input = [ConvertInput::Npy {
        column: "f".into(),
        path: npy.clone(),
    }];
    assert_err_names(
        convert_quiet(&input, &dir.path().join("o"), &opts(64, 1 << 20, &[])),
        "f.npy",
        "Fortran",
    );
    v.truncate(v.len() - 1);
    std::fs::write(&npy, &v).unwrap();
    assert_err_names(
        convert_quiet(&input, &dir.path().join("o"), &opts(64, 1 << 20, &[])),
        "f.npy",
        "",
    );
}

/// Found by fuzz_targets/inputs.rs: an NPY version 1 file of at least 12 bytes whose header
/// length is 0 or 1 panicked `convert` (the 12 bytes read first were copied into a buffer of
/// 10 + length bytes). Now an error naming the file.
#[test]
fn npy_header_shorter_than_the_first_read_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    for (i, hlen) in [0u16, 1].into_iter().enumerate() {
        let p = dir.path().join(format!("short{i}.npy"));
        let mut v = b"\x93NUMPY\x01\x00".to_vec();
        v.extend_from_slice(&hlen.to_le_bytes());
        v.extend_from_slice(b"{}  ");
        std::fs::write(&p, &v).unwrap();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        assert_err_names(npy::read_header(&p), &name, "NPY header");
        let input = [ciphershard::format::ConvertInput::Npy {
            column: "x".into(),
            path: p,
        }];
        assert_err_names(
            convert_quiet(
                &input,
                &dir.path().join(format!("o{i}")),
                &opts(64, 1 << 20, &[]),
            ),
            &name,
            "NPY header",
        );
    }
}

/// Issue 20 item 8: `convert x.npy x.npy` merged the file into one column of twice the rows,
/// and a `.npy` column named like a safetensors tensor was appended to that tensor. A column
/// named twice and a file given twice (by any path: compared by device and inode) are refused,
/// naming both, before anything is written.
#[test]
fn duplicate_columns_and_inputs_are_refused_before_writing() {
    use ciphershard::format::ConvertInput;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let npy_file = |name: &str| {
        let p = d.join(name);
        std::fs::write(&p, npy_bytes("<f4", "(4,)", &bytes(16, 1))).unwrap();
        p
    };
    let (a, b) = (npy_file("a.npy"), npy_file("b.npy"));
    let linked = d.join("linked.npy");
    std::fs::hard_link(&a, &linked).unwrap();
    let st = d.join("t.safetensors");
    let header = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(&[1, 2, 3, 4]);
    std::fs::write(&st, v).unwrap();
    let st2 = d.join("t2.safetensors");
    std::fs::copy(&st, &st2).unwrap();
    let npy = |column: &str, path: &Path| ConvertInput::Npy {
        column: column.into(),
        path: path.to_path_buf(),
    };
    let dotted = d.join(".").join("a.npy");
    let cases: Vec<(Vec<ConvertInput>, &[&str])> = vec![
        (vec![npy("a", &a), npy("a", &a)], &["a.npy", "given twice"]),
        (
            vec![npy("a", &a), npy("b", &dotted)],
            &["a.npy", "given twice"],
        ),
        (
            vec![npy("a", &a), npy("l", &linked)],
            &["a.npy", "linked.npy", "given twice"],
        ),
        (vec![npy("x", &a), npy("x", &b)], &["'x'", "a.npy", "b.npy"]),
        (
            vec![ConvertInput::Safetensors(st.clone()), npy("a", &b)],
            &["'a'", "t.safetensors", "b.npy"],
        ),
        (
            vec![npy("a", &b), ConvertInput::Safetensors(st.clone())],
            &["'a'", "t.safetensors", "b.npy"],
        ),
        (
            vec![
                ConvertInput::Safetensors(st.clone()),
                ConvertInput::Safetensors(st.clone()),
            ],
            &["t.safetensors", "given twice"],
        ),
    ];
    for (i, (inputs, says)) in cases.into_iter().enumerate() {
        let out = d.join(format!("out{i}"));
        let e = convert_quiet(&inputs, &out, &opts(64, 1 << 20, &[])).expect_err("refused");
        let msg = e.to_string();
        for s in says {
            assert!(msg.contains(s), "case {i}: '{s}' not in: {msg}");
        }
        assert!(!out.exists(), "case {i}: {} was created", out.display());
    }
    // Safetensors files holding the same tensors are still concatenated by rows.
    let s = convert_quiet(
        &[
            ConvertInput::Safetensors(st),
            ConvertInput::Safetensors(st2),
        ],
        &d.join("rows"),
        &opts(64, 1 << 20, &[]),
    )
    .unwrap();
    assert_eq!((s.rows, s.columns), (8, 1));
}
