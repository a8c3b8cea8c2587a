//! Any bytes as a safetensors file: the header parser must refuse or
//! accept them without panicking, overflowing or reading out of bounds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chatvec::fuzzing::safetensors(data));
