//! chatvec: chat vectors and model merges over memory-mapped safetensors,
//! in bounded memory, byte-for-byte reproducible.
//!
//! A chat vector is `chat - pretrained` (e.g. Llama-3-8B-Instruct minus
//! Llama-3-8B); adding it, scaled, to a model continued-pretrained from
//! the same base (e.g. Llama-3-Swallow-8B) gives that model the chat
//! model's behaviour before any SFT. The entry points take a checked spec
//! (built from the parameters as given, e.g. [`ApplyParams`]), where to
//! write ([`Destination`]) and how to run ([`RunOptions`]), and return a
//! [`Summary`]:
//!
//! ```no_run
//! use chatvec::{ApplyParams, Destination, RunOptions, apply};
//!
//! // Llama-3-Swallow-8B + (Llama-3-8B-Instruct - Llama-3-8B), by alias;
//! // models come from the Hugging Face cache, downloaded if missing.
//! let mut params = ApplyParams::new("swallow-8b", "llama3-instruct");
//! params.scale = vec![0.8.into()]; // or a gradient over the layers: Scale::Layers(vec![0.3, 1.0])
//! // More vectors are added in the same pass, the k-th scale with the k-th
//! // vector: params.vector.push("reasoning-vector".into()); params.scale.push(0.5.into());
//! // One check of everything given; defaults filled in.
//! let spec = params.validate()?;
//! let summary = apply(&spec, &Destination::new("swallow-8b-cv"), &RunOptions::default())?;
//! for shard in &summary.shards {
//!     println!("{} {}", shard.file, shard.sha256);
//! }
//! # Ok::<(), chatvec::Error>(())
//! ```
//!
//! The crate is laid out as the design's boxes (see ARCHITECTURE in the
//! README); imports only run downward, from `job` (these entry points) to
//! `model` and the leaf modules.

#![deny(missing_docs)]

mod analyze;
mod arith;
mod cuda;
mod error;
mod eval;
mod exec;
mod factor;
mod hash;
mod interrupt;
mod job;
mod json;
mod merge;
mod model;
mod output;
mod params;
mod plan;
mod publish;
mod python;
mod recipe;
mod resolve;
mod rng;
mod scratch;
mod sft;
mod svg;
pub mod ui;
mod units;

// The entry points.
pub use eval::eval;
pub use job::analyze::analyze;
pub use job::catalog::catalog;
pub use job::chat_vector::{apply, extract};
pub use job::download::{DownloadReport, download};
pub use job::extract_lora::{LoraReport, ModuleKind, ModuleReport, extract_lora};
pub use job::inspect::inspect;
pub use job::merge::{merge, merge_stages, merge_sweep, preview_side_files};
pub use job::push::{PushReport, PushSpec, push};
pub use job::sft::sft;
pub use job::sweep::sweep;
pub use job::verify::verify;
pub use recipe::stages::{Stage, load_stages};

// What they take: the parameters as given and the checked specs, where to
// write and how to run.
pub use cuda::DeviceChoice;
pub use eval::EvalSpec;
pub use exec::{InputHashes, RunOptions};
pub use job::analyze::AnalyzeSpec;
pub use model::FloatType;
pub use model::{ExpertLayout, ExpertSummary};
pub use output::Destination;
pub use params::apply::{
    ApplyParams, ApplySpec, ExtractParams, ExtractSpec, FlagPositions, OutDtype, VectorSource,
};
pub use params::embeddings::EmbeddingPolicy;
pub use params::lora::LoraParams;
pub use params::select::Scale;
pub use recipe::Recipe;
pub use sft::{DataFile, SftJob, SftOptions};

// What they return.
pub use analyze::figures::Figures;
pub use analyze::findings::Finding;
pub use analyze::report::{AnalyzeReport, GroupFigures, Skipped, TensorFigures};
pub use error::{EXIT_INPUT, EXIT_INTERRUPTED, EXIT_IO, EXIT_OK, Error, FormatError, GpuError, Result};
pub use eval::{
    Answer, BenchInfo, BenchScore, EvalReport, Grade, Interval, LmReference, ModelEval, RULE as EVAL_RULE,
    bench_list,
};
pub use job::Summary;
pub use job::catalog::{Catalog, ModelAliasEntry, RecipeEntry, VectorAliasEntry};
pub use job::inspect::{InspectReport, ShardInfo, TensorInfo};
pub use job::sweep::{Candidate, SweepReport};
pub use job::verify::{Check, VerifyReport};
pub use model::config::ConfigSummary;
pub use output::WrittenFile;
pub use output::manifest::Provenance;
pub use plan::EmbeddingReport;
pub use sft::SftReport;

// For a command line over the library: process set-up, the parsers its
// flags share with recipes, and printing.
pub use eval::record_selection;
pub use interrupt::install as catch_signals;
pub use params::apply::parse_scale;
pub use resolve::{set_aliases_file, set_offline};
pub use sft::parse_train_arg;
pub use units::{human_bytes, parse_size};

// Reading a checkpoint and hashing files as chatvec does (the demo's and
// the benchmark's checks).
pub use cuda::stage_into;
pub use exec::default_threads;
pub use hash::{hex, sha256_file};
pub use model::{Checkpoint, DType, Tensor};
pub use units::human_count;

/// Entry points for the fuzz targets in `fuzz/` (built with `--cfg
/// fuzzing`): the parsers of untrusted input, over bytes.
#[cfg(fuzzing)]
pub mod fuzzing;
