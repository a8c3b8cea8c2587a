//! No silent wrong model, no harm to the user's files: each test pins one
//! way a careless command or a hostile input could give a broken model with
//! exit 0, destroy or leak a file, or hang.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Runs `cmd`, killing it after `secs` seconds (a hang fails the test).
fn within(mut cmd: Command, secs: u64) -> std::process::Output {
    let mut child =
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            panic!("chatvec did not finish within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

#[test]
fn a_pattern_that_selects_no_tensor_is_an_error_naming_it() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let out = d.path().join("out");
    for (flag, pattern) in [("--include", "mpl"), ("--exclude", "^lm_haed"), ("--scale-for", "atention=0.5")]
    {
        let o = apply_streaming(&t, &out, &[flag, pattern]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        let shown = pattern.split('=').next().unwrap();
        assert!(stderr(&o).contains(&format!("{flag} '{shown}' matches no tensor")), "{}", stderr(&o));
        assert!(!out.exists());
    }
    // In a recipe, the key is named, not a flag.
    let recipe = d.path().join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            "merge_method = \"chat_vector\"\nbase_model = \"{}\"\nchat = \"{}\"\npretrained = \"{}\"\n[parameters]\nexclude = [\"^lm_haed\"]\n",
            t.base.display(),
            t.chat.display(),
            t.pre.display()
        ),
    )
    .unwrap();
    let o = chatvec(&["merge", s(&recipe), "-o", s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("parameters.exclude '^lm_haed' matches no tensor"), "{}", stderr(&o));
}

/// A Hugging Face cache snapshot of `model`: files in blobs/, linked from
/// snapshots/<commit>/. Returns (snapshot dir, blobs dir).
fn snapshot(cache: &Path, model: &Path) -> (PathBuf, PathBuf) {
    let repo = cache.join("models--org--m");
    let (blobs, snap) = (repo.join("blobs"), repo.join("snapshots").join("a".repeat(40)));
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for (i, f) in entries(model).into_iter().enumerate() {
        std::fs::copy(model.join(&f), blobs.join(format!("blob{i}"))).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/blob{i}"), snap.join(&f)).unwrap();
    }
    (snap, blobs)
}

#[test]
fn an_output_over_the_files_an_input_reads_is_refused_even_with_force() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let (snap, blobs) = snapshot(&d.path().join("hub"), &t.base);
    let before = entries(&blobs);
    let args = [
        "apply",
        "--base",
        s(&snap),
        "--chat",
        s(&t.chat),
        "--pretrained",
        s(&t.pre),
        "-o",
        s(&blobs),
        "--force",
    ];
    let o = chatvec(&args);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("an input is never an output"), "{}", stderr(&o));
    assert_eq!(entries(&blobs), before);
}

#[test]
fn force_replaces_only_an_earlier_output_or_an_empty_directory() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let theirs = d.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::write(theirs.join("thesis.tex"), b"years of work").unwrap();
    let o = apply_streaming(&t, &theirs, &["--force"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("it holds thesis.tex, and no chatvec-manifest.json"), "{}", stderr(&o));
    assert_eq!(std::fs::read(theirs.join("thesis.tex")).unwrap(), b"years of work");
    let file = d.path().join("a-file");
    std::fs::write(&file, b"keep").unwrap();
    let o = apply_streaming(&t, &file, &["--force"]);
    assert!(stderr(&o).contains("it is not a directory"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    let empty = d.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    ok(&apply_streaming(&t, &empty, &["-q", "--force"]));
    assert!(empty.join("model.safetensors").exists());
}

#[test]
fn side_files_linking_out_of_the_model_are_not_copied() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let secret = d.path().join("environ");
    std::fs::write(&secret, b"HF_TOKEN=hf_secret").unwrap();
    std::os::unix::fs::symlink(&secret, t.base.join("tokenizer.model")).unwrap();
    let out = d.path().join("out");
    let o = apply_streaming(&t, &out, &[]);
    ok(&o);
    assert!(stderr(&o).contains("tokenizer.model links outside the model directory"), "{}", stderr(&o));
    assert!(!out.join("tokenizer.model").exists());
    for f in entries(&out) {
        let bytes = std::fs::read(out.join(&f)).unwrap();
        assert!(!bytes.windows(9).any(|w| w == b"hf_secret"), "{f} holds the secret");
    }
}

#[test]
fn leftovers_of_killed_runs_are_removed_and_reported() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    // A process that has ended: its pid names the leftovers.
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    let tmp = d.path().join(format!(".out.chatvec-tmp-{pid}"));
    let old = d.path().join(format!(".other.chatvec-old-{pid}"));
    for l in [&tmp, &old] {
        std::fs::create_dir(l).unwrap();
        std::fs::write(l.join("model.safetensors"), vec![0u8; 4096]).unwrap();
    }
    let o = apply_streaming(&t, &d.path().join("out"), &[]);
    ok(&o);
    assert!(!tmp.exists() && !old.exists(), "{:?}", entries(d.path()));
    assert!(
        stderr(&o).contains(&format!("left by a chatvec run that was killed (process {pid} is gone)")),
        "{}",
        stderr(&o)
    );
}

#[test]
fn fifos_are_refused_not_waited_for() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    // As a side file of a model.
    mkfifo(&t.base.join("tokenizer_config.json"));
    let mut cmd = command();
    cmd.args(["apply", "--base", s(&t.base), "--chat", s(&t.chat), "--pretrained", s(&t.pre), "-o"]);
    cmd.arg(d.path().join("out"));
    let o = within(cmd, 30);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("tokenizer_config.json: is not a regular file"), "{}", stderr(&o));
    // As SFT data.
    let data = d.path().join("data.jsonl");
    mkfifo(&data);
    let mut cmd = command();
    cmd.args(["sft", "--model", s(&t.chat), "--data", s(&data), "-o"]).arg(d.path().join("run"));
    cmd.args(["--python", "/bin/false", "--dry-run"]);
    let o = within(cmd, 30);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("data.jsonl: is not a regular file"), "{}", stderr(&o));
    // As a branch of the Hugging Face cache.
    let (snap, _) = snapshot(&d.path().join("hub"), &t.pre);
    let refs = snap.parent().unwrap().parent().unwrap().join("refs");
    std::fs::create_dir_all(&refs).unwrap();
    mkfifo(&refs.join("main"));
    let mut cmd = command();
    cmd.env("HF_HUB_CACHE", d.path().join("hub")).args(["--offline", "inspect", "org/m"]);
    let o = within(cmd, 30);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("main: is not a regular file"), "{}", stderr(&o));
}

/// The largest resident set of this test process's finished children, in KiB.
fn children_max_rss_kib() -> i64 {
    // SAFETY: getrusage fills a plain struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to the struct above.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    u.ru_maxrss
}

#[test]
fn sft_data_is_read_with_bounded_memory_however_long_a_line() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let data = d.path().join("one-line.jsonl");
    // 200 MB without a newline: three times the 64 MB line limit.
    let mut f = std::fs::File::create(&data).unwrap();
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..200 {
        std::io::Write::write_all(&mut f, &chunk).unwrap();
    }
    drop(f);
    let o = chatvec(&[
        "sft",
        "--model",
        s(&t.chat),
        "--data",
        s(&data),
        "-o",
        s(&d.path().join("run")),
        "--dry-run",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("line 1: longer than 67108864 bytes"), "{}", stderr(&o));
    let rss = children_max_rss_kib();
    assert!(rss < 160 * 1024, "a child used {rss} KiB");
}

#[test]
fn parameters_a_method_does_not_use_are_ignored_with_a_warning() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let recipe = d.path().join("slerp.yml");
    std::fs::write(
        &recipe,
        format!(
            "merge_method: slerp\nbase_model: {}\nmodels:\n  - model: {}\n    parameters:\n      weight: 0.5\nparameters:\n  t: 0.5\n",
            t.base.display(),
            t.chat.display()
        ),
    )
    .unwrap();
    let o = chatvec(&["merge", s(&recipe), "-o", s(&d.path().join("out"))]);
    ok(&o);
    assert!(stderr(&o).contains("slerp does not use 'weight'; ignored, as mergekit does"), "{}", stderr(&o));
}

#[test]
fn merge_takes_the_shard_size_and_allow_mismatch_in_both_spellings() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let recipe = d.path().join("ta.yml");
    std::fs::write(
        &recipe,
        format!(
            "merge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: {}\n    parameters:\n      weight: 1.0\n",
            t.pre.display(),
            t.chat.display()
        ),
    )
    .unwrap();
    let shards = |dir: &Path| entries(dir).into_iter().filter(|e| e.ends_with(".safetensors")).count();
    let a = d.path().join("a");
    ok(&chatvec(&["-q", "merge", s(&recipe), "-o", s(&a), "--shard-size", "1000", "--allow-mismatch"]));
    let b = d.path().join("b");
    ok(&chatvec(&["-q", "merge", s(&recipe), "-o", s(&b), "--out-shard-size", "1K", "--allow-crimes"]));
    assert!(shards(&a) > 1);
    assert_eq!(shard_hashes(&a), shard_hashes(&b));
    // One grammar for both: 1B is a billion bytes (one shard here) in
    // either spelling, and a size that could mean two things is refused.
    for flag in ["--shard-size", "--out-shard-size"] {
        let c = d.path().join(format!("c{flag}"));
        ok(&chatvec(&["-q", "merge", s(&recipe), "-o", s(&c), flag, "1B", "--allow-mismatch"]));
        assert_eq!(shards(&c), 1, "{flag}");
        let o = chatvec(&["merge", s(&recipe), "-o", s(&d.path().join("x")), flag, "5Gb"]);
        assert_eq!(o.status.code(), Some(1), "{flag}: {}", stderr(&o));
        assert!(stderr(&o).contains("could mean bits"), "{flag}: {}", stderr(&o));
    }
}

#[test]
fn side_files_keep_every_byte_and_number_as_written() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    // The base's tokenizer config with a huge integer, edited to take the
    // chat model's template; an untouched file with odd formatting.
    std::fs::write(
        t.base.join("tokenizer_config.json"),
        "{\"model_max_length\": 1000000000000000019884624838656, \"eos_token\": \"</s>\"}",
    )
    .unwrap();
    let odd = "{ \"bos_token\" :\"<s>\",\n\n  \"pad\": 1.50 }";
    std::fs::write(t.base.join("special_tokens_map.json"), odd).unwrap();
    std::fs::write(t.chat.join("chat_template.jinja"), "{{ messages }}").unwrap();
    // An output whose parent directories do not exist yet.
    let out = d.path().join("runs/2026/out");
    ok(&apply_streaming(&t, &out, &["-q"]));
    assert_eq!(std::fs::read_to_string(out.join("special_tokens_map.json")).unwrap(), odd);
    let tc = std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap();
    assert!(tc.contains("\"model_max_length\": 1000000000000000019884624838656"), "{tc}");
    assert!(tc.contains("\"chat_template\": \"{{ messages }}\""), "{tc}");
}

#[test]
fn rope_settings_are_compared_in_either_config_layout() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    // The chat model in transformers 5's layout, the same settings: fine.
    let mut cfg = config(16, false, LAYERS);
    cfg.as_object_mut().unwrap().remove("rope_theta");
    cfg["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 500000});
    std::fs::write(t.chat.join("config.json"), cfg.to_string()).unwrap();
    ok(&apply_streaming(&t, &d.path().join("same"), &["-q"]));
    let o = chatvec(&["inspect", s(&t.chat)]);
    assert!(stdout(&o).contains("rope theta 500000, default"), "{}", stdout(&o));
    // Another theta in the new layout is a different model.
    cfg["rope_parameters"]["rope_theta"] = 10000.into();
    std::fs::write(t.chat.join("config.json"), cfg.to_string()).unwrap();
    let o = apply_streaming(&t, &d.path().join("other"), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("RoPE: theta 10000, default") && stderr(&o).contains("theta 500000, default"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_config_that_does_not_describe_its_weights_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let mut cfg = config(16, false, LAYERS);
    cfg["vocab_size"] = 32000.into();
    std::fs::write(t.base.join("config.json"), cfg.to_string()).unwrap();
    let out = d.path().join("out");
    let o = apply_streaming(&t, &out, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("'vocab_size' is 32000, but the embedding matrix has rows: 16"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
    let o = apply_streaming(&t, &out, &["--allow-mismatch"]);
    ok(&o);
    assert!(
        stderr(&o).contains("warning: --allow-mismatch") && stderr(&o).contains("vocab_size"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_whole_model_given_as_a_vector_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let out = d.path().join("out");
    let stored = |vector: &Path, extra: &[&str]| {
        let mut a = vec!["apply", "--base", s(&t.base), "--vector", s(vector), "-o", s(&out)];
        a.extend(extra);
        chatvec(&a)
    };
    let o = stored(&t.chat, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("has no chatvec-manifest.json") && stderr(&o).contains("--raw-delta"),
        "{}",
        stderr(&o)
    );
    let o = stored(&t.chat, &["--raw-delta"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("looks like a whole model, not a delta"), "{}", stderr(&o));
    assert!(!out.exists());
    // A real delta (a hundredth of the base's size) passes with the flag.
    let delta = d.path().join("delta");
    let tensors: Vec<T> = read_model(&t.base)
        .into_values()
        .map(|b| {
            let data = (0..b.numel()).flat_map(|i| b.ty.encode(b.get(i) * 0.01)).collect();
            T { data, ..b }
        })
        .collect();
    write_model(&delta, &tensors, 1, &config(16, false, LAYERS), None);
    let o = stored(&delta, &["--raw-delta"]);
    ok(&o);
    assert!(stderr(&o).contains("applying its tensors as a raw delta"), "{}", stderr(&o));
}

#[test]
fn merge_parameters_must_be_finite_f32_numbers_in_range() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let recipe = d.path().join("r.yml");
    let run = |method: &str, params: &str| {
        std::fs::write(
            &recipe,
            format!(
                "merge_method: {method}\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{{params}}}\n",
                t.pre.display(),
                t.chat.display()
            ),
        )
        .unwrap();
        chatvec(&["merge", s(&recipe), "-o", s(&d.path().join("out"))])
    };
    for (method, params, needle) in [
        ("task_arithmetic", "weight: 1e308", "weight 1e308 is not a finite f32 number"),
        ("ties", "weight: 1.0, density: 1.5", "density 1.5 must be in [0, 1]"),
        ("della", "weight: 1.0, density: 0.5, epsilon: -0.1", "epsilon -0.1 must be a number >= 0"),
    ] {
        let o = run(method, params);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{needle}: {}", stderr(&o));
    }
    // Finite weights whose products overflow: caught in the output.
    let o = run("task_arithmetic", "weight: 3.0e38");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("NaN or infinite value(s)") && stderr(&o).contains("its inputs have none"),
        "{}",
        stderr(&o)
    );
    assert!(!d.path().join("out").exists());
}

/// A scale whose products overflow f32 (the inputs all finite) is one
/// clear error naming a tensor, and nothing is written: for apply, and for
/// a sweep whose other candidate is fine (the sweep writes none of them).
/// The arithmetic checks each block as it encodes it.
#[test]
fn an_overflowing_scale_is_an_error_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let out = d.path().join("out");
    let o = apply_streaming(&t, &out, &["--scale", "3e38"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let said = stderr(&o);
    assert!(said.contains("NaN or infinite value(s)") && said.contains("its inputs have none"), "{said}");
    assert!(said.contains("tensor 'model."), "{said}");
    assert!(!out.exists());
    let sweep = d.path().join("sweep");
    let args = ["sweep", "--base", s(&t.base), "--chat", s(&t.chat), "--pretrained", s(&t.pre)];
    let o = chatvec(&[&args[..], &["--scales", "1,3e38", "-o", s(&sweep)]].concat());
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("NaN or infinite value(s)"), "{}", stderr(&o));
    assert!(!sweep.exists());
    assert_eq!(entries(d.path()).len(), 3, "only the inputs: {:?}", entries(d.path()));
}

#[test]
fn a_zero_vector_or_an_odd_scale_is_said() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let out = d.path().join("out");
    let o = chatvec(&[
        "apply",
        "--base",
        s(&t.base),
        "--chat",
        s(&t.pre),
        "--pretrained",
        s(&t.pre),
        "-o",
        s(&out),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("the chat and pretrained models are the same files"), "{}", stderr(&o));
    assert!(!out.exists());
    // A copy under another name: the hashes tell after the run.
    let copy = d.path().join("pre-copy");
    std::fs::create_dir(&copy).unwrap();
    for f in entries(&t.pre) {
        std::fs::copy(t.pre.join(&f), copy.join(&f)).unwrap();
    }
    let o = chatvec(&[
        "apply",
        "--base",
        s(&t.base),
        "--chat",
        s(&copy),
        "--pretrained",
        s(&t.pre),
        "-o",
        s(&out),
    ]);
    ok(&o);
    assert!(stderr(&o).contains("are the same bytes: the vector is zero"), "{}", stderr(&o));
    for (scale, needle) in [("0", "a scale of 0 adds nothing"), ("5", "a scale of 5 is far outside")] {
        let o = apply_streaming(&t, &d.path().join(format!("s{scale}")), &["--scale", scale]);
        ok(&o);
        assert!(stderr(&o).contains(needle), "{}", stderr(&o));
    }
}

#[test]
fn recipe_errors_name_the_recipe_key_and_yaml_refuses_duplicate_keys() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let recipe = d.path().join("r.yml");
    let run = |text: String| {
        std::fs::write(&recipe, text).unwrap();
        chatvec(&["merge", s(&recipe), "-o", s(&d.path().join("out"))])
    };
    // A key given twice: TOML and JSON refuse it, so YAML does too.
    let o = run(format!(
        "merge_method: task_arithmetic\nbase_model: {}\nbase_model: {}\nmodels:\n  - model: {}\n",
        t.pre.display(),
        t.base.display(),
        t.chat.display()
    ));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("r.yml") && stderr(&o).contains("duplicate entry with key \"base_model\""),
        "{}",
        stderr(&o)
    );
    // A model that is not there: the hint names where the recipe says it.
    let missing = d.path().join("no-such-model");
    let o = run(format!(
        "merge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: {}\n  - model: {}\n",
        t.pre.display(),
        t.chat.display(),
        missing.display()
    ));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("is models[1].model in"), "{}", stderr(&o));
    // A bad regex in a recipe is the recipe's key, not a flag.
    let cv = d.path().join("cv.toml");
    std::fs::write(
        &cv,
        format!(
            "merge_method = \"chat_vector\"\nbase_model = \"{}\"\nchat = \"{}\"\npretrained = \"{}\"\n[parameters]\ninclude = [\"re:(\"]\n",
            t.base.display(),
            t.chat.display(),
            t.pre.display()
        ),
    )
    .unwrap();
    let o = chatvec(&["merge", s(&cv), "-o", s(&d.path().join("out"))]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("parameters.include") && !stderr(&o).contains("--include"), "{}", stderr(&o));
    assert!(!d.path().join("out").exists());
}

#[test]
fn hostile_names_in_errors_are_escaped_and_cut() {
    let d = tempfile::tempdir().unwrap();
    let name = format!("{}\u{202e}\0\x1b[2Jevil", "a".repeat(100_000));
    let header = serde_json::json!({ name: { "dtype": "BF16", "shape": [2], "data_offsets": [0, 999] } });
    let header = serde_json::to_vec(&header).unwrap();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(&header);
    bytes.extend([0u8; 4]);
    let model = d.path().join("m");
    write_model(&model, &llama(1, 16, false, Ty::BF16), 1, &config(16, false, LAYERS), None);
    std::fs::write(model.join("model.safetensors"), bytes).unwrap();
    let o = chatvec(&["inspect", s(&model)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.len() < 2000, "{} bytes of error", err.len());
    assert!(!err.contains('\u{202e}') && !err.contains('\0') && !err.contains('\x1b'), "{err:?}");
    assert!(err.contains("\\u{202e}\\0\\u{1b}[2Jevil") && err.contains("characters cut"), "{err}");
    assert!(err.contains("model.safetensors"), "{err}");
}

/// Writes the model of `dir` again with a tensor `extra.weight` of `bytes`
/// bytes of zeros, left sparse on disk; returns its shard and full length.
fn add_sparse_tensor(dir: &Path, seed: u32, bytes: u64) -> (PathBuf, u64) {
    let shard = dir.join("model.safetensors");
    let mut tensors = llama(seed, 16, false, Ty::BF16);
    // A 4-byte stand-in, grown to `bytes` in the header and the file.
    tensors.push(T { name: "extra.weight".into(), ty: Ty::F32, shape: vec![1], data: vec![0; 4] });
    write_safetensors(&shard, &tensors);
    let file = std::fs::read(&shard).unwrap();
    let header_len = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let data = &file[8 + header_len..];
    let end = data.len() as u64;
    let header = String::from_utf8(file[8..8 + header_len].to_vec()).unwrap().replace(
        &format!("\"shape\":[1],\"data_offsets\":[{},{end}]", end - 4),
        &format!("\"shape\":[{}],\"data_offsets\":[{},{}]", bytes / 4, end - 4, end - 4 + bytes),
    );
    assert!(header.contains(&format!("[{}]", bytes / 4)), "{header}");
    let mut head = (header.len() as u64).to_le_bytes().to_vec();
    head.extend(header.as_bytes());
    head.extend(data);
    std::fs::write(&shard, &head).unwrap();
    let len = head.len() as u64 - 4 + bytes;
    std::fs::OpenOptions::new().write(true).open(&shard).unwrap().set_len(len).unwrap();
    (shard, len)
}

#[test]
fn an_input_truncated_during_the_run_is_an_error_not_a_crash() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    // A 1 GiB tensor nobody extracts: hashing the inputs for the manifest
    // keeps the run reading them for a while after the output is written.
    add_sparse_tensor(&t.chat, 2, 1 << 30);
    let (shard, _) = add_sparse_tensor(&t.pre, 1, 1 << 30);
    let out = d.path().join("out");
    let mut cmd = command();
    cmd.args([
        "extract",
        "--chat",
        s(&t.chat),
        "--pretrained",
        s(&t.pre),
        "--exclude",
        "extra",
        "-o",
        s(&out),
    ]);
    let mut child =
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // Once the run writes (its temporary directory is there), cut the shard.
    let start = Instant::now();
    while !entries(d.path()).iter().any(|e| e.contains("chatvec-tmp")) {
        if child.try_wait().unwrap().is_some() {
            panic!(
                "the run ended before the shard could be cut: {}",
                stderr(&child.wait_with_output().unwrap())
            );
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no temporary output appeared");
        std::thread::sleep(Duration::from_millis(2));
    }
    std::fs::OpenOptions::new().write(true).open(&shard).unwrap().set_len(4096).unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("pre/model.safetensors") && err.contains("shrank while chatvec was reading it"),
        "{err}"
    );
    assert!(!out.exists());
    assert!(!entries(d.path()).iter().any(|e| e.contains("chatvec-tmp")), "{:?}", entries(d.path()));
}

#[test]
fn inspect_shows_hostile_tensor_names_escaped() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("m");
    let mut tensors = llama(1, 16, false, Ty::BF16);
    tensors.push(T {
        name: "evil\u{1b}[2J\u{202e}.weight".into(),
        ty: Ty::F32,
        shape: vec![1],
        data: vec![0; 4],
    });
    write_model(&model, &tensors, 1, &config(16, false, LAYERS), None);
    let o = chatvec(&["inspect", s(&model)]);
    ok(&o);
    let out = stdout(&o);
    assert!(!out.contains('\u{1b}') && !out.contains('\u{202e}'), "{out:?}");
    assert!(out.contains("evil\\u{1b}[2J\\u{202e}.weight"), "{out}");
}

#[test]
fn python_helpers_never_import_modules_from_the_working_directory() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let tc = r#"{"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}"#;
    std::fs::write(t.base.join("tokenizer_config.json"), tc).unwrap();
    std::fs::write(d.path().join("data.jsonl"), "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n").unwrap();
    // A repository checkout whose modules share names with the ones the
    // helpers import.
    let repo = d.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    let marker = d.path().join("RAN");
    for m in ["json", "torch", "importlib", "dataclasses", "trl"] {
        std::fs::write(
            repo.join(format!("{m}.py")),
            format!("open({:?}, 'a').write('{m}\\n')\n", s(&marker)),
        )
        .unwrap();
    }
    let runs: [&[&str]; 2] = [
        &["eval", s(&t.base), "--python", "python3"],
        &[
            "sft",
            "--model",
            s(&t.base),
            "--data",
            "../data.jsonl",
            "-o",
            "../run",
            "--python",
            "python3",
            "--dry-run",
        ],
    ];
    for args in runs {
        let o = command().current_dir(&repo).args(args).output().unwrap();
        assert!(
            !marker.exists(),
            "{args:?} imported {} from the working directory",
            std::fs::read_to_string(&marker).unwrap()
        );
        // No helper script was left in the working directory either.
        assert_eq!(entries(&repo).len(), 5, "{}", stderr(&o));
    }
}

#[test]
fn an_empty_chatvec_python_is_named_as_empty() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    std::fs::write(t.base.join("tokenizer_config.json"), r#"{"chat_template": "{{ messages[0].content }}"}"#)
        .unwrap();
    let o = command().env("CHATVEC_PYTHON", "").args(["eval", s(&t.base)]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("CHATVEC_PYTHON is set but empty"), "{}", stderr(&o));
}

/// The hash cache's entry for `file` as it is now (the key chatvec's
/// `model::hash_cache` uses: device, inode, size, mtime and ctime in ns).
fn plant_cached_hash(cache: &Path, file: &Path, sha256: &str) {
    use sha2::Digest;
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(file).unwrap();
    let ns = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
    let key = format!(
        "{}\0{}\0{}\0{}\0{}",
        m.dev(),
        m.ino(),
        m.size(),
        ns(m.mtime(), m.mtime_nsec()),
        ns(m.ctime(), m.ctime_nsec())
    );
    let name: String = sha2::Sha256::digest(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    std::fs::create_dir_all(cache.join("sha256")).unwrap();
    std::fs::write(cache.join("sha256").join(name), format!("{sha256}\n")).unwrap();
}

#[test]
fn verify_rehashes_every_input_whatever_the_hash_cache_says() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let cache = d.path().join("hash-cache");
    let recipe = d.path().join("r.toml");
    std::fs::write(&recipe, chat_vector_recipe(&t, "")).unwrap();
    let out = d.path().join("out");
    let run = |args: &[&str]| command().env("CHATVEC_CACHE_DIR", &cache).args(args).output().unwrap();
    ok(&run(&["merge", s(&recipe), "-o", s(&out)]));
    ok(&run(&["verify", s(&out), "--recipe", s(&recipe)]));
    // The base changes after the merge, and the cache is made to vouch for
    // the old bytes (a planted entry; a stale one is the same).
    let shard = t.base.join("model.safetensors");
    let old = sha256_file(&shard);
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    plant_cached_hash(&cache, &shard, &old);
    // The planted entry does fool a cached run (so the test plants right)...
    let fooled = d.path().join("fooled");
    ok(&run(&["merge", s(&recipe), "-o", s(&fooled)]));
    let man: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fooled.join("chatvec-manifest.json")).unwrap()).unwrap();
    assert!(man.to_string().contains(&old), "the planted entry was not used");
    // ...but never verify.
    let o = run(&["verify", s(&out), "--recipe", s(&recipe)]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("DIFFERS  input") && stdout(&o).contains("model.safetensors"),
        "{}",
        stdout(&o)
    );
}

/// `verify --recipe` compares the parameters the recipe checks into with
/// the ones the manifest records, key by key: an output merged with
/// another scale does not pass for this recipe.
#[test]
fn verify_recipe_compares_each_recorded_parameter() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let recipe = d.path().join("r.toml");
    std::fs::write(&recipe, chat_vector_recipe(&t, "")).unwrap();
    let out = d.path().join("out");
    let run = |args: &[&str]| command().args(args).output().unwrap();
    ok(&run(&["merge", s(&recipe), "-o", s(&out)]));
    ok(&run(&["verify", s(&out), "--recipe", s(&recipe)]));
    let mpath = out.join("chatvec-manifest.json");
    let original = std::fs::read(&mpath).unwrap();
    let mut man: serde_json::Value = serde_json::from_slice(&original).unwrap();
    man["parameters"]["scale"] = serde_json::json!(0.5);
    std::fs::write(&mpath, serde_json::to_vec_pretty(&man).unwrap()).unwrap();
    let o = run(&["verify", s(&out), "--recipe", s(&recipe)]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stdout(&o).contains("DIFFERS  recipe parameter scale: 1.0, recorded 0.5"), "{}", stdout(&o));
    std::fs::write(&mpath, original).unwrap();
    ok(&run(&["verify", s(&out), "--recipe", s(&recipe)]));
    // With a [sweep], an output records the recipe's own scale (`merge`)
    // or one of the sweep's (`run`); anything else differs.
    let swept = d.path().join("swept.toml");
    std::fs::write(&swept, chat_vector_recipe(&t, "[sweep]\nscales = [0.5, [0.3, 1.0]]\n[eval]\n")).unwrap();
    let out2 = d.path().join("out2");
    ok(&run(&["merge", s(&swept), "-o", s(&out2)]));
    ok(&run(&["verify", s(&out2), "--recipe", s(&swept)]));
    let mpath = out2.join("chatvec-manifest.json");
    let mut man: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    for (recorded, passes) in [(serde_json::json!([0.3, 1.0]), true), (serde_json::json!(0.25), false)] {
        man["parameters"]["scale"] = recorded.clone();
        std::fs::write(&mpath, serde_json::to_vec_pretty(&man).unwrap()).unwrap();
        let o = run(&["verify", s(&out2), "--recipe", s(&swept)]);
        assert_eq!(o.status.success(), passes, "{recorded}: {}", stdout(&o));
        if !passes {
            assert!(
                stdout(&o).contains("recipe parameter scale: 1.0 or one of [0.5,[0.3,1.0]]"),
                "{}",
                stdout(&o)
            );
        }
    }
}

#[test]
fn a_nan_or_infinite_number_in_a_recipe_is_refused_not_defaulted() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let out = d.path().join("out");
    let cv = format!(
        "merge_method = \"chat_vector\"\nbase_model = \"{}\"\nchat = \"{}\"\npretrained = \"{}\"\n[parameters]\n",
        t.base.display(),
        t.chat.display(),
        t.pre.display()
    );
    for (file, text, needle) in [
        ("a.toml", format!("{cv}scale = nan\n"), "parameters.scale: NaN is not a finite number"),
        ("b.toml", format!("{cv}scale = inf\n"), "parameters.scale: inf is not a finite number"),
        ("c.toml", format!("{cv}scale = -inf\n"), "parameters.scale: -inf is not a finite number"),
        ("d.toml", format!("{cv}scale = [0.5, nan]\n"), "parameters.scale[1]: NaN"),
        (
            "e.yml",
            format!(
                "merge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: {}\n    parameters:\n      weight: .nan\n",
                t.pre.display(),
                t.chat.display()
            ),
            "models[0].parameters.weight: NaN is not a finite number",
        ),
    ] {
        let recipe = d.path().join(file);
        std::fs::write(&recipe, text).unwrap();
        let o = chatvec(&["merge", s(&recipe), "-o", s(&out)]);
        assert_eq!(o.status.code(), Some(1), "{file}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{file}: {}", stderr(&o));
        assert!(!out.exists());
    }
}

#[test]
fn a_base_without_config_json_is_refused_unless_weights_only_is_asked() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    std::fs::remove_file(t.base.join("config.json")).unwrap();
    let out = d.path().join("out");
    let o = apply_streaming(&t, &out, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("the output would have no config.json") && stderr(&o).contains("--weights-only"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
    let o = apply_streaming(&t, &out, &["--weights-only"]);
    ok(&o);
    assert!(stderr(&o).contains("--weights-only: the output has no config.json"), "{}", stderr(&o));
    assert!(!out.join("config.json").exists() && out.join("model.safetensors").exists());
}

#[test]
fn allow_mismatch_is_suggested_only_where_it_can_help() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let out = d.path().join("out");
    // A base of twice the hidden size, its config saying so: the tensors
    // cannot line up, so --allow-mismatch is not the way out.
    let wide = d.path().join("wide");
    let tensors: Vec<T> = llama(3, 16, false, Ty::BF16)
        .into_iter()
        .map(|mut x| {
            x.shape = x.shape.iter().map(|&n| if n == HIDDEN { 2 * HIDDEN } else { n }).collect();
            let n: u64 = x.shape.iter().product();
            x.data = (0..n as usize).flat_map(|i| Ty::BF16.encode(val(3, &x.name, i))).collect();
            x
        })
        .collect();
    let mut cfg = config(16, false, LAYERS);
    cfg["hidden_size"] = serde_json::json!(2 * HIDDEN);
    write_model(&wide, &tensors, 1, &cfg, Some(&tokens(16)));
    let o = chatvec(&[
        "apply",
        "--base",
        s(&wide),
        "--chat",
        s(&t.chat),
        "--pretrained",
        s(&t.pre),
        "-o",
        s(&out),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("'hidden_size'") && e.contains("which --allow-mismatch cannot change"), "{e}");
    assert!(!e.contains("pass --allow-mismatch"), "{e}");
    // A config that differs where the weights agree: there it can help.
    let mut cfg = config(16, false, LAYERS);
    cfg["intermediate_size"] = serde_json::json!(2 * INTER);
    std::fs::write(t.base.join("config.json"), cfg.to_string()).unwrap();
    let o = apply_streaming(&t, &out, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("pass --allow-mismatch if you are sure"), "{}", stderr(&o));
    ok(&apply_streaming(&t, &out, &["--allow-mismatch"]));
}
