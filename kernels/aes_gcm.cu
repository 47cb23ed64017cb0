// ciphershard CUDA kernels: AES-256-CTR (GCM's counter mode) and a parallel GHASH.
// Compiled at run time with NVRTC; src/cipher/cuda/compile.rs prepends kernels/aes_core.h.
#include "aes_core.h"

#define CS_THREADS 256

// One block of 256 threads: builds Te0, expands the key, computes H = E_K(0), H's 4-bit
// tables and H^CS_SEG_BLOCKS. key: 32 bytes. Outputs: te0[256], rk[60], htab[32] (hh, hl),
// hseg[2].
extern "C" __global__ void __launch_bounds__(CS_THREADS) cs_setup(const cs_u8 *key, cs_u32 *te0_out, cs_u32 *rk_out,
                                                                   cs_u64 *htab_out, cs_u64 *hseg_out) {
    __shared__ cs_u32 t0s[256 * 32];
    __shared__ cs_u32 te0[256];
    __shared__ cs_u32 rk[60];
    int t = threadIdx.x;
    te0[t] = cs_te0_entry(cs_sbox_entry((cs_u8)t));
    te0_out[t] = te0[t];
    __syncthreads();
    for (int i = t; i < 256 * 32; i += blockDim.x) t0s[i] = te0[i >> 5];
    __syncthreads();
    if (t == 0) {
        cs_expand_key(te0, key, rk);
        for (int i = 0; i < 60; i++) rk_out[i] = rk[i];
        cs_u32 s[4] = {0, 0, 0, 0};
        cs_aes256_encrypt_words(t0s, 0, rk, s);
        cs_u64 vh = ((cs_u64)s[0] << 32) | s[1], vl = ((cs_u64)s[2] << 32) | s[3];
        cs_u64 hh[16], hl[16];
        cs_ghash_table(vh, vl, hh, hl);
        for (int i = 0; i < 16; i++) { htab_out[i] = hh[i]; htab_out[16 + i] = hl[i]; }
        cs_gf128_pow(vh, vl, CS_SEG_BLOCKS, &hseg_out[0], &hseg_out[1]);
        vh = vl = 0;
        s[0] = s[1] = s[2] = s[3] = 0;
        for (int i = 0; i < 60; i++) ((volatile cs_u32 *)rk)[i] = 0;
    }
}

// hpow[2s], hpow[2s+1] = (H^CS_SEG_BLOCKS)^s for s in [from, count).
extern "C" __global__ void __launch_bounds__(CS_THREADS) cs_hpowers(const cs_u64 *hseg, cs_u64 *hpow, cs_u64 from,
                                                                     cs_u64 count) {
    cs_u64 s = from + (cs_u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= count) return;
    cs_gf128_pow(hseg[0], hseg[1], s, &hpow[2 * s], &hpow[2 * s + 1]);
}

// AES-256-CTR over a batch: grid.y = chunk index, grid.x strides over the chunk's blocks.
extern "C" __global__ void __launch_bounds__(CS_THREADS) cs_ctr(const cs_u32 *te0, const cs_u32 *rk_g,
                                                                 const cs_u64 *desc, const cs_u8 *src, cs_u8 *dst) {
    __shared__ cs_u32 t0s[256 * 32];
    __shared__ cs_u32 rk[60];
    int lane = threadIdx.x & 31;
    for (int i = threadIdx.x; i < 256 * 32; i += blockDim.x) t0s[i] = te0[i >> 5];
    for (int i = threadIdx.x; i < 60; i += blockDim.x) rk[i] = rk_g[i];
    __syncthreads();
    const cs_u64 *d = desc + (cs_u64)blockIdx.y * CS_DESC_WORDS;
    cs_u64 so = d[0], dof = d[1], len = d[2], off = d[3];
    if (len > 0)
        cs_ctr_chunk(t0s, lane, rk, d, src + so, dst + dof, len, off, (cs_u64)blockIdx.x * blockDim.x + threadIdx.x,
                     (cs_u64)gridDim.x * blockDim.x, CS_SCHEME_REPLICATED);
    // Shared memory is not cleared between kernels: wipe the round keys before exiting.
    __syncthreads();
    for (int i = threadIdx.x; i < 60; i += blockDim.x) ((volatile cs_u32 *)rk)[i] = 0;
}

// AES-256-CTR with the wide tables (aes_core.h, "Wide-table AES") in dynamic shared memory:
// 64 KiB (two tables) or 128 KiB (four tables); the host raises the function's dynamic shared
// memory limit and launches with exactly that many bytes. Same grid layout as cs_ctr.
// RK_IN_REGS: copy the round keys into registers first (60 more registers, 14 fewer shared loads
// per AES block for a kernel that is shared-load bound). Registers are not addressable memory,
// so there is nothing to wipe there (a volatile wipe would force the array onto the stack).
#define CS_CTR_WIDE(NAME, THREADS, MIN_BLOCKS, SCHEME, REGIONS, RK_IN_REGS)                                        \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)                                             \
        NAME(const cs_u32 *te0, const cs_u32 *rk_g, const cs_u64 *desc, const cs_u8 *src, cs_u8 *dst) {           \
        extern __shared__ __align__(16) cs_u32 cs_wide_tab[];                                                     \
        __shared__ __align__(16) cs_u32 rk[60];                                                                   \
        __shared__ cs_u32 te0s[256];                                                                              \
        for (int i = threadIdx.x; i < 256; i += blockDim.x) te0s[i] = te0[i];                                      \
        for (int i = threadIdx.x; i < 60; i += blockDim.x) rk[i] = rk_g[i];                                        \
        __syncthreads();                                                                                          \
        for (cs_u32 i = threadIdx.x; i < (REGIONS) * CS_WIDE_WORDS; i += blockDim.x)                               \
            cs_wide_tab[i] = cs_wide_entry(te0s, i);                                                              \
        __syncthreads();                                                                                          \
        const cs_u64 *d = desc + (cs_u64)blockIdx.y * CS_DESC_WORDS;                                              \
        cs_u64 so = d[0], dof = d[1], len = d[2], off = d[3];                                                     \
        if (len > 0) {                                                                                            \
            cs_u32 rkr[RK_IN_REGS ? 60 : 1];                                                                      \
            if (RK_IN_REGS) {                                                                                     \
                CS_UNROLL for (int i = 0; i < (RK_IN_REGS ? 60 : 1); i++) rkr[i] = rk[i];                         \
            }                                                                                                     \
            cs_ctr_chunk(cs_wide_tab, threadIdx.x & 31, RK_IN_REGS ? rkr : rk, d, src + so, dst + dof, len, off,   \
                         (cs_u64)blockIdx.x * blockDim.x + threadIdx.x, (cs_u64)gridDim.x * blockDim.x, SCHEME);  \
        }                                                                                                         \
        __syncthreads();                                                                                          \
        for (int i = threadIdx.x; i < 60; i += blockDim.x) ((volatile cs_u32 *)rk)[i] = 0;                         \
    }

CS_CTR_WIDE(cs_ctr_w2, 512, 2, CS_SCHEME_WIDE2, 1, 0)
CS_CTR_WIDE(cs_ctr_w2b, 256, 3, CS_SCHEME_WIDE2, 1, 0)
CS_CTR_WIDE(cs_ctr_w2r, 256, 2, CS_SCHEME_WIDE2, 1, 1)
CS_CTR_WIDE(cs_ctr_w4, 1024, 1, CS_SCHEME_WIDE4, 2, 0)
CS_CTR_WIDE(cs_ctr_w4b, 512, 1, CS_SCHEME_WIDE4, 2, 0)

// Parallel GHASH: each thread folds segments of CS_SEG_BLOCKS blocks (counted from the end),
// scales them by H^(s*CS_SEG_BLOCKS) from hpow, and XORs everything into acc[4*chunk..] (GF
// addition is XOR, so atomicXor combines partial sums in any order). The host XORs E_K(J0).
extern "C" __global__ void __launch_bounds__(CS_THREADS) cs_ghash(const cs_u64 *htab, const cs_u64 *hpow,
                                                                   const cs_u64 *desc, const cs_u8 *src,
                                                                   const cs_u8 *aadbuf, cs_u32 *acc) {
    __shared__ cs_u64 hh[16], hl[16];
    __shared__ cs_u32 last4[16];
    const cs_u32 l4[16] = CS_LAST4_INIT;
    if (threadIdx.x < 16) {
        hh[threadIdx.x] = htab[threadIdx.x];
        hl[threadIdx.x] = htab[16 + threadIdx.x];
        last4[threadIdx.x] = l4[threadIdx.x];
    }
    __syncthreads();
    const cs_u64 *d = desc + (cs_u64)blockIdx.y * CS_DESC_WORDS;
    cs_u64 len = d[2], alen = d[7] & 0xffffffffffffull;
    int plain = (int)((d[7] >> 48) & CS_FLAG_PLAIN);
    const cs_u8 *data = src + d[0], *aad = aadbuf + d[6];
    cs_u64 nseg = (cs_ghash_blocks(alen, len, plain) + CS_SEG_BLOCKS - 1) / CS_SEG_BLOCKS;
    cs_u64 h = 0, l = 0;
    for (cs_u64 s = (cs_u64)blockIdx.x * blockDim.x + threadIdx.x; s < nseg; s += (cs_u64)gridDim.x * blockDim.x) {
        cs_u64 yh, yl;
        cs_ghash_segment(hh, hl, last4, aad, alen, data, len, plain, s, &yh, &yl);
        if (s > 0) cs_gf128_mul(&yh, &yl, hpow[2 * s], hpow[2 * s + 1]);
        h ^= yh; l ^= yl;
    }
    for (int o = 16; o > 0; o >>= 1) {
        h ^= __shfl_xor_sync(0xffffffffu, h, o);
        l ^= __shfl_xor_sync(0xffffffffu, l, o);
    }
    if ((threadIdx.x & 31) == 0 && (h | l)) {
        cs_u32 *a = acc + 4 * (cs_u64)blockIdx.y;
        atomicXor(&a[0], (cs_u32)(h >> 32));
        atomicXor(&a[1], (cs_u32)h);
        atomicXor(&a[2], (cs_u32)(l >> 32));
        atomicXor(&a[3], (cs_u32)l);
    }
    // The H tables are key material: wipe them from shared memory before exiting.
    __syncthreads();
    if (threadIdx.x < 16) ((volatile cs_u64 *)hh)[threadIdx.x] = ((volatile cs_u64 *)hl)[threadIdx.x] = 0;
}
