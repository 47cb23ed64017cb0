/* Known-answer test of kernels/aes_core.h compiled as plain C (run by tests/cuda_core_c.rs):
 * FIPS-197 AES-256, SP 800-38A F.5.5 CTR, and the GCM spec's AES-256 vectors computed exactly
 * the way the GPU does it (segmented GHASH from the end, scaled by powers of H). */
#include <stdio.h>
#include <string.h>
#include "aes_core.h"

static int hexval(char c) { return c <= '9' ? c - '0' : (c | 32) - 'a' + 10; }
static size_t unhex(const char *s, cs_u8 *out) {
    size_t n = strlen(s) / 2;
    for (size_t i = 0; i < n; i++) out[i] = (cs_u8)(hexval(s[2 * i]) << 4 | hexval(s[2 * i + 1]));
    return n;
}
static cs_u32 te0[256];
static const cs_u32 last4[16] = CS_LAST4_INIT;

static void encrypt_bytes(const cs_u32 *rk, const cs_u8 *in, cs_u8 *out) {
    cs_u32 s[4];
    for (int i = 0; i < 4; i++) s[i] = (cs_u32)in[4 * i] << 24 | (cs_u32)in[4 * i + 1] << 16 | (cs_u32)in[4 * i + 2] << 8 | in[4 * i + 3];
    cs_aes256_encrypt_words(te0, 0, rk, s);
    for (int i = 0; i < 16; i++) out[i] = (cs_u8)(s[i / 4] >> (24 - 8 * (i % 4)));
}

/* GCM seal exactly as the kernels do (ctr from nonce||2, segmented GHASH). */
static void gcm(const cs_u8 *key, const cs_u8 *iv, const cs_u8 *aad, size_t alen, const cs_u8 *pt, size_t n,
                cs_u8 *ct, cs_u8 *tag) {
    cs_u32 rk[60];
    cs_expand_key(te0, key, rk);
    cs_u8 zero[16] = {0}, hb[16], ks[16], blk[16];
    encrypt_bytes(rk, zero, hb);
    cs_u64 vh = 0, vl = 0;
    for (int i = 0; i < 8; i++) { vh = vh << 8 | hb[i]; vl = vl << 8 | hb[8 + i]; }
    for (size_t b = 0; b * 16 < n; b++) {
        memcpy(blk, iv, 12);
        cs_u32 c = (cs_u32)(2 + b);
        blk[12] = c >> 24; blk[13] = c >> 16; blk[14] = c >> 8; blk[15] = c;
        encrypt_bytes(rk, blk, ks);
        for (size_t k = 0; k < 16 && b * 16 + k < n; k++) ct[b * 16 + k] = pt[b * 16 + k] ^ ks[k];
    }
    cs_u64 hh[16], hl[16], sh, sl, th = 0, tl = 0;
    cs_ghash_table(vh, vl, hh, hl);
    cs_gf128_pow(vh, vl, CS_SEG_BLOCKS, &sh, &sl);
    cs_u64 nseg = (cs_ghash_blocks(alen, n, 0) + CS_SEG_BLOCKS - 1) / CS_SEG_BLOCKS;
    for (cs_u64 s = 0; s < nseg; s++) {
        cs_u64 yh, yl, ph, pl;
        cs_ghash_segment(hh, hl, last4, aad, alen, ct, n, 0, s, &yh, &yl);
        cs_gf128_pow(sh, sl, s, &ph, &pl);
        if (s > 0) cs_gf128_mul(&yh, &yl, ph, pl);
        th ^= yh; tl ^= yl;
    }
    memcpy(blk, iv, 12);
    blk[12] = blk[13] = blk[14] = 0; blk[15] = 1;
    encrypt_bytes(rk, blk, ks);
    for (int i = 0; i < 16; i++) tag[i] = ks[i] ^ (cs_u8)((i < 8 ? th >> (56 - 8 * i) : tl >> (56 - 8 * (i - 8))));
}

/* The kernel's descriptor words 4-5 from a nonce, as src/cipher/cuda/launch.rs builds them. */
static void nonce_words(const cs_u8 *nonce, cs_u64 *d) {
    d[4] = 0; d[5] = 0;
    for (int i = 7; i >= 0; i--) d[4] = d[4] << 8 | nonce[i];
    for (int i = 11; i >= 8; i--) d[5] = d[5] << 8 | nonce[i];
}

/* Runs the kernel's per-thread CTR routine as `threads` threads with a grid stride. */
/* The wide tables of the "w2"/"w4" CTR variants (both regions), as the kernels fill them. */
static cs_u32 wide[2 * CS_WIDE_WORDS];
static int scheme_now = CS_SCHEME_REPLICATED;

static void ctr_as_kernel(const cs_u32 *rk, const cs_u8 *nonce, cs_u64 off, const cs_u8 *in, cs_u8 *out, cs_u64 len,
                          cs_u64 threads) {
    cs_u64 d[CS_DESC_WORDS] = {0};
    nonce_words(nonce, d);
    const cs_u32 *tab = scheme_now == CS_SCHEME_REPLICATED ? te0 : wide;
    /* Thread t is lane t % 32, so the wide variants read every lane's column of the table. */
    for (cs_u64 t = 0; t < threads; t++)
        cs_ctr_chunk(tab, (int)(t % 32), rk, d, in, out, len, off, t, threads, scheme_now);
}

static int fails = 0;
static void expect(const char *what, const cs_u8 *got, const char *want_hex) {
    cs_u8 want[256];
    size_t n = unhex(want_hex, want);
    if (memcmp(got, want, n) != 0) { printf("FAIL %s\n", what); fails++; } else printf("ok   %s\n", what);
}

int main(void) {
    cs_build_te0(te0);
    for (cs_u32 i = 0; i < 2 * CS_WIDE_WORDS; i++) wide[i] = cs_wide_entry(te0, i);
    cs_u8 key[32], in[256], out[256], ct[256], tag[16], iv[12], aad[64];
    cs_u32 rk[60];
    /* FIPS-197 C.3 */
    unhex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f", key);
    unhex("00112233445566778899aabbccddeeff", in);
    cs_expand_key(te0, key, rk);
    encrypt_bytes(rk, in, out);
    expect("FIPS-197 C.3 AES-256", out, "8ea2b7ca516745bfeafc49904b496089");
    /* The same block through the wide-table rounds, for every lane and both layouts. */
    for (int four = 0; four < 2; four++) {
        int bad = 0;
        for (cs_u32 lane = 0; lane < 32; lane++) {
            cs_u32 s[4];
            for (int i = 0; i < 4; i++) s[i] = (cs_u32)in[4 * i] << 24 | (cs_u32)in[4 * i + 1] << 16 | (cs_u32)in[4 * i + 2] << 8 | in[4 * i + 3];
            cs_aes256_encrypt_wide(wide, lane << 2, rk, s, four);
            for (int i = 0; i < 16; i++) ct[i] = (cs_u8)(s[i / 4] >> (24 - 8 * (i % 4)));
            if (memcmp(ct, out, 16) != 0) bad = 1;
        }
        if (bad) { printf("FAIL FIPS-197 C.3 via wide tables (four=%d)\n", four); fails++; }
        else printf("ok   FIPS-197 C.3 via wide tables, all 32 lanes (four=%d)\n", four);
    }
    /* GCM spec test cases 13-16 (AES-256). */
    const char *v[4][6] = {
        {"0000000000000000000000000000000000000000000000000000000000000000", "000000000000000000000000", "", "", "", "530f8afbc74536b9a963b4f1c4cb738b"},
        {"0000000000000000000000000000000000000000000000000000000000000000", "000000000000000000000000", "00000000000000000000000000000000", "", "cea7403d4d606b6e074ec5d3baf39d18", "d0d1c8a799996bf0265b98b5d48ab919"},
        {"feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308", "cafebabefacedbaddecaf888",
         "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255", "",
         "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad", "b094dac5d93471bdec1a502270e3cc6c"},
        {"feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308", "cafebabefacedbaddecaf888",
         "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39", "feedfacedeadbeeffeedfacedeadbeefabaddad2",
         "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662", "76fc6ece0f4e1768cddf8853bb2d551b"},
    };
    for (int i = 0; i < 4; i++) {
        char name[64];
        unhex(v[i][0], key); unhex(v[i][1], iv);
        size_t n = unhex(v[i][2], in), alen = unhex(v[i][3], aad);
        gcm(key, iv, aad, alen, in, n, ct, tag);
        snprintf(name, sizeof name, "GCM test case %d ciphertext", 13 + i);
        if (n) expect(name, ct, v[i][4]);
        snprintf(name, sizeof name, "GCM test case %d tag", 13 + i);
        expect(name, tag, v[i][5]);
    }
    /* SP 800-38A F.5.5 through the kernel's CTR routine: nonce = first 12 bytes of the counter
     * block, offset chosen so the first counter is its last 4 bytes; seeks to unaligned bytes.
     * Once per table scheme (round 1's replicated table, wide 2-table, wide 4-table). */
    for (scheme_now = 0; scheme_now <= CS_SCHEME_WIDE4; scheme_now++) {
        printf("-- CTR table scheme %d\n", scheme_now);
        cs_u8 iv[16], pt[64], ctv[64], got[80];
        unhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4", key);
        unhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff", iv);
        unhex("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e5130c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710", pt);
        unhex("601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c52b0930daa23de94ce87017ba2d84988ddfc9c58db67aada613c2dd08457941a6", ctv);
        cs_expand_key(te0, key, rk);
        cs_u32 c0 = (cs_u32)iv[12] << 24 | (cs_u32)iv[13] << 16 | (cs_u32)iv[14] << 8 | iv[15];
        cs_u64 base = (cs_u64)(cs_u32)(c0 - 2) * 16;
        int starts[4] = {0, 16, 37, 63};
        for (int i = 0; i < 4; i++) {
            int st = starts[i];
            memset(got, 0, sizeof got);
            ctr_as_kernel(rk, iv, base + st, pt + st, got, 64 - st, 3);
            char name[64];
            snprintf(name, sizeof name, "F.5.5 via kernel CTR, seek to byte %d", st);
            if (memcmp(got, ctv + st, 64 - st) != 0) { printf("FAIL %s\n", name); fails++; } else printf("ok   %s\n", name);
        }
        /* Across the 32-bit counter wrap, from mid-block: compare with counter blocks built by hand. */
        cs_u8 nonce[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, want[80], blk[16], ks[16];
        cs_u64 off = (cs_u64)(cs_u32)(0xfffffffeu - 2) * 16 + 5;
        for (int k = 0; k < 80; k++) {
            cs_u64 a = off + k;
            cs_u32 c = (cs_u32)(2 + a / 16);
            memcpy(blk, nonce, 12);
            blk[12] = c >> 24; blk[13] = c >> 16; blk[14] = c >> 8; blk[15] = c;
            encrypt_bytes(rk, blk, ks);
            want[k] = (cs_u8)(k * 7) ^ ks[a % 16];
        }
        cs_u8 src[80];
        for (int k = 0; k < 80; k++) src[k] = (cs_u8)(k * 7);
        ctr_as_kernel(rk, nonce, off, src, got, 64, 2);
        ctr_as_kernel(rk, nonce, off + 64, src + 64, got + 64, 16, 5);
        if (memcmp(got, want, 80) != 0) { printf("FAIL kernel CTR across the 32-bit counter wrap\n"); fails++; }
        else printf("ok   kernel CTR across the 32-bit counter wrap\n");
    }
    /* Long input: segmented GHASH (many segments) must equal plain Horner with the bitwise
     * multiply. */
    {
        static cs_u8 data[16 * 200 + 7], a[37];
        for (size_t i = 0; i < sizeof data; i++) data[i] = (cs_u8)(i * 131 + 7);
        for (size_t i = 0; i < sizeof a; i++) a[i] = (cs_u8)(i * 17 + 3);
        cs_u64 vh = 0x66e94bd4ef8a2c3bull, vl = 0x884cfa59ca342b2eull, hh[16], hl[16], sh, sl;
        cs_ghash_table(vh, vl, hh, hl);
        cs_gf128_pow(vh, vl, CS_SEG_BLOCKS, &sh, &sl);
        for (int plain = 0; plain < 2; plain++) {
            cs_u64 n = cs_ghash_blocks(sizeof a, sizeof data, plain), rh = 0, rl = 0, th = 0, tl = 0;
            for (cs_u64 b = 0; b < n; b++) {
                cs_u64 bh, bl;
                cs_ghash_block(a, sizeof a, data, sizeof data, plain, b, &bh, &bl);
                rh ^= bh; rl ^= bl;
                cs_gf128_mul(&rh, &rl, vh, vl);
            }
            for (cs_u64 s = 0; s * CS_SEG_BLOCKS < n; s++) {
                cs_u64 yh, yl, ph, pl;
                cs_ghash_segment(hh, hl, last4, a, sizeof a, data, sizeof data, plain, s, &yh, &yl);
                cs_gf128_pow(sh, sl, s, &ph, &pl);
                cs_gf128_mul(&yh, &yl, ph, pl);
                th ^= yh; tl ^= yl;
            }
            if (rh != th || rl != tl) { printf("FAIL segmented GHASH (plain=%d)\n", plain); fails++; }
            else printf("ok   segmented GHASH == Horner (plain=%d)\n", plain);
        }
    }
    printf(fails ? "%d FAILED\n" : "all passed\n", fails);
    return fails != 0;
}
