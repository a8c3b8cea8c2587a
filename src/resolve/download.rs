//! Downloads a model from the Hugging Face Hub into the standard cache
//! layout (`models--org--name/{blobs,snapshots,refs}`), so Python tools
//! and chatvec share one copy.
//!
//! Only what chatvec reads is fetched: the weights (the safetensors index
//! and the shards it names, else `model.safetensors`, else the PyTorch
//! `.bin` equivalents) and the config/tokenizer side files. Each file goes
//! to `blobs/<id>.incomplete`, is resumed from where it stopped with an HTTP
//! Range request, and is checked before it is renamed into place: large
//! (LFS) files against the sha256 the Hub lists for them, small files
//! against their git blob id. Nothing unchecked ever appears in a snapshot.
//! Up to four files download at once into one progress bar; a blob is
//! written under its `.locks/` file lock, refs are renamed into place, and
//! side files the repository lacks are marked in `.no_exist/`, as
//! huggingface_hub does, so Python tools can share the cache at once.
//!
//! `--offline` or `HF_HUB_OFFLINE=1` never touches the network; `HF_TOKEN`
//! (or the token file `hf auth login` writes) authenticates;
//! `HF_ENDPOINT` points at a mirror.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::ProgressBar;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::SIDE_FILES;
use crate::model::adapter::{ADAPTER_BIN, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::model::checkpoint::{FileStamp, HubOrigin};
use crate::model::hash_cache::HashCache;
use crate::resolve::hub_api::{Client, MAX_INFO_BYTES, RemoteFile};
use crate::resolve::hub_cache::HubId;
use crate::resolve::transfer::{download_verified, fresh_file, regular_len};
use crate::scratch::Scratch;

/// Which of `files` chatvec needs; `index` reads a downloaded index file's
/// shard names.
fn wanted(
    files: &[RemoteFile],
    index: &mut dyn FnMut(&RemoteFile) -> Result<Vec<String>>,
) -> Result<Vec<RemoteFile>> {
    let find = |n: &str| files.iter().find(|f| f.name == n);
    let mut out: Vec<RemoteFile> = Vec::new();
    let weights = [
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ];
    for (idx, single) in weights {
        if let Some(i) = find(idx) {
            for shard in index(i)? {
                let f = find(&shard).ok_or_else(|| {
                    Error::Hub(format!("the Hub's {idx} names {shard}, which the repository does not have"))
                })?;
                if !out.iter().any(|o| o.name == f.name) {
                    out.push(f.clone());
                }
            }
            out.push(i.clone());
            break;
        }
        if let Some(s) = find(single) {
            out.push(s.clone());
            break;
        }
    }
    // A PEFT adapter repository (for `apply --lora`): its config and weights.
    if out.is_empty()
        && let Some(cfg) = find(ADAPTER_CONFIG)
        && let Some(w) = find(ADAPTER_WEIGHTS).or_else(|| find(ADAPTER_BIN))
    {
        out.push(cfg.clone());
        out.push(w.clone());
    }
    if out.is_empty() {
        return Err(Error::Hub(
            "the repository has no model.safetensors, safetensors index, pytorch_model.bin or LoRA adapter"
                .into(),
        ));
    }
    out.extend(SIDE_FILES.iter().filter_map(|n| find(n).cloned()));
    // The model card: its licence is carried into the cards of what is
    // made from the model.
    out.extend(find(crate::model::CARD_FILE).cloned());
    Ok(out)
}

/// The files of `files` chatvec needs (`wanted`), the index read after
/// fetching it into the cache.
fn needed(
    client: &Client,
    id: &HubId,
    commit: &str,
    repo_dir: &Path,
    files: &[RemoteFile],
) -> Result<Vec<RemoteFile>> {
    let mut index = |f: &RemoteFile| -> Result<Vec<String>> {
        let path = fetch(client, id, commit, repo_dir, f, None)?;
        let v = crate::json::read_value(&path, MAX_INFO_BYTES)?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::bad_file(&path, "has no weight_map"))?;
        let mut shards: Vec<String> = map.values().filter_map(Value::as_str).map(str::to_string).collect();
        shards.sort();
        shards.dedup();
        Ok(shards)
    };
    wanted(files, &mut index)
}

/// What `ensure` found.
pub(crate) enum Outcome {
    /// The snapshot holds every file chatvec needs.
    Ready(PathBuf, HubOrigin),
    /// The Hub could not be reached (the caller may fall back to the cache).
    Unreachable(Error),
}

/// Makes sure the snapshot of `id` in `cache` holds every file chatvec
/// needs, downloading what is missing.
pub(crate) fn ensure(cache: &Path, id: &HubId) -> Result<Outcome> {
    let client = Client::new();
    let (commit, files) = match client.revision_info(id) {
        Err(e) if matches!(e.kind(), Error::Network(_)) => return Ok(Outcome::Unreachable(e)),
        r => r?,
    };
    let repo_dir = cache.join(id.cache_folder());
    let snap = repo_dir.join("snapshots").join(&commit);
    let need = needed(&client, id, &commit, &repo_dir, &files)?;
    let missing: Vec<&RemoteFile> = need.iter().filter(|f| !snap.join(&f.name).exists()).collect();
    if !missing.is_empty() {
        let total: u64 = missing.iter().map(|f| f.size).sum();
        crate::ui::note(&format!(
            "downloading {} file(s), {:.2} GB, of {}@{} ({commit}) into {}",
            missing.len(),
            total as f64 / 1e9,
            id.repo,
            id.revision.as_deref().unwrap_or("main"),
            cache.display()
        ));
        let bar = crate::ui::bytes_bar("downloading", total);
        fetch_all(&client, id, &commit, &repo_dir, &missing, &bar)?;
        bar.finish_and_clear();
    }
    // The side files the repository does not have, marked as huggingface_hub
    // marks a 404, so Python tools sharing the cache do not ask again.
    let no_exist = repo_dir.join(".no_exist").join(&commit);
    for name in SIDE_FILES.iter().filter(|n| !files.iter().any(|f| f.name == **n)) {
        let _ = std::fs::create_dir_all(&no_exist);
        let mark = no_exist.join(name);
        if matches!(regular_len(&mark), Ok(None)) {
            let _ = fresh_file(&mark);
        }
    }
    let revision = point_ref(&repo_dir, id, &commit)?;
    Ok(Outcome::Ready(snap, HubOrigin { repo: id.repo.clone(), revision, commit }))
}

/// Points the branch or tag `id` names at `commit`, as huggingface_hub
/// does, in one rename so a reader never sees half a ref; returns the
/// revision.
fn point_ref(repo_dir: &Path, id: &HubId, commit: &str) -> Result<String> {
    let revision = id.revision.clone().unwrap_or_else(|| "main".into());
    if revision != commit {
        let r = repo_dir.join("refs").join(&revision);
        if let Some(p) = r.parent() {
            std::fs::create_dir_all(p).map_err(|e| Error::io("creating", p, e))?;
        }
        let tmp = r.with_file_name(format!(
            ".{}.chatvec-{}",
            r.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            std::process::id()
        ));
        fresh_file(&tmp)?.write_all(commit.as_bytes()).map_err(|e| Error::io("writing", &tmp, e))?;
        std::fs::rename(&tmp, &r).map_err(|e| Error::io("renaming", &tmp, e))?;
    }
    Ok(revision)
}

/// Makes sure the snapshot of `id` (a model or a dataset) in `cache`
/// holds the file `name`, downloading and checking it when missing:
/// what a benchmark's questions need, without the rest of the repository.
/// `Ok(Outcome::Ready(file, origin))` gives the file's path.
pub(crate) fn ensure_file(cache: &Path, id: &HubId, name: &str) -> Result<Outcome> {
    let client = Client::new();
    let (commit, files) = match client.revision_info(id) {
        Err(e) if matches!(e.kind(), Error::Network(_)) => return Ok(Outcome::Unreachable(e)),
        r => r?,
    };
    let f = files.iter().find(|f| f.name == name).ok_or_else(|| {
        Error::Hub(format!(
            "{} @ {} has no file {name} (it has {})",
            id.repo,
            id.revision.as_deref().unwrap_or("main"),
            files.iter().map(|f| f.name.as_str()).take(12).collect::<Vec<_>>().join(", ")
        ))
    })?;
    let repo_dir = cache.join(id.cache_folder());
    let path = fetch(&client, id, &commit, &repo_dir, f, None)?;
    let revision = point_ref(&repo_dir, id, &commit)?;
    Ok(Outcome::Ready(path, HubOrigin { repo: id.repo.clone(), revision, commit }))
}

/// One file a prefetch would bring.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Prefetched {
    /// Its name in the repository.
    pub name: String,
    /// Its size in bytes, as the Hub lists it.
    pub size: u64,
    /// Whether the cache already had it.
    pub cached: bool,
}

/// `fnmatch`-style patterns as huggingface_hub's `allow_patterns` reads
/// them: `*` matches any run of characters (`/` too), `?` one, `[...]` a
/// class. `flag` names the option it came from, for the error.
pub(crate) fn pattern(flag: &str, p: &str) -> Result<regex::Regex> {
    let mut re = String::from("^");
    let mut chars = p.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => re.push_str(".*"),
            '?' => re.push('.'),
            '[' => {
                re.push('[');
                for d in chars.by_ref() {
                    if d == ']' {
                        break;
                    }
                    if d == '\\' {
                        re.push_str("\\\\");
                    } else {
                        re.push(d);
                    }
                }
                re.push(']');
            }
            other => re.push_str(&regex::escape(&other.to_string())),
        }
    }
    re.push('$');
    regex::Regex::new(&re).map_err(|e| Error::Usage(format!("{flag} {p}: {e}")))
}

/// Fills the cache with `id`'s files: what chatvec needs of it (as
/// `apply` would fetch), or the files matching `include`; with `dry_run`,
/// only lists them. Returns the commit and the files.
pub(crate) fn prefetch(
    cache: &Path,
    id: &HubId,
    include: &[String],
    dry_run: bool,
) -> Result<(String, Vec<Prefetched>)> {
    let client = Client::new();
    let (commit, files) = client.revision_info(id)?;
    let repo_dir = cache.join(id.cache_folder());
    let snap = repo_dir.join("snapshots").join(&commit);
    let chosen: Vec<RemoteFile> = if include.is_empty() {
        // The index must be read to know the shards; a dry run reads it
        // too (one small file), as huggingface_hub's listing would.
        needed(&client, id, &commit, &repo_dir, &files)?
    } else {
        let pats = include.iter().map(|p| pattern("--include", p)).collect::<Result<Vec<_>>>()?;
        files.iter().filter(|f| pats.iter().any(|p| p.is_match(&f.name))).cloned().collect()
    };
    if chosen.is_empty() {
        return Err(Error::Usage(format!(
            "{}@{}: no file matches --include {}",
            id.repo,
            id.revision.as_deref().unwrap_or("main"),
            include.join(" ")
        )));
    }
    let listed: Vec<Prefetched> = chosen
        .iter()
        .map(|f| Prefetched { name: f.name.clone(), size: f.size, cached: snap.join(&f.name).exists() })
        .collect();
    if !dry_run {
        let missing: Vec<&RemoteFile> = chosen.iter().filter(|f| !snap.join(&f.name).exists()).collect();
        if !missing.is_empty() {
            let bar = crate::ui::bytes_bar("downloading", missing.iter().map(|f| f.size).sum());
            fetch_all(&client, id, &commit, &repo_dir, &missing, &bar)?;
            bar.finish_and_clear();
        }
        point_ref(&repo_dir, id, &commit)?;
    }
    Ok((commit, listed))
}

/// Files downloaded at once: enough to fill a link whose single streams are
/// slow, few enough to stay polite to the Hub. Each holds a 1 MiB buffer.
const PARALLEL_FILES: usize = 4;

/// Downloads `files` with up to `PARALLEL_FILES` at once, largest first
/// (they dominate the time), into one progress bar; the first error stops
/// the others.
fn fetch_all(
    client: &Client,
    id: &HubId,
    commit: &str,
    repo_dir: &Path,
    files: &[&RemoteFile],
    bar: &ProgressBar,
) -> Result<()> {
    let mut order: Vec<&RemoteFile> = files.to_vec();
    order.sort_by(|a, b| b.size.cmp(&a.size).then(a.name.cmp(&b.name)));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let errors: std::sync::Mutex<Vec<Error>> = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..PARALLEL_FILES.min(order.len()) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= order.len() || failed.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Err(e) = fetch(client, id, commit, repo_dir, order[i], Some(bar)) {
                        failed.store(true, Ordering::SeqCst);
                        if let Ok(mut v) = errors.lock() {
                            v.push(e);
                        }
                        break;
                    }
                }
            });
        }
    });
    match errors.into_inner().ok().and_then(|mut v| (!v.is_empty()).then(|| v.remove(0))) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Puts a weight file's sha256, just verified over the bytes this process
/// wrote, into the input hash cache under the blob's current state, so the
/// first merge after a download does not hash the model again. The stamp is
/// taken after the rename (which changes the ctime); any later change to
/// the blob changes it again, and the entry is no longer used.
fn remember_hash(blob: &Path, f: &RemoteFile) {
    if let (Some(sha256), Ok(meta)) = (&f.sha256, std::fs::metadata(blob)) {
        HashCache::from_env(false).put(&FileStamp::of(&meta), &sha256.to_ascii_lowercase());
    }
}

/// Holds `cache/.locks/models--org--name/<blob>.lock` exclusively while a
/// blob is written, as huggingface_hub does, so chatvec and Python tools
/// sharing the cache never write one blob at once. Released on drop.
struct BlobLock {
    /// Closing it releases the lock.
    _file: File,
}

/// How long to wait for another process's lock on a blob while its
/// download makes no progress (`CHATVEC_LOCK_TIMEOUT` seconds overrides
/// the 10 minutes, for tests).
fn lock_patience() -> std::time::Duration {
    let secs = std::env::var("CHATVEC_LOCK_TIMEOUT").ok().and_then(|v| v.parse::<f64>().ok());
    std::time::Duration::from_secs_f64(secs.filter(|s| s.is_finite() && *s > 0.0).unwrap_or(600.0))
}

/// What shows another process's download of `blob_name` progressing: the
/// sizes and modification times of its temporary files.
fn progress_mark(blobs: &Path, blob_name: &str) -> Vec<Option<(u64, std::time::SystemTime)>> {
    [".incomplete", ".chatvec-ranges"]
        .iter()
        .map(|x| {
            let m = std::fs::symlink_metadata(blobs.join(format!("{blob_name}{x}"))).ok()?;
            Some((m.len(), m.modified().ok()?))
        })
        .collect()
}

impl BlobLock {
    /// Takes the lock, waiting while another process holds it: said after
    /// a second, answering Ctrl-C within a tenth of one, and given up once
    /// the other download has made no progress for `lock_patience()`.
    fn take(repo_dir: &Path, blob_name: &str) -> Result<BlobLock> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let cache = repo_dir.parent().unwrap_or(repo_dir);
        let folder = repo_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let dir = cache.join(".locks").join(folder);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
        let path = dir.join(format!("{blob_name}.lock"));
        regular_len(&path)?;
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| Error::io("opening", &path, e))?;
        let blobs = repo_dir.join("blobs");
        let start = std::time::Instant::now();
        let (mut said, mut mark, mut since) = (false, progress_mark(&blobs, blob_name), start);
        loop {
            // SAFETY: flock on a descriptor this function owns; with
            // LOCK_NB it never blocks, and it touches no memory.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(BlobLock { _file: f });
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(Error::io("locking", &path, e));
            }
            crate::interrupt::check()?;
            if !said && start.elapsed() > std::time::Duration::from_secs(1) {
                crate::ui::note(&format!(
                    "waiting for another process downloading {blob_name} into {} (it holds {})",
                    blobs.display(),
                    path.display()
                ));
                said = true;
            }
            let now = progress_mark(&blobs, blob_name);
            if now != mark {
                (mark, since) = (now, std::time::Instant::now());
            } else if since.elapsed() > lock_patience() {
                return Err(Error::Network(format!(
                    "another process has held {} for {:.0} s without its download of {blob_name} making progress",
                    path.display(),
                    since.elapsed().as_secs_f64()
                ))
                .with_hint("stop that process (or wait for it), then run the command again"));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// Largest safetensors header a probe fetches (real ones are well under
/// 1 MB; chatvec's own reader caps them at 100 MB).
const MAX_PROBE_HEADER: u64 = 100 << 20;

/// The directory for the probe of `repo` at `commit`, emptied, under the
/// private directory `probes` holds (made on first use; see `scratch`: a
/// killed run's is removed by the next).
fn probe_dir(probes: &Mutex<Option<Scratch>>, repo: &str, commit: &str) -> Result<PathBuf> {
    let mut held =
        probes.lock().map_err(|_| Error::Internal("the probe directory's lock is poisoned".into()))?;
    if held.is_none() {
        *held = Some(Scratch::create("probe")?);
    }
    let root = held.as_ref().map(|s| s.path().to_path_buf()).unwrap_or_default();
    let dir = root.join(repo.replace('/', "--")).join(commit);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
    Ok(dir)
}

/// A model directory to plan with before any weight is fetched: the small
/// files (config, tokenizer, index) downloaded into the cache as usual and
/// copied here, and each missing safetensors shard as a sparse file of its
/// real size holding only its header, fetched with two Range requests.
/// `Ok(None)` when the snapshot already has every file (the real one
/// serves), or the weights are PyTorch `.bin` files (a pickle cannot be
/// read in part).
pub(crate) fn probe(cache: &Path, id: &HubId, probes: &Mutex<Option<Scratch>>) -> Result<Option<Outcome>> {
    let client = Client::new();
    let (commit, files) = match client.revision_info(id) {
        Err(e) if matches!(e.kind(), Error::Network(_)) => return Ok(Some(Outcome::Unreachable(e))),
        r => r?,
    };
    let repo_dir = cache.join(id.cache_folder());
    let snap = repo_dir.join("snapshots").join(&commit);
    let need = needed(&client, id, &commit, &repo_dir, &files)?;
    let missing: Vec<&RemoteFile> = need.iter().filter(|f| !snap.join(&f.name).exists()).collect();
    let weights = |f: &RemoteFile| f.name.ends_with(".safetensors") || f.name.ends_with(".bin");
    if missing.is_empty() || missing.iter().any(|f| f.name.ends_with(".bin")) {
        return Ok(None);
    }
    let dir = probe_dir(probes, &id.repo, &commit)?;
    for f in &need {
        if f.name.contains('/') {
            continue;
        }
        let at = dir.join(&f.name);
        if !weights(f) {
            let cached = fetch(&client, id, &commit, &repo_dir, f, None)?;
            std::fs::copy(&cached, &at).map_err(|e| Error::io("copying", &cached, e))?;
            continue;
        }
        let url = client.resolve_url(id, &commit, &f.name);
        let head = client.get_bytes(id, &f.name, &url, 0, 7)?;
        let n = u64::from_le_bytes(head[..8].try_into().unwrap_or([0; 8]));
        if n == 0 || n > MAX_PROBE_HEADER || 8 + n > f.size {
            return Err(Error::Hub(format!(
                "{} of {}: a {n}-byte header does not fit a {}-byte file",
                f.name, id.repo, f.size
            )));
        }
        let header = client.get_bytes(id, &f.name, &url, 8, 8 + n - 1)?;
        let mut out = File::create(&at).map_err(|e| Error::io("creating", &at, e))?;
        out.write_all(&head)
            .and_then(|()| out.write_all(&header))
            .map_err(|e| Error::io("writing", &at, e))?;
        // The rest of the file, holes that read as zeros and take no disk.
        out.set_len(f.size).map_err(|e| Error::io("sizing", &at, e))?;
    }
    let revision = id.revision.clone().unwrap_or_else(|| "main".into());
    Ok(Some(Outcome::Ready(dir, HubOrigin { repo: id.repo.clone(), revision, commit })))
}

/// Downloads one file into `blobs/`, checks it, and links it into the
/// snapshot; returns the snapshot path (see `transfer` for how).
fn fetch(
    client: &Client,
    id: &HubId,
    commit: &str,
    repo_dir: &Path,
    f: &RemoteFile,
    bar: Option<&ProgressBar>,
) -> Result<PathBuf> {
    let link = repo_dir.join("snapshots").join(commit).join(&f.name);
    if link.exists() {
        return Ok(link);
    }
    let blob_name = f.blob_name().ok_or_else(|| {
        Error::Hub(format!("the Hub lists {} of {} without a hash to check it against", f.name, id.repo))
    })?;
    if !blob_name.bytes().all(|b| b.is_ascii_hexdigit())
        || f.name.split('/').any(|p| p.is_empty() || p == "..")
    {
        return Err(Error::Hub(format!("the Hub's entry for {} of {} is malformed", f.name, id.repo)));
    }
    let blobs = repo_dir.join("blobs");
    std::fs::create_dir_all(&blobs).map_err(|e| Error::io("creating", &blobs, e))?;
    let blob = blobs.join(blob_name);
    let mut fetched = false;
    if !blob.is_file() {
        // Another process may be writing this blob: wait for it, then look
        // again before downloading.
        let _lock = BlobLock::take(repo_dir, blob_name)?;
        if !blob.is_file() {
            let checked = download_verified(client, id, commit, f, &blobs, blob_name, bar)?;
            std::fs::rename(&checked, &blob).map_err(|e| Error::io("renaming", &checked, e))?;
            remember_hash(&blob, f);
            fetched = true;
        }
    }
    // The blob exists: a ranged download of it that stopped earlier (or
    // another tool finished) is of no use now, and nobody writes ranges of a
    // blob that exists (they are written under its lock, before it).
    for leftover in [".chatvec-ranges", ".chatvec-ranges.json"] {
        let p = blobs.join(format!("{blob_name}{leftover}"));
        if regular_len(&p)?.is_some() {
            let _ = std::fs::remove_file(&p);
        }
    }
    if !fetched && let Some(b) = bar {
        b.inc(f.size);
    }
    if let Some(p) = link.parent() {
        std::fs::create_dir_all(p).map_err(|e| Error::io("creating", p, e))?;
    }
    let depth = f.name.matches('/').count();
    let target = format!("{}../../blobs/{blob_name}", "../".repeat(depth));
    match std::os::unix::fs::symlink(&target, &link) {
        // Another process linked it first: the same blob.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        r => r.map_err(|e| Error::io("linking", &link, e))?,
    }
    Ok(link)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rf(name: &str) -> RemoteFile {
        RemoteFile { name: name.into(), size: 1, listed: true, sha256: None, blob_id: Some("ab".into()) }
    }

    #[test]
    fn include_patterns_read_as_fnmatch() {
        let p = pattern("--include", "*.safetensors").unwrap();
        assert!(p.is_match("model-00001-of-00002.safetensors") && p.is_match("sub/x.safetensors"));
        assert!(!p.is_match("model.safetensors.index.json"));
        let q = pattern("--include", "original/params.[jy]son").unwrap();
        assert!(q.is_match("original/params.json") && !q.is_match("original/params.xson"));
        assert!(pattern("--include", "config.json").unwrap().is_match("config.json"));
        assert!(!pattern("--include", "config.json").unwrap().is_match("configxjson"));
    }

    #[test]
    fn picks_the_index_shards_side_files_and_the_card_only() {
        let files: Vec<RemoteFile> = [
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "consolidated.safetensors",
            "config.json",
            "tokenizer.json",
            "README.md",
            "original/params.json",
        ]
        .iter()
        .map(|n| rf(n))
        .collect();
        let mut index = |_: &RemoteFile| {
            Ok(vec![
                "model-00001-of-00002.safetensors".to_string(),
                "model-00002-of-00002.safetensors".into(),
            ])
        };
        let got: Vec<String> = wanted(&files, &mut index).unwrap().into_iter().map(|f| f.name).collect();
        assert_eq!(
            got,
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json",
                "config.json",
                "tokenizer.json",
                "README.md"
            ]
        );
        let bin = vec![rf("pytorch_model.bin"), rf("config.json")];
        let got: Vec<String> = wanted(&bin, &mut index).unwrap().into_iter().map(|f| f.name).collect();
        assert_eq!(got, ["pytorch_model.bin", "config.json"]);
        assert!(wanted(&[rf("README.md")], &mut index).is_err());
    }
}
