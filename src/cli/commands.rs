//! The subcommands.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ciphershard::cipher::{self, Backend};
use ciphershard::error::{Error, Result};
use ciphershard::format::{self, ConvertInput, ConvertOptions, Dataset};
use ciphershard::keys::MasterKey;

use super::{KeyArgs, byte_progress, gbps, parse_size};

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
                let column = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                ConvertInput::Npy { column, path: p.clone() }
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
    println!("{summary}");
    println!(
        "converted in {:.2} s ({:.2} GB/s) into {}",
        elapsed.as_secs_f64(),
        gbps(summary.bytes, elapsed),
        args.out.display()
    );
    Ok(())
}

/// Opens a dataset from a directory or from a shard file inside one.
fn open_dataset(path: &Path) -> Result<Dataset> {
    Dataset::open(path)
}

pub fn inspect(path: &Path, json: bool) -> Result<()> {
    let report = format::inspect(path)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(|e| Error::InvalidArgument(e.to_string()))?);
    } else {
        print!("{report}");
    }
    Ok(())
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
        "ok: {summary} verified with {} in {:.2} s ({:.2} GB/s)",
        cipher.backend(),
        elapsed.as_secs_f64(),
        gbps(summary.bytes, elapsed)
    );
    Ok(())
}

pub fn rekey(key: &KeyArgs, new_key: &str, dataset: &Path) -> Result<()> {
    let old = key.load_one()?;
    let new = MasterKey::from_source(new_key)?;
    format::rekey(dataset, &old, &new)?;
    println!("rekeyed {}: key {} replaced by key {} (no shard rewritten)", dataset.display(), old.id(), new.id());
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
        .ok_or_else(|| Error::InvalidArgument(format!("{} is a dataset, not a shard: name one shard file", shard.display())))?;
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
