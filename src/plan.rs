//! The whole job as data, built and checked before a byte is written: for
//! every output tensor, what it is computed from, its dtype and its shard.
//! Name, shape, dtype, architecture and vocabulary conflicts fail here, with
//! the first offending tensors listed.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::ops::Range;

use crate::arith::{Operand, View};
use crate::checkpoint::{Checkpoint, Tensor, is_lm_head, is_vocab_matrix};
use crate::config::architecture_differences;
use crate::dtype::{DType, FloatType};
use crate::embeddings::{EmbeddingPolicy, RowMap, RowRun, Vocabs, match_rows};
use crate::error::{Error, Result};
use crate::format::{OutTensorSpec, build_header};
use crate::methods::{Method, TensorParams};
use crate::select::Selection;
use crate::tokenizer::Vocab;

/// How many problems a mismatch error lists before summarizing the rest.
const MAX_LISTED: usize = 10;

/// What an input checkpoint is to the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Base,
    Chat,
    Pretrained,
    Vector,
    /// A model merged by a merge method (other than the base).
    Model,
}

/// An input checkpoint and its role.
pub struct Input {
    pub role: Role,
    /// How the user named it (path, Hub id or alias).
    pub label: String,
    pub ckpt: Checkpoint,
}

impl Input {
    /// An input labelled by its directory (callers that know the user's
    /// reference replace the label).
    pub fn new(role: Role, ckpt: Checkpoint) -> Input {
        Input { role, label: ckpt.dir.display().to_string(), ckpt }
    }
}

/// A tensor of an input: `inputs[input].ckpt.tensors[tensor]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Source {
    pub input: usize,
    pub tensor: usize,
}

/// The arithmetic for one output tensor. Operation order is part of the
/// numeric contract: `d = chat - pre; m = scale * d; out = base + m`, each
/// step an f32 operation rounded on its own (no fused multiply-add).
#[derive(Clone, Copy, Debug)]
pub enum Formula {
    /// `chat - pre` (extract).
    Diff { chat: Source, pre: Source },
    /// `base + scale * (chat - pre)` (apply, streaming form).
    AddDiff { base: Source, chat: Source, pre: Source, scale: f32 },
    /// `base + scale * vector` (apply, stored vector).
    AddScaled { base: Source, vector: Source, scale: f32 },
}

impl Formula {
    /// The input whose elements line up with the output's.
    pub fn base(&self) -> Source {
        match *self {
            Formula::Diff { chat, .. } => chat,
            Formula::AddDiff { base, .. } | Formula::AddScaled { base, .. } => base,
        }
    }
}

/// How one output tensor is produced.
#[derive(Clone, Debug)]
pub enum Op {
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
}

/// One tensor of a merge: the method, its inputs and resolved parameters.
#[derive(Clone, Debug)]
pub struct MergeOp {
    pub method: Method,
    /// The base model's tensor (all methods but linear).
    pub base: Option<Source>,
    /// The merged models' tensors, in `params.models` order.
    pub models: Vec<Source>,
    pub params: TensorParams,
    /// Seed of the random masks (DARE, DELLA).
    pub seed: u64,
    /// Per model, for a vocabulary matrix whose rows differ from the base's:
    /// which base rows its rows go to (row length in elements).
    pub rows: Vec<Option<(Vec<RowRun>, u64)>>,
    /// A vocabulary matrix of a `tokenizer_source: union` merge.
    pub union: Option<Box<UnionRows>>,
}

impl MergeOp {
    /// Model `k`'s tensor in the output's element positions.
    pub fn view<'a>(&'a self, plan: &'a Plan, k: usize) -> View<'a> {
        if let Some(u) = &self.union {
            return View::Table { plan, rows: u, which: k + 1 };
        }
        let model = plan.operand(self.models[k]);
        match (&self.rows[k], self.base) {
            (Some((runs, row_len)), Some(b)) => {
                View::Rows { model, fill: plan.operand(b), runs, row_len: *row_len }
            }
            _ => View::Direct(model),
        }
    }

    /// The base's tensor in the output's element positions.
    pub fn base_view<'a>(&'a self, plan: &'a Plan) -> Option<View<'a>> {
        let b = self.base?;
        Some(match &self.union {
            Some(u) => View::Table { plan, rows: u, which: 0 },
            None => View::Direct(plan.operand(b)),
        })
    }
}

/// Where one row of a vocabulary matrix in the union vocabulary comes from
/// for one input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RowSrc {
    /// Row `row` of `UnionRows::sources[source]`.
    Row { source: usize, row: u64 },
    /// The mean of the rows `UnionRows::means[i]` lists (a token the input
    /// lacks that several other inputs have), as mergekit fills it.
    Mean(usize),
}

/// A vocabulary matrix under `tokenizer_source: union`: for the base and
/// each model, which row of which input each output row reads.
#[derive(Clone, Debug)]
pub struct UnionRows {
    pub row_len: u64,
    /// The tensor in each involved input: the base, then the models.
    pub sources: Vec<Source>,
    /// Per involved input (same order), one entry per output row.
    pub tables: Vec<Vec<RowSrc>>,
    /// (source, row) lists for `RowSrc::Mean`.
    pub means: Vec<Vec<(usize, u64)>>,
}

/// The merged vocabulary of a `tokenizer_source: union` merge: the base's,
/// then the tokens only other models have.
#[derive(Clone, Debug, Default)]
pub struct VocabUnion {
    /// Rows of the base's vocabulary matrices (new ids start here).
    pub base_rows: u64,
    /// New tokens: id, string, and the input whose tokenizer has it.
    pub added: Vec<(u64, String, usize)>,
}

/// One tensor of the output.
#[derive(Clone, Debug)]
pub struct OutTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub op: Op,
}

impl OutTensor {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
    pub fn bytes(&self) -> u64 {
        self.numel() * self.dtype.bits() / 8
    }
}

/// One output shard file.
#[derive(Clone, Debug)]
pub struct OutShard {
    pub file_name: String,
    pub tensors: Range<usize>,
    /// The file's first bytes: length prefix and JSON header.
    pub header: Vec<u8>,
    /// Total file size.
    pub size: u64,
}

/// A row-matching decision for one vocabulary matrix, for the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EmbeddingReport {
    pub tensor: String,
    pub rows: u64,
    pub rows_with_vector: u64,
    pub policy: EmbeddingPolicy,
}

/// The whole job.
pub struct Plan {
    pub inputs: Vec<Input>,
    pub tensors: Vec<OutTensor>,
    pub shards: Vec<OutShard>,
    pub embeddings: Vec<EmbeddingReport>,
    /// Selected-out tensors left out of an extracted vector.
    pub omitted: Vec<String>,
    pub warnings: Vec<String>,
    /// The merged vocabulary of a `tokenizer_source: union` merge.
    pub vocab_union: Option<VocabUnion>,
}

impl Plan {
    /// Bytes of all output shard files.
    pub fn output_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.size).sum()
    }

    pub fn input_tensor(&self, s: Source) -> &Tensor {
        &self.inputs[s.input].ckpt.tensors[s.tensor]
    }

    pub fn input_bytes(&self, s: Source) -> &[u8] {
        let ck = &self.inputs[s.input].ckpt;
        ck.bytes(&ck.tensors[s.tensor])
    }

    /// An input tensor as an arithmetic operand; the plan checked its dtype.
    pub fn operand(&self, s: Source) -> Operand<'_> {
        let ty = self.input_tensor(s).dtype.float().expect("plan checked float dtypes");
        Operand { ty, bytes: self.input_bytes(s) }
    }

    /// A readable listing of the plan, for `--dry-run`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for i in &self.inputs {
            let _ = write!(
                out,
                "input {:?} {}: {} ({} shards)",
                i.role,
                i.label,
                i.ckpt.dir.display(),
                i.ckpt.shards.len()
            );
            if let Some(o) = &i.ckpt.origin {
                let _ = write!(out, " {}@{} commit {}", o.repo, o.revision, o.commit);
            }
            out.push('\n');
        }
        for sh in &self.shards {
            let _ = writeln!(out, "shard {} ({} bytes)", sh.file_name, sh.size);
            for t in &self.tensors[sh.tensors.clone()] {
                let _ = writeln!(out, "  {} {} {:?}: {}", t.name, t.dtype, t.shape, self.describe_op(&t.op));
            }
        }
        out
    }

    fn describe_op(&self, op: &Op) -> String {
        let name = |s: Source| {
            format!("{:?}:{}", self.inputs[s.input].role, self.input_tensor(s).name).to_lowercase()
        };
        match op {
            Op::Copy(s) => format!("copy {}", name(*s)),
            Op::Convert(s) => format!("convert {}", name(*s)),
            Op::Merge(m) => {
                let mut parts = Vec::new();
                if let Some(b) = m.base {
                    parts.push(format!("base={}", self.inputs[b.input].label));
                }
                for (s, mp) in m.models.iter().zip(&m.params.models) {
                    let mut p = format!("{}(weight={}", self.inputs[s.input].label, mp.weight);
                    if m.method.sparsify().is_some() {
                        let _ = write!(p, ", density={}", mp.density);
                    }
                    p.push(')');
                    parts.push(p);
                }
                let q = &m.params;
                let extra = match m.method {
                    Method::Slerp => format!(" t={}", q.t),
                    Method::ModelStock => format!(" filter_wise={}", q.filter_wise),
                    Method::Linear => format!(" normalize={}", q.normalize),
                    _ => format!(" normalize={} rescale={} lambda={}", q.normalize, q.rescale, q.lambda),
                };
                format!("{} {}{extra}", m.method.name(), parts.join(" "))
            }
            Op::Arith { formula, runs, row_len } => {
                let f = match *formula {
                    Formula::Diff { chat, pre } => format!("{} - {}", name(chat), name(pre)),
                    Formula::AddDiff { base, chat, pre, scale } => {
                        format!("{} + {scale} * ({} - {})", name(base), name(chat), name(pre))
                    }
                    Formula::AddScaled { base, vector, scale } => {
                        format!("{} + {scale} * {}", name(base), name(vector))
                    }
                };
                if *row_len > 1 {
                    let rows: u64 = runs.iter().map(|r| r.rows).sum();
                    format!("{f} on {rows} rows")
                } else {
                    f
                }
            }
        }
    }
}

/// Collects problems and turns them into one error listing the first few.
pub(crate) struct Problems {
    what: &'static str,
    list: Vec<String>,
}

impl Problems {
    pub(crate) fn new(what: &'static str) -> Problems {
        Problems { what, list: Vec::new() }
    }
    pub(crate) fn push(&mut self, p: String) {
        self.list.push(p);
    }
    pub(crate) fn into_result(self) -> Result<()> {
        if self.list.is_empty() {
            return Ok(());
        }
        let n = self.list.len();
        let mut problems: Vec<String> = self.list.into_iter().take(MAX_LISTED).collect();
        if n > MAX_LISTED {
            problems.push(format!("... and {} more", n - MAX_LISTED));
        }
        Err(Error::Mismatch { what: self.what.to_string(), problems })
    }
}

/// Settings shared by extract and apply.
pub struct Common {
    pub selection: Selection,
    pub shard_size: u64,
    pub allow_mismatch: bool,
}

/// Options of `apply`.
pub struct ApplyOptions {
    pub common: Common,
    pub embeddings: EmbeddingPolicy,
    pub out_dtype: Option<FloatType>,
}

/// The vector side of `apply`.
pub enum VectorSide {
    /// `--vector DIR`: a stored vector; `omitted` lists tensors its extract
    /// left out on purpose (they are copied from the base).
    Stored { vector: Box<Checkpoint>, omitted: HashSet<String> },
    /// `--chat M --pretrained M`: computed on the fly.
    Streaming { chat: Box<Checkpoint>, pretrained: Box<Checkpoint> },
}

pub(crate) fn float_of(ck: &Checkpoint, t: &Tensor, hint_flag: &str) -> Result<FloatType> {
    t.dtype.float().ok_or_else(|| {
        Error::UnsupportedDtype {
            file: ck.file_of(t).to_path_buf(),
            tensor: t.name.clone(),
            dtype: t.dtype.name().to_string(),
        }
        .with_hint(format!("leave it out with {hint_flag} '^{}$'", regex::escape(&t.name)))
    })
}

/// Compares architectures; differences are errors unless `allow`.
pub(crate) fn check_configs(
    a: &Checkpoint,
    b: &Checkpoint,
    allow: bool,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let (Some(ca), Some(cb)) = (&a.config, &b.config) else {
        for ck in [a, b] {
            if ck.config.is_none() {
                warnings.push(format!(
                    "{} has no config.json; architectures were not compared",
                    ck.dir.display()
                ));
            }
        }
        return Ok(());
    };
    let diffs = architecture_differences(ca, cb);
    if diffs.is_empty() {
        return Ok(());
    }
    if allow {
        warnings.extend(diffs.into_iter().map(|d| format!("--allow-mismatch: {d}")));
        return Ok(());
    }
    let mut p = Problems::new("the models' architectures differ");
    diffs.into_iter().for_each(|d| p.push(d));
    p.into_result().map_err(|e| e.with_hint("pass --allow-mismatch if you are sure the weights line up"))
}

pub(crate) fn read_vocab(ck: &Checkpoint) -> Result<Option<Vocab>> {
    let p = ck.dir.join("tokenizer.json");
    if p.is_file() { Vocab::read(&p).map(Some) } else { Ok(None) }
}

/// Plans `extract`: `chat - pretrained` for every selected tensor of the
/// chat model, in the chat model's order.
pub fn plan_extract(
    chat: Checkpoint,
    pre: Checkpoint,
    common: &Common,
    dtype: Option<FloatType>,
) -> Result<Plan> {
    let mut warnings = Vec::new();
    check_configs(&chat, &pre, common.allow_mismatch, &mut warnings)?;
    let mut problems = Problems::new("the chat and pretrained models do not line up");
    let mut tensors = Vec::new();
    let mut omitted = Vec::new();
    let sel = &common.selection;
    let mut names: Vec<(String, Option<usize>)> =
        chat.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), Some(i))).collect();
    // A tied chat model paired with an untied pretrained one: the vector
    // still needs the output projection's difference.
    if chat.is_tied()
        && let Some(h) = pre.tensors.iter().find(|t| is_lm_head(&t.name))
    {
        names.push((h.name.clone(), None));
    }
    for (name, _) in &names {
        if !sel.selects(name) {
            omitted.push(name.clone());
            continue;
        }
        let (Some(c), Some(p)) = (chat.logical(name), pre.logical(name)) else {
            problems.push(format!("'{name}' is in {} but not in {}", chat.dir.display(), pre.dir.display()));
            continue;
        };
        let cf = float_of(&chat, c, "--exclude")?;
        float_of(&pre, p, "--exclude")?;
        if c.shape != p.shape {
            problems.push(format!("'{name}': chat shape {:?} vs pretrained {:?}", c.shape, p.shape));
            continue;
        }
        let src = |ck: &Checkpoint, input: usize, t: &Tensor| Source {
            input,
            tensor: ck.logical_index(&t.name).unwrap(),
        };
        let out_ty = dtype.unwrap_or(cf);
        tensors.push(OutTensor {
            name: name.clone(),
            dtype: out_ty.dtype(),
            shape: c.shape.clone(),
            op: Op::Arith {
                formula: Formula::Diff { chat: src(&chat, 0, c), pre: src(&pre, 1, p) },
                runs: vec![RowRun { base_row: 0, vector_row: 0, rows: c.numel() }],
                row_len: 1,
            },
        });
    }
    for t in &pre.tensors {
        if chat.logical(&t.name).is_none() && sel.selects(&t.name) {
            problems.push(format!(
                "'{}' is in {} but not in {}",
                t.name,
                pre.dir.display(),
                chat.dir.display()
            ));
        }
    }
    problems.into_result()?;
    if tensors.is_empty() {
        return Err(Error::Usage("no tensor is selected; check --include / --exclude".into()));
    }
    let shards = assign_shards(&tensors, common.shard_size);
    Ok(Plan {
        inputs: vec![Input::new(Role::Chat, chat), Input::new(Role::Pretrained, pre)],
        tensors,
        shards,
        embeddings: Vec::new(),
        omitted,
        warnings,
        vocab_union: None,
    })
}

/// Plans `apply`: the base model's tensors, names, order and dtypes (or
/// `--out-dtype`), with the scaled vector added to the selected ones.
pub fn plan_apply(base: Checkpoint, side: VectorSide, opts: &ApplyOptions) -> Result<Plan> {
    let common = &opts.common;
    let sel = &common.selection;
    let mut warnings = Vec::new();
    // Index 0 is the base; the vector side follows.
    let (vector_cks, omitted_ok): (Vec<(Role, Checkpoint)>, HashSet<String>) = match side {
        VectorSide::Stored { vector, omitted } => {
            check_configs(&base, &vector, common.allow_mismatch, &mut warnings)?;
            (vec![(Role::Vector, *vector)], omitted)
        }
        VectorSide::Streaming { chat, pretrained } => {
            check_configs(&chat, &pretrained, common.allow_mismatch, &mut warnings)?;
            check_configs(&base, &chat, common.allow_mismatch, &mut warnings)?;
            (vec![(Role::Chat, *chat), (Role::Pretrained, *pretrained)], HashSet::new())
        }
    };
    let base_vocab = read_vocab(&base)?;
    let vector_vocab = read_vocab(&vector_cks[0].1)?;
    let vocabs = Vocabs { base: base_vocab.as_ref(), vector: vector_vocab.as_ref() };
    let mut problems = Problems::new("the base model and the chat vector do not line up");

    // A tied base has one matrix for input and output; a vector that changes
    // them differently cannot be applied to it faithfully.
    let vector_has_head = vector_cks.iter().any(|(_, ck)| ck.tensors.iter().any(|t| is_lm_head(&t.name)));
    if base.is_tied()
        && vector_has_head
        && opts.embeddings != EmbeddingPolicy::Skip
        && base.embedding().is_some_and(|e| sel.selects(&e.name))
    {
        return Err(Error::Usage(format!(
            "{} ties lm_head to its embeddings, but the chat vector has a separate lm_head; one matrix cannot take both changes",
            base.dir.display()
        ))
        .with_hint("pass --embeddings skip to leave the embeddings as in the base"));
    }

    let mut tensors = Vec::with_capacity(base.tensors.len());
    let mut embeddings = Vec::new();
    for (bi, bt) in base.tensors.iter().enumerate() {
        let base_src = Source { input: 0, tensor: bi };
        let copy_op = |out: DType| -> Result<Op> {
            if out == bt.dtype {
                Ok(Op::Copy(base_src))
            } else {
                float_of(&base, bt, "--exclude").map(|_| Op::Convert(base_src))
            }
        };
        let out_dtype = match (opts.out_dtype, bt.dtype.float()) {
            (Some(o), Some(_)) => o.dtype(),
            _ => bt.dtype,
        };
        let vocab_matrix = is_vocab_matrix(&bt.name);
        if !sel.selects(&bt.name) || (vocab_matrix && opts.embeddings == EmbeddingPolicy::Skip) {
            tensors.push(OutTensor {
                name: bt.name.clone(),
                dtype: out_dtype,
                shape: bt.shape.clone(),
                op: copy_op(out_dtype)?,
            });
            continue;
        }
        float_of(&base, bt, "--exclude")?;
        let lookup: Vec<Option<usize>> =
            vector_cks.iter().map(|(_, ck)| ck.logical_index(&bt.name)).collect();
        if let Some(k) = lookup.iter().position(Option::is_none) {
            if omitted_ok.contains(&bt.name) {
                tensors.push(OutTensor {
                    name: bt.name.clone(),
                    dtype: out_dtype,
                    shape: bt.shape.clone(),
                    op: copy_op(out_dtype)?,
                });
            } else {
                problems.push(format!(
                    "'{}' is in the base but not in {}",
                    bt.name,
                    vector_cks[k].1.dir.display()
                ));
            }
            continue;
        }
        // Sources on the vector side, inputs 1.. in order.
        let found: Vec<Source> =
            lookup.iter().enumerate().map(|(k, i)| Source { input: k + 1, tensor: i.unwrap() }).collect();
        for (k, s) in found.iter().enumerate() {
            let ck = &vector_cks[k].1;
            float_of(ck, &ck.tensors[s.tensor], "--exclude")?;
        }
        let shape_of = |s: &Source| &vector_cks[s.input - 1].1.tensors[s.tensor].shape;
        let vshape = shape_of(&found[0]);
        if found.len() == 2 && shape_of(&found[1]) != vshape {
            problems.push(format!(
                "'{}': chat shape {:?} vs pretrained {:?}",
                bt.name,
                vshape,
                shape_of(&found[1])
            ));
            continue;
        }
        let same_row_shape = vshape.len() == bt.shape.len() && vshape.get(1..) == bt.shape.get(1..);
        let (runs, row_len) = if vocab_matrix && same_row_shape && !bt.shape.is_empty() {
            let rm: RowMap = match_rows(&bt.name, opts.embeddings, bt.shape[0], vshape[0], &vocabs)?;
            if let Some(w) = &rm.warning {
                warnings.push(w.clone());
            }
            embeddings.push(EmbeddingReport {
                tensor: bt.name.clone(),
                rows: bt.shape[0],
                rows_with_vector: rm.matched(),
                policy: rm.how,
            });
            (rm.runs, bt.shape[1..].iter().product())
        } else if *vshape == bt.shape {
            (vec![RowRun { base_row: 0, vector_row: 0, rows: bt.numel() }], 1)
        } else {
            problems.push(format!("'{}': base shape {:?} vs vector {:?}", bt.name, bt.shape, vshape));
            continue;
        };
        let scale = sel.scale(&bt.name);
        let formula = match found[..] {
            [chat, pre] => Formula::AddDiff { base: base_src, chat, pre, scale },
            [vector] => Formula::AddScaled { base: base_src, vector, scale },
            _ => unreachable!("one or two vector-side inputs"),
        };
        tensors.push(OutTensor {
            name: bt.name.clone(),
            dtype: out_dtype,
            shape: bt.shape.clone(),
            op: Op::Arith { formula, runs, row_len },
        });
    }
    // Tensors of the vector side the base does not have mean the
    // architectures differ.
    for (_, ck) in &vector_cks {
        for t in &ck.tensors {
            if base.logical(&t.name).is_none() && sel.selects(&t.name) {
                problems.push(format!(
                    "'{}' is in {} but not in the base {}",
                    t.name,
                    ck.dir.display(),
                    base.dir.display()
                ));
            }
        }
    }
    problems.into_result()?;
    let shards = assign_shards(&tensors, common.shard_size);
    let mut inputs = vec![Input::new(Role::Base, base)];
    inputs.extend(vector_cks.into_iter().map(|(role, ckpt)| Input::new(role, ckpt)));
    Ok(Plan { inputs, tensors, shards, embeddings, omitted: Vec::new(), warnings, vocab_union: None })
}

/// Splits tensors into shards of at most `max` bytes of data each (a tensor
/// larger than `max` gets a shard of its own), as transformers does.
pub fn assign_shards(tensors: &[OutTensor], max: u64) -> Vec<OutShard> {
    let specs: Vec<OutTensorSpec> =
        tensors.iter().map(|t| OutTensorSpec { name: &t.name, dtype: t.dtype, shape: &t.shape }).collect();
    layout_shards(&specs, max)
}

/// Lays out shard files for `specs` in order, at most `max` data bytes each,
/// named `model.safetensors` or `model-0000i-of-0000n.safetensors`.
pub fn layout_shards(specs: &[OutTensorSpec<'_>], max: u64) -> Vec<OutShard> {
    let bytes = |t: &OutTensorSpec| t.shape.iter().product::<u64>() * t.dtype.bits() / 8;
    let mut ranges: Vec<Range<usize>> = Vec::new();
    let mut start = 0;
    let mut size = 0u64;
    for (i, t) in specs.iter().enumerate() {
        if i > start && size + bytes(t) > max {
            ranges.push(start..i);
            start = i;
            size = 0;
        }
        size += bytes(t);
    }
    ranges.push(start..specs.len());
    let n = ranges.len();
    ranges
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let (header, data) = build_header(&specs[r.clone()]);
            let file_name = if n == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
            };
            let size = header.len() as u64 + data;
            OutShard { file_name, tensors: r, header, size }
        })
        .collect()
}
