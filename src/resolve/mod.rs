//! Turning a model reference from the command line into a local directory.
//! Every command resolves models through `resolve_model`, so new kinds of
//! reference are added in one place.
//!
//! A reference is, in order: an existing local directory; an alias from
//! `recipes/aliases.toml` (or the user's aliases file), optionally with
//! `@revision`; or a Hub id `org/name[@revision]` found in the Hugging Face
//! cache (`hub_cache`) and downloaded into it when missing (`download`).
//!
//! This room imports the model room and the leaf modules only.

pub(crate) mod aliases;
pub(crate) mod download;
pub(crate) mod hub_api;
pub(crate) mod hub_cache;
pub(crate) mod published;
mod stream;
mod transfer;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

pub use aliases::set_user_file as set_aliases_file;
pub use hub_api::set_offline;

use crate::error::{Error, Result};
use crate::model::adapter::Adapter;
use crate::model::checkpoint::{Checkpoint, HubOrigin};
use crate::resolve::aliases::{Aliases, VectorAlias};
use crate::resolve::download::Outcome;
use crate::resolve::hub_api::offline;
use crate::resolve::hub_cache::{cache_dir, find_snapshot, is_commit, parse_hub_id};
use crate::scratch::Scratch;

/// A resolved model reference.
#[derive(Clone, Debug)]
pub(crate) struct Resolved {
    pub dir: PathBuf,
    /// Set when the model came from the Hugging Face cache.
    pub origin: Option<HubOrigin>,
}

/// Whether `reference` (without its `@revision`) is written as a path, not
/// as a Hub id: absolute, relative with `./` or `../`, from `~`, with a
/// trailing slash, or with more parts than `org/name`.
fn looks_like_path(reference: &str) -> bool {
    let name = reference.split_once('@').map_or(reference, |(n, _)| n);
    name.starts_with(['/', '.', '~'])
        || name.ends_with('/')
        || name.contains('\\')
        || name.matches('/').count() > 1
}

/// The hint for a bare name that is neither a directory nor an alias but
/// close to one (`swalow-8b`), if it is.
fn did_you_mean(name: &str, aliases: &Aliases) -> Option<String> {
    let close = aliases.closest(name);
    (!close.is_empty()).then(|| {
        format!("did you mean {}? (`chatvec list` shows every alias and shipped recipe)", close.join(" or "))
    })
}

/// How a job reaches Hub models, passed down to every open rather than
/// set process-wide: fetched whole (what every job does), or, while a job
/// is rehearsed before any weight is downloaded, as probes (headers only;
/// see `download::probe`). A probing `Fetch` owns the probes it made,
/// removed when it is dropped, and records whether one stood in for a
/// model.
pub(crate) struct Fetch {
    probe: bool,
    probed: AtomicBool,
    probes: Mutex<Option<Scratch>>,
}

impl Fetch {
    /// Hub models downloaded whole where not cached.
    pub(crate) fn whole() -> Fetch {
        Fetch { probe: false, probed: AtomicBool::new(false), probes: Mutex::new(None) }
    }

    /// Hub models not fully cached opened as probes.
    pub(crate) fn probes() -> Fetch {
        Fetch { probe: true, ..Fetch::whole() }
    }

    /// Whether a probe stood in for some model.
    pub(crate) fn probed(&self) -> bool {
        self.probed.load(Ordering::Relaxed)
    }

    /// Resolves `reference` and opens the checkpoint, keeping where it
    /// came from; quantized weights are folded with their scales, so a job
    /// reads them as the float tensors they stand for.
    pub(crate) fn open_model(&self, reference: &str) -> Result<Checkpoint> {
        let r = resolve_model(reference, self)?;
        let mut ck = Checkpoint::open(&r.dir)?;
        crate::model::quant::fold(&mut ck)?;
        ck.origin = r.origin;
        Ok(ck)
    }

    /// Resolves `reference` (a directory or Hub id) and opens the LoRA
    /// adapter there.
    pub(crate) fn open_adapter(&self, reference: &str) -> Result<Adapter> {
        let r = resolve_model(reference, self)?;
        Adapter::open(&r.dir)
    }
}

/// Opens `reference` for checks before its weights are fetched: a Hub
/// model not fully cached opens as a probe (headers only). Returns the
/// checkpoint, and for a probe the `Fetch` holding it (drop it to remove
/// the probe) and the snapshot directory the model will have once
/// downloaded.
pub(crate) fn open_probed(reference: &str) -> Result<(Checkpoint, Option<(Fetch, PathBuf)>)> {
    let fetch = Fetch::probes();
    let ck = fetch.open_model(reference)?;
    if !fetch.probed() {
        return Ok((ck, None));
    }
    let Some(cache) = cache_dir(|k| std::env::var(k).ok()) else { return Ok((ck, None)) };
    let snap = ck.origin.as_ref().map(|o| {
        cache.join(format!("models--{}", o.repo.replace('/', "--"))).join("snapshots").join(&o.commit)
    });
    Ok((ck, snap.map(|s| (fetch, s))))
}

/// Resolves `reference` to a model directory, reaching the Hub as `fetch`
/// says.
pub(crate) fn resolve_model(reference: &str, fetch: &Fetch) -> Result<Resolved> {
    let p = Path::new(reference);
    if p.is_dir() {
        return Ok(Resolved { dir: p.to_path_buf(), origin: None });
    }
    if p.exists() {
        return Err(Error::Usage(format!("model '{reference}' is not a directory"))
            .with_hint("a model is a directory holding config.json and safetensors weights"));
    }
    if looks_like_path(reference) {
        return Err(Error::Usage(format!("model '{reference}': no such directory")));
    }
    let (name, rev) = match reference.split_once('@') {
        Some((n, r)) => (n, Some(r)),
        None => (reference, None),
    };
    let aliases = Aliases::get()?;
    let aliased;
    let is_alias = aliases.models.contains_key(name);
    let reference = match aliases.models.get(name) {
        Some(a) => {
            aliased = match rev {
                Some(r) => format!("{}@{r}", a.repo),
                None => a.reference(),
            };
            aliased.as_str()
        }
        None if aliases.vectors.contains_key(name) => {
            return Err(Error::Usage(format!(
                "'{name}' is a vector alias (a chat model minus its pretrained model), not a model"
            ))
            .with_hint(format!("use it as --vector {name}")));
        }
        None if !name.contains('/') => {
            if let Some(hint) = did_you_mean(name, aliases) {
                return Err(Error::Usage(format!(
                    "model '{name}' is neither a local directory nor an alias"
                ))
                .with_hint(hint));
            }
            reference
        }
        None => reference,
    };
    let Some(id) = parse_hub_id(reference) else {
        return Err(Error::Usage(format!("model '{reference}' is neither a local directory nor a Hub id"))
            .with_hint(
                "give a model directory, an alias (`chatvec list`), or a Hub id like org/name@revision",
            ));
    };
    let Some(cache) = cache_dir(|k| std::env::var(k).ok()) else {
        return Err(Error::Usage(format!(
            "model '{reference}' is not a local directory, and no Hugging Face cache is configured (set HF_HOME or HF_HUB_CACHE)"
        )));
    };
    from_hub(&cache, &id, fetch).map_err(|e| match e.kind() {
        // A name the user may have meant as a path or an alias: say how it
        // was read, and what is near.
        Error::NotFound(why) if !is_alias => Error::NotFound(format!(
            "model '{name}' is neither a local directory nor an alias, so it was looked up as a Hub id: {why}"
        ))
        .with_hint(format!(
            "the nearest aliases: {} (`chatvec list` shows them all); a local directory is written as a path, e.g. ./{name}",
            aliases.nearest(name, 3).join(", ")
        )),
        _ => e,
    })
}

/// Resolves Hub id `id` in `cache`: the cached snapshot where nothing can
/// have changed (offline, or a commit already there), else through the
/// Hub (a probe while rehearsing, else a download of what is missing).
fn from_hub(cache: &Path, id: &hub_cache::HubId, fetch: &Fetch) -> Result<Resolved> {
    // A commit already in the cache cannot change: no need to ask the Hub.
    let pinned = id.revision.as_deref().is_some_and(is_commit);
    if offline() || (pinned && find_snapshot(cache, id).is_ok()) {
        let (dir, origin) = find_snapshot(cache, id)?;
        return Ok(Resolved { dir, origin: Some(origin) });
    }
    if fetch.probe {
        match download::probe(cache, id, &fetch.probes)? {
            Some(Outcome::Ready(dir, origin)) => {
                fetch.probed.store(true, Ordering::Relaxed);
                return Ok(Resolved { dir, origin: Some(origin) });
            }
            Some(Outcome::Unreachable(e)) => {
                if let Ok((dir, origin)) = find_snapshot(cache, id) {
                    return Ok(Resolved { dir, origin: Some(origin) });
                }
                return Err(e);
            }
            // Nothing to fetch, or `.bin` weights: the full path below.
            None => {}
        }
    }
    match download::ensure(cache, id)? {
        Outcome::Ready(dir, origin) => Ok(Resolved { dir, origin: Some(origin) }),
        Outcome::Unreachable(e) => match find_snapshot(cache, id) {
            Ok((dir, origin)) => {
                crate::ui::warn(&format!("{e}; using the cached snapshot {} of {}", origin.commit, id.repo));
                Ok(Resolved { dir, origin: Some(origin) })
            }
            Err(_) => Err(e),
        },
    }
}

/// Resolves `reference` and opens the checkpoint, downloading what is
/// missing (`Fetch::whole`).
pub(crate) fn open_model(reference: &str) -> Result<Checkpoint> {
    Fetch::whole().open_model(reference)
}

/// What `--vector` names: a chat vector alias (a pair of models to
/// difference on the fly), or else `None` for a stored vector (any model
/// reference).
pub(crate) fn vector_alias(reference: &str) -> Result<Option<VectorAlias>> {
    if Path::new(reference).exists() {
        return Ok(None);
    }
    let aliases = Aliases::get()?;
    if let Some(v) = aliases.vectors.get(reference) {
        return Ok(Some(v.clone()));
    }
    if !reference.contains('/')
        && !looks_like_path(reference)
        && !aliases.models.contains_key(reference)
        && let Some(hint) = did_you_mean(reference, aliases)
    {
        return Err(Error::Usage(format!(
            "vector '{reference}' is neither a local directory nor a vector alias"
        ))
        .with_hint(hint));
    }
    Ok(None)
}

/// What `chatvec download` brought (or, dry, would bring) for one model.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Prefetch {
    /// The model as named.
    pub reference: String,
    /// The Hub repository and commit.
    pub repo: String,
    pub commit: String,
    /// Its files, with sizes and whether they were cached.
    pub files: Vec<download::Prefetched>,
}

/// Fills the Hugging Face cache with `reference` (a Hub id or a model
/// alias; a vector alias names both of its models), as a job would fetch
/// it, or with the files matching `include`; `dry_run` lists them only.
pub(crate) fn prefetch(reference: &str, include: &[String], dry_run: bool) -> Result<Vec<Prefetch>> {
    if offline() {
        return Err(Error::Usage("download: the network is off (--offline or HF_HUB_OFFLINE)".into()));
    }
    if Path::new(reference).exists() || looks_like_path(reference) {
        return Err(Error::Usage(format!("download {reference}: a local path, not a Hub model")));
    }
    let aliases = Aliases::get()?;
    let (name, rev) = match reference.split_once('@') {
        Some((n, r)) => (n, Some(r)),
        None => (reference, None),
    };
    let refs: Vec<String> = if let Some(a) = aliases.models.get(name) {
        vec![rev.map_or_else(|| a.reference(), |r| format!("{}@{r}", a.repo))]
    } else if let Some(v) = aliases.vectors.get(name) {
        vec![v.chat.clone(), v.pretrained.clone()]
    } else {
        vec![reference.to_string()]
    };
    let cache = cache_dir(|k| std::env::var(k).ok()).ok_or_else(|| {
        Error::Usage("no Hugging Face cache is configured (set HF_HOME or HF_HUB_CACHE)".into())
    })?;
    let mut out = Vec::new();
    for r in refs {
        // A vector alias's models may themselves be aliases.
        let spelled = match r.split_once('@').map_or((r.as_str(), None), |(n, v)| (n, Some(v))) {
            (n, v) if aliases.models.contains_key(n) => {
                let a = &aliases.models[n];
                v.map_or_else(|| a.reference(), |v| format!("{}@{v}", a.repo))
            }
            _ => r.clone(),
        };
        let id = parse_hub_id(&spelled).ok_or_else(|| {
            Error::Usage(format!("download {spelled}: not a Hub id (org/name[@revision]) nor an alias"))
                .with_hint(
                    did_you_mean(name, aliases).unwrap_or_else(|| "`chatvec list` shows the aliases".into()),
                )
        })?;
        let (commit, files) = download::prefetch(&cache, &id, include, dry_run)?;
        out.push(Prefetch { reference: r, repo: id.repo.clone(), commit, files });
    }
    Ok(out)
}

/// The aliases in effect: `(name, Hub reference)` for models and
/// `(name, chat, pretrained)` for vectors, sorted by name.
pub(crate) type AliasList = (Vec<(String, String)>, Vec<(String, String, String)>);

/// Lists the aliases in effect (built in, then the user's file over them).
pub(crate) fn alias_list() -> Result<AliasList> {
    let a = Aliases::get()?;
    Ok((
        a.models.iter().map(|(n, m)| (n.clone(), m.reference())).collect(),
        a.vectors.iter().map(|(n, v)| (n.clone(), v.chat.clone(), v.pretrained.clone())).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_told_from_hub_ids() {
        for p in ["/abs/model", "./m", "../m", ".", "~/m", "m/", "a/b/c", "a\\b"] {
            assert!(looks_like_path(p), "{p}");
        }
        for h in ["org/name", "gpt2", "swallow-8b", "org/name@refs/pr/1", "org/name@v1.0"] {
            assert!(!looks_like_path(h), "{h}");
        }
    }
}
