//! What the user asks each job for, in one home per job: the parameters as
//! written (filled by the command line, by recipes, recorded in the
//! manifest) and the checked spec they become, defaults filled in once.
//!
//! - `apply`: `apply` and `extract` (`ApplyParams` -> `ApplySpec`);
//! - `select`: `--include`, `--exclude`, `--scale`, `--scale-for`, checked
//!   into a `Selection` that gives each tensor its scale;
//! - `embeddings`: `--embeddings`, the vocabulary policy.
//!
//! This room reads names and dtypes from `model` only; `plan` and the jobs
//! above take its specs as given, without checking them again.

pub(crate) mod apply;
pub(crate) mod embeddings;
pub(crate) mod lora;
pub(crate) mod select;
