//! Any bytes as a `model.safetensors.index.json`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chatvec::fuzzing::index(data));
