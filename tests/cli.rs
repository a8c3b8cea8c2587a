//! The real binary on bad input: one clear error naming the file, tensor or
//! key, the documented exit code, and nothing left behind.

mod common;

use std::path::Path;

use common::*;

/// Runs an apply that must fail with exit code `code` and a message
/// containing every string of `needles`; checks nothing was written next to
/// the output.
fn apply_fails(t: &Trio, extra: &[&str], code: i32, needles: &[&str]) {
    let root = t.base.parent().unwrap();
    let before = entries(root);
    let out = root.join("out");
    let mut args =
        vec!["apply", "--base", s(&t.base), "--chat", s(&t.chat), "--pretrained", s(&t.pre), "-o", s(&out)];
    args.extend(extra);
    let o = chatvec(&args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(code), "{err}");
    assert!(err.starts_with("error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in:\n{err}");
    }
    assert_eq!(entries(root), before, "a failed run must leave nothing behind");
}

fn shard_path(dir: &Path) -> std::path::PathBuf {
    dir.join("model.safetensors")
}

#[test]
fn truncated_shard_is_named() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let p = shard_path(&t.pre);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
    apply_fails(&t, &[], 1, &["pre/model.safetensors", "truncated"]);
}

#[test]
fn corrupt_header_is_named() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let p = shard_path(&t.base);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[8] = b'[';
    std::fs::write(&p, &bytes).unwrap();
    apply_fails(&t, &[], 1, &["base/model.safetensors", "header"]);
    std::fs::write(&p, b"1234").unwrap();
    apply_fails(&t, &[], 1, &["base/model.safetensors", "too short"]);
}

#[test]
fn mismatched_shape_names_the_tensor() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let mut ts = llama(2, 16, false, Ty::BF16);
    let q = ts.iter_mut().find(|x| x.name == "model.layers.1.self_attn.q_proj.weight").unwrap();
    q.shape = vec![4, 16];
    write_model(&t.chat, &ts, 1, &config(16, false, LAYERS), None);
    apply_fails(&t, &[], 1, &["model.layers.1.self_attn.q_proj.weight", "[4, 16]", "[8, 8]"]);
    // --allow-mismatch never excuses shapes
    apply_fails(&t, &["--allow-mismatch"], 1, &["q_proj"]);
}

#[test]
fn unsupported_dtype_names_tensor_and_dtype() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let mut ts = llama(3, 16, false, Ty::BF16);
    ts.push(T { name: "model.rotary.positions".into(), ty: Ty::I64, shape: vec![4], data: vec![0; 32] });
    write_model(&t.base, &ts, 1, &config(16, false, LAYERS), None);
    apply_fails(&t, &[], 1, &["model.rotary.positions", "I64", "hint: leave it out with --exclude"]);
    // Excluded, it is copied as is.
    let out = d.path().join("ok");
    ok(&apply_streaming(&t, &out, &["-q", "--exclude", "rotary"]));
    assert_eq!(read_model(&out)["model.rotary.positions"].data, vec![0; 32]);
}

#[test]
fn architecture_differences_fail_unless_allowed() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let mut cfg = config(16, false, LAYERS);
    cfg["rope_theta"] = 10000.0.into();
    std::fs::write(t.base.join("config.json"), cfg.to_string()).unwrap();
    apply_fails(&t, &[], 1, &["RoPE: theta 10000", "theta 500000", "hint: pass --allow-mismatch"]);
    let out = d.path().join("out");
    let o = apply_streaming(&t, &out, &["--allow-mismatch"]);
    ok(&o);
    assert!(stderr(&o).contains("warning: --allow-mismatch") && stderr(&o).contains("RoPE"));
}

#[test]
fn missing_and_extra_tensors_are_listed() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let mut ts = llama(2, 16, false, Ty::BF16);
    ts.retain(|x| !x.name.contains("layers.1.mlp"));
    ts.push(T { name: "model.extra.weight".into(), ty: Ty::BF16, shape: vec![2], data: vec![0; 4] });
    write_model(&t.chat, &ts, 1, &config(16, false, LAYERS), None);
    apply_fails(&t, &[], 1, &["model.layers.1.mlp.down_proj.weight", "model.extra.weight"]);
}

#[test]
fn index_problems_are_named() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 3);
    let idx = t.base.join("model.safetensors.index.json");
    let good = std::fs::read_to_string(&idx).unwrap();

    std::fs::remove_file(t.base.join("model-00002-of-00003.safetensors")).unwrap();
    apply_fails(&t, &[], 1, &["model.safetensors.index.json", "model-00002-of-00003.safetensors"]);
    let t = trio(d.path(), Ty::BF16, 3);

    let moved =
        good.replacen("\"model-00001-of-00003.safetensors\"", "\"model-00002-of-00003.safetensors\"", 1);
    std::fs::write(&idx, moved).unwrap();
    apply_fails(
        &t,
        &[],
        1,
        &["index.json", "model.embed_tokens.weight", "stored in model-00001-of-00003.safetensors"],
    );

    std::fs::write(&idx, good.replacen("model-00001-of-00003.safetensors", "../evil.safetensors", 1))
        .unwrap();
    apply_fails(&t, &[], 1, &["index.json", "not a plain .safetensors file name"]);

    let dup = good.replacen(
        "\"weight_map\": {",
        "\"weight_map\": {\"lm_head.weight\": \"model-00003-of-00003.safetensors\",",
        1,
    );
    let dup = if dup == good {
        good.replacen(
            "\"weight_map\":{",
            "\"weight_map\":{\"lm_head.weight\":\"model-00003-of-00003.safetensors\",",
            1,
        )
    } else {
        dup
    };
    std::fs::write(&idx, dup).unwrap();
    apply_fails(&t, &[], 1, &["index.json", "duplicate key 'lm_head.weight'"]);

    std::fs::write(&idx, "{\"metadata\": {}}").unwrap();
    apply_fails(&t, &[], 1, &["index.json", "weight_map"]);
}

#[test]
fn a_tensor_in_two_shards_is_rejected() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let ts = llama(3, 16, false, Ty::BF16);
    std::fs::remove_file(t.base.join("model.safetensors")).unwrap();
    write_safetensors(&t.base.join("a.safetensors"), &ts[..3]);
    write_safetensors(&t.base.join("b.safetensors"), &ts[2..]);
    let mut wm = serde_json::Map::new();
    for x in &ts[..3] {
        wm.insert(x.name.clone(), "a.safetensors".into());
    }
    for x in &ts[3..] {
        wm.insert(x.name.clone(), "b.safetensors".into());
    }
    std::fs::write(
        t.base.join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": wm}).to_string(),
    )
    .unwrap();
    apply_fails(&t, &[], 1, &["b.safetensors", ts[2].name.as_str(), "also in a.safetensors"]);
}

#[test]
fn existing_output_needs_force_and_force_replaces() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let out = d.path().join("out");
    let args =
        ["-q", "apply", "--base", s(&t.base), "--chat", s(&t.chat), "--pretrained", s(&t.pre), "-o", s(&out)];
    ok(&chatvec(&args));
    std::fs::write(out.join("old-file"), b"x").unwrap();
    let o = chatvec(&args);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already exists") && stderr(&o).contains("hint: pass --force"));
    assert!(out.join("old-file").exists());
    let mut a = args.to_vec();
    a.push("--force");
    ok(&chatvec(&a));
    assert!(!out.join("old-file").exists());
    assert!(out.join("model.safetensors").exists());
    assert!(entries(d.path()).iter().all(|e| !e.contains("chatvec-")), "{:?}", entries(d.path()));
}

#[test]
fn an_input_is_never_an_output() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    for target in [&t.base, &t.pre, &d.path().to_path_buf()] {
        let o = apply_streaming(&t, target, &["--force"]);
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains("an input is never an output"), "{}", stderr(&o));
    }
    assert!(t.base.join("model.safetensors").exists());
}

#[test]
fn usage_errors_exit_1() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let out = d.path().join("out");
    let base =
        ["apply", "--base", s(&t.base), "--chat", s(&t.chat), "--pretrained", s(&t.pre), "-o", s(&out)];
    for (extra, needle) in [
        (vec!["--include", "("], "--include '('"),
        (vec!["--scale-for", "mlp"], "REGEX=VALUE"),
        (vec!["--shard-size", "5XB"], "unknown unit"),
        (vec!["--shard-size", "5Gb"], "'5Gb' could mean bits"),
        (
            vec!["--scale", "1e40"],
            "invalid value '1e40' for '--scale <SCALE>': expected a finite number an f32 can hold",
        ),
        (vec!["--out-dtype", "int8"], "not a dtype"),
        (vec!["--embeddings", "sideways"], "invalid value"),
    ] {
        let mut a = base.to_vec();
        a.extend(extra);
        let o = chatvec(&a);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{needle}: {}", stderr(&o));
    }
    let o = chatvec(&["apply", "--base", s(&t.base), "-o", s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    // A MODEL written as a path is a directory that does not exist, not a
    // Hub lookup; a typo of an alias gets the alias meant.
    let o = chatvec(&["apply", "--base", "no/such/model", "--vector", s(&t.chat), "-o", s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("error: model 'no/such/model': no such directory"), "{}", stderr(&o));
    let o = chatvec(&["--offline", "apply", "--base", "swalow-8b", "--vector", s(&t.chat), "-o", s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("hint: did you mean swallow-8b?"), "{}", stderr(&o));
    let o =
        chatvec(&["--offline", "apply", "--base", s(&t.base), "--vector", "llama3-instrct", "-o", s(&out)]);
    assert!(stderr(&o).contains("did you mean llama3-instruct?"), "{}", stderr(&o));
    let o =
        chatvec(&["--offline", "apply", "--base", "llama3-instruct", "--vector", s(&t.chat), "-o", s(&out)]);
    assert!(stderr(&o).contains("is a vector alias"), "{}", stderr(&o));
    assert!(!out.exists());
    assert_eq!(chatvec(&["--help"]).status.code(), Some(0));
}

#[test]
fn a_directory_without_weights_gets_a_hint() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("config.json"), b"{}").unwrap();
    let o = chatvec(&["inspect", s(d.path())]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("holds no weights: no model.safetensors")
            && stderr(&o).contains("hint: point at a Hugging Face model directory"),
        "{}",
        stderr(&o)
    );
}

/// Copies a model directory with its weights rewritten as PyTorch `.bin`
/// (`shards` files, with an index when more than one).
fn as_torch_bin(from: &Path, to: &Path, shards: usize) {
    std::fs::create_dir_all(to).unwrap();
    for f in entries(from) {
        if !f.contains("safetensors") {
            std::fs::copy(from.join(&f), to.join(&f)).unwrap();
        }
    }
    let model = read_model(from);
    let order = names_in_order(from);
    let tensors: Vec<T> = order.iter().map(|n| model[n].clone()).collect();
    if shards == 1 {
        write_torch_bin(&to.join("pytorch_model.bin"), &tensors);
        return;
    }
    let per = tensors.len().div_ceil(shards);
    let mut map = serde_json::Map::new();
    for (i, part) in tensors.chunks(per).enumerate() {
        let name = format!("pytorch_model-{:05}-of-{:05}.bin", i + 1, shards);
        write_torch_bin(&to.join(&name), part);
        for t in part {
            map.insert(t.name.clone(), name.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(to.join("pytorch_model.bin.index.json"), index.to_string()).unwrap();
}

#[test]
fn pytorch_bin_checkpoints_are_read_without_pickle_code_or_copies() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 2);
    let local = d.path().join("local");
    ok(&apply_streaming(&t, &local, &["-q"]));
    for shards in [1, 3] {
        let bin = d.path().join(format!("base-bin-{shards}"));
        as_torch_bin(&t.base, &bin, shards);
        let out = d.path().join(format!("out-{shards}"));
        ok(&chatvec(&[
            "-q",
            "apply",
            "--base",
            s(&bin),
            "--chat",
            s(&t.chat),
            "--pretrained",
            s(&t.pre),
            "-o",
            s(&out),
        ]));
        assert_eq!(shard_hashes(&out), shard_hashes(&local), "{shards} .bin shard(s)");
        assert!(entries(&out).iter().all(|e| !e.ends_with(".bin")), "{:?}", entries(&out));
    }
    // Broken files are named.
    let bad = d.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("pytorch_model.bin"), b"not a zip").unwrap();
    let o = chatvec(&["inspect", s(&bad)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("pytorch_model.bin: is not a PyTorch zip checkpoint"), "{}", stderr(&o));
    let good = std::fs::read(d.path().join("base-bin-1/pytorch_model.bin")).unwrap();
    std::fs::write(bad.join("pytorch_model.bin"), &good[..good.len() / 2]).unwrap();
    let o = chatvec(&["inspect", s(&bad)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("pytorch_model.bin: "), "{}", stderr(&o));
}

/// A `.bin` whose pickle claims shapes its storage cannot hold (or that
/// overflow 64 bits) is one clear error naming the tensor, never a panic or
/// a read past the storage.
#[test]
fn pytorch_bin_shapes_beyond_their_storage_are_refused() {
    let d = tempfile::tempdir().unwrap();
    for (shape, needle) in
        [(vec![1u64 << 30, 1 << 30, 1 << 30], "tensor 'w'"), (vec![1000, 1000], "runs past its storage")]
    {
        let t = T { name: "w".into(), ty: Ty::F32, shape, data: vec![0u8; 16] };
        bin_is_refused(&d.path().join(format!("m{}", t.shape.len())), t, |p| p, needle);
    }
}

/// Writes `t` as `DIR/pytorch_model.bin`, its pickle rewritten by `edit`,
/// and checks `inspect` refuses it with one error naming the file and
/// holding `needle`: exit 1, no panic.
fn bin_is_refused(dir: &std::path::Path, t: T, edit: impl FnOnce(Vec<u8>) -> Vec<u8>, needle: &str) {
    std::fs::create_dir_all(dir).unwrap();
    write_torch_bin_with(&dir.join("pytorch_model.bin"), &[t], edit);
    let o = chatvec(&["inspect", s(dir)]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{}: {e}", dir.display());
    assert!(e.contains("pytorch_model.bin: ") && e.contains(needle), "{}: {e}", dir.display());
    assert!(!e.contains("panicked"), "{}: {e}", dir.display());
}

/// Pickles that made candle's reader panic (found by the `torch_bin` fuzz
/// target and by reading it): an integer wider than int64, a tensor
/// rebuilt from too few arguments, a negative storage offset. Each is one
/// error naming the file and what was expected, exit 1, no panic.
#[test]
fn pickles_that_crashed_the_bin_reader_are_refused_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    // The storage offset, the `J` int right after the storage's persistent id.
    let offset = |p: &[u8]| p.windows(3).position(|w| w == b"tQJ").unwrap() + 2;
    type Edit = Box<dyn FnOnce(Vec<u8>) -> Vec<u8>>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "long",
            Box::new(move |p: Vec<u8>| {
                let at = offset(&p);
                let mut q = p[..at].to_vec();
                q.extend_from_slice(&[0x8a, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
                q.extend_from_slice(&p[at + 5..]);
                q
            }),
            "a LONG1 integer of 9 bytes; expected at most 8",
        ),
        (
            "few",
            Box::new(move |p: Vec<u8>| {
                let at = offset(&p) + 5;
                let mut q = p[..at].to_vec();
                q.extend_from_slice(b"tRu.");
                q
            }),
            "tensor 'w'",
        ),
        (
            "negative",
            Box::new(move |p: Vec<u8>| {
                let at = offset(&p);
                let mut q = p.clone();
                q[at + 1..at + 5].copy_from_slice(&(-1i32).to_le_bytes());
                q
            }),
            "tensor 'w'",
        ),
    ];
    for (name, edit, needle) in cases {
        let t = T { name: "w".into(), ty: Ty::F32, shape: vec![2, 2], data: vec![0u8; 16] };
        bin_is_refused(&d.path().join(name), t, edit, needle);
    }
}

#[test]
fn bad_vector_directory_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let merged = d.path().join("merged");
    ok(&apply_streaming(&t, &merged, &["-q"]));
    let o = chatvec(&["apply", "--base", s(&t.base), "--vector", s(&merged), "-o", s(&d.path().join("x"))]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not a chat vector"), "{}", stderr(&o));
    std::fs::write(merged.join("chatvec-manifest.json"), "{").unwrap();
    let o = chatvec(&["apply", "--base", s(&t.base), "--vector", s(&merged), "-o", s(&d.path().join("x"))]);
    assert!(
        stderr(&o).contains("chatvec-manifest.json") && stderr(&o).contains("invalid JSON"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let out = d.path().join("out");
    let o = apply_streaming(&t, &out, &["--scale-for", "mlp=0.5", "--dry-run"]);
    ok(&o);
    let text = stdout(&o);
    assert!(text.contains("model.layers.0.mlp.up_proj.weight BF16 [12, 8]: base:model.layers.0.mlp.up_proj.weight + 0.5 * (chat:"), "{text}");
    let last = text.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("total: 19 tensors (19 computed)") && last.ends_with("dry run, nothing written"),
        "{last}"
    );
    assert!(!out.exists());
}

#[test]
fn json_summary_and_inspect() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 3);
    let o = chatvec(&["inspect", "--json", s(&t.base)]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let params: u64 = llama_shapes(16, false).iter().map(|(_, s)| s.iter().product::<u64>()).sum();
    assert_eq!(v["parameters"], params);
    assert_eq!(v["shards"].as_array().unwrap().len(), 3);
    assert_eq!(v["config"]["num_hidden_layers"], LAYERS);
    assert_eq!(v["tied_embeddings"], false);
    let h = chatvec(&["inspect", s(&t.base)]);
    ok(&h);
    assert!(
        stdout(&h).contains("model.layers.1.self_attn.o_proj.weight")
            && stdout(&h).contains("LlamaForCausalLM")
    );

    let out = d.path().join("out");
    let o = apply_streaming(&t, &out, &["--json"]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["kind"], "apply");
    assert_eq!(v["tensors"], llama_shapes(16, false).len());
    assert_eq!(v["shards"][0]["sha256"], sha256_file(&out.join("model.safetensors")));
}

#[test]
fn demo_runs() {
    let d = tempfile::tempdir().unwrap();
    let o = chatvec(&["demo", "--dir", s(&d.path().join("demo"))]);
    ok(&o);
    assert!(stdout(&o).contains("byte-identical"));
    assert!(stdout(&o).contains("256 of 320 rows got the vector (align)"));
}

/// `--json` puts exactly one JSON document on stdout, for every command
/// that reports something; notes and warnings stay on stderr.
#[test]
fn json_means_one_json_document_on_stdout() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let out = d.path().join("out");
    let json = |args: &[&str]| -> serde_json::Value {
        let o = chatvec(args);
        ok(&o);
        serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{args:?}: {e}\n{}", stdout(&o)))
    };
    let demo = json(&["--json", "demo", "--dir", s(&d.path().join("demo"))]);
    assert_eq!(demo["identical"], true);
    assert_eq!(demo["apply_stored"]["shards"], demo["apply_streaming"]["shards"]);
    let list = json(&["--json", "list"]);
    assert!(list["models"].as_array().unwrap().iter().any(|m| m["name"] == "swallow-8b"), "{list}");
    assert!(
        list["recipes"].as_array().unwrap().iter().any(|r| r["name"] == "llama3-swallow-8b-ties"),
        "{list}"
    );
    let apply = |extra: &[&str]| {
        let mut a = vec!["--json", "apply", "--base", s(&t.base), "--chat", s(&t.chat)];
        a.extend(["--pretrained", s(&t.pre), "-o", s(&out)]);
        a.extend(extra);
        json(&a)
    };
    let dry = apply(&["--dry-run"]);
    assert!(dry["plan"].as_str().unwrap().contains("nothing written"), "{dry}");
    let applied = apply(&[]);
    assert_eq!(applied["kind"], "apply");
    assert_eq!(json(&["--json", "verify", s(&out)])["ok"], true);
    assert_eq!(json(&["--json", "inspect", s(&out)])["made_by"]["kind"], "apply");
}

#[test]
fn list_shows_aliases_and_shipped_recipes() {
    let o = chatvec(&["list"]);
    ok(&o);
    let text = stdout(&o);
    assert!(text.contains("swallow-8b") && text.contains("tokyotech-llm/Llama-3-Swallow-8B-v0.1"), "{text}");
    assert!(text.contains("llama3-instruct") && text.contains("llama3-8b-instruct - llama3-8b"), "{text}");
    assert!(text.contains("llama3-swallow-8b-chat-vector") && text.contains("TIES of"), "{text}");
}

#[test]
fn sigint_leaves_nothing_behind() {
    use std::process::Stdio;
    let d = tempfile::tempdir().unwrap();
    // Big enough, with tiny chunks, that the run is still going when the signal lands.
    let (pre, chat, base) = (d.path().join("pre"), d.path().join("chat"), d.path().join("base"));
    for (dir, seed) in [(&pre, 1), (&chat, 2), (&base, 3)] {
        let data: Vec<u8> = (0..4_000_000usize).flat_map(|i| Ty::BF16.encode(val(seed, "w", i))).collect();
        write_model(
            dir,
            &[T { name: "w".into(), ty: Ty::BF16, shape: vec![4_000_000], data }],
            1,
            &config(16, false, LAYERS),
            None,
        );
    }
    let out = d.path().join("out");
    let before = entries(d.path());
    let mut child = command()
        .args([
            "-q",
            "apply",
            "--base",
            s(&base),
            "--chat",
            s(&chat),
            "--pretrained",
            s(&pre),
            "--threads",
            "1",
            "--chunk-elems",
            "4",
        ])
        .args(["-o", s(&out)])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the run is writing (its temporary directory exists).
    let started = std::time::Instant::now();
    while !entries(d.path()).iter().any(|e| e.contains("chatvec-tmp")) {
        assert!(started.elapsed().as_secs() < 60, "the run never started writing");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "the run should have been interrupted");
    assert_eq!(entries(d.path()), before);
}

#[test]
fn input_hashes_come_from_the_cache_unless_rehash() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let cache = d.path().join("cache");
    let run = |out: &str, extra: &[&str]| {
        let o = command()
            .env("CHATVEC_CACHE_DIR", &cache)
            .args(["-q", "apply", "--base", s(&t.base), "--chat", s(&t.chat), "--pretrained", s(&t.pre)])
            .args(["-o", s(&d.path().join(out))])
            .args(extra)
            .output()
            .unwrap();
        ok(&o);
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.path().join(out).join("chatvec-manifest.json")).unwrap())
                .unwrap();
        m["inputs"][0]["shards"][0]["sha256"].as_str().unwrap().to_string()
    };
    let real = run("first", &[]);
    assert_eq!(real, sha256_file(&t.base.join("model.safetensors")));
    // Poison every entry: a run that trusts the cache reports the poison,
    // which proves the cache was read; --rehash does not.
    let entries: Vec<_> =
        std::fs::read_dir(cache.join("sha256")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(entries.len(), 4, "one entry per input shard");
    for e in &entries {
        std::fs::write(e, format!("{}\n", "0".repeat(64))).unwrap();
    }
    assert_eq!(run("cached", &[]), "0".repeat(64));
    assert_eq!(run("rehashed", &["--rehash"]), real);
    // Rewriting an input invalidates its entry.
    write_model(&t.base, &llama(9, 16, false, Ty::BF16), 1, &config(16, false, LAYERS), Some(&tokens(16)));
    assert_eq!(run("rewritten", &[]), sha256_file(&t.base.join("model.safetensors")));
}

#[test]
fn dry_run_json_is_valid_json_with_the_plan() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let out = d.path().join("out");
    let o = apply_streaming(&t, &out, &["--json", "--dry-run"]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["dry_run"], true);
    assert!(v["plan"].as_str().unwrap().contains("lm_head.weight"));
    assert!(!out.exists());
}

#[test]
fn bad_side_files_are_named() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    std::fs::write(t.chat.join("config.json"), "{\"hidden_size\": 8,").unwrap();
    apply_fails(&t, &[], 1, &["chat/config.json", "invalid JSON"]);
    let t = trio(d.path(), Ty::BF16, 1);
    std::fs::write(
        t.base.join("tokenizer.json"),
        r#"{"model": {"vocab": {"a": 0}}, "added_tokens": [{"id": 0}]}"#,
    )
    .unwrap();
    apply_fails(&t, &[], 1, &["base/tokenizer.json", "added_tokens[0]"]);
    let t = trio(d.path(), Ty::BF16, 1);
    std::fs::write(t.chat.join("generation_config.json"), "[1, 2]").unwrap();
    apply_fails(&t, &[], 1, &["chat/generation_config.json", "expected a JSON object"]);
}

#[test]
fn inspect_shows_what_made_a_vector() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let v = d.path().join("vec");
    ok(&extract(&t, &v, &["-q"]));
    let o = chatvec(&["inspect", s(&v)]);
    ok(&o);
    assert!(stdout(&o).contains("(a chat vector) from:"), "{}", stdout(&o));
    assert!(stdout(&o).contains("pretrained: ") && stdout(&o).contains("/pre"));
    let j: serde_json::Value =
        serde_json::from_str(&stdout(&chatvec(&["inspect", "--json", s(&v)]))).unwrap();
    assert_eq!(j["made_by"]["kind"], "extract");
    assert_eq!(j["made_by"]["inputs"][0][0], "chat");
}

/// Every `chatvec ...` command line in `text`, continuation lines joined
/// and comments cut.
fn command_lines(text: &str) -> Vec<Vec<String>> {
    let joined = text.replace("\\\n", " ");
    joined
        .lines()
        .map(|l| l.split(" # ").next().unwrap_or(l).trim())
        .filter_map(|l| l.strip_prefix("chatvec ").or_else(|| l.strip_prefix("$ chatvec ")))
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

#[test]
fn every_model_the_readme_and_help_examples_name_is_an_alias_a_hub_id_or_an_earlier_output() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let mut texts = vec![readme];
    for sub in [
        "apply", "extract", "analyze", "sweep", "eval", "merge", "run", "sft", "verify", "inspect", "push",
        "download",
    ] {
        texts.push(stdout(&chatvec(&[sub, "--help"])));
    }
    let list = chatvec(&["--json", "list"]);
    ok(&list);
    let list: serde_json::Value = serde_json::from_str(&stdout(&list)).unwrap();
    let names = |k: &str| -> Vec<String> {
        list[k].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_string()).collect()
    };
    let (models, vectors, recipes) = (names("models"), names("vectors"), names("recipes"));
    let lines: Vec<Vec<String>> = texts.iter().flat_map(|t| command_lines(t)).collect();
    assert!(lines.len() > 20, "{lines:?}");
    // What the examples write and then use (-o, positional outputs).
    let outputs: Vec<String> = lines
        .iter()
        .flat_map(|l| l.windows(2).filter(|w| w[0] == "-o").map(|w| w[1].clone()).collect::<Vec<_>>())
        .collect();
    for l in &lines {
        for w in l.windows(2) {
            let value = w[1].split('@').next().unwrap().trim_matches('\'');
            let known = |list: &[String]| list.iter().any(|n| n == value);
            let ok = match w[0].as_str() {
                "--base"
                | "--chat"
                | "--pretrained"
                | "--model"
                | "--against-chat"
                | "--against-pretrained"
                | "--applied" => known(&models) || value.contains('/') || outputs.iter().any(|o| o == value),
                "--vector" | "--against" => {
                    known(&vectors)
                        || known(&models)
                        || value.contains('/')
                        || outputs.iter().any(|o| o == value)
                }
                _ => true,
            };
            assert!(ok, "'{value}' in `chatvec {}` is no alias, Hub id or earlier output", l.join(" "));
        }
        if l.first().map(String::as_str) == Some("merge") && l.len() > 1 && !l[1].starts_with('-') {
            let r = l[1].as_str();
            assert!(
                known_recipe(r, &recipes),
                "recipe '{r}' in `chatvec {}` is not shipped or a file",
                l.join(" ")
            );
        }
    }
}

fn known_recipe(r: &str, shipped: &[String]) -> bool {
    shipped.iter().any(|n| n == r) || r.ends_with(".toml") || r.ends_with(".yml") || r.ends_with(".yaml")
}
