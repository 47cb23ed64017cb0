//! The local ciphertext cache (`OpenOptions::cache`, `--cache-dir`) in front of a real
//! S3-compatible server (s3s-fs, tests/s3_common): a warm cache serves a whole run with the
//! server gone, batches equal the local files' (same seed) cold and warm, the cache holds no
//! plaintext and only private files, a replaced object's old entries are never used, damaged
//! entries are fetched again, and the size cap holds, with two readers sharing the folder too.
mod cli_common;
mod s3_common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ciphershard::MasterKey;
use ciphershard::cipher::Backend;
use ciphershard::format::{self, ConvertInput, ConvertOptions, Dtype};
use ciphershard::pipeline::{FormatSource, Loader, LoaderOptions, RowSource};
use ciphershard::store::CacheStats;
use cli_common::{code, cs, keyed, run, stderr, stdout};
use s3_common::{BUCKET, SECRET, Uploader, s3_env};

type Batches = Vec<(Vec<u64>, Vec<Vec<u8>>)>;

const ROWS: u64 = 400;
const BLOCK: u64 = 4096;

/// Every row of `x` spells its own number (`PLAINTEXT-ROW-000123…`): a plaintext byte pattern
/// that would stand out in any file.
fn row_text(r: u64) -> Vec<u8> {
    let mut row = format!("PLAINTEXT-ROW-{r:06}-").into_bytes();
    row.resize(64, b'#');
    row
}

/// A dataset of `ROWS` rows, every column encrypted, in small chunks and several shards.
fn dataset(dir: &Path) -> (PathBuf, MasterKey, PathBuf) {
    let key = MasterKey::from_bytes([9; 32]);
    let key_path = dir.join("k.key");
    key.write_new_file(&key_path).unwrap();
    let ds = dir.join("ds");
    let inputs = [
        ConvertInput::InMemory {
            name: "x".into(),
            dtype: Dtype::U8,
            shape: vec![ROWS, 64],
            data: (0..ROWS).flat_map(row_text).collect(),
        },
        ConvertInput::InMemory {
            name: "y".into(),
            dtype: Dtype::U32,
            shape: vec![ROWS],
            data: (0..ROWS as u32).flat_map(|r| r.to_le_bytes()).collect(),
        },
    ];
    let opts = ConvertOptions {
        shard_size: Some(8000),
        chunk_size: 1024,
        keys: vec![key.clone()],
        ..Default::default()
    };
    format::convert(&inputs, &ds, &opts, &mut |_, _| {}).expect("convert");
    (ds, key, key_path)
}

fn loader_options() -> LoaderOptions {
    LoaderOptions {
        batch_size: 16,
        seed: 5,
        epochs: 2,
        threads: 3,
        ..Default::default()
    }
}

fn batches_of(loader: Loader) -> Batches {
    loader
        .map(|b| {
            let b = b.unwrap();
            (
                b.row_ids().to_vec(),
                b.tensors().map(|t| t.bytes.to_vec()).collect(),
            )
        })
        .collect()
}

fn batches(src: Arc<FormatSource>) -> Batches {
    let src: Arc<dyn RowSource> = src;
    batches_of(Loader::new(src, &loader_options()).unwrap())
}

fn stats(src: &FormatSource) -> CacheStats {
    src.store().cache_stats().expect("a cached store")
}

/// Every entry file under the cache root.
fn entries(root: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for d in std::fs::read_dir(root).unwrap() {
        let d = d.unwrap().path();
        for f in std::fs::read_dir(&d).unwrap() {
            v.push(f.unwrap().path());
        }
    }
    v.sort();
    v
}

fn disk_bytes(root: &Path) -> u64 {
    entries(root)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_warm_cache_serves_a_run_with_the_server_gone() {
    let Some(server) = s3_common::server_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (ds, key, _) = dataset(tmp.path());
    let up = Uploader::new(&server);
    up.upload_dir(&ds, "ds");
    let url = format!("s3://{BUCKET}/ds/");
    let root = tmp.path().join("cache");
    let opts = s3_common::open_options(&server, SECRET)
        .cache(&root, 64 << 20)
        .cache_block_size(BLOCK);
    let open = || FormatSource::open_with(Path::new(&url), &opts, &key, Backend::Cpu).unwrap();
    let want = batches(FormatSource::open(&ds, &key, Backend::Cpu).unwrap());
    let shard_bytes: u64 = format::Dataset::open(&ds)
        .unwrap()
        .store()
        .as_ref()
        .identity(0)
        .len;
    assert!(want.len() == 2 * ROWS.div_ceil(16) as usize);

    // Cold: every block fetched once (or twice, when two threads want it at once); the second
    // epoch is served from the cache.
    let cold = open();
    assert!(cold.shard_count() >= 3, "{}", cold.shard_count());
    assert_eq!(batches(cold.clone()), want, "cold cache: batches differ");
    let st = stats(&cold);
    assert!(st.misses > 0 && st.hits >= st.misses, "{st:?}");
    assert!(st.bytes_fetched >= shard_bytes, "{st:?}");
    assert_eq!((st.damaged, st.write_failures, st.evictions), (0, 0, 0));
    assert_eq!(st.bytes_on_disk, disk_bytes(&root));

    // Only ciphertext: no row of plaintext in any entry; private files in private folders.
    let files = entries(&root);
    assert!(files.len() as u64 >= cold.shard_count() as u64, "{files:?}");
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        for r in [0, 1, 150, ROWS - 1] {
            assert!(
                !contains(&bytes, &row_text(r)[..20]),
                "plaintext row {r} in {f:?}"
            );
        }
        assert!(!contains(&bytes, b"PLAINTEXT-ROW"), "plaintext in {f:?}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(f), 0o600, "{f:?}");
            assert_eq!(mode(f.parent().unwrap()), 0o700);
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&root).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }
    // The plaintext really is distinctive: the batches hold it.
    assert!(want.iter().any(|(_, t)| contains(&t[0], b"PLAINTEXT-ROW")));

    // Warm, in a new open: nothing fetched, the same batches.
    let warm = open();
    assert_eq!(batches(warm.clone()), want, "warm cache: batches differ");
    let st = stats(&warm);
    assert_eq!((st.misses, st.bytes_fetched), (0, 0), "{st:?}");
    assert!(st.hits > 0);

    // A damaged entry (one byte flipped) and a truncated one: deleted and fetched again, the
    // batches unchanged; never reported as tampering.
    let mut flipped = std::fs::read(&files[0]).unwrap();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    std::fs::write(&files[0], flipped).unwrap();
    let len = std::fs::metadata(&files[1]).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&files[1])
        .unwrap()
        .set_len(len - 7)
        .unwrap();
    // One reading thread and no read-ahead: two threads finding the same damaged entry would
    // count it twice.
    let repaired = open();
    let src: Arc<dyn RowSource> = repaired.clone();
    let one_thread = LoaderOptions {
        threads: 1,
        readahead_windows: Some(0),
        ..loader_options()
    };
    let got = batches_of(Loader::new(src, &one_thread).unwrap());
    assert_eq!(got, want, "damaged entries: batches differ");
    let st = stats(&repaired);
    assert_eq!((st.damaged, st.misses), (2, 2), "{st:?}");
    assert_eq!(entries(&root), files, "the two entries are written again");

    // The server stops once the loader has pinned every shard: the whole run is read from
    // disk.
    let last_run = open();
    let src: Arc<dyn RowSource> = last_run.clone();
    let loader = Loader::new(src, &loader_options()).unwrap();
    drop(server);
    assert_eq!(
        batches_of(loader),
        want,
        "batches with the server gone differ"
    );
    let st = stats(&last_run);
    assert_eq!(st.misses, 0, "{st:?}");
}

#[test]
fn the_cap_holds_with_a_dataset_larger_than_the_cache() {
    let Some(server) = s3_common::server_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (ds, key, _) = dataset(tmp.path());
    let up = Uploader::new(&server);
    up.upload_dir(&ds, "ds");
    let url = format!("s3://{BUCKET}/ds/");
    let root = tmp.path().join("cache");
    // Two blocks (and their 48-byte headers) for a dataset of several times that.
    let cap = 2 * (BLOCK + 48);
    let opts = s3_common::open_options(&server, SECRET)
        .cache(&root, cap)
        .cache_block_size(BLOCK);
    let open = || FormatSource::open_with(Path::new(&url), &opts, &key, Backend::Cpu).unwrap();
    let want = batches(FormatSource::open(&ds, &key, Backend::Cpu).unwrap());
    let src = open();
    let total: u64 = (0..src.shard_count())
        .map(|s| src.store().identity(s).len)
        .sum();
    assert!(total > 3 * cap, "{total} bytes of shards");
    assert_eq!(batches(src.clone()), want);
    let st = stats(&src);
    assert!(st.evictions > 0, "{st:?}");
    assert!(disk_bytes(&root) <= cap, "{} > {cap}", disk_bytes(&root));
    assert!(st.bytes_on_disk <= cap, "{st:?}");

    // Two readers sharing the folder at once (as two processes would): both read correctly;
    // each may pass the cap by the blocks the other is writing, and the next open shrinks
    // the cache back under it.
    let (a, b) = (open(), open());
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| batches(a.clone()));
        let tb = s.spawn(|| batches(b.clone()));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    assert_eq!((ra == want, rb == want), (true, true));
    let slack = 2 * 3 * (BLOCK + 48);
    assert!(disk_bytes(&root) <= cap + slack, "{}", disk_bytes(&root));
    drop((a, b));
    let _third = open();
    assert!(disk_bytes(&root) <= cap, "{} > {cap}", disk_bytes(&root));
    // No temporary file left behind.
    assert!(
        entries(&root).iter().all(|p| !p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".tmp"))
    );
}

#[test]
fn verify_takes_the_cache_flags_and_the_environment() {
    let Some(server) = s3_common::server_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (ds, _, key_path) = dataset(tmp.path());
    Uploader::new(&server).upload_dir(&ds, "ds");
    let url = format!("s3://{BUCKET}/ds/");
    let env = s3_env(&server, SECRET);
    let root = tmp.path().join("cache");
    let verify = |extra: &[&str], envs: &[(&str, &str)]| {
        let mut c = keyed("verify", &key_path);
        c.envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .envs(envs.iter().copied())
            .args(["--backend", "cpu", "--json"])
            .args(extra)
            .arg(&url);
        run(&mut c)
    };
    let cache_of = |out: &std::process::Output| -> serde_json::Value {
        assert_eq!(code(out), 0, "{}", stderr(out));
        serde_json::from_str::<serde_json::Value>(&stdout(out)).unwrap()["cache"].clone()
    };
    let root_s = root.to_str().unwrap();
    let cold = cache_of(&verify(
        &["--cache-dir", root_s, "--cache-size", "64M"],
        &[],
    ));
    assert!(cold["misses"].as_u64().unwrap() > 0, "{cold}");
    // The environment's folder: the same cache, now warm.
    let warm = cache_of(&verify(&[], &[("CIPHERSHARD_CACHE_DIR", root_s)]));
    assert_eq!(warm["misses"], 0, "{warm}");
    assert!(warm["hits"].as_u64().unwrap() > 0, "{warm}");
    // --no-cache: none.
    let none = cache_of(&verify(
        &["--no-cache"],
        &[("CIPHERSHARD_CACHE_DIR", root_s)],
    ));
    assert!(none.is_null(), "{none}");

    // Refusals: a local dataset, a size without a folder, a bad size, a shared folder.
    let mut c = keyed("verify", &key_path);
    c.args(["--backend", "cpu", "--cache-dir", root_s]).arg(&ds);
    let out = run(&mut c);
    assert_ne!(code(&out), 0);
    assert!(
        stderr(&out).contains("applies to object-store URLs"),
        "{}",
        stderr(&out)
    );
    let out = verify(&["--cache-size", "1G"], &[]);
    assert_ne!(code(&out), 0);
    assert!(stderr(&out).contains("--cache-dir"), "{}", stderr(&out));
    let out = verify(&["--cache-dir", root_s, "--cache-size", "lots"], &[]);
    assert_ne!(code(&out), 0);
    assert!(stderr(&out).contains("512M"), "{}", stderr(&out));
    let out = verify(&[], &[("CIPHERSHARD_CACHE_SIZE", "1G")]);
    assert_ne!(code(&out), 0);
    assert!(
        stderr(&out).contains("CIPHERSHARD_CACHE_DIR"),
        "{}",
        stderr(&out)
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let out = verify(&["--cache-dir", shared.to_str().unwrap()], &[]);
        assert_ne!(code(&out), 0);
        assert!(
            stderr(&out).contains("writable by group or others"),
            "{}",
            stderr(&out)
        );
    }
    // bench without a dataset: nothing to cache.
    let out = run(cs().args(["bench", "--cache-dir", root_s]));
    assert_ne!(code(&out), 0);
    assert!(stderr(&out).contains("DATASET URL"), "{}", stderr(&out));
}

#[test]
fn a_replaced_object_never_gets_its_old_cached_bytes() {
    let Some(server) = s3_common::server_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (ds, key, _) = dataset(tmp.path());
    let up = Uploader::new(&server);
    up.upload_dir(&ds, "ds");
    let url = format!("s3://{BUCKET}/ds/");
    let opts = s3_common::open_options(&server, SECRET)
        .cache(tmp.path().join("cache"), 64 << 20)
        .cache_block_size(BLOCK);
    let open = || FormatSource::open_with(Path::new(&url), &opts, &key, Backend::Cpu).unwrap();
    let want = batches(FormatSource::open(&ds, &key, Backend::Cpu).unwrap());
    assert_eq!(batches(open()), want);
    // A replaced object: its new ETag names other entries, so the old bytes (still cached)
    // are never served for it. Its last byte (in a chunk's tag) changes; the header does not.
    let shard1 = format::shard_file_name(1);
    let mut changed = std::fs::read(ds.join(&shard1)).unwrap();
    let last = changed.len() - 1;
    changed[last] ^= 1;
    up.put(&format!("ds/{shard1}"), changed.clone());
    let after = open();
    let mut byte = [0u8; 1];
    after.store().read_at(1, last as u64, &mut byte).unwrap();
    assert_eq!(byte[0], changed[last], "a stale cache entry was served");
    assert_eq!(stats(&after).misses, 1);
    // And it is the tags, not the cache, that refuse the changed object.
    let src: Arc<dyn RowSource> = after;
    let err = Loader::new(src, &loader_options())
        .unwrap()
        .filter_map(|b| b.err())
        .next()
        .expect("the changed shard fails its tag")
        .to_string();
    assert!(err.contains(&shard1), "{err}");
}
