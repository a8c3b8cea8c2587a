//! Any bytes as a `tokenizer.json` (its vocabulary).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chatvec::fuzzing::tokenizer(data));
