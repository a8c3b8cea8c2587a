//! `chatvec inspect`: what a checkpoint holds.

use std::fmt::{self, Write as _};

use serde::Serialize;

use crate::error::Result;
use crate::model::checkpoint::Checkpoint;
use crate::model::config::ConfigSummary;
use crate::model::experts::ExpertSummary;
use crate::output::manifest::{Provenance, read_provenance};
use crate::resolve::open_model;
use crate::units::{human_bytes, human_count};

/// One weight file.
#[derive(Serialize)]
pub struct ShardInfo {
    /// Its name.
    pub file: String,
    /// Its size.
    pub bytes: u64,
    /// Tensors it holds.
    pub tensors: usize,
}

/// One tensor.
#[derive(Serialize)]
pub struct TensorInfo {
    /// Its name.
    pub name: String,
    /// Its dtype, as the header spells it.
    pub dtype: String,
    /// Its shape.
    pub shape: Vec<u64>,
    /// The file holding it.
    pub shard: String,
}

/// What a checkpoint holds; `--json` prints it as is, `Display` as text.
#[derive(Serialize)]
pub struct InspectReport {
    /// The model directory.
    pub path: String,
    /// Its weight files.
    pub shards: Vec<ShardInfo>,
    /// How many tensors.
    pub tensor_count: usize,
    /// Parameters (elements of every tensor).
    pub parameters: u64,
    /// Bytes of tensor data.
    pub tensor_bytes: u64,
    /// Elements per dtype.
    pub dtypes: Vec<(String, u64)>,
    /// Whether lm_head is tied to the embeddings (no separate lm_head).
    pub tied_embeddings: bool,
    /// The main config.json settings.
    pub config: Option<ConfigSummary>,
    /// Its mixture-of-experts layers: family, layout, expert count
    /// (`None`: a dense model).
    pub experts: Option<ExpertSummary>,
    /// How its weights are quantized (FP8 block-scaled, MXFP4), tensor
    /// counts per scheme (`None`: not quantized).
    pub quantization: Option<String>,
    /// From chatvec-manifest.json, when chatvec wrote this directory.
    pub made_by: Option<Provenance>,
    /// Every tensor.
    pub tensors: Vec<TensorInfo>,
}

/// Opens `model` (directory, Hub id or alias) and reports what it holds.
pub fn inspect(model: &str) -> Result<InspectReport> {
    report(&open_model(model)?)
}

fn report(ck: &Checkpoint) -> Result<InspectReport> {
    let mut dtypes: Vec<(String, u64)> = Vec::new();
    for t in &ck.tensors {
        match dtypes.iter_mut().find(|(d, _)| d == t.stored_type()) {
            Some(e) => e.1 += t.numel(),
            None => dtypes.push((t.stored_type().to_string(), t.numel())),
        }
    }
    Ok(InspectReport {
        path: ck.dir.display().to_string(),
        shards: ck
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| ShardInfo {
                file: s.file_name.clone(),
                bytes: s.map.len() as u64,
                tensors: ck.tensors.iter().filter(|t| t.shard == i).count(),
            })
            .collect(),
        tensor_count: ck.tensors.len(),
        parameters: ck.parameters(),
        tensor_bytes: ck.total_bytes(),
        dtypes,
        tied_embeddings: ck.is_tied(),
        config: ck.config.as_ref().map(|c| c.summary()),
        experts: crate::model::experts::summary(ck)?,
        quantization: crate::model::quant::summary(ck),
        tensors: ck
            .tensors
            .iter()
            .map(|t| TensorInfo {
                name: t.name.clone(),
                dtype: t.stored_type().to_string(),
                shape: t.shape.clone(),
                shard: ck.shards[t.shard].file_name.clone(),
            })
            .collect(),
        made_by: read_provenance(&ck.dir)?,
    })
}

impl fmt::Display for InspectReport {
    /// The human-readable form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Tensor names and config values come from the model's files.
        f.write_str(&crate::ui::escaped(&render(self), usize::MAX))
    }
}

fn render(r: &InspectReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}", r.path);
    let _ = writeln!(
        s,
        "  parameters: {} ({}), {} tensors, {} of tensor data",
        human_count(r.parameters),
        r.parameters,
        r.tensor_count,
        human_bytes(r.tensor_bytes)
    );
    let dt: Vec<String> = r.dtypes.iter().map(|(d, n)| format!("{d} {}", human_count(*n))).collect();
    let _ = writeln!(s, "  dtypes: {}", dt.join(", "));
    let _ = writeln!(s, "  tied embeddings: {}", if r.tied_embeddings { "yes" } else { "no" });
    if let Some(m) = &r.made_by {
        let what = if m.kind == "extract" { "a chat vector" } else { "a merged model" };
        let _ = writeln!(s, "  made by chatvec {} {} ({what}) from:", m.version, m.kind);
        for (role, path) in &m.inputs {
            let _ = writeln!(s, "    {role}: {path}");
        }
    }
    match &r.config {
        Some(c) => {
            let o = |v: Option<u64>| v.map_or("-".to_string(), |x| x.to_string());
            let _ = writeln!(
                s,
                "  config: {} ({}), vocab {}, hidden {}, layers {}, heads {}/{} kv, intermediate {}, rope {}",
                c.architecture.as_deref().unwrap_or("-"),
                c.model_type.as_deref().unwrap_or("-"),
                o(c.vocab_size),
                o(c.hidden_size),
                o(c.num_hidden_layers),
                o(c.num_attention_heads),
                o(c.num_key_value_heads),
                o(c.intermediate_size),
                c.rope,
            );
        }
        None => {
            let _ = writeln!(s, "  config: none (no config.json)");
        }
    }
    if let Some(e) = &r.experts {
        let _ = writeln!(
            s,
            "  experts: {} per layer in {} layer(s), stored {} ({} layout family)",
            e.experts,
            e.moe_layers,
            e.layout.name(),
            e.family
        );
    }
    if let Some(q) = &r.quantization {
        let _ = writeln!(s, "  quantization: {q}");
    }
    let _ = writeln!(s, "  shards:");
    for sh in &r.shards {
        let _ = writeln!(s, "    {}  {}  {} tensors", sh.file, human_bytes(sh.bytes), sh.tensors);
    }
    let _ = writeln!(s, "  tensors:");
    let w = r.tensors.iter().map(|t| t.name.len()).max().unwrap_or(0);
    for t in &r.tensors {
        let _ = writeln!(s, "    {:w$}  {:5} {:?}", t.name, t.dtype, t.shape);
    }
    s
}
