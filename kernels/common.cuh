// Shared definitions for chatvec's kernels: dtype codes, exact decoding,
// round-to-nearest-even encoding written out on the bits (the same
// algorithms as src/model/dtype.rs and the `half` crate), the SplitMix64 counter
// generator of src/rng.rs, and the fixed-order f64 block reduction of
// src/merge/lanes.rs.
//
// Every f32 operation in these kernels is an explicit `__fadd_rn` /
// `__fmul_rn` / `__fsub_rn` / `__fdiv_rn`, and the program is compiled
// with --fmad=false as well, so nothing is contracted into a fused
// multiply-add and every result equals the CPU's bit for bit (contract 1).
// Element counts and indices are 64-bit throughout.

typedef unsigned long long u64;
typedef long long i64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define TY_BF16 0
#define TY_F16 1
#define TY_F32 2

// Threads per block, and lanes of the f64 reductions (src/merge/lanes.rs LANES).
#define LANES 256
// Elements per statistics block (src/merge/select.rs STAT_BLOCK).
#define STAT_BLOCK 65536ull

__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }

__device__ __forceinline__ float f16_to_f32(u16 h) {
    u32 sign = ((u32)(h & 0x8000)) << 16;
    u32 exp = (h >> 10) & 0x1f;
    u32 man = h & 0x3ff;
    if (exp == 0x1f) {
        // Infinity, or NaN with the quiet bit set as `half` does.
        return __uint_as_float(sign | 0x7f800000u | (man ? 0x00400000u : 0u) | (man << 13));
    }
    if (exp == 0) {
        if (man == 0) return __uint_as_float(sign);
        // Subnormal: man * 2^-24, exact in f32.
        float v = __fmul_rn((float)man, 5.9604644775390625e-8f);
        return __uint_as_float(__float_as_uint(v) | sign);
    }
    return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
}

__device__ __forceinline__ u16 f32_to_bf16(float x) {
    u32 b = __float_as_uint(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (u16)((b >> 16) | 0x0040u);
    u32 lsb = (b >> 16) & 1u;
    return (u16)((b + 0x7fffu + lsb) >> 16);
}

__device__ __forceinline__ u16 f32_to_f16(float value) {
    u32 x = __float_as_uint(value);
    u32 sign = x & 0x80000000u;
    u32 exp = x & 0x7f800000u;
    u32 man = x & 0x007fffffu;
    if (exp == 0x7f800000u) {
        u32 nan_bit = man == 0 ? 0u : 0x0200u;
        return (u16)((sign >> 16) | 0x7c00u | nan_bit | (man >> 13));
    }
    u32 half_sign = sign >> 16;
    int half_exp = (int)(exp >> 23) - 127 + 15;
    if (half_exp >= 0x1f) return (u16)(half_sign | 0x7c00u);
    if (half_exp <= 0) {
        if (14 - half_exp > 24) return (u16)half_sign;
        u32 m = man | 0x00800000u;
        u32 half_man = m >> (14 - half_exp);
        u32 round_bit = 1u << (13 - half_exp);
        if ((m & round_bit) != 0 && (m & (3u * round_bit - 1u)) != 0) half_man += 1;
        return (u16)(half_sign | half_man);
    }
    u32 he = ((u32)half_exp) << 10;
    u32 half_man = man >> 13;
    u32 round_bit = 0x00001000u;
    if ((man & round_bit) != 0 && (man & (3u * round_bit - 1u)) != 0) {
        return (u16)((half_sign | he | half_man) + 1u);
    }
    return (u16)(half_sign | he | half_man);
}

// Element i of a little-endian array of dtype `ty`.
__device__ __forceinline__ float load(const void* p, int ty, u64 i) {
    if (ty == TY_BF16) return bf16_to_f32(((const u16*)p)[i]);
    if (ty == TY_F16) return f16_to_f32(((const u16*)p)[i]);
    return ((const float*)p)[i];
}

__device__ __forceinline__ void store(void* p, int ty, u64 i, float v) {
    if (ty == TY_BF16) ((u16*)p)[i] = f32_to_bf16(v);
    else if (ty == TY_F16) ((u16*)p)[i] = f32_to_f16(v);
    else ((float*)p)[i] = v;
}

// Grid-stride loop over 64-bit element indices.
#define FOR_EACH(i, n) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (u64)gridDim.x * blockDim.x)

// SplitMix64's output function and the uniform draw of src/rng.rs.
__device__ __forceinline__ u64 mix(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float uniform(u64 stream, u64 index) {
    u64 u = mix(stream + (index + 1ull) * 0x9E3779B97F4A7C15ull);
    return __fmul_rn(__ull2float_rn(u >> 40), 5.9604644775390625e-8f);
}

// |d| as the bits of a non-negative f32 (bit order is value order).
__device__ __forceinline__ u32 mag_bits(float d) { return __float_as_uint(d) & 0x7fffffffu; }

// Sums `K` f64 lanes over the block's 256 threads in the fixed tree order
// of src/merge/lanes.rs: for s = 128, 64, ..., 1, lane j += lane j + s. Every
// thread must call it; thread 0 gets the totals in `acc`.
template <int K>
__device__ __forceinline__ void lane_tree(double (&acc)[K]) {
    __shared__ double sh[K][LANES];
    unsigned t = threadIdx.x;
    for (int k = 0; k < K; k++) sh[k][t] = acc[k];
    __syncthreads();
    for (unsigned s = LANES / 2; s > 0; s >>= 1) {
        if (t < s) {
            for (int k = 0; k < K; k++) sh[k][t] = __dadd_rn(sh[k][t], sh[k][t + s]);
        }
        __syncthreads();
    }
    if (t == 0) {
        for (int k = 0; k < K; k++) acc[k] = sh[k][0];
    }
    __syncthreads();
}
