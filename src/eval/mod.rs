//! `chatvec eval`: did the merge work? Each model is scored through an
//! existing engine (transformers, or vLLM when it is installed and a GPU is
//! there), run as a supervised child in the interpreter `sft` uses:
//!
//! - assistant-token loss: mean NLL over the assistant tokens of held-out
//!   conversations, rendered with the model's own chat template (the tokens
//!   TRL's assistant-only loss trains on);
//! - stop rate: the share of greedy answers that end with the model's own
//!   eos / end-of-turn within `--max-new-tokens`, beside the answer length
//!   (an empty answer "stops" but does not chat);
//! - answer language: the share of answers in the prompt's language (for
//!   Japanese by script: kana and kanji against Latin letters);
//! - a few answers side by side.
//!
//! Models are ranked by a stated rule (`RULE`). This room reads the data
//! with `sft`'s converter and finds the interpreter as `sft` does.

pub(crate) mod bench;
pub(crate) mod cache;
pub(crate) mod harness;
pub(crate) mod judge;
pub(crate) mod plot;
pub(crate) mod prompts;
pub(crate) mod scoring;
pub(crate) mod ties;
pub(crate) mod worker;

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::resolve::{Fetch, resolve_model};
use crate::sft::data::write_eval;
use crate::ui;
pub use bench::list as bench_list;
pub use scoring::{BenchInfo, BenchScore, Grade};
pub use ties::Interval;

/// How models are ranked, as reported.
pub const RULE: &str = "answers that stop with a non-empty reply (more is better), then answers in the prompt's language (more is better), then assistant-token loss (lower is better); a model whose three figures' 95% intervals (bootstrap over the prompts and conversations) all overlap the next better one's is reported tied with it";

/// How models are ranked on judged benchmarks (`--bench`).
pub(crate) const BENCH_RULE: &str = "the primary figure, better first (a judged benchmark's mean grade, or an lm_eval metric); a model whose 95% interval (bootstrap over the questions, or lm_eval's standard error) overlaps the next better one's is reported tied with it";

/// The same, when an LM loss is measured.
pub(crate) const BENCH_LM_RULE: &str = "candidates whose LM loss on the target-language text stays within --lm-margin of the base's first (none acceptable when none does), then the primary figure, better first (a judged benchmark's mean grade, or an lm_eval metric); a model whose 95% interval (bootstrap over the questions, or lm_eval's standard error) overlaps the next better one's is reported tied with it";

/// The ranking rule when an LM loss is measured (`--lm-data`): `RULE`
/// within the candidates that keep the base's language, then the rest.
pub(crate) const LM_RULE: &str = "candidates whose LM loss on the target-language text stays within --lm-margin of the base's first (none acceptable when none does), then answers that stop with a non-empty reply (more is better), answers in the prompt's language (more is better), assistant-token loss (lower is better); a model whose figures' 95% intervals all overlap the next better one's is reported tied with it";

/// Tokens of each `--lm-data` document scored (the rest is cut).
const LM_MAX_TOKENS: u64 = 1024;

/// Seeds of the bootstraps: fixed, so a report is the same every run, and
/// the same for every model, so they are resampled alike.
const LOSS_SEED: u64 = 0x6c6f_7373;
const SHARE_SEED: u64 = 0x7368_6172;

/// Largest prompts file accepted.
const MAX_PROMPTS_BYTES: u64 = 64 << 20;

/// What to evaluate, and how: `chatvec eval`'s arguments (clap; the doc
/// comments are its help) and a recipe's `[eval]` table, with the defaults
/// written once, in `new`.
#[derive(Clone, Debug, clap::Args)]
pub struct EvalSpec {
    /// The models (directories, Hub ids or aliases), e.g. a sweep's candidates.
    #[arg(required_unless_present = "list", value_name = "MODEL")]
    pub models: Vec<String>,
    /// List the judged benchmarks --bench knows, with where their files come from, and exit.
    #[arg(long)]
    pub list: bool,
    /// A judged benchmark instead of the quick set: ja-mt-bench, elyza-tasks-100, rakuda
    /// (NAME=DIR reads its files from DIR), or a directory in FastChat's llm_judge layout.
    /// Repeat for several; the first (or --primary) ranks.
    #[arg(long, value_name = "NAME[=DIR]|DIR")]
    pub bench: Vec<String>,
    /// The benchmark that ranks the models (default: the first --bench).
    #[arg(long, value_name = "NAME")]
    pub primary: Option<String>,
    /// The judge: an OpenAI-compatible API base (http://localhost:8000/v1 for `vllm serve`,
    /// https://api.openai.com/v1), asked at temperature 0.
    #[arg(long, value_name = "URL")]
    pub judge_url: Option<String>,
    /// The judge model's name at --judge-url (e.g. gpt-4o).
    #[arg(long, value_name = "NAME")]
    pub judge_model: Option<String>,
    /// The environment variable holding the judge's API key (not needed for a judge on this
    /// machine or a private network).
    #[arg(long, value_name = "VAR", default_value_t = EvalSpec::new(Vec::new()).judge_key_env)]
    pub judge_key_env: String,
    /// Judge requests in flight at once.
    #[arg(long, value_name = "N", default_value_t = EvalSpec::new(Vec::new()).judge_concurrency)]
    pub judge_concurrency: usize,
    /// Answers per question on sampled benchmark questions (Swallow's evaluation takes 5);
    /// questions answered greedily have one.
    #[arg(long, value_name = "N", default_value_t = EvalSpec::new(Vec::new()).bench_samples)]
    pub bench_samples: usize,
    /// Longest benchmark answer per turn, in tokens (default: the benchmark's own, 1024).
    #[arg(long, value_name = "N")]
    pub bench_max_new_tokens: Option<u64>,
    /// lm-evaluation-harness tasks or groups (comma-separated), run on each model by the
    /// installed lm_eval; their metrics join the table and the ranking (--primary task/metric).
    #[arg(long, value_name = "TASKS")]
    pub harness: Vec<String>,
    /// A directory of extra lm_eval task definitions (lm_eval's --include_path).
    #[arg(long, value_name = "DIR", requires = "harness")]
    pub harness_include: Option<PathBuf>,
    /// Documents per task (lm_eval's --limit), for a quick look.
    #[arg(long, value_name = "N", requires = "harness")]
    pub harness_limit: Option<u64>,
    /// Few-shot examples per task (default: each task's own).
    #[arg(long, value_name = "N", requires = "harness")]
    pub harness_fewshot: Option<u64>,
    /// Prompt the harness tasks through each model's chat template.
    #[arg(long, requires = "harness")]
    pub harness_chat_template: bool,
    /// Held-out chat data (JSONL in any format `sft` reads) for the assistant-token loss
    /// (default: the built-in Japanese/English set).
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Prompts to answer: JSONL of {"prompt": "...", "lang": "ja"} or chat records
    /// (default: the built-in set).
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = EvalSpec::new(Vec::new()).max_new_tokens)]
    pub max_new_tokens: u64,
    /// Answers shown side by side per model.
    #[arg(long, default_value_t = EvalSpec::new(Vec::new()).samples)]
    pub samples: usize,
    /// Python interpreter with torch and transformers (default: $CHATVEC_PYTHON, else python3).
    #[arg(long, value_name = "PATH")]
    pub python: Option<PathBuf>,
    /// Engine: auto (vLLM when installed and a GPU is there, else transformers), transformers, vllm.
    #[arg(long, default_value_t = EvalSpec::new(Vec::new()).engine)]
    pub engine: String,
    /// Write a picture (SVG): loss and stop rate per model, against the scale for a sweep; with
    /// --bench or --harness, each figure with its intervals and the per-category grades.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Replace an existing --plot file.
    #[arg(long)]
    pub force: bool,
    /// A chat template (a Jinja file, or a model whose template to take) for the models that have
    /// none, so an unmerged base can be ranked beside the candidates.
    #[arg(long, value_name = "FILE|MODEL")]
    pub chat_template: Option<String>,
    /// Text in the continued-pretraining language (one document per line, or JSONL of
    /// {"text": ...}): each model's LM loss on it is measured beside --lm-base's, and candidates
    /// that raise it by more than --lm-margin rank below the rest ("none acceptable" when none keeps it).
    #[arg(long, value_name = "FILE")]
    pub lm_data: Option<PathBuf>,
    /// The model whose LM loss the candidates must keep (default: the base their chatvec manifests record).
    #[arg(long, value_name = "MODEL", requires = "lm_data")]
    pub lm_base: Option<String>,
    /// Conversations, prompts and answers computed together (one forward per batch); fewer
    /// use less memory, more are faster where the device has room.
    #[arg(long, value_name = "N", default_value_t = EvalSpec::new(Vec::new()).batch_size)]
    pub batch_size: usize,
    /// Run every model again instead of using results kept from an earlier run with the same
    /// model files and inputs (kept in ~/.cache/chatvec/eval, or $CHATVEC_CACHE_DIR/eval).
    #[arg(long)]
    pub fresh: bool,
    /// How far above --lm-base's a candidate's LM loss may go, in percent.
    #[arg(long, value_name = "PERCENT", default_value_t = EvalSpec::new(Vec::new()).lm_margin)]
    pub lm_margin: f64,
}

impl EvalSpec {
    /// Evaluates `models` on the built-in set with transformers or vLLM.
    pub fn new(models: Vec<String>) -> EvalSpec {
        EvalSpec {
            models,
            list: false,
            bench: Vec::new(),
            primary: None,
            judge_url: None,
            judge_model: None,
            judge_key_env: "OPENAI_API_KEY".into(),
            judge_concurrency: 8,
            bench_samples: 1,
            bench_max_new_tokens: None,
            harness: Vec::new(),
            harness_include: None,
            harness_limit: None,
            harness_fewshot: None,
            harness_chat_template: false,
            batch_size: 16,
            data: None,
            prompts: None,
            max_new_tokens: 128,
            samples: 3,
            python: None,
            engine: "auto".into(),
            plot: None,
            force: false,
            chat_template: None,
            fresh: false,
            lm_data: None,
            lm_base: None,
            lm_margin: 5.0,
        }
    }
}

/// One answer.
#[derive(Clone, Debug, Serialize)]
pub struct Answer {
    /// The prompt's last user message.
    pub prompt: String,
    /// The answer, decoded, special tokens removed.
    pub answer: String,
    /// Whether it ended with the model's eos within the token limit.
    pub stopped: bool,
    /// Its length in tokens.
    pub tokens: u64,
    /// Its language by script (`ja`, `en`, or none).
    pub lang: Option<String>,
    /// The prompt's language.
    pub want: Option<String>,
}

/// One model's figures.
#[derive(Clone, Debug, Serialize)]
pub struct ModelEval {
    /// The model as given.
    pub model: String,
    /// Its directory.
    pub path: String,
    /// The scale its chatvec manifest records, when it is an apply output.
    pub scale: Option<Value>,
    /// The engine that generated.
    pub engine: String,
    /// Mean NLL over assistant tokens.
    pub assistant_loss: Option<f64>,
    /// Assistant tokens it was measured on.
    pub assistant_tokens: u64,
    /// Share of answers that ended with eos.
    pub stop_rate: f64,
    /// Share that ended with eos after a non-empty reply.
    pub stop_with_answer_rate: f64,
    /// Mean answer length, in tokens.
    pub mean_answer_tokens: f64,
    /// Share of answers in the prompt's language (among prompts whose
    /// language is known).
    pub language_match: Option<f64>,
    /// 95% interval of the assistant-token loss (over conversations).
    pub assistant_loss_interval: Option<Interval>,
    /// 95% interval of the stop-with-answer rate (over prompts).
    pub stop_with_answer_interval: Option<Interval>,
    /// 95% interval of the language match (over prompts of known language).
    pub language_match_interval: Option<Interval>,
    /// Mean NLL per token on `--lm-data` (the continued-pretraining
    /// language).
    pub lm_loss: Option<f64>,
    /// 95% interval of the LM loss (over documents).
    pub lm_loss_interval: Option<Interval>,
    /// The LM loss relative to the base's (0.05: 5% higher).
    pub lm_loss_increase: Option<f64>,
    /// Whether the LM loss stays within `--lm-margin` of the base's.
    pub keeps_language: Option<bool>,
    /// Its figures on each judged benchmark (`--bench`), in the order given.
    pub benchmarks: Vec<BenchScore>,
    /// Tokens generated per second of generation (loading and scoring not
    /// counted), over the quick set's and the benchmarks' answers.
    pub tokens_per_second: Option<f64>,
    /// With `--lm-data`: whether no other model both chats better (the
    /// primary figure, else the assistant-token loss) and keeps the LM loss
    /// lower: the trade-off's Pareto front.
    pub pareto: Option<bool>,
    /// Every answer.
    pub answers: Vec<Answer>,
    /// Its place under `RULE` (1 = best).
    pub rank: usize,
    /// The rank of the best model it cannot be told from (see `RULE`).
    pub tied_with: Option<usize>,
}

/// The model the candidates' LM loss is held against.
#[derive(Clone, Debug, Serialize)]
pub struct LmReference {
    /// The model as given (or as the candidates' manifests record it).
    pub model: String,
    /// Its LM loss on `--lm-data`.
    pub lm_loss: Option<f64>,
    /// Its 95% interval.
    pub lm_loss_interval: Option<Interval>,
    /// Documents and tokens scored.
    pub documents: usize,
    /// The margin a candidate may rise above it, in percent.
    pub margin_percent: f64,
}

/// What `chatvec eval` found; `--json` prints it as is.
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    /// The ranking rule.
    pub rule: &'static str,
    /// The LM-loss reference, with `--lm-data`.
    pub lm_reference: Option<LmReference>,
    /// With `--lm-data`: no candidate keeps the base's LM loss within the
    /// margin, so none is acceptable.
    pub none_acceptable: bool,
    /// The judged benchmarks run, with their files and judge.
    pub benchmarks: Vec<BenchInfo>,
    /// The benchmark that ranks (its index in `benchmarks`).
    pub primary: Option<usize>,
    /// Requests sent to the judge this run (judgments kept from earlier
    /// runs are not asked again).
    pub judge_requests: usize,
    /// The models, best first.
    pub models: Vec<ModelEval>,
    /// Held-out conversations and prompts used.
    pub conversations: usize,
    /// Prompts generated from.
    pub prompts: usize,
    /// Where they came from.
    pub data: String,
    /// Answers shown per model in the table.
    pub samples: usize,
}

/// The prompts: from a file, or built in.
fn read_prompts(path: &Path) -> Result<Vec<Value>> {
    let text = String::from_utf8(crate::json::read_capped(path, MAX_PROMPTS_BYTES)?)
        .map_err(|_| Error::bad_file(path, "is not UTF-8 text"))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let at = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: String| Error::bad_file(path, format!("line {at}: {why}"));
        let v = crate::sft::data::parse_line(at as u64, line).map_err(bad)?;
        let lang = v.get("lang").and_then(Value::as_str).map(str::to_string);
        if let Some(l) = &lang
            && (!(2..=3).contains(&l.len()) || !l.bytes().all(|b| b.is_ascii_lowercase()))
        {
            return Err(bad(format!("lang '{l}': expected an ISO 639-1 code such as ja, en or de")));
        }
        let messages: Vec<Value> = match v.get("prompt") {
            Some(Value::String(p)) if !p.trim().is_empty() => vec![json!({"role": "user", "content": p})],
            Some(_) => return Err(bad("'prompt' must be a non-empty string".into())),
            None => {
                let (_, msgs) = crate::sft::data::convert_prompt(&v).map_err(bad)?;
                msgs.into_iter().map(|m| json!({"role": m.role, "content": m.content})).collect()
            }
        };
        out.push(json!({"messages": messages, "lang": lang}));
    }
    if out.is_empty() {
        return Err(Error::bad_file(path, "holds no prompts"));
    }
    Ok(out)
}

/// The held-out conversations, as messages lists.
fn read_conversations(path: &Path) -> Result<Vec<Value>> {
    let mut buf = Vec::new();
    write_eval(path, &mut buf)?;
    buf.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let v: Value = serde_json::from_slice(l).map_err(|e| Error::Internal(e.to_string()))?;
            Ok(v["messages"].clone())
        })
        .collect()
}

/// The scale a chatvec output's manifest records.
fn manifest_scale(dir: &Path) -> Option<Value> {
    let p = crate::model::side_file(dir, crate::output::manifest::MANIFEST_FILE).ok()??;
    let v = crate::json::read_value(&p, 64 << 20).ok()?;
    v.pointer("/parameters/scale").cloned()
}

/// The worker's `[[sum, count], ...]` as pairs.
fn pairs(v: &Value) -> Vec<(f64, f64)> {
    v.as_array()
        .map(|a| {
            a.iter().map(|x| (x[0].as_f64().unwrap_or(f64::NAN), x[1].as_f64().unwrap_or(0.0))).collect()
        })
        .unwrap_or_default()
}

/// `sum / count` over the pairs (a token-weighted mean), if any token.
fn ratio(p: &[(f64, f64)]) -> Option<f64> {
    let (s, n) = p.iter().fold((0.0, 0.0), |(s, n), (a, b)| (s + a, n + b));
    (n > 0.0).then(|| s / n)
}

/// The base model `model`'s chatvec manifest records (the input of role
/// `base`), for `--lm-data` without `--lm-base`.
fn recorded_base(model: &str, dir: &Path) -> Result<(String, PathBuf)> {
    let path = dir.join(crate::output::manifest::MANIFEST_FILE);
    let manifest = if path.is_file() { Some(crate::json::read_value(&path, 64 << 20)?) } else { None };
    let base = manifest.as_ref().and_then(|m| {
        m["inputs"].as_array()?.iter().find(|i| i["role"] == "base").map(|i| {
            (
                i["reference"].as_str().unwrap_or_default().to_string(),
                PathBuf::from(i["path"].as_str().unwrap_or_default()),
            )
        })
    });
    match base {
        Some((reference, p)) if p.is_dir() => Ok((reference, p)),
        Some((reference, p)) => Err(Error::Usage(format!(
            "--lm-data: {model} records its base {reference} at {}, which is not there any more",
            p.display()
        ))
        .with_hint("name the model to hold the LM loss against with --lm-base")),
        None => Err(Error::Usage(format!(
            "--lm-data: {model} records no base model (it is not an apply or merge output)"
        ))
        .with_hint("name the model to hold the LM loss against with --lm-base")),
    }
}

/// `--lm-data`: one document per non-empty line, a line starting with `{`
/// read as JSON with a non-empty `text`.
fn read_lm_texts(path: &Path) -> Result<Vec<String>> {
    let bytes = crate::json::read_capped(path, MAX_PROMPTS_BYTES)?;
    let text = String::from_utf8(bytes).map_err(|_| Error::bad_file(path, "is not UTF-8 text"))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('{') {
            let v: Value = serde_json::from_str(line)
                .map_err(|e| Error::bad_file(path, format!("line {}: bad JSON: {e}", i + 1)))?;
            match v.get("text").and_then(Value::as_str) {
                Some(t) if !t.trim().is_empty() => out.push(t.to_string()),
                _ => {
                    return Err(Error::bad_file(
                        path,
                        format!("line {}: expected a non-empty \"text\"", i + 1),
                    ));
                }
            }
        } else {
            out.push(line.to_string());
        }
    }
    if out.is_empty() {
        return Err(Error::bad_file(path, "holds no text"));
    }
    Ok(out)
}

/// Marks the models on the Pareto front of chat quality (the primary
/// figure, better first; else the assistant-token loss, lower first)
/// against the LM loss on the target-language text (lower first): those
/// no other model beats on one and matches or beats on the other.
fn mark_pareto(models: &mut [ModelEval], primary: Option<usize>) {
    let point = |m: &ModelEval| -> Option<(f64, f64)> {
        let chat = match primary {
            Some(p) => m.benchmarks.get(p).map(|b| if b.higher_is_better { b.score } else { -b.score }),
            None => m.assistant_loss.map(|l| -l),
        }?;
        Some((chat, -m.lm_loss?)).filter(|(c, l)| c.is_finite() && l.is_finite())
    };
    let points: Vec<Option<(f64, f64)>> = models.iter().map(point).collect();
    for (i, m) in models.iter_mut().enumerate() {
        m.pareto = points[i].map(|(c, l)| {
            !points
                .iter()
                .enumerate()
                .any(|(j, q)| j != i && q.is_some_and(|(c2, l2)| c2 >= c && l2 >= l && (c2 > c || l2 > l)))
        });
    }
}

/// Orders models by `RULE` (by `BENCH_RULE` on benchmark `primary`) and
/// sets their ranks.
fn rank(models: &mut [ModelEval], primary: Option<usize>) {
    // Signed so that larger is better (a perplexity counts down).
    let graded = |m: &ModelEval| {
        primary.and_then(|p| m.benchmarks.get(p)).map(|b| if b.higher_is_better { b.score } else { -b.score })
    };
    let key = |m: &ModelEval| {
        (
            // Candidates that lose the base's language go last.
            i64::from(m.keeps_language == Some(false)),
            // On a benchmark, the mean grade decides.
            -graded(m).filter(|s| s.is_finite()).unwrap_or(0.0),
            -(m.stop_with_answer_rate * 1e6).round() as i64,
            -(m.language_match.unwrap_or(0.0) * 1e6).round() as i64,
            m.assistant_loss.unwrap_or(f64::INFINITY),
        )
    };
    models.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        ka.0.cmp(&kb.0)
            .then(ka.1.total_cmp(&kb.1))
            .then(ka.2.cmp(&kb.2))
            .then(ka.3.cmp(&kb.3))
            .then(ka.4.total_cmp(&kb.4))
    });
    for (i, m) in models.iter_mut().enumerate() {
        m.rank = i + 1;
    }
    let figures: Vec<Vec<Option<Interval>>> = models
        .iter()
        .map(|m| {
            // Keeping the language or not is a figure no interval bridges.
            let keeps = m
                .keeps_language
                .map(|k| Interval { low: f64::from(u8::from(k)), high: f64::from(u8::from(k)) });
            match primary {
                Some(p) => vec![keeps, m.benchmarks.get(p).and_then(|b| b.interval)],
                None => {
                    vec![
                        keeps,
                        m.stop_with_answer_interval,
                        m.language_match_interval,
                        m.assistant_loss_interval,
                    ]
                }
            }
        })
        .collect();
    for (m, t) in models.iter_mut().zip(ties::ties(&figures)) {
        m.tied_with = t;
    }
}

/// The settings that need no file or model to check.
fn check_spec(spec: &EvalSpec) -> Result<()> {
    if spec.models.is_empty() {
        return Err(Error::Usage("give at least one model to evaluate".into()));
    }
    if !matches!(spec.engine.as_str(), "auto" | "transformers" | "vllm") {
        return Err(Error::Usage(format!("--engine {}: use auto, transformers or vllm", spec.engine)));
    }
    if spec.batch_size == 0 {
        return Err(Error::Usage("--batch-size must be at least 1".into()));
    }
    if spec.max_new_tokens == 0 {
        return Err(Error::Usage("--max-new-tokens must be at least 1".into()));
    }
    if let Some(p) = &spec.plot {
        crate::output::files::check_picture_target(p, spec.force)?;
    }
    if !spec.lm_margin.is_finite() || spec.lm_margin < 0.0 {
        return Err(Error::Usage(format!(
            "--lm-margin {}: expected a percentage of 0 or more",
            spec.lm_margin
        )));
    }
    if spec.bench_samples == 0 {
        return Err(Error::Usage("--bench-samples must be at least 1".into()));
    }
    Ok(())
}

/// The judge `--bench` needs, checked with one request (none without
/// benchmarks).
fn connect_judge(spec: &EvalSpec, benches: &[bench::Benchmark]) -> Result<Option<judge::Judge>> {
    if benches.is_empty() {
        return Ok(None);
    }
    let (Some(url), Some(model)) = (&spec.judge_url, &spec.judge_model) else {
        return Err(Error::Usage("--bench needs a judge: --judge-url URL and --judge-model NAME".into())
            .with_hint("e.g. --judge-url http://localhost:8000/v1 --judge-model Qwen/Qwen2.5-72B-Instruct for a judge served by `vllm serve`, or --judge-url https://api.openai.com/v1 --judge-model gpt-4o with OPENAI_API_KEY set"));
    };
    let cfg = judge::JudgeConfig {
        url: url.clone(),
        model: model.clone(),
        key_env: spec.judge_key_env.clone(),
        concurrency: spec.judge_concurrency,
    };
    let cache = crate::model::hash_cache::cache_root().map(|r| r.join("judge"));
    Ok(Some(judge::Judge::connect(&cfg, cache)?))
}

/// The quick set's held-out conversations and prompts, and where they came
/// from: the built-in set, the files given, or none beside benchmarks.
fn quick_set(
    spec: &EvalSpec,
    benches: &[bench::Benchmark],
    tasks: &[String],
) -> Result<(Vec<Value>, Vec<Value>, String)> {
    Ok(match (&spec.data, &spec.prompts) {
        // With benchmarks or tasks the quick set runs only when asked for.
        (None, None) if !benches.is_empty() || !tasks.is_empty() => (
            Vec::new(),
            Vec::new(),
            format!(
                "benchmarks: {}",
                benches
                    .iter()
                    .map(|b| b.name.as_str())
                    .chain(tasks.iter().map(String::as_str))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        (None, None) => (prompts::conversations(), prompts::prompts(), "built-in prompt set".to_string()),
        (data, prompts) => {
            let convs = match data {
                Some(d) => read_conversations(d)?,
                None => Vec::new(),
            };
            let ps = match prompts {
                Some(p) => read_prompts(p)?,
                None => prompts::prompts(),
            };
            let src = format!(
                "{} / {}",
                data.as_deref().map_or("no held-out data".into(), |d| d.display().to_string()),
                prompts.as_deref().map_or("built-in prompts".into(), |p| p.display().to_string())
            );
            (convs, ps, src)
        }
    })
}

/// One model's figures from the worker's result `r` (the quick set's
/// answers to `prompts`, its losses, its generation speed), with its
/// benchmark figures and its LM loss held against the base's.
fn model_eval(
    given: &str,
    dir: &Path,
    r: &Value,
    prompts: &[Value],
    base_lm: Option<f64>,
    margin_percent: f64,
    benchmarks: Vec<BenchScore>,
) -> ModelEval {
    let rows = r["answers"].as_array().cloned().unwrap_or_default();
    let n = rows.len().max(1) as f64;
    let answers: Vec<Answer> = rows
        .iter()
        .zip(prompts)
        .map(|(a, p)| Answer {
            prompt: p["messages"]
                .as_array()
                .and_then(|m| m.iter().rev().find(|x| x["role"] == "user"))
                .and_then(|x| x["content"].as_str())
                .unwrap_or_default()
                .to_string(),
            answer: a["answer"].as_str().unwrap_or_default().to_string(),
            stopped: a["stopped"].as_bool().unwrap_or(false),
            tokens: a["tokens"].as_u64().unwrap_or(0),
            lang: a["lang"].as_str().map(str::to_string),
            want: a["want"].as_str().map(str::to_string),
        })
        .collect();
    let stops = answers.iter().filter(|a| a.stopped).count() as f64;
    let good = answers.iter().filter(|a| a.stopped && !a.answer.is_empty()).count() as f64;
    let judged: Vec<&Answer> = answers.iter().filter(|a| a.want.is_some()).collect();
    let language_match = (!judged.is_empty())
        .then(|| judged.iter().filter(|a| a.lang == a.want).count() as f64 / judged.len() as f64);
    let per_conversation = pairs(&r["conversation_losses"]);
    let docs = pairs(&r["lm_losses"]);
    let lm_loss = ratio(&docs);
    let lm_loss_increase = lm_loss.zip(base_lm).map(|(l, b)| (l - b) / b);
    let keeps_language = lm_loss_increase.map(|x| x <= margin_percent / 100.0);
    let answered: Vec<bool> = answers.iter().map(|a| a.stopped && !a.answer.is_empty()).collect();
    let matched: Vec<bool> = judged.iter().map(|a| a.lang == a.want).collect();
    ModelEval {
        assistant_loss_interval: ties::ratio_interval(&per_conversation, LOSS_SEED),
        stop_with_answer_interval: ties::share_interval(&answered, SHARE_SEED),
        language_match_interval: ties::share_interval(&matched, SHARE_SEED),
        tied_with: None,
        lm_loss,
        lm_loss_interval: ties::ratio_interval(&docs, LOSS_SEED),
        lm_loss_increase,
        keeps_language,
        benchmarks,
        pareto: None,
        tokens_per_second: r["generation"]["seconds"]
            .as_f64()
            .filter(|s| *s > 0.0)
            .zip(r["generation"]["tokens"].as_f64())
            .map(|(s, t)| t / s),
        model: given.to_string(),
        path: dir.display().to_string(),
        scale: manifest_scale(dir),
        engine: r["engine"].as_str().unwrap_or("?").to_string(),
        assistant_loss: r["assistant_loss"].as_f64(),
        assistant_tokens: r["assistant_tokens"].as_u64().unwrap_or(0),
        stop_rate: stops / n,
        stop_with_answer_rate: good / n,
        mean_answer_tokens: answers.iter().map(|a| a.tokens as f64).sum::<f64>() / n,
        language_match,
        answers,
        rank: 0,
    }
}

/// Scores every model of `spec`.
pub fn eval(spec: &EvalSpec) -> Result<EvalReport> {
    check_spec(spec)?;
    let lm_texts = match &spec.lm_data {
        Some(p) => read_lm_texts(p)?,
        None => Vec::new(),
    };
    // The benchmarks' files, and the judge answering, before any model is
    // loaded (or downloaded).
    let benches: Vec<bench::Benchmark> = spec.bench.iter().map(|b| bench::load(b)).collect::<Result<_>>()?;
    let tasks = harness::tasks(spec)?;
    if let Some(p) = &spec.primary
        && !benches.iter().any(|b| &b.name == p)
        && !tasks.iter().any(|t| p.split('/').next() == Some(t.as_str()))
    {
        return Err(Error::Usage(format!(
            "--primary {p}: not one of the benchmarks given ({}) nor a metric of the --harness tasks (task/metric)",
            benches
                .iter()
                .map(|b| b.name.as_str())
                .chain(tasks.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let judge = connect_judge(spec, &benches)?;
    let items = scoring::items(&benches, spec.bench_samples);
    // Everything the worker would trip on, before it starts.
    let (conversations, prompts, source) = quick_set(spec, &benches, &tasks)?;
    let supplied = spec.chat_template.as_deref().map(crate::sft::template_arg).transpose()?;
    let mut dirs = Vec::new();
    // Per model, the template it is prompted with when it has none.
    let mut lent: Vec<Option<String>> = Vec::new();
    for m in &spec.models {
        let dir = resolve_model(m, &Fetch::whole())?.dir;
        // Checked here, not when the worker has loaded the model: a base
        // model with a tokenizer but no template is the usual case.
        let own = crate::output::sidecars::chat_template_text(&dir)?.is_some();
        match (&supplied, own) {
            (_, true) => lent.push(None),
            (Some((text, from)), false) => {
                ui::note(&format!(
                    "{m} has no chat template: prompted with the one of {from} (--chat-template)"
                ));
                lent.push(Some(text.clone()));
            }
            (None, false) => {
                return Err(Error::Usage(format!(
                    "{m}: {} has no chat template (no chat_template.jinja, and no chat_template in tokenizer_config.json), so it cannot be prompted as a chat model",
                    dir.display()
                ))
                .with_hint("pass --chat-template FILE|MODEL to rank it with another model's template (an apply or merge output carries the chat model's)"));
            }
        }
        dirs.push(dir);
    }
    // The model the LM loss is held against: as given, else the base the
    // first candidate's manifest records.
    let lm_base: Option<(String, PathBuf)> = match (&spec.lm_data, &spec.lm_base) {
        (None, _) => None,
        (Some(_), Some(b)) => Some((b.clone(), resolve_model(b, &Fetch::whole())?.dir)),
        (Some(_), None) => Some(recorded_base(&spec.models[0], &dirs[0])?),
    };
    let python = crate::python::interpreter(spec.python.as_deref())?;
    let mut needed = vec!["torch", "transformers"];
    if !tasks.is_empty() {
        needed.push("lm_eval");
    }
    if spec.engine == "vllm" {
        needed.push("vllm");
    }
    let env = crate::python::check(&python, &needed, &[], false, None)?;
    let mut worker_models: Vec<Value> = dirs
        .iter()
        .zip(&lent)
        .map(|(d, t)| json!({"path": d.display().to_string(), "chat": true, "chat_template": t}))
        .collect();
    if let Some((_, dir)) = &lm_base {
        worker_models.push(json!({"path": dir.display().to_string(), "chat": false}));
    }
    let inputs = json!({
        "conversations": conversations,
        "prompts": prompts,
        "max_new_tokens": spec.max_new_tokens,
        "engine": spec.engine,
        "lm_texts": lm_texts,
        "lm_max_tokens": LM_MAX_TOKENS,
        "batch": spec.batch_size,
        "bench": scoring::worker_items(&benches, &items),
        "bench_max_new_tokens": spec.bench_max_new_tokens.unwrap_or_else(|| benches.iter().map(|b| b.max_new_tokens).max().unwrap_or(0)),
    });
    let bench_turns: usize =
        items.iter().map(|it| benches[it.bench].questions[it.question].turns.len()).sum();
    let per_model = (lm_texts.len() + conversations.len() + prompts.len() + bench_turns) as u64;
    let mut results = if per_model == 0 {
        // Nothing for the worker (only --harness): no model is loaded for it.
        vec![json!({}); worker_models.len()]
    } else {
        worker::cached_run(&python, &worker::EVAL, &worker_models, &inputs, per_model, spec.fresh)?
    };
    // lm-evaluation-harness on each candidate (not the LM-loss reference).
    let harnessed: Vec<Value> = if tasks.is_empty() {
        Vec::new()
    } else {
        let version = env.packages.get("lm_eval").and_then(Value::as_str).unwrap_or("?");
        ui::note(&format!("eval: lm_eval {version}: {} on {} model(s)", tasks.join(", "), spec.models.len()));
        let inputs = harness::inputs(spec, &tasks)?;
        worker::cached_run(
            &python,
            &worker::HARNESS,
            &worker_models[..spec.models.len()],
            &inputs,
            1,
            spec.fresh,
        )?
    };
    let lm_reference = lm_base.map(|(model, _)| {
        let base = results.pop().unwrap_or_default();
        let docs = pairs(&base["lm_losses"]);
        LmReference {
            model,
            lm_loss: ratio(&docs),
            lm_loss_interval: ties::ratio_interval(&docs, LOSS_SEED),
            documents: docs.len(),
            margin_percent: spec.lm_margin,
        }
    });
    // Every model's benchmark answers, judged together so the judge's
    // concurrency spans models.
    let graded = match &judge {
        None => vec![Vec::new(); spec.models.len()],
        Some(j) => {
            let answers: Vec<Vec<Vec<String>>> = results
                .iter()
                .map(|r| {
                    r["bench_answers"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|turns| {
                                    turns
                                        .as_array()
                                        .map(|t| {
                                            t.iter()
                                                .map(|x| x.as_str().unwrap_or_default().to_string())
                                                .collect()
                                        })
                                        .unwrap_or_default()
                                })
                                .collect()
                        })
                        .unwrap_or_default()
                })
                .collect();
            scoring::grade(j, &benches, &items, spec.bench_samples, &answers, &spec.models)?
        }
    };
    let mut infos: Vec<BenchInfo> = benches
        .iter()
        .map(|b| BenchInfo {
            name: b.name.clone(),
            files: b.files.clone(),
            questions: b.questions.len(),
            samples: Some(spec.bench_samples),
            top: Some(b.top()),
            kind: "judged",
            judge_model: spec.judge_model.clone(),
            judge_url: spec.judge_url.clone(),
            engine: None,
        })
        .collect();
    if let Some(first) = harnessed.first() {
        infos.extend(harness::infos(first));
    }
    let primary = match &spec.primary {
        None => (!infos.is_empty()).then_some(0),
        Some(p) => Some(infos.iter().position(|b| &b.name == p).ok_or_else(|| {
            Error::Usage(format!(
                "--primary {p}: no such figure; there are {}",
                infos.iter().map(|b| b.name.as_str()).collect::<Vec<_>>().join(", ")
            ))
        })?),
    };
    let mut models = Vec::new();
    for (i, (((given, dir), r), mut bench_scores)) in
        spec.models.iter().zip(&dirs).zip(&results).zip(graded).enumerate()
    {
        // The harness's figures in the report's order (a metric a model
        // lacks is not measured: NaN, ranked last).
        if let Some(h) = harnessed.get(i) {
            let own = harness::scores(h);
            for info in infos.iter().filter(|b| b.kind == "lm_eval") {
                bench_scores.push(own.iter().find(|s| s.bench == info.name).cloned().unwrap_or(BenchScore {
                    bench: info.name.clone(),
                    score: f64::NAN,
                    interval: None,
                    higher_is_better: true,
                    categories: Default::default(),
                    turns: Vec::new(),
                    grades: Vec::new(),
                }));
            }
        }
        let base_lm = lm_reference.as_ref().and_then(|b| b.lm_loss);
        models.push(model_eval(given, dir, r, &prompts, base_lm, spec.lm_margin, bench_scores));
    }
    rank(&mut models, primary);
    if lm_reference.is_some() {
        mark_pareto(&mut models, primary);
    }
    let none_acceptable = lm_reference.is_some() && !models.iter().any(|m| m.keeps_language == Some(true));
    let report = EvalReport {
        rule: match (lm_reference.is_some(), primary.is_some()) {
            (false, false) => RULE,
            (true, false) => LM_RULE,
            (false, true) => BENCH_RULE,
            (true, true) => BENCH_LM_RULE,
        },
        benchmarks: infos,
        primary,
        judge_requests: judge.as_ref().map_or(0, |j| j.sent.load(std::sync::atomic::Ordering::Relaxed)),
        lm_reference,
        none_acceptable,
        conversations: conversations.len(),
        prompts: prompts.len(),
        data: source,
        models,
        samples: spec.samples,
    };
    if let Some(p) = &spec.plot {
        crate::output::files::write_atomically(p, plot::svg(&report).as_bytes())?;
    }
    Ok(report)
}

fn cut(s: &str, n: usize) -> String {
    let one_line = s.replace('\n', " ");
    let mut out: String = one_line.chars().take(n).collect();
    if one_line.chars().count() > n {
        out.push('…');
    }
    ui::escaped(&out, usize::MAX)
}

impl std::fmt::Display for EvalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "data: {} ({} conversations, {} prompts)", self.data, self.conversations, self.prompts)?;
        writeln!(f, "ranked by: {}\n", self.rule)?;
        if !self.benchmarks.is_empty() {
            self.fmt_benchmarks(f)?;
            if self.prompts == 0 && self.conversations == 0 {
                return self.fmt_lm(f);
            }
            writeln!(f)?;
        }
        writeln!(
            f,
            "{:>4}  {:<40} {:>8} {:>11} {:>6} {:>8} {:>9} {:>8}  tie",
            "rank", "model", "scale", "asst.loss", "stops", "stop+ans", "mean tok", "language"
        )?;
        for m in &self.models {
            let name = cut(&m.model, 40);
            writeln!(
                f,
                "{:>4}  {:<40} {:>8} {:>11} {:>5.0}% {:>7.0}% {:>9.1} {:>8}  {}",
                m.rank,
                name,
                m.scale.as_ref().map_or("-".into(), |s| s.to_string()),
                m.assistant_loss.map_or("-".into(), |l| format!("{l:.4}")),
                100.0 * m.stop_rate,
                100.0 * m.stop_with_answer_rate,
                m.mean_answer_tokens,
                m.language_match.map_or("-".into(), |x| format!("{:.0}%", 100.0 * x)),
                m.tied_with.map_or(String::new(), |r| format!("= #{r}"))
            )?;
        }
        self.fmt_lm(f)?;
        if self.models.iter().any(|m| m.tied_with.is_some()) {
            writeln!(
                f,
                "\n'= #N': not told apart from #N on these {} prompts and {} conversations (every figure's 95% interval overlaps); more held-out data would decide",
                self.prompts, self.conversations
            )?;
        }
        let shown = self.models.first().map_or(0, |m| m.answers.len().min(self.samples));
        for i in 0..shown {
            writeln!(f, "\nprompt: {}", cut(&self.models[0].answers[i].prompt, 100))?;
            for m in &self.models {
                let a = &m.answers[i];
                let end = if a.stopped { "" } else { " [no eos]" };
                writeln!(f, "  #{} {}: {}{end}", m.rank, cut(&m.model, 30), cut(&a.answer, 100))?;
            }
        }
        Ok(())
    }
}

impl EvalReport {
    /// The LM-loss figures, with `--lm-data`.
    fn fmt_lm(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(b) = &self.lm_reference {
            writeln!(
                f,
                "\nLM loss on the target-language text ({} documents), against {}: {}",
                b.documents,
                cut(&b.model, 60),
                b.lm_loss.map_or("-".into(), |l| format!("{l:.4}"))
            )?;
            for m in &self.models {
                writeln!(
                    f,
                    "  #{} {}: {} ({}){}",
                    m.rank,
                    cut(&m.model, 40),
                    m.lm_loss.map_or("-".into(), |l| format!("{l:.4}")),
                    m.lm_loss_increase.map_or("-".into(), |x| format!("{:+.1}%", 100.0 * x)),
                    if m.keeps_language == Some(false) {
                        format!(" over the {}% margin", b.margin_percent)
                    } else {
                        String::new()
                    }
                )?;
            }
            let front: Vec<String> = self
                .models
                .iter()
                .filter(|m| m.pareto == Some(true))
                .map(|m| format!("#{} {}", m.rank, cut(&m.model, 30)))
                .collect();
            if !front.is_empty() {
                let chat =
                    if self.primary.is_some() { "the primary figure" } else { "the assistant-token loss" };
                writeln!(
                    f,
                    "Pareto front ({chat} against the LM loss; no other model is better on one and as good on the other): {}",
                    front.join(", ")
                )?;
            }
            if self.none_acceptable {
                writeln!(
                    f,
                    "none acceptable: every candidate raises the LM loss by more than {}% over the base's; the merge costs the continued-pretraining language (try smaller scales)",
                    b.margin_percent
                )?;
            }
        }
        Ok(())
    }

    /// The judged benchmarks' table: each model's mean grade with its
    /// interval per benchmark, then per category and per turn.
    fn fmt_benchmarks(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.benchmarks {
            match (&b.judge_model, &b.judge_url) {
                (Some(model), Some(url)) => writeln!(
                    f,
                    "{}: {} questions, {} sample(s) per sampled question, graded 1-{} by {model} at {url}",
                    b.name,
                    b.questions,
                    b.samples.unwrap_or(1),
                    b.top.unwrap_or(10.0)
                )?,
                _ => writeln!(
                    f,
                    "{}: {} ({} documents, 95% interval from its standard error)",
                    b.name,
                    b.engine.as_deref().unwrap_or("lm_eval"),
                    b.questions
                )?,
            }
            for file in &b.files {
                writeln!(
                    f,
                    "  {} @ {}{} sha256 {}",
                    file.source,
                    file.revision,
                    file.commit
                        .as_ref()
                        .filter(|c| *c != &file.revision)
                        .map_or(String::new(), |c| format!(" ({c})")),
                    file.sha256
                )?;
            }
        }
        if self.benchmarks.iter().any(|b| b.kind == "judged") {
            writeln!(
                f,
                "judge requests sent this run: {} (the rest were kept from earlier runs)",
                self.judge_requests
            )?;
        }
        writeln!(f)?;
        write!(f, "{:>4}  {:<40} {:>8}", "rank", "model", "scale")?;
        for b in &self.benchmarks {
            write!(f, " {:>24}", cut(&b.name, 24))?;
        }
        writeln!(f, "  tie")?;
        for m in &self.models {
            write!(
                f,
                "{:>4}  {:<40} {:>8}",
                m.rank,
                cut(&m.model, 40),
                m.scale.as_ref().map_or("-".into(), |s| s.to_string())
            )?;
            for s in &m.benchmarks {
                let iv = s.interval.map_or(String::new(), |i| format!(" [{:.2}, {:.2}]", i.low, i.high));
                write!(f, " {:>24}", format!("{:.2}{iv}", s.score))?;
            }
            writeln!(f, "  {}", m.tied_with.map_or(String::new(), |r| format!("= #{r}")))?;
        }
        for (bi, b) in self.benchmarks.iter().enumerate() {
            let Some(first) = self.models.first().and_then(|m| m.benchmarks.get(bi)) else { continue };
            let cats: Vec<&String> = first.categories.keys().collect();
            if cats.len() > 1 {
                writeln!(f, "\n{} per category (mean grade):", b.name)?;
                write!(f, "{:>4}  {:<30}", "rank", "model")?;
                for c in &cats {
                    write!(f, " {:>10}", cut(c, 10))?;
                }
                writeln!(f)?;
                for m in &self.models {
                    write!(f, "{:>4}  {:<30}", m.rank, cut(&m.model, 30))?;
                    for c in &cats {
                        let v = m.benchmarks.get(bi).and_then(|s| s.categories.get(*c));
                        write!(f, " {:>10}", v.map_or("-".into(), |v| format!("{v:.2}")))?;
                    }
                    writeln!(f)?;
                }
            }
            if first.turns.len() > 1 {
                writeln!(f, "\n{} per turn (mean grade):", b.name)?;
                for m in &self.models {
                    let turns: Vec<String> = m
                        .benchmarks
                        .get(bi)
                        .map(|s| {
                            s.turns
                                .iter()
                                .enumerate()
                                .map(|(t, v)| format!("turn {}: {v:.2}", t + 1))
                                .collect()
                        })
                        .unwrap_or_default();
                    writeln!(f, "{:>4}  {:<30} {}", m.rank, cut(&m.model, 30), turns.join("  "))?;
                }
            }
        }
        if self.models.iter().any(|m| m.tied_with.is_some()) {
            writeln!(
                f,
                "\n'= #N': not told apart from #N on the primary figure (the 95% intervals overlap); more samples per question (--bench-samples) or more questions would decide"
            )?;
        }
        Ok(())
    }
}

/// Records in the chosen model's manifest that an evaluation chose it: the
/// rule, every model's figures, and which one won. (The manifest's output
/// hashes are untouched, so `verify` still passes.)
pub fn record_selection(chosen: &Path, report: &EvalReport) -> Result<()> {
    let figures: Vec<Value> = report
        .models
        .iter()
        .map(|x| {
            json!({
                "model": x.model, "rank": x.rank, "scale": x.scale, "assistant_loss": x.assistant_loss,
                "stop_rate": x.stop_rate, "stop_with_answer_rate": x.stop_with_answer_rate,
                "mean_answer_tokens": x.mean_answer_tokens, "language_match": x.language_match,
                "assistant_loss_interval": x.assistant_loss_interval,
                "stop_with_answer_interval": x.stop_with_answer_interval,
                "language_match_interval": x.language_match_interval, "tied_with": x.tied_with,
                "lm_loss": x.lm_loss, "lm_loss_increase": x.lm_loss_increase, "keeps_language": x.keeps_language,
                "pareto": x.pareto,
                "benchmarks": x.benchmarks.iter().map(|b| json!({
                    "bench": b.bench, "score": b.score, "interval": b.interval, "categories": b.categories, "turns": b.turns,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let selection = json!({
        "rule": report.rule,
        // The figure that ranked: a benchmark's mean grade, or the quick
        // set's rule.
        "metric": report.primary.and_then(|p| report.benchmarks.get(p)).map_or_else(
            || "quick set".to_string(),
            |b| match &b.judge_model {
                Some(j) => format!("{} mean grade (judge {j})", b.name),
                None => format!("{} ({})", b.name, b.engine.as_deref().unwrap_or("lm_eval")),
            },
        ),
        "benchmarks": report.benchmarks,
        "chosen": chosen.display().to_string(),
        // The choice was within a tie: another candidate could not be told
        // from the chosen one.
        "within_a_tie": report.models.iter().any(|m| m.tied_with == Some(1)),
        "lm_reference": report.lm_reference,
        "data": report.data,
        "candidates": figures,
    });
    crate::output::manifest::add_record(chosen, "selection", &selection)?;
    add_to_card(chosen, report)
}

/// States in the chosen model's card what the evaluation measured: its
/// figures (as the Hub's `model-index` too) and every candidate's ranking.
fn add_to_card(chosen: &Path, report: &EvalReport) -> Result<()> {
    use crate::output::card::{Figure, add_evaluation};
    let Some(me) = report.models.iter().find(|m| Path::new(&m.path) == chosen) else { return Ok(()) };
    let iv = |i: &Option<Interval>| i.map(|i| (i.low, i.high));
    let mut figures: Vec<Figure> = me
        .benchmarks
        .iter()
        .zip(&report.benchmarks)
        .map(|(b, info)| Figure {
            bench: b.bench.split('/').next().unwrap_or(&b.bench).to_string(),
            metric: match (&info.judge_model, b.bench.split_once('/')) {
                (Some(j), _) => format!("mean grade 1-{} (judge {j})", info.top.unwrap_or(10.0)),
                (None, Some((_, metric))) => metric.to_string(),
                (None, None) => "score".into(),
            },
            value: b.score,
            interval: iv(&b.interval),
        })
        .collect();
    if figures.is_empty() {
        let quick = "chatvec quick set";
        figures.push(Figure {
            bench: quick.into(),
            metric: "stop with an answer".into(),
            value: me.stop_with_answer_rate,
            interval: iv(&me.stop_with_answer_interval),
        });
        if let Some(l) = me.assistant_loss {
            figures.push(Figure {
                bench: quick.into(),
                metric: "assistant-token loss".into(),
                value: l,
                interval: iv(&me.assistant_loss_interval),
            });
        }
    }
    let primary = report.primary.and_then(|p| report.benchmarks.get(p)).map(|b| b.name.clone());
    let mut table = format!(
        "The candidates, ranked by {}:\n\n| rank | model | scale | {} | tied with |\n| --- | --- | --- | --- | --- |\n",
        report.rule,
        primary.as_deref().unwrap_or("stop with an answer / assistant-token loss")
    );
    for m in &report.models {
        let figure = match report.primary {
            Some(p) => m.benchmarks.get(p).map_or("-".into(), |b| format!("{:.3}", b.score)),
            None => format!(
                "{:.0}% / {}",
                100.0 * m.stop_with_answer_rate,
                m.assistant_loss.map_or("-".into(), |l| format!("{l:.4}"))
            ),
        };
        let name =
            Path::new(&m.path).file_name().map_or(m.model.clone(), |n| n.to_string_lossy().into_owned());
        table.push_str(&format!(
            "| {} | {}{} | {} | {figure} | {} |\n",
            m.rank,
            name.replace('|', "/"),
            if m.rank == me.rank { " (this model)" } else { "" },
            m.scale.as_ref().map_or("-".into(), |s| s.to_string()),
            m.tied_with.map_or(String::new(), |r| format!("#{r}"))
        ));
    }
    let name = chosen.file_name().map_or("model".into(), |n| n.to_string_lossy().into_owned());
    add_evaluation(chosen, &name, &figures, &table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str, answered: f64, loss: f64, keeps: Option<bool>) -> ModelEval {
        let iv = |x: f64| Some(Interval { low: x - 0.01, high: x + 0.01 });
        ModelEval {
            model: name.into(),
            path: name.into(),
            scale: None,
            engine: "transformers".into(),
            assistant_loss: Some(loss),
            assistant_tokens: 10,
            stop_rate: answered,
            stop_with_answer_rate: answered,
            mean_answer_tokens: 5.0,
            language_match: Some(1.0),
            assistant_loss_interval: iv(loss),
            stop_with_answer_interval: iv(answered),
            language_match_interval: iv(1.0),
            lm_loss: None,
            lm_loss_interval: None,
            lm_loss_increase: None,
            keeps_language: keeps,
            benchmarks: Vec::new(),
            tokens_per_second: None,
            pareto: None,
            answers: Vec::new(),
            rank: 0,
            tied_with: None,
        }
    }

    /// A candidate that loses the base's language ranks below every one
    /// that keeps it, however well it chats, and is never tied with one.
    #[test]
    fn candidates_that_lose_the_language_rank_last_and_tie_with_none_that_keep_it() {
        let mut ms = vec![
            model("chats-best-but-forgets", 1.0, 1.0, Some(false)),
            model("keeps", 0.5, 2.0, Some(true)),
            model("keeps-same", 0.5, 2.0, Some(true)),
            model("forgets-too", 1.0, 1.0, Some(false)),
        ];
        rank(&mut ms, None);
        let order: Vec<&str> = ms.iter().map(|m| m.model.as_str()).collect();
        assert_eq!(order, ["keeps", "keeps-same", "chats-best-but-forgets", "forgets-too"]);
        let tied: Vec<Option<usize>> = ms.iter().map(|m| m.tied_with).collect();
        assert_eq!(tied, [None, Some(1), None, Some(3)]);
    }

    /// The front holds the models no other beats on chat and LM loss
    /// together: the best chatter, the best keeper, and any between that
    /// trades one for the other; a model worse on both is off it.
    #[test]
    fn the_pareto_front_holds_the_models_no_other_dominates() {
        let with =
            |name: &str, asst: f64, lm: f64| ModelEval { lm_loss: Some(lm), ..model(name, 1.0, asst, None) };
        let mut ms = vec![
            with("chats-best", 1.0, 3.0),
            with("keeps-best", 2.0, 1.0),
            with("between", 1.5, 2.0),
            with("worse-on-both", 1.6, 2.5),
            with("ties-between", 1.5, 2.0),
        ];
        mark_pareto(&mut ms, None);
        let front: Vec<&str> =
            ms.iter().filter(|m| m.pareto == Some(true)).map(|m| m.model.as_str()).collect();
        assert_eq!(front, ["chats-best", "keeps-best", "between", "ties-between"]);
    }

    #[test]
    fn lm_texts_are_lines_or_json_text_and_bad_lines_are_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("lm.txt");
        std::fs::write(&p, "一行目の文章\n\n{\"text\": \"二つ目\"}\n").unwrap();
        assert_eq!(read_lm_texts(&p).unwrap(), ["一行目の文章", "二つ目"]);
        std::fs::write(&p, "ok\n{\"txt\": 1}\n").unwrap();
        let e = read_lm_texts(&p).unwrap_err().to_string();
        assert!(e.contains("lm.txt") && e.contains("line 2") && e.contains("\"text\""), "{e}");
        std::fs::write(&p, "\n \n").unwrap();
        assert!(read_lm_texts(&p).unwrap_err().to_string().contains("holds no text"));
    }
}
