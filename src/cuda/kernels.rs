//! The kernel sources (kernels/, embedded) and their compilation by NVRTC.

use std::ffi::{CString, c_char};

use cudarc::nvrtc::{result as nvrtc, sys};

use crate::error::{Error, GpuError, Result};

/// An NVRTC step that failed.
fn compile_error(step: &str, e: cudarc::nvrtc::result::NvrtcError) -> Error {
    Error::Gpu(GpuError::Compile { step: step.into(), detail: format!("{e:?}") })
}

/// kernels/, in dependency order, as one program.
pub(crate) fn kernel_source() -> String {
    [
        include_str!("../../kernels/common.cuh"),
        include_str!("../../kernels/arith.cu"),
        include_str!("../../kernels/merge.cu"),
        include_str!("../../kernels/select.cu"),
        include_str!("../../kernels/reduce.cu"),
    ]
    .join("\n")
}

/// Compiles the kernels to a CUBIN for compute capability `major.minor`.
/// A CUBIN rather than PTX, so the driver need not be as new as NVRTC.
/// `--fmad=false` keeps every multiply and add separately rounded, as on
/// the CPU. Needs NVRTC loaded (`loader::open_nvrtc`), not a GPU.
pub(crate) fn compile_cubin(major: i32, minor: i32) -> Result<Vec<u8>> {
    let src =
        CString::new(kernel_source()).map_err(|_| Error::Internal("kernels/ holds a NUL byte".into()))?;
    let prog = nvrtc::create_program(&src, Some(c"chatvec_kernels.cu"))
        .map_err(|e| compile_error("could not create the program", e))?;
    let arch = format!("--gpu-architecture=sm_{major}{minor}");
    let opts = [arch.as_str(), "--fmad=false", "-std=c++17"];
    // SAFETY (this and the calls below): `prog` is the live program made
    // above, destroyed once at the end; the CUBIN buffer is sized from
    // nvrtcGetCUBINSize before NVRTC writes into it.
    let out = unsafe { nvrtc::compile_program(prog, &opts) }
        .map_err(|e| {
            // SAFETY: as above.
            let log = unsafe { nvrtc::get_program_log(prog) }
                .map(|l| {
                    let bytes: Vec<u8> = l.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
                    String::from_utf8_lossy(&bytes).into_owned()
                })
                .unwrap_or_default();
            let step = format!("could not compile kernels/ for sm_{major}{minor}");
            Error::Gpu(GpuError::Compile { step, detail: format!("{e:?}:\n{log}") })
        })
        .and_then(|()| {
            let mut size = 0usize;
            // SAFETY: as above; `size` is a valid out-pointer.
            unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
                .result()
                .map_err(|e| compile_error("gave no CUBIN size", e))?;
            let mut cubin = vec![0u8; size];
            // SAFETY: `cubin` holds the `size` bytes NVRTC reported.
            unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char) }
                .result()
                .map_err(|e| compile_error("gave no CUBIN", e))?;
            Ok(cubin)
        });
    // SAFETY: as above; `prog` is not used after this.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kernels/ compiles for Hopper and Ampere through chatvec's own NVRTC
    /// path, without a GPU. `.ci/run` runs it with the SFT venv's NVRTC.
    #[test]
    #[ignore = "needs NVRTC (libnvrtc.so.13): run with --ignored where CUDA_HOME, CHATVEC_NVRTC or the SFT venv provides it"]
    fn kernels_compile_under_nvrtc() {
        super::super::loader::open_nvrtc().unwrap();
        for (major, minor) in [(9, 0), (8, 0)] {
            let cubin = super::super::without_panic(|| compile_cubin(major, minor)).unwrap();
            assert!(cubin.len() > 1000, "a CUBIN of {} bytes for sm_{major}{minor}", cubin.len());
        }
    }
}
