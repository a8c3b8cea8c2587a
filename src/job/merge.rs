//! `merge`: a recipe (chatvec TOML or mergekit YAML) run end to end, by a
//! merge method or as a chat vector written down.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::exec::RunOptions;
use crate::job::chat_vector::apply_recorded;
use crate::job::sweep::{SweepReport, sweep_recorded};
use crate::job::{
    HEADERS_ONLY, Records, Summary, check_written_config, preflight, preflight_with, write_output,
};
use crate::merge::methods::BaseRole;
use crate::model::adapter::Adapter;
use crate::output::Destination;
use crate::output::card::model_card;
use crate::output::chat_templates;
use crate::output::manifest::RecipeRecord;
use crate::output::sidecars::{
    SideFiles, add_union_tokens, model_side_files, relayer_config, set_vocab_size, take_tokenizer,
};
use crate::params::apply::{ApplyParams, ApplySpec, OutDtype};
use crate::params::select::Spelling;
use crate::plan::lora::attach_adapter;
use crate::plan::merge::{MergeSpec, TokenFrom, TokenSpec, VocabSpec, plan_merge};
use crate::plan::slices::{SliceInput, SlicePlan, SliceSpec, plan_slices};
use crate::plan::{Input, Plan, Role};
use crate::recipe::stages::Stage;
use crate::recipe::{MergeRecipe, Recipe, RecipeBody, TokenSource, VocabChoice, split_lora};
use crate::resolve::Fetch;

/// Runs `recipe` into `out`. `seed` overrides the recipe's seed of the
/// DARE/DELLA masks.
pub fn merge(recipe: &Recipe, seed: Option<u64>, out: &Destination, run: &RunOptions) -> Result<Summary> {
    preflight(out, |o, fetch| merge_now(recipe, seed, o, run, fetch))
}

fn merge_now(
    recipe: &Recipe,
    seed: Option<u64>,
    out: &Destination,
    run: &RunOptions,
    fetch: &Fetch,
) -> Result<Summary> {
    let record = recipe.record();
    match &recipe.body {
        RecipeBody::ChatVector(c) => {
            apply_recorded(&chat_vector_spec(recipe, c)?, out, run, fetch, Some(record))
        }
        RecipeBody::Merge(m) => merge_method(recipe, m, seed.unwrap_or(recipe.seed), out, run, fetch, record),
    }
}

/// A chat_vector recipe as the `apply` it describes, checked, with the
/// recipe-wide settings and errors naming the recipe's keys.
pub(crate) fn chat_vector_spec(recipe: &Recipe, c: &ApplyParams) -> Result<ApplySpec> {
    let params = ApplyParams {
        out_dtype: recipe.out_dtype.map(OutDtype::Float),
        shard_size: Some(recipe.shard_size),
        allow_mismatch: recipe.allow_mismatch,
        expert_layout: recipe.expert_layout,
        ..c.clone()
    };
    params.validate_as(Spelling::Recipe)
}

/// A chat_vector recipe's `[sweep]`: its apply at each of the sweep's
/// scales, each candidate recording the recipe.
pub fn merge_sweep(recipe: &Recipe, out: &Destination, run: &RunOptions) -> Result<SweepReport> {
    let (RecipeBody::ChatVector(c), Some(scales)) = (&recipe.body, recipe.sweep()) else {
        return Err(Error::Usage(format!("{} has no [sweep] over a chat vector", recipe.path().display())));
    };
    let spec = chat_vector_spec(recipe, c)?;
    preflight_with(
        out,
        |o, fetch| sweep_recorded(&spec, scales, o, run, fetch, Some(recipe.record())),
        |r: &mut SweepReport| r.candidates.iter_mut().for_each(|c| c.summary.notes.push(HEADERS_ONLY.into())),
    )
}

/// Writes into `dir` the side files the recipe's output will carry
/// (config, tokenizer, chat template, eos), reading no weights (a Hub
/// model is probed for its side files, not downloaded): what `chatvec run`
/// checks the SFT stage against before it merges.
pub fn preview_side_files(recipe: &Recipe, dir: &Path) -> Result<()> {
    let fetch = Fetch::probes();
    let side = match &recipe.body {
        RecipeBody::ChatVector(c) => {
            super::chat_vector::output_side_files(&chat_vector_spec(recipe, c)?, &fetch)?
        }
        RecipeBody::Merge(m) => {
            // The output carries the base's side files, else the first
            // model's (a slices merge: the first slice's first source's).
            let first_source = m.slices.first().map(|s| s.sources[0].model.as_str());
            let reference = first_source
                .or(m.base.as_deref())
                .or_else(|| m.models.first().map(|(r, _)| r.as_str()))
                .ok_or_else(|| Error::bad_file(&recipe.path, "models: the list is empty"))?;
            let open = |r: &str| fetch.open_model(split_lora(r).0);
            let mut side = model_side_files(&open(reference)?.dir, None, recipe.out_dtype)?;
            if let Some(t) = &recipe.chat_template {
                let names = recipe_models(m);
                let dirs = names.iter().map(|r| Ok(open(r)?.dir.clone())).collect::<Result<Vec<_>>>()?;
                let dirs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
                chat_templates::apply(&mut side, t, &dirs).map_err(|e| recipe_error(recipe, e))?;
            }
            side
        }
    };
    side.write(dir).map(|_| ())
}

/// The input index of reference `r`: its place in `refs`, added when new,
/// so each distinct model is opened once.
fn input_index<'a>(r: &'a str, refs: &mut Vec<&'a str>) -> usize {
    refs.iter().position(|x| *x == r).unwrap_or_else(|| {
        refs.push(r);
        refs.len() - 1
    })
}

fn merge_method(
    recipe: &Recipe,
    m: &MergeRecipe,
    seed: u64,
    out: &Destination,
    run: &RunOptions,
    fetch: &Fetch,
    record: RecipeRecord,
) -> Result<Summary> {
    if !m.slices.is_empty() {
        return merge_slices(recipe, m, seed, out, run, fetch, record);
    }
    // Each distinct reference is opened once; the base is input 0.
    let mut refs: Vec<&str> = Vec::new();
    let base = m.base.as_deref().map(|b| input_index(b, &mut refs));
    let mut models = Vec::new();
    let mut per_model = Vec::new();
    for (r, own) in &m.models {
        let i = input_index(r, &mut refs);
        // mergekit: a base listed among the models is the base, except for
        // methods that merge it like the others (linear, karcher,
        // passthrough).
        if Some(i) == base && m.method.base_role() != BaseRole::Input {
            continue;
        }
        if models.contains(&i) {
            return Err(Error::bad_file(&recipe.path, format!("models: '{r}' is listed twice")));
        }
        models.push(i);
        per_model.push(own.clone());
    }
    if let (Some(b), BaseRole::Input) = (base, m.method.base_role())
        && !models.contains(&b)
    {
        models.push(b);
        per_model.push(Vec::new());
    }
    let Some(&reference) = base.as_ref().or(models.first()) else {
        return Err(Error::bad_file(&recipe.path, "models: the list is empty"));
    };
    let inputs = open_inputs(&refs, base, fetch, |r| recipe_place(recipe, m, r))?;
    let adapters = open_adapters(&refs, recipe, fetch)?;
    let reference_dir = inputs[reference].ckpt.dir.clone();
    let vocab = match &recipe.vocab {
        VocabChoice::Base => VocabSpec::Base,
        VocabChoice::Union => VocabSpec::Union,
        VocabChoice::Model(r) => {
            VocabSpec::Model(refs.iter().position(|x| *x == r.as_str()).ok_or_else(|| {
                Error::bad_file(
                    &recipe.path,
                    format!("tokenizer_source: '{r}' is not one of the merge's models"),
                )
            })?)
        }
    };
    let find = |r: &str, what: &str| {
        refs.iter().position(|x| *x == r).ok_or_else(|| {
            Error::bad_file(&recipe.path, format!("{what}: '{r}' is not one of the merge's models"))
        })
    };
    let tokens = recipe
        .tokens
        .iter()
        .map(|t| {
            let what = format!("tokenizer.tokens.{:?}", t.token);
            let from = match &t.source {
                TokenSource::Model(r) => TokenFrom::Model(find(r, &what)?),
                TokenSource::ModelToken { model, token, id } => {
                    TokenFrom::ModelRow { input: find(model, &what)?, token: token.clone(), id: *id }
                }
                TokenSource::Zero => TokenFrom::Zero,
            };
            Ok(TokenSpec { token: t.token.clone(), from, force: t.force })
        })
        .collect::<Result<Vec<_>>>()?;
    let vocab_dir = match vocab {
        VocabSpec::Model(i) => Some(inputs[i].ckpt.dir.clone()),
        _ => None,
    };
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
        vocab,
        tokens,
        pad_to: recipe.pad_to_multiple_of,
        expert_layout: recipe.expert_layout,
    };
    // Parameter problems are the recipe's: name its file.
    let mut plan = plan_merge(inputs, &spec).map_err(|e| recipe_error(recipe, e))?;
    attach_adapters(&mut plan, adapters, recipe)?;
    let mut side = model_side_files(&reference_dir, None, recipe.out_dtype)?;
    if let Some(u) = &plan.vocab_union {
        add_union_tokens(&mut side, &plan, u)?;
    }
    if let Some(dir) = vocab_dir {
        take_tokenizer(&mut side, &dir, &plan)?;
    }
    if recipe.pad_to_multiple_of.is_some() {
        set_vocab_size(&mut side, &plan)?;
    }
    let params = merge_params(recipe, m, seed);
    write_merge(recipe, m, plan, side, params, (out, run, record))
}

/// What a merge's manifest records of its settings.
fn merge_params(recipe: &Recipe, m: &MergeRecipe, seed: u64) -> serde_json::Value {
    serde_json::json!({
        "method": m.method,
        "seed": seed,
        "out_dtype": recipe.out_dtype.map(|t| t.dtype().name()),
        "shard_size": recipe.shard_size,
        "allow_mismatch": recipe.allow_mismatch,
    })
}

/// The end every merge shares: the recipe's chat template, the config
/// checked against the weights, the card, the manifest's record, then the
/// output written.
fn write_merge(
    recipe: &Recipe,
    m: &MergeRecipe,
    mut plan: Plan,
    mut side: SideFiles,
    params: serde_json::Value,
    (out, run, record): (&Destination, &RunOptions, RecipeRecord),
) -> Result<Summary> {
    if let Some(t) = &recipe.chat_template {
        let dirs: Vec<&Path> =
            plan.inputs.iter().filter(|i| i.role != Role::Adapter).map(|i| i.ckpt.dir.as_path()).collect();
        chat_templates::apply(&mut side, t, &dirs).map_err(|e| recipe_error(recipe, e))?;
    }
    check_written_config(&mut plan, &side, recipe.allow_mismatch, out)?;
    model_card(&plan, m.method.name(), Some(&record), &mut side)?;
    let rec = Records { kind: "merge", params, recipe: Some(record), vector: None };
    write_output(plan, rec, out, run, side)
}

/// A `slices` merge: each slice's sources opened once, the base of a slice
/// (its own `base_model`, else the recipe's) found among its sources, then
/// planned slice by slice and written with a config.json whose layer count
/// and per-layer fields are the output's.
fn merge_slices(
    recipe: &Recipe,
    m: &MergeRecipe,
    seed: u64,
    out: &Destination,
    run: &RunOptions,
    fetch: &Fetch,
    record: RecipeRecord,
) -> Result<Summary> {
    let mut refs: Vec<&str> = Vec::new();
    let bad = |msg: String| Error::bad_file(&recipe.path, msg);
    let role = m.method.base_role();
    let mut slices = Vec::new();
    for (i, s) in m.slices.iter().enumerate() {
        let base_name = s.base.as_deref().or(m.base.as_deref()).filter(|_| role != BaseRole::Input);
        let among = base_name.is_some_and(|b| s.sources.iter().any(|x| x.model == b));
        if let Some(b) = base_name
            && !among
            && role == BaseRole::Origin
        {
            return Err(bad(format!(
                "slices[{i}]: {} takes its base from the slice's sources, and '{b}' is not one of them",
                m.method.name()
            )));
        }
        let sources: Vec<SliceInput> = s
            .sources
            .iter()
            .map(|x| (input_index(&x.model, &mut refs), x.layers.0, x.parameters.clone()))
            .collect();
        let base = base_name.filter(|_| among).map(|b| input_index(b, &mut refs));
        let len = s.sources[0].layers.1 - s.sources[0].layers.0;
        slices.push(SlicePlan { sources, len, params: s.parameters.clone(), base });
    }
    let base_input = m.base.as_deref().and_then(|b| refs.iter().position(|x| *x == b));
    let inputs = open_inputs(&refs, base_input, fetch, |r| {
        format!("'{r}' is a slice source in {}", recipe.path.display())
    })?;
    let adapters = open_adapters(&refs, recipe, fetch)?;
    let reference_dir = inputs[slices[0].sources[0].0].ckpt.dir.clone();
    let spec = SliceSpec {
        method: m.method,
        slices,
        global: m.global.clone(),
        seed,
        out_dtype: recipe.out_dtype,
        shard_size: recipe.shard_size,
        allow_mismatch: recipe.allow_mismatch,
        expert_layout: recipe.expert_layout,
    };
    let (mut plan, map) = plan_slices(inputs, &spec).map_err(|e| recipe_error(recipe, e))?;
    attach_adapters(&mut plan, adapters, recipe)?;
    plan.warnings.push(format!("slices: {} output layers", map.len()));
    let mut side = model_side_files(&reference_dir, None, recipe.out_dtype)?;
    relayer_config(&mut side, &plan, &map)?;
    let mut params = merge_params(recipe, m, seed);
    params["layers"] =
        map.iter().map(|(i, l)| format!("{}:{l}", plan.inputs[*i].label)).collect::<Vec<_>>().into();
    write_merge(recipe, m, plan, side, params, (out, run, record))
}

/// Opens the model of each reference (input `i` is `refs[i]`; `base` is
/// the base's index), labelled as the recipe names it; a `MODEL+LORA`
/// reference opens MODEL here, its adapter once the merge is planned.
fn open_inputs(
    refs: &[&str],
    base: Option<usize>,
    fetch: &Fetch,
    place: impl Fn(&str) -> String,
) -> Result<Vec<Input>> {
    refs.iter()
        .enumerate()
        .map(|(i, r)| {
            let role = if Some(i) == base { Role::Base } else { Role::Model };
            let ckpt = fetch.open_model(split_lora(r).0).map_err(|e| e.with_hint(place(r)))?;
            Ok(Input::named(role, r, ckpt))
        })
        .collect()
}

/// The adapter of each `MODEL+LORA` reference, opened before the merge is
/// planned (a missing or malformed adapter is reported first): input
/// index, adapter, its name.
fn open_adapters<'a>(
    refs: &[&'a str],
    recipe: &Recipe,
    fetch: &Fetch,
) -> Result<Vec<(usize, Adapter, &'a str)>> {
    let mut out = Vec::new();
    for (i, r) in refs.iter().enumerate() {
        if let (_, Some(lora)) = split_lora(r) {
            let hint = format!("'{r}' names a LoRA adapter in {}", recipe.path.display());
            out.push((i, fetch.open_adapter(lora).map_err(|e| e.with_hint(hint))?, lora));
        }
    }
    Ok(out)
}

/// Merges each opened adapter into its input as the plan reads it (never
/// written to disk first).
fn attach_adapters(plan: &mut Plan, adapters: Vec<(usize, Adapter, &str)>, recipe: &Recipe) -> Result<()> {
    for (i, adapter, lora) in adapters {
        attach_adapter(plan, i, adapter, lora, recipe.lora_merge_dtype)
            .map_err(|e| recipe_error(recipe, e))?;
    }
    Ok(())
}

/// Every model a merge recipe names, once each, in order (the base first).
fn recipe_models(m: &MergeRecipe) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    let named = m.base.iter().map(String::as_str).chain(m.models.iter().map(|(r, _)| r.as_str())).chain(
        m.slices.iter().flat_map(|s| s.sources.iter().map(|x| x.model.as_str()).chain(s.base.as_deref())),
    );
    for r in named {
        if !out.contains(&r) {
            out.push(r);
        }
    }
    out
}

/// A usage error about the recipe, naming its file.
fn recipe_error(recipe: &Recipe, e: Error) -> Error {
    match e {
        Error::Usage(msg) => Error::bad_file(&recipe.path, msg),
        other => other,
    }
}

/// Where the recipe names the model `r` (`base_model`, `models[2].model`),
/// so an error opening it points at the line to fix.
fn recipe_place(recipe: &Recipe, m: &MergeRecipe, r: &str) -> String {
    let mut keys: Vec<String> = Vec::new();
    if m.base.as_deref() == Some(r) {
        keys.push("base_model".into());
    }
    for (i, (name, _)) in m.models.iter().enumerate() {
        if name == r {
            keys.push(format!("models[{i}].model"));
        }
    }
    format!("'{r}' is {} in {}", keys.join(" and "), recipe.path.display())
}

/// Runs the merges of a multi-document config (mergekit-multimerge) in
/// order: each named merge into `dir/NAME`, the unnamed one into `out`.
/// With `lazy`, a named merge whose directory already holds chatvec's
/// output of the same config text is reused (mergekit reruns nothing that
/// exists; chatvec also checks that it is what the config asks for); an
/// intermediate of another config is replaced. On a dry run, merges whose
/// inputs are still to be made are listed, not planned.
pub fn merge_stages(
    stages: &[Stage],
    seed: Option<u64>,
    out: &Destination,
    dir: &Path,
    lazy: bool,
    run: &RunOptions,
) -> Result<Vec<Summary>> {
    let mut done = Vec::new();
    for stage in stages {
        let (output, force) = match &stage.name {
            Some(n) => (dir.join(n), true),
            None => (out.output.clone(), out.force),
        };
        let label = stage.name.clone().unwrap_or_else(|| "the final merge".into());
        let dest = Destination { output: output.clone(), force, ..out.clone() };
        if stage.name.is_some() && lazy && same_recipe(&output, &stage.recipe.record().sha256) {
            done.push(reused(
                &dest,
                format!(
                    "{label}: {} already holds this merge (reused; --no-lazy runs it again)",
                    output.display()
                ),
            ));
            continue;
        }
        if out.dry_run {
            let missing: Vec<&String> =
                stage.needs.iter().filter(|n| !same_dir_exists(&dir.join(n))).collect();
            if !missing.is_empty() {
                let names: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
                done.push(reused(&dest, format!("{label}: planned once {} exist(s)", names.join(", "))));
                continue;
            }
        }
        if stage.name.is_some() && !out.dry_run {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
        }
        let mut s = merge(&stage.recipe, seed, &dest, run)
            .map_err(|e| e.with_hint(format!("while running {label}")))?;
        s.notes.insert(0, format!("{label} -> {}", output.display()));
        done.push(s);
    }
    Ok(done)
}

fn same_dir_exists(p: &Path) -> bool {
    p.join(crate::output::manifest::MANIFEST_FILE).is_file()
}

/// Whether `dir` holds chatvec's output of the recipe whose text hashes to
/// `sha256`.
fn same_recipe(dir: &Path, sha256: &str) -> bool {
    let path = dir.join(crate::output::manifest::MANIFEST_FILE);
    crate::json::read_value(&path, crate::output::manifest::MAX_MANIFEST_BYTES)
        .ok()
        .and_then(|m| m.pointer("/recipe/sha256").and_then(|v| v.as_str()).map(|h| h == sha256))
        .unwrap_or(false)
}

/// The summary of a merge not run now.
fn reused(dest: &Destination, note: String) -> Summary {
    Summary {
        kind: "merge",
        output: (!dest.dry_run).then(|| dest.output.display().to_string()),
        dry_run: dest.dry_run,
        tensors: 0,
        computed_tensors: 0,
        bytes: 0,
        seconds: 0.0,
        tail_seconds: 0.0,
        shards: Vec::new(),
        embeddings: Vec::new(),
        notes: vec![note],
        warnings: Vec::new(),
        plan_text: None,
    }
}
