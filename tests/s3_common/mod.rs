//! A real S3-compatible server for the object-store tests: s3s-fs (crates.io) started on
//! 127.0.0.1 with an access key and a secret, so requests are really signed and checked, and a
//! client of our own for uploading, replacing and deleting objects behind the loader's back.
//!
//! The server is the `s3s-fs` binary, found at `$CIPHERSHARD_S3S_FS`, else
//! `TARGET/s3s-fs/bin/s3s-fs` (where scripts/test.sh installs it), else on `PATH`.
#![allow(dead_code)]

pub mod proxy;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;

pub const ACCESS: &str = "ciphershard-test";
pub const SECRET: &str = "s3cr3t-d0-not-print-me";
pub const BUCKET: &str = "data";
pub const INSTALL: &str = "CARGO_TARGET_DIR=/tmp/s3s-build cargo install s3s-fs@0.14.1 \
                       --features binary --locked --root TARGET/s3s-fs (scripts/test.sh does \
                       this), or set CIPHERSHARD_S3S_FS=/path/to/s3s-fs";

pub fn server_binary() -> Option<PathBuf> {
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
pub struct Server {
    child: Child,
    pub endpoint: String,
    _root: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start_server(bin: &Path) -> Server {
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
pub fn s3_env(server: &Server, secret: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", ACCESS.into()),
        ("AWS_SECRET_ACCESS_KEY", secret.into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ENDPOINT_URL", server.endpoint.clone()),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("CIPHERSHARD_STORE_RETRIES", "1".into()),
    ]
}

/// The same settings as [`s3_env`], as options for an in-process open.
pub fn open_options(server: &Server, secret: &str) -> ciphershard::store::OpenOptions {
    s3_env(server, secret)
        .into_iter()
        .filter(|(k, _)| k.starts_with("AWS_"))
        .fold(ciphershard::store::OpenOptions::new(), |o, (k, v)| {
            o.storage(k.to_ascii_lowercase(), v)
        })
}

/// A client of our own, for uploading and replacing objects.
pub struct Uploader {
    store: object_store::aws::AmazonS3,
    rt: tokio::runtime::Runtime,
}

impl Uploader {
    pub fn new(server: &Server) -> Self {
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

    pub fn put(&self, key: &str, bytes: Vec<u8>) {
        self.rt
            .block_on(self.store.put(&ObjectPath::from(key), bytes.into()))
            .unwrap();
    }

    pub fn delete(&self, key: &str) {
        self.rt
            .block_on(self.store.delete(&ObjectPath::from(key)))
            .unwrap();
    }

    /// The keys of every object under `prefix/`, sorted.
    pub fn list(&self, prefix: &str) -> Vec<String> {
        use futures_util::TryStreamExt;
        use object_store::ObjectStore;
        let p = ObjectPath::from(prefix);
        let mut keys: Vec<String> = self
            .rt
            .block_on(self.store.list(Some(&p)).try_collect::<Vec<_>>())
            .unwrap()
            .into_iter()
            .map(|m| m.location.to_string())
            .collect();
        keys.sort();
        keys
    }

    /// Every file of the local dataset `dir` under `prefix/`.
    pub fn upload_dir(&self, dir: &Path, prefix: &str) {
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

/// The running server, or `None` (after saying so) when it is not installed and
/// `CIPHERSHARD_SKIP_S3=1`; without either, a failure saying how to install it.
pub fn server_or_skip() -> Option<Server> {
    let Some(bin) = server_binary() else {
        if std::env::var("CIPHERSHARD_SKIP_S3").is_ok_and(|v| v == "1") {
            eprintln!("SKIPPED: no s3s-fs server (CIPHERSHARD_SKIP_S3=1); install: {INSTALL}");
            return None;
        }
        panic!(
            "the S3 tests need the s3s-fs server: {INSTALL}; or set CIPHERSHARD_SKIP_S3=1 to \
             skip them"
        );
    };
    Some(start_server(&bin))
}

/// Every batch of a host loader over `src` with options `o`: row ids and each tensor's bytes.
pub type Batches = Vec<(Vec<u64>, Vec<Vec<u8>>)>;

pub fn batches(
    src: std::sync::Arc<ciphershard::pipeline::FormatSource>,
    o: &ciphershard::pipeline::LoaderOptions,
) -> Batches {
    let src: std::sync::Arc<dyn ciphershard::pipeline::RowSource> = src;
    ciphershard::pipeline::Loader::new(src, o)
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
