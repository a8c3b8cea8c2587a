//! `chatvec sft`: the SFT stage on a merged model, by launching TRL
//! (`trl sft --config FILE --accelerate_config FILE`) as a supervised child
//! process. chatvec validates the data, checks the Python environment,
//! writes every config file into the run directory, streams the trainer's
//! output with a loss/learning-rate progress bar, forwards SIGINT/SIGTERM,
//! passes the exit code back (128+n for a signal), and records the run.
//!
//! `options` holds what the user asks for, `config` writes the trainer's
//! files, `data` validates and converts the chat data, `supervise` runs the
//! trainer as a child, `record` writes the run record, `launcher` the
//! Slurm/PBS scripts. This room resolves models and reads their side files;
//! it never touches weights.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::hash::sha256_file;
use crate::json::to_pretty;
use crate::output::manifest::MANIFEST_FILE;
use crate::output::sidecars::chat_template_text;
use crate::resolve::{open_model, open_probed};
use crate::sft::config::{
    LLAMA3_TRAINING_TEMPLATE, RunPaths, accelerate_config, decoder_layer_class, deepspeed_zero3,
    has_generation_markers, insert_assistant_markers, insert_llama3x_markers, is_llama3_style, sft_config,
    to_yaml,
};
use crate::sft::data::{DataStats, MixOut, MixedFile, process, write_eval, write_mixture};
use crate::ui;
use record::{Record, host_name, model_files, rfc3339};
use supervise::supervise;

pub(crate) mod config;
pub(crate) mod data;
pub(crate) mod hub_data;
pub(crate) mod launcher;
pub(crate) mod options;
pub(crate) mod record;
pub(crate) mod supervise;

pub(crate) use record::add_to_record;

use options::nearest;
pub use options::{DataFile, SftOptions, parse_train_arg};

pub(crate) const RECORD_FILE: &str = "chatvec-sft-run.json";

/// One SFT run: which model, into which run directory, with what options.
#[derive(Clone, Debug)]
pub struct SftJob {
    /// The model to train (directory, Hub id or alias), e.g. the output of
    /// `apply`.
    pub model: String,
    /// The run directory: configs, converted data, the trained model, the
    /// run record.
    pub output: PathBuf,
    /// Replace an existing run directory.
    pub force: bool,
    /// Prepare and report everything, run nothing.
    pub dry_run: bool,
    /// How to train.
    pub options: SftOptions,
}

/// Runs TRL's command line in the interpreter chatvec was given; written
/// into the run directory and run isolated (see `python`).
const LAUNCH_SCRIPT: &str = "# Written by chatvec: runs TRL's command line (`trl sft ...`).\nimport sys\nfrom trl.cli import main\nsys.exit(main())\n";

/// The launcher's file name in the run directory.
const LAUNCH_FILE: &str = "trl_launch.py";

/// A config file of the run: name and text.
struct RunFile {
    name: &'static str,
    text: String,
}

/// Where a run's files go. With one node everything is in the run
/// directory. With several, each node writes only its own `node-RANK/`
/// (configs, data, record), so nodes sharing a filesystem never write or
/// remove each other's files; the trained model is the one shared
/// directory, written by the trainer (global rank 0, and every rank for
/// sharded checkpoints).
struct Layout {
    /// This node's files.
    own: PathBuf,
    /// The trainer's output, shared by all nodes: checkpoints and its final
    /// save (RUN/checkpoints, from which chatvec moves the model into
    /// RUN/model), or with LoRA the final adapter (RUN/adapter), which
    /// chatvec then merges into RUN/model.
    trainer: PathBuf,
    /// Where runs before RUN/checkpoints kept their checkpoints (RUN/model),
    /// so `--resume latest` still finds them.
    legacy: PathBuf,
}

impl Layout {
    fn of(job: &SftJob) -> Layout {
        let a = &job.options;
        let own =
            if a.nnodes > 1 { job.output.join(format!("node-{}", a.node_rank)) } else { job.output.clone() };
        let trainer = if a.lora { job.output.join("adapter") } else { job.output.join("checkpoints") };
        Layout { own, trainer, legacy: model_dir(job) }
    }
}

/// Where the run's final full model goes: the trainer saves it there, or
/// with LoRA chatvec merges the adapter into it.
pub(crate) fn model_dir(job: &SftJob) -> PathBuf {
    job.output.join("model")
}

/// Everything the run is, before it starts.
struct Prepared {
    command: Vec<String>,
    env: Vec<(String, String)>,
    files: Vec<RunFile>,
    stats: Vec<DataStats>,
    eval_stats: Option<DataStats>,
    python: crate::python::PythonEnv,
    model_dir: PathBuf,
    model_manifest_sha256: Option<String>,
    template: Value,
    /// The model's chat template as it came (or `--chat-template`'s),
    /// before any training markers: what the saved model carries.
    original_template: String,
    /// Whether chatvec tokenizes the data with its assistant masks before
    /// launch (a template nobody can mark; see `premask.py`).
    premask: bool,
    resume_from: Option<PathBuf>,
    layout: Layout,
}

fn abs(p: &Path) -> String {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string()
}

/// The latest `checkpoint-N` the trainer wrote in `dir`.
fn latest_checkpoint(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let n: u64 = e.file_name().to_str()?.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().join("trainer_state.json").is_file().then_some((n, e.path()))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
}

/// The checkpoint `--resume` names: `latest` in the run's model directory,
/// or a checkpoint directory.
fn resume_point(resume: &str, layout: &Layout) -> Result<PathBuf> {
    if resume == "latest" {
        return latest_checkpoint(&layout.trainer).or_else(|| latest_checkpoint(&layout.legacy)).ok_or_else(
            || {
                Error::Usage(format!(
                    "--resume latest: {} holds no checkpoint-N to resume from",
                    layout.trainer.display()
                ))
                .with_hint("checkpoints are saved every --save-steps steps; without one, start the run again")
            },
        );
    }
    let p = PathBuf::from(resume);
    if !p.join("trainer_state.json").is_file() {
        return Err(Error::Usage(format!(
            "--resume {resume}: not a trainer checkpoint (no trainer_state.json in it)"
        )));
    }
    Ok(std::fs::canonicalize(&p).unwrap_or(p))
}

/// The chat template to train with and where it came from: `--chat-template`
/// (a Jinja file, or a model whose template to take), else the model's own.
fn chosen_template(a: &SftOptions, model_dir: &Path) -> Result<Option<(String, String)>> {
    match a.chat_template.as_deref() {
        Some(t) => template_arg(t).map(Some),
        None => Ok(chat_template_text(model_dir)?.map(|t| (t, format!("model {}", model_dir.display())))),
    }
}

/// `--chat-template FILE|MODEL` (sft's and eval's): a Jinja file, or the
/// template of a model; the text and where it came from.
pub(crate) fn template_arg(t: &str) -> Result<(String, String)> {
    if Path::new(t).is_file() {
        let text = crate::json::read_capped(Path::new(t), 1 << 20)?;
        let text = String::from_utf8(text)
            .map_err(|_| Error::bad_file(Path::new(t), "a chat template must be UTF-8 text"))?;
        return Ok((text, format!("file {}", abs(Path::new(t)))));
    }
    let ck = open_model(t)?;
    let text = chat_template_text(&ck.dir)?.ok_or_else(|| {
        Error::Usage(format!("--chat-template {t}: neither a file nor a model with a chat template"))
    })?;
    Ok((text, format!("model {}", ck.dir.display())))
}

/// A model directory has a tokenizer the data can be tokenized with.
fn check_tokenizer(dir: &Path) -> Result<()> {
    let has_tokenizer = ["tokenizer.json", "tokenizer.model"]
        .iter()
        .map(|f| crate::model::side_file(dir, f))
        .collect::<Result<Vec<_>>>()?
        .iter()
        .any(Option::is_some);
    if !has_tokenizer {
        return Err(Error::Usage(format!(
            "{} has no tokenizer (tokenizer.json or tokenizer.model), so the data cannot be tokenized",
            dir.display()
        )));
    }
    Ok(())
}

/// The chat template a run would render the data with, and chatvec's
/// marked copy of it where one is asked about.
struct TemplateCheck {
    template: String,
    source: String,
    marked: Option<String>,
}

/// Finds the template for `dir` and checks the interpreter's packages;
/// for a template without markers that chatvec does not mark itself, asks
/// TRL, before launch, whether it patches it.
fn check_template(
    a: &SftOptions,
    dir: &Path,
    needed: &[&str],
    launch_only: &[&str],
    dry_run: bool,
) -> Result<(TemplateCheck, crate::python::PythonEnv)> {
    let Some((template, source)) = chosen_template(a, dir)? else {
        return Err(Error::Usage(format!("{} has no chat template, so chat data cannot be rendered", dir.display()))
            .with_hint("pass --chat-template FILE|MODEL, or apply a chat vector with chatvec (it installs the chat model's template)"));
    };
    let ask = a.assistant_only_loss && !has_generation_markers(&template) && !is_llama3_style(&template);
    let marked = if ask { insert_assistant_markers(&template) } else { None };
    let python = crate::python::check(
        &crate::python::interpreter(a.python.as_deref())?,
        needed,
        launch_only,
        dry_run,
        ask.then_some((dir, template.as_str(), marked.as_deref())),
    )?;
    Ok((TemplateCheck { template, source, marked }, python))
}

/// The template the trainer is given (`used`) and how it came from the
/// model's, or why assistant-only loss cannot train with it.
fn training_template(
    a: &SftOptions,
    template: &str,
    source: &str,
    python: &crate::python::PythonEnv,
    marked: Option<&String>,
) -> Result<(String, &'static str, bool)> {
    let mut premask = false;
    let mut used = template.to_string();
    let mut how = "as it is";
    if a.assistant_only_loss && !has_generation_markers(template) {
        if !is_llama3_style(template) {
            match (&python.trl_patches_template, &python.marked_ok, marked) {
                // TRL swaps in its training copy while encoding; the model
                // is saved with the template as it is.
                (Some((true, _)), _, _) => {
                    how = "as it is; TRL adds generation markers for its family while training"
                }
                // chatvec's copy, proven to render the same text.
                (_, Some((true, _)), Some(m)) => {
                    used = m.clone();
                    how = "with {% generation %} markers inserted around the assistant reply (checked: same rendering, reply masked)";
                }
                // Neither can mark it: chatvec computes the masks itself by
                // rendering each reply's prefixes (premask.py), which holds
                // for any template that renders a conversation as a prefix
                // of its continuation; the data is checked line by line
                // before launch.
                _ => {
                    premask = true;
                    how = "as it is; chatvec computes the assistant masks by rendering each reply's prefixes (the template has no {% generation %} markers and none can be added)";
                }
            }
        } else if template.contains("tools") || template.contains("Cutting Knowledge") {
            // Llama 3.1 / 3.3: the plain Llama 3 training template would
            // drop their system block and tools, so markers go in place.
            used = insert_llama3x_markers(template).ok_or_else(|| {
                Error::Usage(format!(
                    "the chat template ({source}) is Llama 3.1/3.3 style (system block, tools) without {{% generation %}} markers, and chatvec does not recognise its message expression to add them"
                ))
                .with_hint("pass --chat-template with a copy that wraps the assistant content in {% generation %}...{% endgeneration %}, or --assistant-only-loss false")
            })?;
            how = "with {% generation %} markers inserted around the assistant content (same rendering)";
        } else {
            used = LLAMA3_TRAINING_TEMPLATE.to_string();
            how = "replaced by chatvec's Llama 3 training template (same rendering, with generation markers)";
        }
    }
    Ok((used, how, premask))
}

fn prepare(job: &SftJob) -> Result<Prepared> {
    let a = &job.options;
    a.check()?;
    let layout = Layout::of(job);
    // A Hub model not yet cached is checked on its probe (tokenizer,
    // template, config) before its weights are fetched.
    let (ck, probe) = open_probed(&job.model)?;
    let check_dir = ck.dir.clone();
    // What the trainer would fail on a minute after launch, said now.
    check_tokenizer(&check_dir)?;
    let model_manifest_sha256 = match crate::model::side_file(&check_dir, MANIFEST_FILE)? {
        Some(manifest) => Some(sha256_file(&manifest)?),
        None => None,
    };
    let (stats, eval_stats) = data_stats(a)?;
    let resume_from = a.resume.as_deref().map(|r| resume_point(r, &layout)).transpose()?;
    let needed = ["torch", "transformers", "trl", "accelerate", "datasets"];
    let mut launch_only = Vec::new();
    if a.lora {
        launch_only.push("peft");
    }
    if a.deepspeed.is_some() {
        launch_only.push("deepspeed");
    }
    let (TemplateCheck { template, source, marked }, python) =
        check_template(a, &check_dir, &needed, &launch_only, job.dry_run)?;
    if let Some(known) = &python.settings {
        for key in a.train_args.keys() {
            if !known.contains(key) {
                let near = nearest(key, known.iter().map(String::as_str));
                let e = Error::Usage(format!(
                    "--train-arg {key}: not a setting of TRL's SFTConfig, ModelConfig or ScriptArguments in {}",
                    python.python
                ));
                return Err(match near {
                    Some(k) => e.with_hint(format!("did you mean {k}?")),
                    None => e,
                });
            }
        }
    }
    // FSDP and DeepSpeed run on GPUs (accelerate turns an FSDP config on
    // CPU processes into plain DDP). A dry run writes their configs anyway,
    // so a cluster job can be prepared on a login node without GPUs. Plain
    // data parallelism also runs on CPUs, over gloo.
    let wants_gpu = a.fsdp || a.deepspeed.is_some();
    let gpu = python.cuda_devices > 0 || (job.dry_run && wants_gpu);
    if !job.dry_run {
        if wants_gpu && python.cuda_devices == 0 {
            return Err(Error::Usage(format!(
                "{} needs GPUs, and torch sees none here",
                if a.fsdp { "--fsdp" } else { "--deepspeed" }
            ))
            .with_hint("--dry-run prepares the configs on a machine without GPUs; --nproc N without them trains N CPU processes (DDP over gloo)"));
        }
        if python.cuda_devices > 0 && a.nproc > python.cuda_devices {
            return Err(Error::Usage(format!(
                "--nproc {}: torch sees {} GPU(s) on this node",
                a.nproc, python.cuda_devices
            )));
        }
    }
    // Where the trainer finds the model: a probe's snapshot, downloaded
    // now that every check passed (a dry run only names it).
    let model_dir = match probe {
        None => check_dir,
        Some((_probes, snapshot)) if job.dry_run => snapshot,
        Some(_) => open_model(&job.model)?.dir,
    };
    let tf_major = python
        .packages
        .get("transformers")
        .and_then(Value::as_str)
        .and_then(|v| v.split('.').next()?.parse().ok())
        .unwrap_or(5);
    let own = abs(&layout.own);
    let mut files = Vec::new();
    let mut template_path = None;
    let (used, how, premask) = training_template(a, &template, &source, &python, marked.as_ref())?;
    if used != template || a.chat_template.is_some() || premask {
        files.push(RunFile { name: "chat_template.jinja", text: used.clone() });
        template_path = Some(format!("{own}/chat_template.jinja"));
    }
    let template_record = json!({
        "source": source,
        "used": how,
        "sha256": crate::hash::hex(&<sha2::Sha256 as sha2::Digest>::digest(used.as_bytes())),
    });
    let architecture = ck
        .config
        .as_ref()
        .and_then(|c| c.raw.get("architectures")?.as_array()?.first()?.as_str().map(str::to_string))
        .unwrap_or_else(|| "LlamaForCausalLM".into());
    let ds_file = format!("{own}/deepspeed_zero3.json");
    let data_dir = format!("{own}/data");
    let model_out = abs(&layout.trainer);
    let resume_str = resume_from.as_ref().map(|p| p.display().to_string());
    let paths = RunPaths {
        model_dir: &abs(&model_dir),
        data_dir: &data_dir,
        has_eval: a.eval_data.is_some() || a.eval_split.is_some(),
        output_dir: &model_out,
        chat_template: template_path.as_deref(),
        resume_from: resume_str.as_deref(),
        premasked: premask,
    };
    let sft = sft_config(&paths, a, gpu, tf_major);
    files.push(RunFile { name: "sft_config.yaml", text: to_yaml(&sft)? });
    let accel = accelerate_config(a, gpu, &decoder_layer_class(&architecture), &ds_file);
    files.push(RunFile { name: "accelerate_config.yaml", text: to_yaml(&accel)? });
    if a.deepspeed.is_some() {
        files.push(RunFile {
            name: "deepspeed_zero3.json",
            text: String::from_utf8_lossy(&to_pretty(&deepspeed_zero3(gpu, a.cpu_offload))).into_owned(),
        });
    }
    files.push(RunFile { name: LAUNCH_FILE, text: LAUNCH_SCRIPT.into() });
    let mut command = vec![python.python.clone()];
    command.extend(crate::python::ISOLATED.iter().map(|f| f.to_string()));
    command.extend([
        format!("{own}/{LAUNCH_FILE}"),
        "sft".into(),
        "--config".into(),
        format!("{own}/sft_config.yaml"),
        "--accelerate_config".into(),
        format!("{own}/accelerate_config.yaml"),
    ]);
    // Unbuffered, so the loss streams as it is logged.
    let env = vec![
        ("PYTHONUNBUFFERED".to_string(), "1".to_string()),
        ("TOKENIZERS_PARALLELISM".to_string(), "false".to_string()),
    ];
    Ok(Prepared {
        command,
        env,
        files,
        stats,
        eval_stats,
        python,
        model_dir,
        model_manifest_sha256,
        template: template_record,
        original_template: template,
        premask,
        resume_from,
        layout,
    })
}

/// A shell-quoted command line, for display.
pub(crate) fn shell_line(cmd: &[String]) -> String {
    cmd.iter()
        .map(|a| {
            if a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:@".contains(c)) {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What `sft` did, or on a dry run what it would do. `--json` prints it as
/// is; `Display` shows the command, environment and config files.
#[derive(Debug, Serialize)]
pub struct SftReport {
    /// The run directory.
    pub output: String,
    /// Whether this was a dry run (nothing written or launched).
    pub dry_run: bool,
    /// The trainer's command line.
    pub command: Vec<String>,
    /// The environment it runs with, beyond chatvec's own.
    pub env: Vec<(String, String)>,
    /// The config files written into the run directory: name and text.
    pub files: Vec<(String, String)>,
    /// The trainer's exit code (128 + n for signal n; 0 on a dry run).
    pub exit_code: i32,
    /// Loss lines the trainer logged.
    pub steps_logged: u64,
    /// The last logged loss.
    pub final_loss: Option<f64>,
    /// With LoRA, the adapter the trainer saved (to be merged into the
    /// run's model directory).
    pub adapter: Option<String>,
}

impl std::fmt::Display for SftReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "command: {}", shell_line(&self.command))?;
        writeln!(f, "environment:")?;
        for (k, v) in &self.env {
            writeln!(f, "  {k}={v}")?;
        }
        for (name, text) in &self.files {
            write!(f, "--- {}/{name}\n{text}", self.output)?;
            if !text.ends_with('\n') {
                writeln!(f)?;
            }
        }
        Ok(())
    }
}

/// Supervised fine-tuning: validates the data and the Python environment,
/// writes every config file into the run directory, launches TRL as a
/// supervised child (its output streamed, SIGINT/SIGTERM forwarded) and
/// records the run. The report's `exit_code` is the trainer's. (The job
/// room's `sft` then merges a LoRA adapter.)
pub(crate) fn train(job: &SftJob) -> Result<SftReport> {
    let a = &job.options;
    if let Some(l) = &a.launcher {
        return write_job_script(job, l);
    }
    let own = Layout::of(job).own;
    if a.resume.is_none() && own.exists() && !job.force && !job.dry_run {
        return Err(Error::OutputExists(own));
    }
    if a.resume.is_some() && job.force {
        return Err(Error::Usage(
            "--resume continues the run in its directory; --force would delete it".into(),
        ));
    }
    let p = prepare(job)?;
    for (f, st) in a.data.iter().zip(&p.stats) {
        ui::note(&format!(
            "data {} (weight {}): {} examples, {} turns, {} characters, sha256 {}",
            f.path.display(),
            f.weight,
            st.examples,
            st.turns,
            st.characters,
            st.sha256
        ));
    }
    let pkgs: Vec<String> =
        p.python.packages.iter().map(|(k, v)| format!("{k} {}", v.as_str().unwrap_or("?"))).collect();
    ui::note(&format!(
        "python {} ({}): {}; {} CUDA device(s)",
        p.python.python,
        p.python.version,
        pkgs.join(", "),
        p.python.cuda_devices
    ));
    ui::note(&format!(
        "chat template: {}, {}",
        p.template["source"].as_str().unwrap_or("?"),
        p.template["used"].as_str().unwrap_or("?")
    ));
    if let Some(r) = &p.resume_from {
        ui::note(&format!("resuming from {}", r.display()));
    }
    ui::note(&global_batch(a));
    let mut report = SftReport {
        output: abs(&job.output),
        dry_run: job.dry_run,
        command: p.command.clone(),
        env: p.env.clone(),
        files: p
            .files
            .iter()
            .map(|f| {
                let at = own.join(f.name);
                let name = at.strip_prefix(&job.output).unwrap_or(&at).display().to_string();
                (name, f.text.clone())
            })
            .collect(),
        exit_code: 0,
        steps_logged: 0,
        final_loss: None,
        adapter: None,
    };
    if job.dry_run {
        return Ok(report);
    }
    if own.exists() && a.resume.is_none() {
        // --force replaces an earlier run directory (it holds the trainer's
        // config) or an empty one, never other files, what the run reads,
        // or the directory it was started from.
        if let Some(why) = crate::output::dir::refuse_replacing(&own, "sft_config.yaml") {
            return Err(Error::Usage(format!(
                "--force replaces only an earlier `chatvec sft` run directory or an empty directory, and {} is neither: {why}",
                own.display()
            ))
            .with_hint("remove it yourself, or choose another run directory"));
        }
        let out = std::fs::canonicalize(&own).map_err(|e| Error::io("resolving", &own, e))?;
        let inside = |p: &Path| std::fs::canonicalize(p).is_ok_and(|c| c.starts_with(&out));
        let reads_inside =
            a.data.iter().any(|f| inside(&f.path)) || a.eval_data.as_deref().is_some_and(inside);
        if inside(&p.model_dir) || reads_inside || std::env::current_dir().is_ok_and(|c| inside(&c)) {
            return Err(Error::Usage(format!(
                "{} holds the model, the data or the current directory; choose another run directory",
                own.display()
            )));
        }
        std::fs::remove_dir_all(&own).map_err(|e| Error::io("removing", &own, e))?;
    }
    let data_dir = own.join("data");
    std::fs::create_dir_all(&data_dir).map_err(|e| Error::io("creating", &data_dir, e))?;
    let mixed = write_data(a, &data_dir)?;
    for f in &p.files {
        let path = own.join(f.name);
        std::fs::write(&path, &f.text).map_err(|e| Error::io("writing", &path, e))?;
    }
    if p.premask {
        // A conversation the template cannot split is refused before
        // launch; the run directory this call made goes with it.
        if let Err(e) = premask_data(&p, &own) {
            if a.resume.is_none() {
                let _ = std::fs::remove_dir_all(&own);
            }
            return Err(e);
        }
    }
    let started = std::time::SystemTime::now();
    let start = Instant::now();
    let (code, steps, last_loss, signals) = supervise(&p.command, &p.env, a.max_steps)?;
    let mut files = Vec::new();
    let data_files = ["data/train.jsonl", "data/test.jsonl"].into_iter().filter(|f| own.join(f).is_file());
    for name in p.files.iter().map(|f| f.name).chain(data_files) {
        files.push(json!({"file": name, "sha256": sha256_file(&own.join(name))?}));
    }
    let trained = if code == 0 { model_files(&p.layout.trainer)? } else { Vec::new() };
    let record = Record {
        tool: "chatvec",
        version: env!("CARGO_PKG_VERSION"),
        command: &p.command,
        env: &p.env,
        run_dir: abs(&job.output),
        host: host_name(),
        node_rank: a.node_rank,
        world_size: a.world_size(),
        started: rfc3339(started),
        ended: rfc3339(std::time::SystemTime::now()),
        files,
        python: &p.python,
        model: json!({"reference": job.model, "path": abs(&p.model_dir), "manifest_sha256": p.model_manifest_sha256}),
        dataset: json!({
            "files": mixed,
            "eval": a.eval_data.as_deref().map(abs),
            "eval_stats": p.eval_stats,
            "eval_split": a.eval_split,
            // Hub datasets: repository, revision, commit and each file's sha256.
            "hub": a.data.iter().map(|f| f.path.as_path()).chain(a.eval_data.as_deref())
                .map(hub_data::resolve)
                .filter_map(|r| r.transpose())
                .collect::<Result<Vec<_>>>()?,
        }),
        chat_template: &p.template,
        resumed_from: p.resume_from.as_deref().map(abs),
        steps_logged: steps,
        final_loss: last_loss,
        exit_code: code,
        interrupted: signals > 0,
        seconds: start.elapsed().as_secs_f64(),
        trained_model: json!({"dir": abs(&p.layout.trainer), "files": trained, "lora": a.lora}),
    };
    let rec = own.join(RECORD_FILE);
    std::fs::write(&rec, to_pretty(&record)).map_err(|e| Error::io("writing", &rec, e))?;
    report.exit_code = code;
    report.steps_logged = steps;
    report.final_loss = last_loss;
    if code == 0 {
        // Only global rank 0 saves the model: other nodes have nothing to check.
        if a.node_rank == 0 && trained.is_empty() {
            return Err(Error::io(
                "reading",
                &p.layout.trainer,
                std::io::Error::other("the trainer exited 0 but saved no model weights there"),
            ));
        }
        let what = if a.lora { "LoRA adapter" } else { "trained model" };
        let at = if a.lora || a.node_rank != 0 {
            p.layout.trainer.clone()
        } else {
            let data: Vec<String> = a.data.iter().map(|f| f.spelled()).collect();
            let settings = [
                ("data", data.join(", ")),
                ("learning rate", a.lr.to_string()),
                ("epochs", a.max_steps.map_or(a.epochs.to_string(), |m| format!("{m} steps"))),
                ("warmup ratio", a.warmup_ratio.to_string()),
                ("global batch", (a.batch_size * a.grad_accum * a.world_size()).to_string()),
                ("max sequence length", a.max_seq_len.to_string()),
                ("assistant-only loss", a.assistant_only_loss.to_string()),
                ("final logged loss", last_loss.map_or("-".into(), |l| l.to_string())),
            ];
            let card = crate::output::card::sft_card(&job.model, &p.model_dir, &settings);
            finalize(&p.layout.trainer, &model_dir(job), &p.original_template, &card)?;
            let input = json!({
                "role": "base",
                "reference": job.model,
                "path": abs(&p.model_dir),
                "manifest_sha256": p.model_manifest_sha256,
            });
            let params: serde_json::Map<String, Value> =
                settings.iter().map(|(k, v)| (k.to_string(), Value::String(v.clone()))).collect();
            crate::output::manifest::write_trained(&model_dir(job), input, Value::Object(params))?;
            add_to_record(
                job,
                "served_model",
                json!({"dir": abs(&model_dir(job)), "files": model_files(&model_dir(job))?}),
            )?;
            model_dir(job)
        };
        ui::note(&format!("{what} in {}, run record {}", at.display(), rec.display()));
        if a.lora && a.node_rank == 0 {
            report.adapter = Some(abs(&p.layout.trainer));
        }
    }
    Ok(report)
}

/// The helper that tokenizes the data with its assistant masks.
const PREMASK_SCRIPT: &str = include_str!("premask.py");

/// Rewrites the run's data files as tokenized examples with assistant
/// masks computed from each reply's prefixes (`premask.py`), which TRL
/// trains on as they are.
fn premask_data(p: &Prepared, own: &Path) -> Result<()> {
    let helper = crate::python::Helper::write("premask.py", PREMASK_SCRIPT)?;
    let data: Vec<PathBuf> =
        ["data/train.jsonl", "data/test.jsonl"].iter().map(|f| own.join(f)).filter(|f| f.is_file()).collect();
    let python = Path::new(&p.python.python);
    let out = helper
        .command(python)
        .arg(&p.model_dir)
        .arg(own.join("chat_template.jinja"))
        .args(&data)
        .output()
        .map_err(|e| Error::io("running", python, e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = text.lines().rev().find_map(|l| serde_json::from_str(l).ok()).unwrap_or(Value::Null);
    if let Some(e) = v["error"].as_str() {
        return Err(Error::Usage(format!("assistant-only loss: {e}"))
            .with_hint("pass --chat-template with a template that renders each conversation as a prefix of its continuation, or --assistant-only-loss false"));
    }
    if !out.status.success() || v.get("ok").is_none() {
        let tail = String::from_utf8_lossy(&out.stderr);
        let last = tail.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("(no output)");
        return Err(Error::Usage(format!(
            "tokenizing the data with its assistant masks failed ({}): {last}",
            out.status
        )));
    }
    ui::note(&format!("tokenized the data with assistant masks from each reply's prefixes: {}", v["ok"]));
    Ok(())
}

/// Whether a file of the trainer's final save belongs to the model that is
/// served: weights, their index, config, generation config, tokenizer;
/// not training state (`training_args.bin`, `checkpoint-N/`), TRL's card or
/// the training copy of the chat template.
fn served(name: &str) -> bool {
    let weights = name.ends_with(".safetensors")
        || name == "model.safetensors.index.json"
        || (name.starts_with("pytorch_model") && (name.ends_with(".bin") || name.ends_with(".index.json")));
    weights || (crate::model::SIDE_FILES.contains(&name) && !name.starts_with("chat_template"))
}

/// Moves the trainer's final save from `from` (RUN/checkpoints) into `to`
/// (RUN/model), which then holds only the model: its files (`served`), the
/// chat template it came with (no `{% generation %}` markers, which serving
/// engines do not expect) and chatvec's card. Checkpoints stay in `from`,
/// where `--resume` finds them.
fn finalize(from: &Path, to: &Path, template: &str, card: &[u8]) -> Result<()> {
    // The files of an earlier finish of this run (a resumed run finishing
    // again) are replaced; directories are kept: runs from before
    // RUN/checkpoints kept their checkpoints here.
    if to.is_dir() {
        for e in std::fs::read_dir(to).map_err(|e| Error::io("listing", to, e))? {
            let e = e.map_err(|e| Error::io("listing", to, e))?;
            if e.file_type().is_ok_and(|t| t.is_file()) {
                std::fs::remove_file(e.path()).map_err(|err| Error::io("removing", &e.path(), err))?;
            }
        }
    }
    std::fs::create_dir_all(to).map_err(|e| Error::io("creating", to, e))?;
    for e in std::fs::read_dir(from).map_err(|e| Error::io("listing", from, e))? {
        let e = e.map_err(|e| Error::io("listing", from, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type().is_ok_and(|t| t.is_file()) && served(&name) {
            std::fs::rename(e.path(), to.join(&name)).map_err(|err| Error::io("moving", &e.path(), err))?;
        }
    }
    let cfg = to.join("tokenizer_config.json");
    if cfg.is_file() {
        let mut v = crate::json::read_value(&cfg, 64 << 20)?;
        if let Some(o) = v.as_object_mut()
            && o.remove("chat_template").is_some()
        {
            let text = serde_json::to_string_pretty(&v).map_err(|e| Error::Internal(e.to_string()))?;
            std::fs::write(&cfg, text).map_err(|e| Error::io("writing", &cfg, e))?;
        }
    }
    let tpl = to.join("chat_template.jinja");
    std::fs::write(&tpl, template).map_err(|e| Error::io("writing", &tpl, e))?;
    let readme = to.join(crate::model::CARD_FILE);
    std::fs::write(&readme, card).map_err(|e| Error::io("writing", &readme, e))
}

/// `--launcher`: checks the options and the data, then writes the batch
/// script beside the run directory (`RUN.slurm`, `RUN.pbs`); each node's
/// run then checks its own Python environment and GPUs.
/// The global batch and the most tokens one optimizer step can see, said
/// before training (accumulation and process count multiply the batch a
/// user sets per device, which is easy to misjudge by 8x or 64x).
fn global_batch(a: &SftOptions) -> String {
    let global = a.batch_size * a.grad_accum * a.world_size();
    format!(
        "global batch: {} per device x {} accumulation x {} process(es) = {global} sequences per optimizer step, at most {} tokens (max_seq_len {})",
        a.batch_size,
        a.grad_accum,
        a.world_size(),
        global * a.max_seq_len,
        a.max_seq_len
    )
}

fn write_job_script(job: &SftJob, launcher: &str) -> Result<SftReport> {
    job.check_data()?;
    let a = &job.options;
    let out = std::path::absolute(&job.output).map_err(|e| Error::io("resolving", &job.output, e))?;
    let script = out.with_extension(launcher);
    let cwd = std::env::current_dir().map_err(|e| Error::io("reading", Path::new("."), e))?;
    let exe = std::env::current_exe().map_err(|e| Error::io("locating", Path::new("chatvec"), e))?;
    let mut node = job.clone();
    node.options.launcher = None;
    (node.options.partition, node.options.account, node.options.time) = (None, None, None);
    node.options.sched_args.clear();
    node.options.sbatch_args.clear();
    node.options.pbs_args.clear();
    node.options.job_setup.clear();
    node.dry_run = false;
    // The interpreter chatvec was told to use goes into the script, so the
    // nodes use it whatever their login environment says.
    let python = a.python.clone().or_else(|| std::env::var_os(crate::python::PYTHON_ENV).map(PathBuf::from));
    // Directives for this scheduler: the generic ones, then its own.
    let own = if launcher == "pbs" { &a.pbs_args } else { &a.sbatch_args };
    let directives: Vec<String> = a.sched_args.iter().chain(own).cloned().collect();
    let sched = launcher::Scheduling {
        partition: a.partition.as_deref(),
        account: a.account.as_deref(),
        time: a.time.as_deref(),
        directives: &directives,
        setup: &a.job_setup,
        python: python.as_deref(),
    };
    ui::note(&global_batch(a));
    let text =
        launcher::job_script(launcher, &exe, &node.command_args(), a.nnodes, a.nproc, &script, &cwd, &sched)?;
    let submit = if launcher == "pbs" { "qsub" } else { "sbatch" };
    let report = SftReport {
        // The script sits beside the run directory.
        output: out.parent().unwrap_or(&out).display().to_string(),
        dry_run: job.dry_run,
        command: vec![submit.into(), script.display().to_string()],
        env: Vec::new(),
        files: vec![(
            script.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            text.clone(),
        )],
        exit_code: 0,
        steps_logged: 0,
        final_loss: None,
        adapter: None,
    };
    if job.dry_run {
        return Ok(report);
    }
    if script.exists() && !job.force {
        return Err(Error::OutputExists(script));
    }
    if let Some(parent) = script.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io("creating", parent, e))?;
    }
    std::fs::write(&script, &text).map_err(|e| Error::io("writing", &script, e))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| Error::io("writing", &script, e))?;
    ui::note(&format!("wrote {}: submit it with {submit} {}", script.display(), script.display()));
    Ok(report)
}

/// Writes `data/train.jsonl` (the weighted mixture) and, with an eval set,
/// `data/test.jsonl` into `dir`; the file names are the split names the
/// trainer loads them under.
fn write_data(a: &SftOptions, dir: &Path) -> Result<Vec<MixedFile>> {
    let create = |name: &str| -> Result<(PathBuf, std::io::BufWriter<std::fs::File>)> {
        let path = dir.join(name);
        let f = std::fs::File::create(&path).map_err(|e| Error::io("creating", &path, e))?;
        Ok((path, std::io::BufWriter::new(f)))
    };
    let (train_path, mut train) = create("train.jsonl")?;
    let mut eval =
        if a.eval_data.is_some() || a.eval_split.is_some() { Some(create("test.jsonl")?) } else { None };
    let inputs: Vec<(&Path, f64)> = a.data.iter().map(|f| (f.path.as_path(), f.weight)).collect();
    let mixed = write_mixture(
        &inputs,
        a.seed,
        MixOut {
            train: &mut train,
            eval: match (&mut eval, a.eval_split) {
                (Some((_, w)), Some(split)) => Some((w as &mut dyn Write, split)),
                _ => None,
            },
        },
    )?;
    if let (Some(path), Some((_, w))) = (a.eval_data.as_deref(), eval.as_mut()) {
        write_eval(path, w)?;
    }
    train.flush().map_err(|e| Error::io("writing", &train_path, e))?;
    if let Some((p, mut w)) = eval {
        w.flush().map_err(|e| Error::io("writing", &p, e))?;
    }
    Ok(mixed)
}

/// Validates every line of each data file and of the eval file, and counts
/// what they hold.
fn data_stats(a: &SftOptions) -> Result<(Vec<DataStats>, Option<DataStats>)> {
    let stats = a.data.iter().map(|f| process(&f.path)).collect::<Result<Vec<_>>>()?;
    Ok((stats, a.eval_data.as_deref().map(process).transpose()?))
}

impl SftJob {
    /// Checks the options and every line of the data, as `sft` does before
    /// anything else (`chatvec run` does it before its merge).
    pub fn check_data(&self) -> Result<()> {
        self.options.check()?;
        data_stats(&self.options).map(|_| ())
    }

    /// Checks what the run would train with in the model directory `dir`
    /// (its side files suffice: tokenizer, template), as `sft` does before
    /// launch: a tokenizer, a chat template, and markers or masks for
    /// assistant-only loss. `chatvec run` calls it on the merged model's
    /// side files before its merge.
    pub fn check_template_at(&self, dir: &Path) -> Result<()> {
        check_tokenizer(dir)?;
        let (t, python) = check_template(&self.options, dir, &["torch", "transformers", "trl"], &[], true)?;
        training_template(&self.options, &t.template, &t.source, &python, t.marked.as_ref()).map(|_| ())
    }

    /// The `chatvec sft` command line that runs this job.
    pub fn command_line(&self) -> String {
        let mut args = vec!["chatvec".to_string()];
        args.extend(self.command_args());
        shell_line(&args)
    }

    /// The arguments after `chatvec` that run this job: what job scripts
    /// run on each node. The binary's tests parse them back through its
    /// clap definitions, so a renamed flag fails there, not on a cluster.
    pub fn command_args(&self) -> Vec<String> {
        let o = &self.options;
        let d = SftOptions::default();
        let mut args: Vec<String> = vec!["sft".into(), "--model".into(), self.model.clone()];
        for f in &o.data {
            args.push("--data".into());
            args.push(f.spelled());
        }
        args.push("-o".into());
        args.push(self.output.display().to_string());
        let mut opt = |flag: &str, value: String, default: String| {
            if value != default {
                args.push(format!("--{flag}"));
                args.push(value);
            }
        };
        opt("epochs", o.epochs.to_string(), d.epochs.to_string());
        opt("lr", o.lr.to_string(), d.lr.to_string());
        opt("warmup-ratio", o.warmup_ratio.to_string(), d.warmup_ratio.to_string());
        opt("scheduler", o.scheduler.clone(), d.scheduler.clone());
        opt("max-seq-len", o.max_seq_len.to_string(), d.max_seq_len.to_string());
        opt("batch-size", o.batch_size.to_string(), d.batch_size.to_string());
        opt("grad-accum", o.grad_accum.to_string(), d.grad_accum.to_string());
        opt("assistant-only-loss", o.assistant_only_loss.to_string(), d.assistant_only_loss.to_string());
        opt("lora-r", o.lora_r.to_string(), d.lora_r.to_string());
        opt("lora-alpha", o.lora_alpha.to_string(), d.lora_alpha.to_string());
        opt("seed", o.seed.to_string(), d.seed.to_string());
        opt("nproc", o.nproc.to_string(), d.nproc.to_string());
        opt("nnodes", o.nnodes.to_string(), d.nnodes.to_string());
        opt("node-rank", o.node_rank.to_string(), d.node_rank.to_string());
        opt("save-steps", o.save_steps.to_string(), d.save_steps.to_string());
        opt("save-total-limit", o.save_total_limit.to_string(), d.save_total_limit.to_string());
        opt("report-to", o.report_to.clone(), d.report_to.clone());
        for (flag, v) in [
            ("master-addr", o.master_addr.clone()),
            ("eval-data", o.eval_data.as_ref().map(|p| p.display().to_string())),
            ("eval-split", o.eval_split.map(|f| f.to_string())),
            ("eval-steps", o.eval_steps.map(|n| n.to_string())),
            ("resume", o.resume.clone()),
            ("chat-template", o.chat_template.clone()),
        ] {
            if let Some(v) = v {
                opt(flag, v, String::new());
            }
        }
        for (k, v) in &o.train_args {
            opt("train-arg", format!("{k}={v}"), String::new());
        }
        opt("master-port", o.master_port.to_string(), d.master_port.to_string());
        if let Some(s) = o.max_steps {
            opt("max-steps", s.to_string(), String::new());
        }
        if let Some(z) = &o.deepspeed {
            opt("deepspeed", z.clone(), String::new());
        }
        if let Some(l) = &o.launcher {
            opt("launcher", l.clone(), String::new());
        }
        if let Some(p) = &o.python {
            opt("python", p.display().to_string(), String::new());
        }
        for (flag, v) in [("partition", &o.partition), ("account", &o.account), ("time", &o.time)] {
            if let Some(v) = v {
                opt(flag, v.clone(), String::new());
            }
        }
        for v in &o.job_setup {
            opt("job-setup", v.clone(), String::new());
        }
        // `=`-joined: a directive starts with a dash.
        args.extend(o.sched_args.iter().map(|v| format!("--sched-arg={v}")));
        args.extend(o.sbatch_args.iter().map(|v| format!("--sbatch-arg={v}")));
        args.extend(o.pbs_args.iter().map(|v| format!("--pbs-arg={v}")));
        for (flag, on) in [
            ("packing", o.packing),
            ("lora", o.lora),
            ("fsdp", o.fsdp),
            ("cpu-offload", o.cpu_offload),
            ("force", self.force),
        ] {
            if on {
                args.push(format!("--{flag}"));
            }
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_are_shell_quoted_for_display() {
        assert_eq!(
            shell_line(&["python".into(), "-c".into(), "import x; y()".into()]),
            "python -c 'import x; y()'"
        );
    }
}
