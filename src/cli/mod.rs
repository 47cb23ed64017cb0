//! Command-line interface: argument parsing, key sources, progress bars and summaries.

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use ciphershard::cipher::Backend;
use ciphershard::error::{Error, Result};
use ciphershard::keys::MasterKey;

#[macro_use]
mod output;
mod commands;
mod exit;
mod generate;
mod interrupt;

/// Encrypted safetensors shards and a GPU-accelerated decrypting data loader.
#[derive(Parser, Debug)]
#[command(name = "ciphershard", version, about, long_about = None, after_help = exit::HELP)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where a master key comes from. Never the key itself: a path, `-` (standard input), or
/// `env:VAR` (the file named by the environment variable VAR).
#[derive(clap::Args, Debug, Clone)]
pub struct KeyArgs {
    /// Master key: a key file path, `-` for standard input, or `env:VAR` for the file named by
    /// $VAR. Defaults to the file named by $CIPHERSHARD_KEY_FILE. Repeatable where allowed.
    #[arg(long = "key", value_name = "KEY_SOURCE")]
    pub key: Vec<String>,
}

impl KeyArgs {
    /// Loads every key given (or the default from $CIPHERSHARD_KEY_FILE).
    pub fn load_all(&self) -> Result<Vec<MasterKey>> {
        if self.key.is_empty() {
            if std::env::var_os("CIPHERSHARD_KEY_FILE").is_some() {
                return Ok(vec![MasterKey::from_env_file("CIPHERSHARD_KEY_FILE")?]);
            }
            return Err(Error::Key(
                "no key given: use --key FILE (or --key - for stdin, --key env:VAR, or set CIPHERSHARD_KEY_FILE)".into(),
            ));
        }
        if self.key.iter().filter(|k| k.as_str() == "-").count() > 1 {
            return Err(Error::Key("standard input can supply only one key".into()));
        }
        self.key.iter().map(|s| MasterKey::from_source(s)).collect()
    }

    /// Loads exactly one key.
    pub fn load_one(&self) -> Result<MasterKey> {
        let mut keys = self.load_all()?;
        if keys.len() != 1 {
            return Err(Error::Key("this command takes exactly one --key".into()));
        }
        Ok(keys.remove(0))
    }
}

/// The local ciphertext cache, for datasets in object storage (docs/STORAGE.md).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CacheArgs {
    /// Keep the shard bytes fetched from an object store (ciphertext, never plaintext) in this
    /// folder (created 0700), so later runs read them from local disk; least recently used
    /// first out. Object-store URLs only [default: $CIPHERSHARD_CACHE_DIR, else no cache].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Most bytes the cache may hold: a number of bytes or 512M, 20G, 1T (powers of 1024)
    /// [default: $CIPHERSHARD_CACHE_SIZE, else 10G].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub cache_size: Option<u64>,
    /// Read without the cache, even if $CIPHERSHARD_CACHE_DIR is set.
    #[arg(long, conflicts_with_all = ["cache_dir", "cache_size"])]
    pub no_cache: bool,
}

impl CacheArgs {
    /// The open options these flags ask for; with none given, the library reads the
    /// environment's cache settings itself.
    pub fn open_options(&self) -> Result<ciphershard::store::OpenOptions> {
        let opts = ciphershard::store::OpenOptions::new();
        if self.no_cache {
            return Ok(opts.no_cache());
        }
        opts.cache_over_env(self.cache_dir.clone(), self.cache_size)
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate a fresh 256-bit master key into a new file (mode 0600).
    Keygen {
        /// The key file to create (must not exist), or `-` for standard output (to pipe into a
        /// secret store; never a terminal); a file named `-` is `./-`.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// Print the key id of each master key given (never the key): the id `inspect` lists as
    /// opening a dataset and wrong-key errors name.
    KeyId {
        /// Key sources: a key file path, `-` for standard input, or `env:VAR` for the file named
        /// by $VAR.
        #[arg(required = true, value_name = "KEY_SOURCE")]
        keys: Vec<String>,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// Convert safetensors / .npy files into an encrypted dataset.
    Convert(commands::ConvertArgs),
    /// Show a shard's or dataset's header, tensors, key ids and chunk layout (no key needed).
    ///
    /// Ranges are half-open, as in Rust: `rows 0..10000` are rows 0 to 9999, `chunks 3..5`
    /// chunks 3 and 4.
    Inspect {
        /// A dataset directory or a shard file.
        path: PathBuf,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// Check every authentication tag of a dataset (several --key: opens with whichever the
    /// keyring lists).
    Verify {
        #[command(flatten)]
        key: KeyArgs,
        /// Dataset directory.
        dataset: PathBuf,
        #[arg(long, default_value = "auto", value_parser = backend_arg(), help = BACKEND_HELP)]
        backend: Backend,
        #[command(flatten)]
        cache: CacheArgs,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// Rotate a master key: re-wrap the data keys under --new-key and drop --key's; every
    /// other key keeps opening the dataset, a new key already there is not listed twice; no
    /// tensor byte is rewritten.
    ///
    /// In an object store the keyring is replaced only if it is still the version read (a
    /// conditional write on its ETag): of two concurrent rekeys, the second fails, writing
    /// nothing, and asks to be run again.
    Rekey {
        #[command(flatten)]
        key: KeyArgs,
        /// The new master key (same sources as --key).
        #[arg(long = "new-key", value_name = "KEY_SOURCE")]
        new_key: String,
        /// Dataset directory, or its object store folder URL (`s3://bucket/prefix/`, …).
        dataset: PathBuf,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// Export one shard as a plaintext safetensors file (explicit: writes plaintext to disk).
    Decrypt {
        #[command(flatten)]
        key: KeyArgs,
        /// The shard file (its directory holds manifest.json and keyring.json).
        shard: PathBuf,
        /// The plaintext safetensors file to write, or `-` for standard output (never a
        /// terminal; messages then go to standard error); a file named `-` is `./-`.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "auto", value_parser = backend_arg(), help = BACKEND_HELP)]
        backend: Backend,
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// Generate a small synthetic dataset, convert, verify and load it back; print timings.
    Demo {
        /// Rows in the synthetic dataset.
        #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1..))]
        rows: u64,
        #[arg(long, default_value = "auto", value_parser = backend_arg(), help = BACKEND_HELP)]
        backend: Backend,
    },
    /// Benchmark the loader (encrypted vs a plaintext twin) or, with --cipher, the raw cipher.
    ///
    /// The plaintext twin is the same run with verification and decryption left out: the same
    /// shard files, sampler, reads, pools and row copies, so the ratio encrypted / twin is what
    /// authenticated decryption costs. Without a dataset, a synthetic one is generated (and
    /// removed) in the temporary directory. Rates are decimal: 1 GB/s = 10^9 bytes per second.
    Bench(commands::BenchArgs),
    /// List the cipher backends available here and, for the others, why not.
    Backends {
        #[command(flatten)]
        output: output::OutputArgs,
    },
    /// Print a shell completion script (e.g. `ciphershard completions bash >
    /// /etc/bash_completion.d/ciphershard`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), of the tool or of one subcommand (`ciphershard man convert >
    /// ciphershard-convert.1`).
    Man {
        /// A subcommand whose page to print instead.
        subcommand: Option<String>,
    },
}

/// `--backend`'s help (the choices and the default are listed by clap).
pub const BACKEND_HELP: &str = "Cipher backend: auto picks CUDA, then a real wgpu adapter, then \
the CPU (`ciphershard backends` says why); an explicit backend that is unavailable is an error";

/// `--backend`: the choices, listed by `--help` and completed by the shell, parsed into a
/// [`Backend`].
pub fn backend_arg() -> impl clap::builder::TypedValueParser<Value = Backend> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["auto", "cpu", "cuda", "wgpu"])
        .try_map(|s| s.parse::<Backend>())
}

impl Command {
    /// How the command reports, for those that report something.
    fn output(&self) -> Option<output::OutputArgs> {
        match self {
            Command::Keygen { output, .. }
            | Command::KeyId { output, .. }
            | Command::Inspect { output, .. }
            | Command::Verify { output, .. }
            | Command::Rekey { output, .. }
            | Command::Decrypt { output, .. }
            | Command::Backends { output } => Some(*output),
            Command::Convert(args) => Some(args.output),
            Command::Bench(args) => Some(args.output),
            Command::Demo { .. } | Command::Completions { .. } | Command::Man { .. } => None,
        }
    }

    /// Why the command line, parsed, is still refused (an option that does not apply with the
    /// others given), and by which subcommand: a usage error, as clap's own.
    fn refusal(&self) -> Option<(&'static str, String)> {
        let stdin_twice = |sources: &[String]| {
            (sources.iter().filter(|k| k.as_str() == "-").count() > 1)
                .then(|| "standard input (-) can supply only one key".to_string())
        };
        let json_to_stdout = |out: &Path, output: &output::OutputArgs, what: &str| {
            (out.as_os_str() == "-" && output.json).then(|| {
                format!("--json does not apply with --out -: standard output carries the {what}")
            })
        };
        match self {
            Command::Bench(args) => args.refusal().map(|why| ("bench", why)),
            Command::Convert(args) => args.refusal().map(|why| ("convert", why)),
            Command::Keygen { out, output } => {
                json_to_stdout(out, output, "key").map(|why| ("keygen", why))
            }
            Command::Decrypt {
                out, output, key, ..
            } => json_to_stdout(out, output, "plaintext")
                .or_else(|| stdin_twice(&key.key))
                .map(|why| ("decrypt", why)),
            Command::Verify { key, .. } => stdin_twice(&key.key).map(|why| ("verify", why)),
            Command::KeyId { keys, .. } => stdin_twice(keys).map(|why| ("key-id", why)),
            Command::Rekey { key, .. } => (key.key.len() > 1)
                .then(|| "rekey takes one --key: the key whose wraps it replaces".to_string())
                .map(|why| ("rekey", why)),
            Command::Man {
                subcommand: Some(name),
            } => generate::unknown_subcommand(name).map(|why| ("man", why)),
            _ => None,
        }
    }

    /// The dataset directory the command reads, if any: errors about its own files are
    /// tampering (see [`exit::code`]).
    fn dataset_dir(&self) -> Option<PathBuf> {
        match self {
            Command::Inspect { path, .. }
            | Command::Decrypt { shard: path, .. }
            | Command::Verify { dataset: path, .. }
            | Command::Rekey { dataset: path, .. } => {
                exit::dataset_dir(path).map(Path::to_path_buf)
            }
            Command::Bench(args) => args
                .dataset()
                .and_then(exit::dataset_dir)
                .map(Path::to_path_buf),
            Command::Keygen { .. }
            | Command::KeyId { .. }
            | Command::Convert(_)
            | Command::Demo { .. } => None,
            Command::Backends { .. } | Command::Completions { .. } | Command::Man { .. } => None,
        }
    }
}

/// Entry point: parses the command line, runs the command, prints an error in one line and
/// maps it to an exit status (the table in [`exit`], shown by `--help`).
pub fn main() -> ExitCode {
    let parsed = Cli::try_parse().and_then(|cli| match cli.command.refusal() {
        None => Ok(cli),
        Some((sub, why)) => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            cmd.build();
            let sub = cmd.find_subcommand_mut(sub).expect("a subcommand");
            Err(sub.error(clap::error::ErrorKind::ArgumentConflict, why))
        }
    });
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version: to standard output; a closed pipe is no error.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap repeats what was typed: a key pasted in the wrong place must not be.
            let text = e.render().to_string();
            let _ = write!(
                std::io::stderr(),
                "{}",
                ciphershard::keys::redact_keys(&text)
            );
            return ExitCode::from(exit::USAGE);
        }
    };
    let dataset = cli.command.dataset_dir();
    output::set_quiet(cli.command.output().is_some_and(|o| o.quiet));
    let result = run(cli).and_then(|()| output::flush());
    let Err(e) = result else {
        return ExitCode::SUCCESS;
    };
    if output::is_closed_pipe(&e) {
        return ExitCode::from(exit::OK);
    }
    let _ = writeln!(std::io::stderr(), "error: {e}");
    ExitCode::from(exit::code(&e, dataset.as_deref()))
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keygen { out, output } => commands::keygen(&out, output),
        Command::KeyId { keys, output } => commands::key_id(&keys, output),
        Command::Convert(args) => commands::convert(args),
        Command::Inspect { path, output } => commands::inspect(&path, output),
        Command::Verify {
            key,
            dataset,
            backend,
            cache,
            output,
        } => commands::verify(&key, &dataset, backend, &cache, output),
        Command::Rekey {
            key,
            new_key,
            dataset,
            output,
        } => commands::rekey(&key, &new_key, &dataset, output),
        Command::Decrypt {
            key,
            shard,
            out,
            backend,
            output,
        } => commands::decrypt(&key, &shard, &out, backend, output),
        Command::Demo { rows, backend } => commands::demo(rows, backend),
        Command::Bench(args) => commands::bench(args),
        Command::Completions { shell } => generate::completions(shell),
        Command::Man { subcommand } => generate::man(subcommand.as_deref()),
        Command::Backends { output } => commands::backends(output),
    }
}

/// A progress bar on stderr showing bytes, rate and ETA (hidden when stderr is not a terminal).
/// Decimal units (MB, MB/s), as the summaries print.
pub fn byte_progress(total: u64, what: &str) -> ProgressBar {
    let target = if output::quiet() {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr_with_hz(8)
    };
    let pb = ProgressBar::with_draw_target(Some(total), target);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Parses a size such as `1GiB`, `2MiB`, `512k`, `4096` (the library's, so every size option
/// and setting reads units alike).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    ciphershard::store::parse_size(s)
}

/// `--shard-size`: a size of at least one byte.
pub fn parse_positive_size(s: &str) -> std::result::Result<u64, String> {
    match parse_size(s)? {
        0 => Err("must be at least 1 byte".into()),
        n => Ok(n),
    }
}

/// `--chunk-size`: a multiple of 64 bytes, at most [`format::MAX_CHUNK_SIZE`].
pub fn parse_chunk_size(s: &str) -> std::result::Result<u64, String> {
    let n = parse_size(s)?;
    let max = ciphershard::format::MAX_CHUNK_SIZE;
    if n == 0 || !n.is_multiple_of(64) || n > max {
        return Err(format!(
            "the chunk size must be a multiple of 64 bytes between 64 and {} MiB, not {n}",
            max >> 20
        ));
    }
    Ok(n)
}

/// Formats a throughput in decimal units (as throughput is usually quoted): GB/s or MB/s.
pub fn rate(bytes: u64, d: Duration) -> String {
    let bps = bytes as f64 / d.as_secs_f64().max(1e-9);
    if bps >= 1e9 {
        format!("{:.2} GB/s", bps / 1e9)
    } else {
        format!("{:.1} MB/s", bps / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2MiB").unwrap(), 2 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1gb").unwrap(), 1_000_000_000);
        assert!(parse_size("abc").is_err());
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("99999999999999999999T").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
