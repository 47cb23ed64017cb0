// AES-256-CTR keystream XOR over 16-byte blocks, in place, on u32 words. Prefixed on the host
// with `aes_core.wgsl` (overrides, T-table, round functions).
//
// GCM's counter mode: block i of a dispatch is encrypted with the counter block
// nonce || (ctr0 + i) (32-bit big-endian counter, wrapping modulo 2^32 as inc32 specifies).
// The host pads the data into a block-aligned region, so an unaligned head or tail is only zeros
// here.
//
// Variants, picked at pipeline creation (measured per adapter by `kernel_bench`):
// - `main`: one block per invocation, or `LOOP` blocks one after another; `main4`: four blocks
//   per invocation, their state words held as the lanes of vec4s so the four blocks' table
//   lookups are independent (ILP);
// - the core's overrides `WG`, `shared_table` and `COPIES` (see `aes_core.wgsl`).
// Workgroup w covers blocks [w * WG * n, (w + 1) * WG * n) for n blocks per invocation; block j
// of an invocation is at w * WG * n + j * WG + local index, so every load/store is coalesced.

struct Params {
    // Nonce as three big-endian words, then the counter of the dispatch's first block.
    nonce_ctr: vec4<u32>,
    // Number of blocks in this dispatch.
    blocks: u32,
    // Workgroups per row of the dispatch grid.
    row_groups: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> round_keys: array<vec4<u32>, 15>;
@group(0) @binding(1) var<storage, read> t0_table: array<u32, 256>;
@group(0) @binding(2) var<uniform> params: Params;
@group(0) @binding(3) var<storage, read_write> data: array<vec4<u32>>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    load_table(lid);
    let first = (wid.x + wid.y * params.row_groups) * WG * LOOP + lid;
    for (var it = 0u; it < LOOP; it++) {
        let i = first + it * WG;
        if (i >= params.blocks) {
            return;
        }
        ctr_block(i);
    }
}

// Keystream block `i` of the dispatch XORed into `data[i]`.
fn ctr_block(i: u32) {
    let k0 = round_keys[0];
    var s0 = params.nonce_ctr.x ^ k0.x;
    var s1 = params.nonce_ctr.y ^ k0.y;
    var s2 = params.nonce_ctr.z ^ k0.z;
    var s3 = (params.nonce_ctr.w + i) ^ k0.w;
    for (var r = 1u; r < 14u; r++) {
        let k = round_keys[r];
        let n0 = round_word(s0, s1, s2, s3, k.x);
        let n1 = round_word(s1, s2, s3, s0, k.y);
        let n2 = round_word(s2, s3, s0, s1, k.z);
        let n3 = round_word(s3, s0, s1, s2, k.w);
        s0 = n0;
        s1 = n1;
        s2 = n2;
        s3 = n3;
    }
    let k = round_keys[14];
    let ks = vec4<u32>(
        bswap(last_word(s0, s1, s2, s3, k.x)),
        bswap(last_word(s1, s2, s3, s0, k.y)),
        bswap(last_word(s2, s3, s0, s1, k.z)),
        bswap(last_word(s3, s0, s1, s2, k.w)),
    );
    data[i] = data[i] ^ ks;
}

// Four blocks per invocation: lane j of s0..s3 is word 0..3 of the state of block j.
@compute @workgroup_size(WG)
fn main4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    load_table(lid);
    let first = (wid.x + wid.y * params.row_groups) * WG * 4u + lid;
    if (first >= params.blocks) {
        return;
    }
    let idx = vec4<u32>(first, first + WG, first + 2u * WG, first + 3u * WG);

    let k0 = round_keys[0];
    var s0 = vec4<u32>(params.nonce_ctr.x ^ k0.x);
    var s1 = vec4<u32>(params.nonce_ctr.y ^ k0.y);
    var s2 = vec4<u32>(params.nonce_ctr.z ^ k0.z);
    var s3 = (vec4<u32>(params.nonce_ctr.w) + idx) ^ vec4<u32>(k0.w);
    for (var r = 1u; r < 14u; r++) {
        let k = round_keys[r];
        let n0 = round_word4(s0, s1, s2, s3, k.x);
        let n1 = round_word4(s1, s2, s3, s0, k.y);
        let n2 = round_word4(s2, s3, s0, s1, k.z);
        let n3 = round_word4(s3, s0, s1, s2, k.w);
        s0 = n0;
        s1 = n1;
        s2 = n2;
        s3 = n3;
    }
    let k = round_keys[14];
    let w0 = bswap4(last_word4(s0, s1, s2, s3, k.x));
    let w1 = bswap4(last_word4(s1, s2, s3, s0, k.y));
    let w2 = bswap4(last_word4(s2, s3, s0, s1, k.z));
    let w3 = bswap4(last_word4(s3, s0, s1, s2, k.w));
    // Block j's keystream is lane j of each word.
    var ks = array<vec4<u32>, 4>(
        vec4<u32>(w0.x, w1.x, w2.x, w3.x),
        vec4<u32>(w0.y, w1.y, w2.y, w3.y),
        vec4<u32>(w0.z, w1.z, w2.z, w3.z),
        vec4<u32>(w0.w, w1.w, w2.w, w3.w),
    );
    for (var j = 0u; j < 4u; j++) {
        let i = idx[j];
        if (i < params.blocks) {
            data[i] = data[i] ^ ks[j];
        }
    }
}
