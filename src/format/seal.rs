//! Sealing one shard: chunk jobs sealed in parallel and written behind a placeholder header,
//! then the real header (with the tags) put in its place ([`super::output`]: a local file is
//! fsynced and renamed into place, an object upload sends its header part last).
//! Shared by every conversion path; each gives its tensors' bytes through a read callback.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest, Sha256};

use super::output::Output;
use super::shard::{chunk_aad, chunk_nonce};
use super::{
    Descriptor, Dtype, HEADER_TAG_NONCE, Layout, MAX_CHUNKS_PER_SHARD, MAX_HEADER_LEN, ShardEntry,
    TensorDesc, canonical_header, shard_file_name,
};
use crate::cipher::cpu::CpuCipher;
use crate::cipher::{Cipher, TAG_LEN};
use crate::error::{Error, Result};
use crate::keys::DataKey;

/// A chunk buffer: zeroized on drop (it holds plaintext between read and seal).
type Buf = zeroize::Zeroizing<Vec<u8>>;

/// One chunk to seal.
struct Job {
    tensor: usize,
    offset: u64,
    len: usize,
    nonce: [u8; 12],
    aad: [u8; super::AAD_LEN],
    encrypted: bool,
}

/// Fills `buf` with bytes of tensor `t` from byte `offset` on.
pub(super) type ReadTensor<'a> = dyn Fn(usize, u64, &mut [u8]) -> Result<()> + Sync + 'a;

/// A tensor of a shard before its place in the data section is known.
pub(super) struct TensorPlan {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub encrypted: bool,
    pub layout: Layout,
    /// Byte length (what dtype and shape give).
    pub len: u64,
}

/// Places `plans` one after the other in the data section and numbers their chunks
/// (docs/FORMAT.md section 4.1).
pub(super) fn lay_out(plans: Vec<TensorPlan>, chunk_size: u64) -> Vec<TensorDesc> {
    let (mut off, mut next_chunk) = (0u64, 0u64);
    plans
        .into_iter()
        .map(|p| {
            let chunks = p.len.div_ceil(chunk_size).max(1);
            let t = TensorDesc {
                name: p.name,
                dtype: p.dtype,
                shape: p.shape,
                offsets: (off, off + p.len),
                encrypted: p.encrypted,
                first_chunk: next_chunk,
                chunks,
                layout: p.layout,
            };
            off += p.len;
            next_chunk += chunks;
            t
        })
        .collect()
}

/// What a shard's writer needs besides its descriptor and bytes.
pub(super) struct Sealer<'a> {
    /// Where the shard goes.
    pub out: &'a Output,
    /// Sealing threads.
    pub threads: usize,
    /// Paths written so far, removed if the conversion fails.
    pub cleanup: &'a mut Vec<PathBuf>,
    /// Called with the tensor bytes of each batch of chunks once written.
    pub written: &'a mut dyn FnMut(u64),
    /// Called before each batch of chunks: an error stops the conversion.
    pub checkpoint: &'a mut dyn FnMut() -> Result<()>,
}

/// Writes shard `desc.shard_index` into the output (directory or object store folder) under a fresh data key: every
/// chunk of tensor `t` at byte `offset` is filled by `read(t, offset, buf)` and sealed. Returns
/// the manifest's entry for it and its data key. Refuses, before writing anything, a shard
/// whose chunk count or header would exceed what readers accept.
pub(super) fn write_shard(
    desc: &Descriptor,
    read: &ReadTensor<'_>,
    sealer: &mut Sealer<'_>,
) -> Result<(ShardEntry, DataKey)> {
    let Sealer {
        out,
        threads,
        cleanup,
        written: on_written,
        checkpoint,
    } = sealer;
    let (out, threads) = (*out, *threads);
    let cs = desc.chunk_size;
    let total_chunks = desc.total_chunks();
    // Each tag takes ~21.3 base64 bytes of header, and readers cap the header: check before
    // allocating the tag table.
    if total_chunks > MAX_CHUNKS_PER_SHARD || (total_chunks + 1) * 64 / 3 > MAX_HEADER_LEN {
        return Err(Error::InvalidArgument(format!(
            "shard {} would have {total_chunks} chunks (limit {MAX_CHUNKS_PER_SHARD}, and their tags must fit the {MAX_HEADER_LEN}-byte header): raise the chunk size or lower the shard size",
            desc.shard_index
        )));
    }

    // A lower bound of the header's length, counted before anything is built: the descriptor
    // (escaped inside the header, never shorter), the tags, and each tensor's outer entry
    // (its quoted name and at least 50 bytes of fields). A header past the readers' limit
    // is refused here, not after building it (1,000,000 tensors took 800 MB to refuse).
    let lower = desc
        .json_len()
        .saturating_add((total_chunks + 1) * 64 / 3)
        .saturating_add(
            desc.tensors
                .iter()
                .map(|t| t.name.len() as u64 + 52)
                .fold(0, u64::saturating_add),
        );
    if lower > MAX_HEADER_LEN {
        return Err(Error::InvalidArgument(format!(
            "shard {} would have a header of more than {lower} bytes ({} tensors, {total_chunks} chunk tags), over the {MAX_HEADER_LEN}-byte limit readers accept: lower the shard size, raise the chunk size, or split the input",
            desc.shard_index,
            desc.tensors.len()
        )));
    }
    let desc_json = desc.to_json();
    let digest: [u8; 32] = Sha256::digest(desc_json.as_bytes()).into();
    let dk = DataKey::generate()?;
    let opener = CpuCipher::new().prepare(&dk)?;
    let mut tags = vec![0u8; TAG_LEN * (1 + total_chunks as usize)];
    tags[..TAG_LEN].copy_from_slice(&opener.seal_in_place(
        &HEADER_TAG_NONCE,
        desc_json.as_bytes(),
        false,
        &mut [],
    )?);
    let placeholder = canonical_header(
        &desc_json,
        &B64.encode(vec![0u8; tags.len()]),
        &desc.tensors,
    );
    // Readers refuse headers over MAX_HEADER_LEN (the tags live there): never write one.
    if placeholder.len() as u64 > MAX_HEADER_LEN {
        return Err(Error::InvalidArgument(format!(
            "shard {} would have a {} byte header ({total_chunks} chunk tags), over the {MAX_HEADER_LEN}-byte limit: raise the chunk size or lower the shard size",
            desc.shard_index,
            placeholder.len()
        )));
    }

    let file_name = shard_file_name(desc.shard_index);
    let bytes = 8 + placeholder.len() as u64 + desc.data_len();
    let mut w = out.create_shard(&file_name, &placeholder, bytes, cleanup)?;
    let tmp_path: PathBuf = w.name().to_path_buf();

    // Jobs are generated lazily: a shard of tiny chunks must not hold a job per chunk.
    let mut jobs = desc.tensors.iter().enumerate().flat_map(|(ti, t)| {
        let digest = &digest;
        (0..t.chunks).map(move |j| {
            let g = t.first_chunk + j;
            Job {
                tensor: ti,
                offset: j * cs,
                len: (t.len() - j * cs).min(cs) as usize,
                nonce: chunk_nonce(g),
                aad: chunk_aad(
                    &desc.dataset_id,
                    digest,
                    desc.shard_index,
                    ti as u32,
                    j,
                    t.chunks,
                    g,
                    t.encrypted,
                ),
                encrypted: t.encrypted,
            }
        })
    });
    // Pipeline: while batch k is read and sealed (in parallel), batch k-1 is written.
    // Two buffer sets at most; buffers zeroize on drop, error paths included.
    // About 16 MiB a batch (one chunk per thread at least, unless chunks are huge), so
    // memory stays at two batches whatever the input size.
    let min_batch = if cs <= 8 << 20 { threads } else { 1 };
    let batch_len = ((16 << 20) / cs as usize).clamp(min_batch, 4096);
    let seal_batch = |batch: &[Job], bufs: &mut [Buf], tags: &mut [[u8; TAG_LEN]]| -> Result<()> {
        let work = |jobs: &[Job], bufs: &mut [Buf], tags: &mut [[u8; TAG_LEN]]| -> Result<()> {
            for ((job, buf), tag) in jobs.iter().zip(bufs.iter_mut()).zip(tags.iter_mut()) {
                buf.resize(job.len, 0);
                read(job.tensor, job.offset, buf)?;
                *tag = opener.seal_in_place(&job.nonce, &job.aad, job.encrypted, buf)?;
            }
            Ok(())
        };
        let batch_bytes: usize = batch.iter().map(|j| j.len).sum();
        if threads == 1 || batch_bytes < (256 << 10) {
            return work(batch, bufs, tags);
        }
        let per = batch.len().div_ceil(threads);
        std::thread::scope(|sc| {
            let handles: Vec<_> = batch
                .chunks(per)
                .zip(bufs.chunks_mut(per))
                .zip(tags.chunks_mut(per))
                .map(|((j, b), t)| sc.spawn(move || work(j, b, t)))
                .collect();
            // A panic (a bug) becomes an error: the shard is then not written.
            handles.into_iter().try_for_each(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::io(
                        &tmp_path,
                        std::io::Error::other("a sealing thread panicked"),
                    ))
                })
            })
        })
    };
    let mut pool: Vec<Vec<Buf>> = Vec::new();
    let mut pending: Option<(Vec<Buf>, Vec<usize>)> = None;
    let mut g = 0usize;
    loop {
        checkpoint()?;
        let batch_jobs: Vec<Job> = jobs.by_ref().take(batch_len).collect();
        let batch = (!batch_jobs.is_empty()).then_some(&batch_jobs[..]);
        if batch.is_none() && pending.is_none() {
            break;
        }
        let mut cur = if batch.is_some() {
            pool.pop().unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut batch_tags = vec![[0u8; TAG_LEN]; batch.map_or(0, <[Job]>::len)];
        if let Some(b) = batch {
            cur.resize_with(b.len(), Buf::default);
        }
        let to_write = pending.take();
        let (sealed, written) = std::thread::scope(|sc| {
            let writer = to_write.map(|(bufs, lens)| {
                let w = &mut w;
                sc.spawn(move || {
                    let mut n = 0u64;
                    for (buf, &len) in bufs.iter().zip(&lens) {
                        if let Err(e) = w.write(&buf[..len]) {
                            return (Err(e), bufs, n);
                        }
                        n += len as u64;
                    }
                    (Ok(()), bufs, n)
                })
            });
            let sealed = batch.map_or(Ok(()), |b| seal_batch(b, &mut cur, &mut batch_tags));
            (sealed, writer.map(|h| h.join()))
        });
        if let Some(written) = written {
            // A panic (a bug) becomes an error; its buffers were dropped (zeroized) with it.
            let (r, bufs, n) = written.map_err(|_| {
                Error::io(
                    &tmp_path,
                    std::io::Error::other("the shard writer thread panicked"),
                )
            })?;
            pool.push(bufs);
            r?;
            on_written(n);
        }
        sealed?;
        if let Some(b) = batch {
            for t in &batch_tags {
                tags[TAG_LEN * (1 + g)..TAG_LEN * (2 + g)].copy_from_slice(t);
                g += 1;
            }
            pending = Some((cur, b.iter().map(|j| j.len).collect()));
        }
    }
    drop(pool);
    let header = canonical_header(&desc_json, &B64.encode(&tags), &desc.tensors);
    debug_assert_eq!(header.len(), placeholder.len());
    w.finish(&header, cleanup)?;
    Ok((
        ShardEntry {
            file: file_name,
            row_start: desc.row_start,
            rows: desc.rows,
            bytes,
            header_digest: digest,
        },
        dk,
    ))
}
