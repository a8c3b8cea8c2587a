//! Models already in the Hugging Face cache, found the way huggingface_hub
//! finds them, so checkpoints downloaded by Python tools are used in place:
//! `<cache>/models--<org>--<name>/{refs,snapshots,blobs}`, a revision being
//! a branch or tag (a file under `refs/` holding a commit sha) or a commit
//! sha (a folder under `snapshots/`).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::checkpoint::HubOrigin;

/// What kind of Hub repository an id names: models (the default) or
/// datasets (benchmarks' questions, `--lm-data`), which the Hub serves
/// and the cache keeps under their own prefixes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum RepoKind {
    #[default]
    Model,
    Dataset,
}

/// A parsed `org/name[@revision]` reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HubId {
    pub repo: String,
    pub revision: Option<String>,
    pub kind: RepoKind,
}

impl HubId {
    /// The repository's folder in the cache, as huggingface_hub names it:
    /// `models--org--name` or `datasets--org--name`.
    pub(crate) fn cache_folder(&self) -> String {
        let prefix = match self.kind {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        };
        format!("{prefix}--{}", self.repo.replace('/', "--"))
    }

    /// The repository's path in Hub URLs: `org/name`, or
    /// `datasets/org/name` for a dataset.
    pub(crate) fn url_path(&self) -> String {
        match self.kind {
            RepoKind::Model => self.repo.clone(),
            RepoKind::Dataset => format!("datasets/{}", self.repo),
        }
    }
}

fn valid_part(p: &str) -> bool {
    !p.is_empty()
        && p != "."
        && p != ".."
        && p.len() <= 96
        && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Parses `org/name`, `name`, optionally followed by `@revision`. Returns
/// `None` for strings that cannot be a Hub id (so the caller can say the
/// path does not exist instead).
pub(crate) fn parse_hub_id(s: &str) -> Option<HubId> {
    let (repo, revision) = match s.split_once('@') {
        Some((r, rev)) => (r, Some(rev)),
        None => (s, None),
    };
    let parts: Vec<&str> = repo.split('/').collect();
    if parts.is_empty() || parts.len() > 2 || !parts.iter().all(|p| valid_part(p)) {
        return None;
    }
    if let Some(rev) = revision
        && (rev.is_empty()
            || rev.contains(char::is_whitespace)
            || rev.split('/').any(|c| c.is_empty() || c == "." || c == ".."))
    {
        return None;
    }
    Some(HubId { repo: repo.to_string(), revision: revision.map(str::to_string), kind: RepoKind::Model })
}

/// The cache directory, from the environment as huggingface_hub reads it:
/// `HF_HUB_CACHE`, then the legacy `HUGGINGFACE_HUB_CACHE`, then
/// `$HF_HOME/hub`, then `$XDG_CACHE_HOME/huggingface/hub`, then
/// `~/.cache/huggingface/hub`.
pub(crate) fn cache_dir(env: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let set = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    set("HF_HUB_CACHE")
        .or_else(|| set("HUGGINGFACE_HUB_CACHE"))
        .or_else(|| set("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| set("XDG_CACHE_HOME").map(|x| x.join("huggingface").join("hub")))
        .or_else(|| set("HOME").map(|h| h.join(".cache").join("huggingface").join("hub")))
}

/// Whether `s` is a full 40-hex commit sha.
pub(crate) fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The snapshot directory of `id` in the cache at `cache`.
pub(crate) fn find_snapshot(cache: &Path, id: &HubId) -> Result<(PathBuf, HubOrigin)> {
    let repo_dir = cache.join(id.cache_folder());
    let not_cached = |what: String| {
        Error::Usage(format!("{what} in the Hugging Face cache {}", cache.display())).with_hint(format!(
            "without --offline (and HF_HUB_OFFLINE) chatvec downloads it; or run `hf download {}{}`",
            id.repo,
            id.revision.as_deref().map(|r| format!(" --revision {r}")).unwrap_or_default()
        ))
    };
    if !repo_dir.is_dir() {
        return Err(not_cached(format!("model {} is not", id.repo)));
    }
    let revision = id.revision.clone().unwrap_or_else(|| "main".to_string());
    let commit = if is_commit(&revision) && repo_dir.join("snapshots").join(&revision).is_dir() {
        revision.clone()
    } else {
        let ref_file = repo_dir.join("refs").join(&revision);
        if !ref_file.exists() {
            return Err(not_cached(format!("revision '{revision}' of {} is not", id.repo)));
        }
        let bytes = crate::json::read_capped(&ref_file, 1024)?;
        let text = String::from_utf8_lossy(&bytes);
        let c = text.trim().to_string();
        if !is_commit(&c) {
            return Err(Error::bad_file(&ref_file, format!("should hold a 40-hex commit sha, holds {c:?}")));
        }
        c
    };
    let snap = repo_dir.join("snapshots").join(&commit);
    if !snap.is_dir() {
        return Err(not_cached(format!("snapshot {commit} ({} @ {revision}) is not", id.repo)));
    }
    Ok((snap, HubOrigin { repo: id.repo.clone(), revision, commit }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids_and_rejects_paths() {
        assert_eq!(
            parse_hub_id("tokyotech-llm/Llama-3-Swallow-8B-v0.1@main"),
            Some(HubId {
                repo: "tokyotech-llm/Llama-3-Swallow-8B-v0.1".into(),
                revision: Some("main".into()),
                kind: RepoKind::Model,
            })
        );
        assert_eq!(parse_hub_id("gpt2").unwrap().revision, None);
        assert!(parse_hub_id("org/name@refs/pr/1").is_some());
        for bad in ["a/b/c", "../x", "org/..", "org/na me", "org/name@", "org/name@../x", "", "/abs"] {
            assert_eq!(parse_hub_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn cache_dir_follows_huggingface_hub_precedence() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(a, _)| *a == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(cache_dir(env(&[("HF_HUB_CACHE", "/a"), ("HF_HOME", "/h")])), Some("/a".into()));
        assert_eq!(cache_dir(env(&[("HUGGINGFACE_HUB_CACHE", "/l"), ("HF_HOME", "/h")])), Some("/l".into()));
        assert_eq!(cache_dir(env(&[("HF_HOME", "/h"), ("HOME", "/u")])), Some("/h/hub".into()));
        assert_eq!(
            cache_dir(env(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/u")])),
            Some("/x/huggingface/hub".into())
        );
        assert_eq!(cache_dir(env(&[("HOME", "/u")])), Some("/u/.cache/huggingface/hub".into()));
        assert_eq!(
            cache_dir(env(&[("HF_HUB_CACHE", ""), ("HOME", "/u")])),
            Some("/u/.cache/huggingface/hub".into())
        );
    }
}
