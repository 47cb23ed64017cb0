//! The wgpu device loader reading a dataset from a real S3-compatible server (s3s-fs, on
//! 127.0.0.1; tests/s3_common) through the same storage seam as the host loader: same seed,
//! same rows and, read back from the device, the same bytes as from the local files. Runs on
//! whatever wgpu adapter is here (in CI: lavapipe); without one it prints why it skipped,
//! unless `CIPHERSHARD_REQUIRE_WGPU=1`. The CUDA loader opens URLs through the same
//! `Dataset::open_with`; it is not run here (no GPU).
#![cfg(feature = "wgpu")]

mod cli_common;
mod s3_common;

use std::path::Path;

use ciphershard::MasterKey;
use ciphershard::cipher::wgpu::WgpuOptions;
use ciphershard::pipeline::{LoaderOptions, WgpuDeviceLoader};
use ciphershard::store::OpenOptions;
use s3_common::{BUCKET, SECRET, Uploader};

type Batches = Vec<(Vec<u64>, Vec<Vec<u8>>)>;

fn read_all(l: WgpuDeviceLoader) -> Batches {
    l.map(|b| {
        let b = b.unwrap();
        let bytes = b.tensors().map(|t| t.to_host().unwrap()).collect();
        (b.row_ids().to_vec(), bytes)
    })
    .collect()
}

#[test]
fn wgpu_device_loader_reads_a_dataset_from_s3() {
    if let Err(why) = ciphershard::cipher::wgpu::probe_adapter() {
        if std::env::var("CIPHERSHARD_REQUIRE_WGPU").is_ok_and(|v| v == "1") {
            panic!("CIPHERSHARD_REQUIRE_WGPU=1 but no wgpu adapter: {why}");
        }
        eprintln!("SKIPPED: no wgpu adapter: {why}");
        return;
    }
    let Some(server) = s3_common::server_or_skip() else {
        return;
    };
    let up = Uploader::new(&server);
    let fx = cli_common::dataset_with(300, 512, 4000, "x", std::collections::BTreeMap::new());
    up.upload_dir(&fx.ds, "dev");
    let url = format!("s3://{BUCKET}/dev/");
    let store: OpenOptions = s3_common::open_options(&server, SECRET);
    let key = MasterKey::from_bytes([7; 32]);
    let wgpu = WgpuOptions {
        allow_cpu_adapter: true,
        ..WgpuOptions::default()
    };
    let o = LoaderOptions {
        batch_size: 16,
        seed: 5,
        epochs: 2,
        ..Default::default()
    };
    let local = read_all(WgpuDeviceLoader::open(&fx.ds, &key, wgpu.clone(), &o).unwrap());
    assert_eq!(local.len(), 2 * 300usize.div_ceil(16));
    let remote =
        read_all(WgpuDeviceLoader::open_with(Path::new(&url), &store, &key, wgpu, &o).unwrap());
    assert!(
        remote == local,
        "device batches over s3:// differ from the local files'"
    );
}
