//! What the Rust side and the WGSL kernels agree on: the `#[repr(C)]` parameter structs, each
//! mirroring a struct of a shader field for field (`bytemuck` writes them as the bytes the
//! shader reads: keep both sides in step), and the kernels' fixed shapes.
#![forbid(unsafe_code)]

/// Ciphertext blocks per GHASH invocation (`shaders/ghash.wgsl`'s override `SEGMENT`, set to
/// this at pipeline creation).
pub(super) const GHASH_SEGMENT: u64 = 16;
/// GHASH invocations per workgroup (`shaders/ghash.wgsl`'s `@workgroup_size`).
pub(super) const GHASH_WORKGROUP: u64 = 256;
/// Blocks per GHASH workgroup: the host combines one partial sum per this many blocks.
pub(super) const GHASH_GROUP_BLOCKS: u64 = GHASH_SEGMENT * GHASH_WORKGROUP;
/// Invocations per gather workgroup (`shaders/gather.wgsl`'s `GATHER_WG`).
pub(super) const GATHER_WG: u64 = 256;

/// GHASH workgroups (partial sums) for `blocks` blocks.
pub(super) fn ghash_groups(blocks: u64) -> u64 {
    blocks.div_ceil(GHASH_GROUP_BLOCKS).max(1)
}

/// `shaders/aes_ctr.wgsl`'s `Params`: one CTR dispatch of the standalone kernel.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct Params {
    /// The nonce as three big-endian words, then the counter of the dispatch's first block.
    pub(super) nonce_ctr: [u32; 4],
    /// Blocks in this dispatch (exactly the bound `data`).
    pub(super) blocks: u32,
    /// Workgroups per row of the dispatch grid.
    pub(super) row_groups: u32,
    pub(super) _pad: [u32; 2],
}

/// `shaders/ghash.wgsl`'s `Params`: one GHASH dispatch.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct GhashParams {
    /// Ciphertext blocks in the bound data.
    pub(super) blocks: u32,
    /// Zero blocks before them in the virtual stream.
    pub(super) pad: u32,
    /// Workgroups in the virtual stream.
    pub(super) groups: u32,
    /// Workgroups per row of the dispatch grid.
    pub(super) row_groups: u32,
}

/// `shaders/aes_ctr_batch.wgsl`'s `BatchParams`: one window's CTR dispatch.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct BatchParams {
    /// Blocks in the dispatch (every chunk's block count, summed).
    pub(super) blocks: u32,
    /// Workgroups per row of the dispatch grid.
    pub(super) row_groups: u32,
    /// Entries in the chunk table.
    pub(super) chunks: u32,
    pub(super) _pad: u32,
}

/// `shaders/aes_ctr_batch.wgsl`'s `Chunk`: one entry of a window's chunk table.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct ChunkEntry {
    /// Index in the dispatch of the chunk's first block.
    pub(super) first_block: u32,
    /// The chunk's first block in the window buffer (byte offset / 16).
    pub(super) block_offset: u32,
    /// Blocks in the chunk.
    pub(super) blocks: u32,
    /// Index of the chunk's key (15 round keys each).
    pub(super) key: u32,
    /// The chunk's nonce as three big-endian words.
    pub(super) nonce: [u32; 3],
    pub(super) _pad: u32,
}

/// `shaders/gather.wgsl`'s `GatherParams`: one gather dispatch (entries at dynamic offsets).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct GatherParams {
    /// This dispatch's first pair in the pairs buffer.
    pub(super) pair_start: u32,
    /// Pairs in this dispatch.
    pub(super) pairs: u32,
    /// Bytes per row (at least 1).
    pub(super) row_bytes: u32,
    /// Destination words per pair: `ceil(row_bytes / 4) + 1`.
    pub(super) span: u32,
    /// Workgroups per row of the dispatch grid.
    pub(super) row_groups: u32,
    pub(super) _pad: [u32; 3],
}

/// The nonce as the three big-endian words the kernels read.
pub(super) fn nonce_words(nonce: &[u8; crate::cipher::NONCE_LEN]) -> [u32; 3] {
    [0, 4, 8].map(|i| u32::from_be_bytes(nonce[i..i + 4].try_into().expect("4 bytes")))
}
