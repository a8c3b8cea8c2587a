//! One error type for the whole tool, grouped by topic, each variant naming
//! the file, tensor or line involved so a user can act on it without a
//! debugger. The variant decides the exit code.

use std::path::{Path, PathBuf};

/// Exit code for success.
pub const EXIT_OK: i32 = 0;
/// Exit code for bad input or bad usage: the user can fix the command or files.
pub const EXIT_INPUT: i32 = 1;
/// Exit code for I/O failures and internal errors.
pub const EXIT_IO: i32 = 2;
/// Exit code after Ctrl-C / SIGTERM (128 + SIGINT), as shells expect.
pub const EXIT_INTERRUPTED: i32 = 130;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A safetensors shard whose header or layout is invalid.
    #[error("{}: {msg}", file.display())]
    Format { file: PathBuf, msg: String },

    /// A JSON side file (index, config, tokenizer, manifest) that is invalid.
    #[error("{}: {msg}", file.display())]
    BadFile { file: PathBuf, msg: String },

    /// A tensor chatvec must compute with has a dtype it does not handle.
    #[error(
        "{}: tensor '{tensor}' has dtype {dtype}; chatvec computes with BF16, F16 and F32 only",
        file.display()
    )]
    UnsupportedDtype { file: PathBuf, tensor: String, dtype: String },

    /// The inputs do not fit together (names, shapes, configs, vocabularies).
    /// `problems` lists the first offending tensors or keys.
    #[error("{what}:\n{}", problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Mismatch { what: String, problems: Vec<String> },

    /// A bad command line that clap could not catch.
    #[error("{0}")]
    Usage(String),

    /// The output directory already exists.
    #[error("output {} already exists", .0.display())]
    OutputExists(PathBuf),

    /// Not enough free disk space for the output.
    #[error("not enough free space for {}: need {need} bytes, {have} available", path.display())]
    NoSpace { path: PathBuf, need: u64, have: u64 },

    /// An operating-system I/O error, with what was being done to which path.
    #[error("{op} {}: {source}", path.display())]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },

    /// The user pressed Ctrl-C or the process got SIGTERM.
    #[error("interrupted; no output was written")]
    Interrupted,

    /// The supervised trainer (`chatvec sft`) failed; its exit code (128+n
    /// for signal n) becomes chatvec's.
    #[error("the trainer exited with code {0}")]
    Trainer(i32),

    /// Anything else that should not happen.
    #[error("internal error: {0}")]
    Internal(String),

    /// Another error, with a suggestion for the obvious next step.
    #[error("{inner}")]
    Hinted { inner: Box<Error>, hint: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds an `Io` error; use as `.map_err(|e| Error::io("reading", path, e))`.
    pub fn io(op: &'static str, path: &Path, source: std::io::Error) -> Error {
        Error::Io { op, path: path.to_path_buf(), source }
    }

    pub fn format(file: &Path, msg: impl Into<String>) -> Error {
        Error::Format { file: file.to_path_buf(), msg: msg.into() }
    }

    pub fn bad_file(file: &Path, msg: impl Into<String>) -> Error {
        Error::BadFile { file: file.to_path_buf(), msg: msg.into() }
    }

    /// Attaches a `hint:` line.
    pub fn with_hint(self, hint: impl Into<String>) -> Error {
        Error::Hinted { inner: Box::new(self), hint: hint.into() }
    }

    /// The hint to print after the error, if any.
    pub fn hint(&self) -> Option<&str> {
        match self {
            Error::Hinted { hint, .. } => Some(hint),
            Error::OutputExists(_) => Some("pass --force to replace it"),
            _ => None,
        }
    }

    /// The process exit code this error maps to (see the README).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Hinted { inner, .. } => inner.exit_code(),
            Error::Io { .. } | Error::Internal(_) | Error::NoSpace { .. } => EXIT_IO,
            Error::Interrupted => EXIT_INTERRUPTED,
            Error::Trainer(code) => *code,
            _ => EXIT_INPUT,
        }
    }
}
