//! The chat-vector formulas, as pure functions over byte slices: convert,
//! `chat - pre`, `base + scale * (chat - pre)`, `base + scale * vector`,
//! and the LoRA merge `base + scale * (B @ A)` (see `lowrank`).
//! Operation order is part of the numeric contract: `d = chat - pre;
//! m = scale * d; out = base + m`, each step one f32 operation.

use super::lowrank::{LowRank, add_low_rank};
use super::{BLOCK, Operand};
use crate::model::dtype::{FloatType, decode, encode};

/// Runs `f` element-wise over `N` operands into `out` (dtype `out_ty`).
#[inline(always)]
fn map<const N: usize>(
    out_ty: FloatType,
    out: &mut [u8],
    ins: [Operand<'_>; N],
    f: impl Fn([f32; N]) -> f32,
) {
    let n = out.len() / out_ty.size();
    let mut bufs = [[0f32; BLOCK]; N];
    let mut res = [0f32; BLOCK];
    let mut i = 0;
    while i < n {
        let m = BLOCK.min(n - i);
        for (buf, op) in bufs.iter_mut().zip(ins.iter()) {
            decode(op.ty, &op.bytes[i * op.ty.size()..(i + m) * op.ty.size()], &mut buf[..m]);
        }
        for (j, r) in res[..m].iter_mut().enumerate() {
            *r = f(std::array::from_fn(|k| bufs[k][j]));
        }
        encode(out_ty, &res[..m], &mut out[i * out_ty.size()..(i + m) * out_ty.size()]);
        i += m;
    }
}

/// One run of a converted or chat-vector output's elements with its
/// operands, each sliced to the run: what one call computes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Segment<'a> {
    /// `out = src`, re-encoded.
    Convert(Operand<'a>),
    /// `out = chat - pre` (extract).
    Diff(Operand<'a>, Operand<'a>),
    /// `out = base + scale * (chat - pre)` (apply, streaming form).
    AddDiff(Operand<'a>, Operand<'a>, Operand<'a>, f32),
    /// `out = base + scale * vector` (apply, stored vector). With an f32
    /// vector from `Diff`, this equals `AddDiff` bit for bit.
    AddScaled(Operand<'a>, Operand<'a>, f32),
    /// `out = base + scale * (P @ Q)` (a LoRA merge): `base` sliced to the
    /// run, the factors whole, `first` the run's first element.
    AddLowRank { base: Operand<'a>, factors: LowRank<'a>, first: u64, scale: f32 },
}

impl<'a> Segment<'a> {
    /// The operands, in argument order.
    pub fn operands(&self) -> Vec<Operand<'a>> {
        match *self {
            Segment::Convert(a) => vec![a],
            Segment::Diff(c, p) => vec![c, p],
            Segment::AddDiff(b, c, p, _) => vec![b, c, p],
            Segment::AddScaled(b, v, _) => vec![b, v],
            Segment::AddLowRank { base, factors, .. } => vec![base, factors.a, factors.b],
        }
    }

    /// Computes the segment into `out` (dtype `out_ty`) on the CPU.
    pub fn compute(&self, out_ty: FloatType, out: &mut [u8]) {
        match *self {
            Segment::Convert(x) => map(out_ty, out, [x], |[x]| x),
            Segment::Diff(c, p) => map(out_ty, out, [c, p], |[c, p]| c - p),
            Segment::AddDiff(b, c, p, scale) => map(out_ty, out, [b, c, p], |[b, c, p]| {
                let d = c - p;
                let m = scale * d;
                b + m
            }),
            Segment::AddScaled(b, v, scale) => map(out_ty, out, [b, v], |[b, v]| {
                let m = scale * v;
                b + m
            }),
            Segment::AddLowRank { base, factors, first, scale } => {
                add_low_rank(out_ty, out, base, &factors, first, scale)
            }
        }
    }
}

impl<'a> Segment<'a> {
    /// The same segment with another scale (a sweep's candidate); segments
    /// without a scale are returned as they are.
    pub fn with_scale(self, s: f32) -> Segment<'a> {
        match self {
            Segment::AddDiff(b, c, p, _) => Segment::AddDiff(b, c, p, s),
            Segment::AddScaled(b, v, _) => Segment::AddScaled(b, v, s),
            Segment::AddLowRank { base, factors, first, .. } => {
                Segment::AddLowRank { base, factors, first, scale: s }
            }
            other => other,
        }
    }

    /// Computes the segment once per scale in `scales`, into `outs[k]`,
    /// decoding the operands once: each output's bytes equal `compute` with
    /// that scale (the same f32 steps in the same order).
    pub fn compute_scales(&self, out_ty: FloatType, outs: &mut [&mut [u8]], scales: &[f32]) {
        let os = out_ty.size();
        let n = outs.first().map_or(0, |o| o.len() / os);
        let (base, vector) = match *self {
            Segment::AddDiff(b, c, p, _) => (b, Some((c, Some(p)))),
            Segment::AddScaled(b, v, _) => (b, Some((v, None))),
            _ => (self.operands()[0], None),
        };
        let Some((x, pre)) = vector else {
            for (o, s) in outs.iter_mut().zip(scales) {
                self.with_scale(*s).compute(out_ty, o);
            }
            return;
        };
        let (mut b, mut d, mut q, mut res) = ([0f32; BLOCK], [0f32; BLOCK], [0f32; BLOCK], [0f32; BLOCK]);
        let mut i = 0;
        while i < n {
            let m = BLOCK.min(n - i);
            let dec = |op: Operand<'_>, buf: &mut [f32]| {
                decode(op.ty, &op.bytes[i * op.ty.size()..(i + m) * op.ty.size()], buf)
            };
            dec(base, &mut b[..m]);
            dec(x, &mut d[..m]);
            if let Some(p) = pre {
                dec(p, &mut q[..m]);
                for (dj, pj) in d[..m].iter_mut().zip(&q[..m]) {
                    *dj -= *pj;
                }
            }
            for (o, &s) in outs.iter_mut().zip(scales) {
                for j in 0..m {
                    let mj = s * d[j];
                    res[j] = b[j] + mj;
                }
                encode(out_ty, &res[..m], &mut o[i * os..(i + m) * os]);
            }
            i += m;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16_bytes(v: &[f32]) -> Vec<u8> {
        let mut b = vec![0u8; v.len() * 2];
        encode(FloatType::BF16, v, &mut b);
        b
    }

    fn op(ty: FloatType, x: &[u8]) -> Operand<'_> {
        Operand { ty, bytes: x }
    }

    #[test]
    fn stored_f32_vector_equals_streaming() {
        let n = 3000;
        let base: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let chat: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
        let pre: Vec<f32> = (0..n).map(|i| (i as f32 * 0.05).sin() * 0.9).collect();
        let (b, c, p) = (bf16_bytes(&base), bf16_bytes(&chat), bf16_bytes(&pre));
        let bf = FloatType::BF16;
        let mut v = vec![0u8; n * 4];
        Segment::Diff(op(bf, &c), op(bf, &p)).compute(FloatType::F32, &mut v);
        let mut a = vec![0u8; n * 2];
        Segment::AddDiff(op(bf, &b), op(bf, &c), op(bf, &p), 0.7).compute(bf, &mut a);
        let mut s = vec![0u8; n * 2];
        Segment::AddScaled(op(bf, &b), op(FloatType::F32, &v), 0.7).compute(bf, &mut s);
        assert_eq!(a, s);
    }

    #[test]
    fn several_scales_in_one_pass_equal_one_compute_each() {
        let n = 2500;
        let mk = |k: f32| bf16_bytes(&(0..n).map(|i| (i as f32 * k).sin()).collect::<Vec<_>>());
        let (b, c, p) = (mk(0.37), mk(0.11), mk(0.05));
        let bf = FloatType::BF16;
        let scales = [0.5f32, 1.0, -0.25];
        for seg in [
            Segment::AddDiff(op(bf, &b), op(bf, &c), op(bf, &p), 0.0),
            Segment::AddScaled(op(bf, &b), op(bf, &c), 0.0),
            Segment::Convert(op(bf, &b)),
        ] {
            let mut bufs = vec![vec![0u8; n * 2]; 3];
            let mut outs: Vec<&mut [u8]> = bufs.iter_mut().map(|v| v.as_mut_slice()).collect();
            seg.compute_scales(bf, &mut outs, &scales);
            for (k, s) in scales.iter().enumerate() {
                let mut one = vec![0u8; n * 2];
                seg.with_scale(*s).compute(bf, &mut one);
                assert_eq!(bufs[k], one, "scale {s}");
            }
        }
    }

    #[test]
    fn add_diff_is_the_documented_f32_order() {
        // Checked against f64: each step rounded to f32 separately.
        let (b, c, p, s) = (0.3f32, 1.7f32, -0.9f32, 0.35f32);
        let want = (b as f64 + (s as f64 * ((c - p) as f64)) as f32 as f64) as f32;
        let enc = |x: f32| x.to_le_bytes().to_vec();
        let (bb, cb, pb) = (enc(b), enc(c), enc(p));
        let f = FloatType::F32;
        let mut out = vec![0u8; 4];
        Segment::AddDiff(op(f, &bb), op(f, &cb), op(f, &pb), s).compute(f, &mut out);
        assert_eq!(f32::from_le_bytes(out.try_into().unwrap()).to_bits(), want.to_bits());
    }
}
