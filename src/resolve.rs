//! Turning a model reference from the command line into a local directory.
//! Every command resolves models through `resolve_model`, so new kinds of
//! reference are added in one place.
//!
//! A reference is, in order: an existing local directory; an alias from
//! `recipes/aliases.toml` (or the user's aliases file), optionally with
//! `@revision`; or a Hub id `org/name[@revision]` found in the Hugging Face
//! cache (see `hub_cache`).

use std::path::PathBuf;

use crate::aliases::{Aliases, VectorAlias};
use crate::checkpoint::Checkpoint;
use crate::download::{self, Outcome, offline};
use crate::error::{Error, Result};
use crate::hub_cache::{HubOrigin, cache_dir, find_snapshot, is_commit, parse_hub_id};

/// A resolved model reference.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub dir: PathBuf,
    /// Set when the model came from the Hugging Face cache.
    pub origin: Option<HubOrigin>,
}

/// Resolves `reference` to a model directory.
pub fn resolve_model(reference: &str) -> Result<Resolved> {
    let p = PathBuf::from(reference);
    if p.is_dir() {
        return Ok(Resolved { dir: p, origin: None });
    }
    if p.exists() {
        return Err(Error::Usage(format!("model '{reference}' is not a directory"))
            .with_hint("a model is a directory holding config.json and safetensors weights"));
    }
    let (name, rev) = match reference.split_once('@') {
        Some((n, r)) => (n, Some(r)),
        None => (reference, None),
    };
    let aliased;
    let reference = match Aliases::get()?.models.get(name) {
        Some(a) => {
            aliased = match rev {
                Some(r) => format!("{}@{r}", a.repo),
                None => a.reference(),
            };
            aliased.as_str()
        }
        None => reference,
    };
    let Some(id) = parse_hub_id(reference) else {
        return Err(Error::Usage(format!("model '{reference}' is neither a local directory nor a Hub id"))
            .with_hint("give a model directory, an alias (see recipes/aliases.toml), or a Hub id like org/name@revision"));
    };
    let Some(cache) = cache_dir(|k| std::env::var(k).ok()) else {
        return Err(Error::Usage(format!(
            "model '{reference}' is not a local directory, and no Hugging Face cache is configured (set HF_HOME or HF_HUB_CACHE)"
        )));
    };
    // A commit already in the cache cannot change: no need to ask the Hub.
    let pinned = id.revision.as_deref().is_some_and(is_commit);
    if offline() || (pinned && find_snapshot(&cache, &id).is_ok()) {
        let (dir, origin) = find_snapshot(&cache, &id)?;
        return Ok(Resolved { dir, origin: Some(origin) });
    }
    match download::ensure(&cache, &id, crate::cli::show_progress())? {
        Outcome::Ready(dir, origin) => Ok(Resolved { dir, origin: Some(origin) }),
        Outcome::Unreachable(e) => match find_snapshot(&cache, &id) {
            Ok((dir, origin)) => {
                crate::cli::warn(&format!("{e}; using the cached snapshot {} of {}", origin.commit, id.repo));
                Ok(Resolved { dir, origin: Some(origin) })
            }
            Err(_) => Err(e),
        },
    }
}

/// Resolves `reference` and opens the checkpoint, keeping where it came from.
pub fn open_model(reference: &str) -> Result<Checkpoint> {
    let r = resolve_model(reference)?;
    let mut ck = Checkpoint::open(&r.dir)?;
    ck.origin = r.origin;
    Ok(ck)
}

/// What `--vector` names: a chat vector alias (a pair of models to
/// difference on the fly), or a stored vector (any model reference).
pub fn vector_alias(reference: &str) -> Result<Option<VectorAlias>> {
    if PathBuf::from(reference).exists() {
        return Ok(None);
    }
    Ok(Aliases::get()?.vectors.get(reference).cloned())
}
