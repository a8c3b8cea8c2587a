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
use crate::merge::select::{RankKeep, Ranked, STAT_BLOCK, blocks, chunked_histogram, rank_keep};

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

/// Calls `f(index, deltas)` for every element of `r`, the deltas of every
/// model at it.
fn for_each_element(inputs: &Inputs, r: Range<u64>, mut f: impl FnMut(u64, &[f32])) {
    let Some(base) = inputs.base else { return };
    let k = inputs.models.len();
    let mut b = [0f32; BLOCK];
    let mut xs = vec![[0f32; BLOCK]; k];
    let mut d = vec![0f32; k];
    let mut p = r.start;
    while p < r.end {
        let m = (BLOCK as u64).min(r.end - p) as usize;
        base.decode_at(p, &mut b[..m]);
        for (x, v) in xs.iter_mut().zip(&inputs.models) {
            v.decode_at(p, &mut x[..m]);
        }
        for j in 0..m {
            for (di, x) in d.iter_mut().zip(&xs) {
                *di = x[j] - b[j];
            }
            f(p + j as u64, &d);
        }
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
                    for_each_element(self.inputs, r, |_, d| {
                        let v = variance(d).to_bits() & 0x7fff_ffff;
                        h[(v >> 16) as usize] += 1;
                        *zeros += (v == 0) as u64;
                    });
                },
            )
        })
    }

    fn histogram(&self, bins: usize, bin: impl Fn(u32) -> Option<usize> + Sync + Send) -> Vec<u64> {
        let fill = |r, h: &mut [u64], _: &mut ()| {
            for_each_element(self.inputs, r, |_, d| {
                if let Some(i) = bin(variance(d).to_bits() & 0x7fff_ffff) {
                    h[i] += 1;
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
    fn eq_counts(&self, lo: u32, hi: u32) -> Result<Vec<(u64, u64)>> {
        Ok(blocks(self.n, self.n.max(1))
            .into_par_iter()
            .map(|(_, r)| {
                let (mut a, mut b) = (0, 0);
                for_each_element(self.inputs, r, |_, d| {
                    let v = variance(d).to_bits() & 0x7fff_ffff;
                    a += (v == lo) as u64;
                    b += (v == hi) as u64;
                });
                (a, b)
            })
            .collect())
    }
}

/// SCE's selection and weights for a tensor of `n` elements.
pub(crate) fn stats(inputs: &Inputs, n: u64, select_topk: f64) -> Result<SceStats> {
    let k = inputs.models.len();
    let select = if select_topk >= 1.0 {
        Select::All
    } else if select_topk <= 0.0 {
        Select::Zero
    } else {
        let values = Variances { inputs, n, high: std::sync::OnceLock::new() };
        let zeros = values.high_and_zeros().1;
        let nonzero = n - zeros;
        // As mergekit: int(count * density), the product in f32.
        let keep = (nonzero as f32 * select_topk as f32) as u64;
        if keep == 0 { Select::Zero } else { Select::Ranks(rank_keep(&values, n - keep, n)?) }
    };
    // The mean of each model's selected deltas squared, in f64.
    let sums: Vec<f64> = blocks(n, n.max(1))
        .into_par_iter()
        .map(|(_, r)| {
            let mut s = vec![0f64; k];
            let mut cursor = Cursor::at(&select, inputs, r.start);
            for_each_element(inputs, r, |_, d| {
                if cursor.keeps(d) {
                    s.iter_mut().zip(d).for_each(|(a, v)| *a += (*v as f64) * (*v as f64));
                }
            });
            s
        })
        .reduce(
            || vec![0f64; k],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            },
        );
    let means: Vec<f32> = sums.iter().map(|s| (s / n.max(1) as f64) as f32).collect();
    let total: f32 = means.iter().sum();
    let weights = if (total as f64).abs() < 1e-6 {
        vec![1.0 / k as f32; k]
    } else {
        means.iter().map(|m| m / total).collect()
    };
    Ok(SceStats { select, weights })
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
            for_each_element(inputs, b0 * STAT_BLOCK..start, |_, d| {
                let v = variance(d).to_bits() & 0x7fff_ffff;
                seen_lo += (v == rk.lo_val) as u64;
                seen_hi += (v == rk.hi_val) as u64;
            });
        }
        Cursor { select, seen_lo, seen_hi }
    }

    /// Whether the element whose deltas are `d` (the next in order) keeps
    /// them.
    #[inline]
    pub(crate) fn keeps(&mut self, d: &[f32]) -> bool {
        match self.select {
            Select::All => true,
            Select::Zero => false,
            Select::Ranks(rk) => {
                let v = variance(d).to_bits() & 0x7fff_ffff;
                let kept = rk.keeps(v, self.seen_lo, self.seen_hi);
                self.seen_lo += (v == rk.lo_val) as u64;
                self.seen_hi += (v == rk.hi_val) as u64;
                kept
            }
        }
    }
}
