//! Ctrl-C and SIGTERM: the first one asks the running job to stop at the
//! next chunk (so its temporary output is removed and nothing half-written
//! is left); a second one exits at once, except while a child trainer is
//! supervised, where every signal is forwarded to it instead (see `sft`).
//!
//! Signals are caught by `signal-hook` and handled on a thread of their
//! own, so no code of ours runs inside a signal handler; which signal came
//! is kept, so it can be forwarded to the trainer as the same signal.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::error::{EXIT_INTERRUPTED, Error, Result};

static COUNT: AtomicUsize = AtomicUsize::new(0);
static LAST: AtomicI32 = AtomicI32::new(0);
static SUPERVISING: AtomicBool = AtomicBool::new(false);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Catches SIGINT and SIGTERM for the rest of the process. Later calls do
/// nothing. If the handlers cannot be installed, the default ones stay (the
/// process dies on the signal), which loses only the clean-up.
pub fn install() {
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return;
    }
    let Ok(mut signals) = Signals::new([SIGINT, SIGTERM]) else { return };
    let spawned = std::thread::Builder::new().name("chatvec-signals".into()).spawn(move || {
        for sig in signals.forever() {
            LAST.store(sig, Ordering::SeqCst);
            let n = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
            if n >= 2 && !SUPERVISING.load(Ordering::SeqCst) {
                // The user insists: leave now, without unwinding or atexit
                // handlers that could block.
                signal_hook::low_level::exit(EXIT_INTERRUPTED);
            }
        }
    });
    if spawned.is_err() {
        INSTALLED.store(false, Ordering::SeqCst);
    }
}

/// Fails with `Error::Interrupted` once a signal has arrived.
pub(crate) fn check() -> Result<()> {
    if COUNT.load(Ordering::Relaxed) > 0 { Err(Error::Interrupted) } else { Ok(()) }
}

/// While set, signals never exit the process; `signals_seen` reports them.
/// Ending supervision forgets them: they were forwarded to the trainer, whose
/// exit code says what came of them, and the run's record still has to be
/// written.
pub(crate) fn set_supervising(on: bool) {
    SUPERVISING.store(on, Ordering::SeqCst);
    if !on {
        COUNT.store(0, Ordering::SeqCst);
    }
}

/// How many signals have arrived, and the last one.
pub(crate) fn signals_seen() -> (usize, i32) {
    (COUNT.load(Ordering::SeqCst), LAST.load(Ordering::SeqCst))
}
