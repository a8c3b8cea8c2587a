//! Any bytes as a recipe: the first byte picks TOML or mergekit YAML.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chatvec::fuzzing::recipe(data));
