//! The subcommands.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ciphershard::cipher::{self, Backend};
use ciphershard::error::{Error, Result};
use ciphershard::format::{self, ConvertInput, ConvertOptions, Dataset, ShardHeader};
use ciphershard::keys::MasterKey;

use super::{KeyArgs, byte_progress, parse_size, rate};

/// `ciphershard convert`.
#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    #[command(flatten)]
    key: KeyArgs,
    /// Input files: safetensors (all tensors sharing a first dimension become columns) or
    /// `.npy` (one column each, named after the file).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output dataset directory (created; must not already hold a dataset).
    #[arg(long)]
    out: PathBuf,
    /// Target shard size (rows are split so each shard stays under it).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    shard_size: u64,
    /// Chunk size: the unit of authentication (a multiple of 64 bytes, at most 256 MiB).
    #[arg(long, default_value = "2MiB", value_parser = parse_size)]
    chunk_size: u64,
    /// Tensors to leave readable (still authenticated): glob patterns on names (`*`, `?`).
    #[arg(long = "plain", value_name = "PATTERN")]
    plain: Vec<String>,
}

pub fn convert(args: ConvertArgs) -> Result<()> {
    let keys = args.key.load_all()?;
    let inputs: Vec<ConvertInput> = args
        .inputs
        .iter()
        .map(|p| {
            if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("npy")) {
                let column = p
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                ConvertInput::Npy {
                    column,
                    path: p.clone(),
                }
            } else {
                ConvertInput::Safetensors(p.clone())
            }
        })
        .collect();
    let opts = ConvertOptions {
        shard_size: args.shard_size,
        chunk_size: args.chunk_size,
        plain: args.plain.clone(),
        keys,
        ..Default::default()
    };
    let start = Instant::now();
    let pb = byte_progress(0, "convert");
    let summary = format::convert(&inputs, &args.out, &opts, &mut |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    })?;
    pb.finish_and_clear();
    let elapsed = start.elapsed();
    println!(
        "converted {} rows x {} columns ({} tensor bytes) into {} shard(s) of kind '{}' in {}",
        summary.rows,
        summary.columns,
        summary.bytes,
        summary.shards,
        summary.kind.as_str(),
        args.out.display()
    );
    println!(
        "{:.2} s, {}; dataset id {}; opens with key id(s) {}",
        elapsed.as_secs_f64(),
        rate(summary.bytes, elapsed),
        hex::encode(summary.dataset_id),
        summary.key_ids.join(", ")
    );
    Ok(())
}

/// Opens a dataset from a directory or from a shard file inside one.
fn open_dataset(path: &Path) -> Result<Dataset> {
    Dataset::open(path)
}

/// `ciphershard inspect`: everything readable without a key.
pub fn inspect(path: &Path, json: bool) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    // A lone shard file (no manifest beside it) still shows its header.
    let (dataset, shards) = match Dataset::open(path) {
        Ok(ds) => {
            let shards: Vec<ShardHeader> = if meta.is_dir() {
                ds.shards().to_vec()
            } else {
                ds.shards()
                    .iter()
                    .filter(|s| same_file(&s.path, path))
                    .cloned()
                    .collect()
            };
            (Some(ds), shards)
        }
        Err(e) if meta.is_file() && !path.with_file_name(format::MANIFEST_FILE).exists() => {
            let _ = e;
            (None, vec![ShardHeader::read(path)?])
        }
        Err(e) => return Err(e),
    };
    let report = inspect_report(dataset.as_ref(), &shards);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("JSON value serializes")
        );
    } else {
        print_inspect(&report);
    }
    Ok(())
}

fn inspect_report(ds: Option<&Dataset>, shards: &[ShardHeader]) -> serde_json::Value {
    use serde_json::json;
    let shard_json: Vec<_> = shards
        .iter()
        .map(|h| {
            let d = &h.descriptor;
            json!({
                "file": h.path.display().to_string(),
                "bytes": h.file_len,
                "header_bytes": h.data_start,
                "format_version": d.version,
                "cipher": format::CIPHER_NAME,
                "dataset_id": hex::encode(d.dataset_id),
                "shard_index": d.shard_index,
                "shard_count": d.shard_count,
                "row_start": d.row_start,
                "rows": d.rows,
                "chunk_size": d.chunk_size,
                "chunks": d.total_chunks(),
                "header_digest": hex::encode(h.digest),
                "metadata": d.metadata,
                "tensors": d.tensors.iter().map(|t| json!({
                    "name": t.name,
                    "dtype": t.dtype.as_str(),
                    "shape": t.shape,
                    "bytes": t.len(),
                    "offsets": [t.offsets.0, t.offsets.1],
                    "encrypted": t.encrypted,
                    "first_chunk": t.first_chunk,
                    "chunks": t.chunks,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    match ds {
        Some(ds) => {
            let m = ds.manifest();
            json!({
                "dataset": ds.dir().display().to_string(),
                "dataset_id": hex::encode(m.dataset_id),
                "kind": m.kind.as_str(),
                "rows": m.rows,
                "chunk_size": m.chunk_size,
                "columns": m.columns.iter().map(|c| json!({
                    "name": c.name, "dtype": c.dtype.as_str(), "shape": c.shape, "encrypted": c.encrypted,
                })).collect::<Vec<_>>(),
                "key_ids": ds.keyring().key_ids(),
                "key_wrap": "A256KW",
                "shard_count": m.shards.len(),
                "bytes": m.shards.iter().map(|s| s.bytes).sum::<u64>(),
                "shards": shard_json,
            })
        }
        None => {
            json!({ "dataset": null, "note": "no manifest.json beside this shard: keys unknown", "shards": shard_json })
        }
    }
}

fn print_inspect(r: &serde_json::Value) {
    if !r["dataset"].is_null() {
        println!("dataset   {}", r["dataset"].as_str().unwrap_or(""));
        println!(
            "id        {}  kind {}  rows {}  chunk size {} B",
            r["dataset_id"].as_str().unwrap_or(""),
            r["kind"].as_str().unwrap_or(""),
            r["rows"],
            r["chunk_size"]
        );
        let ids: Vec<&str> = r["key_ids"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        println!(
            "keys      {} (AES-KW wrapped data keys, one per shard)",
            ids.join(", ")
        );
        println!(
            "size      {} bytes in {} shard(s)",
            r["bytes"], r["shard_count"]
        );
        println!("columns");
        for c in r["columns"].as_array().into_iter().flatten() {
            println!(
                "  {:<24} {:<6} {:<16} {}",
                c["name"].as_str().unwrap_or(""),
                c["dtype"].as_str().unwrap_or(""),
                c["shape"].to_string(),
                if c["encrypted"].as_bool() == Some(true) {
                    "encrypted"
                } else {
                    "plain (authenticated)"
                }
            );
        }
    } else {
        println!("{}", r["note"].as_str().unwrap_or(""));
    }
    for s in r["shards"].as_array().into_iter().flatten() {
        println!(
            "shard {}  {}  v{} {}  rows {}..+{}  {} bytes ({} header), {} chunks of {} B",
            s["shard_index"],
            s["file"].as_str().unwrap_or(""),
            s["format_version"],
            s["cipher"].as_str().unwrap_or(""),
            s["row_start"],
            s["rows"],
            s["bytes"],
            s["header_bytes"],
            s["chunks"],
            s["chunk_size"]
        );
        for t in s["tensors"].as_array().into_iter().flatten() {
            println!(
                "    {:<22} {:<6} {:<18} {:>12} B  chunks {}..+{}  {}",
                t["name"].as_str().unwrap_or(""),
                t["dtype"].as_str().unwrap_or(""),
                t["shape"].to_string(),
                t["bytes"],
                t["first_chunk"],
                t["chunks"],
                if t["encrypted"].as_bool() == Some(true) {
                    "encrypted"
                } else {
                    "plain"
                }
            );
        }
    }
}

pub fn verify(key: &KeyArgs, dataset: &Path, backend: Backend) -> Result<()> {
    let key = key.load_one()?;
    let cipher = cipher::select(backend)?;
    let ds = open_dataset(dataset)?;
    let unlocked = ds.unlock(&key, cipher.as_ref())?;
    let start = Instant::now();
    let pb = byte_progress(0, "verify");
    let summary = format::verify(&unlocked, &mut |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    });
    pb.finish_and_clear();
    let summary = summary?;
    let elapsed = start.elapsed();
    println!(
        "ok: {} chunk tags in {} shard(s), {} bytes, verified with {} in {:.2} s ({})",
        summary.chunks,
        summary.shards,
        summary.bytes,
        cipher.backend(),
        elapsed.as_secs_f64(),
        rate(summary.bytes, elapsed)
    );
    Ok(())
}

pub fn rekey(key: &KeyArgs, new_key: &str, dataset: &Path) -> Result<()> {
    let old = key.load_one()?;
    let new = MasterKey::from_source(new_key)?;
    format::rekey(dataset, &old, &new)?;
    println!(
        "rekeyed {}: key {} replaced by key {} (no shard rewritten)",
        dataset.display(),
        old.id(),
        new.id()
    );
    Ok(())
}

pub fn decrypt(key: &KeyArgs, shard: &Path, out: &Path, backend: Backend) -> Result<()> {
    let key = key.load_one()?;
    let cipher = cipher::select(backend)?;
    let ds = open_dataset(shard)?;
    let index = ds
        .shards()
        .iter()
        .position(|s| same_file(&s.path, shard))
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{} is a dataset, not a shard: name one shard file",
                shard.display()
            ))
        })?;
    let unlocked = ds.unlock(&key, cipher.as_ref())?;
    let start = Instant::now();
    format::decrypt_shard(&unlocked, index, out)?;
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote plaintext {} ({} bytes) in {:.2} s — this file is NOT encrypted",
        out.display(),
        bytes,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// `ciphershard bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Dataset to load (generated when absent).
    dataset: Option<PathBuf>,
    #[command(flatten)]
    key: KeyArgs,
    /// Cipher backend.
    #[arg(long, default_value = "auto")]
    backend: Backend,
    /// Worker threads.
    #[arg(long)]
    threads: Option<usize>,
    /// Rows per batch.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Epochs.
    #[arg(long, default_value_t = 2)]
    epochs: u64,
    /// Benchmark the raw cipher instead of the loader.
    #[arg(long)]
    cipher: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn bench(_args: BenchArgs) -> Result<()> {
    Err(Error::InvalidArgument("bench: not wired yet".into()))
}

pub fn demo(_rows: u64, _backend: Backend) -> Result<()> {
    Err(Error::InvalidArgument("demo: not wired yet".into()))
}
