//! Finds the CUDA driver and NVRTC before cudarc touches them.
//!
//! cudarc loads `libcuda` and `libnvrtc` lazily by name and panics when a
//! library is missing, so chatvec opens them itself first, with `dlopen`
//! and `RTLD_GLOBAL`, and turns a missing library into an error. A library
//! opened here stays loaded, and glibc hands cudarc's later open by name the
//! same copy (it matches loaded libraries by soname), so NVRTC may also come
//! from `$CHATVEC_NVRTC` (a file path), from `$CUDA_HOME`/`$CUDA_PATH`, or
//! from a Python environment's `nvidia` wheels (a virtual environment, the
//! interpreter `chatvec sft` uses, conda, the user's or the system's site
//! packages, as a GPU machine's `pip install torch` leaves them), none of
//! which are on the default library path.
//!
//! chatvec compiles its kernels to CUBINs, which a driver of the same CUDA
//! major version loads whatever its minor; a newer major does not load, so
//! the versions are compared before anything is compiled
//! (`check_versions`).

use std::ffi::{CString, OsString};
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

/// The Python environments whose `nvidia` wheels may hold NVRTC, by
/// prefix: the active virtual environment and conda environment, the
/// interpreter `chatvec sft` runs (`$CHATVEC_PYTHON`, two levels above
/// it), the SFT test environment, the user's site packages and the
/// system's.
fn python_prefixes(env: &dyn Fn(&str) -> Option<OsString>) -> Vec<PathBuf> {
    let mut prefixes: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX", "CHATVEC_SFT_VENV"]
        .iter()
        .filter_map(|v| env(v).map(PathBuf::from))
        .collect();
    if let Some(py) = env("CHATVEC_PYTHON").map(PathBuf::from)
        && let Some(prefix) = py.parent().and_then(Path::parent)
    {
        prefixes.push(prefix.to_path_buf());
    }
    if let Some(home) = env("HOME").map(PathBuf::from) {
        prefixes.push(home.join(".cache/chatvec/sft-venv"));
        prefixes.push(home.join(".local"));
    }
    prefixes.extend(["/usr/local", "/usr", "/opt/conda"].map(PathBuf::from));
    prefixes
}

/// Directories where NVRTC often lives outside the library path, in the
/// order they are tried; `env` reads the environment.
fn nvrtc_dirs(env: &dyn Fn(&str) -> Option<OsString>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(v) = env(var) {
            dirs.push(Path::new(&v).join("lib64"));
            dirs.push(Path::new(&v).join("lib"));
        }
    }
    dirs.push("/usr/local/cuda/lib64".into());
    // The nvidia-cuda-nvrtc wheel (what PyTorch installs): `nvidia/cu13/lib`
    // for CUDA 13, `nvidia/cuda_nvrtc/lib` for 12, in any Python 3's site
    // or dist packages (Debian's system Python uses `dist-packages`, and
    // `lib/python3/dist-packages` too).
    for prefix in python_prefixes(env) {
        for lib in ["lib", "lib64"] {
            let Ok(entries) = std::fs::read_dir(prefix.join(lib)) else { continue };
            let mut pythons: Vec<PathBuf> = entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
                .map(|e| e.path())
                .collect();
            pythons.sort();
            for py in pythons {
                for packages in ["site-packages", "dist-packages"] {
                    let nv = py.join(packages).join("nvidia");
                    dirs.push(nv.join("cu13/lib"));
                    dirs.push(nv.join("cuda_nvrtc/lib"));
                }
            }
        }
    }
    dirs
}

/// The NVRTC library files in `dirs`, newest major first within a
/// directory, in the directories' order.
fn nvrtc_files(dirs: &[PathBuf]) -> Vec<PathBuf> {
    dirs.iter()
        .flat_map(|d| NVRTC_NAMES[1..].iter().map(move |n| d.join(n)))
        .filter(|f| f.is_file())
        .collect()
}

/// Opens NVRTC and says which one: a file path, or the name the library
/// path resolved. Otherwise says where it looked.
pub(crate) fn open_nvrtc() -> Result<String> {
    let env = |v: &str| std::env::var_os(v);
    if let Some(p) = env("CHATVEC_NVRTC") {
        let p = PathBuf::from(p);
        return if try_open(&p.to_string_lossy()) {
            Ok(p.display().to_string())
        } else {
            Err(Error::Gpu(GpuError::NvrtcPath(p)))
        };
    }
    if let Some(n) = NVRTC_NAMES.iter().find(|n| try_open(n)) {
        return Ok(format!("{n} from the library path"));
    }
    let dirs = nvrtc_dirs(&env);
    match nvrtc_files(&dirs).into_iter().find(|f| try_open(&f.to_string_lossy())) {
        Some(f) => Ok(f.display().to_string()),
        None => Err(Error::Gpu(GpuError::NoNvrtc { searched: dirs })),
    }
}

/// Checks that the NVRTC opened (`found`) is no newer a CUDA major version
/// than the driver: CUBINs load on a driver of their major version or a
/// later one. Both libraries must be open.
pub(crate) fn check_nvrtc_against_driver(found: &str) -> Result<()> {
    let (mut major, mut minor, mut driver) = (0, 0, 0);
    // SAFETY: both libraries are loaded (`open_driver`, `open_nvrtc`);
    // each call writes its out-pointers, which point to live locals.
    let ok = unsafe {
        cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor)
            == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS
            && cudarc::driver::sys::cuDriverGetVersion(&mut driver)
                == cudarc::driver::sys::CUresult::CUDA_SUCCESS
    };
    if !ok {
        return Err(Error::Gpu(GpuError::Driver {
            call: "reading the NVRTC and driver versions".into(),
            detail: format!("NVRTC {found}"),
        }));
    }
    check_versions((major, minor), found, driver)
}

/// `check_nvrtc_against_driver` on the numbers: `driver` as the driver
/// reports it (`1000 * major + 10 * minor`).
fn check_versions(nvrtc: (i32, i32), found: &str, driver: i32) -> Result<()> {
    let driver = (driver / 1000, driver % 1000 / 10);
    if nvrtc.0 > driver.0 {
        return Err(Error::Gpu(GpuError::NvrtcTooNew { nvrtc, found: found.to_string(), driver }));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC wheels where pip leaves them on a GPU machine: a system-wide
    /// install (`/usr/local/lib/python3.12/dist-packages`), the interpreter
    /// `chatvec sft` is told to use, a conda environment, the user's site
    /// packages; each found, in the order given, CUDA 13's layout before
    /// 12's, and nothing where there is no library file.
    #[test]
    fn nvrtc_is_found_in_any_python_environments_nvidia_wheels() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let put = |rel: &str| {
            let f = root.join(rel);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(&f, b"").unwrap();
            f
        };
        let sft = put("sft/lib/python3.12/site-packages/nvidia/cu13/lib/libnvrtc.so.13");
        let conda = put("conda/lib/python3.11/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12");
        let user = put("home/.local/lib/python3.12/site-packages/nvidia/cu13/lib/libnvrtc.so.13");
        let toolkit = put("cuda/lib64/libnvrtc.so.13");
        // A directory with the layout but no library is passed over.
        std::fs::create_dir_all(root.join("venv/lib/python3.12/site-packages/nvidia/cu13/lib")).unwrap();
        let vars: Vec<(&str, PathBuf)> = vec![
            ("CUDA_HOME", root.join("cuda")),
            ("VIRTUAL_ENV", root.join("venv")),
            ("CONDA_PREFIX", root.join("conda")),
            ("CHATVEC_PYTHON", root.join("sft/bin/python3")),
            ("HOME", root.join("home")),
        ];
        let env = |v: &str| vars.iter().find(|(k, _)| *k == v).map(|(_, p)| p.clone().into_os_string());
        let found = nvrtc_files(&nvrtc_dirs(&env));
        let ours: Vec<&PathBuf> = found.iter().filter(|f| f.starts_with(root)).collect();
        assert_eq!(ours, [&toolkit, &conda, &sft, &user], "{found:?}");
        // The system-wide prefixes are searched too.
        let dirs = nvrtc_dirs(&|_| None);
        assert!(
            dirs.iter().any(|d| d.starts_with("/usr/local/lib") || d == Path::new("/usr/local/cuda/lib64"))
        );
    }

    /// NVRTC 13 against a 12.8 driver is refused, naming both and what to
    /// set; a newer driver, or the same major with another minor, passes.
    #[test]
    fn an_nvrtc_newer_than_the_driver_is_refused_naming_both() {
        let e = check_versions((13, 0), "/x/libnvrtc.so.13", 12080).unwrap_err();
        let said = e.to_string();
        assert!(
            said.contains("NVRTC 13.0 (/x/libnvrtc.so.13) is newer than the CUDA driver (12.8)")
                && said.contains("set CHATVEC_NVRTC to a libnvrtc.so.12"),
            "{said}"
        );
        assert!(matches!(e, Error::Gpu(GpuError::NvrtcTooNew { nvrtc: (13, 0), driver: (12, 8), .. })));
        check_versions((12, 8), "a", 13000).unwrap();
        check_versions((13, 1), "a", 13000).unwrap();
        check_versions((13, 0), "a", 13020).unwrap();
    }
}
