//! The Hub's repository API as `push` uses it, the endpoints huggingface_hub
//! calls for `create_repo`, `create_branch` and `create_commit`: what a
//! revision holds now, repository and branch creation, `preupload` (which
//! files go to large-file storage) and the commit itself, sent as NDJSON
//! with the parent commit so that a push never silently overwrites a
//! commit made since it looked.

use base64::Engine as _;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::resolve::hub_api::{Client, Payload, RemoteFile, Response, encode_path_part, parse_revision_info};
use crate::resolve::hub_cache::HubId;

/// How the Hub stores a file: in git, or in large-file storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Regular,
    Lfs,
}

impl Mode {
    /// As the Hub names it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Regular => "regular",
            Mode::Lfs => "lfs",
        }
    }
}

/// What a repository's revision holds now.
pub(crate) enum State {
    /// No such repository (or one this token may not see).
    NoRepo,
    /// The repository exists, the branch does not.
    NoBranch,
    /// The branch's head commit and its files.
    At(String, Vec<RemoteFile>),
}

/// One line of a commit.
pub(crate) enum Op {
    /// A small file, sent inline.
    File {
        path: String,
        bytes: Vec<u8>,
    },
    /// A file already in large-file storage, named by its sha256.
    Lfs {
        path: String,
        sha256: String,
        size: u64,
    },
    Delete {
        path: String,
    },
}

/// The Hub as `push` writes to it: one repository, one branch.
pub(crate) struct Remote {
    pub(crate) client: Client,
    pub(crate) id: HubId,
    pub(crate) branch: String,
}

/// How many files one preupload request asks about (huggingface_hub's
/// chunk).
const PREUPLOAD_CHUNK: usize = 256;

impl Remote {
    pub(crate) fn new(repo: &str, branch: &str) -> Remote {
        let id =
            HubId { repo: repo.to_string(), revision: Some(branch.to_string()), kind: Default::default() };
        Remote { client: Client::new(), id, branch: branch.to_string() }
    }

    fn api(&self, tail: &str) -> String {
        format!("{}/api/models/{}/{tail}", self.client.endpoint(), self.id.repo)
    }

    /// The repository's page.
    pub(crate) fn page(&self) -> String {
        format!("{}/{}", self.client.endpoint(), self.id.repo)
    }

    fn say(m: &str) {
        crate::ui::warn(m);
    }

    /// A POST of JSON to the Hub, retried as every Hub request is; the
    /// answer is returned whatever its status, for the caller to judge.
    fn post_json(&self, url: &str, body: &Value, headers: &[(String, String)]) -> Result<Response> {
        self.client.with_retries(&Self::say, || {
            let resp = self.client.send(
                "POST",
                url,
                headers,
                Payload::Bytes(body.to_string().into_bytes(), "application/json"),
            )?;
            retry_on_busy(resp, url)
        })
    }

    /// What the branch holds now.
    pub(crate) fn state(&self) -> Result<State> {
        let url = self.api(&format!("revision/{}?blobs=true", encode_path_part(&self.branch)));
        self.client.with_retries(&Self::say, || {
            let resp = retry_on_busy(self.client.get(&url, 0)?, &url)?;
            let code = header(&resp, "x-error-code");
            match resp.status().as_u16() {
                200 => {
                    let bytes = self.client.read_info(resp, &url)?;
                    let (commit, files) = parse_revision_info(&url, &bytes)?;
                    Ok(State::At(commit, files))
                }
                404 | 401 if code.as_deref() == Some("RepoNotFound") => Ok(State::NoRepo),
                404 if code.as_deref() == Some("RevisionNotFound") => Ok(State::NoBranch),
                _ => Err(self.client.status_error(&resp, &self.id, "model")),
            }
        })
    }

    /// Creates the repository (private when asked); one that exists
    /// already is fine.
    pub(crate) fn create_repo(&self, private: bool) -> Result<()> {
        let (org, name) = match self.id.repo.split_once('/') {
            Some((o, n)) => (Some(o), n),
            None => (None, self.id.repo.as_str()),
        };
        let url = format!("{}/api/repos/create", self.client.endpoint());
        let body = json!({"name": name, "organization": org, "type": "model", "private": private,
            "visibility": if private { "private" } else { "public" }});
        let resp = self.post_json(&url, &body, &[])?;
        match resp.status().as_u16() {
            200 | 201 | 409 => Ok(()),
            _ => Err(write_error(&resp, &self.client, &self.id, "create the repository")),
        }
    }

    /// Creates the branch from the default branch's head.
    pub(crate) fn create_branch(&self) -> Result<()> {
        let url = self.api(&format!("branch/{}", encode_path_part(&self.branch)));
        let resp = self.post_json(&url, &json!({}), &[])?;
        match resp.status().as_u16() {
            200 | 201 | 409 => Ok(()),
            _ => Err(write_error(&resp, &self.client, &self.id, &format!("create branch {}", self.branch))),
        }
    }

    /// How the Hub will store each of `files` (name, size, first 512
    /// bytes): in git or in large-file storage. A file the repository's
    /// `.gitignore` excludes is an error: the model would arrive without it.
    pub(crate) fn preupload(&self, files: &[(String, u64, Vec<u8>)]) -> Result<Vec<Mode>> {
        let url = self.api(&format!("preupload/{}", encode_path_part(&self.branch)));
        let mut modes = Vec::with_capacity(files.len());
        for chunk in files.chunks(PREUPLOAD_CHUNK) {
            let list: Vec<Value> = chunk
                .iter()
                .map(|(path, size, sample)| {
                    json!({"path": path, "size": size,
                        "sample": base64::engine::general_purpose::STANDARD.encode(sample)})
                })
                .collect();
            let resp = self.post_json(&url, &json!({ "files": list }), &[])?;
            if resp.status().as_u16() != 200 {
                return Err(write_error(&resp, &self.client, &self.id, "prepare the upload"));
            }
            let answer = self.client.read_json(resp, &url)?;
            for (path, size, _) in chunk {
                let said = answer
                    .get("files")
                    .and_then(Value::as_array)
                    .and_then(|a| {
                        a.iter().find(|f| f.get("path").and_then(Value::as_str) == Some(path.as_str()))
                    })
                    .ok_or_else(|| Error::Hub(format!("{url}: the answer says nothing about {path}")))?;
                if said.get("shouldIgnore").and_then(Value::as_bool) == Some(true) {
                    return Err(Error::Hub(format!(
                        "{path}: the .gitignore of {} excludes it, so the pushed model would lack it",
                        self.id.repo
                    ))
                    .with_hint("edit the repository's .gitignore on the Hub, then push again"));
                }
                // Empty files cannot go to large-file storage (as
                // huggingface_hub does).
                modes.push(match said.get("uploadMode").and_then(Value::as_str) {
                    Some("lfs") if *size > 0 => Mode::Lfs,
                    Some("lfs" | "regular") => Mode::Regular,
                    other => {
                        return Err(Error::Hub(format!("{url}: unknown upload mode {other:?} for {path}")));
                    }
                });
            }
        }
        Ok(modes)
    }

    /// Commits `ops` on the branch on top of `parent`; returns the new
    /// commit and its URL. A commit is retried like any request: a retry
    /// whose first try did land answers 412 (the branch moved), and
    /// `landed` says whether the branch now holds what was pushed.
    pub(crate) fn commit(
        &self,
        summary: &str,
        description: &str,
        parent: &str,
        ops: &[Op],
        landed: &dyn Fn() -> Result<Option<String>>,
    ) -> Result<(String, String)> {
        let mut ndjson = Vec::new();
        let mut line = |v: Value| {
            ndjson.extend_from_slice(v.to_string().as_bytes());
            ndjson.push(b'\n');
        };
        line(
            json!({"key": "header", "value": {"summary": summary, "description": description, "parentCommit": parent}}),
        );
        for op in ops {
            line(match op {
                Op::File { path, bytes } => json!({"key": "file", "value": {
                    "content": base64::engine::general_purpose::STANDARD.encode(bytes),
                    "path": path, "encoding": "base64"}}),
                Op::Lfs { path, sha256, size } => {
                    json!({"key": "lfsFile", "value": {"path": path, "algo": "sha256", "oid": sha256, "size": size}})
                }
                Op::Delete { path } => json!({"key": "deletedFile", "value": {"path": path}}),
            });
        }
        let url = self.api(&format!("commit/{}", encode_path_part(&self.branch)));
        let mut tries = 0;
        let resp = self.client.with_retries(&Self::say, || {
            tries += 1;
            let resp = self.client.send(
                "POST",
                &url,
                &[],
                Payload::Bytes(ndjson.clone(), "application/x-ndjson"),
            )?;
            retry_on_busy(resp, &url)
        })?;
        let status = resp.status().as_u16();
        if status == 412
            && tries > 1
            && let Some(commit) = landed()?
        {
            return Ok((commit.clone(), format!("{}/commit/{commit}", self.page())));
        }
        if status == 412 {
            return Err(Error::Hub(format!(
                "{}@{} changed while this push ran (its head is no longer {parent}); nothing was committed",
                self.id.repo, self.branch
            ))
            .with_hint("push again: files already uploaded are not sent twice"));
        }
        if status != 200 && status != 201 {
            return Err(write_error(&resp, &self.client, &self.id, "commit"));
        }
        let answer = self.client.read_json(resp, &url)?;
        let commit = answer
            .get("commitOid")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::Hub(format!("{url}: the answer names no commit")))?
            .to_string();
        let link = answer
            .get("commitUrl")
            .and_then(Value::as_str)
            .map_or_else(|| format!("{}/commit/{commit}", self.page()), str::to_string);
        Ok((commit, link))
    }
}

/// A header of `resp`, as text.
pub(crate) fn header(resp: &Response, key: &str) -> Option<String> {
    resp.headers().get(key).and_then(|v| v.to_str().ok()).map(|v| v.trim().to_string())
}

/// A 5xx or 429 answer becomes a `Network` error so that it is retried;
/// any other answer goes back to the caller.
pub(crate) fn retry_on_busy(resp: Response, url: &str) -> Result<Response> {
    let status = resp.status().as_u16();
    if status >= 500 || status == 429 {
        return Err(Error::Network(format!("the Hub answered {status} for {url}")));
    }
    Ok(resp)
}

/// A refused write, said as one: a token without write access, a
/// repository that does not exist, or what the Hub says.
pub(crate) fn write_error(resp: &Response, client: &Client, id: &HubId, what: &str) -> Error {
    let status = resp.status().as_u16();
    let said = header(resp, "x-error-message")
        .map(|m| format!(": the Hub says \"{}\"", crate::ui::escaped(&m, 300)))
        .unwrap_or_default();
    match status {
        401 | 403 => Error::Hub(format!("the Hub refused to {what} in {} ({status}){said}", id.repo)).with_hint(
            "use a token with write access to this namespace (a fine-grained token needs \"write\" on the repository); `hf auth whoami` shows whose token it is",
        ),
        _ => {
            let e = client.status_error(resp, id, "model");
            Error::Hub(format!("could not {what} in {}: {e}", id.repo))
        }
    }
}
