// The element-wise pass of the merge methods (src/merge/element.rs) as a
// chain of small kernels over f32 device buffers: decode, delta, mask,
// rescale/weight, combine, encode. Each step is the CPU's step on the same
// values in the same order; the f32 intermediates cost device bandwidth,
// which is many times the PCIe bandwidth that bounds the whole pass.

extern "C" __global__ void decode_f32(float* dst, const void* src, int ty, u64 n) {
    FOR_EACH(i, n) { dst[i] = load(src, ty, i); }
}

extern "C" __global__ void encode_out(void* out, int ty, const float* r, u64 n) {
    FOR_EACH(i, n) { store(out, ty, i, r[i]); }
}

// x = x - base: a model's delta.
extern "C" __global__ void sub_base(float* x, const float* b, u64 n) {
    FOR_EACH(i, n) { x[i] = __fsub_rn(x[i], b[i]); }
}

extern "C" __global__ void fill_zero(float* x, u64 n) {
    FOR_EACH(i, n) { x[i] = 0.0f; }
}

extern "C" __global__ void mul_scalar(float* x, float f, u64 n) {
    FOR_EACH(i, n) { x[i] = __fmul_rn(x[i], f); }
}

// DARE: keep element `start + i` with probability `prob`.
extern "C" __global__ void mask_random(float* x, u64 n, u64 start, u64 stream, float prob) {
    FOR_EACH(i, n) { x[i] = __fmul_rn(x[i], uniform(stream, start + i) < prob ? 1.0f : 0.0f); }
}

// DELLA's keep probability (src/merge/stats.rs della_probability).
__device__ __forceinline__ float della_probability(double density, double epsilon, u32 r, u64 len) {
    float rank_norm = len > 1 ? __fdiv_rn(__uint2float_rn(r), __ull2float_rn(len - 1)) : 0.0f;
    float lo = __double2float_rn(__dsub_rn(density, epsilon));
    return __fadd_rn(lo, __fmul_rn(__fmul_rn(rank_norm, 2.0f), __double2float_rn(epsilon)));
}

// DELLA: keep element `start + i` with the probability of its rank in its
// row (`ranks`, from della_ranks over the same chunk).
extern "C" __global__ void mask_della(float* x, const u32* ranks, u64 n, u64 start, u64 row_len,
                                      double density, double epsilon, u64 stream) {
    FOR_EACH(i, n) {
        float p = della_probability(density, epsilon, ranks[i], row_len);
        x[i] = __fmul_rn(x[i], uniform(stream, start + i) < p ? 1.0f : 0.0f);
    }
}

// Rank selection (TIES, breadcrumbs): keeps the elements whose stable rank
// of |d| lies in lo..hi. Elements equal to a boundary value are ranked by
// index: `eq_lo[b]` / `eq_hi[b]` count those before stats block b of this
// chunk (which starts on a block boundary), and the block scans its tiles in
// order with warp ballots for the rest. One block of 256 threads per stats
// block.
extern "C" __global__ void mask_ranks(float* x, u64 n, const u64* eq_lo, const u64* eq_hi, u32 lo_val,
                                      u32 hi_val, u64 less_lo, u64 less_hi, u64 lo, u64 hi) {
    __shared__ u32 warp_lo[LANES / 32];
    __shared__ u32 warp_hi[LANES / 32];
    u64 b = blockIdx.x;
    u64 start = b * STAT_BLOCK;
    u64 end = start + STAT_BLOCK < n ? start + STAT_BLOCK : n;
    u64 seen_lo = eq_lo[b], seen_hi = eq_hi[b];
    unsigned t = threadIdx.x, lane = t & 31u, w = t >> 5;
    for (u64 tile = start; tile < end; tile += LANES) {
        u64 i = tile + t;
        bool valid = i < end;
        float v = valid ? x[i] : 0.0f;
        u32 bits = mag_bits(v);
        bool el = valid && bits == lo_val;
        bool eh = valid && bits == hi_val;
        u32 bl = __ballot_sync(0xffffffffu, el);
        u32 bh = __ballot_sync(0xffffffffu, eh);
        u32 below = (1u << lane) - 1u;
        if (lane == 0) {
            warp_lo[w] = __popc(bl);
            warp_hi[w] = __popc(bh);
        }
        __syncthreads();
        u64 before_lo = __popc(bl & below), before_hi = __popc(bh & below);
        u64 tile_lo = 0, tile_hi = 0;
        for (unsigned k = 0; k < LANES / 32; k++) {
            if (k < w) {
                before_lo += warp_lo[k];
                before_hi += warp_hi[k];
            }
            tile_lo += warp_lo[k];
            tile_hi += warp_hi[k];
        }
        __syncthreads();
        if (valid) {
            u64 sl = seen_lo + before_lo, sh = seen_hi + before_hi;
            bool kept = bits >= lo_val && bits <= hi_val && (bits != lo_val || less_lo + sl >= lo) &&
                        (bits != hi_val || less_hi + sh < hi);
            x[i] = __fmul_rn(v, kept ? 1.0f : 0.0f);
        }
        seen_lo += tile_lo;
        seen_hi += tile_hi;
    }
}

// DELLA ranks, step 1: per row, keys |d| bits << 32 | index in the row,
// each row padded to `p` (a power of two) with keys above every real key.
extern "C" __global__ void della_keys(const float* d, u64 rows, u64 row_len, u64 p, u64* keys) {
    FOR_EACH(i, rows * p) {
        u64 row = i / p, j = i % p;
        keys[i] = j < row_len ? ((u64)mag_bits(d[row * row_len + j]) << 32 | j) : ~0ull;
    }
}

// Step 2: one compare-exchange stage of a bitonic sort of every
// p-element segment (ascending; the last merge of a segment is forced
// ascending, as the whole-array network would be).
extern "C" __global__ void bitonic_step(u64* keys, u64 total, u64 j, u64 k, u64 p) {
    FOR_EACH(i, total) {
        u64 l = i ^ j;
        if (l > i) {
            bool asc = k == p || (i & k) == 0;
            u64 a = keys[i], c = keys[l];
            if (asc ? a > c : a < c) {
                keys[i] = c;
                keys[l] = a;
            }
        }
    }
}

// Step 3: element ranks from the sorted keys.
extern "C" __global__ void della_ranks(const u64* keys, u64 rows, u64 row_len, u64 p, u32* ranks) {
    FOR_EACH(i, rows * p) {
        u64 row = i / p, pos = i % p;
        if (pos < row_len) ranks[row * row_len + (keys[i] & 0xffffffffull)] = (u32)pos;
    }
}

// linear: acc = sum of x_k * w_k from 0, in model order; / sum of weights.
extern "C" __global__ void combine_linear(float* r, const float* xs, int k, const float* w, int normalize,
                                          float weight_sum, u64 n) {
    FOR_EACH(i, n) {
        float acc = 0.0f;
        for (int m = 0; m < k; m++) acc = __fadd_rn(acc, __fmul_rn(xs[(u64)m * n + i], w[m]));
        if (normalize) acc = __fdiv_rn(acc, weight_sum);
        r[i] = acc;
    }
}

// slerp: ca * base + cb * x.
extern "C" __global__ void combine_slerp(float* r, const float* b, const float* x, float ca, float cb, u64 n) {
    FOR_EACH(i, n) { r[i] = __fadd_rn(__fmul_rn(ca, b[i]), __fmul_rn(cb, x[i])); }
}

// model_stock: avg = sum x_k / k; t * avg + (1 - t) * base, with t per row
// of the tensor (`t[(start + i) / row_len]`).
extern "C" __global__ void combine_stock(float* r, const float* b, const float* xs, int k, const float* t,
                                         u64 start, u64 row_len, u64 n) {
    float kf = (float)k;
    FOR_EACH(i, n) {
        float acc = 0.0f;
        for (int m = 0; m < k; m++) acc = __fadd_rn(acc, xs[(u64)m * n + i]);
        float tt = t[(start + i) / row_len];
        float avg = __fdiv_rn(acc, kf);
        r[i] = __fadd_rn(__fmul_rn(tt, avg), __fmul_rn(__fsub_rn(1.0f, tt), b[i]));
    }
}

// Task arithmetic and its sparse variants, on the masked, rescaled and
// weighted deltas `es`: with `consensus` the TIES sign election (majority
// sign of the sum, 0 counting as +; disjoint mean over the agreeing models'
// weights), else the plain sum over `div_all`; then normalize, lambda, and
// base + result.
extern "C" __global__ void combine_task(float* r, const float* b, const float* es, int k, const float* w,
                                        int consensus, int normalize, float div_all, int use_lambda,
                                        float lambda, u64 n) {
    FOR_EACH(i, n) {
        float acc = 0.0f, div;
        if (consensus) {
            float sw = 0.0f;
            for (int m = 0; m < k; m++) sw = __fadd_rn(sw, es[(u64)m * n + i]);
            float majority = sw >= 0.0f ? 1.0f : -1.0f;
            div = 0.0f;
            for (int m = 0; m < k; m++) {
                float e = es[(u64)m * n + i];
                float sign = e > 0.0f ? 1.0f : (e < 0.0f ? -1.0f : 0.0f);
                float agree = sign == majority ? 1.0f : 0.0f;
                acc = __fadd_rn(acc, __fmul_rn(e, agree));
                div = __fadd_rn(div, __fmul_rn(w[m], agree));
            }
            if (div == 0.0f) div = 1.0f;
        } else {
            for (int m = 0; m < k; m++) acc = __fadd_rn(acc, es[(u64)m * n + i]);
            div = div_all;
        }
        if (normalize) acc = __fdiv_rn(acc, div);
        if (use_lambda) acc = __fmul_rn(acc, lambda);
        r[i] = __fadd_rn(b[i], acc);
    }
}
