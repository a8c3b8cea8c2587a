//! `chatvec verify`: proves an output is what its manifest says (contract
//! 5). Every file the manifest lists is re-hashed and compared; files in the
//! directory it does not list are reported. With a recipe, the recipe's
//! sha256 and each input's per-shard sha256 (as the inputs are now) are
//! compared with the recorded ones as well, and for a chat_vector recipe
//! its parameters, as checked, with the ones the manifest records.

use std::fmt::{self, Write as _};
use std::path::Path;
use std::sync::atomic::AtomicBool;

use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::exec::input_hash::hash_following;
use crate::hash::sha256_file;
use crate::job::merge::chat_vector_spec;
use crate::json::read_value;
use crate::model::hash_cache::HashCache;
use crate::output::manifest::MANIFEST_FILE;
use crate::recipe::{Recipe, RecipeBody};
use crate::resolve::open_model;

/// One compared file.
#[derive(Serialize, Debug)]
pub struct Check {
    /// What was compared: an output file, an input shard, the recipe.
    pub what: String,
    /// The sha256 (or commit) the manifest records.
    pub expected: String,
    /// What it is now; `None` when the file is missing.
    pub actual: Option<String>,
}

impl Check {
    pub(crate) fn ok(&self) -> bool {
        self.actual.as_deref() == Some(self.expected.as_str())
    }
}

/// The outcome of `verify`; `--json` prints it as is, `Display` lists what
/// failed and gives a verdict.
#[derive(Serialize, Debug)]
pub struct VerifyReport {
    /// The directory checked.
    pub dir: String,
    /// Every comparison made.
    pub checks: Vec<Check>,
    /// Files in the directory the manifest does not list.
    pub unlisted: Vec<String>,
    /// Whether everything matched and nothing is unlisted.
    pub ok: bool,
    /// The files the manifest lists, with their recorded sha256.
    #[serde(skip)]
    pub(crate) listed: Vec<(String, String)>,
}

impl VerifyReport {
    /// An error (exit 1) when anything differs.
    pub fn into_result(self) -> Result<()> {
        if self.ok {
            return Ok(());
        }
        let bad = self.checks.iter().filter(|c| !c.ok()).count();
        Err(Error::Mismatch {
            what: format!("{} does not match its manifest", self.dir),
            problems: vec![format!("{bad} check(s) failed, {} unlisted file(s)", self.unlisted.len())],
        })
    }
}

/// The file's sha256, or None when it is missing.
fn sha256_of(path: &Path) -> Result<Option<String>> {
    if !path.exists() {
        return Ok(None);
    }
    sha256_file(path).map(Some)
}

fn listed(manifest: &Value, key: &str, file: &Path) -> Result<Vec<(String, String)>> {
    let arr = manifest
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| Error::bad_file(file, format!("'{key}' is missing or not a list")))?;
    arr.iter()
        .map(|e| {
            let name = e.get("file").and_then(Value::as_str);
            let sha = e.get("sha256").and_then(Value::as_str);
            match (name, sha) {
                // Only plain names: a manifest must not point outside its directory.
                (Some(n), Some(s)) if !n.contains('/') && !n.contains('\\') && n != ".." => {
                    Ok((n.to_string(), s.to_string()))
                }
                _ => Err(Error::bad_file(
                    file,
                    format!("a '{key}' entry lacks a plain file name or sha256: {e}"),
                )),
            }
        })
        .collect()
}

/// Re-hashes every file `dir`'s manifest lists and reports differences
/// and unlisted files; with `recipe` (a file or shipped name), also checks
/// that recipe and its inputs as they are now against the recorded ones.
pub fn verify(dir: &Path, recipe: Option<&str>) -> Result<VerifyReport> {
    let mpath = dir.join(MANIFEST_FILE);
    if !mpath.is_file() {
        return Err(Error::Usage(format!(
            "{} has no {MANIFEST_FILE}; it was not written by chatvec",
            dir.display()
        )));
    }
    let manifest = read_value(&mpath, crate::output::manifest::MAX_MANIFEST_BYTES)?;
    let mut files = listed(&manifest, "outputs", &mpath)?;
    files.extend(listed(&manifest, "files", &mpath)?);
    let mut checks: Vec<Check> = files
        .par_iter()
        .map(|(name, sha)| {
            Ok(Check {
                what: format!("output {name}"),
                expected: sha.clone(),
                actual: sha256_of(&dir.join(name))?,
            })
        })
        .collect::<Result<_>>()?;
    let mut unlisted = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("listing", dir, e))?;
    for e in entries {
        let e = e.map_err(|e| Error::io("listing", dir, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        // The Hub adds `.gitattributes` to every repository, so a pushed
        // model downloaded back has it.
        if name != MANIFEST_FILE && name != ".gitattributes" && !files.iter().any(|(n, _)| *n == name) {
            unlisted.push(name);
        }
    }
    unlisted.sort();
    if let Some(r) = recipe {
        checks.extend(check_recipe(&manifest, &mpath, r)?);
    }
    let ok = checks.iter().all(Check::ok) && unlisted.is_empty();
    Ok(VerifyReport { dir: dir.display().to_string(), checks, unlisted, ok, listed: files })
}

/// What a check of a recipe parameter is called (its value is compared,
/// not a hash).
const PARAMETER: &str = "recipe parameter ";

/// The recipe's sha256, its parameters (for a chat_vector recipe: the
/// `ApplyParams` it checks into, defaults written out, against the ones
/// the manifest records, key by key) and its inputs' shard hashes against
/// the manifest.
fn check_recipe(manifest: &Value, mpath: &Path, recipe: &str) -> Result<Vec<Check>> {
    let r = Recipe::load(recipe)?;
    let recorded = manifest.pointer("/recipe/sha256").and_then(Value::as_str).ok_or_else(|| {
        Error::Usage(format!("{} records no recipe; it was not made by `chatvec merge`", mpath.display()))
    })?;
    let mut checks = vec![Check {
        what: format!("recipe {recipe}"),
        expected: recorded.to_string(),
        actual: Some(r.sha256.clone()),
    }];
    if let RecipeBody::ChatVector(c) = &r.body {
        // Through text, as the manifest wrote it (f32s in their shortest
        // spelling). Keys an older manifest lacks are not compared.
        let text = serde_json::to_string(&chat_vector_spec(&r, c)?.given())
            .map_err(|e| Error::Internal(e.to_string()))?;
        let given: Value = serde_json::from_str(&text).map_err(|e| Error::Internal(e.to_string()))?;
        let params = manifest.get("parameters");
        // A sweep's candidate records its own scale, one of the sweep's.
        let sweep: Option<Vec<Value>> = r.sweep().map(|scales| {
            scales
                .iter()
                .filter_map(|x| serde_json::to_string(x).ok().and_then(|t| serde_json::from_str(&t).ok()))
                .collect()
        });
        for (key, want) in given.as_object().into_iter().flatten() {
            if let Some(had) = params.and_then(|p| p.get(key)) {
                let actual = match &sweep {
                    // `merge` writes the recipe's own scale, `run` each of
                    // the sweep's.
                    Some(scales) if key == "scale" && had != want => {
                        match scales.iter().find(|x| *x == had) {
                            Some(x) => x.to_string(),
                            None => format!("{want} or one of {}", Value::Array(scales.clone())),
                        }
                    }
                    _ => want.to_string(),
                };
                checks.push(Check {
                    what: format!("{PARAMETER}{key}"),
                    expected: had.to_string(),
                    actual: Some(actual),
                });
            }
        }
    }
    let inputs = manifest
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::bad_file(mpath, "'inputs' is missing"))?;
    // Re-hashed, never taken from the cache: a stale or planted entry
    // must not pass a changed input. The fresh hashes are recorded.
    let cache = HashCache::from_env(true);
    for input in inputs {
        let reference = input
            .get("reference")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::bad_file(mpath, "an input lacks its reference"))?;
        let ck = open_model(reference)?;
        if let Some(want) = input.pointer("/hub/commit").and_then(Value::as_str) {
            let got = ck.origin.as_ref().map(|o| o.commit.clone());
            checks.push(Check {
                what: format!("input {reference} commit"),
                expected: want.to_string(),
                actual: got,
            });
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        drop(tx);
        let now = hash_following(&ck, &cache, rx, &AtomicBool::new(false))?;
        let shards = input.get("shards").and_then(Value::as_array).cloned().unwrap_or_default();
        for s in shards {
            let name = s.get("file").and_then(Value::as_str).unwrap_or("?");
            let want = s.get("sha256").and_then(Value::as_str).unwrap_or("?");
            let got = now.iter().find(|w| w.file == name).map(|w| w.sha256.clone());
            checks.push(Check {
                what: format!("input {reference} {name}"),
                expected: want.to_string(),
                actual: got,
            });
        }
    }
    Ok(checks)
}

impl fmt::Display for VerifyReport {
    /// One line per check that failed, then a verdict.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&render(self))
    }
}

fn render(r: &VerifyReport) -> String {
    let mut s = String::new();
    for c in &r.checks {
        match &c.actual {
            _ if c.ok() => {}
            None => {
                let _ = writeln!(s, "MISSING  {} (expected sha256 {})", c.what, c.expected);
            }
            Some(a) if c.what.starts_with(PARAMETER) => {
                let _ = writeln!(s, "DIFFERS  {}: {a}, recorded {}", c.what, c.expected);
            }
            Some(a) => {
                let _ = writeln!(s, "DIFFERS  {}: sha256 {a}, recorded {}", c.what, c.expected);
            }
        }
    }
    for u in &r.unlisted {
        let _ = writeln!(s, "UNLISTED {u} (not in {MANIFEST_FILE})");
    }
    let good = r.checks.iter().filter(|c| c.ok()).count();
    let verdict = if r.ok { "OK" } else { "FAILED" };
    let _ = writeln!(s, "{verdict}: {} - {good} of {} checks match", r.dir, r.checks.len());
    s
}
