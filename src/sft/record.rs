//! The run record (`chatvec-sft-run.json`) each node writes beside the
//! trained model: the command, environment, inputs with their sha256, the
//! trainer's outcome and the trained model's files.

use std::path::Path;

use serde::Serialize;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::hash::sha256_file;
use crate::json::to_pretty;
use crate::sft::{RECORD_FILE, SftJob};

#[derive(Serialize)]
pub(crate) struct Record<'a> {
    pub(crate) tool: &'static str,
    pub(crate) version: &'static str,
    pub(crate) command: &'a [String],
    pub(crate) env: &'a [(String, String)],
    pub(crate) run_dir: String,
    pub(crate) host: String,
    pub(crate) node_rank: u64,
    pub(crate) world_size: u64,
    pub(crate) started: String,
    pub(crate) ended: String,
    pub(crate) files: Vec<Value>,
    pub(crate) python: &'a crate::python::PythonEnv,
    pub(crate) model: Value,
    pub(crate) dataset: Value,
    pub(crate) chat_template: &'a Value,
    pub(crate) resumed_from: Option<String>,
    pub(crate) steps_logged: u64,
    pub(crate) final_loss: Option<f64>,
    pub(crate) exit_code: i32,
    pub(crate) interrupted: bool,
    pub(crate) seconds: f64,
    pub(crate) trained_model: Value,
}

/// This machine's host name.
pub(crate) fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// `t` as an RFC 3339 UTC timestamp (`2026-11-30T18:21:08Z`).
pub(crate) fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The weight files of the trained model in `dir` with their sha256; empty
/// when the trainer saved none.
pub(crate) fn model_files(dir: &Path) -> Result<Vec<Value>> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(Vec::new()) };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".safetensors") || n.ends_with(".bin"))
        .collect();
    names.sort();
    names.iter().map(|n| Ok(json!({"file": n, "sha256": sha256_file(&dir.join(n))?}))).collect()
}

/// Adds `key: value` to this node's run record (the job room records the
/// merged model there after a LoRA run).
pub(crate) fn add_to_record(job: &SftJob, key: &str, value: Value) -> Result<()> {
    let path = super::Layout::of(job).own.join(RECORD_FILE);
    let mut rec = crate::json::read_value(&path, 64 << 20)?;
    let Some(obj) = rec.as_object_mut() else {
        return Err(Error::bad_file(&path, "is not a JSON object"));
    };
    obj.insert(key.to_string(), value);
    std::fs::write(&path, to_pretty(&rec)).map_err(|e| Error::io("writing", &path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = |s: u64| rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(t(0), "1970-01-01T00:00:00Z");
        assert_eq!(t(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(t(1_796_063_468), "2026-11-30T18:31:08Z");
    }
}
