//! The element-wise pass of the merge methods over one chunk of a tensor,
//! given the tensor's statistics (`merge_stats`). The formulas and their
//! operation order are those documented in `methods`; every step is one f32
//! operation, nothing is fused, and the result is rounded once.

use std::ops::Range;

use crate::arith::{BLOCK, Operand, View, for_each_delta};
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
    fn at(ms: &ModelStats, base: Operand, x: View, start: u64) -> Cursor {
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
    base: Operand,
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
    let base = m.base.map(|s| plan.operand(s));
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
        match m.method {
            Method::Linear => {
                for (j, o) in r.iter_mut().enumerate() {
                    let mut acc = 0f32;
                    for (x, w) in xv.iter().zip(&weights) {
                        let prod = x[j] * *w;
                        acc += prod;
                    }
                    *o = if p.normalize { acc / weight_sum } else { acc };
                }
            }
            Method::Slerp => {
                let (ca, cb) = st.slerp;
                for (j, o) in r.iter_mut().enumerate() {
                    let u = ca * bv[j];
                    let v = cb * xv[0][j];
                    *o = u + v;
                }
            }
            Method::ModelStock => {
                let kf = k as f32;
                for (j, o) in r.iter_mut().enumerate() {
                    let t = st.stock_t[((pos + j as u64) / st.row_len) as usize];
                    let mut sum = 0f32;
                    for x in &xv {
                        sum += x[j];
                    }
                    let avg = sum / kf;
                    let u = t * avg;
                    let v = (1.0 - t) * bv[j];
                    *o = u + v;
                }
            }
            _ => {
                let b = base.expect("task arithmetic has a base");
                for (mi, x) in xv.iter_mut().enumerate() {
                    for j in 0..n {
                        x[j] -= bv[j];
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
                for (j, o) in r.iter_mut().enumerate() {
                    let (mut mixed, mut div);
                    if m.method.consensus() {
                        let mut sw = 0f32;
                        for e in &xv {
                            sw += e[j];
                        }
                        let majority = if sw >= 0.0 { 1.0 } else { -1.0 };
                        mixed = 0f32;
                        div = 0f32;
                        for (e, w) in xv.iter().zip(&weights) {
                            let sign = if e[j] > 0.0 {
                                1.0
                            } else if e[j] < 0.0 {
                                -1.0
                            } else {
                                0.0
                            };
                            let agree = (sign == majority) as u8 as f32;
                            mixed += e[j] * agree;
                            div += *w * agree;
                        }
                        if div == 0.0 {
                            div = 1.0;
                        }
                    } else {
                        mixed = 0f32;
                        for e in &xv {
                            mixed += e[j];
                        }
                        div = if weight_sum.abs() < 1e-8 { 1.0 } else { weight_sum };
                    }
                    if p.normalize {
                        mixed /= div;
                    }
                    if p.lambda != 1.0 {
                        mixed *= lambda;
                    }
                    *o = bv[j] + mixed;
                }
            }
        }
        let at = (pos - elems.start) as usize * os;
        encode(out_ty, r, &mut out[at..at + n * os]);
        pos += n as u64;
    }
}
