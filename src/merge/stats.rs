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

use crate::arith::{BLOCK, View, for_each_delta, for_each_deltas};
use crate::error::Result;
use crate::interrupt;
use crate::merge::fusion::FusionStats;
use crate::merge::lanes::Lanes;
use crate::merge::methods::{Method, Sparsify, TensorParams};
use crate::merge::sce::SceStats;
pub(crate) use crate::merge::select::{RankKeep, STAT_BLOCK, blocks, gram_pairs};
use crate::merge::select::{blocks_of, high_bins, low_values};
use crate::merge::spherical::{Combo, combo};
use crate::merge::{Inputs, TensorMerge};
use crate::rng;

/// Norms below this count as 1 (SLERP), as in mergekit.
const NORM_EPS: f64 = 1e-8;
/// Rescaling is skipped when either L1 sum is below this.
const RESCALE_EPS: f64 = 1e-7;
const DOT_THRESHOLD: f64 = 0.9995;

/// Which elements of one model's delta are kept.
#[derive(Clone, Debug)]
pub(crate) enum Keep {
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
pub(crate) struct ModelStats {
    pub keep: Keep,
    /// L1-preserving factor for the kept elements, when rescaling applies.
    pub rescale: Option<f32>,
    /// Random stream (DARE, DELLA).
    pub stream: u64,
}

/// Everything the element-wise pass needs for one tensor.
#[derive(Clone, Debug, Default)]
pub(crate) struct TensorStats {
    pub models: Vec<ModelStats>,
    /// SLERP coefficients for the base and the other model.
    pub slerp: (f32, f32),
    /// model_stock's `t`, one per row (or one for the tensor).
    pub stock_t: Vec<f32>,
    /// Row length for per-row statistics (DELLA ranks, filter-wise stock).
    pub row_len: u64,
    /// nuslerp, multislerp, karcher: the coefficients of the element pass.
    pub combo: Option<Combo>,
    /// ramplus_tl: each model's factor for its unique elements.
    pub lambdas: Vec<f32>,
    /// sce: the selection and the models' weights.
    pub sce: Option<SceStats>,
    /// arcee_fusion: the rows' divergences and the threshold.
    pub fusion: Option<FusionStats>,
}

fn bits(d: f32) -> u32 {
    d.to_bits() & 0x7fff_ffff
}

/// The streaming passes behind the statistics of one merged tensor, run
/// on the CPU (`CpuPasses`) or on a GPU (`cuda::GpuPasses`). Both give the
/// same numbers: counts are integers, and every f64 sum is a per-block sum
/// in the fixed lane order of `lanes`, the blocks then added in order here.
/// `d_k` is model `k`'s delta from the base, `x_k - base`, in f32.
pub(crate) trait Passes {
    // The rank-selection passes take every model that needs one at once,
    // so each pass reads the base once for all of them (and on the GPU
    // uploads each model once per pass); the j-th result is model ks[j]'s.

    /// Per model of `ks`: histogram of the high 16 bits of `|d_k|` (`1 <<
    /// 15` bins).
    fn hist_high(&self, ks: &[usize]) -> Result<Vec<Vec<u64>>>;
    /// Per model: histograms of the low 16 bits of `|d_k|` inside its high
    /// bins `(b0, b1)` (bins `0..1 << 16` for `b0`, the next `1 << 16` for
    /// `b1`).
    fn hist_low(&self, ks: &[usize], bins: &[(u32, u32)]) -> Result<Vec<Vec<u64>>>;
    /// Per model, per block of `blocks(n, n)`: how many `|d_k|` bits equal
    /// its `(lo, hi)`.
    fn eq_counts(&self, ks: &[usize], vals: &[(u32, u32)]) -> Result<Vec<Vec<(u64, u64)>>>;
    /// Per model, per block of `blocks(n, n)`: sum of `|d_k|`, sum of those
    /// with bits strictly between its `lo` and `hi`, and the counts equal
    /// to each.
    fn l1_ranks(&self, ks: &[usize], vals: &[(u32, u32)]) -> Result<Vec<Vec<L1Ranks>>>;
    /// Per block of `masked_blocks`: sum of `|d_k|` and of the kept ones
    /// under a random or DELLA mask.
    fn l1_masked(&self, k: usize, keep: &Keep, stream: u64) -> Result<Vec<[f64; 2]>>;
    /// Per block of `blocks(n, n)`: sums of `b*b`, `x*x`, `b*x` for the base
    /// and model 0 (SLERP).
    fn slerp_sums(&self) -> Result<Vec<[f64; 3]>>;
    /// Per block of `blocks(n, row_len)`: its row and the Gram matrix of the
    /// deltas (upper triangle, row-major pairs; model_stock).
    fn gram(&self, row_len: u64) -> Result<Vec<(u64, Vec<f64>)>>;
    /// The element pass's coefficients of a spherical method (nuslerp,
    /// multislerp, karcher); CPU only.
    fn combo(&self, tm: &TensorMerge, name: &str) -> Result<Combo> {
        let _ = name;
        Err(crate::error::Error::Internal(format!("no GPU statistics pass for {}", tm.method.name())))
    }
    /// ramplus_tl: per model, how many of its counted elements (`|d| >
    /// epsilon`) another model counts too, and how many only it counts;
    /// CPU only.
    fn ram_counts(&self, epsilon: f32) -> Result<Vec<(u64, u64)>> {
        let _ = epsilon;
        Err(crate::error::Error::Internal("no GPU statistics pass for ramplus_tl".into()))
    }
    /// sce's selection and weights; CPU only.
    fn sce(&self, select_topk: f64) -> Result<SceStats> {
        let _ = select_topk;
        Err(crate::error::Error::Internal("no GPU statistics pass for sce".into()))
    }
    /// arcee_fusion's divergences and threshold; CPU only.
    fn fusion(&self) -> Result<FusionStats> {
        Err(crate::error::Error::Internal("no GPU statistics pass for arcee_fusion".into()))
    }
}

/// A block's L1 partials for rank masks: sum of `|d|`, sum strictly inside
/// the boundary values, and the boundary-equal counts.
pub(crate) type L1Ranks = (f64, f64, u64, u64);

/// The blocks of the random-mask L1 sums: rows for DELLA (its ranks need
/// whole rows), else `STAT_BLOCK` pieces that do not cross rows.
pub(crate) fn masked_blocks(keep: &Keep, n: u64, row_len: u64) -> Vec<(u64, Range<u64>)> {
    let max = if matches!(keep, Keep::Della { .. }) { row_len.max(1) } else { STAT_BLOCK };
    blocks_of(n, row_len.max(1), max)
}

/// The CPU passes: parallel over blocks, each block sequential.
pub(crate) struct CpuPasses<'a> {
    pub inputs: &'a Inputs<'a>,
    pub n: u64,
    pub row_len: u64,
}

impl CpuPasses<'_> {
    /// The base's view; the methods that make statistics passes all have
    /// a base (planning checked it).
    fn base(&self) -> Result<View<'_>> {
        self.inputs.base.ok_or_else(|| {
            crate::error::Error::Internal("a statistics pass over a merge without a base".into())
        })
    }

    /// The models `ks` as views.
    fn views(&self, ks: &[usize]) -> Vec<View<'_>> {
        ks.iter().map(|&k| self.inputs.models[k]).collect()
    }

    /// Per model of `ks`, a histogram of `bins` bins over the bits of
    /// `|d_k|` (`bin(j, bits)`: the bin for the j-th model, if any).
    fn histograms(
        &self,
        ks: &[usize],
        bins: usize,
        bin: impl Fn(usize, u32) -> Option<usize> + Sync,
    ) -> Result<Vec<Vec<u64>>> {
        let (base, xs) = (self.base()?, self.views(ks));
        let zeros = || vec![vec![0u64; bins]; ks.len()];
        Ok(blocks(self.n, self.n.max(1))
            .into_par_iter()
            .fold(zeros, |mut h, (_, r)| {
                for_each_deltas(base, &xs, r, |_, j, d| {
                    for &v in d {
                        if let Some(b) = bin(j, bits(v)) {
                            h[j][b] += 1;
                        }
                    }
                });
                h
            })
            .reduce(zeros, |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
                }
                a
            }))
    }

    /// Per block of `blocks(n, n)`, `per_block(base, xs, range)`'s result
    /// (one entry per model), regrouped per model.
    fn per_model_blocks<T: Send>(
        &self,
        ks: &[usize],
        per_block: impl Fn(View<'_>, &[View<'_>], Range<u64>) -> Vec<T> + Sync,
    ) -> Result<Vec<Vec<T>>> {
        let (base, xs) = (self.base()?, self.views(ks));
        let by_block: Vec<Vec<T>> =
            blocks(self.n, self.n.max(1)).into_par_iter().map(|(_, r)| per_block(base, &xs, r)).collect();
        let mut per_model: Vec<Vec<T>> = ks.iter().map(|_| Vec::with_capacity(by_block.len())).collect();
        for block in by_block {
            for (m, v) in per_model.iter_mut().zip(block) {
                m.push(v);
            }
        }
        Ok(per_model)
    }
}

impl Passes for CpuPasses<'_> {
    fn hist_high(&self, ks: &[usize]) -> Result<Vec<Vec<u64>>> {
        self.histograms(ks, 1 << 15, |_, v| Some((v >> 16) as usize))
    }

    fn hist_low(&self, ks: &[usize], bins: &[(u32, u32)]) -> Result<Vec<Vec<u64>>> {
        self.histograms(ks, 2 << 16, |j, v| {
            let ((b0, b1), h, l) = (bins[j], v >> 16, (v & 0xffff) as usize);
            if h == b0 {
                Some(l)
            } else if h == b1 {
                Some((1 << 16) + l)
            } else {
                None
            }
        })
    }

    fn eq_counts(&self, ks: &[usize], vals: &[(u32, u32)]) -> Result<Vec<Vec<(u64, u64)>>> {
        self.per_model_blocks(ks, |base, xs, r| {
            let mut c = vec![(0u64, 0u64); xs.len()];
            for_each_deltas(base, xs, r, |_, j, d| {
                let (lo, hi) = vals[j];
                for &v in d {
                    c[j].0 += (bits(v) == lo) as u64;
                    c[j].1 += (bits(v) == hi) as u64;
                }
            });
            c
        })
    }

    fn l1_ranks(&self, ks: &[usize], vals: &[(u32, u32)]) -> Result<Vec<Vec<L1Ranks>>> {
        self.per_model_blocks(ks, |base, xs, r| {
            let mut eq = vec![(0u64, 0u64); xs.len()];
            let mut sums: Vec<Lanes> = xs.iter().map(|_| Lanes::new(2)).collect();
            let start = r.start;
            for_each_deltas(base, xs, r, |i0, j, d| {
                let (lo, hi) = vals[j];
                for (i, &v) in d.iter().enumerate() {
                    let (b, m, at) = (bits(v), v.abs() as f64, i0 + i as u64 - start);
                    sums[j].add(at, 0, m);
                    if b > lo && b < hi {
                        sums[j].add(at, 1, m);
                    }
                    eq[j].0 += (b == lo) as u64;
                    eq[j].1 += (b == hi) as u64;
                }
            });
            sums.into_iter()
                .zip(eq)
                .map(|(s, (eq_lo, eq_hi))| {
                    let t = s.total();
                    (t[0], t[1], eq_lo, eq_hi)
                })
                .collect()
        })
    }

    fn l1_masked(&self, k: usize, keep: &Keep, stream: u64) -> Result<Vec<[f64; 2]>> {
        let (base, x, row_len) = (self.base()?, self.inputs.models[k], self.row_len);
        Ok(masked_blocks(keep, self.n, row_len)
            .into_par_iter()
            .map(|(row, r)| {
                let mut sums = Lanes::new(2);
                let start = r.start;
                for_each_random_kept(keep, base, x, row, row_len, r, stream, |i, d, kept| {
                    sums.add(i - start, 0, d.abs() as f64);
                    if kept {
                        sums.add(i - start, 1, d.abs() as f64);
                    }
                });
                let t = sums.total();
                [t[0], t[1]]
            })
            .collect())
    }

    fn slerp_sums(&self) -> Result<Vec<[f64; 3]>> {
        let (a, b) = (self.base()?, self.inputs.models[0]);
        Ok(blocks(self.n, self.n.max(1))
            .into_par_iter()
            .map(|(_, r)| {
                let mut sums = Lanes::new(3);
                let mut xa = [0f32; BLOCK];
                let mut xb = [0f32; BLOCK];
                let mut p = r.start;
                while p < r.end {
                    let m = (BLOCK as u64).min(r.end - p) as usize;
                    a.decode_at(p, &mut xa[..m]);
                    b.decode_at(p, &mut xb[..m]);
                    for j in 0..m {
                        let (u, v, at) = (xa[j] as f64, xb[j] as f64, p + j as u64 - r.start);
                        sums.add(at, 0, u * u);
                        sums.add(at, 1, v * v);
                        sums.add(at, 2, u * v);
                    }
                    p += m as u64;
                }
                let t = sums.total();
                [t[0], t[1], t[2]]
            })
            .collect())
    }

    fn gram(&self, row_len: u64) -> Result<Vec<(u64, Vec<f64>)>> {
        let (base, k) = (self.base()?, self.inputs.models.len());
        let pairs = gram_pairs(k);
        Ok(blocks(self.n, row_len)
            .into_par_iter()
            .map(|(row, r)| {
                let mut d: Vec<Vec<f32>> = vec![Vec::with_capacity((r.end - r.start) as usize); k];
                for (di, x) in d.iter_mut().zip(&self.inputs.models) {
                    for_each_delta(base, *x, r.clone(), |_, blk| di.extend_from_slice(blk));
                }
                let mut sums = Lanes::new(pairs.len());
                for (p, &(i, j)) in pairs.iter().enumerate() {
                    for (at, (a, b)) in d[i].iter().zip(&d[j]).enumerate() {
                        sums.add(at as u64, p, *a as f64 * *b as f64);
                    }
                }
                (row, sums.total())
            })
            .collect())
    }

    fn combo(&self, tm: &TensorMerge, name: &str) -> Result<Combo> {
        combo(self.inputs, tm.method, &tm.params, self.n, self.row_len, name)
    }

    fn sce(&self, select_topk: f64) -> Result<SceStats> {
        crate::merge::sce::stats(self.inputs, self.n, select_topk)
    }
    fn fusion(&self) -> Result<FusionStats> {
        crate::merge::fusion::stats(self.inputs, self.n, self.row_len)
    }

    fn ram_counts(&self, epsilon: f32) -> Result<Vec<(u64, u64)>> {
        let (base, k) = (self.base()?, self.inputs.models.len());
        let parts: Vec<Vec<(u64, u64)>> = blocks(self.n, self.n.max(1))
            .into_par_iter()
            .map(|(_, r)| {
                let mut counts = vec![(0u64, 0u64); k];
                let m = (r.end - r.start) as usize;
                let mut b = vec![0f32; m];
                let mut x = vec![0f32; m];
                let mut hits = vec![0u8; m];
                let mut counted = vec![vec![false; m]; k];
                base.decode_at(r.start, &mut b);
                for (i, xi) in self.inputs.models.iter().enumerate() {
                    xi.decode_at(r.start, &mut x);
                    for j in 0..m {
                        let c = (x[j] - b[j]).abs() > epsilon;
                        counted[i][j] = c;
                        hits[j] = hits[j].saturating_add(c as u8);
                    }
                }
                for (i, ci) in counted.iter().enumerate() {
                    for j in 0..m {
                        if ci[j] {
                            if hits[j] > 1 { counts[i].0 += 1 } else { counts[i].1 += 1 }
                        }
                    }
                }
                counts
            })
            .collect();
        let mut out = vec![(0u64, 0u64); k];
        for part in parts {
            for (o, p) in out.iter_mut().zip(part) {
                o.0 += p.0;
                o.1 += p.1;
            }
        }
        Ok(out)
    }
}

/// Computes the statistics of tensor `name` (`n` elements, rows of
/// `row_len`) for `tm` on the CPU.
pub(crate) fn compute(
    inputs: &Inputs,
    name: &str,
    n: u64,
    row_len: u64,
    tm: &TensorMerge,
) -> Result<TensorStats> {
    compute_with(&CpuPasses { inputs, n, row_len }, name, n, row_len, tm)
}

/// Computes the statistics of tensor `name` for `tm` from `passes`.
pub(crate) fn compute_with(
    passes: &dyn Passes,
    name: &str,
    n: u64,
    row_len: u64,
    tm: &TensorMerge,
) -> Result<TensorStats> {
    let p = &tm.params;
    let models = p.models.len();
    let mut st = TensorStats { row_len, ..Default::default() };
    match tm.method {
        Method::Linear => {}
        Method::Slerp => {
            st.slerp = slerp_coefficients(&passes.slerp_sums()?, p.t);
        }
        Method::ModelStock => {
            let rl = if p.filter_wise { row_len } else { n.max(1) };
            st.stock_t = stock_t(passes.gram(rl)?, models, n, rl);
            st.row_len = rl;
        }
        Method::Passthrough | Method::NearSwap | Method::Ram => {}
        Method::RamPlusTl => {
            let eps = p.shared.epsilon as f32;
            let (r, alpha) = (p.shared.r as f32, p.shared.alpha as f32);
            // As torch: counts over a clamped f32 count, in f32.
            st.lambdas = passes
                .ram_counts(eps)?
                .into_iter()
                .map(|(shared, unique)| {
                    let rho = shared as f32 / (unique as f32).max(eps);
                    1.0 + r * rho.clamp(0.0, alpha)
                })
                .collect();
        }
        m if m.spherical() => {
            st.combo = Some(passes.combo(tm, name)?);
        }
        Method::Sce => {
            st.sce = Some(passes.sce(p.shared.select_topk)?);
        }
        Method::ArceeFusion => {
            st.fusion = Some(passes.fusion()?);
        }
        _ => {
            // Each model's mask: at once where it needs no statistics, else
            // by rank selection, every model's in the same passes.
            let plans: Vec<Mask> = (0..models).map(|k| mask(tm.method, p, k, n)).collect();
            let ranked: Vec<(usize, u64, u64)> = plans
                .iter()
                .enumerate()
                .filter_map(|(k, m)| match m {
                    Mask::Ranks(lo, hi) => Some((k, *lo, *hi)),
                    Mask::Keep(_) => None,
                })
                .collect();
            let mut ranks = rank_keeps(passes, &ranked)?.into_iter();
            let keeps: Vec<Keep> = plans
                .into_iter()
                .map(|m| match m {
                    Mask::Keep(keep) => Ok(keep),
                    Mask::Ranks(..) => ranks.next().map(Keep::Ranks).ok_or_else(|| {
                        crate::error::Error::Internal("a rank selection came back short".into())
                    }),
                })
                .collect::<Result<_>>()?;
            let streams: Vec<u64> = (0..models).map(|k| rng::stream(tm.seed, name, k)).collect();
            let rescales = if p.rescale { l1_factors(passes, &keeps, &streams)? } else { vec![None; models] };
            st.models = keeps
                .into_iter()
                .zip(rescales)
                .zip(streams)
                .map(|((keep, rescale), stream)| ModelStats { keep, rescale, stream })
                .collect();
        }
    }
    Ok(st)
}

/// A model's mask as planned: final, or the ascending ranks `lo..hi` of
/// `|d_k|` to keep, which take the statistics passes.
enum Mask {
    Keep(Keep),
    Ranks(u64, u64),
}

/// The mask of model `k` under `method`.
fn mask(method: Method, p: &TensorParams, k: usize, n: u64) -> Mask {
    let mp = p.models[k];
    let Some(sp) = method.sparsify() else {
        return Mask::Keep(Keep::All);
    };
    if mp.density >= 1.0 {
        return Mask::Keep(Keep::All);
    }
    let nf = n as f64;
    let interval = match sp {
        Sparsify::Magnitude if mp.density <= 0.0 || n == 0 => return Mask::Keep(Keep::Zero),
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
        Sparsify::Della if mp.density <= 0.0 => return Mask::Keep(Keep::Zero),
        Sparsify::Random | Sparsify::Della => None,
    };
    match interval {
        Some((lo, hi)) if lo >= hi => Mask::Keep(Keep::None),
        Some((lo, hi)) => Mask::Ranks(lo, hi),
        None if sp == Sparsify::Random => Mask::Keep(Keep::Random(mp.density.max(0.0) as f32)),
        None => Mask::Keep(Keep::Della { density: mp.density, epsilon: mp.epsilon }),
    }
}

/// The rank masks of the models `ranked` (model, lo, hi): the radix
/// selection of `select::value_at_ranks` for all of them at once, each
/// pass over every model (one read of the base per pass).
fn rank_keeps(passes: &dyn Passes, ranked: &[(usize, u64, u64)]) -> Result<Vec<RankKeep>> {
    if ranked.is_empty() {
        return Ok(Vec::new());
    }
    interrupt::check()?;
    let ks: Vec<usize> = ranked.iter().map(|r| r.0).collect();
    // The values at ranks lo and hi - 1 of each model.
    let bins = passes
        .hist_high(&ks)?
        .iter()
        .zip(ranked)
        .map(|(high, &(_, lo, hi))| high_bins(high, lo, hi - 1))
        .collect::<Result<Vec<_>>>()?;
    interrupt::check()?;
    let pairs: Vec<(u32, u32)> = bins.iter().map(|b| (b[0].0, b[1].0)).collect();
    let at = passes
        .hist_low(&ks, &pairs)?
        .iter()
        .zip(&bins)
        .zip(ranked)
        .map(|((low, b), &(_, lo, hi))| low_values(*b, low, lo, hi - 1))
        .collect::<Result<Vec<_>>>()?;
    interrupt::check()?;
    let vals: Vec<(u32, u32)> = at.iter().map(|a| (a[0].0, a[1].0)).collect();
    Ok(passes
        .eq_counts(&ks, &vals)?
        .into_iter()
        .zip(at)
        .zip(ranked)
        .map(|((counts, a), &(_, lo, hi))| RankKeep::new(lo, hi, a, counts))
        .collect())
}

/// Stable ascending ranks of the magnitudes in `d` (ties by index), by
/// sorting `bits << 32 | index` keys (plain u64 sorts are several times
/// faster than sorting by a tuple key).
pub(crate) fn row_ranks(d: &[f32], ranks: &mut Vec<u32>) {
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
pub(crate) fn della_probability(density: f64, epsilon: f64, r: u32, len: u64) -> f32 {
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
    mut f: impl FnMut(u64, f32, bool),
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
                f(i, d[j], rng::uniform(stream, i) < p);
            }
        }
        _ => for_each_delta(base, x, r, |i0, d| {
            for (j, &v) in d.iter().enumerate() {
                let i = i0 + j as u64;
                let kept = match keep {
                    Keep::Random(p) => rng::uniform(stream, i) < *p,
                    _ => true,
                };
                f(i, v, kept);
            }
        }),
    }
}

/// With `rescale`: each model's L1 factor, `sum |d| / sum |kept d|` when
/// both are at least `RESCALE_EPS`. The rank masks' sums come from one pass
/// over every such model, the random masks' one model at a time.
fn l1_factors(passes: &dyn Passes, keeps: &[Keep], streams: &[u64]) -> Result<Vec<Option<f32>>> {
    let ranked: Vec<(usize, (u32, u32))> = keeps
        .iter()
        .enumerate()
        .filter_map(|(k, keep)| match keep {
            Keep::Ranks(rk) => Some((k, (rk.lo_val, rk.hi_val))),
            _ => None,
        })
        .collect();
    let (ks, vals): (Vec<usize>, Vec<(u32, u32)>) = ranked.into_iter().unzip();
    let mut sums = if ks.is_empty() { Vec::new() } else { passes.l1_ranks(&ks, &vals)? }.into_iter();
    keeps
        .iter()
        .zip(streams)
        .enumerate()
        .map(|(k, (keep, &stream))| {
            let (before, after) = match keep {
                Keep::All | Keep::Zero | Keep::None => return Ok(None),
                Keep::Ranks(rk) => ranks_l1(
                    rk,
                    sums.next()
                        .ok_or_else(|| crate::error::Error::Internal("the L1 pass came back short".into()))?,
                ),
                Keep::Random(_) | Keep::Della { .. } => {
                    interrupt::check()?;
                    passes
                        .l1_masked(k, keep, stream)?
                        .into_iter()
                        .fold((0.0, 0.0), |(a, k), [x, y]| (a + x, k + y))
                }
            };
            Ok((before >= RESCALE_EPS && after >= RESCALE_EPS).then(|| (before / after) as f32))
        })
        .collect()
}

/// `sum |d|` and `sum |kept d|` of a rank mask from its blocks' L1 sums.
fn ranks_l1(rk: &RankKeep, blocks: Vec<L1Ranks>) -> (f64, f64) {
    // Kept elements equal to a boundary value all have that value.
    let (mut all, mut inner, mut n_lo, mut n_hi) = (0f64, 0f64, 0u64, 0u64);
    for (a, i, l, h) in blocks {
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

fn slerp_coefficients(blocks: &[[f64; 3]], t: f64) -> (f32, f32) {
    let mut sums = [0f64; 3];
    for b in blocks {
        sums.iter_mut().zip(b).for_each(|(s, v)| *s += v);
    }
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

/// model_stock's `t` per row of `row_len` (one row: the whole tensor), from
/// the per-block Gram partials of the `k` deltas.
fn stock_t(parts: Vec<(u64, Vec<f64>)>, k: usize, n: u64, row_len: u64) -> Vec<f32> {
    let pairs = gram_pairs(k);
    let rows = n.div_ceil(row_len).max(1) as usize;
    let mut grams = vec![vec![0f64; pairs.len()]; rows];
    for (row, part) in parts {
        grams[row as usize].iter_mut().zip(part).for_each(|(a, b)| *a += b);
    }
    // Position of pair (i, j), i <= j, in the row-major upper triangle.
    let at = |i: usize, j: usize| i * k - i * (i.saturating_sub(1)) / 2 - i + j;
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
