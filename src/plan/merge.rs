//! Plans a merge (a recipe's or a mergekit config's): every tensor of the
//! base (or, without one, of the first model) computed by the method from
//! the same tensor of each input, with its parameters resolved for that
//! tensor. Inputs must line up name for name and shape for shape; anything
//! else is listed before a byte is written.

use crate::arith::rows::{RowSrc, RowTable};
use crate::error::{Error, Result};
use crate::merge::TensorMerge;
use crate::merge::methods::{self, BaseRole, Method, ParamSources, Scope};
use crate::merge::params::Setting;
use crate::model::checkpoint::{Checkpoint, is_vocab_matrix};
use crate::model::dtype::FloatType;
use crate::model::experts::ExpertLayout;
use crate::model::layers::{layer_index, layer_position};
use crate::model::tokenizer::Vocab;
use crate::params::embeddings::EmbeddingPolicy;
use crate::plan::checks::{Problems, check_configs, check_fits, float_of, read_vocab};
use crate::plan::experts::{finish, line_up_inputs};
use crate::plan::skeleton::{Step, each_tensor};
use crate::plan::vocab::{EmbeddingReport, RowMap, Vocabs, match_rows};
use crate::plan::{Input, MergeOp, Op, Plan, Source, UnionRows, VocabUnion};

/// Where a merge's output vocabulary comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VocabSpec {
    Base,
    Union,
    /// Input `i`'s tokenizer (one of the merged inputs).
    Model(usize),
}

/// A `tokenizer.tokens` entry with its models as input indices.
#[derive(Clone, Debug)]
pub(crate) struct TokenSpec {
    pub token: String,
    pub from: TokenFrom,
    /// Every input takes this row, even one that has the token.
    pub force: bool,
}

#[derive(Clone, Debug)]
pub(crate) enum TokenFrom {
    /// The same token's row of input `i`.
    Model(usize),
    /// Row `id`, or the row of `token`, of input `input`.
    ModelRow {
        input: usize,
        token: Option<String>,
        id: Option<u64>,
    },
    Zero,
}

/// A merge, as data.
pub(crate) struct MergeSpec {
    pub method: Method,
    /// Index of the base model in the inputs.
    pub base: Option<usize>,
    /// Indices of the merged inputs, in parameter order. For linear the base
    /// is one of them.
    pub models: Vec<usize>,
    /// Settings for all models.
    pub global: Vec<(String, Setting)>,
    /// Each merged input's own settings, parallel to `models`.
    pub per_model: Vec<Vec<(String, Setting)>>,
    pub seed: u64,
    pub out_dtype: Option<FloatType>,
    pub shard_size: u64,
    pub allow_mismatch: bool,
    /// The output vocabulary: the base's (other models' rows matched to it
    /// by token), the union, or input `i`'s.
    pub vocab: VocabSpec,
    /// Per-token embedding sources (the `tokenizer:` block's `tokens`).
    pub tokens: Vec<TokenSpec>,
    /// `tokenizer.pad_to_multiple_of`: vocabulary matrices padded to a
    /// multiple of this many rows, each new row the mean of the others.
    pub pad_to: Option<u64>,
    /// `--expert-layout`: the output's (`None`: the reference model's).
    pub expert_layout: Option<ExpertLayout>,
}

/// Checks parameter names and scopes once, before any tensor.
/// Returns warnings about parameters the method ignores.
fn check_settings(spec: &MergeSpec, inputs: &[Input]) -> Result<Vec<String>> {
    let m = spec.method;
    let mut warnings = methods::check_names(m, &spec.global, "parameters")?;
    for (own, &i) in spec.per_model.iter().zip(&spec.models) {
        let at = format!("parameters of {}", inputs[i].label);
        warnings.extend(methods::check_names(m, own, &at)?);
        for (k, _) in own {
            let shared = m.params().into_iter().any(|p| p.name == k && p.scope == Scope::Shared);
            if shared {
                return Err(Error::Usage(format!(
                    "{at}: '{k}' applies to the whole merge; set it under the global parameters"
                )));
            }
        }
    }
    let (lo, hi) = m.model_count();
    let n = spec.models.len();
    if n < lo || n > hi {
        let want = if lo == hi { format!("exactly {lo}") } else { format!("at least {lo}") };
        let what = match m.base_role() {
            BaseRole::Input => "input model(s), the base included",
            _ => "model(s) besides the base",
        };
        return Err(Error::Usage(format!("{} needs {want} {what}, got {n}", m.name())));
    }
    if m.needs_base() && spec.base.is_none() {
        return Err(Error::Usage(format!("{} needs a base model (base_model)", m.name())));
    }
    Ok(warnings)
}

/// Layers of the reference model, counted from its tensor names.
fn layer_count(ck: &Checkpoint) -> u64 {
    ck.tensors.iter().filter_map(|t| layer_index(&t.name)).max().map_or(0, |i| i + 1)
}

/// Plans a merge of `inputs` as `spec` says.
pub(crate) fn plan_merge(mut inputs: Vec<Input>, spec: &MergeSpec) -> Result<Plan> {
    let mut warnings = check_settings(spec, &inputs)?;
    let reference = spec.base.unwrap_or(spec.models[0]);
    let experts = line_up_inputs(&mut inputs, reference, spec.expert_layout)?;
    let rck = &inputs[reference].ckpt;
    for (i, inp) in inputs.iter().enumerate() {
        if i != reference {
            check_configs(rck, &inp.ckpt, spec.allow_mismatch, &mut warnings)?;
        }
        check_fits(&inp.ckpt, spec.allow_mismatch, &mut warnings)?;
    }
    let layers = layer_count(rck);
    let labels: Vec<String> = spec.models.iter().map(|&i| inputs[i].label.clone()).collect();
    let param_sources = ParamSources {
        global: &spec.global,
        models: spec.per_model.iter().map(Vec::as_slice).collect(),
        labels,
    };
    // Linear, karcher and passthrough have no base role: a base they
    // merge is one of the models.
    let base_in = if spec.method.base_role() == BaseRole::Input { None } else { spec.base };
    let involved: Vec<usize> = base_in.into_iter().chain(spec.models.iter().copied()).collect();
    let problems = Problems::new("the models to merge do not line up");
    let mut vocabs: Vec<Option<Option<Vocab>>> = (0..inputs.len()).map(|_| None).collect();
    let mut embeddings = Vec::new();
    let base_pos = base_in.map(|_| 0);
    let mut union = match spec.vocab {
        VocabSpec::Base if spec.tokens.is_empty() && spec.pad_to.is_none() => None,
        VocabSpec::Base => {
            let r = involved.iter().position(|&i| i == reference).unwrap_or(0);
            let base = spec.base.is_some().then_some(r);
            Some(shared_vocab(&inputs, &involved, r, base, false, "tokenizer.tokens")?)
        }
        VocabSpec::Union => {
            let why = "tokenizer_source: union";
            let r = involved.iter().position(|&i| i == reference).unwrap_or(0);
            let base = spec.base.is_some().then_some(r);
            Some(shared_vocab(&inputs, &involved, r, base, true, why)?)
        }
        VocabSpec::Model(i) => {
            let why = format!("tokenizer_source: {}", inputs[i].label);
            let r = involved.iter().position(|&k| k == i).ok_or_else(|| {
                Error::Usage(format!("{why}: the vocabulary must come from a model the method merges"))
            })?;
            Some(shared_vocab(&inputs, &involved, r, base_pos, false, &why)?)
        }
    };
    if let (Some(u), Some(m)) = (union.as_mut(), spec.pad_to) {
        let rows = u.base_rows + u.added.len() as u64;
        u.padding = rows.div_ceil(m) * m - rows;
        if u.padding > 0 {
            warnings.push(format!(
                "tokenizer.pad_to_multiple_of {m}: {} padding row(s) after the vocabulary's {rows}, each the mean of its rows",
                u.padding
            ));
        }
    }
    // The reference's vocabulary, for linear's vocabulary matrices that differ.
    let mut aligned: Option<Union> = None;
    let mut out =
        each_tensor(rck, reference, spec.out_dtype, "a parameter rule", problems, |_, t, _, problems| {
            if t.float().is_none() {
                // Integer buffers (e.g. position ids) are not merged.
                return Ok(Step::Keep);
            }
            // Linear has no base to take a delta against, so a model whose
            // vocabulary matrix has other rows is aligned as mergekit does: by
            // token, onto the reference's vocabulary, a missing row filled from
            // the base (or the one model, or the mean, that has the token).
            if union.is_none()
                && base_in.is_none()
                && aligned.is_none()
                && is_vocab_matrix(&t.name)
                && involved
                    .iter()
                    .any(|&i| inputs[i].ckpt.logical(&t.name).is_some_and(|x| x.shape != t.shape))
            {
                let why = format!("'{}' has other rows in some models; aligning them by token", t.name);
                let r = involved.iter().position(|&i| i == reference).unwrap_or(0);
                let base = spec.base.is_some().then_some(r);
                aligned = Some(shared_vocab(&inputs, &involved, r, base, false, &why)?);
            }
            if let Some(u) = union.as_ref().or(aligned.as_ref())
                && is_vocab_matrix(&t.name)
            {
                return match union_tensor(&inputs, &involved, u, &spec.tokens, &t.name, &t.shape) {
                    Ok(rows) => {
                        if spec.vocab != VocabSpec::Union {
                            embeddings.extend(aligned_reports(
                                &inputs,
                                &involved,
                                u,
                                &t.name,
                                &rows.table.tables,
                            ));
                        }
                        let mut shape = t.shape.clone();
                        shape[0] = u.base_rows + u.added.len() as u64 + u.padding;
                        let (base, models) = match base_in {
                            Some(_) => (Some(rows.sources[0]), rows.sources[1..].to_vec()),
                            None => (None, rows.sources.clone()),
                        };
                        let params = methods::resolve(
                            spec.method,
                            &param_sources,
                            &t.name,
                            layer_position(&t.name, layers),
                        )?;
                        let n_models = models.len();
                        let op = Op::Merge(Box::new(MergeOp {
                            merge: TensorMerge { method: spec.method, params, seed: spec.seed },
                            base,
                            models,
                            rows: vec![None; n_models],
                            union: Some(Box::new(rows)),
                        }));
                        Ok(Step::Shaped(op, shape))
                    }
                    Err(p) => {
                        problems.push(p);
                        Ok(Step::Skip)
                    }
                };
            }
            let mut srcs = Vec::with_capacity(involved.len());
            let mut rows = Vec::with_capacity(involved.len());
            for &i in &involved {
                let ck = &inputs[i].ckpt;
                let Some(j) = ck.logical_index(&t.name) else {
                    problems.push(format!("'{}' is missing from {}", t.name, inputs[i].label));
                    continue;
                };
                let shape = &ck.tensors[j].shape;
                if *shape == t.shape {
                    rows.push(None);
                } else if let Some(rm) =
                    align_rows(&inputs, &mut vocabs, base_in, i, &t.name, &t.shape, shape)?
                {
                    if let Some(w) = &rm.warning {
                        warnings.push(w.clone());
                    }
                    embeddings.push(EmbeddingReport {
                        tensor: format!("{} from {}", t.name, inputs[i].label),
                        rows: t.shape[0],
                        rows_with_vector: rm.matched(),
                        policy: rm.how,
                    });
                    rows.push(Some((rm.runs, t.shape[1..].iter().product())));
                } else {
                    problems.push(format!(
                        "'{}': {} has shape {:?}, {} has {:?}",
                        t.name, inputs[reference].label, t.shape, inputs[i].label, shape
                    ));
                    continue;
                }
                float_of(ck, &ck.tensors[j], "a parameter rule")?;
                srcs.push(Source { input: i, tensor: j });
            }
            if srcs.len() != involved.len() {
                return Ok(Step::Skip);
            }
            let base = base_in.map(|_| {
                rows.remove(0);
                srcs.remove(0)
            });
            let params =
                methods::resolve(spec.method, &param_sources, &t.name, layer_position(&t.name, layers))?;
            Ok(Step::Make(Op::Merge(Box::new(MergeOp {
                merge: TensorMerge { method: spec.method, params, seed: spec.seed },
                base,
                models: srcs,
                rows,
                union: None,
            }))))
        })?;
    for &i in &involved {
        for t in &inputs[i].ckpt.tensors {
            if rck.logical(&t.name).is_none() {
                out.problems.push(format!(
                    "'{}' is in {} but not in {}",
                    t.name, inputs[i].label, inputs[reference].label
                ));
            }
        }
    }
    let vocab_union = union.filter(|_| spec.vocab == VocabSpec::Union).map(|u| VocabUnion {
        base_rows: u.base_rows,
        added: u
            .added
            .iter()
            .enumerate()
            .map(|(n, (t, k))| (u.base_rows + n as u64, t.clone(), involved[*k]))
            .collect(),
    });
    if let Some(v) = vocab_union.as_ref().filter(|v| !v.added.is_empty()) {
        warnings.push(format!(
            "tokenizer_source union: {} token(s) added after the base's {} rows",
            v.added.len(),
            v.base_rows
        ));
    }
    let mut plan = out.into_plan(inputs, spec.shard_size, warnings)?;
    plan.embeddings = embeddings;
    plan.vocab_union = vocab_union;
    finish(&mut plan, experts, spec.shard_size)?;
    Ok(plan)
}

/// For a vocabulary matrix of model `i` whose row count differs from the
/// base's (same row shape), which base rows its rows go to: matched by token
/// string through both tokenizer.json files (without both, the shapes are
/// reported as a mismatch). The output keeps the base's vocabulary (`tokenizer_source:
/// base`); rows the model lacks keep the base's values in its place, i.e. a
/// zero delta. None when the shapes cannot be aligned.
fn align_rows(
    inputs: &[Input],
    vocabs: &mut [Option<Option<Vocab>>],
    base: Option<usize>,
    i: usize,
    name: &str,
    base_shape: &[u64],
    shape: &[u64],
) -> Result<Option<RowMap>> {
    let Some(b) = base else { return Ok(None) };
    if i == b
        || !is_vocab_matrix(name)
        || shape.len() != base_shape.len()
        || shape.get(1..) != base_shape.get(1..)
    {
        return Ok(None);
    }
    for k in [b, i] {
        if vocabs[k].is_none() {
            vocabs[k] = Some(read_vocab(&inputs[k].ckpt)?);
        }
    }
    let (Some(Some(bv)), Some(Some(iv))) = (&vocabs[b], &vocabs[i]) else {
        // Without both tokenizers, rows cannot be matched safely.
        return Ok(None);
    };
    let v = Vocabs { base: Some(bv), vector: Some(iv) };
    match_rows(name, EmbeddingPolicy::Align, base_shape[0], shape[0], &v).map(Some)
}

/// The union vocabulary, in terms of the involved inputs.
struct Union {
    /// Position of the reference among the involved inputs.
    reference: usize,
    /// Position of mergekit's base model among the involved inputs, which
    /// fills tokens several models have but some lack.
    base: Option<usize>,
    base_rows: u64,
    vocabs: Vec<Vocab>,
    /// Each involved input's vocabulary-matrix rows.
    rows: Vec<u64>,
    /// New tokens and the involved input that first has each.
    added: Vec<(String, usize)>,
    /// Rows after the vocabulary (`tokenizer.pad_to_multiple_of`).
    padding: u64,
}

/// Builds the output vocabulary in terms of the involved inputs: the
/// tokens of involved input `r` (the vocabulary source), then, if `add`
/// (`tokenizer_source: union`), input by input and id by id, every token
/// it lacks (tokens beyond an input's matrix rows do not count, as in
/// mergekit). `base` is the base's position, if merged. `why` starts the
/// errors.
fn shared_vocab(
    inputs: &[Input],
    involved: &[usize],
    r: usize,
    base: Option<usize>,
    add: bool,
    why: &str,
) -> Result<Union> {
    let mut vocabs = Vec::new();
    let mut rows = Vec::new();
    for &i in involved {
        let ck = &inputs[i].ckpt;
        let v = read_vocab(ck)?
            .ok_or_else(|| Error::Usage(format!("{why} needs a tokenizer.json in {}", inputs[i].label)))?;
        let e = ck
            .embedding()
            .ok_or_else(|| Error::Usage(format!("{why}: {} has no embedding matrix", inputs[i].label)))?;
        vocabs.push(v);
        rows.push(e.shape[0]);
    }
    let mut added: Vec<(String, usize)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (k, v) in vocabs.iter().enumerate() {
        if k == r || !add {
            continue;
        }
        for id in 0..rows[k] {
            if let Some(tok) = v.token(id)
                && vocabs[r].id(tok).is_none_or(|rid| rid as u64 >= rows[r])
                && seen.insert(tok.to_string())
            {
                added.push((tok.to_string(), k));
            }
        }
    }
    Ok(Union { reference: r, base, base_rows: rows[r], vocabs, rows, added, padding: 0 })
}

/// The row tables of vocabulary matrix `name` under the union vocabulary:
/// each input's own row where it has the token; where it lacks it, the one
/// input that has it, else the base, else the mean of those that have it
/// (mergekit's rules). Sources and tables are in involved order.
fn union_tensor(
    inputs: &[Input],
    involved: &[usize],
    u: &Union,
    rules: &[TokenSpec],
    name: &str,
    shape: &[u64],
) -> std::result::Result<UnionRows, String> {
    let mut sources = Vec::new();
    for (k, &i) in involved.iter().enumerate() {
        let ck = &inputs[i].ckpt;
        let j =
            ck.logical_index(name).ok_or_else(|| format!("'{name}' is missing from {}", inputs[i].label))?;
        let s = &ck.tensors[j].shape;
        if s.get(1..) != shape.get(1..) || s.first() != Some(&u.rows[k]) {
            return Err(format!(
                "'{name}': {} has shape {s:?}, not {} rows of {:?}",
                inputs[i].label,
                u.rows[k],
                &shape[1..]
            ));
        }
        sources.push(Source { input: i, tensor: j });
    }
    let out_rows = u.base_rows + u.added.len() as u64;
    let r = u.reference;
    let mut tables = vec![Vec::with_capacity(out_rows as usize); involved.len()];
    let mut means = Vec::new();
    for row in 0..out_rows {
        let token = if row < u.base_rows {
            u.vocabs[r].token(row)
        } else {
            Some(u.added[(row - u.base_rows) as usize].0.as_str())
        };
        let has: Vec<Option<u64>> = (0..involved.len())
            .map(|k| {
                if k == r {
                    return (row < u.base_rows).then_some(row);
                }
                let id = u.vocabs[k].id(token?)? as u64;
                (id < u.rows[k]).then_some(id)
            })
            .collect();
        let donors: Vec<(usize, u64)> =
            has.iter().enumerate().filter_map(|(k, h)| h.map(|row| (k, row))).collect();
        if let Some(rule) = token.and_then(|t| rules.iter().find(|r| r.token == t)) {
            let fill = token_row(inputs, involved, u, rule, &has)?;
            for (k, h) in has.iter().enumerate() {
                tables[k].push(match h {
                    Some(own) if !rule.force => RowSrc::Row { source: k, row: *own },
                    _ => fill,
                });
            }
            continue;
        }
        let fill = if donors.is_empty() {
            RowSrc::Zero
        } else if donors.len() == 1 {
            RowSrc::Row { source: donors[0].0, row: donors[0].1 }
        } else if let Some((b, br)) = u.base.and_then(|b| has[b].map(|row| (b, row))) {
            RowSrc::Row { source: b, row: br }
        } else {
            means.push(donors.clone());
            RowSrc::Mean(means.len() - 1)
        };
        for (k, h) in has.iter().enumerate() {
            tables[k].push(match h {
                Some(own) => RowSrc::Row { source: k, row: *own },
                None => fill,
            });
        }
    }
    for table in &mut tables {
        table.extend((0..u.padding).map(|_| RowSrc::Padding { rows: out_rows }));
    }
    let row_len = shape[1..].iter().product();
    let padding = tables.iter().map(|_| std::sync::OnceLock::new()).collect();
    Ok(UnionRows { sources, table: RowTable { row_len, tables, means, padding } })
}

/// The row a `tokenizer.tokens` rule gives its token.
fn token_row(
    inputs: &[Input],
    involved: &[usize],
    u: &Union,
    rule: &TokenSpec,
    has: &[Option<u64>],
) -> std::result::Result<RowSrc, String> {
    let at = |i: usize| {
        involved.iter().position(|&k| k == i).ok_or_else(|| {
            format!("tokenizer.tokens {:?}: {} is not one of the merged models", rule.token, inputs[i].label)
        })
    };
    Ok(match &rule.from {
        TokenFrom::Zero => RowSrc::Zero,
        TokenFrom::Model(i) => {
            let k = at(*i)?;
            let row = has[k].ok_or_else(|| {
                format!("tokenizer.tokens {:?}: {} has no such token", rule.token, inputs[*i].label)
            })?;
            RowSrc::Row { source: k, row }
        }
        TokenFrom::ModelRow { input, token, id } => {
            let k = at(*input)?;
            let row = match (id, token) {
                (Some(id), _) => *id,
                (None, Some(t)) => u.vocabs[k].id(t).map(u64::from).ok_or_else(|| {
                    format!("tokenizer.tokens {:?}: {} has no token {t:?}", rule.token, inputs[*input].label)
                })?,
                (None, None) => {
                    return Err(format!("tokenizer.tokens {:?}: no token or token_id", rule.token));
                }
            };
            if row >= u.rows[k] {
                return Err(format!(
                    "tokenizer.tokens {:?}: row {row} is beyond {}'s {} rows",
                    rule.token, inputs[*input].label, u.rows[k]
                ));
            }
            RowSrc::Row { source: k, row }
        }
    })
}

/// What a vocabulary matrix aligned by token took from each model: the rows
/// that are its own, out of the output's.
fn aligned_reports(
    inputs: &[Input],
    involved: &[usize],
    u: &Union,
    name: &str,
    tables: &[Vec<RowSrc>],
) -> Vec<EmbeddingReport> {
    let mut out = Vec::new();
    for (k, table) in tables.iter().enumerate() {
        let own = table.iter().filter(|r| matches!(r, RowSrc::Row { source, .. } if *source == k)).count();
        if k != u.reference && u.rows[k] != u.base_rows {
            out.push(EmbeddingReport {
                tensor: format!("{name} from {}", inputs[involved[k]].label),
                rows: u.base_rows,
                rows_with_vector: own as u64,
                policy: EmbeddingPolicy::Align,
            });
        }
    }
    out
}
