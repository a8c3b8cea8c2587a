//! The files `chatvec sft` writes for the trainer: TRL's SFT config, an
//! accelerate config for the chosen scale-out (one process, several GPUs,
//! several nodes, FSDP2 or DeepSpeed ZeRO-3), the DeepSpeed config, and a
//! training chat template when the model's lacks generation markers. Pure
//! functions of the options, so `--dry-run` shows exactly what would run.

use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::sft::options::SftOptions;

/// `v` as YAML, written by the YAML crate. The crate quotes strings that
/// YAML 1.2 would read as another type (`true`, `1e-5`, `null`); accelerate
/// reads its config with PyYAML, a YAML 1.1 reader, for which `no`, `NO`,
/// `on` or `1_000` are not strings either (`mixed_precision: no` would be
/// `False`). Those few scalars go through the crate as unique placeholders
/// and come out single-quoted.
pub(crate) fn to_yaml(v: &Value) -> Result<String> {
    let mut quoted = Vec::new();
    let safe = mark_yaml11_strings(v, &mut quoted);
    let mut text =
        serde_yaml_ng::to_string(&safe).map_err(|e| Error::Internal(format!("writing YAML: {e}")))?;
    for (i, s) in quoted.iter().enumerate() {
        text = text.replace(&placeholder(i), &format!("'{}'", s.replace('\'', "''")));
    }
    Ok(text)
}

fn placeholder(i: usize) -> String {
    format!("chatvec-yaml11-string-{i}-4f1c")
}

/// `v` with each string YAML 1.1 would misread replaced by a placeholder
/// (its text kept in `quoted`, in placeholder order).
fn mark_yaml11_strings(v: &Value, quoted: &mut Vec<String>) -> Value {
    match v {
        Value::String(s) if yaml11_not_a_string(s) => {
            quoted.push(s.clone());
            Value::String(placeholder(quoted.len() - 1))
        }
        Value::Array(a) => Value::Array(a.iter().map(|x| mark_yaml11_strings(x, quoted)).collect()),
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, x)| (k.clone(), mark_yaml11_strings(x, quoted))).collect())
        }
        other => other.clone(),
    }
}

/// Whether YAML 1.1 reads the plain scalar `s` as a boolean or a number
/// where YAML 1.2 reads a string (its booleans `y`, `no`, `On`...,
/// numbers with `_`, base-60 numbers like `1:20`, `0b` binaries).
fn yaml11_not_a_string(s: &str) -> bool {
    const BOOLS: [&str; 16] =
        ["y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off", "OFF"];
    let t = s.strip_prefix(['-', '+']).unwrap_or(s);
    let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit() || b == b'_');
    BOOLS.contains(&s)
        || (s.contains('_') && s.replace('_', "").parse::<f64>().is_ok())
        || (t.contains(':') && t.split(':').all(digits))
        || t.strip_prefix("0b")
            .is_some_and(|b| !b.is_empty() && b.bytes().all(|c| matches!(c, b'0' | b'1' | b'_')))
}

/// Where the run's files are, for the trainer's config.
pub(crate) struct RunPaths<'a> {
    /// The model to train.
    pub model_dir: &'a str,
    /// The directory holding `train.jsonl` (and `test.jsonl` with an eval
    /// set), loaded as one dataset whose splits are named by the files.
    pub data_dir: &'a str,
    /// Whether `test.jsonl` is there.
    pub has_eval: bool,
    /// Where the trainer writes checkpoints and the final model.
    pub output_dir: &'a str,
    /// A chat template file to train with, if not the model's own.
    pub chat_template: Option<&'a str>,
    /// The checkpoint to resume from.
    pub resume_from: Option<&'a str>,
    /// Whether the data comes tokenized with its assistant masks (chatvec
    /// computed them): TRL then trains on the masks as they are, and must
    /// not look for a template to mark.
    pub premasked: bool,
}

/// TRL's `trl sft --config` file. transformers 5 dropped `warmup_ratio`:
/// there a `warmup_steps` below 1 is the ratio.
///
/// The weights load in f32 in every launch mode, with bf16 autocast on a
/// GPU: the optimizer then always steps f32 master weights, as FSDP2 and
/// DeepSpeed do with their own mixed precision. (Loading bf16 weights would
/// make single-GPU and DDP runs update bf16 directly, where most updates at
/// lr 1e-5 round away.)
pub(crate) fn sft_config(p: &RunPaths<'_>, t: &SftOptions, gpu: bool, transformers_major: u64) -> Value {
    let mut c = json!({
        "model_name_or_path": p.model_dir,
        "dtype": "float32",
        "dataset_name": p.data_dir,
        "dataset_train_split": "train",
        "dataset_test_split": "test",
        "output_dir": p.output_dir,
        "num_train_epochs": t.epochs,
        "max_steps": t.max_steps.map_or(-1, |s| s as i64),
        "learning_rate": t.lr,
        "lr_scheduler_type": t.scheduler,
        "max_length": t.max_seq_len,
        "per_device_train_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "packing": t.packing,
        "assistant_only_loss": t.assistant_only_loss && !p.premasked,
        "seed": t.seed,
        "bf16": gpu,
        "use_cpu": !gpu,
        "logging_steps": 1,
        "save_strategy": if t.save_steps > 0 { "steps" } else { "no" },
        "report_to": t.report_to,
    });
    let Value::Object(o) = &mut c else { return c };
    if t.save_steps > 0 {
        o.insert("save_steps".into(), json!(t.save_steps));
        o.insert("save_total_limit".into(), json!(t.save_total_limit));
    }
    if p.has_eval {
        let every = t.eval_steps.unwrap_or(if t.save_steps > 0 { t.save_steps } else { 500 });
        o.insert("eval_strategy".into(), json!("steps"));
        o.insert("eval_steps".into(), json!(every));
        o.insert("per_device_eval_batch_size".into(), json!(t.batch_size));
    }
    // transformers 5 renamed gradient_checkpointing to activation_checkpointing.
    if transformers_major >= 5 {
        o.insert("warmup_steps".into(), json!(t.warmup_ratio));
        o.insert("activation_checkpointing".into(), json!(gpu));
    } else {
        o.insert("warmup_ratio".into(), json!(t.warmup_ratio));
        o.insert("gradient_checkpointing".into(), json!(gpu));
    }
    if t.lora {
        o.insert("use_peft".into(), json!(true));
        o.insert("lora_r".into(), json!(t.lora_r));
        o.insert("lora_alpha".into(), json!(t.lora_alpha));
        o.insert("lora_target_modules".into(), json!("all-linear"));
    }
    if let Some(path) = p.chat_template {
        o.insert("chat_template_path".into(), json!(path));
    }
    if let Some(r) = p.resume_from {
        o.insert("resume_from_checkpoint".into(), json!(r));
    }
    for (k, v) in &t.train_args {
        o.insert(k.clone(), v.clone());
    }
    c
}

/// The decoder layer class FSDP wraps, from config.json's architecture
/// (`LlamaForCausalLM` -> `LlamaDecoderLayer`).
pub(crate) fn decoder_layer_class(architecture: &str) -> String {
    let stem = architecture.strip_suffix("ForCausalLM").unwrap_or(architecture);
    format!("{stem}DecoderLayer")
}

/// The accelerate config for `s`; `deepspeed_file` is where the DeepSpeed
/// config is written when ZeRO-3 is asked for.
pub(crate) fn accelerate_config(s: &SftOptions, gpu: bool, layer_class: &str, deepspeed_file: &str) -> Value {
    let procs = s.nproc * s.nnodes;
    let distributed = if s.fsdp {
        "FSDP"
    } else if s.deepspeed.is_some() {
        "DEEPSPEED"
    } else if procs > 1 {
        // accelerate's torchrun launcher. On CPUs too: its MULTI_CPU type
        // starts one process unless MPI does the launching, whereas torchrun
        // starts them all and each joins a gloo group (TRL's `use_cpu`).
        "MULTI_GPU"
    } else {
        "NO"
    };
    let mut c = json!({
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": distributed,
        "num_machines": s.nnodes,
        "num_processes": procs,
        "machine_rank": s.node_rank,
        "main_training_function": "main",
        "rdzv_backend": "static",
        "same_network": true,
        // With `use_cpu` accelerate launches a single process; several CPU
        // processes are asked of torchrun, and the trainer's own `use_cpu`
        // keeps them on the CPU.
        "use_cpu": !gpu && procs == 1,
    });
    let Value::Object(o) = &mut c else { return c };
    // accelerate refuses mixed_precision beside a DeepSpeed config file
    // (the file's bf16 section decides).
    if s.deepspeed.is_none() {
        o.insert("mixed_precision".into(), json!(if gpu { "bf16" } else { "no" }));
    }
    if s.nnodes > 1 {
        o.insert("main_process_ip".into(), json!(s.master_addr.as_deref().unwrap_or_default()));
        o.insert("main_process_port".into(), json!(s.master_port));
    }
    if s.fsdp {
        o.insert(
            "fsdp_config".into(),
            json!({
                "fsdp_version": 2,
                "fsdp_reshard_after_forward": true,
                "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "fsdp_transformer_layer_cls_to_wrap": layer_class,
                "fsdp_state_dict_type": "FULL_STATE_DICT",
                "fsdp_cpu_ram_efficient_loading": true,
                "fsdp_offload_params": s.cpu_offload,
                "fsdp_activation_checkpointing": false,
            }),
        );
    }
    if s.deepspeed.is_some() {
        let mut ds = json!({"deepspeed_config_file": deepspeed_file, "zero3_init_flag": true});
        // Several nodes: torchrun-style launch on each node (the job
        // scheduler starts chatvec on every node), not pdsh from one.
        if s.nnodes > 1 {
            ds["deepspeed_multinode_launcher"] = json!("standard");
        }
        o.insert("deepspeed_config".into(), ds);
    }
    c
}

/// DeepSpeed ZeRO-3 with bf16; batch sizes left to the trainer ("auto");
/// with `cpu_offload`, parameters and optimizer state in CPU memory.
pub(crate) fn deepspeed_zero3(gpu: bool, cpu_offload: bool) -> Value {
    let mut c = json!({
        "bf16": {"enabled": if gpu { "auto" } else { "false" }},
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": true,
            "contiguous_gradients": true,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "stage3_gather_16bit_weights_on_model_save": true,
        },
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
    });
    if cpu_offload {
        c["zero_optimization"]["offload_param"] = json!({"device": "cpu", "pin_memory": true});
        c["zero_optimization"]["offload_optimizer"] = json!({"device": "cpu", "pin_memory": true});
    }
    c
}

/// Whether a chat template marks assistant turns for assistant-only loss.
pub(crate) fn has_generation_markers(template: &str) -> bool {
    regex::Regex::new(r"\{%-?\s*generation\s*-?%\}").is_ok_and(|r| r.is_match(template))
}

/// Whether a template is Llama-3 style (header ids and eot markers).
pub(crate) fn is_llama3_style(template: &str) -> bool {
    template.contains("<|start_header_id|>") && template.contains("<|eot_id|>")
}

/// Meta's Llama 3.1 / 3.2 / 3.3 templates (system block, tools) render
/// each plain message with one expression; wrapping the assistant's
/// content in `{% generation %}` markers there gives the training template
/// TRL needs while every rendered text stays the same (the markers render
/// nothing), so the system block and tools are kept. None when the
/// template has no such expression.
pub(crate) fn insert_llama3x_markers(template: &str) -> Option<String> {
    let re = regex::Regex::new(
        r"\{\{-?\s*'<\|start_header_id\|>'\s*\+\s*message\['role'\]\s*\+\s*'<\|end_header_id\|>\\n\\n'\s*\+\s*message\['content'\]\s*\|\s*trim\s*\+\s*'<\|eot_id\|>'\s*-?\}\}",
    )
    .ok()?;
    if re.find_iter(template).count() != 1 {
        return None;
    }
    let marked = concat!(
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}",
        "{%- if message['role'] == 'assistant' %}",
        "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}",
        "{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}",
    );
    Some(re.replace(template, regex::NoExpand(marked)).into_owned())
}

/// Wraps the output of a template's one assistant branch (`{% elif
/// message['role'] == 'assistant' %}` followed by `{{ ... }}` expressions,
/// as in Mistral's and many fine-tunes' templates) in `{% generation %}`
/// markers. The markers render nothing, and the insertion keeps every
/// whitespace-control sign, so the text is unchanged; the environment check
/// proves it by rendering conversations with both before the copy is used.
/// None when there is not exactly one such branch.
pub(crate) fn insert_assistant_markers(template: &str) -> Option<String> {
    let branch = regex::Regex::new(
        r#"\{%-?\s*(?:el)?if\s+message(?:\[\s*['"]role['"]\s*\]|\.role)\s*==\s*['"]assistant['"]\s*-?%\}"#,
    )
    .ok()?;
    let mut found = branch.find_iter(template);
    let (tag, None) = (found.next()?, found.next()) else { return None };
    let exprs = regex::Regex::new(r"^(?:\s*\{\{(?:[^}]|\}[^}])*\}\})+").ok()?;
    let run = exprs.find(&template[tag.end()..])?;
    let (start, end) = (tag.end() + run.start(), tag.end() + run.end());
    Some(format!(
        "{}{{% generation %}}{}{{% endgeneration %}}{}",
        &template[..start],
        &template[start..end],
        &template[end..]
    ))
}

/// A Llama-3 chat template whose assistant replies sit inside
/// `{% generation %}` markers, so TRL can train on them alone. It renders
/// the same text as Meta's template without tools: the bos token, then per
/// message a role header, the trimmed content and `<|eot_id|>`, and the
/// assistant header when a generation prompt is asked for.
pub(crate) const LLAMA3_TRAINING_TEMPLATE: &str = concat!(
    "{{- bos_token }}",
    "{%- for message in messages %}",
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}",
    "{%- if message['role'] == 'assistant' %}",
    "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}",
    "{%- else %}",
    "{{- message['content'] | trim + '<|eot_id|>' }}",
    "{%- endif %}",
    "{%- endfor %}",
    "{%- if add_generation_prompt %}",
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}",
    "{%- endif %}",
);

#[cfg(test)]
mod tests {
    use super::*;

    fn train() -> SftOptions {
        SftOptions::default()
    }

    fn scale() -> SftOptions {
        SftOptions::default()
    }

    fn paths() -> RunPaths<'static> {
        RunPaths {
            model_dir: "/m",
            data_dir: "/r/data",
            has_eval: false,
            output_dir: "/r/out",
            chat_template: None,
            resume_from: None,
            premasked: false,
        }
    }

    #[test]
    fn sft_config_maps_each_option_and_follows_transformers_5() {
        let c = sft_config(&paths(), &train(), true, 5);
        assert_eq!(c["learning_rate"], 1e-5);
        assert_eq!(c["warmup_steps"], 0.03);
        assert!(c.get("warmup_ratio").is_none());
        assert_eq!(c["max_steps"], -1);
        assert_eq!(c["assistant_only_loss"], true);
        assert_eq!(c["dataset_name"], "/r/data");
        // f32 master weights on every device, bf16 autocast on a GPU.
        assert_eq!((c["dtype"].clone(), c["bf16"].clone()), (json!("float32"), json!(true)));
        assert_eq!((c["save_strategy"].clone(), c["save_steps"].clone()), (json!("steps"), json!(500)));
        assert!(c.get("eval_strategy").is_none());
        let p = RunPaths {
            chat_template: Some("/r/t.jinja"),
            has_eval: true,
            resume_from: Some("/r/out/checkpoint-4"),
            ..paths()
        };
        let mut t = train();
        t.train_args.insert("weight_decay".into(), json!(0.1));
        let old = sft_config(&p, &t, false, 4);
        assert_eq!(old["warmup_ratio"], 0.03);
        assert_eq!((old["bf16"].clone(), old["dtype"].clone()), (json!(false), json!("float32")));
        assert_eq!(old["chat_template_path"], "/r/t.jinja");
        assert_eq!((old["eval_strategy"].clone(), old["eval_steps"].clone()), (json!("steps"), json!(500)));
        assert_eq!(old["resume_from_checkpoint"], "/r/out/checkpoint-4");
        assert_eq!(old["weight_decay"], 0.1);
        let mut t = train();
        t.lora = true;
        t.max_steps = Some(5);
        t.save_steps = 0;
        let l = sft_config(&paths(), &t, true, 5);
        assert_eq!(l["save_strategy"], "no");
        assert_eq!(
            (l["use_peft"].clone(), l["lora_r"].clone(), l["max_steps"].clone()),
            (json!(true), json!(16), json!(5))
        );
    }

    #[test]
    fn accelerate_configs_for_each_scale_out() {
        let one = accelerate_config(&scale(), true, "LlamaDecoderLayer", "/r/ds.json");
        assert_eq!((one["distributed_type"].clone(), one["num_processes"].clone()), (json!("NO"), json!(1)));
        let mut s = scale();
        s.nproc = 8;
        s.nnodes = 2;
        s.node_rank = 1;
        s.master_addr = Some("10.0.0.1".into());
        let multi = accelerate_config(&s, true, "LlamaDecoderLayer", "/r/ds.json");
        assert_eq!(multi["distributed_type"], "MULTI_GPU");
        assert_eq!((multi["num_processes"].clone(), multi["machine_rank"].clone()), (json!(16), json!(1)));
        assert_eq!(multi["main_process_ip"], "10.0.0.1");
        s.fsdp = true;
        let fsdp = accelerate_config(&s, true, &decoder_layer_class("LlamaForCausalLM"), "/r/ds.json");
        assert_eq!(fsdp["distributed_type"], "FSDP");
        assert_eq!(fsdp["fsdp_config"]["fsdp_version"], 2);
        assert_eq!(fsdp["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"], "LlamaDecoderLayer");
        s.fsdp = false;
        s.deepspeed = Some("zero3".into());
        let ds = accelerate_config(&s, true, "LlamaDecoderLayer", "/r/ds.json");
        assert_eq!(ds["distributed_type"], "DEEPSPEED");
        assert_eq!(ds["deepspeed_config"]["deepspeed_config_file"], "/r/ds.json");
        // accelerate refuses both; pdsh needs a hostfile chatvec does not write.
        assert!(ds.get("mixed_precision").is_none(), "{ds}");
        assert_eq!(ds["deepspeed_config"]["deepspeed_multinode_launcher"], "standard");
        assert_eq!(deepspeed_zero3(true, false)["zero_optimization"]["stage"], 3);
        assert_eq!(deepspeed_zero3(true, true)["zero_optimization"]["offload_param"]["device"], "cpu");
        let yaml = to_yaml(&fsdp).unwrap();
        assert!(yaml.contains("fsdp_config:\n  fsdp_version: 2\n"), "{yaml}");
        assert!(yaml.contains("distributed_type: FSDP\n"), "{yaml}");
        let sft = to_yaml(&sft_config(&paths(), &train(), true, 5)).unwrap();
        assert!(sft.contains("dataset_name: /r/data\n"), "{sft}");
        // Strings a YAML 1.1 reader (PyYAML, which accelerate uses) would
        // take for booleans or numbers stay strings.
        let cpu = to_yaml(&accelerate_config(&scale(), false, "L", "/d")).unwrap();
        assert!(cpu.contains("mixed_precision: 'no'\n"), "{cpu}");
        assert!(cpu.contains("distributed_type: 'NO'\n"), "{cpu}");
        for (s, tagged) in [
            ("no", true),
            ("On", true),
            ("1_000", true),
            ("1:20", true),
            ("0b101", true),
            ("bf16", false),
            ("cosine", false),
            ("a:b", false),
        ] {
            assert_eq!(yaml11_not_a_string(s), tagged, "{s}");
        }
    }

    #[test]
    fn llama3_1_templates_get_markers_in_place() {
        // The message loop of Meta's Llama 3.1 template (as TRL ships it).
        let t = "{%- for message in messages %}\n    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n    {%- elif 'tool_calls' in message %}x{%- endif %}{%- endfor %}";
        let m = insert_llama3x_markers(t).unwrap();
        assert!(has_generation_markers(&m), "{m}");
        assert!(m.contains("{%- elif 'tool_calls' in message %}x"), "the rest is kept: {m}");
        assert!(m.contains("'<|end_header_id|>\\n\\n' }}{%- if message['role'] == 'assistant' %}"), "{m}");
        assert!(insert_llama3x_markers("{{ messages }}").is_none());
    }

    #[test]
    fn llama3_templates_get_generation_markers() {
        let meta = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{{ content }}{% endfor %}";
        assert!(is_llama3_style(meta) && !has_generation_markers(meta));
        assert!(has_generation_markers(LLAMA3_TRAINING_TEMPLATE));
        assert!(has_generation_markers("{%- generation -%}x{% endgeneration %}"));
        assert_eq!(decoder_layer_class("MistralForCausalLM"), "MistralDecoderLayer");
    }

    /// Mistral-7B-Instruct-v0.2's template, as its tokenizer_config.json has it.
    const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

    #[test]
    fn the_one_assistant_branch_gets_markers_around_its_output_only() {
        let m = insert_assistant_markers(MISTRAL).expect("Mistral's branch is found");
        assert!(m.contains(
            "{% elif message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token}}{% endgeneration %}{% else %}"
        ));
        assert_eq!(m.replace("{% generation %}", "").replace("{% endgeneration %}", ""), MISTRAL);
        // Two assistant branches, or none: nothing to mark safely.
        let twice = format!("{MISTRAL}{{% if message.role == \"assistant\" %}}{{{{ x }}}}{{% endif %}}");
        assert_eq!(insert_assistant_markers(&twice), None);
        assert_eq!(insert_assistant_markers("{{ messages[0].content }}"), None);
        // A branch that opens with a control tag is left alone.
        assert_eq!(
            insert_assistant_markers("{% if message['role'] == 'assistant' %}{% set x = 1 %}{% endif %}"),
            None
        );
    }
}
