//! Recipes: a merge written down as data, read from a chatvec TOML recipe
//! or a mergekit YAML config (`.yml` / `.yaml`).
//!
//! Both use mergekit's keys - `merge_method`, `base_model`, `models` (each
//! `{model, parameters}`), `parameters`, `dtype`, `out_dtype`,
//! `tokenizer_source` (`base` or `union`) - so a config moves between the
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

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::aliases::toml_to_json;
use crate::dtype::FloatType;
use crate::embeddings::EmbeddingPolicy;
use crate::error::{Error, Result};
use crate::json::read_capped;
use crate::methods::Method;
use crate::params::{Filter, Setting};
use crate::writer::hex;

const MAX_RECIPE_BYTES: u64 = 4 << 20;
pub const DEFAULT_SHARD_SIZE: u64 = 5_000_000_000;

/// Which syntax a recipe was written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Syntax {
    Toml,
    Mergekit,
}

/// The vector side of a chat vector recipe.
#[derive(Clone, Debug)]
pub enum VectorRef {
    /// A vector directory or a vector alias.
    Vector(String),
    Pair {
        chat: String,
        pretrained: String,
    },
}

/// A chat vector recipe: `apply` as data.
#[derive(Clone, Debug)]
pub struct ChatVectorRecipe {
    pub base: String,
    pub vector: VectorRef,
    pub scale: f32,
    /// `REGEX=VALUE` overrides, first match wins (from scale rules).
    pub scale_for: Vec<String>,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub embeddings: EmbeddingPolicy,
    pub keep_base_template: bool,
}

/// A merge method recipe.
#[derive(Clone, Debug)]
pub struct MergeRecipe {
    pub method: Method,
    pub base: Option<String>,
    /// Each model and its own parameter settings.
    pub models: Vec<(String, Vec<(String, Setting)>)>,
    pub global: Vec<(String, Setting)>,
}

#[derive(Clone, Debug)]
pub enum RecipeBody {
    ChatVector(ChatVectorRecipe),
    Merge(MergeRecipe),
}

/// A parsed recipe and where it came from.
#[derive(Clone, Debug)]
pub struct Recipe {
    pub path: PathBuf,
    pub syntax: Syntax,
    /// The file's bytes, as recorded in the manifest.
    pub text: String,
    pub sha256: String,
    pub name: Option<String>,
    pub body: RecipeBody,
    pub out_dtype: Option<FloatType>,
    pub shard_size: u64,
    pub seed: u64,
    pub allow_mismatch: bool,
    /// `tokenizer_source: union`.
    pub union: bool,
    /// The `[sft]` section as `chatvec sft` options (`chatvec run`).
    pub sft: Option<Vec<String>>,
}

const MERGEKIT_KEYS: &[&str] =
    &["merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"];
const TOML_ONLY_KEYS: &[&str] =
    &["name", "description", "seed", "shard_size", "allow_mismatch", "vector", "chat", "pretrained", "sft"];
/// mergekit features chatvec does not implement.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("slices", "layer slices (passthrough/frankenmerges)"),
    ("modules", "per-module merges"),
    ("tokenizer", "tokenizer building"),
    ("chat_template", "chat template selection"),
];

/// The recipes shipped in `recipes/`, by name.
pub const SHIPPED: &[(&str, &str)] = &[
    ("llama3-swallow-8b-chat-vector", include_str!("../recipes/llama3-swallow-8b-chat-vector.toml")),
    ("llama3-swallow-70b-chat-vector", include_str!("../recipes/llama3-swallow-70b-chat-vector.toml")),
    ("elyza-llama2-70b-chat-vector", include_str!("../recipes/elyza-llama2-70b-chat-vector.toml")),
    ("swallow-7b-chat-vector", include_str!("../recipes/swallow-7b-chat-vector.toml")),
    ("llama3-swallow-8b-ties", include_str!("../recipes/llama3-swallow-8b-ties.toml")),
];

/// A recipe file, or else the shipped recipe of that name.
pub fn load_recipe(name_or_path: &str) -> Result<Recipe> {
    let p = Path::new(name_or_path);
    if p.exists() {
        return read_recipe(p);
    }
    match SHIPPED.iter().find(|(n, _)| *n == name_or_path) {
        Some((n, text)) => parse_recipe(text, Path::new(&format!("recipes/{n}.toml"))),
        None => {
            let names: Vec<&str> = SHIPPED.iter().map(|(n, _)| *n).collect();
            Err(Error::Usage(format!(
                "recipe '{name_or_path}' is neither a file nor a shipped recipe ({})",
                names.join(", ")
            )))
        }
    }
}

/// Reads and parses the recipe at `path`.
pub fn read_recipe(path: &Path) -> Result<Recipe> {
    let bytes = read_capped(path, MAX_RECIPE_BYTES)?;
    let text = String::from_utf8(bytes).map_err(|_| Error::bad_file(path, "is not UTF-8 text"))?;
    parse_recipe(&text, path)
}

/// Parses recipe text; `path` decides the syntax (`.yml`/`.yaml` is mergekit).
pub fn parse_recipe(text: &str, path: &Path) -> Result<Recipe> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let (syntax, doc) = match ext.as_str() {
        "yml" | "yaml" => {
            let v: Value = serde_yaml_ng::from_str(text).map_err(|e| Error::bad_file(path, e.to_string()))?;
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
    let Value::Object(root) = doc else {
        return Err(Error::bad_file(path, "expected a mapping of keys at the top level"));
    };
    let r = Reader { file: path, root: &root };
    r.check_keys(syntax)?;
    let method_name = r.string("merge_method")?.ok_or_else(|| r.err("merge_method: required"))?;
    let body = if method_name == "chat_vector" {
        if syntax == Syntax::Mergekit {
            return Err(r.err("merge_method: chat_vector is a chatvec method; write it as a .toml recipe"));
        }
        RecipeBody::ChatVector(r.chat_vector()?)
    } else {
        let method = Method::from_name(&method_name).map_err(|e| r.err(&format!("merge_method: {e}")))?;
        for k in ["vector", "chat", "pretrained"] {
            if root.contains_key(k) {
                return Err(r.err(&format!("{k}: only for merge_method = \"chat_vector\"")));
            }
        }
        RecipeBody::Merge(r.merge(method)?)
    };
    let dtype = |k: &str| -> Result<Option<FloatType>> {
        match r.string(k)? {
            None => Ok(None),
            Some(s) => FloatType::parse_cli(&s)
                .map(Some)
                .ok_or_else(|| r.err(&format!("{k}: '{s}' is not bfloat16, float16 or float32"))),
        }
    };
    let out_dtype = match dtype("out_dtype")? {
        Some(t) => Some(t),
        None => dtype("dtype")?,
    };
    let shard_size = match root.get("shard_size") {
        None => DEFAULT_SHARD_SIZE,
        Some(Value::String(s)) => {
            crate::cli::parse_size(s).map_err(|e| r.err(&format!("shard_size: {e}")))?
        }
        Some(Value::Number(n)) => {
            n.as_u64().filter(|&v| v > 0).ok_or_else(|| r.err("shard_size: expected bytes"))?
        }
        Some(v) => return Err(r.err(&format!("shard_size: expected a size like \"5GB\", not {v}"))),
    };
    let seed = match root.get("seed") {
        None => 0,
        Some(v) => {
            v.as_u64().ok_or_else(|| r.err(&format!("seed: expected a non-negative integer, not {v}")))?
        }
    };
    let union = match root.get("tokenizer_source") {
        None => false,
        Some(Value::String(s)) if s == "base" => false,
        Some(Value::String(s)) if s == "union" => true,
        Some(v) => {
            return Err(r.err(&format!(
                "tokenizer_source: {v} is not supported; use base (the base model's tokenizer, other models' rows matched to it by token) or union"
            )));
        }
    };
    if union && matches!(body, RecipeBody::ChatVector(_)) {
        return Err(
            r.err("tokenizer_source: union is for merge methods; chat_vector keeps the base's vocabulary")
        );
    }
    Ok(Recipe {
        path: path.to_path_buf(),
        syntax,
        text: text.to_string(),
        sha256: hex(&Sha256::digest(text.as_bytes())),
        name: r.string("name")?,
        body,
        out_dtype,
        shard_size,
        seed,
        allow_mismatch: r.boolean("allow_mismatch")?.unwrap_or(false),
        union,
        sft: match root.get("sft") {
            None => None,
            Some(v) => Some(sft_section(v, path).map_err(|m| r.err(&m))?),
        },
    })
}

impl Recipe {
    /// What the manifest keeps of this recipe.
    pub fn record(&self) -> crate::manifest::RecipeRecord {
        crate::manifest::RecipeRecord {
            file: self.path.display().to_string(),
            syntax: self.syntax,
            sha256: self.sha256.clone(),
            text: self.text.clone(),
        }
    }
}

struct Reader<'a> {
    file: &'a Path,
    root: &'a Map<String, Value>,
}

impl Reader<'_> {
    fn err(&self, msg: &str) -> Error {
        Error::bad_file(self.file, msg.to_string())
    }

    /// Moves a setting or method error onto the recipe file.
    fn wrap(&self, e: Error) -> Error {
        match e {
            Error::Usage(m) => self.err(&m),
            other => other,
        }
    }

    fn check_keys(&self, syntax: Syntax) -> Result<()> {
        for k in self.root.keys() {
            if let Some((_, what)) = UNSUPPORTED.iter().find(|(u, _)| u == k) {
                return Err(self.err(&format!("{k}: mergekit's {what} is not supported by chatvec")));
            }
            let known = MERGEKIT_KEYS.contains(&k.as_str())
                || (syntax == Syntax::Toml && TOML_ONLY_KEYS.contains(&k.as_str()));
            if !known {
                let extra = if syntax == Syntax::Mergekit && TOML_ONLY_KEYS.contains(&k.as_str()) {
                    " (it is a chatvec key: use a .toml recipe)"
                } else {
                    ""
                };
                return Err(self.err(&format!("unknown key '{k}'{extra}")));
            }
        }
        Ok(())
    }

    fn string(&self, k: &str) -> Result<Option<String>> {
        string_at(self.root, k, k).map_err(|m| self.err(&m))
    }

    fn boolean(&self, k: &str) -> Result<Option<bool>> {
        match self.root.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(&format!("{k}: expected true or false, not {v}"))),
        }
    }

    fn settings(&self, v: Option<&Value>, at: &str) -> Result<Vec<(String, Setting)>> {
        let Some(v) = v else { return Ok(Vec::new()) };
        let Value::Object(m) = v else {
            return Err(self.err(&format!("{at}: expected a mapping of parameter names, not {v}")));
        };
        m.iter()
            .map(|(k, v)| Ok((k.clone(), Setting::parse(v, &format!("{at}.{k}")).map_err(|e| self.wrap(e))?)))
            .collect()
    }

    fn merge(&self, method: Method) -> Result<MergeRecipe> {
        let global = self.settings(self.root.get("parameters"), "parameters")?;
        let Some(Value::Array(list)) = self.root.get("models") else {
            return Err(self.err("models: required, a list of {model, parameters}"));
        };
        let mut models = Vec::new();
        for (i, item) in list.iter().enumerate() {
            let at = format!("models[{i}]");
            let m = match item {
                Value::String(s) => {
                    models.push((s.clone(), Vec::new()));
                    continue;
                }
                Value::Object(m) => m,
                v => return Err(self.err(&format!("{at}: expected {{model, parameters}}, not {v}"))),
            };
            if let Some(k) = m.keys().find(|k| !matches!(k.as_str(), "model" | "parameters")) {
                return Err(self.err(&format!("{at}: unknown key '{k}' (expected model, parameters)")));
            }
            let name = string_at(m, "model", &format!("{at}.model"))
                .map_err(|e| self.err(&e))?
                .ok_or_else(|| self.err(&format!("{at}.model: required")))?;
            models.push((name, self.settings(m.get("parameters"), &format!("{at}.parameters"))?));
        }
        if models.is_empty() {
            return Err(self.err("models: the list is empty"));
        }
        Ok(MergeRecipe { method, base: self.string("base_model")?, models, global })
    }

    fn chat_vector(&self) -> Result<ChatVectorRecipe> {
        if self.root.contains_key("models") {
            return Err(self.err("models: chat_vector takes base_model and vector (or chat and pretrained)"));
        }
        let base = self.string("base_model")?.ok_or_else(|| self.err("base_model: required"))?;
        let vector = match (self.string("vector")?, self.string("chat")?, self.string("pretrained")?) {
            (Some(v), None, None) => VectorRef::Vector(v),
            (None, Some(chat), Some(pretrained)) => VectorRef::Pair { chat, pretrained },
            _ => return Err(self.err("give either vector, or both chat and pretrained")),
        };
        let mut r = ChatVectorRecipe {
            base,
            vector,
            scale: 1.0,
            scale_for: Vec::new(),
            include: Vec::new(),
            exclude: Vec::new(),
            embeddings: EmbeddingPolicy::Auto,
            keep_base_template: false,
        };
        let Some(p) = self.root.get("parameters") else { return Ok(r) };
        let Value::Object(p) = p else {
            return Err(self.err("parameters: expected a table"));
        };
        for (k, v) in p {
            let at = format!("parameters.{k}");
            match k.as_str() {
                "scale" => (r.scale, r.scale_for) = scale_rules(v, &at).map_err(|e| self.wrap(e))?,
                "include" | "exclude" => {
                    let list = v
                        .as_array()
                        .and_then(|a| {
                            a.iter().map(|s| s.as_str().map(str::to_string)).collect::<Option<Vec<_>>>()
                        })
                        .ok_or_else(|| self.err(&format!("{at}: expected a list of regexes")))?;
                    if k == "include" { r.include = list } else { r.exclude = list }
                }
                "embeddings" => {
                    let s = v.as_str().unwrap_or("");
                    r.embeddings =
                        <EmbeddingPolicy as clap::ValueEnum>::from_str(s, false).map_err(|_| {
                            self.err(&format!("{at}: {v} is not one of auto, full, skip, prefix, align"))
                        })?;
                }
                "keep_base_template" => {
                    r.keep_base_template =
                        v.as_bool().ok_or_else(|| self.err(&format!("{at}: expected true or false")))?
                }
                _ => {
                    return Err(self.err(&format!(
                        "{at}: chat_vector takes no parameter '{k}' (it takes scale, include, exclude, embeddings, keep_base_template)"
                    )));
                }
            }
        }
        Ok(r)
    }
}

/// The `[sft]` table as `chatvec sft` options: `key = value` becomes
/// `--key value` (`_` spelled `-`), `true` a bare flag; `data` and `python`
/// paths are relative to the recipe's directory. The options themselves are
/// checked by `chatvec sft`'s own parser (`sft::args_from_options`).
fn sft_section(v: &Value, path: &Path) -> std::result::Result<Vec<String>, String> {
    let Value::Object(m) = v else { return Err("[sft] must be a table".into()) };
    let dir = path.parent().unwrap_or(Path::new(""));
    let mut out = Vec::new();
    for (k, v) in m {
        if matches!(k.as_str(), "model" | "output") {
            return Err(format!("sft.{k}: `chatvec run` sets it (the merged model, the run directory)"));
        }
        let flag = format!("--{}", k.replace('_', "-"));
        match v {
            Value::Bool(true) => out.push(flag),
            Value::Bool(false) if k == "assistant_only_loss" => out.extend([flag, "false".into()]),
            Value::Bool(false) => {}
            Value::Number(n) => out.extend([flag, n.to_string()]),
            Value::String(s) if matches!(k.as_str(), "data" | "python") && Path::new(s).is_relative() => {
                out.extend([flag, dir.join(s).display().to_string()])
            }
            Value::String(s) => out.extend([flag, s.clone()]),
            other => return Err(format!("sft.{k}: expected a number, string or true/false, not {other}")),
        }
    }
    if !m.contains_key("data") {
        return Err("sft.data: required (the chat data, JSONL)".into());
    }
    Ok(out)
}

fn string_at(m: &Map<String, Value>, k: &str, at: &str) -> std::result::Result<Option<String>, String> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.clone())),
        Some(v) => Err(format!("{at}: expected a non-empty string, not {v}")),
    }
}

/// A chat vector's `scale`: a number, or rules turned into `--scale-for`
/// overrides (first match wins) with a final default.
fn scale_rules(v: &Value, at: &str) -> Result<(f32, Vec<String>)> {
    let bad = |m: String| Error::Usage(format!("{at}: {m}"));
    let finite = |x: f64| -> Result<f32> {
        let f = x as f32;
        if f.is_finite() { Ok(f) } else { Err(bad(format!("{x} is not a finite number"))) }
    };
    match Setting::parse(v, at)? {
        Setting::Scalar(crate::params::Scalar::Num(x)) => Ok((finite(x)?, Vec::new())),
        Setting::Rules(rules) => {
            let mut default = 1.0;
            let mut out = Vec::new();
            for (filter, s) in rules {
                let Setting::Scalar(crate::params::Scalar::Num(x)) = s else {
                    return Err(bad(
                        "each rule's value must be a number (no gradients for chat_vector)".into()
                    ));
                };
                match filter {
                    Filter::All => {
                        default = finite(x)?;
                        break;
                    }
                    Filter::Substring(s) => out.push(format!("{}={x}", regex::escape(&s))),
                    Filter::Regex(r) => out.push(format!("{}={x}", r.as_str())),
                }
            }
            Ok((default, out))
        }
        _ => Err(bad("expected a number or rules".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            ("merge_method: ties\nmodels: [a/b]\nslices: []\n", "c.yml", "slices: mergekit's layer slices"),
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
                "tokenizer_source: union is for merge methods",
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
                "sft.data: expected a number",
            ),
            (
                "merge_method: ties\nmodels: [a/b]\ntokenizer_source: a/c\n",
                "c.yml",
                "tokenizer_source: \"a/c\" is not supported",
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
        let aliases = crate::aliases::Aliases::parse(
            include_str!("../recipes/aliases.toml"),
            Path::new("aliases.toml"),
        )
        .unwrap();
        for (name, _) in SHIPPED {
            let r = load_recipe(name).unwrap();
            assert_eq!(r.name.as_deref(), Some(*name));
            match r.body {
                RecipeBody::ChatVector(c) => {
                    assert!(aliases.models.contains_key(&c.base), "{name}");
                    let VectorRef::Vector(v) = c.vector else { panic!("{name}") };
                    assert!(aliases.vectors.contains_key(&v), "{name}");
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
    fn chat_vector_scale_rules_become_scale_for() {
        let r = parse(
            "merge_method = \"chat_vector\"\nbase_model = \"b\"\nchat = \"c\"\npretrained = \"p\"\n[parameters]\nscale = [{ filter = \"mlp.\", value = 0.5 }, { pattern = \"^lm_head\", value = 0.0 }, { value = 0.8 }]\nembeddings = \"align\"\n",
            "r.toml",
        )
        .unwrap();
        let RecipeBody::ChatVector(c) = r.body else { panic!() };
        assert_eq!(c.scale, 0.8);
        assert_eq!(c.scale_for, vec!["mlp\\.=0.5".to_string(), "^lm_head=0".to_string()]);
        assert_eq!(c.embeddings, EmbeddingPolicy::Align);
    }
}
