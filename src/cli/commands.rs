//! The subcommands.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use ciphershard::bench as crate_bench;
use ciphershard::pipeline;

use ciphershard::cipher::{self, Backend};
use ciphershard::error::{Error, Result};
use ciphershard::format::{self, ConvertInput, ConvertOptions, Dataset};
use ciphershard::keys::MasterKey;

use ciphershard::error::Untrusted;

use super::output::OutputArgs;
use super::{CacheArgs, KeyArgs, byte_progress, interrupt, output, rate};

/// `true` for `-`, standard output as an output path (`./-` is a file named `-`).
fn is_stdout(out: &Path) -> bool {
    out.as_os_str() == "-"
}

/// Refuses standard output as the output `what` when it is a terminal.
fn refuse_terminal_stdout(what: &str) -> Result<()> {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() {
        return Err(Error::InvalidArgument(format!(
            "standard output is a terminal: --out - writes {what} there only for a pipe or a file (`| command`, `> file`); name a file to write it to instead"
        )));
    }
    Ok(())
}

/// `ciphershard keygen`.
pub fn keygen(out: &Path, how: OutputArgs) -> Result<()> {
    use std::io::Write;
    if !is_stdout(out) {
        let key = MasterKey::generate()?;
        key.write_new_file(out)?;
        let report = serde_json::json!({
            "file": out.display().to_string(), "key_id": key.id(), "mode": "0600",
        });
        return output::report(how, "keygen", report, || {
            outln!(
                "wrote a new 256-bit master key to {} (mode 0600), key id {}",
                out.display(),
                key.id()
            )
        });
    }
    // `--json` with `--out -` never gets here: `Command::refusal` turns it away.
    refuse_terminal_stdout("the key")?;
    let key = MasterKey::generate()?;
    let mut text = zeroize::Zeroizing::new(hex::encode(key.as_bytes()));
    text.push('\n');
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| Error::io(output::STDOUT, e))?;
    if !how.quiet {
        eprintln!(
            "wrote a new 256-bit master key to standard output, key id {}",
            key.id()
        );
    }
    Ok(())
}

/// `ciphershard convert`.
#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    #[command(flatten)]
    key: KeyArgs,
    /// Input files, by extension: `.parquet`/`.pq` (Parquet), `.arrow`/`.feather`/`.ipc`
    /// (Arrow IPC file or stream, as `datasets.save_to_disk` writes), `.jsonl`/`.ndjson` (JSON
    /// Lines, with --column), `.npy` (one column named after the file), anything else
    /// safetensors (all tensors sharing a first dimension become columns). Several Parquet,
    /// Arrow or JSONL files are appended by rows, in order; list columns become ragged columns
    /// (docs/INPUTS.md).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// JSONL inputs: a key whose value, a list of integers, becomes a ragged column (repeat for
    /// several).
    #[arg(long = "column", value_name = "KEY")]
    columns: Vec<String>,
    /// Output dataset directory (created; must not already hold a dataset), or an object store
    /// folder URL (`s3://bucket/prefix/`, `gs://…`, `az://…`; docs/STORAGE.md): shards are
    /// uploaded in parts as they are sealed, then the keyring, then the manifest, so the
    /// dataset opens only once complete; a failed or interrupted conversion aborts its uploads
    /// and deletes the shards it had written.
    #[arg(long)]
    out: PathBuf,
    /// Remove the leftovers of an interrupted conversion in --out first (its shards, temporary
    /// files and keyring, from a run that never wrote its manifest), once the inputs are
    /// checked. Nothing else is removed: a complete dataset is still refused, and so is a file
    /// at one of a dataset's names that is not a conversion's (in an object store folder
    /// without a manifest: its `shard-N.safetensors` and `keyring.json` objects).
    #[arg(long)]
    force: bool,
    /// Target shard size of the tensor bytes (rows are split so each shard's data stays under
    /// it; the header comes on top). Parquet, Arrow IPC and JSONL inputs are converted with
    /// about two shards in memory, hence their smaller default [default: 1GiB; 64MiB for
    /// Parquet, Arrow IPC, JSONL].
    #[arg(long, value_parser = super::parse_positive_size)]
    shard_size: Option<u64>,
    /// Chunk size: the unit of authentication (a multiple of 64 bytes, at most 256 MiB).
    #[arg(long, default_value = "2MiB", value_parser = super::parse_chunk_size)]
    chunk_size: u64,
    /// Tensors to leave readable (still authenticated): glob patterns on names (`*`, `?`).
    #[arg(long = "plain", value_name = "PATTERN")]
    plain: Vec<String>,
    #[command(flatten)]
    pub output: OutputArgs,
}

impl ConvertArgs {
    /// Why these options do not go together: `--column` belongs to JSONL inputs, which need it.
    pub fn refusal(&self) -> Option<String> {
        let jsonl = self
            .inputs
            .iter()
            .any(|p| matches!(ConvertInput::from_path(p, &[]), ConvertInput::Jsonl { .. }));
        match (jsonl, self.columns.is_empty()) {
            (true, true) => Some(
                "a JSONL input needs --column KEY: the key whose list of integers becomes a column"
                    .into(),
            ),
            (false, false) => Some(
                "--column applies only to JSONL inputs (.jsonl, .ndjson): other formats name their own columns"
                    .into(),
            ),
            _ => None,
        }
    }
}

pub fn convert(args: ConvertArgs) -> Result<()> {
    let keys = args.key.load_all()?;
    let inputs: Vec<ConvertInput> = args
        .inputs
        .iter()
        .map(|p| ConvertInput::from_path(p, &args.columns))
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
    // A signal stops the conversion between batches and removes what it wrote; a directory it
    // created is removed too once empty (`remove_dir` never removes anything else).
    let created_out =
        ciphershard::store::as_url(&args.out).is_none() && args.out.symlink_metadata().is_err();
    interrupt::catch()?;
    let summary = format::convert_with(
        &inputs,
        &args.out,
        &opts,
        args.force,
        &mut |done, total| {
            pb.set_length(total);
            pb.set_position(done);
        },
        &mut || interrupt::check(&args.out),
    );
    pb.finish_and_clear();
    if summary.is_err() && created_out {
        let _ = std::fs::remove_dir(&args.out);
    }
    let summary = summary?;
    let elapsed = start.elapsed();
    // A --plain pattern that matches nothing is most likely a typo for a column meant to stay
    // readable; everything it was meant for is encrypted, which is safe but worth a word.
    let unmatched: Vec<&String> = args
        .plain
        .iter()
        .filter(|p| {
            !summary
                .encrypted_columns
                .iter()
                .chain(&summary.plain_columns)
                .any(|name| format::glob_match(p, name))
        })
        .collect();
    for p in &unmatched {
        eprintln!(
            "warning: --plain {:?} matched no column: every column it was meant for is encrypted",
            Untrusted(p.as_str()).to_string()
        );
    }
    let report = serde_json::json!({
        "unmatched_plain_patterns": unmatched,
        "dataset": args.out.display().to_string(),
        "dataset_id": hex::encode(summary.dataset_id),
        "kind": summary.kind.as_str(),
        "rows": summary.rows,
        "columns": summary.columns,
        "bytes": summary.bytes,
        "shards": summary.shards,
        "seconds": elapsed.as_secs_f64(),
        "key_ids": summary.key_ids,
        "encrypted_columns": summary.encrypted_columns,
        "plain_columns": summary.plain_columns,
    });
    output::report(args.output, "convert", report, || {
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
        // What anyone who can read the files sees; a warning when nothing is encrypted
        // (`--plain '*'`). Names quoted with `{:?}`: control characters come out escaped.
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
        )
    })?;
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
pub fn key_id(sources: &[String], how: OutputArgs) -> Result<()> {
    // As errors show key sources: a file whose name holds key-like runs is not echoed whole.
    let shown = |s: &String| {
        ciphershard::keys::shown_key_source(Path::new(s))
            .display()
            .to_string()
    };
    if sources.iter().filter(|s| s.as_str() == "-").count() > 1 {
        return Err(Error::Key("standard input can supply only one key".into()));
    }
    let ids = sources
        .iter()
        .map(|s| MasterKey::from_source(s).map(|k| k.id()))
        .collect::<Result<Vec<String>>>()?;
    let keys: Vec<_> = sources
        .iter()
        .zip(&ids)
        .map(|(s, id)| serde_json::json!({ "source": shown(s), "key_id": id }))
        .collect();
    output::report(how, "key-id", serde_json::json!({ "keys": keys }), || {
        for (s, id) in sources.iter().zip(&ids) {
            outln!("{id}  {}", Untrusted(shown(s)))?;
        }
        Ok(())
    })
}

/// Opens a dataset from a directory or from a shard file inside one.
fn open_dataset(path: &Path) -> Result<Dataset> {
    Dataset::open(path)
}

/// `ciphershard inspect`: everything readable without a key.
pub fn inspect(path: &Path, how: OutputArgs) -> Result<()> {
    let report = format::inspect(path)?;
    output::report(how, "inspect", report.clone(), || print_inspect(&report))
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
                // `[*]` for a list of scalars, `[*, 3]` for a list of 3-vectors.
                if c["ragged"].as_bool() == Some(true) {
                    let dims = c["shape"].as_array().into_iter().flatten();
                    std::iter::once("[*".to_string())
                        .chain(dims.map(|d| format!(", {d}")))
                        .chain(std::iter::once("]".to_string()))
                        .collect::<String>()
                } else {
                    c["shape"].to_string()
                },
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
        // Ranges are half-open, `first..end` as in Rust: rows 0..10000 are rows 0 to 9999.
        let end = |start: &serde_json::Value, n: &serde_json::Value| {
            start
                .as_u64()
                .unwrap_or(0)
                .saturating_add(n.as_u64().unwrap_or(0))
        };
        outln!(
            "shard {}  {}  v{} {}  rows {}..{}  {} bytes ({} header), {} chunks of {} B",
            s["shard_index"],
            text(&s["file"]),
            s["format_version"],
            text(&s["cipher"]),
            s["row_start"],
            end(&s["row_start"], &s["rows"]),
            s["bytes"],
            s["header_bytes"],
            s["chunks"],
            s["chunk_size"]
        )?;
        for t in s["tensors"].as_array().into_iter().flatten() {
            outln!(
                "    {:<22} {:<6} {:<18} {:>12} B  chunks {}..{}  {}",
                text(&t["name"]),
                text(&t["dtype"]),
                t["shape"].to_string(),
                t["bytes"],
                t["first_chunk"],
                end(&t["first_chunk"], &t["chunks"]),
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

pub fn verify(
    key: &KeyArgs,
    dataset: &Path,
    backend: Backend,
    cache: &CacheArgs,
    how: OutputArgs,
) -> Result<()> {
    let keys = key.load_all()?;
    let cipher = cipher::select(backend)?;
    let ds = Dataset::open_with(dataset, &cache.open_options()?)?;
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
    let cache_stats = unlocked.dataset().store().cache_stats();
    let mut report = serde_json::json!({
        "dataset": dataset.display().to_string(),
        "ok": true,
        "chunks": summary.chunks,
        "shards": summary.shards,
        "bytes": summary.bytes,
        "key_id": key.id(),
        "backend": cipher.backend().name(),
        "seconds": elapsed.as_secs_f64(),
    });
    if let Some(c) = &cache_stats {
        report["cache"] = serde_json::to_value(c).expect("stats serialize");
    }
    output::report(how, "verify", report, || {
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
        if let Some(c) = &cache_stats {
            outln!("cache: {c}")?;
        }
        Ok(())
    })
}

pub fn rekey(key: &KeyArgs, new_key: &str, dataset: &Path, how: OutputArgs) -> Result<()> {
    let old = key.load_one()?;
    let new = MasterKey::from_source(new_key)?;
    let summary = format::rekey(dataset, &old, &new)?;
    let report = serde_json::json!({
        "dataset": dataset.display().to_string(),
        "old_key_id": old.id(),
        "new_key_id": new.id(),
        "new_key_was_present": summary.new_key_was_present,
        "key_ids": summary.key_ids,
        "shards_rewritten": 0,
    });
    output::report(how, "rekey", report, || {
        if summary.new_key_was_present {
            outln!(
                "rekeyed {}: key {} removed; key {} already opened it and is listed once (no \
                 shard rewritten)",
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
    })
}

pub fn decrypt(
    key: &KeyArgs,
    shard: &Path,
    out: &Path,
    backend: Backend,
    how: OutputArgs,
) -> Result<()> {
    if is_stdout(out) {
        refuse_terminal_stdout("the plaintext")?;
    }
    let key = key.load_one()?;
    if ciphershard::store::as_url(out).is_some() {
        return Err(Error::InvalidArgument(format!(
            "--out {}: decrypt writes plaintext only to a local file or standard output, never \
             to an object store",
            Untrusted(&out.display().to_string())
        )));
    }
    let cipher = cipher::select(backend)?;
    let ds = open_dataset(shard)?;
    // A shard URL: its dataset was opened from the folder around it; match by object name.
    let same = |s: &Path| match ciphershard::store::as_url(shard) {
        Some(_) => {
            shard.to_str().is_some_and(|u| !u.ends_with('/')) && s.file_name() == shard.file_name()
        }
        None => format::same_file(s, shard),
    };
    let index = ds
        .shards()
        .iter()
        .position(|s| same(&s.path))
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{} is a dataset, not a shard: name one shard file",
                shard.display()
            ))
        })?;
    let unlocked = ds.unlock(&key, cipher.as_ref())?;
    let start = Instant::now();
    if is_stdout(out) {
        return decrypt_to_stdout(&unlocked, index, start);
    }
    // From here on a signal stops the export between chunks and removes the partial file
    // (before, nothing is on disk and the default action is fine).
    interrupt::catch()?;
    format::decrypt_shard_with(&unlocked, index, out, &mut || interrupt::check(out))?;
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    let seconds = start.elapsed().as_secs_f64();
    let report = serde_json::json!({
        "shard": shard.display().to_string(),
        "file": out.display().to_string(),
        "bytes": bytes,
        "mode": "0600",
        "encrypted": false,
        "seconds": seconds,
    });
    output::report(how, "decrypt", report, || {
        outln!(
            "wrote plaintext {} ({} bytes, mode 0600) in {:.2} s — this file is NOT encrypted",
            out.display(),
            bytes,
            seconds
        )
    })
}

/// `ciphershard backends`: what is available here, what `auto` picks, and why.
pub fn backends(how: OutputArgs) -> Result<()> {
    let available = cipher::availability();
    let (auto, passed) = cipher::select_auto();
    let tag_check = cipher::auto::wgpu_tag_check_choice();
    let report = serde_json::json!({
        "backends": available.iter().map(|a| serde_json::json!({
            "name": a.backend.name(),
            "available": a.status.is_ok(),
            "detail": match &a.status { Ok(d) => d.to_string(), Err(why) => why.to_string() },
        })).collect::<Vec<_>>(),
        "auto": auto.backend().name(),
        "passed_over": passed.iter().map(|(b, why)| serde_json::json!({
            "backend": b.name(), "why": why.to_string(),
        })).collect::<Vec<_>>(),
        "wgpu_tag_check": match &tag_check {
            Some(Ok(choice)) => choice.to_string(),
            Some(Err(why)) => format!("on the CPU (timing failed: {why})"),
            None => String::new(),
        },
    });
    output::report(how, "backends", report, || {
        for a in &available {
            match &a.status {
                Ok(desc) => outln!("{:<5} available: {desc}", a.backend.name())?,
                Err(why) => outln!("{:<5} unavailable: {why}", a.backend.name())?,
            }
        }
        outln!("auto  -> {}", auto.backend().name())?;
        for (b, why) in &passed {
            // Available or not (listed above), auto did not pick it: say why.
            outln!("        passed over {}: {why}", b.name())?;
        }
        match &tag_check {
            Some(Ok(choice)) => outln!("wgpu  {choice}"),
            Some(Err(why)) => outln!("wgpu  tags checked on the CPU (timing failed: {why})"),
            None => Ok(()),
        }
    })
}

/// `decrypt --out -`: the plaintext to standard output (a pipe or a file, never a terminal),
/// the message to standard error.
fn decrypt_to_stdout(ud: &format::UnlockedDataset, index: usize, start: Instant) -> Result<()> {
    let name = Path::new(output::STDOUT);
    interrupt::catch()?;
    let stdout = std::io::stdout();
    let mut w = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
    format::decrypt_shard_to(ud, index, &mut w, name, &mut || {
        interrupt::check_stream(name)
    })?;
    if !output::quiet() {
        eprintln!(
            "wrote plaintext to standard output in {:.2} s — it is NOT encrypted",
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// `ciphershard bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Dataset to load (generated when absent; not with --cipher).
    dataset: Option<PathBuf>,
    /// The dataset's key (only with a dataset).
    #[command(flatten)]
    key: KeyArgs,
    #[arg(long, default_value = "auto", value_parser = super::backend_arg(), help = super::BACKEND_HELP)]
    backend: Backend,
    /// Worker threads [default: the number of CPUs].
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    threads: Option<usize>,
    /// Rows per batch [default: 256].
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    batch_size: Option<usize>,
    /// Epochs [default: 2].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    epochs: Option<u64>,
    /// Blocks per shuffle window (bigger: better shuffling, more memory; on wgpu a window
    /// above the piece size is split) [default: 8].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    window_blocks: Option<u64>,
    /// Benchmark the raw cipher instead of the loader: the CPU backend against aws-lc-rs
    /// (`--backend auto|cpu`), or the kernel-only figures of `--backend cuda|wgpu`. Takes no
    /// dataset and none of the loader's options.
    #[arg(long)]
    cipher: bool,
    /// Loader decryption strategy: `chunk-open` (fused GCM on the private chunk copy, then copy
    /// rows) or `row-ctr` (verify the tag, then decrypt rows straight into the batch)
    /// [default: chunk-open].
    #[arg(long, value_parser = mode_arg())]
    mode: Option<pipeline::DecryptMode>,
    /// With `--backend auto|cuda|wgpu`: bench the host loader (batches in host memory, one GPU
    /// round trip per chunk) instead of the device loader.
    #[arg(long)]
    host_batches: bool,
    /// With `--backend auto|cuda|wgpu`: skip the kernel-only figures (every kernel variant, tag
    /// checks, round trips) measured after the loader.
    #[arg(long)]
    no_kernel_figures: bool,
    /// Pack this ragged column of the DATASET into sequences of --seq-len tokens, --batch-size
    /// sequences a batch (the host loader; as language-model training reads token ids).
    #[arg(long, value_name = "COLUMN", requires = "seq_len")]
    pack: Option<String>,
    /// Tokens per packed sequence (with --pack).
    #[arg(long, value_name = "N", requires = "pack", value_parser = clap::value_parser!(u64).range(1..))]
    seq_len: Option<u64>,
    /// Cut batches by the tokens of this ragged column of the DATASET: each batch holds at most
    /// --max-tokens of them (and at most --batch-size rows).
    #[arg(
        long,
        value_name = "COLUMN",
        requires = "max_tokens",
        conflicts_with = "pack"
    )]
    budget: Option<String>,
    /// Most tokens per batch (with --budget).
    #[arg(long, value_name = "N", requires = "budget", value_parser = clap::value_parser!(u64).range(1..))]
    max_tokens: Option<u64>,
    /// Evict the dataset's shard files from the page cache (posix_fadvise DONTNEED, advisory)
    /// before every run, and report the raw sequential read rate of the same files (evicted
    /// first too) beside the loader's. Local datasets and the host loader only. Only the first
    /// epoch of a run is cold: --epochs defaults to 1 here.
    #[arg(long)]
    cold: bool,
    /// Shuffle windows the host loader reads ahead of its workers (0: none) [default: 1 for
    /// local files, 8 for an object store].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(0..=64))]
    readahead_windows: Option<u64>,
    /// Threads reading ahead for the host loader [default: 4 for local files, 16 for an object
    /// store].
    #[arg(long, value_name = "N", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    io_threads: Option<usize>,
    #[command(flatten)]
    cache: CacheArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

impl BenchArgs {
    /// The dataset to load, if one is given.
    pub fn dataset(&self) -> Option<&Path> {
        self.dataset.as_deref()
    }

    /// Why these options do not go together: an option that would be ignored is refused.
    pub fn refusal(&self) -> Option<String> {
        let given = |name: &'static str, yes: bool| yes.then_some(name);
        if self.cipher {
            let loader_only = [
                given("DATASET", self.dataset.is_some()),
                given("--key", !self.key.key.is_empty()),
                given("--threads", self.threads.is_some()),
                given("--batch-size", self.batch_size.is_some()),
                given("--epochs", self.epochs.is_some()),
                given("--window-blocks", self.window_blocks.is_some()),
                given("--mode", self.mode.is_some()),
                given("--host-batches", self.host_batches),
                given("--no-kernel-figures", self.no_kernel_figures),
                given("--pack", self.pack.is_some()),
                given("--budget", self.budget.is_some()),
                given("--cold", self.cold),
                given("--readahead-windows", self.readahead_windows.is_some()),
                given("--io-threads", self.io_threads.is_some()),
                given("--cache-dir", self.cache.cache_dir.is_some()),
                given("--cache-size", self.cache.cache_size.is_some()),
            ];
            if let Some(name) = loader_only.into_iter().flatten().next() {
                return Some(format!(
                    "{name} does not apply with --cipher: --cipher measures the cipher alone, on buffers in memory, with no dataset and no loader"
                ));
            }
            return None;
        }
        for (name, given) in [
            ("--pack", self.pack.is_some()),
            ("--budget", self.budget.is_some()),
        ] {
            if given && self.dataset.is_none() {
                return Some(format!(
                    "{name} applies only with a DATASET holding a ragged column: the generated dataset has none"
                ));
            }
            if given && matches!(self.backend, Backend::Cuda | Backend::Wgpu) && !self.host_batches
            {
                return Some(format!(
                    "{name} is done by the host loader: with --backend cuda|wgpu add --host-batches (the device loaders deliver rows)"
                ));
            }
        }
        if self.cold
            && let Some(url) = self.dataset.as_deref().and_then(ciphershard::store::as_url)
        {
            return Some(format!(
                "--cold applies to local datasets only: {} is read over the network, with no \
                 page cache to evict",
                ciphershard::store::scrub(url)
            ));
        }
        if self.cold && matches!(self.backend, Backend::Cuda | Backend::Wgpu) && !self.host_batches
        {
            return Some(
                "--cold measures the host loader: with --backend cuda|wgpu add --host-batches"
                    .into(),
            );
        }
        if self.dataset.is_none()
            && (self.cache.cache_dir.is_some() || self.cache.cache_size.is_some())
        {
            return Some(
                "--cache-dir and --cache-size apply only with a DATASET URL: the generated dataset \
                 is local"
                    .into(),
            );
        }
        if self.dataset.is_none() && !self.key.key.is_empty() {
            return Some(
                "--key applies only with a DATASET: without one, bench generates a dataset and its key"
                    .into(),
            );
        }
        if self.backend == Backend::Cpu {
            let gpu_only = [
                given("--host-batches", self.host_batches),
                given("--no-kernel-figures", self.no_kernel_figures),
            ];
            if let Some(name) = gpu_only.into_iter().flatten().next() {
                return Some(format!(
                    "{name} does not apply with --backend cpu: it concerns the GPU backends (cuda, wgpu) only"
                ));
            }
        }
        None
    }
}

/// `bench --cipher`: the CPU cipher against aws-lc-rs, or a GPU backend's kernel-only figures
/// (never the CPU's when a GPU backend is named).
fn bench_cipher(args: &BenchArgs) -> Result<()> {
    type Figures = fn() -> Result<serde_json::Value>;
    let gpu: Option<(&'static str, _, Figures)> = match args.backend {
        Backend::Cuda => Some(("cuda", cipher::cuda::probe(), cuda_kernel_figures)),
        Backend::Wgpu => Some(("wgpu", cipher::wgpu::probe(), wgpu_kernel_figures)),
        Backend::Auto | Backend::Cpu => None,
    };
    if let Some((backend, probe, figures)) = gpu {
        probe.map_err(|reason| Error::BackendUnavailable { backend, reason })?;
        let k = figures()?;
        let v = serde_json::json!({ "backend": backend, "kernels": k });
        return output::report(args.output, "bench-cipher", v, || {
            print_kernel_figures(backend, &k)
        });
    }
    let report = crate_bench::cipher::run_cpu(&crate_bench::cipher::CipherBenchOptions::default())?;
    let v = serde_json::to_value(&report).expect("report serializes");
    output::report(args.output, "bench-cipher", v, || {
        print_cipher_report(&report)
    })
}

fn print_cipher_report(report: &crate_bench::cipher::CipherBenchReport) -> Result<()> {
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
    Ok(())
}

pub fn bench(args: BenchArgs) -> Result<()> {
    if args.cipher {
        return bench_cipher(&args);
    }
    let defaults = crate_bench::loader::BenchOptions::default();
    let opts = crate_bench::loader::BenchOptions {
        backend: args.backend,
        threads: args.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        }),
        batch_size: args.batch_size.unwrap_or(256),
        // Later epochs of a cold run read from the page cache the first one filled.
        epochs: args.epochs.unwrap_or(if args.cold { 1 } else { 2 }),
        cold: args.cold,
        readahead_windows: args.readahead_windows,
        io_threads: args.io_threads,
        mode: args.mode.unwrap_or(pipeline::DecryptMode::ChunkOpen),
        host_batches: args.host_batches || args.pack.is_some() || args.budget.is_some(),
        window_blocks: args.window_blocks.unwrap_or(defaults.window_blocks),
        pack: args
            .pack
            .clone()
            .zip(args.seq_len)
            .map(|(column, seq_len)| pipeline::options::PackOptions { column, seq_len }),
        budget: args
            .budget
            .clone()
            .zip(args.max_tokens)
            .map(|(column, max_tokens)| pipeline::TokenBudget { column, max_tokens }),
        open: args.cache.open_options()?,
        ..defaults
    };
    if args.backend == Backend::Auto
        && (args.host_batches || args.no_kernel_figures)
        && cipher::auto_for_device_batches() == Backend::Cpu
    {
        return Err(Error::InvalidArgument(format!(
            "{} does not apply here: --backend auto picks the CPU on this machine (no GPU backend \
             is available; `ciphershard backends` says why), and the option concerns the GPU \
             backends only",
            if args.host_batches {
                "--host-batches"
            } else {
                "--no-kernel-figures"
            }
        )));
    }
    let key = match &args.dataset {
        Some(_) => Some(args.key.load_one()?),
        None => None,
    };
    // A generated dataset (hundreds of MB of ciphertext) is removed on a signal too.
    let scratch = crate_bench::loader::scratch_dir()?;
    if args.dataset.is_none() {
        interrupt::catch()?;
        interrupt::remove_on_signal(scratch.clone());
    }
    // Drawn only while a dataset is generated.
    let pb = match args.dataset {
        None => byte_progress(0, "generate"),
        Some(_) => indicatif::ProgressBar::hidden(),
    };
    let report = crate_bench::loader::run_with_scratch(
        args.dataset.as_deref(),
        key.as_ref(),
        &opts,
        &scratch,
        &mut |done, total| {
            pb.set_length(total);
            pb.set_position(done);
            if done == total {
                pb.finish_and_clear();
            }
        },
    );
    pb.finish_and_clear();
    let report = report?;
    let kernels = match report.backend.as_str() {
        _ if args.no_kernel_figures => None,
        "cuda" => Some(cuda_kernel_figures()?),
        "wgpu" => Some(wgpu_kernel_figures()?),
        _ => None,
    };
    if args.output.json || args.output.quiet {
        let mut v = serde_json::to_value(&report).expect("report serializes");
        if let Some(k) = &kernels {
            v["kernels"] = k.clone();
        }
        return output::report(args.output, "bench", v, || Ok(()));
    }
    outln!(
        "dataset {}  rows {}  epoch {:.1} MB  backend {}  threads {}  batch {}  mode {}",
        report.dataset,
        report.rows,
        report.epoch_bytes as f64 / 1e6,
        report.backend,
        report.threads,
        report.batch_size,
        match report.mode {
            pipeline::DecryptMode::ChunkOpen => "chunk-open",
            pipeline::DecryptMode::RowCtr => "row-ctr",
        }
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
    if let Some(p) = &report.pack {
        for (name, r) in [
            ("encrypted", &report.encrypted),
            ("plaintext twin", &report.plaintext_twin),
        ] {
            outln!(
                "{name:<15} {:>8.2} M tokens/s  (packed '{}', {} x {} tokens a batch)",
                r.batches_per_s * report.tokens_per_batch as f64 / 1e6,
                Untrusted(&p.column),
                report.batch_size,
                p.seq_len
            )?;
        }
    }
    if let Some(b) = &report.budget {
        outln!(
            "token budget    at most {} tokens of '{}' and {} rows a batch",
            b.max_tokens,
            Untrusted(&b.column),
            report.batch_size
        )?;
    }
    outln!("ratio encrypted / plaintext twin: {:.3}", report.ratio)?;
    if let Some(c) = &report.cold {
        let reads: Vec<String> = c
            .raw_reads
            .iter()
            .map(|r| format!("{:.2}", r.gb_per_s))
            .collect();
        outln!(
            "cold: raw sequential read {:.2} GB/s ({:.1} MB; each run: {} GB/s)\n\
             cold: encrypted / raw read {:.3}, plaintext twin / raw read {:.3}\n\
             cold: {}",
            c.raw_read.gb_per_s,
            c.raw_read.bytes as f64 / 1e6,
            reads.join(", "),
            c.encrypted_vs_raw,
            c.twin_vs_raw,
            c.eviction
        )?;
    }
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
    if let Some(d) = &report.encrypted.read_ahead {
        outln!(
            "read ahead: {} windows, {} I/O threads",
            d.windows,
            d.io_threads
        )?;
    }
    if let Some(n) = &report.encrypted.network {
        outln!("{n}")?;
    }
    if let Some(n) = &report.network {
        outln!("all runs {n}")?;
    }
    for (name, r) in [
        ("encrypted", &report.encrypted),
        ("plaintext twin", &report.plaintext_twin),
    ] {
        if let Some(c) = &r.cache {
            outln!("{name:<15} cache: {c}")?;
        }
    }
    if let Some(d) = &report.encrypted.device {
        outln!("{d}")?;
    }
    if let Some(k) = kernels {
        print_kernel_figures(&report.backend, &k)?;
    }
    Ok(())
}

/// A GPU backend's kernel-only figures, one per line.
fn print_kernel_figures(backend: &str, kernels: &serde_json::Value) -> Result<()> {
    outln!("{backend} kernels alone (no loader around them):")?;
    for (name, value) in kernels.as_object().into_iter().flatten() {
        outln!("  {name:<28} {}", kernel_figure(value))?;
    }
    Ok(())
}

/// One kernel figure for the text report: numbers as they are, strings unquoted, anything
/// nested as compact JSON.
fn kernel_figure(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(x) if n.is_f64() => format!("{x:.2}"),
            _ => n.to_string(),
        },
        serde_json::Value::String(s) => Untrusted(s.as_str()).to_string(),
        other => other.to_string(),
    }
}

/// `--mode`: its choices, listed by `--help` and completed by the shell.
fn mode_arg() -> impl clap::builder::TypedValueParser<Value = pipeline::DecryptMode> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["chunk-open", "row-ctr"]).try_map(|s| parse_mode(&s))
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
    interrupt::catch()?;
    interrupt::remove_on_signal(dir.0.clone());
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
        shard_size: Some(4 << 20),
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
