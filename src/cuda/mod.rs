//! The CUDA path: device selection, kernel compilation and the streaming
//! engine that runs plan jobs and merge statistics on a GPU.
//!
//! Nothing here needs the CUDA toolkit at build time: the driver and NVRTC
//! are loaded at run time (`loader`), the kernels in `kernels/` are
//! embedded as source and compiled by NVRTC for the device found. Every
//! kernel computes what the CPU code computes, in the same f32/f64
//! operations in the same order, so the output bytes are the same on both
//! devices (contract 1); the GPU tests compare them.
//!
//! This room reads plans and merge statistics; only the executor imports it.

mod engine;
mod jobs;
mod kernels;
mod loader;
mod passes;
mod staging;

use std::fmt;

use crate::error::{Error, GpuError, Result};
use crate::ui;
pub(crate) use engine::{Gpu, KArg, SLOTS};
pub(crate) use passes::GpuPasses;
pub use staging::stage_into;

/// `--device`: where the heavy arithmetic runs. The output bytes are the
/// same on every device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The CPU's cores.
    Cpu,
    /// GPU `n` (`cuda` is `cuda:0`).
    Cuda(usize),
    /// A GPU when one works, else the CPU.
    #[default]
    Auto,
}

impl DeviceChoice {
    /// Parses `cpu`, `cuda` (= `cuda:0`, also `gpu`), `cuda:N` or `auto`.
    pub fn parse(s: &str) -> std::result::Result<DeviceChoice, String> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
            "auto" => Ok(DeviceChoice::Auto),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
                _ => Err(format!("'{s}' is not a device: expected cpu, cuda, cuda:N or auto")),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceChoice::Auto => write!(f, "auto"),
        }
    }
}

/// Opens GPU `ordinal` with at most `budget` bytes of device memory
/// (`None`: half of what is free, at most 8 GiB). Any failure (no driver,
/// no NVRTC, no such device, a driver or compiler error) is an error,
/// never a panic: cudarc panics on some of these, so its calls run under
/// `catch_unwind`.
pub(crate) fn open(ordinal: usize, budget: Option<u64>) -> Result<Gpu> {
    loader::open_driver()?;
    let nvrtc = loader::open_nvrtc()?;
    without_panic(|| loader::check_nvrtc_against_driver(&nvrtc))?;
    without_panic(|| Gpu::open(ordinal, budget))
}

/// Runs `f`, turning a panic inside cudarc into an error.
fn without_panic<T>(f: impl FnOnce() -> Result<T> + std::panic::UnwindSafe) -> Result<T> {
    std::panic::catch_unwind(f).unwrap_or_else(|p| {
        let message = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        Err(Error::Gpu(GpuError::Panicked(message.to_string())))
    })
}

/// Why a device cannot be used, as the `--device` error.
fn unusable(device: DeviceChoice, e: Error) -> Error {
    match e {
        Error::Gpu(reason) => Error::Device { device: device.to_string(), reason },
        other => other,
    }
}

/// Resolves `--device`: the GPU to use, or `None` for the CPU, with a note
/// naming the device. `auto` runs on the CPU when there is no GPU driver
/// (the usual machine: said plainly), and warns with the reason when a
/// driver is there but the GPU cannot be used.
pub(crate) fn select(choice: DeviceChoice, budget: Option<u64>) -> Result<Option<Gpu>> {
    match choice {
        DeviceChoice::Cpu => Ok(None),
        DeviceChoice::Cuda(n) => {
            let g = open(n, budget).map_err(|e| unusable(choice, e))?;
            ui::note(&format!("device: {}", g.describe()));
            Ok(Some(g))
        }
        DeviceChoice::Auto => {
            if loader::open_driver().is_err() {
                ui::note("device: cpu");
                return Ok(None);
            }
            match open(0, budget) {
                Ok(g) => {
                    ui::note(&format!("device: {} (auto)", g.describe()));
                    Ok(Some(g))
                }
                Err(e) => {
                    ui::warn(&format!(
                        "a GPU driver is installed but the GPU cannot be used ({e}); running on the CPU"
                    ));
                    ui::note("device: cpu");
                    Ok(None)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert_eq!(DeviceChoice::parse("cpu"), Ok(DeviceChoice::Cpu));
        assert_eq!(DeviceChoice::parse("cuda"), Ok(DeviceChoice::Cuda(0)));
        assert_eq!(DeviceChoice::parse("cuda:3"), Ok(DeviceChoice::Cuda(3)));
        assert_eq!(DeviceChoice::parse("auto"), Ok(DeviceChoice::Auto));
        assert!(DeviceChoice::parse("cuda:x").unwrap_err().contains("cuda:N"));
        assert!(DeviceChoice::parse("tpu").is_err());
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
    }

    /// A GPU that is not there is a `--device` error of a kind a caller
    /// can match: no driver here, no such GPU on a machine with one.
    #[test]
    fn a_missing_gpu_is_a_device_error_of_a_known_kind() {
        let Err(e) = select(DeviceChoice::Cuda(99), None) else { panic!("cuda:99 opened") };
        match e.kind() {
            Error::Device { device, reason } => {
                assert_eq!(device, "cuda:99");
                assert!(
                    matches!(
                        reason,
                        GpuError::NoDriver
                            | GpuError::NoNvrtc { .. }
                            | GpuError::NoSuchGpu { ordinal: 99, .. }
                    ),
                    "{reason:?}"
                );
            }
            other => panic!("not a device error: {other:?}"),
        }
    }
}
