//! Recipes: a merge written down as data, read from a chatvec TOML recipe
//! or a mergekit YAML config (`.yml` / `.yaml`).
//!
//! Both use mergekit's keys - `merge_method`, `base_model`, `models` (each
//! `{model, parameters}`), `parameters`, `dtype`, `out_dtype`,
//! `tokenizer_source` (`base`, `union` or a model) - so a config moves between the
//! tools unchanged. A
//! TOML recipe may also say `name`, `description`, `seed` (for DARE/DELLA
//! masks), `shard_size`, `allow_mismatch`, and use the `chat_vector` method:
//!
//! ```toml
//! merge_method = "chat_vector"
//! base_model = "swallow-8b"
//! vector = "llama3-instruct"      # a vector alias or directory; or chat + pretrained
//! [parameters]
//! scale = 1.0                     # or rules: [{ pattern = "mlp", value = 0.5 }, { value = 1.0 }]
//! embeddings = "align"
//! exclude = ["^lm_head"]
//! ```
//!
//! Unknown or unsupported keys are errors naming the key; nothing is
//! silently ignored. `dtype` is mergekit's compute dtype; chatvec always
//! computes in f32, so it only sets the output dtype (unless `out_dtype`).
//!
//! This room turns text into checked specs for the job room; it imports the
//! vocabulary of merges, plans and SFT options, and runs nothing.

pub(crate) mod stages;

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::eval::EvalSpec;
use crate::hash::sha256_hex;
use crate::json::Walk;
use crate::json::{read_capped, toml_to_json};
use crate::merge::methods::Method;
use crate::merge::params::{Filter, Scalar, Setting};
use crate::model::dtype::FloatType;
use crate::model::experts::ExpertLayout;
use crate::output::manifest::RecipeRecord;
use crate::params::apply::{ApplyParams, FlagPositions, default_shard_size};
use crate::params::select::Scale;
use crate::sft::SftOptions;
use crate::units::parse_size;

const MAX_RECIPE_BYTES: u64 = 4 << 20;

/// Which syntax a recipe was written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Syntax {
    Toml,
    Mergekit,
}

/// A merge method recipe.
#[derive(Clone, Debug)]
pub(crate) struct MergeRecipe {
    pub method: Method,
    pub base: Option<String>,
    /// Each model and its own parameter settings (empty with `slices`).
    pub models: Vec<(String, Vec<(String, Setting)>)>,
    pub global: Vec<(String, Setting)>,
    /// mergekit's `slices`: the output's layers, slice by slice.
    pub slices: Vec<SliceRecipe>,
}

/// One `slices` entry: the same number of layers from each source, merged
/// into that many consecutive output layers.
#[derive(Clone, Debug)]
pub(crate) struct SliceRecipe {
    pub sources: Vec<SliceSource>,
    /// The slice's own parameters (over the global ones).
    pub parameters: Vec<(String, Setting)>,
    /// The slice's base model (over the global `base_model`).
    pub base: Option<String>,
}

/// A source of a slice: a model's layers `layers.0..layers.1`.
#[derive(Clone, Debug)]
pub(crate) struct SliceSource {
    pub model: String,
    pub layers: (u64, u64),
    pub parameters: Vec<(String, Setting)>,
}

#[derive(Clone, Debug)]
pub(crate) enum RecipeBody {
    /// `chat_vector`: `apply` as data (the recipe-wide `out_dtype`,
    /// `shard_size` and `allow_mismatch` are the `Recipe`'s).
    ChatVector(Box<ApplyParams>),
    Merge(MergeRecipe),
}

/// A merge written down as data: a chatvec TOML recipe or a mergekit YAML
/// config, parsed and checked, with the file's text and sha256 for the
/// manifest.
#[derive(Clone, Debug)]
pub struct Recipe {
    pub(crate) path: PathBuf,
    pub(crate) syntax: Syntax,
    /// The file's text, as recorded in the manifest.
    pub(crate) text: String,
    pub(crate) sha256: String,
    pub(crate) name: Option<String>,
    pub(crate) description: Option<String>,
    pub(crate) body: RecipeBody,
    pub(crate) out_dtype: Option<FloatType>,
    pub(crate) shard_size: u64,
    pub(crate) seed: u64,
    pub(crate) allow_mismatch: bool,
    /// `tokenizer_source` (or the `tokenizer:` block's `source`).
    pub(crate) vocab: VocabChoice,
    /// The `tokenizer:` block's per-token embedding sources.
    pub(crate) tokens: Vec<TokenRule>,
    /// The `tokenizer:` block's `pad_to_multiple_of`: the vocabulary
    /// matrices' rows rounded up to a multiple of it.
    pub(crate) pad_to_multiple_of: Option<u64>,
    /// mergekit's `chat_template`: `auto`, a built-in name, or Jinja text.
    pub(crate) chat_template: Option<String>,
    /// The dtype a `model+lora` input's merged weights are rounded to
    /// (mergekit's --lora-merge-dtype); else each weight's own.
    pub(crate) lora_merge_dtype: Option<FloatType>,
    /// The output's mixture-of-experts layout (`merge --expert-layout`;
    /// `None`: the reference model's).
    pub(crate) expert_layout: Option<ExpertLayout>,
    /// The `[sft]` section (`chatvec run`), paths made relative to the
    /// recipe's directory.
    pub(crate) sft: Option<SftOptions>,
    /// `[sweep]`: the candidate scales (`chatvec run`).
    pub(crate) sweep: Option<Vec<Scale>>,
    /// `[eval]`: how the candidates are scored (models left empty).
    pub(crate) eval: Option<EvalSpec>,
}

/// The recipes shipped in `recipes/`, by name.
pub(crate) const SHIPPED: &[(&str, &str)] = &[
    ("llama3-swallow-8b-chat-vector", include_str!("../../recipes/llama3-swallow-8b-chat-vector.toml")),
    ("llama3-swallow-70b-chat-vector", include_str!("../../recipes/llama3-swallow-70b-chat-vector.toml")),
    ("elyza-llama2-70b-chat-vector", include_str!("../../recipes/elyza-llama2-70b-chat-vector.toml")),
    ("swallow-7b-chat-vector", include_str!("../../recipes/swallow-7b-chat-vector.toml")),
    ("llama3-swallow-8b-ties", include_str!("../../recipes/llama3-swallow-8b-ties.toml")),
];

impl Recipe {
    /// A recipe file (`.toml` or mergekit `.yml`/`.yaml`), or else the
    /// shipped recipe of that name.
    pub fn load(name_or_path: &str) -> Result<Recipe> {
        let p = Path::new(name_or_path);
        if p.exists() {
            let bytes = read_capped(p, MAX_RECIPE_BYTES)?;
            let text = String::from_utf8(bytes).map_err(|_| Error::bad_file(p, "is not UTF-8 text"))?;
            return parse_recipe(&text, p);
        }
        match SHIPPED.iter().find(|(n, _)| *n == name_or_path) {
            Some((n, text)) => parse_recipe(text, Path::new(&format!("recipes/{n}.toml"))),
            None => {
                let names: Vec<&str> = SHIPPED.iter().map(|(n, _)| *n).collect();
                Err(Error::Usage(format!(
                    "recipe '{name_or_path}' is neither a file nor a shipped recipe ({})",
                    names.join(", ")
                ))
                .with_hint("`chatvec list` shows the shipped recipes"))
            }
        }
    }

    /// The file it was read from (`recipes/NAME.toml` for a shipped one).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its `[sft]` section: how `chatvec run` trains the merged model.
    pub fn sft(&self) -> Option<&SftOptions> {
        self.sft.as_ref()
    }

    /// Its `[sweep]` scales: the candidates `chatvec run` writes.
    pub fn sweep(&self) -> Option<&[Scale]> {
        self.sweep.as_deref()
    }

    /// Its `[eval]` section: how `chatvec run` scores the candidates (the
    /// models are left for the caller to fill in).
    pub fn eval(&self) -> Option<&EvalSpec> {
        self.eval.as_ref()
    }

    /// Writes shards of at most `bytes` data bytes, whatever the recipe
    /// says (`merge --shard-size`).
    pub fn set_shard_size(&mut self, bytes: u64) {
        self.shard_size = bytes;
    }

    /// Rounds `model+lora` inputs' merged weights to `ty`
    /// (`merge --lora-merge-dtype`).
    pub fn set_lora_merge_dtype(&mut self, ty: FloatType) {
        self.lora_merge_dtype = Some(ty);
    }

    /// Writes a mixture-of-experts output in `layout` (`merge
    /// --expert-layout`) instead of the reference model's.
    pub fn set_expert_layout(&mut self, layout: ExpertLayout) {
        self.expert_layout = Some(layout);
    }

    /// Turns config.json architecture differences into warnings
    /// (`merge --allow-mismatch`).
    pub fn allow_mismatch(&mut self) {
        self.allow_mismatch = true;
    }

    /// What the manifest keeps of this recipe.
    pub(crate) fn record(&self) -> RecipeRecord {
        RecipeRecord {
            file: self.path.display().to_string(),
            syntax: match self.syntax {
                Syntax::Toml => "toml",
                Syntax::Mergekit => "mergekit",
            },
            sha256: self.sha256.clone(),
            text: self.text.clone(),
        }
    }
}

const MERGEKIT_KEYS: &[&str] = &[
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
];
const TOML_ONLY_KEYS: &[&str] = &[
    "name",
    "description",
    "seed",
    "shard_size",
    "allow_mismatch",
    "vector",
    "chat",
    "pretrained",
    "vectors",
    "sft",
    "sweep",
    "eval",
];

const CHAT_VECTOR_PARAMS: &[&str] =
    &["scale", "include", "exclude", "embeddings", "keep_base_template", "raw_delta"];

/// A recipe as its file types it; every key chatvec knows, nothing else.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    merge_method: String,
    #[serde(default)]
    base_model: Option<String>,
    /// Each a reference or `{model, parameters}` (`RawModelEntry`).
    #[serde(default)]
    models: Option<Vec<Value>>,
    #[serde(default)]
    slices: Option<Vec<Value>>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(default)]
    dtype: Option<String>,
    #[serde(default)]
    out_dtype: Option<String>,
    #[serde(default)]
    tokenizer_source: Option<Value>,
    #[serde(default)]
    tokenizer: Option<Value>,
    #[serde(default)]
    chat_template: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    seed: Option<u64>,
    /// Bytes, or a size like `"5GB"`.
    #[serde(default)]
    shard_size: Option<Value>,
    #[serde(default)]
    allow_mismatch: Option<bool>,
    #[serde(default)]
    vector: Option<String>,
    #[serde(default)]
    chat: Option<String>,
    #[serde(default)]
    pretrained: Option<String>,
    /// chat_vector: several vectors added in one pass, each
    /// `{vector, scale}` or `{chat, pretrained, scale}`.
    #[serde(default)]
    vectors: Option<Vec<Value>>,
    #[serde(default)]
    sft: Option<SftOptions>,
    #[serde(default)]
    sweep: Option<RawSweep>,
    #[serde(default)]
    eval: Option<RawEval>,
}

/// `[sweep]`: the candidate scales of a chat_vector recipe.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSweep {
    /// Each a number or a gradient (a list of numbers).
    scales: Vec<Value>,
}

/// `[eval]`: how `chatvec run` scores the candidates (or the merged model).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEval {
    #[serde(default)]
    data: Option<PathBuf>,
    #[serde(default)]
    prompts: Option<PathBuf>,
    #[serde(default)]
    max_new_tokens: Option<u64>,
    #[serde(default)]
    samples: Option<usize>,
    #[serde(default)]
    python: Option<PathBuf>,
    #[serde(default)]
    engine: Option<String>,
    #[serde(default)]
    lm_data: Option<PathBuf>,
    #[serde(default)]
    lm_base: Option<String>,
    #[serde(default)]
    lm_margin: Option<f64>,
    /// Judged benchmarks, as `--bench` takes them.
    #[serde(default)]
    bench: Vec<String>,
    /// The benchmark that ranks (`--primary`).
    #[serde(default)]
    primary: Option<String>,
    #[serde(default)]
    judge_url: Option<String>,
    #[serde(default)]
    judge_model: Option<String>,
    #[serde(default)]
    judge_key_env: Option<String>,
    #[serde(default)]
    judge_concurrency: Option<usize>,
    #[serde(default)]
    bench_samples: Option<usize>,
    #[serde(default)]
    bench_max_new_tokens: Option<u64>,
    /// lm_eval tasks, as `--harness` takes them.
    #[serde(default)]
    harness: Vec<String>,
    #[serde(default)]
    harness_include: Option<PathBuf>,
    #[serde(default)]
    harness_limit: Option<u64>,
    #[serde(default)]
    harness_fewshot: Option<u64>,
    #[serde(default)]
    harness_chat_template: Option<bool>,
    #[serde(default)]
    batch_size: Option<usize>,
}

/// A `models` entry written as `{model, parameters}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModelEntry {
    model: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

/// A `slices` entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlice {
    sources: Vec<RawSliceSource>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(default)]
    base_model: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSliceSource {
    model: String,
    layer_range: [u64; 2],
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

/// `chat_vector`'s parameters.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawChatVectorParams {
    #[serde(default)]
    scale: Option<Value>,
    #[serde(default)]
    include: Option<Vec<String>>,
    #[serde(default)]
    exclude: Option<Vec<String>>,
    #[serde(default)]
    embeddings: Option<String>,
    #[serde(default)]
    keep_base_template: Option<bool>,
    #[serde(default)]
    raw_delta: Option<bool>,
}

/// Parses recipe text; `path` decides the syntax (`.yml`/`.yaml` is
/// mergekit) and names the file in errors.
pub(crate) fn parse_recipe(text: &str, path: &Path) -> Result<Recipe> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let (syntax, mut doc) = match ext.as_str() {
        "yml" | "yaml" => {
            // Through serde_yaml_ng's own Value, which refuses a key given
            // twice (a serde_json::Value would keep the last silently, where
            // TOML and JSON recipes refuse it).
            let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| {
                let msg = e.to_string();
                if msg.contains("more than one document") {
                    Error::bad_file(
                        path,
                        "holds several YAML documents (mergekit-multimerge's form): run it as a file with `chatvec merge`, which runs each merge in order",
                    )
                } else {
                    Error::bad_file(path, msg)
                }
            })?;
            crate::json::refuse_non_finite(&yaml, path, &mut |v| match v {
                serde_yaml_ng::Value::Number(n) => Walk::Number(n.as_f64().unwrap_or(0.0)),
                serde_yaml_ng::Value::Mapping(m) => Walk::Map(
                    m.iter()
                        .map(|(k, v)| (k.as_str().map_or_else(|| format!("{k:?}"), str::to_string), v))
                        .collect(),
                ),
                serde_yaml_ng::Value::Sequence(a) => Walk::List(a.iter().collect()),
                serde_yaml_ng::Value::Tagged(t) => Walk::List(vec![&t.value]),
                _ => Walk::Other,
            })?;
            let v = serde_json::to_value(yaml).map_err(|e| Error::bad_file(path, e.to_string()))?;
            (Syntax::Mergekit, v)
        }
        "toml" => (Syntax::Toml, toml_to_json(text, path)?),
        _ => {
            return Err(Error::bad_file(
                path,
                "a recipe is a .toml file (chatvec) or a .yml/.yaml file (mergekit config)",
            ));
        }
    };
    let err = |msg: &str| Error::bad_file(path, msg.to_string());
    let Value::Object(top) = &mut doc else {
        return Err(err("expected a mapping of keys at the top level"));
    };
    lift_modules(top).map_err(|m| err(&m))?;
    let Value::Object(root) = &doc else {
        return Err(err("expected a mapping of keys at the top level"));
    };
    // The friendly checks first: a key chatvec does not support, or one of
    // chatvec's own in a mergekit file, is named with what to do instead.
    check_keys(root, syntax).map_err(|m| err(&m))?;
    if !root.contains_key("merge_method") {
        return Err(err("merge_method: required"));
    }
    if let Some(Value::Array(list)) = root.get("models") {
        check_models(list).map_err(|m| err(&m))?;
    }
    if let Some(Value::String(b)) = root.get("base_model") {
        lora_reference("base_model", b).map_err(|m| err(&m))?;
    }
    if let Some(Value::Object(section)) = root.get("sft") {
        for k in ["model", "output"] {
            if section.contains_key(k) {
                return Err(err(&format!(
                    "sft.{k}: `chatvec run` sets it (the merged model, the run directory)"
                )));
            }
        }
    }
    let raw: RawRecipe = typed(doc.clone(), "").map_err(|m| err(&m))?;
    let r = Reader { file: path };
    let method_name = nonempty(Some(raw.merge_method.clone()), "merge_method").map_err(|m| err(&m))?;
    let body = match method_name.as_deref() {
        Some("chat_vector") => {
            if syntax == Syntax::Mergekit {
                return Err(err("merge_method: chat_vector is a chatvec method; write it as a .toml recipe"));
            }
            RecipeBody::ChatVector(Box::new(r.chat_vector(&raw)?))
        }
        Some(name) => {
            let method = Method::from_name(name).map_err(|e| r.wrap(e, "merge_method: "))?;
            for (k, v) in [("vector", &raw.vector), ("chat", &raw.chat), ("pretrained", &raw.pretrained)] {
                if v.is_some() {
                    return Err(err(&format!("{k}: only for merge_method = \"chat_vector\"")));
                }
            }
            if raw.vectors.is_some() {
                return Err(err("vectors: only for merge_method = \"chat_vector\""));
            }
            RecipeBody::Merge(r.merge(method, &raw)?)
        }
        None => return Err(err("merge_method: required")),
    };
    let dtype = |k: &str, v: &Option<String>| -> Result<Option<FloatType>> {
        match v {
            None => Ok(None),
            Some(s) => FloatType::parse_cli(s)
                .map(Some)
                .ok_or_else(|| err(&format!("{k}: '{s}' is not bfloat16, float16 or float32"))),
        }
    };
    let out_dtype = match dtype("out_dtype", &raw.out_dtype)? {
        Some(t) => Some(t),
        None => dtype("dtype", &raw.dtype)?,
    };
    let shard_size = match &raw.shard_size {
        None => default_shard_size(),
        Some(Value::String(s)) => parse_size(s).map_err(|e| err(&format!("shard_size: {e}")))?,
        Some(Value::Number(n)) => n
            .as_u64()
            .filter(|&v| v > 0)
            .ok_or_else(|| err(&format!("shard_size: expected bytes, not {n}")))?,
        Some(v) => return Err(err(&format!("shard_size: expected a size like \"5GB\", not {v}"))),
    };
    let (vocab, tokens, pad_to_multiple_of) = vocab_choice(&raw).map_err(|m| err(&m))?;
    let union = vocab != VocabChoice::Base || !tokens.is_empty() || pad_to_multiple_of.is_some();
    if raw.chat_template.is_some() && matches!(body, RecipeBody::ChatVector(_)) {
        return Err(err(
            "chat_template: for merge methods; chat_vector takes the chat model's template (keep_base_template keeps the base's)",
        ));
    }
    if let RecipeBody::ChatVector(c) = &body {
        let named = std::iter::once(("base_model", &c.base))
            .chain(c.vector.iter().map(|v| ("vector", v)))
            .chain(c.chat.iter().map(|v| ("chat", v)))
            .chain(c.pretrained.iter().map(|v| ("pretrained", v)));
        if let Some((key, name)) = named.into_iter().find(|(_, n)| split_lora(n).1.is_some()) {
            let (model, lora) = split_lora(name);
            return Err(err(&format!(
                "{key} '{name}': MODEL+LORA references are for merge methods; a chat_vector recipe names whole models (merge the adapter first: `chatvec apply --base {model} --lora {} -o MERGED`, then name MERGED)",
                lora.unwrap_or_default()
            )));
        }
    }
    if union && matches!(body, RecipeBody::ChatVector(_)) {
        return Err(err(
            "tokenizer_source (union or a model) and the tokenizer: block are for merge methods; chat_vector keeps the base's vocabulary",
        ));
    }
    if let RecipeBody::Merge(m) = &body {
        if union && !m.slices.is_empty() {
            return Err(err(
                "tokenizer_source (union or a model) and the tokenizer: block with slices are not supported by chatvec yet: slices keep the first slice's vocabulary",
            ));
        }
        let merged = |s: &str| m.base.as_deref() == Some(s) || m.models.iter().any(|(r, _)| r == s);
        if let VocabChoice::Model(s) = &vocab
            && !merged(s)
        {
            return Err(err(&format!(
                "tokenizer_source: '{s}' is not one of the merge's models (base_model or models); chatvec takes the vocabulary from a model it merges"
            )));
        }
        for t in &tokens {
            if let TokenSource::Model(s) | TokenSource::ModelToken { model: s, .. } = &t.source
                && !merged(s)
            {
                return Err(err(&format!(
                    "tokenizer.tokens.{:?}: '{s}' is not one of the merge's models (base_model or models)",
                    t.token
                )));
            }
        }
    }
    let sft = match (&raw.sft, root.get("sft")) {
        (Some(opts), Some(Value::Object(section))) => {
            Some(sft_section(opts, section, path).map_err(|m| err(&m))?)
        }
        _ => None,
    };
    let dir = path.parent().unwrap_or(Path::new(""));
    let near = |p: &PathBuf| if p.is_relative() { dir.join(p) } else { p.clone() };
    let sweep = match &raw.sweep {
        None => None,
        Some(sw) => {
            if !matches!(body, RecipeBody::ChatVector(_)) {
                return Err(err("sweep: only for merge_method = \"chat_vector\" (it sweeps the scale)"));
            }
            if raw.eval.is_none() {
                return Err(err("sweep: needs an [eval] section to choose among the candidates"));
            }
            if sw.scales.is_empty() {
                return Err(err("sweep.scales: give at least one scale"));
            }
            let scales = sw
                .scales
                .iter()
                .enumerate()
                .map(|(i, v)| scale_rules(v, &format!("sweep.scales[{i}]")).map(|(s, _)| s))
                .collect::<Result<Vec<_>>>()
                .map_err(|e| err(&e.to_string()))?;
            Some(scales)
        }
    };
    // What [eval] leaves out takes `EvalSpec`'s defaults.
    let eval_defaults = EvalSpec::new(Vec::new());
    let eval = raw.eval.as_ref().map(|e| EvalSpec {
        data: e.data.as_ref().map(near),
        prompts: e.prompts.as_ref().map(near),
        max_new_tokens: e.max_new_tokens.unwrap_or(eval_defaults.max_new_tokens),
        samples: e.samples.unwrap_or(eval_defaults.samples),
        python: e.python.as_ref().map(|p| if p.components().count() > 1 { near(p) } else { p.clone() }),
        engine: e.engine.clone().unwrap_or_else(|| eval_defaults.engine.clone()),
        chat_template: None,
        fresh: false,
        lm_data: e.lm_data.as_ref().map(near),
        lm_base: e.lm_base.clone(),
        lm_margin: e.lm_margin.unwrap_or(eval_defaults.lm_margin),
        // A benchmark directory (or NAME=DIR) relative to the recipe.
        bench: e
            .bench
            .iter()
            .map(|b| match b.split_once('=') {
                Some((n, d)) => format!("{n}={}", near(&PathBuf::from(d)).display()),
                None if b.contains('/') || b.starts_with('.') => {
                    near(&PathBuf::from(b)).display().to_string()
                }
                None => b.clone(),
            })
            .collect(),
        primary: e.primary.clone(),
        judge_url: e.judge_url.clone(),
        judge_model: e.judge_model.clone(),
        judge_key_env: e.judge_key_env.clone().unwrap_or_else(|| eval_defaults.judge_key_env.clone()),
        judge_concurrency: e.judge_concurrency.unwrap_or(eval_defaults.judge_concurrency),
        bench_samples: e.bench_samples.unwrap_or(eval_defaults.bench_samples),
        bench_max_new_tokens: e.bench_max_new_tokens,
        harness: e.harness.clone(),
        harness_include: e.harness_include.as_ref().map(near),
        harness_limit: e.harness_limit,
        harness_fewshot: e.harness_fewshot,
        harness_chat_template: e.harness_chat_template.unwrap_or(false),
        batch_size: e.batch_size.unwrap_or(eval_defaults.batch_size),
        ..EvalSpec::new(Vec::new())
    });
    Ok(Recipe {
        path: path.to_path_buf(),
        syntax,
        text: text.to_string(),
        sha256: sha256_hex(text.as_bytes()),
        name: nonempty(raw.name.clone(), "name").map_err(|m| err(&m))?,
        description: raw.description.clone(),
        body,
        out_dtype,
        shard_size,
        seed: raw.seed.unwrap_or(0),
        allow_mismatch: raw.allow_mismatch.unwrap_or(false),
        vocab,
        tokens,
        chat_template: nonempty(raw.chat_template.clone(), "chat_template").map_err(|m| err(&m))?,
        lora_merge_dtype: None,
        expert_layout: None,
        pad_to_multiple_of,
        sft,
        sweep,
        eval,
    })
}

/// The output vocabulary a merge asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum VocabChoice {
    /// The base's (or the first model's) tokenizer; other models' rows
    /// matched to it by token.
    Base,
    /// The base's tokens, then every other model's.
    Union,
    /// This model's tokenizer (one of the merge's models).
    Model(String),
}

/// Where one output token's embedding comes from (the `tokenizer:` block's
/// `tokens:`), as mergekit's `TokenEmbeddingConfig`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TokenRule {
    pub token: String,
    pub source: TokenSource,
    /// Every model takes this embedding, even one that has the token.
    pub force: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum TokenSource {
    /// The same token's row in this model.
    Model(String),
    /// Row `id` (or the row of `token`) of this model.
    ModelToken { model: String, token: Option<String>, id: Option<u64> },
    /// A zero row.
    Zero,
}

/// The `tokens:` map: `TOKEN: {source: MODEL | {kind: model_token, model,
/// token | token_id} | {kind: zero}, force: bool}`.
fn token_rules(v: &Value) -> std::result::Result<Vec<TokenRule>, String> {
    let Value::Object(map) = v else {
        return Err(format!("tokenizer.tokens: expected a map of token -> {{source, force}}, not {v}"));
    };
    let mut out = Vec::new();
    for (token, cfg) in map {
        let at = format!("tokenizer.tokens.{token:?}");
        let Value::Object(c) = cfg else { return Err(format!("{at}: expected {{source: ..., force: ...}}")) };
        for k in c.keys() {
            if k != "source" && k != "force" {
                return Err(format!("{at}.{k}: unknown key (source, force)"));
            }
        }
        let force = match c.get("force") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(x) => return Err(format!("{at}.force: expected true or false, not {x}")),
        };
        let source = match c.get("source") {
            Some(Value::String(s)) if !s.trim().is_empty() => TokenSource::Model(s.clone()),
            Some(Value::Object(o)) => match o.get("kind").and_then(Value::as_str) {
                Some("zero") if o.len() == 1 => TokenSource::Zero,
                Some("model_token") => {
                    for k in o.keys() {
                        if !["kind", "model", "token", "token_id"].contains(&k.as_str()) {
                            return Err(format!(
                                "{at}.source.{k}: unknown key (kind, model, token, token_id)"
                            ));
                        }
                    }
                    let model = o
                        .get("model")
                        .and_then(Value::as_str)
                        .ok_or_else(|| format!("{at}.source.model: a model_token source names its model"))?
                        .to_string();
                    let token = o.get("token").and_then(Value::as_str).map(str::to_string);
                    let id = o.get("token_id").and_then(Value::as_u64);
                    if token.is_some() == id.is_some() {
                        return Err(format!("{at}.source: give token or token_id (one of them)"));
                    }
                    TokenSource::ModelToken { model, token, id }
                }
                _ => {
                    return Err(format!(
                        "{at}.source: expected a model, {{kind: model_token, model, token | token_id}} or {{kind: zero}}"
                    ));
                }
            },
            _ => {
                return Err(format!(
                    "{at}.source: expected a model, {{kind: model_token, ...}} or {{kind: zero}}"
                ));
            }
        };
        out.push(TokenRule { token: token.clone(), source, force });
    }
    Ok(out)
}

/// `tokenizer_source: base | union | MODEL`, or the `tokenizer:` block's
/// `source` and `tokens` (mergekit's newer spelling; not both).
fn vocab_choice(raw: &RawRecipe) -> std::result::Result<(VocabChoice, Vec<TokenRule>, Option<u64>), String> {
    let mut tokens = Vec::new();
    let mut pad = None;
    let (value, key) = match (&raw.tokenizer_source, &raw.tokenizer) {
        (Some(_), Some(_)) => {
            return Err("give tokenizer_source or the tokenizer: block, not both".into());
        }
        (Some(v), None) => (Some(v.clone()), "tokenizer_source"),
        (None, Some(Value::Object(block))) => {
            for k in block.keys() {
                match k.as_str() {
                    "source" => {}
                    "tokens" => tokens = token_rules(&block["tokens"])?,
                    "pad_to_multiple_of" => match &block[k] {
                        Value::Null => {}
                        Value::Number(n) if n.as_u64().is_some_and(|m| (1..=1 << 20).contains(&m)) => {
                            pad = n.as_u64();
                        }
                        v => {
                            return Err(format!(
                                "tokenizer.pad_to_multiple_of: expected a whole number from 1 to 1048576, not {v}"
                            ));
                        }
                    },
                    other => {
                        return Err(format!(
                            "tokenizer.{other}: unknown key (mergekit's are source, tokens, pad_to_multiple_of)"
                        ));
                    }
                }
            }
            // mergekit's TokenizerConfig: the block's source is union
            // unless it says otherwise.
            (
                Some(block.get("source").cloned().unwrap_or_else(|| Value::String("union".into()))),
                "tokenizer.source",
            )
        }
        (None, Some(v)) => {
            return Err(format!("tokenizer: expected a block such as {{source: union}}, not {v}"));
        }
        (None, None) => (None, "tokenizer_source"),
    };
    let choice = match value {
        None => VocabChoice::Base,
        Some(Value::String(s)) if s == "base" => VocabChoice::Base,
        Some(Value::String(s)) if s == "union" => VocabChoice::Union,
        Some(Value::String(s)) if !s.trim().is_empty() => VocabChoice::Model(s),
        Some(v) => return Err(format!("{key}: expected base, union or one of the merge's models, not {v}")),
    };
    Ok((choice, tokens, pad))
}

/// Deserializes `v` into `T`, an error naming where (`models[1].model:
/// invalid type: integer, expected a string`), under `at`.
fn typed<T: serde::de::DeserializeOwned>(v: Value, at: &str) -> std::result::Result<T, String> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match (at.is_empty(), path.as_str()) {
            (true, ".") => inner.to_string(),
            (true, p) => format!("{p}: {inner}"),
            (false, ".") => format!("{at}: {inner}"),
            (false, p) => format!("{at}.{p}: {inner}"),
        }
    })
}

fn check_keys(root: &Map<String, Value>, syntax: Syntax) -> std::result::Result<(), String> {
    for k in root.keys() {
        let known = MERGEKIT_KEYS.contains(&k.as_str())
            || (syntax == Syntax::Toml && TOML_ONLY_KEYS.contains(&k.as_str()));
        if !known {
            let extra = if syntax == Syntax::Mergekit && TOML_ONLY_KEYS.contains(&k.as_str()) {
                " (it is a chatvec key: use a .toml recipe)"
            } else {
                ""
            };
            return Err(format!("unknown key '{k}'{extra}"));
        }
    }
    Ok(())
}

/// Each `models` entry is a reference or `{model, parameters}`.
fn check_models(list: &[Value]) -> std::result::Result<(), String> {
    for (i, item) in list.iter().enumerate() {
        let at = format!("models[{i}]");
        let m = match item {
            Value::String(_) => continue,
            Value::Object(m) => m,
            v => return Err(format!("{at}: expected {{model, parameters}}, not {v}")),
        };
        if let Some(k) = m.keys().find(|k| !matches!(k.as_str(), "model" | "parameters")) {
            return Err(format!("{at}: unknown key '{k}' (expected model, parameters)"));
        }
        if !m.contains_key("model") {
            return Err(format!("{at}.model: required"));
        }
    }
    for (i, item) in list.iter().enumerate() {
        let name = match item {
            Value::String(s) => Some(s.as_str()),
            Value::Object(m) => m.get("model").and_then(Value::as_str),
            _ => None,
        };
        if let Some(n) = name {
            lora_reference(&format!("models[{i}].model"), n)?;
        }
    }
    Ok(())
}

/// mergekit's `modules:` for a model of one module (mergekit names it
/// `default`): its `slices` or `models` are the merge's, and its
/// `parameters` come before the top level's, as mergekit reads them.
/// Several modules (a multimodal model's vision tower and text decoder,
/// each merged on its own) are refused with the reason.
fn lift_modules(root: &mut Map<String, Value>) -> std::result::Result<(), String> {
    let Some(modules) = root.remove("modules") else { return Ok(()) };
    let Value::Object(modules) = modules else {
        return Err(format!(
            "modules: expected a mapping of module names to {{slices or models, parameters}}, not {modules}"
        ));
    };
    if root.contains_key("models") || root.contains_key("slices") {
        return Err("modules: give modules, or models or slices at the top level, not both".into());
    }
    if modules.len() != 1 {
        let names: Vec<&str> = modules.keys().map(String::as_str).collect();
        return Err(format!(
            "modules: {} module(s) ({}): per-module merges of a multimodal model (a vision tower and a text decoder, each merged on its own) are not supported by chatvec; a model of one module has one, `default`",
            names.len(),
            names.join(", ")
        ));
    }
    let Some((name, def)) = modules.into_iter().next() else { return Ok(()) };
    if name != "default" {
        return Err(format!(
            "modules.{name}: chatvec merges models of one module, which mergekit names `default`; per-module merges of a multimodal model are not supported"
        ));
    }
    let Value::Object(mut def) = def else {
        return Err(format!("modules.default: expected {{slices or models, parameters}}, not {def}"));
    };
    if let Some(k) = def.keys().find(|k| !matches!(k.as_str(), "slices" | "models" | "parameters")) {
        return Err(format!("modules.default: unknown key '{k}' (expected slices, models, parameters)"));
    }
    match (def.remove("slices"), def.remove("models")) {
        (Some(s), None) => root.insert("slices".into(), s),
        (None, Some(m)) => root.insert("models".into(), m),
        _ => return Err("modules.default: give slices or models (one of them)".into()),
    };
    match def.remove("parameters") {
        None | Some(Value::Null) => {}
        Some(Value::Object(own)) => {
            let global = root.entry("parameters").or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(global) = global else {
                return Err(format!("parameters: expected a mapping, not {global}"));
            };
            for (k, v) in own {
                // A filter list with no default entry leaves some tensors
                // to the top level's value in mergekit: one value per key
                // cannot say that.
                let partial = v.as_array().is_some_and(|l| {
                    !l.is_empty() && l.iter().all(|e| e.as_object().is_some_and(|o| o.contains_key("filter")))
                });
                if partial && global.contains_key(&k) {
                    return Err(format!(
                        "modules.default.parameters.{k}: a filter list without a default entry, with {k} also at the top level (mergekit falls back to the top level's where no filter matches): add the default to the list, or write {k} in one place"
                    ));
                }
                global.insert(k, v);
            }
        }
        Some(v) => return Err(format!("modules.default.parameters: expected a mapping, not {v}")),
    }
    Ok(())
}

/// Checks a mergekit `MODEL+LORA` reference (a model with a LoRA adapter
/// merged into it as it is read): both parts named, one `+`. A path that
/// exists with a `+` in its name is a model.
fn lora_reference(at: &str, name: &str) -> std::result::Result<(), String> {
    if Path::new(name).exists() || !name.contains('+') {
        return Ok(());
    }
    match split_lora(name) {
        (_, Some(_)) => Ok(()),
        _ => Err(format!(
            "{at} '{name}': expected MODEL+LORA (a model, then one '+' and the LoRA adapter merged into it), or an existing path"
        )),
    }
}

/// A model reference as mergekit writes it: `MODEL`, or `MODEL+LORA` for a
/// LoRA adapter merged into MODEL as it is read. A path that exists is a
/// model whatever its name holds.
pub(crate) fn split_lora(name: &str) -> (&str, Option<&str>) {
    if Path::new(name).exists() {
        return (name, None);
    }
    match name.split_once('+') {
        Some((model, lora)) if !model.trim().is_empty() && !lora.trim().is_empty() && !lora.contains('+') => {
            (model, Some(lora))
        }
        _ => (name, None),
    }
}

/// A string setting that must not be blank when given.
fn nonempty(v: Option<String>, at: &str) -> std::result::Result<Option<String>, String> {
    match v {
        Some(s) if s.trim().is_empty() => Err(format!("{at}: expected a non-empty string")),
        other => Ok(other),
    }
}

struct Reader<'a> {
    file: &'a Path,
}

impl Reader<'_> {
    fn err(&self, msg: &str) -> Error {
        Error::bad_file(self.file, msg.to_string())
    }

    /// Moves a setting or method error onto the recipe file.
    fn wrap(&self, e: Error, prefix: &str) -> Error {
        match e {
            Error::Usage(m) => self.err(&format!("{prefix}{m}")),
            other => other,
        }
    }

    fn settings(&self, v: Option<&Map<String, Value>>, at: &str) -> Result<Vec<(String, Setting)>> {
        let Some(m) = v else { return Ok(Vec::new()) };
        m.iter()
            .map(|(k, v)| {
                Ok((k.clone(), Setting::parse(v, &format!("{at}.{k}")).map_err(|e| self.wrap(e, ""))?))
            })
            .collect()
    }

    fn merge(&self, method: Method, raw: &RawRecipe) -> Result<MergeRecipe> {
        let global = self.settings(raw.parameters.as_ref(), "parameters")?;
        let base = nonempty(raw.base_model.clone(), "base_model").map_err(|m| self.err(&m))?;
        if let Some(list) = &raw.slices {
            if raw.models.is_some() {
                return Err(self.err("give models or slices, not both"));
            }
            let slices = self.slices(list)?;
            return Ok(MergeRecipe { method, base, models: Vec::new(), global, slices });
        }
        let Some(list) = &raw.models else {
            return Err(self.err("models: required, a list of {model, parameters}"));
        };
        let mut models = Vec::new();
        for (i, item) in list.iter().enumerate() {
            let at = format!("models[{i}]");
            let (name, params) = match item {
                Value::String(s) => (s.clone(), None),
                other => {
                    let e: RawModelEntry = typed(other.clone(), &at).map_err(|m| self.err(&m))?;
                    (e.model, e.parameters)
                }
            };
            let name =
                nonempty(Some(name), &format!("{at}.model")).map_err(|m| self.err(&m))?.unwrap_or_default();
            models.push((name, self.settings(params.as_ref(), &format!("{at}.parameters"))?));
        }
        if models.is_empty() {
            return Err(self.err("models: the list is empty"));
        }
        Ok(MergeRecipe { method, base, models, global, slices: Vec::new() })
    }

    fn slices(&self, list: &[Value]) -> Result<Vec<SliceRecipe>> {
        if list.is_empty() {
            return Err(self.err("slices: the list is empty"));
        }
        list.iter()
            .enumerate()
            .map(|(i, item)| {
                let at = format!("slices[{i}]");
                let raw: RawSlice = typed(item.clone(), &at).map_err(|m| self.err(&m))?;
                if raw.sources.is_empty() {
                    return Err(self.err(&format!("{at}.sources: the list is empty")));
                }
                let mut sources = Vec::new();
                for (j, src) in raw.sources.iter().enumerate() {
                    let here = format!("{at}.sources[{j}]");
                    let model = nonempty(Some(src.model.clone()), &format!("{here}.model"))
                        .map_err(|m| self.err(&m))?
                        .unwrap_or_default();
                    lora_reference(&format!("{here}.model"), &model).map_err(|m| self.err(&m))?;
                    let [a, b] = src.layer_range;
                    if a >= b {
                        return Err(self.err(&format!(
                            "{here}.layer_range: [{a}, {b}] holds no layer (the end is exclusive)"
                        )));
                    }
                    sources.push(SliceSource {
                        model,
                        layers: (a, b),
                        parameters: self.settings(src.parameters.as_ref(), &format!("{here}.parameters"))?,
                    });
                }
                let len = sources[0].layers.1 - sources[0].layers.0;
                if let Some(s) = sources.iter().find(|s| s.layers.1 - s.layers.0 != len) {
                    return Err(self.err(&format!(
                        "{at}: every source must give the same number of layers ({} has {}, {} has {len})",
                        s.model,
                        s.layers.1 - s.layers.0,
                        sources[0].model
                    )));
                }
                let base = nonempty(raw.base_model.clone(), &format!("{at}.base_model"))
                    .map_err(|m| self.err(&m))?;
                Ok(SliceRecipe {
                    sources,
                    parameters: self.settings(raw.parameters.as_ref(), &format!("{at}.parameters"))?,
                    base,
                })
            })
            .collect()
    }

    /// A chat_vector recipe's `[[vectors]]`: each `{vector, scale}` or
    /// `{chat, pretrained, scale}` (the scale a number or a layer
    /// gradient, 1 when left out), in order; the positions pair each scale
    /// with its own vector, as the command line's do.
    fn vectors(&self, list: &[Value]) -> Result<ApplyParams> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Entry {
            #[serde(default)]
            vector: Option<String>,
            #[serde(default)]
            chat: Option<String>,
            #[serde(default)]
            pretrained: Option<String>,
            #[serde(default)]
            scale: Option<Value>,
        }
        if list.is_empty() {
            return Err(self.err("vectors: an empty list adds nothing"));
        }
        let mut p = ApplyParams::default();
        let mut at = FlagPositions::default();
        for (k, v) in list.iter().enumerate() {
            let here = format!("vectors[{k}]");
            let e: Entry = typed(v.clone(), &here).map_err(|m| self.err(&m))?;
            let text = |v: &Option<String>, key: &str| {
                nonempty(v.clone(), &format!("{here}.{key}")).map_err(|m| self.err(&m))
            };
            match (text(&e.vector, "vector")?, text(&e.chat, "chat")?, text(&e.pretrained, "pretrained")?) {
                (Some(v), None, None) => {
                    p.vector.push(v);
                    at.vector.push(2 * k);
                }
                (None, Some(c), Some(pre)) => {
                    p.chat.push(c);
                    p.pretrained.push(pre);
                    at.chat.push(2 * k);
                    at.pretrained.push(2 * k);
                }
                _ => {
                    return Err(self.err(&format!("{here}: give either vector, or both chat and pretrained")));
                }
            }
            if let Some(s) = &e.scale {
                let (scale, rules) =
                    scale_rules(s, &format!("{here}.scale")).map_err(|e| self.wrap(e, ""))?;
                if !rules.is_empty() {
                    return Err(self.err(&format!(
                        "{here}.scale: a number or a layer gradient (rules for some tensors go in parameters.scale)"
                    )));
                }
                p.scale.push(scale);
                at.scale.push(2 * k + 1);
            }
        }
        p.positions = Some(at);
        Ok(p)
    }

    fn chat_vector(&self, raw: &RawRecipe) -> Result<ApplyParams> {
        if raw.models.is_some() {
            return Err(self.err("models: chat_vector takes base_model and vector (or chat and pretrained)"));
        }
        let text = |v: &Option<String>, at: &str| nonempty(v.clone(), at).map_err(|m| self.err(&m));
        let base = text(&raw.base_model, "base_model")?.ok_or_else(|| self.err("base_model: required"))?;
        let (vector, chat, pretrained) =
            (text(&raw.vector, "vector")?, text(&raw.chat, "chat")?, text(&raw.pretrained, "pretrained")?);
        let several = match (&vector, &chat, &pretrained, &raw.vectors) {
            (Some(_), None, None, None) | (None, Some(_), Some(_), None) => None,
            (None, None, None, Some(list)) => Some(self.vectors(list)?),
            (_, _, _, Some(_)) => {
                return Err(self.err(
                    "vectors: give the vectors either there or as vector / chat and pretrained, not both",
                ));
            }
            _ => return Err(self.err("give either vector, or both chat and pretrained (or [[vectors]])")),
        };
        if let Some(p) = &raw.parameters
            && let Some(k) = p.keys().find(|k| !CHAT_VECTOR_PARAMS.contains(&k.as_str()))
        {
            return Err(self.err(&format!(
                "parameters.{k}: chat_vector takes no parameter '{k}' (it takes {})",
                CHAT_VECTOR_PARAMS.join(", ")
            )));
        }
        let params: RawChatVectorParams = match &raw.parameters {
            Some(p) => typed(Value::Object(p.clone()), "parameters").map_err(|m| self.err(&m))?,
            None => RawChatVectorParams::default(),
        };
        let (scale, scale_for) = match &params.scale {
            Some(v) => {
                scale_rules(v, "parameters.scale").map(|(s, r)| (Some(s), r)).map_err(|e| self.wrap(e, ""))?
            }
            None => (None, Vec::new()),
        };
        // With [[vectors]], parameters.scale may only hold rules for some
        // tensors (their default, 1, is not a vector's scale).
        let filtered = |e: &Value| e.get("filter").or_else(|| e.get("pattern")).is_some();
        let rules_only =
            params.scale.as_ref().and_then(Value::as_array).is_some_and(|rules| rules.iter().all(filtered));
        if several.is_some() && scale.is_some() && !rules_only {
            return Err(self.err(
                "parameters.scale: with [[vectors]] each vector takes its own scale (rules for some tensors stay here: [{ filter = \"mlp\", value = 0.5 }])",
            ));
        }
        let embeddings = match &params.embeddings {
            None => None,
            Some(s) => Some(s.parse().map_err(|e: String| self.err(&format!("parameters.embeddings: {e}")))?),
        };
        let (vector, chat, pretrained, scale, positions) = match several {
            Some(v) => (v.vector, v.chat, v.pretrained, v.scale, v.positions),
            // The rules stay in scale_for; the vectors carry their scales.
            None => (
                vector.into_iter().collect(),
                chat.into_iter().collect(),
                pretrained.into_iter().collect(),
                scale.into_iter().collect(),
                None,
            ),
        };
        Ok(ApplyParams {
            base,
            vector,
            chat,
            pretrained,
            lora: None,
            scale,
            scale_for,
            include: params.include.unwrap_or_default(),
            exclude: params.exclude.unwrap_or_default(),
            embeddings,
            out_dtype: None,
            keep_base_template: params.keep_base_template.unwrap_or(false),
            raw_delta: params.raw_delta.unwrap_or(false),
            shard_size: None,
            allow_mismatch: false,
            expert_layout: None,
            positions,
        })
    }
}

/// The `[sft]` table as `SftOptions` (`model` and `output` are `chatvec
/// run`'s to set, checked before): `data` is required, and the data,
/// eval data, chat template and `python` paths are relative to the recipe's
/// directory.
fn sft_section(
    opts: &SftOptions,
    section: &Map<String, Value>,
    path: &Path,
) -> std::result::Result<SftOptions, String> {
    if !section.contains_key("data") {
        return Err("sft.data: required (the chat data, JSONL)".into());
    }
    let dir = path.parent().unwrap_or(Path::new(""));
    let mut opts = opts.clone();
    for f in &mut opts.data {
        if f.path.is_relative() {
            f.path = dir.join(&f.path);
        }
    }
    if let Some(e) = opts.eval_data.as_mut().filter(|e| e.is_relative()) {
        *e = dir.join(&*e);
    }
    if let Some(t) = opts.chat_template.as_mut().filter(|t| dir.join(t.as_str()).is_file()) {
        *t = dir.join(t.as_str()).display().to_string();
    }
    if let Some(p) = opts.python.as_mut().filter(|p| p.is_relative() && p.components().count() > 1) {
        *p = dir.join(&*p);
    }
    Ok(opts)
}

/// A chat vector's `scale`: a number, a gradient over the layers
/// (`[0.3, 1.0]`), or rules turned into `--scale-for` overrides (first
/// match wins; each value a number or a gradient) with a final default.
fn scale_rules(v: &Value, at: &str) -> Result<(Scale, Vec<String>)> {
    let bad = |m: String| Error::Usage(format!("{at}: {m}"));
    let value = |s: &Setting| -> Result<Scale> {
        let nums = match s {
            Setting::Scalar(Scalar::Num(x)) => vec![*x],
            Setting::Gradient(g) => g
                .iter()
                .map(|x| match x {
                    Scalar::Num(n) => Ok(*n),
                    Scalar::Bool(_) => Err(bad("a scale gradient holds numbers".into())),
                })
                .collect::<Result<_>>()?,
            _ => return Err(bad("a scale is a number or a list of numbers".into())),
        };
        Scale::from_values(nums.into_iter().map(|x| x as f32).collect(), at)
    };
    match Setting::parse(v, at)? {
        Setting::Rules(rules) => {
            let mut default = Scale::Constant(1.0);
            let mut out = Vec::new();
            for (filter, s) in rules {
                let x = value(&s)?;
                match filter {
                    Filter::All => {
                        default = x;
                        break;
                    }
                    Filter::Substring(s) => out.push(format!("{}={x}", regex::escape(&s))),
                    Filter::Regex(r) => out.push(format!("{}={x}", r.as_str())),
                }
            }
            Ok((default, out))
        }
        s => Ok((value(&s)?, Vec::new())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::embeddings::EmbeddingPolicy;

    fn parse(text: &str, name: &str) -> Result<Recipe> {
        parse_recipe(text, Path::new(name))
    }

    #[test]
    fn mergekit_yaml_and_toml_mean_the_same() {
        let y = parse(
            "merge_method: ties\nbase_model: a/base\nmodels:\n  - model: a/one\n    parameters:\n      weight: 0.5\n      density: [0.2, 0.8]\n  - model: a/two\n    parameters: {weight: 0.5}\nparameters:\n  normalize: true\n  density: 0.4\ndtype: bfloat16\n",
            "c.yml",
        )
        .unwrap();
        let t = parse(
            "merge_method = \"ties\"\nbase_model = \"a/base\"\ndtype = \"bfloat16\"\nseed = 3\n[[models]]\nmodel = \"a/one\"\nparameters = { weight = 0.5, density = [0.2, 0.8] }\n[[models]]\nmodel = \"a/two\"\nparameters = { weight = 0.5 }\n[parameters]\nnormalize = true\ndensity = 0.4\n",
            "c.toml",
        )
        .unwrap();
        for r in [&y, &t] {
            let RecipeBody::Merge(m) = &r.body else { panic!() };
            assert_eq!(m.method, Method::Ties);
            assert_eq!(m.base.as_deref(), Some("a/base"));
            assert_eq!(m.models.len(), 2);
            assert_eq!(m.models[0].1.len(), 2);
            assert_eq!(r.out_dtype, Some(FloatType::BF16));
        }
        assert_eq!((y.syntax, t.syntax, t.seed), (Syntax::Mergekit, Syntax::Toml, 3));
    }

    #[test]
    fn bad_recipes_name_the_key() {
        let cases = [
            (
                "merge_method: ties\nmodules:\n  text_decoder: {models: [a/b]}\n  vision_tower: {models: [a/b]}\n",
                "c.yml",
                "modules: 2 module(s) (text_decoder, vision_tower): per-module merges of a multimodal model",
            ),
            (
                "merge_method: ties\nmodels: [a/b]\nseed: 1\n",
                "c.yml",
                "unknown key 'seed' (it is a chatvec key",
            ),
            ("merge_method: nope\nmodels: [a/b]\n", "c.yml", "unknown merge method 'nope'"),
            (
                "merge_method: ties\nmodels:\n  - model: a/b\n    weight: 1\n",
                "c.yml",
                "models[0]: unknown key 'weight'",
            ),
            (
                "merge_method = \"chat_vector\"\nbase_model = \"b\"\nvector = \"v\"\ntokenizer_source = \"union\"\n",
                "c.toml",
                "are for merge methods; chat_vector keeps the base's vocabulary",
            ),
            (
                "merge_method = \"chat_vector\"\nbase_model = \"b\"\nchat = \"c+lora\"\npretrained = \"p\"\n",
                "c.toml",
                "chat 'c+lora': MODEL+LORA references are for merge methods",
            ),
            (
                "merge_method: ties\nmodels: [a/b+x+y]\n",
                "c.yml",
                "models[0].model 'a/b+x+y': expected MODEL+LORA",
            ),
            (
                "merge_method = \"ties\"\nmodels = [\"a/b\"]\n[sft]\nepochs = 1\n",
                "c.toml",
                "sft.data: required",
            ),
            (
                "merge_method = \"ties\"\nmodels = [\"a/b\"]\n[sft]\ndata = \"d\"\nmodel = \"m\"\n",
                "c.toml",
                "sft.model: `chatvec run` sets it",
            ),
            (
                "merge_method = \"ties\"\nmodels = [\"a/b\"]\n[sft]\ndata = [1]\n",
                "c.toml",
                "sft.data: expected a file name",
            ),
            (
                "merge_method = \"ties\"\nmodels = [\"a/b\"]\n[sft]\ndata = \"d\"\nepocs = 1\n",
                "c.toml",
                "sft.epocs: unknown field `epocs`, expected one of `data`, `eval_data`",
            ),
            (
                "merge_method = \"ties\"\nmodels = [\"a/b\"]\nseed = \"x\"\n",
                "c.toml",
                "seed: invalid type: string \"x\", expected u64",
            ),
            (
                "merge_method: ties\nmodels:\n  - model: 3\n",
                "c.yml",
                "models[0].model: invalid type: integer `3`",
            ),
            (
                "merge_method: ties\nmodels: [a/b]\ntokenizer_source: a/c\n",
                "c.yml",
                "tokenizer_source: 'a/c' is not one of the merge's models",
            ),
            (
                "merge_method: ties\nmodels: [a/b]\nparameters:\n  weight: [{filter: x, valu: 1}]\n",
                "c.yml",
                "parameters.weight[0]: unknown key 'valu'",
            ),
            ("merge_method: ties\nmodels: [a/b]\nout_dtype: int8\n", "c.yml", "out_dtype: 'int8' is not"),
            (
                "merge_method = \"chat_vector\"\nbase_model = \"a/b\"\n",
                "c.toml",
                "give either vector, or both",
            ),
            (
                "merge_method = \"chat_vector\"\nbase_model = \"a/b\"\nvector = \"v\"\n[parameters]\nweight = 1\n",
                "c.toml",
                "chat_vector takes no parameter 'weight'",
            ),
            (
                "merge_method = \"ties\"\nmodels = [\"a/b\"]\nvector = \"v\"\n",
                "c.toml",
                "vector: only for merge_method",
            ),
            ("merge_method = \"ties\"\nmodels = []\n", "c.toml", "models: the list is empty"),
            (
                "merge_method = \"ties\"\nmodels = [\"a/b\"]\nshard_size = \"5XB\"\n",
                "c.toml",
                "shard_size: '5XB': unknown unit",
            ),
            ("merge_method = \"ties\"\nmodels = [\"a/b\"\n", "c.toml", "c.toml: "),
            ("merge_method: ties\n  bad indent: [\n", "c.yml", "c.yml: "),
            ("x", "c.json", "a recipe is a .toml file"),
        ];
        for (text, name, want) in cases {
            let e = parse(text, name).unwrap_err().to_string();
            assert!(e.contains(want), "{name}: {text:?}\n  got: {e}\n  want: {want}");
            assert!(e.starts_with(name), "{e}");
        }
    }

    #[test]
    fn shipped_recipes_parse_and_use_known_aliases() {
        let aliases = crate::resolve::aliases::Aliases::parse(
            include_str!("../../recipes/aliases.toml"),
            Path::new("aliases.toml"),
        )
        .unwrap();
        for (name, _) in SHIPPED {
            let r = Recipe::load(name).unwrap();
            assert!(r.description.as_deref().is_some_and(|d| !d.is_empty()), "{name}");
            assert_eq!(r.name.as_deref(), Some(*name));
            match r.body {
                RecipeBody::ChatVector(c) => {
                    assert!(aliases.models.contains_key(&c.base), "{name}");
                    let [v] = &c.vector[..] else { panic!("{name}") };
                    assert!(aliases.vectors.contains_key(v), "{name}");
                }
                RecipeBody::Merge(m) => {
                    for (model, _) in &m.models {
                        assert!(aliases.models.contains_key(model), "{name}");
                    }
                }
            }
        }
    }

    #[test]
    fn sweep_and_eval_sections_are_checked() {
        let cv = "merge_method = \"chat_vector\"\nbase_model = \"b\"\nchat = \"c\"\npretrained = \"p\"\n";
        let r = parse(&format!("{cv}[sweep]\nscales = [0.5, 1.0, [0.3, 1.0]]\n[eval]\ndata = \"held.jsonl\"\nmax_new_tokens = 32\n"), "/x/r.toml").unwrap();
        assert_eq!(
            r.sweep().unwrap(),
            &[Scale::Constant(0.5), Scale::Constant(1.0), Scale::Layers(vec![0.3, 1.0])]
        );
        let e = r.eval().unwrap();
        assert_eq!((e.data.as_deref(), e.max_new_tokens), (Some(Path::new("/x/held.jsonl")), 32));
        // Benchmarks, the judge and the primary figure, with benchmark
        // and task directories relative to the recipe.
        let r = parse(
            &format!(
                "{cv}[sweep]\nscales = [0.5, 1.0]\n[eval]\nbench = [\"ja-mt-bench\", \"elyza-tasks-100=mirror/elyza\", \"./mine\"]\njudge_url = \"http://localhost:8000/v1\"\njudge_model = \"judge\"\nprimary = \"elyza-tasks-100\"\nbench_samples = 5\nharness = [\"jcommonsenseqa\"]\nharness_include = \"tasks\"\n"
            ),
            "/x/r.toml",
        )
        .unwrap();
        let e = r.eval().unwrap();
        assert_eq!(e.bench, ["ja-mt-bench", "elyza-tasks-100=/x/mirror/elyza", "/x/./mine"]);
        assert_eq!(
            (e.judge_url.as_deref(), e.judge_model.as_deref()),
            (Some("http://localhost:8000/v1"), Some("judge"))
        );
        assert_eq!((e.primary.as_deref(), e.bench_samples), (Some("elyza-tasks-100"), 5));
        assert_eq!(
            (e.harness.as_slice(), e.harness_include.as_deref()),
            (&["jcommonsenseqa".to_string()][..], Some(Path::new("/x/tasks")))
        );
        assert_eq!(e.judge_concurrency, EvalSpec::new(Vec::new()).judge_concurrency);
        for (text, needle) in [
            (format!("{cv}[sweep]\nscales = [1.0]\n"), "sweep: needs an [eval] section"),
            (format!("{cv}[sweep]\nscales = []\n[eval]\n"), "sweep.scales: give at least one"),
            (format!("{cv}[sweep]\nscales = [\"x\"]\n[eval]\n"), "sweep.scales[0]"),
            (format!("{cv}[sweep]\nscale = [1.0]\n[eval]\n"), "sweep.scale: unknown field"),
            (format!("{cv}[eval]\nmax_tokens = 3\n"), "eval.max_tokens: unknown field"),
            (
                "merge_method = \"ties\"\nmodels = [\"a/b\"]\n[sweep]\nscales = [1.0]\n[eval]\n".to_string(),
                "sweep: only for merge_method",
            ),
        ] {
            let e = parse(&text, "r.toml").unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn chat_vector_scale_takes_a_layer_gradient_at_the_top_and_in_rules() {
        let r = parse(
            "merge_method = \"chat_vector\"\nbase_model = \"b\"\nchat = \"c\"\npretrained = \"p\"\n[parameters]\nscale = [{ filter = \"mlp.\", value = [0.0, 0.5] }, { value = [0.3, 1.0] }]\n",
            "r.toml",
        )
        .unwrap();
        let RecipeBody::ChatVector(c) = r.body else { panic!("not a chat vector") };
        assert_eq!(c.scale, vec![Scale::Layers(vec![0.3, 1.0])]);
        assert_eq!(c.scale_for, vec!["mlp\\.=[0, 0.5]".to_string()]);
        let e = parse(
            "merge_method = \"chat_vector\"\nbase_model = \"b\"\nchat = \"c\"\npretrained = \"p\"\n[parameters]\nscale = [true, 1.0]\n",
            "r.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("parameters.scale"), "{e}");
    }

    #[test]
    fn chat_vector_scale_rules_become_scale_for() {
        let r = parse(
            "merge_method = \"chat_vector\"\nbase_model = \"b\"\nchat = \"c\"\npretrained = \"p\"\n[parameters]\nscale = [{ filter = \"mlp.\", value = 0.5 }, { pattern = \"^lm_head\", value = 0.0 }, { value = 0.8 }]\nembeddings = \"align\"\n",
            "r.toml",
        )
        .unwrap();
        let RecipeBody::ChatVector(c) = r.body else { panic!() };
        assert_eq!(c.scale, vec![Scale::Constant(0.8)]);
        assert_eq!(c.scale_for, vec!["mlp\\.=0.5".to_string(), "^lm_head=0".to_string()]);
        assert_eq!(c.embeddings, Some(EmbeddingPolicy::Align));
    }
}
