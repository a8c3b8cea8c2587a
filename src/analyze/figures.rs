//! The figures of one tensor of a chat vector, summed in f64 in a fixed
//! order: rows are cut into units of about `UNIT` elements, each unit sums
//! its rows one after another, and units are combined in row order, so the
//! figures do not depend on the thread count.
//!
//! `v` is the vector (`chat - pretrained`, or a stored vector), `u` the
//! vector it is compared with, `W` the pretrained or base weights, and
//! `out` an output of `apply` on `base`. Where two matrices have different
//! row counts (an expanded vocabulary), their common leading rows are
//! compared, as `apply --embeddings prefix` lines them up.

use rayon::prelude::*;
use serde::Serialize;

use crate::arith::Operand;

/// Elements per unit of work.
const UNIT: u64 = 1 << 16;

/// Running f64 sums over some elements of one tensor.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Sums {
    /// Elements of `v`.
    pub n: u64,
    /// Elements of `v` that are exactly zero.
    pub zeros: u64,
    /// `sum v^2`.
    pub vv: f64,
    /// `max |v|`.
    pub max_abs: f64,
    /// `sum W_pre^2` (pair only).
    pub pre: f64,
    /// Over rows shared with the base: `sum v^2`, `sum W_base^2`.
    pub vv_base: f64,
    pub base: f64,
    /// Over rows shared with `u`: `sum v^2`, `sum u^2`, `sum v*u`, elements
    /// whose signs agree, elements nonzero in both.
    pub vv_u: f64,
    pub uu: f64,
    pub vu: f64,
    pub agree: u64,
    pub both: u64,
    /// Over rows shared with the applied output: `sum (out - base) * v`,
    /// `sum v^2`.
    pub dv: f64,
    pub vv_out: f64,
}

impl Sums {
    /// Adds `o` (the next unit in order) to these sums.
    pub(crate) fn add(&mut self, o: &Sums) {
        self.n += o.n;
        self.zeros += o.zeros;
        self.vv += o.vv;
        self.max_abs = self.max_abs.max(o.max_abs);
        self.pre += o.pre;
        self.vv_base += o.vv_base;
        self.base += o.base;
        self.vv_u += o.vv_u;
        self.uu += o.uu;
        self.vu += o.vu;
        self.agree += o.agree;
        self.both += o.both;
        self.dv += o.dv;
        self.vv_out += o.vv_out;
    }
}

/// What was summed, so absent inputs give absent figures, not zeros.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Present {
    pub pre: bool,
    pub base: bool,
    pub against: bool,
    pub applied: bool,
}

/// The figures users read, from sums.
#[derive(Clone, Debug, Serialize)]
pub struct Figures {
    /// Elements of the vector.
    pub elements: u64,
    /// `||v||`.
    pub norm: f64,
    /// `||v|| / ||W||` against the pretrained model (pairs only).
    pub rel_norm_pretrained: Option<f64>,
    /// `||v|| / ||W||` against `--base`, over the rows they share.
    pub rel_norm_base: Option<f64>,
    /// `max |v|`.
    pub max_abs: f64,
    /// Share of the vector's elements that are exactly zero.
    pub zero_fraction: f64,
    /// Cosine similarity with the `--against` vector.
    pub cosine: Option<f64>,
    /// Share of elements, among those nonzero in both vectors, whose signs
    /// agree.
    pub sign_agreement: Option<f64>,
    /// `((out - base) . v) / ||v||^2`: the scale `--applied` actually got.
    pub effective_scale: Option<f64>,
}

fn ratio(num: f64, den: f64) -> Option<f64> {
    (den > 0.0).then(|| num / den)
}

impl Figures {
    pub(crate) fn from_sums(s: &Sums, p: Present) -> Figures {
        Figures {
            elements: s.n,
            norm: s.vv.sqrt(),
            rel_norm_pretrained: if p.pre { ratio(s.vv.sqrt(), s.pre.sqrt()) } else { None },
            rel_norm_base: if p.base { ratio(s.vv_base.sqrt(), s.base.sqrt()) } else { None },
            max_abs: s.max_abs,
            zero_fraction: if s.n == 0 { 0.0 } else { s.zeros as f64 / s.n as f64 },
            cosine: if p.against { ratio(s.vu, (s.vv_u * s.uu).sqrt()) } else { None },
            sign_agreement: if p.against { ratio(s.agree as f64, s.both as f64) } else { None },
            effective_scale: if p.applied { ratio(s.dv, s.vv_out) } else { None },
        }
    }
}

/// A tensor's vector: stored, or `chat - pretrained`.
#[derive(Clone, Copy)]
pub(crate) enum Delta<'a> {
    Stored(Operand<'a>),
    Diff(Operand<'a>, Operand<'a>),
}

impl Delta<'_> {
    /// Elements `start..start + out.len()` in f64 (a difference of two
    /// decoded values is taken in f64, exactly).
    fn decode(&self, start: u64, out: &mut [f64], tmp: &mut Vec<f32>) {
        let n = out.len();
        tmp.resize(2 * n, 0.0);
        let (a, b) = tmp.split_at_mut(n);
        match *self {
            Delta::Stored(v) => {
                v.decode_at(start, a);
                out.iter_mut().zip(a.iter()).for_each(|(o, x)| *o = f64::from(*x));
            }
            Delta::Diff(c, p) => {
                c.decode_at(start, a);
                p.decode_at(start, b);
                for ((o, x), y) in out.iter_mut().zip(a.iter()).zip(b.iter()) {
                    *o = f64::from(*x) - f64::from(*y);
                }
            }
        }
    }
}

/// A matrix read alongside the vector, with its own row count (rows past
/// the vector's or its own are not compared).
#[derive(Clone, Copy)]
pub(crate) struct Other<T> {
    pub x: T,
    pub rows: u64,
}

/// One tensor's inputs, all with the vector's row length.
pub(crate) struct TensorInputs<'a> {
    pub v: Delta<'a>,
    /// Rows and row length of the vector.
    pub rows: u64,
    pub row_len: u64,
    /// The pretrained weights (pairs; same shape as `v`).
    pub pre: Option<Operand<'a>>,
    pub base: Option<Other<Operand<'a>>>,
    pub against: Option<Other<Delta<'a>>>,
    /// The applied output and the base it was applied to (same shape).
    pub applied: Option<Other<(Operand<'a>, Operand<'a>)>>,
    /// Keep per-row sums (vocabulary matrices).
    pub per_row: bool,
}

/// Per-row sums of a vocabulary matrix: `sum v^2`, `sum W_pre^2` (pairs)
/// and `sum W_base^2` (with a base), per row of the vector.
#[derive(Clone, Debug, Default)]
pub(crate) struct RowSums {
    pub vv: Vec<f64>,
    pub pre: Vec<f64>,
    pub base: Vec<f64>,
}

/// Sums over rows `r0..r1`.
fn unit(t: &TensorInputs<'_>, r0: u64, r1: u64) -> (Sums, RowSums) {
    let l = t.row_len as usize;
    let mut s = Sums::default();
    let mut rows = RowSums::default();
    let (mut v, mut u, mut w) = (vec![0f64; l], vec![0f64; l], vec![0f32; l]);
    let mut w2 = vec![0f32; l];
    let mut tmp = Vec::new();
    let sq = |buf: &[f32]| buf.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>();
    for r in r0..r1 {
        let at = r * t.row_len;
        t.v.decode(at, &mut v, &mut tmp);
        let row_vv: f64 = v.iter().map(|x| x * x).sum();
        s.n += l as u64;
        s.vv += row_vv;
        s.zeros += v.iter().filter(|x| **x == 0.0).count() as u64;
        s.max_abs = v.iter().fold(s.max_abs, |m, x| m.max(x.abs()));
        if t.per_row {
            rows.vv.push(row_vv);
        }
        if let Some(p) = t.pre {
            p.decode_at(at, &mut w);
            let row_pre = sq(&w);
            s.pre += row_pre;
            if t.per_row {
                rows.pre.push(row_pre);
            }
        }
        if let Some(b) = t.base.filter(|b| r < b.rows) {
            b.x.decode_at(at, &mut w);
            let row_base = sq(&w);
            s.base += row_base;
            s.vv_base += row_vv;
            if t.per_row {
                rows.base.push(row_base);
            }
        }
        if let Some(a) = t.against.filter(|a| r < a.rows) {
            a.x.decode(at, &mut u, &mut tmp);
            s.vv_u += row_vv;
            for (x, y) in v.iter().zip(&u) {
                s.uu += y * y;
                s.vu += x * y;
                if *x != 0.0 && *y != 0.0 {
                    s.both += 1;
                    s.agree += u64::from((*x > 0.0) == (*y > 0.0));
                }
            }
        }
        if let Some(o) = t.applied.filter(|o| r < o.rows) {
            let (out, base) = o.x;
            out.decode_at(at, &mut w);
            base.decode_at(at, &mut w2);
            s.vv_out += row_vv;
            for ((x, a), b) in v.iter().zip(&w).zip(&w2) {
                s.dv += (f64::from(*a) - f64::from(*b)) * x;
            }
        }
    }
    (s, rows)
}

/// The sums of one tensor (and its per-row sums when asked for), on the
/// current rayon pool.
pub(crate) fn tensor_sums(t: &TensorInputs<'_>) -> (Sums, RowSums) {
    let per_unit = (UNIT / t.row_len.max(1)).max(1);
    let starts: Vec<u64> = (0..t.rows).step_by(per_unit as usize).collect();
    let parts: Vec<(Sums, RowSums)> =
        starts.par_iter().map(|&r0| unit(t, r0, (r0 + per_unit).min(t.rows))).collect();
    let mut total = Sums::default();
    let mut rows = RowSums::default();
    for (s, r) in parts {
        total.add(&s);
        rows.vv.extend(r.vv);
        rows.pre.extend(r.pre);
        rows.base.extend(r.base);
    }
    (total, rows)
}
