//! `chatvec sft`: the SFT stage on a merged model, by launching TRL
//! (`trl sft --config FILE --accelerate_config FILE`) as a supervised child
//! process. chatvec validates the data, checks the Python environment,
//! writes every config file into the run directory, streams the trainer's
//! output with a loss/learning-rate progress bar, forwards SIGINT/SIGTERM,
//! passes the exit code back (128+n for a signal), and records the run.
//!
//! `config` writes the trainer's files, `data` validates and converts the
//! chat data. This room resolves models and reads their side files; it
//! never touches weights.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::hash::sha256_file;
use crate::json::to_pretty;
use crate::output::manifest::MANIFEST_FILE;
use crate::output::sidecars::chat_template_text;
use crate::resolve::open_model;
use crate::sft::config::{
    LLAMA3_TRAINING_TEMPLATE, accelerate_config, decoder_layer_class, deepspeed_zero3,
    has_generation_markers, is_llama3_style, sft_config, to_yaml,
};
use crate::sft::data::{DataStats, process};
use crate::ui;

pub(crate) mod config;
pub(crate) mod data;
pub(crate) mod options;

pub use options::SftOptions;

pub(crate) const PYTHON_ENV: &str = "CHATVEC_PYTHON";
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

/// Prints the versions of the packages the run needs, as JSON, and whether
/// a GPU is visible; never a traceback.
const CHECK_SCRIPT: &str = r#"
import importlib, json, sys
out = {"python": sys.version.split()[0], "packages": {}, "cuda_devices": 0}
for name in sys.argv[1:]:
    try:
        out["packages"][name] = getattr(importlib.import_module(name), "__version__", "unknown")
    except Exception as e:
        out["packages"][name] = None
try:
    import torch
    out["cuda_devices"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
except Exception:
    pass
print(json.dumps(out))
"#;

/// Runs TRL's command line in the interpreter chatvec was given.
const LAUNCH_SCRIPT: &str = "import sys; from trl.cli import main; sys.exit(main())";

/// What the Python environment has.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PythonEnv {
    pub python: String,
    pub version: String,
    pub packages: serde_json::Map<String, Value>,
    pub cuda_devices: u64,
}

fn python_path(a: &SftOptions) -> PathBuf {
    a.python
        .clone()
        .or_else(|| std::env::var_os(PYTHON_ENV).map(PathBuf::from))
        .unwrap_or_else(|| "python3".into())
}

/// Checks that `python` imports every package in `needed`.
pub(crate) fn check_python(python: &Path, needed: &[&str]) -> Result<PythonEnv> {
    let out = Command::new(python).arg("-c").arg(CHECK_SCRIPT).args(needed).output().map_err(|e| {
        Error::Usage(format!("cannot run Python interpreter {}: {e}", python.display())).with_hint(format!(
            "pass --python PATH or set {PYTHON_ENV} to a Python with torch, transformers, trl, accelerate"
        ))
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = text.lines().rev().find_map(|l| serde_json::from_str(l).ok()).ok_or_else(|| {
        Error::Usage(format!("{} could not check its packages (exit {})", python.display(), out.status))
    })?;
    let packages = v.get("packages").and_then(Value::as_object).cloned().unwrap_or_default();
    let missing: Vec<&str> =
        needed.iter().copied().filter(|p| packages.get(*p).is_none_or(Value::is_null)).collect();
    if !missing.is_empty() {
        return Err(Error::Usage(format!(
            "{} lacks the Python package(s) {} that SFT needs",
            python.display(),
            missing.join(", ")
        ))
        .with_hint(format!("{} -m pip install {}", python.display(), missing.join(" "))));
    }
    Ok(PythonEnv {
        python: python.display().to_string(),
        version: v.get("python").and_then(Value::as_str).unwrap_or("?").to_string(),
        packages,
        cuda_devices: v.get("cuda_devices").and_then(Value::as_u64).unwrap_or(0),
    })
}

/// A config file of the run: name and text.
struct RunFile {
    name: &'static str,
    text: String,
}

/// Everything the run is, before it starts.
struct Prepared {
    command: Vec<String>,
    env: Vec<(String, String)>,
    files: Vec<RunFile>,
    stats: DataStats,
    python: PythonEnv,
    model_dir: PathBuf,
    model_manifest_sha256: Option<String>,
}

fn abs(p: &Path) -> String {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string()
}

fn prepare(job: &SftJob) -> Result<Prepared> {
    let a = &job.options;
    a.check()?;
    let ck = open_model(&job.model)?;
    let model_dir = ck.dir.clone();
    let model_manifest_sha256 = match crate::model::side_file(&model_dir, MANIFEST_FILE)? {
        Some(manifest) => Some(sha256_file(&manifest)?),
        None => None,
    };
    let stats = process(&a.data, None)?;
    let mut needed = vec!["torch", "transformers", "trl", "accelerate", "datasets"];
    if a.lora {
        needed.push("peft");
    }
    if a.deepspeed.is_some() {
        needed.push("deepspeed");
    }
    let python = check_python(&python_path(a), &needed)?;
    let gpu = python.cuda_devices > 0;
    let tf_major = python
        .packages
        .get("transformers")
        .and_then(Value::as_str)
        .and_then(|v| v.split('.').next()?.parse().ok())
        .unwrap_or(5);
    let run = abs(&job.output);
    let mut files = Vec::new();
    let mut template_path = None;
    if a.assistant_only_loss {
        let t = chat_template_text(&model_dir)?.ok_or_else(|| {
            Error::Usage(format!("{} has no chat template, so chat data cannot be rendered", model_dir.display()))
                .with_hint("apply a chat vector with chatvec (it installs the chat model's template), or add one to tokenizer_config.json")
        })?;
        if !has_generation_markers(&t) {
            if !is_llama3_style(&t) {
                return Err(Error::Usage(
                    "the model's chat template has no {% generation %} markers, which assistant-only loss needs, and it is not Llama-3 style (for which chatvec supplies one)".into(),
                )
                .with_hint("pass --assistant-only-loss false to train on whole conversations"));
            }
            files.push(RunFile { name: "chat_template.jinja", text: LLAMA3_TRAINING_TEMPLATE.to_string() });
            template_path = Some(format!("{run}/chat_template.jinja"));
        }
    }
    if (a.fsdp || a.deepspeed.is_some()) && !gpu {
        return Err(Error::Usage("--fsdp and --deepspeed need GPUs, and torch sees none".into()));
    }
    let architecture = ck
        .config
        .as_ref()
        .and_then(|c| c.raw.get("architectures")?.as_array()?.first()?.as_str().map(str::to_string))
        .unwrap_or_else(|| "LlamaForCausalLM".into());
    let ds_file = format!("{run}/deepspeed_zero3.json");
    let sft = sft_config(
        &abs(&model_dir),
        &format!("{run}/train.jsonl"),
        &format!("{run}/model"),
        a,
        gpu,
        tf_major,
        template_path.as_deref(),
    );
    files.push(RunFile { name: "sft_config.yaml", text: to_yaml(&sft)? });
    let accel = accelerate_config(a, gpu, &decoder_layer_class(&architecture), &ds_file);
    files.push(RunFile { name: "accelerate_config.yaml", text: to_yaml(&accel)? });
    if a.deepspeed.is_some() {
        files.push(RunFile {
            name: "deepspeed_zero3.json",
            text: String::from_utf8_lossy(&to_pretty(&deepspeed_zero3(gpu))).into_owned(),
        });
    }
    let command = vec![
        python.python.clone(),
        "-c".into(),
        LAUNCH_SCRIPT.into(),
        "sft".into(),
        "--config".into(),
        format!("{run}/sft_config.yaml"),
        "--accelerate_config".into(),
        format!("{run}/accelerate_config.yaml"),
    ];
    // Unbuffered, so the loss streams as it is logged.
    let env = vec![
        ("PYTHONUNBUFFERED".to_string(), "1".to_string()),
        ("TOKENIZERS_PARALLELISM".to_string(), "false".to_string()),
    ];
    Ok(Prepared { command, env, files, stats, python, model_dir, model_manifest_sha256 })
}

/// A shell-quoted command line, for display.
fn shell_line(cmd: &[String]) -> String {
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

/// The loss and learning rate of a transformers log line such as
/// `{'loss': 1.234, 'grad_norm': ..., 'learning_rate': 1e-05, 'epoch': 0.1}`.
pub(crate) fn parse_log(line: &str) -> Option<(f64, Option<f64>)> {
    let num = |key: &str| -> Option<f64> {
        let re = regex::Regex::new(&format!(r#"['"]{key}['"]\s*:\s*['"]?([-+0-9.eE]+|nan|inf)"#)).ok()?;
        re.captures(line)?.get(1)?.as_str().parse().ok()
    };
    Some((num("loss")?, num("learning_rate")))
}

#[derive(Serialize)]
struct Record<'a> {
    tool: &'static str,
    version: &'static str,
    command: &'a [String],
    env: &'a [(String, String)],
    files: Vec<Value>,
    python: &'a PythonEnv,
    model: Value,
    dataset: Value,
    steps_logged: u64,
    final_loss: Option<f64>,
    exit_code: i32,
    seconds: f64,
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
/// records the run. The report's `exit_code` is the trainer's.
pub fn sft(job: &SftJob) -> Result<SftReport> {
    let a = &job.options;
    if job.output.exists() && !job.force && !job.dry_run {
        return Err(Error::OutputExists(job.output.clone()));
    }
    let p = prepare(job)?;
    ui::note(&format!(
        "data {}: {} examples, {} turns, {} characters, sha256 {}",
        a.data.display(),
        p.stats.examples,
        p.stats.turns,
        p.stats.characters,
        p.stats.sha256
    ));
    let pkgs: Vec<String> =
        p.python.packages.iter().map(|(k, v)| format!("{k} {}", v.as_str().unwrap_or("?"))).collect();
    ui::note(&format!(
        "python {} ({}): {}; {} CUDA device(s)",
        p.python.python,
        p.python.version,
        pkgs.join(", "),
        p.python.cuda_devices
    ));
    let mut report = SftReport {
        output: abs(&job.output),
        dry_run: job.dry_run,
        command: p.command.clone(),
        env: p.env.clone(),
        files: p.files.iter().map(|f| (f.name.to_string(), f.text.clone())).collect(),
        exit_code: 0,
        steps_logged: 0,
        final_loss: None,
    };
    if job.dry_run {
        return Ok(report);
    }
    if job.output.exists() {
        // --force replaces an earlier run directory (it holds the trainer's
        // config) or an empty one, never other files, what the run reads,
        // or the directory it was started from.
        if let Some(why) = crate::output::dir::refuse_replacing(&job.output, "sft_config.yaml") {
            return Err(Error::Usage(format!(
                "--force replaces only an earlier `chatvec sft` run directory or an empty directory, and {} is neither: {why}",
                job.output.display()
            ))
            .with_hint("remove it yourself, or choose another run directory"));
        }
        let out = std::fs::canonicalize(&job.output).map_err(|e| Error::io("resolving", &job.output, e))?;
        let inside = |p: &Path| std::fs::canonicalize(p).is_ok_and(|c| c.starts_with(&out));
        if inside(&p.model_dir) || inside(&a.data) || std::env::current_dir().is_ok_and(|c| inside(&c)) {
            return Err(Error::Usage(format!(
                "{} holds the model, the data or the current directory; choose another run directory",
                job.output.display()
            )));
        }
        std::fs::remove_dir_all(&job.output).map_err(|e| Error::io("removing", &job.output, e))?;
    }
    std::fs::create_dir_all(&job.output).map_err(|e| Error::io("creating", &job.output, e))?;
    let train = job.output.join("train.jsonl");
    {
        let mut w = std::io::BufWriter::new(
            std::fs::File::create(&train).map_err(|e| Error::io("creating", &train, e))?,
        );
        process(&a.data, Some(&mut w))?;
        w.flush().map_err(|e| Error::io("writing", &train, e))?;
    }
    for f in &p.files {
        let path = job.output.join(f.name);
        std::fs::write(&path, &f.text).map_err(|e| Error::io("writing", &path, e))?;
    }
    let start = Instant::now();
    let (code, steps, last_loss) = supervise(&p, a.max_steps)?;
    let mut files = Vec::new();
    for name in p.files.iter().map(|f| f.name).chain(["train.jsonl"]) {
        files.push(json!({"file": name, "sha256": sha256_file(&job.output.join(name))?}));
    }
    let record = Record {
        tool: "chatvec",
        version: env!("CARGO_PKG_VERSION"),
        command: &p.command,
        env: &p.env,
        files,
        python: &p.python,
        model: json!({"reference": job.model, "path": p.model_dir.display().to_string(), "manifest_sha256": p.model_manifest_sha256}),
        dataset: json!({"file": a.data.display().to_string(), "stats": p.stats}),
        steps_logged: steps,
        final_loss: last_loss,
        exit_code: code,
        seconds: start.elapsed().as_secs_f64(),
    };
    let rec = job.output.join(RECORD_FILE);
    std::fs::write(&rec, to_pretty(&record)).map_err(|e| Error::io("writing", &rec, e))?;
    if code == 0 {
        ui::note(&format!(
            "trained model in {}, run record {}",
            job.output.join("model").display(),
            rec.display()
        ));
    }
    report.exit_code = code;
    report.steps_logged = steps;
    report.final_loss = last_loss;
    Ok(report)
}

impl SftJob {
    /// Checks the options and every line of the data, as `sft` does before
    /// anything else (`chatvec run` does it before its merge).
    pub fn check_data(&self) -> Result<()> {
        self.options.check()?;
        process(&self.options.data, None).map(|_| ())
    }

    /// The `chatvec sft` command line that runs this job.
    pub fn command_line(&self) -> String {
        let o = &self.options;
        let d = SftOptions::default();
        let mut args: Vec<String> = vec![
            "chatvec".into(),
            "sft".into(),
            "--model".into(),
            self.model.clone(),
            "--data".into(),
            o.data.display().to_string(),
            "-o".into(),
            self.output.display().to_string(),
        ];
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
        opt("master-addr", o.master_addr.clone(), d.master_addr.clone());
        opt("master-port", o.master_port.to_string(), d.master_port.to_string());
        if let Some(s) = o.max_steps {
            opt("max-steps", s.to_string(), String::new());
        }
        if let Some(z) = &o.deepspeed {
            opt("deepspeed", z.clone(), String::new());
        }
        if let Some(p) = &o.python {
            opt("python", p.display().to_string(), String::new());
        }
        for (flag, on) in [("packing", o.packing), ("lora", o.lora), ("fsdp", o.fsdp), ("force", self.force)]
        {
            if on {
                args.push(format!("--{flag}"));
            }
        }
        shell_line(&args)
    }
}

/// Runs the trainer in its own process group, streams its output, forwards
/// signals, and returns (exit code, loss lines seen, last loss).
fn supervise(p: &Prepared, max_steps: Option<u64>) -> Result<(i32, u64, Option<f64>)> {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let mut cmd = Command::new(&p.command[0]);
    cmd.args(&p.command[1..]).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    for (k, v) in &p.env {
        cmd.env(k, v);
    }
    crate::interrupt::set_supervising(true);
    let mut child = cmd.spawn().map_err(|e| Error::io("starting", Path::new(&p.command[0]), e))?;
    let pgid = child.id() as i32;
    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    for stream in [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(std::result::Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);
    let quiet = ui::quiet();
    let bar = if ui::show_progress() {
        let b = max_steps.map_or_else(ProgressBar::new_spinner, ProgressBar::new);
        b.set_style(
            ProgressStyle::with_template("{spinner} training [{bar:30}] step {pos}{msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let (mut steps, mut last) = (0u64, None);
    let mut forwarded = 0usize;
    let status = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                if let Some((loss, lr)) = parse_log(&line) {
                    steps += 1;
                    last = Some(loss);
                    bar.set_position(steps);
                    bar.set_message(format!(
                        "  loss {loss:.4}{}",
                        lr.map(|l| format!("  lr {l:.3e}")).unwrap_or_default()
                    ));
                }
                if !quiet || bar.is_hidden() {
                    bar.suspend(|| eprintln!("{line}"));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {}
        }
        let (count, sig) = crate::interrupt::signals_seen();
        if count > forwarded {
            // Third and later signals: SIGKILL, for a trainer that hangs.
            let s = if count >= 3 { libc::SIGKILL } else { sig };
            // SAFETY: kill(2) takes plain integers; -pgid names the process
            // group our child leads (started with process_group(0)).
            unsafe { libc::kill(-pgid, s) };
            forwarded = count;
        }
        if let Some(st) =
            child.try_wait().map_err(|e| Error::io("waiting for", Path::new(&p.command[0]), e))?
        {
            break st;
        }
    };
    // The readers end at EOF once the trainer is gone; then every line is
    // in the channel.
    for r in readers {
        let _ = r.join();
    }
    for line in rx.try_iter() {
        if let Some((loss, _)) = parse_log(&line) {
            steps += 1;
            last = Some(loss);
        }
        if !quiet || bar.is_hidden() {
            bar.suspend(|| eprintln!("{line}"));
        }
    }
    bar.finish_and_clear();
    crate::interrupt::set_supervising(false);
    let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Ok((code, steps, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_lines_of_transformers_4_and_5_parse() {
        assert_eq!(
            parse_log("{'loss': 2.3456, 'grad_norm': 1.2, 'learning_rate': 1e-05, 'epoch': 0.5}"),
            Some((2.3456, Some(1e-5)))
        );
        assert_eq!(parse_log("{'loss': '1.25', 'learning_rate': '9.5e-06'}"), Some((1.25, Some(9.5e-6))));
        assert_eq!(parse_log("{\"loss\": 0.5}"), Some((0.5, None)));
        assert!(parse_log("{'train_runtime': 3.2}").is_none());
        assert!(parse_log("{'loss': nan}").unwrap().0.is_nan());
        assert_eq!(
            shell_line(&["python".into(), "-c".into(), "import x; y()".into()]),
            "python -c 'import x; y()'"
        );
    }
}
