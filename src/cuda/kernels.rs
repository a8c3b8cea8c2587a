//! The kernel sources (kernels/, embedded) and their compilation by NVRTC.

use std::ffi::{CString, c_char};

use cudarc::nvrtc::{result as nvrtc, sys};

/// kernels/, in dependency order, as one program.
pub fn kernel_source() -> String {
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
pub fn compile_cubin(major: i32, minor: i32) -> Result<Vec<u8>, String> {
    let src = CString::new(kernel_source()).expect("kernel sources have no NUL");
    let prog = nvrtc::create_program(&src, Some(c"chatvec_kernels.cu"))
        .map_err(|e| format!("NVRTC could not create the program: {e:?}"))?;
    let arch = format!("--gpu-architecture=sm_{major}{minor}");
    let opts = [arch.as_str(), "--fmad=false", "-std=c++17"];
    let out = unsafe { nvrtc::compile_program(prog, &opts) }
        .map_err(|e| {
            let log = unsafe { nvrtc::get_program_log(prog) }
                .map(|l| {
                    let bytes: Vec<u8> = l.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
                    String::from_utf8_lossy(&bytes).into_owned()
                })
                .unwrap_or_default();
            format!("NVRTC could not compile kernels/ for sm_{major}{minor} ({e:?}):\n{log}")
        })
        .and_then(|()| {
            let mut size = 0usize;
            unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
                .result()
                .map_err(|e| format!("NVRTC gave no CUBIN size: {e:?}"))?;
            let mut cubin = vec![0u8; size];
            unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char) }
                .result()
                .map_err(|e| format!("NVRTC gave no CUBIN: {e:?}"))?;
            Ok(cubin)
        });
    let _ = unsafe { nvrtc::destroy_program(prog) };
    out
}

/// Opens NVRTC and compiles for `major.minor`, returning the CUBIN's size:
/// checks that kernels/ compiles where there is no GPU (the tests).
pub fn compile_check(major: i32, minor: i32) -> Result<usize, String> {
    super::loader::open_nvrtc()?;
    super::without_panic(|| compile_cubin(major, minor)).map(|c| c.len())
}
