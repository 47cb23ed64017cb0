// Row gather: for each pair p = (src byte offset, dst byte offset) of a job, copies `row_bytes`
// bytes from the window buffer `src` into the column buffer `dst`. Any alignment, any
// row_bytes >= 1.
//
// WGSL has no bytes, so the copy works on u32 words (little-endian bytes). Invocation
// (pair p, word t) owns dst word floor(dst / 4) + t (t < span = ceil(row_bytes / 4) + 1, enough
// for any misalignment); it builds the bytes of that word that belong to the row from at most
// two source words (loads + shifts), and writes them with atomicStore when all four bytes are
// the row's, atomicOr otherwise: neighbouring rows share their boundary words, possibly written
// by another job's dispatch in the same submission. The host clears `dst` first (clear_buffer in
// the same submission), so the ORs assemble shared words race-free; bytes no row covers stay
// zero.
//
// Per-dispatch parameters come from one uniform buffer at a dynamic offset (a queue write
// between dispatches of one submission would not be seen separately). Grid: 2-D when the
// invocations exceed one row of workgroups; workgroup (x, y) is number x + y * row_groups.

struct GatherParams {
    // This dispatch's first pair in `pairs`.
    pair_start: u32,
    // Pairs in this dispatch.
    pairs: u32,
    // Bytes per row (>= 1).
    row_bytes: u32,
    // Destination words per pair: ceil(row_bytes / 4) + 1.
    span: u32,
    // Workgroups per row of the dispatch grid.
    row_groups: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: GatherParams;
// (src byte offset, dst byte offset) per row.
@group(0) @binding(1) var<storage, read> pairs: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read> src: array<u32>;
@group(0) @binding(3) var<storage, read_write> dst: array<atomic<u32>>;

// The host's GATHER_WG.
const GATHER_WG: u32 = 256u;

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = (wid.x + wid.y * params.row_groups) * GATHER_WG + lid;
    let p = g / params.span;
    if (p >= params.pairs) {
        return;
    }
    let t = g - p * params.span;
    let pair = pairs[params.pair_start + p];
    let s = pair.x;
    let d = pair.y;
    let w = d / 4u + t;
    let word_start = w * 4u;
    // The row's bytes inside this word: [lo, hi), n of them (1 to 4).
    let lo = max(word_start, d);
    let hi = min(word_start + 4u, d + params.row_bytes);
    if (lo >= hi) {
        return;
    }
    let n = hi - lo;
    // They come from source bytes [sb, sb + n): at most two source words.
    let sb = s + (lo - d);
    let sw = sb / 4u;
    let sh = (sb % 4u) * 8u;
    var v = src[sw] >> sh;
    if ((sb % 4u) + n > 4u) {
        // sh is 8, 16 or 24 here.
        v |= src[sw + 1u] << (32u - sh);
    }
    v = (v & (0xffffffffu >> ((4u - n) * 8u))) << ((lo - word_start) * 8u);
    if (n == 4u) {
        atomicStore(&dst[w], v);
    } else {
        atomicOr(&dst[w], v);
    }
}
