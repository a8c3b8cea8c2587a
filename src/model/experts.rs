//! Where a mixture-of-experts model keeps its experts, as data: one row per
//! family of architectures, read from the config's `model_type` and the
//! tensor names, never code per architecture.
//!
//! The same experts are stored two ways. The original layout, which
//! transformers 5 still writes by default (`save_original_format=True`),
//! keeps one tensor per expert and projection
//! (`mlp.experts.3.gate_proj.weight`, or Mixtral's
//! `block_sparse_moe.experts.3.w1.weight`). The fused layout, which
//! transformers 5 holds in memory and writes with
//! `save_original_format=False` (and models added after v5 ship), keeps
//! one tensor per layer and kind: `mlp.experts.gate_up_proj [E, 2I, H]`
//! (each expert's gate rows, then its up rows) and
//! `mlp.experts.down_proj [E, H, I]`. Every per-expert matrix is therefore
//! one contiguous byte range of the fused tensor, so a fused checkpoint
//! can be read as a per-expert one without copying (`split_fused`), and
//! per-expert pieces written one after another form the fused tensor.
//! The rows and their renames are transformers' own conversion mapping
//! (`conversion_mapping.py`, release 5.x).

use crate::error::{Error, Result};
use crate::model::checkpoint::{Checkpoint, Tensor};

/// How a checkpoint stores its experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExpertLayout {
    /// One tensor per expert and projection (the original format).
    PerExpert,
    /// One tensor per layer and kind, experts first (transformers 5's).
    Fused,
}

impl ExpertLayout {
    /// The command-line spelling.
    pub fn name(self) -> &'static str {
        match self {
            ExpertLayout::PerExpert => "per-expert",
            ExpertLayout::Fused => "fused",
        }
    }

    /// Parses `fused` or `per-expert` (also `per_expert`, `original`).
    pub fn parse(s: &str) -> Option<ExpertLayout> {
        match s.to_ascii_lowercase().as_str() {
            "fused" => Some(ExpertLayout::Fused),
            "per-expert" | "per_expert" | "original" => Some(ExpertLayout::PerExpert),
            _ => None,
        }
    }
}

/// One expert's projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Part {
    Gate,
    Up,
    Down,
}

/// A fused tensor's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fused {
    /// `gate_up_proj [E, 2I, H]`: expert e's gate rows, then its up rows.
    GateUp,
    /// `down_proj [E, H, I]`.
    Down,
}

impl Fused {
    /// The parts one expert contributes, in storage order.
    pub(crate) fn parts(self) -> &'static [Part] {
        match self {
            Fused::GateUp => &[Part::Gate, Part::Up],
            Fused::Down => &[Part::Down],
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Fused::GateUp => "gate_up_proj",
            Fused::Down => "down_proj",
        }
    }
}

/// One family of architectures that store experts alike.
#[derive(Debug)]
pub(crate) struct Family {
    /// Its name in messages (the transformers mapping it follows).
    pub name: &'static str,
    /// The `model_type`s that use it.
    model_types: &'static [&'static str],
    /// The per-expert module path, between the layer and the expert index.
    per_expert: &'static str,
    /// The gate, up and down projections' names after the expert index.
    parts: [&'static str; 3],
    /// The fused module path, between the layer and `gate_up_proj`.
    fused: &'static str,
    /// Renames of the block's other tensors: (fused spelling, per-expert
    /// spelling), the first that matches applies.
    renames: &'static [(&'static str, &'static str)],
}

/// The families, from transformers 5's `conversion_mapping.py`.
pub(crate) const FAMILIES: &[Family] = &[
    Family {
        name: "qwen2_moe",
        model_types: &[
            "qwen2_moe",
            "qwen3_moe",
            "qwen3_next",
            "qwen3_omni_moe",
            "qwen3_omni_moe_thinker",
            "qwen3_omni_moe_text",
            "deepseek_v2",
            "deepseek_v3",
            "deepseek_v32",
            "dots1",
            "ernie4_5_moe",
            "glm4_moe",
            "glm4_moe_lite",
            "glm4v_moe",
            "hunyuan_v1_moe",
            "flex_olmo",
            "olmoe",
            "exaone_moe",
            "cohere2_moe",
            "longcat_flash",
            "afmoe",
            "solar_open",
        ],
        per_expert: ".mlp.experts.",
        parts: ["gate_proj.weight", "up_proj.weight", "down_proj.weight"],
        fused: ".mlp.experts.",
        renames: &[],
    },
    Family {
        name: "mixtral",
        model_types: &["mixtral", "minimax", "minimax_m2"],
        per_expert: ".block_sparse_moe.experts.",
        parts: ["w1.weight", "w3.weight", "w2.weight"],
        fused: ".mlp.experts.",
        renames: &[(".mlp.", ".block_sparse_moe.")],
    },
    Family {
        name: "phimoe",
        model_types: &["phimoe"],
        per_expert: ".block_sparse_moe.experts.",
        parts: ["w1.weight", "w3.weight", "w2.weight"],
        fused: ".mlp.experts.",
        renames: &[(".mlp.router.weight", ".block_sparse_moe.gate.weight"), (".mlp.", ".block_sparse_moe.")],
    },
    Family {
        name: "lfm2_moe",
        model_types: &["lfm2_moe"],
        per_expert: ".feed_forward.experts.",
        parts: ["w1.weight", "w3.weight", "w2.weight"],
        fused: ".feed_forward.experts.",
        renames: &[],
    },
];

/// Families whose experts exist in one layout only (nothing to line up;
/// `inspect` still names them).
const FUSED_ONLY: &[(&str, &str)] = &[("gpt_oss", ".mlp.experts.")];

impl Family {
    /// The family of `model_type`.
    pub(crate) fn of_model_type(model_type: &str) -> Option<&'static Family> {
        FAMILIES.iter().find(|f| f.model_types.contains(&model_type))
    }

    /// The family whose per-expert names `names` use (for a checkpoint
    /// without a config, or of an unlisted model type).
    pub(crate) fn of_names<'a>(mut names: impl Iterator<Item = &'a str>) -> Option<&'static Family> {
        names.find_map(|n| FAMILIES.iter().find(|f| f.piece(n).is_some()))
    }

    /// The family of a checkpoint: its config's model type, else its names.
    pub(crate) fn of(ck: &Checkpoint) -> Option<&'static Family> {
        ck.config
            .as_ref()
            .and_then(|c| c.raw.get("model_type").and_then(|v| v.as_str()))
            .and_then(Family::of_model_type)
            .or_else(|| Family::of_names(ck.tensors.iter().map(|t| t.name.as_str())))
    }

    /// `name` as a per-expert piece: (layer prefix, expert, part).
    pub(crate) fn piece<'a>(&self, name: &'a str) -> Option<(&'a str, u64, Part)> {
        let at = name.find(self.per_expert)?;
        let rest = &name[at + self.per_expert.len()..];
        let dot = rest.find('.')?;
        let expert: u64 = rest[..dot].parse().ok()?;
        if rest[..dot].len() > 1 && rest.starts_with('0') {
            return None;
        }
        let part = match self.parts.iter().position(|p| *p == &rest[dot + 1..])? {
            0 => Part::Gate,
            1 => Part::Up,
            _ => Part::Down,
        };
        Some((&name[..at], expert, part))
    }

    /// `name` as a fused tensor: (layer prefix, kind).
    pub(crate) fn fused<'a>(&self, name: &'a str) -> Option<(&'a str, Fused)> {
        [Fused::GateUp, Fused::Down].into_iter().find_map(|k| {
            let prefix = name.strip_suffix(k.suffix())?.strip_suffix(self.fused)?;
            Some((prefix, k))
        })
    }

    /// The per-expert name of `part` of expert `e` in layer `prefix`.
    pub(crate) fn piece_name(&self, prefix: &str, e: u64, part: Part) -> String {
        let p = self.parts[part as usize];
        format!("{prefix}{}{e}.{p}", self.per_expert)
    }

    /// The fused name of `kind` in layer `prefix`.
    pub(crate) fn fused_name(&self, prefix: &str, kind: Fused) -> String {
        format!("{prefix}{}{}", self.fused, kind.suffix())
    }

    /// Another tensor's name in the per-expert layout.
    pub(crate) fn to_per_expert(&self, name: &str) -> String {
        rename(name, self.renames.iter().map(|(f, p)| (*f, *p)))
    }

    /// Another tensor's name in the fused layout.
    pub(crate) fn to_fused(&self, name: &str) -> String {
        rename(name, self.renames.iter().map(|(f, p)| (*p, *f)))
    }

    /// How `ck` stores its experts (`None`: it stores none). A checkpoint
    /// with both layouts is refused, naming a tensor of each.
    pub(crate) fn layout_of(&self, ck: &Checkpoint) -> Result<Option<ExpertLayout>> {
        let fused = ck.tensors.iter().find(|t| self.fused(&t.name).is_some());
        let piece = ck.tensors.iter().find(|t| self.piece(&t.name).is_some());
        match (fused, piece) {
            (Some(f), Some(p)) => Err(Error::bad_tensor(
                ck.file_of(f),
                &f.name,
                format!(
                    "is a fused expert tensor, but '{}' stores an expert on its own; a checkpoint holds one layout",
                    p.name
                ),
            )),
            (Some(_), None) => Ok(Some(ExpertLayout::Fused)),
            (None, Some(_)) => Ok(Some(ExpertLayout::PerExpert)),
            (None, None) => Ok(None),
        }
    }
}

fn rename<'a>(name: &str, mut rules: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    match rules.find(|(from, _)| name.contains(from)) {
        Some((from, to)) => name.replacen(from, to, 1),
        None => name.to_string(),
    }
}

/// What `inspect` says of a model's experts.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ExpertSummary {
    /// The family (the transformers conversion it follows).
    pub family: String,
    /// How they are stored.
    pub layout: ExpertLayout,
    /// Experts per MoE layer.
    pub experts: u64,
    /// Layers with experts.
    pub moe_layers: u64,
}

/// A model's experts, for `inspect` (`None`: a dense model).
pub(crate) fn summary(ck: &Checkpoint) -> Result<Option<ExpertSummary>> {
    if let Some(f) = Family::of(ck) {
        let Some(layout) = f.layout_of(ck)? else { return Ok(None) };
        let mut layers = std::collections::BTreeSet::new();
        let mut experts = 0;
        for t in &ck.tensors {
            if let Some((prefix, k)) = f.fused(&t.name) {
                layers.insert(prefix.to_string());
                if k == Fused::Down {
                    experts = experts.max(t.shape.first().copied().unwrap_or(0));
                }
            } else if let Some((prefix, e, _)) = f.piece(&t.name) {
                layers.insert(prefix.to_string());
                experts = experts.max(e + 1);
            }
        }
        return Ok(Some(ExpertSummary {
            family: f.name.into(),
            layout,
            experts,
            moe_layers: layers.len() as u64,
        }));
    }
    let model_type = ck.config.as_ref().and_then(|c| c.raw.get("model_type")).and_then(|v| v.as_str());
    let Some((name, path)) = FUSED_ONLY.iter().find(|(m, _)| Some(*m) == model_type) else { return Ok(None) };
    let down: Vec<&Tensor> = ck
        .tensors
        .iter()
        .filter(|t| {
            t.name.ends_with(&format!("{path}down_proj"))
                || t.name.ends_with(&format!("{path}down_proj_blocks"))
        })
        .collect();
    Ok(down.first().map(|t| ExpertSummary {
        family: name.to_string(),
        layout: ExpertLayout::Fused,
        experts: t.shape.first().copied().unwrap_or(0),
        moe_layers: down.len() as u64,
    }))
}

/// Reads a fused checkpoint as a per-expert one: every fused tensor is
/// replaced in the table by its experts' matrices (byte ranges of it, in
/// storage order, nothing copied), named as `family` names them, and the
/// block's other tensors renamed to that layout. Returns how many fused
/// tensors were split. Refused, naming the tensor, when a fused tensor's
/// shape or dtype does not allow it.
pub(crate) fn split_fused(ck: &mut Checkpoint, family: &Family) -> Result<usize> {
    let mut out = Vec::with_capacity(ck.tensors.len());
    let mut split = 0;
    for t in &ck.tensors {
        let Some((prefix, kind)) = family.fused(&t.name) else {
            let name = family.to_per_expert(&t.name);
            let stored_as = if name == t.name { t.stored_as.clone() } else { Some(t.name.clone()) };
            out.push(Tensor { name, stored_as, ..t.clone() });
            continue;
        };
        let bad = |what: String| Error::bad_tensor(ck.file_of(t), &t.name, what);
        if t.dtype.float().is_none() {
            return Err(bad(format!(
                "is {}; fused experts are split for BF16, F16 and F32 tensors only",
                t.dtype
            )));
        }
        let [e, rows, cols] = t.shape[..] else {
            return Err(bad(format!(
                "has shape {:?}; a fused expert tensor is [experts, rows, columns]",
                t.shape
            )));
        };
        let parts = kind.parts();
        if rows % parts.len() as u64 != 0 {
            return Err(bad(format!(
                "has {rows} rows per expert; gate_up_proj holds the gate's and the up's, an even count"
            )));
        }
        let r = rows / parts.len() as u64;
        let bytes = r * cols * t.dtype.bits() / 8;
        for expert in 0..e {
            for (k, part) in parts.iter().enumerate() {
                out.push(Tensor {
                    name: family.piece_name(prefix, expert, *part),
                    dtype: t.dtype,
                    shape: vec![r, cols],
                    shard: t.shard,
                    start: t.start + (expert * parts.len() as u64 + k as u64) * bytes,
                    len: bytes,
                    stored_as: Some(format!("{}[{expert}]{}", t.name, part_rows(kind, k, r))),
                    quant: None,
                });
            }
        }
        split += 1;
    }
    ck.retable(out)?;
    Ok(split)
}

/// The row range a part covers inside its expert, for messages.
fn part_rows(kind: Fused, k: usize, r: u64) -> String {
    match kind {
        Fused::GateUp => format!("[{}:{}]", k as u64 * r, (k as u64 + 1) * r),
        Fused::Down => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_build_both_ways() {
        let q = Family::of_model_type("qwen3_moe").unwrap();
        let n = "model.layers.3.mlp.experts.12.up_proj.weight";
        assert_eq!(q.piece(n), Some(("model.layers.3", 12, Part::Up)));
        assert_eq!(q.piece_name("model.layers.3", 12, Part::Up), n);
        assert_eq!(
            q.fused("model.layers.3.mlp.experts.gate_up_proj"),
            Some(("model.layers.3", Fused::GateUp))
        );
        assert_eq!(q.fused_name("model.layers.3", Fused::Down), "model.layers.3.mlp.experts.down_proj");
        // shared experts and the router are not experts
        assert_eq!(q.piece("model.layers.3.mlp.shared_experts.gate_proj.weight"), None);
        assert_eq!(q.piece("model.layers.3.mlp.experts.01.up_proj.weight"), None);
        let m = Family::of_model_type("mixtral").unwrap();
        assert_eq!(
            m.piece("model.layers.0.block_sparse_moe.experts.2.w3.weight"),
            Some(("model.layers.0", 2, Part::Up))
        );
        assert_eq!(
            m.to_per_expert("model.layers.0.mlp.gate.weight"),
            "model.layers.0.block_sparse_moe.gate.weight"
        );
        assert_eq!(
            m.to_fused("model.layers.0.block_sparse_moe.gate.weight"),
            "model.layers.0.mlp.gate.weight"
        );
        let p = Family::of_model_type("phimoe").unwrap();
        assert_eq!(
            p.to_per_expert("model.layers.0.mlp.router.weight"),
            "model.layers.0.block_sparse_moe.gate.weight"
        );
        assert_eq!(
            p.to_fused("model.layers.0.block_sparse_moe.gate.weight"),
            "model.layers.0.mlp.router.weight"
        );
        assert_eq!(
            p.to_fused("model.layers.0.input_layernorm.weight"),
            "model.layers.0.input_layernorm.weight"
        );
        let names = ["model.embed_tokens.weight", "model.layers.0.block_sparse_moe.experts.0.w1.weight"];
        assert_eq!(Family::of_names(names.into_iter()).map(|f| f.name), Some("mixtral"));
    }
}
