//! Provenance (contract 5): `chatvec-manifest.json` in every output records
//! the tool version, the command, each input's per-shard sha256, the
//! parameters, and each output file's sha256. For an extracted vector it is
//! also the vector's descriptor: its sources, tensors and what was left out.

use std::collections::HashSet;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::json::read_value;
use crate::model::checkpoint::{Checkpoint, HubOrigin};
use crate::output::files::WrittenFile;
use crate::plan::{EmbeddingReport, Plan, Role};

pub(crate) const MANIFEST_FILE: &str = "chatvec-manifest.json";
const FORMAT: &str = "chatvec-manifest/1";
/// Largest manifest read (one of a 70B model is about 100 KB).
pub(crate) const MAX_MANIFEST_BYTES: u64 = 64 << 20;

#[derive(Serialize)]
pub(crate) struct InputRecord {
    pub role: Role,
    /// The reference as the user gave it (path, alias or Hub id).
    pub reference: String,
    pub path: String,
    /// Repo, revision and commit, for a model from the Hugging Face cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hub: Option<HubOrigin>,
    pub shards: Vec<WrittenFile>,
}

impl InputRecord {
    /// The record of checkpoint `ck`, read in role `role`.
    pub(crate) fn new(role: Role, reference: &str, ck: &Checkpoint, shards: Vec<WrittenFile>) -> InputRecord {
        InputRecord {
            role,
            reference: reference.to_string(),
            path: std::fs::canonicalize(&ck.dir).unwrap_or(ck.dir.clone()).display().to_string(),
            hub: ck.origin.clone(),
            shards,
        }
    }
}

#[derive(Serialize)]
pub(crate) struct TensorRecord {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
}

/// The descriptor part of a vector's manifest.
#[derive(Serialize)]
pub(crate) struct VectorRecord {
    pub tensors: Vec<TensorRecord>,
    /// Tensors deselected at extract time; `apply` copies them from the base.
    pub omitted: Vec<String>,
    pub tied: bool,
}

/// The recipe a `merge` ran, verbatim, so `verify --recipe` can compare.
#[derive(Serialize, Clone, Debug)]
pub(crate) struct RecipeRecord {
    pub file: String,
    /// `toml` (a chatvec recipe) or `mergekit` (a mergekit YAML config).
    pub syntax: &'static str,
    pub sha256: String,
    pub text: String,
}

#[derive(Serialize)]
pub(crate) struct Manifest {
    pub format: &'static str,
    pub tool: &'static str,
    pub version: &'static str,
    /// `extract`, `apply` or `merge`.
    pub kind: &'static str,
    pub command: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipe: Option<RecipeRecord>,
    pub inputs: Vec<InputRecord>,
    /// `Parameters` for extract/apply; method and settings for merge.
    pub parameters: Value,
    pub embeddings: Vec<EmbeddingReport>,
    pub notes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vector: Option<VectorRecord>,
    /// For a LoRA adapter: each module's kind, rank and kept energy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<Value>,
    /// Weight shards and index.
    pub outputs: Vec<WrittenFile>,
    /// Config, tokenizer and template files.
    pub files: Vec<WrittenFile>,
}

impl Manifest {
    pub(crate) fn new(
        kind: &'static str,
        plan: &Plan,
        inputs: Vec<Vec<WrittenFile>>,
        parameters: Value,
    ) -> Manifest {
        let records = plan
            .inputs
            .iter()
            .zip(inputs)
            .map(|(i, shards)| InputRecord::new(i.role, &i.label, &i.ckpt, shards))
            .collect();
        Manifest { embeddings: plan.embeddings.clone(), ..Manifest::bare(kind, records, parameters) }
    }

    /// A manifest for a job without a plan (LoRA extraction).
    pub(crate) fn bare(kind: &'static str, inputs: Vec<InputRecord>, parameters: Value) -> Manifest {
        Manifest {
            format: FORMAT,
            tool: "chatvec",
            version: env!("CARGO_PKG_VERSION"),
            kind,
            command: std::env::args().collect(),
            recipe: None,
            inputs,
            parameters,
            embeddings: Vec::new(),
            notes: Vec::new(),
            vector: None,
            lora: None,
            outputs: Vec::new(),
            files: Vec::new(),
        }
    }
}

/// Writes the manifest of a model `chatvec sft` trained into `dir` (which
/// then holds only that model): every file's sha256 (weights as outputs,
/// the rest as files), the model trained from, and the run's settings, so
/// `chatvec verify` checks it as it checks a merge.
pub(crate) fn write_trained(dir: &Path, input: Value, parameters: Value) -> Result<()> {
    let mut outputs = Vec::new();
    let mut files = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io("listing", dir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n != MANIFEST_FILE)
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let bytes = std::fs::metadata(&path).map_err(|e| Error::io("reading metadata of", &path, e))?.len();
        let entry =
            serde_json::json!({"file": name, "bytes": bytes, "sha256": crate::hash::sha256_file(&path)?});
        let weights =
            name.ends_with(".safetensors") || name.ends_with(".bin") || name.ends_with(".index.json");
        if weights { outputs.push(entry) } else { files.push(entry) }
    }
    let m = serde_json::json!({
        "format": FORMAT,
        "tool": "chatvec",
        "version": env!("CARGO_PKG_VERSION"),
        "kind": "sft",
        "command": std::env::args().collect::<Vec<_>>(),
        "inputs": [input],
        "parameters": parameters,
        "outputs": outputs,
        "files": files,
    });
    let text = serde_json::to_vec_pretty(&m).map_err(|e| Error::Internal(e.to_string()))?;
    crate::output::files::write_atomically(&dir.join(MANIFEST_FILE), &text)
}

/// The manifest of `dir` as JSON, if there is one; it must be ours.
fn read_manifest(dir: &Path) -> Result<Option<Value>> {
    let p = dir.join(MANIFEST_FILE);
    if !p.is_file() {
        return Ok(None);
    }
    let v = read_value(&p, MAX_MANIFEST_BYTES)?;
    if v.get("format").and_then(Value::as_str) != Some(FORMAT) {
        return Err(Error::bad_file(&p, format!("is not a {FORMAT} manifest")));
    }
    Ok(Some(v))
}

/// What `apply --vector` needs from a vector's manifest.
pub(crate) struct VectorInfo {
    pub omitted: HashSet<String>,
}

/// Reads the manifest of a vector directory, if there is one. A directory
/// with a manifest of another kind is an error: it is a model, not a vector.
pub(crate) fn read_vector_info(dir: &Path) -> Result<Option<VectorInfo>> {
    let Some(v) = read_manifest(dir)? else { return Ok(None) };
    if v.get("kind").and_then(Value::as_str) != Some("extract") {
        return Err(Error::Usage(format!(
            "{} is a merged model, not a chat vector made by `chatvec extract`",
            dir.display()
        ))
        .with_hint(
            "use --chat/--pretrained for the streaming form, or point --vector at an extract output",
        ));
    }
    let omitted = v
        .pointer("/vector/omitted")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default();
    Ok(Some(VectorInfo { omitted }))
}

/// What `inspect` shows of an output's manifest: which job made it, from
/// which inputs.
#[derive(Serialize)]
pub struct Provenance {
    /// The job: `extract`, `apply` or `merge`.
    pub kind: String,
    /// The chatvec version that wrote it.
    pub version: String,
    /// (role, path) of each input.
    pub inputs: Vec<(String, String)>,
}

/// Reads the manifest of `dir`, if there is one.
pub(crate) fn read_provenance(dir: &Path) -> Result<Option<Provenance>> {
    let Some(v) = read_manifest(dir)? else { return Ok(None) };
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
    let inputs = v
        .get("inputs")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|i| (text(i, "role"), text(i, "path"))).collect())
        .unwrap_or_default();
    Ok(Some(Provenance { kind: text(&v, "kind"), version: text(&v, "version"), inputs }))
}

/// Adds `key: value` to the manifest of the output in `dir` (how a
/// candidate was chosen, recorded after the fact), rewritten atomically
/// with every other key kept as it was.
pub(crate) fn add_record(dir: &Path, key: &str, value: &Value) -> Result<()> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = crate::json::read_capped(&path, MAX_MANIFEST_BYTES)?;
    let mut m = crate::json::RawObject::parse(&bytes, &path)?;
    m.set(key, value)?;
    crate::output::files::write_atomically(&path, &m.to_bytes())
}
