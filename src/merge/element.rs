//! The element-wise pass of the merge methods over one chunk of a tensor,
//! given the tensor's statistics (`stats`). The formulas and their
//! operation order are those documented in `methods`; every step is one f32
//! operation, nothing is fused, accumulations start from 0 in model order,
//! and the result is rounded once. Each method runs as whole-block array
//! passes, which the compiler vectorizes.

use std::ops::Range;

use crate::arith::{BLOCK, View, for_each_delta};
use crate::merge::methods::Method;
use crate::merge::sce::{Cursor, variance_bits};
use crate::merge::stats::{
    Keep, ModelStats, RankKeep, STAT_BLOCK, TensorStats, della_probability, row_ranks,
};
use crate::merge::{Inputs, TensorMerge};
use crate::model::dtype::{FloatType, encode};
use crate::rng;

/// Computes elements `elems` of a merged tensor into `out` (dtype `out_ty`).
pub(crate) fn compute(
    inputs: &Inputs,
    tm: &TensorMerge,
    st: &TensorStats,
    out_ty: FloatType,
    elems: Range<u64>,
    out: &mut [u8],
) {
    let mut pass = Pass::new(inputs, tm, st, elems.start);
    let os = out_ty.size();
    let mut pos = elems.start;
    while pos < elems.end {
        let n = (BLOCK as u64).min(elems.end - pos) as usize;
        pass.decode(pos, n);
        let r = pass.combine(pos, n);
        let at = (pos - elems.start) as usize * os;
        encode(out_ty, r, &mut out[at..at + n * os]);
        pos += n as u64;
    }
}

/// One chunk's state: the decoded block of every input, the masks'
/// cursors, and the result block.
struct Pass<'a> {
    inputs: &'a Inputs<'a>,
    tm: &'a TensorMerge,
    st: &'a TensorStats,
    weights: Vec<f32>,
    /// `sum w_i` in f32, from 0 in model order.
    weight_sum: f32,
    masks: Vec<Mask<'a>>,
    /// sce's selection as this chunk meets it.
    sce: Option<Cursor<'a>>,
    base: [f32; BLOCK],
    /// One block per model: its values, then (task arithmetic) its
    /// weighted, masked delta.
    models: Vec<[f32; BLOCK]>,
    acc: [f32; BLOCK],
    div: [f32; BLOCK],
    result: [f32; BLOCK],
}

impl<'a> Pass<'a> {
    fn new(inputs: &'a Inputs<'a>, tm: &'a TensorMerge, st: &'a TensorStats, start: u64) -> Pass<'a> {
        let weights: Vec<f32> = tm.params.models.iter().map(|mp| mp.weight as f32).collect();
        let weight_sum = weights.iter().fold(0f32, |a, w| a + w);
        let masks = match inputs.base {
            Some(b) if tm.method.is_task_arithmetic() => {
                st.models.iter().zip(&inputs.models).map(|(ms, x)| Mask::at(ms, b, *x, start)).collect()
            }
            _ => Vec::new(),
        };
        let sce = st.sce.as_ref().map(|s| Cursor::at(&s.select, inputs, start));
        Pass {
            inputs,
            tm,
            st,
            weights,
            weight_sum,
            masks,
            sce,
            base: [0f32; BLOCK],
            models: vec![[0f32; BLOCK]; inputs.models.len()],
            acc: [0f32; BLOCK],
            div: [0f32; BLOCK],
            result: [0f32; BLOCK],
        }
    }

    /// Decodes elements `pos..pos + n` of the base and every model.
    fn decode(&mut self, pos: u64, n: usize) {
        if let Some(b) = self.inputs.base {
            b.decode_at(pos, &mut self.base[..n]);
        }
        for (buf, x) in self.models.iter_mut().zip(&self.inputs.models) {
            x.decode_at(pos, &mut buf[..n]);
        }
    }

    /// The method's formula over the decoded block.
    fn combine(&mut self, pos: u64, n: usize) -> &[f32] {
        self.acc[..n].fill(0.0);
        match self.tm.method {
            Method::Linear => self.linear(n),
            Method::Slerp => self.slerp(n),
            Method::ModelStock => self.model_stock(pos, n),
            Method::Passthrough => {
                let scale = self.tm.params.models[0].scale as f32;
                for (o, x) in self.result[..n].iter_mut().zip(&self.models[0][..n]) {
                    *o = *x * scale;
                }
            }
            Method::NearSwap => self.nearswap(n),
            Method::Ram | Method::RamPlusTl => self.ram(n),
            m if m.spherical() => self.combo(pos, n),
            Method::Sce => self.sce(n),
            Method::ArceeFusion => {
                if let Some(f) = &self.st.fusion {
                    crate::merge::fusion::combine(
                        f,
                        self.st.row_len,
                        pos,
                        &self.base[..n],
                        &self.models[0][..n],
                        &mut self.result[..n],
                    );
                }
            }
            _ => {
                self.masked_deltas(pos, n);
                if self.tm.method.consensus() {
                    self.sum_agreeing(n);
                } else {
                    self.sum_all(n);
                }
                self.finish_task(n);
            }
        }
        &self.result[..n]
    }

    /// `sum_i w_i x_i`, divided by `sum_i w_i` when `normalize`.
    fn linear(&mut self, n: usize) {
        let acc = &mut self.acc[..n];
        for (x, w) in self.models.iter().zip(&self.weights) {
            for (a, v) in acc.iter_mut().zip(&x[..n]) {
                *a += *v * *w;
            }
        }
        if self.tm.params.normalize {
            acc.iter_mut().for_each(|a| *a /= self.weight_sum);
        }
        self.result[..n].copy_from_slice(acc);
    }

    /// `ca * base + cb * x` with the tensor's SLERP coefficients.
    fn slerp(&mut self, n: usize) {
        let (ca, cb) = self.st.slerp;
        for ((o, b), x) in self.result[..n].iter_mut().zip(&self.base[..n]).zip(&self.models[0][..n]) {
            *o = ca * *b + cb * *x;
        }
    }

    /// `t * mean_i x_i + (1 - t) * base`, `t` per row (or per tensor).
    fn model_stock(&mut self, pos: u64, n: usize) {
        let kf = self.models.len() as f32;
        let acc = &mut self.acc[..n];
        for x in &self.models {
            for (a, v) in acc.iter_mut().zip(&x[..n]) {
                *a += *v;
            }
        }
        for (j, o) in self.result[..n].iter_mut().enumerate() {
            let t = self.st.stock_t[((pos + j as u64) / self.st.row_len) as usize];
            let avg = acc[j] / kf;
            *o = t * avg + (1.0 - t) * self.base[j];
        }
    }

    /// `w = clamp(t / max(|b - x|, 1e-6), 0, 1)`, `w * x + (1 - w) * b`,
    /// NaN carried through the clamps as torch's `clamp` does.
    fn nearswap(&mut self, n: usize) {
        let t = self.tm.params.t as f32;
        for ((o, a), b) in self.result[..n].iter_mut().zip(&self.base[..n]).zip(&self.models[0][..n]) {
            let d = (*a - *b).abs();
            let d = if d < 1e-6 { 1e-6 } else { d };
            let w = t / d;
            // f32::clamp keeps NaN, as torch's clamp does.
            let w = w.clamp(0.0, 1.0);
            *o = w * *b + (1.0 - w) * *a;
        }
    }

    /// ram and ramplus_tl: per element, the deltas above `epsilon` are
    /// counted; a delta only one model has is added whole (times that
    /// model's `lambda`), deltas several have are averaged.
    fn ram(&mut self, n: usize) {
        let eps = self.tm.params.shared.epsilon as f32;
        let lambdas = &self.st.lambdas;
        for j in 0..n {
            let b = self.base[j];
            let mut count = 0u32;
            for x in &self.models {
                count += ((x[j] - b).abs() > eps) as u32;
            }
            let unique = (count == 1) as u8 as f32;
            let overlap = (count > 1) as u8 as f32;
            let div = count.max(1) as f32;
            let mut acc = 0f32;
            for (i, x) in self.models.iter().enumerate() {
                let d = x[j] - b;
                let z = d * ((d.abs() > eps) as u8 as f32);
                let mut own = z * unique;
                if let Some(l) = lambdas.get(i) {
                    own *= *l;
                }
                acc += own + z * overlap / div;
            }
            self.result[j] = b + acc;
        }
    }

    /// SCE: the selected deltas, erased where their sign is not the sign
    /// of their sum, weighted (see `merge::sce`).
    fn sce(&mut self, n: usize) {
        let (Some(cursor), Some(st)) = (self.sce.as_mut(), self.st.sce.as_ref()) else { return };
        let k = self.models.len();
        // The deltas in place of the values, and each element's variance.
        for x in self.models.iter_mut() {
            for (xj, bj) in x[..n].iter_mut().zip(&self.base[..n]) {
                *xj -= *bj;
            }
        }
        let mut bits = [0u32; BLOCK];
        variance_bits(&self.models, n, &mut bits[..n]);
        let mut d = vec![0f32; k];
        for j in 0..n {
            let b = self.base[j];
            for (di, x) in d.iter_mut().zip(&self.models) {
                *di = x[j];
            }
            if !cursor.keeps_bits(bits[j]) {
                d.iter_mut().for_each(|v| *v *= 0.0);
            }
            let sum = d.iter().fold(0f32, |a, v| a + v);
            let majority = if sum >= 0.0 { 1.0 } else { -1.0 };
            let (mut merged, mut div) = (0f32, 0f32);
            for (v, w) in d.iter().zip(&st.weights) {
                let sign = if *v > 0.0 {
                    1.0
                } else if *v < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                let ew = *w * ((sign == majority) as u8 as f32);
                merged += *v * ew;
                div += ew;
            }
            self.result[j] = b + merged / div.max(1e-6);
        }
    }

    /// `sum_i c_i v_i` with the coefficients of the element's group, `v_i`
    /// the delta from the base (added back) when the method has one.
    fn combo(&mut self, pos: u64, n: usize) {
        let Some(c) = &self.st.combo else { return };
        let k = self.models.len();
        let rl = self.st.row_len.max(1);
        for j in 0..n {
            let coef = c.at(pos + j as u64, rl, k);
            let mut acc = 0f32;
            for (x, ci) in self.models.iter().zip(coef) {
                let v = if c.delta { x[j] - self.base[j] } else { x[j] };
                acc += *ci * v;
            }
            self.result[j] = if c.delta { acc + self.base[j] } else { acc };
        }
    }

    /// Turns each model's block into its weighted, masked delta from the
    /// base: `e = w * rescale * ((x - base) * mask)`.
    fn masked_deltas(&mut self, pos: u64, n: usize) {
        let Some(b) = self.inputs.base else { return };
        for (mi, x) in self.models.iter_mut().enumerate() {
            for (v, bj) in x[..n].iter_mut().zip(&self.base[..n]) {
                *v -= *bj;
            }
            let ms = &self.st.models[mi];
            let view = self.inputs.models[mi];
            let mask = &mut self.masks[mi];
            sparsify_block(ms, mask, self.weights[mi], b, view, self.st.row_len, pos, &mut x[..n]);
        }
    }

    /// Sign consensus (TIES): the majority sign is that of `sum_i e_i` (0
    /// counts as +); `acc = sum_i e_i [agrees]`, `div = sum_i w_i [agrees]`
    /// (1 where 0).
    fn sum_agreeing(&mut self, n: usize) {
        let mut sum = [0f32; BLOCK];
        for e in &self.models {
            for (s, v) in sum[..n].iter_mut().zip(&e[..n]) {
                *s += *v;
            }
        }
        let div = &mut self.div[..n];
        div.fill(0.0);
        for (e, w) in self.models.iter().zip(&self.weights) {
            for j in 0..n {
                let majority = if sum[j] >= 0.0 { 1.0 } else { -1.0 };
                let sign = if e[j] > 0.0 {
                    1.0
                } else if e[j] < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                let agree = (sign == majority) as u8 as f32;
                self.acc[j] += e[j] * agree;
                div[j] += *w * agree;
            }
        }
        div.iter_mut().filter(|d| **d == 0.0).for_each(|d| *d = 1.0);
    }

    /// No consensus: `acc = sum_i e_i`, `div = sum_i w_i` (1 where below
    /// 1e-8).
    fn sum_all(&mut self, n: usize) {
        for e in &self.models {
            for (a, v) in self.acc[..n].iter_mut().zip(&e[..n]) {
                *a += *v;
            }
        }
        let div = if self.weight_sum.abs() < 1e-8 { 1.0 } else { self.weight_sum };
        self.div[..n].fill(div);
    }

    /// `acc /= div` when `normalize`, `acc *= lambda`, `out = base + acc`.
    fn finish_task(&mut self, n: usize) {
        let p = &self.tm.params;
        let acc = &mut self.acc[..n];
        if p.normalize {
            acc.iter_mut().zip(&self.div[..n]).for_each(|(a, d)| *a /= *d);
        }
        if p.lambda != 1.0 {
            let lambda = p.lambda as f32;
            acc.iter_mut().for_each(|a| *a *= lambda);
        }
        for ((o, b), a) in self.result[..n].iter_mut().zip(&self.base[..n]).zip(acc.iter()) {
            *o = *b + *a;
        }
    }
}

/// A model's mask as it stands inside a chunk: the mask of its statistics
/// plus, where the mask needs one, a cursor (boundary-equal elements seen,
/// the ranks of the current row).
enum Mask<'s> {
    All,
    Zero,
    /// Multiplied by a mask that keeps nothing (so -0.0 and NaN stay as
    /// IEEE says).
    Nothing,
    Random(f32),
    Ranks {
        rk: &'s RankKeep,
        seen_lo: u64,
        seen_hi: u64,
    },
    Della {
        density: f64,
        epsilon: f64,
        row: u64,
        ranks: Vec<u32>,
        deltas: Vec<f32>,
    },
}

impl<'s> Mask<'s> {
    /// The mask of `ms` for a chunk starting at element `start`.
    fn at(ms: &'s ModelStats, base: View, x: View, start: u64) -> Mask<'s> {
        match &ms.keep {
            Keep::All => Mask::All,
            Keep::Zero => Mask::Zero,
            Keep::None => Mask::Nothing,
            Keep::Random(p) => Mask::Random(*p),
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
                Mask::Ranks { rk, seen_lo, seen_hi }
            }
            Keep::Della { density, epsilon } => Mask::Della {
                density: *density,
                epsilon: *epsilon,
                row: u64::MAX,
                ranks: Vec::new(),
                deltas: Vec::new(),
            },
        }
    }
}

/// Masks and weights model `k`'s deltas `d` (elements from `p`) in place:
/// `e = w * rescale * (d * mask)`, in that order.
#[allow(clippy::too_many_arguments)]
fn sparsify_block(
    ms: &ModelStats,
    mask: &mut Mask,
    weight: f32,
    base: View,
    x: View,
    row_len: u64,
    p: u64,
    d: &mut [f32],
) {
    match mask {
        Mask::All => {}
        Mask::Zero => d.fill(0.0),
        Mask::Nothing => d.iter_mut().for_each(|v| *v *= 0.0),
        Mask::Ranks { rk, seen_lo, seen_hi } => {
            for v in d.iter_mut() {
                let b = v.to_bits() & 0x7fff_ffff;
                let kept = rk.keeps(b, *seen_lo, *seen_hi);
                *seen_lo += (b == rk.lo_val) as u64;
                *seen_hi += (b == rk.hi_val) as u64;
                *v *= kept as u8 as f32;
            }
        }
        Mask::Random(prob) => {
            for (j, v) in d.iter_mut().enumerate() {
                *v *= (rng::uniform(ms.stream, p + j as u64) < *prob) as u8 as f32;
            }
        }
        Mask::Della { density, epsilon, row, ranks, deltas } => {
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
    }
    if let Some(f) = ms.rescale {
        d.iter_mut().for_each(|v| *v *= f);
    }
    d.iter_mut().for_each(|v| *v *= weight);
}
