//! The plan of `apply --lora`: a PEFT LoRA adapter merged into the model it
//! was trained on, over the base's tensors, names, order and dtypes.
//!
//! Each adapted weight becomes `W + scale * scaling * (B @ A)` (see
//! `arith::lowrank`), streamed like every other formula, so a merge of a
//! 70B model stays in bounded memory and its bytes do not depend on
//! threads or chunking. Tensors the adapter stores whole
//! (`modules_to_save`, biases) replace the base's; with a scale other than
//! 1 they move the base that fraction of the way, `W + s * (new - W)`.

use std::collections::HashMap;

use crate::arith::rows::RowRun;
use crate::error::{Error, Result};
use crate::merge::TensorMerge;
use crate::merge::methods::{self, Method, ParamSources};
use crate::model::adapter::{Adapter, Change, LayerKind, layer_kind};
use crate::model::checkpoint::Tensor;
use crate::model::checkpoint::{Checkpoint, is_lm_head};
use crate::model::dtype::{DType, FloatType};
use crate::model::experts::{ExpertLayout, Family, split_fused};
use crate::model::layers::layers_of;
use crate::plan::chat_vector::Common;
use crate::plan::checks::{Problems, float_of};
use crate::plan::experts::{ExpertPlan, finish, line_up};
use crate::plan::skeleton::{Step, each_tensor};
use crate::plan::{Formula, Input, MergeOp, Op, Plan, Role, Source};

/// Plans `base + adapter`: every tensor of the base, the adapted ones
/// computed.
pub(crate) fn plan_lora(
    mut base: Checkpoint,
    adapter: Adapter,
    common: &Common,
    out_dtype: Option<FloatType>,
) -> Result<Plan> {
    let experts = line_up_adapter(&mut base, &adapter, common.expert_layout)?;
    let mut sel = common.selection.clone();
    sel.set_layers(layers_of(base.tensors.iter().map(|t| t.name.as_str())));
    let sel = &sel;
    let ack = &adapter.ckpt;
    let targets = adapter.changes.iter().map(|(n, _)| n.as_str());
    sel.check_all_match(base.tensors.iter().map(|t| t.name.as_str()).chain(targets))?;
    let changes: HashMap<&str, &Change> = adapter.changes.iter().map(|(n, c)| (n.as_str(), c)).collect();
    let mut problems = Problems::new("the adapter does not fit the base model");
    let mut warnings = adapter.notes.clone();
    let model_type = base.config.as_ref().and_then(|c| c.raw.get("model_type")?.as_str().map(str::to_string));
    let mut flag_ignored: Option<String> = None;
    missing_targets(&base, &adapter, &mut problems);
    let mut left_out = 0usize;
    let out = each_tensor(&base, 0, out_dtype, "--exclude", problems, |base_src, bt, out_ty, problems| {
        let copy = |src: Source, from: DType| -> Op {
            if from == out_ty { Op::Copy(src) } else { Op::Convert(src) }
        };
        let change = changes.get(bt.name.as_str()).copied();
        if change.is_some() && !sel.selects(&bt.name) {
            left_out += 1;
        }
        Ok(match change.filter(|_| sel.selects(&bt.name)) {
            None => Step::Keep,
            Some(change @ Change::Replace(_)) => {
                float_of(&base, bt, "--exclude")?;
                let Ok(Update::Replace(ai)) =
                    update_of(&adapter, bt, change, model_type.as_deref(), &mut flag_ignored)
                        .map_err(|p| problems.push(p))
                else {
                    return Ok(Step::Skip);
                };
                let new = Source { input: 1, tensor: ai };
                let scale = sel.scale(&bt.name);
                if scale == 1.0 {
                    Step::Make(copy(new, ack.tensors[ai].dtype))
                } else {
                    let op = Op::Arith {
                        formula: Formula::AddDiff { base: base_src, chat: new, pre: base_src },
                        runs: vec![RowRun { base_row: 0, vector_row: 0, rows: bt.numel() }],
                        row_len: 1,
                    };
                    Step::Scaled(op, scale)
                }
            }
            Some(change @ Change::LowRank { .. }) => {
                float_of(&base, bt, "--exclude")?;
                let Ok(Update::LowRank { onto, a, b, transposed, rows, cols, scaling }) =
                    update_of(&adapter, bt, change, model_type.as_deref(), &mut flag_ignored)
                        .map_err(|p| problems.push(p))
                else {
                    return Ok(Step::Skip);
                };
                let onto = onto.map_or(base_src, |i| Source { input: 1, tensor: i });
                let scale = (f64::from(sel.scale(&bt.name)) * scaling) as f32;
                if !scale.is_finite() {
                    return Err(Error::Usage(format!(
                        "'{}': the adapter's scaling {scaling} times the scale does not fit in f32",
                        bt.name
                    )));
                }
                let op = Op::Arith {
                    formula: Formula::AddLowRank {
                        base: onto,
                        a: Source { input: 1, tensor: a },
                        b: Source { input: 1, tensor: b },
                        transposed,
                        rows,
                        cols,
                    },
                    runs: vec![RowRun { base_row: 0, vector_row: 0, rows: bt.numel() }],
                    row_len: 1,
                };
                Step::Scaled(op, scale)
            }
        })
    })?;
    warnings.extend(flag_ignored);
    if left_out > 0 {
        warnings
            .push(format!("{left_out} tensor(s) the adapter changes are excluded and stay as in the base"));
    }
    let inputs = vec![Input::new(Role::Base, base), Input::new(Role::Adapter, adapter.ckpt)];
    let mut plan = out.into_plan(inputs, common.shard_size, warnings)?;
    finish(&mut plan, experts, common.shard_size)?;
    Ok(plan)
}

/// Lines the base's experts up with the adapter's targets: PEFT wraps each
/// expert's linear layer, so an adapter trained on a per-expert model names
/// `experts.N.gate_proj`; a base saved fused by transformers 5 is then read
/// expert by expert (nothing copied) and written fused again, or in the
/// layout `--expert-layout` asks for.
fn line_up_adapter(
    base: &mut Checkpoint,
    adapter: &Adapter,
    requested: Option<ExpertLayout>,
) -> Result<Option<ExpertPlan>> {
    let fused_base = match Family::of(base) {
        Some(f) if f.layout_of(base)? == Some(ExpertLayout::Fused) => Some(f),
        _ => None,
    };
    let per_expert_targets = |f: &Family| adapter.changes.iter().any(|(name, _)| f.piece(name).is_some());
    match fused_base {
        Some(family) if per_expert_targets(family) => {
            let split = split_fused(base, family)?;
            Ok(Some(ExpertPlan {
                family,
                inputs: vec![(Some(ExpertLayout::Fused), split), (None, 0)],
                output: requested.unwrap_or(ExpertLayout::Fused),
                requested: requested.is_some(),
            }))
        }
        _ => line_up(&mut [base], 0, requested),
    }
}

/// What an adapter does to one base tensor, in the base's terms (tensor
/// indices into the adapter's checkpoint).
#[derive(Clone, Copy, Debug)]
enum Update {
    /// The adapter's tensor replaces the base's.
    Replace(usize),
    /// `W + scaling * (B @ A)` over a `rows x cols` weight, `W` the base's
    /// tensor or the adapter's saved copy of it (`onto`).
    LowRank { onto: Option<usize>, a: usize, b: usize, transposed: bool, rows: u64, cols: u64, scaling: f64 },
}

/// What `change` does to base tensor `bt`, or the problem that keeps the
/// adapter from fitting it. `flag_ignored` collects the first note about
/// a `fan_in_fan_out` that PEFT overrides.
fn update_of(
    adapter: &Adapter,
    bt: &Tensor,
    change: &Change,
    model_type: Option<&str>,
    flag_ignored: &mut Option<String>,
) -> std::result::Result<Update, String> {
    let ack = &adapter.ckpt;
    let (module, a, b, rank, scaling, embedding, base_layer) = match change {
        Change::Replace(ai) => {
            let at = &ack.tensors[*ai];
            if at.shape != bt.shape {
                return Err(format!(
                    "'{}': the adapter stores it whole as {:?}, the base's is {:?}{}",
                    bt.name,
                    at.shape,
                    bt.shape,
                    if at.shape.first() != bt.shape.first() { " (a resized vocabulary?)" } else { "" }
                ));
            }
            return Ok(Update::Replace(*ai));
        }
        Change::LowRank { module, a, b, rank, scaling, embedding, base_layer } => {
            (module, a, b, rank, scaling, embedding, base_layer)
        }
    };
    let (ta, tb) = (&ack.tensors[*a], &ack.tensors[*b]);
    // The weight the update goes onto: the base's, or the
    // adapter's saved copy of it.
    let onto = match base_layer {
        Some(i) if ack.tensors[*i].shape != bt.shape => {
            return Err(format!(
                "'{}': the adapter saves its base layer as {:?}, the base's is {:?} (a resized vocabulary?)",
                bt.name, ack.tensors[*i].shape, bt.shape
            ));
        }
        other => *other,
    };
    // B @ A is transposed as PEFT lines it up for the base
    // layer's type, whatever fan_in_fan_out says.
    let factors = if *embedding { "lora_embedding_A/B" } else { "lora_A/lora_B" };
    let transposed = match (layer_kind(model_type, module), *embedding) {
        (Some(LayerKind::Embedding), true) => true,
        (Some(LayerKind::Linear | LayerKind::Conv1D), true) | (Some(LayerKind::Embedding), false) => {
            return Err(format!(
                "'{module}' is {} in the base, but the adapter stores {factors} for it: PEFT drops such factors when it loads the adapter (the layer keeps freshly initialised ones), so the adapter was not made for this model",
                match layer_kind(model_type, module) {
                    Some(LayerKind::Embedding) => "an embedding",
                    Some(LayerKind::Conv1D) => "a Conv1D layer",
                    _ => "a Linear layer",
                }
            ));
        }
        (Some(kind), false) => {
            let conv = kind == LayerKind::Conv1D;
            if conv != adapter.fan_in_fan_out && flag_ignored.is_none() {
                *flag_ignored = Some(format!(
                    "fan_in_fan_out is {} in the adapter's config, but '{module}' is a {} layer: PEFT {} the update for it regardless, and so does chatvec",
                    adapter.fan_in_fan_out,
                    if conv { "Conv1D" } else { "Linear" },
                    if conv { "transposes" } else { "does not transpose" }
                ));
            }
            conv
        }
        // No config.json: the kind of layer is not known.
        (None, true) => true,
        (None, false) if !adapter.fan_in_fan_out => false,
        (None, false) if ta.shape[1] == tb.shape[0] => {
            return Err(format!(
                "'{module}': the base has no model_type (no config.json), so whether it is a Linear or a Conv1D layer, which decides how fan_in_fan_out applies, is not known"
            ));
        }
        (None, false) => true,
    };
    // The update's shape: B @ A is [B rows, A cols].
    let update = if transposed { vec![ta.shape[1], tb.shape[0]] } else { vec![tb.shape[0], ta.shape[1]] };
    if bt.shape != update {
        return Err(format!(
            "'{}': the base's is {:?}, the adapter's rank-{rank} update is {:?}",
            bt.name, bt.shape, update
        ));
    }
    Ok(Update::LowRank {
        onto,
        a: *a,
        b: *b,
        transposed,
        rows: update[0],
        cols: update[1],
        scaling: *scaling,
    })
}

/// Lists each tensor the adapter changes that `base` lacks.
fn missing_targets(base: &Checkpoint, adapter: &Adapter, problems: &mut Problems) {
    for (name, _) in &adapter.changes {
        if base.get(name).is_none() {
            problems.push(if is_lm_head(name) && base.is_tied() {
                format!(
                    "the adapter changes '{name}', which {} ties to its embeddings (one matrix cannot take a change meant for the output side only)",
                    base.dir.display()
                )
            } else {
                format!("the adapter changes '{name}', which is not in the base {}", base.dir.display())
            });
        }
    }
}

/// How an adapter changes one tensor of the model it is read with (a
/// `model+lora` input), with the adapter's tensors as plan sources.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Patch {
    /// The adapter's tensor stands in for the model's.
    Replace(Source),
    /// `W + scale * (B @ A)` rounded to `round`, `W` the model's tensor or
    /// the adapter's saved copy of it (`onto`).
    LowRank {
        onto: Option<Source>,
        a: Source,
        b: Source,
        transposed: bool,
        rows: u64,
        cols: u64,
        scale: f32,
        round: FloatType,
    },
}

/// A LoRA adapter merged into an input as it is read: which tensors
/// change (by tensor index in the input's checkpoint), and how.
#[derive(Clone, Debug)]
pub(crate) struct Overlay {
    pub patches: HashMap<usize, Patch>,
}

/// Merges `adapter` into input `model` of a planned merge as the input is
/// read, as mergekit's `model+lora` reference does (PEFT's
/// `merge_and_unload`, the result stored in `merge_dtype` or else in each
/// weight's own dtype): the adapter becomes an input of the plan, and
/// every output tensor that copied a changed weight computes it instead.
/// Shapes do not change, so the plan's checks hold.
pub(crate) fn attach_adapter(
    plan: &mut Plan,
    model: usize,
    adapter: Adapter,
    label: &str,
    merge_dtype: Option<FloatType>,
) -> Result<()> {
    let mut problems = Problems::new("the adapter does not fit the model it is named with");
    let base = &plan.inputs[model].ckpt;
    missing_targets(base, &adapter, &mut problems);
    let model_type = base.config.as_ref().and_then(|c| c.raw.get("model_type")?.as_str());
    let at = plan.inputs.len();
    let mut flag_ignored = None;
    let mut patches = HashMap::new();
    for (name, change) in &adapter.changes {
        let Some(ti) = base.tensors.iter().position(|t| &t.name == name) else { continue };
        let bt = &base.tensors[ti];
        let ty = float_of(base, bt, "another model")?;
        let src = |tensor| Source { input: at, tensor };
        match update_of(&adapter, bt, change, model_type, &mut flag_ignored) {
            Err(p) => problems.push(p),
            Ok(Update::Replace(ai)) => {
                patches.insert(ti, Patch::Replace(src(ai)));
            }
            Ok(Update::LowRank { onto, a, b, transposed, rows, cols, scaling }) => {
                let scale = scaling as f32;
                if !scale.is_finite() {
                    problems.push(format!("'{name}': the adapter's scaling {scaling} does not fit in f32"));
                    continue;
                }
                let lr = Patch::LowRank {
                    onto: onto.map(src),
                    a: src(a),
                    b: src(b),
                    transposed,
                    rows,
                    cols,
                    scale,
                    round: merge_dtype.unwrap_or(ty),
                };
                patches.insert(ti, lr);
            }
        }
    }
    problems.into_result()?;
    let input = Input::named(Role::Adapter, label, adapter.ckpt);
    plan.warnings.extend(adapter.notes.iter().map(|n| format!("{label}: {n}")));
    plan.warnings.extend(flag_ignored.map(|n| format!("{label}: {n}")));
    plan.inputs.push(input);
    // A weight the plan copies as it is stored is read through the
    // adapter instead: a one-model passthrough computes it.
    for t in &mut plan.tensors {
        let (Op::Copy(s) | Op::Convert(s)) = t.op else { continue };
        if s.input != model || !patches.contains_key(&s.tensor) {
            continue;
        }
        let label = plan.inputs[model].label.clone();
        let params = methods::resolve(
            Method::Passthrough,
            &ParamSources { global: &[], models: vec![&[]], labels: vec![label] },
            &t.name,
            0.0,
        )?;
        t.op = Op::Merge(Box::new(MergeOp {
            merge: TensorMerge { method: Method::Passthrough, params, seed: 0 },
            base: None,
            models: vec![s],
            rows: vec![None],
            union: None,
        }));
    }
    plan.inputs[model].lora = Some(Overlay { patches });
    Ok(())
}
