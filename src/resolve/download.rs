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
//! (or the token file `huggingface-cli login` writes) authenticates;
//! `HF_ENDPOINT` points at a mirror.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use indicatif::ProgressBar;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::hash::hex;
use crate::model::SIDE_FILES;
use crate::model::adapter::{ADAPTER_BIN, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::model::checkpoint::HubOrigin;
use crate::resolve::hub_cache::{HubId, is_commit};

static OFFLINE: AtomicBool = AtomicBool::new(false);
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
const MAX_INFO_BYTES: u64 = 64 << 20;

/// Never use the network (`--offline`): Hub models must already be in the
/// cache. `HF_HUB_OFFLINE=1` does the same.
pub fn set_offline() {
    OFFLINE.store(true, Ordering::Relaxed);
}

/// Whether the network is off (`--offline` or `HF_HUB_OFFLINE`).
pub(crate) fn offline() -> bool {
    OFFLINE.load(Ordering::Relaxed)
        || std::env::var("HF_HUB_OFFLINE")
            .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

fn endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .unwrap_or(DEFAULT_ENDPOINT.into())
        .trim_end_matches('/')
        .to_string()
}

/// The user's token: `HF_TOKEN`, else the file `HF_TOKEN_PATH` or
/// `$HF_HOME/token` (default `~/.cache/huggingface/token`).
fn token() -> Option<String> {
    if let Ok(t) = std::env::var("HF_TOKEN")
        && !t.trim().is_empty()
    {
        return Some(t.trim().to_string());
    }
    let path = std::env::var_os("HF_TOKEN_PATH").map(PathBuf::from).or_else(|| {
        let home = std::env::var_os("HF_HOME").map(PathBuf::from).or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("huggingface"))
        })?;
        Some(home.join("token"))
    })?;
    let bytes = crate::json::read_capped(&path, 4096).ok()?;
    Some(String::from_utf8_lossy(&bytes).trim().to_string()).filter(|t| !t.is_empty())
}

/// One file of a revision, as the Hub lists it.
#[derive(Clone, Debug)]
struct RemoteFile {
    name: String,
    size: u64,
    /// sha256 of an LFS file.
    sha256: Option<String>,
    /// The git blob id (sha1 of `blob <len>\0<bytes>`).
    blob_id: Option<String>,
}

impl RemoteFile {
    /// The blob's name in the cache: the sha256 for LFS files, else the git
    /// blob id, as huggingface_hub names them.
    fn blob_name(&self) -> Option<&str> {
        self.sha256.as_deref().or(self.blob_id.as_deref())
    }
}

struct Client {
    agent: ureq::Agent,
    endpoint: String,
    token: Option<String>,
}

fn encode_path_part(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Client {
    fn new() -> Client {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(20)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .user_agent(concat!("chatvec/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Client { agent, endpoint: endpoint(), token: token() }
    }

    fn get(&self, url: &str, range_from: u64) -> Result<ureq::http::Response<ureq::Body>> {
        self.get_range(url, (range_from > 0).then(|| format!("bytes={range_from}-")))
    }

    /// GET `url`, authenticated, with an optional `Range` header value.
    fn get_range(&self, url: &str, range: Option<String>) -> Result<ureq::http::Response<ureq::Body>> {
        let mut req = self.agent.get(url);
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        if let Some(r) = &range {
            req = req.header("Range", r);
        }
        req.call().map_err(|e| {
            Error::Network(format!("cannot reach the Hugging Face Hub at {url}: {e}")).with_hint(
                "check the network, or pass --offline (HF_HUB_OFFLINE=1) to use only the local cache",
            )
        })
    }

    /// Bytes `from..=to` of `url` (a Range request the server must honour).
    fn get_bytes(&self, url: &str, from: u64, to: u64, cap: u64) -> Result<(u16, Vec<u8>)> {
        let mut resp = self.get_range(url, Some(format!("bytes={from}-{to}")))?;
        let status = resp.status().as_u16();
        let mut body = Vec::new();
        resp.body_mut()
            .with_config()
            .limit(cap)
            .reader()
            .take(cap)
            .read_to_end(&mut body)
            .map_err(|e| Error::Network(format!("reading {url}: {e}")))?;
        Ok((status, body))
    }

    /// Maps an HTTP error status to a clear error about `id`.
    fn status_error(&self, status: u16, id: &HubId, what: &str) -> Error {
        let rev = id.revision.as_deref().unwrap_or("main");
        match status {
            401 | 403 => Error::Hub(format!(
                "the Hub refused access to {} ({status}); it may be gated or private",
                id.repo
            ))
            .with_hint(format!(
                "accept its license at {}/{} and set HF_TOKEN (or run `huggingface-cli login`)",
                self.endpoint, id.repo
            )),
            404 => Error::Hub(format!("the Hub has no {what} {}@{rev}", id.repo)),
            s if s >= 500 => {
                Error::Network(format!("the Hub answered {status} for {what} {}@{rev}", id.repo))
            }
            _ => Error::Hub(format!("the Hub answered {status} for {what} {}@{rev}", id.repo)),
        }
    }

    /// The commit and files of a revision.
    fn revision_info(&self, id: &HubId) -> Result<(String, Vec<RemoteFile>)> {
        let rev = id.revision.as_deref().unwrap_or("main");
        let url =
            format!("{}/api/models/{}/revision/{}?blobs=true", self.endpoint, id.repo, encode_path_part(rev));
        let mut resp = self.get(&url, 0)?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(self.status_error(status, id, "model"));
        }
        let text = resp
            .body_mut()
            .with_config()
            .limit(MAX_INFO_BYTES)
            .read_to_string()
            .map_err(|e| Error::Network(format!("reading {url}: {e}")))?;
        let bad = |m: &str| Error::Hub(format!("{url}: unexpected answer: {m}"));
        let v: Value = serde_json::from_str(&text).map_err(|e| bad(&e.to_string()))?;
        let commit = v
            .get("sha")
            .and_then(Value::as_str)
            .filter(|s| is_commit(s))
            .ok_or_else(|| bad("no commit sha"))?;
        let files = v
            .get("siblings")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no file list"))?
            .iter()
            .filter_map(|s| {
                let name = s.get("rfilename")?.as_str()?.to_string();
                let sha256 = s.pointer("/lfs/sha256").and_then(Value::as_str).map(str::to_string);
                let size =
                    s.pointer("/lfs/size").or_else(|| s.get("size")).and_then(Value::as_u64).unwrap_or(0);
                let blob_id = s.get("blobId").and_then(Value::as_str).map(str::to_string);
                Some(RemoteFile { name, size, sha256, blob_id })
            })
            .collect();
        Ok((commit.to_string(), files))
    }
}

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
    let repo_dir = cache.join(format!("models--{}", id.repo.replace('/', "--")));
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
        let _ = OpenOptions::new().create(true).truncate(false).write(true).open(no_exist.join(name));
    }
    // Point the branch or tag at this commit, as huggingface_hub does, in one
    // rename so a reader never sees half a ref.
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
        std::fs::write(&tmp, &commit).map_err(|e| Error::io("writing", &tmp, e))?;
        std::fs::rename(&tmp, &r).map_err(|e| Error::io("renaming", &tmp, e))?;
    }
    Ok(Outcome::Ready(snap, HubOrigin { repo: id.repo.clone(), revision, commit }))
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

/// Holds `cache/.locks/models--org--name/<blob>.lock` exclusively while a
/// blob is written, as huggingface_hub does, so chatvec and Python tools
/// sharing the cache never write one blob at once. Released on drop.
struct BlobLock {
    /// Closing it releases the lock.
    _file: File,
}

impl BlobLock {
    fn take(repo_dir: &Path, blob_name: &str) -> Result<BlobLock> {
        let cache = repo_dir.parent().unwrap_or(repo_dir);
        let folder = repo_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let dir = cache.join(".locks").join(folder);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
        let path = dir.join(format!("{blob_name}.lock"));
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("opening", &path, e))?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this function owns; it blocks until
        // the lock is ours and touches no memory.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(Error::io("locking", &path, std::io::Error::last_os_error()));
        }
        Ok(BlobLock { _file: f })
    }
}

/// Largest safetensors header a probe fetches (real ones are well under
/// 1 MB; chatvec's own reader caps them at 100 MB).
const MAX_PROBE_HEADER: u64 = 100 << 20;

/// The directory probes of this process go under (removed by
/// `remove_probes`).
pub(crate) fn probe_root() -> PathBuf {
    std::env::temp_dir().join(format!("chatvec-probe-{}", std::process::id()))
}

/// Removes this process's probes.
pub(crate) fn remove_probes() {
    let _ = std::fs::remove_dir_all(probe_root());
}

/// A model directory to plan with before any weight is fetched: the small
/// files (config, tokenizer, index) downloaded into the cache as usual and
/// copied here, and each missing safetensors shard as a sparse file of its
/// real size holding only its header, fetched with two Range requests.
/// `Ok(None)` when the snapshot already has every file (the real one
/// serves), or the weights are PyTorch `.bin` files (a pickle cannot be
/// read in part).
pub(crate) fn probe(cache: &Path, id: &HubId) -> Result<Option<Outcome>> {
    let client = Client::new();
    let (commit, files) = match client.revision_info(id) {
        Err(e) if matches!(e.kind(), Error::Network(_)) => return Ok(Some(Outcome::Unreachable(e))),
        r => r?,
    };
    let repo_dir = cache.join(format!("models--{}", id.repo.replace('/', "--")));
    let snap = repo_dir.join("snapshots").join(&commit);
    let need = needed(&client, id, &commit, &repo_dir, &files)?;
    let missing: Vec<&RemoteFile> = need.iter().filter(|f| !snap.join(&f.name).exists()).collect();
    let weights = |f: &RemoteFile| f.name.ends_with(".safetensors") || f.name.ends_with(".bin");
    if missing.is_empty() || missing.iter().any(|f| f.name.ends_with(".bin")) {
        return Ok(None);
    }
    let dir = probe_root().join(id.repo.replace('/', "--")).join(&commit);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
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
        let url = format!("{}/{}/resolve/{commit}/{}", client.endpoint, id.repo, f.name);
        let bad = |m: String| Error::Hub(format!("{} of {}: {m}", f.name, id.repo));
        let (status, head) = client.get_bytes(&url, 0, 7, 8)?;
        if status != 206 && status != 200 {
            return Err(client.status_error(status, id, &format!("file {} of", f.name)));
        }
        if status != 206 || head.len() != 8 {
            return Err(bad(format!("the server did not answer a Range request ({status})")));
        }
        let n = u64::from_le_bytes(head[..8].try_into().unwrap_or([0; 8]));
        if n == 0 || n > MAX_PROBE_HEADER || 8 + n > f.size {
            return Err(bad(format!("a {n}-byte header does not fit a {}-byte file", f.size)));
        }
        let (status, header) = client.get_bytes(&url, 8, 8 + n - 1, n)?;
        if status != 206 || header.len() as u64 != n {
            return Err(bad(format!(
                "the header's Range request returned {} bytes ({status})",
                header.len()
            )));
        }
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
/// snapshot; returns the snapshot path. Resumes a `.incomplete` blob.
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
    if !blob.is_file() {
        // Another process may be writing this blob: wait for it, then look
        // again before downloading.
        let _lock = BlobLock::take(repo_dir, blob_name)?;
        if !blob.is_file() {
            let part = blobs.join(format!("{blob_name}.incomplete"));
            if f.size >= range_min() && !part.exists() {
                download_ranges(client, id, commit, f, &part, bar)?;
            } else {
                download(client, id, commit, f, &part, bar)?;
            }
            check(f, &part)?;
            std::fs::rename(&part, &blob).map_err(|e| Error::io("renaming", &part, e))?;
        } else if let Some(b) = bar {
            b.inc(f.size);
        }
    } else if let Some(b) = bar {
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

/// Files at least this large download as `RANGES` parallel ranges
/// (`CHATVEC_RANGE_MIN` bytes overrides it, for tests).
fn range_min() -> u64 {
    std::env::var("CHATVEC_RANGE_MIN").ok().and_then(|v| v.parse().ok()).unwrap_or(64 << 20)
}

/// Parallel ranges per large file.
const RANGES: u64 = 4;

/// Downloads a large file as `RANGES` byte ranges at once, each into its
/// own `<part>.rangeK` file (resumed from its own length, so a broken
/// transfer loses nothing), then joins them into `part` (a kernel-side
/// copy). The range files' names are chatvec's own, so a Python tool
/// sharing the cache never takes one for its `.incomplete`.
fn download_ranges(
    client: &Client,
    id: &HubId,
    commit: &str,
    f: &RemoteFile,
    part: &Path,
    bar: Option<&ProgressBar>,
) -> Result<()> {
    let url = format!("{}/{}/resolve/{commit}/{}", client.endpoint, id.repo, f.name);
    let step = f.size.div_ceil(RANGES);
    let ranges: Vec<(PathBuf, u64, u64)> = (0..RANGES)
        .map(|k| (k * step, ((k + 1) * step).min(f.size)))
        .filter(|(a, b)| a < b)
        .enumerate()
        .map(|(k, (a, b))| (part.with_extension(format!("incomplete.range{k}")), a, b))
        .collect();
    let errors: std::sync::Mutex<Vec<Error>> = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for (path, from, to) in &ranges {
            let (errors, url) = (&errors, url.as_str());
            s.spawn(move || {
                if let Err(e) = download_range(client, id, f, url, path, *from, *to, bar)
                    && let Ok(mut v) = errors.lock()
                {
                    v.push(e);
                }
            });
        }
    });
    if let Some(e) = errors.into_inner().ok().and_then(|mut v| (!v.is_empty()).then(|| v.remove(0))) {
        return Err(e);
    }
    let mut out = File::create(part).map_err(|e| Error::io("creating", part, e))?;
    for (path, _, _) in &ranges {
        let mut r = File::open(path).map_err(|e| Error::io("opening", path, e))?;
        std::io::copy(&mut r, &mut out).map_err(|e| Error::io("joining", path, e))?;
    }
    out.sync_all().map_err(|e| Error::io("syncing", part, e))?;
    for (path, _, _) in &ranges {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Bytes `from..to` of `f` into `path`, continuing after what `path` holds.
#[allow(clippy::too_many_arguments)]
fn download_range(
    client: &Client,
    id: &HubId,
    f: &RemoteFile,
    url: &str,
    path: &Path,
    from: u64,
    to: u64,
    bar: Option<&ProgressBar>,
) -> Result<()> {
    let have = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0).min(to - from);
    if let Some(b) = bar {
        b.inc(have);
    }
    if from + have >= to {
        return Ok(());
    }
    let mut resp = client.get_range(url, Some(format!("bytes={}-{}", from + have, to - 1)))?;
    match resp.status().as_u16() {
        206 => {}
        s if s >= 400 => return Err(client.status_error(s, id, &format!("file {} of", f.name))),
        s => {
            return Err(Error::Network(format!(
                "download of {} from {url}: the server answered a range request with {s}",
                f.name
            ))
            .with_hint("run the command again to resume where it stopped"));
        }
    }
    let mut out =
        OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io("opening", path, e))?;
    let reader = resp.body_mut().with_config().limit(u64::MAX).reader().take(to - from - have);
    let got = have + stream(reader, &mut out, path, &f.name, url, bar)?;
    if got != to - from {
        return Err(Error::Network(format!(
            "download of {} from {url} broke off after {got} of {} bytes of a range",
            f.name,
            to - from
        ))
        .with_hint("run the command again to resume where it stopped"));
    }
    out.sync_all().map_err(|e| Error::io("syncing", path, e))
}

/// Streams `f` into `part`, continuing after the bytes already there.
fn download(
    client: &Client,
    id: &HubId,
    commit: &str,
    f: &RemoteFile,
    part: &Path,
    bar: Option<&ProgressBar>,
) -> Result<()> {
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let url = format!("{}/{}/resolve/{commit}/{}", client.endpoint, id.repo, f.name);
    let mut resp = client.get(&url, have)?;
    let status = resp.status().as_u16();
    let (mut out, start) = match status {
        206 => (OpenOptions::new().append(true).open(part).map_err(|e| Error::io("opening", part, e))?, have),
        200 => (File::create(part).map_err(|e| Error::io("creating", part, e))?, 0),
        // Asked to resume a file that is already whole.
        416 if have == f.size => return Ok(()),
        s => return Err(client.status_error(s, id, &format!("file {} of", f.name))),
    };
    if let Some(b) = bar {
        b.inc(start);
    }
    let reader = resp.body_mut().with_config().limit(u64::MAX).reader();
    stream(reader, &mut out, part, &f.name, &url, bar)?;
    out.sync_all().map_err(|e| Error::io("syncing", part, e))
}

/// Copies a response body into `out` (the file at `path`) through a 1 MiB
/// buffer, counting it on `bar` and stopping at an interrupt; returns the
/// bytes copied. A broken transfer is a network error saying it resumes.
fn stream(
    mut reader: impl Read,
    out: &mut File,
    path: &Path,
    name: &str,
    url: &str,
    bar: Option<&ProgressBar>,
) -> Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        crate::interrupt::check()?;
        let n = reader.read(&mut buf).map_err(|e| {
            Error::Network(format!("download of {name} from {url} broke off: {e}"))
                .with_hint("run the command again to resume where it stopped")
        })?;
        if n == 0 {
            return Ok(got);
        }
        out.write_all(&buf[..n]).map_err(|e| Error::io("writing", path, e))?;
        got += n as u64;
        if let Some(b) = bar {
            b.inc(n as u64);
        }
    }
}

/// Checks a downloaded file against the Hub's size and hash; a mismatch
/// deletes it (it cannot be resumed into a good file).
fn check(f: &RemoteFile, part: &Path) -> Result<()> {
    let mut file = File::open(part).map_err(|e| Error::io("opening", part, e))?;
    let len = file.metadata().map_err(|e| Error::io("reading", part, e))?.len();
    let mut sha256 = Sha256::new();
    let mut sha1 = sha1::Sha1::new();
    sha1.update(format!("blob {len}\0").as_bytes());
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io("reading", part, e))?;
        if n == 0 {
            break;
        }
        sha256.update(&buf[..n]);
        if f.sha256.is_none() {
            sha1.update(&buf[..n]);
        }
    }
    let (what, want, got) = match &f.sha256 {
        Some(want) => ("sha256", want.clone(), hex(&sha256.finalize())),
        None => ("git blob id", f.blob_id.clone().unwrap_or_default(), hex(&sha1.finalize())),
    };
    if (f.size != 0 && len != f.size) || !want.eq_ignore_ascii_case(&got) {
        let _ = std::fs::remove_file(part);
        return Err(Error::Network(format!(
            "downloaded {} is corrupt: {len} bytes with {what} {got}, the Hub lists {} bytes with {what} {want}; it was deleted",
            f.name, f.size
        ))
        .with_hint("run the command again to download it afresh"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rf(name: &str) -> RemoteFile {
        RemoteFile { name: name.into(), size: 1, sha256: None, blob_id: Some("ab".into()) }
    }

    #[test]
    fn picks_the_index_shards_and_side_files_only() {
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
                "tokenizer.json"
            ]
        );
        let bin = vec![rf("pytorch_model.bin"), rf("config.json")];
        let got: Vec<String> = wanted(&bin, &mut index).unwrap().into_iter().map(|f| f.name).collect();
        assert_eq!(got, ["pytorch_model.bin", "config.json"]);
        assert!(wanted(&[rf("README.md")], &mut index).is_err());
        assert_eq!(encode_path_part("refs/pr/1"), "refs%2Fpr%2F1");
    }
}
