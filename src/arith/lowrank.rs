//! `out = base + scale * delta` where `delta = P @ Q` is a low-rank
//! product (a LoRA merge), computed for any element range of the output
//! without ever forming `delta` whole.
//!
//! For a linear layer `[out, in]`, `P = B` (`out x r`) and `Q = A`
//! (`r x in`); for an embedding or a `fan_in_fan_out` layer stored
//! `[in, out]`, `delta = (B @ A)^T`, so `P = A^T` and `Q = B^T`.
//!
//! Operation order (part of the numeric contract): for each element,
//! `d = 0; d = d + P[i,t] * Q[t,k]` for `t = 0..r` in order, each product
//! and sum rounded to f32 on its own; then `m = scale * d; out = base + m`;
//! one rounding to the output dtype. The element's value depends only on
//! its row and column, never on the range being computed, so chunking and
//! thread count do not change the bytes.

use super::{BLOCK, Operand};
use crate::model::dtype::{FloatType, encode};

/// The factors of one low-rank update and the shape of the weight it
/// updates.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LowRank<'a> {
    /// `lora_A`: `r x in` (`r x rows` when transposed).
    pub a: Operand<'a>,
    /// `lora_B`: `out x r` (`cols x r` when transposed).
    pub b: Operand<'a>,
    pub rank: usize,
    /// `delta = (B @ A)^T` (embeddings, `fan_in_fan_out`).
    pub transposed: bool,
    /// The weight's rows and columns.
    pub rows: u64,
    pub cols: u64,
}

impl LowRank<'_> {
    /// `P[i, t]` for rows `r0..r1` into `out[(i - r0) * rank + t]`.
    fn decode_p(&self, r0: u64, r1: u64, out: &mut [f32], tmp: &mut Vec<f32>) {
        let (r, n) = (self.rank, (r1 - r0) as usize);
        if self.transposed {
            // P[i, t] = A[t, i]: row t of A is contiguous over i.
            tmp.resize(n, 0.0);
            for t in 0..r {
                self.a.decode_at(t as u64 * self.rows + r0, &mut tmp[..n]);
                for (i, v) in tmp[..n].iter().enumerate() {
                    out[i * r + t] = *v;
                }
            }
        } else {
            self.b.decode_at(r0 * r as u64, &mut out[..n * r]);
        }
    }

    /// `Q[t, k]` for columns `c0..c1` into `out[t * (c1 - c0) + k - c0]`.
    fn decode_q(&self, c0: u64, c1: u64, out: &mut [f32], tmp: &mut Vec<f32>) {
        let (r, n) = (self.rank, (c1 - c0) as usize);
        if self.transposed {
            // Q[t, k] = B[k, t]: rows k..k+n of B are contiguous.
            tmp.resize(n * r, 0.0);
            self.b.decode_at(c0 * r as u64, &mut tmp[..n * r]);
            for k in 0..n {
                for t in 0..r {
                    out[t * n + k] = tmp[k * r + t];
                }
            }
        } else {
            for t in 0..r {
                self.a.decode_at(t as u64 * self.cols + c0, &mut out[t * n..(t + 1) * n]);
            }
        }
    }
}

/// Computes elements `first..first + n` (row-major) of
/// `base + scale * (P @ Q)` into `out` (dtype `out_ty`, `n` elements);
/// `base` holds exactly those elements.
pub(crate) fn add_low_rank(
    out_ty: FloatType,
    out: &mut [u8],
    base: Operand<'_>,
    lr: &LowRank<'_>,
    first: u64,
    scale: f32,
) {
    let os = out_ty.size();
    let n = (out.len() / os) as u64;
    if n == 0 || lr.cols == 0 {
        return;
    }
    let (r, cols, end) = (lr.rank, lr.cols, first + n);
    // Bounded work buffers whatever the rank: at most 64K floats of P and
    // 256K of Q, and no more than the range needs (a merge's view asks for
    // one block at a time).
    let spanned = (end - 1) / cols - first / cols + 1;
    let row_block = ((65_536 / r.max(1)).clamp(1, 64) as u64).min(spanned);
    let col_block = ((262_144 / r.max(1)).clamp(1, BLOCK) as u64).min(n.min(cols));
    let mut p = vec![0f32; row_block as usize * r];
    let mut q = vec![0f32; col_block as usize * r];
    let mut tmp = Vec::new();
    let (mut acc, mut b) = ([0f32; BLOCK], [0f32; BLOCK]);
    // The columns of row i inside the range.
    let span = |i: u64| (first.max(i * cols) - i * cols, end.min((i + 1) * cols) - i * cols);
    let (row0, row_end) = (first / cols, (end - 1) / cols + 1);
    let mut rs = row0;
    while rs < row_end {
        let re = (rs + row_block).min(row_end);
        lr.decode_p(rs, re, &mut p, &mut tmp);
        let lo = (rs..re).map(|i| span(i).0).min().unwrap_or(0);
        let hi = (rs..re).map(|i| span(i).1).max().unwrap_or(0);
        let mut cs = lo;
        while cs < hi {
            let ce = (cs + col_block).min(hi);
            let nc = (ce - cs) as usize;
            lr.decode_q(cs, ce, &mut q, &mut tmp);
            for i in rs..re {
                let (s, e) = span(i);
                let (a0, a1) = (cs.max(s), ce.min(e));
                if a0 >= a1 {
                    continue;
                }
                let m = (a1 - a0) as usize;
                let acc = &mut acc[..m];
                acc.fill(0.0);
                let prow = &p[(i - rs) as usize * r..][..r];
                for (t, &pv) in prow.iter().enumerate() {
                    let qrow = &q[t * nc + (a0 - cs) as usize..][..m];
                    for (d, &qv) in acc.iter_mut().zip(qrow) {
                        *d += pv * qv;
                    }
                }
                let pos = (i * cols + a0 - first) as usize;
                base.decode_at(pos as u64, &mut b[..m]);
                for (d, &bv) in acc.iter_mut().zip(&b[..m]) {
                    let mv = scale * *d;
                    *d = bv + mv;
                }
                encode(out_ty, acc, &mut out[pos * os..(pos + m) * os]);
            }
            cs = ce;
        }
        rs = re;
    }
}

/// A model tensor with a LoRA update merged into it, as mergekit's
/// `model+lora` reference reads it: each element is
/// `base + scale * (P @ Q)` computed as `add_low_rank` does, rounded to
/// `round` (the dtype the merged model would be stored in), then decoded.
/// Elements depend only on their position, so any range gives the same
/// values.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Patched<'a> {
    pub base: Operand<'a>,
    pub factors: LowRank<'a>,
    pub scale: f32,
    pub round: FloatType,
}

impl Patched<'_> {
    /// Decodes elements `start..start + out.len()` of the merged tensor.
    pub(crate) fn decode_at(&self, start: u64, out: &mut [f32]) {
        let size = self.round.size();
        let mut bytes = [0u8; BLOCK * 4];
        for (k, piece) in out.chunks_mut(BLOCK).enumerate() {
            let at = start + (k * BLOCK) as u64;
            let m = piece.len();
            let base = self.base.slice(at as usize, m);
            add_low_rank(self.round, &mut bytes[..m * size], base, &self.factors, at, self.scale);
            crate::model::dtype::decode(self.round, &bytes[..m * size], piece);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::dtype::decode;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn op(x: &[u8]) -> Operand<'_> {
        Operand { ty: FloatType::F32, bytes: x }
    }

    fn decoded(b: &[u8]) -> Vec<f32> {
        let mut out = vec![0f32; b.len() / 4];
        decode(FloatType::F32, b, &mut out);
        out
    }

    /// The documented order, element by element, straight from the
    /// definition (a reference independent of the blocking).
    #[allow(clippy::too_many_arguments)]
    fn reference(
        base: &[f32],
        a: &[f32],
        b: &[f32],
        r: usize,
        rows: usize,
        cols: usize,
        tr: bool,
        s: f32,
    ) -> Vec<f32> {
        let mut out = vec![0f32; rows * cols];
        for i in 0..rows {
            for k in 0..cols {
                let mut d = 0f32;
                for t in 0..r {
                    let (pv, qv) =
                        if tr { (a[t * rows + i], b[k * r + t]) } else { (b[i * r + t], a[t * cols + k]) };
                    d += pv * qv;
                }
                out[i * cols + k] = base[i * cols + k] + s * d;
            }
        }
        out
    }

    #[test]
    fn any_range_and_rank_gives_the_definition_bit_for_bit() {
        for (rows, cols, r) in [(7usize, 5usize, 3usize), (3, 1500, 2), (40, 9, 300), (1, 1, 1)] {
            for tr in [false, true] {
                let base: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin()).collect();
                let a: Vec<f32> =
                    (0..r * if tr { rows } else { cols }).map(|i| (i as f32 * 0.11).cos()).collect();
                let b: Vec<f32> =
                    (0..r * if tr { cols } else { rows }).map(|i| (i as f32 * 0.05).sin()).collect();
                let want = reference(&base, &a, &b, r, rows, cols, tr, 0.7);
                let (bb, ab, bbb) = (f32_bytes(&base), f32_bytes(&a), f32_bytes(&b));
                let lr = LowRank {
                    a: op(&ab),
                    b: op(&bbb),
                    rank: r,
                    transposed: tr,
                    rows: rows as u64,
                    cols: cols as u64,
                };
                let n = rows * cols;
                for cut in [1, 2, 7, n / 3 + 1, n] {
                    let mut got = Vec::new();
                    let mut at = 0;
                    while at < n {
                        let m = cut.min(n - at);
                        let mut out = vec![0u8; m * 4];
                        add_low_rank(FloatType::F32, &mut out, op(&bb).slice(at, m), &lr, at as u64, 0.7);
                        got.extend(decoded(&out));
                        at += m;
                    }
                    let same = got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits());
                    assert!(same, "rows {rows} cols {cols} r {r} transposed {tr} chunk {cut}");
                }
            }
        }
    }

    #[test]
    fn a_patched_tensor_reads_the_same_rounded_values_over_any_range() {
        let (rows, cols, r) = (9usize, 1300usize, 4usize);
        let base: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let a: Vec<f32> = (0..r * cols).map(|i| (i as f32 * 0.11).cos()).collect();
        let b: Vec<f32> = (0..r * rows).map(|i| (i as f32 * 0.05).sin()).collect();
        let want = reference(&base, &a, &b, r, rows, cols, false, 1.5);
        let (bb, ab, bbb) = (f32_bytes(&base), f32_bytes(&a), f32_bytes(&b));
        let factors = LowRank {
            a: op(&ab),
            b: op(&bbb),
            rank: r,
            transposed: false,
            rows: rows as u64,
            cols: cols as u64,
        };
        let p = Patched { base: op(&bb), factors, scale: 1.5, round: FloatType::BF16 };
        let n = rows * cols;
        for cut in [1, 700, 1024, 3001, n] {
            let mut got = vec![0f32; n];
            for (k, piece) in got.chunks_mut(cut).enumerate() {
                p.decode_at((k * cut) as u64, piece);
            }
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // The definition's value, rounded once to bf16.
                assert_eq!(*g, half::bf16::from_f32(*w).to_f32(), "element {i}, chunk {cut}");
            }
        }
    }
}
