//! Private scratch directories in the system's temporary directory
//! (`TMPDIR`): the header probes of Hub models and the Python helper
//! scripts chatvec runs. Each is created fresh, with a random name and mode
//! 0700 (`tempfile`), so a name planted in a shared `/tmp` is never
//! written through, and is named `chatvec-KIND-PID-RANDOM`, so the next
//! run removes what a killed one (kill -9) left, as it does beside outputs.

use std::path::{Path, PathBuf};
use std::sync::Once;

use crate::error::{Error, Result};

/// A scratch directory, removed with everything in it when dropped.
pub(crate) struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    /// Creates `TMPDIR/chatvec-KIND-PID-RANDOM`, private to this user.
    /// The first call in a process first clears killed runs' leftovers.
    pub(crate) fn create(kind: &str) -> Result<Scratch> {
        static CLEARED: Once = Once::new();
        let tmp = std::env::temp_dir();
        CLEARED.call_once(|| clear_leftovers(&tmp));
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix(&format!("chatvec-{kind}-{}-", std::process::id()))
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(&tmp)
            .map_err(|e| Error::io("creating a private directory in", &tmp, e))?;
        Ok(Scratch { dir })
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Whether process `pid` is running (or exists under another user).
pub(crate) fn process_alive(pid: u32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks the process; it takes
    // plain integers and sends nothing.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The pid in a scratch directory's name `chatvec-KIND-PID-RANDOM`.
fn pid_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("chatvec-")?;
    let mut parts = rest.splitn(3, '-');
    let kind = parts.next()?;
    let pid = parts.next()?;
    let random = parts.next()?;
    let word = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
    (word(kind) && word(random) && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        .then(|| pid.parse().ok())
        .flatten()
}

/// Removes the scratch directories in `tmp` that this user's killed chatvec
/// runs left (their process is gone), saying what went. Links and other
/// users' directories are never touched.
fn clear_leftovers(tmp: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(tmp) else { return };
    // SAFETY: getuid has no preconditions and cannot fail.
    let me = unsafe { libc::getuid() };
    let found: Vec<(PathBuf, u32)> = rd
        .flatten()
        .filter_map(|e| {
            let pid = pid_of(&e.file_name().to_string_lossy())?;
            let meta = std::fs::symlink_metadata(e.path()).ok()?;
            (meta.is_dir() && meta.uid() == me).then(|| (e.path(), pid))
        })
        .collect();
    for (path, pid) in found {
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => crate::ui::warn_once_done(&format!(
                "removed {}, left by a chatvec run that was killed (process {pid} is gone)",
                path.display()
            )),
            Err(e) => crate::ui::warn_once_done(&format!(
                "could not remove {}, left by a killed chatvec run: {e}",
                path.display()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_chatvec_scratch_names_carry_a_pid() {
        assert_eq!(pid_of("chatvec-probe-123-AbC9z1"), Some(123));
        assert_eq!(pid_of("chatvec-py-9-x"), Some(9));
        for other in [
            "chatvec-probe-123",
            "chatvec-probe-x1-abc",
            "chatvec--12-abc",
            "other-probe-1-a",
            "chatvec-p-1-a/b",
        ] {
            assert_eq!(pid_of(other), None, "{other}");
        }
    }

    #[test]
    fn a_scratch_directory_is_private_and_goes_when_dropped() {
        use std::os::unix::fs::PermissionsExt;
        let s = Scratch::create("test").unwrap();
        let p = s.path().to_path_buf();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(pid_of(&p.file_name().unwrap().to_string_lossy()), Some(std::process::id()));
        drop(s);
        assert!(!p.exists());
    }
}
