//! Everything that may touch the output directory: the temporary sibling
//! directory renamed into place (`dir`), durable hashed files (`files`),
//! the manifest (`manifest`), the model card (`card`), and the config,
//! tokenizer and chat-template files beside the weights (`sidecars`).
//!
//! Output shards themselves are streamed by the executor through files
//! this room creates (`OutputDir::create_shard`); every other file of an
//! output (index, side files, mergekit config, manifest) is written by
//! `OutputDir::finish`, and a sweep's root and summary by `sweep`. This
//! room reads plans and checkpoints; it never computes, and nothing below
//! it (plan, merge, arith, resolve, model) imports it.

pub(crate) mod card;
pub(crate) mod chat_templates;
pub(crate) mod dir;
pub(crate) mod files;
pub(crate) mod manifest;
pub(crate) mod sidecars;
pub(crate) mod sweep;

pub use files::WrittenFile;

use std::path::PathBuf;

/// Where a job writes its output, and what it may replace there; how the
/// work runs is `RunOptions`' business.
#[derive(Clone, Debug)]
pub struct Destination {
    /// The output directory (created; must not exist unless `force`).
    pub output: PathBuf,
    /// Replace an existing output directory (an earlier chatvec output or
    /// an empty directory only).
    pub force: bool,
    /// Plan and report, write nothing.
    pub dry_run: bool,
    /// Write the weights even when no config.json comes with them (the
    /// input the side files are taken from has none): the output is then
    /// not a model transformers can load, so it must be asked for.
    pub weights_only: bool,
}

impl Destination {
    /// Writes into `output`, replacing nothing.
    pub fn new(output: impl Into<PathBuf>) -> Destination {
        Destination { output: output.into(), force: false, dry_run: false, weights_only: false }
    }
}
