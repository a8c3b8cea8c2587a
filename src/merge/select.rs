//! What the statistics passes share: the blocks they walk (whole rows at
//! most `STAT_BLOCK` long, summed in block order so results do not depend
//! on the thread count), the Gram matrix's pair order, and selection by
//! rank over a per-element value (TIES's and breadcrumbs' `|d|`, SCE's
//! variance) by radix selection over its f32 bits: a histogram of the high
//! 16 bits finds the bin holding a rank, one of the low 16 bits within that
//! bin finds the value, and boundary-equal elements are ranked by index.

use std::ops::Range;

use rayon::prelude::*;

use crate::error::Result;

/// Elements per statistics block.
pub(crate) const STAT_BLOCK: u64 = 1 << 16;

/// Keeps the elements whose stable ascending rank of `|d|` lies in
/// `lo..hi`, equal magnitudes ranked by index.
#[derive(Clone, Debug)]
pub(crate) struct RankKeep {
    pub lo: u64,
    pub hi: u64,
    /// Bits of the magnitudes at ranks `lo` and `hi - 1`.
    pub lo_val: u32,
    pub hi_val: u32,
    /// How many magnitudes are smaller than each.
    pub less_lo: u64,
    pub less_hi: u64,
    /// Per block: how many elements before the block equal each value.
    pub eq_lo: Vec<u64>,
    pub eq_hi: Vec<u64>,
}

impl RankKeep {
    /// Whether magnitude bits `v` are kept, `seen_*` elements equal to the
    /// boundary values having come before it.
    #[inline(always)]
    pub(crate) fn keeps(&self, v: u32, seen_lo: u64, seen_hi: u64) -> bool {
        if v < self.lo_val || v > self.hi_val {
            return false;
        }
        (v != self.lo_val || self.less_lo + seen_lo >= self.lo)
            && (v != self.hi_val || self.less_hi + seen_hi < self.hi)
    }
}

/// `0..n` cut into blocks of at most `STAT_BLOCK` that do not cross rows of
/// `row_len`: `(row, range)`.
pub(crate) fn blocks(n: u64, row_len: u64) -> Vec<(u64, Range<u64>)> {
    blocks_of(n, row_len, STAT_BLOCK)
}

pub(crate) fn blocks_of(n: u64, row_len: u64, max: u64) -> Vec<(u64, Range<u64>)> {
    let mut out = Vec::new();
    let mut row_start = 0;
    while row_start < n {
        let row_end = (row_start + row_len).min(n);
        let mut a = row_start;
        while a < row_end {
            let b = (a + max).min(row_end);
            out.push((row_start / row_len, a..b));
            a = b;
        }
        row_start = row_end;
    }
    out
}

/// Elements per histogram chunk: each chunk fills its own histogram (up to
/// 1 MiB of counts for the low bits), so a chunk must be far larger than
/// that for the zeroing and summing of histograms not to cost more than
/// the counting (with one histogram per 64K-element block they cost 16
/// bytes of memory traffic per element).
const HIST_CHUNK: u64 = 1 << 22;

/// A histogram of `bins` counts over elements `0..n`: `fill(range, h)`
/// counts one chunk's elements into `h`; chunks run in parallel and their
/// counts are added (integers, so the order does not matter).
pub(crate) fn chunked_histogram<T: Send>(
    n: u64,
    bins: usize,
    extra: impl Fn() -> T + Sync + Send,
    add: impl Fn(T, T) -> T + Sync + Send,
    fill: impl Fn(Range<u64>, &mut [u64], &mut T) + Sync + Send,
) -> (Vec<u64>, T) {
    (0..n.div_ceil(HIST_CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut h = vec![0u64; bins];
            let mut e = extra();
            fill(c * HIST_CHUNK..((c + 1) * HIST_CHUNK).min(n), &mut h, &mut e);
            (h, e)
        })
        .reduce(
            || (vec![0u64; bins], extra()),
            |(mut a, ea), (b, eb)| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                (a, add(ea, eb))
            },
        )
}

/// The Gram matrix's upper-triangle pairs, row-major.
pub(crate) fn gram_pairs(k: usize) -> Vec<(usize, usize)> {
    (0..k).flat_map(|i| (i..k).map(move |j| (i, j))).collect()
}

/// A per-element value ranked by its f32 bits (non-negative, so bit order
/// is value order): SCE's variance across the models, arcee_fusion's
/// scores. (The models' `|d_k|` of TIES and breadcrumbs go through
/// `merge::stats`' passes, several models at once, with the steps below.)
pub(crate) trait Ranked {
    /// Histogram of the high 16 bits (`1 << 15` bins).
    fn hist_high(&self) -> Result<Vec<u64>>;
    /// Histograms of the low 16 bits inside high bins `b0` and `b1`.
    fn hist_low(&self, b0: u32, b1: u32) -> Result<Vec<u64>>;
}

fn find_rank(hist: &[u64], r: u64) -> Result<(usize, u64)> {
    let mut before = 0;
    for (i, &c) in hist.iter().enumerate() {
        if before + c > r {
            return Ok((i, before));
        }
        before += c;
    }
    Err(crate::error::Error::Internal(format!("rank {r} beyond the histogram total {before}")))
}

/// The magnitude bits at ascending ranks `lo` and `hi`, and how many
/// magnitudes are smaller than each: one pass for the high 16 bits, one
/// for the low 16 bits inside the one or two bins that hold the ranks.
pub(crate) fn value_at_ranks(values: &dyn Ranked, lo: u64, hi: u64) -> Result<[(u32, u64); 2]> {
    let bins = high_bins(&values.hist_high()?, lo, hi)?;
    let low = values.hist_low(bins[0].0, bins[1].0)?;
    low_values(bins, &low, lo, hi)
}

/// `value_at_ranks`' first step, from the high histogram: the bins that
/// hold ranks `lo` and `hi`, and how many values lie before each.
pub(crate) fn high_bins(high: &[u64], lo: u64, hi: u64) -> Result<[(u32, u64); 2]> {
    let (b0, before0) = find_rank(high, lo)?;
    let (b1, before1) = find_rank(high, hi)?;
    Ok([(b0 as u32, before0), (b1 as u32, before1)])
}

/// `value_at_ranks`' second step, from the low histograms inside the bins
/// `high_bins` found.
pub(crate) fn low_values(bins: [(u32, u64); 2], low: &[u64], lo: u64, hi: u64) -> Result<[(u32, u64); 2]> {
    let [(b0, before0), (b1, before1)] = bins;
    // Ranks in the same bin share the first low histogram.
    let second = if b0 == b1 { &low[..1 << 16] } else { &low[1 << 16..] };
    let (l0, below0) = find_rank(&low[..1 << 16], lo - before0)?;
    let (l1, below1) = find_rank(second, hi - before1)?;
    Ok([(b0 << 16 | l0 as u32, before0 + below0), (b1 << 16 | l1 as u32, before1 + below1)])
}

impl RankKeep {
    /// Keeps ascending ranks `lo..hi` (ties by index), from the values at
    /// ranks `lo` and `hi - 1` (`value_at_ranks`) and the per-block counts
    /// of values equal to each.
    pub(crate) fn new(lo: u64, hi: u64, at: [(u32, u64); 2], counts: Vec<(u64, u64)>) -> RankKeep {
        let [(lo_val, less_lo), (hi_val, less_hi)] = at;
        // Exclusive prefix sums of the boundary-equal counts.
        let (mut eq_lo, mut eq_hi) = (Vec::with_capacity(counts.len()), Vec::with_capacity(counts.len()));
        let (mut sa, mut sb) = (0, 0);
        for (a, b) in counts {
            eq_lo.push(sa);
            eq_hi.push(sb);
            sa += a;
            sb += b;
        }
        RankKeep { lo, hi, lo_val, hi_val, less_lo, less_hi, eq_lo, eq_hi }
    }
}
