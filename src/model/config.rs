//! A model's `config.json`: the summary `inspect` prints, the architecture
//! comparison that stops a chat vector from being added to a model it does
//! not fit, RoPE settings in either layout transformers has used, and the
//! check that a config describes the weights beside it.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::json::read_capped;

/// Largest config.json accepted.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Keys that define the network's shape: if these differ, weights of one
/// model mean something else in the other. `vocab_size` is not here:
/// vocabulary expansion is handled per row. RoPE is compared as `Rope`,
/// whichever layout holds it.
pub(crate) const ARCHITECTURE_KEYS: [&str; 9] = [
    "model_type",
    "architectures",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
    "hidden_act",
];

/// A model's effective RoPE settings, whichever layout holds them:
/// transformers 5's `rope_parameters` (`{"rope_type", "rope_theta", ...}`,
/// or one such object per attention type), or the older top-level
/// `rope_theta` with an optional `rope_scaling` (`"type"` or `"rope_type"`).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Rope {
    /// The base frequency (`None`: not given, the architecture's default).
    pub theta: Option<f64>,
    /// `default`, `llama3`, `linear`, `dynamic`, `yarn`, ...
    pub kind: String,
    /// The scaling's other settings, sorted by key, numbers as f64.
    pub params: Vec<(String, Value)>,
    /// Per attention type (transformers 5 models that mix them).
    pub per_type: Vec<(String, Rope)>,
}

impl Rope {
    fn from_object(m: &serde_json::Map<String, Value>) -> Rope {
        let kind = ["rope_type", "type"]
            .iter()
            .find_map(|k| m.get(*k).and_then(Value::as_str))
            .unwrap_or("default")
            .to_string();
        let mut params: Vec<(String, Value)> = m
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "rope_type" | "type" | "rope_theta"))
            .map(|(k, v)| (k.clone(), v.as_f64().map_or_else(|| v.clone(), Value::from)))
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        Rope { theta: m.get("rope_theta").and_then(Value::as_f64), kind, params, per_type: Vec::new() }
    }

    /// How `inspect` and error messages show it.
    pub(crate) fn describe(&self) -> String {
        if !self.per_type.is_empty() {
            let parts: Vec<String> =
                self.per_type.iter().map(|(t, r)| format!("{t}: {}", r.describe())).collect();
            return parts.join("; ");
        }
        let theta = self.theta.map_or("default".to_string(), |t| t.to_string());
        let mut s = format!("theta {theta}, {}", self.kind);
        for (k, v) in &self.params {
            s.push_str(&format!(", {k} {v}"));
        }
        s
    }
}

/// A parsed config.json.
#[derive(Clone, Debug)]
pub(crate) struct ModelConfig {
    pub path: PathBuf,
    pub raw: serde_json::Map<String, Value>,
}

/// What `inspect` shows of a config.json (each `None` when absent).
#[derive(Clone, Debug, Serialize)]
pub struct ConfigSummary {
    /// The first of `architectures`, e.g. `LlamaForCausalLM`.
    pub architecture: Option<String>,
    /// `model_type`, e.g. `llama`.
    pub model_type: Option<String>,
    /// `vocab_size`.
    pub vocab_size: Option<u64>,
    /// `hidden_size`.
    pub hidden_size: Option<u64>,
    /// `num_hidden_layers`.
    pub num_hidden_layers: Option<u64>,
    /// `num_attention_heads`.
    pub num_attention_heads: Option<u64>,
    /// `num_key_value_heads`.
    pub num_key_value_heads: Option<u64>,
    /// `intermediate_size`.
    pub intermediate_size: Option<u64>,
    /// The RoPE base frequency (`rope_parameters.rope_theta` or `rope_theta`).
    pub rope_theta: Option<f64>,
    /// The RoPE settings in full (`theta 500000, llama3, factor 8, ...`).
    pub rope: String,
    /// `tie_word_embeddings`.
    pub tie_word_embeddings: Option<bool>,
    /// `dtype` (transformers 5) or `torch_dtype`.
    pub torch_dtype: Option<String>,
}

impl ModelConfig {
    /// Reads the config.json at `path`.
    pub(crate) fn read(path: &Path) -> Result<ModelConfig> {
        ModelConfig::parse(&read_capped(path, MAX_CONFIG_BYTES)?, path)
    }

    /// Parses a config.json's bytes; `path` is only used in messages.
    pub(crate) fn parse(bytes: &[u8], path: &Path) -> Result<ModelConfig> {
        match serde_json::from_slice(bytes) {
            Ok(Value::Object(raw)) => Ok(ModelConfig { path: path.to_path_buf(), raw }),
            Ok(_) => Err(Error::bad_file(path, "config must be a JSON object")),
            Err(e) => Err(Error::bad_file(path, format!("invalid JSON: {e}"))),
        }
    }

    fn u64(&self, key: &str) -> Option<u64> {
        self.raw.get(key).and_then(Value::as_u64)
    }

    /// The effective RoPE settings (see `Rope`).
    pub(crate) fn rope(&self) -> Rope {
        if let Some(Value::Object(rp)) = self.raw.get("rope_parameters") {
            let nested = !rp.is_empty() && rp.values().all(Value::is_object);
            if nested {
                let mut per_type: Vec<(String, Rope)> = rp
                    .iter()
                    .filter_map(|(k, v)| v.as_object().map(|o| (k.clone(), Rope::from_object(o))))
                    .collect();
                per_type.sort_by(|a, b| a.0.cmp(&b.0));
                return Rope { theta: None, kind: "per attention type".into(), params: Vec::new(), per_type };
            }
            return Rope::from_object(rp);
        }
        let mut m = match self.raw.get("rope_scaling") {
            Some(Value::Object(sc)) => sc.clone(),
            _ => serde_json::Map::new(),
        };
        if let Some(t) = self.raw.get("rope_theta") {
            m.insert("rope_theta".into(), t.clone());
        }
        Rope::from_object(&m)
    }

    pub(crate) fn summary(&self) -> ConfigSummary {
        let text = |k: &str| self.raw.get(k).and_then(Value::as_str).map(str::to_string);
        ConfigSummary {
            architecture: self
                .raw
                .get("architectures")
                .and_then(Value::as_array)
                .and_then(|a| a.first())
                .and_then(Value::as_str)
                .map(str::to_string),
            model_type: text("model_type"),
            vocab_size: self.u64("vocab_size"),
            hidden_size: self.u64("hidden_size"),
            num_hidden_layers: self.u64("num_hidden_layers"),
            num_attention_heads: self.u64("num_attention_heads"),
            num_key_value_heads: self.u64("num_key_value_heads"),
            intermediate_size: self.u64("intermediate_size"),
            rope_theta: self.rope().theta,
            rope: self.rope().describe(),
            tie_word_embeddings: self.raw.get("tie_word_embeddings").and_then(Value::as_bool),
            torch_dtype: text("torch_dtype").or_else(|| text("dtype")),
        }
    }
}

/// Lists the architecture keys on which `a` and `b` disagree, as
/// `key: a-value (a-file) vs b-value (b-file)`. Numbers compare by value, so
/// `500000` and `500000.0` agree.
pub(crate) fn architecture_differences(a: &ModelConfig, b: &ModelConfig) -> Vec<String> {
    let mut out = Vec::new();
    for key in ARCHITECTURE_KEYS {
        let va = a.raw.get(key);
        let vb = b.raw.get(key);
        let same = match (va, vb) {
            (Some(Value::Number(x)), Some(Value::Number(y))) => x.as_f64() == y.as_f64(),
            (x, y) => x == y,
        };
        if !same {
            let show = |v: Option<&Value>| v.map_or("(absent)".to_string(), Value::to_string);
            out.push(format!(
                "config.json '{key}': {} in {} vs {} in {}",
                show(va),
                a.path.display(),
                show(vb),
                b.path.display()
            ));
        }
    }
    let (ra, rb) = (a.rope(), b.rope());
    if ra != rb {
        out.push(format!(
            "config.json RoPE: {} in {} vs {} in {}",
            ra.describe(),
            a.path.display(),
            rb.describe(),
            b.path.display()
        ));
    }
    out
}

/// What a config says of the weights' shapes, against the weights: its
/// `vocab_size` against the embedding rows, `hidden_size` against its
/// columns, `num_hidden_layers` against the layers the tensor names number.
/// `embedding` is the embedding matrix's shape, `layers` the count of
/// layer indices among the tensor names (0: none). Each disagreement names
/// the key, both values and `file`.
pub(crate) fn shape_problems(
    get: impl Fn(&str) -> Option<Value>,
    embedding: Option<&[u64]>,
    layers: u64,
    file: &Path,
) -> Vec<String> {
    let mut out = Vec::new();
    let num = |k: &str| get(k).and_then(|v| v.as_u64());
    let mut check = |key: &str, said: Option<u64>, actual: Option<u64>, what: &str| {
        if let (Some(s), Some(a)) = (said, actual)
            && s != a
        {
            out.push(format!("{}: '{key}' is {s}, but {what} {a}", file.display()));
        }
    };
    check(
        "vocab_size",
        num("vocab_size"),
        embedding.and_then(|e| e.first().copied()),
        "the embedding matrix has rows:",
    );
    check(
        "hidden_size",
        num("hidden_size"),
        embedding.and_then(|e| e.get(1).copied()),
        "the embedding matrix has columns:",
    );
    check(
        "num_hidden_layers",
        num("num_hidden_layers"),
        (layers > 0).then_some(layers),
        "the tensors number layers:",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(v: Value) -> ModelConfig {
        ModelConfig { path: "c.json".into(), raw: v.as_object().unwrap().clone() }
    }

    #[test]
    fn numbers_compare_by_value_and_vocab_is_ignored() {
        let a = cfg(serde_json::json!({"rope_theta": 500000, "hidden_size": 64, "vocab_size": 10}));
        let b = cfg(serde_json::json!({"rope_theta": 500000.0, "hidden_size": 64, "vocab_size": 12}));
        assert!(architecture_differences(&a, &b).is_empty());
    }

    #[test]
    fn rope_is_compared_whichever_layout_holds_it() {
        let old = cfg(
            serde_json::json!({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}),
        );
        let new = cfg(
            serde_json::json!({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000, "factor": 8}}),
        );
        assert!(
            architecture_differences(&old, &new).is_empty(),
            "{:?}",
            architecture_differences(&old, &new)
        );
        let other =
            cfg(serde_json::json!({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}));
        let d = architecture_differences(&old, &other);
        assert!(
            d.len() == 1 && d[0].contains("theta 500000, llama3") && d[0].contains("theta 10000, default"),
            "{d:?}"
        );
        assert_eq!(new.summary().rope_theta, Some(500000.0));
        assert_eq!(old.rope().describe(), "theta 500000, llama3, factor 8.0");
    }

    #[test]
    fn a_config_must_describe_its_weights() {
        let c = serde_json::json!({"vocab_size": 32000, "hidden_size": 64, "num_hidden_layers": 2});
        let get = |k: &str| c.get(k).cloned();
        assert!(shape_problems(get, Some(&[32000, 64]), 2, Path::new("c.json")).is_empty());
        let p = shape_problems(get, Some(&[43176, 64]), 3, Path::new("c.json"));
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("'vocab_size' is 32000, but the embedding matrix has rows: 43176"), "{p:?}");
        assert!(p[1].contains("'num_hidden_layers' is 2"), "{p:?}");
    }

    #[test]
    fn differences_name_the_key() {
        let a = cfg(serde_json::json!({"num_hidden_layers": 32}));
        let b = cfg(serde_json::json!({"num_hidden_layers": 80}));
        let d = architecture_differences(&a, &b);
        assert_eq!(d.len(), 1);
        assert!(d[0].contains("num_hidden_layers") && d[0].contains("32") && d[0].contains("80"));
    }
}
