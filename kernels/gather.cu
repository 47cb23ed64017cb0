// Row gather for device batches (ciphershard loader, src/cipher/cuda/gather.rs).
//
// Copies `rows` rows of `row_bytes` bytes each from a verified, decrypted window buffer `src`
// into a batch column buffer `dst`. `pairs[2*r]` is row r's byte offset in `src`,
// `pairs[2*r+1]` its byte offset in `dst`. The host checks every range against both buffers
// before the launch. One thread block per row (grid-stride over rows); the widest access the
// offsets' alignment allows (16, 4 or 1 bytes).
//
// Compiled at run time with NVRTC, in one module with aes_gcm.cu (src/cipher/cuda/compile.rs).

extern "C" __global__ void cs_gather_rows(const unsigned char* __restrict__ src,
                                          unsigned char* __restrict__ dst,
                                          const unsigned long long* __restrict__ pairs,
                                          unsigned int rows, unsigned long long row_bytes)
{
    for (unsigned int r = blockIdx.x; r < rows; r += gridDim.x) {
        const unsigned long long s = pairs[2ull * r];
        const unsigned long long d = pairs[2ull * r + 1];
        const unsigned long long align = s | d | row_bytes;
        if ((align & 15ull) == 0) {
            const uint4* a = reinterpret_cast<const uint4*>(src + s);
            uint4* b = reinterpret_cast<uint4*>(dst + d);
            for (unsigned long long i = threadIdx.x; i < row_bytes / 16; i += blockDim.x) b[i] = a[i];
        } else if ((align & 3ull) == 0) {
            const unsigned int* a = reinterpret_cast<const unsigned int*>(src + s);
            unsigned int* b = reinterpret_cast<unsigned int*>(dst + d);
            for (unsigned long long i = threadIdx.x; i < row_bytes / 4; i += blockDim.x) b[i] = a[i];
        } else {
            for (unsigned long long i = threadIdx.x; i < row_bytes; i += blockDim.x) dst[d + i] = src[s + i];
        }
    }
}
