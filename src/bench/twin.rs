//! The plaintext twin: a dataset's own shards read through the same pipeline with every
//! cryptographic step left out, so a benchmark's encrypted/twin ratio isolates the cost of
//! authenticated decryption.
//!
//! Ciphertext has exactly the plaintext's length and offsets, so an unencrypted copy of the
//! dataset would be read byte for byte the same way. [`TwinSource`] wraps a source: every
//! chunk is presented as a plain one and its "opener" checks nothing, so the host loader reads,
//! pools and copies rows exactly as for real data (the same `pread`s, buffers and row copies)
//! and hands out the stored bytes (ciphertext, never plaintext). A converted twin with every
//! column `--plain` would still verify a GMAC per chunk, which is not "without encryption".
//!
//! Crate-private on purpose: no public path reads a dataset without verifying it.

#![forbid(unsafe_code)]

use std::sync::Arc;

use crate::cipher::{ChunkOpener, ChunkParams, NONCE_LEN, OpenError, TAG_LEN};
use crate::error::{ChunkLocation, Error, Result};
use crate::pipeline::{ChunkSpec, ColumnInfo, RowSource};
use crate::store::ShardStore;

/// `source` with its cryptography left out (see the module docs).
pub(crate) struct TwinSource {
    inner: Arc<dyn RowSource>,
}

impl TwinSource {
    pub(crate) fn new(inner: Arc<dyn RowSource>) -> Arc<Self> {
        Arc::new(TwinSource { inner })
    }
}

/// Copies bytes as they are: the twin's stand-in for a prepared data key.
struct CopyOnly;

impl ChunkOpener for CopyOnly {
    fn open(&self, _: &ChunkParams<'_>, src: &[u8], dst: &mut [u8]) -> Result<(), OpenError> {
        if src.len() != dst.len() {
            return Err(OpenError::Backend(Error::InvalidArgument(
                "twin: source and destination lengths differ".into(),
            )));
        }
        dst.copy_from_slice(src);
        Ok(())
    }
    fn open_in_place(&self, _: &ChunkParams<'_>, _: &mut [u8]) -> Result<(), OpenError> {
        Ok(())
    }
    fn verify(&self, _: &ChunkParams<'_>, _: &[u8]) -> Result<(), OpenError> {
        Ok(())
    }
    fn ctr_apply(&self, _: &[u8; NONCE_LEN], _: u64, src: &[u8], dst: &mut [u8]) -> Result<()> {
        if src.len() != dst.len() {
            return Err(Error::InvalidArgument(
                "twin: source and destination lengths differ".into(),
            ));
        }
        dst.copy_from_slice(src);
        Ok(())
    }
    fn seal_in_place(
        &self,
        _: &[u8; NONCE_LEN],
        _: &[u8],
        _: bool,
        _: &mut [u8],
    ) -> Result<[u8; TAG_LEN]> {
        Err(Error::InvalidArgument(
            "the plaintext twin cannot seal".into(),
        ))
    }
}

impl RowSource for TwinSource {
    fn shard_count(&self) -> usize {
        self.inner.shard_count()
    }
    fn shard_rows(&self, s: usize) -> u64 {
        self.inner.shard_rows(s)
    }
    fn shard_row_start(&self, s: usize) -> u64 {
        self.inner.shard_row_start(s)
    }
    fn store(&self) -> &dyn ShardStore {
        self.inner.store()
    }
    fn columns(&self) -> &[ColumnInfo] {
        self.inner.columns()
    }
    fn chunk_size(&self) -> u64 {
        self.inner.chunk_size()
    }
    fn chunk(&self, s: usize, c: usize, j: u64) -> ChunkSpec {
        ChunkSpec {
            encrypted: false,
            ..self.inner.chunk(s, c, j)
        }
    }
    fn opener(&self, _: usize) -> &dyn ChunkOpener {
        &CopyOnly
    }
    fn location(&self, s: usize, c: usize, j: u64) -> ChunkLocation {
        self.inner.location(s, c, j)
    }
    // A ragged column's rows are addressed by its offsets (authenticated when the inner
    // source opened); its values stay as stored.
    fn row_offsets(&self, s: usize, c: usize) -> &[u64] {
        self.inner.row_offsets(s, c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cipher::Backend;
    use crate::pipeline::{FormatSource, Loader, LoaderOptions};

    /// The twin reads the same rows in the same order as the real loader and hands out the
    /// stored bytes: ciphertext for encrypted columns, never their plaintext.
    #[test]
    fn twin_hands_out_stored_bytes_in_the_loaders_order() {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::bench::loader::generate(dir.path(), 3000, 8, 4096).unwrap();
        let src = FormatSource::open(dir.path(), &key, Backend::Cpu).unwrap();
        let opts = LoaderOptions {
            batch_size: 100,
            seed: 3,
            ..Default::default()
        };
        let real: Vec<_> = Loader::new(src.clone(), &opts)
            .unwrap()
            .map(|b| b.unwrap())
            .collect();
        let twin: Vec<_> = Loader::new(TwinSource::new(src.clone()), &opts)
            .unwrap()
            .map(|b| b.unwrap())
            .collect();
        assert_eq!(real.len(), twin.len());
        for (r, t) in real.iter().zip(&twin) {
            assert_eq!(r.row_ids(), t.row_ids());
            let (rx, tx) = (r.tensor("x").unwrap(), t.tensor("x").unwrap());
            assert_eq!(rx.bytes.len(), tx.bytes.len());
            assert_ne!(rx.bytes, tx.bytes, "the twin must not decrypt");
        }
        // The twin's bytes are the stored ciphertext of each row.
        let b = &twin[0];
        let row = b.row_ids()[0];
        let (s, within) = (0..src.shard_count())
            .find_map(|s| {
                let start = src.shard_row_start(s);
                (row >= start && row < start + src.shard_rows(s)).then(|| (s, row - start))
            })
            .unwrap();
        let rb = src.columns()[0].row_bytes;
        let at = within * rb;
        let chunk = src.chunk(s, 0, at / src.chunk_size());
        let mut stored = vec![0u8; rb as usize];
        src.store()
            .read_at(s, chunk.file_offset + at % src.chunk_size(), &mut stored)
            .unwrap();
        assert_eq!(&b.tensor("x").unwrap().bytes[..rb as usize], &stored[..]);
    }
}
