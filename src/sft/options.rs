//! How to train: `chatvec sft`'s options and a recipe's `[sft]` table,
//! with PLaMo-13B-Instruct's defaults.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How to train: every option maps to a TRL / transformers / accelerate
/// setting. Defaults follow PLaMo-13B-Instruct's SFT (lr 1e-5, warmup
/// ratio 0.03, cosine). A recipe's `[sft]` table holds the same keys.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftOptions {
    /// Chat data, JSONL: `{"messages": [...]}`, `{"conversation": [...]}` or
    /// Alpaca records.
    pub data: PathBuf,
    /// Epochs (TRL `num_train_epochs`).
    pub epochs: f64,
    /// Stop after this many optimizer steps (TRL `max_steps`; overrides epochs).
    pub max_steps: Option<u64>,
    /// Peak learning rate.
    pub lr: f64,
    /// Warmup as a fraction of the steps.
    pub warmup_ratio: f64,
    /// Learning-rate schedule (transformers `lr_scheduler_type`).
    pub scheduler: String,
    /// Longest tokenized example; longer ones are truncated (TRL `max_length`).
    pub max_seq_len: u64,
    /// Examples per device per step.
    pub batch_size: u64,
    /// Gradient accumulation steps.
    pub grad_accum: u64,
    /// Pack several examples into each sequence.
    pub packing: bool,
    /// Train on the assistant turns only.
    pub assistant_only_loss: bool,
    /// Train LoRA adapters (peft) instead of all weights.
    pub lora: bool,
    /// LoRA rank.
    pub lora_r: u64,
    /// LoRA alpha.
    pub lora_alpha: u64,
    /// Random seed.
    pub seed: u64,
    /// Processes (GPUs) per node.
    pub nproc: u64,
    /// Nodes.
    pub nnodes: u64,
    /// This node's rank.
    pub node_rank: u64,
    /// Address of rank 0 (multi-node).
    pub master_addr: String,
    /// Port of rank 0 (multi-node).
    pub master_port: u16,
    /// Shard the model with FSDP2 (full shard, auto-wrap of the decoder
    /// layer, bf16).
    pub fsdp: bool,
    /// DeepSpeed instead of FSDP: `zero3`.
    pub deepspeed: Option<String>,
    /// The Python interpreter with torch, transformers, trl and accelerate
    /// (default: `$CHATVEC_PYTHON`, else `python3`).
    pub python: Option<PathBuf>,
}

impl Default for SftOptions {
    fn default() -> SftOptions {
        SftOptions {
            data: PathBuf::new(),
            epochs: 2.0,
            max_steps: None,
            lr: 1e-5,
            warmup_ratio: 0.03,
            scheduler: "cosine".into(),
            max_seq_len: 4096,
            batch_size: 1,
            grad_accum: 16,
            packing: false,
            assistant_only_loss: true,
            lora: false,
            lora_r: 16,
            lora_alpha: 32,
            seed: 42,
            nproc: 1,
            nnodes: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            fsdp: false,
            deepspeed: None,
            python: None,
        }
    }
}

impl SftOptions {
    /// Checks what the types cannot: one of FSDP and DeepSpeed, a DeepSpeed
    /// stage chatvec configures, a data file named.
    pub(crate) fn check(&self) -> Result<()> {
        if self.data.as_os_str().is_empty() {
            return Err(Error::Usage("no chat data: give the JSONL file (--data, or data in [sft])".into()));
        }
        if self.fsdp && self.deepspeed.is_some() {
            return Err(Error::Usage("--fsdp and --deepspeed exclude each other: choose one".into()));
        }
        if let Some(d) = self.deepspeed.as_deref().filter(|d| *d != "zero3") {
            return Err(Error::Usage(format!("--deepspeed '{d}': chatvec configures zero3 only")));
        }
        Ok(())
    }
}
