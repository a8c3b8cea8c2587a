//! extract / apply numerics and checkpoint handling, checked element by
//! element against references written here: a scalar f32 loop in the
//! documented order (bit-exact) and an f64 computation (error bound).

mod common;

use std::collections::BTreeMap;

use common::*;
use serde_json::Value;

/// The documented f32 order: d = c - p; m = s * d; out = b + m; one rounding
/// to the output type by the `half` crate.
fn reference(b: f32, c: f32, p: f32, s: f32, out: Ty) -> Vec<u8> {
    let d = c - p;
    let m = s * d;
    out.encode(b + m)
}

/// One unit in the last place of a bf16/f16/f32 value near `x`.
fn ulp(ty: Ty, x: f64) -> f64 {
    let mant = match ty {
        Ty::BF16 => 7,
        Ty::F16 => 10,
        _ => 23,
    };
    let e = x.abs().max(1e-30).log2().floor();
    let e = if ty == Ty::F16 { e.max(-14.0) } else { e };
    2f64.powf(e - mant as f64)
}

fn check_apply(out_dir: &std::path::Path, t: &Trio, scale_of: impl Fn(&str) -> f32) {
    let out = read_model(out_dir);
    let (b, c, p) = (read_model(&t.base), read_model(&t.chat), read_model(&t.pre));
    assert_eq!(out.len(), b.len());
    for (name, bt) in &b {
        let o = &out[name];
        assert_eq!(o.shape, bt.shape, "{name}");
        let s = scale_of(name);
        for i in 0..bt.numel() {
            let (bv, cv, pv) = (bt.get(i), c[name].get(i), p[name].get(i));
            let want = reference(bv, cv, pv, s, o.ty);
            let sz = o.ty.size();
            assert_eq!(&o.data[i * sz..(i + 1) * sz], &want[..], "{name}[{i}]");
            let exact = bv as f64 + s as f64 * (cv as f64 - pv as f64);
            let err = (o.get(i) as f64 - exact).abs();
            assert!(
                err <= ulp(o.ty, exact) + 1e-6 * exact.abs().max(1e-30),
                "{name}[{i}]: {} vs {exact}",
                o.get(i)
            );
        }
    }
}

#[test]
fn apply_streaming_bf16_matches_reference_bit_for_bit() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let out = d.path().join("out");
    ok(&apply_streaming(&t, &out, &["-q", "--scale", "0.7"]));
    check_apply(&out, &t, |_| 0.7);
}

#[test]
fn apply_f16_and_f32_match_reference() {
    for ty in [Ty::F16, Ty::F32] {
        let d = tempfile::tempdir().unwrap();
        let t = trio(d.path(), ty, 3);
        let out = d.path().join("out");
        ok(&apply_streaming(&t, &out, &["-q", "--scale", "1.3"]));
        check_apply(&out, &t, |_| 1.3);
    }
}

#[test]
fn mixed_input_dtypes_keep_the_base_dtype_and_out_dtype_changes_it() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    // Rewrite the base in f16: the output follows the base's dtypes.
    write_model(&t.base, &llama(3, 16, false, Ty::F16), 1, &config(16, false, LAYERS), Some(&tokens(16)));
    let out = d.path().join("out");
    ok(&apply_streaming(&t, &out, &["-q"]));
    assert!(read_model(&out).values().all(|t| t.ty == Ty::F16));
    check_apply(&out, &t, |_| 1.0);
    let out32 = d.path().join("out32");
    ok(&apply_streaming(&t, &out32, &["-q", "--out-dtype", "f32"]));
    let o = read_model(&out32);
    assert!(o.values().all(|t| t.ty == Ty::F32));
    let cfg: Value = serde_json::from_slice(&std::fs::read(out32.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "float32");
    check_apply(&out32, &t, |_| 1.0);
}

/// Also with several shards written side by side (4 and 8 threads fill 2
/// and 4 at once): the same files, and the manifest's sha256 of each is
/// that file's own.
#[test]
fn output_bytes_do_not_depend_on_threads_or_chunk_size() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 2);
    let mut hashes = Vec::new();
    for (threads, chunk) in [("1", "7"), ("4", "100000"), ("3", "64"), ("8", "50")] {
        let out = d.path().join(format!("out-{threads}-{chunk}"));
        ok(&apply_streaming(
            &t,
            &out,
            &["-q", "--scale", "0.5", "--threads", threads, "--chunk-elems", chunk, "--shard-size", "1000"],
        ));
        let files = shard_hashes(&out);
        let m: Value =
            serde_json::from_slice(&std::fs::read(out.join("chatvec-manifest.json")).unwrap()).unwrap();
        let recorded: BTreeMap<String, String> = m["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| (f["file"].as_str().unwrap().to_string(), f["sha256"].as_str().unwrap().to_string()))
            .filter(|(file, _)| file.ends_with(".safetensors"))
            .collect();
        assert_eq!(recorded, files, "{threads} threads: the manifest's hashes");
        hashes.push(files);
    }
    assert!(hashes[0].len() > 1, "small --shard-size should give several shards");
    assert_eq!(hashes[0], hashes[1]);
    assert_eq!(hashes[0], hashes[2]);
    assert_eq!(hashes[0], hashes[3]);
}

#[test]
fn sharded_output_keeps_base_names_and_order_with_a_valid_index() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 3);
    let out = d.path().join("out");
    ok(&apply_streaming(&t, &out, &["-q", "--shard-size", "600"]));
    assert_eq!(names_in_order(&out), names_in_order(&t.base));
    let idx: Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap()).unwrap();
    let total: usize = read_model(&out).values().map(|t| t.data.len()).sum();
    assert_eq!(idx["metadata"]["total_size"].as_u64().unwrap() as usize, total);
    let wm = idx["weight_map"].as_object().unwrap();
    assert_eq!(wm.len(), read_model(&out).len());
    for (name, file) in wm {
        let st = std::fs::read(out.join(file.as_str().unwrap())).unwrap();
        assert!(safetensors::SafeTensors::deserialize(&st).unwrap().tensor(name).is_ok());
    }
    // transformers loads only shards with {"format": "pt"} metadata.
    let first = std::fs::read(out.join(wm.values().next().unwrap().as_str().unwrap())).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&first).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap().get("format").map(String::as_str), Some("pt"));
}

#[test]
fn extract_is_exact_and_f32_vector_apply_equals_streaming() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let vec32 = d.path().join("vec32");
    ok(&extract(&t, &vec32, &["-q", "--dtype", "f32"]));
    let v = read_model(&vec32);
    let (c, p) = (read_model(&t.chat), read_model(&t.pre));
    for (name, vt) in &v {
        assert_eq!(vt.ty, Ty::F32);
        for i in 0..vt.numel() {
            // bf16 - bf16 is exact in f32 here; check against f64.
            assert_eq!(vt.get(i) as f64, c[name].get(i) as f64 - p[name].get(i) as f64, "{name}[{i}]");
        }
    }
    let a = d.path().join("a");
    let b = d.path().join("b");
    let common = ["--scale", "0.8", "--scale-for", "mlp\\.=0.25"];
    let mut args = vec!["-q", "apply", "--base", s(&t.base), "--vector", s(&vec32), "-o", s(&a)];
    args.extend(common);
    ok(&chatvec(&args));
    let mut args = vec![
        "-q",
        "apply",
        "--base",
        s(&t.base),
        "--chat",
        s(&t.chat),
        "--pretrained",
        s(&t.pre),
        "-o",
        s(&b),
    ];
    args.extend(common);
    ok(&chatvec(&args));
    assert_eq!(shard_hashes(&a), shard_hashes(&b));
    check_manifest_hashes(&a);
    check_manifest_hashes(&vec32);
    check_apply(&b, &t, |n| if n.contains("mlp.") { 0.25 } else { 0.8 });

    // The default vector dtype is the chat model's.
    let vec16 = d.path().join("vec16");
    ok(&extract(&t, &vec16, &["-q"]));
    assert!(read_model(&vec16).values().all(|t| t.ty == Ty::BF16));
}

#[test]
fn include_and_exclude_copy_unselected_tensors_byte_for_byte() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let out = d.path().join("out");
    ok(&apply_streaming(&t, &out, &["-q", "--include", "layers\\.", "--exclude", "layernorm"]));
    let (o, b) = (read_model(&out), read_model(&t.base));
    let selected = |n: &str| n.contains("layers.") && !n.contains("layernorm");
    for (name, bt) in &b {
        if selected(name) {
            assert_ne!(o[name].data, bt.data, "{name} should change");
        } else {
            assert_eq!(o[name].data, bt.data, "{name} should be copied");
        }
    }
}

#[test]
fn extract_exclude_is_recorded_and_apply_copies_those_tensors() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let v = d.path().join("vec");
    ok(&extract(&t, &v, &["-q", "--exclude", "norm"]));
    assert!(read_model(&v).keys().all(|k| !k.contains("norm")));
    let out = d.path().join("out");
    ok(&chatvec(&["-q", "apply", "--base", s(&t.base), "--vector", s(&v), "-o", s(&out)]));
    let (o, b) = (read_model(&out), read_model(&t.base));
    assert_eq!(o["model.norm.weight"].data, b["model.norm.weight"].data);
    assert_ne!(o["lm_head.weight"].data, b["lm_head.weight"].data);
}

fn expanded_setup(root: &std::path::Path, base_tokens: &[String]) -> Trio {
    let t = Trio { pre: root.join("pre"), chat: root.join("chat"), base: root.join("base") };
    let n = base_tokens.len() as u64;
    write_model(&t.pre, &llama(1, 16, false, Ty::BF16), 1, &config(16, false, LAYERS), Some(&tokens(16)));
    write_model(&t.chat, &llama(2, 16, false, Ty::BF16), 1, &config(16, false, LAYERS), Some(&tokens(16)));
    write_model(&t.base, &llama(3, n, false, Ty::BF16), 1, &config(n, false, LAYERS), Some(base_tokens));
    t
}

/// Checks vocabulary-indexed rows: base row r takes vector row map(r) or
/// stays as in the base.
fn check_rows(out: &std::path::Path, t: &Trio, map: impl Fn(usize) -> Option<usize>) {
    let (o, b, c, p) = (read_model(out), read_model(&t.base), read_model(&t.chat), read_model(&t.pre));
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let rows = b[name].shape[0] as usize;
        let w = HIDDEN as usize;
        for r in 0..rows {
            for j in 0..w {
                let i = r * w + j;
                let got = &o[name].data[i * 2..i * 2 + 2];
                match map(r) {
                    Some(v) => {
                        let k = v * w + j;
                        assert_eq!(
                            got,
                            &reference(b[name].get(i), c[name].get(k), p[name].get(k), 1.0, Ty::BF16)[..],
                            "{name} row {r}"
                        );
                    }
                    None => assert_eq!(
                        got,
                        &b[name].data[i * 2..i * 2 + 2],
                        "{name} row {r} must stay as in base"
                    ),
                }
            }
        }
    }
}

#[test]
fn expanded_vocabulary_align_matches_rows_by_token_string() {
    let d = tempfile::tempdir().unwrap();
    // The base swaps two known tokens and appends 8 new ones.
    let mut toks = tokens(16);
    toks.swap(3, 5);
    toks.extend((0..8).map(|i| format!("ja{i}")));
    let t = expanded_setup(d.path(), &toks);
    let out = d.path().join("out");
    let o = apply_streaming(&t, &out, &["--json"]);
    ok(&o);
    check_rows(&out, &t, |r| match r {
        3 => Some(5),
        5 => Some(3),
        r if r < 16 => Some(r),
        _ => None,
    });
    // Aligned rows are read out of file order; the input hashes still hold.
    check_manifest_hashes(&out);
    let summary: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let e = &summary["embeddings"][0];
    assert_eq!(e["rows"], 24);
    assert_eq!(e["rows_with_vector"], 16);
    assert_eq!(e["policy"], "align");
    // Other tensors still match the reference.
    let (ob, bb) = (read_model(&out), read_model(&t.base));
    assert_ne!(ob["model.norm.weight"].data, bb["model.norm.weight"].data);
}

#[test]
fn expanded_vocabulary_prefix_skip_and_full() {
    let d = tempfile::tempdir().unwrap();
    let mut toks = tokens(16);
    toks.extend((0..8).map(|i| format!("ja{i}")));
    let t = expanded_setup(d.path(), &toks);
    let run =
        |policy: &str, out: &str| apply_streaming(&t, &d.path().join(out), &["-q", "--embeddings", policy]);
    ok(&run("prefix", "prefix"));
    check_rows(&d.path().join("prefix"), &t, |r| (r < 16).then_some(r));
    ok(&run("skip", "skip"));
    check_rows(&d.path().join("skip"), &t, |_| None);
    let full = run("full", "full");
    assert_eq!(full.status.code(), Some(1));
    assert!(
        stderr(&full).contains("model.embed_tokens.weight") && stderr(&full).contains("24"),
        "{}",
        stderr(&full)
    );
    assert!(!d.path().join("full").exists());

    // Without tokenizers, auto falls back to prefix and warns.
    std::fs::remove_file(t.base.join("tokenizer.json")).unwrap();
    let o = run("auto", "auto");
    ok(&o);
    assert!(stderr(&o).contains("warning:") && stderr(&o).contains("prefix"), "{}", stderr(&o));
    check_rows(&d.path().join("auto"), &t, |r| (r < 16).then_some(r));
}

#[test]
fn tied_vector_gives_an_untied_base_its_lm_head_delta() {
    let d = tempfile::tempdir().unwrap();
    let t = tied_trio(d.path(), true, true, false);
    let out = d.path().join("out");
    ok(&apply_streaming(&t, &out, &["-q"]));
    let (o, b, c, p) = (read_model(&out), read_model(&t.base), read_model(&t.chat), read_model(&t.pre));
    let e = "model.embed_tokens.weight";
    for i in 0..b["lm_head.weight"].numel() {
        let want = reference(b["lm_head.weight"].get(i), c[e].get(i), p[e].get(i), 1.0, Ty::BF16);
        assert_eq!(&o["lm_head.weight"].data[i * 2..i * 2 + 2], &want[..]);
    }
}

#[test]
fn tied_base_with_untied_vector_is_refused_unless_embeddings_are_skipped() {
    let d = tempfile::tempdir().unwrap();
    let t = tied_trio(d.path(), false, false, true);
    let out = d.path().join("out");
    let o = apply_streaming(&t, &out, &[]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("ties lm_head")
            && err.contains("--embeddings skip")
            && err.contains("--exclude lm_head"),
        "{err}"
    );
    assert!(!out.exists());
    ok(&apply_streaming(&t, &out, &["--embeddings", "skip"]));
    let (ob, bb) = (read_model(&out), read_model(&t.base));
    assert!(!ob.contains_key("lm_head.weight"));
    assert_eq!(ob["model.embed_tokens.weight"].data, bb["model.embed_tokens.weight"].data);
}

#[test]
fn tied_base_takes_the_embedding_delta_when_the_vector_lm_head_is_excluded() {
    let d = tempfile::tempdir().unwrap();
    let t = tied_trio(d.path(), false, false, true);
    let out = d.path().join("out");
    let o = apply_streaming(&t, &out, &["--exclude", "lm_head"]);
    ok(&o);
    assert!(
        stderr(&o).contains("the delta of 'model.embed_tokens.weight' goes to the tied matrix"),
        "{}",
        stderr(&o)
    );
    let (ob, b, c, p) = (read_model(&out), read_model(&t.base), read_model(&t.chat), read_model(&t.pre));
    assert!(!ob.contains_key("lm_head.weight"));
    let e = "model.embed_tokens.weight";
    for i in 0..b[e].numel() {
        let want = reference(b[e].get(i), c[e].get(i), p[e].get(i), 1.0, Ty::BF16);
        assert_eq!(&ob[e].data[i * 2..i * 2 + 2], &want[..], "element {i}");
    }
}

#[test]
fn chat_template_and_eos_ids_come_from_the_chat_model() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let mut toks = tokens(16);
    toks[9] = "<|eot_id|>".into();
    write_tokenizer(&t.chat, &toks);
    let mut btoks = tokens(16);
    btoks[9] = "t10".into();
    btoks[10] = "<|eot_id|>".into(); // same token, another id in the base
    write_tokenizer(&t.base, &btoks);
    std::fs::write(
        t.chat.join("tokenizer_config.json"),
        r#"{"chat_template": "{{ messages }}<|eot_id|>", "eos_token": "<|eot_id|>"}"#,
    )
    .unwrap();
    std::fs::write(t.chat.join("generation_config.json"), r#"{"eos_token_id": [2, 9]}"#).unwrap();
    std::fs::write(t.base.join("tokenizer_config.json"), r#"{"eos_token": "t2", "model_max_length": 8192}"#)
        .unwrap();
    std::fs::write(t.base.join("generation_config.json"), r#"{"bos_token_id": 1, "eos_token_id": 2}"#)
        .unwrap();
    let out = d.path().join("out");
    let o = apply_streaming(&t, &out, &[]);
    ok(&o);
    assert!(stderr(&o).contains("chat template: taken from"), "{}", stderr(&o));
    let tc: Value =
        serde_json::from_slice(&std::fs::read(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tc["chat_template"], "{{ messages }}<|eot_id|>");
    assert_eq!(tc["model_max_length"], 8192, "the rest of the base's config stays");
    let gc: Value =
        serde_json::from_slice(&std::fs::read(out.join("generation_config.json")).unwrap()).unwrap();
    assert_eq!(gc["eos_token_id"], serde_json::json!([2, 10]), "ids are mapped by token string");
    assert_eq!(gc["bos_token_id"], 1);
    assert_eq!(
        std::fs::read(out.join("config.json")).unwrap(),
        std::fs::read(t.base.join("config.json")).unwrap()
    );

    let keep = d.path().join("keep");
    ok(&apply_streaming(&t, &keep, &["-q", "--keep-base-template"]));
    assert_eq!(
        std::fs::read(keep.join("tokenizer_config.json")).unwrap(),
        std::fs::read(t.base.join("tokenizer_config.json")).unwrap()
    );
    assert_eq!(
        std::fs::read(keep.join("generation_config.json")).unwrap(),
        std::fs::read(t.base.join("generation_config.json")).unwrap()
    );

    // Through a stored vector the template travels in the vector directory.
    let v = d.path().join("vec");
    ok(&extract(&t, &v, &["-q"]));
    let viav = d.path().join("viav");
    ok(&chatvec(&["-q", "apply", "--base", s(&t.base), "--vector", s(&v), "-o", s(&viav)]));
    let tc2: Value =
        serde_json::from_slice(&std::fs::read(viav.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tc2["chat_template"], "{{ messages }}<|eot_id|>");
}

#[test]
fn manifest_records_inputs_and_outputs_with_correct_hashes() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 2);
    let out = d.path().join("out");
    ok(&apply_streaming(&t, &out, &["-q", "--scale", "0.9", "--shard-size", "1KB"]));
    let m: Value =
        serde_json::from_slice(&std::fs::read(out.join("chatvec-manifest.json")).unwrap()).unwrap();
    assert_eq!(m["kind"], "apply");
    assert_eq!(m["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(m["parameters"]["scale"], 0.9);
    assert!(m["command"].as_array().unwrap().iter().any(|a| a == "--scale"));
    assert_eq!(m["inputs"].as_array().unwrap().len(), 3);
    assert!(m["outputs"].as_array().unwrap().len() > 2);
    check_manifest_hashes(&out);
}

#[test]
fn a_layer_gradient_scales_each_layer_and_the_manifest_records_every_tensors_scale() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let out = d.path().join("out");
    // Two layers: layer 0 gets 0.3, layer 1 gets 1.0; the embeddings the
    // first value, the final norm and lm_head the last; mlp follows its own
    // gradient [0, 0.5].
    ok(&apply_streaming(&t, &out, &["-q", "--scale", "[0.3, 1.0]", "--scale-for", "mlp=[0, 0.5]"]));
    let want = |name: &str| -> f32 {
        let layer1 = name.contains("layers.1.");
        match name {
            n if n.contains("mlp") => {
                if layer1 {
                    0.5
                } else {
                    0.0
                }
            }
            n if n.contains("layers.0.") || n == "model.embed_tokens.weight" => 0.3,
            _ => 1.0,
        }
    };
    check_apply(&out, &t, want);
    let m: Value =
        serde_json::from_slice(&std::fs::read(out.join("chatvec-manifest.json")).unwrap()).unwrap();
    let p = &m["parameters"];
    assert_eq!(p["scale"], serde_json::json!([0.3, 1.0]));
    for (name, s) in p["tensor_scales"].as_object().unwrap() {
        assert_eq!(s.as_f64().unwrap() as f32, want(name), "{name}");
    }
    assert_eq!(p["tensor_scales"].as_object().unwrap().len(), read_model(&t.base).len());
    // A bad gradient is one clear error.
    let o = apply_streaming(&t, &d.path().join("bad"), &["--scale", "[0.3, x]"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("expected a finite number an f32 can hold"), "{}", stderr(&o));
    assert!(!d.path().join("bad").exists());
}

#[test]
fn each_sweep_candidate_is_byte_identical_to_a_separate_apply() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 2);
    let sweep = d.path().join("sweep");
    let args = ["sweep", "--base", s(&t.base), "--chat", s(&t.chat), "--pretrained", s(&t.pre)];
    let o = chatvec(&[&args[..], &["-q", "--scales", "0.5,1,[0.3, 1.0]", "-o", s(&sweep)]].concat());
    ok(&o);
    for (name, scale) in [("scale-0.5", "0.5"), ("scale-1", "1"), ("scale-0.3-1", "[0.3, 1.0]")] {
        let one = d.path().join(format!("one-{name}"));
        ok(&apply_streaming(&t, &one, &["-q", "--scale", scale]));
        assert_eq!(shard_hashes(&sweep.join(name)), shard_hashes(&one), "{name}");
        ok(&chatvec(&["verify", s(&sweep.join(name))]));
    }
    // Excluded tensors converted to f32 are the same for every candidate:
    // computed once, written by each from one buffer, and still equal to a
    // separate apply's.
    let conv = d.path().join("sweep-f32");
    let extra = ["--out-dtype", "f32", "--exclude", "mlp"];
    let o = chatvec(&[&args[..], &["-q", "--scales", "0.5,2", "-o", s(&conv)], &extra[..]].concat());
    ok(&o);
    for (name, scale) in [("scale-0.5", "0.5"), ("scale-2", "2")] {
        let one = d.path().join(format!("one-f32-{name}"));
        ok(&apply_streaming(&t, &one, &[&["-q", "--scale", scale][..], &extra[..]].concat()));
        assert_eq!(shard_hashes(&conv.join(name)), shard_hashes(&one), "f32 {name}");
        let out = read_model(&conv.join(name));
        let base = read_model(&t.base);
        let mlp: Vec<&String> = out.keys().filter(|k| k.contains("mlp")).collect();
        assert!(!mlp.is_empty());
        for k in mlp {
            assert_eq!(out[k].ty, Ty::F32, "{k}");
            for i in 0..out[k].numel() {
                assert_eq!(out[k].get(i), base[k].get(i), "{name} {k}[{i}]: the base's value, widened");
            }
        }
    }
    let rec: Value = serde_json::from_slice(&std::fs::read(sweep.join("sweep.json")).unwrap()).unwrap();
    assert_eq!(rec["candidates"].as_array().unwrap().len(), 3);
    // An existing sweep is not replaced without --force; --scale is refused.
    let o = chatvec(&[&args[..], &["--scales", "0.5", "-o", s(&sweep)]].concat());
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    // --force reuses a sweep's directory, never another one.
    ok(&chatvec(&[&args[..], &["-q", "--scales", "0.5", "-o", s(&sweep), "--force"]].concat()));
    let o = chatvec(&[&args[..], &["--scales", "0.5", "-o", s(&t.base), "--force"]].concat());
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("replaces only an earlier `chatvec sweep` directory"), "{}", stderr(&o));
    let o =
        chatvec(&[&args[..], &["--scales", "0.5", "--scale", "2", "-o", s(&d.path().join("x"))]].concat());
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--scales"), "{}", stderr(&o));
}

#[test]
fn sweep_candidates_of_long_gradients_get_short_unique_names() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let sweep = d.path().join("sweep");
    // One value per layer of an 80-layer model, twice, differing only in
    // the middle.
    let grad = |mid: f32| {
        let v: Vec<String> = (0..80)
            .map(|i| if i == 40 { mid.to_string() } else { format!("{}", 0.3 + 0.7 * i as f32 / 79.0) })
            .collect();
        format!("[{}]", v.join(", "))
    };
    let scales = format!("{},{}", grad(0.5), grad(0.6));
    let o = chatvec(&[
        "sweep",
        "--base",
        s(&t.base),
        "--chat",
        s(&t.chat),
        "--pretrained",
        s(&t.pre),
        "-q",
        "--scales",
        &scales,
        "-o",
        s(&sweep),
    ]);
    ok(&o);
    let names: Vec<String> = entries(&sweep).into_iter().filter(|n| n.starts_with("scale-")).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.iter().all(|n| n.len() <= 64 && n.contains("-80pts-")), "{names:?}");
    assert_ne!(names[0], names[1]);
}

#[test]
fn a_sweep_says_each_note_once_and_charges_the_side_file_reserve_once() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let sweep = d.path().join("sweep");
    let scales: Vec<String> = (1..=20).map(|i| format!("{}", i as f32 / 10.0)).collect();
    // Room for the 20 tiny candidates' weights and one 256 MiB reserve,
    // not for twenty reserves (5 GiB).
    let o = command()
        .env("CHATVEC_FREE_SPACE", (300u64 << 20).to_string())
        .args(["sweep", "--base", s(&t.base), "--chat", s(&t.chat), "--pretrained", s(&t.pre)])
        .args(["--scales", &scales.join(","), "-o", s(&sweep)])
        .output()
        .unwrap();
    ok(&o);
    let e = stderr(&o);
    for line in e.lines().filter(|l| !l.starts_with("wrote ")) {
        assert_eq!(e.lines().filter(|l| *l == line).count(), 1, "said more than once: {line}\n{e}");
    }
    assert_eq!(e.lines().filter(|l| l.starts_with("wrote ")).count(), 20, "{e}");
    // Short of space: said in human units, the reserve named.
    let o = command()
        .env("CHATVEC_FREE_SPACE", "1000")
        .args(["apply", "--base", s(&t.base), "--chat", s(&t.chat), "--pretrained", s(&t.pre)])
        .args(["-o", s(&d.path().join("out"))])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("KiB of weights and 256.0 MiB kept for side files), and 1000 B is available"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn apply_says_how_many_changed_elements_rounding_kept_at_the_base() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let (pre, chat, base) = (read_model(&t.pre), read_model(&t.chat), read_model(&t.base));
    for scale in ["0.01", "1"] {
        let out = d.path().join(format!("out-{scale}"));
        let o = apply_streaming(&t, &out, &["--scale", scale]);
        ok(&o);
        // Counted here from the files: of every 16th element of each
        // tensor (chatvec's sample), those the vector changes and those
        // whose output is the base's bf16 value.
        let got = read_model(&out);
        let (mut moved, mut kept) = (0u64, 0u64);
        for (name, b) in &base {
            let (c, p, o) = (&chat[name], &pre[name], &got[name]);
            for i in (0..b.numel()).step_by(16) {
                if c.get(i) != p.get(i) {
                    moved += 1;
                    kept += u64::from(o.data[2 * i..2 * i + 2] == b.data[2 * i..2 * i + 2]);
                }
            }
        }
        let said =
            format!("of the elements the vector changes ({kept} of {moved} counted, every 16th element)");
        if kept == 0 {
            assert!(!stderr(&o).contains("kept the base's value"), "{scale}: {}", stderr(&o));
            continue;
        }
        let share = kept as f64 / moved as f64;
        let shown = format!("about {:.1}%", 100.0 * share);
        assert!(stderr(&o).contains(&shown), "{scale}: {shown}\n{}", stderr(&o));
        // A warning from a tenth on (the small scale here), else a note.
        let warned = share >= 0.10;
        assert_eq!(warned, scale == "0.01", "{scale}: {shown}");
        assert!(stderr(&o).contains(&said), "{scale}: {said}\n{}", stderr(&o));
        assert_eq!(
            stderr(&o).contains("warning: rounding to the output dtype"),
            warned,
            "{scale}: {}",
            stderr(&o)
        );
        let man: Value =
            serde_json::from_slice(&std::fs::read(out.join("chatvec-manifest.json")).unwrap()).unwrap();
        assert!(man.to_string().contains(&said) || warned, "the note is in the manifest");
        // The sample follows the tensors' indices: the same whatever the
        // chunks and threads.
        let other = d.path().join(format!("chunked-{scale}"));
        let o = apply_streaming(&t, &other, &["--scale", scale, "--chunk-elems", "37", "--threads", "1"]);
        ok(&o);
        assert!(stderr(&o).contains(&said), "{scale}: {said}\n{}", stderr(&o));
    }
}

/// The card is fit to publish: the base's licence from its own card (with
/// its custom-licence name and link), the attribution the licences ask
/// for, a warning naming inputs under another licence, and usage snippets
/// for a model with a chat template.
#[test]
fn cards_carry_the_licence_its_attribution_and_usage() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    std::fs::write(t.base.join("README.md"), "---\nlicense: llama3\nlanguage: [ja]\n---\n# Swallow-like\n")
        .unwrap();
    std::fs::write(
        t.chat.join("README.md"),
        "---\nlicense: other\nlicense_name: qwen\nlicense_link: https://example.org/qwen/LICENSE\n---\n# chat\n",
    )
    .unwrap();
    std::fs::write(t.chat.join("chat_template.jinja"), "{% for m in messages %}{{ m.content }}{% endfor %}")
        .unwrap();
    let out = d.path().join("out");
    let o = apply_streaming(&t, &out, &[]);
    ok(&o);
    let e = stderr(&o);
    assert!(e.contains("the inputs' licences differ") && e.contains("qwen") && e.contains("llama3"), "{e}");
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    let front = card.strip_prefix("---\n").and_then(|c| c.split_once("---\n")).expect("front matter").0;
    let meta: serde_json::Value = serde_yaml_ng::from_str(front).unwrap();
    assert_eq!(meta["license"], "llama3", "{card}");
    assert_eq!(meta["license_name"], serde_json::Value::Null, "{card}");
    for needle in [
        "Built with Meta Llama 3.",
        "Built with Qwen.",
        "beginning with \"Llama 3\"",
        "## Usage",
        "apply_chat_template",
        "from vllm import LLM",
    ] {
        assert!(card.contains(needle), "{needle}: {card}");
    }
    // The base's own card is read, never copied over the output's.
    assert!(!card.contains("# Swallow-like"));
    ok(&chatvec(&["verify", s(&out)]));
    // A custom licence on the base is stated with its name and link.
    std::fs::write(
        t.base.join("README.md"),
        "---\nlicense: other\nlicense_name: qwen\nlicense_link: https://example.org/qwen/LICENSE\n---\n",
    )
    .unwrap();
    let out2 = d.path().join("out2");
    let o = apply_streaming(&t, &out2, &[]);
    ok(&o);
    assert!(!stderr(&o).contains("licences differ"), "{}", stderr(&o));
    let card = std::fs::read_to_string(out2.join("README.md")).unwrap();
    assert!(
        card.contains("license: other")
            && card.contains("license_name: qwen")
            && card.contains("license_link: https://example.org/qwen/LICENSE"),
        "{card}"
    );
}
