//! A cache of input shard sha256s, so applying several scales or methods to
//! the same inputs does not re-hash 140 GB each time (hashing is most of the
//! CPU work of an apply: sha256 runs at ~2 GB/s a core).
//!
//! An entry is keyed by the file's identity and state as the kernel reports
//! them for the open file: device, inode, size, and modification and change
//! times in nanoseconds. Rewriting a file changes its ctime
//! (which no user can set), so a stale entry is never used. `--rehash`
//! ignores the cache; `chatvec verify` never uses it.

use std::fs;
use std::path::PathBuf;

use crate::hash::sha256_hex;
use crate::model::checkpoint::FileStamp;

/// chatvec's cache directory: `$CHATVEC_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/chatvec`, else `~/.cache/chatvec` (input hashes in
/// `sha256/`, evaluation results in `eval/`).
pub(crate) fn cache_root() -> Option<PathBuf> {
    std::env::var_os("CHATVEC_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|x| PathBuf::from(x).join("chatvec")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("chatvec")))
}

/// The cache directory, or none when caching is off.
#[derive(Clone, Debug)]
pub(crate) struct HashCache {
    dir: Option<PathBuf>,
    read: bool,
}

impl HashCache {
    /// `$CHATVEC_CACHE_DIR`, else `$XDG_CACHE_HOME/chatvec`, else
    /// `~/.cache/chatvec`; entries live in its `sha256/` folder. With
    /// `rehash`, entries are written but not read.
    pub(crate) fn from_env(rehash: bool) -> HashCache {
        HashCache { dir: cache_root().map(|b| b.join("sha256")), read: !rehash }
    }

    /// A cache that neither reads nor writes.
    pub(crate) fn disabled() -> HashCache {
        HashCache { dir: None, read: false }
    }

    /// The entry file for a stamp. The path is not part of the key: device
    /// and inode already name the file, however it is reached.
    fn entry(&self, stamp: &FileStamp) -> Option<PathBuf> {
        let key =
            format!("{}\0{}\0{}\0{}\0{}", stamp.dev, stamp.ino, stamp.size, stamp.mtime_ns, stamp.ctime_ns);
        self.dir.as_ref().map(|d| d.join(sha256_hex(key.as_bytes())))
    }

    /// The cached sha256 of the file in state `stamp`, if any.
    pub(crate) fn get(&self, stamp: &FileStamp) -> Option<String> {
        if !self.read {
            return None;
        }
        let bytes = crate::json::read_capped(&self.entry(stamp)?, 1024).ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let h = text.trim();
        (h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())).then(|| h.to_string())
    }

    /// Records a hash. Failures are ignored: the cache is an optimization.
    pub(crate) fn put(&self, stamp: &FileStamp, sha256: &str) {
        let Some(entry) = self.entry(stamp) else {
            return;
        };
        let Some(dir) = entry.parent() else { return };
        if fs::create_dir_all(dir).is_err() {
            return;
        }
        let tmp = entry.with_extension(format!("tmp{}", std::process::id()));
        if fs::write(&tmp, format!("{sha256}\n")).is_ok() && fs::rename(&tmp, &entry).is_err() {
            let _ = fs::remove_file(&tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_follow_the_file_state() {
        let d = tempfile::tempdir().unwrap();
        let cache = HashCache { dir: Some(d.path().join("c")), read: true };
        let f = d.path().join("x");
        fs::write(&f, b"abc").unwrap();
        let st = FileStamp::of(&fs::metadata(&f).unwrap());
        assert_eq!(cache.get(&st), None);
        cache.put(&st, &"a".repeat(64));
        assert_eq!(cache.get(&st), Some("a".repeat(64)));
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&f, b"abd").unwrap();
        let st2 = FileStamp::of(&fs::metadata(&f).unwrap());
        assert_ne!(st, st2);
        assert_eq!(cache.get(&st2), None);
        let rehash = HashCache { read: false, ..cache.clone() };
        assert_eq!(rehash.get(&st), None);
    }
}
