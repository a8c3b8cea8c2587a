//! chatvec: chat vectors and weight arithmetic over memory-mapped
//! safetensors, in bounded memory. See DESIGN.md in the shared folder for
//! the architecture: resolve -> checkpoint -> plan -> execute -> writer.

pub mod arith;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod demo;
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
pub mod manifest;
pub mod plan;
pub mod resolve;
pub mod select;
pub mod sidecars;
pub mod synth;
pub mod tokenizer;
pub mod writer;
