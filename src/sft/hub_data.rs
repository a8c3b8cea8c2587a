//! Hub datasets as chat data: `--data org/name[@revision][:split]` (and
//! `--eval-data`, `chatvec eval --data`) names a dataset repository, as
//! TRL users pass `--dataset_name`. Its files for the split (JSONL, or
//! Parquet read with the parquet crate one row group at a time) come
//! through chatvec's downloader into the Hugging Face cache, pinned by
//! commit, and are written once as one JSONL file in chatvec's cache, which
//! is then read, validated and mixed exactly as a local file is.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::resolve::hub_cache::parse_hub_id;
use crate::resolve::published::{PublishedFile, hub_file, hub_listing};

/// Where a dataset came from: what the run record keeps.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct HubData {
    pub repo: String,
    pub revision: String,
    pub commit: String,
    pub split: String,
    /// Every file read, with its sha256.
    pub files: Vec<PublishedFile>,
    /// The JSONL file it was written as.
    pub jsonl: PathBuf,
}

/// Datasets already resolved in this process, by spelling.
static RESOLVED: Mutex<Option<HashMap<String, HubData>>> = Mutex::new(None);

/// `org/name[@revision][:split]` read as a Hub dataset, when `spec` is no
/// local file and reads as one.
fn parse(spec: &str) -> Option<(String, String, String)> {
    let (id, split) = match spec.rsplit_once(':') {
        Some((i, s))
            if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)) =>
        {
            (i, s.to_string())
        }
        _ => (spec, "train".to_string()),
    };
    let hub = parse_hub_id(id)?;
    // A Hub dataset is always `org/name`: a bare name is a local file
    // that does not exist.
    hub.repo.contains('/').then(|| (hub.repo, hub.revision.unwrap_or_else(|| "main".into()), split))
}

/// Whether file `name` of a dataset repository holds split `split`:
/// `train.jsonl`, `data/train-00000-of-00001.parquet`,
/// `default/train/0000.parquet` (the Hub's Parquet conversion), ...
fn holds_split(name: &str, split: &str) -> bool {
    let data = name.ends_with(".jsonl") || name.ends_with(".json") || name.ends_with(".parquet");
    let parts: Vec<&str> = name.split('/').collect();
    let base = parts.last().copied().unwrap_or_default();
    let stem_matches = base.strip_prefix(split).is_some_and(|rest| rest.starts_with(['.', '-', '_']));
    data && (stem_matches || parts[..parts.len() - 1].contains(&split))
}

/// The local file `spec` names: itself when it exists (or does not read
/// as a Hub dataset), else the Hub dataset written as JSONL.
pub(crate) fn local(spec: &Path) -> Result<PathBuf> {
    Ok(resolve(spec)?.map_or_else(|| spec.to_path_buf(), |h| h.jsonl))
}

/// The Hub dataset `spec` names, fetched and written as JSONL (once per
/// process and commit), or `None` for a local file.
pub(crate) fn resolve(spec: &Path) -> Result<Option<HubData>> {
    if spec.exists() {
        return Ok(None);
    }
    let Some(text) = spec.to_str() else { return Ok(None) };
    let Some((repo, revision, split)) = parse(text) else { return Ok(None) };
    if let Some(h) = RESOLVED.lock().ok().and_then(|m| m.as_ref()?.get(text).cloned()) {
        return Ok(Some(h));
    }
    let (commit, names) = hub_listing(&repo, &revision, true)?;
    let mut wanted: Vec<&String> = names.iter().filter(|n| holds_split(n, &split)).collect();
    wanted.sort();
    if wanted.is_empty() {
        let data: Vec<&String> = names
            .iter()
            .filter(|n| n.ends_with(".jsonl") || n.ends_with(".json") || n.ends_with(".parquet"))
            .take(12)
            .collect();
        return Err(Error::Usage(format!(
            "--data {text}: dataset {repo} @ {revision} has no JSONL or Parquet file for split '{split}' (its data files: {})",
            if data.is_empty() { "none".to_string() } else { data.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ") }
        ))
        .with_hint("name the split as org/name:split"));
    }
    let files: Vec<PublishedFile> =
        wanted.iter().map(|n| hub_file(&repo, &commit, n, true)).collect::<Result<_>>()?;
    let root = crate::model::hash_cache::cache_root()
        .ok_or_else(|| {
            Error::Usage("no cache directory to keep the dataset in (set CHATVEC_CACHE_DIR or HOME)".into())
        })?
        .join("datasets");
    std::fs::create_dir_all(&root).map_err(|e| Error::io("creating", &root, e))?;
    let jsonl =
        root.join(format!("{}--{split}--{}.jsonl", repo.replace('/', "--"), &commit[..12.min(commit.len())]));
    if !jsonl.is_file() {
        let tmp = root.join(format!(
            ".{}.{}",
            jsonl.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
            std::process::id()
        ));
        let written = write_jsonl(&files, &tmp);
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &jsonl).map_err(|e| Error::io("renaming", &tmp, e))?;
    }
    crate::ui::note(&format!(
        "data {text}: {repo} @ {revision} ({commit}), split {split}: {} file(s) as {}",
        files.len(),
        jsonl.display()
    ));
    let h = HubData { repo, revision, commit, split, files, jsonl };
    if let Ok(mut m) = RESOLVED.lock() {
        m.get_or_insert_with(HashMap::new).insert(text.to_string(), h.clone());
    }
    Ok(Some(h))
}

/// Writes every row of `files` as one JSON object per line.
fn write_jsonl(files: &[PublishedFile], out: &Path) -> Result<()> {
    let f = std::fs::File::create(out).map_err(|e| Error::io("creating", out, e))?;
    let mut w = BufWriter::new(f);
    for file in files {
        let at = &file.path;
        if file.source.ends_with(".parquet") {
            use parquet::file::reader::{FileReader, SerializedFileReader};
            let bad = |e: parquet::errors::ParquetError| {
                Error::bad_file(at, format!("not a readable Parquet file: {e}"))
            };
            let src = std::fs::File::open(at).map_err(|e| Error::io("opening", at, e))?;
            let reader = SerializedFileReader::new(src).map_err(bad)?;
            // Row by row, one row group in memory at a time.
            for (i, row) in reader.get_row_iter(None).map_err(bad)?.enumerate() {
                let row = row.map_err(|e| Error::bad_file(at, format!("row {}: {e}", i + 1)))?;
                writeln!(w, "{}", row.to_json_value()).map_err(|e| Error::io("writing", out, e))?;
            }
        } else {
            let src = std::fs::File::open(at).map_err(|e| Error::io("opening", at, e))?;
            for line in BufReader::new(src).lines() {
                let line = line.map_err(|e| Error::io("reading", at, e))?;
                if !line.trim().is_empty() {
                    writeln!(w, "{line}").map_err(|e| Error::io("writing", out, e))?;
                }
            }
        }
    }
    w.flush().map_err(|e| Error::io("writing", out, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_specs_and_split_files_are_read_as_the_hub_lays_them_out() {
        assert_eq!(parse("org/chat"), Some(("org/chat".into(), "main".into(), "train".into())));
        assert_eq!(parse("org/chat@v1:test"), Some(("org/chat".into(), "v1".into(), "test".into())));
        assert_eq!(parse("chat.jsonl"), None, "a bare name is a local file");
        assert_eq!(parse("./data/chat.jsonl"), None);
        assert!(holds_split("train.jsonl", "train"));
        assert!(holds_split("data/train-00000-of-00002.parquet", "train"));
        assert!(holds_split("default/train/0000.parquet", "train"));
        assert!(!holds_split("data/test-00000-of-00001.parquet", "train"));
        assert!(!holds_split("trainer.jsonl", "train"));
        assert!(!holds_split("train.csv", "train"));
    }
}
