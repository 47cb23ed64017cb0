// GHASH partial sums over the ciphertext blocks of one piece, on u32 words.
//
// Field elements are 128-bit big-endian integers in four words (w.x most significant); GCM's
// bit order makes "multiply by x" a right shift with 0xE1 << 120 folded in.
//
// The piece's `blocks` blocks are prefixed with `pad` zero blocks (they add nothing) so that the
// virtual stream splits into whole workgroups of `SEGMENT * 256` blocks. Invocation t of a
// workgroup runs Horner's rule over its SEGMENT blocks with the 4-bit Shoup table of H (in
// workgroup memory), then multiplies by powers[t] = H^(SEGMENT * (255 - t)), the power that
// places its segment relative to the end of the workgroup's span. The workgroup XOR-reduces the
// 256 results into partials[workgroup]; the host combines the workgroup partials by Horner's rule
// with H^(SEGMENT * 256) (few per piece) and adds the AAD and length blocks.

// Blocks per invocation (the host reads the same value).
override SEGMENT: u32 = 16u;

struct Params {
    // Blocks of ciphertext in the bound data.
    blocks: u32,
    // Zero blocks before them in the virtual stream.
    pad: u32,
    // Workgroups in the virtual stream.
    groups: u32,
    // Workgroups per row of the dispatch grid.
    row_groups: u32,
}

struct HashTables {
    // shoup[i] = (i as the coefficients of x^0..x^3) * H.
    shoup: array<vec4<u32>, 16>,
    // Reduction of the 4 bits shifted out by a multiply by x^4 (top word only; the rest is 0).
    rem: array<u32, 16>,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> tables: HashTables;
@group(0) @binding(2) var<storage, read> powers: array<vec4<u32>, 256>;
@group(0) @binding(3) var<storage, read> data: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read_write> partials: array<vec4<u32>>;

var<workgroup> shoup: array<vec4<u32>, 16>;
var<workgroup> rem: array<u32, 16>;
var<workgroup> sums: array<vec4<u32>, 256>;

fn bswap(x: u32) -> u32 {
    return (x << 24u) | ((x & 0xff00u) << 8u) | ((x >> 8u) & 0xff00u) | (x >> 24u);
}

// z * H by the Shoup table: nibbles from the least significant end, Z = Z * x^4 ^ T[nibble].
fn mul_h(z: vec4<u32>) -> vec4<u32> {
    var acc = vec4<u32>(0u);
    for (var w = 0u; w < 4u; w++) {
        let word = z[3u - w];
        for (var s = 0u; s < 32u; s += 4u) {
            let r = acc.w & 0xfu;
            acc = vec4<u32>(
                (acc.x >> 4u) ^ rem[r],
                (acc.y >> 4u) | (acc.x << 28u),
                (acc.z >> 4u) | (acc.y << 28u),
                (acc.w >> 4u) | (acc.z << 28u),
            );
            acc ^= shoup[(word >> s) & 0xfu];
        }
    }
    return acc;
}

// a * b, bit by bit (once per invocation, for the segment's power).
fn mul(a: vec4<u32>, b: vec4<u32>) -> vec4<u32> {
    var z = vec4<u32>(0u);
    var v = b;
    for (var i = 0u; i < 128u; i++) {
        let bit = (a[i >> 5u] >> (31u - (i & 31u))) & 1u;
        z ^= v & vec4<u32>(0u - bit);
        let lsb = v.w & 1u;
        v = vec4<u32>(
            (v.x >> 1u) ^ (0xe1000000u & (0u - lsb)),
            (v.y >> 1u) | (v.x << 31u),
            (v.z >> 1u) | (v.y << 31u),
            (v.w >> 1u) | (v.z << 31u),
        );
    }
    return z;
}

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if (lid < 16u) {
        shoup[lid] = tables.shoup[lid];
        rem[lid] = tables.rem[lid];
    }
    workgroupBarrier();

    let group = wid.x + wid.y * params.row_groups;
    var acc = vec4<u32>(0u);
    if (group < params.groups) {
        let first = (group * 256u + lid) * SEGMENT;
        for (var k = 0u; k < SEGMENT; k++) {
            let v = first + k;
            var block = vec4<u32>(0u);
            if (v >= params.pad) {
                let d = data[v - params.pad];
                block = vec4<u32>(bswap(d.x), bswap(d.y), bswap(d.z), bswap(d.w));
            }
            acc = mul_h(acc ^ block);
        }
        acc = mul(acc, powers[lid]);
    }
    sums[lid] = acc;
    workgroupBarrier();
    for (var width = 128u; width > 0u; width >>= 1u) {
        if (lid < width) {
            sums[lid] ^= sums[lid + width];
        }
        workgroupBarrier();
    }
    if (lid == 0u && group < params.groups) {
        partials[group] = sums[0];
    }
}
