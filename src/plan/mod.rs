//! The whole job as data, built and checked before a byte is written: for
//! every output tensor, what it is computed from, its dtype and its shard.
//! Name, shape, dtype, architecture and vocabulary conflicts fail here, with
//! the first offending tensors listed (`checks`).
//!
//! - `chat_vector`: plans of `extract` and `apply`;
//! - `lora`: plans of `apply --lora` (a LoRA adapter merged into its base);
//! - `merge`: plans of the merge methods, parameters resolved per tensor;
//! - `vocab`: which embedding rows line up when vocabularies differ;
//! - `skeleton`: the per-tensor loop apply, LoRA and merge plans plug into;
//! - `shards`: output shard files, as transformers lays them out;
//! - `describe`: the `--dry-run` listing.
//!
//! This room reads checkpoints (`model`) and speaks the vocabulary of
//! `arith` and `merge`; it never touches the file system for writing, and
//! nothing below it imports it.

pub(crate) mod chat_vector;
pub(crate) mod checks;
pub(crate) mod describe;
pub(crate) mod experts;
pub(crate) mod lora;
pub(crate) mod merge;
pub(crate) mod requant;
pub(crate) mod shards;
pub(crate) mod skeleton;
pub(crate) mod slices;
pub(crate) mod vocab;

use std::ops::Range;

use bumpalo::Bump;

use crate::arith::formulas::{Segment, Term};
use crate::arith::lowrank::LowRank;
use crate::arith::quant::{Quantized, ScaleType};
use crate::arith::rows::{RowRun, RowTable, stretches};
use crate::arith::{Operand, Src, View};
use crate::merge::{Inputs, TensorMerge};
use crate::model::checkpoint::{Checkpoint, Tensor};
use crate::model::dtype::{DType, FloatType, encode};
use crate::model::tensor::Scheme;
pub use vocab::EmbeddingReport;

/// What an input checkpoint is to the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Role {
    Base,
    Chat,
    Pretrained,
    Vector,
    /// A model merged by a merge method (other than the base).
    Model,
    /// A LoRA adapter merged into the base.
    Adapter,
}

/// An input checkpoint and its role.
pub(crate) struct Input {
    pub role: Role,
    /// How the user named it (path, Hub id or alias).
    pub label: String,
    pub ckpt: Checkpoint,
    /// A LoRA adapter merged into this model as it is read (a `model+lora`
    /// reference): which of its tensors change, and how.
    pub lora: Option<lora::Overlay>,
}

impl Input {
    /// An input labelled by its directory (callers that know the user's
    /// reference replace the label).
    pub(crate) fn new(role: Role, ckpt: Checkpoint) -> Input {
        Input { role, label: ckpt.dir.display().to_string(), ckpt, lora: None }
    }

    /// An input labelled as the user named it.
    pub(crate) fn named(role: Role, label: &str, ckpt: Checkpoint) -> Input {
        Input { role, label: label.to_string(), ckpt, lora: None }
    }
}

/// A tensor of an input: `inputs[input].ckpt.tensors[tensor]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Source {
    pub input: usize,
    pub tensor: usize,
}

/// The arithmetic for one output tensor. Operation order is part of the
/// numeric contract: `d = chat - pre; m = scale * d; out = base + m`, each
/// step an f32 operation rounded on its own (no fused multiply-add). The
/// scale is not here but in `Plan::scales`, the one place the CPU and the
/// GPU read it from, once per variant (a sweep's candidates).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Formula {
    /// `chat - pre` (extract).
    Diff { chat: Source, pre: Source },
    /// `base + scale * (chat - pre)` (apply, streaming form).
    AddDiff { base: Source, chat: Source, pre: Source },
    /// `base + scale * vector` (apply, stored vector).
    AddScaled { base: Source, vector: Source },
    /// `base + scale * (B @ A)` (a LoRA merge; transposed for embeddings and
    /// `fan_in_fan_out` layers) over a `rows x cols` weight; its scale is
    /// the adapter's scaling times the user's.
    AddLowRank { base: Source, a: Source, b: Source, transposed: bool, rows: u64, cols: u64 },
}

impl Formula {
    /// The input whose elements line up with the output's.
    pub(crate) fn base(&self) -> Source {
        match *self {
            Formula::Diff { chat, .. } => chat,
            Formula::AddDiff { base, .. }
            | Formula::AddScaled { base, .. }
            | Formula::AddLowRank { base, .. } => base,
        }
    }

    /// Whether the vector is multiplied by a scale (all but `Diff`).
    pub(crate) fn is_scaled(&self) -> bool {
        !matches!(self, Formula::Diff { .. })
    }

    /// The inputs read at the vector's (possibly other) row positions.
    pub(crate) fn vector_sources(&self) -> Vec<Source> {
        match *self {
            Formula::Diff { pre, .. } => vec![pre],
            Formula::AddDiff { chat, pre, .. } => vec![chat, pre],
            Formula::AddScaled { vector, .. } => vec![vector],
            Formula::AddLowRank { a, b, .. } => vec![a, b],
        }
    }
}

/// How one output tensor is produced.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    /// Byte copy of an input tensor of the same dtype.
    Copy(Source),
    /// An input tensor decoded and re-encoded in another float dtype.
    Convert(Source),
    /// Arithmetic. Output rows inside `runs` (units of `row_len` elements)
    /// take the formula with the vector rows the run names; rows outside any
    /// run are converted from `formula.base()` unchanged.
    Arith { formula: Formula, runs: Vec<RowRun>, row_len: u64 },
    /// A merge method over aligned inputs.
    Merge(Box<MergeOp>),
    /// Several chat vectors added to the base in one pass.
    AddVectors(Box<VectorSum>),
    /// The scales of output tensor `.0`, quantized again
    /// (`Plan::requant`): FP8 block scales (`weight_scale_inv`, f32) or
    /// MXFP4's E8M0 bytes (`*_scales`), computed from the same f32 values
    /// as its codes.
    QuantScales(usize),
}

/// Quantized output (`--out-dtype fp8|mxfp4`): the weights quantized
/// again, by output tensor index, and the error against the f32 values,
/// by (weight, band) as their scales are written, summed in that order
/// (so the figures do not depend on which job finished first).
#[derive(Default)]
pub(crate) struct Requant {
    pub weights: std::collections::HashMap<usize, Requantized>,
    pub error: std::sync::Mutex<std::collections::BTreeMap<(usize, u64), crate::arith::requant::QuantError>>,
    /// Scales (and their error) a codes job computed, by (weight, band),
    /// for its scales job to take instead of computing the band again.
    pub stash: std::sync::Mutex<Stash>,
}

/// Bands' scales waiting for their scales job (see `exec::jobs`), at most
/// `STASH_BYTES` of them: a band not kept is computed again by its scales
/// job, through the same function, so the bytes never depend on which.
#[derive(Default)]
pub(crate) struct Stash {
    pub bands: std::collections::HashMap<(usize, u64), (Vec<u8>, crate::arith::requant::QuantError)>,
    pub bytes: usize,
    /// Bands whose scales job found nothing and computed them itself:
    /// when it ran before their codes job finished (the two ran at once),
    /// that codes job keeps nothing, or it would sit in the stash for
    /// good. 16 bytes per band not found, at most one per band.
    pub missed: std::collections::HashSet<(usize, u64)>,
}

/// How one output weight is quantized again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Requantized {
    /// FP8 E4M3 codes in `[block_m, block_n]` blocks with their inverse
    /// scales (f32, or E8M0 bytes when the base stores them so); `pow2`:
    /// each rounded up to a power of two (`scale_fmt: ue8m0`).
    Fp8 { block: [u64; 2], pow2: bool },
    /// MXFP4 of the float tensor `[experts, cols, rows]`: blocks
    /// `[experts, rows, cols / 32, 16]` (the output tensor) and E8M0
    /// scales `[experts, rows, cols / 32]`, as gpt-oss stores them.
    Mxfp4 { experts: u64, cols: u64, rows: u64 },
}

impl Requantized {
    /// For MXFP4: output bytes per row of its blocks (`scales`: of its
    /// scales) tensor.
    pub(crate) fn mxfp4_row_bytes(cols: u64, scales: bool) -> u64 {
        if scales { cols / 32 } else { cols / 2 }
    }
}

/// `base + s_1 * v_1 + s_2 * v_2 + ...`: `apply` with several vectors, each
/// with its own rows and scale, added in the order given in one pass over
/// the inputs (see `Segment::AddTerms` for the f32 steps). The scales are
/// resolved per tensor here (a sweep, the only user of `Plan::scales`'
/// variants, takes one vector).
#[derive(Clone, Debug)]
pub(crate) struct VectorSum {
    /// The base model's tensor.
    pub base: Source,
    /// The vectors that have this tensor, in the order given.
    pub terms: Vec<VectorTerm>,
}

/// One vector of a `VectorSum`.
#[derive(Clone, Debug)]
pub(crate) struct VectorTerm {
    /// A stored vector's tensor, or the chat model's.
    pub x: Source,
    /// The pretrained model's tensor, for a vector computed on the fly
    /// (`x - pre`).
    pub pre: Option<Source>,
    /// The base rows this vector's rows go to, in rows of `row_len`
    /// elements (one run over the whole tensor, `row_len` 1, when the
    /// shapes match).
    pub runs: Vec<RowRun>,
    pub row_len: u64,
    /// What this vector is multiplied by in this tensor.
    pub scale: f32,
    /// Which vector this is, in the order given (from 0).
    pub vector: usize,
}

impl VectorSum {
    /// The inputs read at the vectors' (possibly other) row positions.
    pub(crate) fn vector_sources(&self) -> impl Iterator<Item = Source> + '_ {
        self.terms.iter().flat_map(|t| std::iter::once(t.x).chain(t.pre))
    }
}

/// One tensor of a merge: the method and parameters, and its inputs.
#[derive(Clone, Debug)]
pub(crate) struct MergeOp {
    pub merge: TensorMerge,
    /// The base model's tensor (all methods but linear).
    pub base: Option<Source>,
    /// The merged models' tensors, in `merge.params.models` order.
    pub models: Vec<Source>,
    /// Per model, for a vocabulary matrix whose rows differ from the base's:
    /// which base rows its rows go to (row length in elements).
    pub rows: Vec<Option<(Vec<RowRun>, u64)>>,
    /// A vocabulary matrix of a `tokenizer_source: union` merge.
    pub union: Option<Box<UnionRows>>,
}

impl MergeOp {
    /// Calls `f` with the base's and models' tensors seen in the output's
    /// element positions (aligned or union rows where vocabularies differ).
    pub(crate) fn with_inputs<R>(&self, plan: &Plan, f: impl FnOnce(&Inputs) -> R) -> R {
        let union_sources: Vec<Src> =
            self.union.iter().flat_map(|u| u.sources.iter().map(|s| plan.src(*s))).collect();
        let inputs = match &self.union {
            Some(u) => {
                let table = |which| View::Table { sources: &union_sources, table: &u.table, which };
                let first = usize::from(self.base.is_some());
                Inputs {
                    base: self.base.map(|_| table(0)),
                    models: (0..self.models.len()).map(|k| table(first + k)).collect(),
                }
            }
            None => Inputs {
                base: self.base.map(|b| View::Direct(plan.src(b))),
                models: self
                    .models
                    .iter()
                    .zip(&self.rows)
                    .map(|(m, rows)| {
                        let model = plan.src(*m);
                        match (rows, self.base) {
                            (Some((runs, row_len)), Some(b)) => {
                                View::Rows { model, fill: plan.src(b), runs, row_len: *row_len }
                            }
                            _ => View::Direct(model),
                        }
                    })
                    .collect(),
            },
        };
        f(&inputs)
    }
}

/// A vocabulary matrix under `tokenizer_source: union`: the tensor in each
/// involved input (the base, then the models) and which of their rows each
/// output row reads.
#[derive(Clone, Debug)]
pub(crate) struct UnionRows {
    pub sources: Vec<Source>,
    pub table: RowTable,
}

/// The merged vocabulary of a `tokenizer_source: union` merge: the base's,
/// then the tokens only other models have.
#[derive(Clone, Debug, Default)]
pub(crate) struct VocabUnion {
    /// Rows of the base's vocabulary matrices (new ids start here).
    pub base_rows: u64,
    /// New tokens: id, string, and the input whose tokenizer has it.
    pub added: Vec<(u64, String, usize)>,
}

/// One tensor of the output.
#[derive(Clone, Debug)]
pub(crate) struct OutTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub op: Op,
}

impl OutTensor {
    pub(crate) fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.numel() * self.dtype.bits() / 8
    }
}

/// One output shard file.
#[derive(Clone, Debug)]
pub(crate) struct OutShard {
    pub file_name: String,
    pub tensors: Range<usize>,
    /// The file's first bytes: length prefix and JSON header.
    pub header: Vec<u8>,
    /// Total file size.
    pub size: u64,
}

/// The whole job.
pub(crate) struct Plan {
    pub inputs: Vec<Input>,
    pub tensors: Vec<OutTensor>,
    pub shards: Vec<OutShard>,
    pub embeddings: Vec<EmbeddingReport>,
    /// Selected-out tensors left out of an extracted vector.
    pub omitted: Vec<String>,
    pub warnings: Vec<String>,
    /// The merged vocabulary of a `tokenizer_source: union` merge.
    pub vocab_union: Option<VocabUnion>,
    /// The factor each tensor's vector is multiplied by, per variant of the
    /// output (`scales[variant][tensor]`; `None` where the formula has no
    /// scale, or the tensor no formula). One variant for every job but a
    /// sweep, which writes one per candidate from one read of the inputs.
    /// The CPU and the GPU both take a tensor's scale from here, through
    /// `segments`, so they cannot compute with different ones.
    pub scales: Vec<TensorScales>,
    /// Consecutive output tensors stored as one (experts written fused);
    /// every other tensor is stored as itself.
    pub groups: Vec<Group>,
    /// How inputs whose experts are stored differently were lined up.
    pub experts: Option<experts::ExpertPlan>,
    /// The weights written quantized again (`--out-dtype fp8|mxfp4`), if any.
    pub requant: Requant,
}

/// Consecutive output tensors `tensors`, computed one by one, stored as
/// one tensor `name` of `shape` (their bytes in order): a layer's experts
/// written in the fused layout.
#[derive(Clone, Debug)]
pub(crate) struct Group {
    pub name: String,
    pub shape: Vec<u64>,
    pub tensors: Range<usize>,
}

/// Per output tensor, its scale in one variant (see `Plan::scales`).
pub(crate) type TensorScales = Vec<Option<f32>>;

/// One variant's scales for `tensors`: `scale(tensor)` for each scaled
/// formula, `None` elsewhere.
pub(crate) fn scales_of(tensors: &[OutTensor], mut scale: impl FnMut(&OutTensor) -> f32) -> TensorScales {
    tensors
        .iter()
        .map(|t| match &t.op {
            Op::Arith { formula, .. } if formula.is_scaled() => Some(scale(t)),
            _ => None,
        })
        .collect()
}

impl Plan {
    /// The tensors the output files store, over output tensors `range`
    /// (a shard's): one per tensor, or one per group.
    pub(crate) fn stored(&self, range: Range<usize>) -> Vec<shards::Stored<'_>> {
        shards::stored(&self.tensors, &self.groups)
            .into_iter()
            .filter(|s| range.contains(&s.tensors.start))
            .collect()
    }

    /// Bytes of all output shard files.
    pub(crate) fn output_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.size).sum()
    }

    pub(crate) fn input_tensor(&self, s: Source) -> &Tensor {
        &self.inputs[s.input].ckpt.tensors[s.tensor]
    }

    pub(crate) fn input_bytes(&self, s: Source) -> &[u8] {
        let ck = &self.inputs[s.input].ckpt;
        ck.bytes(&ck.tensors[s.tensor])
    }

    /// A merge method the plan uses that has no CUDA kernels.
    pub(crate) fn cpu_only_method(&self) -> Option<&'static str> {
        self.tensors.iter().find_map(|t| match &t.op {
            Op::Merge(m) if !m.merge.method.on_gpu() => Some(m.merge.method.name()),
            _ => None,
        })
    }

    /// Whether any tensor is a low-rank (LoRA) update, or reads an input
    /// through its adapter (`model+lora`): only the CPU computes those.
    pub(crate) fn has_low_rank(&self) -> bool {
        self.inputs.iter().any(|i| i.lora.is_some())
            || self
                .tensors
                .iter()
                .any(|t| matches!(t.op, Op::Arith { formula: Formula::AddLowRank { .. }, .. }))
    }

    /// An input tensor as a merge reads it: with its input's LoRA update
    /// merged where the input has one for it.
    pub(crate) fn src(&self, s: Source) -> Src<'_> {
        if let Some(q) = self.quantized(s) {
            return Src::Quantized(q);
        }
        let Some(patch) = self.inputs[s.input].lora.as_ref().and_then(|o| o.patches.get(&s.tensor)) else {
            return Src::Plain(self.operand(s));
        };
        match *patch {
            lora::Patch::Replace(with) => Src::Plain(self.operand(with)),
            lora::Patch::LowRank { onto, a, b, transposed, rows, cols, scale, round } => {
                Src::Patched(crate::arith::lowrank::Patched {
                    base: self.operand(onto.unwrap_or(s)),
                    factors: self.low_rank(a, b, transposed, rows, cols),
                    scale,
                    round,
                })
            }
        }
    }

    /// The factors `lora_A` (`a`) and `lora_B` (`b`) of a `rows x cols`
    /// low-rank update, as operands (the rank is A's row count).
    fn low_rank(&self, a: Source, b: Source, transposed: bool, rows: u64, cols: u64) -> LowRank<'_> {
        LowRank {
            a: self.operand(a),
            b: self.operand(b),
            rank: self.input_tensor(a).shape[0] as usize,
            transposed,
            rows,
            cols,
        }
    }

    /// The adapter tensors input tensor `s` is read with (none for a
    /// plain input).
    pub(crate) fn patch_sources(&self, s: Source) -> Vec<Source> {
        match self.inputs[s.input].lora.as_ref().and_then(|o| o.patches.get(&s.tensor)) {
            None => Vec::new(),
            Some(lora::Patch::Replace(with)) => vec![*with],
            Some(lora::Patch::LowRank { onto, a, b, .. }) => onto.iter().copied().chain([*a, *b]).collect(),
        }
    }

    /// An input tensor as an arithmetic operand. Planning refused every
    /// computed tensor whose inputs are not BF16, F16 or F32, or quantized
    /// (read through `quantized` or `operand_in` instead).
    pub(crate) fn operand(&self, s: Source) -> Operand<'_> {
        let ty = self.input_tensor(s).dtype.float().expect("planning checked float dtypes");
        Operand { ty, bytes: self.input_bytes(s) }
    }

    /// Elements `at..at + n` of input tensor `s` as an operand: its own
    /// bytes, or for a quantized tensor, decoded to f32 in `arena` (the
    /// job's scratch, freed with it).
    pub(crate) fn operand_in<'a>(&'a self, s: Source, at: u64, n: u64, arena: &'a Bump) -> Operand<'a> {
        let Some(q) = self.quantized(s) else { return self.operand(s).slice(at as usize, n as usize) };
        // MXFP4 as bf16: the same values, half the bytes, the bf16 path.
        let bf16 = matches!(q, Quantized::Mxfp4 { .. });
        let bits = arena.alloc_slice_fill_copy(if bf16 { n as usize } else { 0 }, 0u16);
        if q.decode_bf16_at(at, bits) {
            if cfg!(target_endian = "little") {
                return Operand { ty: FloatType::BF16, bytes: bytemuck::cast_slice(bits) };
            }
            let bytes = arena.alloc_slice_fill_copy(n as usize * 2, 0u8);
            for (d, b) in bytes.chunks_exact_mut(2).zip(bits.iter()) {
                d.copy_from_slice(&b.to_le_bytes());
            }
            return Operand { ty: FloatType::BF16, bytes };
        }
        let values = arena.alloc_slice_fill_copy(n as usize, 0f32);
        q.decode_at(at, values);
        // F32 operands are little-endian bytes: the decoded slice is one
        // as it stands on a little-endian machine, and is encoded elsewhere.
        if cfg!(target_endian = "little") {
            return Operand { ty: FloatType::F32, bytes: bytemuck::cast_slice(values) };
        }
        let bytes = arena.alloc_slice_fill_copy(n as usize * 4, 0u8);
        encode(FloatType::F32, values, bytes);
        Operand { ty: FloatType::F32, bytes }
    }

    /// Input tensor `s` as a quantized operand, when it is one.
    pub(crate) fn quantized(&self, s: Source) -> Option<Quantized<'_>> {
        let ck = &self.inputs[s.input].ckpt;
        let t = self.input_tensor(s);
        let q = t.quant.as_ref()?;
        let scales = ck.bytes(&q.scales);
        Some(match q.scheme {
            Scheme::Fp8Block { block } => {
                let [.., rows, cols] = t.shape[..] else { unreachable!("folding checked FP8 matrices") };
                let scale_type = match q.scales.dtype.float() {
                    Some(f) => ScaleType::Float(f),
                    None => ScaleType::E8m0,
                };
                Quantized::Fp8 {
                    e5m2: t.dtype == DType::F8E5M2,
                    codes: ck.bytes(t),
                    rows,
                    cols,
                    block,
                    scales,
                    scale_type,
                }
            }
            Scheme::Mxfp4 => {
                Quantized::Mxfp4 { blocks: ck.bytes(t), scales, rows: t.shape[2], groups: t.shape[1] / 32 }
            }
        })
    }

    /// Whether any input tensor the plan reads is quantized: only the CPU
    /// decodes those.
    pub(crate) fn has_quantized(&self) -> bool {
        let quantized = |s: Source| self.input_tensor(s).quant.is_some();
        self.tensors.iter().any(|t| match &t.op {
            Op::Copy(_) => false,
            Op::Convert(s) => quantized(*s),
            Op::Arith { formula, .. } => {
                quantized(formula.base()) || formula.vector_sources().into_iter().any(quantized)
            }
            Op::Merge(m) => {
                m.base.iter().chain(&m.models).any(|s| quantized(*s))
                    || m.union.as_ref().is_some_and(|u| u.sources.iter().any(|s| quantized(*s)))
            }
            Op::AddVectors(v) => quantized(v.base) || v.vector_sources().any(quantized),
            Op::QuantScales(_) => false,
        })
    }

    /// Whether the plan adds several vectors in one pass: only the CPU
    /// computes those.
    pub(crate) fn has_vector_sum(&self) -> bool {
        self.tensors.iter().any(|t| matches!(t.op, Op::AddVectors(_)))
    }

    /// The variants of the output (a sweep's candidates; else one).
    pub(crate) fn variants(&self) -> usize {
        self.scales.len().max(1)
    }

    /// Tensor `tensor`'s scale in `variant` (`None`: it has none).
    pub(crate) fn scale(&self, variant: usize, tensor: usize) -> Option<f32> {
        self.scales.get(variant).and_then(|s| s.get(tensor).copied().flatten())
    }

    /// Elements `elems` of output tensor `tensor` (a Convert or Arith op)
    /// cut into segments along the vector's row runs, with the tensor's
    /// scale in `variant`: rows outside every run are the base converted,
    /// rows inside one apply the formula to the vector's rows. Empty for
    /// other ops.
    /// Quantized inputs are decoded into `arena`.
    pub(crate) fn segments<'a>(
        &'a self,
        tensor: usize,
        elems: &Range<u64>,
        variant: usize,
        arena: &'a Bump,
    ) -> Vec<(Range<u64>, Segment<'a>)> {
        let slice = |s: Source, at: u64, n: u64| self.operand_in(s, at, n, arena);
        let scale = self.scale(variant, tensor).unwrap_or(1.0);
        match &self.tensors[tensor].op {
            Op::Convert(src) => {
                vec![(elems.clone(), Segment::Convert(slice(*src, elems.start, elems.end - elems.start)))]
            }
            Op::Arith { formula, runs, row_len } => stretches(runs, *row_len, elems.clone())
                .map(|st| {
                    let (p, n) = (st.range.start, st.range.end - st.range.start);
                    let base = slice(formula.base(), p, n);
                    let seg = match (st.vector, *formula) {
                        (None, _) => Segment::Convert(base),
                        (Some(v), Formula::Diff { chat, pre }) => {
                            Segment::Diff(slice(chat, v, n), slice(pre, v, n))
                        }
                        (Some(v), Formula::AddDiff { chat, pre, .. }) => {
                            Segment::AddDiff(base, slice(chat, v, n), slice(pre, v, n), scale)
                        }
                        (Some(v), Formula::AddScaled { vector, .. }) => {
                            Segment::AddScaled(base, slice(vector, v, n), scale)
                        }
                        (Some(_), Formula::AddLowRank { a, b, transposed, rows, cols, .. }) => {
                            let factors = self.low_rank(a, b, transposed, rows, cols);
                            Segment::AddLowRank { base, factors, first: p, scale }
                        }
                    };
                    (st.range, seg)
                })
                .collect(),
            Op::AddVectors(v) => self.vector_sum_segments(v, elems, arena),
            Op::Copy(_) | Op::Merge(_) | Op::QuantScales(_) => Vec::new(),
        }
    }

    /// `segments` of several vectors: `elems` cut wherever any vector's
    /// rows start or stop, each piece with the vectors that have rows
    /// there (the base converted where none has).
    fn vector_sum_segments<'a>(
        &'a self,
        v: &'a VectorSum,
        elems: &Range<u64>,
        arena: &'a Bump,
    ) -> Vec<(Range<u64>, Segment<'a>)> {
        let mut cuts: Vec<u64> = v
            .terms
            .iter()
            .flat_map(|t| stretches(&t.runs, t.row_len, elems.clone()).map(|s| s.range.end))
            .collect();
        cuts.push(elems.start);
        cuts.sort_unstable();
        cuts.dedup();
        cuts.windows(2)
            .map(|w| {
                let (p, n) = (w[0], w[1] - w[0]);
                let base = self.operand_in(v.base, p, n, arena);
                // Each piece lies inside one stretch of every vector.
                let terms = v.terms.iter().filter_map(|t| {
                    let at = stretches(&t.runs, t.row_len, p..w[1]).next()?.vector?;
                    Some(Term {
                        x: self.operand_in(t.x, at, n, arena),
                        pre: t.pre.map(|pre| self.operand_in(pre, at, n, arena)),
                        scale: t.scale,
                    })
                });
                let terms: Vec<Term> = terms.collect();
                let seg = if terms.is_empty() {
                    Segment::Convert(base)
                } else {
                    Segment::AddTerms { base, terms: arena.alloc_slice_copy(&terms) }
                };
                (p..w[1], seg)
            })
            .collect()
    }
}
