//! The Hugging Face Hub's HTTP interface as chatvec uses it: the endpoint
//! (`HF_ENDPOINT`), the token (`HF_TOKEN` or the file `hf auth login`
//! writes), offline mode, a revision's file list, and authenticated
//! (Range) GETs with errors that say what the Hub refused.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::resolve::hub_cache::{HubId, RepoKind, is_commit};
use crate::resolve::stream::{BodyStream, Overlong, interruptible};

static OFFLINE: AtomicBool = AtomicBool::new(false);
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
pub(crate) const MAX_INFO_BYTES: u64 = 64 << 20;

/// The most bytes a file whose size the Hub does not list may bring: the
/// largest side file chatvec reads (`output::sidecars` caps them alike).
const UNLISTED_CAP: u64 = 256 << 20;

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
pub(crate) fn token() -> Option<String> {
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
pub(crate) struct RemoteFile {
    pub(crate) name: String,
    /// Its size in bytes, as listed (0 when not listed).
    pub(crate) size: u64,
    /// Whether the Hub listed its size.
    pub(crate) listed: bool,
    /// sha256 of an LFS file.
    pub(crate) sha256: Option<String>,
    /// The git blob id (sha1 of `blob <len>\0<bytes>`).
    pub(crate) blob_id: Option<String>,
}

impl RemoteFile {
    /// The blob's name in the cache: the sha256 for LFS files, else the git
    /// blob id, as huggingface_hub names them.
    pub(super) fn blob_name(&self) -> Option<&str> {
        self.sha256.as_deref().or(self.blob_id.as_deref())
    }

    /// The most bytes a download of it may bring: its listed size, else
    /// `UNLISTED_CAP`.
    pub(super) fn cap(&self) -> u64 {
        if self.listed { self.size } else { UNLISTED_CAP }
    }
}

/// How long one read from the Hub may wait for bytes: a connection that
/// stalls without closing then fails, and is retried where it stopped.
/// `HF_HUB_DOWNLOAD_TIMEOUT` (seconds), as for huggingface_hub, whose
/// default of 10 s this follows.
fn read_timeout() -> Duration {
    std::env::var("HF_HUB_DOWNLOAD_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(Duration::from_secs(10), Duration::from_secs_f64)
}

pub(crate) struct Client {
    agent: ureq::Agent,
    endpoint: String,
    token: Option<String>,
}

/// What a write request sends (see `Client::send`).
pub(crate) enum Payload {
    /// Bytes in memory, with their content type.
    Bytes(Vec<u8>, &'static str),
    /// `len` bytes of a file from `offset` on, read as they are sent;
    /// `sent` hears of every run of bytes read (a progress bar).
    Part { path: PathBuf, offset: u64, len: u64, sent: Progress },
}

/// Told of the bytes a request body has read.
pub(crate) type Progress = std::sync::Arc<dyn Fn(u64) + Send + Sync>;

/// A request body that tells its progress as it is read.
struct Counted<R> {
    inner: R,
    sent: Progress,
}

impl<R: std::io::Read> std::io::Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.sent)(n as u64);
        Ok(n)
    }
}

pub(crate) fn encode_path_part(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Tries per request: the first and five retries.
const ATTEMPTS: u32 = 6;

/// The wait before the first retry, doubled for each next one up to
/// `MAX_WAIT` (`CHATVEC_RETRY_WAIT_MS` overrides it, for tests). The judge
/// and published files retry with it too.
pub(crate) fn first_wait() -> Duration {
    let ms = std::env::var("CHATVEC_RETRY_WAIT_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    Duration::from_millis(ms)
}

const MAX_WAIT: Duration = Duration::from_secs(8);

/// The window in which a response body must make progress before it
/// counts as dropped (see `stream`): three read timeouts, at least 1 s.
fn stall_window() -> Duration {
    (read_timeout() * 3).max(Duration::from_secs(1))
}

/// A response from the Hub.
pub(crate) type Response = ureq::http::Response<ureq::Body>;

impl Client {
    pub(crate) fn new() -> Client {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(20)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_per_read(Some(read_timeout()))
            .user_agent(concat!("chatvec/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Client { agent, endpoint: endpoint(), token: token() }
    }

    /// The Hub's base URL (`HF_ENDPOINT`, without a trailing slash).
    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Whether a token was found (`HF_TOKEN` or `hf auth login`'s file).
    pub(crate) fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Whether the token may travel to `url`: only to the Hub's own
    /// endpoint, never to the storage URLs it hands out for large files
    /// (a presigned URL carries its own grant, and a token sent there
    /// would leak it to a third party).
    fn trusted(&self, url: &str) -> bool {
        url.strip_prefix(self.endpoint.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    /// Sends a `POST` or `PUT` (`method`) of `payload` to `url` with
    /// `headers`; the token goes along only to the Hub's own endpoint, and
    /// never with file bytes (storage URLs carry their own grant).
    /// Ctrl-C is answered while it waits; a connection that fails is a
    /// `Network` error, so `with_retries` tries again.
    pub(crate) fn send(
        &self,
        method: &'static str,
        url: &str,
        headers: &[(String, String)],
        payload: Payload,
    ) -> Result<Response> {
        // File bytes go to storage and never carry the token, wherever it is.
        let token = self.token.clone().filter(|_| self.trusted(url) && matches!(payload, Payload::Bytes(..)));
        let (agent, target, headers) = (self.agent.clone(), url.to_string(), headers.to_vec());
        let answer = interruptible(move || -> std::result::Result<Response, ureq::Error> {
            let mut req = match method {
                "PUT" => agent.put(&target),
                _ => agent.post(&target),
            };
            if let Some(t) = &token {
                req = req.header("Authorization", &format!("Bearer {t}"));
            }
            for (k, v) in &headers {
                req = req.header(k.as_str(), v.as_str());
            }
            match payload {
                Payload::Bytes(bytes, kind) => req.header("Content-Type", kind).send(&bytes[..]),
                Payload::Part { path, offset, len, sent } => {
                    use std::io::{Read, Seek};
                    let mut f = std::fs::File::open(&path)?;
                    f.seek(std::io::SeekFrom::Start(offset))?;
                    let body = Counted { inner: f.take(len), sent };
                    req.header("Content-Length", &len.to_string())
                        .send(ureq::SendBody::from_owned_reader(body))
                }
            }
        })?;
        answer.map_err(|e| Error::Network(format!("{method} {url}: {e}")))
    }

    /// Where a file of `id` at `commit` downloads from.
    pub(super) fn resolve_url(&self, id: &HubId, commit: &str, name: &str) -> String {
        format!("{}/{}/resolve/{commit}/{name}", self.endpoint, id.url_path())
    }

    pub(crate) fn get(&self, url: &str, range_from: u64) -> Result<Response> {
        self.get_range(url, (range_from > 0).then(|| format!("bytes={range_from}-")))
    }

    /// GET `url`, authenticated, with an optional `Range` header value;
    /// Ctrl-C is answered while it waits.
    pub(super) fn get_range(&self, url: &str, range: Option<String>) -> Result<Response> {
        let (agent, token, target) = (self.agent.clone(), self.token.clone(), url.to_string());
        let answer = interruptible(move || {
            let mut req = agent.get(&target);
            if let Some(t) = &token {
                req = req.header("Authorization", &format!("Bearer {t}"));
            }
            if let Some(r) = &range {
                req = req.header("Range", r);
            }
            req.call()
        })?;
        answer.map_err(|e| {
            Error::Network(format!("cannot reach the Hugging Face Hub at {url}: {e}")).with_hint(
                "check the network, or pass --offline (HF_HUB_OFFLINE=1) to use only the local cache",
            )
        })
    }

    /// `resp`'s body, read as it arrives: at most `cap` bytes (see
    /// `Overlong` for more), a stall or trickle counting as a dropped
    /// connection (see `stream`).
    pub(super) fn body(
        &self,
        resp: Response,
        cap: u64,
        overlong: Overlong,
        what: String,
    ) -> Result<BodyStream> {
        let reader = resp.into_body().into_with_config().limit(u64::MAX).reader();
        BodyStream::start(reader, cap, overlong, stall_window(), what)
    }

    /// `resp`'s body as JSON (at most `MAX_INFO_BYTES`); `what` names the
    /// request in errors.
    pub(crate) fn read_json(&self, resp: Response, what: &str) -> Result<Value> {
        let bytes = self.read_info(resp, what)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::Hub(format!("{what}: the Hub's answer is not JSON: {e}")))
    }

    /// `resp`'s body, at most `MAX_INFO_BYTES`.
    pub(crate) fn read_info(&self, resp: Response, what: &str) -> Result<Vec<u8>> {
        self.body(resp, MAX_INFO_BYTES, Overlong::Refused, format!("reading the answer to {what}"))?
            .read_all()
    }

    /// Runs `attempt` until it succeeds or fails for good: network errors
    /// (a dropped connection, a stall, a 5xx or 429) are retried after a
    /// wait, up to `ATTEMPTS` tries, said through `say`. Every request to
    /// the Hub goes through here, so one policy holds for all.
    pub(crate) fn with_retries<T>(
        &self,
        say: &dyn Fn(&str),
        mut attempt: impl FnMut() -> Result<T>,
    ) -> Result<T> {
        let mut wait = first_wait();
        let mut tries = 0;
        loop {
            tries += 1;
            match attempt() {
                Err(e) if tries < ATTEMPTS && matches!(e.kind(), Error::Network(_)) => {
                    say(&format!(
                        "{e}; retrying in {:.1} s (retry {tries} of {})",
                        wait.as_secs_f64(),
                        ATTEMPTS - 1
                    ));
                    let until = std::time::Instant::now() + wait;
                    while std::time::Instant::now() < until {
                        crate::interrupt::check()?;
                        std::thread::sleep(Duration::from_millis(20).min(wait));
                    }
                    wait = (wait * 2).min(MAX_WAIT);
                }
                r => return r,
            }
        }
    }

    /// Bytes `from..=to` of file `name` of `id` at `url`, by a Range
    /// request the server must honour, retried as any request is.
    pub(super) fn get_bytes(&self, id: &HubId, name: &str, url: &str, from: u64, to: u64) -> Result<Vec<u8>> {
        let want = to - from + 1;
        self.with_retries(&|m| crate::ui::warn(m), || {
            let resp = self.get_range(url, Some(format!("bytes={from}-{to}")))?;
            let status = resp.status().as_u16();
            if status != 206 {
                return Err(match status {
                    200 => Error::Hub(format!(
                        "{name} of {}: the server did not answer a Range request (200)",
                        id.repo
                    )),
                    _ => self.status_error(&resp, id, &format!("file {name} of")),
                });
            }
            let body = self
                .body(resp, want, Overlong::Cut, format!("reading bytes {from}-{to} of {url}"))?
                .read_all()?;
            if body.len() as u64 != want {
                return Err(Error::Network(format!(
                    "{name} of {}: a Range request for {want} bytes returned {}",
                    id.repo,
                    body.len()
                )));
            }
            Ok(body)
        })
    }

    /// Maps an HTTP error answer to a clear error about `id`, with what the
    /// Hub said about it (its `X-Error-Message`).
    pub(crate) fn status_error(&self, resp: &Response, id: &HubId, what: &str) -> Error {
        let status = resp.status().as_u16();
        let header = |k: &str| {
            resp.headers().get(k).and_then(|v| v.to_str().ok()).map(|v| crate::ui::escaped(v.trim(), 300))
        };
        let said = header("x-error-message").map(|m| format!(": the Hub says \"{m}\"")).unwrap_or_default();
        let missing = header("x-error-code")
            .is_some_and(|c| c == "RepoNotFound" || c == "RevisionNotFound" || c == "EntryNotFound");
        let rev = id.revision.as_deref().unwrap_or("main");
        let page = format!("{}/{}", self.endpoint, id.url_path());
        match status {
            404 => Error::NotFound(format!("the Hub has no {what} {}@{rev}{said}", id.repo)),
            // The Hub answers 401 for a repository it will not show to
            // this caller: missing, or private to someone else.
            401 if missing => Error::NotFound(format!(
                "the Hub has no {what} {}@{rev}, or it is private{said}",
                id.repo
            ))
            .with_hint(match self.token {
                None => "for a private repository, set HF_TOKEN or run `hf auth login`",
                Some(_) => "for a private repository, use a token of an account that can read it",
            }),
            401 => match self.token {
                None => Error::Hub(format!("the Hub asks for a token to read {} (401){said}", id.repo))
                    .with_hint(format!(
                        "accept its terms at {page} while logged in, then set HF_TOKEN or run `hf auth login`"
                    )),
                Some(_) => Error::Hub(format!("the Hub did not accept the token for {} (401){said}", id.repo))
                    .with_hint("check it with `hf auth whoami`; HF_TOKEN overrides the token `hf auth login` stored"),
            },
            403 => Error::Hub(format!(
                "the Hub refused {} access to {} (403){said}",
                if self.token.is_some() { "your token" } else { "anonymous" },
                id.repo
            ))
            .with_hint(format!(
                "request access at {page} with the token's account and wait for approval; a fine-grained token also needs read access to gated repositories"
            )),
            // Overloaded or rate-limited: worth a retry.
            s if s >= 500 || s == 429 => {
                Error::Network(format!("the Hub answered {status} for {what} {}@{rev}{said}", id.repo))
            }
            _ => Error::Hub(format!("the Hub answered {status} for {what} {}@{rev}{said}", id.repo)),
        }
    }

    /// The commit and files of a revision, retried as any request is.
    pub(crate) fn revision_info(&self, id: &HubId) -> Result<(String, Vec<RemoteFile>)> {
        let rev = id.revision.as_deref().unwrap_or("main");
        let url = format!(
            "{}/api/{}s/{}/revision/{}?blobs=true",
            self.endpoint,
            if id.kind == RepoKind::Dataset { "dataset" } else { "model" },
            id.repo,
            encode_path_part(rev)
        );
        let bytes = self.with_retries(&|m| crate::ui::warn(m), || {
            let resp = self.get(&url, 0)?;
            if resp.status().as_u16() != 200 {
                return Err(self.status_error(
                    &resp,
                    id,
                    if id.kind == RepoKind::Dataset { "dataset" } else { "model" },
                ));
            }
            self.body(resp, MAX_INFO_BYTES, Overlong::Refused, format!("reading {url}"))?.read_all()
        })?;
        parse_revision_info(&url, &bytes)
    }
}

/// The commit and files in the Hub's answer about a revision (from `url`).
pub(crate) fn parse_revision_info(url: &str, bytes: &[u8]) -> Result<(String, Vec<RemoteFile>)> {
    let bad = |m: &str| Error::Hub(format!("{url}: unexpected answer: {m}"));
    let v: Value = serde_json::from_slice(bytes).map_err(|e| bad(&e.to_string()))?;
    let commit =
        v.get("sha").and_then(Value::as_str).filter(|s| is_commit(s)).ok_or_else(|| bad("no commit sha"))?;
    let files = v
        .get("siblings")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no file list"))?
        .iter()
        .filter_map(|s| {
            let name = s.get("rfilename")?.as_str()?.to_string();
            let sha256 = s.pointer("/lfs/sha256").and_then(Value::as_str).map(str::to_string);
            let size = s.pointer("/lfs/size").or_else(|| s.get("size")).and_then(Value::as_u64);
            let blob_id = s.get("blobId").and_then(Value::as_str).map(str::to_string);
            Some(RemoteFile { name, size: size.unwrap_or(0), listed: size.is_some(), sha256, blob_id })
        })
        .collect();
    Ok((commit.to_string(), files))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A revision with a slash (a pull request's ref) is one path part.
    #[test]
    fn revisions_are_encoded_as_one_path_part() {
        assert_eq!(encode_path_part("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(encode_path_part("v1.0-rc_2~x"), "v1.0-rc_2~x");
    }
}
