//! Durable output (contract 4): everything is written into a temporary
//! sibling directory, fsynced, and renamed into place only when complete, so
//! an interrupted run leaves nothing that looks finished. Output shards are
//! hashed as they stream out, never read back.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Start writeback after this many unsynced bytes, so the disk works while
/// we compute instead of all at the final fsync.
const WRITEBACK_EVERY: u64 = 32 << 20;
/// How far behind the writeback front written bytes are dropped from the
/// page cache.
const DROP_BEHIND: u64 = 256 << 20;

/// Hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The sha256 of the file at `path`, read in 8 MiB pieces.
pub fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io("reading", path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        crate::interrupt::check()?;
    }
    Ok(hex(&h.finalize()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An output directory under construction.
pub struct OutputDir {
    target: PathBuf,
    tmp: PathBuf,
    force: bool,
    done: bool,
}

/// Resolves `p` to an absolute path without requiring it to exist (its
/// parent must), so outputs can be compared with inputs.
fn absolute(p: &Path) -> Result<PathBuf> {
    let name = p
        .file_name()
        .ok_or_else(|| Error::Usage(format!("output path {} has no final name", p.display())))?;
    let parent = match p.parent() {
        Some(x) if !x.as_os_str().is_empty() => x.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let parent =
        fs::canonicalize(&parent).map_err(|e| Error::io("resolving the output's parent", &parent, e))?;
    Ok(parent.join(name))
}

impl OutputDir {
    /// Checks that `target` may be written (not an input, not inside or
    /// around one, not existing unless `force`, enough free space for
    /// `need` bytes) and creates the temporary sibling directory.
    pub fn create(target: &Path, inputs: &[&Path], force: bool, need: u64) -> Result<OutputDir> {
        let abs = absolute(target)?;
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
        let parent = abs.parent().unwrap().to_path_buf();
        let have = free_space(&parent)?;
        if have < need {
            return Err(Error::NoSpace { path: parent, need, have });
        }
        let name = abs.file_name().unwrap().to_string_lossy().into_owned();
        let tmp = parent.join(format!(".{name}.chatvec-tmp-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| Error::io("removing stale", &tmp, e))?;
        }
        fs::create_dir(&tmp).map_err(|e| Error::io("creating", &tmp, e))?;
        Ok(OutputDir { target: abs, tmp, force, done: false })
    }

    /// The temporary directory to write into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The final location.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Fsyncs the temporary directory and renames it into place (replacing
    /// an existing output only with `force`), then fsyncs the parent so the
    /// rename itself is durable.
    pub fn commit(mut self) -> Result<PathBuf> {
        sync_dir(&self.tmp)?;
        let parent = self.target.parent().unwrap().to_path_buf();
        if fs::symlink_metadata(&self.target).is_ok() {
            if !self.force {
                return Err(Error::OutputExists(self.target.clone()));
            }
            let old = parent.join(format!(
                ".{}.chatvec-old-{}",
                self.target.file_name().unwrap().to_string_lossy(),
                std::process::id()
            ));
            fs::rename(&self.target, &old).map_err(|e| Error::io("moving aside", &self.target, e))?;
            fs::rename(&self.tmp, &self.target)
                .map_err(|e| Error::io("renaming into place", &self.target, e))?;
            let removed = if old.is_dir() { fs::remove_dir_all(&old) } else { fs::remove_file(&old) };
            removed.map_err(|e| Error::io("removing the replaced output", &old, e))?;
        } else {
            fs::rename(&self.tmp, &self.target)
                .map_err(|e| Error::io("renaming into place", &self.target, e))?;
        }
        sync_dir(&parent)?;
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
pub fn free_space(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| Error::Usage(format!("{} contains a NUL byte", dir.display())))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable struct.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(Error::io("checking free space on", dir, std::io::Error::last_os_error()));
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// What was written: file name, byte count and sha256.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WrittenFile {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

/// A file written sequentially and fsynced at the end, with writeback
/// started as it goes.
pub struct SyncedFile {
    path: PathBuf,
    file: File,
    written: u64,
    flushed: u64,
    dropped: u64,
}

impl SyncedFile {
    pub fn create(path: &Path) -> Result<SyncedFile> {
        let file = File::create(path).map_err(|e| Error::io("creating", path, e))?;
        Ok(SyncedFile { path: path.to_path_buf(), file, written: 0, flushed: 0, dropped: 0 })
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.write_all(bytes).map_err(|e| Error::io("writing", &self.path, e))?;
        self.written += bytes.len() as u64;
        if self.written - self.flushed >= WRITEBACK_EVERY {
            start_writeback(&self.file, self.flushed, self.written - self.flushed);
            self.flushed = self.written;
            // Bytes well behind the writeback front: wait until they are on
            // disk, then let the page cache drop them, so a 140 GB output
            // does not push the inputs out of memory.
            if self.flushed - self.dropped > DROP_BEHIND {
                let upto = self.flushed - DROP_BEHIND;
                drop_written(&self.file, self.dropped, upto - self.dropped);
                self.dropped = upto;
            }
        }
        Ok(())
    }

    /// Fsyncs; returns the file name and byte count.
    pub fn finish(self) -> Result<(String, u64)> {
        self.file.sync_all().map_err(|e| Error::io("syncing", &self.path, e))?;
        Ok((self.path.file_name().unwrap().to_string_lossy().into_owned(), self.written))
    }
}

/// A `SyncedFile` hashed as it is written.
pub struct HashingFile {
    file: SyncedFile,
    hasher: Sha256,
}

impl HashingFile {
    pub fn create(path: &Path) -> Result<HashingFile> {
        Ok(HashingFile { file: SyncedFile::create(path)?, hasher: Sha256::new() })
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.hasher.update(bytes);
        self.file.write(bytes)
    }

    /// Fsyncs and returns the file's record.
    pub fn finish(self) -> Result<WrittenFile> {
        let (file, bytes) = self.file.finish()?;
        Ok(WrittenFile { file, bytes, sha256: hex(&self.hasher.finalize()) })
    }
}

/// Writes a whole small file durably and returns its record.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<WrittenFile> {
    let mut f = HashingFile::create(&dir.join(name))?;
    f.write(bytes)?;
    f.finish()
}

/// Asks the kernel to start writing back a byte range now, without waiting.
/// Without this, Linux holds dirty pages until a memory threshold and the
/// final fsync pays for the whole file at once.
#[cfg(target_os = "linux")]
fn start_writeback(f: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an open descriptor; failure only loses the hint.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_f: &File, _offset: u64, _len: u64) {}

/// Waits for a written range to reach the disk and drops it from the page
/// cache (what `dd oflag=nocache` does). Only a hint: errors surface at the
/// final fsync.
#[cfg(target_os = "linux")]
fn drop_written(f: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let flags =
        libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: plain syscalls on an open descriptor.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), offset as i64, len as i64, flags);
        libc::posix_fadvise(f.as_raw_fd(), offset as i64, len as i64, libc::POSIX_FADV_DONTNEED);
    }
}

#[cfg(not(target_os = "linux"))]
fn drop_written(_f: &File, _offset: u64, _len: u64) {}
