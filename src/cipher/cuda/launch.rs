//! Every kernel launch of the CUDA backend, and the `#[repr(C)]` parameters it shares with the
//! `.cu` sources.
//!
//! A launch is `unsafe` because nothing checks a kernel's argument types or the memory it
//! touches. Each function here therefore checks, before launching, every range its kernel will
//! read or write against the buffers it was given, so calling it is safe: a caller's mistake is
//! an error, never an access outside a buffer. Each `unsafe` block names the kernel's signature,
//! the buffer lengths and the grid bound it relies on. Descriptors reach the device only through
//! [`DeviceDescs::upload`], which keeps what the checks need of the very words it uploaded.
#![allow(unsafe_code)] // the launches (see above); `mod.rs` denies unsafe code elsewhere

use std::sync::Arc;

use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg,
};

use super::compile::Kernels;
use super::gather::{GatherJob, gather_err};
use super::variants::CtrVariant;
use super::{backend_err, drv};
use crate::cipher::NONCE_LEN;
use crate::error::{Error, Result};

/// Most chunks in one launch (grid.y limit).
pub const MAX_CHUNKS_PER_LAUNCH: usize = 65_535;
/// GHASH segment length in 16-byte blocks (`CS_SEG_BLOCKS` in aes_core.h): one thread folds one.
const SEG_BLOCKS: u64 = 32;
/// `CS_FLAG_PLAIN` of aes_core.h, a flag of descriptor word 7 (bit 48 of the word): a plain
/// (GMAC) chunk.
const FLAG_PLAIN: u64 = 1;
/// Descriptor word 7 holds the associated-data length below bit 48, flags above.
const AAD_LEN_MASK: u64 = (1 << 48) - 1;
/// Threads per block of cs_setup, cs_hpowers and cs_ghash (`CS_THREADS` in aes_gcm.cu).
const THREADS: u32 = 256;
/// Threads per block of cs_gather_rows.
const GATHER_THREADS: u32 = 128;
/// AES blocks each CTR thread handles (amortizes the shared-table fill per thread block).
const CTR_BLOCKS_PER_THREAD: u64 = 32;
/// Most blocks along grid.x. The kernels stride over the grid, so this bounds no access (in
/// cs_hpowers, which does not, it bounds how many powers are computed, never what is touched).
const MAX_GRID_X: u64 = 1 << 20;

/// One chunk's descriptor: the `CS_DESC_WORDS` (8) 64-bit words of `kernels/aes_core.h`
/// ("Chunk descriptors"), field for word, in order. cs_ctr* and cs_ghash read the descriptor of
/// chunk `blockIdx.y` at `desc + 8 * blockIdx.y`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkDesc {
    /// Word 0: where the chunk's bytes start in the input buffer.
    src: u64,
    /// Word 1: where its output starts in the output buffer (CTR).
    dst: u64,
    /// Word 2: length in bytes.
    len: u64,
    /// Word 3: byte offset into the chunk of the first byte (CTR seek).
    seek: u64,
    /// Word 4: nonce bytes 0..8, a little-endian load.
    nonce_lo: u64,
    /// Word 5: nonce bytes 8..12, a little-endian load into the low 32 bits.
    nonce_hi: u64,
    /// Word 6: where the chunk's associated data starts in the AAD buffer.
    aad_off: u64,
    /// Word 7: associated-data length below bit 48, flags from bit 48 ([`FLAG_PLAIN`]).
    aad_len_flags: u64,
}

const _: () = assert!(std::mem::size_of::<ChunkDesc>() == 8 * 8);
const _: () = assert!(std::mem::align_of::<ChunkDesc>() == 8);
const _: () = assert!(std::mem::offset_of!(ChunkDesc, aad_len_flags) == 7 * 8);

// SAFETY: `#[repr(C)]`, eight u64 and no padding (asserted above): the exact bytes of the eight
// descriptor words the kernels read.
unsafe impl DeviceRepr for ChunkDesc {}

impl ChunkDesc {
    /// A GCM-encrypted chunk of `len` bytes at `src` in the input, its output at `dst`; no seek,
    /// no associated data.
    pub(crate) fn new(nonce: &[u8; NONCE_LEN], src: u64, dst: u64, len: u64) -> ChunkDesc {
        ChunkDesc {
            src,
            dst,
            len,
            seek: 0,
            nonce_lo: u64::from_le_bytes(nonce[..8].try_into().expect("8 bytes")),
            nonce_hi: u64::from(u32::from_le_bytes(nonce[8..].try_into().expect("4 bytes"))),
            aad_off: 0,
            aad_len_flags: 0,
        }
    }

    /// Starts `offset` bytes into the chunk (CTR: counter block `2 + offset / 16`).
    pub(super) fn seek(self, offset: u64) -> ChunkDesc {
        ChunkDesc {
            seek: offset,
            ..self
        }
    }

    /// The chunk's associated data: `len` (below 2^48) bytes at `offset` in the AAD buffer.
    pub(crate) fn aad(self, offset: u64, len: u64) -> ChunkDesc {
        ChunkDesc {
            aad_off: offset,
            aad_len_flags: (self.aad_len_flags & !AAD_LEN_MASK) | len,
            ..self
        }
    }

    /// `true`: a plain chunk, whose tag is a GMAC over `aad || bytes`.
    pub(super) fn plain(self, plain: bool) -> ChunkDesc {
        ChunkDesc {
            aad_len_flags: (self.aad_len_flags & AAD_LEN_MASK) | (u64::from(plain) << 48),
            ..self
        }
    }

    /// The associated-data length as the kernels decode it.
    fn aad_len(&self) -> u64 {
        self.aad_len_flags & AAD_LEN_MASK
    }

    /// The plain flag as cs_ghash decodes it.
    fn is_plain(&self) -> bool {
        (self.aad_len_flags >> 48) & FLAG_PLAIN != 0
    }

    /// GHASH segments of this chunk (`nseg` in cs_ghash): the powers of H it reads.
    fn ghash_segments(&self) -> u64 {
        let blocks = if self.is_plain() {
            (self.aad_len() + self.len).div_ceil(16) + 1
        } else {
            self.aad_len().div_ceil(16) + self.len.div_ceil(16) + 1
        };
        blocks.div_ceil(SEG_BLOCKS)
    }

    /// AES blocks of keystream the chunk's range spans (for the CTR grid).
    pub(super) fn ctr_blocks(&self) -> u64 {
        (self.seek % 16 + self.len).div_ceil(16)
    }
}

/// Descriptors in device memory, with what the launches check computed from the very words
/// uploaded: the end of the furthest range each kernel touches in each buffer.
pub(crate) struct DeviceDescs {
    buf: CudaSlice<ChunkDesc>,
    count: u32,
    /// Furthest `src + len` (input bytes read by both kernels) over chunks with bytes.
    src_end: u64,
    /// Furthest `dst + len` (output bytes written by CTR) over chunks with bytes.
    dst_end: u64,
    /// Furthest `aad_off + aad_len` (associated data read by GHASH).
    aad_end: u64,
    /// Most GHASH segments of one chunk: cs_ghash reads `2 * max_segments` words of powers of H.
    max_segments: u64,
    /// Most keystream blocks of one chunk (CTR grid).
    max_blocks: u64,
}

impl DeviceDescs {
    /// Uploads `descs` (1 to [`MAX_CHUNKS_PER_LAUNCH`] of them) on `stream`.
    pub(crate) fn upload(stream: &Arc<CudaStream>, descs: &[ChunkDesc]) -> Result<DeviceDescs> {
        if descs.is_empty() || descs.len() > MAX_CHUNKS_PER_LAUNCH {
            return Err(Error::InvalidArgument(format!(
                "a launch takes 1 to {MAX_CHUNKS_PER_LAUNCH} chunks, not {}",
                descs.len()
            )));
        }
        // No buffer is longer than isize::MAX bytes; below that, no sum here can overflow.
        if let Some(i) = descs.iter().position(|d| d.len > isize::MAX as u64) {
            return Err(Error::InvalidArgument(format!(
                "chunk {i}: longer than any buffer"
            )));
        }
        let (mut src_end, mut dst_end, mut aad_end, mut max_segments, mut max_blocks) =
            (0, 0, 0, 0, 0);
        for d in descs {
            if d.len > 0 {
                src_end = src_end.max(d.src.saturating_add(d.len));
                dst_end = dst_end.max(d.dst.saturating_add(d.len));
            }
            if d.aad_len() > 0 {
                aad_end = aad_end.max(d.aad_off.saturating_add(d.aad_len()));
            }
            max_segments = max_segments.max(d.ghash_segments());
            max_blocks = max_blocks.max(d.ctr_blocks());
        }
        let buf = stream
            .clone_htod(descs)
            .map_err(drv("host-to-device copy"))?;
        Ok(DeviceDescs {
            buf,
            count: descs.len() as u32,
            src_end,
            dst_end,
            aad_end,
            max_segments,
            max_blocks,
        })
    }

    /// Most GHASH segments of one chunk: powers of H a GHASH launch over these needs.
    pub(super) fn max_segments(&self) -> u64 {
        self.max_segments
    }
}

/// The device tables of one data key, allocated at the sizes cs_setup writes.
pub(super) struct KeyTables {
    /// Te0, 256 words (not secret: the AES table).
    pub(super) te0: CudaSlice<u32>,
    /// Round keys, 60 words.
    pub(super) rk: CudaSlice<u32>,
    /// H's 4-bit multiplication tables, 32 words (16 high halves, 16 low).
    pub(super) htab: CudaSlice<u64>,
    /// `H^SEG_BLOCKS`, 2 words.
    pub(super) hseg: CudaSlice<u64>,
}

impl KeyTables {
    /// Zeroed tables on `stream`.
    pub(super) fn alloc(stream: &Arc<CudaStream>) -> Result<KeyTables> {
        let what = drv("allocating key tables");
        Ok(KeyTables {
            te0: stream.alloc_zeros::<u32>(256).map_err(&what)?,
            rk: stream.alloc_zeros::<u32>(60).map_err(&what)?,
            htab: stream.alloc_zeros::<u64>(32).map_err(&what)?,
            hseg: stream.alloc_zeros::<u64>(2).map_err(&what)?,
        })
    }

    fn check(&self, kernel: &str) -> Result<()> {
        at_least(kernel, "te0", self.te0.len(), 256)?;
        at_least(kernel, "round keys", self.rk.len(), 60)?;
        at_least(kernel, "H tables", self.htab.len(), 32)?;
        at_least(kernel, "H^32", self.hseg.len(), 2)
    }
}

/// Fails unless a buffer of `have` elements holds the `need` a kernel touches (a bug if not).
fn at_least(kernel: &str, buffer: &str, have: usize, need: u64) -> Result<()> {
    if (have as u64) < need {
        return Err(backend_err(
            kernel,
            format!("{buffer} holds {have} elements, the launch touches {need} (a bug)"),
        ));
    }
    Ok(())
}

fn grid_x(units: u64) -> u32 {
    units.div_ceil(u64::from(THREADS)).clamp(1, MAX_GRID_X) as u32
}

fn ctr_grid_x(blocks: u64, threads: u32) -> u32 {
    blocks
        .div_ceil(CTR_BLOCKS_PER_THREAD)
        .div_ceil(u64::from(threads))
        .clamp(1, MAX_GRID_X) as u32
}

/// cs_setup: builds `tables` from the 32 key bytes in `key`.
pub(super) fn setup(
    k: &Kernels,
    stream: &Arc<CudaStream>,
    key: &CudaSlice<u8>,
    tables: &mut KeyTables,
) -> Result<()> {
    tables.check("key setup kernel")?;
    at_least("key setup kernel", "key", key.len(), 32)?;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `cs_setup(const u8 *key, u32 *te0, u32 *rk, u64 *htab, u64 *hseg)`, argument for
    // argument. One block of 256 threads (its thread t writes te0[t], so exactly 256); it reads
    // key[0..32] and writes te0[0..256], rk[0..60], htab[0..32], hseg[0..2], each checked above
    // against the buffer's length.
    unsafe {
        stream
            .launch_builder(&k.setup)
            .arg(key)
            .arg(&mut tables.te0)
            .arg(&mut tables.rk)
            .arg(&mut tables.htab)
            .arg(&mut tables.hseg)
            .launch(cfg)
    }
    .map(|_| ())
    .map_err(drv("key setup kernel"))
}

/// cs_hpowers: `out[2s..2s+2] = (H^SEG_BLOCKS)^s` for every `s < count`.
pub(super) fn hpowers(
    k: &Kernels,
    stream: &Arc<CudaStream>,
    tables: &KeyTables,
    out: &mut CudaSlice<u64>,
    count: u64,
) -> Result<()> {
    at_least("powers-of-H kernel", "H^32", tables.hseg.len(), 2)?;
    at_least(
        "powers-of-H kernel",
        "powers of H",
        out.len(),
        count.saturating_mul(2),
    )?;
    let from = 0u64;
    let cfg = LaunchConfig {
        grid_dim: (grid_x(count), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `cs_hpowers(const u64 *hseg, u64 *hpow, u64 from, u64 count)`, argument for
    // argument. Thread s (s < count, the others return) reads hseg[0..2] and writes
    // hpow[2s..2s+2]: `out` holds 2 * count words and hseg 2 (checked above). The grid bounds
    // which powers get computed, not what is touched.
    unsafe {
        stream
            .launch_builder(&k.hpowers)
            .arg(&tables.hseg)
            .arg(out)
            .arg(&from)
            .arg(&count)
            .launch(cfg)
    }
    .map(|_| ())
    .map_err(drv("powers-of-H kernel"))
}

/// cs_ghash: XORs each chunk's GHASH (without `E_K(J0)`) into `acc[4i..4i+4]`, `i` its index
/// in `descs`.
#[allow(clippy::too_many_arguments)] // one per kernel parameter, plus the kernels and stream
pub(super) fn ghash(
    k: &Kernels,
    stream: &Arc<CudaStream>,
    tables: &KeyTables,
    hpow: &CudaSlice<u64>,
    descs: &DeviceDescs,
    src: &CudaView<'_, u8>,
    aad: &CudaView<'_, u8>,
    acc: &mut CudaViewMut<'_, u32>,
) -> Result<()> {
    const K: &str = "GHASH kernel launch";
    at_least(K, "H tables", tables.htab.len(), 32)?;
    at_least(
        K,
        "powers of H",
        hpow.len(),
        descs.max_segments.saturating_mul(2),
    )?;
    at_least(K, "input", src.len(), descs.src_end)?;
    at_least(K, "associated data", aad.len(), descs.aad_end)?;
    at_least(K, "tag accumulators", acc.len(), 4 * u64::from(descs.count))?;
    let cfg = LaunchConfig {
        grid_dim: (grid_x(descs.max_segments), descs.count, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `cs_ghash(const u64 *htab, const u64 *hpow, const u64 *desc, const u8 *src,
    // const u8 *aadbuf, u32 *acc)`, argument for argument, 256 threads per block as the kernel
    // requires (its shared tables are filled by threads 0..16). Block row y = chunk y < count
    // (grid.y = count); its threads stride over the chunk's segments whatever grid.x is, reading
    // src[src, src+len), aadbuf[aad_off, aad_off+aad_len), hpow[0..2*segments] and htab[0..32],
    // and XOR into acc[4y..4y+4]. Every such range was checked above: `descs` computed the
    // furthest ends from the words it uploaded.
    unsafe {
        stream
            .launch_builder(&k.ghash)
            .arg(&tables.htab)
            .arg(hpow)
            .arg(&descs.buf)
            .arg(src)
            .arg(aad)
            .arg(acc)
            .launch(cfg)
    }
    .map(|_| ())
    .map_err(drv(K))
}

/// The AES-CTR kernel of variant `v`: `dst = src XOR keystream` over each chunk's range.
pub(super) fn ctr(
    k: &Kernels,
    v: CtrVariant,
    stream: &Arc<CudaStream>,
    tables: &KeyTables,
    descs: &DeviceDescs,
    src: &CudaView<'_, u8>,
    dst: &mut CudaViewMut<'_, u8>,
) -> Result<()> {
    const K: &str = "AES-CTR kernel launch";
    let f = k.ctr[v.index()]
        .as_ref()
        .map_err(|e| backend_err("AES-CTR kernel", e))?;
    at_least(K, "te0", tables.te0.len(), 256)?;
    at_least(K, "round keys", tables.rk.len(), 60)?;
    at_least(K, "input", src.len(), descs.src_end)?;
    at_least(K, "output", dst.len(), descs.dst_end)?;
    let cfg = LaunchConfig {
        grid_dim: (ctr_grid_x(descs.max_blocks, v.threads()), descs.count, 1),
        block_dim: (v.threads(), 1, 1),
        shared_mem_bytes: v.dynamic_smem(),
    };
    // SAFETY: `cs_ctr*(const u32 *te0, const u32 *rk, const u64 *desc, const u8 *src, u8 *dst)`
    // (every variant has this signature), argument for argument. Block row y = chunk y < count
    // (grid.y = count); its threads stride over the chunk's keystream blocks whatever grid.x is,
    // reading te0[0..256], rk[0..60] and src[src, src+len) and writing dst[dst, dst+len) only,
    // each checked above (`descs` computed the furthest ends from the words it uploaded). Block
    // size and dynamic shared memory are the variant's: the `__launch_bounds__` of its kernel
    // and the limit `load_ctr` configured.
    unsafe {
        stream
            .launch_builder(f)
            .arg(&tables.te0)
            .arg(&tables.rk)
            .arg(&descs.buf)
            .arg(src)
            .arg(dst)
            .launch(cfg)
    }
    .map(|_| ())
    .map_err(drv(K))
}

/// One row of a gather, as cs_gather_rows reads it: `pairs[2r]`, `pairs[2r + 1]`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct GatherPair {
    /// Byte offset of the row in the source.
    src: u64,
    /// Byte offset of the row in the destination.
    dst: u64,
}

const _: () = assert!(std::mem::size_of::<GatherPair>() == 16);

// SAFETY: `#[repr(C)]`, two u64 and no padding (asserted above): two consecutive words of the
// kernel's `pairs`.
unsafe impl DeviceRepr for GatherPair {}

/// cs_gather_rows, once per job: checks every job's rows against its buffers, uploads every
/// pair once, then enqueues the jobs on `stream`. Nothing is enqueued if a check fails.
pub(super) fn gather_rows(
    f: &cudarc::driver::CudaFunction,
    stream: &Arc<CudaStream>,
    jobs: &[GatherJob<'_>],
    pairs: &[(u64, u64)],
    dsts: &mut [CudaSlice<u8>],
) -> Result<()> {
    for (n, job) in jobs.iter().enumerate() {
        let dst = dsts.get(job.dst).ok_or_else(|| {
            Error::InvalidArgument(format!("gather job {n}: no destination {}", job.dst))
        })?;
        let rows = pairs.get(job.pairs.clone()).ok_or_else(|| {
            Error::InvalidArgument(format!("gather job {n}: pair range out of the list"))
        })?;
        check_pairs(rows, job.row_bytes, job.src.len() as u64, dst.len() as u64)?;
        u32::try_from(rows.len())
            .map_err(|_| Error::InvalidArgument("more than 2^32 rows in one gather".into()))?;
    }
    if pairs.is_empty() {
        return Ok(());
    }
    let flat: Vec<GatherPair> = pairs
        .iter()
        .map(|&(src, dst)| GatherPair { src, dst })
        .collect();
    let d_pairs = stream
        .clone_htod(&flat[..])
        .map_err(|e| gather_err("uploading gather offsets", e))?;
    for job in jobs {
        if job.pairs.is_empty() || job.row_bytes == 0 {
            continue;
        }
        let rows = job.pairs.len() as u32; // checked above
        let view = d_pairs.slice(job.pairs.clone());
        let dst = &mut dsts[job.dst];
        let cfg = LaunchConfig {
            grid_dim: (rows.min(MAX_GRID_X as u32), 1, 1),
            block_dim: (GATHER_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `cs_gather_rows(const u8 *src, u8 *dst, const u64 *pairs, unsigned int rows,
        // unsigned long long row_bytes)`, argument for argument. Blocks stride over the rows
        // whatever the grid is; row r < rows reads pairs[2r..2r+2] (`view` holds exactly rows
        // pairs) and copies src[s, s+row_bytes) to dst[d, d+row_bytes), both checked above
        // against `job.src` and this destination for every pair of the job.
        unsafe {
            stream
                .launch_builder(f)
                .arg(job.src)
                .arg(dst)
                .arg(&view)
                .arg(&rows)
                .arg(&job.row_bytes)
                .launch(cfg)
        }
        .map_err(|e| gather_err("gather kernel launch", e))?;
    }
    Ok(())
}

/// Every row range `[offset, offset + row_bytes)` inside its buffer.
fn check_pairs(pairs: &[(u64, u64)], row_bytes: u64, sl: u64, dl: u64) -> Result<()> {
    for (i, &(s, d)) in pairs.iter().enumerate() {
        if s.checked_add(row_bytes).is_none_or(|e| e > sl)
            || d.checked_add(row_bytes).is_none_or(|e| e > dl)
        {
            return Err(Error::InvalidArgument(format!(
                "gather row {i}: range outside the source ({sl} B) or destination ({dl} B)"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of `#define NAME value` in kernels/aes_core.h.
    fn core_define(name: &str) -> u64 {
        let h = include_str!("../../../kernels/aes_core.h");
        let line = h
            .lines()
            .find(|l| l.starts_with(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("{name} not defined in aes_core.h"));
        let v = line.split_whitespace().nth(2).expect("a value");
        v.trim_end_matches("ull").parse().expect("a number")
    }

    #[test]
    fn constants_match_the_kernel_header() {
        assert_eq!(
            core_define("CS_DESC_WORDS") as usize * 8,
            std::mem::size_of::<ChunkDesc>()
        );
        assert_eq!(core_define("CS_SEG_BLOCKS"), SEG_BLOCKS);
        assert_eq!(core_define("CS_FLAG_PLAIN"), FLAG_PLAIN);
        let cu = include_str!("../../../kernels/aes_gcm.cu");
        assert!(cu.contains(&format!("#define CS_THREADS {THREADS}")));
    }

    #[test]
    fn descriptor_matches_the_kernel_layout() {
        let nonce = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
        let d = ChunkDesc::new(&nonce, 16, 32, 100)
            .seek(7)
            .aad(48, 89)
            .plain(true);
        let words: [u64; 8] = [
            d.src,
            d.dst,
            d.len,
            d.seek,
            d.nonce_lo,
            d.nonce_hi,
            d.aad_off,
            d.aad_len_flags,
        ];
        assert_eq!(
            words,
            [
                16,
                32,
                100,
                7,
                0x0807_0605_0403_0201,
                0x0c0b_0a09,
                48,
                89 | 1 << 48
            ]
        );
        // The struct is those words in that order.
        for (i, off) in [
            std::mem::offset_of!(ChunkDesc, src),
            std::mem::offset_of!(ChunkDesc, dst),
            std::mem::offset_of!(ChunkDesc, len),
            std::mem::offset_of!(ChunkDesc, seek),
            std::mem::offset_of!(ChunkDesc, nonce_lo),
            std::mem::offset_of!(ChunkDesc, nonce_hi),
            std::mem::offset_of!(ChunkDesc, aad_off),
            std::mem::offset_of!(ChunkDesc, aad_len_flags),
        ]
        .into_iter()
        .enumerate()
        {
            assert_eq!(off, 8 * i);
        }
        assert!(d.is_plain() && d.aad_len() == 89);
        assert_eq!(d.plain(false).aad_len_flags, 89);
        assert_eq!(d.aad(0, 5).aad_len_flags, 5 | 1 << 48);
        // Blocks: 6 AAD + 7 data + 1 length = 14 -> one 32-block segment; plain: 12 + 1.
        let seg = |aad: u64, len: u64, plain: bool| {
            ChunkDesc::new(&nonce, 0, 0, len)
                .aad(0, aad)
                .plain(plain)
                .ghash_segments()
        };
        assert_eq!(seg(89, 100, false), 1);
        assert_eq!(seg(89, 100, true), 1);
        assert_eq!(seg(0, 32 * 16, false), 2);
        assert_eq!(seg(89, 4 << 20, false), (6 + (1 << 18) + 1u64).div_ceil(32));
        assert_eq!(ChunkDesc::new(&nonce, 0, 0, 17).seek(15).ctr_blocks(), 2);
    }

    #[test]
    fn ctr_grids_cover_every_block() {
        // Enough threads for every block: grid.x * threads * 32 >= blocks.
        for blocks in [1u64, 31, 32, 33, 262_144, 1 << 30] {
            for v in CtrVariant::ALL {
                let g = u64::from(ctr_grid_x(blocks, v.threads()));
                assert!(g * u64::from(v.threads()) * CTR_BLOCKS_PER_THREAD >= blocks);
                assert!(g >= 1);
            }
        }
        assert_eq!(ctr_grid_x(0, 256), 1);
        assert_eq!(grid_x(0), 1);
        assert_eq!(grid_x(257), 2);
    }

    #[test]
    fn gather_pairs_outside_their_buffers_are_refused() {
        assert!(check_pairs(&[(0, 0), (10, 20)], 10, 20, 30).is_ok());
        assert!(check_pairs(&[(11, 0)], 10, 20, 30).is_err());
        assert!(check_pairs(&[(0, 21)], 10, 20, 30).is_err());
        assert!(check_pairs(&[(u64::MAX, 0)], 1, u64::MAX, 30).is_err());
    }
}
