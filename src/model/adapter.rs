//! A PEFT LoRA adapter, read as untrusted input: `adapter_config.json` and
//! `adapter_model.safetensors` (or the older `adapter_model.bin`), as
//! `PeftModel.save_pretrained` writes them, and what each stored tensor
//! does to the base model's weights.
//!
//! PEFT saves the low-rank factors of module `M` of the base model as
//! `base_model.model.M.lora_A.weight` (`r x in`) and `...lora_B.weight`
//! (`out x r`), or `lora_embedding_A` / `lora_embedding_B` for an
//! embedding, and merging adds `scaling * (B @ A)` (transposed for an
//! embedding or a `fan_in_fan_out` layer) to `M.weight`, with
//! `scaling = alpha / r` (`alpha / sqrt(r)` under rsLoRA) and `r` and
//! `alpha` per module from `rank_pattern` / `alpha_pattern`. Other stored
//! tensors (`modules_to_save`, trained biases, saved embedding layers)
//! replace the base's tensor of that name whole.
//!
//! Variants whose merge is not `W + s * B @ A` (DoRA, LoRA biases,
//! trainable tokens, parameter targets, layer replication) are refused by
//! name rather than merged wrongly.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::json::read_capped;
use crate::model::checkpoint::Checkpoint;

/// The adapter's config file.
pub(crate) const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The adapter's weights, as PEFT saves them by default.
pub(crate) const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The adapter's weights as older PEFT versions saved them.
pub(crate) const ADAPTER_BIN: &str = "adapter_model.bin";
/// The prefix PEFT puts before a transformers model's module names.
const KEY_PREFIX: &str = "base_model.model.";
/// Largest adapter_config.json accepted (they are about 1 KB).
const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// The fields of `adapter_config.json` chatvec reads; the others (dropout,
/// target module lists, task type, ...) do not change the merge.
#[derive(Deserialize)]
struct RawConfig {
    peft_type: Option<String>,
    r: Option<u64>,
    lora_alpha: Option<f64>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    rank_pattern: Option<BTreeMap<String, u64>>,
    #[serde(default)]
    alpha_pattern: Option<BTreeMap<String, f64>>,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    lora_bias: bool,
    #[serde(default)]
    target_parameters: Option<Vec<String>>,
    #[serde(default)]
    layer_replication: Option<serde_json::Value>,
    #[serde(default)]
    trainable_token_indices: Option<serde_json::Value>,
    base_model_name_or_path: Option<String>,
}

/// A per-module override of `r` or `alpha`: PEFT matches the pattern
/// against a module's full name as `(.*\.)?(PATTERN)$`, first match wins
/// in the file's order.
struct Pattern<T> {
    text: String,
    re: regex::Regex,
    value: T,
}

fn patterns<T: Copy>(
    file: &Path,
    field: &str,
    map: Option<BTreeMap<String, T>>,
    order: &[String],
) -> Result<Vec<Pattern<T>>> {
    let Some(map) = map else { return Ok(Vec::new()) };
    // serde's map loses the file's order; PEFT keeps it (first match wins),
    // so take the keys in the order the text lists them.
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort_by_key(|k| order.iter().position(|o| o == *k).unwrap_or(usize::MAX));
    keys.into_iter()
        .map(|k| {
            let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{k})$")).map_err(|e| {
                Error::bad_file(file, format!("{field} key '{k}' is not a regular expression: {e}"))
            })?;
            Ok(Pattern { text: k.clone(), re, value: map[k] })
        })
        .collect()
}

fn find<'a, T>(pats: &'a [Pattern<T>], module: &str) -> Option<&'a Pattern<T>> {
    pats.iter().find(|p| p.re.is_match(module))
}

/// How the product of the factors lines up with the weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LowRankKind {
    /// A linear layer `[out, in]`: `delta = B @ A`.
    Linear,
    /// A layer stored `[in, out]` (`fan_in_fan_out`, GPT-2's Conv1D) or an
    /// embedding `[vocab, dim]`: `delta = (B @ A)^T`.
    Transposed,
}

/// What the adapter does to one tensor of the base model.
#[derive(Clone, Debug)]
pub(crate) enum Change {
    /// `W + scaling * delta` with the factors `a` (`lora_A`) and `b`
    /// (`lora_B`), tensor indices into the adapter's checkpoint. `W` is the
    /// base's tensor, or the adapter's `base_layer` copy of it when PEFT
    /// saved one (`save_embedding_layers`, as for a targeted embedding).
    LowRank { a: usize, b: usize, rank: u64, scaling: f64, kind: LowRankKind, base_layer: Option<usize> },
    /// The tensor replaced by the adapter's tensor of that index.
    Replace(usize),
}

/// An opened LoRA adapter: its weights mapped, its config read, and for
/// each base tensor it touches, what it does.
pub(crate) struct Adapter {
    pub ckpt: Checkpoint,
    /// The base model the adapter was trained on, as its config names it.
    pub base_model: Option<String>,
    pub use_rslora: bool,
    /// Base tensor name -> change, in the adapter file's order.
    pub changes: Vec<(String, Change)>,
}

impl Adapter {
    /// Opens the adapter in `dir`.
    pub fn open(dir: &Path) -> Result<Adapter> {
        if !dir.is_dir() {
            return Err(Error::Usage(format!("{} is not a directory", dir.display())));
        }
        let config_path = dir.join(ADAPTER_CONFIG);
        if !config_path.is_file() {
            return Err(Error::Usage(format!(
                "{} has no {ADAPTER_CONFIG}: it is not a PEFT adapter",
                dir.display()
            ))
            .with_hint(
                "--lora takes the directory PeftModel.save_pretrained (or a TRL run with use_peft) wrote",
            ));
        }
        let text = read_capped(&config_path, MAX_CONFIG_BYTES)?;
        let raw: RawConfig = serde_json::from_slice(&text)
            .map_err(|e| Error::bad_file(&config_path, format!("invalid adapter config: {e}")))?;
        let order = key_order(&text);
        let config = LoraConfig::check(raw, &config_path, &order)?;
        let ckpt = if dir.join(ADAPTER_WEIGHTS).is_file() {
            Checkpoint::open_file(dir, ADAPTER_WEIGHTS, false)?
        } else if dir.join(ADAPTER_BIN).is_file() {
            Checkpoint::open_file(dir, ADAPTER_BIN, true)?
        } else {
            return Err(Error::Usage(format!(
                "{} has no adapter weights ({ADAPTER_WEIGHTS} or {ADAPTER_BIN})",
                dir.display()
            )));
        };
        let changes = read_changes(&ckpt, &config, &ckpt.shards[0].path)?;
        Ok(Adapter { ckpt, base_model: config.base_model, use_rslora: config.use_rslora, changes })
    }

    /// The adapter's directory.
    pub fn dir(&self) -> &Path {
        &self.ckpt.dir
    }

    /// The weight file.
    pub fn weights_path(&self) -> PathBuf {
        self.ckpt.shards[0].path.clone()
    }
}

/// Every JSON object key in `text`, in order (for the pattern maps, whose
/// order decides which pattern wins).
fn key_order(text: &[u8]) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(text) else { return Vec::new() };
    let mut out = Vec::new();
    for field in ["rank_pattern", "alpha_pattern"] {
        if let Some(m) = v.get(field).and_then(|m| m.as_object()) {
            out.extend(m.keys().cloned());
        }
    }
    out
}

/// The checked config.
struct LoraConfig {
    r: u64,
    alpha: f64,
    use_rslora: bool,
    fan_in_fan_out: bool,
    rank_pattern: Vec<Pattern<u64>>,
    alpha_pattern: Vec<Pattern<f64>>,
    base_model: Option<String>,
}

impl LoraConfig {
    fn check(raw: RawConfig, file: &Path, order: &[String]) -> Result<LoraConfig> {
        let refuse = |what: &str| {
            Err(Error::bad_file(file, format!("{what}; chatvec merges plain LoRA adapters only"))
                .with_hint("merge it with peft's merge_and_unload() instead"))
        };
        match raw.peft_type.as_deref() {
            Some(t) if t.eq_ignore_ascii_case("lora") => {}
            Some(t) => return refuse(&format!("peft_type is {t}, not LORA")),
            None => return Err(Error::bad_file(file, "has no peft_type; expected \"LORA\"")),
        }
        if raw.use_dora {
            return refuse("use_dora is true (DoRA rescales each row by a learned magnitude)");
        }
        if raw.lora_bias {
            return refuse("lora_bias is true (the adapter adds a bias of its own)");
        }
        if raw.target_parameters.as_ref().is_some_and(|t| !t.is_empty()) {
            return refuse("target_parameters is set (LoRA on raw parameters such as MoE experts)");
        }
        if raw.layer_replication.as_ref().is_some_and(|v| !v.is_null()) {
            return refuse("layer_replication is set (the adapted model has more layers than the base)");
        }
        if raw.trainable_token_indices.as_ref().is_some_and(|v| !v.is_null()) {
            return refuse("trainable_token_indices is set (trainable tokens)");
        }
        let r = match raw.r {
            Some(r) if r > 0 => r,
            _ => return Err(Error::bad_file(file, "r must be a positive integer")),
        };
        let alpha = match raw.lora_alpha {
            Some(a) if a.is_finite() => a,
            Some(a) => {
                return Err(Error::bad_file(file, format!("lora_alpha is {a}; expected a finite number")));
            }
            // PEFT's default.
            None => 8.0,
        };
        let rank_pattern = patterns(file, "rank_pattern", raw.rank_pattern, order)?;
        if let Some(p) = rank_pattern.iter().find(|p| p.value == 0) {
            return Err(Error::bad_file(file, format!("rank_pattern gives '{}' rank 0", p.text)));
        }
        let alpha_pattern = patterns(file, "alpha_pattern", raw.alpha_pattern, order)?;
        if let Some(p) = alpha_pattern.iter().find(|p| !p.value.is_finite()) {
            return Err(Error::bad_file(file, format!("alpha_pattern gives '{}' alpha {}", p.text, p.value)));
        }
        Ok(LoraConfig {
            r,
            alpha,
            use_rslora: raw.use_rslora,
            fan_in_fan_out: raw.fan_in_fan_out,
            rank_pattern,
            alpha_pattern,
            base_model: raw.base_model_name_or_path.filter(|s| !s.is_empty()),
        })
    }

    /// `(r, alpha)` of module `module` (its name in the base model).
    fn rank_alpha(&self, module: &str) -> (u64, f64) {
        (
            find(&self.rank_pattern, module).map_or(self.r, |p| p.value),
            find(&self.alpha_pattern, module).map_or(self.alpha, |p| p.value),
        )
    }
}

/// Which factor a stored key is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Factor {
    A,
    B,
}

/// The role of one stored key: a factor of a module's low-rank update, or
/// a whole tensor.
enum Key<'a> {
    Factor {
        module: &'a str,
        factor: Factor,
        embedding: bool,
    },
    Whole(String),
    /// The weight of a module under LoRA, saved as `M.base_layer.weight`.
    BaseLayer(String),
}

fn classify<'a>(name: &'a str, file: &Path) -> Result<Key<'a>> {
    let bad = |why: &str| Err(Error::format(file, format!("tensor '{name}': {why}")));
    let Some(rest) = name.strip_prefix(KEY_PREFIX) else {
        return bad(&format!(
            "expected a name starting with '{KEY_PREFIX}' (PEFT's layout for a transformers model)"
        ));
    };
    for (suffix, factor, embedding) in [
        (".lora_A.weight", Factor::A, false),
        (".lora_B.weight", Factor::B, false),
        (".lora_embedding_A", Factor::A, true),
        (".lora_embedding_B", Factor::B, true),
    ] {
        if let Some(module) = rest.strip_suffix(suffix) {
            return Ok(Key::Factor { module, factor, embedding });
        }
    }
    if rest.contains("lora_magnitude_vector") {
        return bad("a DoRA magnitude; chatvec merges plain LoRA adapters only");
    }
    if rest.contains("trainable_tokens") {
        return bad("a trainable-tokens delta; chatvec merges plain LoRA adapters only");
    }
    if rest.contains(".lora_") {
        return bad("an adapter tensor chatvec does not know (expected lora_A / lora_B weights)");
    }
    // A saved embedding layer of a targeted module keeps PEFT's
    // `base_layer` level; the base model's tensor has none.
    if rest.contains(".base_layer.") {
        return Ok(Key::BaseLayer(rest.replace(".base_layer.", ".")));
    }
    Ok(Key::Whole(rest.to_string()))
}

/// What the adapter's tensors do, per base tensor, in file order.
fn read_changes(ck: &Checkpoint, config: &LoraConfig, file: &Path) -> Result<Vec<(String, Change)>> {
    // module -> (A, B, embedding), in order of first appearance.
    let mut factors: Vec<(String, Option<usize>, Option<usize>, bool)> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    let mut changes: Vec<(String, Change)> = Vec::new();
    let mut base_layers: HashMap<String, usize> = HashMap::new();
    for (i, t) in ck.tensors.iter().enumerate() {
        if t.dtype.float().is_none() {
            return Err(Error::format(
                file,
                format!("tensor '{}' is {}; adapter tensors must be BF16, F16 or F32", t.name, t.dtype),
            ));
        }
        match classify(&t.name, file)? {
            Key::Whole(target) => changes.push((target, Change::Replace(i))),
            Key::BaseLayer(target) => {
                if base_layers.insert(target.clone(), i).is_some() {
                    return Err(Error::format(file, format!("'{target}' is saved twice as a base layer")));
                }
            }
            Key::Factor { module, factor, embedding } => {
                let k = *at.entry(module.to_string()).or_insert_with(|| {
                    factors.push((module.to_string(), None, None, embedding));
                    factors.len() - 1
                });
                let slot = &mut factors[k];
                if slot.3 != embedding {
                    return Err(Error::format(
                        file,
                        format!("module '{module}' has both linear and embedding LoRA factors"),
                    ));
                }
                match factor {
                    Factor::A => slot.1 = Some(i),
                    Factor::B => slot.2 = Some(i),
                }
            }
        }
    }
    for (module, a, b, embedding) in factors {
        let (Some(a), Some(b)) = (a, b) else {
            let missing = if a.is_none() { "lora_A" } else { "lora_B" };
            return Err(Error::format(file, format!("module '{module}' has no {missing} factor")));
        };
        let (ta, tb) = (&ck.tensors[a], &ck.tensors[b]);
        if ta.shape.len() != 2 || tb.shape.len() != 2 || ta.shape[0] != tb.shape[1] {
            return Err(Error::format(
                file,
                format!(
                    "module '{module}': lora_A {:?} and lora_B {:?} are not an r x in and an out x r matrix",
                    ta.shape, tb.shape
                ),
            ));
        }
        let rank = ta.shape[0];
        let (r, alpha) = config.rank_alpha(&module);
        if rank != r {
            return Err(Error::format(
                file,
                format!(
                    "module '{module}': the factors have rank {rank}, but {ADAPTER_CONFIG} gives it r = {r}"
                ),
            ));
        }
        let scaling = if config.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        let kind =
            if embedding || config.fan_in_fan_out { LowRankKind::Transposed } else { LowRankKind::Linear };
        let target = format!("{module}.weight");
        let base_layer = base_layers.remove(&target);
        changes.push((target, Change::LowRank { a, b, rank, scaling, kind, base_layer }));
    }
    // A base layer without factors is a plain saved layer (the embeddings
    // of a resized vocabulary): it replaces the base's.
    let mut rest: Vec<(String, usize)> = base_layers.into_iter().collect();
    rest.sort_by_key(|(_, i)| *i);
    changes.extend(rest.into_iter().map(|(target, i)| (target, Change::Replace(i))));
    let mut seen: HashMap<&str, ()> = HashMap::new();
    for (name, _) in &changes {
        if seen.insert(name, ()).is_some() {
            return Err(Error::format(
                file,
                format!("the adapter changes '{name}' twice (a low-rank update and a whole tensor)"),
            ));
        }
    }
    if changes.is_empty() {
        return Err(Error::format(file, "holds no tensors"));
    }
    Ok(changes)
}
