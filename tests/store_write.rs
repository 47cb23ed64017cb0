//! Datasets written to object stores, against real servers started here on 127.0.0.1:
//! - s3s-fs (tests/s3_common): `convert --out s3://…` of an input large enough for several
//!   shards, each a multipart upload of several parts; `inspect`/`verify` by URL; every batch
//!   of the loader over the URL equal to a local conversion's of the same input (decrypted
//!   batches: data keys and nonces are random); a second conversion into the same folder, or
//!   into one holding a conversion's objects, refused; a conversion stopped midway (after a
//!   shard was complete and while the next was uploading) leaves no object behind.
//! - moto's S3 server (which, unlike s3s-fs, honours `If-Match` on PUT): `rekey` by URL, and a
//!   rekey whose keyring changed between its read and its write (another rekey ran
//!   meanwhile) refused, writing nothing, the other rekey's keyring kept.
//!
//! The process environment is set for the in-process parts, so everything is one test.
mod cli_common;
mod s3_common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use ciphershard::MasterKey;
use ciphershard::cipher::Backend;
use ciphershard::format::{ConvertInput, ConvertOptions};
use ciphershard::pipeline::{FormatSource, LoaderOptions};
use cli_common::{bytes, code, cs, keyed, npy_bytes, run, stderr, stdout};
use s3_common::{BUCKET, SECRET, Uploader, s3_env};

fn batches(src: Arc<FormatSource>) -> s3_common::Batches {
    let o = LoaderOptions {
        batch_size: 512,
        seed: 5,
        epochs: 1,
        threads: 2,
        ..Default::default()
    };
    s3_common::batches(src, &o)
}

/// An `.npy` file of `rows` rows of 64 f32 (256 bytes a row).
fn npy(dir: &Path, name: &str, rows: usize) -> PathBuf {
    let p = dir.join(name);
    let data = bytes(rows * 256, 9);
    std::fs::write(&p, npy_bytes("<f4", &format!("({rows}, 64)"), &data)).unwrap();
    p
}

fn keygen(path: &Path) -> MasterKey {
    let out = run(cs().args(["keygen", "--out"]).arg(path));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    MasterKey::from_source(path.to_str().unwrap()).unwrap()
}

fn with_env(c: &mut Command, env: &[(&'static str, String)]) {
    c.envs(env.iter().map(|(k, v)| (k, v)));
}

/// Sets the process environment for the in-process parts.
fn set_env(env: &[(&'static str, String)]) {
    for (k, v) in env {
        // SAFETY: this is the only test of this binary, and no thread of ours reads or writes
        // the environment while it is changed here (store clients read it when built).
        unsafe { std::env::set_var(k, v) };
    }
}

#[test]
fn datasets_written_to_object_stores() {
    let tmp = tempfile::tempdir().unwrap();
    let key_path = tmp.path().join("k.key");
    let key = keygen(&key_path);
    // 24 MiB in shards of 9 MiB: three shards, uploaded in 5 MiB parts (2 each).
    let input = npy(tmp.path(), "x.npy", 96 * 1024);
    if let Some(server) = s3_common::server_or_skip() {
        writes_to_s3s(&server, tmp.path(), &key_path, &key, &input);
    }
    if let Some(moto) = start_moto() {
        conditional_rekey(&moto, tmp.path(), &key_path);
    }
}

fn writes_to_s3s(
    server: &s3_common::Server,
    tmp: &Path,
    key_path: &Path,
    key: &MasterKey,
    input: &Path,
) {
    let up = Uploader::new(server);
    let mut env = s3_env(server, SECRET);
    env.push(("CIPHERSHARD_STORE_PART_SIZE", "5".into()));
    let url = format!("s3://{BUCKET}/ds/");
    let convert = |out: &str| {
        let mut c = keyed("convert", key_path);
        with_env(&mut c, &env);
        c.arg(input).args(["--shard-size", "9MiB", "--out", out]);
        run(&mut c)
    };
    let local = tmp.join("local");
    let out = convert(local.to_str().unwrap());
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = convert(&url);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        up.list("ds"),
        [
            "ds/keyring.json",
            "ds/manifest.json",
            "ds/shard-00000.safetensors",
            "ds/shard-00001.safetensors",
            "ds/shard-00002.safetensors"
        ]
    );

    // inspect and verify by URL.
    let mut c = cs();
    with_env(&mut c, &env);
    let out = run(c.args(["inspect", "--json", &url]));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["rows"], 96 * 1024);
    assert_eq!(report["shards"].as_array().unwrap().len(), 3, "{report}");
    let mut c = keyed("verify", key_path);
    with_env(&mut c, &env);
    let out = run(c.args(["--backend", "cpu", &url]));
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    // decrypt takes a shard URL; its plaintext equals the local conversion's shard's.
    let decrypt = |shard: &str, out: &Path| {
        let mut c = keyed("decrypt", key_path);
        with_env(&mut c, &env);
        run(c.arg(shard).arg("--out").arg(out))
    };
    let (from_url, from_local) = (tmp.join("url.safetensors"), tmp.join("local.safetensors"));
    let out = decrypt(&format!("{url}shard-00001.safetensors"), &from_url);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let local_shard = local.join("shard-00001.safetensors");
    let out = decrypt(local_shard.to_str().unwrap(), &from_local);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(std::fs::read(&from_url).unwrap() == std::fs::read(&from_local).unwrap());
    // --out naming an object rather than a folder is refused, nothing written.
    let out = convert(&format!("s3://{BUCKET}/obj/manifest.json"));
    assert_ne!(code(&out), 0);
    assert!(
        stderr(&out).contains("name the dataset's folder"),
        "{}",
        stderr(&out)
    );
    assert!(up.list("obj").is_empty());

    // A second conversion into the same folder is refused, and the dataset is untouched.
    let out = convert(&url);
    assert_ne!(code(&out), 0);
    assert!(
        stderr(&out).contains("already holds a dataset"),
        "{}",
        stderr(&out)
    );
    assert_eq!(up.list("ds").len(), 5);
    // So is one into a folder holding a conversion's objects but no manifest.
    up.put(
        "other/shard-00000.safetensors",
        b"not mine to replace".to_vec(),
    );
    let out = convert(&format!("s3://{BUCKET}/other/"));
    assert_ne!(code(&out), 0);
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert_eq!(up.list("other"), ["other/shard-00000.safetensors"]);

    // Every batch over the URL equals the local conversion's.
    set_env(&env);
    let want = batches(FormatSource::open(&local, key, Backend::Cpu).unwrap());
    let got = batches(FormatSource::open(Path::new(&url), key, Backend::Cpu).unwrap());
    assert_eq!(want.len(), 96 * 1024 / 512);
    assert!(
        got == want,
        "batches over s3:// differ from the local conversion's"
    );

    // Stopped midway: after shard 0 is complete and while shard 1 is uploading (parts sent).
    let cut = format!("s3://{BUCKET}/cut/");
    let opts = ConvertOptions {
        shard_size: Some(9 << 20),
        keys: vec![key.clone()],
        ..Default::default()
    };
    let done = std::cell::Cell::new(0u64);
    let e = ciphershard::format::convert_with(
        &[ConvertInput::from_path(input, &[])],
        Path::new(&cut),
        &opts,
        false,
        &mut |d, _| done.set(d),
        &mut || {
            if done.get() > 15 << 20 {
                assert!(
                    !up.list("cut").is_empty(),
                    "shard 0 is complete by now ({} bytes written)",
                    done.get()
                );
                Err(ciphershard::Error::Stopped("stopped by the test".into()))
            } else {
                Ok(())
            }
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("stopped by the test"), "{e}");
    assert_eq!(up.list("cut"), Vec::<String>::new(), "left behind: {e}");
    let mut c = cs();
    with_env(&mut c, &env);
    let out = run(c.args(["inspect", &cut]));
    assert_ne!(code(&out), 0);
    assert!(
        stderr(&out).contains("not a ciphershard dataset"),
        "{}",
        stderr(&out)
    );
}

/// moto's S3 server, run by Python on a free port of 127.0.0.1, with bucket `data`.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const MOTO_INSTALL: &str = "pip install 'moto[server]' (scripts/test.sh does this in its venv and \
                            sets CIPHERSHARD_MOTO_PYTHON), or set CIPHERSHARD_MOTO_PYTHON to a \
                            Python that has it";

fn start_moto() -> Option<Moto> {
    let py = std::env::var("CIPHERSHARD_MOTO_PYTHON").unwrap_or_else(|_| "python3".into());
    let importable = Command::new(&py)
        .args(["-c", "import moto.server, boto3"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !importable {
        if std::env::var("CIPHERSHARD_SKIP_S3").is_ok_and(|v| v == "1") {
            eprintln!(
                "SKIPPED: moto is not importable by {py} (CIPHERSHARD_SKIP_S3=1); {MOTO_INSTALL}"
            );
            return None;
        }
        panic!(
            "the conditional-write test needs moto's S3 server, not importable by {py}: \
             {MOTO_INSTALL}; or set CIPHERSHARD_SKIP_S3=1 to skip it"
        );
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let script = format!(
        "import sys, boto3\n\
         from moto.server import ThreadedMotoServer\n\
         s = ThreadedMotoServer(ip_address='127.0.0.1', port={port})\n\
         s.start()\n\
         boto3.client('s3', endpoint_url='{endpoint}', aws_access_key_id='moto', \
         aws_secret_access_key='moto-secret', region_name='us-east-1').create_bucket(Bucket='{BUCKET}')\n\
         print('ready', flush=True)\n\
         sys.stdin.read()\n\
         s.stop()\n"
    );
    let mut child = Command::new(&py)
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // moto announces itself on standard output too: wait for our line.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.trim() == "ready")),
        "moto did not start"
    );
    Some(Moto { child, endpoint })
}

fn conditional_rekey(moto: &Moto, tmp: &Path, k1_path: &Path) {
    let env: Vec<(&'static str, String)> = vec![
        ("AWS_ACCESS_KEY_ID", "moto".into()),
        ("AWS_SECRET_ACCESS_KEY", "moto-secret".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ENDPOINT_URL", moto.endpoint.clone()),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("CIPHERSHARD_STORE_RETRIES", "1".into()),
    ];
    let url = format!("s3://{BUCKET}/rk/");
    let small = npy(tmp, "small.npy", 1000);
    let mut c = keyed("convert", k1_path);
    with_env(&mut c, &env);
    let out = run(c.arg(&small).args(["--out", &url]));
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    let path = |n: &str| tmp.join(format!("{n}.key"));
    let k2 = keygen(&path("k2"));
    let k3 = keygen(&path("k3"));
    let k4 = keygen(&path("k4"));
    let rekey = |old: &Path, new: &Path| {
        let mut c = keyed("rekey", old);
        with_env(&mut c, &env);
        run(c.arg("--new-key").arg(new).arg(&url))
    };
    let out = rekey(k1_path, &path("k2"));
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    // k2 → k3 here, while another rekey (k2 → k4) completes between this one's read of the
    // keyring and its write: this one is refused and writes nothing.
    set_env(&env);
    let e = ciphershard::format::rekey_with(Path::new(&url), &k2, &k3, &mut || {
        let out = rekey(&path("k2"), &path("k4"));
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        Ok(())
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("changed since it was read") && e.contains("again"),
        "{e}"
    );
    assert!(e.contains(&format!("{url}keyring.json")), "{e}");
    assert!(!e.contains("moto-secret"), "{e}");
    let opens = |k: &MasterKey| {
        ciphershard::format::Dataset::open(Path::new(&url))
            .unwrap()
            .unlock(k, &ciphershard::cipher::cpu::CpuCipher::new())
            .is_ok()
    };
    assert!(opens(&k4), "the concurrent rekey's keyring was lost");
    assert!(!opens(&k3) && !opens(&k2));
    // Without a race the same call succeeds.
    ciphershard::format::rekey_with(Path::new(&url), &k4, &k3, &mut || Ok(())).unwrap();
    assert!(opens(&k3) && !opens(&k4));
}
