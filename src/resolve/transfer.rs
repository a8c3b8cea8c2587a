//! Moving one file's bytes from the Hub into the cache's `blobs/`:
//! resumable, verified, and riding out the faults of a long transfer.
//!
//! - Small files stream into `blobs/<id>.incomplete`, huggingface_hub's own
//!   name, so either tool resumes the other's partial file.
//! - Large files come as `RANGES` parallel Range requests written in place
//!   into one preallocated file, `blobs/<id>.chatvec-ranges`: one write per
//!   byte (joining range files had cost a second). It is not named
//!   `.incomplete` because huggingface_hub resumes such a file from its
//!   length, and this one's holes would be taken for data. Each range's
//!   progress is kept in `<id>.chatvec-ranges.json` when a run stops, so the
//!   next continues every range where it stopped.
//! - While the ranges grow, a thread hashes the file's downloaded prefix,
//!   so the sha256 check costs no second pass at the end.
//! - A dropped, stalled or trickling connection, a 5xx or a 429 is retried,
//!   resuming, up to five times with growing waits (`Client::with_retries`,
//!   as huggingface_hub retries). A file whose hash does not match is
//!   deleted and fetched once more before that is an error.
//! - No download brings more than the size the Hub lists (`stream`): what
//!   comes past it is an error, and the file is deleted.
//! - The temporary files are never opened through a link: one planted in
//!   `blobs/` under their names is removed, said, and the file created
//!   afresh (`O_EXCL`, `O_NOFOLLOW`), so a download writes nowhere but the
//!   cache.
//!
//! Everything here runs under the blob's `.locks/` lock (see `download`).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use indicatif::ProgressBar;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::hash::hex;
use crate::resolve::hub_api::{Client, RemoteFile, Response};
use crate::resolve::hub_cache::HubId;
use crate::resolve::stream::Overlong;

/// Files at least this large download as `RANGES` parallel ranges
/// (`CHATVEC_RANGE_MIN` bytes overrides it, for tests).
fn range_min() -> u64 {
    std::env::var("CHATVEC_RANGE_MIN").ok().and_then(|v| v.parse().ok()).unwrap_or(64 << 20)
}

/// Parallel ranges per large file.
const RANGES: u64 = 4;

/// A file downloaded whole whose size or hash is not the Hub's (deleted).
type Mismatch = Error;

/// Downloads `f` into `blobs/` and checks it against the Hub's size and
/// hash; returns the checked file, ready to be renamed to its blob name.
pub(super) fn download_verified(
    client: &Client,
    id: &HubId,
    commit: &str,
    f: &RemoteFile,
    blobs: &Path,
    blob_name: &str,
    bar: Option<&ProgressBar>,
) -> Result<PathBuf> {
    let part = blobs.join(format!("{blob_name}.incomplete"));
    let url = client.resolve_url(id, commit, &f.name);
    // A partial `.incomplete` (from either tool) is resumed as one stream.
    let ranged = f.size >= range_min() && f.sha256.is_some() && regular_len(&part)?.is_none();
    let t = Transfer { client, id, f, url: &url, bar };
    let fetch = || match ranged {
        true => t.ranged(blobs, blob_name),
        false => t.single(&part).map(|r| r.map(|()| part.clone())),
    };
    match fetch()? {
        Ok(path) => return Ok(path),
        Err(e) => t.say(&format!("{e}; downloading it once more")),
    }
    if let Some(b) = bar {
        b.set_position(b.position().saturating_sub(f.size));
    }
    fetch()?
}

/// One file's transfer: where from, and the bar its bytes count on.
struct Transfer<'a> {
    client: &'a Client,
    id: &'a HubId,
    f: &'a RemoteFile,
    url: &'a str,
    bar: Option<&'a ProgressBar>,
}

impl Transfer<'_> {
    /// Prints a warning without tearing the progress bar.
    fn say(&self, msg: &str) {
        match self.bar {
            Some(b) => b.suspend(|| crate::ui::warn(msg)),
            None => crate::ui::warn(msg),
        }
    }

    fn count(&self, n: u64) {
        if let Some(b) = self.bar {
            b.inc(n);
        }
    }

    /// One stream into `part`, resumed from its length, then checked.
    fn single(&self, part: &Path) -> Result<std::result::Result<(), Mismatch>> {
        let mut counted = 0u64;
        self.client.with_retries(&|m| self.say(m), || self.stream_into(part, &mut counted))?;
        check(self.f, part)
    }

    /// Streams the file into `part`, continuing after the bytes already
    /// there; `counted` is how many of them the bar has.
    fn stream_into(&self, part: &Path, counted: &mut u64) -> Result<()> {
        let have = regular_len(part)?.unwrap_or(0);
        let resp = self.client.get(self.url, have)?;
        let (mut out, start) = match resp.status().as_u16() {
            206 => (open_existing(part, true)?, have),
            200 => (fresh_file(part)?, 0),
            // Asked to resume a file that is already whole.
            416 if have == self.f.size => return Ok(()),
            _ => return Err(self.client.status_error(&resp, self.id, &format!("file {} of", self.f.name))),
        };
        if let Some(b) = self.bar {
            b.set_position((b.position() + start).saturating_sub(*counted));
        }
        *counted = start;
        let cap = self.f.cap().saturating_sub(start);
        let streamed = self.stream(resp, cap, Overlong::Refused, &mut |bytes| {
            out.write_all(bytes).map_err(|e| Error::io("writing", part, e))?;
            *counted += bytes.len() as u64;
            Ok(())
        });
        if let Err(e) = streamed {
            if matches!(e.kind(), Error::Hub(_)) {
                // More than the Hub listed: nothing of it is kept.
                let _ = std::fs::remove_file(part);
            }
            return Err(e);
        }
        out.sync_all().map_err(|e| Error::io("syncing", part, e))
    }

    /// Copies a response body (at most `cap` bytes; see `Overlong` for
    /// more) into `sink`, counting it on the bar; returns the bytes copied.
    /// A broken, stalled or trickling transfer is a network error (retried,
    /// then said to resume); Ctrl-C stops it within a second.
    fn stream(
        &self,
        resp: Response,
        cap: u64,
        overlong: Overlong,
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<u64> {
        let what = format!("download of {} from {}", self.f.name, self.url);
        let mut body = self.client.body(resp, cap, overlong, what)?;
        let mut got = 0u64;
        while let Some(bytes) = body.next()? {
            sink(bytes)?;
            got += bytes.len() as u64;
            self.count(bytes.len() as u64);
        }
        Ok(got)
    }

    /// Downloads the file as `RANGES` parallel ranges written in place into
    /// `<blob>.chatvec-ranges`, hashed as they arrive; returns that file
    /// when its sha256 is the Hub's.
    fn ranged(&self, blobs: &Path, blob_name: &str) -> Result<std::result::Result<PathBuf, Mismatch>> {
        let f = self.f;
        let data = blobs.join(format!("{blob_name}.chatvec-ranges"));
        let record = blobs.join(format!("{blob_name}.chatvec-ranges.json"));
        let spans = spans(f.size);
        let resumed = match (regular_len(&data)?, regular_len(&record)?) {
            (Some(_), Some(_)) => read_record(&record, &data, f, &spans),
            _ => None,
        };
        let file = match resumed {
            Some(_) => open_existing(&data, false)?,
            None => fresh_file(&data)?,
        };
        if resumed.is_none() {
            // Holes that take no disk until each range fills them.
            file.set_len(f.size).map_err(|e| Error::io("sizing", &data, e))?;
        }
        let got: Vec<AtomicU64> =
            resumed.unwrap_or_else(|| vec![0; spans.len()]).into_iter().map(AtomicU64::new).collect();
        self.count(got.iter().map(|g| g.load(Ordering::Relaxed)).sum());
        let first_error: Mutex<Option<Error>> = Mutex::new(None);
        let failed = AtomicBool::new(false);
        let ranges_done = AtomicBool::new(false);
        let hashed = std::thread::scope(|s| {
            let hasher = s.spawn(|| hash_prefix(&file, &spans, &got, &ranges_done));
            let workers: Vec<_> = spans
                .iter()
                .zip(&got)
                .map(|(&span, got)| {
                    let (file, data, failed, first_error) = (&file, &data, &failed, &first_error);
                    s.spawn(move || {
                        let r = self
                            .client
                            .with_retries(&|m| self.say(m), || self.range(file, data, span, got, failed));
                        if let Err(e) = r
                            && !failed.swap(true, Ordering::SeqCst)
                            && let Ok(mut slot) = first_error.lock()
                        {
                            *slot = Some(e);
                        }
                    })
                })
                .collect();
            for w in workers {
                if w.join().is_err() {
                    failed.store(true, Ordering::SeqCst);
                }
            }
            ranges_done.store(true, Ordering::SeqCst);
            hasher.join()
        });
        if failed.load(Ordering::SeqCst) {
            // Keep what arrived for the next run: the data on disk first,
            // then the record that says how much of each range it holds.
            file.sync_data().map_err(|e| Error::io("syncing", &data, e))?;
            write_record(&record, f, &spans, &got)?;
            let e = first_error.into_inner().ok().flatten();
            return Err(e.unwrap_or_else(|| Error::Internal("a download thread panicked".into())));
        }
        let (sha256, hashed) = hashed
            .map_err(|_| Error::Internal("the hash thread panicked".into()))?
            .map_err(|e| Error::io("reading", &data, e))?;
        file.sync_all().map_err(|e| Error::io("syncing", &data, e))?;
        drop(file);
        let _ = std::fs::remove_file(&record);
        let want = f.sha256.clone().unwrap_or_default();
        if hashed != f.size || !want.eq_ignore_ascii_case(&sha256) {
            let _ = std::fs::remove_file(&data);
            return Ok(Err(corrupt(f, hashed, "sha256", &sha256, &want)));
        }
        Ok(Ok(data))
    }

    /// Bytes `from..to` of the file into `file` at their offsets, after the
    /// `got` bytes of this range already there. Stops when `failed` says
    /// another range failed for good.
    fn range(
        &self,
        file: &File,
        path: &Path,
        (from, to): (u64, u64),
        got: &AtomicU64,
        failed: &AtomicBool,
    ) -> Result<()> {
        let mut at = from + got.load(Ordering::Acquire);
        if at >= to {
            return Ok(());
        }
        let resp = self.client.get_range(self.url, Some(format!("bytes={at}-{}", to - 1)))?;
        match resp.status().as_u16() {
            206 => {}
            s if s >= 400 => {
                return Err(self.client.status_error(&resp, self.id, &format!("file {} of", self.f.name)));
            }
            s => {
                return Err(Error::Hub(format!(
                    "download of {} from {}: the server answered a range request with {s}",
                    self.f.name, self.url
                )));
            }
        }
        self.stream(resp, to - at, Overlong::Cut, &mut |bytes| {
            if failed.load(Ordering::Relaxed) {
                return Err(Error::Internal("stopped: another range failed".into()));
            }
            file.write_all_at(bytes, at).map_err(|e| Error::io("writing", path, e))?;
            at += bytes.len() as u64;
            got.fetch_add(bytes.len() as u64, Ordering::Release);
            Ok(())
        })?;
        if at != to {
            return Err(Error::Network(format!(
                "download of {} from {} broke off after {} of {} bytes of a range",
                self.f.name,
                self.url,
                at - from,
                to - from
            ))
            .with_hint("run the command again to resume where it stopped"));
        }
        Ok(())
    }
}

/// The length of the regular file at `path`, or `None` when there is none.
/// Anything else there (a link planted in the cache, a directory) is
/// removed and said: a temporary download file is never reached through a
/// link.
pub(super) fn regular_len(path: &Path) -> Result<Option<u64>> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => Ok(Some(m.len())),
        Ok(m) => {
            let removed = if m.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
            removed.map_err(|e| Error::io("removing what was planted at", path, e))?;
            crate::ui::warn_once_done(&format!(
                "removed {} from the cache: a {} where chatvec keeps a download's temporary file",
                path.display(),
                if m.file_type().is_symlink() { "symbolic link" } else { "directory or special file" }
            ));
            Ok(None)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("checking", path, e)),
    }
}

/// Creates `path` afresh for writing: whatever was there goes first (see
/// `regular_len`), and the new file is made with `O_EXCL | O_NOFOLLOW`, so
/// no link can redirect it.
pub(super) fn fresh_file(path: &Path) -> Result<File> {
    if regular_len(path)?.is_some() {
        std::fs::remove_file(path).map_err(|e| Error::io("removing", path, e))?;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| Error::io("creating", path, e))
}

/// Opens the existing regular file `path` to continue writing it (at its
/// end with `append`), never through a link.
fn open_existing(path: &Path, append: bool) -> Result<File> {
    let mut o = OpenOptions::new();
    if append {
        o.append(true);
    } else {
        o.read(true).write(true);
    }
    o.custom_flags(libc::O_NOFOLLOW).open(path).map_err(|e| Error::io("opening", path, e))
}

/// The `RANGES` byte spans `[from, to)` a file of `size` bytes splits into.
fn spans(size: u64) -> Vec<(u64, u64)> {
    let step = size.div_ceil(RANGES).max(1);
    (0..RANGES).map(|k| (k * step, ((k + 1) * step).min(size))).filter(|(a, b)| a < b).collect()
}

/// The end of the file's downloaded prefix: every byte before it is on
/// disk.
fn prefix_end(spans: &[(u64, u64)], got: &[AtomicU64]) -> u64 {
    let mut end = 0;
    for (&(from, to), g) in spans.iter().zip(got) {
        end = from + g.load(Ordering::Acquire).min(to - from);
        if end < to {
            break;
        }
    }
    end
}

/// Hashes `file` in order as its downloaded prefix grows, until the ranges
/// are done and the prefix is hashed; returns the sha256 and the bytes it
/// covers.
fn hash_prefix(
    file: &File,
    spans: &[(u64, u64)],
    got: &[AtomicU64],
    ranges_done: &AtomicBool,
) -> std::io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut at = 0u64;
    let mut buf = vec![0u8; 8 << 20];
    loop {
        // Read the flag first: a prefix seen after it is final.
        let done = ranges_done.load(Ordering::SeqCst);
        let end = prefix_end(spans, got);
        if end > at {
            let n = (end - at).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], at)?;
            h.update(&buf[..n]);
            at += n as u64;
        } else if done {
            return Ok((hex(&h.finalize()), at));
        } else {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Each range's downloaded byte count from an earlier run's record, when it
/// describes this very file and split and the data file is there whole.
fn read_record(record: &Path, data: &Path, f: &RemoteFile, spans: &[(u64, u64)]) -> Option<Vec<u64>> {
    let v: Value = serde_json::from_slice(&crate::json::read_capped(record, 1 << 16).ok()?).ok()?;
    let same = v.get("size")?.as_u64()? == f.size
        && v.get("sha256")?.as_str()? == f.sha256.as_deref()?
        && std::fs::metadata(data).ok()?.len() == f.size;
    let ranges = v.get("ranges")?.as_array()?;
    if !same || ranges.len() != spans.len() {
        return None;
    }
    ranges
        .iter()
        .zip(spans)
        .map(|(r, &(from, to))| {
            let r = r.as_array()?;
            let (a, b, g) = (r.first()?.as_u64()?, r.get(1)?.as_u64()?, r.get(2)?.as_u64()?);
            (a == from && b == to && g <= to - from).then_some(g)
        })
        .collect()
}

/// Writes the ranges' progress, whole (a temporary file renamed over it).
fn write_record(record: &Path, f: &RemoteFile, spans: &[(u64, u64)], got: &[AtomicU64]) -> Result<()> {
    let ranges: Vec<Value> =
        spans.iter().zip(got).map(|(&(a, b), g)| json!([a, b, g.load(Ordering::Acquire)])).collect();
    let text = json!({"size": f.size, "sha256": f.sha256, "ranges": ranges}).to_string();
    let tmp = record.with_extension(format!("json.{}", std::process::id()));
    fresh_file(&tmp)?.write_all(text.as_bytes()).map_err(|e| Error::io("writing", &tmp, e))?;
    std::fs::rename(&tmp, record).map_err(|e| Error::io("renaming", &tmp, e))
}

/// The error for a downloaded file that is not the Hub's.
fn corrupt(f: &RemoteFile, len: u64, what: &str, got: &str, want: &str) -> Error {
    Error::Network(format!(
        "downloaded {} is corrupt: {len} bytes with {what} {got}, the Hub lists {} bytes with {what} {want}; it was deleted",
        f.name, f.size
    ))
    .with_hint("run the command again to download it afresh")
}

/// Checks a downloaded file against the Hub's size and hash (sha256 for
/// LFS files, else the git blob id). A mismatch deletes it (it cannot be
/// resumed into a good file) and is the inner error.
fn check(f: &RemoteFile, part: &Path) -> Result<std::result::Result<(), Mismatch>> {
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
        match f.sha256 {
            Some(_) => sha256.update(&buf[..n]),
            None => sha1.update(&buf[..n]),
        }
    }
    let (what, want, got) = match &f.sha256 {
        Some(want) => ("sha256", want.clone(), hex(&sha256.finalize())),
        None => ("git blob id", f.blob_id.clone().unwrap_or_default(), hex(&sha1.finalize())),
    };
    if (f.listed && len != f.size) || !want.eq_ignore_ascii_case(&got) {
        let _ = std::fs::remove_file(part);
        return Ok(Err(corrupt(f, len, what, &got, &want)));
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spans tile the file exactly, and the prefix stops at the first
    /// range that is not whole.
    #[test]
    fn spans_tile_the_file_and_the_prefix_stops_at_a_gap() {
        for size in [1u64, 3, 4, 5, 1000, 1001] {
            let s = spans(size);
            assert_eq!(s.first().unwrap().0, 0);
            assert_eq!(s.last().unwrap().1, size);
            assert!(s.windows(2).all(|w| w[0].1 == w[1].0), "{size}: {s:?}");
        }
        let s = spans(100);
        let got: Vec<AtomicU64> = [25, 10, 25, 0].into_iter().map(AtomicU64::new).collect();
        assert_eq!(prefix_end(&s, &got), 35);
        got[1].store(25, Ordering::Relaxed);
        assert_eq!(prefix_end(&s, &got), 75);
    }
}
