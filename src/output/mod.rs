//! Everything that may touch the output directory: the temporary sibling
//! directory renamed into place (`dir`), durable hashed files (`files`),
//! the manifest (`manifest`), the model card (`card`), and the config,
//! tokenizer and chat-template files beside the weights (`sidecars`).
//!
//! Output shards themselves are streamed by the executor through `files`.
//! This room reads plans and checkpoints; it never computes, and nothing
//! below it (plan, merge, arith, resolve, model) imports it.

pub(crate) mod card;
pub(crate) mod dir;
pub(crate) mod files;
pub(crate) mod manifest;
pub(crate) mod sidecars;

pub use files::WrittenFile;
