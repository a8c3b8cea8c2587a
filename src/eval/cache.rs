//! Evaluation results kept per (model, evaluation inputs, worker), so a
//! rerun, or a sweep evaluated again with one candidate added, runs the
//! worker only for what is new, and an interrupted run keeps every model
//! it finished. A key is the sha256 of the worker's code, of everything
//! the worker is given for that model, and of the model's files (weights
//! through the hash cache, keyed by each file's identity and state); any
//! change to any of them is another key, so a stale result is never used.

use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::hash::hex;
use crate::model::checkpoint::FileStamp;
use crate::model::hash_cache::HashCache;

/// The model files a result depends on: weights, config, tokenizer and
/// template files.
fn counts(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name.ends_with(".bin")
        || name.ends_with(".json")
        || name.ends_with(".jinja")
        || name.ends_with(".model")
}

/// Where results are kept (`$CHATVEC_CACHE_DIR/eval`, else the user's
/// cache directory's `chatvec/eval`), or nowhere.
pub(crate) struct EvalCache {
    dir: Option<PathBuf>,
    /// Whether kept results are used (not with `--fresh`).
    read: bool,
    hashes: HashCache,
}

impl EvalCache {
    /// The cache beside the hash cache; `fresh` uses no kept result (every
    /// model runs again) but still keeps the new ones.
    pub(crate) fn from_env(fresh: bool) -> EvalCache {
        let dir = crate::model::hash_cache::cache_root().map(|b| b.join("eval"));
        EvalCache { dir, read: !fresh, hashes: HashCache::from_env(false) }
    }

    /// The key of `model` (its directory) evaluated with `inputs` by
    /// `worker` (the script's text).
    pub(crate) fn key(&self, model: &Path, inputs: &Value, worker: &str) -> Result<String> {
        let mut h = Sha256::new();
        h.update(worker.as_bytes());
        h.update(inputs.to_string().as_bytes());
        let mut names: Vec<String> = std::fs::read_dir(model)
            .map_err(|e| Error::io("listing", model, e))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| counts(n) && n != crate::output::manifest::MANIFEST_FILE)
            .collect();
        names.sort();
        for name in names {
            let path = model.join(&name);
            let meta = std::fs::metadata(&path).map_err(|e| Error::io("reading metadata of", &path, e))?;
            let stamp = FileStamp::of(&meta);
            let sha = match self.hashes.get(&stamp) {
                Some(s) => s,
                None => {
                    let s = crate::hash::sha256_file(&path)?;
                    self.hashes.put(&stamp, &s);
                    s
                }
            };
            h.update(format!("{name}\0{sha}\0").as_bytes());
        }
        Ok(hex(&h.finalize()))
    }

    /// The result kept under `key`, if any.
    pub(crate) fn get(&self, key: &str) -> Option<Value> {
        let path = self.dir.as_ref().filter(|_| self.read)?.join(format!("{key}.json"));
        crate::json::read_value(&path, 64 << 20).ok()
    }

    /// Keeps `result` under `key`. Failures are ignored: the cache only
    /// saves time.
    pub(crate) fn put(&self, key: &str, result: &Value) {
        let Some(dir) = &self.dir else { return };
        if std::fs::create_dir_all(dir).is_ok() {
            let _ = crate::output::files::write_atomically(
                &dir.join(format!("{key}.json")),
                result.to_string().as_bytes(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key changes with any counted file's bytes, with the inputs and
    /// with the worker, and with nothing else; `--fresh` reads nothing but
    /// still keeps.
    #[test]
    fn a_key_follows_the_files_the_inputs_and_the_worker() {
        let d = tempfile::tempdir().unwrap();
        let model = d.path().join("m");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("model.safetensors"), b"weights").unwrap();
        std::fs::write(model.join("config.json"), b"{}").unwrap();
        std::fs::write(model.join("README.md"), b"notes").unwrap();
        let cache = EvalCache { dir: Some(d.path().join("eval")), read: true, hashes: HashCache::disabled() };
        let inputs = serde_json::json!({"prompts": ["hi"]});
        let key = cache.key(&model, &inputs, "worker").unwrap();
        assert_eq!(cache.key(&model, &inputs, "worker").unwrap(), key);
        std::fs::write(model.join("README.md"), b"other notes").unwrap();
        assert_eq!(cache.key(&model, &inputs, "worker").unwrap(), key, "a README is not the model");
        assert_ne!(cache.key(&model, &serde_json::json!({"prompts": ["ho"]}), "worker").unwrap(), key);
        assert_ne!(cache.key(&model, &inputs, "worker v2").unwrap(), key);
        std::fs::write(model.join("model.safetensors"), b"weightz").unwrap();
        let changed = cache.key(&model, &inputs, "worker").unwrap();
        assert_ne!(changed, key);
        let result = serde_json::json!({"assistant_loss": 1.5});
        assert_eq!(cache.get(&changed), None);
        cache.put(&changed, &result);
        assert_eq!(cache.get(&changed), Some(result.clone()));
        let fresh = EvalCache { read: false, ..cache };
        assert_eq!(fresh.get(&changed), None);
        fresh.put(&key, &result);
        assert!(d.path().join("eval").join(format!("{key}.json")).is_file());
    }
}
