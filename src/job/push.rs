//! `chatvec push DIR REPO`: publishes a model chatvec wrote (or trained) to
//! the Hugging Face Hub, so that what people download is exactly what
//! `verify` checked.
//!
//! Order matters: everything local is checked before the first request
//! (credentials, training state, links and folders refused by name; the
//! manifest re-hashed; a token present), so a refusal writes nothing
//! remote. Then the branch's state is read, the repository and branch
//! created if asked, changed files sent (large ones to large-file storage,
//! which keeps finished files across broken runs), and one commit made on
//! top of the head that was read, which also removes files the model no
//! longer has (a stale shard would otherwise be loaded beside the new
//! ones), except those `--keep` names.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::hash::{hex, sha256_file};
use crate::job::verify::verify;
use crate::output::manifest::MANIFEST_FILE;
use crate::publish::lfs::LargeFile;
use crate::publish::remote::{Mode, Op, Remote, State};
use crate::publish::screen::{refusals, refused};
use crate::resolve::download::pattern;
use crate::resolve::hub_api::RemoteFile;
use crate::resolve::hub_cache::parse_hub_id;

/// The largest file sent inline in a commit (the Hub sends bigger ones to
/// large-file storage; this guards memory if it did not).
const MAX_INLINE: u64 = 64 << 20;

/// Files the Hub adds to a new repository, kept by every push.
const HUB_OWN: &[&str] = &[".gitattributes"];

/// What to push where.
#[derive(Clone, Debug, Default)]
pub struct PushSpec {
    /// The model's directory.
    pub dir: PathBuf,
    /// `org/name`, optionally `@branch`.
    pub repo: String,
    /// The branch to commit to (default `main`); created from the default
    /// branch when missing.
    pub revision: Option<String>,
    /// Create the repository when it does not exist.
    pub create: bool,
    /// A new repository is private.
    pub private: bool,
    /// The commit's summary line.
    pub message: Option<String>,
    /// Remote files (fnmatch patterns) the push leaves in place.
    pub keep: Vec<String>,
    /// Check and plan, send nothing.
    pub dry_run: bool,
}

/// One file of the model and what the push does with it.
#[derive(Clone, Debug, Serialize)]
pub struct PushedFile {
    /// Its name in the repository.
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// sha256 of its content.
    pub sha256: String,
    /// `upload` (new or changed) or `unchanged`.
    pub action: &'static str,
    /// How the Hub stores it (`lfs` or `regular`), when it was sent.
    pub mode: Option<&'static str>,
}

/// What `push` did (or, with `--dry-run`, would do).
#[derive(Clone, Debug, Serialize)]
pub struct PushReport {
    /// The repository.
    pub repo: String,
    /// The branch.
    pub revision: String,
    /// The repository's page.
    pub url: String,
    /// Whether the repository (or branch) was created, or would be.
    pub created: bool,
    /// Whether nothing was sent.
    pub dry_run: bool,
    /// The model's files.
    pub files: Vec<PushedFile>,
    /// Remote files the commit removes.
    pub deleted: Vec<String>,
    /// Large files storage already held, not sent again.
    pub already_stored: Vec<String>,
    /// Bytes of large files sent.
    pub bytes_sent: u64,
    /// The branch's head after the push (the new commit, or the old head
    /// when nothing changed).
    pub commit: Option<String>,
    /// The new commit's page; `None` when nothing was committed.
    pub commit_url: Option<String>,
}

/// A local file as pushed: its path and what it is.
struct Local {
    name: String,
    path: PathBuf,
    size: u64,
    sha256: String,
    modified: Option<SystemTime>,
}

/// The git blob id of `path` (sha1 of `blob <len>\0<bytes>`), which the
/// Hub lists for files kept in git.
fn git_blob_id(path: &Path) -> Result<String> {
    use sha1::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let len = f.metadata().map_err(|e| Error::io("reading", path, e))?.len();
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {len}\0").as_bytes());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io("reading", path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Whether the remote `r` already has `l`'s content.
fn same(l: &Local, r: &RemoteFile) -> Result<bool> {
    if let Some(sha) = &r.sha256 {
        return Ok(*sha == l.sha256);
    }
    match &r.blob_id {
        Some(id) if !r.listed || r.size == l.size => Ok(*id == git_blob_id(&l.path)?),
        _ => Ok(false),
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Checks everything local: what may leave, the manifest, a token. Returns
/// the model's files with their sha256.
fn checked_files(dir: &Path, token_needed: bool, remote: &Remote) -> Result<Vec<Local>> {
    if !dir.is_dir() {
        return Err(Error::Usage(format!("{} is not a directory", dir.display())));
    }
    if !dir.join(MANIFEST_FILE).is_file() && dir.join("model").join(MANIFEST_FILE).is_file() {
        return Err(Error::Usage(format!(
            "{} is a training run, not a model: its model is in {}",
            dir.display(),
            dir.join("model").display()
        )));
    }
    let found = refusals(dir, crate::resolve::hub_api::token().as_deref())?;
    if !found.is_empty() {
        return Err(refused(dir, &found));
    }
    let report = verify(dir, None)?;
    if !report.ok {
        let mut problems: Vec<String> = report
            .checks
            .iter()
            .filter(|c| !c.ok())
            .map(|c| match &c.actual {
                None => format!("{}: missing", c.what),
                Some(a) => format!("{}: sha256 {a}, the manifest records {}", c.what, c.expected),
            })
            .collect();
        problems.extend(
            report
                .unlisted
                .iter()
                .map(|n| format!("{n}: not part of the model (its manifest does not list it)")),
        );
        return Err(Error::Mismatch {
            what: format!("refusing to push {}: `chatvec verify` fails", dir.display()),
            problems,
        }
        .with_hint(
            "push publishes what the manifest lists, unchanged: rewrite the model, or move other files out",
        ));
    }
    if token_needed && !remote.client.has_token() {
        return Err(Error::Usage(format!(
            "pushing to {} needs a Hugging Face token with write access",
            remote.id.repo
        ))
        .with_hint("set HF_TOKEN or run `hf auth login`"));
    }
    let mut names = report.listed;
    let mpath = dir.join(MANIFEST_FILE);
    names.push((MANIFEST_FILE.to_string(), sha256_file(&mpath)?));
    names
        .into_iter()
        .map(|(name, sha256)| {
            let path = dir.join(&name);
            let size = std::fs::metadata(&path).map_err(|e| Error::io("reading", &path, e))?.len();
            let modified = modified(&path);
            Ok(Local { name, path, size, sha256, modified })
        })
        .collect()
}

/// The repository and branch `spec` names.
fn target(spec: &PushSpec) -> Result<(String, String)> {
    let bad = || {
        Error::Usage(format!("'{}' is not a Hub repository id (org/name, or org/name@branch)", spec.repo))
            .with_hint("name the namespace: your user name or an organization you can write to")
    };
    let id = parse_hub_id(&spec.repo).ok_or_else(bad)?;
    if !id.repo.contains('/') {
        return Err(bad());
    }
    let branch = match (&id.revision, &spec.revision) {
        (Some(a), Some(b)) if a != b => {
            return Err(Error::Usage(format!("{} names branch {a}, --revision {b}: give one", spec.repo)));
        }
        (Some(r), _) | (None, Some(r)) => r.clone(),
        (None, None) => "main".to_string(),
    };
    if branch.len() == 40 && branch.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Usage(format!("--revision {branch} is a commit: push commits to a branch")));
    }
    Ok((id.repo, branch))
}

/// The first 512 bytes of `path`, which the Hub looks at to choose how to
/// store it.
fn sample(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::with_capacity(512);
    std::fs::File::open(path)
        .and_then(|f| f.take(512).read_to_end(&mut out))
        .map_err(|e| Error::io("reading", path, e))?;
    Ok(out)
}

/// Makes the repository and branch exist (as asked; a dry run only says
/// it would): whether either was created, and the branch's state.
fn ready_remote(remote: &Remote, spec: &PushSpec) -> Result<(bool, State)> {
    let (repo, branch) = (&remote.id.repo, &remote.branch);
    let mut created = false;
    let mut state = remote.state()?;
    if matches!(state, State::NoRepo) {
        if !spec.create {
            return Err(Error::NotFound(format!("the Hub has no repository {repo} that this token can see"))
                .with_hint("pass --create (and --private for a private one) to create it"));
        }
        created = true;
        if !spec.dry_run {
            let kind = if spec.private { "private" } else { "public" };
            crate::ui::note(&format!("push: creating {kind} repository {repo}"));
            remote.create_repo(spec.private)?;
            state = remote.state()?;
        }
    } else if spec.private {
        crate::ui::warn(&format!(
            "{repo} exists: --private applies to a new repository only, its visibility is unchanged"
        ));
    }
    if matches!(state, State::NoBranch) {
        created = true;
        if !spec.dry_run {
            crate::ui::note(&format!("push: creating branch {branch} of {repo}"));
            remote.create_branch()?;
            state = remote.state()?;
        }
    }
    Ok((created, state))
}

/// What the push does with each local file (upload or unchanged) and which
/// remote files it deletes (all the model lacks but the Hub's own and
/// those `keep` matches).
fn compare(
    locals: &[Local],
    remote_files: &[RemoteFile],
    keep: &[regex::Regex],
) -> Result<(Vec<PushedFile>, Vec<String>)> {
    let mut files = Vec::new();
    for l in locals {
        let unchanged = match remote_files.iter().find(|r| r.name == l.name) {
            Some(r) => same(l, r)?,
            None => false,
        };
        files.push(PushedFile {
            name: l.name.clone(),
            size: l.size,
            sha256: l.sha256.clone(),
            action: if unchanged { "unchanged" } else { "upload" },
            mode: None,
        });
    }
    let deleted = remote_files
        .iter()
        .map(|r| r.name.clone())
        .filter(|n| !locals.iter().any(|l| l.name == *n))
        .filter(|n| !HUB_OWN.contains(&n.as_str()) && !keep.iter().any(|k| k.is_match(n)))
        .collect();
    Ok((files, deleted))
}

/// The error for a model directory that changed after `verify`.
fn changed_meanwhile(dir: &Path, file: &str, how: &str) -> Error {
    Error::Mismatch {
        what: format!("{} changed while it was being pushed; nothing was committed", dir.display()),
        problems: vec![format!("{file}: {how}")],
    }
}

/// Sends the `changed` files: asks the Hub how it stores each, uploads the
/// large ones, then checks nothing changed since `verify`. Returns each
/// changed file's commit line.
fn send(
    remote: &Remote,
    dir: &Path,
    locals: &[Local],
    changed: &[usize],
    report: &mut PushReport,
) -> Result<Vec<Op>> {
    let asked = changed
        .iter()
        .map(|&i| Ok((locals[i].name.clone(), locals[i].size, sample(&locals[i].path)?)))
        .collect::<Result<Vec<_>>>()?;
    let modes = remote.preupload(&asked)?;
    let mut large: Vec<LargeFile> = Vec::new();
    for (&i, mode) in changed.iter().zip(&modes) {
        report.files[i].mode = Some(mode.name());
        let l = &locals[i];
        if *mode == Mode::Lfs && !large.iter().any(|f| f.sha256 == l.sha256) {
            large.push(LargeFile {
                name: l.name.clone(),
                path: l.path.clone(),
                sha256: l.sha256.clone(),
                size: l.size,
            });
        }
    }
    if !large.is_empty() {
        let sent = remote.upload_large(&large)?;
        report.already_stored = sent.stored;
        report.bytes_sent = sent.bytes;
    }
    for l in locals {
        let now = std::fs::metadata(&l.path).map(|m| m.len()).ok();
        if now != Some(l.size) || modified(&l.path) != l.modified {
            return Err(changed_meanwhile(
                dir,
                &l.name,
                "its size or modification time changed after verify",
            ));
        }
    }
    changed
        .iter()
        .zip(&modes)
        .map(|(&i, mode)| {
            let l = &locals[i];
            Ok(match mode {
                Mode::Lfs => Op::Lfs { path: l.name.clone(), sha256: l.sha256.clone(), size: l.size },
                Mode::Regular => {
                    if l.size > MAX_INLINE {
                        return Err(Error::Hub(format!(
                            "the Hub asked for {} ({} bytes) inline in the commit; chatvec sends at most {MAX_INLINE}",
                            l.name, l.size
                        )));
                    }
                    let bytes = std::fs::read(&l.path).map_err(|e| Error::io("reading", &l.path, e))?;
                    if crate::hash::sha256_hex(&bytes) != l.sha256 {
                        return Err(changed_meanwhile(dir, &l.name, "its content no longer matches the manifest"));
                    }
                    Op::File { path: l.name.clone(), bytes }
                }
            })
        })
        .collect()
}

/// Publishes `spec.dir` to the Hub (see the module's doc).
pub fn push(spec: &PushSpec) -> Result<PushReport> {
    let (repo, branch) = target(spec)?;
    let keep = spec.keep.iter().map(|p| pattern("--keep", p)).collect::<Result<Vec<_>>>()?;
    let remote = Remote::new(&repo, &branch);
    let locals = checked_files(&spec.dir, !spec.dry_run, &remote)?;
    crate::ui::note(&format!(
        "push: {} verified ({} files); asking the Hub about {repo}@{branch}",
        spec.dir.display(),
        locals.len()
    ));
    let (created, state) = ready_remote(&remote, spec)?;
    let (head, remote_files) = match state {
        State::At(c, f) => (Some(c), f),
        _ if spec.dry_run => (None, Vec::new()),
        State::NoRepo | State::NoBranch => {
            return Err(Error::Hub(format!("{repo}@{branch} was created but the Hub does not show it")));
        }
    };
    let (files, deleted) = compare(&locals, &remote_files, &keep)?;
    let mut report = PushReport {
        repo: repo.clone(),
        revision: branch.clone(),
        url: remote.page(),
        created,
        dry_run: spec.dry_run,
        files,
        deleted,
        already_stored: Vec::new(),
        bytes_sent: 0,
        commit: head.clone(),
        commit_url: None,
    };
    let changed: Vec<usize> = (0..locals.len()).filter(|&i| report.files[i].action == "upload").collect();
    let Some(head) = head.filter(|_| {
        // Nothing to send: a dry run, or the branch holds the model already.
        let nothing = changed.is_empty() && report.deleted.is_empty();
        !spec.dry_run && !nothing
    }) else {
        return Ok(report);
    };
    let mut ops = send(&remote, &spec.dir, &locals, &changed, &mut report)?;
    ops.extend(report.deleted.iter().map(|n| Op::Delete { path: n.clone() }));
    let version = env!("CARGO_PKG_VERSION");
    let dirname = spec
        .dir
        .file_name()
        .map_or_else(|| spec.dir.display().to_string(), |n| n.to_string_lossy().into_owned());
    let summary = spec.message.clone().unwrap_or_else(|| format!("Upload {dirname} with chatvec {version}"));
    let manifest_sha = &locals.last().expect("the manifest is pushed").sha256;
    let description = format!("Pushed by chatvec {version}. chatvec-manifest.json sha256: {manifest_sha}.");
    // Whether the branch holds exactly what was pushed (a commit retried
    // after its first try landed).
    let landed = || -> Result<Option<String>> {
        let State::At(commit, files) = remote.state()? else { return Ok(None) };
        for l in &locals {
            match files.iter().find(|r| r.name == l.name) {
                Some(r) if same(l, r)? => {}
                _ => return Ok(None),
            }
        }
        let gone = report.deleted.iter().all(|d| !files.iter().any(|r| r.name == *d));
        Ok(gone.then_some(commit))
    };
    crate::ui::note(&format!("push: committing {} change(s) to {repo}@{branch}", ops.len()));
    let (commit, url) = remote.commit(&summary, &description, &head, &ops, &landed)?;
    report.commit = Some(commit);
    report.commit_url = Some(url);
    Ok(report)
}

impl std::fmt::Display for PushReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sent: Vec<&PushedFile> = self.files.iter().filter(|x| x.action == "upload").collect();
        let bytes: u64 = sent.iter().map(|x| x.size).sum();
        let verb = if self.dry_run { "would push" } else { "pushed" };
        if self.created {
            writeln!(
                f,
                "{} {}@{}",
                if self.dry_run { "would create" } else { "created" },
                self.repo,
                self.revision
            )?;
        }
        for x in &self.files {
            writeln!(f, "  {:>9} {:>14} {}", x.action, x.size, x.name)?;
        }
        for d in &self.deleted {
            writeln!(f, "  {:>9} {:>14} {d}", "delete", "")?;
        }
        if !self.already_stored.is_empty() {
            writeln!(f, "large-file storage already held: {}", self.already_stored.join(", "))?;
        }
        match (&self.commit_url, self.dry_run) {
            (Some(url), _) => writeln!(
                f,
                "{verb} {} file(s) ({:.2} GB, {:.2} GB sent) to {}@{}, {} unchanged, {} deleted\ncommit: {url}",
                sent.len(),
                bytes as f64 / 1e9,
                self.bytes_sent as f64 / 1e9,
                self.repo,
                self.revision,
                self.files.len() - sent.len(),
                self.deleted.len()
            ),
            (None, true) => writeln!(
                f,
                "{verb} {} file(s) ({:.2} GB) to {}@{}, {} unchanged, {} deleted; nothing was sent",
                sent.len(),
                bytes as f64 / 1e9,
                self.repo,
                self.revision,
                self.files.len() - sent.len(),
                self.deleted.len()
            ),
            (None, false) => writeln!(
                f,
                "{}@{} already holds exactly these files (commit {}); nothing to commit\n{}",
                self.repo,
                self.revision,
                self.commit.as_deref().unwrap_or("?"),
                self.url
            ),
        }
    }
}
