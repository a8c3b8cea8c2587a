//! `chatvec run`: a recipe with an `[sft]` section as one command: merge
//! into DIR/merged, verify it, then SFT into DIR/sft, each step's output
//! under one directory. Its `[sft]` options and data are checked before
//! the merge starts.

use chatvec::{Error, Result, SftJob, ui};

use super::args::MergeArgs;
use super::{json_out, out, report};

pub fn run(a: &MergeArgs, json: bool) -> Result<()> {
    let recipe = a.recipe()?;
    let Some(options) = recipe.sft().cloned() else {
        return Err(Error::Usage(format!("{} has no [sft] section", recipe.path().display()))
            .with_hint("add one (data = \"chat.jsonl\", ...), or run just the merge with `chatvec merge`"));
    };
    let root = &a.out.output;
    let merged = root.join("merged");
    let job = SftJob {
        model: merged.display().to_string(),
        output: root.join("sft"),
        force: a.out.force,
        dry_run: a.out.dry_run,
        options,
    };
    // Before the long merge: the options and every line of the data.
    job.check_data()?;
    if root.exists() && !a.out.force && !a.out.dry_run {
        return Err(Error::OutputExists(root.clone()));
    }
    if !a.out.dry_run {
        std::fs::create_dir_all(root).map_err(|e| Error::Io {
            op: "creating",
            path: root.clone(),
            source: e,
        })?;
    }
    let mut merge_out = a.out.options();
    merge_out.output = merged.clone();
    let merge = chatvec::merge(&recipe, a.seed, &merge_out)?;
    if a.out.dry_run {
        // The merged model does not exist yet, so the trainer's command is
        // what a dry run can show of the SFT step.
        if json {
            return json_out(&serde_json::json!({ "merge": merge, "then": job.command_line() }));
        }
        report(&merge, false)?;
        return out(&format!("then: {}\n", job.command_line()));
    }
    if !json {
        report(&merge, false)?;
    }
    let verified = chatvec::verify(&merged, None)?;
    ui::note(&format!("verified {}: {} files match the manifest", merged.display(), verified.checks.len()));
    if !verified.ok {
        return verified.into_result();
    }
    let trained = chatvec::sft(&job)?;
    if json {
        json_out(&serde_json::json!({ "merge": merge, "verify": verified, "sft": trained }))?;
    }
    match trained.exit_code {
        0 => Ok(()),
        code => Err(Error::Trainer(code)),
    }
}
