//! The SFT stage for real: three tiny Llamas built with transformers, a chat
//! vector applied by chatvec, then a few SFT steps on the CPU through
//! `chatvec sft` running TRL. It needs the Python environment
//! `scripts/sft-venv.sh` sets up (torch, transformers, trl, accelerate,
//! datasets, peft), so it is ignored by a plain `cargo test`; `.ci/run` sets
//! the environment up, points CHATVEC_SFT_PYTHON at it and runs this test
//! with `--ignored`.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

/// The interpreter of the SFT environment, and a directory with three tiny
/// Llamas (base, chat, pretrained) built by transformers.
fn tiny_llamas() -> (PathBuf, tempfile::TempDir) {
    let py = std::env::var_os("CHATVEC_SFT_PYTHON")
        .map(PathBuf::from)
        .expect("CHATVEC_SFT_PYTHON: the interpreter scripts/sft-venv.sh prints");
    let d = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/make_tiny_llama.py");
    let o = Command::new(&py).arg(script).arg(d.path()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (py, d)
}

#[test]
#[ignore = "needs torch/transformers/trl/accelerate: CHATVEC_SFT_PYTHON=$(scripts/sft-venv.sh) cargo test --test sft_e2e -- --ignored"]
fn apply_then_a_few_real_sft_steps_on_the_cpu() {
    let (py, d) = tiny_llamas();

    let cv = d.path().join("cv");
    ok(&chatvec(&[
        "-q",
        "apply",
        "--base",
        s(&d.path().join("base")),
        "--chat",
        s(&d.path().join("chat")),
        "--pretrained",
        s(&d.path().join("pretrained")),
        "-o",
        s(&cv),
    ]));
    let data = d.path().join("data.jsonl");
    std::fs::write(
        &data,
        concat!(
            "{\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}, {\"role\": \"assistant\", \"content\": \"Hello, how are you?\"}]}\n",
            "{\"conversation\": [{\"role\": \"user\", \"content\": \"こんにちは\"}, {\"role\": \"assistant\", \"content\": \"今日はいい天気ですね。\"}]}\n",
            "{\"instruction\": \"Add\", \"input\": \"1 + 1\", \"output\": \"2\"}\n",
        ),
    )
    .unwrap();
    let run = d.path().join("run");
    let o = command()
        .args(["sft", "--model", s(&cv), "--data", s(&data), "-o", s(&run), "--python", s(&py)])
        .args(["--max-steps", "3", "--grad-accum", "1", "--max-seq-len", "128", "--save-steps", "2"])
        .args(["--eval-data", s(&data), "--eval-steps", "1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "chatvec sft failed:\n{}", stderr(&o));
    // The held-out examples give an eval loss.
    assert!(stderr(&o).contains("eval_loss"), "{}", stderr(&o));

    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("chatvec-sft-run.json")).unwrap()).unwrap();
    let loss = rec["final_loss"].as_f64().expect("a loss was logged");
    assert!(loss.is_finite(), "final loss {loss}");
    assert_eq!(rec["steps_logged"], 3);
    assert_eq!(rec["model"]["manifest_sha256"], sha256_file(&cv.join("chatvec-manifest.json")));
    assert!(run.join("model/model.safetensors").is_file(), "{:?}", entries(&run.join("model")));

    // The trained checkpoint loads and scores a chat prompt.
    let check = "import math, sys\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\nm = AutoModelForCausalLM.from_pretrained(sys.argv[1])\nt = AutoTokenizer.from_pretrained(sys.argv[1])\nids = t.apply_chat_template([{'role': 'user', 'content': 'Hello'}], add_generation_prompt=True, return_tensors='pt')\nids = ids['input_ids'] if hasattr(ids, 'keys') else ids\nloss = m(ids, labels=ids).loss.item()\nassert math.isfinite(loss), loss\nprint('ok', loss)\n";
    let o = Command::new(&py).arg("-c").arg(check).arg(run.join("model")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("ok "));

    // Resume from the last checkpoint: the step count goes on from 3.
    let last = run.join("model/checkpoint-3");
    assert!(last.join("trainer_state.json").is_file(), "{:?}", entries(&run.join("model")));
    // (The resumed run's own checkpoints then push it out: 2 are kept.)
    let last = std::fs::canonicalize(&last).unwrap();
    let o = command()
        .args(["sft", "--model", s(&cv), "--data", s(&data), "-o", s(&run), "--python", s(&py)])
        .args(["--max-steps", "5", "--grad-accum", "1", "--max-seq-len", "128", "--save-steps", "2"])
        .args(["--eval-data", s(&data), "--eval-steps", "1", "--resume"])
        .output()
        .unwrap();
    assert!(o.status.success(), "chatvec sft --resume failed:\n{}", stderr(&o));
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("chatvec-sft-run.json")).unwrap()).unwrap();
    assert_eq!(rec["steps_logged"], 2, "steps 4 and 5 only");
    assert_eq!(rec["resumed_from"], s(&last));
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("model/checkpoint-5/trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["global_step"], 5);
}

/// Loads each generated accelerate config with accelerate's own loader and
/// the SFT config with TRL's parser, with every Python warning an error.
const PARSE_CONFIGS: &str = r#"
import json, os, sys, warnings
warnings.simplefilter("error")
out = sys.argv[2]
with open(sys.argv[1]) as f:
    report = json.load(f)
for name, text in report["files"]:
    with open(os.path.join(out, os.path.basename(name)), "w") as f:
        f.write(text)
from accelerate.commands.config.config_args import load_config_from_file
c = load_config_from_file(os.path.join(out, "accelerate_config.yaml"))
import yaml
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser
with open(os.path.join(out, "sft_config.yaml")) as f:
    cfg = yaml.safe_load(f)
cfg["bf16"] = False  # the configs are for GPUs; this machine has none
with open(os.path.join(out, "sft_cpu.yaml"), "w") as f:
    yaml.safe_dump(cfg, f)
TrlParser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig)).parse_args_and_config(
    ["--config", os.path.join(out, "sft_cpu.yaml")]
)
print("parsed", c.distributed_type, c.num_processes)
"#;

#[test]
#[ignore = "needs torch/transformers/trl/accelerate: CHATVEC_SFT_PYTHON=$(scripts/sft-venv.sh) cargo test --test sft_e2e -- --ignored"]
fn cluster_configs_parse_in_accelerate_and_trl_without_warnings() {
    let (py, d) = tiny_llamas();
    let data = d.path().join("data.jsonl");
    std::fs::write(&data, "{\"instruction\": \"Add\", \"input\": \"1 + 1\", \"output\": \"2\"}\n").unwrap();
    let model = d.path().join("chat");
    for (extra, kind) in [
        (&["--fsdp", "--nproc", "8"][..], "FSDP 8"),
        (
            &["--nproc", "4", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1"][..],
            "MULTI_GPU 8",
        ),
    ] {
        let o = command()
            .args(["--json", "sft", "--model", s(&model), "--data", s(&data), "-o", s(&d.path().join("run"))])
            .args(["--python", s(&py), "--dry-run", "--assistant-only-loss", "false"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let report = d.path().join("report.json");
        std::fs::write(&report, &o.stdout).unwrap();
        let out = tempfile::tempdir().unwrap();
        let o = Command::new(&py).arg("-c").arg(PARSE_CONFIGS).arg(&report).arg(out.path()).output().unwrap();
        assert!(o.status.success(), "{kind}: {}", String::from_utf8_lossy(&o.stderr));
        let said = String::from_utf8_lossy(&o.stdout).replace("DistributedType.", "");
        assert!(said.contains(&format!("parsed {kind}")), "{said}");
    }

    // Assistant-only loss on a template chatvec does not mark: TRL is asked
    // before launch whether it patches it (Qwen2.5: yes; an odd one: no).
    let o = Command::new(&py)
        .arg("-c")
        .arg("import os, trl; print(os.path.dirname(trl.__file__))")
        .output()
        .unwrap();
    let qwen = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("chat_templates/qwen2_5.jinja");
    let odd = d.path().join("odd.jinja");
    std::fs::write(&odd, "{% for m in messages %}{{ m.content }}{% endfor %}").unwrap();
    let dry = |t: &PathBuf| {
        command()
            .args(["sft", "--model", s(&model), "--data", s(&data), "-o", s(&d.path().join("run"))])
            .args(["--python", s(&py), "--dry-run", "--chat-template", s(t)])
            .output()
            .unwrap()
    };
    let o = dry(&qwen);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("TRL adds generation markers for its family"), "{}", stderr(&o));
    let o = dry(&odd);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("neither chatvec nor TRL can add them (TRL:"), "{}", stderr(&o));
}
