//! The fake Hub's write side: the endpoints huggingface_hub's
//! `create_repo`, `create_branch`, `upload_folder` and chatvec's `push`
//! call, as the real Hub answers them: repository creation, branches,
//! preupload, the Git LFS batch API with basic and multipart transfers,
//! part uploads (storage URLs on this server that refuse a token), the
//! completion and verify requests, and NDJSON commits checked against
//! their parent. Faults: uploads of one object can be cut halfway, a
//! commit can fail after it landed.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;

use base64::Engine as _;
use serde_json::{Value, json};
use sha2::Digest;

use super::hub::{Repo, Shared, git_blob_id, is_lfs, respond};

/// What uploads wrote, and what the tests look at.
pub(crate) struct Store {
    /// Where created repositories live.
    root: tempfile::TempDir,
    /// Large-file storage: sha256 -> bytes.
    pub(crate) lfs: HashMap<String, Vec<u8>>,
    /// Multipart parts received: (oid, part number) -> bytes.
    parts: HashMap<(String, usize), Vec<u8>>,
    /// Body bytes received per object (parts and cut uploads included).
    pub(crate) received: HashMap<String, u64>,
    /// Uploads of an object to cut halfway, and how many are left.
    pub(crate) cut: HashMap<String, usize>,
    /// Storage requests that came with an `Authorization` header.
    pub(crate) leaked_tokens: usize,
    /// Objects larger than this go multipart, in parts this big.
    pub(crate) chunk: usize,
    /// Commits made.
    pub(crate) commits: usize,
    /// The next N commits answer 503 after they land.
    pub(crate) lost_answers: usize,
}

impl Store {
    pub(crate) fn new() -> Store {
        Store {
            root: tempfile::tempdir().unwrap(),
            lfs: HashMap::new(),
            parts: HashMap::new(),
            received: HashMap::new(),
            cut: HashMap::new(),
            leaked_tokens: 0,
            chunk: 64 << 10,
            commits: 0,
            lost_answers: 0,
        }
    }
}

/// A token this Hub takes for writes.
pub(crate) const WRITE_TOKEN: &str = "hf_writer";
/// A token it knows that may only read.
pub(crate) const READ_TOKEN: &str = "hf_reader";

const GITATTRIBUTES: &str =
    "*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n";

fn sha256_hex(b: &[u8]) -> String {
    sha2::Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// The request body: by Content-Length, or chunked; `cut_at` stops
/// reading after that many bytes (a connection about to drop).
fn body(r: &mut BufReader<TcpStream>, hdrs: &HashMap<String, String>, cut_at: Option<usize>) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(n) = hdrs.get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        let n = cut_at.map_or(n, |c| c.min(n));
        out.resize(n, 0);
        let _ = r.read_exact(&mut out);
        return out;
    }
    if hdrs.get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
            if n == 0 {
                let mut end = String::new();
                let _ = r.read_line(&mut end);
                break;
            }
            let mut chunk = vec![0; n];
            if r.read_exact(&mut chunk).is_err() {
                break;
            }
            out.extend_from_slice(&chunk);
            let mut crlf = [0u8; 2];
            let _ = r.read_exact(&mut crlf);
            if cut_at.is_some_and(|c| out.len() >= c) {
                break;
            }
        }
    }
    out
}

fn json_answer(s: &mut TcpStream, status: &str, v: Value) {
    respond(s, status, &["Content-Type: application/json".into()], v.to_string().as_bytes());
}

fn refuse(s: &mut TcpStream, status: &str, code: &str, message: &str) {
    respond(
        s,
        status,
        &[format!("X-Error-Code: {code}"), format!("X-Error-Message: {message}")],
        json!({"error": message}).to_string().as_bytes(),
    );
}

/// `org/name` from an API path after `/api/models/`, and the rest.
fn repo_and_rest(path: &str) -> (String, String) {
    let p = path.split('?').next().unwrap_or(path);
    let p = p.trim_start_matches("/api/models/");
    let parts: Vec<&str> = p.splitn(3, '/').collect();
    (parts[..2.min(parts.len())].join("/"), parts.get(2).unwrap_or(&"").to_string())
}

fn commit_id(parent: &str, body: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(parent.as_bytes());
    h.update(body);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn write(
    s: &mut TcpStream,
    r: &mut BufReader<TcpStream>,
    method: &str,
    path: &str,
    hdrs: &HashMap<String, String>,
    shared: &Shared,
) {
    let auth = hdrs.get("authorization").map(|a| a.trim_start_matches("Bearer ").to_string());
    let base = format!("http://127.0.0.1:{}", shared.port);
    // Storage: no token may come here.
    if let Some(rest) = path.strip_prefix("/storage/") {
        let mut store = shared.store.lock().unwrap();
        if auth.is_some() {
            store.leaked_tokens += 1;
            drop(store);
            let _ = body(r, hdrs, None);
            return refuse(s, "400 Bad Request", "InvalidArgument", "Only one auth mechanism allowed");
        }
        let parts: Vec<&str> = rest.split('/').collect();
        let oid = parts[1].to_string();
        let cut = store.cut.get(&oid).copied().unwrap_or(0) > 0;
        let len: usize = hdrs.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        if cut {
            *store.cut.get_mut(&oid).unwrap() -= 1;
        }
        drop(store);
        let bytes = body(r, hdrs, cut.then_some(len / 2));
        let mut store = shared.store.lock().unwrap();
        *store.received.entry(oid.clone()).or_default() += bytes.len() as u64;
        if cut {
            // Hang up halfway through the body.
            let _ = s.shutdown(std::net::Shutdown::Both);
            return;
        }
        match parts[0] {
            "put" => {
                if sha256_hex(&bytes) != oid {
                    return refuse(s, "400 Bad Request", "BadDigest", "content does not match oid");
                }
                store.lfs.insert(oid, bytes);
                respond(s, "200 OK", &[], b"");
            }
            _ => {
                let n: usize = parts[2].parse().unwrap();
                let etag = format!("\"{}\"", &sha256_hex(&bytes)[..32]);
                store.parts.insert((oid, n), bytes);
                respond(s, "200 OK", &[format!("ETag: {etag}")], b"");
            }
        }
        return;
    }
    let bytes = body(r, hdrs, None);
    // Signed URLs on the real Hub: no token needed.
    if let Some(oid) = path.strip_prefix("/lfs/complete/") {
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        let mut store = shared.store.lock().unwrap();
        let mut whole = Vec::new();
        for (i, p) in v["parts"].as_array().unwrap().iter().enumerate() {
            assert_eq!(p["partNumber"], i + 1);
            let Some(part) = store.parts.get(&(oid.to_string(), i + 1)) else {
                return refuse(s, "400 Bad Request", "", "missing part");
            };
            if p["etag"].as_str() != Some(&format!("\"{}\"", &sha256_hex(part)[..32])) {
                return refuse(s, "400 Bad Request", "", "etag mismatch");
            }
            whole.extend_from_slice(part);
        }
        if sha256_hex(&whole) != oid {
            return refuse(s, "400 Bad Request", "", "content does not match oid");
        }
        store.lfs.insert(oid.to_string(), whole);
        return json_answer(s, "200 OK", json!({}));
    }
    if let Some(oid) = path.strip_prefix("/lfs/verify/") {
        let store = shared.store.lock().unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        return match store.lfs.get(oid) {
            Some(b) if v["size"] == b.len() => json_answer(s, "200 OK", json!({})),
            _ => refuse(s, "404 Not Found", "", "object not found"),
        };
    }
    // Any user token writes (the README's `hf_...` too), but the one that
    // may only read.
    let writer = auth.as_deref().is_some_and(|a| a.starts_with("hf_") && a != READ_TOKEN);
    if !writer {
        return match auth.as_deref() {
            None => refuse(s, "401 Unauthorized", "", "Invalid credentials in Authorization header"),
            Some(_) => refuse(
                s,
                "403 Forbidden",
                "",
                "You don't have the rights to create a model under this namespace",
            ),
        };
    }
    if path == "/api/validate-yaml" {
        // The card's metadata: chatvec's cards are checked with
        // huggingface_hub's own parser in the card tests.
        return json_answer(s, "200 OK", json!({"errors": [], "warnings": []}));
    }
    if path == "/api/repos/create" {
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        let name =
            format!("{}/{}", v["organization"].as_str().unwrap_or("user"), v["name"].as_str().unwrap());
        let mut repos = shared.repos.lock().unwrap();
        if repos.contains_key(&name) {
            return refuse(s, "409 Conflict", "", "You already created this model repo");
        }
        let store = shared.store.lock().unwrap();
        let dir = store.root.path().join(name.replace('/', "--"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(".gitattributes"), GITATTRIBUTES).unwrap();
        let mut repo = Repo::new(&dir, super::hub::Fault::Healthy);
        repo.created = true;
        repo.private = v["private"].as_bool().unwrap_or(false) || v["visibility"] == "private";
        repo.commit = commit_id("", name.as_bytes());
        repos.insert(name.clone(), repo);
        return json_answer(s, "200 OK", json!({"url": format!("{base}/{name}")}));
    }
    if let Some(p) = path.strip_suffix(".git/info/lfs/objects/batch") {
        return batch(s, &bytes, p.trim_start_matches('/'), &base, shared);
    }
    let (name, rest) = repo_and_rest(path);
    let mut repos = shared.repos.lock().unwrap();
    let Some(repo) = repos.get_mut(&name) else {
        return refuse(s, "404 Not Found", "RepoNotFound", "Repository not found");
    };
    if let Some(branch) = rest.strip_prefix("branch/") {
        let branch = branch.replace("%2F", "/");
        if repo.branches.contains_key(&branch) || branch == "main" {
            return refuse(s, "409 Conflict", "", "Reference already exists");
        }
        let dir = repo.dir.with_file_name(format!(
            "{}@{}",
            repo.dir.file_name().unwrap().to_string_lossy(),
            branch.replace('/', "%")
        ));
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(&repo.dir).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        let commit = commit_id(&repo.commit, branch.as_bytes());
        repo.branches.insert(branch, (dir, commit));
        return json_answer(s, "200 OK", json!({}));
    }
    if rest.starts_with("preupload/") {
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        let rev = rest.trim_start_matches("preupload/").replace("%2F", "/");
        let (dir, _) = repo.at(&rev).unwrap_or((repo.dir.clone(), String::new()));
        let files: Vec<Value> = v["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                let p = f["path"].as_str().unwrap();
                let sample = base64::engine::general_purpose::STANDARD.decode(f["sample"].as_str().unwrap()).unwrap();
                let size = f["size"].as_u64().unwrap() as usize;
                let lfs = is_lfs(p, size, &sample);
                let oid = std::fs::read(dir.join(p)).ok().map(|b| if lfs { sha256_hex(&b) } else { git_blob_id(&b) });
                json!({"path": p, "uploadMode": if lfs { "lfs" } else { "regular" }, "shouldIgnore": false, "oid": oid})
            })
            .collect();
        return json_answer(s, "200 OK", json!({ "files": files }));
    }
    if let Some(rev) = rest.strip_prefix("commit/") {
        let rev = rev.replace("%2F", "/");
        let Some((dir, head)) = repo.at(&rev) else {
            return refuse(s, "404 Not Found", "RevisionNotFound", "Invalid rev id");
        };
        let mut store = shared.store.lock().unwrap();
        let lines: Vec<Value> = bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        let header = &lines[0];
        assert_eq!(header["key"], "header");
        if let Some(parent) = header["value"]["parentCommit"].as_str()
            && parent != head
        {
            return refuse(
                s,
                "412 Precondition Failed",
                "",
                "A commit has happened since. Please refresh and try again.",
            );
        }
        // Check every line before touching anything.
        let mut writes: Vec<(String, Option<Vec<u8>>)> = Vec::new();
        for l in &lines[1..] {
            let v = &l["value"];
            let p = v["path"].as_str().unwrap().to_string();
            assert!(!p.contains("..") && !p.starts_with('/'), "{p}");
            match l["key"].as_str().unwrap() {
                "file" => writes.push((
                    p,
                    Some(
                        base64::engine::general_purpose::STANDARD
                            .decode(v["content"].as_str().unwrap())
                            .unwrap(),
                    ),
                )),
                "lfsFile" => {
                    let Some(b) = store.lfs.get(v["oid"].as_str().unwrap()) else {
                        return refuse(
                            s,
                            "422 Unprocessable Entity",
                            "",
                            &format!("LFS object for {p} not found"),
                        );
                    };
                    writes.push((p, Some(b.clone())));
                }
                "deletedFile" => {
                    if !dir.join(&p).exists() {
                        return refuse(
                            s,
                            "404 Not Found",
                            "EntryNotFound",
                            "A file with this name doesn't exist",
                        );
                    }
                    writes.push((p, None));
                }
                k => panic!("unknown commit line {k}"),
            }
        }
        for (p, b) in writes {
            match b {
                Some(b) => std::fs::write(dir.join(&p), b).unwrap(),
                None => std::fs::remove_file(dir.join(&p)).unwrap(),
            }
        }
        let commit = commit_id(&head, &bytes);
        if rev == "main" || rev == repo.commit {
            repo.commit = commit.clone();
        } else {
            repo.branches.values_mut().find(|(_, c)| *c == head).unwrap().1 = commit.clone();
        }
        store.commits += 1;
        if store.lost_answers > 0 {
            store.lost_answers -= 1;
            let _ = s.shutdown(std::net::Shutdown::Both);
            return;
        }
        return json_answer(
            s,
            "200 OK",
            json!({"commitUrl": format!("{base}/{name}/commit/{commit}"), "commitOid": commit, "success": true}),
        );
    }
    refuse(s, "404 Not Found", "", &format!("no such endpoint {method} {path}"))
}

/// The LFS batch answer: no actions for stored objects; a basic `PUT` URL
/// for small ones, numbered part URLs and a completion URL for large ones;
/// a verify action for each.
fn batch(s: &mut TcpStream, bytes: &[u8], repo: &str, base: &str, shared: &Shared) {
    if !shared.repos.lock().unwrap().contains_key(repo) {
        return refuse(s, "404 Not Found", "RepoNotFound", "Repository not found");
    }
    let v: Value = serde_json::from_slice(bytes).unwrap();
    assert_eq!(v["operation"], "upload");
    let store = shared.store.lock().unwrap();
    let objects: Vec<Value> = v["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let (oid, size) = (o["oid"].as_str().unwrap().to_string(), o["size"].as_u64().unwrap() as usize);
            if store.lfs.contains_key(&oid) {
                return json!({"oid": oid, "size": size});
            }
            let verify = json!({"href": format!("{base}/lfs/verify/{oid}"), "header": {}});
            if size > store.chunk {
                let mut header = serde_json::Map::new();
                header.insert("chunk_size".into(), json!(store.chunk.to_string()));
                for n in 1..=size.div_ceil(store.chunk) {
                    header.insert(format!("{n:05}"), json!(format!("{base}/storage/part/{oid}/{n}")));
                }
                json!({"oid": oid, "size": size, "authenticated": true, "actions": {
                    "upload": {"href": format!("{base}/lfs/complete/{oid}"), "header": header}, "verify": verify}})
            } else {
                json!({"oid": oid, "size": size, "authenticated": true, "actions": {
                    "upload": {"href": format!("{base}/storage/put/{oid}"), "header": {"X-Amz-Test": "1"}}, "verify": verify}})
            }
        })
        .collect();
    json_answer(s, "200 OK", json!({"transfer": "basic", "objects": objects}))
}
