//! Plans a merge (a recipe's or a mergekit config's): every tensor of the
//! base (or, without one, of the first model) computed by the method from
//! the same tensor of each input, with its parameters resolved for that
//! tensor. Inputs must line up name for name and shape for shape; anything
//! else is listed before a byte is written.

use crate::checkpoint::{Checkpoint, is_vocab_matrix};
use crate::dtype::FloatType;
use crate::embeddings::{EmbeddingPolicy, RowMap, Vocabs, match_rows};
use crate::error::{Error, Result};
use crate::methods::{self, Method, ParamSources, Scope};
use crate::params::{Setting, layer_index, layer_position};
use crate::plan::{
    EmbeddingReport, Input, MergeOp, Op, OutTensor, Plan, Problems, Source, assign_shards, check_configs,
    float_of, read_vocab,
};
use crate::tokenizer::Vocab;

/// A merge, as data.
pub struct MergeSpec {
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
}

/// Checks parameter names and scopes once, before any tensor.
fn check_settings(spec: &MergeSpec, inputs: &[Input]) -> Result<()> {
    let m = spec.method;
    methods::check_names(m, &spec.global, "parameters")?;
    for (own, &i) in spec.per_model.iter().zip(&spec.models) {
        let at = format!("parameters of {}", inputs[i].label);
        methods::check_names(m, own, &at)?;
        for (k, _) in own {
            let spec_of = m.params().into_iter().find(|p| p.name == k).expect("checked above");
            if spec_of.scope == Scope::Shared {
                return Err(Error::Usage(format!(
                    "{at}: '{k}' applies to the whole merge; set it under the global parameters"
                )));
            }
        }
    }
    let (lo, hi) = m.model_count();
    let n = spec.models.len() - usize::from(m == Method::Linear && spec.base.is_some());
    if n < lo || n > hi {
        let want = if lo == hi { format!("exactly {lo}") } else { format!("at least {lo}") };
        return Err(Error::Usage(format!("{} needs {want} model(s) besides the base, got {n}", m.name())));
    }
    if m.needs_base() && spec.base.is_none() {
        return Err(Error::Usage(format!("{} needs a base model (base_model)", m.name())));
    }
    Ok(())
}

/// Layers of the reference model, counted from its tensor names.
fn layer_count(ck: &Checkpoint) -> u64 {
    ck.tensors.iter().filter_map(|t| layer_index(&t.name)).max().map_or(0, |i| i + 1)
}

pub fn plan_merge(inputs: Vec<Input>, spec: &MergeSpec) -> Result<Plan> {
    check_settings(spec, &inputs)?;
    let reference = spec.base.unwrap_or(spec.models[0]);
    let rck = &inputs[reference].ckpt;
    let mut warnings = Vec::new();
    for (i, inp) in inputs.iter().enumerate() {
        if i != reference {
            check_configs(rck, &inp.ckpt, spec.allow_mismatch, &mut warnings)?;
        }
    }
    let layers = layer_count(rck);
    let labels: Vec<String> = spec.models.iter().map(|&i| inputs[i].label.clone()).collect();
    let sources = ParamSources {
        global: &spec.global,
        models: spec.per_model.iter().map(Vec::as_slice).collect(),
        labels,
    };
    // Linear has no base role: a base it merges is one of the models.
    let base_in = if spec.method.needs_base() { spec.base } else { None };
    let involved: Vec<usize> = base_in.into_iter().chain(spec.models.iter().copied()).collect();
    let mut problems = Problems::new("the models to merge do not line up");
    let mut vocabs: Vec<Option<Option<Vocab>>> = (0..inputs.len()).map(|_| None).collect();
    let mut embeddings = Vec::new();
    let mut tensors = Vec::with_capacity(rck.tensors.len());
    for (ti, t) in rck.tensors.iter().enumerate() {
        let out_dtype = match (spec.out_dtype, t.dtype.float()) {
            (Some(o), Some(_)) => o.dtype(),
            _ => t.dtype,
        };
        let reference_src = Source { input: reference, tensor: ti };
        if t.dtype.float().is_none() {
            // Integer buffers (e.g. position ids) are not merged.
            tensors.push(OutTensor {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                op: Op::Copy(reference_src),
            });
            continue;
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
            } else if let Some(rm) = align_rows(&inputs, &mut vocabs, base_in, i, &t.name, &t.shape, shape)? {
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
            continue;
        }
        let base = base_in.map(|_| {
            rows.remove(0);
            srcs.remove(0)
        });
        let params = methods::resolve(spec.method, &sources, &t.name, layer_position(&t.name, layers))?;
        tensors.push(OutTensor {
            name: t.name.clone(),
            dtype: out_dtype,
            shape: t.shape.clone(),
            op: Op::Merge(Box::new(MergeOp {
                method: spec.method,
                base,
                models: srcs,
                params,
                seed: spec.seed,
                rows,
            })),
        });
    }
    for &i in &involved {
        for t in &inputs[i].ckpt.tensors {
            if rck.logical(&t.name).is_none() {
                problems.push(format!(
                    "'{}' is in {} but not in {}",
                    t.name, inputs[i].label, inputs[reference].label
                ));
            }
        }
    }
    problems.into_result()?;
    let shards = assign_shards(&tensors, spec.shard_size);
    Ok(Plan { inputs, tensors, shards, embeddings, omitted: Vec::new(), warnings })
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
