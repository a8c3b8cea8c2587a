//! Ctrl-C and SIGTERM: the first one asks the running job to stop at the
//! next chunk (so its temporary output is removed and nothing half-written
//! is left); a second one exits at once - except while a child trainer is
//! supervised, where every signal is forwarded to it instead (see `sft`).
//!
//! The handler only touches atomics (and `_exit`), which is what a signal
//! handler may do; it records which signal came so it can be forwarded as
//! the same signal.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

use crate::error::{EXIT_INTERRUPTED, Error, Result};

static COUNT: AtomicUsize = AtomicUsize::new(0);
static LAST: AtomicI32 = AtomicI32::new(0);
static SUPERVISING: AtomicBool = AtomicBool::new(false);
static INSTALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    LAST.store(sig, Ordering::SeqCst);
    let n = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
    if n >= 2 && !SUPERVISING.load(Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(EXIT_INTERRUPTED) };
    }
}

/// Installs the handler for SIGINT and SIGTERM. Later calls do nothing.
pub fn install() {
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return;
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with a plain handler and an empty mask
        // is valid; the handler is async-signal-safe (atomics and _exit).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Fails with `Error::Interrupted` once a signal has arrived.
pub fn check() -> Result<()> {
    if COUNT.load(Ordering::Relaxed) > 0 { Err(Error::Interrupted) } else { Ok(()) }
}

/// While set, signals never exit the process; `signals_seen` reports them.
/// Ending supervision forgets them: they were forwarded to the trainer, whose
/// exit code says what came of them, and the run's record still has to be
/// written.
pub fn set_supervising(on: bool) {
    SUPERVISING.store(on, Ordering::SeqCst);
    if !on {
        COUNT.store(0, Ordering::SeqCst);
    }
}

/// How many signals have arrived, and the last one.
pub fn signals_seen() -> (usize, i32) {
    (COUNT.load(Ordering::SeqCst), LAST.load(Ordering::SeqCst))
}
