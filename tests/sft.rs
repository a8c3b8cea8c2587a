//! `chatvec sft` against a stand-in Python: a shell script that answers the
//! package check and plays a trainer (log lines with a loss, an exit code,
//! signal handling), so the supervision is tested without torch.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

const LLAMA3_TEMPLATE: &str = "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}";

/// `chatvec sft` on `model` and `data` into `run` with interpreter `python`.
fn sft(model: &Path, data: &Path, run: &Path, python: &Path) -> Command {
    let mut c = command();
    c.args(["sft", "--model", s(model), "--data", s(data), "-o", s(run), "--python", s(python)]);
    c
}

/// A model directory with a Llama-3-style chat template, and a data file.
fn setup(root: &Path) -> (PathBuf, PathBuf) {
    let t = trio(root, Ty::BF16, 1);
    let tc = serde_json::json!({"chat_template": LLAMA3_TEMPLATE, "bos_token": "<|begin_of_text|>"});
    std::fs::write(t.base.join("tokenizer_config.json"), tc.to_string()).unwrap();
    let data = root.join("data.jsonl");
    std::fs::write(
        &data,
        "{\"conversation\": [{\"role\": \"user\", \"content\": \"こんにちは\"}, {\"role\": \"assistant\", \"content\": \"はい\"}]}\n{\"instruction\": \"Add\", \"input\": \"1+1\", \"output\": \"2\"}\n",
    )
    .unwrap();
    (t.base, data)
}

/// The stand-in interpreter. `missing` packages report as absent.
fn fake_python(root: &Path, missing: &str) -> PathBuf {
    let p = root.join("fake-python");
    let script = format!(
        r#"#!/bin/sh
if [ "$1 $2" = "-I -u" ] && grep -q importlib "$3"; then
  if [ -n "{missing}" ]; then
    echo '{{"python": "3.11.0", "packages": {{"torch": "2.5.0", "transformers": "5.23.0", "trl": null, "accelerate": null, "datasets": "5.2.0"}}, "cuda_devices": 0}}'
  else
    echo '{{"python": "3.11.0", "packages": {{"torch": "2.5.0", "transformers": "5.23.0", "trl": "1.16.0", "accelerate": "1.15.0", "datasets": "5.2.0", "deepspeed": "0.18.0"}}, "cuda_devices": 0, "settings": ["weight_decay", "optim", "neftune_noise_alpha", "attn_implementation"]}}'
  fi
  exit 0
fi
echo "$@" > "$FAKE_LOG"
echo "PYTHONUNBUFFERED=$PYTHONUNBUFFERED" >> "$FAKE_LOG"
if [ "$FAKE_MODE" = "wait" ]; then
  trap 'echo got-int >> "$FAKE_LOG"; exit 7' INT
  trap 'echo got-term >> "$FAKE_LOG"; exit 9' TERM
  echo ready
  while true; do sleep 0.05; done
fi
echo "{{'loss': 2.5, 'grad_norm': 1.0, 'learning_rate': 1e-05, 'epoch': 0.5}}"
echo "warming up" >&2
echo "{{'loss': 1.25, 'grad_norm': 1.0, 'learning_rate': 5e-06, 'epoch': 1.0}}"
echo "{{'train_runtime': 1.0, 'train_loss': 1.9}}"
out=$(sed -n 's/^output_dir: //p' "$6")
if [ -z "$FAKE_NO_MODEL" ] && [ "${{FAKE_EXIT:-0}}" = 0 ]; then mkdir -p "$out" && echo weights > "$out/model.safetensors"; fi
exit ${{FAKE_EXIT:-0}}
"#
    );
    std::fs::write(&p, script).unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(&mut std::fs::metadata(&p).unwrap().permissions(), 0o755);
    let mut perm = std::fs::metadata(&p).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&p, perm).unwrap();
    p
}

#[test]
fn sft_validates_writes_configs_launches_trl_and_records_the_run() {
    let d = tempfile::tempdir().unwrap();
    let (model, data) = setup(d.path());
    let py = fake_python(d.path(), "");
    let run = d.path().join("run");
    let log = d.path().join("trainer.log");

    // Dry run: the exact command and config files, nothing written.
    let o = sft(&model, &data, &run, &py).args(["--dry-run", "--max-steps", "3"]).output().unwrap();
    ok(&o);
    let text = stdout(&o);
    assert!(text.contains(&format!(" -I -u {}/trl_launch.py sft --config", run.display())), "{text}");
    assert!(
        text.contains("sft_config.yaml\n")
            && text.contains("learning_rate: 0.00001")
            && text.contains("warmup_steps: 0.03"),
        "{text}"
    );
    assert!(text.contains("assistant_only_loss: true") && text.contains("chat_template_path:"), "{text}");
    // Quoted, so accelerate's YAML 1.1 reader does not take it for False.
    assert!(text.contains("distributed_type: 'NO'") && text.contains("{%- generation %}"), "{text}");
    assert!(stderr(&o).contains("2 examples, 4 turns"), "{}", stderr(&o));
    assert!(!run.exists());

    let o = sft(&model, &data, &run, &py).env("FAKE_LOG", &log).args(["--max-steps", "2"]).output().unwrap();
    ok(&o);
    assert!(stderr(&o).contains("warming up") && stderr(&o).contains("'loss': 1.25"), "{}", stderr(&o));
    let args = std::fs::read_to_string(&log).unwrap();
    assert!(
        args.contains(&format!("sft --config {}/sft_config.yaml --accelerate_config", run.display())),
        "{args}"
    );
    assert!(args.contains("PYTHONUNBUFFERED=1"), "{args}");
    let train = std::fs::read_to_string(run.join("data/train.jsonl")).unwrap();
    assert_eq!(train.lines().count(), 2);
    assert!(train.contains("{\"messages\":[{\"role\":\"user\",\"content\":\"Add\\n\\n1+1\"}"), "{train}");
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("chatvec-sft-run.json")).unwrap()).unwrap();
    assert_eq!(rec["final_loss"], 1.25);
    assert_eq!(rec["steps_logged"], 2);
    assert_eq!(rec["exit_code"], 0);
    assert_eq!(rec["dataset"]["files"][0]["stats"]["sha256"], sha256_file(&data));
    assert_eq!(rec["world_size"], 1);
    assert_eq!(rec["interrupted"], false);
    assert!(rec["started"].as_str().unwrap().ends_with('Z') && rec["host"].is_string(), "{rec}");
    assert_eq!(rec["trained_model"]["files"][0]["file"], "model.safetensors");
    // RUN/model holds the model to serve: the weights the trainer saved in
    // RUN/checkpoints, the model's own template (no training markers) and
    // chatvec's card; the record names it.
    let served = run.join("model");
    assert_eq!(std::fs::read_to_string(served.join("model.safetensors")).unwrap(), "weights\n");
    assert!(!run.join("checkpoints/model.safetensors").exists());
    let tpl = std::fs::read_to_string(served.join("chat_template.jinja")).unwrap();
    assert!(!tpl.contains("generation %}"), "{tpl}");
    let card = std::fs::read_to_string(served.join("README.md")).unwrap();
    assert!(
        card.contains("chatvec sft")
            && card.contains("- learning rate: 0.00001")
            && card.contains("## Usage"),
        "{card}"
    );
    assert_eq!(rec["served_model"]["files"][0]["file"], "model.safetensors");
    // Its manifest lists every file, so verify checks it as a merge.
    ok(&chatvec(&["verify", s(&served)]));
    std::fs::write(served.join("stray.txt"), "x").unwrap();
    assert_eq!(chatvec(&["verify", s(&served)]).status.code(), Some(1));
    std::fs::remove_file(served.join("stray.txt")).unwrap();
    assert_eq!(rec["run_dir"], s(&run));
    assert_eq!(rec["python"]["packages"]["trl"], "1.16.0");
    assert!(rec["model"]["manifest_sha256"].is_null());
    let files: Vec<&str> =
        rec["files"].as_array().unwrap().iter().map(|f| f["file"].as_str().unwrap()).collect();
    assert_eq!(
        files,
        [
            "chat_template.jinja",
            "sft_config.yaml",
            "accelerate_config.yaml",
            "trl_launch.py",
            "data/train.jsonl"
        ]
    );

    // The trainer's exit code is chatvec's; the run dir needs --force.
    let o = sft(&model, &data, &run, &py).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    let o = sft(&model, &data, &run, &py)
        .env("FAKE_LOG", &log)
        .env("FAKE_EXIT", "3")
        .args(["--force"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("the trainer exited with code 3"), "{}", stderr(&o));

    // --force never deletes what the run reads.
    let o = chatvec(&[
        "sft",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "-o",
        s(d.path()),
        "--python",
        s(&py),
        "--force",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("--force replaces only an earlier `chatvec sft` run directory"),
        "{}",
        stderr(&o)
    );
    assert!(model.join("config.json").exists() && data.exists());
}

#[test]
fn signals_are_forwarded_to_the_trainer() {
    let d = tempfile::tempdir().unwrap();
    let (model, data) = setup(d.path());
    let py = fake_python(d.path(), "");
    for (sig, code, seen) in [(libc::SIGINT, 7, "got-int"), (libc::SIGTERM, 9, "got-term")] {
        let run = d.path().join(format!("run{sig}"));
        let log = d.path().join(format!("log{sig}"));
        let mut child = sft(&model, &data, &run, &py)
            .env("FAKE_LOG", &log)
            .env("FAKE_MODE", "wait")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        while err.read_line(&mut line).unwrap() > 0 && !line.contains("ready") {
            line.clear();
        }
        unsafe { libc::kill(child.id() as i32, sig) };
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(code), "signal {sig}");
        assert!(std::fs::read_to_string(&log).unwrap().contains(seen), "signal {sig}");
    }
}

#[test]
fn bad_data_and_missing_packages_stop_before_the_trainer() {
    let d = tempfile::tempdir().unwrap();
    let (model, data) = setup(d.path());
    let run = d.path().join("run");
    let bad = d.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n{\"messages\": [{\"role\": \"narrator\", \"content\": \"x\"}]}\n").unwrap();
    let py = fake_python(d.path(), "");
    let o = sft(&model, &bad, &run, &py).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("bad.jsonl: line 2: messages[0]: role 'narrator'"), "{}", stderr(&o));
    assert!(!run.exists());

    let py2 = d.path().join("py2");
    std::fs::create_dir(&py2).unwrap();
    let missing = fake_python(&py2, "yes");
    let o = sft(&model, &data, &run, &missing).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("lacks the Python package(s) trl, accelerate")
            && e.contains("-m pip install trl accelerate"),
        "{e}"
    );
    assert!(!e.contains("Traceback"));
    assert!(!run.exists());

    let o = sft(&model, &data, &run, Path::new("/no/such/python")).output().unwrap();
    assert!(
        stderr(&o).contains("cannot run Python interpreter /no/such/python")
            && stderr(&o).contains("CHATVEC_PYTHON"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn run_merges_verifies_then_trains_from_one_recipe() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let (_, data) = setup(&d.path().join("other"));
    std::fs::copy(&data, d.path().join("chat.jsonl")).unwrap();
    let py = fake_python(d.path(), "");
    let recipe = d.path().join("recipe.toml");
    let body = format!(
        "merge_method = \"chat_vector\"\nbase_model = \"{}\"\nchat = \"{}\"\npretrained = \"{}\"\n[sft]\ndata = \"chat.jsonl\"\nmax_steps = 2\nlr = 2e-5\nassistant_only_loss = false\nchat_template = \"tmpl.jinja\"\npython = \"{}\"\n",
        t.base.display(),
        t.chat.display(),
        t.pre.display(),
        py.display()
    );
    std::fs::write(&recipe, &body).unwrap();
    std::fs::write(d.path().join("tmpl.jinja"), LLAMA3_TEMPLATE).unwrap();
    let out = d.path().join("out");
    let log = d.path().join("log");
    let o = command().env("FAKE_LOG", &log).args(["run", s(&recipe), "-o", s(&out)]).output().unwrap();
    ok(&o);
    assert!(
        stderr(&o).contains("verified") && stderr(&o).contains("files match the manifest"),
        "{}",
        stderr(&o)
    );
    let local = d.path().join("local");
    ok(&apply_streaming(&t, &local, &["-q"]));
    assert_eq!(shard_hashes(&out.join("merged")), shard_hashes(&local));
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("sft/chatvec-sft-run.json")).unwrap()).unwrap();
    assert_eq!(rec["model"]["path"], s(&out.join("merged")));
    assert_eq!(rec["model"]["manifest_sha256"], sha256_file(&out.join("merged/chatvec-manifest.json")));
    let cfg = std::fs::read_to_string(out.join("sft/sft_config.yaml")).unwrap();
    assert!(cfg.contains("learning_rate: 0.00002") && cfg.contains("max_steps: 2"), "{cfg}");

    // A bad [sft] option fails before anything is merged; no [sft] at all too.
    std::fs::write(&recipe, body.replace("lr = 2e-5", "learning_rate = 2e-5")).unwrap();
    let out2 = d.path().join("out2");
    let o = chatvec(&["run", s(&recipe), "-o", s(&out2)]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("recipe.toml: sft.learning_rate: unknown field") && e.contains("`lr`"), "{e}");
    assert!(!out2.exists());
    // The merged model would have no chat template to render the data
    // with (neither input has one, and [sft] names none): refused on the
    // side files the merge would write, before anything is merged.
    let templateless = body.replace("chat_template = \"tmpl.jinja\"\n", "");
    std::fs::write(&recipe, templateless).unwrap();
    let o = chatvec(&["run", s(&recipe), "-o", s(&out2)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("nothing is merged") && e.contains("has no chat template"), "{e}");
    assert!(!out2.exists());
    std::fs::write(&recipe, body.split("[sft]").next().unwrap()).unwrap();
    let o = chatvec(&["run", s(&recipe), "-o", s(&out2)]);
    assert!(stderr(&o).contains("has no [sft] section"), "{}", stderr(&o));
    assert!(!out2.exists());
}

#[test]
fn scale_out_options_are_checked_and_cluster_configs_prepare_without_gpus() {
    let d = tempfile::tempdir().unwrap();
    let (model, data) = setup(d.path());
    let py = fake_python(d.path(), "");
    let run = d.path().join("run");
    let fails = |args: &[&str], needle: &str| {
        let o = sft(&model, &data, &run, &py).args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
        assert!(!run.exists());
    };
    fails(&["--nnodes", "2"], "--nnodes 2 needs --master-addr");
    fails(&["--nnodes", "2", "--node-rank", "5", "--master-addr", "10.0.0.1"], "--node-rank 5 of --nnodes 2");
    fails(&["--nproc", "0"], "--nproc 0");
    fails(&["--scheduler", "cosin"], "did you mean cosine?");
    fails(&["--train-arg", "weight_decy=0.1"], "did you mean weight_decay?");
    fails(&["--train-arg", "learning_rate=1e-4"], "chatvec sets it; use --lr");
    // The fake torch sees no GPU: FSDP and DeepSpeed cannot run here...
    fails(&["--fsdp"], "--fsdp needs GPUs, and torch sees none here");
    fails(&["--deepspeed", "zero3"], "--deepspeed needs GPUs");
    // ...plain data parallelism can: torchrun starts every process (accelerate's
    // MULTI_CPU type would start one), and the trainer keeps them on the CPU.
    let o = sft(&model, &data, &run, &py).args(["--dry-run", "--nproc", "2"]).output().unwrap();
    ok(&o);
    let text = stdout(&o);
    assert!(
        text.contains("distributed_type: MULTI_GPU")
            && text.contains("num_processes: 2")
            && text.contains("use_cpu: false")
            && text.contains("use_cpu: true")
            && text.contains("bf16: false"),
        "{text}"
    );
    // FSDP and DeepSpeed configs can still be prepared, as for GPUs.
    let o = sft(&model, &data, &run, &py)
        .args(["--dry-run", "--deepspeed", "zero3", "--nproc", "8", "--nnodes", "2", "--node-rank", "1"])
        .args(["--master-addr", "10.0.0.1", "--train-arg", "weight_decay=0.1"])
        .output()
        .unwrap();
    ok(&o);
    let text = stdout(&o);
    assert!(text.contains(&format!("--- {}/node-1/accelerate_config.yaml", run.display())), "{text}");
    assert!(
        text.contains("distributed_type: DEEPSPEED")
            && text.contains("deepspeed_multinode_launcher: standard"),
        "{text}"
    );
    assert!(!text.contains("mixed_precision"), "accelerate refuses it beside a DeepSpeed file: {text}");
    assert!(text.contains("bf16: true") && text.contains("dtype: float32"), "{text}");
    assert!(text.contains("weight_decay: 0.1") && text.contains("num_processes: 16"), "{text}");
    assert!(text.contains(&format!("output_dir: {}/checkpoints", run.display())), "{text}");
    assert!(!run.exists());
}

#[test]
fn data_files_mix_by_weight_hold_out_an_eval_split_and_runs_resume() {
    let d = tempfile::tempdir().unwrap();
    let (model, data) = setup(d.path());
    let py = fake_python(d.path(), "");
    let more = d.path().join("ichikara.jsonl");
    std::fs::write(&more, "{\"ID\": \"i-1\", \"text\": \"日本の首都は?\", \"output\": \"東京です。\"}\n")
        .unwrap();
    let run = d.path().join("run");
    let log = d.path().join("log");
    let data2 = format!("{}:3", more.display());
    let o = command()
        .args([
            "sft",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--data",
            &data2,
            "-o",
            s(&run),
            "--python",
            s(&py),
        ])
        .args(["--eval-split", "0.5", "--save-steps", "2", "--seed", "2"])
        .env("FAKE_LOG", &log)
        .output()
        .unwrap();
    ok(&o);
    let train = std::fs::read_to_string(run.join("data/train.jsonl")).unwrap();
    let test = std::fs::read_to_string(run.join("data/test.jsonl")).unwrap();
    // 2 + 1 examples, each held out or taken (the ichikara one 3 times).
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("chatvec-sft-run.json")).unwrap()).unwrap();
    let files = rec["dataset"]["files"].as_array().unwrap();
    let took = |i: usize, k: &str| files[i][k].as_u64().unwrap();
    assert_eq!(took(0, "train_examples") + took(0, "eval_examples"), 2);
    assert!(took(1, "train_examples") == 3 || took(1, "eval_examples") == 1, "{rec}");
    assert_eq!(train.lines().count() as u64, took(0, "train_examples") + took(1, "train_examples"));
    assert_eq!(test.lines().count() as u64, took(0, "eval_examples") + took(1, "eval_examples"));
    let cfg = std::fs::read_to_string(run.join("sft_config.yaml")).unwrap();
    assert!(cfg.contains("eval_strategy: steps") && cfg.contains("save_steps: 2"), "{cfg}");

    // Resume: nothing to resume from yet, then the latest checkpoint.
    let resume = || {
        command()
            .args([
                "sft",
                "--model",
                s(&model),
                "--data",
                s(&data),
                "-o",
                s(&run),
                "--python",
                s(&py),
                "--resume",
            ])
            .env("FAKE_LOG", &log)
            .output()
            .unwrap()
    };
    let o = resume();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("holds no checkpoint-N to resume from"), "{}", stderr(&o));
    for n in [2, 10] {
        let c = run.join(format!("model/checkpoint-{n}"));
        std::fs::create_dir_all(&c).unwrap();
        std::fs::write(c.join("trainer_state.json"), "{}").unwrap();
    }
    let o = resume();
    ok(&o);
    let cfg = std::fs::read_to_string(run.join("sft_config.yaml")).unwrap();
    assert!(cfg.contains(&format!("resume_from_checkpoint: {}/model/checkpoint-10", run.display())), "{cfg}");
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("chatvec-sft-run.json")).unwrap()).unwrap();
    assert!(rec["resumed_from"].as_str().unwrap().ends_with("model/checkpoint-10"), "{rec}");
    // Those were an older run's (in RUN/model): finishing again kept them.
    assert!(run.join("model/checkpoint-10/trainer_state.json").is_file());
    // Checkpoints where runs now keep them come first.
    let c = run.join("checkpoints/checkpoint-12");
    std::fs::create_dir_all(&c).unwrap();
    std::fs::write(c.join("trainer_state.json"), "{}").unwrap();
    ok(&resume());
    let cfg = std::fs::read_to_string(run.join("sft_config.yaml")).unwrap();
    assert!(
        cfg.contains(&format!("resume_from_checkpoint: {}/checkpoints/checkpoint-12", run.display())),
        "{cfg}"
    );

    // A trainer that exits 0 without saving a model is not a success.
    let o = sft(&model, &data, &d.path().join("run2"), &py)
        .env("FAKE_NO_MODEL", "1")
        .env("FAKE_LOG", &log)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("the trainer exited 0 but saved no model weights there"), "{}", stderr(&o));
}

#[test]
fn launcher_writes_a_batch_script_that_runs_every_node() {
    let d = tempfile::tempdir().unwrap();
    let (model, data) = setup(d.path());
    let py = fake_python(d.path(), "");
    let run = d.path().join("run");
    for (launcher, rank) in [("slurm", "SLURM_NODEID"), ("pbs", "OMPI_COMM_WORLD_RANK")] {
        let o = sft(&model, &data, &run, &py)
            .args(["--launcher", launcher, "--nnodes", "2", "--nproc", "8", "--fsdp"])
            .output()
            .unwrap();
        ok(&o);
        let script = d.path().join(format!("run.{launcher}"));
        let text = std::fs::read_to_string(&script).unwrap();
        assert!(text.contains(rank), "{text}");
        assert!(
            text.contains("--nnodes 2") && text.contains("--nproc 8") && text.contains("--fsdp"),
            "{text}"
        );
        assert!(!text.contains("--launcher"), "{text}");
        assert!(text.contains("--node-rank \"$RANK\" --master-addr \"$MASTER_ADDR\""), "{text}");
        // Valid bash, executable, and nothing run or created here.
        let syntax = Command::new("bash").arg("-n").arg(&script).output().unwrap();
        assert!(syntax.status.success(), "{}", String::from_utf8_lossy(&syntax.stderr));
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&script).unwrap().permissions());
        assert_eq!(mode & 0o111, 0o111);
        assert!(!run.exists());
        assert!(stderr(&o).contains(if launcher == "pbs" { "qsub" } else { "sbatch" }), "{}", stderr(&o));
    }
    let o = sft(&model, &data, &run, &py)
        .args(["--launcher", "slurm", "--node-rank", "1", "--nnodes", "2"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("leave them out"), "{}", stderr(&o));
}

/// Writes an executable shell script.
fn script(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    let mut perm = std::fs::metadata(path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(path, perm).unwrap();
}

/// Every file and directory name under `dir`.
fn names_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        out.push(e.file_name().to_string_lossy().into_owned());
        if e.file_type().unwrap().is_dir() {
            out.extend(names_under(&e.path()));
        }
    }
    out
}

#[test]
fn job_scripts_run_nothing_but_chatvec_whatever_the_names() {
    let d = tempfile::tempdir().unwrap();
    // The working directory, the data file and the run directory carry
    // command substitutions, backticks, quotes and a glob. (A double quote
    // or backslash in the job log's path is refused, below.)
    let wd = d.path().join("wd $(touch PWNED-wd) `touch PWNED-tick` 'sq' ;* #c");
    std::fs::create_dir(&wd).unwrap();
    let (model, plain_data) = setup(&wd);
    let data_name = "data $(touch PWNED-data) `id` \"dq\" \\.jsonl";
    std::fs::rename(&plain_data, wd.join(data_name)).unwrap();
    let py = fake_python(&wd, "");
    let run_name = "run $(touch PWNED-run) 'x' %j";
    // Stand-ins for the schedulers: scontrol lists a huge allocation (its
    // output outlives any reader that stops at the first line), srun and
    // mpirun start the node step as rank 0, chatvec records its arguments.
    let bin = d.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    script(&bin.join("scontrol"), "#!/bin/sh\nseq -f 'node%g' 1 300000\n");
    script(
        &bin.join("srun"),
        "#!/bin/sh\nwhile [ \"${1#--}\" != \"$1\" ]; do shift; done\nSLURM_NODEID=0 exec \"$@\"\n",
    );
    script(
        &bin.join("mpirun"),
        "#!/bin/sh\nwhile [ \"$1\" != bash ]; do shift; done\nOMPI_COMM_WORLD_RANK=0 exec \"$@\"\n",
    );
    let record = d.path().join("record");
    let recorder = d.path().join("recorder");
    script(
        &recorder,
        "#!/bin/sh\npwd > \"$RECORD\"\necho \"setup=$SETUP_RAN python=$CHATVEC_PYTHON\" >> \"$RECORD\"\nprintf '%s\\n' \"$@\" >> \"$RECORD\"\n",
    );
    let nodefile = d.path().join("nodefile");
    std::fs::write(&nodefile, "node1\nnode1\nnode2\n").unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());

    for launcher in ["slurm", "pbs"] {
        let o = command()
            .current_dir(&wd)
            .args(["sft", "--model", s(&model), "--data", data_name, "-o", run_name, "--python", s(&py)])
            .args(["--launcher", launcher, "--nnodes", "2", "--nproc", "1", "--force"])
            .args(["--partition", "gpu", "--account", "lab-1", "--time", "1:00:00"])
            .args(["--sched-arg=--comment=chatvec", "--job-setup", "export SETUP_RAN=yes"])
            .arg(if launcher == "slurm" {
                "--sbatch-arg=--qos=high"
            } else {
                "--pbs-arg=-l select=2:ngpus=8"
            })
            .output()
            .unwrap();
        ok(&o);
        // The other scheduler's directive is refused, naming both.
        let other = if launcher == "slurm" { "--pbs-arg=-V" } else { "--sbatch-arg=--qos=high" };
        let refused = command()
            .current_dir(&wd)
            .args(["sft", "--model", s(&model), "--data", data_name, "-o", run_name, "--python", s(&py)])
            .args(["--launcher", launcher, "--nnodes", "2", "--force", other, "--dry-run"])
            .output()
            .unwrap();
        assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
        assert!(stderr(&refused).contains(&format!("but --launcher is {launcher}")), "{}", stderr(&refused));
        assert!(
            stderr(&o)
                .contains("global batch: 1 per device x 16 accumulation x 2 process(es) = 32 sequences"),
            "{}",
            stderr(&o)
        );
        let job = wd.join(format!("{run_name}.{launcher}"));
        let text = std::fs::read_to_string(&job).unwrap();
        // Directive lines hold the log path quoted; Slurm's `%` doubled.
        let directive = if launcher == "slurm" { "#SBATCH --output=\"" } else { "#PBS -o \"" };
        let log_line = text.lines().find(|l| l.starts_with(directive)).unwrap_or_else(|| panic!("{text}"));
        if launcher == "slurm" {
            assert!(log_line.ends_with(" %%j.slurm-%j.out\""), "{log_line}");
            for d in [
                "#SBATCH --partition=gpu",
                "#SBATCH --account=lab-1",
                "#SBATCH --time=1:00:00",
                "#SBATCH --comment=chatvec",
                "#SBATCH --qos=high",
            ] {
                assert!(text.lines().any(|l| l == d), "{d}: {text}");
            }
        } else {
            for d in ["#PBS -q gpu", "#PBS -A lab-1", "#PBS -l walltime=1:00:00", "#PBS -l select=2:ngpus=8"]
            {
                assert!(text.lines().any(|l| l == d), "{d}: {text}");
            }
        }
        for _ in 0..3 {
            let _ = std::fs::remove_file(&record);
            let o = Command::new("bash")
                .arg(&job)
                .current_dir(d.path())
                .env("PATH", &path)
                .env("CHATVEC", &recorder)
                .env("RECORD", &record)
                .env("SLURM_JOB_NODELIST", "node[1-300000]")
                .env("PBS_NODEFILE", &nodefile)
                .output()
                .unwrap();
            assert!(o.status.success(), "{launcher}: {}\n{text}", String::from_utf8_lossy(&o.stderr));
            let rec = std::fs::read_to_string(&record).unwrap();
            let lines: Vec<&str> = rec.lines().collect();
            assert_eq!(Path::new(lines[0]), wd.as_path(), "{rec}");
            // The set-up line ran first, and the interpreter was exported.
            assert_eq!(lines[1], format!("setup=yes python={}", py.display()), "{rec}");
            let args = &lines[2..];
            assert!(!args.contains(&"--partition") && !args.contains(&"--job-setup"), "{rec}");
            let at = |flag: &str| args[args.iter().position(|a| *a == flag).unwrap() + 1];
            assert_eq!(at("--data"), data_name, "{rec}");
            assert_eq!(at("-o"), run_name, "{rec}");
            assert_eq!(at("--model"), s(&model), "{rec}");
            assert_eq!(&args[args.len() - 4..], ["--node-rank", "0", "--master-addr", "node1"], "{rec}");
        }
        let pwned: Vec<String> =
            names_under(d.path()).into_iter().filter(|n| n.starts_with("PWNED")).collect();
        assert!(pwned.is_empty(), "{launcher}: the script ran {pwned:?}\n{text}");
    }
}

#[test]
fn a_control_character_in_a_path_never_reaches_a_job_script() {
    let d = tempfile::tempdir().unwrap();
    let (model, data) = setup(d.path());
    let py = fake_python(d.path(), "");
    let run = d.path().join("run\necho PWNED");
    let o = sft(&model, &data, &run, &py).args(["--launcher", "slurm", "--nnodes", "2"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("the value of -o") && stderr(&o).contains("control character"),
        "{}",
        stderr(&o)
    );
    // The working directory's path is checked the same way.
    let wd = d.path().join("wd\nrm -rf x");
    std::fs::create_dir(&wd).unwrap();
    let o = sft(&model, &data, &d.path().join("run"), &py)
        .current_dir(&wd)
        .args(["--launcher", "pbs", "--nnodes", "2"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("the working directory"), "{}", stderr(&o));
    // A double quote in the job log's path: refused, not half-quoted.
    let o =
        sft(&model, &data, &d.path().join("run \"q\""), &py).args(["--launcher", "slurm"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("double quote or backslash"), "{}", stderr(&o));
    assert!(!names_under(d.path()).iter().any(|n| n.ends_with(".slurm") || n.ends_with(".pbs")));
}

#[test]
fn sft_venv_script_deletes_only_a_directory_it_made() {
    let d = tempfile::tempdir().unwrap();
    let venv_script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/sft-venv.sh");
    let precious = d.path().join("precious");
    std::fs::create_dir(&precious).unwrap();
    std::fs::write(precious.join("thesis.tex"), "years of work").unwrap();
    let link = d.path().join("link");
    std::os::unix::fs::symlink(&precious, &link).unwrap();
    let file = d.path().join("file");
    std::fs::write(&file, "a file").unwrap();
    for (target, why) in
        [(&precious, "this script did not create it"), (&link, "symbolic link"), (&file, "not a directory")]
    {
        let o = Command::new("bash").arg(&venv_script).env("CHATVEC_SFT_VENV", target).output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains(why), "{}", stderr(&o));
    }
    assert_eq!(std::fs::read_to_string(precious.join("thesis.tex")).unwrap(), "years of work");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "a file");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
}

#[test]
fn run_warns_when_the_eval_data_is_the_training_data() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let (_, data) = setup(&d.path().join("other"));
    std::fs::copy(&data, d.path().join("chat.jsonl")).unwrap();
    std::fs::copy(&data, d.path().join("held.jsonl")).unwrap();
    let py = fake_python(d.path(), "");
    std::fs::write(d.path().join("tmpl.jinja"), LLAMA3_TEMPLATE).unwrap();
    let recipe = d.path().join("recipe.toml");
    let run = |eval_data: &str, sft_extra: &str| {
        let body = format!(
            "merge_method = \"chat_vector\"\nbase_model = \"{}\"\nchat = \"{}\"\npretrained = \"{}\"\n[sft]\ndata = \"chat.jsonl\"\n{sft_extra}assistant_only_loss = false\nchat_template = \"tmpl.jinja\"\npython = \"{}\"\n[eval]\ndata = \"{eval_data}\"\n",
            t.base.display(),
            t.chat.display(),
            t.pre.display(),
            py.display()
        );
        std::fs::write(&recipe, &body).unwrap();
        command().args(["run", s(&recipe), "-o", s(&d.path().join("out")), "--dry-run"]).output().unwrap()
    };
    let o = run("./chat.jsonl", "");
    ok(&o);
    assert!(
        stderr(&o).contains("is also [sft] data") && stderr(&o).contains("not held out"),
        "{}",
        stderr(&o)
    );
    let o = run("held.jsonl", "");
    ok(&o);
    assert!(!stderr(&o).contains("is also [sft] data"), "{}", stderr(&o));
    // SFT's own held-out set is not trained on either.
    let o = run("held.jsonl", "eval_data = \"held.jsonl\"\n");
    ok(&o);
    assert!(!stderr(&o).contains("is also [sft] data"), "{}", stderr(&o));
}

/// A Parquet file of (instruction, input, output) rows, written with the
/// parquet crate's own writer, one row group.
fn write_alpaca_parquet(path: &Path, rows: &[(&str, &str, &str)]) {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = parquet::schema::parser::parse_message_type(
        "message alpaca { REQUIRED BYTE_ARRAY instruction (UTF8); REQUIRED BYTE_ARRAY input (UTF8); REQUIRED BYTE_ARRAY output (UTF8); }",
    )
    .unwrap();
    let props = std::sync::Arc::new(
        WriterProperties::builder().set_compression(parquet::basic::Compression::SNAPPY).build(),
    );
    let mut w =
        SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema.into(), props).unwrap();
    let mut g = w.next_row_group().unwrap();
    for col in 0..3 {
        let values: Vec<ByteArray> = rows.iter().map(|r| ByteArray::from([r.0, r.1, r.2][col])).collect();
        let mut c = g.next_column().unwrap().unwrap();
        c.typed::<ByteArrayType>().write_batch(&values, None, None).unwrap();
        c.close().unwrap();
    }
    g.close().unwrap();
    w.close().unwrap();
}

/// `--data org/name[:split]`: a Hub dataset repository (JSONL or Parquet)
/// served by the test Hub is fetched into the cache, validated row by
/// row before launch like a local file, and recorded with its commit and
/// file hashes; a missing split and a bad row are named before launch.
#[test]
fn hub_datasets_are_chat_data_validated_and_recorded_before_launch() {
    let d = tempfile::tempdir().unwrap();
    let (model, _) = setup(d.path());
    let py = fake_python(d.path(), "");
    let (pq, jl) = (d.path().join("pq"), d.path().join("jl"));
    std::fs::create_dir_all(&pq).unwrap();
    std::fs::create_dir_all(&jl).unwrap();
    write_alpaca_parquet(
        &pq.join("train-00000-of-00001.parquet"),
        &[("Add", "1+1", "2"), ("日本の首都は?", "", "東京です。"), ("Greet", "", "Hello!")],
    );
    std::fs::write(
        jl.join("test.jsonl"),
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello.\"}]}\n",
    )
    .unwrap();
    let hub = common::hub::Hub::start(vec![
        ("org/alpaca", &pq, common::hub::Fault::Healthy),
        ("org/chat", &jl, common::hub::Fault::Healthy),
    ]);
    let cache = d.path().join("hf");
    let run = d.path().join("run");
    let log = d.path().join("log");
    let o = hub
        .command(&cache)
        .env("FAKE_LOG", &log)
        .args(["sft", "--model", s(&model), "--data", "org/alpaca:2", "--eval-data", "org/chat:test"])
        .args(["-o", s(&run), "--python", s(&py), "--max-steps", "1"])
        .output()
        .unwrap();
    ok(&o);
    assert!(stderr(&o).contains("3 examples"), "{}", stderr(&o));
    let train = std::fs::read_to_string(run.join("data/train.jsonl")).unwrap();
    assert_eq!(train.lines().count(), 6, "weight 2: each row twice");
    assert!(train.contains("東京です。"), "{train}");
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("chatvec-sft-run.json")).unwrap()).unwrap();
    let hub_rec = &rec["dataset"]["hub"];
    assert_eq!(hub_rec[0]["repo"], "org/alpaca");
    assert_eq!(hub_rec[0]["commit"], common::hub::COMMIT);
    assert_eq!(hub_rec[0]["split"], "train");
    assert_eq!(
        hub_rec[0]["files"][0]["sha256"],
        sha256_file(&pq.join("train-00000-of-00001.parquet")),
        "{hub_rec}"
    );
    assert_eq!(hub_rec[1]["split"], "test");
    // A split the dataset does not have, and a bad row, before launch.
    let fails = |data: &str, needles: &[&str]| {
        let run = d.path().join("run-bad");
        let o = hub
            .command(&cache)
            .args(["sft", "--model", s(&model), "--data", data, "-o", s(&run), "--python", s(&py)])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{data}: {}", stderr(&o));
        for n in needles {
            assert!(stderr(&o).contains(n), "{n}: {}", stderr(&o));
        }
        assert!(!run.exists());
    };
    fails(
        "org/alpaca:validation",
        &["no JSONL or Parquet file for split 'validation'", "train-00000-of-00001.parquet"],
    );
    std::fs::write(jl.join("train.jsonl"), "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}\n")
        .unwrap();
    fails("org/chat", &["org--chat--train", "line 1", "no assistant turn"]);
}
