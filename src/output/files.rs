//! Output files written durably: sequentially, hashed as they stream out
//! (never read back), and fsynced at the end.
//!
//! Large files go around the page cache (`O_DIRECT`): on the machines we
//! measured, the kernel's copy into the cache and its writeback cost more
//! CPU than the arithmetic (2.2 GB took 3.9-6.1 s buffered, 3-5 s of it
//! system time, against 1.4 s direct; see BENCHMARKS.md). Bytes are copied
//! into aligned staging buffers that a thread of the file's own writes
//! while the next one fills. Where the filesystem refuses direct I/O (tmpfs,
//! some network mounts), or `CHATVEC_WRITE=buffered` asks, the file is
//! written through the cache with writeback started as it grows and the
//! pages behind dropped, so a 140 GB output never pushes the inputs out of
//! memory either way.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::hash::hex;

/// Start writeback after this many unsynced bytes, so the disk works while
/// we compute instead of all at the final fsync.
const WRITEBACK_EVERY: u64 = 32 << 20;
/// How far behind the writeback front written bytes are dropped from the
/// page cache.
const DROP_BEHIND: u64 = 256 << 20;
/// Direct I/O: the size of one staging buffer (a write to the disk), and
/// the alignment of its address, length and file offset (4096 covers both
/// 512-byte and 4K-sector devices).
const STAGE: usize = 4 << 20;
const ALIGN: usize = 4096;
/// Staging buffers per file: one filling, the others being written.
const STAGES: usize = 3;

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

/// A file written sequentially and fsynced at the end: directly to the disk
/// where the filesystem allows it, else through the page cache.
pub(crate) struct SyncedFile {
    path: PathBuf,
    file: File,
    written: u64,
    mode: Mode,
}

enum Mode {
    /// Through the page cache: bytes up to `flushed` have writeback
    /// started, bytes up to `dropped` are out of the cache.
    Buffered {
        flushed: u64,
        dropped: u64,
    },
    Direct(Box<Direct>),
}

/// Whether output may bypass the page cache (`CHATVEC_WRITE=buffered`
/// turns it off, for a filesystem that accepts `O_DIRECT` but misbehaves).
fn direct_wanted() -> bool {
    cfg!(target_os = "linux") && std::env::var("CHATVEC_WRITE").map_or(true, |v| v != "buffered")
}

impl SyncedFile {
    pub(crate) fn create(path: &Path) -> Result<SyncedFile> {
        SyncedFile::create_as(path, direct_wanted())
    }

    fn create_as(path: &Path, direct: bool) -> Result<SyncedFile> {
        let made = |file| SyncedFile { path: path.to_path_buf(), file, written: 0, mode: Mode::buffered() };
        if direct && let Some(file) = open_direct(path) {
            let mut f = made(file);
            f.mode = Mode::Direct(Box::new(Direct::new()));
            return Ok(f);
        }
        let file = File::create(path).map_err(|e| Error::io("creating", path, e))?;
        Ok(made(file))
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<()> {
        match &mut self.mode {
            Mode::Direct(d) => d.write(&self.file, &self.path, bytes)?,
            Mode::Buffered { flushed, dropped } => {
                self.file.write_all(bytes).map_err(|e| Error::io("writing", &self.path, e))?;
                let written = self.written + bytes.len() as u64;
                if written - *flushed >= WRITEBACK_EVERY {
                    start_writeback(&self.file, *flushed, written - *flushed);
                    *flushed = written;
                    // Bytes well behind the writeback front: wait until they
                    // are on disk, then let the page cache drop them.
                    if *flushed - *dropped > DROP_BEHIND {
                        let upto = *flushed - DROP_BEHIND;
                        drop_written(&self.file, *dropped, upto - *dropped);
                        *dropped = upto;
                    }
                }
            }
        }
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Fsyncs; returns the file name and byte count.
    pub(crate) fn finish(self) -> Result<(String, u64)> {
        if let Mode::Direct(d) = self.mode {
            d.finish(&self.file, &self.path, self.written)?;
        }
        self.file.sync_all().map_err(|e| Error::io("syncing", &self.path, e))?;
        let name = self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok((name, self.written))
    }
}

impl Mode {
    fn buffered() -> Mode {
        Mode::Buffered { flushed: 0, dropped: 0 }
    }
}

/// Opens `path` for writing with `O_DIRECT`, or `None` where the filesystem
/// refuses it (the caller then writes through the cache).
#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> Option<File> {
    None
}

/// A buffer whose window `[start, start + STAGE)` is `ALIGN`-aligned in
/// memory (a plain `Vec` over-allocated, so no unsafe allocation).
struct Stage {
    buf: Vec<u8>,
    start: usize,
}

impl Stage {
    fn new() -> Stage {
        let buf = vec![0u8; STAGE + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN);
        Stage { buf, start }
    }

    fn window(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + STAGE]
    }
}

/// A full (or, at the end, padded) staging buffer for the disk thread: the
/// buffer, its length and its file offset.
type Block = (Stage, usize, u64);

/// The direct-I/O state of one file: the buffer being filled and the
/// thread writing full ones, started with the first full buffer (so a small
/// file costs no thread).
struct Direct {
    stage: Stage,
    fill: usize,
    /// File offset of `stage`'s first byte.
    offset: u64,
    disk: Option<DiskThread>,
}

struct DiskThread {
    to_disk: SyncSender<Block>,
    back: Receiver<Stage>,
    handle: JoinHandle<std::io::Result<()>>,
    made: usize,
}

impl Direct {
    fn new() -> Direct {
        Direct { stage: Stage::new(), fill: 0, offset: 0, disk: None }
    }

    fn write(&mut self, file: &File, path: &Path, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let n = bytes.len().min(STAGE - self.fill);
            self.stage.window()[self.fill..self.fill + n].copy_from_slice(&bytes[..n]);
            self.fill += n;
            bytes = &bytes[n..];
            if self.fill == STAGE {
                let next = self.free_stage(file, path)?;
                let full = std::mem::replace(&mut self.stage, next);
                self.send(path, (full, STAGE, self.offset))?;
                self.offset += STAGE as u64;
                self.fill = 0;
            }
        }
        Ok(())
    }

    /// A staging buffer to fill next: a new one while fewer than `STAGES`
    /// exist, else the next one the disk thread is done with.
    fn free_stage(&mut self, file: &File, path: &Path) -> Result<Stage> {
        let disk = match &mut self.disk {
            Some(d) => d,
            None => self.disk.insert(DiskThread::start(file, path)?),
        };
        if disk.made < STAGES {
            disk.made += 1;
            return Ok(Stage::new());
        }
        match disk.back.recv() {
            Ok(s) => Ok(s),
            Err(_) => Err(self.disk_error(path)),
        }
    }

    fn send(&mut self, path: &Path, block: Block) -> Result<()> {
        let sent = self.disk.as_ref().map(|d| d.to_disk.send(block));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(self.disk_error(path)),
        }
    }

    /// The disk thread's error, once it has stopped.
    fn disk_error(&mut self, path: &Path) -> Error {
        match self.disk.take().map(|d| d.join(path)) {
            Some(Err(e)) => e,
            _ => Error::Internal(format!("the disk thread writing {} stopped", path.display())),
        }
    }

    /// Writes the last partial block (zero-padded to the alignment, then
    /// cut back to `len`) and waits for the disk thread.
    fn finish(mut self, file: &File, path: &Path, len: u64) -> Result<()> {
        if self.fill > 0 {
            let padded = self.fill.div_ceil(ALIGN) * ALIGN;
            self.stage.window()[self.fill..padded].fill(0);
            match self.disk.is_some() {
                true => {
                    let stage = std::mem::replace(&mut self.stage, Stage { buf: Vec::new(), start: 0 });
                    self.send(path, (stage, padded, self.offset))?;
                }
                false => write_block(file, &mut self.stage, padded, self.offset)
                    .map_err(|e| Error::io("writing", path, e))?,
            }
        }
        if let Some(d) = self.disk.take() {
            d.join(path)?;
        }
        file.set_len(len).map_err(|e| Error::io("setting the size of", path, e))
    }
}

impl DiskThread {
    /// Tells the thread no more blocks come and waits for it: its write
    /// error, if it had one.
    fn join(self, path: &Path) -> Result<()> {
        drop(self.to_disk);
        match self.handle.join() {
            Ok(r) => r.map_err(|e| Error::io("writing", path, e)),
            Err(_) => Err(Error::Internal(format!("the disk thread writing {} panicked", path.display()))),
        }
    }

    fn start(file: &File, path: &Path) -> Result<DiskThread> {
        let file = file.try_clone().map_err(|e| Error::io("opening", path, e))?;
        let (to_disk, rx) = sync_channel::<Block>(STAGES);
        let (tx_back, back) = sync_channel::<Stage>(STAGES);
        let handle = std::thread::Builder::new()
            .name("chatvec-disk".into())
            .spawn(move || {
                for (mut stage, len, offset) in rx {
                    write_block(&file, &mut stage, len, offset)?;
                    let _ = tx_back.send(stage);
                }
                Ok(())
            })
            .map_err(|e| Error::io("starting a writer for", path, e))?;
        Ok(DiskThread { to_disk, back, handle, made: 1 })
    }
}

/// Writes `len` bytes of an aligned stage at `offset`. A filesystem that
/// took `O_DIRECT` at open but refuses the write (EINVAL) gets the
/// descriptor switched to buffered writes, and the block again.
fn write_block(file: &File, stage: &mut Stage, len: usize, offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let bytes = &stage.window()[..len];
    match file.write_all_at(bytes, offset) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            drop_direct_flag(file)?;
            file.write_all_at(bytes, offset)
        }
        r => r,
    }
}

#[cfg(target_os = "linux")]
fn drop_direct_flag(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; it only reads and sets flags.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) == 0
    };
    if ok { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

#[cfg(not(target_os = "linux"))]
fn drop_direct_flag(_file: &File) -> std::io::Result<()> {
    Ok(())
}

/// A `SyncedFile` hashed as it is written.
pub(crate) struct HashingFile {
    file: SyncedFile,
    hasher: Sha256,
}

impl HashingFile {
    pub(crate) fn create(path: &Path) -> Result<HashingFile> {
        Ok(HashingFile { file: SyncedFile::create(path)?, hasher: Sha256::new() })
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.hasher.update(bytes);
        self.file.write(bytes)
    }

    /// Fsyncs and returns the file's record.
    pub(crate) fn finish(self) -> Result<WrittenFile> {
        let (file, bytes) = self.file.finish()?;
        Ok(WrittenFile { file, bytes, sha256: hex(&self.hasher.finalize()) })
    }
}

/// Writes a whole small file durably and returns its record.
pub(crate) fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<WrittenFile> {
    let mut f = HashingFile::create(&dir.join(name))?;
    f.write(bytes)?;
    f.finish()
}

/// Checks that the picture at `path` may be written: a new file, or with
/// `force` an earlier picture (an SVG document), never a directory or any
/// other file (a shard, a config, an input).
pub(crate) fn check_picture_target(path: &Path, force: bool) -> Result<()> {
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
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes no two offsets in a stage share a pattern for.
    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i as u64).wrapping_mul(2654435761).rotate_right(13) as u8).collect()
    }

    /// Every size around the alignment and the staging buffer, written in
    /// uneven pieces, reads back whole and exactly as long as written, in
    /// both modes (the direct one checked to be direct).
    #[test]
    fn direct_and_buffered_files_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        // A filesystem without direct I/O (tmpfs) tests the fallback instead.
        let can = open_direct(&dir.path().join("probe")).is_some();
        let sizes = [
            0,
            1,
            ALIGN - 1,
            ALIGN,
            ALIGN + 1,
            STAGE - 1,
            STAGE,
            STAGE + 1,
            STAGES * STAGE + 4099,
            5 * STAGE,
        ];
        for direct in [true, false] {
            for (k, &n) in sizes.iter().enumerate() {
                let path = dir.path().join(format!("f{k}-{direct}"));
                let want = pattern(n);
                let mut f = SyncedFile::create_as(&path, direct).unwrap();
                assert_eq!(matches!(f.mode, Mode::Direct(_)), direct && can);
                let mut rest = &want[..];
                let mut step = 1usize;
                while !rest.is_empty() {
                    let take = rest.len().min(step);
                    f.write(&rest[..take]).unwrap();
                    rest = &rest[take..];
                    step = step * 7 % 3_000_001 + 1;
                }
                assert_eq!(f.finish().unwrap().1, n as u64);
                let got = std::fs::read(&path).unwrap();
                assert_eq!(got.len(), n, "size {n}, direct {direct}");
                assert!(got == want, "content of size {n}, direct {direct}");
            }
        }
    }

    /// A descriptor that stops taking writes under a direct write gives one
    /// I/O error naming the file, not a hang or a panic.
    #[test]
    fn a_failing_direct_write_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full");
        let mut f = SyncedFile::create_as(&path, true).unwrap();
        // Make the descriptor read-only under the writer: every write fails.
        let ro = File::open("/dev/null").unwrap();
        // SAFETY: dup2 onto our own descriptor; both stay open.
        unsafe {
            use std::os::fd::AsRawFd;
            libc::dup2(ro.as_raw_fd(), f.file.as_raw_fd());
        }
        let big = pattern(3 * STAGE);
        let err = f.write(&big).and_then(|_| f.finish().map(|_| ())).unwrap_err().to_string();
        assert!(err.contains("full"), "{err}");
    }
}
