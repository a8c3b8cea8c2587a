//! Element arithmetic over memory-mapped bytes: operands of any of the
//! three float dtypes, views that line a model's rows up with the base's,
//! and the chat-vector formulas.
//!
//! Every computation decodes a block of each operand to f32 (exact),
//! applies its formula in f32 in the documented order, and encodes once
//! (round-to-nearest-even). Rust never contracts `a * b + c` into a fused
//! multiply-add unless asked to (`mul_add`), so results are the same on
//! every CPU, and the CUDA kernels reproduce them with `__fmul_rn` /
//! `__fadd_rn`. Blocks are independent, so nothing depends on chunking or
//! thread count (contract 1).
//!
//! This room imports only `model::dtype`; it knows nothing of plans.

pub(crate) mod formulas;
pub(crate) mod lowrank;
pub(crate) mod quant;
pub(crate) mod requant;
pub(crate) mod rows;

use crate::model::dtype::{FloatType, decode};
use rows::{RowRun, RowSrc, RowTable, stretches};

/// Elements per block: small enough for the stack and L1, large enough to
/// amortize the dtype dispatch.
pub(crate) const BLOCK: usize = 1024;

/// A little-endian input slice and its dtype.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Operand<'a> {
    pub ty: FloatType,
    pub bytes: &'a [u8],
}

impl<'a> Operand<'a> {
    /// Elements `start..start+len` of this operand.
    pub(crate) fn slice(self, start: usize, len: usize) -> Operand<'a> {
        let s = self.ty.size();
        Operand { ty: self.ty, bytes: &self.bytes[start * s..(start + len) * s] }
    }

    /// Decodes elements `start..start + out.len()` into `out`.
    #[inline]
    pub(crate) fn decode_at(self, start: u64, out: &mut [f32]) {
        let s = self.ty.size();
        let a = start as usize * s;
        decode(self.ty, &self.bytes[a..a + out.len() * s], out);
    }
}

/// One input tensor as a merge reads it: its stored elements, or, for a
/// model named with a LoRA adapter (`model+lora`), its elements with the
/// adapter's update merged on the fly.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Src<'a> {
    Plain(Operand<'a>),
    Patched(lowrank::Patched<'a>),
    /// A quantized weight (FP8, MXFP4), decoded as it is read.
    Quantized(quant::Quantized<'a>),
}

impl Src<'_> {
    /// Decodes elements `start..start + out.len()` into `out`.
    #[inline]
    pub(crate) fn decode_at(self, start: u64, out: &mut [f32]) {
        match self {
            Src::Plain(op) => op.decode_at(start, out),
            Src::Patched(p) => p.decode_at(start, out),
            Src::Quantized(q) => q.decode_at(start, out),
        }
    }
}

/// A merged model's tensor seen in the base's element positions.
#[derive(Clone, Copy)]
pub(crate) enum View<'a> {
    /// The shapes match: element for element.
    Direct(Src<'a>),
    /// A vocabulary matrix with other rows: the model's rows placed at the
    /// base rows `runs` names, the base's own rows (`fill`) elsewhere, so
    /// rows for tokens the model lacks have a zero delta.
    Rows { model: Src<'a>, fill: Src<'a>, runs: &'a [RowRun], row_len: u64 },
    /// Input `which` of a union-vocabulary matrix, row by row from
    /// `sources`.
    Table { sources: &'a [Src<'a>], table: &'a RowTable, which: usize },
}

impl View<'_> {
    /// Decodes base positions `start..start + out.len()` into `out`.
    pub(crate) fn decode_at(self, start: u64, out: &mut [f32]) {
        match self {
            View::Direct(src) => src.decode_at(start, out),
            View::Rows { model, fill, runs, row_len } => {
                for s in stretches(runs, row_len, start..start + out.len() as u64) {
                    let seg = &mut out[(s.range.start - start) as usize..(s.range.end - start) as usize];
                    match s.vector {
                        Some(from) => model.decode_at(from, seg),
                        None => fill.decode_at(s.range.start, seg),
                    }
                }
            }
            View::Table { sources, table, which } => decode_table(sources, table, which, start, out),
        }
    }
}

/// `View::Table::decode_at`: each output row from its source row, or the
/// mean of several (summed from 0 in input order, then divided, in f32).
fn decode_table(sources: &[Src], u: &RowTable, which: usize, start: u64, out: &mut [f32]) {
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
            RowSrc::Row { source, row: r } => sources[source].decode_at(r * l + off, seg),
            RowSrc::Zero => seg.fill(0.0),
            RowSrc::Padding { rows } => {
                let mean = u.padding[which].get_or_init(|| table_mean(sources, u, which, rows));
                seg.copy_from_slice(&mean[off as usize..off as usize + seg.len()]);
            }
            RowSrc::Mean(i) => {
                let donors = &u.means[i];
                seg.fill(0.0);
                let mut tmp = [0f32; BLOCK];
                for piece in (0..seg.len()).step_by(BLOCK) {
                    let m = BLOCK.min(seg.len() - piece);
                    for &(source, r) in donors {
                        sources[source].decode_at(r * l + off + piece as u64, &mut tmp[..m]);
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

/// The mean of rows `0..rows` of table `which` (none of them padding),
/// summed in f64 in row order and rounded once to f32.
fn table_mean(sources: &[Src], u: &RowTable, which: usize, rows: u64) -> Vec<f32> {
    let l = u.row_len as usize;
    let mut sum = vec![0f64; l];
    let mut row = vec![0f32; l];
    for r in 0..rows {
        decode_table(sources, u, which, r * l as u64, &mut row);
        for (s, v) in sum.iter_mut().zip(&row) {
            *s += f64::from(*v);
        }
    }
    sum.iter().map(|s| (s / rows.max(1) as f64) as f32).collect()
}

/// `for_each_delta` for several models over one base: each block of the
/// base is decoded once, then `f(first_index, model, deltas)` is called
/// for each model of `xs` in turn, with the same f32 values
/// `for_each_delta` gives for that model.
#[inline]
pub(crate) fn for_each_deltas(
    base: View<'_>,
    xs: &[View<'_>],
    range: std::ops::Range<u64>,
    mut f: impl FnMut(u64, usize, &[f32]),
) {
    let mut b = [0f32; BLOCK];
    let mut d = [0f32; BLOCK];
    let mut p = range.start;
    while p < range.end {
        let m = (BLOCK as u64).min(range.end - p) as usize;
        base.decode_at(p, &mut b[..m]);
        for (k, x) in xs.iter().enumerate() {
            x.decode_at(p, &mut d[..m]);
            for (dj, bj) in d[..m].iter_mut().zip(&b[..m]) {
                *dj -= *bj;
            }
            f(p, k, &d[..m]);
        }
        p += m as u64;
    }
}

/// Calls `f(first_index, deltas)` for consecutive blocks of `x - base`
/// (f32) over `range`.
#[inline]
pub(crate) fn for_each_delta(
    base: View<'_>,
    x: View<'_>,
    range: std::ops::Range<u64>,
    mut f: impl FnMut(u64, &[f32]),
) {
    for_each_deltas(base, &[x], range, |p, _, d| f(p, d));
}
