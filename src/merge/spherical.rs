//! nuslerp, multislerp and karcher as chatvec computes them: each result
//! lies in the span of its vectors (the inputs, or their deltas from the
//! base), so one streaming pass gathers the vectors' Gram matrix in f64 (for
//! the tensor, each row or each column), the method's geometry runs on
//! that small matrix, and the element pass is `sum_i c_i v_i` in f32. The
//! coefficients follow mergekit 0.1.5's formulas step by step (see
//! `methods` for what each method is); memory is one Gram matrix per group.

use rayon::prelude::*;

use crate::arith::{BLOCK, View};
use crate::error::{Error, Result};
use crate::merge::Inputs;
use crate::merge::lanes::Lanes;
use crate::merge::methods::{Method, TensorParams};
use crate::merge::select::{blocks, gram_pairs};

/// Which elements make one vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Groups {
    /// The whole tensor.
    Tensor,
    /// Each row (`row_len` consecutive elements).
    Rows,
    /// Each column (elements `row_len` apart).
    Cols,
}

/// The element pass's recipe: `out = sum_i c_i v_i` (plus the base when
/// `delta`), `c` taken from the element's group.
#[derive(Clone, Debug)]
pub(crate) struct Combo {
    /// `groups x k` coefficients, group-major.
    pub coef: Vec<f32>,
    pub groups: Groups,
    /// `v_i = x_i - base`, and the base added back.
    pub delta: bool,
}

impl Combo {
    /// The coefficients for element `i` of a tensor with rows of `row_len`.
    #[inline(always)]
    pub(crate) fn at(&self, i: u64, row_len: u64, k: usize) -> &[f32] {
        let g = match self.groups {
            Groups::Tensor => 0,
            Groups::Rows => (i / row_len) as usize,
            Groups::Cols => (i % row_len) as usize,
        };
        &self.coef[g * k..(g + 1) * k]
    }
}

/// Rows per chunk of the column pass: a fixed number of chunks whatever
/// the thread count, so the sums are the same on every machine.
const COL_CHUNKS: u64 = 64;

/// Decodes vector `i` of `inputs` over `r` into `out`: model `i`, minus the
/// base when `delta`.
fn vector(inputs: &Inputs, i: usize, delta: bool, r: std::ops::Range<u64>, out: &mut Vec<f32>) {
    out.clear();
    out.resize((r.end - r.start) as usize, 0.0);
    let x: View = inputs.models[i];
    let mut p = r.start;
    let mut b = [0f32; BLOCK];
    while p < r.end {
        let m = (BLOCK as u64).min(r.end - p) as usize;
        let at = (p - r.start) as usize;
        x.decode_at(p, &mut out[at..at + m]);
        if delta && let Some(base) = inputs.base {
            base.decode_at(p, &mut b[..m]);
            out[at..at + m].iter_mut().zip(&b[..m]).for_each(|(v, bj)| *v -= *bj);
        }
        p += m as u64;
    }
}

/// The Gram matrix (upper triangle, `gram_pairs` order) of the `k`
/// vectors of each group.
pub(crate) fn gram_groups(
    inputs: &Inputs,
    n: u64,
    row_len: u64,
    groups: Groups,
    delta: bool,
) -> Result<Vec<Vec<f64>>> {
    let k = inputs.models.len();
    let pairs = gram_pairs(k);
    let rows = n.div_ceil(row_len.max(1)).max(1);
    let group_len = match groups {
        Groups::Tensor => n.max(1),
        _ => row_len.max(1),
    };
    if groups == Groups::Cols {
        let rl = row_len.max(1) as usize;
        let per = rows.div_ceil(COL_CHUNKS).max(1);
        let chunks: Vec<u64> = (0..rows.div_ceil(per)).collect();
        let parts: Vec<Vec<f64>> = chunks
            .into_par_iter()
            .map(|c| {
                let mut sums = vec![0f64; rl * pairs.len()];
                let mut v: Vec<Vec<f32>> = vec![Vec::new(); k];
                for row in c * per..((c + 1) * per).min(rows) {
                    let r = row * row_len..((row + 1) * row_len).min(n);
                    for (i, vi) in v.iter_mut().enumerate() {
                        vector(inputs, i, delta, r.clone(), vi);
                    }
                    for (col, s) in sums.chunks_mut(pairs.len()).enumerate().take(v[0].len()) {
                        for (p, &(i, j)) in pairs.iter().enumerate() {
                            s[p] += v[i][col] as f64 * v[j][col] as f64;
                        }
                    }
                }
                sums
            })
            .collect();
        let mut out = vec![vec![0f64; pairs.len()]; rl];
        for part in parts {
            for (col, s) in part.chunks(pairs.len()).enumerate() {
                out[col].iter_mut().zip(s).for_each(|(a, b)| *a += b);
            }
        }
        return Ok(out);
    }
    let parts: Vec<(u64, Vec<f64>)> = blocks(n, group_len)
        .into_par_iter()
        .map(|(g, r)| {
            let mut v: Vec<Vec<f32>> = vec![Vec::new(); k];
            for (i, vi) in v.iter_mut().enumerate() {
                vector(inputs, i, delta, r.clone(), vi);
            }
            let mut sums = Lanes::new(pairs.len());
            for (p, &(i, j)) in pairs.iter().enumerate() {
                for (at, (a, b)) in v[i].iter().zip(&v[j]).enumerate() {
                    sums.add(at as u64, p, *a as f64 * *b as f64);
                }
            }
            (g, sums.total())
        })
        .collect();
    let count = if groups == Groups::Tensor { 1 } else { rows as usize };
    let mut out = vec![vec![0f64; pairs.len()]; count];
    for (g, part) in parts {
        out[g as usize].iter_mut().zip(part).for_each(|(a, b)| *a += b);
    }
    Ok(out)
}

/// Entry `(i, j)` of an upper-triangle Gram matrix of `k` vectors.
fn entry(g: &[f64], k: usize, i: usize, j: usize) -> f64 {
    let (i, j) = if i <= j { (i, j) } else { (j, i) };
    g[i * k - i * (i.saturating_sub(1)) / 2 - i + j]
}

/// nuslerp's coefficients for `v0`, `v1` from their Gram matrix: `(sin((1
/// - t) theta), sin(t theta)) / sin(theta)`, or `(1 - t, t)` when colinear.
fn nuslerp_coef(g: &[f64], t: f64) -> [f64; 2] {
    let n0 = g[0].sqrt().max(1e-7);
    let n1 = g[2].sqrt().max(1e-7);
    let cos = (g[1] / (n0 * n1)).clamp(-1.0, 1.0);
    if 1.0 - cos * cos <= 1e-16 {
        return [1.0 - t, t];
    }
    let theta = cos.acos();
    let s = theta.sin();
    [((1.0 - t) * theta).sin() / s, (t * theta).sin() / s]
}

/// multislerp's coefficients: the normalized weighted mean of the unit
/// vectors, scaled by the weighted mean norm.
#[allow(clippy::needless_range_loop)]
fn multislerp_coef(g: &[f64], w: &[f64], eps: f64, tensor: &str) -> Result<Vec<f64>> {
    let k = w.len();
    let norms: Vec<f64> = (0..k).map(|i| entry(g, k, i, i).max(0.0).sqrt()).collect();
    let d: Vec<f64> = norms.iter().map(|n| n + eps).collect();
    let mut m2 = 0.0;
    for i in 0..k {
        for j in 0..k {
            m2 += w[i] * w[j] * entry(g, k, i, j) / (d[i] * d[j]);
        }
    }
    let mean_norm = m2.max(0.0).sqrt();
    if mean_norm < eps {
        if k == 2 {
            return Ok(w.to_vec());
        }
        return Err(Error::Usage(format!(
            "tensor '{tensor}': multislerp's weighted mean of the models' directions is zero (antipodal models whose weights balance out); use other weights"
        )));
    }
    let avg: f64 = norms.iter().zip(w).map(|(n, wi)| n * wi).sum();
    Ok((0..k).map(|i| avg * w[i] / (d[i] * mean_norm)).collect())
}

/// karcher's coefficients on the raw inputs: the iteration of mergekit's
/// `karcher_merge_tensors`, run on the unit vectors' Gram matrix with the
/// mean kept as coefficients over them.
// Index loops: the matrix algebra reads as written in mergekit.
#[allow(clippy::needless_range_loop)]
fn karcher_coef(g: &[f64], k: usize, max_iter: usize, tol: f64) -> Vec<f64> {
    let norms: Vec<f64> = (0..k).map(|i| entry(g, k, i, i).max(0.0).sqrt()).collect();
    let valid: Vec<usize> = (0..k).filter(|&i| norms[i] > tol).collect();
    let mut out = vec![0.0; k];
    if valid.is_empty() {
        return out;
    }
    let m = valid.len();
    let unit = |a: usize, b: usize| {
        let (i, j) = (valid[a], valid[b]);
        entry(g, k, i, j) / (norms[i] * norms[j])
    };
    // <sum_a x_a u_a, sum_b y_b u_b>
    let dot = |x: &[f64], y: &[f64]| {
        let mut s = 0.0;
        for a in 0..m {
            for b in 0..m {
                s += x[a] * y[b] * unit(a, b);
            }
        }
        s
    };
    let alpha = 1.0 / m as f64;
    let mut c = vec![alpha; m];
    let n0 = dot(&c, &c).max(0.0).sqrt();
    if n0 < tol {
        c = vec![0.0; m];
        c[0] = 1.0;
    } else {
        c.iter_mut().for_each(|x| *x /= n0);
    }
    for _ in 0..max_iter {
        let mut tangent = vec![0.0; m];
        for a in 0..m {
            let d: f64 = (0..m).map(|b| c[b] * unit(a, b)).sum::<f64>().clamp(-1.0, 1.0);
            let theta = d.acos();
            if theta < tol {
                continue;
            }
            let f = alpha * theta / theta.sin();
            for b in 0..m {
                tangent[b] -= f * d * c[b];
            }
            tangent[a] += f;
        }
        let tn = dot(&tangent, &tangent).max(0.0).sqrt();
        if tn < tol {
            break;
        }
        let (cs, sn) = (tn.cos(), tn.sin());
        for b in 0..m {
            c[b] = cs * c[b] + sn * tangent[b] / tn;
        }
        let un = dot(&c, &c).max(0.0).sqrt();
        if un > tol {
            c.iter_mut().for_each(|x| *x /= un);
        }
    }
    let scale: f64 = norms.iter().sum::<f64>() / k as f64;
    for (a, &i) in valid.iter().enumerate() {
        out[i] = scale * c[a] / norms[i];
    }
    out
}

/// The element pass's recipe for a spherical method on `inputs` (`n`
/// elements in rows of `row_len`).
pub(crate) fn combo(
    inputs: &Inputs,
    method: Method,
    p: &TensorParams,
    n: u64,
    row_len: u64,
    tensor: &str,
) -> Result<Combo> {
    let k = inputs.models.len();
    let delta = inputs.base.is_some();
    let single_row = row_len >= n;
    match method {
        Method::NuSlerp => {
            let (w0, w1) = (p.models[0].weight, p.models[1].weight);
            let t = if (w0 + w1).abs() < 1e-6 { 0.5 } else { w1 / (w0 + w1) };
            let groups = match (p.shared.flatten, p.shared.row_wise) {
                (true, _) => Groups::Tensor,
                _ if single_row => Groups::Tensor,
                (false, false) => Groups::Rows,
                (false, true) => Groups::Cols,
            };
            let grams = gram_groups(inputs, n, row_len, groups, delta)?;
            let coef = grams.iter().flat_map(|g| nuslerp_coef(g, t)).map(|c| c as f32).collect();
            Ok(Combo { coef, groups, delta })
        }
        Method::MultiSlerp => {
            if k == 1 {
                // One model is returned as it is (not rebuilt from a delta).
                return Ok(Combo { coef: vec![1.0], groups: Groups::Tensor, delta: false });
            }
            let mut w: Vec<f64> = p.models.iter().map(|m| m.weight).collect();
            if p.shared.normalize_weights {
                let sum: f64 = w.iter().sum();
                w.iter_mut().for_each(|x| *x /= sum);
            }
            let g = gram_groups(inputs, n, row_len, Groups::Tensor, delta)?;
            let coef = multislerp_coef(&g[0], &w, p.shared.eps, tensor)?;
            Ok(Combo { coef: coef.into_iter().map(|c| c as f32).collect(), groups: Groups::Tensor, delta })
        }
        Method::Karcher => {
            if k == 1 {
                return Ok(Combo { coef: vec![1.0], groups: Groups::Tensor, delta: false });
            }
            let g = gram_groups(inputs, n, row_len, Groups::Tensor, false)?;
            let coef = karcher_coef(&g[0], k, p.shared.max_iter as usize, p.shared.tol);
            Ok(Combo {
                coef: coef.into_iter().map(|c| c as f32).collect(),
                groups: Groups::Tensor,
                delta: false,
            })
        }
        other => Err(Error::Internal(format!("{} is not a spherical method", other.name()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Karcher mean of two unit vectors at an angle is the unit vector
    /// halfway along the arc; with norms 1 and 3, scaled by their mean, 2.
    #[test]
    fn karcher_of_two_vectors_is_the_arc_midpoint_scaled_by_the_mean_norm() {
        let theta: f64 = 1.0;
        // x0 = (1, 0), x1 = 3 (cos theta, sin theta).
        let g = [1.0, 3.0 * theta.cos(), 9.0];
        let c = karcher_coef(&g, 2, 50, 1e-12);
        let (x, y) = (c[0] * 1.0 + c[1] * 3.0 * theta.cos(), c[1] * 3.0 * theta.sin());
        let want = (2.0 * (theta / 2.0).cos(), 2.0 * (theta / 2.0).sin());
        assert!((x - want.0).abs() < 1e-9 && (y - want.1).abs() < 1e-9, "{x} {y} {want:?}");
    }

    /// multislerp of two orthogonal unit vectors with equal weights is
    /// their normalized sum (the tangent step adds nothing).
    #[test]
    fn multislerp_of_orthogonal_units_is_the_normalized_sum() {
        let c = multislerp_coef(&[1.0, 0.0, 1.0], &[0.5, 0.5], 0.0, "t").unwrap();
        let s = std::f64::consts::FRAC_1_SQRT_2;
        assert!((c[0] - s).abs() < 1e-12 && (c[1] - s).abs() < 1e-12, "{c:?}");
        assert!(multislerp_coef(&[1.0, -1.0, 1.0, 0.0, 0.0, 1.0], &[0.5, 0.5, 0.0], 1e-8, "t").is_err());
    }

    #[test]
    fn nuslerp_is_linear_for_colinear_vectors() {
        assert_eq!(nuslerp_coef(&[1.0, 2.0, 4.0], 0.25), [0.75, 0.25]);
        let c = nuslerp_coef(&[1.0, 0.0, 1.0], 0.5);
        let s = std::f64::consts::FRAC_1_SQRT_2;
        assert!((c[0] - s).abs() < 1e-12 && (c[1] - s).abs() < 1e-12);
    }
}
