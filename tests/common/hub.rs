//! A fake Hugging Face Hub: a small HTTP server on 127.0.0.1 answering
//! the endpoints chatvec uses (revision info, file resolve, HEAD) for
//! model and dataset repositories, from directories the tests generate,
//! with the faults a long download meets. Nothing leaves the machine.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::json;
use sha2::Digest;

use super::hub_write::Store;
use super::*;

pub(crate) const COMMIT: &str = "c0ffee0123456789abcdef0123456789abcdef01";

/// How the server misbehaves for one repo.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Fault {
    /// None: every request is answered.
    Healthy,
    /// The first N requests for the largest file stop halfway through
    /// the bytes they promise (a dropped connection).
    Break(usize),
    /// The first N requests for the largest file send half the bytes they
    /// promise, then hold the connection open for 1.5 s.
    Stall(usize),
    /// The first N requests for the largest file answer 503.
    Unavailable(usize),
    /// The first N requests for the largest file that cover its byte 100
    /// serve it flipped (`usize::MAX`: always).
    Corrupt(usize),
    /// Needs `Authorization: Bearer secret`.
    Gated,
    /// Any token is refused with 403 and the Hub's `X-Error-Message`.
    Forbidden,
    /// The first N revision-info requests answer 503.
    InfoUnavailable(usize),
    /// `config.json` comes with 8 MiB more than the size listed for it.
    Oversize,
    /// The first N requests for the largest file trickle a byte every
    /// 50 ms (each read well within the read timeout) until the client
    /// hangs up.
    Trickle(usize),
    /// Range requests for the largest file are never answered (the
    /// connection is held for 20 s).
    Hang,
}

pub(crate) struct Hub {
    pub(crate) port: u16,
    pub(crate) log: Arc<Mutex<Vec<String>>>,
    pub(crate) repos: Arc<Mutex<HashMap<String, Repo>>>,
    /// What uploads wrote (see `hub_write`).
    pub(crate) store: Arc<Mutex<Store>>,
}

pub(crate) struct Repo {
    pub(crate) dir: PathBuf,
    pub(crate) fault: Fault,
    /// Requests the fault has spoiled so far.
    pub(crate) spoiled: usize,
    /// Body bytes served of weight (`.safetensors`) files.
    pub(crate) weight_bytes: u64,
    /// The head commit of its default branch.
    pub(crate) commit: String,
    /// Made by `/api/repos/create`: revisions are checked, branches kept.
    pub(crate) created: bool,
    /// Reads need a token.
    pub(crate) private: bool,
    /// Branches other than main: their folder and head commit.
    pub(crate) branches: HashMap<String, (PathBuf, String)>,
}

impl Repo {
    pub(crate) fn new(dir: &Path, fault: Fault) -> Repo {
        Repo {
            dir: dir.to_path_buf(),
            fault,
            spoiled: 0,
            weight_bytes: 0,
            commit: COMMIT.into(),
            created: false,
            private: false,
            branches: HashMap::new(),
        }
    }

    /// The folder and commit of revision `rev` (a branch or a head commit);
    /// a repository the tests gave serves any revision from its folder.
    pub(crate) fn at(&self, rev: &str) -> Option<(PathBuf, String)> {
        if !self.created || rev == "main" || rev == self.commit {
            return Some((self.dir.clone(), self.commit.clone()));
        }
        self.branches
            .iter()
            .find(|(b, (_, c))| b.as_str() == rev || c == rev)
            .map(|(_, (d, c))| (d.clone(), c.clone()))
    }
}

pub(crate) fn git_blob_id(bytes: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn largest(dir: &Path) -> String {
    let mut v: Vec<(u64, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.metadata().unwrap().len(), e.file_name().to_string_lossy().into_owned())
        })
        .collect();
    v.sort();
    v.pop().unwrap().1
}

/// Whether the Hub keeps a file in large-file storage: weights, anything
/// of 10 MiB or more, anything binary (a NUL in its first 512 bytes).
pub(crate) fn is_lfs(name: &str, size: usize, sample: &[u8]) -> bool {
    name.ends_with(".safetensors") || size >= 10 << 20 || sample.iter().take(512).any(|b| *b == 0)
}

pub(crate) fn info(dir: &Path) -> String {
    info_at(dir, COMMIT)
}

pub(crate) fn info_at(dir: &Path, commit: &str) -> String {
    let mut siblings = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let bytes = std::fs::read(&p).unwrap();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let mut s = json!({"rfilename": name, "size": bytes.len(), "blobId": git_blob_id(&bytes)});
        if is_lfs(&name, bytes.len(), &bytes) {
            s["lfs"] = json!({"sha256": sha256_file(&p), "size": bytes.len(), "pointerSize": 134});
        }
        siblings.push(s);
    }
    json!({"id": "x", "sha": commit, "siblings": siblings}).to_string()
}

pub(crate) fn respond(s: &mut TcpStream, status: &str, headers: &[String], body: &[u8]) {
    let mut h = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for x in headers {
        h.push_str(x);
        h.push_str("\r\n");
    }
    h.push_str("\r\n");
    let _ = s.write_all(h.as_bytes());
    let _ = s.write_all(body);
}

/// Everything a connection may touch.
pub(crate) struct Shared {
    pub(crate) repos: Arc<Mutex<HashMap<String, Repo>>>,
    pub(crate) log: Arc<Mutex<Vec<String>>>,
    pub(crate) store: Arc<Mutex<Store>>,
    pub(crate) port: u16,
}

/// The revision a read names: `/api/models/o/n/revision/REV`,
/// `/api/models/o/n/tree/REV`, `/o/n/resolve/REV/FILE`.
fn revision_in(path: &str) -> String {
    let path = path.split('?').next().unwrap_or(path);
    let parts: Vec<&str> = path.split('/').collect();
    for (i, p) in parts.iter().enumerate() {
        if matches!(*p, "revision" | "tree" | "resolve") && i + 1 < parts.len() {
            return parts[i + 1].replace("%2F", "/");
        }
    }
    "main".into()
}

pub(crate) fn serve(stream: &mut TcpStream, shared: &Shared) {
    let (repos, log) = (&*shared.repos, &*shared.log);
    let mut r = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let method = line.split_whitespace().next().unwrap_or("GET").to_string();
    let head_only = method == "HEAD";
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut hdrs = HashMap::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        if l.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            hdrs.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let range = hdrs.get("range").cloned();
    log.lock().unwrap().push(format!("{method} {path} {}", range.clone().unwrap_or_default()));
    if method == "POST" || method == "PUT" {
        return super::hub_write::write(stream, &mut r, &method, &path, &hdrs, shared);
    }
    let mut repos = repos.lock().unwrap();
    // Dataset repositories are served from the same table as models.
    let key = path
        .trim_start_matches("/api/models/")
        .trim_start_matches("/api/datasets/")
        .split('/')
        .take(2)
        .collect::<Vec<_>>()
        .join("/");
    let key2 = path
        .trim_start_matches('/')
        .trim_start_matches("datasets/")
        .split('/')
        .take(2)
        .collect::<Vec<_>>()
        .join("/");
    let not_found = |stream: &mut TcpStream, code: &str| {
        respond(
            stream,
            if code == "RepoNotFound" { "401 Unauthorized" } else { "404 Not Found" },
            &[format!("X-Error-Code: {code}"), format!("X-Error-Message: {code} for url: x.")],
            b"{}",
        )
    };
    let api = repos.contains_key(&key) && path.starts_with("/api/");
    let Some(repo) = repos.get_mut(if api { &key } else { &key2 }) else {
        // As the real Hub: a repository it will not show is a 401.
        return not_found(stream, "RepoNotFound");
    };
    if repo.private && !hdrs.contains_key("authorization") {
        return not_found(stream, "RepoNotFound");
    }
    let Some((dir, commit)) = repo.at(&revision_in(&path)) else {
        return not_found(stream, "RevisionNotFound");
    };
    if !api {
        if head_only {
            return file_head(stream, &dir, &commit, &path);
        }
        return file(stream, repo, &dir, &path, range, &hdrs);
    }
    if repo.fault == Fault::Gated && hdrs.get("authorization").map(String::as_str) != Some("Bearer secret") {
        return respond(stream, "401 Unauthorized", &[], b"{}");
    }
    if repo.fault == Fault::Forbidden {
        return respond(
            stream,
            "403 Forbidden",
            &[
                "X-Error-Code: GatedRepo".into(),
                "X-Error-Message: Access to model org/forbidden is restricted and you are not in the authorized list.".into(),
            ],
            b"{}",
        );
    }
    if let Fault::InfoUnavailable(n) = repo.fault
        && repo.spoiled < n
    {
        repo.spoiled += 1;
        return respond(stream, "503 Service Unavailable", &[], b"");
    }
    if path.contains("/tree/") {
        return respond(stream, "200 OK", &["Content-Type: application/json".into()], tree(&dir).as_bytes());
    }
    respond(stream, "200 OK", &["Content-Type: application/json".into()], info_at(&dir, &commit).as_bytes());
}

/// The file list `/api/models/REPO/tree/REV` gives (huggingface_hub's
/// snapshot_download asks for it).
pub(crate) fn tree(dir: &Path) -> String {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let bytes = std::fs::read(&p).unwrap();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let mut f = json!({"type": "file", "path": name, "size": bytes.len(), "oid": git_blob_id(&bytes)});
        if is_lfs(&name, bytes.len(), &bytes) {
            f["lfs"] = json!({"oid": sha256_file(&p), "size": bytes.len(), "pointerSize": 134});
        }
        out.push(f);
    }
    serde_json::Value::Array(out).to_string()
}

/// What huggingface_hub's client asks before a download: the commit, the
/// file's etag (its sha256 for LFS files, else its git blob id) and size.
pub(crate) fn file_head(s: &mut TcpStream, dir: &Path, commit: &str, path: &str) {
    let name = path.split('?').next().unwrap_or(path).rsplit('/').next().unwrap();
    let Ok(bytes) = std::fs::read(dir.join(name)) else {
        return respond(s, "404 Not Found", &[], b"");
    };
    let etag = if is_lfs(name, bytes.len(), &bytes) {
        sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
    } else {
        git_blob_id(&bytes)
    };
    let h = format!(
        "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\nX-Repo-Commit: {commit}\r\nETag: \"{etag}\"\r\nX-Linked-Etag: \"{etag}\"\r\nX-Linked-Size: {}\r\n\r\n",
        bytes.len(),
        bytes.len()
    );
    let _ = s.write_all(h.as_bytes());
}

pub(crate) fn file(
    s: &mut TcpStream,
    repo: &mut Repo,
    dir: &Path,
    path: &str,
    range: Option<String>,
    hdrs: &HashMap<String, String>,
) {
    if repo.fault == Fault::Gated && hdrs.get("authorization").map(String::as_str) != Some("Bearer secret") {
        return respond(s, "401 Unauthorized", &[], b"");
    }
    let name = path.split('?').next().unwrap_or(path).rsplit('/').next().unwrap();
    let Ok(mut bytes) = std::fs::read(dir.join(name)) else {
        return respond(s, "404 Not Found", &[], b"");
    };
    let big = name == largest(dir);
    // `bytes=FROM-` or `bytes=FROM-TO` (TO inclusive).
    let (from, to): (usize, Option<usize>) = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .map(|(a, b)| (a.parse().unwrap_or(0), b.parse().ok()))
        .unwrap_or((0, None));
    let end = to.map_or(bytes.len() - 1, |t| t.min(bytes.len() - 1));
    let mut spoil = |limit: usize, applies: bool| {
        let hit = big && applies && repo.spoiled < limit;
        repo.spoiled += usize::from(hit);
        hit
    };
    let (mut cut, mut flip, mut stall) = (false, false, false);
    if repo.fault == Fault::Oversize && name == "config.json" {
        // The length it promises and sends is far past the listed size.
        let mut body = bytes.clone();
        body.resize(bytes.len() + (8 << 20), b' ');
        return respond(s, "200 OK", &[], &body);
    }
    if repo.fault == Fault::Hang && big && range.is_some() {
        std::thread::sleep(std::time::Duration::from_secs(20));
        return;
    }
    if let Fault::Trickle(n) = repo.fault
        && spoil(n, true)
    {
        let body = &bytes[from..=end];
        let h = format!("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len());
        let _ = s.write_all(h.as_bytes());
        let start = std::time::Instant::now();
        for b in body.iter().take(400) {
            if s.write_all(&[*b]).is_err() || start.elapsed() > std::time::Duration::from_secs(20) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        return;
    }
    match repo.fault {
        Fault::Stall(n) => (cut, stall) = (spoil(n, true), true),
        Fault::Unavailable(n) if spoil(n, true) => return respond(s, "503 Service Unavailable", &[], b""),
        Fault::Break(n) => cut = spoil(n, true),
        Fault::Corrupt(n) => flip = spoil(n, from <= 100 && 100 <= end),
        _ => {}
    }
    if flip {
        bytes[100] ^= 0xff;
    }
    let (status, headers) = if range.is_some() {
        ("206 Partial Content", vec![format!("Content-Range: bytes {from}-{end}/{}", bytes.len())])
    } else {
        ("200 OK", vec![])
    };
    let body = &bytes[from..=end];
    if cut {
        // Promise the whole body, send half, hang up.
        let mut h = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
        for x in &headers {
            h.push_str(x);
            h.push_str("\r\n");
        }
        h.push_str("\r\n");
        let _ = s.write_all(h.as_bytes());
        let _ = s.write_all(&body[..body.len() / 2]);
        if stall {
            let _ = s.flush();
            std::thread::sleep(std::time::Duration::from_millis(1500));
        }
        repo.weight_bytes += (body.len() / 2) as u64 * u64::from(name.ends_with(".safetensors"));
        return;
    }
    repo.weight_bytes += body.len() as u64 * u64::from(name.ends_with(".safetensors"));
    respond(s, status, &headers, body);
}

impl Hub {
    pub(crate) fn start(repos: Vec<(&str, &Path, Fault)>) -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let map: HashMap<String, Repo> =
            repos.into_iter().map(|(n, d, f)| (n.to_string(), Repo::new(d, f))).collect();
        let repos = Arc::new(Mutex::new(map));
        let log = Arc::new(Mutex::new(Vec::new()));
        let store = Arc::new(Mutex::new(Store::new()));
        let shared = Shared { repos: repos.clone(), log: log.clone(), store: store.clone(), port };
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let mut s = s.unwrap();
                serve(&mut s, &shared);
                let mut sink = Vec::new();
                let _ = s.set_read_timeout(Some(std::time::Duration::from_millis(1)));
                let _ = s.read_to_end(&mut sink);
            }
        });
        Hub { port, log, repos, store }
    }

    /// From now on `repo` misbehaves as `fault` says, counted afresh.
    pub(crate) fn set_fault(&self, repo: &str, fault: Fault) {
        let mut repos = self.repos.lock().unwrap();
        let r = repos.get_mut(repo).unwrap();
        r.fault = fault;
        r.spoiled = 0;
    }

    /// Body bytes of weight files served so far, over every repo.
    pub(crate) fn weight_bytes(&self) -> u64 {
        self.repos.lock().unwrap().values().map(|r| r.weight_bytes).sum()
    }

    /// The bytes served for `name`, by the Range requests logged from
    /// `since` on (each `bytes=A-B` counts B - A + 1).
    pub(crate) fn ranged_bytes(&self, name: &str, since: usize) -> u64 {
        let log = self.log.lock().unwrap();
        log[since..]
            .iter()
            .filter(|l| l.contains(name))
            .filter_map(|l| {
                l.split("bytes=").nth(1)?.trim().split_once('-').map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .map(|(a, b)| b.parse::<u64>().unwrap() + 1 - a.parse::<u64>().unwrap())
            .sum()
    }

    /// chatvec with this Hub as its endpoint and `cache` as its cache.
    pub(crate) fn command(&self, cache: &Path) -> std::process::Command {
        let mut c = command();
        c.env("HF_ENDPOINT", format!("http://127.0.0.1:{}", self.port))
            .env("HF_HUB_CACHE", cache)
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HF_TOKEN")
            .env("HF_HOME", cache.join("no-home"))
            // Retries wait 1 ms, 2 ms, ... instead of half a second and up.
            .env("CHATVEC_RETRY_WAIT_MS", "1");
        c
    }

    pub(crate) fn run(&self, cache: &Path, args: &[&str]) -> std::process::Output {
        self.command(cache).args(args).output().unwrap()
    }
}
