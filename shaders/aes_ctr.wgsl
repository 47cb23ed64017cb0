// AES-256-CTR keystream XOR over 16-byte blocks, in place, on u32 words.
//
// GCM's counter mode: block i of a dispatch is encrypted with the counter block
// nonce || (ctr0 + i) (32-bit big-endian counter, wrapping modulo 2^32 as inc32 specifies).
// The host pads the data into a block-aligned region, so an unaligned head or tail is only zeros
// here. Round keys are FIPS-197 big-endian words; data words are read little-endian from bytes,
// hence the byte swap of each keystream word before the XOR.
//
// One T-table (T0; T1..T3 are its byte rotations, and the S-box is its second byte). By default
// each workgroup copies it into workgroup memory (1 KiB, one word per invocation) so the random
// lookups hit on-chip memory; `shared_table = false` reads the storage buffer instead (an
// alternative to measure per adapter).

override shared_table: bool = true;

struct Params {
    // Nonce as three big-endian words, then the counter of the dispatch's first block.
    nonce_ctr: vec4<u32>,
    // Number of blocks in this dispatch.
    blocks: u32,
    // Invocations per row of the dispatch grid (workgroups in x times the workgroup size).
    row_stride: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> round_keys: array<vec4<u32>, 15>;
@group(0) @binding(1) var<storage, read> t0_table: array<u32, 256>;
@group(0) @binding(2) var<uniform> params: Params;
@group(0) @binding(3) var<storage, read_write> data: array<vec4<u32>>;

var<workgroup> t0: array<u32, 256>;

fn rotr(x: u32, n: u32) -> u32 {
    return (x >> n) | (x << (32u - n));
}

fn bswap(x: u32) -> u32 {
    return (x << 24u) | ((x & 0xff00u) << 8u) | ((x >> 8u) & 0xff00u) | (x >> 24u);
}

fn table(x: u32) -> u32 {
    if (shared_table) {
        return t0[x];
    }
    return t0_table[x];
}

fn sbox(x: u32) -> u32 {
    return (table(x) >> 16u) & 0xffu;
}

fn round_word(a: u32, b: u32, c: u32, d: u32, k: u32) -> u32 {
    return table(a >> 24u) ^ rotr(table((b >> 16u) & 0xffu), 8u)
        ^ rotr(table((c >> 8u) & 0xffu), 16u) ^ rotr(table(d & 0xffu), 24u) ^ k;
}

fn last_word(a: u32, b: u32, c: u32, d: u32, k: u32) -> u32 {
    return ((sbox(a >> 24u) << 24u) | (sbox((b >> 16u) & 0xffu) << 16u)
        | (sbox((c >> 8u) & 0xffu) << 8u) | sbox(d & 0xffu)) ^ k;
}

@compute @workgroup_size(256)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if (shared_table) {
        t0[lid] = t0_table[lid];
        workgroupBarrier();
    }

    let i = gid.x + gid.y * params.row_stride;
    if (i >= params.blocks) {
        return;
    }

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
