//! What a chat vector is: one streaming pass over its tensors (and the
//! pretrained, base, `--against` and applied models beside it) that sums
//! norms, relative norms, cosines and sign agreement in f64 in a fixed
//! order (`figures`), aggregated per layer and per module kind (`report`),
//! the pair checks users need before trusting a subtraction (`findings`),
//! and a picture of it (`plot`).
//!
//! Inputs are only mapped; each is read once, a unit of rows at a time, so
//! memory stays bounded whatever the model size. This room reads models
//! (`model`, `arith`'s operands, `plan`'s vocabulary reader) and writes
//! nothing but the picture it is asked for; the job room opens the models.

pub(crate) mod figures;
pub(crate) mod findings;
pub(crate) mod plot;
pub(crate) mod report;

use crate::arith::Operand;
use crate::error::Result;
use crate::model::checkpoint::{Checkpoint, Tensor, is_lm_head, is_vocab_matrix};
use figures::{Delta, Other, Present, RowSums, Sums, TensorInputs, tensor_sums};

/// A vector as the user gave it.
#[derive(Clone, Copy)]
pub(crate) enum Side<'a> {
    /// A vector written by `extract` (or a raw delta).
    Stored(&'a Checkpoint),
    /// `chat - pretrained`, computed on the fly.
    Pair { chat: &'a Checkpoint, pre: &'a Checkpoint },
}

fn operand<'a>(ck: &'a Checkpoint, t: &Tensor) -> Option<Operand<'a>> {
    Some(Operand { ty: t.dtype.float()?, bytes: ck.bytes(t) })
}

impl<'a> Side<'a> {
    /// The checkpoint that carries the vector's config and tokenizer.
    pub(crate) fn primary(&self) -> &'a Checkpoint {
        match *self {
            Side::Stored(v) => v,
            Side::Pair { chat, .. } => chat,
        }
    }

    /// The vector's tensor names, in file order (a tied chat model paired
    /// with an untied pretrained one also gets the output projection, as
    /// `extract` writes it).
    fn names(&self) -> Vec<String> {
        let primary = self.primary();
        let mut names: Vec<String> = primary.tensors.iter().map(|t| t.name.clone()).collect();
        if let Side::Pair { chat, pre } = *self
            && chat.is_tied()
            && let Some(h) = pre.tensors.iter().find(|t| is_lm_head(&t.name))
        {
            names.push(h.name.clone());
        }
        names
    }

    /// The vector's tensor `name` and its shape, or why it has none.
    fn delta(&self, name: &str) -> std::result::Result<(Delta<'a>, Vec<u64>), String> {
        match *self {
            Side::Stored(v) => {
                let t = v.logical(name).ok_or("not in the vector")?;
                let op = operand(v, t).ok_or_else(|| format!("{} is not a float type", t.dtype))?;
                Ok((Delta::Stored(op), t.shape.clone()))
            }
            Side::Pair { chat, pre } => {
                let (Some(c), Some(p)) = (chat.logical(name), pre.logical(name)) else {
                    return Err("not in both the chat and the pretrained model".into());
                };
                if c.shape != p.shape {
                    return Err(format!("chat shape {:?} vs pretrained {:?}", c.shape, p.shape));
                }
                let (Some(co), Some(po)) = (operand(chat, c), operand(pre, p)) else {
                    return Err(format!("{} is not a float type", c.dtype));
                };
                Ok((Delta::Diff(co, po), c.shape.clone()))
            }
        }
    }
}

/// Everything a report reads.
pub(crate) struct Inputs<'a> {
    pub vector: Side<'a>,
    pub against: Option<Side<'a>>,
    pub base: Option<&'a Checkpoint>,
    /// An output of `apply` on `base`.
    pub applied: Option<&'a Checkpoint>,
}

/// One tensor's sums.
pub(crate) struct TensorResult {
    pub name: String,
    pub shape: Vec<u64>,
    pub sums: Sums,
    pub rows: RowSums,
    /// What the tensor was compared with.
    pub present: Present,
}

/// `(rows, row length)` of a shape: the first dimension, the rest.
fn rows_of(shape: &[u64]) -> (u64, u64) {
    match shape {
        [] => (1, 1),
        [n] => (1, *n),
        [r, rest @ ..] => (*r, rest.iter().product()),
    }
}

/// The other matrix's rows when its rows have the vector's length.
fn same_rows(shape: &[u64], row_len: u64, ndim: usize) -> Option<u64> {
    let (r, l) = rows_of(shape);
    (l == row_len && shape.len() == ndim).then_some(r)
}

/// The whole pass: every tensor of the vector in file order, each summed on
/// the current rayon pool. `skipped` gets the tensors that could not be
/// read as a vector, with why.
pub(crate) fn run(inp: &Inputs<'_>, skipped: &mut Vec<(String, String)>) -> Result<Vec<TensorResult>> {
    let mut out = Vec::new();
    for name in inp.vector.names() {
        crate::interrupt::check()?;
        let (v, shape) = match inp.vector.delta(&name) {
            Ok(x) => x,
            Err(why) => {
                skipped.push((name, why));
                continue;
            }
        };
        let (rows, row_len) = rows_of(&shape);
        let nd = shape.len();
        let pre = match inp.vector {
            Side::Pair { pre, .. } => pre.logical(&name).and_then(|t| operand(pre, t)),
            Side::Stored(_) => None,
        };
        let base = inp.base.and_then(|b| {
            let t = b.logical(&name)?;
            Some(Other { x: operand(b, t)?, rows: same_rows(&t.shape, row_len, nd)? })
        });
        let against = inp.against.and_then(|a| {
            let (d, s) = a.delta(&name).ok()?;
            Some(Other { x: d, rows: same_rows(&s, row_len, nd)? })
        });
        let applied = match (inp.applied, inp.base) {
            (Some(o), Some(b)) => (|| {
                let (to, tb) = (o.logical(&name)?, b.logical(&name)?);
                if to.shape != tb.shape {
                    return None;
                }
                Some(Other {
                    x: (operand(o, to)?, operand(b, tb)?),
                    rows: same_rows(&to.shape, row_len, nd)?,
                })
            })(),
            _ => None,
        };
        let present = Present {
            pre: pre.is_some(),
            base: base.is_some(),
            against: against.is_some(),
            applied: applied.is_some(),
        };
        let t =
            TensorInputs { v, rows, row_len, pre, base, against, applied, per_row: is_vocab_matrix(&name) };
        let (sums, row_sums) = tensor_sums(&t);
        out.push(TensorResult { name, shape, sums, rows: row_sums, present });
    }
    // A shard truncated while mapped reads as zeros: fail rather than
    // report figures over them.
    let sides = std::iter::once(inp.vector).chain(inp.against).flat_map(|s| match s {
        Side::Stored(v) => vec![v],
        Side::Pair { chat, pre } => vec![chat, pre],
    });
    for ck in sides.chain(inp.base).chain(inp.applied) {
        ck.check_intact()?;
    }
    Ok(out)
}
