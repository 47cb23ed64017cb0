//! Datasets read from a real S3-compatible server (s3s-fs, started here on 127.0.0.1 with an
//! access key and secret, so signatures are really checked): `inspect` and `verify` by URL,
//! the host loader's batches over the URL equal to the local files' (same seed), a shard
//! replaced after open, a missing shard and a wrong secret each an error naming the object's
//! URL and never the secret. Nothing is mocked at the HTTP layer.
//!
//! The server and the uploading client are in tests/s3_common.
mod cli_common;
mod s3_common;

use std::path::Path;
use std::sync::Arc;

use ciphershard::MasterKey;
use ciphershard::cipher::Backend;
use ciphershard::pipeline::{FormatSource, Loader, LoaderOptions, RowSource};
use cli_common::{code, cs, keyed, run, stderr, stdout};
use s3_common::{BUCKET, SECRET, Uploader, s3_env};

fn batches(src: Arc<FormatSource>) -> s3_common::Batches {
    let o = LoaderOptions {
        batch_size: 16,
        seed: 11,
        epochs: 2,
        threads: 3,
        ..Default::default()
    };
    s3_common::batches(src, &o)
}

#[test]
fn datasets_read_from_a_real_s3_server() {
    let Some(server) = s3_common::server_or_skip() else {
        return;
    };
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

    // The in-process loader takes the same settings as options (no environment needed).
    let opts = s3_common::open_options(&server, SECRET);
    let key = MasterKey::from_bytes([7; 32]);
    let local = FormatSource::open(&fx.ds, &key, Backend::Cpu).unwrap();
    let remote = FormatSource::open_with(Path::new(&url), &opts, &key, Backend::Cpu).unwrap();
    // Options for a local path are refused, not ignored.
    let e = FormatSource::open_with(&fx.ds, &opts, &key, Backend::Cpu).unwrap_err();
    assert!(e.to_string().contains("storage options"), "{e}");
    assert!(!format!("{opts:?}").contains(SECRET));
    // A misspelt option is refused naming it.
    let typo = ciphershard::store::OpenOptions::new().storage("aws_endpont", "x");
    let e = FormatSource::open_with(Path::new(&url), &typo, &key, Backend::Cpu).unwrap_err();
    assert!(e.to_string().contains("aws_endpont"), "{e}");
    let want = batches(local.clone());
    assert_eq!(want.len(), 2 * 600usize.div_ceil(16));
    assert_eq!(batches(remote.clone()), want, "batches over s3:// differ");
    // A far store is read further ahead by default than local files; what is asked wins.
    use ciphershard::store::ReadDepth;
    let depth = |src: Arc<FormatSource>, o: &LoaderOptions| {
        let src: Arc<dyn RowSource> = src;
        Loader::new(src, o).unwrap().read_depth()
    };
    let default = LoaderOptions::default();
    assert_eq!(depth(local, &default), ReadDepth::LOCAL);
    assert_eq!(depth(remote.clone(), &default), ReadDepth::REMOTE);
    let asked = LoaderOptions {
        readahead_windows: Some(2),
        io_threads: Some(3),
        ..Default::default()
    };
    assert_eq!(
        depth(remote.clone(), &asked),
        ReadDepth {
            windows: 2,
            io_threads: 3
        }
    );

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
    assert_eq!(code(&out), 2, "a missing shard is a damaged dataset: {err}");
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
    assert_eq!(code(&out), 1, "no manifest: not a dataset, not tampering");
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
    assert_eq!(
        code(&out),
        1,
        "refused credentials are an error, not tampering: {err}"
    );
    assert!(err.contains(&format!("s3://{BUCKET}/gap/")), "{err}");
    assert!(err.contains("credentials"), "{err}");
    assert!(!err.contains(wrong) && !err.contains(SECRET), "{err}");
}
