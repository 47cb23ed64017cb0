//! Parquet conversion speed against decoding alone (issue 14), one measurement per process so
//! each reports its own peak memory. `scripts/bench-parquet.sh` drives it (writes the file,
//! then alternates the two modes and sums up); docs/BENCHMARKS.md has the figures.
//!
//! ```text
//! cargo build --release --no-default-features --example parquet_convert
//! parquet_convert gen FILE [TOTAL_MB] [ROW_GROUP_MB]   # writes the file (once)
//! parquet_convert decode FILE     # arrow-rs's Parquet reader alone, every batch touched
//! parquet_convert convert FILE OUT_DIR [SHARD_MB]   # ciphershard's convert, default options
//!                                                    # (64 MiB shards for Parquet) unless
//!                                                    # SHARD_MB is given
//! ```
//! `decode` and `convert` print one JSON object: seconds, the file's uncompressed Arrow bytes
//! (values and offsets of every column, as decoded; the same count for both modes, so the
//! rates compare like the times), MB/s (10^6 bytes) and the process's peak RSS (`VmHWM`).
//!
//! The file: `input_ids`, `list<int32>`, lengths log-uniform in 10..4000 (mean ≈ 670; many
//! short documents, a long tail), ids skewed towards small values below 50,257 (a GPT-2-sized
//! vocabulary, so the writer dictionary-encodes them as pyarrow does); `text`, `utf8`, words
//! of a small vocabulary, about one byte per token. Snappy, row groups of about ROW_GROUP_MB
//! (default 128) of Arrow bytes, batches of 8192 rows: arrow-rs's writer defaults otherwise.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::builder::{Int32Builder, ListBuilder, StringBuilder};
use arrow_array::{Array, ArrayRef, Int32Array, ListArray, RecordBatch, StringArray};
use ciphershard::MasterKey;
use ciphershard::format::{ConvertInput, ConvertOptions, convert};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

/// What ciphershard's Parquet reader asks for (`format::input::parquet::BATCH_ROWS`).
const BATCH_ROWS: usize = 8192;
const MEAN_ROW_BYTES: u64 = 670 * 4 + 4 + 670 + 4;

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    match (arg(0), arg(1)) {
        (Some("gen"), Some(file)) => {
            let mb: u64 = arg(2).map_or(Ok(400), str::parse)?;
            let group_mb: u64 = arg(3).map_or(Ok(128), str::parse)?;
            generate(Path::new(file), mb << 20, group_mb << 20)
        }
        (Some("decode"), Some(file)) => {
            let t = Instant::now();
            let (bytes, check) = decode(Path::new(file))?;
            report("decode", t.elapsed().as_secs_f64(), bytes, check)
        }
        (Some("convert"), Some(file)) => {
            let out = arg(2).ok_or("convert FILE OUT_DIR [SHARD_MB]")?;
            // The bytes figure is the decode mode's (counted outside the timed region).
            let (bytes, _) = decode(Path::new(file))?;
            let _ = std::fs::remove_dir_all(out);
            let mut opts = ConvertOptions {
                keys: vec![MasterKey::from_bytes([7; 32])],
                ..ConvertOptions::default()
            };
            if let Some(mb) = arg(3) {
                opts.shard_size = Some(mb.parse::<u64>()? << 20);
            }
            let input = [ConvertInput::Parquet(file.into())];
            // The peak memory of the decode above (one batch) stays below convert's own.
            let t = Instant::now();
            let summary = convert(&input, Path::new(out), &opts, &mut |_, _| {})?;
            report("convert", t.elapsed().as_secs_f64(), bytes, summary.bytes)
        }
        _ => Err("usage: parquet_convert gen FILE [TOTAL_MB [ROW_GROUP_MB]] | decode FILE | convert FILE OUT_DIR [SHARD_MB]".into()),
    }
}

fn report(mode: &str, seconds: f64, bytes: u64, check: u64) -> Result<(), Error> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let hwm_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    println!(
        "{{\"mode\":\"{mode}\",\"seconds\":{seconds:.4},\"arrow_bytes\":{bytes},\"mb_per_s\":{:.1},\"peak_rss_mb\":{:.1},\"check\":{check}}}",
        bytes as f64 / seconds / 1e6,
        hwm_kb as f64 / 1024.0
    );
    Ok(())
}

/// Decodes every batch as ciphershard's reader does (same builder, same batch size) and
/// touches all of it: a wrapping sum of every token id and every text byte. Returns the Arrow
/// bytes (values and offsets) and the sum.
fn decode(path: &Path) -> Result<(u64, u64), Error> {
    let file = std::fs::File::open(path)?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)?
        .with_batch_size(BATCH_ROWS)
        .build()?;
    let (mut bytes, mut sum) = (0u64, 0u64);
    for batch in reader {
        let batch = batch?;
        for col in batch.columns() {
            if let Some(list) = col.as_any().downcast_ref::<ListArray>() {
                let values = list.values();
                let ids = values
                    .as_any()
                    .downcast_ref::<Int32Array>()
                    .ok_or("input_ids: not int32")?;
                let v = ids.values();
                sum =
                    sum.wrapping_add(v.iter().fold(0u32, |a, &x| a.wrapping_add(x as u32)) as u64);
                bytes += 4 * v.len() as u64 + 4 * (list.len() as u64 + 1);
            } else if let Some(text) = col.as_any().downcast_ref::<StringArray>() {
                let b = text.value_data();
                sum =
                    sum.wrapping_add(b.iter().fold(0u32, |a, &x| a.wrapping_add(x as u32)) as u64);
                bytes += b.len() as u64 + 4 * (text.len() as u64 + 1);
            } else {
                return Err(format!("unexpected column type {}", col.data_type()).into());
            }
        }
    }
    Ok((bytes, sum))
}

/// SplitMix64: deterministic contents without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const WORDS: [&str; 16] = [
    "the",
    "of",
    "and",
    "data",
    "model",
    "token",
    "encrypted",
    "shard",
    "a",
    "in",
    "loader",
    "is",
    "to",
    "batch",
    "with",
    "parquet",
];

fn generate(path: &Path, total: u64, group: u64) -> Result<(), Error> {
    let rows = total / MEAN_ROW_BYTES;
    let group_rows = (group / MEAN_ROW_BYTES).max(1) as usize;
    let mut rng = Rng(14);
    let schema_batch = |rng: &mut Rng, n: usize| -> RecordBatch {
        let mut ids = ListBuilder::new(Int32Builder::new());
        let mut text = StringBuilder::new();
        let mut s = String::new();
        for _ in 0..n {
            let len = (10.0 * 400f64.powf(rng.unit())) as usize;
            for _ in 0..len {
                let u = rng.unit();
                ids.values().append_value((u * u * u * 50257.0) as i32);
            }
            ids.append(true);
            s.clear();
            while s.len() < len {
                s.push_str(WORDS[(rng.next() % 16) as usize]);
                s.push(' ');
            }
            text.append_value(&s);
        }
        let ids: ArrayRef = Arc::new(ids.finish());
        let text: ArrayRef = Arc::new(text.finish());
        RecordBatch::try_from_iter([("input_ids", ids), ("text", text)]).expect("a batch")
    };
    let first = schema_batch(&mut rng, 1);
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(group_rows))
        .build();
    let tmp = path.with_extension("parquet.tmp");
    let mut w = ArrowWriter::try_new(std::fs::File::create(&tmp)?, first.schema(), Some(props))?;
    w.write(&first)?;
    let mut done = 1u64;
    while done < rows {
        let n = (rows - done).min(BATCH_ROWS as u64) as usize;
        w.write(&schema_batch(&mut rng, n))?;
        done += n as u64;
    }
    let meta = w.close()?;
    std::fs::rename(&tmp, path)?;
    let groups = meta.row_groups();
    eprintln!(
        "wrote {}: {rows} rows, {} row groups of {} rows ({:.0} MB uncompressed each, first), {:.0} MB on disk",
        path.display(),
        groups.len(),
        group_rows,
        groups[0].total_byte_size() as f64 / 1e6,
        std::fs::metadata(path)?.len() as f64 / 1e6
    );
    Ok(())
}
