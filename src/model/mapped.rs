//! Read-only file maps that survive their file being truncated underneath.
//!
//! Shards are memory-mapped so a 140 GB model costs page cache, not memory.
//! The one hazard of a map is another process truncating the file while it
//! is mapped: touching a page past the new end raises SIGBUS, which by
//! default kills chatvec on the spot (exit 135, no message, its temporary
//! output left behind).
//!
//! Instead, every map registers its address range here, and a SIGBUS
//! handler that finds the faulting address in one of them maps a page of
//! zeros over the lost page, records which map it was, and returns: the
//! read goes on with zeros. `Checkpoint::check_intact` then turns the record into an error
//! naming the file, at the next chunk boundary and before any output is
//! committed, so the run ends through the normal error path: temporary
//! output removed, exit 2. The zeros never reach a finished output.
//!
//! A fault outside every registered map is not ours: the handler restores
//! the default action and returns, so the faulting instruction runs again
//! and the process dies as it would have.

use std::fs::File;
use std::ops::Deref;
use std::path::Path;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use memmap2::Mmap;

use crate::error::{Error, Result};

/// Most maps registered at once (a merge of ten 70B models maps about 300
/// shards). A map beyond this is still used, only unguarded.
const SLOTS: usize = 4096;

/// One registered map for the signal handler: its address range
/// `[start, end)` (`start == 0`: a free slot) and whether it lost a page.
struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    lost: AtomicBool,
}

static SLOTS_IN_USE: [Slot; SLOTS] =
    [const { Slot { start: AtomicUsize::new(0), end: AtomicUsize::new(0), lost: AtomicBool::new(false) } };
        SLOTS];

/// The page size, read once before the handler is installed.
static PAGE: AtomicUsize = AtomicUsize::new(4096);

static INSTALL: Once = Once::new();

/// A read-only map of a whole file, guarded against truncation.
pub(crate) struct GuardedMap {
    map: Mmap,
    slot: Option<usize>,
}

impl GuardedMap {
    /// Maps `file` (which is `path`) read-only.
    pub(crate) fn new(file: &File, path: &Path) -> Result<GuardedMap> {
        INSTALL.call_once(install_handler);
        // SAFETY: the map is read-only and private to this process. If
        // another process rewrites the file in place, we read the new bytes
        // (the input hashes in the manifest then disagree with what was
        // merged; our writer and transformers never rewrite in place, they
        // write a new file and rename). If it truncates the file, the
        // handler below turns the SIGBUS into zeros and a lost page, which
        // `Checkpoint::check_intact` reports before any output is committed.
        let map = unsafe { Mmap::map(file) }.map_err(|e| Error::io("mapping", path, e))?;
        let slot = register(&map);
        Ok(GuardedMap { map, slot })
    }

    /// False once a page of this map was lost to a truncation (and read as
    /// zeros).
    pub(crate) fn intact(&self) -> bool {
        self.slot.is_none_or(|i| !SLOTS_IN_USE[i].lost.load(Ordering::SeqCst))
    }

    /// The error for a map that is not intact.
    pub(crate) fn lost_error(path: &Path) -> Error {
        Error::io(
            "reading",
            path,
            std::io::Error::other(
                "the file shrank while chatvec was reading it (truncated or replaced by another process); nothing was written",
            ),
        )
    }
}

impl Deref for GuardedMap {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for GuardedMap {
    fn drop(&mut self) {
        // Freed before the map itself is unmapped (fields drop after this),
        // so the handler never claims a range that is gone.
        if let Some(i) = self.slot {
            SLOTS_IN_USE[i].start.store(0, Ordering::SeqCst);
        }
    }
}

/// Takes a free slot for `map`; None when the map is empty or all are taken.
fn register(map: &Mmap) -> Option<usize> {
    let start = map.as_ptr() as usize;
    if map.is_empty() || start == 0 {
        return None;
    }
    for (i, slot) in SLOTS_IN_USE.iter().enumerate() {
        // Claim with a placeholder start, then publish the real range.
        if slot.start.compare_exchange(0, usize::MAX, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            slot.lost.store(false, Ordering::SeqCst);
            slot.end.store(start + map.len(), Ordering::SeqCst);
            slot.start.store(start, Ordering::SeqCst);
            return Some(i);
        }
    }
    None
}

fn install_handler() {
    // SAFETY: sysconf and sigaction are called with valid arguments; the
    // handler below only reads atomics and calls mmap/signal, which are
    // plain system calls.
    unsafe {
        let page = libc::sysconf(libc::_SC_PAGESIZE);
        if page > 0 {
            PAGE.store(page as usize, Ordering::SeqCst);
        }
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
}

/// The SIGBUS handler: async-signal-safe (atomics, mmap, signal).
extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in &SLOTS_IN_USE {
        let s = slot.start.load(Ordering::SeqCst);
        if s == 0 || s == usize::MAX || addr < s || addr >= slot.end.load(Ordering::SeqCst) {
            continue;
        }
        let page = PAGE.load(Ordering::SeqCst);
        let at = addr & !(page - 1);
        // SAFETY: the page lies inside a read-only map this process owns;
        // replacing it with zeros changes nothing any other code relies on,
        // and the run fails on the lost page before those zeros can be
        // committed.
        let r = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if r != libc::MAP_FAILED {
            slot.lost.store(true, Ordering::SeqCst);
            return;
        }
        break;
    }
    // Not a map of ours (or the page could not be replaced): die as we
    // would have without this handler, on the re-executed access.
    // SAFETY: signal() is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_truncated_under_its_map_reads_zeros_and_is_reported() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("shard.safetensors");
        std::fs::write(&path, vec![7u8; 3 * 65536]).unwrap();
        let f = File::open(&path).unwrap();
        let map = GuardedMap::new(&f, &path).unwrap();
        assert_eq!(map[65536 * 2], 7);
        assert!(map.intact());
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(100).unwrap();
        // Past the new end: SIGBUS without the handler.
        let tail: u64 = map[65536..].iter().map(|&b| b as u64).sum();
        assert_eq!(tail, 0);
        assert_eq!(map[10], 7);
        assert!(!map.intact());
        let e = GuardedMap::lost_error(&path);
        assert_eq!(e.exit_code(), crate::error::EXIT_IO);
        assert!(e.to_string().contains("shard.safetensors") && e.to_string().contains("shrank"), "{e}");
    }
}
