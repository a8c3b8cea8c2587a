//! Any bytes as a PEFT `adapter_config.json`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chatvec::fuzzing::adapter_config(data));
