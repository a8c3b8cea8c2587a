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

thread_local! {
    /// Set while this thread runs `hushed`.
    static HUSHED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with notes, warnings and progress bars of this thread held
/// back: a rehearsal whose output the real run repeats (planning on
/// headers before a download) must not print everything twice. Scoped to
/// the call and the calling thread, so nothing else running is silenced,
/// and restored even if `f` panics.
pub fn hushed<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            HUSHED.with(|h| h.set(self.0));
        }
    }
    let _restore = Restore(HUSHED.with(|h| h.replace(true)));
    f()
}

fn silent() -> bool {
    HUSHED.with(|h| h.get())
}

/// Prints a note on stderr, unless quiet.
pub fn note(msg: &str) {
    if !quiet() && !silent() {
        eprintln!("{}", printable(msg));
    }
}

/// Prints `warning: msg` on stderr, quiet or not.
pub fn warn(msg: &str) {
    if !silent() {
        eprintln!("warning: {}", printable(msg));
    }
}

/// Prints `warning: msg` on stderr even during a silent rehearsal: for
/// something done once that the real run will not repeat or say again
/// (a killed run's leftovers removed, a planted link cleared).
pub fn warn_once_done(msg: &str) {
    eprintln!("warning: {}", printable(msg));
}

/// The longest run of non-blank characters shown whole; longer ones (a
/// 100 KB tensor name from a hostile header) keep their head and tail.
/// Long enough for any real path or tensor name.
const MAX_WORD: usize = 240;

/// The longest message shown whole.
const MAX_MESSAGE: usize = 16 * 1024;

/// `msg` made safe for a terminal. Messages quote strings from the inputs
/// (tensor names, `refs/main`, dataset lines) which may hold control
/// characters, right-to-left overrides or NUL that would hide or forge text:
/// every character Rust's `escape_debug` would escape is shown escaped
/// (`\u{202e}`), except the line breaks and tabs of chatvec's own layout, and
/// over-long words and messages are cut, saying how much.
pub fn printable(msg: &str) -> String {
    escaped(msg, MAX_MESSAGE)
}

/// `msg` escaped and its long words cut as by [`printable`], and cut after
/// `max` bytes. A report on stdout passes `usize::MAX`: it is shown whole
/// (no real tensor name comes near the word limit), but no escape sequence
/// of a hostile name reaches the terminal.
pub fn escaped(msg: &str, max: usize) -> String {
    let mut out = String::with_capacity(msg.len().min(max) + 16);
    let mut word: Vec<char> = Vec::new();
    let flush = |word: &mut Vec<char>, out: &mut String| {
        if word.len() > MAX_WORD {
            let head: String = word[..MAX_WORD / 2].iter().collect();
            let tail: String = word[word.len() - MAX_WORD / 4..].iter().collect();
            let cut = word.len() - MAX_WORD / 2 - MAX_WORD / 4;
            out.push_str(&format!("{head}...[{cut} characters cut]...{tail}"));
        } else {
            out.extend(word.iter());
        }
        word.clear();
    };
    for (i, c) in msg.chars().enumerate() {
        if out.len() > max {
            let rest = msg.chars().count() - i;
            out.push_str(&format!(" ...[{rest} more characters cut]"));
            return out;
        }
        if c == '\n' || c == '\t' || c == ' ' {
            flush(&mut word, &mut out);
            out.push(c);
        } else if matches!(c, '"' | '\'' | '\\') {
            word.push(c);
        } else {
            // A character after another: combining marks (Japanese dakuten,
            // accents in NFD paths) stay as they are, as they would mid-string.
            let pair: String = ['a', c].iter().collect();
            word.extend(pair.escape_debug().skip(1));
        }
    }
    flush(&mut word, &mut out);
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A rehearsal's hush holds this thread's notes only, for the call
    /// only, and is lifted even when the call panics.
    #[test]
    fn hushed_is_scoped_to_the_call_and_the_thread() {
        assert!(!silent());
        hushed(|| {
            assert!(silent());
            assert!(!std::thread::spawn(silent).join().unwrap(), "another thread was hushed");
            hushed(|| assert!(silent()));
            assert!(silent(), "a nested hush lifted the outer one");
        });
        assert!(!silent());
        let _ = std::panic::catch_unwind(|| hushed(|| panic!("in a rehearsal")));
        assert!(!silent());
    }

    #[test]
    fn printable_keeps_layout_and_text_and_escapes_controls() {
        let msg = "tensor 'model.\u{202e}x' in \"日本語\" cafe\u{301}:\n  - a\tb \\ \r\u{7f}";
        assert_eq!(
            printable(msg),
            "tensor 'model.\\u{202e}x' in \"日本語\" cafe\u{301}:\n  - a\tb \\ \\r\\u{7f}"
        );
    }

    #[test]
    fn printable_cuts_long_words_and_long_messages() {
        let word = "x".repeat(1000);
        let shown = printable(&format!("name {word} end"));
        assert_eq!(
            shown.len(),
            "name  end".len() + MAX_WORD / 2 + MAX_WORD / 4 + "...[820 characters cut]...".len()
        );
        assert!(shown.ends_with(" end"));
        let many = "word ".repeat(10_000);
        let shown = printable(&many);
        assert!(
            shown.len() < MAX_MESSAGE + 100 && shown.ends_with("more characters cut]"),
            "{}",
            shown.len()
        );
    }
}
