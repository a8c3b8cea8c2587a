//! Terminal manners the library owns: the quiet flag, notes and warnings on
//! stderr, and progress bars. Nothing here writes to stdout, which carries
//! data only and is the binary's to print.
//!
//! This module imports nothing of the crate, so every room may use it.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

static QUIET: AtomicBool = AtomicBool::new(false);

/// Turns notes and progress bars off (`-q`). Warnings and errors still print.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether `-q` is in effect.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// Prints a note on stderr, unless quiet.
pub fn note(msg: &str) {
    if !quiet() {
        eprintln!("{msg}");
    }
}

/// Prints `warning: msg` on stderr, quiet or not.
pub fn warn(msg: &str) {
    eprintln!("warning: {msg}");
}

/// Whether progress bars show: not quiet, and stderr is a terminal.
pub(crate) fn show_progress() -> bool {
    !quiet() && std::io::stderr().is_terminal()
}

/// A progress bar over `total` bytes labelled `what` ("writing",
/// "downloading"), hidden when progress bars are off.
pub(crate) fn bytes_bar(what: &str, total: u64) -> ProgressBar {
    if !show_progress() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    let template = format!(
        "{{spinner}} {what} [{{bar:40}}] {{binary_bytes}}/{{binary_total_bytes}} {{binary_bytes_per_sec}} eta {{eta}}"
    );
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}
