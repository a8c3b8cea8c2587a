//! Per-tensor statistics the merge methods need before the element-wise
//! pass: magnitude thresholds (TIES, breadcrumbs), L1 sums for rescaling
//! (DARE, DELLA), norms and dot products (SLERP, model_stock).
//!
//! Each is a streaming pass over the mapped inputs in blocks of
//! `STAT_BLOCK` elements, run in parallel; partial sums are combined in
//! block order, so results do not depend on the thread count. Memory is
//! bounded by a few histograms and one count per block (contract 3).
//!
//! Magnitude thresholds are found by radix selection over the f32 bit
//! patterns of `|d|` (for non-negative floats, bit order is value order):
//! a histogram of the high 16 bits finds the bin holding the wanted rank, a
//! histogram of the low 16 bits within that bin finds the value. Elements
//! equal to a boundary value are ranked by index, so the kept set has
//! exactly the wanted size; for that, a third pass counts boundary-equal
//! elements per block.

use std::ops::Range;

use rayon::prelude::*;

use crate::arith::{View, for_each_delta};
use crate::error::Result;
use crate::interrupt;
use crate::methods::{Method, Sparsify, TensorParams};
use crate::plan::{MergeOp, Plan};
use crate::rng;

/// Elements per statistics block.
pub const STAT_BLOCK: u64 = 1 << 16;
/// Norms below this count as 1 (SLERP), as in mergekit.
const NORM_EPS: f64 = 1e-8;
/// Rescaling is skipped when either L1 sum is below this.
const RESCALE_EPS: f64 = 1e-7;
const DOT_THRESHOLD: f64 = 0.9995;

/// Keeps the elements whose stable ascending rank of `|d|` lies in
/// `lo..hi`, equal magnitudes ranked by index.
#[derive(Clone, Debug)]
pub struct RankKeep {
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
    pub fn keeps(&self, v: u32, seen_lo: u64, seen_hi: u64) -> bool {
        if v < self.lo_val || v > self.hi_val {
            return false;
        }
        (v != self.lo_val || self.less_lo + seen_lo >= self.lo)
            && (v != self.hi_val || self.less_hi + seen_hi < self.hi)
    }
}

/// Which elements of one model's delta are kept.
#[derive(Clone, Debug)]
pub enum Keep {
    /// All, untouched (density >= 1 or no sparsification).
    All,
    /// Replaced by zeros (density <= 0).
    Zero,
    /// Multiplied by a mask that keeps nothing.
    None,
    Ranks(RankKeep),
    /// With probability `p` each.
    Random(f32),
    /// With a probability from the element's rank in its row.
    Della {
        density: f64,
        epsilon: f64,
    },
}

/// One merged model's statistics for a tensor.
#[derive(Clone, Debug)]
pub struct ModelStats {
    pub keep: Keep,
    /// L1-preserving factor for the kept elements, when rescaling applies.
    pub rescale: Option<f32>,
    /// Random stream (DARE, DELLA).
    pub stream: u64,
}

/// Everything the element-wise pass needs for one tensor.
#[derive(Clone, Debug, Default)]
pub struct TensorStats {
    pub models: Vec<ModelStats>,
    /// SLERP coefficients for the base and the other model.
    pub slerp: (f32, f32),
    /// model_stock's `t`, one per row (or one for the tensor).
    pub stock_t: Vec<f32>,
    /// Row length for per-row statistics (DELLA ranks, filter-wise stock).
    pub row_len: u64,
}

fn bits(d: f32) -> u32 {
    d.to_bits() & 0x7fff_ffff
}

/// `0..n` cut into blocks of at most `STAT_BLOCK` that do not cross rows of
/// `row_len`: `(row, range)`.
fn blocks(n: u64, row_len: u64) -> Vec<(u64, Range<u64>)> {
    blocks_of(n, row_len, STAT_BLOCK)
}

fn blocks_of(n: u64, row_len: u64, max: u64) -> Vec<(u64, Range<u64>)> {
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

/// Computes the statistics of tensor `name` (`n` elements, rows of
/// `row_len`) for `m`.
pub fn compute(plan: &Plan, name: &str, n: u64, row_len: u64, m: &MergeOp) -> Result<TensorStats> {
    let p = &m.params;
    let mut st = TensorStats { row_len, ..Default::default() };
    match m.method {
        Method::Linear => {}
        Method::Slerp => {
            let base = m.base_view(plan).expect("slerp has a base");
            st.slerp = slerp_coefficients(base, m.view(plan, 0), n, p.t);
        }
        Method::ModelStock => {
            let base = m.base_view(plan).expect("model_stock has a base");
            let xs: Vec<View> = (0..m.models.len()).map(|k| m.view(plan, k)).collect();
            let rl = if p.filter_wise { row_len } else { n.max(1) };
            st.stock_t = stock_t(base, &xs, n, rl);
            st.row_len = rl;
        }
        _ => {
            let base = m.base_view(plan).expect("task arithmetic has a base");
            for k in 0..m.models.len() {
                interrupt::check()?;
                let x = m.view(plan, k);
                let stream = rng::stream(m.seed, name, k);
                let (keep, rescale) = model_keep(m.method, p, k, base, x, n, row_len, stream);
                st.models.push(ModelStats { keep, rescale, stream });
            }
        }
    }
    Ok(st)
}

/// The mask of model `k` and, with `rescale`, its L1 factor.
#[allow(clippy::too_many_arguments)]
fn model_keep(
    method: Method,
    p: &TensorParams,
    k: usize,
    base: View,
    x: View,
    n: u64,
    row_len: u64,
    stream: u64,
) -> (Keep, Option<f32>) {
    let mp = p.models[k];
    let Some(sp) = method.sparsify() else {
        return (Keep::All, None);
    };
    if mp.density >= 1.0 {
        return (Keep::All, None);
    }
    let nf = n as f64;
    let interval = match sp {
        Sparsify::Magnitude if mp.density <= 0.0 || n == 0 => return (Keep::Zero, None),
        Sparsify::Magnitude => {
            let k = ((mp.density * nf) as u64).max(1);
            Some((n - k, n))
        }
        Sparsify::Outliers => {
            let target = (mp.density.max(0.0) * nf) as u64;
            let top = (mp.gamma * nf) as u64;
            let bot = n.saturating_sub(target + top);
            Some((bot, bot + target))
        }
        Sparsify::Della if mp.density <= 0.0 => return (Keep::Zero, None),
        Sparsify::Random | Sparsify::Della => None,
    };
    let keep = match interval {
        Some((lo, hi)) if lo >= hi => Keep::None,
        Some((lo, hi)) => Keep::Ranks(rank_keep(base, x, n, lo, hi)),
        None if sp == Sparsify::Random => Keep::Random(mp.density.max(0.0) as f32),
        None => Keep::Della { density: mp.density, epsilon: mp.epsilon },
    };
    let rescale = if p.rescale { l1_factor(&keep, base, x, n, row_len, stream) } else { None };
    (keep, rescale)
}

/// Per-thread histogram over `blocks`, summed.
fn histogram(
    base: View,
    x: View,
    n: u64,
    bins: usize,
    bin: impl Fn(u32) -> Option<usize> + Sync,
) -> Vec<u64> {
    blocks(n, n.max(1))
        .into_par_iter()
        .fold(
            || vec![0u64; bins],
            |mut h, (_, r)| {
                for_each_delta(base, x, r, |_, d| {
                    for &v in d {
                        if let Some(b) = bin(bits(v)) {
                            h[b] += 1;
                        }
                    }
                });
                h
            },
        )
        .reduce(
            || vec![0u64; bins],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            },
        )
}

/// The bin holding rank `r` of a histogram, and the count before it.
fn find_rank(hist: &[u64], r: u64) -> (usize, u64) {
    let mut before = 0;
    for (i, &c) in hist.iter().enumerate() {
        if before + c > r {
            return (i, before);
        }
        before += c;
    }
    unreachable!("rank {r} beyond the histogram total {before}")
}

/// The magnitude bits at ascending ranks `lo` and `hi`, and how many
/// magnitudes are smaller than each: one pass for the high 16 bits, one
/// for the low 16 bits inside the one or two bins that hold the ranks.
fn select2(base: View, x: View, n: u64, lo: u64, hi: u64) -> [(u32, u64); 2] {
    let high = histogram(base, x, n, 1 << 15, |v| Some((v >> 16) as usize));
    let found = [lo, hi].map(|r| find_rank(&high, r));
    let (bins, before) = (found.map(|f| f.0), found.map(|f| f.1));
    let (b0, b1) = (bins[0] as u32, bins[1] as u32);
    let low = histogram(base, x, n, 2 << 16, |v| {
        let (h, l) = (v >> 16, (v & 0xffff) as usize);
        if h == b0 {
            Some(l)
        } else if h == b1 {
            Some((1 << 16) + l)
        } else {
            None
        }
    });
    [(0, lo), (1, hi)].map(|(k, r)| {
        // Ranks in the same bin share the first histogram.
        let half = if k == 1 && b1 != b0 { &low[1 << 16..] } else { &low[..1 << 16] };
        let (lb, below) = find_rank(half, r - before[k]);
        ((bins[k] as u32) << 16 | lb as u32, before[k] + below)
    })
}

fn rank_keep(base: View, x: View, n: u64, lo: u64, hi: u64) -> RankKeep {
    let [(lo_val, less_lo), (hi_val, less_hi)] = select2(base, x, n, lo, hi - 1);
    // Boundary-equal counts per block, then exclusive prefix sums.
    let counts: Vec<(u64, u64)> = blocks(n, n.max(1))
        .into_par_iter()
        .map(|(_, r)| {
            let (mut a, mut b) = (0, 0);
            for_each_delta(base, x, r, |_, d| {
                for &v in d {
                    a += (bits(v) == lo_val) as u64;
                    b += (bits(v) == hi_val) as u64;
                }
            });
            (a, b)
        })
        .collect();
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

/// Stable ascending ranks of the magnitudes in `d` (ties by index), by
/// sorting `bits << 32 | index` keys (plain u64 sorts are several times
/// faster than sorting by a tuple key).
pub fn row_ranks(d: &[f32], ranks: &mut Vec<u32>) {
    let mut keys: Vec<u64> = d.iter().enumerate().map(|(i, v)| (bits(*v) as u64) << 32 | i as u64).collect();
    keys.sort_unstable();
    ranks.clear();
    ranks.resize(d.len(), 0);
    for (r, k) in keys.iter().enumerate() {
        ranks[(k & 0xffff_ffff) as usize] = r as u32;
    }
}

/// DELLA's keep probability for rank `r` in a row of `len`.
#[inline]
pub fn della_probability(density: f64, epsilon: f64, r: u32, len: u64) -> f32 {
    let rank_norm = if len > 1 { r as f32 / (len - 1) as f32 } else { 0.0 };
    let lo = (density - epsilon) as f32;
    lo + (rank_norm * 2.0) * epsilon as f32
}

/// Calls `f(index, delta, kept)` over a row-aligned block `r` (of row
/// `row`) for masks that need no cursor (random, DELLA, all).
#[allow(clippy::too_many_arguments)]
fn for_each_random_kept(
    keep: &Keep,
    base: View,
    x: View,
    row: u64,
    row_len: u64,
    r: Range<u64>,
    stream: u64,
    mut f: impl FnMut(f32, bool),
) {
    match keep {
        Keep::Della { density, epsilon } => {
            // Ranks need the whole row.
            let start = row * row_len;
            let mut d = Vec::with_capacity(row_len as usize);
            for_each_delta(base, x, start..start + row_len, |_, blk| d.extend_from_slice(blk));
            let mut ranks = Vec::new();
            row_ranks(&d, &mut ranks);
            for i in r {
                let j = (i - start) as usize;
                let p = della_probability(*density, *epsilon, ranks[j], row_len);
                f(d[j], rng::uniform(stream, i) < p);
            }
        }
        _ => for_each_delta(base, x, r, |i0, d| {
            for (j, &v) in d.iter().enumerate() {
                let kept = match keep {
                    Keep::Random(p) => rng::uniform(stream, i0 + j as u64) < *p,
                    _ => true,
                };
                f(v, kept);
            }
        }),
    }
}

/// `sum |d| / sum |kept d|` when both are at least `RESCALE_EPS`.
fn l1_factor(keep: &Keep, base: View, x: View, n: u64, row_len: u64, stream: u64) -> Option<f32> {
    let (before, after) = match keep {
        Keep::All | Keep::Zero => return None,
        Keep::None => return None,
        Keep::Ranks(rk) => {
            // Kept elements equal to a boundary value all have that value.
            let parts: Vec<(f64, f64, u64, u64)> = blocks(n, n.max(1))
                .into_par_iter()
                .map(|(_, r)| {
                    let (mut all, mut inner, mut eq_lo, mut eq_hi) = (0f64, 0f64, 0u64, 0u64);
                    for_each_delta(base, x, r, |_, d| {
                        for &v in d {
                            let b = bits(v);
                            all += v.abs() as f64;
                            if b > rk.lo_val && b < rk.hi_val {
                                inner += v.abs() as f64;
                            }
                            eq_lo += (b == rk.lo_val) as u64;
                            eq_hi += (b == rk.hi_val) as u64;
                        }
                    });
                    (all, inner, eq_lo, eq_hi)
                })
                .collect();
            let (mut all, mut inner, mut n_lo, mut n_hi) = (0f64, 0f64, 0u64, 0u64);
            for (a, i, l, h) in parts {
                all += a;
                inner += i;
                n_lo += l;
                n_hi += h;
            }
            let lo_mag = f32::from_bits(rk.lo_val) as f64;
            let hi_mag = f32::from_bits(rk.hi_val) as f64;
            // Equal elements kept: ranks less..less+count intersected with lo..hi.
            let kept = |less: u64, count: u64| (less + count).min(rk.hi).saturating_sub(less.max(rk.lo));
            let after = if rk.lo_val == rk.hi_val {
                kept(rk.less_lo, n_lo) as f64 * lo_mag
            } else {
                inner + kept(rk.less_lo, n_lo) as f64 * lo_mag + kept(rk.less_hi, n_hi) as f64 * hi_mag
            };
            (all, after)
        }
        Keep::Random(_) | Keep::Della { .. } => {
            // DELLA ranks need whole rows, so its blocks are rows.
            let max = if matches!(keep, Keep::Della { .. }) { row_len.max(1) } else { STAT_BLOCK };
            let parts: Vec<(f64, f64)> = blocks_of(n, row_len.max(1), max)
                .into_par_iter()
                .map(|(row, r)| {
                    let (mut all, mut kept) = (0f64, 0f64);
                    for_each_random_kept(keep, base, x, row, row_len, r, stream, |d, k| {
                        all += d.abs() as f64;
                        if k {
                            kept += d.abs() as f64;
                        }
                    });
                    (all, kept)
                })
                .collect();
            parts.into_iter().fold((0.0, 0.0), |(a, k), (x, y)| (a + x, k + y))
        }
    };
    (before >= RESCALE_EPS && after >= RESCALE_EPS).then(|| (before / after) as f32)
}

/// Sums of `f` over blocks of `0..n` in rows of `row_len`, per row, in order.
fn per_row<const K: usize>(n: u64, row_len: u64, f: impl Fn(Range<u64>) -> [f64; K] + Sync) -> Vec<[f64; K]> {
    let parts: Vec<(u64, [f64; K])> =
        blocks(n, row_len.max(1)).into_par_iter().map(|(row, r)| (row, f(r))).collect();
    let rows = n.div_ceil(row_len.max(1)) as usize;
    let mut out = vec![[0f64; K]; rows.max(1)];
    for (row, s) in parts {
        for (o, v) in out[row as usize].iter_mut().zip(s) {
            *o += v;
        }
    }
    out
}

fn slerp_coefficients(a: View, b: View, n: u64, t: f64) -> (f32, f32) {
    let sums = per_row::<3>(n, n.max(1), |r| {
        let mut s = [0f64; 3];
        let mut xa = [0f32; crate::arith::BLOCK];
        let mut xb = [0f32; crate::arith::BLOCK];
        let mut p = r.start;
        while p < r.end {
            let m = (crate::arith::BLOCK as u64).min(r.end - p) as usize;
            a.decode_at(p, &mut xa[..m]);
            b.decode_at(p, &mut xb[..m]);
            for j in 0..m {
                let (u, v) = (xa[j] as f64, xb[j] as f64);
                s[0] += u * u;
                s[1] += v * v;
                s[2] += u * v;
            }
            p += m as u64;
        }
        s
    })[0];
    let norm = |ss: f64| {
        let v = ss.sqrt();
        if v > NORM_EPS { v } else { 1.0 }
    };
    let dot = (sums[2] / (norm(sums[0]) * norm(sums[1]))).clamp(-1.0, 1.0);
    if dot.abs() > DOT_THRESHOLD {
        return ((1.0 - t) as f32, t as f32);
    }
    let theta = dot.acos();
    let s = theta.sin();
    (((1.0 - t) * theta).sin() as f32 / s as f32, (t * theta).sin() as f32 / s as f32)
}

/// model_stock's `t` per row of `row_len` (one row: the whole tensor).
fn stock_t(base: View, xs: &[View], n: u64, row_len: u64) -> Vec<f32> {
    let k = xs.len();
    // Gram matrix of the deltas, upper triangle, row-major.
    let pairs: Vec<(usize, usize)> = (0..k).flat_map(|i| (i..k).map(move |j| (i, j))).collect();
    let grams: Vec<Vec<f64>> = {
        let parts: Vec<(u64, Vec<f64>)> = blocks(n, row_len)
            .into_par_iter()
            .map(|(row, r)| {
                let mut d: Vec<Vec<f32>> = vec![Vec::with_capacity((r.end - r.start) as usize); k];
                for (di, x) in d.iter_mut().zip(xs) {
                    for_each_delta(base, *x, r.clone(), |_, blk| di.extend_from_slice(blk));
                }
                let g = pairs
                    .iter()
                    .map(|&(i, j)| d[i].iter().zip(&d[j]).map(|(a, b)| *a as f64 * *b as f64).sum())
                    .collect();
                (row, g)
            })
            .collect();
        let rows = n.div_ceil(row_len).max(1) as usize;
        let mut g = vec![vec![0f64; pairs.len()]; rows];
        for (row, part) in parts {
            g[row as usize].iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        g
    };
    let at = |i: usize, j: usize| pairs.iter().position(|&p| p == (i.min(j), i.max(j))).unwrap();
    grams
        .iter()
        .map(|g| {
            let mut cos_sum = 0.0;
            let mut count = 0.0;
            for i in 0..k {
                for j in i + 1..k {
                    let norms = g[at(i, i)].sqrt() * g[at(j, j)].sqrt();
                    cos_sum += (g[at(i, j)] / norms.max(1e-6)).clamp(-1.0, 1.0);
                    count += 1.0;
                }
            }
            let cos: f64 = cos_sum / count;
            let den: f64 = 1.0 + (k as f64 - 1.0) * cos;
            if den.abs() < 1e-6 { 0.0 } else { (k as f64 * cos / den) as f32 }
        })
        .collect()
}
