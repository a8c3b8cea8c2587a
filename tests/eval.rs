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
        ("{\"prompt\": \"hi\", \"lang\": \"fr\"}\n", "line 1: lang 'fr': expected ja or en"),
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
