//! The jobs a user runs, end to end, and the library's entry points:
//! resolve the models (Hub models not yet cached are planned on their
//! headers first, `preflight`), open them, plan, execute into a temporary
//! directory, add the index, side files and manifest, and commit.
//!
//! - `analyze`: what a chat vector is, per layer, with pair checks;
//! - `chat_vector`: `extract` and `apply`;
//! - `merge`: recipes (merge methods, or a chat vector written down);
//! - `verify`: an output against its manifest and recipe;
//! - `inspect`: what a checkpoint holds;
//! - `catalog`: the aliases and shipped recipes;
//! - `sweep`: apply at several scales from one read of the inputs;
//! - `sft`: the trainer run, then a LoRA adapter merged into a full model.
//!
//! This is the top room: it may import every other, and none imports it.

pub(crate) mod analyze;
pub(crate) mod catalog;
pub(crate) mod chat_vector;
pub(crate) mod download;
pub(crate) mod extract_lora;
pub(crate) mod inspect;
pub(crate) mod merge;
pub(crate) mod push;
pub(crate) mod sft;
pub(crate) mod sweep;
pub(crate) mod verify;

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::error::Result;
use crate::exec::{RunOptions, execute_many};
use crate::output::Destination;
use crate::output::dir::OutputDir;
use crate::output::files::WrittenFile;
use crate::output::manifest::{Manifest, RecipeRecord, VectorRecord};
use crate::output::sidecars::SideFiles;
use crate::plan::{EmbeddingReport, Op, Plan, Requantized, Role};
use crate::resolve::Fetch;

/// Share of the vector's changed elements that rounding may take away
/// before it is a warning, not a note (in bf16 on the benchmark's 1b
/// models: 0.1% at scale 1, 34% at --scale 0.05).
const ROUNDING_WARN_SHARE: f64 = 0.10;

/// What a finished (or dry) run reports; `--json` prints it as is.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// `extract`, `apply` or `merge`.
    pub kind: &'static str,
    /// The output directory, once written.
    pub output: Option<String>,
    /// Whether this was a dry run (nothing written).
    pub dry_run: bool,
    /// Output tensors.
    pub tensors: usize,
    /// Output tensors computed (the rest are byte copies).
    pub computed_tensors: usize,
    /// Bytes of the weight shards.
    pub bytes: u64,
    /// Wall time of the write, in seconds.
    pub seconds: f64,
    /// Of that, the seconds the output files took to finish (the last
    /// bytes hashed and synced) after the last piece was computed.
    pub tail_seconds: f64,
    /// The weight shards written, with their sha256.
    pub shards: Vec<WrittenFile>,
    /// How embedding rows were matched where vocabularies differ.
    pub embeddings: Vec<EmbeddingReport>,
    /// What chatvec did that the user should know (templates taken, rows
    /// matched).
    pub notes: Vec<String>,
    /// What looks wrong but did not stop the run.
    pub warnings: Vec<String>,
    /// The plan listing, on a dry run.
    #[serde(rename = "plan", skip_serializing_if = "Option::is_none")]
    pub plan_text: Option<String>,
}

/// The manifest's extra records for one job.
pub(crate) struct Records {
    pub kind: &'static str,
    pub params: serde_json::Value,
    pub recipe: Option<RecipeRecord>,
    pub vector: Option<VectorRecord>,
}

/// Executes `plan` into a fresh output directory, with the prepared side
/// files and manifest records, and commits it.
pub(crate) fn write_output(
    plan: Plan,
    rec: Records,
    dest: &Destination,
    run: &RunOptions,
    side: SideFiles,
) -> Result<Summary> {
    let mut all = write_outputs(plan, vec![Variant { rec, dest: dest.clone(), side }], run)?;
    all.pop().ok_or_else(|| crate::error::Error::Internal("no output was written".into()))
}

/// One output of a plan (variant `k` of `Plan::scales` for the `k`th):
/// where it goes, its records and side files.
pub(crate) struct Variant {
    pub rec: Records,
    pub dest: Destination,
    pub side: SideFiles,
}

/// Executes `plan` once for all `variants` (the inputs read once), each
/// into its own fresh output directory with its side files and manifest,
/// and commits each. A failure commits none.
pub(crate) fn write_outputs(
    plan: Plan,
    mut variants: Vec<Variant>,
    run: &RunOptions,
) -> Result<Vec<Summary>> {
    // Weights written quantized again keep the base's quantization_config.
    if let Some(scheme) = dequantized(&plan).filter(|_| plan.requant.weights.is_empty()) {
        for v in &mut variants {
            drop_quantization_config(&mut v.side, &scheme)?;
        }
    }
    let computed = plan.tensors.iter().filter(|t| !matches!(t.op, Op::Copy(_))).count();
    let mut summaries: Vec<Summary> = variants
        .iter()
        .map(|v| {
            let mut summary = Summary {
                kind: v.rec.kind,
                output: None,
                dry_run: v.dest.dry_run,
                tensors: plan.tensors.len(),
                computed_tensors: computed,
                bytes: plan.output_bytes(),
                seconds: 0.0,
                tail_seconds: 0.0,
                shards: Vec::new(),
                embeddings: plan.embeddings.clone(),
                notes: v.side.notes.clone(),
                warnings: plan.warnings.iter().chain(&v.side.warnings).cloned().collect(),
                plan_text: None,
            };
            for e in &plan.embeddings {
                summary.notes.push(format!(
                    "{}: {} of {} rows got the vector ({})",
                    e.tensor, e.rows_with_vector, e.rows, e.policy
                ));
            }
            summary
        })
        .collect();
    let Some(first) = variants.first() else { return Ok(summaries) };
    if first.dest.dry_run {
        for s in &mut summaries {
            s.plan_text = Some(plan.describe());
        }
        return Ok(summaries);
    }
    let start = Instant::now();
    // Every directory and weight file read, so that no -o (an HF cache's
    // blobs/ included) can overwrite or delete one.
    let read: Vec<PathBuf> = plan
        .inputs
        .iter()
        .flat_map(|i| std::iter::once(i.ckpt.dir.clone()).chain(i.ckpt.shards.iter().map(|s| s.path.clone())))
        .collect();
    // The first directory's check asks for room for every output's weights
    // (the side-file reserve is charged once, in `OutputDir::create`).
    let n = variants.len() as u64;
    let dirs: Vec<OutputDir> = variants
        .iter()
        .enumerate()
        .map(|(k, v)| {
            OutputDir::create(
                &v.dest.output,
                &read,
                v.dest.force,
                (n - k as u64).saturating_mul(plan.output_bytes()),
            )
        })
        .collect::<Result<_>>()?;
    let targets: Vec<&OutputDir> = dirs.iter().collect();
    let results = execute_many(&plan, &targets, &run.exec())?;
    // Copies of one model under two names give a zero vector: only the
    // hashes tell, and they are known now.
    let role_hashes = |role: Role| {
        plan.inputs
            .iter()
            .zip(&results[0].inputs)
            .find(|(i, _)| i.role == role)
            .map(|(_, files)| files.iter().map(|f| f.sha256.as_str()).collect::<Vec<_>>())
    };
    let same_pair =
        matches!((role_hashes(Role::Chat), role_hashes(Role::Pretrained)), (Some(c), Some(p)) if c == p);
    let mut committed = Vec::new();
    let requant = requant_note(&plan)?;
    for (((v, dir), res), summary) in variants.into_iter().zip(dirs).zip(results).zip(&mut summaries) {
        summary.notes.extend(requant.clone());
        summary.tail_seconds = res.tail.as_secs_f64();
        let r = res.rounding;
        if r.swallowed > 0 {
            let share = r.swallowed as f64 / r.moved as f64;
            let said = format!(
                "rounding to the output dtype kept the base's value in about {:.1}% of the elements the vector changes ({} of {} counted, every {}th element): their scaled change is under half a unit of that precision",
                100.0 * share,
                r.swallowed,
                r.moved,
                crate::exec::ROUNDING_STRIDE
            );
            if share >= ROUNDING_WARN_SHARE {
                summary
                    .warnings
                    .push(format!("{said}; a larger --scale, or --out-dtype f32, keeps more of it"));
            } else {
                summary.notes.push(said);
            }
        }
        if same_pair {
            summary.warnings.push(
                "the chat and pretrained models are the same bytes: the vector is zero, and the weights equal the base's"
                    .into(),
            );
        }
        let mut manifest = Manifest::new(v.rec.kind, &plan, res.inputs, v.rec.params);
        manifest.recipe = v.rec.recipe;
        manifest.vector = v.rec.vector;
        manifest.notes = summary.notes.clone();
        dir.finish(&plan, v.side, manifest, res.shards.clone())?;
        committed.push((dir, res.shards));
    }
    for ((dir, shards), summary) in committed.into_iter().zip(&mut summaries) {
        let target = dir.commit()?;
        summary.output = Some(target.display().to_string());
        summary.shards = shards;
        summary.seconds = start.elapsed().as_secs_f64();
    }
    Ok(summaries)
}

/// Runs a job whose Hub inputs are not all cached twice: first, hushed, as
/// a dry run on probes (config, tokenizer, index and each shard's header;
/// see `resolve::Fetch::probes`), so a mismatch is reported before a
/// weight byte is fetched and `--dry-run` never downloads weights; then for
/// real. When nothing needed a probe, the job just runs. The job opens its
/// models through the `Fetch` it is handed: how models are reached is
/// passed down, not switched process-wide.
pub(crate) fn preflight(
    out: &Destination,
    run: impl Fn(&Destination, &Fetch) -> Result<Summary>,
) -> Result<Summary> {
    preflight_with(out, run, |s: &mut Summary| s.notes.push(HEADERS_ONLY.into()))
}

/// What a dry run planned on probes says.
pub(crate) const HEADERS_ONLY: &str = "planned on the Hub models' headers only (config, tokenizer, index, shard headers); no weights were downloaded";

/// `preflight` for any job; `dry_note` marks a dry run's result as planned
/// on probes.
pub(crate) fn preflight_with<T>(
    out: &Destination,
    run: impl Fn(&Destination, &Fetch) -> Result<T>,
    dry_note: impl FnOnce(&mut T),
) -> Result<T> {
    if crate::resolve::hub_api::offline() {
        return run(out, &Fetch::whole());
    }
    let dry = Destination { dry_run: true, ..out.clone() };
    let probes = Fetch::probes();
    let rehearsal = crate::ui::hushed(|| run(&dry, &probes));
    let probed = probes.probed();
    // The probes go before the real run downloads.
    drop(probes);
    if !probed {
        return run(out, &Fetch::whole());
    }
    let mut result = rehearsal?;
    if out.dry_run {
        dry_note(&mut result);
        return Ok(result);
    }
    run(out, &Fetch::whole())
}

/// Checks the config.json the output will carry against the output's
/// tensors (vocab rows, hidden size, layers). An output without one is
/// refused unless `out.weights_only`: a model transformers cannot load
/// must not come back with exit 0.
fn check_written_config(
    plan: &mut Plan,
    side: &SideFiles,
    allow_mismatch: bool,
    out: &Destination,
) -> Result<()> {
    let Some(cfg) = side.json("config.json")? else {
        let from = plan
            .inputs
            .iter()
            .find(|i| matches!(i.role, Role::Base | Role::Chat))
            .or(plan.inputs.first())
            .map(|i| format!(" ({} has none)", i.ckpt.dir.display()))
            .unwrap_or_default();
        if out.weights_only {
            plan.warnings.push(format!("--weights-only: the output has no config.json{from}"));
            return Ok(());
        }
        return Err(crate::error::Error::Usage(format!(
            "the output would have no config.json{from}, so transformers could not load it"
        ))
        .with_hint("add the model's config.json, or pass --weights-only if only the weights are wanted"));
    };
    let stored: Vec<(String, Vec<u64>)> = plan
        .stored(0..plan.tensors.len())
        .iter()
        .map(|t| (t.spec.name.to_string(), t.spec.shape.to_vec()))
        .collect();
    let tensors = stored.iter().map(|(n, s)| (n.as_str(), s.as_slice()));
    crate::plan::checks::check_output_fits(|k| cfg.get(k), tensors, allow_mismatch, &mut plan.warnings)
}

/// How the plan's quantized inputs are quantized, when it reads any (its
/// output holds their float values).
fn dequantized(plan: &Plan) -> Option<String> {
    plan.inputs
        .iter()
        .flat_map(|i| &i.ckpt.tensors)
        .find_map(|t| t.quant.as_ref().map(|q| q.scheme.describe(t.dtype)))
}

/// What writing weights quantized again cost, against their f32 values,
/// once every scale was written: relative RMS error, and the largest error
/// relative to its block's (or group's) largest magnitude.
fn requant_note(plan: &Plan) -> Result<Option<String>> {
    let Some(first) = plan.requant.weights.values().next() else { return Ok(None) };
    let bands = plan
        .requant
        .error
        .lock()
        .map_err(|_| crate::error::Error::Internal("quantization error sums poisoned".into()))?;
    let mut e = crate::arith::requant::QuantError::default();
    for b in bands.values() {
        e.add(b);
    }
    let rms = if e.sq > 0.0 { (e.sq_err / e.sq).sqrt() } else { 0.0 };
    let (how, unit) = match first {
        Requantized::Fp8 { .. } => ("as FP8 E4M3 again in the base's blocks", "block"),
        Requantized::Mxfp4 { .. } => {
            ("as MXFP4 again (rounded to bf16, one E8M0 scale per 32 values)", "group")
        }
    };
    Ok(Some(format!(
        "{} weight(s) written {how}: relative RMS error {:.3}% against the f32 values; largest error {:.3}% of its {unit}'s largest magnitude ('{}')",
        plan.requant.weights.len(),
        100.0 * rms,
        100.0 * e.worst,
        e.worst_tensor
    )))
}

/// The output holds float weights where a quantized input had codes and
/// scales: a `quantization_config` carried over from that input's
/// config.json would make transformers look for scales that are not there.
fn drop_quantization_config(side: &mut SideFiles, scheme: &str) -> Result<()> {
    let Some(mut cfg) = side.json("config.json")? else { return Ok(()) };
    if cfg.remove("quantization_config") {
        side.add("config.json", cfg.to_bytes());
        side.notes.push(format!(
            "quantized input ({scheme}) decoded; the output is unquantized, its config.json without quantization_config"
        ));
    }
    Ok(())
}

/// Names the plan's inputs as the user did.
fn set_labels(plan: &mut Plan, labels: &[&str]) {
    for (i, l) in plan.inputs.iter_mut().zip(labels) {
        i.label = l.to_string();
    }
}
