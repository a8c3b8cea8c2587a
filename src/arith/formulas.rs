//! The chat-vector formulas, as pure functions over byte slices: convert,
//! `chat - pre`, `base + scale * (chat - pre)`, `base + scale * vector`,
//! and the LoRA merge `base + scale * (B @ A)` (see `lowrank`).
//! Operation order is part of the numeric contract: `d = chat - pre;
//! m = scale * d; out = base + m`, each step one f32 operation. Several
//! vectors in one pass (`AddTerms`) continue the same steps vector after
//! vector, in the order given: `acc = base; acc = acc + s_k * d_k`, one
//! rounding to the output dtype at the end.

use super::lowrank::{LowRank, add_low_rank};
use super::{BLOCK, Operand};
use crate::model::dtype::{FloatType, any_nonfinite_portable, bf16_to_f32, decode, encode};

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
    /// `out = base + s_1 * v_1 + s_2 * v_2 + ...` (apply with several
    /// vectors), added left to right in f32; `terms` are the vectors that
    /// have rows here (a vector whose vocabulary lacks a row adds nothing
    /// to it).
    AddTerms { base: Operand<'a>, terms: &'a [Term<'a>] },
}

/// One vector of `Segment::AddTerms`: a stored vector `x`, or `x - pre`
/// (a chat model minus its pretrained model), times `scale`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Term<'a> {
    pub x: Operand<'a>,
    pub pre: Option<Operand<'a>>,
    pub scale: f32,
}

impl<'a> Segment<'a> {
    /// The operands, in argument order.
    pub(crate) fn operands(&self) -> Vec<Operand<'a>> {
        match *self {
            Segment::Convert(a) => vec![a],
            Segment::Diff(c, p) => vec![c, p],
            Segment::AddDiff(b, c, p, _) => vec![b, c, p],
            Segment::AddScaled(b, v, _) => vec![b, v],
            Segment::AddLowRank { base, factors, .. } => vec![base, factors.a, factors.b],
            Segment::AddTerms { base, terms } => std::iter::once(base)
                .chain(terms.iter().flat_map(|t| std::iter::once(t.x).chain(t.pre)))
                .collect(),
        }
    }

    /// Computes the segment into `out` (dtype `out_ty`) on the CPU.
    pub(crate) fn compute(&self, out_ty: FloatType, out: &mut [u8]) {
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
            Segment::AddTerms { base, terms } => {
                add_terms(out_ty, out, base, terms, 0);
            }
        }
    }
}

/// `Segment::AddTerms` into `out`, with what rounding did to the
/// vectors' change (see `Rounding`; the segment's first element is the
/// tensor's element `first`): compiled for AVX2 where the CPU has it (the
/// same f32 steps, so the same bytes).
fn add_terms(
    out_ty: FloatType,
    out: &mut [u8],
    base: Operand<'_>,
    terms: &[Term<'_>],
    first: u64,
) -> Rounding {
    #[cfg(target_arch = "x86_64")]
    if crate::model::dtype::avx2() {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { add_terms_avx2(out_ty, out, base, terms, first) };
    }
    add_terms_portable(out_ty, out, base, terms, first)
}

/// `add_terms` compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn add_terms_avx2(
    out_ty: FloatType,
    out: &mut [u8],
    base: Operand<'_>,
    terms: &[Term<'_>],
    first: u64,
) -> Rounding {
    add_terms_portable(out_ty, out, base, terms, first)
}

/// `add_terms` in plain Rust, inlined into each compiled copy: per block,
/// the base decoded into the sum, then each vector's `s * d` added to it
/// in order, then one encode. A sampled element is moved when some vector
/// with a nonzero scale has a nonzero `d` there, swallowed when moved and
/// the output's bytes are the base's (counted only when the output has the
/// base's dtype, as for one vector).
#[inline(always)]
fn add_terms_portable(
    out_ty: FloatType,
    out: &mut [u8],
    base: Operand<'_>,
    terms: &[Term<'_>],
    first: u64,
) -> Rounding {
    let os = out_ty.size();
    let n = out.len() / os;
    let count = base.ty == out_ty;
    let (mut acc, mut d, mut q) = ([0f32; BLOCK], [0f32; BLOCK], [0f32; BLOCK]);
    // Per sampled element of the block, whether a vector moved it.
    let mut moved = [false; BLOCK / ROUNDING_STRIDE as usize + 1];
    let mut r = Rounding::default();
    let mut i = 0;
    while i < n {
        let m = BLOCK.min(n - i);
        let at = first + i as u64;
        let start = ((ROUNDING_STRIDE - at % ROUNDING_STRIDE) % ROUNDING_STRIDE) as usize;
        let sampled = (start..m).step_by(ROUNDING_STRIDE as usize);
        moved.fill(false);
        decode_at(base, i, &mut acc[..m]);
        for t in terms {
            if t.pre.is_none() && t.x.ty == FloatType::BF16 {
                // A stored bf16 vector (what extract writes by default):
                // widened inside the sum, the same exact f32 as `decode`,
                // without a pass through `d` (a two-vector apply's CPU
                // went from 1.16x to 1.11x a one-vector apply's).
                let xb = &t.x.bytes[i * 2..(i + m) * 2];
                for (a, c) in acc[..m].iter_mut().zip(xb.chunks_exact(2)) {
                    let mj = t.scale * bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
                    *a += mj;
                }
                if count && t.scale != 0.0 {
                    for (k, j) in sampled.clone().enumerate() {
                        // Not zero (either sign): NaN counts, as `d != 0` does.
                        moved[k] |= u16::from_le_bytes([xb[2 * j], xb[2 * j + 1]]) & 0x7fff != 0;
                    }
                }
                continue;
            }
            vector_at(t.x, t.pre, i, &mut d[..m], &mut q[..m]);
            for j in 0..m {
                let mj = t.scale * d[j];
                acc[j] += mj;
            }
            if count && t.scale != 0.0 {
                for (k, j) in sampled.clone().enumerate() {
                    moved[k] |= d[j] != 0.0;
                }
            }
        }
        let block = &mut out[i * os..(i + m) * os];
        encode(out_ty, &acc[..m], block);
        if count {
            let base_bytes = &base.bytes[i * os..(i + m) * os];
            for (k, j) in sampled.enumerate() {
                r.moved += u64::from(moved[k]);
                r.swallowed += u64::from(moved[k] && same_element(base_bytes, block, j, os));
            }
        }
        i += m;
    }
    r
}

/// Every `ROUNDING_STRIDE`-th element of a tensor (by its index in the
/// tensor, so the sample does not depend on chunking or threads) is
/// counted for `Rounding`: counting every element cost a fifth of a cached
/// apply's CPU time, this costs about a sixteenth of that.
pub(crate) const ROUNDING_STRIDE: u64 = 16;

/// Counts the sampled elements of one block: `d` the vector (chat -
/// pretrained, or a stored vector, in f32), `base` and `out` the base's and
/// the output's bytes (one dtype of `size` bytes), `at` the tensor index of
/// the block's first element. Moved: `d` is not zero; kept: moved, and the
/// output's bytes are the base's.
#[inline(always)]
fn count_sample(d: &[f32], base: &[u8], out: &[u8], size: usize, at: u64) -> Rounding {
    let mut r = Rounding::default();
    let first = ((ROUNDING_STRIDE - at % ROUNDING_STRIDE) % ROUNDING_STRIDE) as usize;
    for j in (first..d.len()).step_by(ROUNDING_STRIDE as usize) {
        let moved = d[j] != 0.0;
        r.moved += u64::from(moved);
        r.swallowed += u64::from(moved && same_element(base, out, j, size));
    }
    r
}

/// Whether element `j` (of `size` bytes) of `a` and `b` has the same bytes:
/// a comparison of one 2- or 4-byte word, where a slice comparison called
/// `memcmp` for each sampled element (3% of a cached apply's CPU).
#[inline(always)]
fn same_element(a: &[u8], b: &[u8], j: usize, size: usize) -> bool {
    let at = j * size;
    match size {
        2 => u16::from_ne_bytes([a[at], a[at + 1]]) == u16::from_ne_bytes([b[at], b[at + 1]]),
        4 => {
            u32::from_ne_bytes([a[at], a[at + 1], a[at + 2], a[at + 3]])
                == u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
        }
        _ => a[at..at + size] == b[at..at + size],
    }
}

/// What the rounding to the output dtype did to a chat vector's change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Rounding {
    /// Sampled elements (every `ROUNDING_STRIDE`-th) the vector changes:
    /// chat - pretrained (or the stored vector) is not zero in f32.
    pub moved: u64,
    /// Of those, elements whose output equals the base's bytes: the change
    /// was under half a unit of the output's precision, and rounding took
    /// it away.
    pub swallowed: u64,
}

impl std::ops::AddAssign for Rounding {
    fn add_assign(&mut self, o: Rounding) {
        self.moved += o.moved;
        self.swallowed += o.swallowed;
    }
}

impl<'a> Segment<'a> {
    /// Counts, from the computed `out` (dtype `out_ty`; its first element
    /// is the tensor's element `first`), the sampled elements the vector
    /// changes and those whose change rounding took away, as
    /// `compute_scales` counts while it computes (the GPU path, whose
    /// outputs come back as bytes, counts here). Only a chat
    /// vector's segments whose output has the base's dtype are counted
    /// (elsewhere every element is re-encoded anyway).
    pub(crate) fn rounding(&self, out_ty: FloatType, out: &[u8], first: u64) -> Rounding {
        let Some((base, x, pre)) = self.counted(out_ty) else { return Rounding::default() };
        let os = out_ty.size();
        let n = out.len() / os;
        // Only the sampled elements are decoded: this runs on the host for
        // every GPU job, where decoding all of them cost as much as the
        // CPU's own decode.
        let one = |op: Operand<'_>, j: usize| {
            let mut v = [0f32];
            decode_at(op, j, &mut v);
            v[0]
        };
        let start = ((ROUNDING_STRIDE - first % ROUNDING_STRIDE) % ROUNDING_STRIDE) as usize;
        let mut r = Rounding::default();
        for j in (start..n).step_by(ROUNDING_STRIDE as usize) {
            let d = one(x, j) - pre.map_or(0.0, |p| one(p, j));
            let moved = d != 0.0;
            r.moved += u64::from(moved);
            r.swallowed += u64::from(moved && same_element(base.bytes, out, j, os));
        }
        r
    }

    /// The base, vector (or chat) and pretrained operands of a segment
    /// whose rounding is counted: a chat vector's, with a nonzero scale,
    /// whose output has the base's dtype.
    fn counted(&self, out_ty: FloatType) -> Option<(Operand<'a>, Operand<'a>, Option<Operand<'a>>)> {
        let (base, x, pre, scale) = match *self {
            Segment::AddDiff(b, c, p, s) => (b, c, Some(p), s),
            Segment::AddScaled(b, v, s) => (b, v, None, s),
            _ => return None,
        };
        (base.ty == out_ty && scale != 0.0).then_some((base, x, pre))
    }

    /// The scale the segment multiplies the vector by, if it has one.
    #[cfg(test)]
    pub(crate) fn scale(&self) -> Option<f32> {
        match *self {
            Segment::AddDiff(.., s) | Segment::AddScaled(.., s) | Segment::AddLowRank { scale: s, .. } => {
                Some(s)
            }
            Segment::Convert(_) | Segment::Diff(..) | Segment::AddTerms { .. } => None,
        }
    }

    /// The same segment with another scale (a sweep's candidate); segments
    /// without a scale are returned as they are.
    pub(crate) fn with_scale(self, s: f32) -> Segment<'a> {
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
    /// that scale (the same f32 steps in the same order). Adds to
    /// `rounding[k]` what rounding did to output `k` (see `rounding`; the
    /// segment's first element is the tensor's element `first`), counted
    /// on the decoded vector at hand, and sets `nonfinite[k]` when output
    /// `k` holds a NaN or infinity (each block checked as it is encoded,
    /// while in cache: a separate pass over the outputs cost 6% of a
    /// sweep's CPU).
    pub(crate) fn compute_scales(
        &self,
        out_ty: FloatType,
        outs: &mut [&mut [u8]],
        scales: &[f32],
        rounding: &mut [Rounding],
        nonfinite: &mut [bool],
        first: u64,
    ) {
        #[cfg(target_arch = "x86_64")]
        if crate::model::dtype::avx2() {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { self.compute_scales_avx2(out_ty, outs, scales, rounding, nonfinite, first) };
        }
        self.compute_scales_portable(out_ty, outs, scales, rounding, nonfinite, first)
    }

    /// `compute_scales` compiled for AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn compute_scales_avx2(
        &self,
        out_ty: FloatType,
        outs: &mut [&mut [u8]],
        scales: &[f32],
        rounding: &mut [Rounding],
        nonfinite: &mut [bool],
        first: u64,
    ) {
        self.compute_scales_portable(out_ty, outs, scales, rounding, nonfinite, first)
    }

    /// `compute_scales` in plain Rust, inlined into each compiled copy.
    #[inline(always)]
    fn compute_scales_portable(
        &self,
        out_ty: FloatType,
        outs: &mut [&mut [u8]],
        scales: &[f32],
        rounding: &mut [Rounding],
        nonfinite: &mut [bool],
        first: u64,
    ) {
        let os = out_ty.size();
        let n = outs.first().map_or(0, |o| o.len() / os);
        if let Segment::AddTerms { base, terms } = *self {
            // Several vectors carry their own scales: one output.
            if let (Some(o), Some(r), Some(bad)) =
                (outs.first_mut(), rounding.first_mut(), nonfinite.first_mut())
            {
                *r += add_terms(out_ty, o, base, terms, first);
                *bad |= any_nonfinite_portable(out_ty, o);
            }
            return;
        }
        let (base, vector) = match *self {
            Segment::AddDiff(b, c, p, _) => (b, Some((c, Some(p)))),
            Segment::AddScaled(b, v, _) => (b, Some((v, None))),
            _ => (self.operands()[0], None),
        };
        let Some((x, pre)) = vector else {
            for ((o, s), bad) in outs.iter_mut().zip(scales).zip(nonfinite.iter_mut()) {
                self.with_scale(*s).compute(out_ty, o);
                *bad |= any_nonfinite_portable(out_ty, o);
            }
            return;
        };
        let (mut b, mut d, mut q, mut res) = ([0f32; BLOCK], [0f32; BLOCK], [0f32; BLOCK], [0f32; BLOCK]);
        let count = base.ty == out_ty;
        let mut i = 0;
        while i < n {
            let m = BLOCK.min(n - i);
            // Plain calls, not a closure: a closure would not be compiled
            // with the caller's AVX2.
            decode_at(base, i, &mut b[..m]);
            vector_at(x, pre, i, &mut d[..m], &mut q[..m]);
            for (((o, &s), r), bad) in
                outs.iter_mut().zip(scales).zip(rounding.iter_mut()).zip(nonfinite.iter_mut())
            {
                for j in 0..m {
                    let mj = s * d[j];
                    res[j] = b[j] + mj;
                }
                let block = &mut o[i * os..(i + m) * os];
                encode(out_ty, &res[..m], block);
                *bad |= any_nonfinite_portable(out_ty, block);
                if count && s != 0.0 {
                    *r +=
                        count_sample(&d[..m], &base.bytes[i * os..(i + m) * os], block, os, first + i as u64);
                }
            }
            i += m;
        }
    }
}

/// The vector's elements from `i` on into `d`: the stored vector `x`, or
/// `x - pre` (the chat model minus the pretrained one, `q` holding the
/// latter), one f32 subtraction each as the formula has it.
#[inline(always)]
fn vector_at(x: Operand<'_>, pre: Option<Operand<'_>>, i: usize, d: &mut [f32], q: &mut [f32]) {
    decode_at(x, i, d);
    if let Some(p) = pre {
        decode_at(p, i, q);
        for (dj, pj) in d.iter_mut().zip(q.iter()) {
            *dj -= *pj;
        }
    }
}

/// Decodes `buf.len()` elements of `op` from element `i` on.
#[inline(always)]
fn decode_at(op: Operand<'_>, i: usize, buf: &mut [f32]) {
    let size = op.ty.size();
    decode(op.ty, &op.bytes[i * size..(i + buf.len()) * size], buf)
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
        let n = 30000;
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
            seg.compute_scales(bf, &mut outs, &scales, &mut [Rounding::default(); 3], &mut [false; 3], 0);
            for (k, s) in scales.iter().enumerate() {
                let mut one = vec![0u8; n * 2];
                seg.with_scale(*s).compute(bf, &mut one);
                assert_eq!(bufs[k], one, "scale {s}");
            }
        }
    }

    /// The pass compiled for AVX2 (taken on this machine when it has it)
    /// gives the bytes of the baseline build's `compute`, for every bf16
    /// and f16 bit pattern as the base and random patterns (NaN, infinities,
    /// subnormals, rounding ties included) as the other operands.
    #[test]
    fn the_avx2_pass_equals_the_baseline_bytes_for_every_pattern() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 16) as u32
        };
        for ty in [FloatType::BF16, FloatType::F16, FloatType::F32] {
            let n = 65536 + 7;
            let size = ty.size();
            let mut pattern = |k: usize| -> Vec<u8> {
                (0..n)
                    .flat_map(|i| {
                        let bits = if k == 0 && size == 2 { i as u32 } else { next() };
                        bits.to_le_bytes()[..size].to_vec()
                    })
                    .collect()
            };
            let (b, c, p) = (pattern(0), pattern(1), pattern(2));
            let scales = [0.5f32, 1.0, -0.25, 3.0];
            for seg in [
                Segment::AddDiff(op(ty, &b), op(ty, &c), op(ty, &p), 0.0),
                Segment::AddScaled(op(ty, &b), op(ty, &c), 0.0),
            ] {
                let mut bufs = vec![vec![0u8; n * size]; scales.len()];
                let mut outs: Vec<&mut [u8]> = bufs.iter_mut().map(|v| v.as_mut_slice()).collect();
                seg.compute_scales(
                    ty,
                    &mut outs,
                    &scales,
                    &mut vec![Rounding::default(); scales.len()],
                    &mut vec![false; scales.len()],
                    0,
                );
                for (k, s) in scales.iter().enumerate() {
                    let mut one = vec![0u8; n * size];
                    seg.with_scale(*s).compute(ty, &mut one);
                    assert!(bufs[k] == one, "{ty:?} scale {s}");
                }
            }
        }
    }

    /// Several vectors: the AVX2 copy gives the baseline build's bytes
    /// and rounding counts, and a stored bf16 vector (summed without a
    /// decoded block) gives what the same values as f32 give through the
    /// general path, for every bf16 pattern as the base and random
    /// patterns (NaN, infinities, zeros of both signs) elsewhere; a NaN
    /// output is a NaN on both, its payload not compared.
    #[test]
    fn several_vectors_give_the_same_bytes_however_compiled_and_stored() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 16) as u16
        };
        let n = 65536 + 5;
        let bf = FloatType::BF16;
        let base: Vec<u8> = (0..n).flat_map(|i| (i as u16).to_le_bytes()).collect();
        let mut pattern = || -> Vec<u8> {
            (0..n)
                .flat_map(|i| match i % 13 {
                    0 => 0u16.to_le_bytes(),
                    1 => 0x8000u16.to_le_bytes(),
                    _ => next().to_le_bytes(),
                })
                .collect()
        };
        let (x, chat, pre) = (pattern(), pattern(), pattern());
        let mut wide = vec![0f32; n];
        decode(bf, &x, &mut wide);
        let x32: Vec<u8> = wide.iter().flat_map(|v| v.to_le_bytes()).collect();
        let terms = |x: Operand<'static>| {
            [
                Term { x, pre: None, scale: 0.5 },
                Term { x: op(bf, leak(&chat)), pre: Some(op(bf, leak(&pre))), scale: -1.25 },
            ]
        };
        let (narrow, widened) = (terms(op(bf, leak(&x))), terms(op(FloatType::F32, leak(&x32))));
        let b = op(bf, leak(&base));
        let (mut fast, mut slow) = (vec![0u8; n * 2], vec![0u8; n * 2]);
        // Starting at element 3 of the tensor: the sample follows its indices.
        let r_fast = add_terms(bf, &mut fast, b, &narrow, 3);
        let r_slow = add_terms_portable(bf, &mut slow, b, &widened, 3);
        // Where two NaNs meet, which payload survives an addition is the
        // compiler's choice (it may swap the operands): any NaN is a NaN.
        let nan = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]) & 0x7fff > 0x7f80;
        let diff: Vec<(usize, [u8; 2], [u8; 2])> = (0..n)
            .filter(|i| {
                let (f, s) = (&fast[2 * i..2 * i + 2], &slow[2 * i..2 * i + 2]);
                f != s && !(nan(f) && nan(s))
            })
            .map(|i| (i, [fast[2 * i], fast[2 * i + 1]], [slow[2 * i], slow[2 * i + 1]]))
            .take(5)
            .collect();
        assert!(
            diff.is_empty(),
            "bytes differ: {diff:?} x {:?}",
            diff.first().map(|d| &x[2 * d.0..2 * d.0 + 2])
        );
        assert_eq!(r_fast, r_slow);
        assert!(r_fast.moved > 0 && r_fast.swallowed > 0, "{r_fast:?}");
        // And each element is the documented steps on the decoded values.
        let mut cv = vec![0f32; n];
        let mut pv = vec![0f32; n];
        let mut bv = vec![0f32; n];
        decode(bf, &chat, &mut cv);
        decode(bf, &pre, &mut pv);
        decode(bf, &base, &mut bv);
        for i in (0..n).step_by(7) {
            let mut acc = bv[i];
            let m1 = 0.5 * wide[i];
            acc += m1;
            let d2 = cv[i] - pv[i];
            let m2 = -1.25 * d2;
            acc += m2;
            let mut want = [0u8; 2];
            encode(bf, &[acc], &mut want);
            let got = &fast[2 * i..2 * i + 2];
            assert!(got == want || (nan(got) && nan(&want)), "element {i}");
        }
    }

    /// A test buffer kept for the test's whole run.
    fn leak(v: &[u8]) -> &'static [u8] {
        Box::leak(v.to_vec().into_boxed_slice())
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

    /// The count made while computing (CPU) equals the count made from the
    /// output bytes afterwards (GPU path), and both equal a plain count of
    /// the sampled elements written here, for bf16 and f16 chat vectors
    /// and an f32 stored vector, with zeros of both signs among the inputs.
    #[test]
    fn rounding_counts_agree_however_they_are_made() {
        let n = 30000;
        let val = |seed: u32, i: usize| -> f32 {
            let h = (i as u32).wrapping_mul(2654435761).wrapping_add(seed.wrapping_mul(40503));
            match h % 11 {
                0 => 0.0,
                1 => -0.0,
                _ => ((h >> 8) % 2000) as f32 / 1000.0 - 1.0,
            }
        };
        for ty in [FloatType::BF16, FloatType::F16] {
            let enc = |seed: u32, t: FloatType| {
                let v: Vec<f32> = (0..n).map(|i| val(seed, i)).collect();
                let mut b = vec![0u8; n * t.size()];
                encode(t, &v, &mut b);
                b
            };
            let (base, chat, pre, vector) = (enc(1, ty), enc(2, ty), enc(3, ty), enc(4, FloatType::F32));
            let segs = [
                Segment::AddDiff(op(ty, &base), op(ty, &chat), op(ty, &pre), 1.0),
                Segment::AddScaled(op(ty, &base), op(FloatType::F32, &vector), 1.0),
            ];
            for seg in segs {
                let scales = [0.001f32, 0.5, 0.0];
                let mut bufs = vec![vec![0u8; n * ty.size()]; 3];
                let mut outs: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
                let mut fused = [Rounding::default(); 3];
                // The segment starts at the tensor's element 5: the sample
                // follows the tensor's indices, not the slice's.
                let first = 5u64;
                seg.compute_scales(ty, &mut outs, &scales, &mut fused, &mut [false; 3], first);
                for (k, s) in scales.iter().enumerate() {
                    let from_bytes = seg.with_scale(*s).rounding(ty, &bufs[k], first);
                    assert_eq!(fused[k], from_bytes, "{ty:?} scale {s}");
                    // By hand: moved when the stored values differ (not
                    // both zeros), kept when the output's bytes are the base's.
                    let size = ty.size();
                    let mut want = Rounding::default();
                    for i in (0..n).filter(|i| (*i as u64 + first).is_multiple_of(ROUNDING_STRIDE)) {
                        let moved = match seg {
                            Segment::AddDiff(..) => {
                                let (cb, pb) = (&chat[i * size..][..size], &pre[i * size..][..size]);
                                cb != pb && !(val(2, i) == 0.0 && val(3, i) == 0.0)
                            }
                            _ => val(4, i) != 0.0,
                        };
                        if *s != 0.0 && moved {
                            want.moved += 1;
                            want.swallowed +=
                                u64::from(bufs[k][i * size..][..size] == base[i * size..][..size]);
                        }
                    }
                    assert_eq!(fused[k], want, "{ty:?} scale {s}");
                }
                assert!(fused[0].swallowed > fused[1].swallowed, "a smaller scale loses more: {fused:?}");
            }
        }
    }
}
