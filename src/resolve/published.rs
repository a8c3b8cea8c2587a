//! Single files a benchmark is made of, fetched where their authors
//! publish them: a file of a Hub dataset (or model) repository, into the
//! standard cache as huggingface_hub keeps it, or a file at a URL pinned to
//! a commit (GitHub's raw files), into chatvec's cache. Either way the
//! result names where it came from, the commit, and the sha256 of the
//! bytes used, so a score can say exactly what it was measured on.
//! Offline (`--offline`, `HF_HUB_OFFLINE`), only the caches are read.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::resolve::download::{Outcome, ensure_file};
use crate::resolve::hub_api::offline;
use crate::resolve::hub_cache::{HubId, RepoKind, cache_dir, find_snapshot, is_commit};

/// The most bytes a published benchmark file may have.
const MAX_FILE_BYTES: u64 = 256 << 20;

/// A fetched file and what pins it.
#[derive(Clone, Debug, Serialize)]
pub struct PublishedFile {
    /// Where it came from: `hf://datasets/org/name/file` or the URL.
    pub source: String,
    /// The revision asked for (branch, tag or commit).
    pub revision: String,
    /// The commit it was read at, where known.
    pub commit: Option<String>,
    /// sha256 of its bytes.
    pub sha256: String,
    /// Where it is on this machine.
    #[serde(skip)]
    pub path: PathBuf,
}

/// File `name` of Hub repository `repo` (a dataset when `dataset`) at
/// `revision`, from the cache or downloaded into it.
pub(crate) fn hub_file(repo: &str, revision: &str, name: &str, dataset: bool) -> Result<PublishedFile> {
    let kind = if dataset { RepoKind::Dataset } else { RepoKind::Model };
    let id = HubId { repo: repo.to_string(), revision: Some(revision.to_string()), kind };
    let cache = cache_dir(|k| std::env::var(k).ok()).ok_or_else(|| {
        Error::Usage(format!("{repo}: no Hugging Face cache is configured (set HF_HOME or HF_HUB_CACHE)"))
    })?;
    let cached = || -> Result<(PathBuf, String)> {
        let (snap, origin) = find_snapshot(&cache, &id)?;
        let p = snap.join(name);
        if !p.is_file() {
            return Err(Error::Usage(format!(
                "{name} of {repo} @ {revision} is not in the Hugging Face cache {}",
                cache.display()
            ))
            .with_hint("run once without --offline (and HF_HUB_OFFLINE) so chatvec downloads it"));
        }
        Ok((p, origin.commit))
    };
    let pinned = is_commit(revision);
    let (path, commit) = if offline() || (pinned && cached().is_ok()) {
        cached()?
    } else {
        match ensure_file(&cache, &id, name)? {
            Outcome::Ready(p, origin) => (p, origin.commit),
            Outcome::Unreachable(e) => match cached() {
                Ok(found) => {
                    crate::ui::warn(&format!("{e}; using the cached copy of {name} of {repo}"));
                    found
                }
                Err(_) => return Err(e),
            },
        }
    };
    let prefix = if dataset { "datasets/" } else { "" };
    Ok(PublishedFile {
        source: format!("hf://{prefix}{repo}/{name}"),
        revision: revision.to_string(),
        commit: Some(commit),
        sha256: crate::hash::sha256_file(&path)?,
        path,
    })
}

/// The commit `revision` of Hub repository `repo` (a dataset when
/// `dataset`) names, and its files: from the Hub, else (offline, or the
/// Hub out of reach) from the cached snapshot.
pub(crate) fn hub_listing(repo: &str, revision: &str, dataset: bool) -> Result<(String, Vec<String>)> {
    let kind = if dataset { RepoKind::Dataset } else { RepoKind::Model };
    let id = HubId { repo: repo.to_string(), revision: Some(revision.to_string()), kind };
    let cache = cache_dir(|k| std::env::var(k).ok()).ok_or_else(|| {
        Error::Usage(format!("{repo}: no Hugging Face cache is configured (set HF_HOME or HF_HUB_CACHE)"))
    })?;
    let cached = || -> Result<(String, Vec<String>)> {
        let (snap, origin) = find_snapshot(&cache, &id)?;
        let mut names = Vec::new();
        let mut stack = vec![snap.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).map_err(|e| Error::io("listing", &d, e))? {
                let p = e.map_err(|e| Error::io("listing", &d, e))?.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(rel) = p.strip_prefix(&snap) {
                    names.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        names.sort();
        Ok((origin.commit, names))
    };
    if offline() {
        return cached();
    }
    match crate::resolve::hub_api::Client::new().revision_info(&id) {
        Ok((commit, files)) => Ok((commit, files.into_iter().map(|f| f.name).collect())),
        Err(e) if matches!(e.kind(), Error::Network(_)) => cached().map_err(|_| e),
        Err(e) => Err(e),
    }
}

/// Where a URL's file is kept: `<chatvec cache>/published/<sha256 of the
/// URL>/<its last path part>`.
fn url_cache_path(url: &str) -> Result<PathBuf> {
    use sha2::{Digest, Sha256};
    let root = crate::model::hash_cache::cache_root().ok_or_else(|| {
        Error::Usage(format!("{url}: no cache directory to keep it in (set CHATVEC_CACHE_DIR or HOME)"))
    })?;
    let name = url.rsplit('/').next().filter(|n| !n.is_empty() && !n.starts_with('.')).unwrap_or("file");
    let safe: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    Ok(root.join("published").join(crate::hash::hex(&Sha256::digest(url.as_bytes()))).join(safe))
}

/// The file at `url`, pinned to `commit` (the URL holds it, so its bytes
/// cannot change): from chatvec's cache, else downloaded once into it.
pub(crate) fn url_file(url: &str, revision: &str) -> Result<PublishedFile> {
    let path = url_cache_path(url)?;
    if !path.is_file() {
        if offline() {
            return Err(Error::Usage(format!("{url} is not in chatvec's cache ({})", path.display()))
                .with_hint("run once without --offline (and HF_HUB_OFFLINE) so chatvec downloads it"));
        }
        let bytes = download(url)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
        // Written whole under another name, then renamed: a reader never
        // sees half a file.
        let tmp = dir.join(format!(".partial-{}", std::process::id()));
        std::fs::write(&tmp, &bytes).map_err(|e| Error::io("writing", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io("renaming", &tmp, e))?;
    }
    Ok(PublishedFile {
        source: url.to_string(),
        revision: revision.to_string(),
        commit: is_commit(revision).then(|| revision.to_string()),
        sha256: crate::hash::sha256_file(&path)?,
        path,
    })
}

/// GETs `url`, retrying a dropped connection, a 5xx or a 429 five times
/// with growing waits.
fn download(url: &str) -> Result<Vec<u8>> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_global(Some(Duration::from_secs(300)))
        .user_agent(concat!("chatvec/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let mut wait = crate::resolve::hub_api::first_wait();
    let mut last = String::new();
    for attempt in 0..6 {
        if attempt > 0 {
            crate::ui::warn(&format!("{last}; retrying in {:.1} s", wait.as_secs_f64()));
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_secs(8));
        }
        match agent.get(url).call() {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                if status == 200 {
                    return resp
                        .body_mut()
                        .with_config()
                        .limit(MAX_FILE_BYTES)
                        .read_to_vec()
                        .map_err(|e| Error::Network(format!("reading {url}: {e}")));
                }
                last = format!("{url} answered {status}");
                if status != 429 && status < 500 {
                    return Err(Error::Usage(last));
                }
            }
            Err(e) => last = format!("{url}: {e}"),
        }
    }
    Err(Error::Network(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A URL is kept under a name made of its hash and its last part, so
    /// a hostile URL cannot name a path outside the cache.
    #[test]
    fn a_url_is_kept_under_its_hash_and_a_safe_name() {
        let p = url_cache_path("https://example.org/a/../../question.jsonl").unwrap();
        assert!(p.ends_with("question.jsonl"), "{}", p.display());
        let q = url_cache_path("https://example.org/x/..").unwrap();
        assert!(q.ends_with("file"), "{}", q.display());
        let r = url_cache_path("https://example.org/x/a b;c").unwrap();
        assert!(r.ends_with("a_b_c"), "{}", r.display());
        assert_ne!(p.parent(), q.parent());
    }
}
