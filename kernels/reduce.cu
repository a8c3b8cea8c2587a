// The f64 reductions of SLERP, model_stock and the random masks' L1
// rescaling (src/merge/stats.rs). One CUDA block of 256 threads per stats
// block; thread t sums the block's elements t, t + 256, ... (lane t), then
// the lanes are added in the fixed tree order of src/merge/lanes.rs, so each
// block's partial equals the CPU's bit for bit. `bounds` holds the chunk's
// block boundaries (nblocks + 1 offsets into the chunk) where blocks follow
// rows.

// SLERP: sums of a*a, b*b, a*b per 65536-element block. out[3b..3b+3].
extern "C" __global__ void slerp_sums(const float* a, const float* b, u64 n, double* out) {
    u64 start = (u64)blockIdx.x * STAT_BLOCK;
    u64 end = start + STAT_BLOCK < n ? start + STAT_BLOCK : n;
    double acc[3] = {0.0, 0.0, 0.0};
    for (u64 i = start + threadIdx.x; i < end; i += LANES) {
        double u = (double)a[i], v = (double)b[i];
        acc[0] = __dadd_rn(acc[0], __dmul_rn(u, u));
        acc[1] = __dadd_rn(acc[1], __dmul_rn(v, v));
        acc[2] = __dadd_rn(acc[2], __dmul_rn(u, v));
    }
    lane_tree<3>(acc);
    if (threadIdx.x == 0) {
        for (int k = 0; k < 3; k++) out[3 * (u64)blockIdx.x + k] = acc[k];
    }
}

// model_stock: the Gram matrix of the k deltas (upper triangle, row-major
// pairs) per block. out[npairs * b + pair].
extern "C" __global__ void gram_sums(const float* ds, int k, u64 n, const u64* bounds, double* out) {
    u64 start = bounds[blockIdx.x], end = bounds[blockIdx.x + 1];
    int npairs = k * (k + 1) / 2;
    int pair = 0;
    for (int x = 0; x < k; x++) {
        for (int y = x; y < k; y++, pair++) {
            double acc[1] = {0.0};
            for (u64 i = start + threadIdx.x; i < end; i += LANES) {
                acc[0] = __dadd_rn(acc[0], __dmul_rn((double)ds[(u64)x * n + i], (double)ds[(u64)y * n + i]));
            }
            lane_tree<1>(acc);
            if (threadIdx.x == 0) out[(u64)npairs * blockIdx.x + pair] = acc[0];
        }
    }
}

// DARE (ranks == 0) and DELLA L1 sums: |d| over all elements and over the
// kept ones, per block. Element `i` of the chunk is element `start + i` of
// the tensor. out[2b], out[2b + 1].
extern "C" __global__ void l1_masked(const float* d, u64 n, const u64* bounds, u64 start, u64 stream,
                                     float prob, const u32* ranks, u64 row_len, double density,
                                     double epsilon, double* out) {
    u64 bs = bounds[blockIdx.x], be = bounds[blockIdx.x + 1];
    double acc[2] = {0.0, 0.0};
    for (u64 i = bs + threadIdx.x; i < be; i += LANES) {
        float p = ranks ? della_probability(density, epsilon, ranks[i], row_len) : prob;
        double m = (double)fabsf(d[i]);
        acc[0] = __dadd_rn(acc[0], m);
        if (uniform(stream, start + i) < p) acc[1] = __dadd_rn(acc[1], m);
    }
    lane_tree<2>(acc);
    if (threadIdx.x == 0) {
        out[2 * (u64)blockIdx.x] = acc[0];
        out[2 * (u64)blockIdx.x + 1] = acc[1];
    }
}
