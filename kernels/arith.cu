// The chat-vector family (src/arith/formulas.rs), fused: each kernel decodes its
// operands, applies the formula in the documented order and rounds once.
// Input dtypes are kernel arguments (a stored f32 vector is often applied
// to a bf16 base); the output dtype is a template parameter, instantiated
// for bf16, f16 and f32 below.

template <int OUT>
__device__ __forceinline__ void cv_convert(void* out, const void* x, int tx, u64 n) {
    FOR_EACH(i, n) { store(out, OUT, i, load(x, tx, i)); }
}

// out = chat - pre
template <int OUT>
__device__ __forceinline__ void cv_diff(void* out, const void* c, int tc, const void* p, int tp, u64 n) {
    FOR_EACH(i, n) { store(out, OUT, i, __fsub_rn(load(c, tc, i), load(p, tp, i))); }
}

// d = chat - pre; m = scale * d; out = base + m
template <int OUT>
__device__ __forceinline__ void cv_add_diff(void* out, const void* b, int tb, const void* c, int tc,
                                            const void* p, int tp, float scale, u64 n) {
    FOR_EACH(i, n) {
        float d = __fsub_rn(load(c, tc, i), load(p, tp, i));
        float m = __fmul_rn(scale, d);
        store(out, OUT, i, __fadd_rn(load(b, tb, i), m));
    }
}

// m = scale * v; out = base + m
template <int OUT>
__device__ __forceinline__ void cv_add_scaled(void* out, const void* b, int tb, const void* v, int tv,
                                              float scale, u64 n) {
    FOR_EACH(i, n) {
        float m = __fmul_rn(scale, load(v, tv, i));
        store(out, OUT, i, __fadd_rn(load(b, tb, i), m));
    }
}

#define ARITH_KERNELS(SUFFIX, OUT)                                                                      \
    extern "C" __global__ void convert_##SUFFIX(void* out, const void* x, int tx, u64 n) {             \
        cv_convert<OUT>(out, x, tx, n);                                                                 \
    }                                                                                                   \
    extern "C" __global__ void diff_##SUFFIX(void* out, const void* c, int tc, const void* p, int tp,  \
                                             u64 n) {                                                   \
        cv_diff<OUT>(out, c, tc, p, tp, n);                                                             \
    }                                                                                                   \
    extern "C" __global__ void add_diff_##SUFFIX(void* out, const void* b, int tb, const void* c,      \
                                                 int tc, const void* p, int tp, float scale, u64 n) {  \
        cv_add_diff<OUT>(out, b, tb, c, tc, p, tp, scale, n);                                           \
    }                                                                                                   \
    extern "C" __global__ void add_scaled_##SUFFIX(void* out, const void* b, int tb, const void* v,    \
                                                   int tv, float scale, u64 n) {                       \
        cv_add_scaled<OUT>(out, b, tb, v, tv, scale, n);                                                \
    }

ARITH_KERNELS(bf16, TY_BF16)
ARITH_KERNELS(f16, TY_F16)
ARITH_KERNELS(f32, TY_F32)
