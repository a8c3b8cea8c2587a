// Statistics for rank selection (TIES, breadcrumbs; src/merge/select.rs):
// the radix-select histograms over the f32 bits of |d|, the per-block
// counts of boundary-equal magnitudes, and the L1 sums for rescaling. All
// read the deltas `d` of one model over one chunk. Counts are integers, so
// their order does not matter; f64 sums use the fixed lane order.

// Histogram of the high 16 bits of |d| (32768 bins). Threads of a warp
// that fall in the same bin add once, through their leader, since deltas
// crowd into few bins.
extern "C" __global__ void hist_high(const float* d, u64 n, u64* hist) {
    FOR_EACH(i, n) {
        u32 bin = mag_bits(d[i]) >> 16;
        u32 peers = __match_any_sync(__activemask(), bin);
        if ((threadIdx.x & 31u) == (u32)(__ffs(peers) - 1)) atomicAdd(&hist[bin], (u64)__popc(peers));
    }
}

// Histogram of the low 16 bits of |d| inside high bins b0 (bins
// 0..65536) and b1 (65536..131072); other elements are skipped.
extern "C" __global__ void hist_low(const float* d, u64 n, u32 b0, u32 b1, u64* hist) {
    FOR_EACH(i, n) {
        u32 v = mag_bits(d[i]);
        u32 h = v >> 16, l = v & 0xffffu;
        int bin = h == b0 ? (int)l : (h == b1 ? 65536 + (int)l : -1);
        if (bin >= 0) atomicAdd(&hist[bin], 1ull);
    }
}

// Per stats block of the chunk (one CUDA block each): how many |d| equal
// lo_val and hi_val. out[2b], out[2b + 1].
extern "C" __global__ void eq_counts(const float* d, u64 n, u32 lo_val, u32 hi_val, u64* out) {
    __shared__ unsigned long long c[2];
    if (threadIdx.x == 0) c[0] = c[1] = 0;
    __syncthreads();
    u64 start = (u64)blockIdx.x * STAT_BLOCK;
    u64 end = start + STAT_BLOCK < n ? start + STAT_BLOCK : n;
    u64 a = 0, b = 0;
    for (u64 i = start + threadIdx.x; i < end; i += LANES) {
        u32 v = mag_bits(d[i]);
        a += v == lo_val;
        b += v == hi_val;
    }
    atomicAdd(&c[0], a);
    atomicAdd(&c[1], b);
    __syncthreads();
    if (threadIdx.x == 0) {
        out[2 * (u64)blockIdx.x] = c[0];
        out[2 * (u64)blockIdx.x + 1] = c[1];
    }
}

// Per stats block: f64 sums of |d| over all elements and over those
// strictly between the boundary values (lane order), and the boundary-equal
// counts. sums[2b..2b+2], counts[2b..2b+2].
extern "C" __global__ void l1_ranks(const float* d, u64 n, u32 lo_val, u32 hi_val, double* sums, u64* counts) {
    __shared__ unsigned long long c[2];
    if (threadIdx.x == 0) c[0] = c[1] = 0;
    __syncthreads();
    u64 start = (u64)blockIdx.x * STAT_BLOCK;
    u64 end = start + STAT_BLOCK < n ? start + STAT_BLOCK : n;
    double acc[2] = {0.0, 0.0};
    u64 a = 0, b = 0;
    for (u64 i = start + threadIdx.x; i < end; i += LANES) {
        float v = d[i];
        u32 bits = mag_bits(v);
        double m = (double)fabsf(v);
        acc[0] = __dadd_rn(acc[0], m);
        if (bits > lo_val && bits < hi_val) acc[1] = __dadd_rn(acc[1], m);
        a += bits == lo_val;
        b += bits == hi_val;
    }
    atomicAdd(&c[0], a);
    atomicAdd(&c[1], b);
    lane_tree<2>(acc);
    if (threadIdx.x == 0) {
        sums[2 * (u64)blockIdx.x] = acc[0];
        sums[2 * (u64)blockIdx.x + 1] = acc[1];
        counts[2 * (u64)blockIdx.x] = c[0];
        counts[2 * (u64)blockIdx.x + 1] = c[1];
    }
}
