//! A Hugging Face Hub stand-in on 127.0.0.1 for `bench --download`: it
//! serves one model directory through the endpoints chatvec and
//! huggingface_hub use (revision info, tree listing, file HEAD and resolve
//! with Range requests), a thread per
//! connection so parallel files and ranges really run in parallel. The
//! bench times chatvec's download from it: the network is loopback, so a
//! healthy run's figure is chatvec's own overhead (writing, hashing). A
//! `Fault` makes it behave like a real link that drops connections, is
//! slow per connection, or serves a corrupt range once.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chatvec::{Error, Result, hex};
use sha2::Digest;

/// The commit every file is served at.
pub(super) const COMMIT: &str = "b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0";

/// What the stand-in says about `dir`'s files, computed once.
struct Listing {
    /// The revision-info JSON: every file with its size, git blob id, and
    /// for safetensors files the sha256 the Hub lists for LFS files.
    info: String,
    /// The same as `/api/models/REPO/tree/REV` lists it (huggingface_hub's
    /// snapshot_download asks for it).
    tree: String,
    /// Per file, the ETag a HEAD request gets (sha256 for LFS files, else
    /// the git blob id) and the size.
    etags: HashMap<String, (String, u64)>,
}

fn list(dir: &Path) -> Result<Listing> {
    let mut siblings = Vec::new();
    let mut tree = Vec::new();
    let mut etags = HashMap::new();
    let rd = std::fs::read_dir(dir).map_err(|e| Error::Io {
        op: "listing",
        path: dir.to_path_buf(),
        source: e,
    })?;
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if !p.is_file() || name.starts_with('.') {
            continue;
        }
        let mut f =
            std::fs::File::open(&p).map_err(|e| Error::Io { op: "opening", path: p.clone(), source: e })?;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let (mut s1, mut s2) = (sha1::Sha1::new(), sha2::Sha256::new());
        s1.update(format!("blob {len}\0").as_bytes());
        let mut buf = vec![0u8; 8 << 20];
        loop {
            let n = f.read(&mut buf).map_err(|e| Error::Io { op: "reading", path: p.clone(), source: e })?;
            if n == 0 {
                break;
            }
            s1.update(&buf[..n]);
            s2.update(&buf[..n]);
        }
        let (blob_id, sha256) = (hex(&s1.finalize()), hex(&s2.finalize()));
        let mut s = serde_json::json!({"rfilename": name, "size": len, "blobId": blob_id});
        let mut t = serde_json::json!({"type": "file", "path": name, "size": len, "oid": blob_id});
        let lfs = name.ends_with(".safetensors");
        if lfs {
            s["lfs"] = serde_json::json!({"sha256": sha256, "size": len, "pointerSize": 134});
            t["lfs"] = serde_json::json!({"oid": sha256, "size": len, "pointerSize": 134});
        }
        etags.insert(name, (if lfs { sha256 } else { blob_id }, len));
        siblings.push(s);
        tree.push(t);
    }
    Ok(Listing {
        info: serde_json::json!({"id": "bench/model", "sha": COMMIT, "siblings": siblings}).to_string(),
        tree: serde_json::Value::Array(tree).to_string(),
        etags,
    })
}

/// How the stand-in misbehaves while serving weight (`.safetensors`)
/// files.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Fault {
    Healthy,
    /// Each connection is cut after this many body bytes.
    DropAfter(u64),
    /// Each connection sends at most this many bytes per second.
    Slow(u64),
    /// The first response covering byte 4096 of a shard has it flipped.
    CorruptOnce,
}

fn head(s: &mut TcpStream, status: &str, len: u64, extra: &str) {
    let _ = write!(s, "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {len}\r\n{extra}\r\n");
}

/// Sends `n` bytes of `f` from its position, as `fault` allows; `flip`
/// (an offset into them) is sent inverted.
fn send_body(f: &mut std::fs::File, s: &mut TcpStream, n: u64, fault: Fault, flip: Option<u64>) {
    let mut buf = vec![0u8; 64 << 10];
    let (start, mut sent) = (Instant::now(), 0u64);
    let limit = match fault {
        Fault::DropAfter(after) => n.min(after),
        _ => n,
    };
    while sent < limit {
        let want = (limit - sent).min(buf.len() as u64) as usize;
        let Ok(got) = f.read(&mut buf[..want]) else { return };
        if got == 0 {
            return;
        }
        if let Some(at) = flip.filter(|at| (sent..sent + got as u64).contains(at)) {
            buf[(at - sent) as usize] ^= 0xff;
        }
        if s.write_all(&buf[..got]).is_err() {
            return;
        }
        sent += got as u64;
        if let Fault::Slow(rate) = fault {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
}

fn serve(mut s: TcpStream, dir: &Path, listing: &Listing, fault: Fault, flipped: &AtomicBool) {
    let mut r = BufReader::new(match s.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let head_only = line.starts_with("HEAD ");
    let target = line.split_whitespace().nth(1).unwrap_or("/");
    let path = target.split('?').next().unwrap_or(target).to_string();
    let mut hdrs = HashMap::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).is_err() || l.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            hdrs.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    if path.starts_with("/api/models/") {
        let body = if path.contains("/tree/") { &listing.tree } else { &listing.info };
        head(&mut s, "200 OK", body.len() as u64, "Content-Type: application/json\r\n");
        let _ = s.write_all(body.as_bytes());
        return;
    }
    let name = path.rsplit('/').next().unwrap_or("");
    if head_only {
        // What huggingface_hub asks before a download: commit, ETag, size.
        match listing.etags.get(name) {
            Some((etag, len)) => head(
                &mut s,
                "200 OK",
                *len,
                &format!(
                    "X-Repo-Commit: {COMMIT}\r\nETag: \"{etag}\"\r\nX-Linked-Etag: \"{etag}\"\r\nX-Linked-Size: {len}\r\n"
                ),
            ),
            None => head(&mut s, "404 Not Found", 0, ""),
        }
        return;
    }
    let file = dir.join(name);
    let Ok(mut f) = std::fs::File::open(&file) else {
        head(&mut s, "404 Not Found", 0, "");
        return;
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let range = hdrs.get("range").and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.split_once('-'));
    let (from, to) = match range {
        Some((a, b)) => {
            (a.parse().unwrap_or(0), b.parse().unwrap_or(len.saturating_sub(1)).min(len.saturating_sub(1)))
        }
        None => (0, len.saturating_sub(1)),
    };
    let n = if len == 0 { 0 } else { to + 1 - from };
    if range.is_some() {
        head(&mut s, "206 Partial Content", n, &format!("Content-Range: bytes {from}-{to}/{len}\r\n"));
    } else {
        head(&mut s, "200 OK", n, "");
    }
    let weights = name.ends_with(".safetensors");
    let fault = if weights { fault } else { Fault::Healthy };
    const FLIP_AT: u64 = 4096;
    let flip = (fault == Fault::CorruptOnce
        && (from..=to).contains(&FLIP_AT)
        && !flipped.swap(true, Ordering::SeqCst))
    .then_some(FLIP_AT - from);
    if f.seek(SeekFrom::Start(from)).is_ok() {
        send_body(&mut f, &mut s, n, fault, flip);
    }
}

/// A running stand-in serving `dir` with `fault`; its port.
pub(super) fn start(dir: &Path, fault: Fault) -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| Error::Io {
        op: "listening on",
        path: PathBuf::from("127.0.0.1"),
        source: e,
    })?;
    let port = listener
        .local_addr()
        .map_err(|e| Error::Io { op: "listening on", path: PathBuf::from("127.0.0.1"), source: e })?
        .port();
    let listing = Arc::new(list(dir)?);
    let dir = Arc::new(dir.to_path_buf());
    let flipped = Arc::new(AtomicBool::new(false));
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let (dir, listing, flipped) = (dir.clone(), listing.clone(), flipped.clone());
            std::thread::spawn(move || serve(s, &dir, &listing, fault, &flipped));
        }
    });
    Ok(port)
}
