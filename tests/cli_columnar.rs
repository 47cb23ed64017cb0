//! `convert` from Parquet and JSONL through the real binary: list columns become ragged
//! columns that inspect shows, verify checks and the loader delivers row for row; `bench
//! --pack` packs them; bad inputs are refused before a dataset exists.

mod cli_common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{Int32Builder, ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, Float32Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use ciphershard::MasterKey;
use ciphershard::cipher::Backend;
use ciphershard::pipeline::{FormatSource, Loader, LoaderOptions};
use cli_common::*;

/// Row `r`: tokens `r*100 .. r*100 + len(r)`, a text of `r % 7` letters, a score `r / 2`.
fn len(r: usize) -> usize {
    [0, 3, 17, 1, 40][r % 5]
}

fn text(r: usize) -> String {
    "abcdefg"[..r % 7].to_string()
}

/// A Parquet file of rows `from..to` in two row groups.
fn parquet(path: &Path, from: usize, to: usize) {
    let schema = Arc::new(Schema::new(vec![
        Field::new(
            "input_ids",
            DataType::List(Arc::new(Field::new("item", DataType::Int32, true))),
            false,
        ),
        Field::new("text", DataType::Utf8, false),
        Field::new("score", DataType::Float32, false),
    ]));
    let file = std::fs::File::create(path).unwrap();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(((to - from) / 2).max(1)))
        .build();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, schema.clone(), Some(props)).unwrap();
    let mut ids = ListBuilder::new(Int32Builder::new());
    let mut texts = StringBuilder::new();
    for r in from..to {
        for j in 0..len(r) {
            ids.values().append_value((r * 100 + j) as i32);
        }
        ids.append(true);
        texts.append_value(text(r));
    }
    let scores = Float32Array::from_iter_values((from..to).map(|r| r as f32 / 2.0));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(ids.finish()),
        Arc::new(texts.finish()),
        Arc::new(scores),
    ];
    w.write(&RecordBatch::try_new(schema, columns).unwrap())
        .unwrap();
    w.close().unwrap();
}

struct Setup {
    tmp: tempfile::TempDir,
    key: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("k.key");
    MasterKey::from_bytes([9; 32]).write_new_file(&key).unwrap();
    Setup { tmp, key }
}

#[test]
fn parquet_files_convert_to_ragged_columns_the_loader_delivers() {
    let s = setup();
    let (a, b) = (
        s.tmp.path().join("a.parquet"),
        s.tmp.path().join("b.parquet"),
    );
    parquet(&a, 0, 120);
    parquet(&b, 120, 200);
    let ds = s.tmp.path().join("ds");
    let out = run(keyed("convert", &s.key)
        .arg(&a)
        .arg(&b)
        .args(["--out"])
        .arg(&ds)
        .args([
            "--chunk-size",
            "256",
            "--shard-size",
            "2KiB",
            "--plain",
            "text",
            "--json",
        ]));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["rows"], 200);
    assert!(summary["shards"].as_u64().unwrap() > 2);

    let out = run(cs().args(["inspect", "--json"]).arg(&ds));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cols: Vec<(String, bool, bool)> = report["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["ragged"].as_bool().unwrap(),
                c["encrypted"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        cols,
        [
            ("input_ids".into(), true, true),
            ("text".into(), true, false),
            ("score".into(), false, true)
        ]
    );
    let out = run(cs().arg("inspect").arg(&ds));
    assert!(stdout(&out).contains("[*]"), "{}", stdout(&out));
    assert_eq!(code(&verify(&s.key, &ds)), 0);

    let key = MasterKey::from_file(&s.key).unwrap();
    let src = FormatSource::open(&ds, &key, Backend::Cpu).unwrap();
    let o = LoaderOptions {
        batch_size: 16,
        ..Default::default()
    };
    let mut seen = 0;
    for b in Loader::new(src, &o).unwrap() {
        let b = b.unwrap();
        let ids = b.tensor("input_ids").unwrap();
        let (off, vals) = (ids.offsets().unwrap(), ids.as_slice::<i32>().unwrap());
        let t = b.tensor("text").unwrap();
        let (toff, tv) = (t.offsets().unwrap(), t.bytes);
        let score = b.tensor("score").unwrap().as_slice::<f32>().unwrap();
        for (i, &g) in b.row_ids().iter().enumerate() {
            let g = g as usize;
            let want: Vec<i32> = (0..len(g)).map(|j| (g * 100 + j) as i32).collect();
            assert_eq!(&vals[off[i] as usize..off[i + 1] as usize], want.as_slice());
            assert_eq!(
                &tv[toff[i] as usize..toff[i + 1] as usize],
                text(g).as_bytes()
            );
            assert_eq!(score[i], g as f32 / 2.0);
            seen += 1;
        }
    }
    assert_eq!(seen, 200);

    // Packed bench over the ragged column.
    let out = run_bounded(
        keyed("bench", &s.key)
            .arg(&ds)
            .args(["--backend", "cpu", "--pack", "input_ids", "--seq-len", "32"])
            .args([
                "--batch-size",
                "2",
                "--epochs",
                "1",
                "--threads",
                "1",
                "--json",
            ]),
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["pack"]["column"], "input_ids");
    assert_eq!(r["tokens_per_batch"], 64);
    assert!(r["encrypted"]["batches"].as_u64().unwrap() > 0);

    // Batches cut by a token budget; the budget must hold the longest row.
    let budget = |max: &str| {
        run_bounded(
            keyed("bench", &s.key)
                .arg(&ds)
                .args([
                    "--backend",
                    "cpu",
                    "--budget",
                    "input_ids",
                    "--max-tokens",
                    max,
                ])
                .args(["--batch-size", "64", "--epochs", "1", "--json"]),
        )
    };
    let out = budget("200");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["budget"]["max_tokens"], 200);
    assert!(r["encrypted"]["batches"].as_u64().unwrap() > 1);
    let out = budget("3");
    assert_ne!(code(&out), 0);
    assert!(stderr(&out).contains("max_tokens = 3"), "{}", stderr(&out));
}

#[test]
fn jsonl_converts_with_column_and_is_refused_without() {
    let s = setup();
    let j = s.tmp.path().join("tokens.jsonl");
    let lines: Vec<String> = (0..50)
        .map(|r| {
            let ids: Vec<String> = (0..len(r)).map(|x| (r * 100 + x).to_string()).collect();
            format!("{{\"input_ids\": [{}], \"note\": \"n{r}\"}}", ids.join(","))
        })
        .collect();
    std::fs::write(&j, lines.join("\n") + "\n").unwrap();
    let ds = s.tmp.path().join("ds");
    let out = run(keyed("convert", &s.key).arg(&j).arg("--out").arg(&ds));
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    assert!(stderr(&out).contains("--column"), "{}", stderr(&out));
    assert!(!ds.exists());
    let out = run(keyed("convert", &s.key)
        .arg(&j)
        .args(["--column", "input_ids", "--out"])
        .arg(&ds));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(code(&verify(&s.key, &ds)), 0);

    // --column with a non-JSONL input is a usage error.
    let p = s.tmp.path().join("a.parquet");
    parquet(&p, 0, 10);
    let out = run(keyed("convert", &s.key)
        .arg(&p)
        .args(["--column", "x", "--out"])
        .arg(s.tmp.path().join("ds2")));
    assert_eq!(code(&out), 64, "{}", stderr(&out));
}

#[test]
fn bad_columnar_inputs_are_refused_naming_file_and_cause() {
    let s = setup();
    let good = s.tmp.path().join("good.parquet");
    parquet(&good, 0, 60);
    let bytes = std::fs::read(&good).unwrap();
    let cut = s.tmp.path().join("cut.parquet");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let bad_json = s.tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad_json,
        "{\"input_ids\": [1, 2]}\n{\"input_ids\": [1, \"x\"]}\n",
    )
    .unwrap();
    for (input, extra, cause) in [
        (&cut, &[][..], "cut.parquet"),
        (&bad_json, &["--column", "input_ids"][..], "line 2"),
    ] {
        let ds = s.tmp.path().join(format!(
            "out-{}",
            input.file_stem().unwrap().to_string_lossy()
        ));
        let out = run(keyed("convert", &s.key)
            .arg(input)
            .args(extra)
            .arg("--out")
            .arg(&ds));
        assert_ne!(code(&out), 0);
        let err = stderr(&out);
        assert!(err.contains(cause) && !err.contains("panicked"), "{err}");
        assert!(!ds.join("manifest.json").exists());
    }
    // The same Parquet file twice, by another path too (a symbolic link), is refused.
    let link = s.tmp.path().join("link.parquet");
    std::os::unix::fs::symlink(&good, &link).unwrap();
    let ds = s.tmp.path().join("out-twice");
    let out = run(keyed("convert", &s.key)
        .arg(&good)
        .arg(&link)
        .arg("--out")
        .arg(&ds));
    assert_ne!(code(&out), 0);
    let err = stderr(&out);
    assert!(
        err.contains("link.parquet") && err.contains("given twice"),
        "{err}"
    );
    assert!(!ds.join("manifest.json").exists());
}
