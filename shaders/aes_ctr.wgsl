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

//
// Variants, picked at pipeline creation (measured per adapter by `kernel_bench`):
// - `main`: one block per invocation; `main4`: four blocks per invocation, their state words
//   held as the lanes of vec4s so the four blocks' table lookups are independent (ILP);
// - `WG`: the workgroup size (256 or 512);
// - `shared_table`: the table in workgroup memory or read from the storage buffer;
// - `COPIES`: 1, or 32 copies of the table interleaved so that entry x of copy c sits at word
//   32x + c, and invocation i reads copy i mod 32 only: with 32 four-byte banks (NVIDIA, AMD)
//   every lane of a 32-wide wave reads its own bank, so lookups never conflict (and their
//   timing does not depend on the secret indices through bank conflicts). 32 KiB per workgroup.
// Workgroup w covers blocks [w * WG * n, (w + 1) * WG * n) for n blocks per invocation; block j
// of an invocation is at w * WG * n + j * WG + local index, so every load/store is coalesced.

override shared_table: bool = true;
override WG: u32 = 256u;
override COPIES: u32 = 1u;

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

var<workgroup> t0: array<u32, 256u * COPIES>;
// This invocation's table copy (0 with one copy).
var<private> lane: u32;

fn rotr(x: u32, n: u32) -> u32 {
    return (x >> n) | (x << (32u - n));
}

fn bswap(x: u32) -> u32 {
    return (x << 24u) | ((x & 0xff00u) << 8u) | ((x >> 8u) & 0xff00u) | (x >> 24u);
}

fn table(x: u32) -> u32 {
    if (shared_table) {
        if (COPIES == 1u) {
            return t0[x];
        }
        return t0[(x << 5u) | lane];
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

fn load_table(lid: u32) {
    if (shared_table) {
        if (COPIES == 1u) {
            for (var x = lid; x < 256u; x += WG) {
                t0[x] = t0_table[x];
            }
        } else {
            lane = lid & 31u;
            for (var w = lid; w < 8192u; w += WG) {
                t0[w] = t0_table[w >> 5u];
            }
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    load_table(lid);
    let i = (wid.x + wid.y * params.row_groups) * WG + lid;
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

fn table4(x: vec4<u32>) -> vec4<u32> {
    return vec4<u32>(table(x.x), table(x.y), table(x.z), table(x.w));
}

fn rotr4(x: vec4<u32>, n: u32) -> vec4<u32> {
    return (x >> vec4<u32>(n)) | (x << vec4<u32>(32u - n));
}

fn round_word4(a: vec4<u32>, b: vec4<u32>, c: vec4<u32>, d: vec4<u32>, k: u32) -> vec4<u32> {
    let m = vec4<u32>(0xffu);
    return table4(a >> vec4<u32>(24u)) ^ rotr4(table4((b >> vec4<u32>(16u)) & m), 8u)
        ^ rotr4(table4((c >> vec4<u32>(8u)) & m), 16u) ^ rotr4(table4(d & m), 24u)
        ^ vec4<u32>(k);
}

fn sbox4(x: vec4<u32>) -> vec4<u32> {
    return (table4(x) >> vec4<u32>(16u)) & vec4<u32>(0xffu);
}

fn last_word4(a: vec4<u32>, b: vec4<u32>, c: vec4<u32>, d: vec4<u32>, k: u32) -> vec4<u32> {
    let m = vec4<u32>(0xffu);
    let w = (sbox4(a >> vec4<u32>(24u)) << vec4<u32>(24u))
        | (sbox4((b >> vec4<u32>(16u)) & m) << vec4<u32>(16u))
        | (sbox4((c >> vec4<u32>(8u)) & m) << vec4<u32>(8u)) | sbox4(d & m);
    return w ^ vec4<u32>(k);
}

fn bswap4(x: vec4<u32>) -> vec4<u32> {
    return vec4<u32>(bswap(x.x), bswap(x.y), bswap(x.z), bswap(x.w));
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
