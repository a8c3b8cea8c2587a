//! One model on disk, read as untrusted input: the safetensors and PyTorch
//! `.bin` formats (pure functions over bytes), element types and their
//! exact f32 decoding, the memory-mapped checkpoint and its tensor table,
//! config.json, and tokenizer vocabularies.
//!
//! This room imports only the leaf modules (error, json, hash); it knows
//! nothing of plans, jobs or outputs.

pub(crate) mod checkpoint;
pub(crate) mod config;
pub(crate) mod dtype;
pub(crate) mod safetensors;
pub(crate) mod tokenizer;
pub(crate) mod torch_bin;

pub use checkpoint::{Checkpoint, Tensor};
pub use dtype::{DType, FloatType};

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
