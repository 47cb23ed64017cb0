/* ciphershard AES-256 and GHASH core, shared by the CUDA kernels (NVRTC) and a plain-C
 * known-answer test (tests/cuda_core_c.rs compiles this header with `cc`).
 *
 * Technique: 32-bit T-tables. On the GPU the one table Te0 is replicated 32 times in shared
 * memory (t0s[x][lane]), so every lane reads its own bank and lookups never conflict; Te1..Te3
 * are rotations of Te0 (one funnel-shift each). Side channel: table lookups are indexed by
 * secret state. Each lane only touches its own bank, which removes bank-conflict timing, but a
 * co-resident attacker probing shared memory or L1 could in theory still learn access
 * patterns; the GHASH 4-bit tables have the same property. Bitsliced AES would be
 * constant-time; see docs/BENCHMARKS.md / the report for why T-tables were chosen first.
 *
 * Byte order: AES state words are big-endian (word = b0<<24|b1<<16|b2<<8|b3). GHASH blocks are
 * (hi, lo) 64-bit halves, hi = big-endian bytes 0..7 (GCM's bit 0 is hi's top bit).
 */
#ifndef CIPHERSHARD_AES_CORE_H
#define CIPHERSHARD_AES_CORE_H

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define CS_CUDA 1
#define CS_FN __device__ __forceinline__
#define CS_UNROLL _Pragma("unroll")
typedef unsigned char cs_u8;
typedef unsigned int cs_u32;
typedef unsigned long long cs_u64;
#else
#include <stdint.h>
#define CS_FN static inline
#define CS_UNROLL
typedef uint8_t cs_u8;
typedef uint32_t cs_u32;
typedef uint64_t cs_u64;
#endif

/* ---- AES ---------------------------------------------------------------------------- */

CS_FN cs_u32 cs_ror(cs_u32 x, int n) {
#ifdef CS_CUDA
    return __funnelshift_r(x, x, n);
#else
    return (x >> n) | (x << (32 - n));
#endif
}

CS_FN cs_u32 cs_bswap(cs_u32 x) {
#ifdef CS_CUDA
    return __byte_perm(x, 0, 0x0123);
#else
    return (x >> 24) | ((x >> 8) & 0xff00u) | ((x << 8) & 0xff0000u) | (x << 24);
#endif
}

CS_FN cs_u8 cs_gmul8(cs_u8 a, cs_u8 b) {
    cs_u8 p = 0;
    for (int i = 0; i < 8; i++) {
        if (b & 1) p ^= a;
        cs_u8 hi = a & 0x80;
        a = (cs_u8)(a << 1);
        if (hi) a ^= 0x1b;
        b >>= 1;
    }
    return p;
}

/* The AES S-box entry, computed (inverse in GF(2^8) as x^254, then the affine map) so no
 * hand-typed table can be wrong; tables are built once per key setup. */
CS_FN cs_u8 cs_sbox_entry(cs_u8 x) {
    cs_u8 inv = 1, base = x;
    int e = 254;
    while (e) {
        if (e & 1) inv = cs_gmul8(inv, base);
        base = cs_gmul8(base, base);
        e >>= 1;
    }
    if (x == 0) inv = 0;
    cs_u8 r = inv;
    cs_u8 s = inv;
    for (int i = 0; i < 4; i++) {
        r = (cs_u8)((r << 1) | (r >> 7));
        s ^= r;
    }
    return (cs_u8)(s ^ 0x63);
}

/* Te0[x] = (2S, S, S, 3S) big-endian. S[x] = (Te0[x] >> 16) & 0xff. */
CS_FN cs_u32 cs_te0_entry(cs_u8 s) {
    cs_u8 s2 = cs_gmul8(s, 2);
    cs_u8 s3 = (cs_u8)(s2 ^ s);
    return ((cs_u32)s2 << 24) | ((cs_u32)s << 16) | ((cs_u32)s << 8) | (cs_u32)s3;
}

/* Fills te0[256] (global memory on the device, or a plain array in C). */
CS_FN void cs_build_te0(cs_u32 *te0) {
    for (int x = 0; x < 256; x++) te0[x] = cs_te0_entry(cs_sbox_entry((cs_u8)x));
}

CS_FN cs_u32 cs_sub_word(const cs_u32 *te0, cs_u32 w) {
    return (((te0[w >> 24] >> 16) & 0xff) << 24) | (((te0[(w >> 16) & 0xff] >> 16) & 0xff) << 16) |
           (((te0[(w >> 8) & 0xff] >> 16) & 0xff) << 8) | ((te0[w & 0xff] >> 16) & 0xff);
}

/* AES-256 key expansion: 60 round-key words. */
CS_FN void cs_expand_key(const cs_u32 *te0, const cs_u8 *key, cs_u32 *rk) {
    for (int i = 0; i < 8; i++)
        rk[i] = ((cs_u32)key[4 * i] << 24) | ((cs_u32)key[4 * i + 1] << 16) | ((cs_u32)key[4 * i + 2] << 8) |
                (cs_u32)key[4 * i + 3];
    cs_u32 rcon = 1;
    for (int i = 8; i < 60; i++) {
        cs_u32 t = rk[i - 1];
        if (i % 8 == 0) {
            t = cs_sub_word(te0, (t << 8) | (t >> 24)) ^ (rcon << 24);
            rcon = cs_gmul8((cs_u8)rcon, 2);
        } else if (i % 8 == 4) {
            t = cs_sub_word(te0, t);
        }
        rk[i] = rk[i - 8] ^ t;
    }
}

/* Table lookup abstraction: on the device the replicated shared table, in C the plain one. */
#ifdef CS_CUDA
#define CS_T0(tab, x, lane) ((tab)[(x) * 32 + (lane)])
#else
#define CS_T0(tab, x, lane) ((tab)[(x)])
#endif

/* Encrypts one block given as four big-endian words, in place. `tab` is Te0 (replicated on
 * the device), `rk` the 60 round-key words. */
CS_FN void cs_aes256_encrypt_words(const cs_u32 *tab, int lane, const cs_u32 *rk, cs_u32 *s) {
    (void)lane;
    cs_u32 s0 = s[0] ^ rk[0], s1 = s[1] ^ rk[1], s2 = s[2] ^ rk[2], s3 = s[3] ^ rk[3];
    CS_UNROLL
    for (int r = 1; r < 14; r++) {
        const cs_u32 *k = rk + 4 * r;
        cs_u32 t0 = CS_T0(tab, s0 >> 24, lane) ^ cs_ror(CS_T0(tab, (s1 >> 16) & 0xff, lane), 8) ^
                    cs_ror(CS_T0(tab, (s2 >> 8) & 0xff, lane), 16) ^ cs_ror(CS_T0(tab, s3 & 0xff, lane), 24) ^ k[0];
        cs_u32 t1 = CS_T0(tab, s1 >> 24, lane) ^ cs_ror(CS_T0(tab, (s2 >> 16) & 0xff, lane), 8) ^
                    cs_ror(CS_T0(tab, (s3 >> 8) & 0xff, lane), 16) ^ cs_ror(CS_T0(tab, s0 & 0xff, lane), 24) ^ k[1];
        cs_u32 t2 = CS_T0(tab, s2 >> 24, lane) ^ cs_ror(CS_T0(tab, (s3 >> 16) & 0xff, lane), 8) ^
                    cs_ror(CS_T0(tab, (s0 >> 8) & 0xff, lane), 16) ^ cs_ror(CS_T0(tab, s1 & 0xff, lane), 24) ^ k[2];
        cs_u32 t3 = CS_T0(tab, s3 >> 24, lane) ^ cs_ror(CS_T0(tab, (s0 >> 16) & 0xff, lane), 8) ^
                    cs_ror(CS_T0(tab, (s1 >> 8) & 0xff, lane), 16) ^ cs_ror(CS_T0(tab, s2 & 0xff, lane), 24) ^ k[3];
        s0 = t0; s1 = t1; s2 = t2; s3 = t3;
    }
    const cs_u32 *k = rk + 56;
#define CS_SB(x) ((CS_T0(tab, (x), lane) >> 16) & 0xff)
    s[0] = ((CS_SB(s0 >> 24) << 24) | (CS_SB((s1 >> 16) & 0xff) << 16) | (CS_SB((s2 >> 8) & 0xff) << 8) | CS_SB(s3 & 0xff)) ^ k[0];
    s[1] = ((CS_SB(s1 >> 24) << 24) | (CS_SB((s2 >> 16) & 0xff) << 16) | (CS_SB((s3 >> 8) & 0xff) << 8) | CS_SB(s0 & 0xff)) ^ k[1];
    s[2] = ((CS_SB(s2 >> 24) << 24) | (CS_SB((s3 >> 16) & 0xff) << 16) | (CS_SB((s0 >> 8) & 0xff) << 8) | CS_SB(s1 & 0xff)) ^ k[2];
    s[3] = ((CS_SB(s3 >> 24) << 24) | (CS_SB((s0 >> 16) & 0xff) << 16) | (CS_SB((s1 >> 8) & 0xff) << 8) | CS_SB(s2 & 0xff)) ^ k[3];
#undef CS_SB
}

/* ---- Wide-table AES (CTR variants "w2-prmt" and "w4-prmt") -------------------------------
 *
 * Round 1's kernel spends about two integer instructions per table lookup on the address
 * (extract the byte, scale it, add the lane) plus a funnel shift for 12 of the 16 lookups of a
 * round, and at ~280 GB/s it is bound by the integer pipe, not by shared-memory bandwidth. Here
 * the table row of byte value x is 256 bytes long: byte offset (x << 8) | (lane << 2) holds Te0[x]
 * for the lane's own bank (lanes 0..31 fill bytes 0..127), and +128 holds Te2[x] = ror16(Te0[x]).
 * ONE __byte_perm builds the whole offset from a state byte and lane*4 (the byte lands in bits
 * 8..15, lane*4 stays in bits 0..7) including the table choice (+128, +CS_WIDE_REGION; see
 * CS_WOFF), so a lookup is one PRMT plus one LDS. "w2" keeps Te0/Te2 (64 KiB, two rotations per column); "w4"
 * adds Te1/Te3 at +CS_WIDE_REGION (128 KiB, no rotations at all). Same side-channel property
 * as the replicated table: every lane reads only its own bank. */
#define CS_WIDE_REGION 65536u /* must be 1 << 16: byte 2 of the offset selects the region */
#define CS_WIDE_WORDS 16384u /* words per region */

CS_FN cs_u32 cs_perm(cs_u32 x, cs_u32 y, cs_u32 sel) {
#ifdef CS_CUDA
    return __byte_perm(x, y, sel);
#else
    cs_u64 v = ((cs_u64)y << 32) | x;
    cs_u32 r = 0;
    for (int i = 0; i < 4; i++) r |= (cs_u32)((v >> (8 * ((sel >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
#endif
}

/* Byte offset of byte k (0 = least significant) of state word s in table y's row for this lane:
 * result byte 0 = y's byte 0 (lane*4, +128 for Te2/Te3), byte 1 = the state byte, byte 2 = y's
 * byte 2 (1 for region 1: Te1/Te3), byte 3 = 0. The table choice costs no instruction (the
 * compiler cannot fold +128 into a load from dynamic shared memory, so it lives in y). */
#define CS_WOFF(s, k, y) cs_perm((s), (y), 0x5604u | ((cs_u32)(k) << 4))
#define CS_WT(tab, off) (*(const cs_u32 *)((const cs_u8 *)(tab) + (off)))

/* Word i of the wide table (i < CS_WIDE_WORDS in region 0; region 1 is i + CS_WIDE_WORDS). */
CS_FN cs_u32 cs_wide_entry(const cs_u32 *te0, cs_u32 i) {
    cs_u32 v = te0[(i >> 6) & 0xff];
    int second = (i & 63) >= 32;
    if (i < CS_WIDE_WORDS) return second ? cs_ror(v, 16) : v; /* Te0, Te2 */
    return second ? cs_ror(v, 24) : cs_ror(v, 8);              /* Te1, Te3 */
}

/* Encrypts one block (four big-endian words, in place) with the wide table at `tab`; l4 is
 * lane * 4 (< 128); `four` selects the 4-table layout (compile-time constant after inlining). */
CS_FN void cs_aes256_encrypt_wide(const cs_u32 *tab, cs_u32 l4, const cs_u32 *rk, cs_u32 *s, int four) {
    cs_u32 s0 = s[0] ^ rk[0], s1 = s[1] ^ rk[1], s2 = s[2] ^ rk[2], s3 = s[3] ^ rk[3];
    const cs_u32 y0 = l4, y2 = l4 | 128u, y1 = l4 | CS_WIDE_REGION, y3 = l4 | CS_WIDE_REGION | 128u;
#define CS_W0(x, k) CS_WT(tab, CS_WOFF(x, k, y0))
#define CS_W2(x, k) CS_WT(tab, CS_WOFF(x, k, y2))
#define CS_W1(x, k) (four ? CS_WT(tab, CS_WOFF(x, k, y1)) : cs_ror(CS_W0(x, k), 8))
#define CS_W3(x, k) (four ? CS_WT(tab, CS_WOFF(x, k, y3)) : cs_ror(CS_W2(x, k), 8))
    CS_UNROLL
    for (int r = 1; r < 14; r++) {
        const cs_u32 *k = rk + 4 * r;
        cs_u32 t0 = CS_W0(s0, 3) ^ CS_W1(s1, 2) ^ CS_W2(s2, 1) ^ CS_W3(s3, 0) ^ k[0];
        cs_u32 t1 = CS_W0(s1, 3) ^ CS_W1(s2, 2) ^ CS_W2(s3, 1) ^ CS_W3(s0, 0) ^ k[1];
        cs_u32 t2 = CS_W0(s2, 3) ^ CS_W1(s3, 2) ^ CS_W2(s0, 1) ^ CS_W3(s1, 0) ^ k[2];
        cs_u32 t3 = CS_W0(s3, 3) ^ CS_W1(s0, 2) ^ CS_W2(s1, 1) ^ CS_W3(s2, 0) ^ k[3];
        s0 = t0; s1 = t1; s2 = t2; s3 = t3;
    }
    /* Last round (no MixColumns): S[x] is the top byte of Te2[x], bits 16..23 and 8..15 of
     * Te0[x], and the low byte of Te2[x]. */
    const cs_u32 *k = rk + 56;
    s[0] = ((CS_W2(s0, 3) & 0xff000000u) | (CS_W0(s1, 2) & 0xff0000u) | (CS_W0(s2, 1) & 0xff00u) | (CS_W2(s3, 0) & 0xffu)) ^ k[0];
    s[1] = ((CS_W2(s1, 3) & 0xff000000u) | (CS_W0(s2, 2) & 0xff0000u) | (CS_W0(s3, 1) & 0xff00u) | (CS_W2(s0, 0) & 0xffu)) ^ k[1];
    s[2] = ((CS_W2(s2, 3) & 0xff000000u) | (CS_W0(s3, 2) & 0xff0000u) | (CS_W0(s0, 1) & 0xff00u) | (CS_W2(s1, 0) & 0xffu)) ^ k[2];
    s[3] = ((CS_W2(s3, 3) & 0xff000000u) | (CS_W0(s0, 2) & 0xff0000u) | (CS_W0(s1, 1) & 0xff00u) | (CS_W2(s2, 0) & 0xffu)) ^ k[3];
#undef CS_W0
#undef CS_W1
#undef CS_W2
#undef CS_W3
}

/* AES table schemes for the CTR routine. */
#define CS_SCHEME_REPLICATED 0 /* round 1: Te0 replicated per lane, index x*32+lane */
#define CS_SCHEME_WIDE2 1
#define CS_SCHEME_WIDE4 2

/* ---- GHASH (GF(2^128), GCM bit order) ------------------------------------------------ */

/* Shoup 4-bit reduction constants (as in mbed TLS), shifted into the top 16 bits of hi. */
#define CS_LAST4_INIT {0x0000, 0x1c20, 0x3840, 0x2460, 0x7080, 0x6ca0, 0x48c0, 0x54e0, \
                       0xe100, 0xfd20, 0xd940, 0xc560, 0x9180, 0x8da0, 0xa9c0, 0xb5e0}

/* Builds the 16-entry tables hh/hl of multiples of H = (vh, vl). */
CS_FN void cs_ghash_table(cs_u64 vh, cs_u64 vl, cs_u64 *hh, cs_u64 *hl) {
    hh[0] = 0; hl[0] = 0;
    hh[8] = vh; hl[8] = vl;
    for (int i = 4; i > 0; i >>= 1) {
        cs_u64 t = (vl & 1) * 0xe100000000000000ull;
        vl = (vh << 63) | (vl >> 1);
        vh = (vh >> 1) ^ t;
        hh[i] = vh; hl[i] = vl;
    }
    for (int i = 2; i <= 8; i *= 2) {
        cs_u64 ih = hh[i], il = hl[i];
        for (int j = 1; j < i; j++) {
            hh[i + j] = ih ^ hh[j];
            hl[i + j] = il ^ hl[j];
        }
    }
}

/* (xh, xl) *= H with H's tables; last4 is the reduction table. */
CS_FN void cs_ghash_mul_table(const cs_u64 *hh, const cs_u64 *hl, const cs_u32 *last4, cs_u64 *xh, cs_u64 *xl) {
    cs_u64 zh = 0, zl = 0;
    CS_UNROLL
    for (int i = 15; i >= 0; i--) {
        cs_u8 b = (cs_u8)(i < 8 ? (*xh >> (56 - 8 * i)) : (*xl >> (56 - 8 * (i - 8))));
        cs_u8 lo = b & 0xf, hi = b >> 4;
        cs_u8 rem;
        if (i != 15) {
            rem = (cs_u8)(zl & 0xf);
            zl = (zh << 60) | (zl >> 4);
            zh = (zh >> 4) ^ ((cs_u64)last4[rem] << 48);
        }
        zh ^= hh[lo]; zl ^= hl[lo];
        rem = (cs_u8)(zl & 0xf);
        zl = (zh << 60) | (zl >> 4);
        zh = (zh >> 4) ^ ((cs_u64)last4[rem] << 48);
        zh ^= hh[hi]; zl ^= hl[hi];
    }
    *xh = zh; *xl = zl;
}

/* Generic (xh, xl) *= (yh, yl), bit by bit (NIST SP 800-38D algorithm 1); used rarely. */
CS_FN void cs_gf128_mul(cs_u64 *xh, cs_u64 *xl, cs_u64 yh, cs_u64 yl) {
    cs_u64 zh = 0, zl = 0, vh = yh, vl = yl, a = *xh, b = *xl;
    for (int i = 0; i < 128; i++) {
        cs_u64 bit = i < 64 ? (a >> (63 - i)) & 1 : (b >> (127 - i)) & 1;
        cs_u64 m = (cs_u64)0 - bit;
        zh ^= vh & m; zl ^= vl & m;
        cs_u64 carry = (cs_u64)0 - (vl & 1);
        vl = (vh << 63) | (vl >> 1);
        vh = (vh >> 1) ^ (carry & 0xe100000000000000ull);
    }
    *xh = zh; *xl = zl;
}

/* (h, l) = base^e, e >= 0. */
CS_FN void cs_gf128_pow(cs_u64 bh, cs_u64 bl, cs_u64 e, cs_u64 *rh, cs_u64 *rl) {
    cs_u64 ph = 0x8000000000000000ull, pl = 0; /* the field's 1 */
    while (e) {
        if (e & 1) cs_gf128_mul(&ph, &pl, bh, bl);
        cs_gf128_mul(&bh, &bl, bh, bl);
        e >>= 1;
    }
    *rh = ph; *rl = pl;
}

/* ---- Chunk descriptors, shared by both kernels --------------------------------------- */

/* One chunk = CS_DESC_WORDS u64 words:
 *  0 src offset (bytes into the input buffer)   1 dst offset (bytes into the output buffer)
 *  2 length in bytes                            3 byte offset into the chunk (CTR seek)
 *  4 nonce bytes 0..7 (little-endian load)      5 nonce bytes 8..11 (low 32 bits)
 *  6 aad offset (bytes into the aad buffer)     7 aad length | flags << 48 (bit 0: plain/GMAC)
 */
#define CS_DESC_WORDS 8
#define CS_FLAG_PLAIN 1ull
/* GHASH segment length in 16-byte blocks: one thread folds one segment. */
#define CS_SEG_BLOCKS 32

CS_FN cs_u8 cs_aad_or_data(const cs_u8 *aad, cs_u64 alen, const cs_u8 *data, cs_u64 dlen, cs_u64 q) {
    if (q < alen) return aad[q];
    q -= alen;
    return q < dlen ? data[q] : 0;
}

/* Virtual GHASH input block v of a chunk: pad16(aad) || pad16(data) || lengths, or for a plain
 * chunk pad16(aad || data) || lengths. */
CS_FN void cs_ghash_block(const cs_u8 *aad, cs_u64 alen, const cs_u8 *data, cs_u64 dlen, int plain, cs_u64 v,
                          cs_u64 *bh, cs_u64 *bl) {
    cs_u64 h = 0, l = 0;
    if (plain) {
        cs_u64 total = alen + dlen, t = (total + 15) / 16;
        if (v == t) { *bh = total * 8; *bl = 0; return; }
        for (int k = 0; k < 16; k++) {
            cs_u64 b = cs_aad_or_data(aad, alen, data, dlen, 16 * v + k);
            if (k < 8) h |= b << (56 - 8 * k); else l |= b << (56 - 8 * (k - 8));
        }
    } else {
        cs_u64 a = (alen + 15) / 16, c = (dlen + 15) / 16;
        if (v == a + c) { *bh = alen * 8; *bl = dlen * 8; return; }
        const cs_u8 *p; cs_u64 n, base;
        if (v < a) { p = aad; n = alen; base = 16 * v; } else { p = data; n = dlen; base = 16 * (v - a); }
#ifdef CS_CUDA
        if (p == data && base + 16 <= n && (((cs_u64)(p + base)) & 15) == 0) {
            uint4 w = *(const uint4 *)(p + base);
            *bh = ((cs_u64)cs_bswap(w.x) << 32) | cs_bswap(w.y);
            *bl = ((cs_u64)cs_bswap(w.z) << 32) | cs_bswap(w.w);
            return;
        }
#endif
        for (int k = 0; k < 16; k++) {
            cs_u64 b = base + k < n ? p[base + k] : 0;
            if (k < 8) h |= b << (56 - 8 * k); else l |= b << (56 - 8 * (k - 8));
        }
    }
    *bh = h; *bl = l;
}

/* Number of GHASH input blocks of a chunk. */
CS_FN cs_u64 cs_ghash_blocks(cs_u64 alen, cs_u64 dlen, int plain) {
    if (plain) return (alen + dlen + 15) / 16 + 1;
    return (alen + 15) / 16 + (dlen + 15) / 16 + 1;
}

/* Folds segment s (counted from the END of the input, CS_SEG_BLOCKS blocks each) with Horner's
 * rule; the caller multiplies the result by H^(s * CS_SEG_BLOCKS) and XORs all segments. */
CS_FN void cs_ghash_segment(const cs_u64 *hh, const cs_u64 *hl, const cs_u32 *last4, const cs_u8 *aad, cs_u64 alen,
                            const cs_u8 *data, cs_u64 dlen, int plain, cs_u64 s, cs_u64 *yh, cs_u64 *yl) {
    cs_u64 n = cs_ghash_blocks(alen, dlen, plain);
    cs_u64 end = n - s * CS_SEG_BLOCKS;
    cs_u64 start = end > CS_SEG_BLOCKS ? end - CS_SEG_BLOCKS : 0;
    cs_u64 h = 0, l = 0;
    for (cs_u64 v = start; v < end; v++) {
        cs_u64 bh, bl;
        cs_ghash_block(aad, alen, data, dlen, plain, v, &bh, &bl);
        h ^= bh; l ^= bl;
        cs_ghash_mul_table(hh, hl, last4, &h, &l);
    }
    *yh = h; *yl = l;
}

/* The CTR work of one chunk for one thread: keystream blocks first+t, first+t+stride, ... of the
 * chunk's range [off, off+len) (descriptor d: nonce in words 4-5). `scheme`: CS_SCHEME_*, with
 * t0s the matching table (replicated Te0, or the wide table). */
CS_FN void cs_ctr_chunk(const cs_u32 *t0s, int lane, const cs_u32 *rk, const cs_u64 *d,
                        const cs_u8 *sp0, cs_u8 *dp0, cs_u64 len, cs_u64 off, cs_u64 t, cs_u64 stride, int scheme) {
    cs_u32 n0 = cs_bswap((cs_u32)d[4]), n1 = cs_bswap((cs_u32)(d[4] >> 32)), n2 = cs_bswap((cs_u32)d[5]);
    cs_u64 first = off / 16, nblocks = (off + len - 1) / 16 - first + 1;
    for (cs_u64 b = t; b < nblocks; b += stride) {
        cs_u64 kb = first + b;
        cs_u32 s[4] = {n0, n1, n2, (cs_u32)(2 + kb)};  // inc32: the counter wraps modulo 2^32
        if (scheme == CS_SCHEME_REPLICATED)
            cs_aes256_encrypt_words(t0s, lane, rk, s);
        else
            cs_aes256_encrypt_wide(t0s, (cs_u32)lane << 2, rk, s, scheme == CS_SCHEME_WIDE4);
        cs_u64 abs0 = kb * 16;
        if (abs0 >= off && abs0 + 16 <= off + len) {
            cs_u64 p = abs0 - off;
            const cs_u8 *sp = sp0 + p;
            cs_u8 *dp = dp0 + p;
#ifdef CS_CUDA
            if ((((cs_u64)sp | (cs_u64)dp) & 15) == 0) {
                uint4 w = *(const uint4 *)sp;
                w.x ^= cs_bswap(s[0]); w.y ^= cs_bswap(s[1]); w.z ^= cs_bswap(s[2]); w.w ^= cs_bswap(s[3]);
                *(uint4 *)dp = w;
                continue;
            }
#else
            (void)sp; (void)dp;
#endif
        }
        for (int k = 0; k < 16; k++) {
            cs_u64 a = abs0 + k;
            if (a >= off && a < off + len) {
                cs_u64 p = a - off;
                dp0[p] = sp0[p] ^ (cs_u8)(s[k >> 2] >> (24 - 8 * (k & 3)));
            }
        }
    }
}

#endif /* CIPHERSHARD_AES_CORE_H */

