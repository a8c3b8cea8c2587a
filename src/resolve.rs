//! Turning a model reference from the command line into a local directory.
//! Every command resolves models through `resolve_model`, so new kinds of
//! reference (Hub ids, aliases) are added in one place.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// Resolves `reference` to a model directory. Today a reference is a path
/// to a local directory.
pub fn resolve_model(reference: &str) -> Result<PathBuf> {
    let p = PathBuf::from(reference);
    if p.is_dir() {
        return Ok(p);
    }
    let err = Error::Usage(format!("model '{reference}' is not a local directory"));
    if p.exists() {
        return Err(err.with_hint("a model is a directory holding config.json and safetensors weights"));
    }
    Err(err.with_hint(
        "download the model first (e.g. `huggingface-cli download ORG/NAME --local-dir DIR`) and pass DIR",
    ))
}
