//! Any bytes as a PyTorch `.bin` checkpoint (zip + pickle).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chatvec::fuzzing::torch_bin(data));
