//! The command line: clap definitions (doc comments are the help text) and
//! the glue that turns parsed arguments into jobs and prints their results.
//! stdout carries data only (reports, `--json`); progress, notes and
//! warnings go to stderr.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Args, Parser, Subcommand};

use crate::dtype::FloatType;
use crate::embeddings::EmbeddingPolicy;
use crate::error::{Error, Result};
use crate::execute::{DEFAULT_CHUNK_ELEMS, ExecOptions};
use crate::hash_cache::HashCache;
use crate::job::{self, OutputSettings, SelectionArgs, Summary, VectorArgs};
use crate::resolve::open_model;

/// chatvec: give continued-pretrained LLMs chat ability by weight arithmetic.
///
/// A chat vector is `chat - pretrained` (e.g. Llama-3-8B-Instruct minus
/// Llama-3-8B); `apply` adds it, scaled, to a model continued-pretrained from
/// the same base (e.g. Llama-3-Swallow-8B). Exit codes: 0 ok, 1 bad input or
/// usage, 2 I/O or internal error, 130 interrupted.
#[derive(Parser, Debug)]
#[command(name = "chatvec", version, max_term_width = 100)]
pub struct Cli {
    /// No progress bars or notes on stderr (errors and warnings still print).
    #[arg(short, long, global = true)]
    pub quiet: bool,

    /// Print a machine-readable JSON summary on stdout.
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
pub enum Command {
    /// Write the chat vector `chat - pretrained` as a safetensors checkpoint.
    Extract(ExtractArgs),
    /// Add a scaled chat vector to a model: `base + scale * (chat - pretrained)`.
    Apply(ApplyArgs),
    /// Run a merge recipe (chatvec TOML or mergekit YAML): chat vector, linear, TIES, DARE, SLERP, ...
    Merge(MergeArgs),
    /// Re-hash an output against its manifest; with --recipe, check the recipe and inputs too.
    Verify(VerifyArgs),
    /// Supervised fine-tuning of a model with TRL (launched and supervised as a child process).
    Sft(crate::sft::SftArgs),
    /// Run a recipe with an [sft] section: merge into DIR/merged, verify it, then SFT into DIR/sft.
    Run(RunArgs),
    /// Show a checkpoint's shards, tensors, parameter count and config.
    Inspect(InspectArgs),
    /// Run extract, apply and inspect on tiny built-in models (no download).
    Demo(DemoArgs),
    /// Measure apply on generated Llama-shaped checkpoints against the disk and memory floor.
    Bench(crate::bench::BenchArgs),
}

/// Where and how a command writes its output.
#[derive(Args, Debug)]
pub struct OutArgs {
    /// Output directory (created; must not exist unless --force).
    #[arg(short, long)]
    pub output: PathBuf,

    /// Replace an existing output directory.
    #[arg(long)]
    pub force: bool,

    /// Print the plan (every output tensor, its formula and shard) and write nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Compute threads (default: one per core). Output bytes do not depend on it.
    #[arg(long)]
    pub threads: Option<usize>,

    /// Hash every input shard again instead of trusting the hash cache
    /// (~/.cache/chatvec, or $CHATVEC_CACHE_DIR).
    #[arg(long)]
    pub rehash: bool,

    /// Where the arithmetic runs: cpu, cuda, cuda:N, or auto (a GPU when one
    /// works, else the CPU). Output bytes are the same on every device.
    #[arg(long, default_value = "auto", value_parser = crate::cuda::DeviceChoice::parse)]
    pub device: crate::cuda::DeviceChoice,

    /// Device memory chatvec may use, e.g. 4GiB (default: half the free memory, at most 8 GiB).
    #[arg(long, value_parser = parse_size)]
    pub gpu_memory: Option<u64>,

    /// Elements per work chunk (for testing; output bytes do not depend on it).
    #[arg(long, hide = true, default_value_t = DEFAULT_CHUNK_ELEMS)]
    pub chunk_elems: u64,
}

/// Options shared by extract and apply.
#[derive(Args, Debug)]
pub struct WriteArgs {
    #[command(flatten)]
    pub out: OutArgs,

    /// Only operate on tensors matching this regex (repeatable; default: all).
    #[arg(long, value_name = "REGEX")]
    pub include: Vec<String>,

    /// Leave tensors matching this regex untouched (repeatable).
    #[arg(long, value_name = "REGEX")]
    pub exclude: Vec<String>,

    /// Maximum data bytes per output shard, e.g. 5GB, 500MB, 2GiB.
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    pub shard_size: u64,

    /// Downgrade config.json architecture differences to warnings (shapes must still match).
    #[arg(long)]
    pub allow_mismatch: bool,
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// A recipe: a chatvec .toml file, a mergekit .yml config, or the name of a shipped recipe.
    pub recipe: String,

    /// Seed for DARE/DELLA masks (default: the recipe's `seed`, else 0).
    #[arg(long)]
    pub seed: Option<u64>,

    #[command(flatten)]
    pub out: OutArgs,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// A chatvec .toml recipe with an [sft] section, or the name of a shipped recipe.
    pub recipe: String,

    /// Seed for DARE/DELLA masks (default: the recipe's `seed`, else 0).
    #[arg(long)]
    pub seed: Option<u64>,

    #[command(flatten)]
    pub out: OutArgs,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// An output directory written by chatvec.
    pub dir: PathBuf,

    /// Also check that this recipe, and its inputs as they are now, are the ones recorded.
    #[arg(long)]
    pub recipe: Option<String>,
}

#[derive(Args, Debug)]
pub struct ExtractArgs {
    /// The chat / instruct model (directory, Hub id org/name[@rev], or alias).
    #[arg(long, value_name = "MODEL")]
    pub chat: String,

    /// The pretrained model the chat model was tuned from (directory, Hub id or alias).
    #[arg(long, value_name = "MODEL")]
    pub pretrained: String,

    /// Vector dtype: bf16, f16 or f32 (default: the chat model's). f32 is exact.
    #[arg(long, value_parser = parse_dtype)]
    pub dtype: Option<FloatType>,

    #[command(flatten)]
    pub write: WriteArgs,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("vector_source").required(true).args(["vector", "chat"])))]
pub struct ApplyArgs {
    /// The model to give chat ability to, e.g. a continued-pretrained model (directory, Hub id or alias).
    #[arg(long, value_name = "MODEL")]
    pub base: String,

    /// A chat vector written by `chatvec extract`, or a vector alias such as llama3-instruct.
    #[arg(long, value_name = "VECTOR", conflicts_with_all = ["chat", "pretrained"])]
    pub vector: Option<String>,

    /// The chat model (with --pretrained: stream the vector without writing it).
    #[arg(long, value_name = "MODEL", requires = "pretrained")]
    pub chat: Option<String>,

    /// The pretrained model the chat model was tuned from.
    #[arg(long, value_name = "MODEL", requires = "chat")]
    pub pretrained: Option<String>,

    /// Scale of the vector.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub scale: f32,

    /// Scale for tensors matching REGEX, e.g. 'mlp\.=0.5' (repeatable; first match wins).
    #[arg(long, value_name = "REGEX=S")]
    pub scale_for: Vec<String>,

    /// Embedding rows when vocabularies differ: auto, full, skip, prefix or align.
    #[arg(long, value_enum, default_value_t = EmbeddingPolicy::Auto)]
    pub embeddings: EmbeddingPolicy,

    /// Output dtype for float tensors (default: the base's, tensor by tensor).
    #[arg(long, value_parser = parse_dtype)]
    pub out_dtype: Option<FloatType>,

    /// Keep the base's chat template and eos ids instead of the chat model's.
    #[arg(long)]
    pub keep_base_template: bool,

    #[command(flatten)]
    pub write: WriteArgs,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The model (directory, Hub id or alias).
    pub model: String,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Directory for the demo models (default: a temporary one, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,

    /// Keep the temporary directory.
    #[arg(long)]
    pub keep: bool,

    /// Where the arithmetic runs: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu", value_parser = crate::cuda::DeviceChoice::parse)]
    pub device: crate::cuda::DeviceChoice,
}

/// Parses sizes the way transformers' `max_shard_size` does: decimal units
/// (KB, MB, GB) are powers of 10, binary ones (KiB, MiB, GiB) powers of 2.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("'{s}' is not a size like 5GB or 500MB"))?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1048576.0,
        "GIB" => 1073741824.0,
        _ => {
            return Err(format!("'{s}': unknown unit '{unit}' (use B, KB, MB, GB, KiB, MiB, GiB)"));
        }
    };
    let v = n * mult;
    if !(1.0..1e18).contains(&v) {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(v as u64)
}

fn parse_dtype(s: &str) -> std::result::Result<FloatType, String> {
    FloatType::parse_cli(s).ok_or_else(|| format!("'{s}' is not a dtype chatvec writes (bf16, f16, f32)"))
}

static QUIET: AtomicBool = AtomicBool::new(false);

/// Prints a warning on stderr.
pub fn warn(msg: &str) {
    eprintln!("warning: {msg}");
}

/// Whether progress bars show: not `-q`, and stderr is a terminal.
pub fn show_progress() -> bool {
    !QUIET.load(Ordering::Relaxed) && std::io::stderr().is_terminal()
}

/// Prints a note on stderr unless `-q`.
pub fn note(msg: &str) {
    if !QUIET.load(Ordering::Relaxed) {
        eprintln!("{msg}");
    }
}

/// Writes to stdout; a closed pipe (`chatvec inspect M | head`) is not an error.
pub fn out(text: &str) -> Result<()> {
    let mut so = std::io::stdout().lock();
    match so.write_all(text.as_bytes()).and_then(|_| so.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(|e| Error::io("writing", std::path::Path::new("<stdout>"), e)),
    }
}

fn json_out(v: &impl serde::Serialize) -> Result<()> {
    out(&format!("{}\n", serde_json::to_string_pretty(v).expect("summaries serialize")))
}

/// Compute threads: as given, else one per core. (On the 2-core machine one
/// thread was faster when the inputs sat in the page cache, two when they
/// streamed from disk, the case that matters at 8B-70B; see BENCHMARKS.md.)
pub fn threads(t: Option<usize>) -> usize {
    t.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn settings(w: &OutArgs, quiet: bool) -> OutputSettings {
    OutputSettings {
        out: w.output.clone(),
        force: w.force,
        dry_run: w.dry_run,
        exec: ExecOptions {
            threads: threads(w.threads),
            chunk_elems: w.chunk_elems,
            progress: !quiet && show_progress(),
            hash_cache: HashCache::from_env(w.rehash),
            device: w.device,
            gpu_memory: w.gpu_memory,
            quiet,
        },
        recipe: None,
    }
}

fn selection(w: &WriteArgs, scale: f32, scale_for: &[String]) -> SelectionArgs {
    SelectionArgs {
        include: w.include.clone(),
        exclude: w.exclude.clone(),
        scale,
        scale_for: scale_for.to_vec(),
        shard_size: w.shard_size,
        allow_mismatch: w.allow_mismatch,
    }
}

fn report(s: &Summary, json: bool) -> Result<()> {
    for w in &s.warnings {
        warn(w);
    }
    for n in &s.notes {
        note(n);
    }
    if json {
        return json_out(s);
    }
    if let Some(p) = &s.plan_text {
        out(p)?;
    }
    if let Some(o) = &s.output {
        note(&format!(
            "wrote {o}: {} tensors ({} computed), {} bytes in {} shard(s), {:.1} s",
            s.tensors,
            s.computed_tensors,
            s.bytes,
            s.shards.len(),
            s.seconds
        ));
    }
    Ok(())
}

/// `chatvec run`: merge, verify, SFT, each step's output under one directory.
fn run_recipe(a: &RunArgs, quiet: bool, json: bool) -> Result<()> {
    let recipe = crate::recipe::load_recipe(&a.recipe)?;
    let Some(section) = recipe.sft.clone() else {
        return Err(Error::Usage(format!("{} has no [sft] section", recipe.path.display()))
            .with_hint("add one (data = \"chat.jsonl\", ...), or run just the merge with `chatvec merge`"));
    };
    let root = &a.out.output;
    let (merged, sft_dir) = (root.join("merged"), root.join("sft"));
    // Check the [sft] options before the long merge.
    let mut sft = crate::sft::args_from_options(&section, &merged, &sft_dir)?;
    sft.force = a.out.force;
    sft.dry_run = a.out.dry_run;
    if root.exists() && !a.out.force && !a.out.dry_run {
        return Err(Error::OutputExists(root.clone()).with_hint("pass --force to replace it"));
    }
    if !a.out.dry_run {
        std::fs::create_dir_all(root).map_err(|e| Error::io("creating", root, e))?;
    }
    let mut merge_out = settings(&a.out, quiet);
    merge_out.out = merged.clone();
    let s = job::merge(&recipe, a.seed, &merge_out)?;
    report(&s, json)?;
    if a.out.dry_run {
        crate::sft_data::process(&sft.data, None)?;
        let line: Vec<String> = section.iter().map(|x| format!("'{x}'")).collect();
        return out(&format!(
            "then: chatvec sft --model {} -o {} {}\n",
            merged.display(),
            sft_dir.display(),
            line.join(" ")
        ));
    }
    let v = crate::verify::verify(&merged, None)?;
    note(&format!("verified {}: {} files match the manifest", merged.display(), v.checks.len()));
    v.into_result()?;
    match crate::sft::run(&sft, quiet)? {
        0 => Ok(()),
        code => Err(Error::Trainer(code)),
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    QUIET.store(cli.quiet, Ordering::Relaxed);
    crate::interrupt::install();
    if let Some(p) = cli.aliases {
        crate::aliases::set_user_file(p);
    }
    if cli.offline {
        crate::download::set_offline();
    }
    match cli.command {
        Command::Extract(a) => {
            let sel = selection(&a.write, 1.0, &[]);
            let s = job::extract(&a.chat, &a.pretrained, a.dtype, &sel, &settings(&a.write.out, cli.quiet))?;
            report(&s, cli.json)
        }
        Command::Apply(a) => {
            let sel = selection(&a.write, a.scale, &a.scale_for);
            let vector = match (&a.vector, &a.chat, &a.pretrained) {
                (Some(v), _, _) => VectorArgs::Stored(v),
                (None, Some(c), Some(p)) => VectorArgs::Streaming { chat: c, pretrained: p },
                _ => {
                    return Err(Error::Usage("give --vector DIR, or --chat and --pretrained".into()));
                }
            };
            let s = job::apply(
                &a.base,
                vector,
                a.embeddings,
                a.out_dtype,
                a.keep_base_template,
                &sel,
                &settings(&a.write.out, cli.quiet),
            )?;
            report(&s, cli.json)
        }
        Command::Merge(a) => {
            let recipe = crate::recipe::load_recipe(&a.recipe)?;
            let s = job::merge(&recipe, a.seed, &settings(&a.out, cli.quiet))?;
            report(&s, cli.json)
        }
        Command::Verify(a) => {
            let r = crate::verify::verify(&a.dir, a.recipe.as_deref())?;
            if cli.json {
                json_out(&r)?;
            } else {
                out(&crate::verify::render(&r))?;
            }
            r.into_result()
        }
        Command::Sft(a) => match crate::sft::run(&a, cli.quiet)? {
            0 => Ok(()),
            code => Err(Error::Trainer(code)),
        },
        Command::Run(a) => run_recipe(&a, cli.quiet, cli.json),
        Command::Inspect(a) => {
            let ck = open_model(&a.model)?;
            let r = crate::inspect::report(&ck)?;
            if cli.json { json_out(&r) } else { out(&crate::inspect::render(&r)) }
        }
        Command::Demo(a) => {
            let text = crate::demo::run(a.dir.as_deref(), a.keep, threads(None), a.device)?;
            out(&text)
        }
        Command::Bench(a) => crate::bench::run(&a, cli.json),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5MB").unwrap(), 1_500_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("GB").is_err());
    }
}
