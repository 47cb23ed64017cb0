//! A minimal sealed-shard fixture for the loader tests: each shard file holds its columns back
//! to back, every chunk sealed with the CPU backend (AES-256-GCM, nonce = global chunk index,
//! AAD binding shard/column/chunk). It implements `RowSource`, so the pipeline can be tested
//! independently of the format layer (the format-backed source has its own tests).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ciphershard::DataKey;
use ciphershard::cipher::{ChunkOpener, Cipher, cpu::CpuCipher};
use ciphershard::error::ChunkLocation;
use ciphershard::pipeline::{AAD_LEN, ChunkSpec, ColumnInfo, RowSource};
use ciphershard::store::{LocalStore, ShardStore};

/// A column to generate: name, dtype, element size, elements per row, encrypted.
pub struct Col(
    pub &'static str,
    pub &'static str,
    pub usize,
    pub u64,
    pub bool,
);

pub struct Fixture {
    paths: Vec<PathBuf>,
    store: LocalStore,
    rows: Vec<u64>,
    row_start: Vec<u64>,
    columns: Vec<ColumnInfo>,
    encrypted: Vec<bool>,
    chunk_size: u64,
    /// tags[s][c][j]
    tags: Vec<Vec<Vec<[u8; 16]>>>,
    /// col_offset[s][c]: byte offset of column c in shard s
    col_offset: Vec<Vec<u64>>,
    openers: Vec<Box<dyn ChunkOpener>>,
}

/// The plaintext byte `i` of global row `g` in column `c`.
pub fn expected_byte(g: u64, c: usize, i: u64) -> u8 {
    let mut z = g.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (c as u64) << 56
        ^ i.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^= z >> 29;
    z = z.wrapping_mul(0x94D0_49BB_1331_11EB);
    (z >> 32) as u8
}

pub fn expected_row(g: u64, c: usize, row_bytes: u64) -> Vec<u8> {
    (0..row_bytes).map(|i| expected_byte(g, c, i)).collect()
}

fn chunk_nonce(g: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&g.to_be_bytes());
    n
}

fn chunk_aad(s: usize, c: usize, j: u64, enc: bool) -> [u8; AAD_LEN] {
    let mut a = [0u8; AAD_LEN];
    a[..8].copy_from_slice(b"TESTFIX1");
    a[8..12].copy_from_slice(&(s as u32).to_be_bytes());
    a[12..16].copy_from_slice(&(c as u32).to_be_bytes());
    a[16..24].copy_from_slice(&j.to_be_bytes());
    a[88] = enc as u8;
    a
}

impl Fixture {
    pub fn create(dir: &Path, shard_rows: &[u64], cols: &[Col], chunk_size: u64) -> Arc<Self> {
        let cipher = CpuCipher::new();
        let columns: Vec<ColumnInfo> = cols
            .iter()
            .map(|c| ColumnInfo {
                name: c.0.into(),
                dtype: c.1.into(),
                elem_size: c.2,
                row_shape: vec![c.3],
                row_bytes: c.2 as u64 * c.3,
                ragged: false,
            })
            .collect();
        let (mut paths, mut tags, mut col_offset, mut openers, mut row_start) =
            (vec![], vec![], vec![], vec![], vec![]);
        let mut g0 = 0u64;
        for (s, &rows) in shard_rows.iter().enumerate() {
            let mut kb = [0u8; 32];
            kb[0] = s as u8;
            kb[31] = 0xA5;
            let op = cipher.prepare(&DataKey::from_bytes(kb)).unwrap();
            let mut file = Vec::new();
            let (mut st, mut so) = (vec![], vec![]);
            let mut gchunk = 0u64;
            for (c, col) in columns.iter().enumerate() {
                so.push(file.len() as u64);
                let mut data = Vec::new();
                for r in 0..rows {
                    data.extend(expected_row(g0 + r, c, col.row_bytes));
                }
                let mut ct = Vec::new();
                let n = data.len().div_ceil(chunk_size as usize).max(1);
                for j in 0..n {
                    let a = j * chunk_size as usize;
                    let mut piece = data
                        [a.min(data.len())..((j + 1) * chunk_size as usize).min(data.len())]
                        .to_vec();
                    let tag = op
                        .seal_in_place(
                            &chunk_nonce(gchunk),
                            &chunk_aad(s, c, j as u64, cols[c].4),
                            cols[c].4,
                            &mut piece,
                        )
                        .unwrap();
                    gchunk += 1;
                    ct.push(tag);
                    file.extend(piece);
                }
                st.push(ct);
            }
            let path = dir.join(format!("shard-{s:05}.bin"));
            std::fs::write(&path, &file).unwrap();
            paths.push(path);
            tags.push(st);
            col_offset.push(so);
            openers.push(op);
            row_start.push(g0);
            g0 += rows;
        }
        Arc::new(Fixture {
            store: LocalStore::open(paths.clone()).unwrap(),
            paths,
            rows: shard_rows.to_vec(),
            row_start,
            encrypted: cols.iter().map(|c| c.4).collect(),
            columns,
            chunk_size,
            tags,
            col_offset,
            openers,
        })
    }

    /// File offset of chunk j of column c in shard s.
    pub fn chunk_offset(&self, s: usize, c: usize, j: u64) -> u64 {
        self.col_offset[s][c] + j * self.chunk_size
    }

    /// Checks that every row of `batch` holds the expected plaintext.
    pub fn check_batch(&self, b: &ciphershard::pipeline::Batch) {
        for (c, t) in b.tensors().enumerate() {
            let rb = self.columns[c].row_bytes as usize;
            assert_eq!(t.shape()[0] as usize, b.len());
            for (i, &g) in b.row_ids().iter().enumerate() {
                assert_eq!(
                    &t.bytes[i * rb..(i + 1) * rb],
                    &expected_row(g, c, rb as u64)[..],
                    "row {g} column {c}"
                );
            }
        }
    }
}

impl RowSource for Fixture {
    fn shard_count(&self) -> usize {
        self.paths.len()
    }
    fn shard_rows(&self, s: usize) -> u64 {
        self.rows[s]
    }
    fn shard_row_start(&self, s: usize) -> u64 {
        self.row_start[s]
    }
    fn store(&self) -> &dyn ShardStore {
        &self.store
    }
    fn columns(&self) -> &[ColumnInfo] {
        &self.columns
    }
    fn chunk_size(&self) -> u64 {
        self.chunk_size
    }
    fn chunk(&self, s: usize, c: usize, j: u64) -> ChunkSpec {
        let total = self.rows[s] * self.columns[c].row_bytes;
        let a = j * self.chunk_size;
        let len = (total.saturating_sub(a)).min(self.chunk_size) as usize;
        let g: u64 = (0..c).map(|cc| self.tags[s][cc].len() as u64).sum::<u64>() + j;
        ChunkSpec {
            file_offset: self.chunk_offset(s, c, j),
            len,
            nonce: chunk_nonce(g),
            aad: chunk_aad(s, c, j, self.encrypted[c]),
            tag: self.tags[s][c][j as usize],
            encrypted: self.encrypted[c],
        }
    }
    fn opener(&self, s: usize) -> &dyn ChunkOpener {
        &*self.openers[s]
    }
    fn location(&self, s: usize, c: usize, j: u64) -> ChunkLocation {
        ChunkLocation {
            path: self.paths[s].clone(),
            tensor: self.columns[c].name.clone(),
            chunk: j,
        }
    }
}

/// Two columns (an encrypted f32 feature vector of odd width and a plain i64 label), small
/// chunks so that rows straddle chunk boundaries.
pub fn small(dir: &Path) -> Arc<Fixture> {
    Fixture::create(
        dir,
        &[103, 64, 1, 77],
        &[Col("x", "F32", 4, 5, true), Col("y", "I64", 8, 1, false)],
        256,
    )
}

pub fn all_batches(l: ciphershard::pipeline::Loader) -> Vec<(Vec<u64>, Vec<Vec<u8>>)> {
    l.map(|b| {
        let b = b.unwrap();
        (
            b.row_ids().to_vec(),
            b.tensors().map(|t| t.bytes.to_vec()).collect(),
        )
    })
    .collect()
}
