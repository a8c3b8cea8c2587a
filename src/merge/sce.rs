//! SCE (select, calculate, erase; mergekit's `sce`) in the streaming
//! engine. Select: with `select_topk` below 1, only the elements whose
//! variance across the models' deltas is among the `floor(nonzero *
//! select_topk)` largest keep their deltas (the variance in f64 as torch
//! accumulates it, ranked by its f32 bits by radix selection like TIES's
//! magnitudes, ties by index). Calculate: model i's weight is the mean of
//! its selected deltas squared, over the sum of those (1/k each when the
//! sum is below 1e-6). Erase: a delta counts where its sign is the sign of
//! the deltas' sum (0 counting as +); `out = b + sum_i w_i e_i d_i /
//! max(sum_i w_i e_i, 1e-6)`.

use std::ops::Range;

use rayon::prelude::*;

use crate::arith::BLOCK;
use crate::error::Result;
use crate::merge::Inputs;
use crate::merge::select::{RankKeep, Ranked, STAT_BLOCK, blocks, chunked_histogram, value_at_ranks};

/// Which elements keep their deltas.
#[derive(Clone, Debug)]
pub(crate) enum Select {
    All,
    Zero,
    Ranks(RankKeep),
}

/// SCE's statistics for one tensor.
#[derive(Clone, Debug)]
pub(crate) struct SceStats {
    pub select: Select,
    /// Each model's weight.
    pub weights: Vec<f32>,
}

/// The population variance of `d` (the models' deltas at one element):
/// f64 accumulation, as torch's `var` accumulates f32 inputs, then f32.
#[inline]
pub(crate) fn variance(d: &[f32]) -> f32 {
    // Two finite models (the usual merge): every step below is exact in
    // f64 (f32 sums and differences fit in 53 bits, and so do their
    // halves' squares), so the variance is exactly ((a - b) / 2)^2, the
    // same bits the general form gives, at less cost.
    if let [a, b] = d
        && a.is_finite()
        && b.is_finite()
    {
        let h = (*a as f64 - *b as f64) * 0.5;
        return (h * h) as f32;
    }
    let k = d.len() as f64;
    let mean = d.iter().map(|v| *v as f64).sum::<f64>() / k;
    (d.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / k) as f32
}

/// `variance(..).to_bits() & 0x7fff_ffff` of each element `j < m` of the
/// models' deltas `d` (one block per model). Two finite models take the
/// closed form in a loop the compiler vectorizes; anything else the
/// general form, element by element.
pub(crate) fn variance_bits(d: &[[f32; BLOCK]], m: usize, out: &mut [u32]) {
    if let [a, b] = d {
        for ((o, x), y) in out[..m].iter_mut().zip(&a[..m]).zip(&b[..m]) {
            let h = (*x as f64 - *y as f64) * 0.5;
            *o = ((h * h) as f32).to_bits() & 0x7fff_ffff;
        }
        // The closed form is the general one only for finite deltas.
        for j in 0..m {
            if !(a[j].is_finite() && b[j].is_finite()) {
                out[j] = variance(&[a[j], b[j]]).to_bits() & 0x7fff_ffff;
            }
        }
        return;
    }
    let mut e = vec![0f32; d.len()];
    for (j, o) in out[..m].iter_mut().enumerate() {
        for (ei, x) in e.iter_mut().zip(d) {
            *ei = x[j];
        }
        *o = variance(&e).to_bits() & 0x7fff_ffff;
    }
}

/// One block of a tensor under SCE: every model's deltas and every
/// element's variance bits.
struct Block {
    base: [f32; BLOCK],
    d: Vec<[f32; BLOCK]>,
    bits: [u32; BLOCK],
}

/// Calls `f(first, block, m)` for consecutive blocks of `m` elements over
/// `r`.
fn for_each_block(inputs: &Inputs, r: Range<u64>, mut f: impl FnMut(u64, &Block, usize)) {
    let Some(base) = inputs.base else { return };
    let mut blk =
        Block { base: [0f32; BLOCK], d: vec![[0f32; BLOCK]; inputs.models.len()], bits: [0u32; BLOCK] };
    let mut p = r.start;
    while p < r.end {
        let m = (BLOCK as u64).min(r.end - p) as usize;
        base.decode_at(p, &mut blk.base[..m]);
        for (x, v) in blk.d.iter_mut().zip(&inputs.models) {
            v.decode_at(p, &mut x[..m]);
            for (xj, bj) in x[..m].iter_mut().zip(&blk.base[..m]) {
                *xj -= *bj;
            }
        }
        variance_bits(&blk.d, m, &mut blk.bits[..m]);
        f(p, &blk, m);
        p += m as u64;
    }
}

/// The variance of every element, as a ranked value. The high-bits
/// histogram is made once, with the count of zero variances, in one pass.
struct Variances<'a> {
    inputs: &'a Inputs<'a>,
    n: u64,
    high: std::sync::OnceLock<(Vec<u64>, u64)>,
}

impl Variances<'_> {
    /// The high-bits histogram and how many variances are exactly 0.
    fn high_and_zeros(&self) -> &(Vec<u64>, u64) {
        self.high.get_or_init(|| {
            chunked_histogram(
                self.n,
                1 << 15,
                || 0u64,
                |a, b| a + b,
                |r, h, zeros| {
                    for_each_block(self.inputs, r, |_, blk, m| {
                        for &v in &blk.bits[..m] {
                            h[(v >> 16) as usize] += 1;
                            *zeros += (v == 0) as u64;
                        }
                    });
                },
            )
        })
    }

    fn histogram(&self, bins: usize, bin: impl Fn(u32) -> Option<usize> + Sync + Send) -> Vec<u64> {
        let fill = |r, h: &mut [u64], _: &mut ()| {
            for_each_block(self.inputs, r, |_, blk, m| {
                for &v in &blk.bits[..m] {
                    if let Some(i) = bin(v) {
                        h[i] += 1;
                    }
                }
            });
        };
        chunked_histogram(self.n, bins, || (), |_, _| (), fill).0
    }
}

impl Ranked for Variances<'_> {
    fn hist_high(&self) -> Result<Vec<u64>> {
        Ok(self.high_and_zeros().0.clone())
    }
    fn hist_low(&self, b0: u32, b1: u32) -> Result<Vec<u64>> {
        Ok(self.histogram(2 << 16, |v| {
            let hi = v >> 16;
            if hi == b0 {
                Some((v & 0xffff) as usize)
            } else if hi == b1 {
                Some((1 << 16) + (v & 0xffff) as usize)
            } else {
                None
            }
        }))
    }
}

/// One statistics block's share of SCE's weights, from the pass that also
/// counts the boundary-equal variances: each model's deltas squared summed
/// over the elements whose variance lies strictly between the boundary
/// values (kept whatever the order), and apart over those equal to the
/// lower and to the upper boundary value (kept or not by their place).
struct BlockSums {
    range: Range<u64>,
    eq_lo: u64,
    eq_hi: u64,
    inside: Vec<f64>,
    at_lo: Vec<f64>,
    at_hi: Vec<f64>,
}

impl Variances<'_> {
    /// Per block of `blocks(n, n)`, in order.
    fn block_sums(&self, lo: u32, hi: u32) -> Vec<BlockSums> {
        let k = self.inputs.models.len();
        blocks(self.n, self.n.max(1))
            .into_par_iter()
            .map(|(_, r)| {
                let mut s = BlockSums {
                    range: r.clone(),
                    eq_lo: 0,
                    eq_hi: 0,
                    inside: vec![0f64; k],
                    at_lo: vec![0f64; k],
                    at_hi: vec![0f64; k],
                };
                for_each_block(self.inputs, r, |_, blk, m| {
                    for (j, &v) in blk.bits[..m].iter().enumerate() {
                        s.eq_lo += (v == lo) as u64;
                        s.eq_hi += (v == hi) as u64;
                        let into = if v > lo && v < hi {
                            &mut s.inside
                        } else if v == lo {
                            &mut s.at_lo
                        } else if v == hi {
                            &mut s.at_hi
                        } else {
                            continue;
                        };
                        for (a, d) in into.iter_mut().zip(&blk.d) {
                            *a += (d[j] as f64) * (d[j] as f64);
                        }
                    }
                });
                s
            })
            .collect()
    }
}

/// Whether all (`Some(true)`), none (`Some(false)`) or only some (`None`)
/// of a block's `count` boundary-equal elements are kept, the first having
/// `seen` equal ones before it: lower boundary, kept from the rank on.
fn lower_kept(rk: &RankKeep, seen: u64, count: u64) -> Option<bool> {
    if rk.less_lo + seen >= rk.lo {
        Some(true)
    } else if rk.less_lo + seen + count <= rk.lo {
        Some(false)
    } else {
        None
    }
}

/// As `lower_kept` for the upper boundary: kept below the rank.
fn upper_kept(rk: &RankKeep, seen: u64, count: u64) -> Option<bool> {
    if rk.less_hi + seen + count <= rk.hi {
        Some(true)
    } else if rk.less_hi + seen >= rk.hi {
        Some(false)
    } else {
        None
    }
}

/// SCE's selection and weights for a tensor of `n` elements.
pub(crate) fn stats(inputs: &Inputs, n: u64, select_topk: f64) -> Result<SceStats> {
    let k = inputs.models.len();
    let add = |a: &mut Vec<f64>, b: &[f64]| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
    // Each model's selected deltas squared, summed per block, then over the
    // blocks in order (so the thread count changes nothing).
    let (select, per_block): (Select, Vec<Vec<f64>>) = if select_topk > 0.0 && select_topk < 1.0 {
        let values = Variances { inputs, n, high: std::sync::OnceLock::new() };
        let zeros = values.high_and_zeros().1;
        let nonzero = n - zeros;
        // As mergekit: int(count * density), the product in f32.
        let keep = (nonzero as f32 * select_topk as f32) as u64;
        if keep == 0 {
            (Select::Zero, Vec::new())
        } else {
            // The boundary values, then one pass for their per-block counts
            // and the weights' sums; a block where the boundary rank falls
            // among its equal elements is summed again element by element.
            let at = value_at_ranks(&values, n - keep, n - 1)?;
            let sums = values.block_sums(at[0].0, at[1].0);
            let rk = RankKeep::new(n - keep, n, at, sums.iter().map(|b| (b.eq_lo, b.eq_hi)).collect());
            let per_block = sums
                .par_iter()
                .enumerate()
                .map(|(i, b)| {
                    let lower = (b.eq_lo > 0).then(|| lower_kept(&rk, rk.eq_lo[i], b.eq_lo));
                    let upper = (b.eq_hi > 0).then(|| upper_kept(&rk, rk.eq_hi[i], b.eq_hi));
                    // One value at both boundaries: its elements meet both
                    // rules, and `at_lo` holds them.
                    let (lower, upper) = if rk.lo_val == rk.hi_val {
                        let both = match (lower.flatten(), upper.flatten()) {
                            (Some(false), _) | (_, Some(false)) => Some(false),
                            (Some(true), Some(true)) => Some(true),
                            _ => None,
                        };
                        (lower.map(|_| both), None)
                    } else {
                        (lower, upper)
                    };
                    if lower == Some(None) || upper == Some(None) {
                        // Rare (the blocks the boundary ranks fall in):
                        // the selection is cloned for the element walk.
                        return kept_sums(&Select::Ranks(rk.clone()), inputs, b.range.clone());
                    }
                    let mut s = b.inside.clone();
                    if lower == Some(Some(true)) {
                        add(&mut s, &b.at_lo);
                    }
                    if upper == Some(Some(true)) {
                        add(&mut s, &b.at_hi);
                    }
                    s
                })
                .collect();
            (Select::Ranks(rk), per_block)
        }
    } else if select_topk >= 1.0 {
        let per_block =
            blocks(n, n.max(1)).into_par_iter().map(|(_, r)| kept_sums(&Select::All, inputs, r)).collect();
        (Select::All, per_block)
    } else {
        (Select::Zero, Vec::new())
    };
    let mut sums = vec![0f64; k];
    for b in &per_block {
        add(&mut sums, b);
    }
    let means: Vec<f32> = sums.iter().map(|s| (s / n.max(1) as f64) as f32).collect();
    let total: f32 = means.iter().sum();
    let weights = if (total as f64).abs() < 1e-6 {
        vec![1.0 / k as f32; k]
    } else {
        means.iter().map(|m| m / total).collect()
    };
    Ok(SceStats { select, weights })
}

/// Each model's deltas squared summed, in element order, over the
/// elements of `r` that `select` keeps.
fn kept_sums(select: &Select, inputs: &Inputs, r: Range<u64>) -> Vec<f64> {
    let mut s = vec![0f64; inputs.models.len()];
    let mut cursor = Cursor::at(select, inputs, r.start);
    for_each_block(inputs, r, |_, blk, m| {
        for (j, &v) in blk.bits[..m].iter().enumerate() {
            if cursor.keeps_bits(v) {
                for (a, d) in s.iter_mut().zip(&blk.d) {
                    *a += (d[j] as f64) * (d[j] as f64);
                }
            }
        }
    });
    s
}

/// The selection as a chunk meets it: for ranked selection, how many
/// boundary-equal variances came before the current element.
pub(crate) struct Cursor<'s> {
    select: &'s Select,
    seen_lo: u64,
    seen_hi: u64,
}

impl<'s> Cursor<'s> {
    /// The cursor for a chunk starting at element `start`.
    pub(crate) fn at(select: &'s Select, inputs: &Inputs, start: u64) -> Cursor<'s> {
        let (mut seen_lo, mut seen_hi) = (0, 0);
        if let Select::Ranks(rk) = select {
            let b0 = start / STAT_BLOCK;
            (seen_lo, seen_hi) = (rk.eq_lo[b0 as usize], rk.eq_hi[b0 as usize]);
            for_each_block(inputs, b0 * STAT_BLOCK..start, |_, blk, m| {
                for &v in &blk.bits[..m] {
                    seen_lo += (v == rk.lo_val) as u64;
                    seen_hi += (v == rk.hi_val) as u64;
                }
            });
        }
        Cursor { select, seen_lo, seen_hi }
    }

    /// Whether the next element in order, of variance bits `v`, keeps its
    /// deltas.
    #[inline]
    pub(crate) fn keeps_bits(&mut self, v: u32) -> bool {
        match self.select {
            Select::All => true,
            Select::Zero => false,
            Select::Ranks(rk) => {
                let kept = rk.keeps(v, self.seen_lo, self.seen_hi);
                self.seen_lo += (v == rk.lo_val) as u64;
                self.seen_hi += (v == rk.hi_val) as u64;
                kept
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arith::{Operand, Src, View};
    use crate::model::dtype::FloatType;

    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn view(b: &[u8]) -> View<'_> {
        View::Direct(Src::Plain(Operand { ty: FloatType::F32, bytes: b }))
    }

    /// The selection and weights by brute force: every element's variance
    /// bits sorted with its index, the top `keep` kept, each model's
    /// deltas squared summed in element order in f64.
    fn brute(d: &[Vec<f32>], keep: usize) -> (Vec<bool>, Vec<f32>) {
        let n = d[0].len();
        let bits: Vec<u32> = (0..n)
            .map(|j| variance(&d.iter().map(|x| x[j]).collect::<Vec<_>>()).to_bits() & 0x7fff_ffff)
            .collect();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&j| (bits[j], j));
        let mut kept = vec![false; n];
        order[n - keep..].iter().for_each(|&j| kept[j] = true);
        let sums: Vec<f64> =
            d.iter().map(|x| (0..n).filter(|&j| kept[j]).map(|j| (x[j] as f64).powi(2)).sum()).collect();
        let means: Vec<f32> = sums.iter().map(|s| (s / n as f64) as f32).collect();
        let total: f32 = means.iter().sum();
        (kept, means.iter().map(|m| m / total).collect())
    }

    /// Variances with few distinct values (so the boundary value is shared
    /// by many elements across several statistics blocks) but deltas that
    /// differ element by element: a block summed with the wrong share of
    /// its boundary elements would move the weights.
    #[test]
    fn boundary_ties_across_blocks_keep_the_elements_and_weights_of_a_full_sort() {
        let n = 3 * STAT_BLOCK as usize + 123;
        for (k, levels, topk) in [(2usize, 3u32, 0.5f64), (2, 2, 0.3), (3, 4, 0.45), (2, 1, 0.7)] {
            let base: Vec<f32> = (0..n).map(|j| (j as f32 * 0.01).sin()).collect();
            let d: Vec<Vec<f32>> = (0..k)
                .map(|i| {
                    (0..n)
                        .map(|j| {
                            let shift = ((j * 7 + i * 3) % 97) as f32 / 64.0;
                            let step = ((j as u32).wrapping_mul(2_654_435_761) >> 7) % levels;
                            shift + if i == 0 { step as f32 } else { 0.0 }
                        })
                        .collect()
                })
                .collect();
            let models: Vec<Vec<u8>> = d
                .iter()
                .map(|x| bytes(&x.iter().zip(&base).map(|(a, b)| b + a).collect::<Vec<_>>()))
                .collect();
            // The deltas as the merge sees them: (base + d) - base in f32.
            let seen: Vec<Vec<f32>> =
                d.iter().map(|x| x.iter().zip(&base).map(|(a, b)| (b + a) - b).collect()).collect();
            let bb = bytes(&base);
            let inputs = Inputs { base: Some(view(&bb)), models: models.iter().map(|m| view(m)).collect() };
            let st = stats(&inputs, n as u64, topk).unwrap();
            let nonzero =
                (0..n).filter(|&j| variance(&seen.iter().map(|x| x[j]).collect::<Vec<_>>()) != 0.0).count();
            let keep = (nonzero as f32 * topk as f32) as usize;
            let (kept, weights) = brute(&seen, keep);
            let mut cursor = Cursor::at(&st.select, &inputs, 0);
            for (j, want) in kept.iter().enumerate() {
                let v = variance(&seen.iter().map(|x| x[j]).collect::<Vec<_>>()).to_bits() & 0x7fff_ffff;
                assert_eq!(cursor.keeps_bits(v), *want, "k {k} levels {levels}: element {j}");
            }
            for (g, w) in st.weights.iter().zip(&weights) {
                assert!((g - w).abs() <= 1e-6 * w.abs(), "k {k} levels {levels}: weight {g} vs {w}");
            }
        }
    }
}
