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
//! What chatvec merges is what PEFT's `merge_and_unload()` gives, or it is
//! refused with the reason:
//! - variants whose merge is not `W + s * B @ A` (DoRA, LoRA biases, aLoRA,
//!   Arrow, BD-LoRA, KaSA, QALoRA, trainable tokens, parameter targets,
//!   layer replication) and initialisations PEFT re-runs on the base when
//!   it loads the adapter (PiSSA, OLoRA, CorDA, LoftQ) are refused by
//!   name; VeLoRA, MonteCLoRA and MiCA, which PEFT merges as plain LoRA,
//!   are merged;
//! - whether `B @ A` is transposed follows the base layer's type, as in
//!   PEFT, which ignores `fan_in_fan_out` for a Linear layer and forces it
//!   for GPT-2's Conv1D (`layer_kind`);
//! - factors stored for the wrong kind of layer (`lora_embedding_*` on a
//!   Linear layer), which PEFT silently drops, are refused;
//! - `rank_pattern` and `alpha_pattern` keys match each in its own map's
//!   order, bounded in count, length and work (`Patterns`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, FormatError, Result};
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
/// target module lists, task type, ...) do not change the merge. The
/// pattern maps are read from the ordered JSON, not through here.
#[derive(Deserialize)]
struct RawConfig {
    peft_type: Option<String>,
    r: Option<u64>,
    lora_alpha: Option<f64>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    base_model_name_or_path: Option<String>,
}

/// Every key of PEFT's `LoraConfig` and `PeftConfig` (PEFT 0.20): one
/// outside this list may be a variant chatvec does not know, and is said.
const KNOWN_KEYS: &[&str] = &[
    "r",
    "target_modules",
    "exclude_modules",
    "lora_alpha",
    "lora_dropout",
    "fan_in_fan_out",
    "bias",
    "use_rslora",
    "modules_to_save",
    "init_lora_weights",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "megatron_config",
    "megatron_core",
    "trainable_token_indices",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "use_dora",
    "velora_config",
    "alora_invocation_tokens",
    "use_qalora",
    "qalora_group_size",
    "monteclora_config",
    "layer_replication",
    "runtime_config",
    "lora_bias",
    "target_parameters",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "ensure_weight_tying",
    "base_model_name_or_path",
    "revision",
    "peft_type",
    "task_type",
    "inference_mode",
    "auto_mapping",
    "peft_version",
];

/// Whether a config value switches its feature on (PEFT tests them for
/// truth: `true`, a non-empty list, object or string).
fn truthy(v: Option<&serde_json::Value>) -> bool {
    use serde_json::Value;
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    }
}

/// Most keys in `rank_pattern` and `alpha_pattern` together.
const MAX_PATTERN_KEYS: usize = 65_536;
/// Longest pattern key.
const MAX_KEY_LEN: usize = 1024;
/// Most keys that need a regex engine (holding more than letters, digits,
/// `_` and `.`).
const MAX_REGEX_KEYS: usize = 1024;
/// Compiled size of those keys' automaton.
const REGEX_SIZE_LIMIT: usize = 32 << 20;
/// Key comparisons one adapter may cost (modules x keys, for the rare
/// config that lists keys no module equals).
const MAX_PATTERN_WORK: u64 = 200_000_000;

/// `rank_pattern` or `alpha_pattern`: keys in the file's order, matched
/// against a module's name as PEFT does, `re.match(rf"(.*\.)?({key})$",
/// name)`, the first key in the map's order winning. Keys of letters,
/// digits, `_` and `.` (nearly all) are matched without a regex engine:
/// with `.` matching any character, such a key can only match the name's
/// last `key.len()` characters, preceded by a dot or by nothing. The
/// others go into one linear-time `RegexSet`.
struct Patterns<T> {
    keys: Vec<(String, T)>,
    /// Each plain key's first index.
    exact: HashMap<String, usize>,
    /// Indices of the plain keys with a `.` (which matches any character).
    dotted: Vec<usize>,
    regexes: Option<(regex::RegexSet, Vec<usize>)>,
}

fn plain_key(k: &str) -> bool {
    k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}

impl<T: Copy> Patterns<T> {
    fn empty() -> Patterns<T> {
        Patterns { keys: Vec::new(), exact: HashMap::new(), dotted: Vec::new(), regexes: None }
    }

    /// The map `field` of the config (in file order), each value read by
    /// `value`.
    fn read(
        file: &Path,
        field: &str,
        map: Option<&serde_json::Value>,
        value: impl Fn(&serde_json::Value) -> Option<T>,
        expected: &str,
    ) -> Result<Patterns<T>> {
        let mut p = Patterns::empty();
        let Some(map) = map.filter(|m| !m.is_null()) else { return Ok(p) };
        let map = map
            .as_object()
            .ok_or_else(|| Error::bad_file(file, format!("{field} must be an object of module patterns")))?;
        if map.len() > MAX_PATTERN_KEYS {
            return Err(Error::bad_file(
                file,
                format!("{field} has {} keys; chatvec takes at most {MAX_PATTERN_KEYS}", map.len()),
            ));
        }
        let mut regex_keys: Vec<String> = Vec::new();
        let mut regex_at: Vec<usize> = Vec::new();
        for (i, (k, v)) in map.iter().enumerate() {
            if k.len() > MAX_KEY_LEN {
                return Err(Error::bad_file(
                    file,
                    format!("{field} has a {}-byte key; chatvec takes at most {MAX_KEY_LEN}", k.len()),
                ));
            }
            let v = value(v).ok_or_else(|| {
                Error::bad_file(file, format!("{field} gives '{k}' {v}; expected {expected}"))
            })?;
            p.keys.push((k.clone(), v));
            if plain_key(k) {
                p.exact.entry(k.clone()).or_insert(i);
                if k.contains('.') {
                    p.dotted.push(i);
                }
            } else {
                regex_keys.push(format!(r"^(?:.*\.)?(?:{k})$"));
                regex_at.push(i);
            }
        }
        if regex_keys.len() > MAX_REGEX_KEYS {
            return Err(Error::bad_file(
                file,
                format!(
                    "{field} has {} keys that are regular expressions; chatvec takes at most {MAX_REGEX_KEYS}",
                    regex_keys.len()
                ),
            ));
        }
        if !regex_keys.is_empty() {
            let set = regex::RegexSetBuilder::new(&regex_keys)
                .size_limit(REGEX_SIZE_LIMIT)
                .dfa_size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|e| {
                    Error::bad_file(
                        file,
                        format!("{field} has a key chatvec cannot take as a regular expression: {e}"),
                    )
                })?;
            p.regexes = Some((set, regex_at));
        }
        Ok(p)
    }

    /// The first key matching `module`, counting comparisons in `work`.
    fn find(&self, module: &str, work: &mut u64) -> Option<&(String, T)> {
        // The exact keys equal to a dot-bounded suffix of the name.
        let mut best = usize::MAX;
        let mut start = 0;
        loop {
            if let Some(&i) = self.exact.get(&module[start..]) {
                best = best.min(i);
            }
            match module[start..].find('.') {
                Some(d) => start += d + 1,
                None => break,
            }
        }
        // A key with a dot can match where its dot meets another character.
        for &i in self.dotted.iter().take_while(|&&i| i < best) {
            *work += 1;
            if dotted_match(&self.keys[i].0, module) {
                best = i;
                break;
            }
        }
        if let Some((set, at)) = &self.regexes {
            *work += 1;
            if let Some(i) = set.matches(module).iter().map(|m| at[m]).min() {
                best = best.min(i);
            }
        }
        self.keys.get(best)
    }
}

/// Whether plain `key` (its `.` matching any character) matches `module`
/// as `(.*\.)?(key)$`.
fn dotted_match(key: &str, module: &str) -> bool {
    let (k, m) = (key.as_bytes(), module.as_bytes());
    if k.len() > m.len() {
        return false;
    }
    let at = m.len() - k.len();
    (at == 0 || m[at - 1] == b'.') && k.iter().zip(&m[at..]).all(|(a, b)| *a == b'.' || a == b)
}

/// The kind of base-model layer a module is, which decides how PEFT lines
/// `B @ A` up with its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LayerKind {
    /// `nn.Linear`, weight `[out, in]`: `delta = B @ A`, whatever
    /// `fan_in_fan_out` says (PEFT turns it off for a Linear layer).
    Linear,
    /// transformers' `Conv1D` (GPT-2 and its copies), weight `[in, out]`:
    /// `delta = (B @ A)^T`, whatever `fan_in_fan_out` says (PEFT turns it
    /// on).
    Conv1D,
    /// `nn.Embedding`, weight `[vocab, dim]`: `delta = (B @ A)^T`, from
    /// `lora_embedding_A` / `lora_embedding_B`.
    Embedding,
}

/// Model types whose attention and MLP projections are transformers'
/// `Conv1D`, and which of their modules are (transformers 5.24: GPT-2 and
/// the models copied from it; CLVP's decoder only in its MLP).
const CONV1D_MODELS: &[(&str, &[&str])] = &[
    ("gpt2", &["c_attn", "c_proj", "q_attn", "c_fc"]),
    ("decision_transformer", &["c_attn", "c_proj", "q_attn", "c_fc"]),
    ("imagegpt", &["c_attn", "c_proj", "q_attn", "c_fc"]),
    ("openai-gpt", &["c_attn", "c_proj", "c_fc"]),
    ("clvp_decoder", &["mlp.c_fc", "mlp.c_proj"]),
];

/// Last parts of the names of `nn.Embedding` modules in transformers'
/// models.
const EMBEDDING_MODULES: &[&str] = &[
    "embed_tokens",
    "wte",
    "wpe",
    "word_embeddings",
    "position_embeddings",
    "token_type_embeddings",
    "embed_in",
    "embed_positions",
    "tok_embeddings",
    "shared",
];

/// The kind of layer `module` (its name in the base model) is, for a base
/// of `model_type`; `None` when the model type is not known and the name
/// does not tell.
pub(crate) fn layer_kind(model_type: Option<&str>, module: &str) -> Option<LayerKind> {
    let last = module.rsplit('.').next().unwrap_or(module);
    if EMBEDDING_MODULES.contains(&last) {
        return Some(LayerKind::Embedding);
    }
    let model_type = model_type?;
    let conv = CONV1D_MODELS
        .iter()
        .find(|(t, _)| *t == model_type)
        .is_some_and(|(_, mods)| mods.iter().any(|m| module == *m || module.ends_with(&format!(".{m}"))));
    Some(if conv { LayerKind::Conv1D } else { LayerKind::Linear })
}

/// What the adapter does to one tensor of the base model.
#[derive(Clone, Debug)]
pub(crate) enum Change {
    /// `W + scaling * delta` for module `module`, with the factors `a`
    /// (`lora_A`) and `b` (`lora_B`), tensor indices into the adapter's
    /// checkpoint; `embedding` when they were stored as `lora_embedding_*`.
    /// `W` is the base's tensor, or the adapter's `base_layer` copy of it
    /// when PEFT saved one (`save_embedding_layers`, as for a targeted
    /// embedding).
    LowRank {
        module: String,
        a: usize,
        b: usize,
        rank: u64,
        scaling: f64,
        embedding: bool,
        base_layer: Option<usize>,
    },
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
    /// `fan_in_fan_out` as the config says (PEFT decides by layer type).
    pub fan_in_fan_out: bool,
    /// Base tensor name -> change, in the adapter file's order.
    pub changes: Vec<(String, Change)>,
    /// What the config holds that the user should know (a variant merged
    /// as plain LoRA, a key chatvec does not know).
    pub notes: Vec<String>,
}

impl Adapter {
    /// Opens the adapter in `dir`.
    pub(crate) fn open(dir: &Path) -> Result<Adapter> {
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
        let config = LoraConfig::parse(&text, &config_path)?;
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
        Ok(Adapter {
            ckpt,
            base_model: config.base_model,
            use_rslora: config.use_rslora,
            fan_in_fan_out: config.fan_in_fan_out,
            changes,
            notes: config.notes,
        })
    }

    /// The adapter's directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.ckpt.dir
    }

    /// The weight file.
    pub(crate) fn weights_path(&self) -> PathBuf {
        self.ckpt.shards[0].path.clone()
    }
}

/// The checked config.
pub(crate) struct LoraConfig {
    r: u64,
    alpha: f64,
    use_rslora: bool,
    fan_in_fan_out: bool,
    rank_pattern: Patterns<u64>,
    alpha_pattern: Patterns<f64>,
    base_model: Option<String>,
    notes: Vec<String>,
}

impl LoraConfig {
    /// The config in an adapter_config.json's bytes, `file` naming it in
    /// errors: the JSON, its checks, the pattern maps compiled.
    pub(crate) fn parse(text: &[u8], file: &Path) -> Result<LoraConfig> {
        // serde_json keeps the file's key order (`preserve_order`), which
        // decides the pattern maps' first match.
        let doc: serde_json::Value = serde_json::from_slice(text)
            .map_err(|e| Error::bad_file(file, format!("invalid adapter config: {e}")))?;
        LoraConfig::check(&doc, file)
    }

    fn check(doc: &serde_json::Value, file: &Path) -> Result<LoraConfig> {
        let raw: RawConfig = serde_json::from_value(doc.clone())
            .map_err(|e| Error::bad_file(file, format!("invalid adapter config: {e}")))?;
        let refuse = |what: &str| {
            Err(Error::bad_file(file, format!("{what}; chatvec merges plain LoRA adapters only"))
                .with_hint("merge it with peft's merge_and_unload() instead"))
        };
        match raw.peft_type.as_deref() {
            Some(t) if t.eq_ignore_ascii_case("lora") => {}
            Some(t) => return refuse(&format!("peft_type is {t}, not LORA")),
            None => return Err(Error::bad_file(file, "has no peft_type; expected \"LORA\"")),
        }
        let on = |k: &str| truthy(doc.get(k));
        // PEFT refuses to merge these itself.
        if on("alora_invocation_tokens") {
            return Err(Error::bad_file(
                file,
                "alora_invocation_tokens is set: an aLoRA adapter, which PEFT refuses to merge (\"aLoRA does not support merging\"): it acts only after its invocation tokens",
            ));
        }
        if on("arrow_config") {
            return Err(Error::bad_file(
                file,
                "arrow_config is set: an Arrow router over several adapters, which PEFT refuses to merge",
            ));
        }
        for (key, what) in [
            ("use_dora", "DoRA, which rescales each row by a learned magnitude"),
            ("lora_bias", "a LoRA bias, which the adapter adds of its own"),
            ("use_bdlora", "BD-LoRA, whose factors are block-diagonal"),
            ("kasa_config", "KaSA, which first truncates the base weight's singular values"),
            ("use_qalora", "QALoRA, for GPTQ-quantized bases"),
            ("target_parameters", "LoRA on raw parameters such as MoE experts"),
            ("layer_replication", "layer replication (the adapted model has more layers than the base)"),
            ("trainable_token_indices", "trainable tokens, which replace embedding rows"),
        ] {
            if on(key) {
                return refuse(&format!("{key} is set: {what}"));
            }
        }
        // Initialisations PEFT runs again on the base when it loads the
        // adapter (PiSSA and OLoRA subtract the initial factors from it).
        if let Some(init) = doc.get("init_lora_weights").and_then(|v| v.as_str()) {
            let lower = init.to_ascii_lowercase();
            if ["pissa", "olora", "corda", "loftq"].iter().any(|p| lower.starts_with(p)) {
                return refuse(&format!(
                    "init_lora_weights is \"{init}\": PEFT changes the base weights again when it loads such an adapter"
                ));
            }
        }
        let mut notes = Vec::new();
        for (key, what) in [("velora_config", "VeLoRA"), ("monteclora_config", "MonteCLoRA")] {
            if on(key) {
                notes.push(format!("{key}: a {what} adapter merges as plain LoRA, as PEFT merges it"));
            }
        }
        if let Some(obj) = doc.as_object() {
            let unknown: Vec<&str> =
                obj.keys().map(String::as_str).filter(|k| !KNOWN_KEYS.contains(k)).collect();
            if !unknown.is_empty() {
                notes.push(format!(
                    "{} has key(s) chatvec does not know: {}; if one changes how the adapter merges, the result differs from PEFT's",
                    file.display(),
                    unknown.join(", ")
                ));
            }
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
        let rank_pattern = Patterns::read(
            file,
            "rank_pattern",
            doc.get("rank_pattern"),
            |v| v.as_u64().filter(|r| *r > 0),
            "a positive integer rank",
        )?;
        let alpha_pattern = Patterns::read(
            file,
            "alpha_pattern",
            doc.get("alpha_pattern"),
            |v| v.as_f64().filter(|a| a.is_finite()),
            "a finite number",
        )?;
        if rank_pattern.keys.len() + alpha_pattern.keys.len() > MAX_PATTERN_KEYS {
            return Err(Error::bad_file(
                file,
                format!("rank_pattern and alpha_pattern have more than {MAX_PATTERN_KEYS} keys together"),
            ));
        }
        Ok(LoraConfig {
            r,
            alpha,
            use_rslora: raw.use_rslora,
            fan_in_fan_out: raw.fan_in_fan_out,
            rank_pattern,
            alpha_pattern,
            base_model: raw.base_model_name_or_path.filter(|s| !s.is_empty()),
            notes,
        })
    }

    /// `(r, alpha)` of module `module` (its name in the base model), each
    /// looked up in its own map, as PEFT does; `work` counts comparisons.
    pub(crate) fn rank_alpha(&self, module: &str, work: &mut u64) -> (u64, f64) {
        (
            self.rank_pattern.find(module, work).map_or(self.r, |p| p.1),
            self.alpha_pattern.find(module, work).map_or(self.alpha, |p| p.1),
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
    let bad = |why: &str| Err(Error::bad_tensor(file, name, why));
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
            return Err(Error::bad_tensor(
                file,
                &t.name,
                format!("is {}; adapter tensors must be BF16, F16 or F32", t.dtype),
            ));
        }
        match classify(&t.name, file)? {
            Key::Whole(target) => changes.push((target, Change::Replace(i))),
            Key::BaseLayer(target) => {
                if base_layers.insert(target.clone(), i).is_some() {
                    return Err(Error::format(
                        file,
                        FormatError::Adapter(format!("'{target}' is saved twice as a base layer")),
                    ));
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
                        FormatError::Adapter(format!(
                            "module '{module}' has both linear and embedding LoRA factors"
                        )),
                    ));
                }
                match factor {
                    Factor::A => slot.1 = Some(i),
                    Factor::B => slot.2 = Some(i),
                }
            }
        }
    }
    let modules = factors.len();
    let mut work = 0u64;
    for (module, a, b, embedding) in factors {
        let (Some(a), Some(b)) = (a, b) else {
            let missing = if a.is_none() { "lora_A" } else { "lora_B" };
            return Err(Error::format(
                file,
                FormatError::Adapter(format!("module '{module}' has no {missing} factor")),
            ));
        };
        let (ta, tb) = (&ck.tensors[a], &ck.tensors[b]);
        if ta.shape.len() != 2 || tb.shape.len() != 2 || ta.shape[0] != tb.shape[1] {
            return Err(Error::format(
                file,
                FormatError::Adapter(format!(
                    "module '{module}': lora_A {:?} and lora_B {:?} are not an r x in and an out x r matrix",
                    ta.shape, tb.shape
                )),
            ));
        }
        let rank = ta.shape[0];
        let (r, alpha) = config.rank_alpha(&module, &mut work);
        if work > MAX_PATTERN_WORK {
            return Err(Error::bad_file(
                file,
                format!(
                    "matching {modules} modules against rank_pattern and alpha_pattern costs over {MAX_PATTERN_WORK} comparisons; chatvec refuses such a config"
                ),
            ));
        }
        if rank != r {
            return Err(Error::format(
                file,
                FormatError::Adapter(format!(
                    "module '{module}': the factors have rank {rank}, but {ADAPTER_CONFIG} gives it r = {r}"
                )),
            ));
        }
        let scaling = if config.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        let target = format!("{module}.weight");
        let base_layer = base_layers.remove(&target);
        changes.push((target, Change::LowRank { module, a, b, rank, scaling, embedding, base_layer }));
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
                FormatError::Adapter(format!(
                    "the adapter changes '{name}' twice (a low-rank update and a whole tensor)"
                )),
            ));
        }
    }
    if changes.is_empty() {
        return Err(Error::format(file, FormatError::Adapter("holds no tensors".into())));
    }
    Ok(changes)
}
