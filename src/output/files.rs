//! Output files written durably: sequentially, with writeback started as
//! they grow and the pages behind dropped from the cache, fsynced at the
//! end, and hashed as they stream out (never read back).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::hash::hex;

/// Start writeback after this many unsynced bytes, so the disk works while
/// we compute instead of all at the final fsync.
const WRITEBACK_EVERY: u64 = 32 << 20;
/// How far behind the writeback front written bytes are dropped from the
/// page cache.
const DROP_BEHIND: u64 = 256 << 20;

/// A file written (or read, for inputs): its name, byte count and sha256.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WrittenFile {
    /// The file name inside its directory.
    pub file: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its sha256, lowercase hex.
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
        let name = self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok((name, self.written))
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

/// Checks that the picture at `path` may be written: a new file, or with
/// `force` an earlier picture (an SVG document), never a directory or any
/// other file (a shard, a config, an input).
pub fn check_picture_target(path: &Path, force: bool) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return Ok(()) };
    if !force {
        return Err(Error::OutputExists(path.to_path_buf()));
    }
    let mut head = [0u8; 5];
    let is_svg = meta.is_file()
        && std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head)).is_ok()
        && &head == b"<svg ";
    if !is_svg {
        return Err(Error::Usage(format!(
            "--force replaces only an earlier picture (an SVG file), and {} is not one",
            path.display()
        ))
        .with_hint("choose another --plot file"));
    }
    Ok(())
}

/// Writes a standalone file (a report's picture) whole: into a temporary
/// sibling, fsynced, then renamed over `path`, so a reader never sees half
/// of it and a link at `path` is replaced, never followed.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    if path.is_dir() {
        return Err(Error::Usage(format!("{} is a directory; give a file name", path.display())));
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.chatvec-{}.tmp", std::process::id()));
    let written = (|| {
        let mut f = SyncedFile::create(&tmp)?;
        f.write(bytes)?;
        f.finish()?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io("renaming", &tmp, e))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
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
