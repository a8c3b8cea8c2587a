//! The Python side of an evaluation, run as a supervised child in the
//! interpreter `sft` uses: the worker that scores and generates
//! (`script.py`) and the lm-evaluation-harness runner (`harness.py`).
//! Each prints one `{"result": ...}` line per model as soon as it is done
//! and `chatvec-eval: ` progress lines on stderr; results are kept per
//! model (`cache`), so only what is new runs.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use super::cache;
use crate::error::{Error, Result};
use crate::ui;

/// A script the interpreter runs.
pub(crate) struct Script {
    pub name: &'static str,
    pub text: &'static str,
}

/// Scores, generates and answers benchmarks.
pub(crate) const EVAL: Script = Script { name: "eval_worker.py", text: include_str!("script.py") };

/// Runs lm-evaluation-harness tasks.
pub(crate) const HARNESS: Script = Script { name: "eval_harness.py", text: include_str!("harness.py") };

/// Each of `models`' result for `inputs`: kept from an earlier run with
/// the same model files, inputs and script (unless `fresh`), else from
/// one run of `script` over the rest. What finishes is kept before any
/// failure is reported, so a rerun resumes after it.
pub(crate) fn cached_run(
    python: &Path,
    script: &Script,
    models: &[Value],
    inputs: &Value,
    per_model: u64,
    fresh: bool,
) -> Result<Vec<Value>> {
    let cache = cache::EvalCache::from_env(fresh);
    let mut keys = Vec::with_capacity(models.len());
    let mut results: Vec<Option<Value>> = Vec::with_capacity(models.len());
    for m in models {
        let path = PathBuf::from(m["path"].as_str().unwrap_or_default());
        let own =
            json!({"inputs": inputs, "model": {"chat": m["chat"], "chat_template": m["chat_template"]}});
        let key = cache.key(&path, &own, script.text)?;
        let kept = cache.get(&key);
        if kept.is_some() {
            ui::note(&format!(
                "eval: {}: results kept from an earlier run (same files and inputs)",
                path.display()
            ));
        }
        results.push(kept);
        keys.push(key);
    }
    let todo: Vec<usize> = (0..models.len()).filter(|&i| results[i].is_none()).collect();
    if !todo.is_empty() {
        let mut worker = inputs.clone();
        worker["models"] = Value::Array(todo.iter().map(|&i| models[i].clone()).collect());
        let (done, outcome) = run_worker(python, script, &worker, todo.len(), per_model)?;
        for (&i, r) in todo.iter().zip(done) {
            cache.put(&keys[i], &r);
            results[i] = Some(r);
        }
        outcome?;
    }
    results.into_iter().collect::<Option<_>>().ok_or_else(|| {
        Error::Internal(format!("the worker scored fewer than the {} models it was given", todo.len()))
    })
}

/// Runs the worker; returns the results of every model it finished (in
/// order), and how it ended.
fn run_worker(
    python: &Path,
    script: &Script,
    spec: &Value,
    models: usize,
    per_model: u64,
) -> Result<(Vec<Value>, Result<()>)> {
    let helper = crate::python::Helper::write(script.name, script.text)?;
    let mut child = helper
        .command(python)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io("starting", python, e))?;
    crate::interrupt::set_supervising(true);
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(spec.to_string().as_bytes());
    }
    let bar = if ui::show_progress() {
        let b = ProgressBar::new(models as u64 * per_model);
        b.set_style(
            ProgressStyle::with_template("{spinner} evaluating [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let stderr = child.stderr.take();
    let names: Vec<String> = spec["models"]
        .as_array()
        .map(|a| a.iter().map(|m| m["path"].as_str().unwrap_or("?").to_string()).collect())
        .unwrap_or_default();
    let started = std::time::Instant::now();
    // The worker reports the LM loss, the assistant loss, then generation,
    // per model; the bar counts documents, conversations and prompts done.
    let conversations = spec["conversations"].as_array().map_or(0, Vec::len) as u64;
    let documents = spec["lm_texts"].as_array().map_or(0, Vec::len) as u64;
    let reader = std::thread::spawn(move || -> String {
        let mut tail = String::new();
        for line in
            stderr.into_iter().flat_map(|s| BufReader::new(s).lines().map_while(std::result::Result::ok))
        {
            if let Some(p) = line.strip_prefix("chatvec-eval: ") {
                if let Ok(v) = serde_json::from_str::<Value>(p) {
                    let (m, stage) = (v["model"].as_u64().unwrap_or(0), v["stage"].as_str().unwrap_or(""));
                    let (done, total) = (v["done"].as_u64().unwrap_or(0), v["total"].as_u64().unwrap_or(0));
                    bar.set_message(format!("model {} {stage} {done}/{total}", m + 1));
                    let before = match stage {
                        "lm" | "harness" => 0,
                        "loss" => documents,
                        _ => documents + conversations,
                    };
                    bar.set_position(m * per_model + before + done);
                    // Without a bar (stderr not a terminal: a log, CI, a
                    // batch job), a line per model and finished stage, so
                    // a long evaluation is never silent.
                    if bar.is_hidden() && done == total {
                        let name = names.get(m as usize).map_or("?", String::as_str);
                        ui::note(&format!(
                            "eval: model {}/{models} {name}: {stage} done ({total}), {:.0} s in",
                            m + 1,
                            started.elapsed().as_secs_f64()
                        ));
                    }
                }
                continue;
            }
            // lm_eval asks git for a commit hash wherever it runs.
            if !ui::quiet() && !line.starts_with("fatal: not a git repository") {
                bar.suspend(|| eprintln!("{line}"));
            }
            tail.push_str(&line);
            tail.push('\n');
            if tail.len() > 8000 {
                tail.drain(..tail.len() - 4000);
            }
        }
        bar.finish_and_clear();
        tail
    });
    let out = child.wait_with_output().map_err(|e| Error::io("waiting for", python, e))?;
    let tail = reader.join().unwrap_or_default();
    let (signals, _) = crate::interrupt::signals_seen();
    crate::interrupt::set_supervising(false);
    // Every model the worker finished, in order, whatever happened after.
    let text = String::from_utf8_lossy(&out.stdout);
    let results: Vec<Value> =
        text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()?.get("result").cloned()).collect();
    let outcome = if signals > 0 {
        Err(Error::Interrupted)
    } else if !out.status.success() {
        let last = tail.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("(no output)");
        Err(Error::Usage(format!("the evaluation failed ({}): {last}", out.status)))
    } else {
        Ok(())
    };
    Ok((results, outcome))
}
