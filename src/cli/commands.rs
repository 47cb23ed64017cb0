//! The subcommands.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use ciphershard::bench as crate_bench;
use ciphershard::pipeline;

use ciphershard::cipher::{self, Backend};
use ciphershard::error::{Error, Result};
use ciphershard::format::{self, ConvertInput, ConvertOptions, Dataset, ShardHeader};
use ciphershard::keys::MasterKey;

use ciphershard::error::Untrusted;

use super::{KeyArgs, byte_progress, interrupt, output, parse_size, rate};

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
    outln!(
        "converted {} rows x {} columns ({} tensor bytes) into {} shard(s) of kind '{}' in {}",
        summary.rows,
        summary.columns,
        summary.bytes,
        summary.shards,
        summary.kind.as_str(),
        args.out.display()
    )?;
    outln!(
        "{:.2} s, {}; dataset id {}; opens with key id(s) {}",
        elapsed.as_secs_f64(),
        rate(summary.bytes, elapsed),
        hex::encode(summary.dataset_id),
        summary.key_ids.join(", ")
    )?;
    // What anyone who can read the files sees; a warning when nothing is encrypted (`--plain
    // '*'`). Names quoted with `{:?}`: control characters come out escaped.
    let list = |names: &[String]| match names {
        [] => "none".to_string(),
        _ => names
            .iter()
            .map(|n| format!("{n:?}"))
            .collect::<Vec<_>>()
            .join(", "),
    };
    outln!("encrypted columns: {}", list(&summary.encrypted_columns))?;
    outln!(
        "readable columns (--plain: authenticated, not encrypted): {}",
        list(&summary.plain_columns)
    )?;
    if summary.encrypted_columns.is_empty() {
        eprintln!(
            "warning: every column is readable by anyone with the files: --plain matched all of them and nothing is encrypted"
        );
    }
    Ok(())
}

/// `ciphershard key-id`: the id of each key source, never the key (as `age-keygen -y` prints
/// a public key). Every source is read before anything is printed: one bad source fails the
/// command without a partial list.
pub fn key_id(sources: &[String], json: bool) -> Result<()> {
    if sources.iter().filter(|s| s.as_str() == "-").count() > 1 {
        return Err(Error::Key("standard input can supply only one key".into()));
    }
    let ids = sources
        .iter()
        .map(|s| MasterKey::from_source(s).map(|k| k.id()))
        .collect::<Result<Vec<String>>>()?;
    if json {
        let keys: Vec<_> = sources
            .iter()
            .zip(&ids)
            .map(|(s, id)| serde_json::json!({ "source": s, "key_id": id }))
            .collect();
        return outln!("{}", output::json(&serde_json::json!({ "keys": keys })));
    }
    for (s, id) in sources.iter().zip(&ids) {
        outln!("{id}  {}", Untrusted(s))?;
    }
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
        outln!("{}", output::json(&report))
    } else {
        print_inspect(&report)
    }
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

/// A string of the report, escaped for the terminal: names, dtypes, file names and metadata
/// come from files anyone may have written.
fn text(v: &serde_json::Value) -> Untrusted<&str> {
    Untrusted(v.as_str().unwrap_or(""))
}

fn print_inspect(r: &serde_json::Value) -> Result<()> {
    if !r["dataset"].is_null() {
        outln!("dataset   {}", text(&r["dataset"]))?;
        outln!(
            "id        {}  kind {}  rows {}  chunk size {} B",
            text(&r["dataset_id"]),
            text(&r["kind"]),
            r["rows"],
            r["chunk_size"]
        )?;
        let ids: Vec<&str> = r["key_ids"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        outln!(
            "keys      opens with key ids {} (any one of these master keys; `ciphershard key-id \
             FILE` prints a key file's id)",
            Untrusted(ids.join(", "))
        )?;
        outln!(
            "size      {} bytes in {} shard(s)",
            r["bytes"],
            r["shard_count"]
        )?;
        outln!("columns")?;
        for c in r["columns"].as_array().into_iter().flatten() {
            outln!(
                "  {:<24} {:<6} {:<16} {}",
                text(&c["name"]),
                text(&c["dtype"]),
                c["shape"].to_string(),
                if c["encrypted"].as_bool() == Some(true) {
                    "encrypted"
                } else {
                    "plain (authenticated)"
                }
            )?;
        }
    } else {
        outln!("{}", text(&r["note"]))?;
    }
    let mut last_metadata = None;
    for s in r["shards"].as_array().into_iter().flatten() {
        outln!(
            "shard {}  {}  v{} {}  rows {}..+{}  {} bytes ({} header), {} chunks of {} B",
            s["shard_index"],
            text(&s["file"]),
            s["format_version"],
            text(&s["cipher"]),
            s["row_start"],
            s["rows"],
            s["bytes"],
            s["header_bytes"],
            s["chunks"],
            s["chunk_size"]
        )?;
        for t in s["tensors"].as_array().into_iter().flatten() {
            outln!(
                "    {:<22} {:<6} {:<18} {:>12} B  chunks {}..+{}  {}",
                text(&t["name"]),
                text(&t["dtype"]),
                t["shape"].to_string(),
                t["bytes"],
                t["first_chunk"],
                t["chunks"],
                if t["encrypted"].as_bool() == Some(true) {
                    "encrypted"
                } else {
                    "plain"
                }
            )?;
        }
        // User metadata (`convert`'s, or a safetensors input's `__metadata__`): shown once
        // while it stays the same from shard to shard.
        let metadata = s["metadata"].as_object().filter(|m| !m.is_empty());
        if let Some(m) = metadata.filter(|_| last_metadata != Some(&s["metadata"])) {
            for (k, v) in m {
                outln!("    metadata {} = {}", Untrusted(k), text(v))?;
            }
        }
        last_metadata = Some(&s["metadata"]);
    }
    Ok(())
}

pub fn verify(key: &KeyArgs, dataset: &Path, backend: Backend) -> Result<()> {
    let keys = key.load_all()?;
    let cipher = cipher::select(backend)?;
    let ds = open_dataset(dataset)?;
    let key = ds.keyring().find_key(&keys)?;
    let unlocked = ds.unlock(key, cipher.as_ref())?;
    let start = Instant::now();
    let pb = byte_progress(0, "verify");
    let summary = format::verify(&unlocked, &mut |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    });
    pb.finish_and_clear();
    let summary = summary?;
    let elapsed = start.elapsed();
    outln!(
        "ok: {} chunk tags in {} shard(s), {} bytes, verified with {} in {:.2} s ({})",
        summary.chunks,
        summary.shards,
        summary.bytes,
        cipher.backend(),
        elapsed.as_secs_f64(),
        rate(summary.bytes, elapsed)
    )?;
    if keys.len() > 1 {
        outln!("opened with key id {}", key.id())?;
    }
    Ok(())
}

pub fn rekey(key: &KeyArgs, new_key: &str, dataset: &Path) -> Result<()> {
    let old = key.load_one()?;
    let new = MasterKey::from_source(new_key)?;
    let summary = format::rekey(dataset, &old, &new)?;
    if summary.new_key_was_present {
        outln!(
            "rekeyed {}: key {} removed; key {} already opened it and is listed once (no shard \
             rewritten)",
            dataset.display(),
            old.id(),
            new.id()
        )?;
    } else {
        outln!(
            "rekeyed {}: key {} replaced by key {} (no shard rewritten)",
            dataset.display(),
            old.id(),
            new.id()
        )?;
    }
    outln!("opens with key ids {}", summary.key_ids.join(", "))
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
    // From here on a signal stops the export between chunks and removes the partial file
    // (before, nothing is on disk and the default action is fine).
    interrupt::catch()?;
    format::decrypt_shard_with(&unlocked, index, out, &mut || interrupt::check(out))?;
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    outln!(
        "wrote plaintext {} ({} bytes, mode 0600) in {:.2} s — this file is NOT encrypted",
        out.display(),
        bytes,
        start.elapsed().as_secs_f64()
    )?;
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
    /// Blocks per shuffle window (bigger: better shuffling, more memory; on wgpu a window
    /// above the piece size is split).
    #[arg(long)]
    window_blocks: Option<u64>,
    /// Benchmark the raw cipher instead of the loader.
    #[arg(long)]
    cipher: bool,
    /// Loader decryption strategy: `chunk-open` (fused GCM on the private chunk copy, then copy
    /// rows) or `row-ctr` (verify the tag, then decrypt rows straight into the batch).
    #[arg(long, default_value = "chunk-open", value_parser = parse_mode)]
    mode: pipeline::DecryptMode,
    /// With `--backend cuda|wgpu`: bench the host loader (batches in host memory, one GPU round
    /// trip per chunk) instead of the device loader.
    #[arg(long)]
    host_batches: bool,
    /// With `--backend cuda|wgpu`: skip the kernel-only figures (every kernel variant, tag
    /// checks, round trips) measured after the loader.
    #[arg(long)]
    no_kernel_figures: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

impl BenchArgs {
    /// The dataset to load, if one is given.
    pub fn dataset(&self) -> Option<&Path> {
        self.dataset.as_deref()
    }
}

pub fn bench(args: BenchArgs) -> Result<()> {
    if args.cipher {
        let report =
            crate_bench::cipher::run_cpu(&crate_bench::cipher::CipherBenchOptions::default())?;
        if args.json {
            outln!(
                "{}",
                output::json(&serde_json::to_value(&report).expect("report serializes"))
            )?;
        } else {
            outln!(
                "CPU: {}\nbackend: {}\nchunk: {} bytes",
                report.cpu,
                report.backend,
                report.chunk_bytes
            )?;
            outln!(
                "{:<44} {:>7} {:>9} {:>17}",
                "case",
                "threads",
                "GB/s",
                "min..max"
            )?;
            for m in &report.results {
                outln!(
                    "{:<44} {:>7} {:>9.2} {:>8.2}..{:<8.2}",
                    m.name,
                    m.threads,
                    m.gb_per_s,
                    m.min_gb_per_s,
                    m.max_gb_per_s
                )?;
            }
            for r in &report.ratios {
                outln!("ratio {:<50} {:.2}x", r.name, r.ratio)?;
            }
        }
        return Ok(());
    }
    let defaults = crate_bench::loader::BenchOptions::default();
    let opts = crate_bench::loader::BenchOptions {
        backend: args.backend,
        threads: args.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        }),
        batch_size: args.batch_size,
        epochs: args.epochs,
        mode: args.mode,
        host_batches: args.host_batches,
        window_blocks: args.window_blocks.unwrap_or(defaults.window_blocks),
        ..defaults
    };
    let key = match &args.dataset {
        Some(_) => Some(args.key.load_one()?),
        None => None,
    };
    let report = crate_bench::loader::run(args.dataset.as_deref(), key.as_ref(), &opts)?;
    let kernels = match report.backend.as_str() {
        _ if args.no_kernel_figures => None,
        "cuda" => Some(cuda_kernel_figures()?),
        "wgpu" => Some(wgpu_kernel_figures()?),
        _ => None,
    };
    if args.json {
        let mut v = serde_json::to_value(&report).expect("report serializes");
        if let Some(k) = &kernels {
            v["kernels"] = k.clone();
        }
        outln!("{}", output::json(&v))?;
        return Ok(());
    }
    outln!(
        "dataset {}  rows {}  epoch {:.1} MB  backend {}  threads {}  batch {}  mode {:?}",
        report.dataset,
        report.rows,
        report.epoch_bytes as f64 / 1e6,
        report.backend,
        report.threads,
        report.batch_size,
        report.mode
    )?;
    for (name, r) in [
        ("encrypted", &report.encrypted),
        ("plaintext twin", &report.plaintext_twin),
    ] {
        outln!(
            "{name:<15} {:>8.1} batches/s {:>7.2} GB/s  ({} batches in {:.2} s)",
            r.batches_per_s,
            r.gb_per_s,
            r.batches,
            r.seconds
        )?;
    }
    outln!("ratio encrypted / plaintext twin: {:.3}", report.ratio)?;
    for (name, r) in [
        ("encrypted", &report.encrypted),
        ("plaintext twin", &report.plaintext_twin),
    ] {
        outln!(
            "{name:<15} steady state {:>7.2} GB/s  setup {:.1} ms  first batch {:.1} ms",
            r.steady_gb_per_s,
            r.setup_seconds * 1e3,
            r.first_batch_seconds * 1e3
        )?;
    }
    outln!(
        "steady-state ratio encrypted / plaintext twin: {:.3}",
        report.steady_ratio
    )?;
    outln!("encrypted run, per stage:\n{}", report.encrypted.stats)?;
    if let Some(d) = &report.encrypted.device {
        outln!("{d}")?;
    }
    if let Some(k) = kernels {
        outln!(
            "{} kernels: {}",
            report.backend,
            serde_json::to_string(&k).expect("serializes")
        )?;
    }
    Ok(())
}

fn parse_mode(s: &str) -> std::result::Result<pipeline::DecryptMode, String> {
    match s {
        "chunk-open" => Ok(pipeline::DecryptMode::ChunkOpen),
        "row-ctr" => Ok(pipeline::DecryptMode::RowCtr),
        other => Err(format!("unknown mode '{other}' (chunk-open or row-ctr)")),
    }
}

/// Kernel-only CUDA figures for `bench --backend cuda` (1 GiB in device memory).
#[cfg(feature = "cuda")]
fn cuda_kernel_figures() -> Result<serde_json::Value> {
    let c = cipher::cuda::CudaCipher::new(0)?;
    let r = crate_bench::cuda::kernel_bench(&c, 1 << 30, 1 << 30)?;
    Ok(serde_json::json!({
        "device": r.device,
        "ctr_gbps": r.ctr_gbps,
        "ghash_gbps": r.ghash_gbps,
        "ctr_ghash_gbps": r.ctr_ghash_gbps,
        "h2d_pinned_gbps": r.h2d_pinned_gbps,
        "e2e_encrypted_gbps": r.e2e_encrypted_gbps,
        "e2e_plain_gbps": r.e2e_plain_gbps,
    }))
}

#[cfg(not(feature = "cuda"))]
fn cuda_kernel_figures() -> Result<serde_json::Value> {
    Err(Error::BackendUnavailable {
        backend: "cuda",
        reason: cipher::cuda::probe().unwrap_err(),
    })
}

/// Kernel-only wgpu figures for `bench --backend wgpu` (64 MiB through the adapter).
#[cfg(feature = "wgpu")]
fn wgpu_kernel_figures() -> Result<serde_json::Value> {
    let r = crate_bench::wgpu::kernel_bench(64 << 20)?;
    Ok(serde_json::to_value(&r).expect("report serializes"))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_kernel_figures() -> Result<serde_json::Value> {
    Err(Error::BackendUnavailable {
        backend: "wgpu",
        reason: cipher::wgpu::probe().unwrap_err(),
    })
}

/// Deletes the demo's directory (ciphertext only) however the demo ends.
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Feature `j` of row `r` in the demo's synthetic data: cheap to recompute for checking.
fn demo_value(r: u64, j: u64) -> f32 {
    ((r.wrapping_mul(2_654_435_761) ^ j.wrapping_mul(40_503)) % 10_007) as f32 * 0.25
}

/// `ciphershard demo`: the whole job on a small synthetic dataset, end to end, with timings.
pub fn demo(rows: u64, backend: Backend) -> Result<()> {
    const FEATURES: u64 = 64;
    if rows == 0 {
        return Err(Error::InvalidArgument("--rows must be at least 1".into()));
    }
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|e| Error::Key(format!("OS RNG: {e}")))?;
    let dir = TempDir(std::env::temp_dir().join(format!("ciphershard-demo-{}", hex::encode(id))));
    let out = dir.0.join("dataset");

    // 1. Synthetic data, in memory only (no plaintext file is ever written).
    let t = Instant::now();
    let mut features = Vec::with_capacity((rows * FEATURES * 4) as usize);
    for r in 0..rows {
        for j in 0..FEATURES {
            features.extend_from_slice(&demo_value(r, j).to_le_bytes());
        }
    }
    let labels: Vec<u8> = (0..rows)
        .flat_map(|r| ((r % 10) as i64).to_le_bytes())
        .collect();
    let bytes = features.len() as u64 + labels.len() as u64;
    outln!(
        "1. generated {rows} rows: 'features' f32[{FEATURES}] (encrypted) and 'label' i64 (plain, authenticated), {:.1} MB, in memory ({:.0} ms)",
        bytes as f64 / 1e6,
        t.elapsed().as_secs_f64() * 1e3
    )?;

    // 2. Convert: a fresh master key (kept in memory), 4 MiB shards of 256 KiB chunks.
    let key = MasterKey::generate()?;
    let opts = ConvertOptions {
        shard_size: 4 << 20,
        chunk_size: 256 << 10,
        plain: vec!["label".into()],
        keys: vec![key.clone()],
        ..Default::default()
    };
    let inputs = [
        ConvertInput::InMemory {
            name: "features".into(),
            dtype: format::Dtype::F32,
            shape: vec![rows, FEATURES],
            data: features,
        },
        ConvertInput::InMemory {
            name: "label".into(),
            dtype: format::Dtype::I64,
            shape: vec![rows],
            data: labels,
        },
    ];
    let t = Instant::now();
    let summary = format::convert(&inputs, &out, &opts, &mut |_, _| {})?;
    drop(inputs);
    outln!(
        "2. converted into {} encrypted shard(s) under {} with key {}: {}",
        summary.shards,
        out.display(),
        key.id(),
        rate(summary.bytes, t.elapsed())
    )?;

    // 3. Verify every tag.
    let cipher = cipher::select(backend)?;
    let ds = Dataset::open(&out)?;
    let unlocked = ds.unlock(&key, cipher.as_ref())?;
    let t = Instant::now();
    let v = format::verify(&unlocked, &mut |_, _| {})?;
    outln!(
        "3. verified {} chunk tags with the {} backend: {}",
        v.chunks,
        cipher.backend(),
        rate(v.bytes, t.elapsed())
    )?;
    drop(unlocked);

    // 4. Load it back through the loader: shuffled batches, every value checked.
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let src = pipeline::FormatSource::open(&out, &key, backend)?;
    let lopts = pipeline::LoaderOptions {
        batch_size: 1024,
        threads,
        shuffle: true,
        seed: 7,
        epochs: 1,
        ..Default::default()
    };
    let t = Instant::now();
    let mut loader = pipeline::Loader::new(src, &lopts)?;
    let mut seen = vec![false; rows as usize];
    let mut checked = 0u64;
    for batch in loader.by_ref() {
        let batch = batch?;
        let feats = batch
            .tensor("features")
            .and_then(|t| t.as_slice::<f32>())
            .ok_or_else(|| Error::Stopped("batch lacks features".into()))?;
        let labs = batch
            .tensor("label")
            .and_then(|t| t.as_slice::<i64>())
            .ok_or_else(|| Error::Stopped("batch lacks label".into()))?;
        for (i, &r) in batch.row_ids().iter().enumerate() {
            let row = &feats[i * FEATURES as usize..(i + 1) * FEATURES as usize];
            let ok = row
                .iter()
                .enumerate()
                .all(|(j, &v)| v == demo_value(r, j as u64))
                && labs[i] == (r % 10) as i64;
            if !ok || seen[r as usize] {
                return Err(Error::Stopped(format!(
                    "demo: row {r} came back wrong or twice"
                )));
            }
            seen[r as usize] = true;
            checked += 1;
        }
    }
    let elapsed = t.elapsed();
    if checked != rows {
        return Err(Error::Stopped(format!(
            "demo: {checked} of {rows} rows delivered"
        )));
    }
    let stats = loader.stats();
    outln!(
        "4. loaded all {rows} rows back in shuffled batches of 1024 with {threads} threads ({}), every value checked: {}",
        cipher.backend(),
        rate(stats.delivered_bytes, elapsed)
    )?;
    outln!("{stats}")?;

    // 5. Tamper with one byte of ciphertext: verification names the chunk, nothing is released.
    let shard = ds.shards()[0].path.clone();
    let at = ds.shards()[0].data_start + 100;
    flip_byte(&shard, at)?;
    let unlocked = ds.unlock(&key, cipher.as_ref())?;
    match format::verify(&unlocked, &mut |_, _| {}) {
        Err(e @ Error::Integrity(_)) => {
            outln!("5. flipped one ciphertext byte; verify refuses it: {e}")?
        }
        Err(e) => return Err(e),
        Ok(_) => return Err(Error::Stopped("demo: a tampered shard verified".into())),
    }
    outln!("done; removed {}", dir.0.display())?;
    Ok(())
}

fn flip_byte(path: &Path, at: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at)
        .map_err(|e| Error::io(path, e))?;
    b[0] ^= 0x01;
    f.write_all_at(&b, at).map_err(|e| Error::io(path, e))
}
