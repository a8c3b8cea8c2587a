//! `extract` and `apply`: the chat vector `chat - pretrained`, written as
//! a checkpoint or added, scaled, to a base model.

use crate::error::{Error, Result};
use crate::exec::RunOptions;
use crate::job::preflight;
use crate::job::{Records, Summary, Variant, check_written_config, set_labels, write_output, write_outputs};
use crate::model::checkpoint::Checkpoint;
use crate::model::experts::ExpertLayout;
use crate::output::Destination;
use crate::output::card::model_card;
use crate::output::manifest::{MANIFEST_FILE, RecipeRecord, TensorRecord, VectorRecord, read_vector_info};
use crate::output::sidecars::{ChatSide, model_side_files, read_side_files};
use crate::params::apply::{ApplySpec, ExtractSpec, OutDtype, VectorSource};
use crate::params::select::{Scale, Selection};
use crate::plan::chat_vector::{ApplyOptions, Common, VectorSide, plan_apply, plan_extract};
use crate::plan::checks::delta_ratio;
use crate::plan::lora::plan_lora;
use crate::plan::requant::{requantize_fp8, requantize_mxfp4};
use crate::plan::{Op, Plan};
use crate::resolve::{Fetch, vector_alias};

/// A `VectorSource` with its vector alias looked up: what to open.
pub(crate) enum VectorRefs {
    /// A (chat, pretrained) pair to subtract on the fly; `alias` is the
    /// vector alias that named it, if any.
    Pair { chat: String, pretrained: String, alias: Option<String> },
    /// A stored vector directory or Hub id.
    Stored(String),
    /// A LoRA adapter.
    Lora(String),
}

/// Looks a stored reference up among the vector aliases, which name a
/// pair, so every command reads aliases the same way.
pub(crate) fn resolve_vector(source: &VectorSource) -> Result<VectorRefs> {
    Ok(match source {
        VectorSource::Stored(v) => match vector_alias(v)? {
            Some(a) => VectorRefs::Pair { chat: a.chat, pretrained: a.pretrained, alias: Some(v.clone()) },
            None => VectorRefs::Stored(v.clone()),
        },
        VectorSource::Pair { chat, pretrained } => {
            VectorRefs::Pair { chat: chat.clone(), pretrained: pretrained.clone(), alias: None }
        }
        VectorSource::Lora(a) => VectorRefs::Lora(a.clone()),
    })
}

/// The settings plan_extract and plan_apply share, from a checked spec.
fn common(
    selection: &Selection,
    shard_size: u64,
    allow_mismatch: bool,
    expert_layout: Option<ExpertLayout>,
) -> Common {
    Common { selection: selection.clone(), shard_size, allow_mismatch, expert_layout }
}

/// Parameters as JSON. Through text, so f32 values keep their shortest
/// spelling (0.9, not 0.8999999761581421).
pub(crate) fn to_value(p: &impl serde::Serialize) -> Result<serde_json::Value> {
    let text = serde_json::to_string(p).map_err(|e| Error::Internal(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| Error::Internal(e.to_string()))
}

/// The factor each computed tensor's vector was multiplied by in variant
/// `variant` of the plan (for a LoRA merge, on `B @ A`: the scale times
/// alpha / r), by tensor name, for the manifest: what a layer gradient or
/// a `--scale-for` rule gave each one.
fn tensor_scales(plan: &Plan, variant: usize) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (i, t) in plan.tensors.iter().enumerate() {
        if let Some(s) = plan.scale(variant, i) {
            // Through text, so an f32 keeps its shortest spelling.
            let v = serde_json::from_str(&serde_json::to_string(&s).unwrap_or_default()).unwrap_or_default();
            m.insert(t.name.clone(), v);
        }
    }
    serde_json::Value::Object(m)
}

/// Writes the chat vector `chat - pretrained` as a checkpoint, with the
/// chat model's config, tokenizer and template beside it.
pub fn extract(spec: &ExtractSpec, out: &Destination, run: &RunOptions) -> Result<Summary> {
    if spec.lora.is_some() {
        return Err(Error::Usage("--rank asks for a LoRA adapter: run it through `extract_lora`".into()));
    }
    preflight(out, |o, fetch| extract_now(spec, o, run, fetch))
}

fn extract_now(spec: &ExtractSpec, out: &Destination, run: &RunOptions, fetch: &Fetch) -> Result<Summary> {
    let chat_ck = fetch.open_model(spec.chat())?;
    let chat_dir = chat_ck.dir.clone();
    let common = common(&spec.selection, spec.shard_size, spec.allow_mismatch(), spec.expert_layout());
    let mut plan = plan_extract(chat_ck, fetch.open_model(spec.pretrained())?, &common, spec.dtype())?;
    set_labels(&mut plan, &[spec.chat(), spec.pretrained()]);
    // The vector carries the chat model's config, tokenizer and template so
    // `apply --vector` can compare architectures, align vocabularies and
    // install the template without the chat model at hand.
    let side = read_side_files(&chat_dir)?;
    let vector = VectorRecord {
        tensors: plan
            .stored(0..plan.tensors.len())
            .iter()
            .map(|t| TensorRecord {
                name: t.spec.name.to_string(),
                dtype: t.spec.dtype.name().into(),
                shape: t.spec.shape.to_vec(),
            })
            .collect(),
        omitted: plan.omitted.clone(),
        tied: plan.inputs[0].ckpt.is_tied(),
    };
    let rec =
        Records { kind: "extract", params: to_value(&spec.given())?, recipe: None, vector: Some(vector) };
    write_output(plan, rec, out, run, side)
}

/// Writes `base + scale * vector`: the base's tensors, names, order and
/// dtypes, with the chat model's template and eos ids.
pub fn apply(spec: &ApplySpec, out: &Destination, run: &RunOptions) -> Result<Summary> {
    preflight(out, |o, fetch| apply_recorded(spec, o, run, fetch, None))
}

/// Above this ratio of norms, a "vector" is taken for a whole model: a
/// chat vector (instruct minus its base) changes a weight matrix by about
/// 0.1% to 5% of its norm, a whole model is about 100% of it, and two
/// unrelated models differ by about 140% (the sum of two independent
/// matrices of the same norm). 0.5 sits between, with room either side.
const WHOLE_MODEL_RATIO: f64 = 0.5;

/// A `--vector` directory without a chatvec manifest: refused, as the likely
/// mistake is a whole model given as a vector (the output would be base +
/// chat, a broken model), unless `raw_delta` says it is a delta; and then
/// still refused when its norms look like a whole model's. Returns the note
/// for a delta that passes.
fn raw_delta(spec: &ApplySpec, base: &Checkpoint, vector: &Checkpoint) -> Result<String> {
    let dir = vector.dir.display();
    if !spec.raw_delta() {
        return Err(Error::Usage(format!(
            "{dir} has no {MANIFEST_FILE}: it is not a vector written by `chatvec extract`, and adding a whole model would make a broken one"
        ))
        .with_hint("to subtract two models give --chat and --pretrained; if the directory holds a raw delta from another tool, pass --raw-delta"));
    }
    let Some((ratio, tensor)) = delta_ratio(base, vector) else {
        return Ok(format!(
            "{dir} has no {MANIFEST_FILE}; applying its tensors as a raw delta (--raw-delta)"
        ));
    };
    if ratio > WHOLE_MODEL_RATIO {
        return Err(Error::Usage(format!(
            "{dir} looks like a whole model, not a delta: ||vector|| / ||base|| is {ratio:.2} on '{tensor}' (a chat vector's is a few percent)"
        ))
        .with_hint("give the chat and pretrained models as --chat and --pretrained"));
    }
    Ok(format!(
        "{dir} has no {MANIFEST_FILE}; applying its tensors as a raw delta (--raw-delta; ||vector|| / ||base|| at most {ratio:.3})"
    ))
}

/// `chat - pretrained` of the same files is zero: the output would be the
/// base. Refused, naming the directory.
fn refuse_zero_vector(chat: &Checkpoint, pretrained: &Checkpoint) -> Result<()> {
    let canon = |ck: &Checkpoint| std::fs::canonicalize(&ck.dir).unwrap_or_else(|_| ck.dir.clone());
    let same_files = chat.shards.len() == pretrained.shards.len()
        && chat
            .shards
            .iter()
            .zip(&pretrained.shards)
            .all(|(a, b)| a.stamp.dev == b.stamp.dev && a.stamp.ino == b.stamp.ino);
    if canon(chat) == canon(pretrained) || same_files {
        return Err(Error::Usage(format!(
            "the chat and pretrained models are the same files ({}): the vector is zero and the output would be the base",
            chat.dir.display()
        ))
        .with_hint("--chat is the instruct model, --pretrained the base it was tuned from (e.g. llama3-8b-instruct and llama3-8b)"));
    }
    Ok(())
}

/// `apply`, recording the recipe it came from.
pub(crate) fn apply_recorded(
    spec: &ApplySpec,
    out: &Destination,
    run: &RunOptions,
    fetch: &Fetch,
    recipe: Option<RecipeRecord>,
) -> Result<Summary> {
    if let VectorSource::Lora(adapter) = &spec.vector {
        return apply_lora(spec, adapter, out, run, fetch, recipe);
    }
    let outs = [(spec.selection.default_scale().clone(), out.clone())];
    let mut all = apply_many(spec, &outs, run, fetch, recipe)?;
    all.pop().ok_or_else(|| Error::Internal("no output was written".into()))
}

/// The side files (config, tokenizer, chat template, eos) an apply of
/// `spec` writes, read from its inputs' side files only: what `chatvec
/// run` checks the SFT stage against before the merge.
pub(crate) fn output_side_files(
    spec: &ApplySpec,
    fetch: &Fetch,
) -> Result<crate::output::sidecars::SideFiles> {
    let base_dir = fetch.open_model(spec.base())?.dir;
    let (chat_dir, adapter) = match resolve_vector(&spec.vector)? {
        VectorRefs::Pair { chat, .. } => (fetch.open_model(&chat)?.dir, false),
        VectorRefs::Stored(v) => (fetch.open_model(&v)?.dir, false),
        VectorRefs::Lora(v) => (fetch.open_adapter(&v)?.ckpt.dir, true),
    };
    // A LoRA adapter carries a template only when it was trained with one.
    let carries = !adapter
        || crate::model::side_file(&chat_dir, "tokenizer_config.json")?.is_some()
        || crate::model::side_file(&chat_dir, "chat_template.jinja")?.is_some();
    let chat_side =
        carries.then_some(ChatSide { dir: &chat_dir, keep_base_template: spec.keep_base_template() });
    model_side_files(&base_dir, chat_side, spec.out_dtype())
}

/// One vector of `apply`, opened: what the planner reads, the model whose
/// template the output takes, how the user named its inputs, and the notes
/// and warnings opening it gave.
struct OpenedVector {
    side: VectorSide,
    chat_dir: std::path::PathBuf,
    labels: Vec<String>,
    notes: Vec<String>,
    warnings: Vec<String>,
}

/// Opens one vector of `apply`: a (chat, pretrained) pair or vector alias
/// streamed, or a stored vector (a raw delta only when `--raw-delta` says
/// so and its norms agree).
fn open_vector(
    spec: &ApplySpec,
    source: &VectorSource,
    fetch: &Fetch,
    base: &Checkpoint,
) -> Result<OpenedVector> {
    let (mut notes, mut warnings) = (Vec::new(), Vec::new());
    match resolve_vector(source)? {
        VectorRefs::Pair { chat, pretrained, alias } => {
            if let Some(v) = alias {
                notes.push(format!("vector {v} = {chat} - {pretrained}, computed on the fly"));
            }
            let chat_ck = fetch.open_model(&chat)?;
            let pre_ck = fetch.open_model(&pretrained)?;
            refuse_zero_vector(&chat_ck, &pre_ck)?;
            let chat_dir = chat_ck.dir.clone();
            let side = VectorSide::Streaming { chat: Box::new(chat_ck), pretrained: Box::new(pre_ck) };
            Ok(OpenedVector { side, chat_dir, labels: vec![chat, pretrained], notes, warnings })
        }
        VectorRefs::Stored(v) => {
            let vector = fetch.open_model(&v)?;
            let chat_dir = vector.dir.clone();
            let info = read_vector_info(&chat_dir)?;
            if info.is_none() {
                warnings.push(raw_delta(spec, base, &vector)?);
            }
            let omitted = info.map(|i| i.omitted).unwrap_or_default();
            let side = VectorSide::Stored { vector: Box::new(vector), omitted };
            Ok(OpenedVector { side, chat_dir, labels: vec![v], notes, warnings })
        }
        VectorRefs::Lora(_) => Err(Error::Usage("a LoRA adapter is merged at one scale at a time".into())),
    }
}

/// The factor each computed tensor got from each of several vectors
/// added in one pass: one map of tensor name to scale per vector, in the
/// order given (a tensor a vector left out is not in its map).
fn vector_scales(plan: &Plan, vectors: usize) -> serde_json::Value {
    let mut maps = vec![serde_json::Map::new(); vectors];
    for t in &plan.tensors {
        if let Op::AddVectors(v) = &t.op {
            for term in &v.terms {
                let s = serde_json::from_str(&serde_json::to_string(&term.scale).unwrap_or_default())
                    .unwrap_or_default();
                maps[term.vector].insert(t.name.clone(), s);
            }
        }
    }
    serde_json::Value::Array(maps.into_iter().map(serde_json::Value::Object).collect())
}

/// `apply` at several scales from one read of the inputs (a sweep): one
/// complete output per `(scale, where)`, each byte-identical to a plain
/// `apply` with that scale, each with its own manifest and model card.
/// With several vectors (`spec.more`), one output, the vectors added in
/// one pass in the order given.
pub(crate) fn apply_many(
    spec: &ApplySpec,
    outs: &[(Scale, Destination)],
    run: &RunOptions,
    fetch: &Fetch,
    recipe: Option<RecipeRecord>,
) -> Result<Vec<Summary>> {
    let several = !spec.more.is_empty();
    if several && outs.len() != 1 {
        return Err(Error::Usage(format!(
            "a sweep scales one vector; {} were given",
            spec.more.len() + 1
        ))
        .with_hint("sweep one vector with the others applied first, or give each vector a layer gradient with --scale"));
    }
    let common = common(&spec.selection, spec.shard_size, spec.allow_mismatch(), spec.expert_layout());
    let base_ck = fetch.open_model(spec.base())?;
    let base_dir = base_ck.dir.clone();
    let (mut early_notes, mut early_warnings) = (Vec::new(), Vec::new());
    let mut labels = vec![spec.base().to_string()];
    let (mut sides, mut chat_dir) = (Vec::new(), None);
    for source in std::iter::once(&spec.vector).chain(spec.more.iter().map(|(v, _)| v)) {
        let opened = open_vector(spec, source, fetch, &base_ck)?;
        early_notes.extend(opened.notes);
        early_warnings.extend(opened.warnings);
        labels.extend(opened.labels);
        chat_dir.get_or_insert(opened.chat_dir);
        sides.push(opened.side);
    }
    // The output takes the first vector's chat template and eos ids.
    let chat_dir = chat_dir.ok_or_else(|| Error::Internal("apply without a vector".into()))?;
    if several {
        early_warnings.extend(spec.scale_warnings());
        early_notes.push(format!(
            "{} vectors added in one pass, in the order given; the template and eos ids are the first one's",
            sides.len()
        ));
    } else {
        for (s, _) in outs {
            early_warnings.extend(spec.with_scale(s).scale_warnings());
        }
    }
    early_warnings.dedup();
    let candidates = if several { Vec::new() } else { outs.iter().map(|(s, _)| s.clone()).collect() };
    let vector_scales_given: Vec<Scale> = if several {
        std::iter::once(spec.selection.default_scale().clone())
            .chain(spec.more.iter().map(|(_, s)| s.clone()))
            .collect()
    } else {
        Vec::new()
    };
    let opts = ApplyOptions {
        common,
        embeddings: spec.embeddings,
        out_dtype: spec.out_dtype(),
        candidates,
        vector_scales: vector_scales_given.clone(),
    };
    let mut plan = plan_apply(base_ck, sides, &opts)?;
    if let Some(scheme) = spec.requantize() {
        let flag = if scheme == OutDtype::Fp8 { "fp8" } else { "mxfp4" };
        if outs.len() > 1 {
            return Err(Error::Usage(format!(
                "a sweep writes bf16 candidates; --out-dtype {flag} is for apply"
            )));
        }
        match scheme {
            OutDtype::Fp8 => requantize_fp8(&mut plan, spec.shard_size)?,
            _ => requantize_mxfp4(&mut plan, spec.shard_size)?,
        }
    }
    plan.warnings.splice(0..0, early_warnings);
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    set_labels(&mut plan, &labels);
    let chat_side = || ChatSide { dir: &chat_dir, keep_base_template: spec.keep_base_template() };
    let first_side = model_side_files(&base_dir, Some(chat_side()), spec.out_dtype())?;
    check_written_config(&mut plan, &first_side, spec.allow_mismatch(), &outs[0].1)?;
    // The first candidate takes these; later ones read their own.
    let mut first_side = Some(first_side);
    let mut variants = Vec::with_capacity(outs.len());
    for (k, (scale, out)) in outs.iter().enumerate() {
        let one = if several { spec.clone() } else { spec.with_scale(scale) };
        let mut side = match first_side.take() {
            Some(s) => s,
            None => model_side_files(&base_dir, Some(chat_side()), spec.out_dtype())?,
        };
        side.notes.splice(0..0, early_notes.clone());
        let how = if several {
            let list: Vec<String> = vector_scales_given.iter().map(Scale::to_string).collect();
            format!("{} chat vectors (scales {})", list.len(), list.join(", "))
        } else {
            format!("chat vector (scale {scale})")
        };
        model_card(&plan, &how, recipe.as_ref(), &mut side)?;
        let mut params = to_value(&one.given())?;
        params["tensor_scales"] =
            if several { vector_scales(&plan, vector_scales_given.len()) } else { tensor_scales(&plan, k) };
        let rec = Records { kind: "apply", params, recipe: recipe.clone(), vector: None };
        variants.push(Variant { rec, dest: out.clone(), side });
    }
    // The manifest says what ran (apply); the summary says what was asked
    // for (a merge, when from a recipe).
    let from_recipe = recipe.is_some();
    let mut summaries = write_outputs(plan, variants, run)?;
    if from_recipe {
        summaries.iter_mut().for_each(|s| s.kind = "merge");
    }
    Ok(summaries)
}

/// `apply --lora`: the adapter merged into the base with the streaming
/// engine, the base's side files with the adapter's chat template and eos
/// ids when it carries a tokenizer (TRL saves one beside the adapter).
fn apply_lora(
    spec: &ApplySpec,
    reference: &str,
    out: &Destination,
    run: &RunOptions,
    fetch: &Fetch,
    recipe: Option<RecipeRecord>,
) -> Result<Summary> {
    if spec.requantize().is_some() {
        return Err(Error::Usage(
            "--out-dtype fp8 and mxfp4 write a chat vector's output; a LoRA merge writes bf16".into(),
        ));
    }
    let common = common(&spec.selection, spec.shard_size, spec.allow_mismatch(), spec.expert_layout());
    let adapter = fetch.open_adapter(reference)?;
    let base_ck = fetch.open_model(spec.base())?;
    let base_dir = base_ck.dir.clone();
    let adapter_dir = adapter.dir().to_path_buf();
    let mut notes = vec![format!(
        "LoRA adapter {}: {} tensor(s) changed{}",
        adapter.weights_path().display(),
        adapter.changes.len(),
        if adapter.use_rslora { " (rsLoRA scaling alpha / sqrt(r))" } else { "" }
    )];
    if let Some(trained_on) = &adapter.base_model {
        notes.push(format!("the adapter was trained on {trained_on}"));
    }
    let lora = serde_json::json!({
        "adapter": reference,
        "base_model_name_or_path": adapter.base_model,
        "use_rslora": adapter.use_rslora,
    });
    let mut plan = plan_lora(base_ck, adapter, &common, spec.out_dtype())?;
    plan.warnings.splice(0..0, spec.scale_warnings());
    set_labels(&mut plan, &[spec.base(), reference]);
    let has_template = crate::model::side_file(&adapter_dir, "tokenizer_config.json")?.is_some()
        || crate::model::side_file(&adapter_dir, "chat_template.jinja")?.is_some();
    let chat_side =
        has_template.then_some(ChatSide { dir: &adapter_dir, keep_base_template: spec.keep_base_template() });
    let mut side = model_side_files(&base_dir, chat_side, spec.out_dtype())?;
    side.notes.splice(0..0, notes);
    check_written_config(&mut plan, &side, spec.allow_mismatch(), out)?;
    let how = format!("LoRA adapter merged (scale {})", spec.selection.default_scale());
    model_card(&plan, &how, recipe.as_ref(), &mut side)?;
    let mut params = to_value(&spec.given())?;
    params["lora"] = lora;
    params["tensor_scales"] = tensor_scales(&plan, 0);
    let rec = Records { kind: "apply", params, recipe, vector: None };
    write_output(plan, rec, out, run, side)
}
