//! The Hugging Face Hub's HTTP interface as chatvec uses it: the endpoint
//! (`HF_ENDPOINT`), the token (`HF_TOKEN` or the file `huggingface-cli
//! login` writes), offline mode, a revision's file list, and authenticated
//! (Range) GETs with errors that say what the Hub refused.

use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::resolve::hub_cache::{HubId, is_commit};

static OFFLINE: AtomicBool = AtomicBool::new(false);
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
pub(super) const MAX_INFO_BYTES: u64 = 64 << 20;

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
pub(super) struct RemoteFile {
    pub(super) name: String,
    pub(super) size: u64,
    /// sha256 of an LFS file.
    pub(super) sha256: Option<String>,
    /// The git blob id (sha1 of `blob <len>\0<bytes>`).
    pub(super) blob_id: Option<String>,
}

impl RemoteFile {
    /// The blob's name in the cache: the sha256 for LFS files, else the git
    /// blob id, as huggingface_hub names them.
    pub(super) fn blob_name(&self) -> Option<&str> {
        self.sha256.as_deref().or(self.blob_id.as_deref())
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

pub(super) struct Client {
    agent: ureq::Agent,
    endpoint: String,
    token: Option<String>,
}

pub(super) fn encode_path_part(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Client {
    pub(super) fn new() -> Client {
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

    /// Where a file of `id` at `commit` downloads from.
    pub(super) fn resolve_url(&self, id: &HubId, commit: &str, name: &str) -> String {
        format!("{}/{}/resolve/{commit}/{name}", self.endpoint, id.repo)
    }

    pub(super) fn get(&self, url: &str, range_from: u64) -> Result<ureq::http::Response<ureq::Body>> {
        self.get_range(url, (range_from > 0).then(|| format!("bytes={range_from}-")))
    }

    /// GET `url`, authenticated, with an optional `Range` header value.
    pub(super) fn get_range(
        &self,
        url: &str,
        range: Option<String>,
    ) -> Result<ureq::http::Response<ureq::Body>> {
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
    pub(super) fn get_bytes(&self, url: &str, from: u64, to: u64, cap: u64) -> Result<(u16, Vec<u8>)> {
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
    pub(super) fn status_error(&self, status: u16, id: &HubId, what: &str) -> Error {
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
            // Overloaded or rate-limited: worth a retry.
            s if s >= 500 || s == 429 => {
                Error::Network(format!("the Hub answered {status} for {what} {}@{rev}", id.repo))
            }
            _ => Error::Hub(format!("the Hub answered {status} for {what} {}@{rev}", id.repo)),
        }
    }

    /// The commit and files of a revision.
    pub(super) fn revision_info(&self, id: &HubId) -> Result<(String, Vec<RemoteFile>)> {
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
