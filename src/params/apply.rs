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
#[command(group(ArgGroup::new("vector_source").required(true).multiple(true).args(["vector", "chat", "lora"])))]
pub struct ApplyParams {
    /// The model to give chat ability to, e.g. a continued-pretrained model (directory, Hub id or alias).
    #[arg(long, value_name = "MODEL")]
    pub base: String,

    /// A chat vector written by `chatvec extract`, or a vector alias such as llama3-instruct.
    /// Repeatable, with --chat/--pretrained pairs too: the vectors are added in one pass,
    /// in the order given, each with the --scale that follows it.
    #[arg(long, value_name = "VECTOR")]
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "one_or_list")]
    pub vector: Vec<String>,

    /// The chat model (with --pretrained: stream the vector without writing it; repeatable).
    #[arg(long, value_name = "MODEL", requires = "pretrained")]
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "one_or_list")]
    pub chat: Vec<String>,

    /// The pretrained model the chat model was tuned from (one per --chat, in order).
    #[arg(long, value_name = "MODEL", requires = "chat")]
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "one_or_list")]
    pub pretrained: Vec<String>,

    /// A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors; directory or Hub id)
    /// to merge into --base, the model it was trained on; --scale multiplies its alpha / r.
    #[arg(long, value_name = "ADAPTER", conflicts_with_all = ["vector", "chat", "pretrained", "raw_delta", "embeddings"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<String>,

    /// Scale of the vector (default 1): a number, or a gradient over the layers, e.g. '[0.3, 1.0]'
    /// (interpolated from the first layer to the last; embeddings take the first value, lm_head the last).
    /// With several vectors, each --scale follows the vector it scales.
    #[arg(long, value_parser = parse_scale, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "one_or_list")]
    pub scale: Vec<Scale>,

    /// Scale for tensors matching REGEX, a number or a gradient, e.g. 'mlp\.=0.5' or
    /// 'self_attn=[0.3, 1.0]' (repeatable; first match wins; with several vectors, for each of them).
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

    /// Output dtype for float tensors (default: the base's, tensor by tensor; a quantized base's
    /// weights as bf16): bf16, f16, f32; fp8 writes an FP8 base's block-scaled weights as FP8
    /// again, in its blocks; mxfp4 writes an MXFP4 base's experts (gpt-oss) as MXFP4 again.
    #[arg(long, value_parser = parse_out_dtype)]
    #[serde(serialize_with = "out_dtype_name")]
    pub out_dtype: Option<OutDtype>,

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

    /// Where the vector flags stood on the command line (set by the
    /// command line's parser; `None` from a recipe or the library, where
    /// the k-th scale goes with the k-th vector).
    #[arg(skip)]
    #[serde(skip)]
    pub positions: Option<FlagPositions>,
}

/// The command-line positions (clap's indices) of `apply`'s vector flags,
/// so that each `--scale` is paired with the vector written before it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FlagPositions {
    /// Of each `--vector`, in order.
    pub vector: Vec<usize>,
    /// Of each `--chat`.
    pub chat: Vec<usize>,
    /// Of each `--pretrained`.
    pub pretrained: Vec<usize>,
    /// Of each `--scale`.
    pub scale: Vec<usize>,
}

/// `apply --out-dtype`: a float dtype for every float tensor, or the
/// quantized scheme of the weights a quantized base stores so
/// (`plan::requant`): FP8 or MXFP4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutDtype {
    /// bf16, f16 or f32.
    Float(FloatType),
    /// The base's block-scaled FP8 E4M3 weights written as FP8 again.
    Fp8,
    /// The base's MXFP4 experts (gpt-oss) written as MXFP4 again.
    Mxfp4,
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
    /// The vector (the first, with several).
    pub(crate) vector: VectorSource,
    /// With several vectors: those after the first, each with its scale,
    /// in the order given.
    pub(crate) more: Vec<(VectorSource, Scale)>,
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
        ApplyParams { base: base.into(), vector: vec![vector.into()], ..ApplyParams::default() }
    }

    /// `base + scale * (chat - pretrained)`, the vector computed on the fly.
    pub fn pair(
        base: impl Into<String>,
        chat: impl Into<String>,
        pretrained: impl Into<String>,
    ) -> ApplyParams {
        let (chat, pretrained) = (vec![chat.into()], vec![pretrained.into()]);
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
        let texts = |v: &[String], what: &str| -> Result<Vec<String>> {
            v.iter().map(|x| text(&Some(x.clone()), what).map(Option::unwrap_or_default)).collect()
        };
        let (vectors, chats, pres) = (
            texts(&self.vector, "vector")?,
            texts(&self.chat, "chat")?,
            texts(&self.pretrained, "pretrained")?,
        );
        let lora = text(&self.lora, "lora")?;
        let one_vector = || {
            Error::Usage(format!(
                "give one vector: {}, both {} and {}, or {}",
                named("vector"),
                named("chat"),
                named("pretrained"),
                named("lora")
            ))
        };
        if chats.len() != pres.len() {
            return Err(Error::Usage(format!(
                "each {} needs its {} ({} {}, {} {})",
                named("chat"),
                named("pretrained"),
                chats.len(),
                named("chat"),
                pres.len(),
                named("pretrained")
            )));
        }
        // Each vector with where it was written (its position on the
        // command line, or its order: vectors, then pairs).
        let pos = self.positions.as_ref();
        let at = |list: Option<&Vec<usize>>, k: usize, fallback: usize| {
            list.and_then(|l| l.get(k)).copied().unwrap_or(fallback)
        };
        let mut sources: Vec<(usize, VectorSource)> = vectors
            .into_iter()
            .enumerate()
            .map(|(k, v)| (at(pos.map(|p| &p.vector), k, k), VectorSource::Stored(v)))
            .collect();
        let first_pair = sources.len();
        for (k, (chat, pretrained)) in chats.into_iter().zip(pres).enumerate() {
            let written = at(pos.map(|p| &p.chat), k, first_pair + k).min(at(
                pos.map(|p| &p.pretrained),
                k,
                first_pair + k,
            ));
            sources.push((written, VectorSource::Pair { chat, pretrained }));
        }
        sources.sort_by_key(|(p, _)| *p);
        match (lora, sources.is_empty()) {
            (Some(a), true) => sources.push((0, VectorSource::Lora(a))),
            (None, false) => {}
            _ => return Err(one_vector()),
        }
        if self.raw_delta && !sources.iter().any(|(_, v)| matches!(v, VectorSource::Stored(_))) {
            return Err(Error::Usage(format!("{} applies to {} only", named("raw-delta"), named("vector"))));
        }
        let scales = pair_scales(&sources, &self.scale, pos.map(|p| p.scale.as_slice()), &named)?;
        let mut terms = sources.into_iter().map(|(_, v)| v).zip(scales);
        let Some((vector, scale)) = terms.next() else { return Err(one_vector()) };
        let more: Vec<(VectorSource, Scale)> = terms.collect();
        let selection = Selection::new(&self.include, &self.exclude, &scale, &self.scale_for, spelling)?;
        for (_, s) in &more {
            Scale::from_values(s.values(), spelling.scale())?;
        }
        let shard_size = self.shard_size.unwrap_or_else(default_shard_size);
        if shard_size == 0 {
            return Err(Error::Usage(format!("{} must be above 0 bytes", named("shard-size"))));
        }
        Ok(ApplySpec {
            given: self.clone(),
            vector,
            more,
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
        match self.given.out_dtype {
            Some(OutDtype::Float(t)) => Some(t),
            _ => None,
        }
    }

    /// The scheme a quantized base's weights are written in again
    /// (`OutDtype::Fp8` or `OutDtype::Mxfp4`), if asked.
    pub fn requantize(&self) -> Option<OutDtype> {
        self.given.out_dtype.filter(|d| matches!(d, OutDtype::Fp8 | OutDtype::Mxfp4))
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
        let more = self.more.iter().map(|(_, s)| s.clone());
        ApplyParams {
            scale: std::iter::once(self.selection.default_scale().clone()).chain(more).collect(),
            embeddings: Some(self.embeddings),
            shard_size: Some(self.shard_size),
            ..self.given.clone()
        }
    }

    /// The same spec with `scale` for `--scale` (a sweep's candidate).
    pub fn with_scale(&self, scale: &Scale) -> ApplySpec {
        ApplySpec {
            given: ApplyParams { scale: vec![scale.clone()], ..self.given.clone() },
            selection: self.selection.with_default_scale(scale),
            ..self.clone()
        }
    }

    /// Warnings about scales a chat vector is rarely used with, read from
    /// the checked scale and `--scale-for` values.
    pub fn scale_warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let more = self.more.iter().flat_map(|(_, s)| s.values());
        for s in self.selection.scale_values().into_iter().chain(more) {
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

/// Pairs each vector (sorted by where it was written) with its scale: the
/// default for a vector without one. With `positions` (the command line),
/// a `--scale` belongs to the last vector written before it (or to the one
/// vector, wherever it stands); without, the k-th scale to the k-th vector.
fn pair_scales(
    sources: &[(usize, VectorSource)],
    given: &[Scale],
    positions: Option<&[usize]>,
    named: &dyn Fn(&str) -> String,
) -> Result<Vec<Scale>> {
    let default = Scale::Constant(DEFAULT_SCALE);
    let flag = named("scale");
    let name = |v: &VectorSource| match v {
        VectorSource::Stored(v) | VectorSource::Lora(v) => v.clone(),
        VectorSource::Pair { chat, pretrained } => format!("{chat} - {pretrained}"),
    };
    if sources.len() == 1 {
        return match given {
            [] => Ok(vec![default]),
            [s] => Ok(vec![s.clone()]),
            _ => Err(Error::Usage(format!(
                "{} values of {flag} for one vector; give one (per-tensor scales: {})",
                given.len(),
                named("scale-for")
            ))),
        };
    }
    let Some(positions) = positions.filter(|p| p.len() == given.len()) else {
        return match given.len() {
            0 => Ok(vec![default; sources.len()]),
            n if n == sources.len() => Ok(given.to_vec()),
            n => Err(Error::Usage(format!(
                "{} vectors and {n} values of {flag}: give one per vector, in the same order",
                sources.len()
            ))),
        };
    };
    let mut out: Vec<Option<Scale>> = vec![None; sources.len()];
    for (s, &p) in given.iter().zip(positions) {
        let Some(k) = sources.iter().rposition(|(at, _)| *at < p) else {
            return Err(Error::Usage(format!(
                "{flag} {s} comes before any vector: with several vectors, write each {flag} after the vector it scales"
            )));
        };
        if out[k].replace(s.clone()).is_some() {
            return Err(Error::Usage(format!(
                "vector {} has two values of {flag}; write one after each vector",
                name(&sources[k].1)
            )));
        }
    }
    Ok(out.into_iter().map(|s| s.unwrap_or_else(|| default.clone())).collect())
}

/// A list of one as its element (what the manifest has always written for
/// one vector and one scale), of several as a list.
fn one_or_list<T: Serialize, S: serde::Serializer>(v: &[T], s: S) -> std::result::Result<S::Ok, S::Error> {
    match v {
        [one] => one.serialize(s),
        many => many.serialize(s),
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

fn parse_out_dtype(s: &str) -> std::result::Result<OutDtype, String> {
    match s.to_ascii_lowercase().as_str() {
        "fp8" | "f8_e4m3" | "float8_e4m3fn" => Ok(OutDtype::Fp8),
        "mxfp4" => Ok(OutDtype::Mxfp4),
        _ => FloatType::parse_cli(s)
            .map(OutDtype::Float)
            .ok_or_else(|| format!("'{s}' is not a dtype chatvec writes (bf16, f16, f32, fp8, mxfp4)")),
    }
}

/// `--out-dtype` as the manifest names it (`BF16`, `F8_E4M3`).
fn out_dtype_name<S: serde::Serializer>(t: &Option<OutDtype>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match t {
        Some(OutDtype::Float(f)) => s.serialize_str(f.dtype().name()),
        Some(OutDtype::Fp8) => s.serialize_str("F8_E4M3"),
        Some(OutDtype::Mxfp4) => s.serialize_str("MXFP4"),
        None => s.serialize_none(),
    }
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
        assert_eq!(given.scale, vec![Scale::Constant(1.0)]);
        assert_eq!(given.embeddings, Some(EmbeddingPolicy::Auto));
        assert_eq!(given.shard_size, Some(5_000_000_000));
        let json = serde_json::to_value(&given).unwrap();
        assert_eq!(json["scale"], 1.0);
        assert_eq!(json["embeddings"], "auto");
        assert!(json.get("chat").is_none(), "{json}");
    }

    #[test]
    fn one_vector_source_is_required() {
        let both = ApplyParams { lora: Some("a".into()), ..ApplyParams::new("b", "v") };
        let e = both.validate().unwrap_err().to_string();
        assert!(e.contains("give one vector: --vector, both --chat and --pretrained, or --lora"), "{e}");
        let half = ApplyParams { chat: vec!["c".into()], ..ApplyParams::new("b", "v") };
        let e = half.validate().unwrap_err().to_string();
        assert!(e.contains("each --chat needs its --pretrained (1 --chat, 0 --pretrained)"), "{e}");
        let none = ApplyParams { base: "b".into(), ..ApplyParams::default() };
        assert!(none.validate().is_err());
        let raw = ApplyParams {
            raw_delta: true,
            lora: Some("a".into()),
            vector: Vec::new(),
            ..ApplyParams::new("b", "v")
        };
        assert!(raw.validate().unwrap_err().to_string().contains("--raw-delta applies to --vector only"));
    }

    #[test]
    fn without_positions_the_kth_scale_goes_with_the_kth_vector() {
        let p = ApplyParams {
            vector: vec!["v1".into(), "v2".into()],
            chat: vec!["c".into()],
            pretrained: vec!["p".into()],
            scale: vec![Scale::Constant(0.5), Scale::Constant(2.0), Scale::Constant(-1.0)],
            ..ApplyParams::new("b", "unused")
        };
        let spec = p.validate().unwrap();
        assert_eq!(spec.vector, VectorSource::Stored("v1".into()));
        assert_eq!(spec.selection.default_scale(), &Scale::Constant(0.5));
        let more: Vec<_> = spec.more.iter().map(|(v, s)| (v.clone(), s.clone())).collect();
        assert_eq!(
            more,
            vec![
                (VectorSource::Stored("v2".into()), Scale::Constant(2.0)),
                (VectorSource::Pair { chat: "c".into(), pretrained: "p".into() }, Scale::Constant(-1.0))
            ]
        );
        let json = serde_json::to_value(spec.given()).unwrap();
        assert_eq!(json["scale"], serde_json::json!([0.5, 2.0, -1.0]));
        assert_eq!(json["chat"], "c", "one of a kind stays a string, as older manifests have it");
        let short = ApplyParams { scale: vec![Scale::Constant(0.5), Scale::Constant(2.0)], ..p.clone() };
        let e = short.validate().unwrap_err().to_string();
        assert!(
            e.contains("3 vectors and 2 values of --scale: give one per vector, in the same order"),
            "{e}"
        );
        let none = ApplyParams { scale: Vec::new(), ..p };
        let spec = none.validate().unwrap();
        assert!(spec.more.iter().all(|(_, s)| *s == Scale::Constant(1.0)));
    }

    #[test]
    fn a_candidate_scale_replaces_the_default_but_not_the_rules() {
        let p = ApplyParams { scale_for: vec!["mlp=0.25".into()], ..ApplyParams::new("b", "v") };
        let spec = p.validate().unwrap().with_scale(&Scale::Constant(4.0));
        assert_eq!(spec.selection.scale("model.layers.0.mlp.up_proj.weight"), 0.25);
        assert_eq!(spec.selection.scale("model.layers.0.self_attn.q_proj.weight"), 4.0);
        assert_eq!(spec.given().scale, vec![Scale::Constant(4.0)]);
        assert_eq!(spec.scale_warnings().len(), 1, "{:?}", spec.scale_warnings());
    }
}
