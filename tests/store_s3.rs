//! Datasets read from a real S3-compatible server (s3s-fs, started here on 127.0.0.1 with an
//! access key and secret, so signatures are really checked): `inspect` and `verify` by URL,
//! the host loader's batches over the URL equal to the local files' (same seed), a shard
//! replaced after open, a missing shard and a wrong secret each an error naming the object's
//! URL and never the secret. Nothing is mocked at the HTTP layer.
//!
//! The server is the `s3s-fs` binary (crates.io), found at `$CIPHERSHARD_S3S_FS`, else
//! `TARGET/s3s-fs/bin/s3s-fs` (where scripts/test.sh installs it), else on `PATH`. Without it
//! the test fails saying how to install it, unless `CIPHERSHARD_SKIP_S3=1`.
mod cli_common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ciphershard::MasterKey;
use ciphershard::cipher::Backend;
use ciphershard::pipeline::{FormatSource, Loader, LoaderOptions, RowSource};
use cli_common::{code, cs, keyed, run, stderr, stdout};
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;

const ACCESS: &str = "ciphershard-test";
const SECRET: &str = "s3cr3t-d0-not-print-me";
const BUCKET: &str = "data";
const INSTALL: &str = "CARGO_TARGET_DIR=/tmp/s3s-build cargo install s3s-fs@0.14.1 \
                       --features binary --locked --root TARGET/s3s-fs (scripts/test.sh does \
                       this), or set CIPHERSHARD_S3S_FS=/path/to/s3s-fs";

fn server_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CIPHERSHARD_S3S_FS") {
        return Some(PathBuf::from(p));
    }
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent()?;
    let local = target.join("s3s-fs/bin/s3s-fs");
    if local.is_file() {
        return Some(local);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("s3s-fs"))
            .find(|p| p.is_file())
    })
}

/// The server, killed when dropped.
struct Server {
    child: Child,
    endpoint: String,
    _root: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(bin: &Path) -> Server {
    let root = tempfile::tempdir().unwrap();
    // s3s-fs keeps each bucket as a directory of its root.
    std::fs::create_dir(root.path().join(BUCKET)).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(bin)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", ACCESS, "--secret-key", SECRET])
        .arg(root.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    let server = Server {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
        _root: root,
    };
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "s3s-fs did not listen on port {port} within 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

/// The store's environment for a client of `server` (with `secret` as the secret key).
fn s3_env(server: &Server, secret: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", ACCESS.into()),
        ("AWS_SECRET_ACCESS_KEY", secret.into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ENDPOINT_URL", server.endpoint.clone()),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("CIPHERSHARD_STORE_RETRIES", "1".into()),
    ]
}

/// A client of our own, for uploading and replacing objects.
struct Uploader {
    store: object_store::aws::AmazonS3,
    rt: tokio::runtime::Runtime,
}

impl Uploader {
    fn new(server: &Server) -> Self {
        let store = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(BUCKET)
            .with_access_key_id(ACCESS)
            .with_secret_access_key(SECRET)
            .with_region("us-east-1")
            .with_endpoint(&server.endpoint)
            .with_allow_http(true)
            .build()
            .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        Uploader { store, rt }
    }

    fn put(&self, key: &str, bytes: Vec<u8>) {
        self.rt
            .block_on(self.store.put(&ObjectPath::from(key), bytes.into()))
            .unwrap();
    }

    fn delete(&self, key: &str) {
        self.rt
            .block_on(self.store.delete(&ObjectPath::from(key)))
            .unwrap();
    }

    /// Every file of the local dataset `dir` under `prefix/`.
    fn upload_dir(&self, dir: &Path, prefix: &str) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            self.put(
                &format!("{prefix}/{name}"),
                std::fs::read(e.path()).unwrap(),
            );
        }
    }
}

type Batches = Vec<(Vec<u64>, Vec<Vec<u8>>)>;

fn batches(src: Arc<FormatSource>) -> Batches {
    let o = LoaderOptions {
        batch_size: 16,
        seed: 11,
        epochs: 2,
        threads: 3,
        ..Default::default()
    };
    let src: Arc<dyn RowSource> = src;
    Loader::new(src, &o)
        .unwrap()
        .map(|b| {
            let b = b.unwrap();
            (
                b.row_ids().to_vec(),
                b.tensors().map(|t| t.bytes.to_vec()).collect(),
            )
        })
        .collect()
}

#[test]
fn datasets_read_from_a_real_s3_server() {
    let Some(bin) = server_binary() else {
        if std::env::var("CIPHERSHARD_SKIP_S3").is_ok_and(|v| v == "1") {
            eprintln!("SKIPPED: no s3s-fs server (CIPHERSHARD_SKIP_S3=1); install: {INSTALL}");
            return;
        }
        panic!(
            "the S3 tests need the s3s-fs server: {INSTALL}; or set CIPHERSHARD_SKIP_S3=1 to \
             skip them"
        );
    };
    let server = start_server(&bin);
    let up = Uploader::new(&server);
    // Several shards, small chunks: the loader's reads are many ranged GETs.
    let fx = cli_common::dataset_with(600, 512, 4000, "x", std::collections::BTreeMap::new());
    up.upload_dir(&fx.ds, "ds");
    let url = format!("s3://{BUCKET}/ds/");
    let env = s3_env(&server, SECRET);

    // inspect and verify by URL.
    let mut c = cs();
    c.envs(env.iter().map(|(k, v)| (k, v)))
        .args(["inspect", "--json", &url]);
    let out = run(&mut c);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["dataset"], url.as_str());
    assert_eq!(report["rows"], 600);
    let shard_count = report["shards"].as_array().unwrap().len();
    assert!(shard_count >= 3, "{report}");
    let mut c = keyed("verify", &fx.key);
    c.envs(env.iter().map(|(k, v)| (k, v)))
        .args(["--backend", "cpu", &url]);
    let out = run(&mut c);
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    // The in-process loader reads the same variables.
    // SAFETY: this is the only test of this binary, and no thread of ours reads or writes the
    // environment while it is changed here (the store threads start later).
    for (k, v) in &env {
        unsafe { std::env::set_var(k, v) };
    }
    let key = MasterKey::from_bytes([7; 32]);
    let local = FormatSource::open(&fx.ds, &key, Backend::Cpu).unwrap();
    let remote = FormatSource::open(Path::new(&url), &key, Backend::Cpu).unwrap();
    let want = batches(local);
    assert_eq!(want.len(), 2 * 600usize.div_ceil(16));
    assert_eq!(batches(remote.clone()), want, "batches over s3:// differ");

    // A shard replaced after open: an error naming it, never its bytes.
    let shard1 = ciphershard::format::shard_file_name(1);
    let mut bytes = std::fs::read(fx.ds.join(&shard1)).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    up.put(&format!("ds/{shard1}"), bytes);
    let mut buf = vec![0u8; 64];
    let e = remote
        .store()
        .read_at(1, 0, &mut buf)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("{url}{shard1}")), "{e}");
    assert!(e.contains("replaced"), "{e}");
    let e = remote.store().check_unchanged(1).unwrap_err().to_string();
    assert!(e.contains("replaced"), "{e}");
    let src: Arc<dyn RowSource> = remote;
    let err = match Loader::new(src, &LoaderOptions::default()) {
        Err(e) => e.to_string(),
        Ok(l) => l
            .filter_map(|b| b.err())
            .next()
            .expect("a batch fails")
            .to_string(),
    };
    assert!(err.contains(&shard1) && err.contains("replaced"), "{err}");

    // A missing shard: opening says which object is missing.
    up.upload_dir(&fx.ds, "gap");
    up.delete(&format!("gap/{shard1}"));
    let mut c = cs();
    c.envs(env.iter().map(|(k, v)| (k, v)))
        .args(["inspect", &format!("s3://{BUCKET}/gap/")]);
    let out = run(&mut c);
    let err = stderr(&out);
    assert_ne!(code(&out), 0);
    assert!(
        err.contains(&format!("s3://{BUCKET}/gap/{shard1}")),
        "{err}"
    );
    assert!(err.contains("no such object"), "{err}");

    // No dataset there at all.
    let mut c = cs();
    c.envs(env.iter().map(|(k, v)| (k, v)))
        .args(["inspect", &format!("s3://{BUCKET}/nothing/")]);
    let out = run(&mut c);
    assert_ne!(code(&out), 0);
    assert!(
        stderr(&out).contains("not a ciphershard dataset"),
        "{}",
        stderr(&out)
    );

    // A wrong secret: refused, the URL named, the secret never printed.
    let wrong = "wr0ng-s3cr3t-never-printed";
    let mut c = keyed("verify", &fx.key);
    c.envs(s3_env(&server, wrong).iter().map(|(k, v)| (k, v)))
        .args(["--backend", "cpu", &format!("s3://{BUCKET}/gap/")]);
    let out = run(&mut c);
    let err = stderr(&out);
    assert_ne!(code(&out), 0);
    assert!(err.contains(&format!("s3://{BUCKET}/gap/")), "{err}");
    assert!(err.contains("credentials"), "{err}");
    assert!(!err.contains(wrong) && !err.contains(SECRET), "{err}");
}
