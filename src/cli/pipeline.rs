//! `chatvec run`: a recipe with an `[sft]` section as one command, each
//! step's output under one directory:
//!
//! - without `[sweep]`: merge into DIR/merged and verify it;
//! - with `[sweep]` (chat_vector recipes): one candidate per scale under
//!   DIR/sweep, each verified;
//! - with `[eval]`: score the candidates (or the merged model), choose the
//!   best by the stated rule, record the choice and every figure in the
//!   chosen model's manifest and in DIR/eval.json;
//! - SFT from the chosen model into DIR/sft.
//!
//! The `[sft]` options, data and chat template are checked before
//! anything is merged.

use std::path::PathBuf;

use chatvec::{Destination, Error, Result, SftJob, ui};

use super::args::MergeArgs;
use super::{json_out, out, report, report_sweep};

pub(super) fn run(a: &MergeArgs, json: bool) -> Result<()> {
    let recipe = a.recipe()?;
    let Some(options) = recipe.sft().cloned() else {
        return Err(Error::Usage(format!("{} has no [sft] section", recipe.path().display()))
            .with_hint("add one (data = \"chat.jsonl\", ...), or run just the merge with `chatvec merge`"));
    };
    let root = &a.output()?;
    let mut job = SftJob {
        model: root.join("merged").display().to_string(),
        output: root.join("sft"),
        force: a.how.force,
        dry_run: a.how.dry_run,
        options,
    };
    // Before the long merge: the options, every line of the data, and
    // what the trainer needs of the merged model (tokenizer, chat
    // template, markers or masks for assistant-only loss), checked on the
    // side files the merge will write.
    job.check_data()?;
    let preview = tempfile::tempdir().map_err(|e| Error::Io {
        op: "creating",
        path: std::env::temp_dir(),
        source: e,
    })?;
    chatvec::preview_side_files(&recipe, preview.path())?;
    job.check_template_at(preview.path()).map_err(|e| {
        let why = e.to_string();
        Error::Usage(format!("[sft] would fail on the merged model, so nothing is merged: {why}")).with_hint(
            e.hint()
                .unwrap_or("fix [sft] (chat_template, assistant_only_loss) or the recipe's chat model")
                .to_string(),
        )
    })?;
    warn_if_eval_trains(&recipe, &job);
    if root.exists() && !a.how.force && !a.how.dry_run {
        return Err(Error::OutputExists(root.clone()));
    }
    if !a.how.dry_run {
        std::fs::create_dir_all(root).map_err(|e| Error::Io {
            op: "creating",
            path: root.clone(),
            source: e,
        })?;
    }
    // The merged model(s).
    let mut done = serde_json::Map::new();
    let candidates: Vec<PathBuf> = if recipe.sweep().is_some() {
        let o = Destination { output: root.join("sweep"), ..a.destination()? };
        let sw = chatvec::merge_sweep(&recipe, &o, &a.how.run_options())?;
        if !json && !a.how.dry_run {
            report_sweep(&sw.candidates)?;
        }
        let dirs = sw.candidates.iter().map(|c| o.output.join(&c.name)).collect();
        done.insert("sweep".into(), serde_json::to_value(&sw).unwrap_or_default());
        dirs
    } else {
        let o = Destination { output: root.join("merged"), ..a.destination()? };
        let merge = chatvec::merge(&recipe, a.seed, &o, &a.how.run_options())?;
        if !json {
            report(&merge, false)?;
        }
        done.insert("merge".into(), serde_json::to_value(&merge).unwrap_or_default());
        vec![o.output]
    };
    if a.how.dry_run {
        // The models do not exist yet, so the later steps' commands are
        // what a dry run can show.
        let then = format!(
            "{}then: {}",
            if recipe.eval().is_some() {
                "then: chatvec eval (the candidates), choose the best\n"
            } else {
                ""
            },
            job.command_line()
        );
        if json {
            done.insert("then".into(), then.into());
            return json_out(&done);
        }
        return out(&format!("{then}\n"));
    }
    for c in &candidates {
        let verified = chatvec::verify(c, None)?;
        ui::note(&format!("verified {}: {} files match the manifest", c.display(), verified.checks.len()));
        if !verified.ok {
            return verified.into_result();
        }
    }
    let chosen = match recipe.eval() {
        Some(e) => {
            let spec = chatvec::EvalSpec {
                models: candidates.iter().map(|c| c.display().to_string()).collect(),
                ..e.clone()
            };
            let r = chatvec::eval(&spec)?;
            if !json {
                out(&r.to_string())?;
            }
            let best = PathBuf::from(&r.models[0].path);
            let path = root.join("eval.json");
            let text = serde_json::to_string_pretty(&r).map_err(|e| Error::Internal(e.to_string()))?;
            std::fs::write(&path, text).map_err(|e| Error::Io {
                op: "writing",
                path: path.clone(),
                source: e,
            })?;
            if r.none_acceptable {
                return Err(Error::Usage(format!(
                    "none acceptable: every candidate raises the LM loss on [eval] lm_data by more than {}% over the base's, so none is trained (figures in {})",
                    r.lm_reference.as_ref().map_or(0.0, |b| b.margin_percent),
                    path.display()
                ))
                .with_hint("sweep smaller scales, or raise lm_margin if the loss is acceptable"));
            }
            chatvec::record_selection(&best, &r)?;
            ui::note(&format!("chose {} ({})", best.display(), r.rule));
            let tied: Vec<&str> =
                r.models.iter().filter(|m| m.tied_with == Some(1)).map(|m| m.model.as_str()).collect();
            if !tied.is_empty() {
                ui::warn(&format!(
                    "the choice is within a tie: {} could not be told from it on this held-out data (recorded in its manifest's selection)",
                    tied.join(", ")
                ));
            }
            done.insert("eval".into(), serde_json::to_value(&r).unwrap_or_default());
            best
        }
        None => candidates[0].clone(),
    };
    job.model = chosen.display().to_string();
    let trained = chatvec::sft(&job)?;
    if json {
        done.insert("sft".into(), serde_json::to_value(&trained).unwrap_or_default());
        json_out(&done)?;
    }
    match trained.exit_code {
        0 => Ok(()),
        code => Err(Error::Trainer(code)),
    }
}

/// Warns when `[eval] data` is also `[sft]` training data: the candidates
/// would be chosen, and their loss reported, on the very examples SFT then
/// trains on, which is no held-out figure.
fn warn_if_eval_trains(recipe: &chatvec::Recipe, job: &SftJob) {
    let Some(held) = recipe.eval().and_then(|e| e.data.as_ref()) else { return };
    let same = |p: &std::path::Path| match (std::fs::canonicalize(p), std::fs::canonicalize(held)) {
        (Ok(a), Ok(b)) => a == b,
        _ => p == held,
    };
    // `[sft] eval_data` is held out from training too: only `data` counts.
    for p in job.options.data.iter().map(|f| f.path.as_path()).filter(|p| same(p)) {
        ui::warn(&format!(
            "[eval] data {} is also [sft] data ({}): the loss it gives is on examples SFT trains on, not held out",
            held.display(),
            p.display()
        ));
    }
}
