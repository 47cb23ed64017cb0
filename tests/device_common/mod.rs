//! The dataset the device-loader tests (CUDA and wgpu) compare against the host loader.
#![allow(dead_code)]

use std::path::Path;

use ciphershard::MasterKey;
use ciphershard::format::{ConvertInput, ConvertOptions, Dtype, convert};

/// `x`: f32 × `features` per row (encrypted), `y`: i32 (plain, GMAC only), `z`: u8 × 5
/// (encrypted, odd row size so rows straddle chunks and take the byte path of the gather).
pub fn make(dir: &Path, rows: u64, features: u64, chunk: u64, shard: u64) -> MasterKey {
    let key = MasterKey::generate().unwrap();
    let x: Vec<u8> = (0..rows * features)
        .flat_map(|i| (i as f32 * 0.25 - 3.0).to_le_bytes())
        .collect();
    let y: Vec<u8> = (0..rows as i32)
        .flat_map(|i| (i * 7).to_le_bytes())
        .collect();
    let z: Vec<u8> = (0..rows * 5).map(|i| (i * 31 % 251) as u8).collect();
    let inputs = [
        ConvertInput::InMemory {
            name: "x".into(),
            dtype: Dtype::F32,
            shape: vec![rows, features],
            data: x,
        },
        ConvertInput::InMemory {
            name: "y".into(),
            dtype: Dtype::I32,
            shape: vec![rows],
            data: y,
        },
        ConvertInput::InMemory {
            name: "z".into(),
            dtype: Dtype::U8,
            shape: vec![rows, 5],
            data: z,
        },
    ];
    let opts = ConvertOptions {
        keys: vec![key.clone()],
        chunk_size: chunk,
        shard_size: Some(shard),
        plain: vec!["y".into()],
        ..Default::default()
    };
    convert(&inputs, dir, &opts, &mut |_, _| {}).unwrap();
    key
}

use ciphershard::Error;
use ciphershard::cipher::Backend;
use ciphershard::pipeline::{
    DeviceStats, FormatSource, Loader, LoaderOptions, LoaderState, LoaderStats, RowSource,
};

/// One column of a device batch, read back: name, dtype, shape, bytes.
pub type Column = (String, String, Vec<u64>, Vec<u8>);

/// A device loader (CUDA or wgpu) as the shared tests see it.
pub trait DeviceUnderTest: Iterator<Item = Result<Self::Batch, Error>> + Sized {
    type Batch;
    fn open_at(dir: &Path, key: &MasterKey, o: &LoaderOptions) -> Self;
    fn per_epoch(&self) -> u64;
    fn position(&self) -> LoaderState;
    fn telemetry(&self) -> (DeviceStats, LoaderStats);
    /// (epoch, index) of a batch.
    fn place(b: &Self::Batch) -> (u64, u64);
    fn rows(b: &Self::Batch) -> Vec<u64>;
    /// Every column read back to the host (with the backend's own checks on the buffers).
    fn read_back(b: &Self::Batch) -> Vec<Column>;
}

/// Every device batch equals the host loader's batch for the same options, byte for byte, and
/// the telemetry accounts for every window and byte read. Returns the number of batches.
pub fn compare<L: DeviceUnderTest>(dir: &Path, key: &MasterKey, o: &LoaderOptions) -> usize {
    compare_stats::<L>(dir, key, o).0
}

/// [`compare`], also returning the device loader's telemetry.
pub fn compare_stats<L: DeviceUnderTest>(
    dir: &Path,
    key: &MasterKey,
    o: &LoaderOptions,
) -> (usize, DeviceStats) {
    let src = FormatSource::open(dir, key, Backend::Cpu).unwrap();
    let host: Vec<_> = Loader::new(src, o).unwrap().map(|b| b.unwrap()).collect();
    let mut dev = L::open_at(dir, key, o);
    assert_eq!(dev.per_epoch() * o.epochs, host.len() as u64);
    let mut n = 0;
    for (h, d) in host.iter().zip(dev.by_ref()) {
        let d = d.unwrap();
        assert_eq!(L::place(&d), (h.epoch(), h.index()));
        assert_eq!(L::rows(&d), h.row_ids(), "{o:?}");
        let cols = L::read_back(&d);
        assert_eq!(cols.len(), h.tensors().count());
        for (ht, (name, dtype, shape, bytes)) in h.tensors().zip(cols) {
            assert_eq!((ht.name, ht.dtype), (name.as_str(), dtype.as_str()));
            assert_eq!(ht.shape(), shape);
            assert_eq!(bytes, ht.bytes, "column {} {o:?}", ht.name);
        }
        n += 1;
    }
    assert_eq!(n, host.len());
    assert!(dev.next().is_none());
    let (ds, st) = dev.telemetry();
    assert!(ds.windows > 0 || n == 0, "{ds:?}");
    assert_eq!(ds.window_bytes, st.read.bytes, "{ds:?}");
    assert_eq!(
        st.verify.bytes, st.read.bytes,
        "every window read was verified: {st:?}"
    );
    assert_eq!(st.assemble.bytes, st.delivered_bytes);
    (n, ds)
}

/// A flipped byte in a chunk of each column (x and z encrypted, y plain): one integrity error
/// naming the shard file and the tensor, nothing after it; restored, the epoch loads again.
pub fn tamper_each_column<L: DeviceUnderTest>() {
    let dir = tempfile::tempdir().unwrap();
    let key = make(dir.path(), 700, 3, 128, 6000);
    let o = LoaderOptions {
        batch_size: 40,
        seed: 11,
        ..Default::default()
    };
    for col in [0usize, 1, 2] {
        let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
        let c = src.chunk(1, col, 2);
        let path = src.store().name(1).to_path_buf();
        let tensor = src.columns()[col].name.clone();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[c.file_offset as usize + 5] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let mut l = L::open_at(dir.path(), &key, &o);
        let mut err = None;
        let mut ok = 0;
        for b in l.by_ref() {
            match b {
                Ok(_) => ok += 1,
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        match err {
            Some(Error::Integrity(loc)) => {
                let msg = Error::Integrity(loc.clone()).to_string();
                assert!(msg.contains(&*path.to_string_lossy()), "{msg}");
                assert!(msg.contains(&tensor), "{msg}");
            }
            other => panic!("column {col}: expected an integrity error, got {other:?}"),
        }
        assert!(l.next().is_none(), "a batch after the integrity error");
        assert!(ok < l.per_epoch() as usize);
        bytes[c.file_offset as usize + 5] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
    }
    let l = L::open_at(dir.path(), &key, &o);
    let per_epoch = l.per_epoch();
    let mut n = 0u64;
    for b in l {
        b.unwrap();
        n += 1;
    }
    assert_eq!(n, per_epoch);
}

/// Half an epoch, the state, a drop mid-epoch (no hang), a resumed loader: together exactly
/// the batches of one uninterrupted run.
pub fn resume_and_drop_mid_epoch<L: DeviceUnderTest>() {
    let dir = tempfile::tempdir().unwrap();
    let key = make(dir.path(), 700, 3, 128, 6000);
    let o = LoaderOptions {
        batch_size: 30,
        seed: 4,
        epochs: 2,
        ..Default::default()
    };
    let all: Vec<Vec<u64>> = L::open_at(dir.path(), &key, &o)
        .map(|b| L::rows(&b.unwrap()))
        .collect();
    let mut l = L::open_at(dir.path(), &key, &o);
    let head: Vec<Vec<u64>> = l
        .by_ref()
        .take(all.len() / 2 + 1)
        .map(|b| L::rows(&b.unwrap()))
        .collect();
    let state = l.position();
    drop(l);
    let tail: Vec<Vec<u64>> = L::open_at(dir.path(), &key, &o.clone().resume(&state))
        .map(|b| L::rows(&b.unwrap()))
        .collect();
    assert_eq!([head, tail].concat(), all);
}

/// A dataset with zero-width columns beside a normal one: `x` f32 × 3 (encrypted), `e` u8 ×
/// 0 (encrypted) and `p` i16 × 2 × 0 (plain), `rows` rows over 128-byte chunks and 1 KiB shards.
pub fn make_zero_width(dir: &Path, rows: u64) -> MasterKey {
    let key = MasterKey::generate().unwrap();
    let x: Vec<u8> = (0..rows * 3)
        .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
        .collect();
    let empty = |name: &str, dtype, shape: &[u64]| ConvertInput::InMemory {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
        data: Vec::new(),
    };
    let inputs = [
        empty("e", Dtype::U8, &[rows, 0]),
        ConvertInput::InMemory {
            name: "x".into(),
            dtype: Dtype::F32,
            shape: vec![rows, 3],
            data: x,
        },
        empty("p", Dtype::I16, &[rows, 2, 0]),
    ];
    let opts = ConvertOptions {
        keys: vec![key.clone()],
        chunk_size: 128,
        shard_size: Some(1024),
        plain: vec!["p".into()],
        ..Default::default()
    };
    convert(&inputs, dir, &opts, &mut |_, _| {}).unwrap();
    key
}

/// Zero-width columns load on the device as `[B, 0]` (and `[B, 2, 0]`) tensors, every batch
/// equal to the host loader's: nothing is gathered or bound for them.
pub fn zero_width_columns<L: DeviceUnderTest>() {
    let dir = tempfile::tempdir().unwrap();
    let key = make_zero_width(dir.path(), 300);
    for (batch, shuffle) in [(32, true), (7, false)] {
        let o = LoaderOptions {
            batch_size: batch,
            shuffle,
            seed: 5,
            epochs: 2,
            ..Default::default()
        };
        assert!(compare::<L>(dir.path(), &key, &o) > 0);
        let mut dev = L::open_at(dir.path(), &key, &o);
        let b = dev.next().unwrap().unwrap();
        let rows = L::rows(&b).len() as u64;
        let shapes: Vec<(String, Vec<u64>, usize)> = L::read_back(&b)
            .into_iter()
            .map(|(name, _, shape, bytes)| (name, shape, bytes.len()))
            .collect();
        assert_eq!(
            shapes,
            [
                ("e".into(), vec![rows, 0], 0),
                ("x".into(), vec![rows, 3], rows as usize * 12),
                ("p".into(), vec![rows, 2, 0], 0),
            ]
        );
    }
}
