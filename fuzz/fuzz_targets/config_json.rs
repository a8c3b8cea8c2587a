//! Any bytes as a model's `config.json`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chatvec::fuzzing::config(data));
