//! The SFT stage for real: three tiny Llamas built with transformers, a chat
//! vector applied by chatvec, then a few SFT steps on the CPU through
//! `chatvec sft` running TRL. It needs the Python environment
//! `scripts/sft-venv.sh` sets up (torch, transformers, trl, accelerate,
//! datasets, peft), so it is ignored by a plain `cargo test`; `.ci/run` sets
//! the environment up, points CHATVEC_SFT_PYTHON at it and runs this test
//! with `--ignored`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// The interpreter of the SFT environment (scripts/sft-venv.sh).
fn sft_python() -> PathBuf {
    std::env::var_os("CHATVEC_SFT_PYTHON")
        .map(PathBuf::from)
        .expect("CHATVEC_SFT_PYTHON: the interpreter scripts/sft-venv.sh prints")
}

/// The interpreter of the SFT environment, and a directory with three tiny
/// Llamas (base, chat, pretrained) built by transformers.
fn tiny_llamas() -> (PathBuf, tempfile::TempDir) {
    let py = sft_python();
    let d = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/make_tiny_llama.py");
    let o = Command::new(&py).arg(script).arg(d.path()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (py, d)
}

/// `base + (chat - pretrained)` of the tiny Llamas in `dir`, written by
/// chatvec into `dir/cv`.
fn chat_vector_applied(dir: &std::path::Path) -> PathBuf {
    let cv = dir.join("cv");
    let (base, chat, pre) = (dir.join("base"), dir.join("chat"), dir.join("pretrained"));
    ok(&chatvec(&[
        "-q",
        "apply",
        "--base",
        s(&base),
        "--chat",
        s(&chat),
        "--pretrained",
        s(&pre),
        "-o",
        s(&cv),
    ]));
    cv
}

#[test]
#[ignore = "needs torch/transformers/trl/accelerate: CHATVEC_SFT_PYTHON=$(scripts/sft-venv.sh) cargo test --test sft_e2e -- --ignored"]
fn apply_then_a_few_real_sft_steps_on_the_cpu() {
    let (py, d) = tiny_llamas();

    let cv = chat_vector_applied(d.path());
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
    // RUN/model holds only the model to serve: no checkpoints, no
    // training state, TRL's card replaced by chatvec's.
    let served = entries(&run.join("model"));
    assert!(!served.iter().any(|n| n.starts_with("checkpoint-") || n == "training_args.bin"), "{served:?}");
    let card = std::fs::read_to_string(run.join("model/README.md")).unwrap();
    assert!(card.contains("chatvec sft") && !card.contains("fine-tuned version of [None]"), "{card}");
    ok(&chatvec(&["verify", s(&run.join("model"))]));
    // Publishable as it stands: pushing RUN is told where the model is,
    // and RUN/model lands on the Hub whole.
    let hub = common::hub::Hub::start(vec![]);
    let push = |dir: &Path| {
        hub.command(&d.path().join("hub"))
            .env("HF_TOKEN", common::hub_write::WRITE_TOKEN)
            .args(["push", s(dir), "org/sft", "--create"])
            .output()
            .unwrap()
    };
    let o = push(&run);
    assert!(!o.status.success() && stderr(&o).contains("is a training run"), "{}", stderr(&o));
    ok(&push(&run.join("model")));
    let remote = hub.repos.lock().unwrap()["org/sft"].dir.clone();
    for f in entries(&run.join("model")) {
        assert_eq!(
            std::fs::read(remote.join(&f)).unwrap(),
            std::fs::read(run.join("model").join(&f)).unwrap(),
            "{f}"
        );
    }
    // Its template renders every conversation as the input model's does
    // (transformers on both), with no training markers.
    let same = r#"
import sys
from transformers import AutoTokenizer
a, b = AutoTokenizer.from_pretrained(sys.argv[1]), AutoTokenizer.from_pretrained(sys.argv[2])
assert "generation %}" not in (b.chat_template or ""), b.chat_template
convs = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A?"}, {"role": "assistant", "content": "B."}, {"role": "user", "content": "C?"}]]
for c in convs:
    for p in (False, True):
        x = a.apply_chat_template(c, tokenize=False, add_generation_prompt=p)
        y = b.apply_chat_template(c, tokenize=False, add_generation_prompt=p)
        assert x == y, (x, y)
print("same")
"#;
    let o = Command::new(&py).args(["-c", same, s(&cv), s(&run.join("model"))]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // The trained checkpoint loads and scores a chat prompt.
    let check = "import math, sys\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\nm = AutoModelForCausalLM.from_pretrained(sys.argv[1])\nt = AutoTokenizer.from_pretrained(sys.argv[1])\nids = t.apply_chat_template([{'role': 'user', 'content': 'Hello'}], add_generation_prompt=True, return_tensors='pt')\nids = ids['input_ids'] if hasattr(ids, 'keys') else ids\nloss = m(ids, labels=ids).loss.item()\nassert math.isfinite(loss), loss\nprint('ok', loss)\n";
    let o = Command::new(&py).arg("-c").arg(check).arg(run.join("model")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("ok "));

    // Resume from the last checkpoint: the step count goes on from 3.
    let last = run.join("checkpoints/checkpoint-3");
    assert!(last.join("trainer_state.json").is_file(), "{:?}", entries(&run.join("checkpoints")));
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
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(run.join("checkpoints/checkpoint-5/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["global_step"], 5);
}

/// Mistral-7B-Instruct-v0.2's chat template.
const MISTRAL_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

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
if c.deepspeed_config:
    # The ZeRO-3 file the accelerate config names is valid JSON with a stage 3 section.
    with open(os.path.join(out, os.path.basename(c.deepspeed_config["deepspeed_config_file"]))) as f:
        assert json.load(f)["zero_optimization"]["stage"] == 3
    assert c.deepspeed_config["deepspeed_multinode_launcher"] == "standard", c.deepspeed_config
    assert c.mixed_precision in (None, "no"), c.mixed_precision
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
            &["--deepspeed", "zero3", "--nproc", "8", "--nnodes", "2", "--master-addr", "10.0.0.1"][..],
            "DEEPSPEED 16",
        ),
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
    // Mistral's: TRL has no training copy, chatvec marks its assistant
    // branch, and transformers renders both the same.
    let mistral = d.path().join("mistral.jinja");
    std::fs::write(&mistral, MISTRAL_TEMPLATE).unwrap();
    let o = dry(&mistral);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("markers inserted around the assistant reply (checked"), "{}", stderr(&o));
    assert!(stdout(&o).contains("{% generation %}{{ message['content'] + eos_token}}{% endgeneration %}"));
    // One nobody can mark: chatvec computes the masks itself from each
    // reply's prefixes (its training is tested with real TRL below).
    let o = dry(&odd);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("chatvec computes the assistant masks"), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("assistant_only_loss: false"),
        "TRL trains on chatvec's masks: {}",
        stdout(&o)
    );
}

/// Compares chatvec's merge (argv[3], one safetensors file) with PEFT's own
/// `merge_and_unload` of the adapter (argv[2]) on the base (argv[1]) in
/// f32: every element within half a bf16 ulp (the output's one rounding),
/// then generates from the merged model with transformers.
const MATCHES_PEFT: &str = r#"
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
from safetensors.torch import load_file
base, adapter, merged = sys.argv[1:4]
m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
ref = PeftModel.from_pretrained(m, adapter).merge_and_unload().state_dict()
ours = load_file(merged + "/model.safetensors")
before = load_file(base + "/model.safetensors")
changed = 0
for k, v in ours.items():
    r, o = ref[k].double(), v.double()
    bad = ((o - r).abs() > r.abs() * 2**-8 + 1e-6).sum().item()
    assert bad == 0, (k, bad, (o - r).abs().max().item())
    changed += int(not torch.equal(v, before[k]))
model = AutoModelForCausalLM.from_pretrained(merged)
tok = AutoTokenizer.from_pretrained(merged)
ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True, return_tensors="pt")
ids = ids["input_ids"] if hasattr(ids, "keys") else ids
out = model.generate(ids, max_new_tokens=4, do_sample=False)
assert out.shape[1] > ids.shape[1], out.shape
print("ok", changed)
"#;

/// An adapter PEFT builds with every scaling rule at once (rsLoRA, rank
/// and alpha patterns, an embedding target, lm_head saved whole), with
/// nonzero B so the merge moves the weights.
const MAKE_ADAPTER: &str = r#"
import sys, torch
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
torch.manual_seed(0)
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False,
                 target_modules=["q_proj", "down_proj", "embed_tokens"],
                 rank_pattern={"down_proj": 2}, alpha_pattern={"layers.0.self_attn.q_proj": 3},
                 modules_to_save=["lm_head"])
p = get_peft_model(m, cfg)
with torch.no_grad():
    p.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
p.save_pretrained(sys.argv[2])
"#;

#[test]
#[ignore = "needs torch/transformers/trl/accelerate/peft: CHATVEC_SFT_PYTHON=$(scripts/sft-venv.sh) cargo test --test sft_e2e -- --ignored"]
fn lora_runs_end_in_a_merged_model_that_matches_peft_and_generates() {
    let (py, d) = tiny_llamas();
    let cv = chat_vector_applied(d.path());
    let matches_peft = |adapter: &std::path::Path, merged: &std::path::Path| {
        let o =
            Command::new(&py).arg("-c").arg(MATCHES_PEFT).arg(&cv).arg(adapter).arg(merged).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let said = String::from_utf8_lossy(&o.stdout).to_string();
        said.trim().strip_prefix("ok ").unwrap_or_else(|| panic!("{said}")).parse::<usize>().unwrap()
    };

    // A LoRA SFT run: the trainer saves the adapter, chatvec merges it.
    let data = d.path().join("data.jsonl");
    std::fs::write(
        &data,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}, {\"role\": \"assistant\", \"content\": \"Hello, how are you?\"}]}\n",
    )
    .unwrap();
    let run = d.path().join("run");
    let o = command()
        .args(["sft", "--model", s(&cv), "--data", s(&data), "-o", s(&run), "--python", s(&py)])
        .args(["--max-steps", "3", "--grad-accum", "1", "--max-seq-len", "64", "--lora", "--lora-r", "4"])
        .args(["--lr", "0.01", "--warmup-ratio", "0"])
        .output()
        .unwrap();
    assert!(o.status.success(), "chatvec sft --lora failed:\n{}", stderr(&o));
    assert!(run.join("adapter/adapter_model.safetensors").is_file(), "{:?}", entries(&run.join("adapter")));
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("chatvec-sft-run.json")).unwrap()).unwrap();
    assert_eq!(rec["trained_model"]["lora"], true);
    let merged_files = rec["merged_model"]["files"].as_array().unwrap();
    assert_eq!(merged_files[0]["sha256"], sha256_file(&run.join("model/model.safetensors")));
    // all-linear on two layers: 7 projections each moved.
    assert_eq!(matches_peft(&run.join("adapter"), &run.join("model")), 2 * 7);
    ok(&chatvec(&["verify", s(&run.join("model"))]));

    // An adapter from elsewhere with every scaling rule, merged by `apply --lora`.
    let adapter = d.path().join("adapter");
    let o = Command::new(&py).arg("-c").arg(MAKE_ADAPTER).arg(&cv).arg(&adapter).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let merged = d.path().join("merged");
    ok(&chatvec(&["-q", "apply", "--base", s(&cv), "--lora", s(&adapter), "-o", s(&merged)]));
    // q_proj and down_proj of two layers, the embeddings, lm_head.
    assert_eq!(matches_peft(&adapter, &merged), 2 * 2 + 2);
}

#[test]
#[ignore = "needs torch/transformers/trl/accelerate: CHATVEC_SFT_PYTHON=$(scripts/sft-venv.sh) cargo test --test sft_e2e -- --ignored"]
fn two_cpu_processes_share_the_data_through_accelerates_launcher() {
    let (py, d) = tiny_llamas();
    let data = d.path().join("data.jsonl");
    let lines: String = (0..8)
        .map(|i| format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"Hello {i}\"}}, {{\"role\": \"assistant\", \"content\": \"Hi {i}, how are you?\"}}]}}\n"))
        .collect();
    std::fs::write(&data, lines).unwrap();
    let run = d.path().join("run");
    let o = command()
        .args(["sft", "--model", s(&d.path().join("chat")), "--data", s(&data), "-o", s(&run)])
        .args([
            "--python",
            s(&py),
            "--nproc",
            "2",
            "--epochs",
            "1",
            "--grad-accum",
            "1",
            "--max-seq-len",
            "64",
        ])
        .args(["--save-steps", "0"])
        .output()
        .unwrap();
    assert!(o.status.success(), "chatvec sft --nproc 2 failed:\n{}", stderr(&o));
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("chatvec-sft-run.json")).unwrap()).unwrap();
    assert_eq!(rec["world_size"], 2);
    // 8 examples, one per process per step: 4 steps when two processes
    // split the data (one process alone would take 8).
    assert_eq!(rec["steps_logged"], 4, "{}", stderr(&o));
    assert!(run.join("model/model.safetensors").is_file(), "{:?}", entries(&run.join("model")));
}

/// Teaches the pretrained tiny Llama (argv[1]) the conversations in
/// argv[2] by heart (plain torch, whole sequences) and saves it to argv[3]
/// with the tokenizer and an eos of `<|eot_id|>`: a "chat model" whose
/// vector really does something.
const TEACH: &str = r#"
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(sys.argv[1])
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
convs = [json.loads(l)["messages"] for l in open(sys.argv[2])]
batch = [torch.tensor([tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]]) for c in convs]
opt = torch.optim.Adam(m.parameters(), lr=1e-2)
for step in range(300):
    loss = sum(m(ids, labels=ids).loss for ids in batch) / len(batch)
    opt.zero_grad(); loss.backward(); opt.step()
assert loss.item() < 0.05, loss.item()
m.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|eot_id|>")
m.to(torch.bfloat16).save_pretrained(sys.argv[3])
tok.save_pretrained(sys.argv[3])
print("taught", loss.item())
"#;

/// The assistant-token loss of model argv[1] on argv[2], computed apart
/// from chatvec's worker: assistant spans found in the token ids by the
/// template's own markers (after `<|start_header_id|>assistant
/// <|end_header_id|>\n\n`, through the next `<|eot_id|>`), and
/// transformers' own shifted cross-entropy over them.
const INDEPENDENT_LOSS: &str = r#"
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
head = tok.encode("<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)
eot = tok.convert_tokens_to_ids("<|eot_id|>")
total, count = 0.0, 0
for line in open(sys.argv[2]):
    ids = tok.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=True)["input_ids"]
    labels = [-100] * len(ids)
    i = 0
    while i + len(head) <= len(ids):
        if ids[i:i + len(head)] == head:
            j = i + len(head)
            while j < len(ids):
                labels[j] = ids[j]
                if ids[j] == eot:
                    break
                j += 1
            i = j
        i += 1
    n = sum(1 for x in labels[1:] if x != -100)
    with torch.no_grad():
        loss = m(torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
    total += loss * n
    count += n
print(total / count)
"#;

#[test]
#[ignore = "needs torch/transformers: CHATVEC_SFT_PYTHON=$(scripts/sft-venv.sh) cargo test --test sft_e2e -- --ignored"]
fn eval_ranks_a_sweep_and_broken_candidates_last_with_an_independently_checked_loss() {
    let (py, d) = tiny_llamas();
    let data = d.path().join("held-out.jsonl");
    let prompts = d.path().join("prompts.jsonl");
    let convs =
        [("Hello", "Hello, how are you?"), ("1 + 1 = ?", "Two."), ("こんにちは", "今日はいい天気ですね。")];
    let mut text = String::new();
    let mut ptext = String::new();
    for (q, a) in convs {
        text.push_str(&serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}).to_string());
        text.push('\n');
        ptext.push_str(&serde_json::json!({"prompt": q}).to_string());
        ptext.push('\n');
    }
    std::fs::write(&data, text).unwrap();
    std::fs::write(&prompts, ptext).unwrap();
    let taught = d.path().join("taught");
    let o = Command::new(&py)
        .arg("-c")
        .arg(TEACH)
        .arg(d.path().join("pretrained"))
        .arg(&data)
        .arg(&taught)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Candidates: the vector at scale 1 and 3, and scale 1 with its eos
    // removed from generation_config.json.
    let sweep = d.path().join("sweep");
    let pre = d.path().join("pretrained");
    ok(&chatvec(&[
        "-q",
        "sweep",
        "--base",
        s(&pre),
        "--chat",
        s(&taught),
        "--pretrained",
        s(&pre),
        "--scales",
        "1,3",
        "-o",
        s(&sweep),
    ]));
    let noeos = d.path().join("noeos");
    std::fs::create_dir_all(&noeos).unwrap();
    for e in std::fs::read_dir(sweep.join("scale-1")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, noeos.join(p.file_name().unwrap())).unwrap();
    }
    let gc = noeos.join("generation_config.json");
    let mut g: serde_json::Value = serde_json::from_slice(&std::fs::read(&gc).unwrap()).unwrap();
    g["eos_token_id"] = serde_json::Value::Null;
    std::fs::write(&gc, g.to_string()).unwrap();

    let o = command()
        .args(["--json", "eval", s(&sweep.join("scale-3")), s(&noeos), s(&sweep.join("scale-1"))])
        .args(["--data", s(&data), "--prompts", s(&prompts), "--max-new-tokens", "24", "--python", s(&py)])
        .args(["--plot", s(&d.path().join("eval.svg"))])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let models = rep["models"].as_array().unwrap();
    let name = |i: usize| models[i]["model"].as_str().unwrap().to_string();
    assert!(name(0).ends_with("scale-1"), "best: {}", rep);
    let last_two = [name(1), name(2)];
    assert!(
        last_two.iter().any(|n| n.ends_with("scale-3")) && last_two.iter().any(|n| n.ends_with("noeos")),
        "{rep}"
    );
    assert_eq!(models[0]["stop_with_answer_rate"], 1.0, "{rep}");
    let noeos_row = models.iter().find(|m| m["model"].as_str().unwrap().ends_with("noeos")).unwrap();
    assert_eq!(noeos_row["stop_rate"], 0.0, "{rep}");
    assert_eq!(models[0]["scale"], 1.0);
    // The loss, computed apart.
    let o = Command::new(&py)
        .arg("-c")
        .arg(INDEPENDENT_LOSS)
        .arg(sweep.join("scale-1"))
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want: f64 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
    let got = models[0]["assistant_loss"].as_f64().unwrap();
    assert!((got - want).abs() <= 1e-4 * want.abs().max(1e-3), "assistant loss {got} vs independent {want}");
    let svg = std::fs::read_to_string(d.path().join("eval.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
    roxmltree::Document::parse(&svg).expect("the plot is well-formed XML");
    // Each model's loss interval is drawn as an error bar.
    let bars = svg.matches(r##"stroke="#4e79a7" stroke-width="1.5""##).count();
    assert_eq!(bars, models.len(), "{svg}");

    // The same as one recipe: sweep, eval, choose, then SFT from the choice.
    let recipe = d.path().join("recipe.toml");
    std::fs::write(
        &recipe,
        format!(
            "merge_method = \"chat_vector\"\nbase_model = \"{pre}\"\nchat = \"{taught}\"\npretrained = \"{pre}\"\n\
             [sweep]\nscales = [3.0, 1.0]\n\
             [eval]\ndata = \"held-out.jsonl\"\nprompts = \"prompts.jsonl\"\nmax_new_tokens = 24\npython = \"{py}\"\n\
             [sft]\ndata = \"held-out.jsonl\"\nmax_steps = 1\ngrad_accum = 1\nmax_seq_len = 64\npython = \"{py}\"\n",
            pre = s(&pre),
            taught = s(&taught),
            py = s(&py)
        ),
    )
    .unwrap();
    let run = d.path().join("run");
    let o = command().args(["-q", "run", s(&recipe), "-o", s(&run)]).output().unwrap();
    assert!(o.status.success(), "chatvec run failed:\n{}", stderr(&o));
    let chosen = run.join("sweep/scale-1");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(chosen.join("chatvec-manifest.json")).unwrap()).unwrap();
    assert_eq!(m["selection"]["chosen"], s(&chosen), "{}", m["selection"]);
    assert_eq!(m["selection"]["candidates"].as_array().unwrap().len(), 2);
    // The chosen model's card states what the evaluation measured, as a
    // table and as the Hub's model-index, which huggingface_hub reads
    // without a warning; the manifest still matches the card.
    let card = std::fs::read_to_string(chosen.join("README.md")).unwrap();
    assert!(
        card.contains("## Evaluation") && card.contains("(this model)") && card.contains("model-index"),
        "{card}"
    );
    let parse = "import sys, warnings\nwarnings.simplefilter('error')\nfrom huggingface_hub import ModelCard\nc = ModelCard.load(sys.argv[1])\nassert c.data.eval_results, c.data\nprint(len(c.data.eval_results))\n";
    let o = Command::new(&py).args(["-c", parse, s(&chosen.join("README.md"))]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    ok(&chatvec(&["verify", s(&chosen)]));
    // A sweep's candidate passes for its recipe: its scale is one of the sweep's.
    ok(&chatvec(&["verify", s(&chosen), "--recipe", s(&recipe)]));
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("sft/chatvec-sft-run.json")).unwrap()).unwrap();
    assert_eq!(rec["model"]["reference"], s(&chosen));
    assert!(run.join("eval.json").is_file());
}

/// The demo's models load in transformers (their tokenizer.json has every
/// field the `tokenizers` library requires), so `chatvec eval` runs on
/// them; with stderr not a terminal it says a line per model and stage;
/// and the base, which has a tokenizer but no chat template, is refused
/// before any model is loaded.
#[test]
#[ignore = "needs torch/transformers: CHATVEC_SFT_PYTHON=$(scripts/sft-venv.sh) cargo test --test sft_e2e -- --ignored"]
fn the_demos_models_evaluate_with_progress_lines_in_a_log() {
    let (py, d) = (sft_python(), tempfile::tempdir().unwrap());
    let demo = d.path().join("demo");
    ok(&chatvec(&["demo", "--dir", s(&demo), "--keep"]));
    let cv = demo.join("swallow-like-cv");
    // --fresh: not the results an earlier run of this test kept.
    let o = chatvec(&["eval", s(&cv), "--python", s(&py), "--max-new-tokens", "8", "--json", "--fresh"]);
    ok(&o);
    let e = stderr(&o);
    for stage in ["loss done", "generate done"] {
        assert!(e.contains(&format!("eval: model 1/1 {}: {stage}", cv.display())), "{stage}: {e}");
    }
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    // The same model files and inputs again: the kept results, no worker.
    let again = chatvec(&["eval", s(&cv), "--python", s(&py), "--max-new-tokens", "8", "--json"]);
    ok(&again);
    assert!(stderr(&again).contains("results kept from an earlier run"), "{}", stderr(&again));
    assert!(!stderr(&again).contains("generate done"), "{}", stderr(&again));
    let w: serde_json::Value = serde_json::from_str(&stdout(&again)).unwrap();
    assert_eq!(w["models"][0]["assistant_loss"], v["models"][0]["assistant_loss"]);
    assert_eq!(w["models"][0]["answers"], v["models"][0]["answers"]);
    let loss = v["models"][0]["assistant_loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{loss}");
    let iv = &v["models"][0]["assistant_loss_interval"];
    let (low, high) = (iv["low"].as_f64().unwrap(), iv["high"].as_f64().unwrap());
    assert!(low <= loss && loss <= high && low < high, "{loss} outside [{low}, {high}]");
    // The stored-vector and streamed outputs are the same bytes: the
    // ranking cannot tell them apart, and says so.
    let streamed = demo.join("swallow-like-cv-streamed");
    let o = chatvec(&["eval", s(&cv), s(&streamed), "--python", s(&py), "--max-new-tokens", "8", "--json"]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["models"][1]["tied_with"], 1, "{}", v["models"]);
    assert_eq!(v["models"][0]["assistant_loss"], v["models"][1]["assistant_loss"]);
    let base = demo.join("swallow-like");
    let o = chatvec(&["eval", s(&base), "--python", s(&py)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("has no chat template"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("Traceback"), "{}", stderr(&o));
    // With another model's template lent, the unmerged base is ranked
    // beside the candidate.
    let o = chatvec(&[
        "eval",
        s(&cv),
        s(&base),
        "--python",
        s(&py),
        "--chat-template",
        s(&cv),
        "--max-new-tokens",
        "4",
        "--json",
    ]);
    ok(&o);
    assert!(stderr(&o).contains("has no chat template: prompted with the one of model"), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["models"].as_array().unwrap().len(), 2);
    assert!(v["models"].as_array().unwrap().iter().all(|m| m["assistant_loss"].as_f64().is_some()));
}

/// `--lm-data`: each candidate's LM loss on target-language text beside the
/// base its manifest records, equal to an independent computation; a
/// candidate over the margin is not acceptable, and with none acceptable
/// the report says so.
#[test]
#[ignore = "needs torch/transformers: CHATVEC_SFT_PYTHON=$(scripts/sft-venv.sh) cargo test --test sft_e2e -- --ignored"]
fn lm_loss_against_the_base_decides_what_is_acceptable() {
    let (py, d) = (sft_python(), tempfile::tempdir().unwrap());
    let demo = d.path().join("demo");
    ok(&chatvec(&["demo", "--dir", s(&demo), "--keep"]));
    let (cv, base) = (demo.join("swallow-like-cv"), demo.join("swallow-like"));
    let text = d.path().join("lm.txt");
    let docs: Vec<String> = (0..6)
        .map(|k| (0..20).map(|i| format!("tok{}", 4 + (i * 7 + k * 13) % 300)).collect::<Vec<_>>().join(" "))
        .collect();
    std::fs::write(&text, docs.join("\n") + "\n").unwrap();
    // Independently: mean NLL per predicted token over the documents.
    let script = r#"
import sys, json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {}
for path in sys.argv[2:]:
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    for line in open(sys.argv[1]):
        ids = tok(line.strip())["input_ids"]
        with torch.no_grad():
            out_ = model(torch.tensor([ids]), labels=torch.tensor([ids]))
        nll += out_.loss.item() * (len(ids) - 1)
        n += len(ids) - 1
    out[path] = nll / n
print(json.dumps(out))
"#;
    let o = Command::new(&py).args(["-c", script, s(&text), s(&cv), s(&base)]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (want_cv, want_base) = (want[s(&cv)].as_f64().unwrap(), want[s(&base)].as_f64().unwrap());
    let run = |margin: &str| {
        let o = chatvec(&[
            "eval",
            s(&cv),
            "--python",
            s(&py),
            "--max-new-tokens",
            "4",
            "--lm-data",
            s(&text),
            "--lm-margin",
            margin,
            "--json",
        ]);
        ok(&o);
        serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap()
    };
    let v = run("1000000");
    let m = &v["models"][0];
    let (got_cv, got_base) = (m["lm_loss"].as_f64().unwrap(), v["lm_reference"]["lm_loss"].as_f64().unwrap());
    assert!((got_cv - want_cv).abs() <= 1e-4 * want_cv, "candidate {got_cv} vs independent {want_cv}");
    assert!((got_base - want_base).abs() <= 1e-4 * want_base, "base {got_base} vs independent {want_base}");
    // Without --lm-base, the base is the one the candidate's manifest records.
    assert_eq!(v["lm_reference"]["model"], s(&base));
    assert_eq!(m["keeps_language"], true);
    assert_eq!(v["none_acceptable"], false);
    // One candidate: alone on the Pareto front of chat against LM loss.
    assert_eq!(m["pareto"], true, "{m}");
    let increase = (want_cv - want_base) / want_base;
    assert!((m["lm_loss_increase"].as_f64().unwrap() - increase).abs() < 1e-4, "{}", m["lm_loss_increase"]);
    // A margin below the candidate's increase: none acceptable (or, if the
    // merge happened to lower the loss, the candidate keeps it).
    let v = run("0");
    assert_eq!(v["none_acceptable"], increase > 0.0, "{}", v);
    assert_eq!(v["models"][0]["keeps_language"], increase <= 0.0);
}

/// A stand-in OpenAI-compatible judge on 127.0.0.1 that grades by the
/// answer's length: `1 + chars % top`, the answer being what follows the
/// last `ANSWER:` line of the prompt (the test's MT-Bench prompts) or
/// ELYZA's answer section (chatvec's ELYZA prompt). Counts completions.
struct StandInJudge {
    url: String,
    asked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// The grade the stand-in judge gives `answer` on a 1-`top` scale.
fn stand_in_grade(answer: &str, top: usize) -> f64 {
    (1 + answer.chars().count() % top) as f64
}

fn stand_in_judge() -> StandInJudge {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let asked = std::sync::Arc::new(AtomicUsize::new(0));
    let a = asked.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let a = a.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    if h.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0u8; len];
                r.read_exact(&mut body).unwrap();
                let text = if line.starts_with("GET") {
                    "{\"data\": [{\"id\": \"stand-in\"}]}".to_string()
                } else {
                    a.fetch_add(1, Ordering::SeqCst);
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    let user = v["messages"][1]["content"].as_str().unwrap().to_string();
                    let content = if let Some(at) = user.rfind("ANSWER:\n") {
                        let answer = user[at + 8..].trim_end_matches("\nEND");
                        format!("Fine. Rating: [[{}]]", stand_in_grade(answer, 10))
                    } else {
                        let start = user.find("[言語モデルの回答]\n").unwrap() + "[言語モデルの回答]\n".len();
                        let end = user.find("\n[回答ここまで]").unwrap();
                        format!("{}", stand_in_grade(&user[start..end], 5))
                    };
                    serde_json::json!({"choices": [{"message": {"role": "assistant", "content": content}}]})
                        .to_string()
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
                    text.len()
                );
            });
        }
    });
    StandInJudge { url: format!("http://127.0.0.1:{port}/v1"), asked }
}

/// Judged benchmarks end to end: ELYZA-tasks-100's stand-in CSV served as
/// a Hub dataset by the test Hub, a Japanese MT-Bench stand-in read from a
/// local directory, answers generated by the demo's models, graded by a
/// stand-in judge. The mean grades, categories, turns and intervals equal
/// what the test computes from the graded answers; two identical models
/// tie; the files are pinned by commit and sha256; a second run (offline,
/// too) sends no judge request.
#[test]
#[ignore = "needs torch/transformers: CHATVEC_SFT_PYTHON=$(scripts/sft-venv.sh) cargo test --test sft_e2e -- --ignored"]
fn judged_benchmarks_grade_rank_pin_and_cache() {
    use std::sync::atomic::Ordering;
    let (py, d) = (sft_python(), tempfile::tempdir().unwrap());
    let demo = d.path().join("demo");
    ok(&chatvec(&["demo", "--dir", s(&demo), "--keep"]));
    let (cv, streamed) = (demo.join("swallow-like-cv"), demo.join("swallow-like-cv-streamed"));
    // ELYZA-tasks-100 on the test Hub: a quoted, multi-line CSV.
    let elyza = d.path().join("elyza");
    std::fs::create_dir_all(&elyza).unwrap();
    let csv = "input,output,eval_aspect\n\"仕事の熱意を取り戻すアイデアを\n三つ挙げてください。\",\"1. 学ぶ, 2. 休む, 3. 話す\",- 三つでなければ減点\n日本の首都は?,東京です。,- 東京なら5点\n";
    std::fs::write(elyza.join("test.csv"), csv).unwrap();
    let hub = common::hub::Hub::start(vec![("elyza/ELYZA-tasks-100", &elyza, common::hub::Fault::Healthy)]);
    // Japanese MT-Bench's layout, locally: two categories, two turns.
    let mt = d.path().join("mt");
    std::fs::create_dir_all(mt.join("japanese_mt_bench/reference_answer")).unwrap();
    let questions = [
        serde_json::json!({"question_id": 81, "category": "writing", "turns": ["旅行の記事を書いてください。", "もっと短くしてください。"]}),
        serde_json::json!({"question_id": 111, "category": "math", "turns": ["1+1は?", "2+2は?"]}),
        serde_json::json!({"question_id": 131, "category": "math", "turns": ["3*3は?", "4*4は?"]}),
    ];
    let lines: Vec<String> = questions.iter().map(|q| q.to_string()).collect();
    std::fs::write(mt.join("japanese_mt_bench/question.jsonl"), lines.join("\n")).unwrap();
    let refs = [
        serde_json::json!({"question_id": 111, "choices": [{"index": 0, "turns": ["2", "4"]}]}),
        serde_json::json!({"question_id": 131, "choices": [{"index": 0, "turns": ["9", "16"]}]}),
    ];
    let lines: Vec<String> = refs.iter().map(|q| q.to_string()).collect();
    std::fs::write(mt.join("japanese_mt_bench/reference_answer/gpt-4.jsonl"), lines.join("\n")).unwrap();
    let prompts = [
        ("single-v1", "Q: {question}\nANSWER:\n{answer}\nEND"),
        ("single-math-v1", "Q: {question}\nREF: {ref_answer_1}\nANSWER:\n{answer}\nEND"),
        ("single-v1-multi-turn", "{question_1} {answer_1} {question_2}\nANSWER:\n{answer_2}\nEND"),
        (
            "single-math-v1-multi-turn",
            "{question_1} {ref_answer_1} {answer_1} {question_2} {ref_answer_2}\nANSWER:\n{answer_2}\nEND",
        ),
    ];
    let lines: Vec<String> = prompts
        .iter()
        .map(|(n, t)| serde_json::json!({"name": n, "type": "single", "system_prompt": "公平に採点してください。", "prompt_template": t, "output_format": "[[rating]]"}).to_string())
        .collect();
    std::fs::write(mt.join("judge_ja_prompts.jsonl"), lines.join("\n")).unwrap();
    let judge = stand_in_judge();
    let cache = d.path().join("hf");
    let bench_mt = format!("ja-mt-bench={}", mt.display());
    // Judgments are kept per judge model across runs of this test (the
    // cache directory is shared): a judge name of its own asks afresh.
    let judge_name = format!(
        "stand-in-{}",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
    );
    let run = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            s(&cv),
            s(&streamed),
            "--bench",
            "elyza-tasks-100",
            "--bench",
            &bench_mt,
            "--judge-url",
            &judge.url,
            "--judge-model",
            &judge_name,
            "--bench-samples",
            "2",
            "--bench-max-new-tokens",
            "12",
            "--python",
            s(&py),
            "--json",
        ];
        args.extend_from_slice(extra);
        hub.command(&cache).args(&args).output().unwrap()
    };
    let o = run(&["--fresh"]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let asked = judge.asked.load(Ordering::SeqCst);
    assert!(asked > 0);
    assert_eq!(v["judge_requests"].as_u64().unwrap() as usize, asked);
    // The ELYZA file came through the test Hub into the standard cache,
    // pinned by the commit and the sha256 of its bytes.
    let file = &v["benchmarks"][0]["files"][0];
    assert_eq!(file["source"], "hf://datasets/elyza/ELYZA-tasks-100/test.csv");
    assert_eq!(file["commit"], common::hub::COMMIT);
    assert_eq!(file["sha256"].as_str().unwrap(), sha256_file(&elyza.join("test.csv")));
    let snap = cache.join("datasets--elyza--ELYZA-tasks-100/snapshots").join(common::hub::COMMIT);
    assert_eq!(std::fs::read_to_string(snap.join("test.csv")).unwrap(), csv);
    assert_eq!(v["benchmarks"][1]["files"].as_array().unwrap().len(), 3);
    for m in v["models"].as_array().unwrap() {
        for (b, top) in [(0, 5), (1, 10)] {
            let bench = &m["benchmarks"][b];
            let grades = bench["grades"].as_array().unwrap();
            // Every grade is the stand-in's for the answer it graded.
            for g in grades {
                assert_eq!(
                    g["score"].as_f64().unwrap(),
                    stand_in_grade(g["answer"].as_str().unwrap(), top),
                    "{g}"
                );
            }
            let scores: Vec<f64> = grades.iter().map(|g| g["score"].as_f64().unwrap()).collect();
            let mean = scores.iter().sum::<f64>() / scores.len() as f64;
            assert!((bench["score"].as_f64().unwrap() - mean).abs() < 1e-12);
            let iv = &bench["interval"];
            assert!(
                iv["low"].as_f64().unwrap() <= mean + 1e-12 && mean <= iv["high"].as_f64().unwrap() + 1e-12
            );
            if b == 0 {
                // ELYZA: two questions, greedy, one turn: one answer each.
                assert_eq!(grades.len(), 2 * 2, "greedy answers stand for both samples");
            } else {
                // Writing samples at 0.7 (2 samples x 2 turns), math is
                // greedy (2 questions x 2 samples x 2 turns, one answer each).
                assert_eq!(grades.len(), 4 + 8);
                let cat = |c: &str| {
                    let xs: Vec<f64> = grades
                        .iter()
                        .filter(|g| g["category"] == c)
                        .map(|g| g["score"].as_f64().unwrap())
                        .collect();
                    xs.iter().sum::<f64>() / xs.len() as f64
                };
                assert!((bench["categories"]["math"].as_f64().unwrap() - cat("math")).abs() < 1e-12);
                assert!((bench["categories"]["writing"].as_f64().unwrap() - cat("writing")).abs() < 1e-12);
                assert_eq!(bench["turns"].as_array().unwrap().len(), 2);
            }
        }
    }
    // The two outputs are the same bytes: the same grades, reported tied.
    assert_eq!(v["models"][1]["tied_with"], 1);
    assert_eq!(v["models"][0]["benchmarks"][0]["score"], v["models"][1]["benchmarks"][0]["score"]);
    // Again, and offline: answers and judgments come from the caches.
    let o = run(&["--offline"]);
    ok(&o);
    let w: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(judge.asked.load(Ordering::SeqCst), asked, "a rerun sends no judge request");
    assert_eq!(w["judge_requests"], 0);
    assert_eq!(w["models"][0]["benchmarks"], v["models"][0]["benchmarks"]);
    // The table says what was run, and by which judge.
    let mut args: Vec<String> = vec!["eval".into(), s(&cv).into(), "--bench".into(), bench_mt.clone()];
    args.extend(["--judge-url".into(), judge.url.clone(), "--judge-model".into(), judge_name.clone()]);
    args.extend(["--bench-samples".into(), "2".into(), "--bench-max-new-tokens".into(), "12".into()]);
    args.extend(["--python".into(), s(&py).into()]);
    let o = hub.command(&cache).args(&args).output().unwrap();
    ok(&o);
    let table = stdout(&o);
    assert!(table.contains("ja-mt-bench per category") && table.contains("turn 2:"), "{table}");
    // No judge: refused before any model is loaded.
    let o = hub
        .command(&cache)
        .args(["eval", s(&cv), "--bench", &bench_mt, "--python", s(&py)])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--bench needs a judge"), "{}", stderr(&o));
}

/// `--harness`: the installed lm_eval run on two tiny models with a local
/// task definition and data file; chatvec's figures equal what lm_eval
/// reports when run alone (its own command line, same settings), with its
/// standard errors as 95% intervals, and rank the models.
#[test]
#[ignore = "needs torch/transformers/lm_eval: CHATVEC_SFT_PYTHON=$(scripts/sft-venv.sh) cargo test --test sft_e2e -- --ignored"]
fn lm_eval_tasks_fold_into_the_report_as_lm_eval_reports_them() {
    let (py, d) = (sft_python(), tempfile::tempdir().unwrap());
    let demo = d.path().join("demo");
    ok(&chatvec(&["demo", "--dir", s(&demo), "--keep"]));
    let (cv, chat) = (demo.join("swallow-like-cv"), demo.join("llama-chat"));
    let tasks = d.path().join("tasks");
    std::fs::create_dir_all(&tasks).unwrap();
    let rows: Vec<String> = (0..16)
        .map(|i| {
            serde_json::json!({"question": format!("質問{i}: tok{} tok{}", 4 + i, 9 + 2 * i), "choices": ["はい", "いいえ", "たぶん"], "answer": i % 3})
                .to_string()
        })
        .collect();
    std::fs::write(tasks.join("data.jsonl"), rows.join("\n")).unwrap();
    std::fs::write(
        tasks.join("tiny_ja_mc.yaml"),
        format!(
            "task: tiny_ja_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{{{question}}}}\"\ndoc_to_choice: \"{{{{choices}}}}\"\ndoc_to_target: \"{{{{answer}}}}\"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
            tasks.join("data.jsonl").display()
        ),
    )
    .unwrap();
    let o = chatvec(&[
        "eval",
        s(&cv),
        s(&chat),
        "--harness",
        "tiny_ja_mc",
        "--harness-include",
        s(&tasks),
        "--python",
        s(&py),
        "--json",
        "--fresh",
    ]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["benchmarks"][0]["name"], "tiny_ja_mc/acc");
    assert_eq!(v["benchmarks"][0]["kind"], "lm_eval");
    for m in v["models"].as_array().unwrap() {
        // lm_eval alone, through its own command line, on the same model.
        let out = d.path().join(format!("lm_eval-{}", m["rank"]));
        let cli = py.parent().unwrap().join("lm_eval");
        let o = Command::new(&cli)
            .args(["--model", "hf", "--model_args"])
            .arg(format!("pretrained={},dtype=float32", m["path"].as_str().unwrap()))
            .args([
                "--tasks",
                "tiny_ja_mc",
                "--include_path",
                s(&tasks),
                "--device",
                "cpu",
                "--batch_size",
                "8",
            ])
            .arg("--output_path")
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let mut found = Vec::new();
        let mut stack = vec![out.clone()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.file_name().unwrap().to_string_lossy().starts_with("results") {
                    found.push(p);
                }
            }
        }
        assert_eq!(found.len(), 1, "{found:?}");
        let alone: serde_json::Value = serde_json::from_slice(&std::fs::read(&found[0]).unwrap()).unwrap();
        let acc = alone["results"]["tiny_ja_mc"]["acc,none"].as_f64().unwrap();
        let se = alone["results"]["tiny_ja_mc"]["acc_stderr,none"].as_f64().unwrap();
        let fig = &m["benchmarks"][0];
        assert_eq!(fig["score"].as_f64().unwrap(), acc, "{fig}");
        let iv = &fig["interval"];
        assert!((iv["low"].as_f64().unwrap() - (acc - 1.96 * se)).abs() < 1e-12, "{fig}");
        assert!((iv["high"].as_f64().unwrap() - (acc + 1.96 * se)).abs() < 1e-12, "{fig}");
    }
    // Ranked by the metric (higher is better).
    let ms = v["models"].as_array().unwrap();
    assert!(ms[0]["benchmarks"][0]["score"].as_f64() >= ms[1]["benchmarks"][0]["score"].as_f64());
    // A task name that is not one, and no lm_eval, are refused before any model loads.
    let o = chatvec(&["eval", s(&cv), "--harness", "x;y", "--python", s(&py)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}

/// The worker's answer language tells apart languages that share a
/// script (German, French, English), through the language-ID model in
/// the environment, and Japanese by script.
#[test]
#[ignore = "needs py3langid: CHATVEC_SFT_PYTHON=$(scripts/sft-venv.sh) cargo test --test sft_e2e -- --ignored"]
fn answer_language_tells_latin_script_languages_apart() {
    let py = sft_python();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/src/eval/script.py");
    let code = format!(
        "import runpy; m = runpy.run_path({script:?}); print(' '.join(m['lang_of'](t) for t in [\
         'Das ist ein schöner Tag, und ich gehe heute mit meinem Hund in den Park.', \
         'Ceci est une belle journée, et je vais au parc avec mon chien aujourd hui.', \
         'This is a beautiful day, and I am going to the park with my dog today.', \
         '今日はいい天気なので、犬と一緒に公園へ行きます。']))"
    );
    let o = Command::new(&py).args(["-c", &code]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "de fr en ja");
}

/// Every card chatvec writes parses with huggingface_hub's `ModelCard`
/// without a warning, and its transformers usage snippet runs as written
/// from the output's directory.
#[test]
#[ignore = "needs torch/transformers/huggingface_hub: CHATVEC_SFT_PYTHON=$(scripts/sft-venv.sh) cargo test --test sft_e2e -- --ignored"]
fn cards_parse_on_the_hub_and_their_usage_runs_as_written() {
    let (py, d) = tiny_llamas();
    std::fs::write(d.path().join("base/README.md"), "---\nlicense: llama3\n---\n# base\n").unwrap();
    let cv = chat_vector_applied(d.path());
    let check = r#"
import sys, warnings
warnings.simplefilter("error")
from huggingface_hub import ModelCard
card = ModelCard.load(sys.argv[1] + "/README.md")
assert card.data.license == "llama3", card.data
assert card.data.pipeline_tag == "text-generation", card.data
text = open(sys.argv[1] + "/README.md").read()
snippet = text.split("```python\n")[1].split("```")[0]
print(snippet)
"#;
    let o = Command::new(&py).args(["-c", check, s(&cv)]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let snippet = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(snippet.contains("from_pretrained(\".\""), "{snippet}");
    let o = Command::new(&py).args(["-c", &snippet]).current_dir(&cv).output().unwrap();
    assert!(o.status.success(), "the card's usage snippet failed: {}", String::from_utf8_lossy(&o.stderr));
}

/// ChatML written as one loop over messages (as Qwen and many fine-tunes
/// ship it), whose assistant turns neither chatvec nor TRL can mark:
/// chatvec computes the assistant masks from each reply's prefixes, and
/// they equal the masks transformers gives (as TRL asks for them) with a
/// marked copy of the same template; real TRL then trains 2 steps on them.
#[test]
#[ignore = "needs torch/transformers/trl/accelerate: CHATVEC_SFT_PYTHON=$(scripts/sft-venv.sh) cargo test --test sft_e2e -- --ignored"]
fn an_unmarkable_chatml_template_trains_on_masks_from_reply_prefixes() {
    let (py, d) = tiny_llamas();
    let cv = chat_vector_applied(d.path());
    let chatml = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let marked = "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let tpl = d.path().join("chatml.jinja");
    std::fs::write(&tpl, chatml).unwrap();
    let data = d.path().join("data.jsonl");
    let convs = [
        r#"{"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello, how are you?"}]}"#,
        r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "今日はいい天気ですね。"}, {"role": "user", "content": "はい"}, {"role": "assistant", "content": "よかった。"}]}"#,
    ];
    std::fs::write(&data, convs.join("\n")).unwrap();
    let run = d.path().join("run");
    let o = command()
        .args(["sft", "--model", s(&cv), "--data", s(&data), "-o", s(&run), "--python", s(&py)])
        .args(["--chat-template", s(&tpl), "--max-steps", "2", "--grad-accum", "1", "--max-seq-len", "128"])
        .output()
        .unwrap();
    assert!(o.status.success(), "chatvec sft failed:\n{}", stderr(&o));
    assert!(stderr(&o).contains("chatvec computes the assistant masks"), "{}", stderr(&o));
    let compare = r#"
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
rows = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
got = sorted((tuple(r["input_ids"]), tuple(r["assistant_masks"])) for r in rows)
want = []
for line in open(sys.argv[3]):
    conv = json.loads(line)["messages"]
    out = tok.apply_chat_template(conv, chat_template=sys.argv[4], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    want.append((tuple(out["input_ids"]), tuple(out["assistant_masks"])))
want.sort()
assert got == want, (got, want)
assert all(1 in m for _, m in got)
print("same", len(got))
"#;
    let o = Command::new(&py)
        .args(["-c", compare, s(&cv), s(&run.join("data/train.jsonl")), s(&data), marked])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "same 2");
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("chatvec-sft-run.json")).unwrap()).unwrap();
    assert_eq!(rec["steps_logged"], 2);
    // The served model carries the template as given, not a training copy.
    assert_eq!(std::fs::read_to_string(run.join("model/chat_template.jinja")).unwrap(), chatml);
    // A template that renders a conversation differently once it goes on
    // cannot have its replies told apart: refused before launch, naming the
    // conversation, and the run directory is not left behind.
    let closing = d.path().join("closing.jinja");
    std::fs::write(&closing, format!("{chatml}{{% if not add_generation_prompt %}}<END>{{% endif %}}"))
        .unwrap();
    let run2 = d.path().join("run2");
    let o = command()
        .args(["sft", "--model", s(&cv), "--data", s(&data), "-o", s(&run2), "--python", s(&py)])
        .args(["--chat-template", s(&closing), "--max-steps", "1"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("こんにちは") && e.contains("as a prefix of its continuation"), "{e}");
    assert!(!run2.exists());
}

/// A Hub dataset served by the test Hub trains 2 steps with real TRL.
#[test]
#[ignore = "needs torch/transformers/trl/accelerate: CHATVEC_SFT_PYTHON=$(scripts/sft-venv.sh) cargo test --test sft_e2e -- --ignored"]
fn a_hub_dataset_trains_two_real_steps() {
    let (py, d) = tiny_llamas();
    let cv = chat_vector_applied(d.path());
    let repo = d.path().join("ds");
    std::fs::create_dir_all(&repo).unwrap();
    let lines: String = (0..4)
        .map(|i| format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"Hello {i}\"}}, {{\"role\": \"assistant\", \"content\": \"Hi {i}.\"}}]}}\n"))
        .collect();
    std::fs::write(repo.join("train.jsonl"), lines).unwrap();
    let hub = common::hub::Hub::start(vec![("org/tiny-chat", &repo, common::hub::Fault::Healthy)]);
    let run = d.path().join("run");
    let o = hub
        .command(&d.path().join("hf"))
        .args(["sft", "--model", s(&cv), "--data", "org/tiny-chat", "-o", s(&run), "--python", s(&py)])
        .args(["--max-steps", "2", "--grad-accum", "1", "--max-seq-len", "64"])
        .output()
        .unwrap();
    assert!(o.status.success(), "chatvec sft failed:\n{}", stderr(&o));
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("chatvec-sft-run.json")).unwrap()).unwrap();
    assert_eq!(rec["steps_logged"], 2);
    assert_eq!(rec["dataset"]["hub"][0]["repo"], "org/tiny-chat");
}
