//! The per-tensor skeleton every planner that writes a whole model plugs
//! into (`apply`, `apply --lora`, the merge methods): walk the reference
//! model's tensors in order, keep what the planner does not compute (a
//! byte copy, or a conversion to the output dtype), record what it does,
//! collect every problem, then report them all at once and lay the output
//! out in shards. The planner says only what one tensor becomes.

use crate::error::Result;
use crate::model::checkpoint::{Checkpoint, Tensor};
use crate::model::dtype::{DType, FloatType};
use crate::plan::checks::{Problems, float_of};
use crate::plan::shards::assign_shards;
use crate::plan::{Input, Op, OutTensor, Plan, Source};

/// What one reference tensor becomes.
pub(crate) enum Step {
    /// As in the reference: copied, or converted to the output dtype.
    Keep,
    /// Made by `op`, in the reference's shape.
    Make(Op),
    /// Made by `op`, with the scale its vector is multiplied by (one
    /// variant; see `Plan::scales`).
    Scaled(Op, f32),
    /// Made by `op` in another shape (a vocabulary a union merge grew).
    Shaped(Op, Vec<u64>),
    /// Left out: the planner recorded a problem with it.
    Skip,
}

/// The output tensors a planner built, in the reference's order, their
/// scales, and the problems found on the way.
pub(crate) struct Outputs {
    pub(crate) tensors: Vec<OutTensor>,
    scales: Vec<Option<f32>>,
    pub(crate) problems: Problems,
}

/// The dtype tensor `t` is written in: `out` for float tensors when
/// given, else its own (BF16 for a quantized weight).
pub(crate) fn out_dtype(t: &Tensor, out: Option<FloatType>) -> DType {
    match (out, t.float()) {
        (Some(o), Some(_)) => o.dtype(),
        // A quantized weight is written as the float model's (BF16).
        (None, Some(f)) if t.quant.is_some() => f.dtype(),
        _ => t.dtype,
    }
}

/// Runs `step` on each tensor of `reference` (input `input` of the plan)
/// with its source and output dtype, adding to `problems` (which may hold
/// some found before). `keep_flag` is the option that leaves a tensor
/// out, named when a kept tensor cannot be converted.
pub(crate) fn each_tensor(
    reference: &Checkpoint,
    input: usize,
    out: Option<FloatType>,
    keep_flag: &str,
    problems: Problems,
    mut step: impl FnMut(Source, &Tensor, DType, &mut Problems) -> Result<Step>,
) -> Result<Outputs> {
    let mut o = Outputs {
        tensors: Vec::with_capacity(reference.tensors.len()),
        scales: Vec::with_capacity(reference.tensors.len()),
        problems,
    };
    for (i, t) in reference.tensors.iter().enumerate() {
        let src = Source { input, tensor: i };
        let dtype = out_dtype(t, out);
        let (op, shape, scale) = match step(src, t, dtype, &mut o.problems)? {
            Step::Skip => continue,
            Step::Keep if dtype == t.dtype => (Op::Copy(src), t.shape.clone(), None),
            Step::Keep => {
                float_of(reference, t, keep_flag)?;
                (Op::Convert(src), t.shape.clone(), None)
            }
            Step::Make(op) => (op, t.shape.clone(), None),
            Step::Scaled(op, s) => (op, t.shape.clone(), Some(s)),
            Step::Shaped(op, shape) => (op, shape, None),
        };
        o.tensors.push(OutTensor { name: t.name.clone(), dtype, shape, op });
        o.scales.push(scale);
    }
    Ok(o)
}

impl Outputs {
    /// No tensors yet, for a planner that does not follow one reference
    /// model's tensors (`slices`).
    pub(crate) fn new(problems: Problems) -> Outputs {
        Outputs { tensors: Vec::new(), scales: Vec::new(), problems }
    }

    /// Adds an output tensor.
    pub(crate) fn push(&mut self, t: OutTensor) {
        self.tensors.push(t);
        self.scales.push(None);
    }

    /// The plan: every problem reported at once, else the tensors laid out
    /// in shards of at most `shard_size` bytes, with the scales the
    /// planner gave (one variant, when it gave any).
    pub(crate) fn into_plan(
        self,
        inputs: Vec<Input>,
        shard_size: u64,
        warnings: Vec<String>,
    ) -> Result<Plan> {
        self.problems.into_result()?;
        let shards = assign_shards(&self.tensors, &[], shard_size);
        let scaled = self.scales.iter().any(Option::is_some);
        Ok(Plan {
            inputs,
            tensors: self.tensors,
            shards,
            embeddings: Vec::new(),
            omitted: Vec::new(),
            warnings,
            vocab_union: None,
            scales: if scaled { vec![self.scales] } else { Vec::new() },
            groups: Vec::new(),
            experts: None,
            requant: Default::default(),
        })
    }
}
