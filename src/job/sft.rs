//! `sft` as users run it: the trainer (the `sft` room prepares, launches
//! and records it), then, for a LoRA run, the adapter merged into a full
//! model with chatvec's own streaming engine, so a run always ends in a
//! model transformers, vLLM or the next `chatvec apply` can load.

use serde_json::json;

use crate::error::Result;
use crate::exec::RunOptions;
use crate::job::chat_vector::apply;
use crate::output::Destination;
use crate::params::apply::ApplyParams;
use crate::sft::{SftJob, SftReport, add_to_record, model_dir, train};

/// Supervised fine-tuning: validates the data and the Python environment,
/// writes every config file into the run directory, launches TRL as a
/// supervised child (its output streamed, SIGINT/SIGTERM forwarded) and
/// records the run. With `--lora`, the saved adapter is then merged into
/// the model it was trained on, in RUN/model, and the merge is added to the
/// run record. The report's `exit_code` is the trainer's.
pub fn sft(job: &SftJob) -> Result<SftReport> {
    let report = train(job)?;
    let Some(adapter) = report.adapter.clone() else { return Ok(report) };
    let params =
        ApplyParams { base: job.model.clone(), lora: Some(adapter.clone()), ..ApplyParams::default() };
    let spec = params.validate()?;
    let merged = model_dir(job);
    // RUN/model holds only what an earlier merge of this run wrote (the
    // trainer saves into RUN/adapter), so it may be replaced.
    let out = Destination { force: true, ..Destination::new(&merged) };
    let summary = apply(&spec, &out, &RunOptions::default())?;
    crate::ui::note(&format!("merged the LoRA adapter into {}", merged.display()));
    add_to_record(
        job,
        "merged_model",
        json!({
            "dir": summary.output,
            "adapter": adapter,
            "files": summary.shards.iter().map(|f| json!({"file": f.file, "sha256": f.sha256})).collect::<Vec<_>>(),
        }),
    )?;
    Ok(report)
}
