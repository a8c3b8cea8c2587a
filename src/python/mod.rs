//! Finding and running Python: the interpreter (`--python`, else
//! `CHATVEC_PYTHON`, else `python3`), its packages, and chatvec's helper
//! scripts, which `sft` and `eval` run as supervised children.
//!
//! Every helper runs isolated (`python -I`) from a file chatvec writes,
//! never through `-c`: `-c` puts the working directory first on
//! `sys.path`, so a `torch.py` or `json.py` there would run instead of the
//! real module. `-I` also ignores `PYTHONPATH` and the user site directory
//! for that process; the interpreter's own environment (a venv, conda) is
//! what is used.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Serialize;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::scratch::Scratch;

/// The environment variable naming the interpreter.
pub(crate) const PYTHON_ENV: &str = "CHATVEC_PYTHON";

/// The flags every helper runs under: isolated (no working directory,
/// script directory, `PYTHON*` variables or user site on `sys.path`) and
/// unbuffered, so progress streams as it is printed.
pub(crate) const ISOLATED: [&str; 2] = ["-I", "-u"];

/// The environment check (`check.py`).
const CHECK_SCRIPT: &str = include_str!("check.py");

/// The interpreter: as given, else `CHATVEC_PYTHON`, else `python3`. An
/// empty `CHATVEC_PYTHON` is an error, not a silent `python3`.
pub(crate) fn interpreter(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        if p.as_os_str().is_empty() {
            return Err(Error::Usage("--python is empty: it names the Python interpreter to use".into()));
        }
        return Ok(p.to_path_buf());
    }
    match std::env::var_os(PYTHON_ENV) {
        Some(v) if v.is_empty() => Err(Error::Usage(format!("{PYTHON_ENV} is set but empty")).with_hint(
            format!("set {PYTHON_ENV} to a Python interpreter's path, or unset it to use python3"),
        )),
        Some(v) => Ok(PathBuf::from(v)),
        None => Ok("python3".into()),
    }
}

/// A helper script written into a private scratch directory, removed with
/// it when dropped.
pub(crate) struct Helper {
    _dir: Scratch,
    file: PathBuf,
}

impl Helper {
    /// Writes `text` as `name` into a fresh private directory.
    pub(crate) fn write(name: &str, text: &str) -> Result<Helper> {
        let dir = Scratch::create("py")?;
        let file = dir.path().join(name);
        std::fs::write(&file, text).map_err(|e| Error::io("writing", &file, e))?;
        Ok(Helper { _dir: dir, file })
    }

    /// `python -I -u FILE`, ready for arguments.
    pub(crate) fn command(&self, python: &Path) -> Command {
        let mut c = Command::new(python);
        c.args(isolated(&self.file));
        c
    }
}

/// The interpreter arguments that run `script` isolated.
pub(crate) fn isolated(script: &Path) -> Vec<OsString> {
    ISOLATED.iter().map(OsString::from).chain([script.as_os_str().to_owned()]).collect()
}

/// What the Python environment has.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PythonEnv {
    pub python: String,
    pub version: String,
    pub packages: serde_json::Map<String, Value>,
    pub cuda_devices: u64,
    /// The setting names `trl sft --config` takes (SFTConfig, ModelConfig,
    /// ScriptArguments), when TRL could list them.
    #[serde(skip)]
    pub settings: Option<Vec<String>>,
    /// Whether TRL would patch the chat template asked about for
    /// assistant-only loss (None: not asked, or TRL could not say), and why
    /// not.
    #[serde(skip)]
    pub trl_patches_template: Option<(bool, String)>,
    /// Whether chatvec's marked copy of the template renders the same text
    /// and masks the reply (None: not asked), and why not.
    #[serde(skip)]
    pub marked_ok: Option<(bool, String)>,
}

/// Checks that `python` imports every package in `needed`; one missing
/// from `launch_only` (what only the launch mode needs, e.g. deepspeed) is
/// a warning when `dry_run`, since a job prepared on a login node runs
/// where the trainer's environment is complete. With `template` (model
/// directory, template text, chatvec's marked copy), also asks whether TRL
/// would patch that template for assistant-only loss, and whether the
/// marked copy renders the same text with the reply masked.
pub(crate) fn check(
    python: &Path,
    needed: &[&str],
    launch_only: &[&str],
    dry_run: bool,
    template: Option<(&Path, &str, Option<&str>)>,
) -> Result<PythonEnv> {
    let cannot = |e: std::io::Error| {
        Error::Usage(format!("cannot run Python interpreter {}: {e}", python.display())).with_hint(format!(
            "pass --python PATH or set {PYTHON_ENV} to a Python with torch, transformers, trl, accelerate"
        ))
    };
    let helper = Helper::write("check.py", CHECK_SCRIPT)?;
    let mut child = helper
        .command(python)
        .args(needed.iter().chain(launch_only))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(cannot)?;
    let spec = template
        .map(|(dir, t, marked)| json!({"model": dir.display().to_string(), "template": t, "marked": marked}));
    if let Some(mut stdin) = child.stdin.take() {
        // An interpreter that exits without reading is reported below.
        let _ = stdin.write_all(spec.map(|v| v.to_string()).unwrap_or_default().as_bytes());
    }
    let out = child.wait_with_output().map_err(cannot)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = text.lines().rev().find_map(|l| serde_json::from_str(l).ok()).ok_or_else(|| {
        Error::Usage(format!("{} could not check its packages (exit {})", python.display(), out.status))
    })?;
    let packages = v.get("packages").and_then(Value::as_object).cloned().unwrap_or_default();
    let lacks = |p: &&str| packages.get(*p).is_none_or(Value::is_null);
    let mut missing: Vec<&str> = needed.iter().copied().filter(lacks).collect();
    let extras: Vec<&str> = launch_only.iter().copied().filter(lacks).collect();
    if dry_run && !extras.is_empty() {
        crate::ui::warn(&format!(
            "{} lacks {}, which the run will need (a dry run only prepares it)",
            python.display(),
            extras.join(", ")
        ));
    } else {
        missing.extend(extras);
    }
    if !missing.is_empty() {
        return Err(Error::Usage(format!(
            "{} lacks the Python package(s) {} that this job needs",
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
        settings: v
            .get("settings")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect()),
        trl_patches_template: v
            .get("trl_patches_template")
            .and_then(Value::as_bool)
            .map(|b| (b, v.get("template_error").and_then(Value::as_str).unwrap_or_default().to_string())),
        marked_ok: v
            .get("marked_ok")
            .and_then(Value::as_bool)
            .map(|b| (b, v.get("marked_error").and_then(Value::as_str).unwrap_or_default().to_string())),
    })
}
