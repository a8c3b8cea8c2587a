//! Plans of the chat-vector jobs: `extract` writes `chat - pretrained`,
//! `apply` writes `base + scale * vector` over the base's tensors, names,
//! order and dtypes.

use std::collections::HashSet;

use crate::arith::rows::RowRun;
use crate::error::{Error, Result};
use crate::model::checkpoint::{Checkpoint, Tensor, is_lm_head, is_vocab_matrix};
use crate::model::dtype::FloatType;
use crate::model::experts::ExpertLayout;
use crate::model::layers::layers_of;
use crate::params::embeddings::EmbeddingPolicy;
use crate::params::select::{Scale, Selection};
use crate::plan::checks::{Problems, check_configs, check_fits, float_of, read_vocab};
use crate::plan::experts::{finish, line_up};
use crate::plan::shards::assign_shards;
use crate::plan::skeleton::{Step, each_tensor};
use crate::plan::vocab::{EmbeddingReport, RowMap, Vocabs, match_rows};
use crate::plan::{Formula, Input, Op, OutTensor, Plan, Role, Source, VectorSum, VectorTerm, scales_of};

/// Settings shared by extract and apply.
pub(crate) struct Common {
    pub selection: Selection,
    pub shard_size: u64,
    pub allow_mismatch: bool,
    /// `--expert-layout`: the output's (`None`: the reference model's).
    pub expert_layout: Option<ExpertLayout>,
}

/// Options of `apply`.
pub(crate) struct ApplyOptions {
    pub common: Common,
    pub embeddings: EmbeddingPolicy,
    pub out_dtype: Option<FloatType>,
    /// The scale of each variant the plan writes (a sweep's candidates),
    /// each standing for the selection's own (`--scale`; `--scale-for`
    /// rules still win). Empty: one variant, the selection's scale.
    pub candidates: Vec<Scale>,
    /// With several vectors: each one's scale, in the order of the sides
    /// (`--scale-for` rules still win); empty with one vector.
    pub vector_scales: Vec<Scale>,
}

/// The vector side of `apply`.
pub(crate) enum VectorSide {
    /// `--vector DIR`: a stored vector; `omitted` lists tensors its extract
    /// left out on purpose (they are copied from the base).
    Stored { vector: Box<Checkpoint>, omitted: HashSet<String> },
    /// `--chat M --pretrained M`: computed on the fly.
    Streaming { chat: Box<Checkpoint>, pretrained: Box<Checkpoint> },
}

/// Plans `extract`: `chat - pretrained` for every selected tensor of the
/// chat model, in the chat model's order.
pub(crate) fn plan_extract(
    mut chat: Checkpoint,
    mut pre: Checkpoint,
    common: &Common,
    dtype: Option<FloatType>,
) -> Result<Plan> {
    let experts = line_up(&mut [&mut chat, &mut pre], 0, common.expert_layout)?;
    let mut warnings = Vec::new();
    check_configs(&chat, &pre, common.allow_mismatch, &mut warnings)?;
    for ck in [&chat, &pre] {
        check_fits(ck, common.allow_mismatch, &mut warnings)?;
    }
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
    let all = chat.tensors.iter().chain(&pre.tensors).map(|t| t.name.as_str());
    sel.check_all_match(all)?;
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
    let shards = assign_shards(&tensors, &[], common.shard_size);
    let mut plan = Plan {
        inputs: vec![Input::new(Role::Chat, chat), Input::new(Role::Pretrained, pre)],
        tensors,
        shards,
        embeddings: Vec::new(),
        omitted,
        warnings,
        vocab_union: None,
        scales: Vec::new(),
        groups: Vec::new(),
        experts: None,
        requant: Default::default(),
    };
    finish(&mut plan, experts, common.shard_size)?;
    Ok(plan)
}

/// One vector of `apply`, opened: its checkpoints (a stored vector, or a
/// chat and a pretrained model), the tensors its extract left out on
/// purpose, its vocabulary, and the plan input of its first checkpoint.
struct SideInputs {
    cks: Vec<(Role, Checkpoint)>,
    omitted: HashSet<String>,
    vocab: Option<crate::model::tokenizer::Vocab>,
    first_input: usize,
}

/// Plans `apply`: the base model's tensors, names, order and dtypes (or
/// `--out-dtype`), with the scaled vector added to the selected ones. With
/// several vectors (`sides`, scales in `opts.vector_scales`), each tensor
/// adds them all in one pass, in the order given.
pub(crate) fn plan_apply(
    mut base: Checkpoint,
    mut sides: Vec<VectorSide>,
    opts: &ApplyOptions,
) -> Result<Plan> {
    let common = &opts.common;
    let several = sides.len() > 1;
    if several && opts.vector_scales.len() != sides.len() {
        return Err(Error::Internal(format!(
            "{} vectors with {} scales reached the planner",
            sides.len(),
            opts.vector_scales.len()
        )));
    }
    let experts = {
        let mut all: Vec<&mut Checkpoint> = vec![&mut base];
        for side in &mut sides {
            match side {
                VectorSide::Stored { vector, .. } => all.push(vector),
                VectorSide::Streaming { chat, pretrained } => {
                    all.push(chat);
                    all.push(pretrained);
                }
            }
        }
        line_up(&mut all, 0, common.expert_layout)?
    };
    // Scale gradients spread over the base's layers.
    let mut sel = common.selection.clone();
    sel.set_layers(layers_of(base.tensors.iter().map(|t| t.name.as_str())));
    let sel = &sel;
    let mut warnings = Vec::new();
    // Input 0 is the base; each vector's checkpoints follow in order.
    let mut opened = Vec::with_capacity(sides.len());
    let mut next_input = 1;
    for side in sides {
        let (cks, omitted) = match side {
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
        let vocab = read_vocab(&cks[0].1)?;
        let first_input = next_input;
        next_input += cks.len();
        opened.push(SideInputs { cks, omitted, vocab, first_input });
    }
    let vector_cks = || opened.iter().flat_map(|o| &o.cks);
    let all =
        base.tensors.iter().chain(vector_cks().flat_map(|(_, ck)| &ck.tensors)).map(|t| t.name.as_str());
    sel.check_all_match(all)?;
    let base_vocab = read_vocab(&base)?;

    // A tied base has one matrix for input and output; a vector that changes
    // them differently cannot be applied to it faithfully. With the vector's
    // lm_head excluded the conflict is gone: the embedding delta alone goes
    // to the tied matrix, which then also moves the output side; say so.
    let vector_head = |selected: bool| {
        vector_cks()
            .any(|(_, ck)| ck.tensors.iter().any(|t| is_lm_head(&t.name) && sel.selects(&t.name) == selected))
    };
    if base.is_tied()
        && opts.embeddings != EmbeddingPolicy::Skip
        && let Some(e) = base.embedding().filter(|e| sel.selects(&e.name))
    {
        if vector_head(true) {
            return Err(Error::Usage(format!(
                "{} ties lm_head to its embeddings, but the chat vector has a separate lm_head; one matrix cannot take both changes",
                base.dir.display()
            ))
            .with_hint("pass --exclude lm_head to apply only the embedding delta to the tied matrix, or --embeddings skip to leave it as in the base"));
        }
        if vector_head(false) {
            warnings.push(format!(
                "{} ties lm_head to its embeddings and the vector's lm_head is excluded: the delta of '{}' goes to the tied matrix, so it changes the output projection too",
                base.dir.display(),
                e.name
            ));
        }
    }

    let mut embeddings = Vec::new();
    let problems = Problems::new("the base model and the chat vector do not line up");
    let mut out =
        each_tensor(&base, 0, opts.out_dtype, "--exclude", problems, |base_src, bt, _, problems| {
            let vocab_matrix = is_vocab_matrix(&bt.name);
            if !sel.selects(&bt.name) || (vocab_matrix && opts.embeddings == EmbeddingPolicy::Skip) {
                return Ok(Step::Keep);
            }
            float_of(&base, bt, "--exclude")?;
            let mut terms = Vec::with_capacity(opened.len());
            for (k, side) in opened.iter().enumerate() {
                let vocabs = Vocabs { base: base_vocab.as_ref(), vector: side.vocab.as_ref() };
                match side_term(side, bt, opts.embeddings, &vocabs, problems, &mut warnings)? {
                    SideTerm::Term(found, runs, row_len, report) => {
                        // With several vectors, which one (as merges name the model).
                        embeddings.extend(report.map(|mut r| {
                            if several {
                                r.tensor = format!("{} (vector {})", r.tensor, k + 1);
                            }
                            r
                        }));
                        terms.push((k, found, runs, row_len));
                    }
                    SideTerm::Omitted => {}
                    SideTerm::Problem => return Ok(Step::Skip),
                }
            }
            if terms.is_empty() {
                return Ok(Step::Keep);
            }
            if !several {
                let (_, found, runs, row_len) = terms.swap_remove(0);
                // The vector side is a stored vector, or a chat and a pretrained model.
                let formula = match found[..] {
                    [chat, pre] => Formula::AddDiff { base: base_src, chat, pre },
                    [vector, ..] => Formula::AddScaled { base: base_src, vector },
                    [] => return Ok(Step::Skip),
                };
                return Ok(Step::Make(Op::Arith { formula, runs, row_len }));
            }
            let terms = terms
                .into_iter()
                .map(|(k, found, runs, row_len)| VectorTerm {
                    x: found[0],
                    pre: found.get(1).copied(),
                    runs,
                    row_len,
                    scale: sel.scale_with(&bt.name, &opts.vector_scales[k]),
                    vector: k,
                })
                .collect();
            Ok(Step::Make(Op::AddVectors(Box::new(VectorSum { base: base_src, terms }))))
        })?;
    // Tensors of the vector side the base does not have mean the
    // architectures differ.
    for (_, ck) in vector_cks() {
        for t in &ck.tensors {
            if base.logical(&t.name).is_none() && sel.selects(&t.name) {
                out.problems.push(format!(
                    "'{}' is in {} but not in the base {}",
                    t.name,
                    ck.dir.display(),
                    base.dir.display()
                ));
            }
        }
    }
    // Every tensor's scale in every variant, resolved here once (several
    // vectors carry theirs in their terms).
    let scales = if opts.candidates.is_empty() {
        vec![scales_of(&out.tensors, |t| sel.scale(&t.name))]
    } else {
        opts.candidates.iter().map(|c| scales_of(&out.tensors, |t| sel.scale_with(&t.name, c))).collect()
    };
    let mut inputs = vec![Input::new(Role::Base, base)];
    inputs.extend(opened.into_iter().flat_map(|o| o.cks).map(|(role, ckpt)| Input::new(role, ckpt)));
    let mut plan = out.into_plan(inputs, common.shard_size, warnings)?;
    plan.embeddings = embeddings;
    plan.scales = scales;
    finish(&mut plan, experts, common.shard_size)?;
    Ok(plan)
}

/// What one vector gives a base tensor.
enum SideTerm {
    /// Its sources (the vector, or chat then pretrained), the base rows
    /// its rows go to (rows of `row_len` elements), and the embedding
    /// report of a vocabulary matrix.
    Term(Vec<Source>, Vec<RowRun>, u64, Option<EmbeddingReport>),
    /// Left out of the vector on purpose: it adds nothing here.
    Omitted,
    /// A problem was recorded.
    Problem,
}

/// Lines base tensor `bt` up with one vector: finds its tensors, checks
/// their dtypes and shapes, and matches vocabulary rows.
fn side_term(
    side: &SideInputs,
    bt: &Tensor,
    policy: EmbeddingPolicy,
    vocabs: &Vocabs<'_>,
    problems: &mut Problems,
    warnings: &mut Vec<String>,
) -> Result<SideTerm> {
    let lookup: Vec<Option<usize>> = side.cks.iter().map(|(_, ck)| ck.logical_index(&bt.name)).collect();
    if let Some(k) = lookup.iter().position(Option::is_none) {
        if side.omitted.contains(&bt.name) {
            return Ok(SideTerm::Omitted);
        }
        problems.push(format!("'{}' is in the base but not in {}", bt.name, side.cks[k].1.dir.display()));
        return Ok(SideTerm::Problem);
    }
    // Sources on the vector side, in the plan's input order.
    let found: Vec<Source> = lookup
        .iter()
        .enumerate()
        .map(|(k, i)| Source { input: side.first_input + k, tensor: i.unwrap_or_default() })
        .collect();
    for (k, s) in found.iter().enumerate() {
        let ck = &side.cks[k].1;
        float_of(ck, &ck.tensors[s.tensor], "--exclude")?;
    }
    let shape_of = |k: usize| &side.cks[k].1.tensors[found[k].tensor].shape;
    let vshape = shape_of(0);
    if found.len() == 2 && shape_of(1) != vshape {
        problems.push(format!("'{}': chat shape {:?} vs pretrained {:?}", bt.name, vshape, shape_of(1)));
        return Ok(SideTerm::Problem);
    }
    let same_row_shape = vshape.len() == bt.shape.len() && vshape.get(1..) == bt.shape.get(1..);
    if is_vocab_matrix(&bt.name) && same_row_shape && !bt.shape.is_empty() {
        let rm: RowMap = match_rows(&bt.name, policy, bt.shape[0], vshape[0], vocabs)?;
        if let Some(w) = &rm.warning {
            warnings.push(w.clone());
        }
        let report = EmbeddingReport {
            tensor: bt.name.clone(),
            rows: bt.shape[0],
            rows_with_vector: rm.matched(),
            policy: rm.how,
        };
        return Ok(SideTerm::Term(found, rm.runs, bt.shape[1..].iter().product(), Some(report)));
    }
    if *vshape == bt.shape {
        return Ok(SideTerm::Term(
            found,
            vec![RowRun { base_row: 0, vector_row: 0, rows: bt.numel() }],
            1,
            None,
        ));
    }
    problems.push(format!("'{}': base shape {:?} vs vector {:?}", bt.name, bt.shape, vshape));
    Ok(SideTerm::Problem)
}
