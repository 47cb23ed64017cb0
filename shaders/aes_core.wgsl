// AES-256 core shared by the CTR kernels (`aes_ctr.wgsl`, `aes_ctr_batch.wgsl`): each kernel's
// source is this file followed by the entry file (concatenated on the host), and each entry file
// declares the storage table `t0_table` that `load_table` reads (module-scope names are
// order-independent in WGSL).
//
// Round keys are FIPS-197 big-endian words; data words are read little-endian from bytes,
// hence the byte swap of each keystream word before the XOR.
//
// One T-table (T0; T1..T3 are its byte rotations, and the S-box is its second byte). By default
// each workgroup copies it into workgroup memory (1 KiB, one word per invocation) so the random
// lookups hit on-chip memory; `shared_table = false` reads the storage buffer instead (an
// alternative to measure per adapter).
//
// Overrides, picked at pipeline creation (measured per adapter by `kernel_bench`):
// - `WG`: the workgroup size (256 or 512);
// - `shared_table`: the table in workgroup memory or read from the storage buffer;
// - `COPIES`: 1, or 32 copies of the table interleaved so that entry x of copy c sits at word
//   32x + c, and invocation i reads copy i mod 32 only: with 32 four-byte banks (NVIDIA, AMD)
//   every lane of a 32-wide wave reads its own bank, so lookups never conflict (and their
//   timing does not depend on the secret indices through bank conflicts). 32 KiB per workgroup.

override shared_table: bool = true;
override WG: u32 = 256u;
override COPIES: u32 = 1u;
// Blocks each invocation of `aes_ctr.wgsl`'s `main` encrypts one after another (1, or more so
// that the table copy into workgroup memory is shared by more blocks).
override LOOP: u32 = 1u;

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
