//! convert → open → unlock → decrypt round trips, stock safetensors compatibility, NPY and
//! safetensors inputs, key management and the explicit decrypt export.

mod format_common;

use std::collections::HashMap;

use ciphershard::Error;
use ciphershard::cipher::cpu::CpuCipher;
use ciphershard::format::{self, ConvertInput, Dataset, DatasetKind, Dtype, ShardHeader, convert};
use format_common::*;
use proptest::prelude::*;

#[test]
fn small_dataset_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let s = small_dataset(dir.path());
    // 13 bytes per row, 80-byte shards: 6 rows per shard, so 2 shards (6 + 4 rows).
    assert_eq!(
        (s.shards, s.rows, s.kind, s.columns),
        (2, 10, DatasetKind::Dataset, 2)
    );
    let ud = unlock(dir.path(), &key(1)).unwrap();
    let m = ud.dataset().manifest();
    assert_eq!(
        m.shards.iter().map(|e| e.rows).collect::<Vec<_>>(),
        vec![6, 4]
    );
    assert_eq!(read_column(&ud, 0).unwrap(), bytes(120, 1));
    assert_eq!(read_column(&ud, 1).unwrap(), bytes(10, 2));
    let v = format::verify(&ud, &mut |_, _| {}).unwrap();
    assert_eq!(v.bytes, 130);
    assert_eq!(v.shards, 2);
    // Encrypted bytes on disk differ from the plaintext; plain bytes are readable.
    let h = &ud.dataset().shards()[0];
    let file = std::fs::read(&h.path).unwrap();
    let x = &h.descriptor.tensors[0];
    let y = &h.descriptor.tensors[1];
    let at = |t: &format::TensorDesc| {
        &file[(h.data_start + t.offsets.0) as usize..(h.data_start + t.offsets.1) as usize]
    };
    assert_ne!(at(x), &bytes(120, 1)[..72]);
    assert_eq!(at(y), &bytes(10, 2)[..6]);
    assert_eq!(
        h.descriptor.metadata.get("source").map(String::as_str),
        Some("test")
    );
}

#[test]
fn stock_safetensors_reads_a_shard_header() {
    let dir = tempfile::tempdir().unwrap();
    small_dataset(dir.path());
    let file = std::fs::read(dir.path().join("shard-00000.safetensors")).unwrap();
    let st =
        safetensors::SafeTensors::deserialize(&file).expect("stock safetensors parses the shard");
    let mut names = st.names();
    names.sort();
    assert_eq!(names, vec!["x", "y"]);
    let x = st.tensor("x").unwrap();
    assert_eq!(
        (x.dtype(), x.shape()),
        (safetensors::Dtype::F32, &[6usize, 3][..])
    );
    let y = st.tensor("y").unwrap();
    assert_eq!(
        (y.dtype(), y.shape(), y.data().len()),
        (safetensors::Dtype::U8, &[6usize][..], 6)
    );
    let (_, meta) = safetensors::SafeTensors::read_metadata(&file).unwrap();
    let md = meta.metadata().as_ref().unwrap();
    assert!(md.contains_key("ciphershard") && md.contains_key("ciphershard.tags"));
}

fn write_safetensors(path: &std::path::Path, tensors: &[(&str, Dtype, Vec<u64>, Vec<u8>)]) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            // Both name dtypes as safetensors does.
            let dt: safetensors::Dtype =
                serde_json::from_value(serde_json::json!(d.as_str())).unwrap();
            let shape = s.iter().map(|&d| d as usize).collect();
            (
                n.to_string(),
                safetensors::tensor::TensorView::new(dt, shape, b).unwrap(),
            )
        })
        .collect();
    let meta = HashMap::from([("origin".to_string(), "unit".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path).unwrap();
}

/// Files the safetensors crate writes (its padding, `__metadata__` first, tensors ordered by
/// dtype then name) convert as they always did: every dtype ciphershard knows, an empty
/// column beside full ones, rank 1 to 4, their metadata; read back byte for byte.
#[test]
fn safetensors_crate_files_of_every_dtype_convert() {
    let dir = tempfile::tempdir().unwrap();
    let rows = 7u64;
    let tensors: Vec<(String, Dtype, Vec<u64>, Vec<u8>)> = Dtype::ALL
        .iter()
        .enumerate()
        .map(|(i, &d)| {
            let mut shape = vec![rows];
            shape.extend((0..i % 4).map(|j| (j + i % 3) as u64));
            let n = shape.iter().product::<u64>() as usize * d.size_bytes();
            (format!("c{i}.{d}"), d, shape, bytes(n, i as u64))
        })
        .collect();
    let p = dir.path().join("all.safetensors");
    let borrowed: Vec<(&str, Dtype, Vec<u64>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone()))
        .collect();
    write_safetensors(&p, &borrowed);
    let out = dir.path().join("ds");
    let s = convert_quiet(
        &[ConvertInput::Safetensors(p)],
        &out,
        &opts(64, 256, &["c1*"]),
    )
    .unwrap();
    assert_eq!(
        (s.rows, s.columns, s.kind),
        (rows, 15, DatasetKind::Dataset)
    );
    assert!(s.shards > 1);
    let ud = unlock(&out, &key(1)).unwrap();
    let h = &ud.dataset().shards()[0];
    assert_eq!(
        h.descriptor.metadata.get("origin").map(String::as_str),
        Some("unit")
    );
    for (name, d, shape, data) in &tensors {
        let (t, desc) = h.tensor(name).unwrap();
        assert_eq!((desc.dtype, &desc.shape[1..]), (*d, &shape[1..]), "{name}");
        assert_eq!(&read_column(&ud, t).unwrap(), data, "{name}");
    }
}

#[test]
fn safetensors_inputs_concatenate_rows_and_decrypt_export() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    write_safetensors(
        &a,
        &[
            ("img", Dtype::F32, vec![5, 4], bytes(80, 3)),
            ("lbl", Dtype::I64, vec![5], bytes(40, 4)),
        ],
    );
    write_safetensors(
        &b,
        &[
            ("img", Dtype::F32, vec![3, 4], bytes(48, 5)),
            ("lbl", Dtype::I64, vec![3], bytes(24, 6)),
        ],
    );
    let out = dir.path().join("ds");
    let s = convert_quiet(
        &[
            ConvertInput::Safetensors(a.clone()),
            ConvertInput::Safetensors(b.clone()),
        ],
        &out,
        &opts(64, 1 << 20, &[]),
    )
    .unwrap();
    assert_eq!((s.rows, s.shards, s.kind), (8, 1, DatasetKind::Dataset));
    let ud = unlock(&out, &key(1)).unwrap();
    let (img, _) = ud.dataset().shards()[0].tensor("img").unwrap();
    assert_eq!(
        read_column(&ud, img).unwrap(),
        [bytes(80, 3), bytes(48, 5)].concat()
    );
    assert_eq!(
        ud.dataset().shards()[0]
            .descriptor
            .metadata
            .get("origin")
            .map(String::as_str),
        Some("unit")
    );

    // Explicit export: a plain safetensors file a stock reader loads, metadata kept.
    let plain = dir.path().join("plain.safetensors");
    format::decrypt_shard(&ud, 0, &plain).unwrap();
    let file = std::fs::read(&plain).unwrap();
    let st = safetensors::SafeTensors::deserialize(&file).unwrap();
    assert_eq!(
        st.tensor("img").unwrap().data(),
        &[bytes(80, 3), bytes(48, 5)].concat()[..]
    );
    assert_eq!(
        st.tensor("lbl").unwrap().data(),
        &[bytes(40, 4), bytes(24, 6)].concat()[..]
    );
    assert!(
        format::decrypt_shard(&ud, 0, &plain).is_err(),
        "refuses to overwrite"
    );

    // Different columns: clear error.
    let c = dir.path().join("c.safetensors");
    write_safetensors(&c, &[("other", Dtype::U8, vec![2], bytes(2, 7))]);
    let e = convert_quiet(
        &[ConvertInput::Safetensors(a), ConvertInput::Safetensors(c)],
        &dir.path().join("ds2"),
        &opts(64, 1 << 20, &[]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("same columns"), "{e}");
}

#[test]
fn model_weights_convert_as_one_tensors_shard() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("w.safetensors");
    write_safetensors(
        &w,
        &[
            ("w1", Dtype::F32, vec![4, 3], bytes(48, 8)),
            ("b1", Dtype::F32, vec![3], bytes(12, 9)),
        ],
    );
    let out = dir.path().join("ds");
    let s = convert_quiet(
        &[ConvertInput::Safetensors(w)],
        &out,
        &opts(64, 16, &["b*"]),
    )
    .unwrap();
    assert_eq!((s.kind, s.shards, s.rows), (DatasetKind::Tensors, 1, 0));
    let ud = unlock(&out, &key(1)).unwrap();
    let h = &ud.dataset().shards()[0];
    let (i, t) = h.tensor("w1").unwrap();
    assert!(t.encrypted);
    assert_eq!(read_tensor(&ud, 0, i).unwrap(), bytes(48, 8));
    let (i, t) = h.tensor("b1").unwrap();
    assert!(!t.encrypted);
    assert_eq!(read_tensor(&ud, 0, i).unwrap(), bytes(12, 9));
}

fn write_npy(path: &std::path::Path, descr: &str, shape: &str, data: &[u8]) {
    std::fs::write(path, npy_bytes(descr, shape, data)).unwrap();
}

#[test]
fn npy_inputs_are_columns() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.npy");
    let b = dir.path().join("b.npy");
    write_npy(&a, "<f4", "(7, 2)", &bytes(56, 10));
    write_npy(&b, "|b1", "(7,)", &[0, 1, 1, 0, 1, 0, 0]);
    let out = dir.path().join("ds");
    let inputs = [
        ConvertInput::Npy {
            column: "feat".into(),
            path: a,
        },
        ConvertInput::Npy {
            column: "mask".into(),
            path: b.clone(),
        },
    ];
    let s = convert_quiet(&inputs, &out, &opts(64, 30, &[])).unwrap();
    assert_eq!((s.rows, s.shards), (7, 3)); // 9 bytes a row, 30-byte shards: 3 + 3 + 1 rows
    let ud = unlock(&out, &key(1)).unwrap();
    assert_eq!(read_column(&ud, 0).unwrap(), bytes(56, 10));
    assert_eq!(read_column(&ud, 1).unwrap(), vec![0, 1, 1, 0, 1, 0, 0]);
    assert_eq!(ud.dataset().manifest().columns[1].dtype, Dtype::BOOL);

    // Row counts must agree.
    let c = dir.path().join("c.npy");
    write_npy(&c, "<i4", "(3,)", &bytes(12, 11));
    let e = convert_quiet(
        &[
            ConvertInput::Npy {
                column: "m".into(),
                path: b,
            },
            ConvertInput::Npy {
                column: "c".into(),
                path: c,
            },
        ],
        &dir.path().join("ds2"),
        &opts(64, 30, &[]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("row counts"), "{e}");
}

#[test]
fn keys_rekey_add_remove() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(64, 80, &[]);
    o.keys.push(key(2));
    convert_quiet(&[column("x", Dtype::U16, &[33, 5], 12)], dir.path(), &o).unwrap();
    assert!(unlock(dir.path(), &key(1)).is_ok());
    assert!(unlock(dir.path(), &key(2)).is_ok());
    match unlock(dir.path(), &key(3)) {
        Err(Error::WrongKey {
            key_id, available, ..
        }) => {
            assert_eq!(key_id, key(3).id());
            assert!(available.contains(&key(1).id()) && available.contains(&key(2).id()));
        }
        other => panic!("expected WrongKey, got {other:?}"),
    }
    let before: Vec<Vec<u8>> = (0..Dataset::open(dir.path()).unwrap().shards().len())
        .map(|i| std::fs::read(dir.path().join(format::shard_file_name(i as u32))).unwrap())
        .collect();
    format::rekey(dir.path(), &key(1), &key(4)).unwrap();
    assert!(matches!(
        unlock(dir.path(), &key(1)),
        Err(Error::WrongKey { .. })
    ));
    let ud = unlock(dir.path(), &key(4)).unwrap();
    assert_eq!(read_column(&ud, 0).unwrap(), bytes(33 * 5 * 2, 12));
    for (i, b) in before.iter().enumerate() {
        assert_eq!(
            &std::fs::read(dir.path().join(format::shard_file_name(i as u32))).unwrap(),
            b,
            "no shard byte rewritten"
        );
    }
    assert!(format::rekey(dir.path(), &key(9), &key(5)).is_err());
    format::add_key(dir.path(), &key(4), &key(5)).unwrap();
    assert!(unlock(dir.path(), &key(5)).is_ok());
    format::remove_key(dir.path(), &key(2).id()).unwrap();
    assert!(unlock(dir.path(), &key(2)).is_err());
    format::remove_key(dir.path(), &key(5).id()).unwrap();
    assert!(
        format::remove_key(dir.path(), &key(4).id()).is_err(),
        "the last key stays"
    );
    // No temporary files left behind.
    for e in std::fs::read_dir(dir.path()).unwrap() {
        assert!(!e.unwrap().file_name().to_string_lossy().contains(".tmp-"));
    }
}

#[test]
fn refuses_existing_dataset_and_bad_options() {
    let dir = tempfile::tempdir().unwrap();
    small_dataset(dir.path());
    let e = convert_quiet(
        &[column("x", Dtype::U8, &[4], 1)],
        dir.path(),
        &opts(64, 80, &[]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("already holds a dataset"), "{e}");
    let other = dir.path().join("o");
    assert!(
        convert_quiet(
            &[column("x", Dtype::U8, &[4], 1)],
            &other,
            &opts(100, 80, &[])
        )
        .is_err()
    );
    let mut o = opts(64, 80, &[]);
    o.keys.clear();
    assert!(convert_quiet(&[column("x", Dtype::U8, &[4], 1)], &other, &o).is_err());
    assert!(convert_quiet(&[], &other, &opts(64, 80, &[])).is_err());
}

#[test]
fn header_is_parsed_standalone() {
    let dir = tempfile::tempdir().unwrap();
    small_dataset(dir.path());
    let p = dir.path().join("shard-00001.safetensors");
    let h = ShardHeader::read(&p).unwrap();
    let whole = ShardHeader::parse(&p, &std::fs::read(&p).unwrap()).unwrap();
    assert_eq!(h.descriptor, whole.descriptor);
    assert_eq!(
        (
            h.descriptor.shard_index,
            h.descriptor.row_start,
            h.descriptor.rows
        ),
        (1, 6, 4)
    );
    let c = h.chunk(0, 0);
    assert_eq!(
        (c.global, c.len, c.tensor_offset, c.file_offset),
        (0, 48, 0, h.data_start)
    );
    assert_eq!(h.chunks(1).count(), 1);
    let cpu = CpuCipher::new();
    let ud = Dataset::open(&p).unwrap().unlock(&key(1), &cpu).unwrap();
    assert_eq!(
        ud.dataset().shards().len(),
        2,
        "a shard path opens its dataset"
    );
}

fn dtype_strategy() -> impl Strategy<Value = Dtype> {
    proptest::sample::select(Dtype::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn random_datasets_round_trip(
        cols in proptest::collection::vec((dtype_strategy(), proptest::collection::vec(0u64..4, 0..3), any::<bool>()), 1..4),
        rows in 0u64..40,
        chunk_k in 1u64..6,
        shard_size in 1u64..600,
        seed in any::<u64>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let inputs: Vec<ConvertInput> = cols.iter().enumerate().map(|(i, (d, rest, _))| {
            let mut shape = vec![rows];
            shape.extend(rest);
            column(&format!("c{i}"), *d, &shape, seed.wrapping_add(i as u64))
        }).collect();
        let plain: Vec<String> = cols.iter().enumerate().filter(|(_, c)| c.2).map(|(i, _)| format!("c{i}")).collect();
        let mut o = opts(64 * chunk_k, shard_size, &[]);
        o.plain = plain;
        // A dataset needs a column whose rows hold bytes (FORMAT.md section 5).
        if cols.iter().all(|(_, rest, _)| rest.contains(&0)) {
            let e = convert_quiet(&inputs, dir.path(), &o).unwrap_err();
            prop_assert!(e.to_string().contains("zero-byte rows"), "{}", e);
            return Ok(());
        }
        let s = convert_quiet(&inputs, dir.path(), &o).unwrap();
        prop_assert_eq!(s.rows, rows);
        let ud = unlock(dir.path(), &key(1)).unwrap();
        format::verify(&ud, &mut |_, _| {}).unwrap();
        for (i, input) in inputs.iter().enumerate() {
            let ConvertInput::InMemory { data, .. } = input else { unreachable!() };
            prop_assert_eq!(&read_column(&ud, i as u32).unwrap(), data);
            prop_assert_eq!(ud.dataset().manifest().columns[i].encrypted, !cols[i].2);
        }
    }
}

#[test]
fn large_column_uses_parallel_pipelined_sealing() {
    // 6 MiB in 1 KiB chunks: batches of 4096 chunks (4 MiB), so two batches, each sealed by
    // several threads while the previous one is written, across two shards.
    let dir = tempfile::tempdir().unwrap();
    let n = 6 << 20;
    let s = convert_quiet(
        &[column("x", Dtype::U8, &[n as u64 / 64, 64], 77)],
        dir.path(),
        &opts(1024, 5 << 20, &[]),
    )
    .unwrap();
    assert_eq!(s.shards, 2);
    let ud = unlock(dir.path(), &key(1)).unwrap();
    assert_eq!(read_column(&ud, 0).unwrap(), bytes(n, 77));
    format::verify(&ud, &mut |_, _| {}).unwrap();
}

#[test]
fn interrupted_convert_leaves_nothing_under_final_names() {
    // Abort (by unwinding out of the progress callback) after the first shard is complete: the
    // cleanup that runs on every early exit removes the renamed shard and the temporaries.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    let r = std::panic::catch_unwind(|| {
        convert(
            &[column("x", Dtype::U8, &[400, 2], 3)],
            &out,
            &opts(64, 200, &[]),
            &mut |done, _| {
                assert!(done < 300, "simulated interruption");
            },
        )
    });
    assert!(r.is_err());
    let left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    // And the directory can be converted into afterwards.
    convert_quiet(
        &[column("x", Dtype::U8, &[400, 2], 3)],
        &out,
        &opts(64, 200, &[]),
    )
    .unwrap();
    assert!(Dataset::open(&out).is_ok());
}

#[test]
fn refuses_shards_whose_tags_would_overflow_the_header() {
    // A sparse 400 MB NPY column in 64-byte chunks: 6.25 M tags would need a header over the
    // 100 MB readers accept. Refused before any data is read or any tag table allocated.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.npy");
    write_npy(&p, "|u1", "(400000000,)", &[]);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(f.metadata().unwrap().len() + 400_000_000)
        .unwrap();
    let input = [ConvertInput::Npy {
        column: "x".into(),
        path: p,
    }];
    let e = convert_quiet(&input, &dir.path().join("ds"), &opts(64, 1 << 30, &[])).unwrap_err();
    assert!(e.to_string().contains("header"), "{e}");
    assert_eq!(std::fs::read_dir(dir.path().join("ds")).unwrap().count(), 0);
}
