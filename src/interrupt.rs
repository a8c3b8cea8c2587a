//! Ctrl-C and SIGTERM: the first one asks the running job to stop at the
//! next chunk (so its temporary output is removed and nothing half-written
//! is left); a second one exits at once.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{EXIT_INTERRUPTED, Error, Result};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs the handler. Safe to call more than once (later calls do nothing).
pub fn install() {
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            std::process::exit(EXIT_INTERRUPTED);
        }
    });
}

/// Fails with `Error::Interrupted` once a signal has arrived.
pub fn check() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) { Err(Error::Interrupted) } else { Ok(()) }
}
