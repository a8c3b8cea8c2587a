//! The element-wise arithmetic of chat vectors, as pure functions over byte
//! slices of any of the three float dtypes.
//!
//! Each function decodes a block of every operand to f32 (exact), applies the
//! formula in f32 in the documented order, and encodes the block once
//! (round-to-nearest-even). Rust never contracts `a * b + c` into a fused
//! multiply-add unless asked to (`mul_add`), so the result is the same on
//! every CPU, and the CUDA kernels reproduce it with `__fmul_rn` / `__fadd_rn`.
//! Blocks are independent, so the result does not depend on how a tensor is
//! chunked or on how many threads run.

use crate::dtype::{FloatType, decode, encode};
use crate::embeddings::RowRun;
use std::ops::Range;

use crate::plan::{Formula, Op, Plan, RowSrc, UnionRows};

/// Elements per block: small enough for the stack and L1, large enough to
/// amortize the dtype dispatch.
pub const BLOCK: usize = 1024;

/// A little-endian input slice and its dtype.
#[derive(Clone, Copy, Debug)]
pub struct Operand<'a> {
    pub ty: FloatType,
    pub bytes: &'a [u8],
}

impl<'a> Operand<'a> {
    /// Elements `start..start+len` of this operand.
    pub fn slice(self, start: usize, len: usize) -> Operand<'a> {
        let s = self.ty.size();
        Operand { ty: self.ty, bytes: &self.bytes[start * s..(start + len) * s] }
    }

    /// Decodes elements `start..start + out.len()` into `out`.
    #[inline]
    pub fn decode_at(self, start: u64, out: &mut [f32]) {
        let s = self.ty.size();
        let a = start as usize * s;
        decode(self.ty, &self.bytes[a..a + out.len() * s], out);
    }
}

/// A merged model's tensor seen in the base's element positions: directly
/// when the shapes match, else (a vocabulary matrix) with the model's rows
/// placed at the base rows `runs` names and the base's own rows elsewhere,
/// so rows for tokens the model lacks have a zero delta.
#[derive(Clone, Copy)]
pub enum View<'a> {
    Direct(Operand<'a>),
    Rows {
        model: Operand<'a>,
        fill: Operand<'a>,
        runs: &'a [RowRun],
        row_len: u64,
    },
    /// Input `which` of a union-vocabulary matrix, row by row.
    Table {
        plan: &'a Plan,
        rows: &'a UnionRows,
        which: usize,
    },
}

impl View<'_> {
    /// Decodes base positions `start..start + out.len()` into `out`.
    pub fn decode_at(self, start: u64, out: &mut [f32]) {
        let (model, fill, runs, l) = match self {
            View::Direct(op) => return op.decode_at(start, out),
            View::Rows { model, fill, runs, row_len } => (model, fill, runs, row_len),
            View::Table { plan, rows, which } => return decode_table(plan, rows, which, start, out),
        };
        let end = start + out.len() as u64;
        let mut p = start;
        let mut ri = runs.partition_point(|r| (r.base_row + r.rows) * l <= p);
        while p < end {
            let at = (p - start) as usize;
            match runs.get(ri) {
                Some(r) if r.base_row * l <= p => {
                    let stop = ((r.base_row + r.rows) * l).min(end);
                    let from = r.vector_row * l + (p - r.base_row * l);
                    model.decode_at(from, &mut out[at..at + (stop - p) as usize]);
                    p = stop;
                    ri += 1;
                }
                next => {
                    let stop = next.map_or(end, |r| (r.base_row * l).min(end));
                    fill.decode_at(p, &mut out[at..at + (stop - p) as usize]);
                    p = stop;
                }
            }
        }
    }
}

/// `View::Table::decode_at`: each output row from its source row, or the
/// mean of several (summed from 0 in input order, then divided, in f32).
fn decode_table(plan: &Plan, u: &UnionRows, which: usize, start: u64, out: &mut [f32]) {
    let l = u.row_len;
    let table = &u.tables[which];
    let end = start + out.len() as u64;
    let mut p = start;
    while p < end {
        let row = p / l;
        let stop = ((row + 1) * l).min(end);
        let seg = &mut out[(p - start) as usize..(stop - start) as usize];
        let off = p - row * l;
        match table[row as usize] {
            RowSrc::Row { source, row: r } => plan.operand(u.sources[source]).decode_at(r * l + off, seg),
            RowSrc::Mean(i) => {
                let donors = &u.means[i];
                seg.fill(0.0);
                let mut tmp = [0f32; BLOCK];
                for piece in (0..seg.len()).step_by(BLOCK) {
                    let m = BLOCK.min(seg.len() - piece);
                    for &(source, r) in donors {
                        plan.operand(u.sources[source]).decode_at(r * l + off + piece as u64, &mut tmp[..m]);
                        for (o, v) in seg[piece..piece + m].iter_mut().zip(&tmp[..m]) {
                            *o += *v;
                        }
                    }
                    let count = donors.len() as f32;
                    seg[piece..piece + m].iter_mut().for_each(|o| *o /= count);
                }
            }
        }
        p = stop;
    }
}

/// Calls `f(first_index, deltas)` for consecutive blocks of `x - base`
/// (f32) over `range`.
#[inline]
pub fn for_each_delta(
    base: View<'_>,
    x: View<'_>,
    range: std::ops::Range<u64>,
    mut f: impl FnMut(u64, &[f32]),
) {
    let mut b = [0f32; BLOCK];
    let mut d = [0f32; BLOCK];
    let mut p = range.start;
    while p < range.end {
        let m = (BLOCK as u64).min(range.end - p) as usize;
        base.decode_at(p, &mut b[..m]);
        x.decode_at(p, &mut d[..m]);
        for (dj, bj) in d[..m].iter_mut().zip(&b[..m]) {
            *dj -= *bj;
        }
        f(p, &d[..m]);
        p += m as u64;
    }
}

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

/// `out = src`, re-encoded in `out_ty`.
pub fn convert(out_ty: FloatType, out: &mut [u8], src: Operand<'_>) {
    map(out_ty, out, [src], |[x]| x);
}

/// `out = chat - pre`.
pub fn diff(out_ty: FloatType, out: &mut [u8], chat: Operand<'_>, pre: Operand<'_>) {
    map(out_ty, out, [chat, pre], |[c, p]| c - p);
}

/// `out = base + scale * (chat - pre)`: `d = chat - pre`, `m = scale * d`,
/// `out = base + m`, each rounded to f32.
pub fn add_diff(
    out_ty: FloatType,
    out: &mut [u8],
    base: Operand<'_>,
    chat: Operand<'_>,
    pre: Operand<'_>,
    scale: f32,
) {
    map(out_ty, out, [base, chat, pre], |[b, c, p]| {
        let d = c - p;
        let m = scale * d;
        b + m
    });
}

/// `out = base + scale * vector`: `m = scale * vector`, `out = base + m`.
/// With an f32 vector from `diff`, this equals `add_diff` bit for bit.
pub fn add_scaled(out_ty: FloatType, out: &mut [u8], base: Operand<'_>, vector: Operand<'_>, scale: f32) {
    map(out_ty, out, [base, vector], |[b, v]| {
        let m = scale * v;
        b + m
    });
}

/// One run of a Convert or Arith output's elements and its operands, each
/// sliced to the run: what one call of the functions above computes.
pub enum Segment<'a> {
    Convert(Operand<'a>),
    Diff(Operand<'a>, Operand<'a>),
    AddDiff(Operand<'a>, Operand<'a>, Operand<'a>, f32),
    AddScaled(Operand<'a>, Operand<'a>, f32),
}

impl<'a> Segment<'a> {
    /// The operands, in argument order.
    pub fn operands(&self) -> Vec<Operand<'a>> {
        match *self {
            Segment::Convert(a) => vec![a],
            Segment::Diff(c, p) => vec![c, p],
            Segment::AddDiff(b, c, p, _) => vec![b, c, p],
            Segment::AddScaled(b, v, _) => vec![b, v],
        }
    }

    /// Computes the segment into `out` (dtype `out_ty`) on the CPU.
    pub fn compute(&self, out_ty: FloatType, out: &mut [u8]) {
        match *self {
            Segment::Convert(x) => convert(out_ty, out, x),
            Segment::Diff(c, p) => diff(out_ty, out, c, p),
            Segment::AddDiff(b, c, p, scale) => add_diff(out_ty, out, b, c, p, scale),
            Segment::AddScaled(b, v, scale) => add_scaled(out_ty, out, b, v, scale),
        }
    }
}

/// Elements `elems` of a Convert or Arith output cut into segments: rows
/// outside the vector's runs are the base converted, rows inside a run
/// apply the formula to the vector's rows.
pub fn segments<'a>(plan: &'a Plan, op: &'a Op, elems: &Range<u64>) -> Vec<(Range<u64>, Segment<'a>)> {
    let mut out = Vec::new();
    match op {
        Op::Convert(src) => {
            let n = (elems.end - elems.start) as usize;
            out.push((elems.clone(), Segment::Convert(plan.operand(*src).slice(elems.start as usize, n))));
        }
        Op::Arith { formula, runs, row_len } => {
            let l = *row_len;
            let base = plan.operand(formula.base());
            let mut p = elems.start;
            let mut ri = runs.partition_point(|r| (r.base_row + r.rows) * l <= p);
            while p < elems.end {
                if !(ri < runs.len() && runs[ri].base_row * l <= p) {
                    let next =
                        if ri < runs.len() { (runs[ri].base_row * l).min(elems.end) } else { elems.end };
                    out.push((p..next, Segment::Convert(base.slice(p as usize, (next - p) as usize))));
                    p = next;
                    continue;
                }
                let r = runs[ri];
                let run_end = (r.base_row + r.rows) * l;
                let end = run_end.min(elems.end);
                let n = (end - p) as usize;
                let v = (r.vector_row * l + (p - r.base_row * l)) as usize;
                let b = base.slice(p as usize, n);
                let seg = match *formula {
                    Formula::Diff { chat, pre } => {
                        Segment::Diff(plan.operand(chat).slice(v, n), plan.operand(pre).slice(v, n))
                    }
                    Formula::AddDiff { chat, pre, scale, .. } => Segment::AddDiff(
                        b,
                        plan.operand(chat).slice(v, n),
                        plan.operand(pre).slice(v, n),
                        scale,
                    ),
                    Formula::AddScaled { vector, scale, .. } => {
                        Segment::AddScaled(b, plan.operand(vector).slice(v, n), scale)
                    }
                };
                out.push((p..end, seg));
                p = end;
                if end == run_end {
                    ri += 1;
                }
            }
        }
        Op::Copy(_) | Op::Merge(_) => unreachable!("not an arithmetic op"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16_bytes(v: &[f32]) -> Vec<u8> {
        let mut b = vec![0u8; v.len() * 2];
        encode(FloatType::BF16, v, &mut b);
        b
    }

    #[test]
    fn stored_f32_vector_equals_streaming() {
        let n = 3000;
        let base: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let chat: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
        let pre: Vec<f32> = (0..n).map(|i| (i as f32 * 0.05).sin() * 0.9).collect();
        let (b, c, p) = (bf16_bytes(&base), bf16_bytes(&chat), bf16_bytes(&pre));
        fn op(x: &[u8]) -> Operand<'_> {
            Operand { ty: FloatType::BF16, bytes: x }
        }
        let mut v = vec![0u8; n * 4];
        diff(FloatType::F32, &mut v, op(&c), op(&p));
        let mut a = vec![0u8; n * 2];
        add_diff(FloatType::BF16, &mut a, op(&b), op(&c), op(&p), 0.7);
        let mut s = vec![0u8; n * 2];
        add_scaled(FloatType::BF16, &mut s, op(&b), Operand { ty: FloatType::F32, bytes: &v }, 0.7);
        assert_eq!(a, s);
    }
}
