//! One error type for the whole tool, grouped by topic, each variant naming
//! the file, tensor or line involved so a user can act on it without a
//! debugger. The variant, never the message text, decides the exit code.

use std::path::{Path, PathBuf};

use crate::units::human_bytes;

/// Exit code for success.
pub const EXIT_OK: i32 = 0;
/// Exit code for bad input or bad usage: the user can fix the command or files.
pub const EXIT_INPUT: i32 = 1;
/// Exit code for I/O, network and internal errors.
pub const EXIT_IO: i32 = 2;
/// Exit code after Ctrl-C / SIGTERM (128 + SIGINT), as shells expect.
pub const EXIT_INTERRUPTED: i32 = 130;

/// Everything that can go wrong, by topic.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A safetensors or PyTorch shard (or LoRA adapter) whose header or
    /// layout is invalid.
    #[error("{}: {kind}", file.display())]
    Format {
        /// The shard.
        file: PathBuf,
        /// What is wrong, by kind, naming the tensor.
        kind: FormatError,
    },

    /// A JSON, TOML or YAML file (index, config, tokenizer, manifest, recipe,
    /// dataset) that is invalid.
    #[error("{}: {msg}", file.display())]
    BadFile {
        /// The file.
        file: PathBuf,
        /// What is wrong, naming the key or line.
        msg: String,
    },

    /// A tensor chatvec must compute with has a dtype it does not handle.
    #[error(
        "{}: tensor '{tensor}' has dtype {dtype}; chatvec computes with BF16, F16 and F32 only",
        file.display()
    )]
    UnsupportedDtype {
        /// The shard holding the tensor.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its dtype.
        dtype: String,
    },

    /// The inputs do not fit together (names, shapes, configs, vocabularies).
    #[error("{what}:\n{}", problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Mismatch {
        /// What was being matched.
        what: String,
        /// The first offending tensors or keys.
        problems: Vec<String>,
    },

    /// A bad command line or option value that clap could not catch.
    #[error("{0}")]
    Usage(String),

    /// The output directory already exists.
    #[error("output {} already exists", .0.display())]
    OutputExists(PathBuf),

    /// Not enough free disk space for the output.
    #[error(
        "not enough free space in {}: the output needs {} ({} of weights and {} kept for side files), and {} is available",
        path.display(),
        human_bytes(weights.saturating_add(*reserve)),
        human_bytes(*weights),
        human_bytes(*reserve),
        human_bytes(*have)
    )]
    NoSpace {
        /// The directory the output goes to.
        path: PathBuf,
        /// Bytes of weights to write (every output of a sweep).
        weights: u64,
        /// Bytes kept free beyond them, for side files (config, tokenizer,
        /// manifest), once per job.
        reserve: u64,
        /// Bytes available.
        have: u64,
    },

    /// An operating-system I/O error, with what was being done to which path.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done ("reading", "renaming into place", ...).
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },

    /// The Hugging Face Hub could not be reached, or a transfer broke off.
    /// Nothing the user typed is wrong; running again may work.
    #[error("{0}")]
    Network(String),

    /// The Hub answered, but not with what was asked for (a gated or
    /// private repository, a corrupt file).
    #[error("{0}")]
    Hub(String),

    /// The Hub has no such repository, revision or file (for this caller).
    #[error("{0}")]
    NotFound(String),

    /// A `--device` that cannot be used here (no driver, no such GPU).
    #[error("--device {device}: {reason}")]
    Device {
        /// The device asked for (`cuda:0`).
        device: String,
        /// Why it cannot be used.
        reason: GpuError,
    },

    /// A CUDA call failed while a job ran on the GPU.
    #[error("CUDA: {0}")]
    Gpu(GpuError),

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
    Hinted {
        /// The error.
        inner: Box<Error>,
        /// The suggestion, printed on a `hint:` line.
        hint: String,
    },
}

/// What is wrong with a weight file, by kind (`Error::Format`), so callers
/// and tests match the kind, not the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The file ends before its header says it should (or has bytes its
    /// tensors do not account for).
    #[error("{0}")]
    Truncated(String),
    /// The safetensors header as a whole: its length, UTF-8, JSON,
    /// `__metadata__`.
    #[error("{0}")]
    Header(String),
    /// One tensor's entry: dtype, shape, data offsets, a second copy.
    #[error("tensor '{tensor}': {problem}")]
    Tensor {
        /// The tensor's name.
        tensor: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A PyTorch checkpoint's zip archive or pickle.
    #[error("{0}")]
    Pickle(String),
    /// A LoRA adapter's tensors that are not the factors its config says.
    #[error("{0}")]
    Adapter(String),
}

/// What went wrong with the GPU, by kind (`Error::Gpu`, `Error::Device`),
/// so callers and tests match the kind, not the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    /// No CUDA driver library could be loaded.
    #[error("no CUDA driver (libcuda.so.1) could be loaded: is an NVIDIA driver installed?")]
    NoDriver,
    /// `CHATVEC_NVRTC` names a library that could not be loaded.
    #[error("CHATVEC_NVRTC={} could not be loaded", .0.display())]
    NvrtcPath(PathBuf),
    /// NVRTC was found nowhere chatvec looks.
    #[error(
        "NVRTC (libnvrtc.so.13 or .12) could not be loaded from the library path or {}; set CHATVEC_NVRTC to its path (it ships with the CUDA toolkit and the nvidia-cuda-nvrtc wheel)",
        searched.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NoNvrtc {
        /// The directories searched besides the library path.
        searched: Vec<PathBuf>,
    },
    /// The NVRTC found is of a newer major version than the driver: its
    /// CUBINs would not load.
    #[error(
        "NVRTC {}.{} ({found}) is newer than the CUDA driver ({}.{}): kernels it compiles need a {}.x driver; set CHATVEC_NVRTC to a libnvrtc.so.{} (the CUDA {}.x toolkit or the nvidia-cuda-nvrtc-cu{} wheel), or update the driver",
        nvrtc.0, nvrtc.1, driver.0, driver.1, nvrtc.0, driver.0, driver.0, driver.0
    )]
    NvrtcTooNew {
        /// NVRTC's (major, minor).
        nvrtc: (i32, i32),
        /// Which library that is (a path, or the name the library path gave).
        found: String,
        /// The driver's CUDA (major, minor).
        driver: (i32, i32),
    },
    /// The driver sees no GPU at all.
    #[error("the CUDA driver sees no GPU")]
    NoGpu,
    /// `cuda:N` past the GPUs the driver sees.
    #[error("there is no GPU {ordinal}: the driver sees {count}")]
    NoSuchGpu {
        /// The GPU asked for.
        ordinal: usize,
        /// The GPUs there are.
        count: i32,
    },
    /// A driver call failed.
    #[error("{call}: {detail}")]
    Driver {
        /// What was being done ("creating a context").
        call: String,
        /// The driver's error.
        detail: String,
    },
    /// NVRTC could not build the kernels.
    #[error("NVRTC {step}: {detail}")]
    Compile {
        /// The step that failed ("could not compile kernels/ for sm_90").
        step: String,
        /// NVRTC's error, and the compile log when there is one.
        detail: String,
    },
    /// A kernel could not be loaded or launched.
    #[error("kernel {kernel}: {detail}")]
    Kernel {
        /// The kernel's name.
        kernel: String,
        /// The driver's error.
        detail: String,
    },
    /// The CUDA libraries panicked (cudarc on an unexpected driver).
    #[error("the CUDA libraries failed: {0}")]
    Panicked(String),
}

/// `Result` with chatvec's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds an `Io` error; use as `.map_err(|e| Error::io("reading", path, e))`.
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Error {
        Error::Io { op, path: path.to_path_buf(), source }
    }

    pub(crate) fn format(file: &Path, kind: FormatError) -> Error {
        Error::Format { file: file.to_path_buf(), kind }
    }

    /// `Error::Format` of kind `Tensor`.
    pub(crate) fn bad_tensor(file: &Path, tensor: &str, problem: impl Into<String>) -> Error {
        Error::format(file, FormatError::Tensor { tensor: tensor.into(), problem: problem.into() })
    }

    pub(crate) fn bad_file(file: &Path, msg: impl Into<String>) -> Error {
        Error::BadFile { file: file.to_path_buf(), msg: msg.into() }
    }

    /// Attaches a `hint:` line: the obvious next step. A hint the error
    /// already carries is kept after the new one.
    pub fn with_hint(self, hint: impl Into<String>) -> Error {
        let hint = match self.hint() {
            Some(old) => format!("{}; {old}", hint.into()),
            None => hint.into(),
        };
        Error::Hinted { inner: Box::new(self), hint }
    }

    /// The hint to print after the error, if any.
    pub fn hint(&self) -> Option<&str> {
        match self {
            Error::Hinted { hint, .. } => Some(hint),
            Error::OutputExists(_) => Some("pass --force to replace it"),
            _ => None,
        }
    }

    /// The error without its hint.
    pub fn kind(&self) -> &Error {
        match self {
            Error::Hinted { inner, .. } => inner.kind(),
            e => e,
        }
    }

    /// The process exit code this error maps to (see the README).
    pub fn exit_code(&self) -> i32 {
        match self.kind() {
            Error::Io { .. }
            | Error::Internal(_)
            | Error::NoSpace { .. }
            | Error::Network(_)
            | Error::Gpu(_) => EXIT_IO,
            Error::Interrupted => EXIT_INTERRUPTED,
            Error::Trainer(code) => *code,
            _ => EXIT_INPUT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_variant_through_hints() {
        let net = Error::Network("cannot reach the Hub".into()).with_hint("retry");
        assert_eq!(net.exit_code(), EXIT_IO);
        assert!(matches!(net.kind(), Error::Network(_)));
        assert_eq!(Error::Hub("gated".into()).exit_code(), EXIT_INPUT);
        assert_eq!(
            Error::Device { device: "cuda:0".into(), reason: GpuError::NoDriver }.exit_code(),
            EXIT_INPUT
        );
        let launch =
            Error::Gpu(GpuError::Kernel { kernel: "add_diff_bf16".into(), detail: "launch failed".into() });
        assert_eq!(launch.exit_code(), EXIT_IO);
        assert_eq!(launch.to_string(), "CUDA: kernel add_diff_bf16: launch failed");
        assert_eq!(Error::Trainer(137).exit_code(), 137);
        assert_eq!(Error::Interrupted.exit_code(), EXIT_INTERRUPTED);
    }
}
