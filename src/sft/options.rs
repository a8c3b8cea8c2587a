//! How to train: `chatvec sft`'s options and a recipe's `[sft]` table,
//! with PLaMo-13B-Instruct's defaults, and the checks of every scale-out
//! setting that must hold before anything is written or launched.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::error::{Error, Result};

/// One chat data file and its weight in the mixture: the file's examples
/// are taken `weight` times (2 = twice, 0.5 = a seeded half). Written
/// `FILE` or `FILE:WEIGHT`.
#[derive(Clone, Debug, PartialEq)]
pub struct DataFile {
    /// The JSONL file.
    pub path: PathBuf,
    /// How many times its examples are taken (> 0, finite).
    pub weight: f64,
}

impl DataFile {
    /// Parses `FILE` or `FILE:WEIGHT` (a colon followed by a number; any
    /// other colon belongs to the path).
    pub fn parse(s: &str) -> Result<DataFile> {
        let (path, weight) = match s.rsplit_once(':') {
            Some((p, w)) if !p.is_empty() && w.parse::<f64>().is_ok() => (p, w.parse::<f64>().unwrap_or(1.0)),
            _ => (s, 1.0),
        };
        if path.is_empty() {
            return Err(Error::Usage("--data: empty file name".into()));
        }
        if !weight.is_finite() || weight <= 0.0 {
            return Err(Error::Usage(format!("--data {s}: the weight must be a number > 0")));
        }
        Ok(DataFile { path: PathBuf::from(path), weight })
    }

    /// The `FILE[:WEIGHT]` spelling.
    pub fn spelled(&self) -> String {
        if self.weight == 1.0 {
            self.path.display().to_string()
        } else {
            format!("{}:{}", self.path.display(), self.weight)
        }
    }
}

/// `data` in a recipe: one `"FILE[:WEIGHT]"` or a list of them.
fn de_data<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<DataFile>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let list = match OneOrMany::deserialize(d).map_err(|_| {
        serde::de::Error::custom(
            "expected a file name (\"chat.jsonl\" or \"chat.jsonl:2\") or a list of them",
        )
    })? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    };
    list.iter().map(|s| DataFile::parse(s).map_err(|e| serde::de::Error::custom(e.to_string()))).collect()
}

fn ser_data<S: Serializer>(v: &[DataFile], s: S) -> std::result::Result<S::Ok, S::Error> {
    v.iter().map(DataFile::spelled).collect::<Vec<_>>().serialize(s)
}

/// transformers' learning-rate schedules (`SchedulerType`).
pub(crate) const SCHEDULERS: [&str; 11] = [
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
];

/// The batch systems chatvec writes a job script for.
pub(crate) const LAUNCHERS: [&str; 2] = ["slurm", "pbs"];

/// How to train: every option maps to a TRL / transformers / accelerate
/// setting. Defaults follow PLaMo-13B-Instruct's SFT (lr 1e-5, warmup
/// ratio 0.03, cosine), written once in `Default`. The command line fills
/// it through clap (the doc comments are `chatvec sft`'s help), a recipe's
/// `[sft]` table through serde (the same keys), and the run record keeps it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct SftOptions {
    /// Chat data, JSONL: messages, conversation, Alpaca, ichikara-instruction or prompt/completion records. Repeat to mix files; FILE:WEIGHT takes a file's examples WEIGHT times (2 = twice, 0.5 = a seeded half).
    #[arg(long, value_name = "FILE.jsonl[:WEIGHT]", required = true, value_parser = parse_data_file)]
    #[serde(deserialize_with = "de_data", serialize_with = "ser_data")]
    pub data: Vec<DataFile>,
    /// Held-out chat data: an eval loss is logged every --eval-steps.
    #[arg(long, value_name = "FILE.jsonl", conflicts_with = "eval_split")]
    pub eval_data: Option<PathBuf>,
    /// Hold out this fraction of the examples (seeded) for an eval loss.
    #[arg(long, value_name = "FRACTION")]
    pub eval_split: Option<f64>,
    /// Evaluate every N steps (default: every --save-steps).
    #[arg(long, value_name = "N")]
    pub eval_steps: Option<u64>,
    /// Epochs (TRL num_train_epochs).
    #[arg(long, default_value_t = SftOptions::default().epochs)]
    pub epochs: f64,
    /// Stop after this many optimizer steps (TRL max_steps; overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Peak learning rate (PLaMo-13B-Instruct used 1e-5).
    #[arg(long, default_value_t = SftOptions::default().lr)]
    pub lr: f64,
    /// Warmup as a fraction of the steps (PLaMo-13B-Instruct: 0.03).
    #[arg(long, default_value_t = SftOptions::default().warmup_ratio)]
    pub warmup_ratio: f64,
    /// Learning-rate schedule (transformers lr_scheduler_type).
    #[arg(long, default_value_t = SftOptions::default().scheduler)]
    pub scheduler: String,
    /// Longest tokenized example; longer ones are truncated (TRL max_length).
    #[arg(long, default_value_t = SftOptions::default().max_seq_len)]
    pub max_seq_len: u64,
    /// Examples per device per step.
    #[arg(long, default_value_t = SftOptions::default().batch_size)]
    pub batch_size: u64,
    /// Gradient accumulation steps.
    #[arg(long, default_value_t = SftOptions::default().grad_accum)]
    pub grad_accum: u64,
    /// Pack several examples into each sequence.
    #[arg(long)]
    pub packing: bool,
    /// Train on the assistant turns only (as the Swallow instruct card recommends).
    #[arg(long, default_value_t = SftOptions::default().assistant_only_loss, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub assistant_only_loss: bool,
    /// The chat template to train with: a Jinja file, or a model whose template to take (default: the model's own).
    #[arg(long, value_name = "FILE|MODEL")]
    pub chat_template: Option<String>,
    /// Train LoRA adapters (peft) instead of all weights; the adapter is merged into a full model at the end.
    #[arg(long)]
    pub lora: bool,
    /// LoRA rank.
    #[arg(long, default_value_t = SftOptions::default().lora_r)]
    pub lora_r: u64,
    /// LoRA alpha.
    #[arg(long, default_value_t = SftOptions::default().lora_alpha)]
    pub lora_alpha: u64,
    /// Random seed.
    #[arg(long, default_value_t = SftOptions::default().seed)]
    pub seed: u64,
    /// Save a checkpoint every N steps (0: only the final model).
    #[arg(long, value_name = "N", default_value_t = SftOptions::default().save_steps)]
    pub save_steps: u64,
    /// Checkpoints kept; older ones are removed.
    #[arg(long, value_name = "N", default_value_t = SftOptions::default().save_total_limit)]
    pub save_total_limit: u64,
    /// Continue the run in -o from its latest checkpoint, or from the checkpoint directory given.
    #[arg(long, value_name = "latest|CHECKPOINT", num_args = 0..=1, default_missing_value = "latest")]
    pub resume: Option<String>,
    /// Where metrics go (transformers report_to): none, tensorboard, wandb, ...
    #[arg(long, default_value_t = SftOptions::default().report_to)]
    pub report_to: String,
    /// Keep parameters and optimizer state in CPU memory (FSDP or DeepSpeed), for 70B on few GPUs.
    #[arg(long)]
    pub cpu_offload: bool,
    /// Any other TRL SFTConfig / transformers TrainingArguments / ModelConfig field, as `key = value`;
    /// checked against the installed TRL before launch (on the command line: --train-arg KEY=VALUE).
    #[arg(skip)]
    pub train_args: BTreeMap<String, Value>,
    /// Processes (GPUs) per node.
    #[arg(long, default_value_t = SftOptions::default().nproc)]
    pub nproc: u64,
    /// Nodes.
    #[arg(long, default_value_t = SftOptions::default().nnodes)]
    pub nnodes: u64,
    /// This node's rank.
    #[arg(long, default_value_t = SftOptions::default().node_rank)]
    pub node_rank: u64,
    /// Address of the node with rank 0 (required with --nnodes above 1).
    #[arg(long)]
    pub master_addr: Option<String>,
    /// Port of rank 0 (multi-node).
    #[arg(long, default_value_t = SftOptions::default().master_port)]
    pub master_port: u16,
    /// Shard the model with FSDP2 (full shard, auto-wrap of the decoder layer, bf16).
    #[arg(long, conflicts_with = "deepspeed")]
    pub fsdp: bool,
    /// DeepSpeed instead: zero3.
    #[arg(long, value_parser = ["zero3"])]
    pub deepspeed: Option<String>,
    /// Write a batch script (RUN.slurm or RUN.pbs beside -o) that runs this job on every node with its rank and the master address, instead of training here.
    #[arg(long, value_parser = LAUNCHERS)]
    pub launcher: Option<String>,
    /// The Python interpreter with torch, transformers, trl and accelerate (default: $CHATVEC_PYTHON, else python3).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// With --launcher: the scheduler partition (Slurm --partition, PBS queue -q).
    #[arg(long, requires = "launcher")]
    pub partition: Option<String>,
    /// With --launcher: the account (or group) the job is charged to.
    #[arg(long, requires = "launcher")]
    pub account: Option<String>,
    /// With --launcher: the time limit, as the scheduler writes it (e.g. 24:00:00).
    #[arg(long, requires = "launcher")]
    pub time: Option<String>,
    /// With --launcher: another scheduler directive, written as it is after `#SBATCH` or `#PBS`
    /// (repeatable), e.g. --sched-arg=--qos=high or --sched-arg="-l gpu_type=h100".
    #[arg(long = "sched-arg", value_name = "DIRECTIVE", allow_hyphen_values = true, requires = "launcher")]
    pub sched_args: Vec<String>,
    /// With --launcher slurm: an `#SBATCH` directive as sbatch takes it (repeatable), e.g.
    /// --sbatch-arg=--qos=high or --sbatch-arg=--gres=gpu:h100:8.
    #[arg(long = "sbatch-arg", value_name = "DIRECTIVE", allow_hyphen_values = true, requires = "launcher")]
    pub sbatch_args: Vec<String>,
    /// With --launcher pbs: a `#PBS` directive as qsub takes it (repeatable), e.g.
    /// --pbs-arg="-l select=2:ngpus=8" or --pbs-arg="-W group_list=gpu".
    #[arg(long = "pbs-arg", value_name = "DIRECTIVE", allow_hyphen_values = true, requires = "launcher")]
    pub pbs_args: Vec<String>,
    /// With --launcher: a shell line each node runs before chatvec (repeatable), e.g.
    /// "module load cuda/12.4" or "source /shared/venv/bin/activate".
    #[arg(long = "job-setup", value_name = "LINE", requires = "launcher")]
    pub job_setup: Vec<String>,
}

/// `--data`'s parser.
fn parse_data_file(s: &str) -> std::result::Result<DataFile, String> {
    DataFile::parse(s).map_err(|e| e.to_string())
}

impl Default for SftOptions {
    fn default() -> SftOptions {
        SftOptions {
            data: Vec::new(),
            eval_data: None,
            eval_split: None,
            eval_steps: None,
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
            chat_template: None,
            lora: false,
            lora_r: 16,
            lora_alpha: 32,
            seed: 42,
            save_steps: 500,
            save_total_limit: 2,
            resume: None,
            report_to: "none".into(),
            cpu_offload: false,
            train_args: BTreeMap::new(),
            nproc: 1,
            nnodes: 1,
            node_rank: 0,
            master_addr: None,
            master_port: 29500,
            fsdp: false,
            deepspeed: None,
            launcher: None,
            python: None,
            partition: None,
            account: None,
            time: None,
            sched_args: Vec::new(),
            sbatch_args: Vec::new(),
            pbs_args: Vec::new(),
            job_setup: Vec::new(),
        }
    }
}

/// Settings chatvec writes itself: a `train_args` entry for one of them
/// would be silently overridden or conflict, so it must go through the
/// option named.
const OWN_KEYS: [(&str, &str); 22] = [
    ("model_name_or_path", "--model"),
    ("output_dir", "-o"),
    ("datasets", "--data"),
    ("dataset_name", "--data"),
    ("num_train_epochs", "--epochs"),
    ("max_steps", "--max-steps"),
    ("learning_rate", "--lr"),
    ("warmup_ratio", "--warmup-ratio"),
    ("warmup_steps", "--warmup-ratio"),
    ("lr_scheduler_type", "--scheduler"),
    ("max_length", "--max-seq-len"),
    ("per_device_train_batch_size", "--batch-size"),
    ("gradient_accumulation_steps", "--grad-accum"),
    ("packing", "--packing"),
    ("assistant_only_loss", "--assistant-only-loss"),
    ("chat_template_path", "--chat-template"),
    ("use_peft", "--lora"),
    ("seed", "--seed"),
    ("save_steps", "--save-steps"),
    ("save_total_limit", "--save-total-limit"),
    ("resume_from_checkpoint", "--resume"),
    ("report_to", "--report-to"),
];

impl SftOptions {
    /// The processes of the whole job.
    pub fn world_size(&self) -> u64 {
        self.nproc * self.nnodes
    }

    /// Checks everything the types cannot, before anything is written: data
    /// named, one of FSDP and DeepSpeed, a DeepSpeed stage chatvec
    /// configures, a known schedule, and a consistent scale-out (ranks,
    /// master address, process counts).
    pub(crate) fn check(&self) -> Result<()> {
        let usage = |m: String| Err(Error::Usage(m));
        if self.data.is_empty() {
            return usage("no chat data: give the JSONL file (--data, or data in [sft])".into());
        }
        if self.fsdp && self.deepspeed.is_some() {
            return usage("--fsdp and --deepspeed exclude each other: choose one".into());
        }
        if let Some(d) = self.deepspeed.as_deref().filter(|d| *d != "zero3") {
            return usage(format!("--deepspeed '{d}': chatvec configures zero3 only"));
        }
        if !SCHEDULERS.contains(&self.scheduler.as_str()) {
            let e = Error::Usage(format!(
                "--scheduler '{}' is not a transformers schedule; one of {}",
                self.scheduler,
                SCHEDULERS.join(", ")
            ));
            return Err(match nearest(&self.scheduler, SCHEDULERS) {
                Some(n) => e.with_hint(format!("did you mean {n}?")),
                None => e,
            });
        }
        for (name, v) in
            [("--nproc", self.nproc), ("--nnodes", self.nnodes), ("--batch-size", self.batch_size)]
        {
            if v == 0 {
                return usage(format!("{name} 0: it must be at least 1"));
            }
        }
        if self.grad_accum == 0 || self.max_seq_len == 0 {
            return usage("--grad-accum and --max-seq-len must be at least 1".into());
        }
        if self.node_rank >= self.nnodes {
            return usage(format!(
                "--node-rank {} of --nnodes {}: ranks run from 0 to {}",
                self.node_rank,
                self.nnodes,
                self.nnodes - 1
            ));
        }
        let scheduling = self.partition.is_some()
            || self.account.is_some()
            || self.time.is_some()
            || !self.sched_args.is_empty()
            || !self.sbatch_args.is_empty()
            || !self.pbs_args.is_empty()
            || !self.job_setup.is_empty();
        if scheduling && self.launcher.is_none() {
            return usage(
                "partition, account, time, sched_args, sbatch_args, pbs_args and job_setup go into a job script: set launcher = \"slurm\" or \"pbs\"".into(),
            );
        }
        if let Some(l) = &self.launcher {
            if !LAUNCHERS.contains(&l.as_str()) {
                return usage(format!("--launcher '{l}': one of {}", LAUNCHERS.join(", ")));
            }
            for (flag, given, for_launcher) in
                [("--sbatch-arg", &self.sbatch_args, "slurm"), ("--pbs-arg", &self.pbs_args, "pbs")]
            {
                if !given.is_empty() && l != for_launcher {
                    return usage(format!(
                        "{flag} is a {for_launcher} directive, but --launcher is {l}: use --sched-arg, or the {l} form"
                    ));
                }
            }
            if self.node_rank != 0 || self.master_addr.is_some() {
                return usage(format!(
                    "--launcher {l} sets each node's --node-rank and --master-addr itself; leave them out"
                ));
            }
        } else if self.nnodes > 1 && self.master_addr.is_none() {
            return Err(Error::Usage(format!(
                "--nnodes {} needs --master-addr: the address of the node with rank 0, which every node connects to",
                self.nnodes
            ))
            .with_hint("or pass --launcher slurm|pbs to write a job script that finds it"));
        }
        if let Some(a) = &self.master_addr
            && (a.is_empty() || a.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return usage(format!("--master-addr '{a}': expected a host name or IP address"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return usage(format!("--lr {}: expected a number > 0", self.lr));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return usage(format!("--warmup-ratio {}: expected a fraction in [0, 1)", self.warmup_ratio));
        }
        if !(self.epochs.is_finite() && self.epochs > 0.0) {
            return usage(format!("--epochs {}: expected a number > 0", self.epochs));
        }
        if let Some(f) = self.eval_split {
            if !(f > 0.0 && f < 1.0) {
                return usage(format!("--eval-split {f}: expected a fraction between 0 and 1"));
            }
            if self.eval_data.is_some() {
                return usage("--eval-split and --eval-data exclude each other: choose one".into());
            }
        }
        if self.cpu_offload && !self.fsdp && self.deepspeed.is_none() {
            return usage("--cpu-offload needs --fsdp or --deepspeed zero3".into());
        }
        if self.save_steps > 0 && self.save_total_limit == 0 {
            return usage(
                "--save-total-limit 0 would delete every checkpoint; use --save-steps 0 for none".into(),
            );
        }
        for key in self.train_args.keys() {
            if let Some((_, flag)) = OWN_KEYS.iter().find(|(k, _)| k == key) {
                return usage(format!("--train-arg {key}: chatvec sets it; use {flag}"));
            }
        }
        Ok(())
    }
}

/// The candidate closest to `s`, if close enough to be a typo (a
/// schedule, a trainer setting).
pub(crate) fn nearest<'a>(s: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(s, c), c))
        .filter(|(score, _)| *score > 0.85)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// Parses a `--train-arg KEY=VALUE`: the value is read as YAML does it
/// (`true`, `0.1`, `[a, b]`, `{k: v}`), so it comes out in the trainer's
/// config as the type the key expects.
pub fn parse_train_arg(s: &str) -> Result<(String, Value)> {
    let (k, v) = s.split_once('=').ok_or_else(|| {
        Error::Usage(format!("--train-arg '{s}': expected KEY=VALUE, e.g. weight_decay=0.1"))
    })?;
    let k = k.trim();
    if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(Error::Usage(format!("--train-arg '{s}': '{k}' is not a setting name")));
    }
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(v)
        .map_err(|e| Error::Usage(format!("--train-arg '{s}': the value is not valid YAML: {e}")))?;
    let value = serde_json::to_value(value).map_err(|e| Error::Usage(format!("--train-arg '{s}': {e}")))?;
    Ok((k.to_string(), value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_files_take_an_optional_weight() {
        assert_eq!(DataFile::parse("a.jsonl").unwrap(), DataFile { path: "a.jsonl".into(), weight: 1.0 });
        assert_eq!(DataFile::parse("d/a.jsonl:2.5").unwrap().weight, 2.5);
        assert_eq!(DataFile::parse("c:/x:y.jsonl").unwrap().path, PathBuf::from("c:/x:y.jsonl"));
        assert!(DataFile::parse("a.jsonl:0").is_err());
        assert!(DataFile::parse("a.jsonl:-1").is_err());
        assert!(DataFile::parse("a.jsonl:inf").is_err());
        assert_eq!(DataFile::parse("a.jsonl:0.5").unwrap().spelled(), "a.jsonl:0.5");
    }

    #[test]
    fn train_args_are_typed_as_yaml_reads_them() {
        assert_eq!(
            parse_train_arg("weight_decay=0.1").unwrap(),
            ("weight_decay".into(), serde_json::json!(0.1))
        );
        assert_eq!(parse_train_arg("bf16=true").unwrap().1, serde_json::json!(true));
        assert_eq!(
            parse_train_arg("optim=adamw_torch_fused").unwrap().1,
            serde_json::json!("adamw_torch_fused")
        );
        assert_eq!(parse_train_arg("report_to=[a, b]").unwrap().1, serde_json::json!(["a", "b"]));
        assert!(parse_train_arg("no_equals").is_err());
        assert!(parse_train_arg("bad key=1").is_err());
    }

    #[test]
    fn scale_out_settings_are_checked_before_anything_runs() {
        let base = || SftOptions { data: vec![DataFile::parse("d.jsonl").unwrap()], ..SftOptions::default() };
        assert!(base().check().is_ok());
        type Edit = fn(&mut SftOptions);
        let cases: [(Edit, &str); 10] = [
            (|o| o.nnodes = 2, "needs --master-addr"),
            (|o| o.node_rank = 5, "--node-rank 5 of --nnodes 1"),
            (|o| o.nproc = 0, "--nproc 0"),
            (|o| o.scheduler = "cosin".into(), "'cosin' is not a transformers schedule"),
            (|o| o.warmup_ratio = 1.5, "--warmup-ratio 1.5"),
            (|o| o.launcher = Some("lsf".into()), "--launcher 'lsf'"),
            (|o| (o.launcher, o.node_rank, o.nnodes) = (Some("slurm".into()), 1, 2), "leave them out"),
            (|o| o.cpu_offload = true, "--cpu-offload needs --fsdp"),
            (|o| drop(o.train_args.insert("learning_rate".into(), 1.into())), "use --lr"),
            (|o| o.eval_split = Some(1.0), "--eval-split 1"),
        ];
        for (edit, needle) in cases {
            let mut o = base();
            edit(&mut o);
            let e = o.check().unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
        let mut o = base();
        o.nnodes = 2;
        o.master_addr = Some("10.0.0.1".into());
        o.node_rank = 1;
        assert!(o.check().is_ok());
    }
}
