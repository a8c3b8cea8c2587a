//! `chatvec inspect`: what a checkpoint holds.

use std::fmt::Write as _;

use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::config::ConfigSummary;
use crate::error::Result;
use crate::manifest::{Provenance, read_provenance};

#[derive(Serialize)]
pub struct ShardInfo {
    pub file: String,
    pub bytes: u64,
    pub tensors: usize,
}

#[derive(Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub shard: String,
}

/// The report; `--json` prints it as is.
#[derive(Serialize)]
pub struct Report {
    pub path: String,
    pub shards: Vec<ShardInfo>,
    pub tensor_count: usize,
    pub parameters: u64,
    pub tensor_bytes: u64,
    pub dtypes: Vec<(String, u64)>,
    pub tied_embeddings: bool,
    pub config: Option<ConfigSummary>,
    /// From chatvec-manifest.json, when chatvec wrote this directory.
    pub made_by: Option<Provenance>,
    pub tensors: Vec<TensorInfo>,
}

pub fn report(ck: &Checkpoint) -> Result<Report> {
    let mut dtypes: Vec<(String, u64)> = Vec::new();
    for t in &ck.tensors {
        match dtypes.iter_mut().find(|(d, _)| d == t.dtype.name()) {
            Some(e) => e.1 += t.numel(),
            None => dtypes.push((t.dtype.name().to_string(), t.numel())),
        }
    }
    Ok(Report {
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
        tensors: ck
            .tensors
            .iter()
            .map(|t| TensorInfo {
                name: t.name.clone(),
                dtype: t.dtype.name().to_string(),
                shape: t.shape.clone(),
                shard: ck.shards[t.shard].file_name.clone(),
            })
            .collect(),
        made_by: read_provenance(&ck.dir)?,
    })
}

/// Parameter counts the way model cards write them (8.03B, 1.10M).
pub fn human_count(n: u64) -> String {
    let f = n as f64;
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.2}K", f / 1e3),
        1_000_000..1_000_000_000 => format!("{:.2}M", f / 1e6),
        _ => format!("{:.2}B", f / 1e9),
    }
}

/// Byte sizes in binary units.
pub fn human_bytes(n: u64) -> String {
    let f = n as f64;
    if n < 1 << 10 {
        format!("{n} B")
    } else if n < 1 << 20 {
        format!("{:.1} KiB", f / 1024.0)
    } else if n < 1 << 30 {
        format!("{:.1} MiB", f / 1048576.0)
    } else {
        format!("{:.2} GiB", f / 1073741824.0)
    }
}

/// The human-readable form.
pub fn render(r: &Report) -> String {
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
                "  config: {} ({}), vocab {}, hidden {}, layers {}, heads {}/{} kv, intermediate {}, rope_theta {}",
                c.architecture.as_deref().unwrap_or("-"),
                c.model_type.as_deref().unwrap_or("-"),
                o(c.vocab_size),
                o(c.hidden_size),
                o(c.num_hidden_layers),
                o(c.num_attention_heads),
                o(c.num_key_value_heads),
                o(c.intermediate_size),
                c.rope_theta.map_or("-".to_string(), |x| x.to_string()),
            );
        }
        None => {
            let _ = writeln!(s, "  config: none (no config.json)");
        }
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
