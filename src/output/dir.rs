//! Durable output directories (contract 4): everything is written into a
//! temporary sibling directory, fsynced, and renamed into place only when
//! complete, so an interrupted run leaves nothing that looks finished. An
//! input is never an output, and an existing output is replaced only with
//! `--force`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

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

/// Splits `p` into its resolved (absolute) parent directory, which must
/// exist, and its final name, so outputs can be compared with inputs.
fn absolute(p: &Path) -> Result<(PathBuf, String)> {
    let name = p
        .file_name()
        .ok_or_else(|| Error::Usage(format!("output path {} has no final name", p.display())))?;
    let parent = match p.parent() {
        Some(x) if !x.as_os_str().is_empty() => x.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let parent =
        fs::canonicalize(&parent).map_err(|e| Error::io("resolving the output's parent", &parent, e))?;
    Ok((parent, name.to_string_lossy().into_owned()))
}

impl OutputDir {
    /// Checks that `target` may be written (not an input, not inside or
    /// around one, not existing unless `force`, enough free space for
    /// `need` bytes) and creates the temporary sibling directory.
    pub fn create(target: &Path, inputs: &[&Path], force: bool, need: u64) -> Result<OutputDir> {
        let (parent, name) = absolute(target)?;
        let abs = parent.join(&name);
        let resolved = fs::canonicalize(&abs).unwrap_or_else(|_| abs.clone());
        for input in inputs {
            let inp = fs::canonicalize(input).map_err(|e| Error::io("resolving", input, e))?;
            if resolved == inp || inp.starts_with(&resolved) || resolved.starts_with(&inp) {
                return Err(Error::Usage(format!(
                    "output {} would overwrite or sit inside input {}; an input is never an output",
                    target.display(),
                    input.display()
                )));
            }
        }
        if fs::symlink_metadata(&abs).is_ok() && !force {
            return Err(Error::OutputExists(target.to_path_buf()));
        }
        let have = free_space(&parent)?;
        if have < need {
            return Err(Error::NoSpace { path: parent, need, have });
        }
        let tmp = parent.join(format!(".{name}.chatvec-tmp-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| Error::io("removing stale", &tmp, e))?;
        }
        fs::create_dir(&tmp).map_err(|e| Error::io("creating", &tmp, e))?;
        Ok(OutputDir { parent, name, target: abs, tmp, force, done: false })
    }

    /// The temporary directory to write into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Fsyncs the temporary directory and renames it into place (replacing
    /// an existing output only with `force`), then fsyncs the parent so the
    /// rename itself is durable.
    pub fn commit(mut self) -> Result<PathBuf> {
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
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("syncing directory", dir, e))
}

/// Bytes available to this user on the file system holding `dir`.
pub(crate) fn free_space(dir: &Path) -> Result<u64> {
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
