// AES-256-CTR in place over many chunks of one window buffer in one dispatch, each chunk with its
// own key and nonce (GCM counters: the chunk's first block uses nonce || 2). Prefixed on the host
// with `aes_core.wgsl` (overrides `WG`, `shared_table`, `COPIES`, T-table, round functions).
//
// One block per invocation. Global block i of the dispatch belongs to the last chunk whose
// `first_block` is <= i (the host lists chunks in order of `first_block`, the first at 0, and
// leaves out empty ones), found by binary search over the chunk table. A chunk's last partial
// block is XORed whole: the host keeps chunks 16-byte aligned, and the bytes past a chunk's
// length up to the block boundary are padding that gets keystream garbage.
//
// The grid is 2-D when the blocks exceed one row of workgroups: workgroup (x, y) is number
// x + y * row_groups.

struct BatchParams {
    // Blocks in the dispatch (sum of every chunk's block count).
    blocks: u32,
    // Workgroups per row of the dispatch grid.
    row_groups: u32,
    // Entries in the chunk table.
    chunks: u32,
    _pad: u32,
}

struct Chunk {
    // Global block index (in the dispatch) of the chunk's first block.
    first_block: u32,
    // The chunk's first block in the window buffer (byte offset / 16).
    block_offset: u32,
    // Blocks in the chunk.
    blocks: u32,
    // Index of the chunk's key in `round_keys` (15 vec4 per key).
    key: u32,
    // The 96-bit nonce as three big-endian words.
    nonce0: u32,
    nonce1: u32,
    nonce2: u32,
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> round_keys: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read> t0_table: array<u32, 256>;
@group(0) @binding(2) var<uniform> params: BatchParams;
@group(0) @binding(3) var<storage, read> chunks: array<Chunk>;
@group(0) @binding(4) var<storage, read_write> data: array<vec4<u32>>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // Every invocation takes part in the table copy (it ends with a barrier).
    load_table(lid);
    let i = (wid.x + wid.y * params.row_groups) * WG + lid;
    if (i >= params.blocks) {
        return;
    }
    // Invariant: chunks[lo].first_block <= i, and the answer lies in [lo, hi).
    var lo = 0u;
    var hi = params.chunks;
    while (hi - lo > 1u) {
        let mid = (lo + hi) / 2u;
        if (chunks[mid].first_block <= i) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let c = chunks[lo];
    let j = i - c.first_block;
    let kb = c.key * 15u;

    let k0 = round_keys[kb];
    var s0 = c.nonce0 ^ k0.x;
    var s1 = c.nonce1 ^ k0.y;
    var s2 = c.nonce2 ^ k0.z;
    // GCM's inc32: the counter wraps modulo 2^32.
    var s3 = (2u + j) ^ k0.w;
    for (var r = 1u; r < 14u; r++) {
        let k = round_keys[kb + r];
        let n0 = round_word(s0, s1, s2, s3, k.x);
        let n1 = round_word(s1, s2, s3, s0, k.y);
        let n2 = round_word(s2, s3, s0, s1, k.z);
        let n3 = round_word(s3, s0, s1, s2, k.w);
        s0 = n0;
        s1 = n1;
        s2 = n2;
        s3 = n3;
    }
    let k = round_keys[kb + 14u];
    let ks = vec4<u32>(
        bswap(last_word(s0, s1, s2, s3, k.x)),
        bswap(last_word(s1, s2, s3, s0, k.y)),
        bswap(last_word(s2, s3, s0, s1, k.z)),
        bswap(last_word(s3, s0, s1, s2, k.w)),
    );
    let b = c.block_offset + j;
    data[b] = data[b] ^ ks;
}
