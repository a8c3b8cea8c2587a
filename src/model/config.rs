//! A model's `config.json`: the summary `inspect` prints, and the
//! architecture comparison that stops a chat vector from being added to a
//! model it does not fit.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::json::read_capped;

/// Largest config.json accepted.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Keys that define the network's shape and positional encoding: if these
/// differ, weights of one model mean something else in the other.
/// `vocab_size` is not here: vocabulary expansion is handled per row.
pub const ARCHITECTURE_KEYS: [&str; 10] = [
    "model_type",
    "architectures",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
    "rope_theta",
    "hidden_act",
];

/// A parsed config.json.
#[derive(Clone, Debug)]
pub struct ModelConfig {
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
    /// `rope_theta`.
    pub rope_theta: Option<f64>,
    /// `tie_word_embeddings`.
    pub tie_word_embeddings: Option<bool>,
    /// `dtype` (transformers 5) or `torch_dtype`.
    pub torch_dtype: Option<String>,
}

impl ModelConfig {
    /// Reads the config.json at `path`.
    pub fn read(path: &Path) -> Result<ModelConfig> {
        ModelConfig::parse(&read_capped(path, MAX_CONFIG_BYTES)?, path)
    }

    /// Parses a config.json's bytes; `path` is only used in messages.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<ModelConfig> {
        match serde_json::from_slice(bytes) {
            Ok(Value::Object(raw)) => Ok(ModelConfig { path: path.to_path_buf(), raw }),
            Ok(_) => Err(Error::bad_file(path, "config must be a JSON object")),
            Err(e) => Err(Error::bad_file(path, format!("invalid JSON: {e}"))),
        }
    }

    fn u64(&self, key: &str) -> Option<u64> {
        self.raw.get(key).and_then(Value::as_u64)
    }

    pub fn summary(&self) -> ConfigSummary {
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
            rope_theta: self.raw.get("rope_theta").and_then(Value::as_f64),
            tie_word_embeddings: self.raw.get("tie_word_embeddings").and_then(Value::as_bool),
            torch_dtype: text("torch_dtype").or_else(|| text("dtype")),
        }
    }
}

/// Lists the architecture keys on which `a` and `b` disagree, as
/// `key: a-value (a-file) vs b-value (b-file)`. Numbers compare by value, so
/// `500000` and `500000.0` agree.
pub fn architecture_differences(a: &ModelConfig, b: &ModelConfig) -> Vec<String> {
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
    fn differences_name_the_key() {
        let a = cfg(serde_json::json!({"num_hidden_layers": 32}));
        let b = cfg(serde_json::json!({"num_hidden_layers": 80}));
        let d = architecture_differences(&a, &b);
        assert_eq!(d.len(), 1);
        assert!(d[0].contains("num_hidden_layers") && d[0].contains("32") && d[0].contains("80"));
    }
}
