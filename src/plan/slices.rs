//! Plans mergekit's `slices`: the output's layers, slice after slice, each
//! output layer merged from one layer of every source of its slice (the
//! source's first layer plus the layer's offset in the slice) by the
//! recipe's method, or copied when a slice has one source (passthrough:
//! frankenmerges, depth up-scaling such as SOLAR's). As in mergekit, the
//! tensors before the layers (the embeddings) come from the first slice's
//! sources and those after them (the final norm, lm_head) from the last
//! slice's; a gradient parameter runs over each slice's layers. Output
//! layers are numbered from 0, so every tensor is renamed; nothing is
//! read but the layers named, so memory stays bounded however deep the
//! output is.

use crate::error::{Error, Result};
use crate::merge::TensorMerge;
use crate::merge::methods::{self, BaseRole, Method, ParamSources};
use crate::merge::params::Setting;
use crate::model::checkpoint::{Checkpoint, is_embedding};
use crate::model::dtype::FloatType;
use crate::model::experts::ExpertLayout;
use crate::model::layers::{layer_index, layers_of};
use crate::plan::checks::{Problems, check_configs, check_fits, float_of};
use crate::plan::experts::{finish, line_up_inputs};
use crate::plan::skeleton::{Outputs, out_dtype};
use crate::plan::{Input, MergeOp, Op, OutTensor, Plan, Source};

/// A source of a slice: its input, its first layer, its own settings.
pub(crate) type SliceInput = (usize, u64, Vec<(String, Setting)>);

/// A slice as data: its sources, its length, its own settings and its
/// base input.
pub(crate) struct SlicePlan {
    pub sources: Vec<SliceInput>,
    pub len: u64,
    pub params: Vec<(String, Setting)>,
    pub base: Option<usize>,
}

/// A slices merge, as data.
pub(crate) struct SliceSpec {
    pub method: Method,
    pub slices: Vec<SlicePlan>,
    pub global: Vec<(String, Setting)>,
    pub seed: u64,
    pub out_dtype: Option<FloatType>,
    pub shard_size: u64,
    pub allow_mismatch: bool,
    /// `--expert-layout`: the output's (`None`: the reference model's).
    pub expert_layout: Option<ExpertLayout>,
}

/// Where each output layer comes from: the input and layer of its slice's
/// first source (what `--dry-run` and the config's per-layer fields use).
pub(crate) type LayerMap = Vec<(usize, u64)>;

/// `name` with its layer index `from` replaced by `to`.
fn renumber(name: &str, to: u64) -> String {
    match name.find("layers.") {
        Some(at) => {
            let start = at + "layers.".len();
            let digits = name[start..].find('.').map_or(name.len(), |d| start + d);
            format!("{}{to}{}", &name[..start], &name[digits..])
        }
        None => name.to_string(),
    }
}

/// Checks a slice against its method and inputs: lengths, layer ranges, the
/// base's place.
fn check_slice(i: usize, s: &SlicePlan, method: Method, inputs: &[Input]) -> Result<()> {
    let at = format!("slices[{i}]");
    for (input, lo, _) in &s.sources {
        let ck = &inputs[*input].ckpt;
        let layers = layers_of(ck.tensors.iter().map(|t| t.name.as_str()));
        if lo + s.len > layers {
            return Err(Error::Usage(format!(
                "{at}: layer_range [{lo}, {}] of {} runs past its {layers} layers",
                lo + s.len,
                inputs[*input].label
            )));
        }
    }
    let role = method.base_role();
    let base_in = s.base.filter(|b| role != BaseRole::Input && s.sources.iter().any(|(x, _, _)| x == b));
    if let Some(b) = s.base
        && role == BaseRole::Origin
        && base_in.is_none()
    {
        return Err(Error::Usage(format!(
            "{at}: the base model {} must be one of the slice's sources (with its layer_range)",
            inputs[b].label
        )));
    }
    if method.needs_base() && base_in.is_none() {
        return Err(Error::Usage(format!(
            "{at}: {} needs a base model among the slice's sources",
            method.name()
        )));
    }
    let n = s.sources.len() - usize::from(base_in.is_some());
    let (lo, hi) = method.model_count();
    if n < lo || n > hi {
        return Err(Error::Usage(format!(
            "{at}: {} takes {} source(s){}, this slice has {n}",
            method.name(),
            if lo == hi { format!("exactly {lo}") } else { format!("at least {lo}") },
            if base_in.is_some() { " besides the base" } else { "" }
        )));
    }
    Ok(())
}

/// Plans `spec` over `inputs`; returns the plan and where each output
/// layer comes from.
pub(crate) fn plan_slices(inputs: Vec<Input>, spec: &SliceSpec) -> Result<(Plan, LayerMap)> {
    let mut warnings = Vec::new();
    for (i, s) in spec.slices.iter().enumerate() {
        check_slice(i, s, spec.method, &inputs)?;
        for (_, own) in s.sources.iter().map(|(x, _, own)| (x, own)) {
            warnings.extend(methods::check_names(
                spec.method,
                own,
                &format!("slices[{i}] source parameters"),
            )?);
        }
        warnings.extend(methods::check_names(spec.method, &s.params, &format!("slices[{i}].parameters"))?);
    }
    warnings.extend(methods::check_names(spec.method, &spec.global, "parameters")?);
    let reference = spec.slices[0].sources[0].0;
    let mut inputs = inputs;
    let experts = line_up_inputs(&mut inputs, reference, spec.expert_layout)?;
    let rck = &inputs[reference].ckpt;
    let used: Vec<usize> = {
        let mut v: Vec<usize> = spec.slices.iter().flat_map(|s| s.sources.iter().map(|x| x.0)).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    for &i in &used {
        if i != reference {
            check_configs(rck, &inputs[i].ckpt, spec.allow_mismatch, &mut warnings)?;
        }
        check_fits(&inputs[i].ckpt, spec.allow_mismatch, &mut warnings)?;
    }
    let mut out = Outputs::new(Problems::new("the slices do not line up"));
    let mut map = LayerMap::new();
    // One output tensor from the same-named tensor of each source of
    // `slice`: `names[k]` in source k, written as `out_name`, at gradient
    // position `t`.
    let emit =
        |slice: &SlicePlan, names: &[String], out_name: String, t: f64, out: &mut Outputs| -> Result<()> {
            let mut srcs = Vec::with_capacity(names.len());
            for ((input, _, _), name) in slice.sources.iter().zip(names) {
                let ck: &Checkpoint = &inputs[*input].ckpt;
                match ck.logical_index(name) {
                    Some(j) => srcs.push(Source { input: *input, tensor: j }),
                    None => out.problems.push(format!("'{name}' is missing from {}", inputs[*input].label)),
                }
            }
            if srcs.len() != names.len() {
                return Ok(());
            }
            let first = &inputs[srcs[0].input].ckpt.tensors[srcs[0].tensor];
            let dtype = out_dtype(first, spec.out_dtype);
            for s in &srcs[1..] {
                let t2 = &inputs[s.input].ckpt.tensors[s.tensor];
                if t2.shape != first.shape {
                    out.problems.push(format!(
                        "'{out_name}': {} has shape {:?} at '{}', {} has {:?} at '{}'",
                        inputs[srcs[0].input].label,
                        first.shape,
                        first.name,
                        inputs[s.input].label,
                        t2.shape,
                        t2.name
                    ));
                    return Ok(());
                }
            }
            let role = spec.method.base_role();
            let base_pos = slice
                .base
                .filter(|_| role != BaseRole::Input)
                .and_then(|b| slice.sources.iter().position(|x| x.0 == b));
            let model_pos: Vec<usize> = (0..srcs.len()).filter(|k| Some(*k) != base_pos).collect();
            let mut global = slice.params.clone();
            global.extend(spec.global.iter().cloned());
            let param_sources = ParamSources {
                global: &global,
                models: model_pos.iter().map(|&k| slice.sources[k].2.as_slice()).collect(),
                labels: model_pos.iter().map(|&k| inputs[slice.sources[k].0].label.clone()).collect(),
            };
            let params = methods::resolve(spec.method, &param_sources, &out_name, t)?;
            let copy = first.float().is_none()
                || (srcs.len() == 1 && (spec.method != Method::Passthrough || params.models[0].scale == 1.0));
            let op = if copy {
                if dtype == first.dtype {
                    Op::Copy(srcs[0])
                } else {
                    float_of(&inputs[srcs[0].input].ckpt, first, "a slice")?;
                    Op::Convert(srcs[0])
                }
            } else {
                for s in &srcs {
                    let ck = &inputs[s.input].ckpt;
                    float_of(ck, &ck.tensors[s.tensor], "a slice")?;
                }
                let n = model_pos.len();
                Op::Merge(Box::new(MergeOp {
                    merge: TensorMerge { method: spec.method, params, seed: spec.seed },
                    base: base_pos.map(|k| srcs[k]),
                    models: model_pos.iter().map(|&k| srcs[k]).collect(),
                    rows: vec![None; n],
                    union: None,
                }))
            };
            out.push(OutTensor { name: out_name, dtype, shape: first.shape.clone(), op });
            Ok(())
        };
    let first = &spec.slices[0];
    let last = spec.slices.last().expect("at least one slice");
    let outside: Vec<&str> =
        rck.tensors.iter().map(|t| t.name.as_str()).filter(|n| layer_index(n).is_none()).collect();
    let pre = |n: &str| is_embedding(n) || n.contains("embed") || n.contains(".wte.") || n.contains(".wpe.");
    for name in outside.iter().filter(|n| pre(n)) {
        let names = vec![name.to_string(); first.sources.len()];
        emit(first, &names, name.to_string(), 0.0, &mut out)?;
    }
    let mut o = 0u64;
    for s in &spec.slices {
        let (r0, lo0) = (s.sources[0].0, s.sources[0].1);
        for j in 0..s.len {
            let t = if s.len > 1 { j as f64 / (s.len - 1) as f64 } else { 1.0 };
            let templates: Vec<&str> = inputs[r0]
                .ckpt
                .tensors
                .iter()
                .map(|t| t.name.as_str())
                .filter(|n| layer_index(n) == Some(lo0 + j))
                .collect();
            for tname in templates {
                let names: Vec<String> = s.sources.iter().map(|(_, lo, _)| renumber(tname, lo + j)).collect();
                emit(s, &names, renumber(tname, o), t, &mut out)?;
            }
            map.push((r0, lo0 + j));
            o += 1;
        }
    }
    for name in outside.iter().filter(|n| !pre(n)) {
        let names = vec![name.to_string(); last.sources.len()];
        emit(last, &names, name.to_string(), 0.0, &mut out)?;
    }
    let mut plan = out.into_plan(inputs, spec.shard_size, warnings)?;
    finish(&mut plan, experts, spec.shard_size)?;
    Ok((plan, map))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renumbering_changes_only_the_layer_index() {
        assert_eq!(renumber("model.layers.3.mlp.up_proj.weight", 17), "model.layers.17.mlp.up_proj.weight");
        assert_eq!(
            renumber("model.layers.12.input_layernorm.weight", 0),
            "model.layers.0.input_layernorm.weight"
        );
        assert_eq!(renumber("model.norm.weight", 5), "model.norm.weight");
    }
}
