//! Durable output directories (contract 4): everything is written into a
//! temporary sibling directory, fsynced, and renamed into place only when
//! complete, so an interrupted run leaves nothing that looks finished. An
//! input is never an output, and an existing output is replaced only with
//! `--force`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::json::to_pretty;
use crate::model::checkpoint::INDEX_FILE;
use crate::output::files::{HashingFile, SyncedFile, WrittenFile, write_file};
use crate::output::manifest::{MANIFEST_FILE, Manifest};
use crate::output::sidecars::SideFiles;
use crate::plan::Plan;

/// The name mergekit gives the config it ran, beside the weights.
const MERGEKIT_CONFIG: &str = "mergekit_config.yml";

/// `model.safetensors.index.json` as transformers writes it: total tensor
/// bytes and a name-sorted weight map.
fn index_json(plan: &Plan) -> Vec<u8> {
    let mut names: Vec<(&str, &str)> = Vec::new();
    for sh in &plan.shards {
        for t in plan.stored(sh.tensors.clone()) {
            names.push((t.spec.name, &sh.file_name));
        }
    }
    names.sort();
    let mut wm = serde_json::Map::new();
    for (n, f) in names {
        wm.insert(n.to_string(), f.into());
    }
    let total: u64 = plan.tensors.iter().map(|t| t.bytes()).sum();
    to_pretty(&serde_json::json!({ "metadata": { "total_size": total }, "weight_map": wm }))
}

/// An output directory under construction.
pub(crate) struct OutputDir {
    /// The resolved parent directory and final name of the output.
    parent: PathBuf,
    name: String,
    target: PathBuf,
    tmp: PathBuf,
    force: bool,
    done: bool,
}

/// Splits `p` into its resolved (absolute) parent directory, created when
/// missing (as `save_pretrained` and mergekit do), and its final name, so
/// outputs can be compared with inputs.
fn absolute(p: &Path) -> Result<(PathBuf, String)> {
    let name = p
        .file_name()
        .filter(|n| *n != "." && *n != "..")
        .ok_or_else(|| Error::Usage(format!("output path {} has no final name", p.display())))?;
    let parent = match p.parent() {
        Some(x) if !x.as_os_str().is_empty() => x.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| Error::io("creating the output's parent", &parent, e))?;
    let parent =
        fs::canonicalize(&parent).map_err(|e| Error::io("resolving the output's parent", &parent, e))?;
    Ok((parent, name.to_string_lossy().into_owned()))
}

/// Free space kept in reserve beyond the weights, for side files (config,
/// tokenizer, manifest, model card): once per job, however many outputs a
/// sweep writes.
pub(crate) const SIDE_FILE_RESERVE: u64 = 256 << 20;

/// The manifest every chatvec output holds; `--force` replaces only a
/// directory that has one (or an empty directory).
const MANIFEST: &str = crate::output::manifest::MANIFEST_FILE;

/// Why `--force` may not replace `path`, if it may not: it must be an
/// earlier chatvec output (a directory with a manifest) or an empty
/// directory; a symlink, a file, a device or a directory of other files is
/// never deleted.
pub(crate) fn refuse_replacing(path: &Path, marker: &str) -> Option<String> {
    let meta = fs::symlink_metadata(path).ok()?;
    if meta.file_type().is_symlink() {
        return Some("it is a symbolic link".into());
    }
    if !meta.is_dir() {
        return Some("it is not a directory".into());
    }
    let entries: Vec<String> = match fs::read_dir(path) {
        Ok(rd) => rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
        Err(e) => return Some(format!("it cannot be listed ({e})")),
    };
    if entries.is_empty() || entries.iter().any(|e| e == marker) {
        return None;
    }
    let mut shown: Vec<&str> = entries.iter().map(String::as_str).take(5).collect();
    shown.sort();
    let more = if entries.len() > 5 { format!(" and {} more", entries.len() - 5) } else { String::new() };
    Some(format!("it holds {}{more}, and no {marker}", shown.join(", ")))
}

/// Bytes of the files under `path`.
fn tree_bytes(path: &Path) -> u64 {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            fs::read_dir(path).map(|rd| rd.flatten().map(|e| tree_bytes(&e.path())).sum()).unwrap_or(0)
        }
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

/// The temporary and moved-aside directories of chatvec runs in `parent`
/// (`.NAME.chatvec-tmp-PID`, `.NAME.chatvec-old-PID`), with the pid.
fn leftovers(parent: &Path) -> Vec<(PathBuf, u32)> {
    let Ok(rd) = fs::read_dir(parent) else { return Vec::new() };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name.strip_prefix('.')?;
            let pid = [".chatvec-tmp-", ".chatvec-old-"].iter().find_map(|m| rest.rsplit_once(m))?.1;
            Some((e.path(), pid.parse().ok()?))
        })
        .collect()
}

/// Temporary directories this process is writing now (a sweep holds one
/// per candidate): never a killed run's leftovers, whatever their pid says.
static LIVE: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn live(path: &Path) -> bool {
    LIVE.lock().map(|l| l.iter().any(|p| p == path)).unwrap_or(false)
}

fn set_live(path: &Path, on: bool) {
    if let Ok(mut l) = LIVE.lock() {
        l.retain(|p| p != path);
        if on {
            l.push(path.to_path_buf());
        }
    }
}

/// Removes the leftovers in `parent` of chatvec runs that were killed
/// (their process is gone), saying what went and how much; returns what is
/// left of running ones, for the free-space message.
fn clear_leftovers(parent: &Path) -> Vec<(PathBuf, u64)> {
    let mut running = Vec::new();
    for (path, pid) in leftovers(parent) {
        let bytes = tree_bytes(&path);
        if live(&path) || (pid != std::process::id() && crate::scratch::process_alive(pid)) {
            running.push((path, bytes));
            continue;
        }
        let removed = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        match removed {
            Ok(()) => crate::ui::warn(&format!(
                "removed {} ({}), left by a chatvec run that was killed (process {pid} is gone)",
                path.display(),
                crate::units::human_bytes(bytes)
            )),
            Err(e) => crate::ui::warn(&format!(
                "could not remove {}, left by a killed chatvec run: {e}",
                path.display()
            )),
        }
    }
    running
}

impl OutputDir {
    /// Checks that `target` may be written and creates the temporary
    /// sibling directory. `inputs` are every file and directory the job
    /// reads (weights and side files, resolved): none may be the output,
    /// lie inside it, or contain it. An existing `target` is replaced only
    /// with `force`, and only when it is an earlier chatvec output or an
    /// empty directory. Leftovers of killed runs beside it are removed
    /// first, and `weights` bytes plus `SIDE_FILE_RESERVE` must be free.
    pub(crate) fn create(target: &Path, inputs: &[PathBuf], force: bool, weights: u64) -> Result<OutputDir> {
        let (parent, name) = absolute(target)?;
        let abs = parent.join(&name);
        let resolved = fs::canonicalize(&abs).unwrap_or_else(|_| abs.clone());
        for inp in inputs {
            let inp = fs::canonicalize(inp).unwrap_or_else(|_| inp.clone());
            if resolved == inp || inp.starts_with(&resolved) || (inp.is_dir() && resolved.starts_with(&inp)) {
                return Err(Error::Usage(format!(
                    "output {} would overwrite, hold or sit inside the input {}; an input is never an output",
                    target.display(),
                    inp.display()
                )));
            }
        }
        if fs::symlink_metadata(&abs).is_ok() {
            if !force {
                return Err(Error::OutputExists(target.to_path_buf()));
            }
            if let Some(why) = refuse_replacing(&abs, MANIFEST) {
                return Err(Error::Usage(format!(
                    "--force replaces only an earlier chatvec output or an empty directory, and {} is neither: {why}",
                    target.display()
                ))
                .with_hint("remove it yourself, or choose another output directory"));
            }
        }
        let running = clear_leftovers(&parent);
        let have = free_space(&parent)?;
        if have < weights.saturating_add(SIDE_FILE_RESERVE) {
            let e = Error::NoSpace { path: parent, weights, reserve: SIDE_FILE_RESERVE, have };
            if running.is_empty() {
                return Err(e);
            }
            let list: Vec<String> = running
                .iter()
                .map(|(p, b)| format!("{} ({})", p.display(), crate::units::human_bytes(*b)))
                .collect();
            return Err(e.with_hint(format!(
                "chatvec runs still in progress hold {} here: {}",
                crate::units::human_bytes(running.iter().map(|r| r.1).sum()),
                list.join(", ")
            )));
        }
        let tmp = parent.join(format!(".{name}.chatvec-tmp-{}", std::process::id()));
        fs::create_dir(&tmp).map_err(|e| Error::io("creating", &tmp, e))?;
        set_live(&tmp, true);
        Ok(OutputDir { parent, name, target: abs, tmp, force, done: false })
    }

    /// A weight shard of the output, created empty for the executor to
    /// stream into.
    pub(crate) fn create_shard(&self, file_name: &str) -> Result<SyncedFile> {
        SyncedFile::create(&self.tmp.join(file_name))
    }

    /// A file of the output hashed as it streams in, for weights no plan
    /// lays out (a LoRA adapter).
    pub(crate) fn create_hashed(&self, file_name: &str) -> Result<HashingFile> {
        HashingFile::create(&self.tmp.join(file_name))
    }

    /// Writes a small file (a config, a card) into the output.
    pub(crate) fn write_small(&self, file_name: &str, bytes: &[u8]) -> Result<WrittenFile> {
        write_file(&self.tmp, file_name, bytes)
    }

    /// Writes the manifest, last, for an output written without a plan.
    pub(crate) fn write_manifest(&self, manifest: &Manifest) -> Result<()> {
        write_file(&self.tmp, MANIFEST_FILE, &to_pretty(manifest)).map(|_| ())
    }

    /// An unnamed scratch file on the output's file system: it never shows
    /// in a directory listing and is gone when dropped, even after kill -9.
    pub(crate) fn scratch_file(&self) -> Result<File> {
        tempfile::tempfile_in(&self.tmp).map_err(|e| Error::io("creating a scratch file in", &self.tmp, e))
    }

    /// Writes everything beside the weights, in an order a reader can
    /// trust: the index (for several shards), the side files (config,
    /// tokenizer, template, card, and a mergekit recipe as mergekit names
    /// it), then the manifest, which lists them all with their sha256.
    pub(crate) fn finish(
        &self,
        plan: &Plan,
        mut side: SideFiles,
        mut manifest: Manifest,
        shards: Vec<WrittenFile>,
    ) -> Result<()> {
        if let Some(r) = manifest.recipe.as_ref().filter(|r| r.syntax == "mergekit") {
            side.add(MERGEKIT_CONFIG, r.text.clone().into_bytes());
        }
        let mut outputs = shards;
        if plan.shards.len() > 1 {
            outputs.push(write_file(&self.tmp, INDEX_FILE, &index_json(plan))?);
        }
        manifest.files = side.write(&self.tmp)?;
        manifest.outputs = outputs;
        write_file(&self.tmp, MANIFEST_FILE, &to_pretty(&manifest))?;
        Ok(())
    }

    /// Fsyncs the temporary directory and renames it into place (replacing
    /// an existing output only with `force`), then fsyncs the parent so the
    /// rename itself is durable.
    pub(crate) fn commit(mut self) -> Result<PathBuf> {
        sync_dir(&self.tmp)?;
        if fs::symlink_metadata(&self.target).is_ok() {
            if !self.force {
                return Err(Error::OutputExists(self.target.clone()));
            }
            let old = self.parent.join(format!(".{}.chatvec-old-{}", self.name, std::process::id()));
            fs::rename(&self.target, &old).map_err(|e| Error::io("moving aside", &self.target, e))?;
            fs::rename(&self.tmp, &self.target)
                .map_err(|e| Error::io("renaming into place", &self.target, e))?;
            let removed = if old.is_dir() { fs::remove_dir_all(&old) } else { fs::remove_file(&old) };
            removed.map_err(|e| Error::io("removing the replaced output", &old, e))?;
        } else {
            fs::rename(&self.tmp, &self.target)
                .map_err(|e| Error::io("renaming into place", &self.target, e))?;
        }
        sync_dir(&self.parent)?;
        self.done = true;
        Ok(self.target.clone())
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.tmp);
        }
        set_live(&self.tmp, false);
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("syncing directory", dir, e))
}

/// Bytes available to this user on the file system holding `dir`
/// (`CHATVEC_FREE_SPACE` bytes stands in for it, so tests can run short of
/// space without filling a disk).
pub(crate) fn free_space(dir: &Path) -> Result<u64> {
    if let Some(n) = std::env::var("CHATVEC_FREE_SPACE").ok().and_then(|v| v.parse().ok()) {
        return Ok(n);
    }
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| Error::Usage(format!("{} contains a NUL byte", dir.display())))?;
    // SAFETY: statvfs is a C struct of plain integers, for which all
    // zero bytes is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable struct.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(Error::io("checking free space on", dir, std::io::Error::last_os_error()));
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}
