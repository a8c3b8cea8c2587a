//! The `extract` and `apply` jobs end to end: resolve, open, plan, then
//! execute into a temporary directory, add index, side files and manifest,
//! and commit.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::checkpoint::INDEX_FILE;
use crate::dtype::FloatType;
use crate::embeddings::EmbeddingPolicy;
use crate::error::{Error, Result};
use crate::execute::{ExecOptions, execute};
use crate::json::to_pretty;
use crate::manifest::RecipeRecord;
use crate::manifest::{MANIFEST_FILE, Manifest, Parameters, TensorRecord, VectorRecord, read_vector_info};
use crate::model_card::{CARD_FILE, model_card};
use crate::plan::{ApplyOptions, Common, EmbeddingReport, Plan, VectorSide, plan_apply, plan_extract};
use crate::plan::{Input, Role, VocabUnion};
use crate::plan_merge::{MergeSpec, plan_merge};
use crate::recipe::{MergeRecipe, Recipe, RecipeBody, VectorRef};
use crate::resolve::{open_model, vector_alias};
use crate::select::Selection;
use crate::sidecars::{ChatSide, SideFiles, model_side_files, read_side_files};
use crate::writer::{OutputDir, WrittenFile, write_file};
use std::collections::HashMap;

/// Free space kept in reserve beyond the weights, for side files.
const SIDE_FILE_RESERVE: u64 = 256 << 20;

/// Where and how to write.
#[derive(Clone)]
pub struct OutputSettings {
    pub out: PathBuf,
    pub force: bool,
    pub dry_run: bool,
    pub exec: ExecOptions,
    /// The recipe being run, recorded in the manifest.
    pub recipe: Option<RecipeRecord>,
}

/// Tensor selection as given on the command line (kept verbatim for the
/// manifest).
pub struct SelectionArgs {
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub scale: f32,
    pub scale_for: Vec<String>,
    pub shard_size: u64,
    pub allow_mismatch: bool,
}

impl SelectionArgs {
    fn common(&self) -> Result<Common> {
        Ok(Common {
            selection: Selection::new(&self.include, &self.exclude, self.scale, &self.scale_for)?,
            shard_size: self.shard_size,
            allow_mismatch: self.allow_mismatch,
        })
    }

    fn parameters(
        &self,
        embeddings: Option<EmbeddingPolicy>,
        out_dtype: Option<FloatType>,
        keep: bool,
    ) -> Parameters {
        Parameters {
            scale: self.scale,
            scale_for: self.scale_for.clone(),
            include: self.include.clone(),
            exclude: self.exclude.clone(),
            embeddings,
            out_dtype: out_dtype.map(|t| t.dtype().name().to_string()),
            shard_size: self.shard_size,
            allow_mismatch: self.allow_mismatch,
            keep_base_template: keep,
        }
    }
}

/// What a finished (or dry) run reports; `--json` prints it.
#[derive(Serialize)]
pub struct Summary {
    pub kind: &'static str,
    pub output: Option<String>,
    pub dry_run: bool,
    pub tensors: usize,
    pub computed_tensors: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub shards: Vec<WrittenFile>,
    pub embeddings: Vec<EmbeddingReport>,
    pub notes: Vec<String>,
    pub warnings: Vec<String>,
    /// The plan listing, on `--dry-run`.
    #[serde(rename = "plan", skip_serializing_if = "Option::is_none")]
    pub plan_text: Option<String>,
}

/// `extract`: writes `chat - pretrained`.
pub fn extract(
    chat: &str,
    pretrained: &str,
    dtype: Option<FloatType>,
    sel: &SelectionArgs,
    out: &OutputSettings,
) -> Result<Summary> {
    let chat_ck = open_model(chat)?;
    let chat_dir = chat_ck.dir.clone();
    let mut plan = plan_extract(chat_ck, open_model(pretrained)?, &sel.common()?, dtype)?;
    set_labels(&mut plan, &[chat, pretrained]);
    let params = sel.parameters(None, dtype, false);
    // The vector carries the chat model's config, tokenizer and template so
    // `apply --vector` can compare architectures, align vocabularies and
    // install the template without the chat model at hand.
    let side = read_side_files(&chat_dir)?;
    let vector = VectorRecord {
        tensors: plan
            .tensors
            .iter()
            .map(|t| TensorRecord {
                name: t.name.clone(),
                dtype: t.dtype.name().into(),
                shape: t.shape.clone(),
            })
            .collect(),
        omitted: plan.omitted.clone(),
        tied: plan.inputs[0].ckpt.is_tied(),
    };
    run("extract", plan, to_value(params), out, side, Some(vector))
}

/// The vector side of `apply`, as references.
pub enum VectorArgs<'a> {
    Stored(&'a str),
    Streaming { chat: &'a str, pretrained: &'a str },
}

/// `apply`: writes `base + scale * vector`.
pub fn apply(
    base: &str,
    vector: VectorArgs<'_>,
    embeddings: EmbeddingPolicy,
    out_dtype: Option<FloatType>,
    keep_base_template: bool,
    sel: &SelectionArgs,
    out: &OutputSettings,
) -> Result<Summary> {
    let alias = match vector {
        VectorArgs::Stored(v) => vector_alias(v)?.map(|a| (v, a)),
        VectorArgs::Streaming { .. } => None,
    };
    let mut early_notes = Vec::new();
    let vector = match &alias {
        Some((name, a)) => {
            early_notes.push(format!("vector {name} = {} - {}, computed on the fly", a.chat, a.pretrained));
            VectorArgs::Streaming { chat: &a.chat, pretrained: &a.pretrained }
        }
        None => vector,
    };
    let labels: Vec<&str> = match vector {
        VectorArgs::Stored(v) => vec![base, v],
        VectorArgs::Streaming { chat, pretrained } => vec![base, chat, pretrained],
    };
    let base_ck = open_model(base)?;
    let base_dir = base_ck.dir.clone();
    let mut early_warnings = Vec::new();
    let (side, chat_dir) = match vector {
        VectorArgs::Stored(v) => {
            let vector = open_model(v)?;
            let dir = vector.dir.clone();
            let info = read_vector_info(&dir)?;
            if info.is_none() {
                early_warnings.push(format!(
                    "{} has no {MANIFEST_FILE}; treating its tensors as a raw delta",
                    dir.display()
                ));
            }
            let omitted = info.map(|i| i.omitted).unwrap_or_default();
            (VectorSide::Stored { vector: Box::new(vector), omitted }, dir)
        }
        VectorArgs::Streaming { chat, pretrained } => {
            let chat = open_model(chat)?;
            let dir = chat.dir.clone();
            (
                VectorSide::Streaming { chat: Box::new(chat), pretrained: Box::new(open_model(pretrained)?) },
                dir,
            )
        }
    };
    let opts = ApplyOptions { common: sel.common()?, embeddings, out_dtype };
    let mut plan = plan_apply(base_ck, side, &opts)?;
    plan.warnings.splice(0..0, early_warnings);
    set_labels(&mut plan, &labels);
    let params = sel.parameters(Some(embeddings), out_dtype, keep_base_template);
    let mut side =
        model_side_files(&base_dir, Some(ChatSide { dir: &chat_dir, keep_base_template }), out_dtype)?;
    side.notes.splice(0..0, early_notes);
    let how = format!("chat vector (scale {})", sel.scale);
    side.add(CARD_FILE, model_card(&plan, &how, out.recipe.as_ref()));
    run("apply", plan, to_value(params), out, side, None)
}

/// Parameters as JSON. Through text, so f32 values keep their shortest
/// spelling (0.9, not 0.8999999761581421).
fn to_value(p: Parameters) -> serde_json::Value {
    let text = serde_json::to_string(&p).expect("parameters serialize");
    serde_json::from_str(&text).expect("serde_json reads its own output")
}

/// `merge`: runs a recipe (chatvec TOML or mergekit YAML).
pub fn merge(recipe: &Recipe, seed: Option<u64>, out: &OutputSettings) -> Result<Summary> {
    let out = OutputSettings { recipe: Some(recipe.record()), ..out.clone() };
    match &recipe.body {
        RecipeBody::ChatVector(c) => {
            let sel = SelectionArgs {
                include: c.include.clone(),
                exclude: c.exclude.clone(),
                scale: c.scale,
                scale_for: c.scale_for.clone(),
                shard_size: recipe.shard_size,
                allow_mismatch: recipe.allow_mismatch,
            };
            let vector = match &c.vector {
                VectorRef::Vector(v) => VectorArgs::Stored(v),
                VectorRef::Pair { chat, pretrained } => VectorArgs::Streaming { chat, pretrained },
            };
            let mut s =
                apply(&c.base, vector, c.embeddings, recipe.out_dtype, c.keep_base_template, &sel, &out)?;
            s.kind = "merge";
            Ok(s)
        }
        RecipeBody::Merge(m) => merge_method(recipe, m, seed.unwrap_or(recipe.seed), &out),
    }
}

fn merge_method(recipe: &Recipe, m: &MergeRecipe, seed: u64, out: &OutputSettings) -> Result<Summary> {
    // Each distinct reference is opened once; the base is input 0.
    let mut refs: Vec<&str> = Vec::new();
    fn index<'a>(r: &'a str, refs: &mut Vec<&'a str>) -> usize {
        refs.iter().position(|x| *x == r).unwrap_or_else(|| {
            refs.push(r);
            refs.len() - 1
        })
    }
    let base = m.base.as_deref().map(|b| index(b, &mut refs));
    let mut models = Vec::new();
    let mut per_model = Vec::new();
    for (r, own) in &m.models {
        let i = index(r, &mut refs);
        // mergekit: a base listed among the models is the base, except for
        // linear, where it is merged like the others.
        if Some(i) == base && m.method.needs_base() {
            continue;
        }
        if models.contains(&i) {
            return Err(Error::bad_file(&recipe.path, format!("models: '{r}' is listed twice")));
        }
        models.push(i);
        per_model.push(own.clone());
    }
    if let (Some(b), false) = (base, m.method.needs_base())
        && !models.contains(&b)
    {
        models.push(b);
        per_model.push(Vec::new());
    }
    let inputs = refs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let role = if Some(i) == base { Role::Base } else { Role::Model };
            Ok(Input { role, label: r.to_string(), ckpt: open_model(r)? })
        })
        .collect::<Result<Vec<_>>>()?;
    let reference_dir = inputs[base.unwrap_or(models[0])].ckpt.dir.clone();
    let spec = MergeSpec {
        method: m.method,
        base,
        models,
        global: m.global.clone(),
        per_model,
        seed,
        out_dtype: recipe.out_dtype,
        shard_size: recipe.shard_size,
        allow_mismatch: recipe.allow_mismatch,
        union: recipe.union,
    };
    let plan = plan_merge(inputs, &spec).map_err(|e| match e {
        Error::Usage(msg) => Error::bad_file(&recipe.path, msg),
        other => other,
    })?;
    let mut side = model_side_files(&reference_dir, None, recipe.out_dtype)?;
    if let Some(u) = &plan.vocab_union {
        add_union_tokens(&mut side, &plan, u)?;
    }
    side.add(CARD_FILE, model_card(&plan, m.method.name(), out.recipe.as_ref()));
    let params = serde_json::json!({
        "method": m.method,
        "seed": seed,
        "out_dtype": recipe.out_dtype.map(|t| t.dtype().name()),
        "shard_size": recipe.shard_size,
        "allow_mismatch": recipe.allow_mismatch,
    });
    run("merge", plan, params, out, side, None)
}

/// Writes a union vocabulary into the side files: the new tokens as added
/// tokens of tokenizer.json (flags from the tokenizer that has them) and of
/// tokenizer_config.json's added_tokens_decoder, and config.json's
/// vocab_size, as mergekit's union tokenizer does.
fn add_union_tokens(side: &mut SideFiles, plan: &Plan, u: &VocabUnion) -> Result<()> {
    if u.added.is_empty() {
        return Ok(());
    }
    let json = |bytes: &[u8], name: &str| -> Result<serde_json::Value> {
        serde_json::from_slice(bytes).map_err(|e| Error::Internal(format!("{name}: {e}")))
    };
    // The added-token flags each source tokenizer gives a token.
    // Each source tokenizer once (the plan already parsed it; a read error
    // now is an error, not default flags).
    let mut sources: HashMap<usize, serde_json::Value> = HashMap::new();
    for (_, _, input) in &u.added {
        if !sources.contains_key(input) {
            let p = plan.inputs[*input].ckpt.dir.join("tokenizer.json");
            sources.insert(*input, crate::json::read_value(&p, 1 << 30)?);
        }
    }
    let flag_of = |input: usize, tok: &str| -> serde_json::Value {
        let found = sources[&input].get("added_tokens").and_then(serde_json::Value::as_array).and_then(|a| {
            a.iter().find(|t| t.get("content").and_then(serde_json::Value::as_str) == Some(tok))
        });
        let get =
            |k: &str, d: bool| found.and_then(|f| f.get(k)).and_then(serde_json::Value::as_bool).unwrap_or(d);
        serde_json::json!({
            "content": tok, "single_word": get("single_word", false), "lstrip": get("lstrip", false),
            "rstrip": get("rstrip", false), "normalized": get("normalized", true), "special": get("special", false),
        })
    };
    let entries: Vec<(u64, serde_json::Value)> =
        u.added.iter().map(|(id, tok, input)| (*id, flag_of(*input, tok))).collect();
    if let Some(bytes) = side.get("tokenizer.json") {
        let mut v = json(bytes, "tokenizer.json")?;
        let list = v
            .get_mut("added_tokens")
            .and_then(serde_json::Value::as_array_mut)
            .ok_or_else(|| Error::Usage("the base's tokenizer.json has no added_tokens list".into()))?;
        for (id, e) in &entries {
            let mut e = e.clone();
            e.as_object_mut().expect("object").insert("id".into(), (*id).into());
            list.push(e);
        }
        side.add("tokenizer.json", to_pretty(&v));
    }
    if let Some(bytes) = side.get("tokenizer_config.json") {
        let mut v = json(bytes, "tokenizer_config.json")?;
        if let Some(dec) = v.get_mut("added_tokens_decoder").and_then(serde_json::Value::as_object_mut) {
            for (id, e) in &entries {
                dec.insert(id.to_string(), e.clone());
            }
            side.add("tokenizer_config.json", to_pretty(&v));
        }
    }
    if let Some(bytes) = side.get("config.json") {
        let mut v = json(bytes, "config.json")?;
        if let Some(o) = v.as_object_mut() {
            o.insert("vocab_size".into(), (u.base_rows + u.added.len() as u64).into());
        }
        side.add("config.json", to_pretty(&v));
    }
    Ok(())
}

/// Names the plan's inputs as the user did.
fn set_labels(plan: &mut Plan, labels: &[&str]) {
    for (i, l) in plan.inputs.iter_mut().zip(labels) {
        i.label = l.to_string();
    }
}

/// Executes `plan` into a fresh output directory, with the prepared side
/// files and, for a vector, its descriptor.
fn run(
    kind: &'static str,
    plan: Plan,
    params: serde_json::Value,
    out: &OutputSettings,
    side: SideFiles,
    vector: Option<VectorRecord>,
) -> Result<Summary> {
    let computed = plan.tensors.iter().filter(|t| !matches!(t.op, crate::plan::Op::Copy(_))).count();
    let mut summary = Summary {
        kind,
        output: None,
        dry_run: out.dry_run,
        tensors: plan.tensors.len(),
        computed_tensors: computed,
        bytes: plan.output_bytes(),
        seconds: 0.0,
        shards: Vec::new(),
        embeddings: plan.embeddings.clone(),
        notes: Vec::new(),
        warnings: plan.warnings.clone(),
        plan_text: None,
    };
    summary.notes.extend(side.notes.iter().cloned());
    summary.warnings.extend(side.warnings.iter().cloned());
    for e in &plan.embeddings {
        summary.notes.push(format!(
            "{}: {} of {} rows got the vector ({})",
            e.tensor, e.rows_with_vector, e.rows, e.policy
        ));
    }
    if out.dry_run {
        summary.plan_text = Some(plan.describe());
        return Ok(summary);
    }
    let start = Instant::now();
    let input_dirs: Vec<&Path> = plan.inputs.iter().map(|i| i.ckpt.dir.as_path()).collect();
    let dir = OutputDir::create(&out.out, &input_dirs, out.force, plan.output_bytes() + SIDE_FILE_RESERVE)?;
    let res = execute(&plan, dir.path(), &out.exec)?;
    let mut outputs = res.shards.clone();
    if plan.shards.len() > 1 {
        outputs.push(write_file(dir.path(), INDEX_FILE, &index_json(&plan))?);
    }
    let mut manifest = Manifest::new(kind, &plan, res.inputs, params);
    manifest.recipe = out.recipe.clone();
    manifest.vector = vector;
    let files = side.write(dir.path())?;
    manifest.notes = summary.notes.clone();
    manifest.outputs = outputs;
    manifest.files = files;
    write_file(dir.path(), MANIFEST_FILE, &to_pretty(&manifest))?;
    let target = dir.commit()?;
    summary.output = Some(target.display().to_string());
    summary.shards = res.shards;
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// `model.safetensors.index.json` as transformers writes it: total tensor
/// bytes and a name-sorted weight map.
fn index_json(plan: &Plan) -> Vec<u8> {
    let mut names: Vec<(&str, &str)> = Vec::new();
    for sh in &plan.shards {
        for t in &plan.tensors[sh.tensors.clone()] {
            names.push((&t.name, &sh.file_name));
        }
    }
    names.sort();
    let mut wm = serde_json::Map::new();
    for (n, f) in names {
        wm.insert(n.to_string(), f.into());
    }
    let total: u64 = plan.tensors.iter().map(|t| t.bytes()).sum();
    to_pretty(&serde_json::json!({ "metadata": { "total_size": total }, "weight_map": wm }))
}
