//! chatvec: chat vectors and weight arithmetic over memory-mapped
//! safetensors, in bounded memory. See DESIGN.md in the shared folder for
//! the architecture: resolve -> checkpoint -> plan -> execute -> writer.

pub mod aliases;
pub mod arith;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod cuda;
pub mod demo;
pub mod download;
pub mod dtype;
pub mod embeddings;
pub mod error;
pub mod execute;
pub mod format;
pub mod hash_cache;
pub mod hub_cache;
pub mod input_hash;
pub mod inspect;
pub mod interrupt;
pub mod job;
pub mod json;
pub mod lanes;
pub mod manifest;
pub mod merge_compute;
pub mod merge_stats;
pub mod methods;
pub mod model_card;
pub mod params;
pub mod plan;
pub mod plan_merge;
pub mod recipe;
pub mod resolve;
pub mod rng;
pub mod select;
pub mod sft;
pub mod sft_config;
pub mod sft_data;
pub mod sidecars;
pub mod synth;
pub mod tokenizer;
pub mod torch_bin;
pub mod verify;
pub mod writer;
