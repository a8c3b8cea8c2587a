//! Arcee Fusion (mergekit's `arcee_fusion`) in the streaming engine: the
//! base and one model; an element takes the model's change only where its
//! importance reaches a threshold.
//!
//! - Per row (the last dimension, as torch's `dim=-1`; a 1-D tensor is one
//!   row): `p = softmax(x) + 1e-8`, `q = softmax(b) + 1e-8`,
//!   `kl = sum p log(p / q)`, each element's terms in f32 as torch computes
//!   them (`exp`, the division, `+ 1e-8`, `log`), the two sums accumulated
//!   in f64 (torch's f32 reductions add in their own order) and rounded to
//!   f32.
//! - Per element: `importance = |x - b| * kl[row]` in f32.
//! - `threshold = median + 1.5 * (q3 - q1)` in f32, where quantile `q` is
//!   the importance at ascending index `floor(f32(q) * f32(n - 1))` of the
//!   sorted scores (not interpolated). mergekit sorts a random sample of a
//!   million scores for larger tensors (unseeded, so its output changes
//!   from run to run); chatvec takes the exact order statistics of all of
//!   them by radix selection over the f32 bits (`select`), which is what
//!   the sample estimates.
//! - `out = b + (x - b) * [importance >= threshold]`, the mask a 0 or 1
//!   factor as in mergekit.
//!
//! Scores are ranked by the bits of their magnitude: an importance is
//! negative only where rounding makes a row's KL a hair below 0, and ranks
//! there as its magnitude.

use std::ops::Range;
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::arith::{View, for_each_delta};
use crate::error::Result;
use crate::merge::Inputs;
use crate::merge::select::{Ranked, chunked_histogram, value_at_ranks};

/// The softmax floor mergekit adds before the KL divergence.
const EPS: f32 = 1e-8;

/// Arcee Fusion's statistics for one tensor.
#[derive(Clone, Debug)]
pub(crate) struct FusionStats {
    /// Each row's KL divergence of the model's softmax from the base's.
    pub kl: Vec<f32>,
    pub threshold: f32,
}

/// `softmax(v) + EPS` into `out`: `exp(x - max)` in f32, the sum in f64.
fn softmax(v: &[f32], out: &mut [f32]) {
    let max = v.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x));
    let mut sum = 0f64;
    for (o, x) in out.iter_mut().zip(v) {
        *o = (*x - max).exp();
        sum += f64::from(*o);
    }
    let sum = sum as f32;
    out.iter_mut().for_each(|o| *o = *o / sum + EPS);
}

/// The KL divergence of row `x`'s softmax from row `b`'s, both floored.
pub(crate) fn row_kl(x: &[f32], b: &[f32]) -> f32 {
    let (mut p, mut q) = (vec![0f32; x.len()], vec![0f32; b.len()]);
    softmax(x, &mut p);
    softmax(b, &mut q);
    let kl: f64 = p.iter().zip(&q).map(|(p, q)| f64::from(*p * (*p / *q).ln())).sum();
    kl as f32
}

/// Calls `f(importance bits)` for every element of `r`, in order.
fn for_each_score(base: View, x: View, kl: &[f32], row_len: u64, r: Range<u64>, mut f: impl FnMut(u32)) {
    let mut start = r.start;
    while start < r.end {
        let row = start / row_len;
        let end = ((row + 1) * row_len).min(r.end);
        let k = kl[row as usize];
        for_each_delta(base, x, start..end, |_, d| {
            for v in d {
                f((v.abs() * k).to_bits() & 0x7fff_ffff);
            }
        });
        start = end;
    }
}

/// The scores of a tensor, ranked.
struct Scores<'a> {
    base: View<'a>,
    x: View<'a>,
    kl: &'a [f32],
    n: u64,
    row_len: u64,
    high: OnceLock<Vec<u64>>,
}

impl Scores<'_> {
    fn histogram(&self, bins: usize, bin: impl Fn(u32) -> Option<usize> + Sync + Send) -> Vec<u64> {
        let fill = |r, h: &mut [u64], _: &mut ()| {
            for_each_score(self.base, self.x, self.kl, self.row_len, r, |v| {
                if let Some(i) = bin(v) {
                    h[i] += 1;
                }
            });
        };
        chunked_histogram(self.n, bins, || (), |_, _| (), fill).0
    }
}

impl Ranked for Scores<'_> {
    fn hist_high(&self) -> Result<Vec<u64>> {
        Ok(self.high.get_or_init(|| self.histogram(1 << 15, |v| Some((v >> 16) as usize))).clone())
    }
    fn hist_low(&self, b0: u32, b1: u32) -> Result<Vec<u64>> {
        Ok(self.histogram(2 << 16, |v| match v >> 16 {
            hi if hi == b0 => Some((v & 0xffff) as usize),
            hi if hi == b1 => Some((1 << 16) + (v & 0xffff) as usize),
            _ => None,
        }))
    }
}

/// The ascending index mergekit reads quantile `q` at: `(q * (n - 1))` in
/// f32, truncated (`.long()`).
fn quantile_index(q: f32, n: u64) -> u64 {
    (q * (n.saturating_sub(1)) as f32) as u64
}

/// Arcee Fusion's row divergences and threshold for a tensor of `n`
/// elements in rows of `row_len`.
pub(crate) fn stats(inputs: &Inputs, n: u64, row_len: u64) -> Result<FusionStats> {
    let (Some(base), Some(&x)) = (inputs.base, inputs.models.first()) else {
        return Err(crate::error::Error::Internal("arcee_fusion needs the base and one model".into()));
    };
    let row_len = row_len.clamp(1, n.max(1));
    let rows = n.div_ceil(row_len);
    let kl: Vec<f32> = (0..rows)
        .into_par_iter()
        .map(|r| {
            let len = (row_len.min(n - r * row_len)) as usize;
            let (mut xb, mut bb) = (vec![0f32; len], vec![0f32; len]);
            x.decode_at(r * row_len, &mut xb);
            base.decode_at(r * row_len, &mut bb);
            row_kl(&xb, &bb)
        })
        .collect();
    if n == 0 {
        return Ok(FusionStats { kl, threshold: 0.0 });
    }
    let scores = Scores { base, x, kl: &kl, n, row_len, high: OnceLock::new() };
    let [(q1, _), (q3, _)] = value_at_ranks(&scores, quantile_index(0.25, n), quantile_index(0.75, n))?;
    let [(median, _), _] = value_at_ranks(&scores, quantile_index(0.5, n), quantile_index(0.5, n))?;
    let (q1, q3, median) = (f32::from_bits(q1), f32::from_bits(q3), f32::from_bits(median));
    let threshold = median + 1.5 * (q3 - q1);
    Ok(FusionStats { kl, threshold })
}

/// The element pass: `out = b + (x - b) * [|x - b| * kl >= threshold]`
/// for elements `pos..pos + out.len()`.
pub(crate) fn combine(st: &FusionStats, row_len: u64, pos: u64, b: &[f32], x: &[f32], out: &mut [f32]) {
    let row_len = row_len.max(1);
    for (j, ((o, bv), xv)) in out.iter_mut().zip(b).zip(x).enumerate() {
        let d = *xv - *bv;
        let kl = st.kl[((pos + j as u64) / row_len) as usize];
        let mask = if d.abs() * kl >= st.threshold { 1.0f32 } else { 0.0 };
        *o = *bv + d * mask;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_indices_truncate_an_f32_product_as_torch_does() {
        assert_eq!(quantile_index(0.5, 10), 4);
        assert_eq!(quantile_index(0.25, 10), 2);
        assert_eq!(quantile_index(0.75, 10), 6);
        assert_eq!(quantile_index(0.5, 1), 0);
        // 0.75 * 33554431 rounds up in f32 to 25165824 (2^24 * 1.5).
        assert_eq!(quantile_index(0.75, 33_554_432), 25_165_824);
    }

    #[test]
    fn identical_rows_diverge_by_zero_and_the_kl_is_positive_otherwise() {
        assert_eq!(row_kl(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]), 0.0);
        // Reference: p = softmax([0, 1]), q = uniform.
        let e = std::f64::consts::E;
        let p = [1.0 / (1.0 + e), e / (1.0 + e)];
        let want: f64 = p.iter().map(|p| (p + 1e-8) * ((p + 1e-8) / (0.5 + 1e-8)).ln()).sum();
        assert!((f64::from(row_kl(&[0.0, 1.0], &[5.0, 5.0])) - want).abs() < 1e-6);
    }
}
