//! Turning a model reference from the command line into a local directory.
//! Every command resolves models through `resolve_model`, so new kinds of
//! reference are added in one place.
//!
//! A reference is, in order: an existing local directory; or a Hub id
//! `org/name[@revision]` found in the Hugging Face cache (see `hub_cache`).

use std::path::PathBuf;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::hub_cache::{HubOrigin, cache_dir, find_snapshot, parse_hub_id};

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
    let Some(id) = parse_hub_id(reference) else {
        return Err(Error::Usage(format!("model '{reference}' is neither a local directory nor a Hub id"))
            .with_hint("give a model directory, or a Hub id like org/name or org/name@revision"));
    };
    let Some(cache) = cache_dir(|k| std::env::var(k).ok()) else {
        return Err(Error::Usage(format!(
            "model '{reference}' is not a local directory, and no Hugging Face cache is configured (set HF_HOME or HF_HUB_CACHE)"
        )));
    };
    let (dir, origin) = find_snapshot(&cache, &id)?;
    Ok(Resolved { dir, origin: Some(origin) })
}

/// Resolves `reference` and opens the checkpoint, keeping where it came from.
pub fn open_model(reference: &str) -> Result<Checkpoint> {
    let r = resolve_model(reference)?;
    let mut ck = Checkpoint::open(&r.dir)?;
    ck.origin = r.origin;
    Ok(ck)
}
