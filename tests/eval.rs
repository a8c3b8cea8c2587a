//! `chatvec eval` before the worker starts: every input it would trip on is
//! one error naming the file and line, the model or the missing package. The
//! scoring itself runs with real torch in `sft_e2e` (ignored here).

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// A model with a chat template, and an interpreter that reports torch as
/// missing (anything else it is asked, it fails).
fn setup(root: &Path) -> (PathBuf, PathBuf) {
    let t = trio(root, Ty::BF16, 1);
    std::fs::write(t.base.join("tokenizer_config.json"), r#"{"chat_template": "{{ messages[0].content }}"}"#)
        .unwrap();
    let py = root.join("fake-python");
    std::fs::write(
        &py,
        "#!/bin/sh\nif [ \"$1 $2\" = \"-I -u\" ] && grep -q importlib \"$3\"; then echo '{\"python\": \"3.11.0\", \"packages\": {\"torch\": null, \"transformers\": \"5.23.0\"}, \"cuda_devices\": 0}'; exit 0; fi\necho 'worker ran' >&2\nexit 3\n",
    )
    .unwrap();
    let mut perm = std::fs::metadata(&py).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&py, perm).unwrap();
    (t.base, py)
}

fn fails(args: &[&str], needles: &[&str]) {
    let o = chatvec(args);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
    for n in needles {
        assert!(stderr(&o).contains(n), "{n}: {}", stderr(&o));
    }
    assert!(!stderr(&o).contains("worker ran"), "the worker started: {}", stderr(&o));
}

#[test]
fn bad_inputs_are_refused_before_the_worker_starts() {
    let d = tempfile::tempdir().unwrap();
    let (model, py) = setup(d.path());
    let base = ["eval", s(&model), "--python", s(&py)];
    let prompts = d.path().join("prompts.jsonl");
    for (text, needle) in [
        ("{\"prompt\": \"hi\"}\nnot json\n", "line 2: bad JSON"),
        ("{\"prompt\": \"hi\", \"lang\": \"French\"}\n", "line 1: lang 'French': expected an ISO 639-1 code"),
        ("{\"prompt\": \"\"}\n", "line 1: 'prompt' must be a non-empty string"),
        ("{\"messages\": [{\"role\": \"assistant\", \"content\": \"a\"}]}\n", "no user turn before"),
        ("\n\n", "holds no prompts"),
    ] {
        std::fs::write(&prompts, text).unwrap();
        fails(&[&base[..], &["--prompts", s(&prompts)]].concat(), &["prompts.jsonl", needle]);
    }
    let data = d.path().join("held-out.jsonl");
    std::fs::write(&data, "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}\n").unwrap();
    fails(&[&base[..], &["--data", s(&data)]].concat(), &["held-out.jsonl", "line 1", "no assistant turn"]);
    fails(&[&base[..], &["--engine", "tgi"]].concat(), &["--engine tgi"]);
    fails(&[&base[..], &["--max-new-tokens", "0"]].concat(), &["--max-new-tokens"]);
    // A model that cannot be prompted as a chat model.
    let bare = d.path().join("bare");
    write_model(&bare, &llama(1, 16, false, Ty::BF16), 1, &config(16, false, LAYERS), None);
    fails(&["eval", s(&bare), "--python", s(&py)], &["bare", "has no chat template"]);
    // A tokenizer without a template (a base model) is refused the same
    // way, before any model is loaded.
    std::fs::write(bare.join("tokenizer_config.json"), r#"{"eos_token": "</s>"}"#).unwrap();
    fails(
        &["eval", s(&bare), "--python", s(&py)],
        &["bare", "has no chat template", "tokenizer_config.json"],
    );
    // The interpreter lacks torch: one error with the install command.
    fails(&base, &["lacks the Python package(s) torch", "pip install torch"]);
}

/// `--bench` and `--harness`: every input they would trip on is refused
/// before any model is resolved or loaded (the model named here does not
/// even exist): an unknown benchmark with the nearest name, a benchmark
/// file's bad line, no judge, a judge that does not answer, a missing
/// key, an unknown primary figure, a missing lm_eval with the pip command.
#[test]
fn benchmark_and_judge_inputs_are_refused_before_any_model_is_loaded() {
    let d = tempfile::tempdir().unwrap();
    let (_, py) = setup(d.path());
    let nope = d.path().join("no-such-model");
    let base = ["eval", s(&nope), "--python", s(&py)];
    fails(
        &[&base[..], &["--bench", "ja-mt-bnch"]].concat(),
        &["no such benchmark", "did you mean ja-mt-bench"],
    );
    let bench = d.path().join("mybench");
    std::fs::create_dir_all(&bench).unwrap();
    std::fs::write(bench.join("question.jsonl"), "{\"question_id\": 1, \"turns\": [\"q\"]}\n{oops\n")
        .unwrap();
    std::fs::write(
        bench.join("judge_prompts.jsonl"),
        "{\"name\": \"single-v1\", \"system_prompt\": \"s\", \"prompt_template\": \"{question} {answer}\"}\n",
    )
    .unwrap();
    fails(&[&base[..], &["--bench", s(&bench)]].concat(), &["question.jsonl", "line 2", "bad JSON"]);
    std::fs::write(bench.join("question.jsonl"), "{\"question_id\": 1, \"turns\": [\"q\", \"q2\"]}\n")
        .unwrap();
    fails(&[&base[..], &["--bench", s(&bench)]].concat(), &["no 'single-v1-multi-turn'", "question 1"]);
    std::fs::write(bench.join("question.jsonl"), "{\"question_id\": 1, \"turns\": [\"q\"]}\n").unwrap();
    fails(&[&base[..], &["--bench", s(&bench)]].concat(), &["--bench needs a judge", "--judge-url"]);
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/v1");
    let judged = [&base[..], &["--bench", s(&bench), "--judge-model", "j"]].concat();
    fails(&[&judged[..], &["--judge-url", &url]].concat(), &["does not answer", &url]);
    let mut c = command();
    c.args(
        [
            &judged[..],
            &["--judge-url", "https://judge.example.invalid/v1", "--judge-key-env", "CHATVEC_TEST_NO_KEY"],
        ]
        .concat(),
    );
    let o = c.env_remove("CHATVEC_TEST_NO_KEY").output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("$CHATVEC_TEST_NO_KEY is not set"), "{}", stderr(&o));
    fails(
        &[
            &base[..],
            &["--bench", s(&bench), "--primary", "rakuda", "--judge-model", "j", "--judge-url", &url],
        ]
        .concat(),
        &["--primary rakuda"],
    );
    fails(&[&base[..], &["--harness", "a;b"]].concat(), &["not an lm_eval task"]);
    // The interpreter lacks lm_eval (and torch): one error with the install command.
    let t = trio(&d.path().join("m"), Ty::BF16, 1);
    std::fs::write(t.base.join("tokenizer_config.json"), r#"{"chat_template": "{{ messages[0].content }}"}"#)
        .unwrap();
    fails(&["eval", s(&t.base), "--python", s(&py), "--harness", "hellaswag"], &["lm_eval", "pip install"]);
    // --list names every built-in benchmark and where its files come from.
    let o = chatvec(&["eval", "--list"]);
    ok(&o);
    for name in ["ja-mt-bench", "elyza-tasks-100", "rakuda", "hf://datasets/elyza/ELYZA-tasks-100/test.csv"] {
        assert!(stdout(&o).contains(name), "{name}: {}", stdout(&o));
    }
}
