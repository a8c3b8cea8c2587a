//! `--harness TASKS`: task suites through the installed
//! lm-evaluation-harness, never a copy of it. Its metrics, with its
//! standard errors as 95% intervals, join the judged benchmarks' figures
//! so one table, one JSON and one ranking hold them all.

use std::path::Path;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::EvalSpec;
use super::scoring::{BenchInfo, BenchScore};
use super::ties::Interval;
use crate::error::{Error, Result};

/// Files of an `--harness-include` directory read into the cache key.
const MAX_INCLUDE_FILES: usize = 4096;

/// The tasks `--harness` names (comma-separated, repeatable), in order,
/// without repeats.
pub(crate) fn tasks(spec: &EvalSpec) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for t in spec.harness.iter().flat_map(|h| h.split(',')).map(str::trim) {
        if t.is_empty() {
            continue;
        }
        if !t.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:*".contains(&b)) {
            return Err(Error::Usage(format!("--harness {t}: not an lm_eval task or group name")));
        }
        if !out.iter().any(|o| o == t) {
            out.push(t.to_string());
        }
    }
    if !spec.harness.is_empty() && out.is_empty() {
        return Err(Error::Usage("--harness: name at least one lm_eval task".into()));
    }
    Ok(out)
}

/// sha256 over the names and bytes of every file under `dir` (task YAML
/// and the data beside it), so a changed task definition is another cache
/// key.
fn dir_digest(dir: &Path) -> Result<String> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| Error::io("listing", &d, e))? {
            let p = e.map_err(|e| Error::io("listing", &d, e))?.path();
            let meta = std::fs::symlink_metadata(&p).map_err(|e| Error::io("reading metadata of", &p, e))?;
            if meta.is_dir() {
                stack.push(p);
            } else if meta.is_file() {
                files.push(p);
            }
            if files.len() > MAX_INCLUDE_FILES {
                return Err(Error::Usage(format!(
                    "--harness-include {}: more than {MAX_INCLUDE_FILES} files; point it at the tasks' own directory",
                    dir.display()
                )));
            }
        }
    }
    files.sort();
    let mut h = Sha256::new();
    for f in files {
        let rel = f.strip_prefix(dir).unwrap_or(&f).display().to_string();
        h.update(format!("{rel}\0{}\0", crate::hash::sha256_file(&f)?).as_bytes());
    }
    Ok(crate::hash::hex(&h.finalize()))
}

/// What the harness runner is given (and what its results are kept under).
pub(crate) fn inputs(spec: &EvalSpec, tasks: &[String]) -> Result<Value> {
    let include = match &spec.harness_include {
        Some(d) if !d.is_dir() => {
            return Err(Error::Usage(format!("--harness-include {}: not a directory", d.display())));
        }
        Some(d) => Some((std::path::absolute(d).unwrap_or_else(|_| d.clone()), dir_digest(d)?)),
        None => None,
    };
    Ok(json!({
        "tasks": tasks,
        "include": include.as_ref().map(|(d, _)| d.display().to_string()),
        "include_sha256": include.map(|(_, h)| h),
        "limit": spec.harness_limit,
        "num_fewshot": spec.harness_fewshot,
        "apply_chat_template": spec.harness_chat_template,
        "engine": spec.engine,
        "batch": spec.batch_size,
    }))
}

/// A metric's name in the report: `task/metric`, with its filter when not
/// lm_eval's `none`.
fn name(m: &Value) -> String {
    let base = format!("{}/{}", m["task"].as_str().unwrap_or("?"), m["metric"].as_str().unwrap_or("?"));
    match m["filter"].as_str() {
        Some(f) if f != "none" => format!("{base},{f}"),
        _ => base,
    }
}

/// Every metric of one model's harness result, as a benchmark figure.
pub(crate) fn scores(result: &Value) -> Vec<BenchScore> {
    result["metrics"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    let value = m["value"].as_f64().unwrap_or(f64::NAN);
                    let interval = m["stderr"]
                        .as_f64()
                        .map(|se| Interval { low: value - 1.96 * se, high: value + 1.96 * se });
                    BenchScore {
                        bench: name(m),
                        score: value,
                        interval,
                        higher_is_better: m["higher_is_better"].as_bool().unwrap_or(true),
                        categories: Default::default(),
                        turns: Vec::new(),
                        grades: Vec::new(),
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The report's entries for the metrics of `result` (any model's: every
/// model runs the same tasks).
pub(crate) fn infos(result: &Value) -> Vec<BenchInfo> {
    let engine = format!(
        "lm_eval {} ({} backend)",
        result["lm_eval"].as_str().unwrap_or("?"),
        result["engine"].as_str().unwrap_or("?")
    );
    result["metrics"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| BenchInfo {
                    name: name(m),
                    files: Vec::new(),
                    questions: m["samples"].as_u64().unwrap_or(0) as usize,
                    samples: None,
                    top: None,
                    kind: "lm_eval",
                    judge_model: None,
                    judge_url: None,
                    engine: Some(engine.clone()),
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_become_figures_with_their_stderr_as_a_95_interval() {
        let r = json!({"lm_eval": "0.4.13", "engine": "hf", "metrics": [
            {"task": "t", "metric": "acc", "filter": "none", "value": 0.5, "stderr": 0.1, "higher_is_better": true, "samples": 10},
            {"task": "t", "metric": "ppl", "filter": "strict", "value": 12.0, "stderr": null, "higher_is_better": false, "samples": 10},
        ]});
        let s = scores(&r);
        assert_eq!(s[0].bench, "t/acc");
        let iv = s[0].interval.unwrap();
        assert!((iv.low - 0.304).abs() < 1e-12 && (iv.high - 0.696).abs() < 1e-12);
        assert_eq!(s[1].bench, "t/ppl,strict");
        assert!(!s[1].higher_is_better && s[1].interval.is_none());
        let i = infos(&r);
        assert_eq!(i[0].engine.as_deref(), Some("lm_eval 0.4.13 (hf backend)"));
        assert_eq!(i[1].questions, 10);
    }

    #[test]
    fn task_lists_split_on_commas_and_odd_names_are_refused() {
        let mut spec = EvalSpec::new(vec!["m".into()]);
        spec.harness = vec!["a,b".into(), "b, c".into()];
        assert_eq!(tasks(&spec).unwrap(), ["a", "b", "c"]);
        spec.harness = vec!["a;rm -rf".into()];
        assert!(tasks(&spec).is_err());
        spec.harness = vec![",".into()];
        assert!(tasks(&spec).is_err());
    }
}
