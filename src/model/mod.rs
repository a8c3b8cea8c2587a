//! One model on disk, read as untrusted input: the safetensors and PyTorch
//! `.bin` formats (pure functions over bytes), element types and their
//! exact f32 decoding, the memory-mapped checkpoint and its tensor table,
//! config.json, and tokenizer vocabularies.
//!
//! This room imports only the leaf modules (error, json, hash); it knows
//! nothing of plans, jobs or outputs.

pub(crate) mod adapter;
pub(crate) mod checkpoint;
pub(crate) mod config;
pub(crate) mod dtype;
pub(crate) mod experts;
pub(crate) mod hash_cache;
pub(crate) mod layers;
pub(crate) mod mapped;
pub(crate) mod quant;
pub(crate) mod safetensors;
pub(crate) mod tensor;
pub(crate) mod tokenizer;
pub(crate) mod torch_bin;

pub use checkpoint::{Checkpoint, Tensor};
pub use dtype::{DType, FloatType};
pub use experts::{ExpertLayout, ExpertSummary};

/// A model's card (its README.md): read for the licence, never copied.
pub(crate) const CARD_FILE: &str = "README.md";

/// The files of a model directory besides its weights that a merged model
/// carries, as transformers saves them.
pub(crate) const SIDE_FILES: [&str; 11] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
];

/// The file `name` of model directory `dir`, if it is there and may be read
/// and copied: a regular file (after symlinks) that resolves inside `dir`,
/// or, for a snapshot of the Hugging Face cache, inside its repository's
/// `blobs/`. A link that leads elsewhere (`tokenizer.model ->
/// /proc/self/environ` would copy the environment, tokens included, into
/// an output users upload) is skipped with a warning, as is a dangling
/// one; a FIFO, socket or device is an error (reading it would block or
/// never end).
pub(crate) fn side_file(
    dir: &std::path::Path,
    name: &str,
) -> crate::error::Result<Option<std::path::PathBuf>> {
    use crate::error::Error;
    let p = dir.join(name);
    let Ok(link) = std::fs::symlink_metadata(&p) else { return Ok(None) };
    let Ok(meta) = std::fs::metadata(&p) else {
        crate::ui::warn(&format!("{} is a link to a missing file; ignored", p.display()));
        return Ok(None);
    };
    if !meta.is_file() {
        return Err(Error::bad_file(&p, "is not a regular file (a FIFO, socket, device or directory)"));
    }
    if !link.file_type().is_symlink() {
        return Ok(Some(p));
    }
    let real = std::fs::canonicalize(&p).map_err(|e| Error::io("resolving", &p, e))?;
    let canon_dir = std::fs::canonicalize(dir).map_err(|e| Error::io("resolving", dir, e))?;
    // A snapshot `models--org--name/snapshots/<commit>` links into
    // `models--org--name/blobs`.
    let blobs = canon_dir
        .parent()
        .filter(|s| s.ends_with("snapshots"))
        .and_then(|s| s.parent())
        .map(|r| r.join("blobs"));
    if real.starts_with(&canon_dir) || blobs.is_some_and(|b| real.starts_with(b)) {
        return Ok(Some(p));
    }
    crate::ui::warn(&format!(
        "{} links outside the model directory (to {}); not read or copied",
        p.display(),
        real.display()
    ));
    Ok(None)
}
