//! The element-wise pass of the merge methods over one chunk of a tensor,
//! given the tensor's statistics (`merge_stats`). The formulas and their
//! operation order are those documented in `methods`; every step is one f32
//! operation, nothing is fused, and the result is rounded once.

use std::ops::Range;

use crate::arith::{BLOCK, View, for_each_delta};
use crate::dtype::{FloatType, encode};
use crate::merge_stats::{Keep, ModelStats, STAT_BLOCK, TensorStats, della_probability, row_ranks};
use crate::methods::Method;
use crate::plan::{MergeOp, Plan};
use crate::rng;

/// Where a model's mask stands inside a chunk.
enum Cursor {
    Stateless,
    /// Boundary-equal elements seen so far (rank selection).
    Ranks {
        seen_lo: u64,
        seen_hi: u64,
    },
    /// The ranks of the current row (DELLA).
    Della {
        row: u64,
        ranks: Vec<u32>,
        deltas: Vec<f32>,
    },
}

impl Cursor {
    /// The cursor for a chunk starting at element `start`.
    fn at(ms: &ModelStats, base: View, x: View, start: u64) -> Cursor {
        match &ms.keep {
            Keep::Ranks(rk) => {
                let b0 = start / STAT_BLOCK;
                let (mut seen_lo, mut seen_hi) = (rk.eq_lo[b0 as usize], rk.eq_hi[b0 as usize]);
                for_each_delta(base, x, b0 * STAT_BLOCK..start, |_, d| {
                    for &v in d {
                        let b = v.to_bits() & 0x7fff_ffff;
                        seen_lo += (b == rk.lo_val) as u64;
                        seen_hi += (b == rk.hi_val) as u64;
                    }
                });
                Cursor::Ranks { seen_lo, seen_hi }
            }
            Keep::Della { .. } => Cursor::Della { row: u64::MAX, ranks: Vec::new(), deltas: Vec::new() },
            _ => Cursor::Stateless,
        }
    }
}

/// Masks and weights model `k`'s deltas `d` (elements from `p`) in place:
/// `e = w * rescale * (d * mask)`, in that order.
#[allow(clippy::too_many_arguments)]
fn sparsify_block(
    ms: &ModelStats,
    cur: &mut Cursor,
    weight: f32,
    base: View,
    x: View,
    row_len: u64,
    p: u64,
    d: &mut [f32],
) {
    match (&ms.keep, cur) {
        (Keep::All, _) => {}
        (Keep::Zero, _) => d.fill(0.0),
        (Keep::None, _) => d.iter_mut().for_each(|v| *v *= 0.0),
        (Keep::Ranks(rk), Cursor::Ranks { seen_lo, seen_hi }) => {
            for v in d.iter_mut() {
                let b = v.to_bits() & 0x7fff_ffff;
                let kept = rk.keeps(b, *seen_lo, *seen_hi);
                *seen_lo += (b == rk.lo_val) as u64;
                *seen_hi += (b == rk.hi_val) as u64;
                *v *= kept as u8 as f32;
            }
        }
        (Keep::Random(prob), _) => {
            for (j, v) in d.iter_mut().enumerate() {
                *v *= (rng::uniform(ms.stream, p + j as u64) < *prob) as u8 as f32;
            }
        }
        (Keep::Della { density, epsilon }, Cursor::Della { row, ranks, deltas }) => {
            for (j, v) in d.iter_mut().enumerate() {
                let i = p + j as u64;
                let r = i / row_len;
                if r != *row {
                    deltas.clear();
                    for_each_delta(base, x, r * row_len..(r + 1) * row_len, |_, blk| {
                        deltas.extend_from_slice(blk)
                    });
                    row_ranks(deltas, ranks);
                    *row = r;
                }
                let prob = della_probability(*density, *epsilon, ranks[(i - r * row_len) as usize], row_len);
                *v *= (rng::uniform(ms.stream, i) < prob) as u8 as f32;
            }
        }
        _ => unreachable!("cursor matches its mask"),
    }
    if let Some(f) = ms.rescale {
        d.iter_mut().for_each(|v| *v *= f);
    }
    d.iter_mut().for_each(|v| *v *= weight);
}

/// Computes elements `elems` of a merged tensor into `out` (dtype `out_ty`).
pub fn compute(
    plan: &Plan,
    m: &MergeOp,
    st: &TensorStats,
    out_ty: FloatType,
    elems: Range<u64>,
    out: &mut [u8],
) {
    let p = &m.params;
    let base = m.base_view(plan);
    let xs: Vec<View> = (0..m.models.len()).map(|k| m.view(plan, k)).collect();
    let weights: Vec<f32> = p.models.iter().map(|mp| mp.weight as f32).collect();
    let k = xs.len();
    let mut cursors: Vec<Cursor> = match base {
        Some(b) if m.method.is_task_arithmetic() => {
            st.models.iter().zip(&xs).map(|(ms, x)| Cursor::at(ms, b, *x, elems.start)).collect()
        }
        _ => Vec::new(),
    };
    let weight_sum = weights.iter().fold(0f32, |a, w| a + w);
    let lambda = p.lambda as f32;
    let mut bv = [0f32; BLOCK];
    let mut xv = vec![[0f32; BLOCK]; k];
    let mut res = [0f32; BLOCK];
    let os = out_ty.size();
    let mut pos = elems.start;
    while pos < elems.end {
        let n = (BLOCK as u64).min(elems.end - pos) as usize;
        if let Some(b) = base {
            b.decode_at(pos, &mut bv[..n]);
        }
        for (buf, x) in xv.iter_mut().zip(&xs) {
            x.decode_at(pos, &mut buf[..n]);
        }
        let r = &mut res[..n];
        // Each formula runs as whole-block array passes (which the compiler
        // vectorizes); per element the operations and their order are those
        // documented in `methods`, accumulations starting from 0 in model
        // order.
        let mut acc = [0f32; BLOCK];
        let acc = &mut acc[..n];
        match m.method {
            Method::Linear => {
                for (x, w) in xv.iter().zip(&weights) {
                    for (a, v) in acc.iter_mut().zip(&x[..n]) {
                        *a += *v * *w;
                    }
                }
                if p.normalize {
                    acc.iter_mut().for_each(|a| *a /= weight_sum);
                }
                r.copy_from_slice(acc);
            }
            Method::Slerp => {
                let (ca, cb) = st.slerp;
                for ((o, b), x) in r.iter_mut().zip(&bv[..n]).zip(&xv[0][..n]) {
                    *o = ca * *b + cb * *x;
                }
            }
            Method::ModelStock => {
                let kf = k as f32;
                for x in &xv {
                    for (a, v) in acc.iter_mut().zip(&x[..n]) {
                        *a += *v;
                    }
                }
                for (j, o) in r.iter_mut().enumerate() {
                    let t = st.stock_t[((pos + j as u64) / st.row_len) as usize];
                    let avg = acc[j] / kf;
                    *o = t * avg + (1.0 - t) * bv[j];
                }
            }
            _ => {
                let b = base.expect("task arithmetic has a base");
                for (mi, x) in xv.iter_mut().enumerate() {
                    for (v, bj) in x[..n].iter_mut().zip(&bv[..n]) {
                        *v -= *bj;
                    }
                    sparsify_block(
                        &st.models[mi],
                        &mut cursors[mi],
                        weights[mi],
                        b,
                        xs[mi],
                        st.row_len,
                        pos,
                        &mut x[..n],
                    );
                }
                let mut div = [0f32; BLOCK];
                let div = &mut div[..n];
                if m.method.consensus() {
                    // Majority sign of the weighted deltas' sum (0 counts as +).
                    let mut sw = [0f32; BLOCK];
                    for e in &xv {
                        for (s, v) in sw[..n].iter_mut().zip(&e[..n]) {
                            *s += *v;
                        }
                    }
                    for (e, w) in xv.iter().zip(&weights) {
                        for j in 0..n {
                            let majority = if sw[j] >= 0.0 { 1.0 } else { -1.0 };
                            let sign = if e[j] > 0.0 {
                                1.0
                            } else if e[j] < 0.0 {
                                -1.0
                            } else {
                                0.0
                            };
                            let agree = (sign == majority) as u8 as f32;
                            acc[j] += e[j] * agree;
                            div[j] += *w * agree;
                        }
                    }
                    div.iter_mut().filter(|d| **d == 0.0).for_each(|d| *d = 1.0);
                } else {
                    for e in &xv {
                        for (a, v) in acc.iter_mut().zip(&e[..n]) {
                            *a += *v;
                        }
                    }
                    div.fill(if weight_sum.abs() < 1e-8 { 1.0 } else { weight_sum });
                }
                if p.normalize {
                    acc.iter_mut().zip(div.iter()).for_each(|(a, d)| *a /= *d);
                }
                if p.lambda != 1.0 {
                    acc.iter_mut().for_each(|a| *a *= lambda);
                }
                for ((o, b), a) in r.iter_mut().zip(&bv[..n]).zip(acc.iter()) {
                    *o = *b + *a;
                }
            }
        }
        let at = (pos - elems.start) as usize * os;
        encode(out_ty, r, &mut out[at..at + n * os]);
        pos += n as u64;
    }
}
