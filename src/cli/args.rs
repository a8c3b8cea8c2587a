//! The command line's arguments (clap derive: the doc comments are the
//! help text) and their conversion into the library's specs.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use chatvec::{
    AnalyzeSpec, ApplyParams, Destination, DeviceChoice, EvalSpec, ExtractParams, FloatType, InputHashes,
    Recipe, RunOptions, Scale, SftOptions, VectorSource, parse_scale, parse_size, parse_train_arg,
};

const EXAMPLES: &str = "\
Examples:
  chatvec demo                                            the main job on tiny built-in models
  chatvec apply --base swallow-8b --vector llama3-instruct -o swallow-8b-cv
  chatvec merge llama3-swallow-8b-ties -o swallow-8b-ties  a shipped recipe
  chatvec list                                            aliases and shipped recipes
  chatvec inspect swallow-8b-cv";

/// chatvec: give continued-pretrained LLMs chat ability by weight arithmetic.
///
/// A chat vector is `chat - pretrained` (e.g. Llama-3-8B-Instruct minus
/// Llama-3-8B); `apply` adds it, scaled, to a model continued-pretrained from
/// the same base (e.g. Llama-3-Swallow-8B). A MODEL is a local directory, an
/// alias (`chatvec list`) or a Hub id org/name[@revision]. Exit codes: 0 ok,
/// 1 bad input or usage, 2 I/O, network or internal error, 130 interrupted.
#[derive(Parser, Debug)]
#[command(name = "chatvec", version, max_term_width = 100, after_help = EXAMPLES)]
pub(crate) struct Cli {
    /// No progress bars or notes on stderr (errors and warnings still print).
    #[arg(short, long, global = true)]
    pub quiet: bool,

    /// Print one JSON document on stdout instead of text (notes and warnings stay on stderr).
    #[arg(long, global = true)]
    pub json: bool,

    /// A file of extra model and vector aliases (default: $CHATVEC_ALIASES).
    #[arg(long, global = true, value_name = "FILE")]
    pub aliases: Option<PathBuf>,

    /// Never use the network: Hub models must already be in the cache (also HF_HUB_OFFLINE=1).
    #[arg(long, global = true)]
    pub offline: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Write the chat vector `chat - pretrained` as a safetensors checkpoint.
    #[command(
        after_help = "Example:\n  chatvec extract --chat llama3-8b-instruct --pretrained llama3-8b --dtype f32 -o llama3-cv"
    )]
    Extract(ExtractArgs),
    /// Add a scaled chat vector to a model, `base + scale * (chat - pretrained)`, or merge a LoRA adapter (--lora).
    #[command(
        after_help = "Examples:\n  chatvec apply --base swallow-8b --vector llama3-instruct -o swallow-8b-cv\n  chatvec apply --base swallow-8b --chat llama3-8b-instruct --pretrained llama3-8b --scale 0.8 -o out\n  chatvec apply --base swallow-8b --vector llama3-cv --scale-for 'mlp\\.=0.5' -o out --dry-run"
    )]
    Apply(ApplyArgs),
    /// Report what a chat vector is: per-layer and per-module norms, relative norms, cosines
    /// with another vector, the effective scale of an applied output, and pair checks.
    #[command(
        after_help = "Examples:\n  chatvec analyze --vector llama3-instruct --base swallow-8b --plot cv.svg\n  chatvec analyze --chat swallow-8b-instruct --pretrained swallow-8b --against llama3-instruct\n  chatvec analyze --vector llama3-cv --base swallow-8b --applied swallow-8b-cv"
    )]
    Analyze(AnalyzeArgs),
    /// Apply a chat vector at several scales: one complete model per candidate under -o DIR.
    #[command(
        after_help = "Example:\n  chatvec sweep --base swallow-8b --vector llama3-instruct --scales 0.5,0.75,1 -o swallow-8b-sweep\n  chatvec eval swallow-8b-sweep/scale-*"
    )]
    Sweep(SweepArgs),
    /// Score models as chat models (a sweep's candidates, say): assistant-token loss on held-out
    /// chat data, stop rate, answer language, sample answers; ranked by a stated rule.
    #[command(
        after_help = "Examples:\n  chatvec eval swallow-8b-sweep/scale-0.5 swallow-8b-sweep/scale-1\n  chatvec eval swallow-8b-cv --data held-out.jsonl --prompts prompts.jsonl --plot eval.svg"
    )]
    Eval(EvalSpec),
    /// Run a merge recipe (chatvec TOML or mergekit YAML): chat vector, linear, TIES, DARE, SLERP, ...
    #[command(
        after_help = "Examples:\n  chatvec merge llama3-swallow-8b-chat-vector -o swallow-8b-cv\n  chatvec merge mergekit-config.yml -o out --dry-run\n  chatvec merge mergekit-config.yml out --cuda --copy-tokenizer   # mergekit-yaml's command line"
    )]
    Merge(MergeArgs),
    /// Re-hash an output against its manifest; with --recipe, check the recipe and inputs too.
    #[command(after_help = "Example:\n  chatvec verify swallow-8b-cv --recipe llama3-swallow-8b-chat-vector")]
    Verify(VerifyArgs),
    /// Supervised fine-tuning of a model with TRL (launched and supervised as a child process).
    #[command(
        after_help = "Examples:\n  chatvec sft --model swallow-8b-cv --data chat.jsonl -o run-sft --dry-run\n  chatvec sft --model swallow-8b-cv --data chat.jsonl -o run-sft --nproc 8 --fsdp"
    )]
    Sft(SftArgs),
    /// Run a TOML recipe with an [sft] section: merge (or [sweep] and [eval] to choose a scale), verify, then SFT.
    Run(MergeArgs),
    /// Fill the Hugging Face cache with models as a job would fetch them (for login nodes), or the
    /// files matching --include; --dry-run lists what would come.
    #[command(
        after_help = "Examples:\n  chatvec download swallow-8b llama3-instruct\n  chatvec download meta-llama/Meta-Llama-3-8B --include 'original/*' --dry-run"
    )]
    Download(DownloadArgs),
    /// Publish a model chatvec wrote to the Hugging Face Hub: verified first, large files through
    /// the Hub's large-file storage, resumable, one commit.
    #[command(
        after_help = "Examples:\n  chatvec push swallow-8b-cv your-name/Llama-3-Swallow-8B-cv --create --private --dry-run\n  chatvec push run-sft/model your-name/Llama-3-Swallow-8B-sft --revision v1 --message 'SFT, 1 epoch'"
    )]
    Push(PushArgs),
    /// Show a checkpoint's shards, tensors, parameter count and config.
    #[command(after_help = "Example:\n  chatvec inspect swallow-8b")]
    Inspect(InspectArgs),
    /// List the model and vector aliases and the shipped recipes.
    List,
    /// Run inspect, extract, apply and analyze on tiny built-in models (no download).
    Demo(DemoArgs),
    /// Measure apply and merges on generated Llama-shaped checkpoints against the disk and memory floor.
    #[cfg(feature = "bench")]
    Bench(super::bench::BenchArgs),
}

#[derive(Args, Debug)]
pub(crate) struct DownloadArgs {
    /// Hub ids (org/name[@revision]) or aliases; a vector alias names both of its models.
    #[arg(required = true, value_name = "MODEL")]
    pub models: Vec<String>,
    /// Only the files matching this pattern (fnmatch, as huggingface_hub's allow_patterns; repeatable).
    #[arg(long, value_name = "PATTERN")]
    pub include: Vec<String>,
    /// List the files and sizes that would be downloaded; download nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub(crate) struct SweepArgs {
    /// The candidate scales, comma-separated; a bracketed list is a gradient over the layers:
    /// '0.5,0.75,1' or '0.5,1,[0.3, 1.0]'.
    #[arg(long, value_parser = parse_scales, allow_negative_numbers = true)]
    pub scales: ScaleList,

    #[command(flatten)]
    pub apply: ApplyArgs,
}

/// `--scales`: the candidates, in order.
#[derive(Clone, Debug)]
pub(crate) struct ScaleList(pub Vec<Scale>);

/// Splits `0.5,0.75,[0.3, 1.0]` at the commas outside brackets.
fn lora_merge_dtype(s: &str) -> Result<FloatType, String> {
    FloatType::parse_cli(s).ok_or_else(|| format!("'{s}' is not bfloat16, float16 or float32"))
}

fn expert_layout(s: &str) -> Result<chatvec::ExpertLayout, String> {
    chatvec::ExpertLayout::parse(s)
        .ok_or_else(|| format!("'{s}' is not an expert layout (fused, per-expert)"))
}

fn parse_scales(s: &str) -> Result<ScaleList, String> {
    let (mut parts, mut depth, mut cur) = (Vec::new(), 0i32, String::new());
    for c in s.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    parts.push(cur);
    parts
        .iter()
        .map(|p| parse_scale(p).map_err(|e| format!("'{}': {e}", p.trim())))
        .collect::<Result<Vec<_>, _>>()
        .map(ScaleList)
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("vector_source").required(true).args(["vector", "chat"])))]
pub(crate) struct AnalyzeArgs {
    /// A chat vector written by `chatvec extract` (or a raw delta), or a vector alias.
    #[arg(long, value_name = "VECTOR", conflicts_with_all = ["chat", "pretrained"])]
    pub vector: Option<String>,

    /// The chat model (with --pretrained: the vector is chat - pretrained).
    #[arg(long, value_name = "MODEL", requires = "pretrained")]
    pub chat: Option<String>,

    /// The pretrained model the chat model was tuned from.
    #[arg(long, value_name = "MODEL", requires = "chat")]
    pub pretrained: Option<String>,

    /// Compare with this vector (stored or alias): cosine and sign agreement.
    #[arg(long, value_name = "VECTOR", conflicts_with_all = ["against_chat", "against_pretrained"])]
    pub against: Option<String>,

    /// Compare with this chat model minus --against-pretrained.
    #[arg(long, value_name = "MODEL", requires = "against_pretrained")]
    pub against_chat: Option<String>,

    /// The pretrained model of --against-chat.
    #[arg(long, value_name = "MODEL", requires = "against_chat")]
    pub against_pretrained: Option<String>,

    /// The model the vector would be applied to: norms relative to it, config checks.
    #[arg(long, value_name = "MODEL")]
    pub base: Option<String>,

    /// An output of `apply` on --base: the scale each tensor actually got.
    #[arg(long, value_name = "DIR", requires = "base")]
    pub applied: Option<String>,

    /// Write a picture (self-contained SVG): per-layer norms, and with --against a cosine heatmap.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,

    /// Replace an existing --plot file.
    #[arg(long)]
    pub force: bool,

    /// Threads (default: one per core). The figures do not depend on it.
    #[arg(long)]
    pub threads: Option<usize>,
}

impl AnalyzeArgs {
    pub(crate) fn spec(&self) -> AnalyzeSpec {
        let vector = match (&self.vector, &self.chat, &self.pretrained) {
            (Some(v), _, _) => VectorSource::Stored(v.clone()),
            (None, c, p) => VectorSource::Pair {
                chat: c.clone().unwrap_or_default(),
                pretrained: p.clone().unwrap_or_default(),
            },
        };
        let against = match (&self.against, &self.against_chat, &self.against_pretrained) {
            (Some(v), _, _) => Some(VectorSource::Stored(v.clone())),
            (None, Some(c), Some(p)) => Some(VectorSource::Pair { chat: c.clone(), pretrained: p.clone() }),
            _ => None,
        };
        AnalyzeSpec {
            vector,
            against,
            base: self.base.clone(),
            applied: self.applied.clone(),
            plot: self.plot.clone(),
            force: self.force,
            threads: self.threads,
        }
    }
}

/// Where a command writes its output, and how it runs.
#[derive(Args, Debug)]
pub(crate) struct OutArgs {
    /// Output directory (created; must not exist unless --force).
    #[arg(short, long, alias = "out-path")]
    pub output: PathBuf,

    #[command(flatten)]
    pub how: How,
}

impl OutArgs {
    /// Where to write.
    pub(crate) fn destination(&self) -> Destination {
        self.how.destination(&self.output)
    }

    /// How to run.
    pub(crate) fn run_options(&self) -> RunOptions {
        self.how.run_options()
    }
}

/// How a writing command runs (every one takes these).
#[derive(Args, Debug)]
pub(crate) struct How {
    /// Replace an earlier chatvec output (one with a manifest) or an empty directory.
    #[arg(long)]
    pub force: bool,

    /// Print the plan (every output tensor, its formula and shard) and write nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Compute threads (default: one per core). Output bytes do not depend on it.
    /// mergekit's -j/--num-threads work too.
    #[arg(long, short = 'j', alias = "num-threads")]
    pub threads: Option<usize>,

    /// Hash every input shard again instead of trusting the hash cache
    /// (~/.cache/chatvec, or $CHATVEC_CACHE_DIR).
    #[arg(long)]
    pub rehash: bool,

    /// Where the arithmetic runs: cpu, cuda, cuda:N, or auto (a GPU when one
    /// works, else the CPU). Output bytes are the same on every device.
    #[arg(long, default_value_t = RunOptions::default().device, value_parser = DeviceChoice::parse)]
    pub device: DeviceChoice,

    /// Device memory chatvec may use, e.g. 4GiB (default: half the free memory, at most 8 GiB).
    #[arg(long, value_parser = parse_size)]
    pub gpu_memory: Option<u64>,

    /// Write the weights even when no config.json comes with them (the
    /// base has none); without it such an output is refused, since
    /// transformers cannot load it.
    #[arg(long)]
    pub weights_only: bool,

    /// Elements per work chunk (for testing; output bytes do not depend on it).
    #[arg(long, hide = true)]
    pub chunk_elems: Option<u64>,
}

impl How {
    /// Where to write, into `output`.
    pub(crate) fn destination(&self, output: &Path) -> Destination {
        Destination {
            force: self.force,
            dry_run: self.dry_run,
            weights_only: self.weights_only,
            ..Destination::new(output)
        }
    }

    /// How to run.
    pub(crate) fn run_options(&self) -> RunOptions {
        let defaults = RunOptions::default();
        RunOptions {
            threads: self.threads,
            chunk_elems: self.chunk_elems.unwrap_or(defaults.chunk_elems),
            input_hashes: if self.rehash { InputHashes::Rehash } else { InputHashes::Cached },
            device: self.device,
            gpu_memory: self.gpu_memory,
        }
    }
}

/// mergekit-yaml's options that chatvec takes so its command lines run
/// unchanged: the same meaning, or accepted with a note where chatvec
/// always does what they ask for.
#[derive(Args, Debug)]
pub(crate) struct MergekitFlags {
    /// mergekit's --cuda: the same as --device cuda.
    #[arg(long, conflicts_with = "device")]
    pub cuda: bool,
    /// mergekit's --no-cuda: the same as --device cpu.
    #[arg(long, conflicts_with_all = ["device", "cuda"])]
    pub no_cuda: bool,
    /// Accepted from mergekit: chatvec always writes the base's tokenizer files.
    #[arg(long)]
    pub copy_tokenizer: bool,
    /// Accepted from mergekit: chatvec still writes the tokenizer files (a model without them cannot be served).
    #[arg(long, conflicts_with = "copy_tokenizer")]
    pub no_copy_tokenizer: bool,
    /// Accepted from mergekit: chatvec always reads PyTorch .bin checkpoints lazily.
    #[arg(long)]
    pub lazy_unpickle: bool,
    /// Accepted from mergekit: chatvec never runs a model's code, so it needs no remote code.
    #[arg(long)]
    pub trust_remote_code: bool,
    /// Accepted from mergekit: chatvec writes no merged LoRA model to a cache (adapters merge in the streaming pass).
    #[arg(long, value_name = "DIR")]
    pub lora_merge_cache: Option<PathBuf>,
}

impl MergekitFlags {
    /// Applies `--cuda`/`--no-cuda` to `how`, and says what the accepted
    /// flags mean here.
    pub(crate) fn apply(&self, how: &mut How) {
        if self.cuda {
            how.device = DeviceChoice::Cuda(0);
        }
        if self.no_cuda {
            how.device = DeviceChoice::Cpu;
        }
        let said = [
            (self.copy_tokenizer, "--copy-tokenizer: chatvec always writes the base's tokenizer files"),
            (
                self.no_copy_tokenizer,
                "--no-copy-tokenizer: chatvec writes the tokenizer files anyway (a model without them cannot be served)",
            ),
            (self.lazy_unpickle, "--lazy-unpickle: chatvec always reads .bin checkpoints lazily"),
            (self.trust_remote_code, "--trust-remote-code: chatvec runs no model code, so none is needed"),
            (
                self.lora_merge_cache.is_some(),
                "--lora-merge-cache: chatvec merges adapters in the streaming pass and caches no merged model",
            ),
        ];
        for (given, note) in said {
            if given {
                chatvec::ui::note(note);
            }
        }
    }
}

#[derive(Args, Debug)]
pub(crate) struct MergeArgs {
    /// A recipe: a chatvec .toml file, a mergekit .yml config, or the name of a shipped recipe.
    pub recipe: String,

    /// The output directory, as mergekit-yaml takes it (the same as -o).
    #[arg(value_name = "OUT")]
    pub out_dir: Option<PathBuf>,

    /// Output directory (created; must not exist unless --force).
    #[arg(short, long, conflicts_with = "out_dir")]
    pub output: Option<PathBuf>,

    /// Seed for DARE/DELLA masks (default: the recipe's `seed`, else 0); mergekit's
    /// --random-seed works too.
    #[arg(long, alias = "random-seed")]
    pub seed: Option<u64>,

    /// Maximum data bytes per output shard: 5GB (or 5G, 5B: billions of
    /// bytes), 500MB, 2GiB, or a number of bytes (default: the recipe's
    /// shard_size, else 5GB).
    #[arg(long, value_parser = parse_size)]
    pub shard_size: Option<u64>,

    /// mergekit's spelling of --shard-size, read the same way (5B is 5
    /// billion bytes, as in mergekit).
    #[arg(long, value_parser = parse_size, conflicts_with = "shard_size")]
    pub out_shard_size: Option<u64>,

    /// Downgrade config.json architecture differences to warnings (shapes
    /// must still match); mergekit's spelling --allow-crimes works too.
    #[arg(long, visible_alias = "allow-crimes")]
    pub allow_mismatch: bool,

    /// The dtype a MODEL+LORA input's merged weights are rounded to, as mergekit's
    /// --lora-merge-dtype (bfloat16, float16, float32; default: each weight's own dtype).
    #[arg(long, value_name = "DTYPE", value_parser = lora_merge_dtype)]
    pub lora_merge_dtype: Option<FloatType>,

    /// Mixture-of-experts output layout: fused (transformers 5's experts.gate_up_proj and
    /// down_proj) or per-expert (default: the base's, else the first model's). Inputs in
    /// either layout are lined up expert by expert.
    #[arg(long, value_name = "LAYOUT", value_parser = expert_layout)]
    pub expert_layout: Option<chatvec::ExpertLayout>,

    /// For a config of several YAML documents (mergekit-multimerge): where the named merges go
    /// (default: OUT-intermediates beside OUT, or OUT itself when every merge is named).
    #[arg(long, value_name = "DIR")]
    pub intermediate_dir: Option<PathBuf>,

    /// Run every named merge again, even where its directory holds this config's output.
    #[arg(long)]
    pub no_lazy: bool,

    /// mergekit-multimerge's default: reuse named merges already made by the same config.
    #[arg(long, conflicts_with = "no_lazy")]
    pub lazy: bool,

    #[command(flatten)]
    pub how: How,

    #[command(flatten)]
    pub mergekit: MergekitFlags,
}

impl MergeArgs {
    /// The output directory: OUT or -o.
    pub(crate) fn output(&self) -> chatvec::Result<PathBuf> {
        self.out_dir.clone().or_else(|| self.output.clone()).ok_or_else(|| {
            chatvec::Error::Usage(format!(
                "{}: name the output directory: -o DIR (or DIR after the recipe)",
                self.recipe
            ))
        })
    }

    /// Where to write.
    pub(crate) fn destination(&self) -> chatvec::Result<Destination> {
        Ok(self.how.destination(&self.output()?))
    }

    /// The recipe, with the command line's overrides.
    pub(crate) fn recipe(&self) -> chatvec::Result<Recipe> {
        let mut r = Recipe::load(&self.recipe)?;
        self.override_recipe(&mut r);
        Ok(r)
    }

    fn override_recipe(&self, r: &mut Recipe) {
        if let Some(ty) = self.lora_merge_dtype {
            r.set_lora_merge_dtype(ty);
        }
        if let Some(l) = self.expert_layout {
            r.set_expert_layout(l);
        }
        if let Some(bytes) = self.shard_size.or(self.out_shard_size) {
            r.set_shard_size(bytes);
        }
        if self.allow_mismatch {
            r.allow_mismatch();
        }
    }

    /// The merges of a multi-document config and their intermediate
    /// directory, overrides applied; None for a single merge.
    pub(crate) fn stages(&self) -> chatvec::Result<Option<(Vec<chatvec::Stage>, PathBuf)>> {
        let out = self.output()?;
        let Some((mut stages, dir)) =
            chatvec::load_stages(std::path::Path::new(&self.recipe), &out, self.intermediate_dir.as_deref())?
        else {
            if self.intermediate_dir.is_some() || self.no_lazy {
                return Err(chatvec::Error::Usage(format!(
                    "{}: --intermediate-dir and --no-lazy are for configs of several YAML documents (mergekit-multimerge)",
                    self.recipe
                )));
            }
            return Ok(None);
        };
        for s in &mut stages {
            self.override_recipe(&mut s.recipe);
        }
        Ok(Some((stages, dir)))
    }
}

#[derive(Args, Debug)]
pub(crate) struct PushArgs {
    /// The model's directory (an output of apply, merge, sweep or sft's RUN/model).
    pub dir: PathBuf,
    /// The Hub repository: org/name, optionally @branch.
    pub repo: String,
    /// The branch to commit to (created from the default branch when missing) [default: main].
    #[arg(long)]
    pub revision: Option<String>,
    /// Create the repository when it does not exist.
    #[arg(long)]
    pub create: bool,
    /// Make a new repository private.
    #[arg(long)]
    pub private: bool,
    /// The commit message [default: Upload DIR with chatvec VERSION].
    #[arg(long, short = 'm')]
    pub message: Option<String>,
    /// Leave remote files matching this pattern in place (fnmatch; repeatable). Others the model
    /// does not have are deleted, so the branch holds exactly the verified model.
    #[arg(long, value_name = "PATTERN")]
    pub keep: Vec<String>,
    /// Check everything and list what would be sent and deleted; send nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub(crate) struct VerifyArgs {
    /// An output directory written by chatvec.
    pub dir: PathBuf,

    /// Also check that this recipe, and its inputs as they are now, are the ones recorded.
    #[arg(long)]
    pub recipe: Option<String>,
}

/// `extract`: its parameters (one home, `chatvec::ExtractParams`) and where
/// to write.
#[derive(Args, Debug)]
pub(crate) struct ExtractArgs {
    #[command(flatten)]
    pub params: ExtractParams,

    #[command(flatten)]
    pub out: OutArgs,
}

/// `apply`: its parameters (one home, `chatvec::ApplyParams`) and where to
/// write. Parsed by hand around the derived parsers so the params learn
/// where each vector flag stood: with several vectors, a `--scale` goes
/// with the vector written before it.
#[derive(Debug)]
pub(crate) struct ApplyArgs {
    pub params: ApplyParams,
    pub out: OutArgs,
}

impl clap::FromArgMatches for ApplyArgs {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut params = ApplyParams::from_arg_matches(m)?;
        params.positions = Some(flag_positions(m));
        Ok(ApplyArgs { params, out: OutArgs::from_arg_matches(m)? })
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        self.params.update_from_arg_matches(m)?;
        self.params.positions = Some(flag_positions(m));
        self.out.update_from_arg_matches(m)
    }
}

impl Args for ApplyArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        OutArgs::augment_args(ApplyParams::augment_args(cmd))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        OutArgs::augment_args_for_update(ApplyParams::augment_args_for_update(cmd))
    }
}

/// Where `--vector`, `--chat`, `--pretrained` and `--scale` stood among
/// the parsed arguments.
fn flag_positions(m: &clap::ArgMatches) -> chatvec::FlagPositions {
    let at = |id: &str| -> Vec<usize> {
        match m.try_get_raw(id) {
            Ok(Some(_)) => m.indices_of(id).map(Iterator::collect).unwrap_or_default(),
            _ => Vec::new(),
        }
    };
    chatvec::FlagPositions {
        vector: at("vector"),
        chat: at("chat"),
        pretrained: at("pretrained"),
        scale: at("scale"),
    }
}

#[derive(Args, Debug)]
pub(crate) struct InspectArgs {
    /// The model (directory, Hub id or alias).
    pub model: String,
}

#[derive(Args, Debug)]
pub(crate) struct DemoArgs {
    /// Directory for the demo models (default: a temporary one, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,

    /// Keep the temporary directory.
    #[arg(long)]
    pub keep: bool,

    /// Where the arithmetic runs: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu", value_parser = DeviceChoice::parse)]
    pub device: DeviceChoice,
}

/// `chatvec sft`: the model, the run directory, and how to train
/// (`chatvec::SftOptions`, the one home of the options and their defaults,
/// shared with a recipe's `[sft]` table).
#[derive(Args, Debug, Clone)]
pub(crate) struct SftArgs {
    /// The model to train (directory, Hub id or alias), e.g. the output of `chatvec apply`.
    #[arg(long, value_name = "MODEL")]
    pub model: String,
    /// Run directory: configs, converted data, the trained model, the run record.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Replace an earlier run directory of chatvec sft (or an empty directory).
    #[arg(long)]
    pub force: bool,
    /// Print the command, environment and config files, and run nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub options: SftOptions,
    /// Any other TRL SFTConfig / TrainingArguments / ModelConfig setting, KEY=VALUE (the value read as YAML); repeatable, checked against the installed TRL before launch.
    #[arg(long = "train-arg", value_name = "KEY=VALUE", value_parser = parse_train_arg_flag)]
    pub train_args: Vec<(String, serde_json::Value)>,
}

fn parse_train_arg_flag(s: &str) -> Result<(String, serde_json::Value), String> {
    parse_train_arg(s).map_err(|e| e.to_string())
}

impl SftArgs {
    /// The options, with the `--train-arg` settings.
    pub(crate) fn options(&self) -> SftOptions {
        SftOptions { train_args: self.train_args.iter().cloned().collect(), ..self.options.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatvec::DataFile;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn mergekit_sizes_count_thousands_millions_billions() {
        assert_eq!(parse_size("5B"), Ok(5_000_000_000));
        assert_eq!(parse_size("500m"), Ok(500_000_000));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("x").is_err());
    }

    #[test]
    fn scales_are_refused_as_typed() {
        assert_eq!(parse_scale("0.5"), Ok(Scale::Constant(0.5)));
        assert_eq!(parse_scale("-1"), Ok(Scale::Constant(-1.0)));
        assert_eq!(parse_scale("[0.3, 1.0]"), Ok(Scale::Layers(vec![0.3, 1.0])));
        assert_eq!(parse_scale("0,1,0.5"), Ok(Scale::Layers(vec![0.0, 1.0, 0.5])));
        for bad in ["1e40", "nan", "x", "[]", "[0.3,]", "inf"] {
            let e = parse_scale(bad).unwrap_err();
            assert!(e.contains("expected a finite number"), "{bad}: {e}");
        }
    }

    /// Job scripts run `chatvec` with `SftJob::command_args` on each node:
    /// every option set away from its default must come back through this
    /// binary's own flags unchanged.
    #[test]
    fn sft_job_command_lines_parse_back_to_the_same_job() {
        let options = SftOptions {
            data: vec![DataFile::parse("a b.jsonl:2").unwrap(), DataFile::parse("c.jsonl").unwrap()],
            eval_data: Some(PathBuf::from("held out.jsonl")),
            eval_steps: Some(7),
            epochs: 2.5,
            max_steps: Some(11),
            lr: 3e-6,
            warmup_ratio: 0.1,
            scheduler: "linear".into(),
            max_seq_len: 512,
            batch_size: 3,
            grad_accum: 5,
            packing: true,
            assistant_only_loss: !SftOptions::default().assistant_only_loss,
            chat_template: Some("t.jinja".into()),
            lora: true,
            lora_r: 4,
            lora_alpha: 9,
            seed: 13,
            save_steps: 17,
            save_total_limit: 2,
            resume: Some("latest".into()),
            report_to: "tensorboard".into(),
            cpu_offload: true,
            train_args: [("gradient_checkpointing".to_string(), serde_json::json!(true))].into(),
            nproc: 8,
            nnodes: 2,
            node_rank: 1,
            master_addr: Some("10.0.0.1".into()),
            master_port: 29501,
            fsdp: true,
            deepspeed: None,
            launcher: Some("slurm".into()),
            python: Some(PathBuf::from("/venv/bin/python")),
            ..SftOptions::default()
        };
        let job = chatvec::SftJob {
            model: "m".into(),
            output: PathBuf::from("run dir"),
            force: true,
            dry_run: false,
            options,
        };
        let mut argv = vec!["chatvec".to_string()];
        argv.extend(job.command_args());
        let c = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        let Command::Sft(a) = c.command else { panic!("not sft") };
        assert_eq!((a.model.as_str(), a.output.as_path(), a.force), ("m", job.output.as_path(), true));
        assert_eq!(a.options(), job.options);
        // And with an eval split and DeepSpeed instead.
        let other = chatvec::SftJob {
            options: SftOptions {
                eval_split: Some(0.05),
                deepspeed: Some("zero3".into()),
                ..SftOptions { data: job.options.data.clone(), ..SftOptions::default() }
            },
            ..job
        };
        let mut argv = vec!["chatvec".to_string()];
        argv.extend(other.command_args());
        let Command::Sft(a) = Cli::try_parse_from(&argv).unwrap().command else { panic!("not sft") };
        assert_eq!(a.options(), other.options);
    }

    #[test]
    fn sft_defaults_are_the_librarys() {
        let c =
            Cli::try_parse_from(["chatvec", "sft", "--model", "m", "--data", "d.jsonl", "-o", "r"]).unwrap();
        let Command::Sft(a) = c.command else { panic!("not sft") };
        let (got, want) = (a.options(), SftOptions::default());
        assert_eq!(
            (got.lr, got.warmup_ratio, got.epochs, got.grad_accum),
            (want.lr, want.warmup_ratio, want.epochs, want.grad_accum)
        );
        assert_eq!((got.scheduler, got.assistant_only_loss), (want.scheduler, want.assistant_only_loss));
    }
}
