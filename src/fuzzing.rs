//! Entry points for the fuzz targets in `fuzz/`: each parser of untrusted
//! input, over raw bytes. Only built with `--cfg fuzzing`.

use std::path::Path;

/// Parses a safetensors file's bytes (header and layout checks).
pub fn safetensors(bytes: &[u8]) {
    let _ = crate::model::safetensors::parse_header(bytes, Path::new("fuzz.safetensors"));
}

/// Parses a `model.safetensors.index.json`'s bytes.
pub fn index(bytes: &[u8]) {
    let _ = crate::model::checkpoint::parse_index(bytes, false, Path::new("fuzz.index.json"));
}

/// Parses a `config.json`'s bytes and compares it with itself.
pub fn config(bytes: &[u8]) {
    if let Ok(c) = crate::model::config::ModelConfig::parse(bytes, Path::new("config.json")) {
        let _ = crate::model::config::architecture_differences(&c, &c);
        let _ = c.summary();
    }
}
