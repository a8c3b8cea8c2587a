//! The `extract` and `apply` jobs end to end: resolve, open, plan, then
//! execute into a temporary directory, add index, side files and manifest,
//! and commit.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::checkpoint::INDEX_FILE;
use crate::dtype::FloatType;
use crate::embeddings::EmbeddingPolicy;
use crate::error::Result;
use crate::execute::{ExecOptions, execute};
use crate::json::to_pretty;
use crate::manifest::{MANIFEST_FILE, Manifest, Parameters, TensorRecord, VectorRecord, read_vector_info};
use crate::plan::{ApplyOptions, Common, EmbeddingReport, Plan, VectorSide, plan_apply, plan_extract};
use crate::resolve::open_model;
use crate::select::Selection;
use crate::sidecars::{ChatSide, SideFiles, model_side_files, read_side_files};
use crate::writer::{OutputDir, WrittenFile, write_file};

/// Free space kept in reserve beyond the weights, for side files.
const SIDE_FILE_RESERVE: u64 = 256 << 20;

/// Where and how to write.
pub struct OutputSettings {
    pub out: PathBuf,
    pub force: bool,
    pub dry_run: bool,
    pub exec: ExecOptions,
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
    let plan = plan_extract(chat_ck, open_model(pretrained)?, &sel.common()?, dtype)?;
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
    run("extract", plan, params, out, side, Some(vector))
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
    let params = sel.parameters(Some(embeddings), out_dtype, keep_base_template);
    let side = model_side_files(&base_dir, Some(ChatSide { dir: &chat_dir, keep_base_template }), out_dtype)?;
    run("apply", plan, params, out, side, None)
}

/// Executes `plan` into a fresh output directory, with the prepared side
/// files and, for a vector, its descriptor.
fn run(
    kind: &'static str,
    plan: Plan,
    params: Parameters,
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
