//! Large files (weight shards, big tokenizers) go to the Hub's large-file
//! storage before the commit names them, by the Git LFS batch protocol as
//! the Hub speaks it: one batch request says which objects it lacks and
//! where to send them, either in one `PUT` ("basic") or in numbered parts
//! ("multipart", with a completion request listing each part's ETag), then
//! an optional verify request.
//!
//! Resuming: the batch answer leaves out every object the Hub already
//! holds, so a push run again after a broken one never sends a finished
//! file twice. Within a run each part is retried on its own (a dropped
//! connection costs one part, not the file). Parts of several files are
//! sent at once, `CONCURRENT_PUTS` at a time. The token travels only to
//! the Hub's own endpoint, never to the storage URLs it hands out.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::publish::remote::{Remote, header, retry_on_busy, write_error};
use crate::resolve::hub_api::{Payload, Progress, Response};

/// Parts in flight at once (huggingface_hub sends 5 files at a time; a
/// part is at most one file, so this is as wide).
const CONCURRENT_PUTS: usize = 4;

/// Objects per batch request.
const BATCH_CHUNK: usize = 256;

const LFS_JSON: &str = "application/vnd.git-lfs+json";

/// A file headed for large-file storage.
pub(crate) struct LargeFile {
    pub(crate) name: String,
    pub(crate) path: PathBuf,
    pub(crate) sha256: String,
    pub(crate) size: u64,
}

/// One object to send, as the batch answer says.
struct Pending {
    file: usize,
    /// Where each part goes (one for a basic upload).
    urls: Vec<String>,
    /// Bytes per part (the file's size for a basic upload).
    chunk: u64,
    /// Headers every part's `PUT` carries (a basic upload's).
    headers: Vec<(String, String)>,
    /// The multipart completion endpoint.
    completion: Option<String>,
    verify: Option<(String, Vec<(String, String)>)>,
    etags: Mutex<Vec<Option<String>>>,
    left: AtomicUsize,
}

/// What the upload did.
pub(crate) struct Sent {
    /// Names of files the Hub's storage already held.
    pub(crate) stored: Vec<String>,
    /// Bytes of file content sent (retried parts counted once).
    pub(crate) bytes: u64,
}

/// An action's `href` and `header` map.
fn action(obj: &Value, name: &str) -> Option<(String, Vec<(String, String)>)> {
    let a = obj.pointer(&format!("/actions/{name}"))?;
    let href = a.get("href")?.as_str()?.to_string();
    let headers = a
        .get("header")
        .and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default();
    Some((href, headers))
}

impl Remote {
    fn batch_url(&self) -> String {
        format!("{}/{}.git/info/lfs/objects/batch", self.client.endpoint(), self.id.repo)
    }

    /// The batch answer for `files`: per file, `None` when storage holds it
    /// already, else where to send it.
    fn batch(&self, files: &[LargeFile], first: usize) -> Result<Vec<Option<Pending>>> {
        let url = self.batch_url();
        let objects: Vec<Value> = files.iter().map(|f| json!({"oid": f.sha256, "size": f.size})).collect();
        let body = json!({"operation": "upload", "transfers": ["basic", "multipart"], "objects": objects,
            "hash_algo": "sha256", "ref": {"name": self.branch}});
        let headers = [("Accept".to_string(), LFS_JSON.to_string())];
        let resp = self.lfs_post(&url, &headers, &body, "start the large-file upload")?;
        let answer = self.client.read_json(resp, &url)?;
        let said = answer
            .get("objects")
            .and_then(Value::as_array)
            .ok_or_else(|| Error::Hub(format!("{url}: the answer lists no objects")))?;
        files
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let obj = said
                    .iter()
                    .find(|o| o.get("oid").and_then(Value::as_str) == Some(f.sha256.as_str()))
                    .ok_or_else(|| Error::Hub(format!("{url}: the answer says nothing of {}", f.name)))?;
                if let Some(e) = obj.get("error") {
                    return Err(Error::Hub(format!(
                        "the Hub refused {} for large-file storage: {}",
                        f.name,
                        crate::ui::escaped(&e.to_string(), 300)
                    )));
                }
                let Some((href, headers)) = action(obj, "upload") else {
                    return Ok(None);
                };
                let verify = action(obj, "verify");
                let chunk = headers.iter().find(|(k, _)| k == "chunk_size").map(|(_, v)| v.clone());
                let pending = |urls: Vec<String>, chunk: u64, headers, completion| Pending {
                    file: first + i,
                    etags: Mutex::new(vec![None; urls.len()]),
                    left: AtomicUsize::new(urls.len()),
                    urls,
                    chunk,
                    headers,
                    completion,
                    verify: verify.clone(),
                };
                let Some(chunk) = chunk else {
                    return Ok(Some(pending(vec![href], f.size.max(1), headers, None)));
                };
                let chunk: u64 = chunk.parse().ok().filter(|c| *c > 0).ok_or_else(|| {
                    Error::Hub(format!("{url}: chunk_size {chunk:?} for {} is no size", f.name))
                })?;
                let mut parts: Vec<(u64, String)> = headers
                    .iter()
                    .filter(|(k, _)| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
                    .filter_map(|(k, v)| Some((k.parse().ok()?, v.clone())))
                    .collect();
                parts.sort();
                if parts.len() as u64 != f.size.div_ceil(chunk) {
                    return Err(Error::Hub(format!(
                        "{url}: {} part URL(s) for {} ({} bytes in parts of {chunk})",
                        parts.len(),
                        f.name,
                        f.size
                    )));
                }
                Ok(Some(pending(parts.into_iter().map(|(_, u)| u).collect(), chunk, Vec::new(), Some(href))))
            })
            .collect()
    }

    /// Sends part `part` of `p`, retried on its own; returns its ETag.
    fn put_part(&self, f: &LargeFile, p: &Pending, part: usize, bar: &indicatif::ProgressBar) -> Result<()> {
        let offset = part as u64 * p.chunk;
        let len = p.chunk.min(f.size - offset);
        let etag = self.client.with_retries(&|m| crate::ui::warn(m), || {
            let this_try = Arc::new(AtomicU64::new(0));
            let (t, b) = (this_try.clone(), bar.clone());
            let sent: Progress = Arc::new(move |n| {
                t.fetch_add(n, Ordering::Relaxed);
                b.inc(n);
            });
            let answer = self
                .client
                .send(
                    "PUT",
                    &p.urls[part],
                    &p.headers,
                    Payload::Part { path: f.path.clone(), offset, len, sent },
                )
                .and_then(|r| retry_on_busy(r, &p.urls[part]));
            let resp = match answer {
                Ok(r) => r,
                Err(e) => {
                    // What this try sent is sent again.
                    bar.set_position(bar.position().saturating_sub(this_try.load(Ordering::Relaxed)));
                    return Err(e);
                }
            };
            let status = resp.status().as_u16();
            if !(200..300).contains(&status) {
                return Err(Error::Hub(format!(
                    "large-file storage refused part {} of {} ({status})",
                    part + 1,
                    f.name
                ))
                .with_hint("push again: files already stored are not sent twice"));
            }
            Ok(header(&resp, "etag"))
        })?;
        if p.completion.is_some() && etag.as_deref().is_none_or(str::is_empty) {
            return Err(Error::Hub(format!(
                "large-file storage gave part {} of {} no ETag",
                part + 1,
                f.name
            )));
        }
        p.etags.lock().map_err(|_| Error::Internal("a part's ETag list was poisoned".into()))?[part] = etag;
        Ok(())
    }

    /// A POST of JSON in the LFS media type, retried as every Hub request
    /// is; an answer other than 2xx is the error for `what`.
    fn lfs_post(
        &self,
        url: &str,
        headers: &[(String, String)],
        body: &Value,
        what: &str,
    ) -> Result<Response> {
        let bytes = body.to_string().into_bytes();
        let resp = self.client.with_retries(&|m| crate::ui::warn(m), || {
            let r = self.client.send("POST", url, headers, Payload::Bytes(bytes.clone(), LFS_JSON))?;
            retry_on_busy(r, url)
        })?;
        if !(200..300).contains(&resp.status().as_u16()) {
            return Err(write_error(&resp, &self.client, &self.id, what));
        }
        Ok(resp)
    }

    /// After `p`'s last part: the completion request (multipart) and the
    /// verify request, as the batch answer asked.
    fn finish(&self, f: &LargeFile, p: &Pending) -> Result<()> {
        if let Some(url) = &p.completion {
            let etags =
                p.etags.lock().map_err(|_| Error::Internal("a part's ETag list was poisoned".into()))?;
            let parts: Vec<Value> = etags
                .iter()
                .enumerate()
                .map(|(i, e)| json!({"partNumber": i + 1, "etag": e.clone().unwrap_or_default()}))
                .collect();
            let lfs = [("Accept".to_string(), LFS_JSON.to_string())];
            let body = json!({"oid": f.sha256, "parts": parts});
            self.lfs_post(url, &lfs, &body, &format!("complete the upload of {}", f.name))?;
        }
        if let Some((url, headers)) = &p.verify {
            let body = json!({"oid": f.sha256, "size": f.size});
            self.lfs_post(url, headers, &body, &format!("verify the upload of {}", f.name))?;
        }
        Ok(())
    }

    /// Sends each of `files` that large-file storage lacks.
    pub(crate) fn upload_large(&self, files: &[LargeFile]) -> Result<Sent> {
        let mut pending = Vec::new();
        for (n, chunk) in files.chunks(BATCH_CHUNK).enumerate() {
            pending.extend(self.batch(chunk, n * BATCH_CHUNK)?);
        }
        let stored: Vec<String> =
            pending.iter().zip(files).filter(|(p, _)| p.is_none()).map(|(_, f)| f.name.clone()).collect();
        let pending: Vec<Pending> = pending.into_iter().flatten().collect();
        let total: u64 = pending.iter().map(|p| files[p.file].size).sum();
        let tasks: Vec<(usize, usize)> =
            pending.iter().enumerate().flat_map(|(i, p)| (0..p.urls.len()).map(move |k| (i, k))).collect();
        let bar = crate::ui::bytes_bar("uploading", total);
        let (next, failed) = (AtomicUsize::new(0), AtomicBool::new(false));
        let first_error: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..CONCURRENT_PUTS.min(tasks.len()) {
                s.spawn(|| {
                    while !failed.load(Ordering::Relaxed) {
                        let Some(&(i, part)) = tasks.get(next.fetch_add(1, Ordering::Relaxed)) else {
                            return;
                        };
                        let p = &pending[i];
                        let f = &files[p.file];
                        let done = self.put_part(f, p, part, &bar).and_then(|()| {
                            // The last part's sender completes the file.
                            if p.left.fetch_sub(1, Ordering::AcqRel) == 1 {
                                self.finish(f, p)
                            } else {
                                Ok(())
                            }
                        });
                        if let Err(e) = done {
                            failed.store(true, Ordering::Relaxed);
                            first_error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
                            return;
                        }
                    }
                });
            }
        });
        bar.finish_and_clear();
        if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        Ok(Sent { stored, bytes: total })
    }
}
