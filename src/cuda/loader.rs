//! Finds the CUDA driver and NVRTC before cudarc touches them.
//!
//! cudarc loads `libcuda` and `libnvrtc` lazily by name and panics when a
//! library is missing, so chatvec opens them itself first, with `dlopen`
//! and `RTLD_GLOBAL`, and turns a missing library into an error. A library
//! opened here stays loaded, and glibc hands cudarc's later open by name the
//! same copy (it matches loaded libraries by soname), so NVRTC may also come
//! from `$CHATVEC_NVRTC` (a file path), from `$CUDA_HOME`/`$CUDA_PATH`, or
//! from a Python environment's `nvidia` wheels, none of which are on the
//! default library path.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use crate::error::{Error, GpuError, Result};

/// The names cudarc (built for CUDA 13) tries, in its order.
const DRIVER_NAMES: &[&str] = &["libcuda.so", "libcuda.so.1"];
const NVRTC_NAMES: &[&str] = &["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"];

fn try_open(name: &str) -> bool {
    let Ok(c) = CString::new(name) else { return false };
    // SAFETY: dlopen with a valid NUL-terminated name; loading runs the
    // library's initializers, which for libcuda and libnvrtc only set up
    // their own state. The handle is kept for the process's lifetime on
    // purpose, so the library is never unloaded under cudarc.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    !h.is_null()
}

/// Opens the CUDA driver library, or says why not.
pub(crate) fn open_driver() -> Result<()> {
    if DRIVER_NAMES.iter().any(|n| try_open(n)) { Ok(()) } else { Err(Error::Gpu(GpuError::NoDriver)) }
}

/// Directories where NVRTC often lives outside the library path.
fn nvrtc_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(v) = std::env::var_os(var) {
            dirs.push(Path::new(&v).join("lib64"));
            dirs.push(Path::new(&v).join("lib"));
        }
    }
    dirs.push("/usr/local/cuda/lib64".into());
    // The nvidia-cuda-nvrtc wheel (what PyTorch installs), in the active
    // virtual environment or the chatvec SFT environment.
    let mut envs: Vec<PathBuf> = ["VIRTUAL_ENV", "CHATVEC_SFT_VENV"]
        .iter()
        .filter_map(|v| std::env::var_os(v).map(PathBuf::from))
        .collect();
    if let Some(home) = std::env::var_os("HOME") {
        envs.push(Path::new(&home).join(".cache/chatvec/sft-venv"));
    }
    for env in envs {
        let Ok(libs) = std::fs::read_dir(env.join("lib")) else { continue };
        for py in libs.flatten() {
            let nv = py.path().join("site-packages/nvidia");
            dirs.push(nv.join("cu13/lib"));
            dirs.push(nv.join("cuda_nvrtc/lib"));
        }
    }
    dirs
}

/// Opens NVRTC, or says where it looked.
pub(crate) fn open_nvrtc() -> Result<()> {
    if let Some(p) = std::env::var_os("CHATVEC_NVRTC") {
        let p = PathBuf::from(p);
        return if try_open(&p.to_string_lossy()) { Ok(()) } else { Err(Error::Gpu(GpuError::NvrtcPath(p))) };
    }
    if NVRTC_NAMES.iter().any(|n| try_open(n)) {
        return Ok(());
    }
    let dirs = nvrtc_dirs();
    for d in &dirs {
        for n in &NVRTC_NAMES[1..] {
            let f = d.join(n);
            if f.is_file() && try_open(&f.to_string_lossy()) {
                return Ok(());
            }
        }
    }
    Err(Error::Gpu(GpuError::NoNvrtc { searched: dirs }))
}
