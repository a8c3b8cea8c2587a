//! `apply` and `extract`: what the user asked for, as written
//! (`ApplyParams`, `ExtractParams`), and the checked spec each becomes
//! through one fallible conversion (`validate`), with every default filled
//! in here and nowhere else.
//!
//! The command line fills the params through clap (the doc comments are
//! the help text), a chat_vector recipe fills the same type from its keys,
//! and the manifest records it with the defaults written out
//! (`ApplySpec::given`), so what a run was asked is one type end to end.

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{ArgGroup, Args};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::dtype::FloatType;
use crate::model::experts::ExpertLayout;
use crate::params::embeddings::EmbeddingPolicy;
use crate::params::lora::{LoraParams, LoraSpec};
use crate::params::select::{Scale, Selection, Spelling};
use crate::units::parse_size;

/// The default output shard size, as transformers' `max_shard_size` (the
/// one place it is written: help text, recipes and specs read it here).
pub(crate) const DEFAULT_SHARD_SIZE: &str = "5GB";

/// The default scale of a chat vector.
const DEFAULT_SCALE: f32 = 1.0;

/// `DEFAULT_SHARD_SIZE` in bytes.
pub(crate) fn default_shard_size() -> u64 {
    parse_size(DEFAULT_SHARD_SIZE).unwrap_or_else(|e| unreachable!("DEFAULT_SHARD_SIZE: {e}"))
}

/// `apply`'s parameters as the user wrote them (`None`: not given).
#[derive(Args, Serialize, Clone, Debug, Default, PartialEq)]
#[command(group(ArgGroup::new("vector_source").required(true).args(["vector", "chat", "lora"])))]
pub struct ApplyParams {
    /// The model to give chat ability to, e.g. a continued-pretrained model (directory, Hub id or alias).
    #[arg(long, value_name = "MODEL")]
    pub base: String,

    /// A chat vector written by `chatvec extract`, or a vector alias such as llama3-instruct.
    #[arg(long, value_name = "VECTOR", conflicts_with_all = ["chat", "pretrained"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vector: Option<String>,

    /// The chat model (with --pretrained: stream the vector without writing it).
    #[arg(long, value_name = "MODEL", requires = "pretrained")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat: Option<String>,

    /// The pretrained model the chat model was tuned from.
    #[arg(long, value_name = "MODEL", requires = "chat")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pretrained: Option<String>,

    /// A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors; directory or Hub id)
    /// to merge into --base, the model it was trained on; --scale multiplies its alpha / r.
    #[arg(long, value_name = "ADAPTER", conflicts_with_all = ["vector", "chat", "pretrained", "raw_delta", "embeddings"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<String>,

    /// Scale of the vector (default 1): a number, or a gradient over the layers, e.g. '[0.3, 1.0]'
    /// (interpolated from the first layer to the last; embeddings take the first value, lm_head the last).
    #[arg(long, value_parser = parse_scale, allow_negative_numbers = true)]
    pub scale: Option<Scale>,

    /// Scale for tensors matching REGEX, a number or a gradient, e.g. 'mlp\.=0.5' or
    /// 'self_attn=[0.3, 1.0]' (repeatable; first match wins).
    #[arg(long, value_name = "REGEX=S")]
    pub scale_for: Vec<String>,

    /// Only operate on tensors matching this regex (repeatable; default: all).
    #[arg(long, value_name = "REGEX")]
    pub include: Vec<String>,

    /// Leave tensors matching this regex untouched (repeatable).
    #[arg(long, value_name = "REGEX")]
    pub exclude: Vec<String>,

    /// Embedding rows when vocabularies differ (default auto): auto, full, skip, prefix or align.
    #[arg(long, value_parser = embedding_policy())]
    pub embeddings: Option<EmbeddingPolicy>,

    /// Output dtype for float tensors (default: the base's, tensor by tensor).
    #[arg(long, value_parser = parse_dtype)]
    #[serde(serialize_with = "dtype_name")]
    pub out_dtype: Option<FloatType>,

    /// Keep the base's chat template and eos ids instead of the chat model's.
    #[arg(long)]
    pub keep_base_template: bool,

    /// The --vector directory holds a raw delta (chat - pretrained from another
    /// tool, without chatvec's manifest), not a whole model.
    #[arg(long, requires = "vector")]
    pub raw_delta: bool,

    /// Maximum data bytes per output shard: 5GB (or 5G, 5B: billions of
    /// bytes), 500MB, 2GiB, or a number of bytes.
    #[arg(long, default_value = DEFAULT_SHARD_SIZE, value_parser = parse_size)]
    pub shard_size: Option<u64>,

    /// Downgrade config.json architecture differences to warnings (shapes must still match).
    #[arg(long)]
    pub allow_mismatch: bool,

    /// Mixture-of-experts output layout: fused (transformers 5's experts.gate_up_proj and
    /// down_proj) or per-expert (one tensor per expert); default: the base's. Inputs
    /// in either layout are lined up expert by expert.
    #[arg(long, value_name = "LAYOUT", value_parser = parse_expert_layout)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert_layout: Option<ExpertLayout>,
}

/// The vector `apply` adds.
#[derive(Clone, Debug, PartialEq)]
pub enum VectorSource {
    /// A vector written by `extract`, or a vector alias (`llama3-instruct`),
    /// which names a (chat, pretrained) pair.
    Stored(String),
    /// `chat - pretrained`, computed on the fly and never written.
    Pair {
        /// The chat model.
        chat: String,
        /// The pretrained model it was tuned from.
        pretrained: String,
    },
    /// A PEFT LoRA adapter (directory or Hub id), merged as
    /// `W + scale * scaling * (B @ A)`.
    Lora(String),
}

/// `apply`, checked: what to add to which model, every default filled in.
/// What needed no check or default is read from the params as given.
#[derive(Clone, Debug)]
pub struct ApplySpec {
    /// The params it was built from, as given.
    given: ApplyParams,
    /// The vector.
    pub(crate) vector: VectorSource,
    /// Which tensors get the vector, and each one's scale.
    pub(crate) selection: Selection,
    /// Embedding rows when vocabularies differ.
    pub(crate) embeddings: EmbeddingPolicy,
    /// Largest shard, in data bytes.
    pub(crate) shard_size: u64,
}

impl ApplyParams {
    /// `base + scale * vector` from a stored vector or vector alias, with
    /// every other parameter left at its default.
    pub fn new(base: impl Into<String>, vector: impl Into<String>) -> ApplyParams {
        ApplyParams { base: base.into(), vector: Some(vector.into()), ..ApplyParams::default() }
    }

    /// `base + scale * (chat - pretrained)`, the vector computed on the fly.
    pub fn pair(
        base: impl Into<String>,
        chat: impl Into<String>,
        pretrained: impl Into<String>,
    ) -> ApplyParams {
        let (chat, pretrained) = (Some(chat.into()), Some(pretrained.into()));
        ApplyParams { base: base.into(), chat, pretrained, ..ApplyParams::default() }
    }

    /// Checks the params as the command line's flags (errors name
    /// `--scale`, `--include`, ...).
    pub fn validate(&self) -> Result<ApplySpec> {
        self.validate_as(Spelling::Cli)
    }

    /// Checks the params; errors name them as `spelling` says (flags, or a
    /// recipe's keys).
    pub(crate) fn validate_as(&self, spelling: Spelling) -> Result<ApplySpec> {
        // Errors name a flag, or the recipe key the same setting has.
        let named = |what: &str| match spelling {
            Spelling::Cli => format!("--{what}"),
            Spelling::Recipe => match what {
                "base" => "base_model".to_string(),
                "raw-delta" => "parameters.raw_delta".to_string(),
                w => w.replace('-', "_"),
            },
        };
        let text = |v: &Option<String>, what: &str| -> Result<Option<String>> {
            match v {
                Some(s) if s.trim().is_empty() => Err(Error::Usage(format!("{} is empty", named(what)))),
                v => Ok(v.clone()),
            }
        };
        if self.base.trim().is_empty() {
            return Err(Error::Usage(format!(
                "{} is empty: name the model to give chat ability to",
                named("base")
            )));
        }
        let vector = match (
            text(&self.vector, "vector")?,
            text(&self.chat, "chat")?,
            text(&self.pretrained, "pretrained")?,
            text(&self.lora, "lora")?,
        ) {
            (Some(v), None, None, None) => VectorSource::Stored(v),
            (None, Some(chat), Some(pretrained), None) => VectorSource::Pair { chat, pretrained },
            (None, None, None, Some(a)) => VectorSource::Lora(a),
            _ => {
                return Err(Error::Usage(format!(
                    "give one vector: {}, both {} and {}, or {}",
                    named("vector"),
                    named("chat"),
                    named("pretrained"),
                    named("lora")
                )));
            }
        };
        if self.raw_delta && !matches!(vector, VectorSource::Stored(_)) {
            return Err(Error::Usage(format!("{} applies to {} only", named("raw-delta"), named("vector"))));
        }
        let scale = self.scale.clone().unwrap_or(Scale::Constant(DEFAULT_SCALE));
        let selection = Selection::new(&self.include, &self.exclude, &scale, &self.scale_for, spelling)?;
        let shard_size = self.shard_size.unwrap_or_else(default_shard_size);
        if shard_size == 0 {
            return Err(Error::Usage(format!("{} must be above 0 bytes", named("shard-size"))));
        }
        Ok(ApplySpec {
            given: self.clone(),
            vector,
            selection,
            embeddings: self.embeddings.unwrap_or(EmbeddingPolicy::Auto),
            shard_size,
        })
    }
}

impl ApplySpec {
    /// The model to give chat ability to (directory, Hub id or alias).
    pub fn base(&self) -> &str {
        &self.given.base
    }

    /// Output dtype of float tensors (`None`: the base's, tensor by tensor).
    pub fn out_dtype(&self) -> Option<FloatType> {
        self.given.out_dtype
    }

    /// Keep the base's chat template and eos ids.
    pub fn keep_base_template(&self) -> bool {
        self.given.keep_base_template
    }

    /// Turn config.json architecture differences into warnings.
    pub fn allow_mismatch(&self) -> bool {
        self.given.allow_mismatch
    }

    /// The output's expert layout (`None`: the reference model's).
    pub fn expert_layout(&self) -> Option<ExpertLayout> {
        self.given.expert_layout
    }

    /// A stored vector without a chatvec manifest is a raw delta (from
    /// another tool), not a mistake (a whole model given as a vector).
    pub fn raw_delta(&self) -> bool {
        self.given.raw_delta
    }

    /// The params as given, with the defaults written out: what the
    /// manifest records.
    pub fn given(&self) -> ApplyParams {
        ApplyParams {
            scale: Some(self.selection.default_scale().clone()),
            embeddings: Some(self.embeddings),
            shard_size: Some(self.shard_size),
            ..self.given.clone()
        }
    }

    /// The same spec with `scale` for `--scale` (a sweep's candidate).
    pub fn with_scale(&self, scale: &Scale) -> ApplySpec {
        ApplySpec {
            given: ApplyParams { scale: Some(scale.clone()), ..self.given.clone() },
            selection: self.selection.with_default_scale(scale),
            ..self.clone()
        }
    }

    /// Warnings about scales a chat vector is rarely used with, read from
    /// the checked scale and `--scale-for` values.
    pub fn scale_warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in self.selection.scale_values() {
            if s == 0.0 {
                out.push("a scale of 0 adds nothing: those tensors stay as in the base".to_string());
            } else if s.abs() > 3.0 {
                out.push(format!(
                    "a scale of {s} is far outside what chat vectors use (0.5 to 1.0); check the output before using it"
                ));
            }
        }
        out.dedup();
        out
    }
}

/// `extract`'s parameters as the user wrote them.
#[derive(Args, Serialize, Clone, Debug, Default, PartialEq)]
pub struct ExtractParams {
    /// The chat / instruct model (directory, Hub id org/name or org/name@rev, or alias).
    #[arg(
        long,
        value_name = "MODEL",
        required_unless_present = "vector",
        requires = "pretrained",
        alias = "model"
    )]
    pub chat: Option<String>,

    /// The pretrained model the chat model was tuned from (directory, Hub id or alias).
    #[arg(
        long,
        value_name = "MODEL",
        required_unless_present = "vector",
        requires = "chat",
        alias = "base-model"
    )]
    pub pretrained: Option<String>,

    /// With --rank: decompose this chat vector (written by `chatvec extract`, or a vector alias)
    /// instead of a --chat/--pretrained pair.
    #[arg(long, value_name = "VECTOR", conflicts_with_all = ["chat", "pretrained"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vector: Option<String>,

    /// Vector dtype: bf16, f16 or f32 (default: the chat model's). f32 is exact.
    #[arg(long, value_parser = parse_dtype)]
    #[serde(rename = "out_dtype", serialize_with = "dtype_name")]
    pub dtype: Option<FloatType>,

    /// Only operate on tensors matching this regex (repeatable; default: all).
    #[arg(long, value_name = "REGEX", alias = "include-regex")]
    pub include: Vec<String>,

    /// Leave tensors matching this regex untouched (repeatable).
    #[arg(long, value_name = "REGEX", alias = "exclude-regex")]
    pub exclude: Vec<String>,

    /// Maximum data bytes per output shard: 5GB (or 5G, 5B: billions of
    /// bytes), 500MB, 2GiB, or a number of bytes.
    #[arg(long, default_value = DEFAULT_SHARD_SIZE, value_parser = parse_size)]
    pub shard_size: Option<u64>,

    /// Downgrade config.json architecture differences to warnings (shapes must still match).
    #[arg(long)]
    pub allow_mismatch: bool,

    /// Mixture-of-experts output layout: fused (transformers 5's experts.gate_up_proj and
    /// down_proj) or per-expert (one tensor per expert); default: the chat model's. Inputs
    /// in either layout are lined up expert by expert.
    #[arg(long, value_name = "LAYOUT", value_parser = parse_expert_layout)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert_layout: Option<ExpertLayout>,

    /// The LoRA adapter options (--rank and the rest).
    #[command(flatten)]
    #[serde(flatten)]
    pub lora: LoraParams,
}

/// `extract`, checked.
#[derive(Clone, Debug)]
pub struct ExtractSpec {
    given: ExtractParams,
    /// Which tensors the vector holds.
    pub(crate) selection: Selection,
    /// Largest shard, in data bytes.
    pub(crate) shard_size: u64,
    /// What to decompose (a pair or a stored vector) when an adapter is asked for.
    pub(crate) source: VectorSource,
    /// Set when a LoRA adapter is written instead of the vector.
    pub(crate) lora: Option<LoraSpec>,
}

impl ExtractParams {
    /// `chat - pretrained` of every tensor, in the chat model's dtype.
    pub fn new(chat: impl Into<String>, pretrained: impl Into<String>) -> ExtractParams {
        ExtractParams {
            chat: Some(chat.into()),
            pretrained: Some(pretrained.into()),
            ..ExtractParams::default()
        }
    }

    /// Checks the params (errors name the command line's flags).
    pub fn validate(&self) -> Result<ExtractSpec> {
        let lora = self.lora.validate()?;
        let source = match (&self.vector, &self.chat, &self.pretrained) {
            (Some(v), None, None) => {
                if lora.is_none() {
                    return Err(Error::Usage(format!(
                        "--vector {v}: a stored vector is extracted already; give --rank R to write it as a LoRA adapter"
                    )));
                }
                VectorSource::Stored(v.clone())
            }
            (None, Some(c), Some(p)) => VectorSource::Pair { chat: c.clone(), pretrained: p.clone() },
            _ => return Err(Error::Usage("give --chat and --pretrained (or, with --rank, --vector)".into())),
        };
        for (what, v) in
            [("--chat", &self.chat), ("--pretrained", &self.pretrained), ("--vector", &self.vector)]
        {
            if v.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(Error::Usage(format!("{what} is empty")));
            }
        }
        let one = Scale::Constant(DEFAULT_SCALE);
        let selection = Selection::new(&self.include, &self.exclude, &one, &[], Spelling::Cli)?;
        let shard_size = self.shard_size.unwrap_or_else(default_shard_size);
        if shard_size == 0 {
            return Err(Error::Usage("--shard-size must be above 0 bytes".into()));
        }
        Ok(ExtractSpec { given: self.clone(), selection, shard_size, source, lora })
    }
}

impl ExtractSpec {
    /// The params as given, defaults written out (for the manifest).
    pub fn given(&self) -> ExtractParams {
        ExtractParams { shard_size: Some(self.shard_size), ..self.given.clone() }
    }

    /// The chat model.
    pub fn chat(&self) -> &str {
        self.given.chat.as_deref().unwrap_or_default()
    }

    /// The pretrained model.
    pub fn pretrained(&self) -> &str {
        self.given.pretrained.as_deref().unwrap_or_default()
    }

    /// The vector's dtype (`None`: the chat model's).
    pub fn dtype(&self) -> Option<FloatType> {
        self.given.dtype
    }

    /// Whether config.json differences are warnings.
    pub fn allow_mismatch(&self) -> bool {
        self.given.allow_mismatch
    }

    /// The output's expert layout (`None`: the reference model's).
    pub fn expert_layout(&self) -> Option<ExpertLayout> {
        self.given.expert_layout
    }
}

/// A dtype as the manifest has always named it (`BF16`).
fn dtype_name<S: serde::Serializer>(t: &Option<FloatType>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(t.dtype().name()),
        None => s.serialize_none(),
    }
}

fn parse_expert_layout(s: &str) -> std::result::Result<ExpertLayout, String> {
    ExpertLayout::parse(s).ok_or_else(|| format!("'{s}' is not an expert layout (fused, per-expert)"))
}

fn parse_dtype(s: &str) -> std::result::Result<FloatType, String> {
    FloatType::parse_cli(s).ok_or_else(|| format!("'{s}' is not a dtype chatvec writes (bf16, f16, f32)"))
}

/// A scale as an f32, refused as typed when it is not a finite f32 (1e40
/// is out of range, not "inf").
pub fn parse_scale(s: &str) -> std::result::Result<Scale, String> {
    Scale::parse(s, "--scale")
        .map_err(|_| "expected a finite number an f32 can hold (|x| <= 3.4e38) or a list of them, e.g. 0.5 or [0.3, 1.0]".into())
}

fn embedding_policy() -> impl TypedValueParser<Value = EmbeddingPolicy> {
    PossibleValuesParser::new(EmbeddingPolicy::ALL.map(|p| p.name()))
        .map(|s| s.parse::<EmbeddingPolicy>().unwrap_or(EmbeddingPolicy::Auto))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_shard_size_parses() {
        assert_eq!(default_shard_size(), 5_000_000_000);
    }

    #[test]
    fn defaults_are_filled_once_and_recorded() {
        let spec = ApplyParams::new("b", "v").validate().unwrap();
        let given = spec.given();
        assert_eq!(given.scale, Some(Scale::Constant(1.0)));
        assert_eq!(given.embeddings, Some(EmbeddingPolicy::Auto));
        assert_eq!(given.shard_size, Some(5_000_000_000));
        let json = serde_json::to_value(&given).unwrap();
        assert_eq!(json["scale"], 1.0);
        assert_eq!(json["embeddings"], "auto");
        assert!(json.get("chat").is_none(), "{json}");
    }

    #[test]
    fn one_vector_source_is_required() {
        let both = ApplyParams { chat: Some("c".into()), ..ApplyParams::new("b", "v") };
        let e = both.validate().unwrap_err().to_string();
        assert!(e.contains("give one vector: --vector, both --chat and --pretrained, or --lora"), "{e}");
        let none = ApplyParams { base: "b".into(), ..ApplyParams::default() };
        assert!(none.validate().is_err());
        let raw = ApplyParams {
            raw_delta: true,
            lora: Some("a".into()),
            vector: None,
            ..ApplyParams::new("b", "v")
        };
        assert!(raw.validate().unwrap_err().to_string().contains("--raw-delta applies to --vector only"));
    }

    #[test]
    fn a_candidate_scale_replaces_the_default_but_not_the_rules() {
        let p = ApplyParams { scale_for: vec!["mlp=0.25".into()], ..ApplyParams::new("b", "v") };
        let spec = p.validate().unwrap().with_scale(&Scale::Constant(4.0));
        assert_eq!(spec.selection.scale("model.layers.0.mlp.up_proj.weight"), 0.25);
        assert_eq!(spec.selection.scale("model.layers.0.self_attn.q_proj.weight"), 4.0);
        assert_eq!(spec.given().scale, Some(Scale::Constant(4.0)));
        assert_eq!(spec.scale_warnings().len(), 1, "{:?}", spec.scale_warnings());
    }
}
