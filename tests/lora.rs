//! `apply --lora`: PEFT LoRA adapters merged into their base, checked
//! element by element against an f64 computation of
//! `W + scale * alpha / r * (B @ A)` written here, and every malformed
//! adapter refused with nothing written.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::{Value, json};

const R: u64 = 4;

/// The tiny Llama base (seed 3) in `root/base`.
fn base(root: &Path, ty: Ty) -> PathBuf {
    let dir = root.join("base");
    write_model(&dir, &llama(3, 16, false, ty), 1, &config(16, false, LAYERS), Some(&tokens(16)));
    dir
}

fn shape_of(name: &str) -> Vec<u64> {
    llama_shapes(16, false).into_iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name}")).1
}

/// A tensor with values `val(seed, name, i)`.
fn tensor(seed: u32, name: &str, shape: Vec<u64>, ty: Ty) -> T {
    let n: u64 = shape.iter().product();
    let data = (0..n as usize).flat_map(|i| ty.encode(val(seed, name, i))).collect();
    T { name: name.into(), ty, shape, data }
}

/// The factors PEFT saves for linear module `module` (`model.layers.0.self_attn.q_proj`):
/// A `r x in`, B `out x r`, from the base's weight shape `[out, in]`.
fn linear_factors(module: &str, r: u64, ty: Ty) -> Vec<T> {
    let w = shape_of(&format!("{module}.weight"));
    vec![
        tensor(7, &format!("base_model.model.{module}.lora_A.weight"), vec![r, w[1]], ty),
        tensor(8, &format!("base_model.model.{module}.lora_B.weight"), vec![w[0], r], ty),
    ]
}

fn lora_config(extra: Value) -> Value {
    let mut c = json!({
        "peft_type": "LORA", "r": R, "lora_alpha": 8, "lora_dropout": 0.05, "bias": "none",
        "task_type": "CAUSAL_LM", "target_modules": ["q_proj", "v_proj"], "use_rslora": false,
        "fan_in_fan_out": false, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": false,
        "base_model_name_or_path": "tiny-llama",
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn write_adapter(dir: &Path, config: &Value, tensors: &[T]) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_vec_pretty(config).unwrap()).unwrap();
    write_safetensors(&dir.join("adapter_model.safetensors"), tensors);
}

/// A rank-R adapter of layer 0's q_proj in `root/adapter`.
fn q_proj_adapter(root: &Path) -> PathBuf {
    let adapter = root.join("adapter");
    write_adapter(
        &adapter,
        &lora_config(json!({})),
        &linear_factors("model.layers.0.self_attn.q_proj", R, Ty::F32),
    );
    adapter
}

fn merge(base: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["apply", "--base", s(base), "--lora", s(adapter), "-o", s(out), "-q"];
    args.extend(extra);
    chatvec(&args)
}

/// Checks `out[name]` against `W + s * (P @ Q)` in f64, where `p(i, t)` and
/// `q(t, k)` read the factors; the only f32 rounding allowed is the rank-r
/// sum's, plus the one rounding to the output dtype.
fn check_low_rank(
    out: &T,
    w: &T,
    s: f64,
    r: usize,
    p: impl Fn(usize, usize) -> f64,
    q: impl Fn(usize, usize) -> f64,
) {
    let (rows, cols) = (w.shape[0] as usize, w.shape[1] as usize);
    let mut moved = 0;
    for i in 0..rows {
        for k in 0..cols {
            let terms: Vec<f64> = (0..r).map(|t| p(i, t) * q(t, k)).collect();
            let exact = w.get(i * cols + k) as f64 + s * terms.iter().sum::<f64>();
            let slack = 1e-6 * (s.abs() * terms.iter().map(|x| x.abs()).sum::<f64>() + exact.abs()) + 1e-12;
            let got = out.get(i * cols + k) as f64;
            let half_ulp = match out.ty {
                Ty::BF16 => exact.abs() * 2f64.powi(-8),
                Ty::F16 => exact.abs() * 2f64.powi(-11) + 2f64.powi(-25),
                _ => exact.abs() * 2f64.powi(-24),
            };
            assert!((got - exact).abs() <= half_ulp + slack, "{}[{i},{k}]: {got} vs {exact}", out.name);
            moved += usize::from(got != w.get(i * cols + k) as f64);
        }
    }
    assert!(moved > rows * cols / 2, "{}: the update left most elements as in the base", out.name);
}

/// A linear module's check: `P = B` (`out x r`), `Q = A` (`r x in`).
fn check_linear(out: &T, w: &T, a: &T, b: &T, s: f64) {
    let r = a.shape[0] as usize;
    let cols = a.shape[1] as usize;
    check_low_rank(out, w, s, r, |i, t| b.get(i * r + t) as f64, |t, k| a.get(t * cols + k) as f64);
}

#[test]
fn lora_merge_matches_an_f64_reference_and_leaves_other_tensors_as_in_the_base() {
    let d = tempfile::tempdir().unwrap();
    let base_dir = base(d.path(), Ty::BF16);
    let modules: Vec<String> = (0..LAYERS)
        .flat_map(|l| {
            ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"].map(|m| format!("model.layers.{l}.{m}"))
        })
        .collect();
    let factors: Vec<T> = modules.iter().flat_map(|m| linear_factors(m, R, Ty::F32)).collect();
    let adapter = d.path().join("adapter");
    write_adapter(&adapter, &lora_config(json!({})), &factors);
    let out = d.path().join("out");
    ok(&merge(&base_dir, &adapter, &out, &[]));
    let (o, b) = (read_model(&out), read_model(&base_dir));
    let f = |n: &str| factors.iter().find(|t| t.name == n).unwrap();
    for (name, w) in &b {
        let module = name.trim_end_matches(".weight");
        if modules.iter().any(|m| m == module) {
            let a = f(&format!("base_model.model.{module}.lora_A.weight"));
            let bb = f(&format!("base_model.model.{module}.lora_B.weight"));
            assert_eq!(o[name].ty, Ty::BF16, "{name} keeps the base's dtype");
            check_linear(&o[name], w, a, bb, 8.0 / R as f64);
        } else {
            assert_eq!(o[name].data, w.data, "{name} is not adapted and must be the base's bytes");
        }
    }
    assert_eq!(names_in_order(&out), names_in_order(&base_dir));
    check_manifest_hashes(&out);
    let m: Value =
        serde_json::from_slice(&std::fs::read(out.join("chatvec-manifest.json")).unwrap()).unwrap();
    let roles: Vec<&str> =
        m["inputs"].as_array().unwrap().iter().map(|i| i["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["base", "adapter"]);
    assert_eq!(m["parameters"]["lora"]["adapter"], s(&adapter));
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    // A local base is no base_model the Hub knows: no relation stated.
    assert!(!card.contains("base_model_relation") && card.contains("- lora"), "{card}");
    ok(&chatvec(&["verify", s(&out)]));
}

#[test]
fn lora_merge_bytes_do_not_depend_on_threads_or_chunks() {
    let d = tempfile::tempdir().unwrap();
    let base_dir = base(d.path(), Ty::BF16);
    let factors: Vec<T> = ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"]
        .iter()
        .flat_map(|m| linear_factors(m, 3, Ty::BF16))
        .collect();
    let adapter = d.path().join("adapter");
    write_adapter(&adapter, &lora_config(json!({"r": 3})), &factors);
    let (one, many) = (d.path().join("one"), d.path().join("many"));
    ok(&merge(&base_dir, &adapter, &one, &["--threads", "1"]));
    ok(&merge(&base_dir, &adapter, &many, &["--threads", "4", "--chunk-elems", "5"]));
    assert_eq!(shard_hashes(&one), shard_hashes(&many));
}

#[test]
fn rslora_rank_and_alpha_patterns_and_the_scale_set_each_modules_factor() {
    let d = tempfile::tempdir().unwrap();
    let base_dir = base(d.path(), Ty::F32);
    let q0 = "model.layers.0.self_attn.q_proj";
    let v1 = "model.layers.1.self_attn.v_proj";
    let k1 = "model.layers.1.self_attn.k_proj";
    let mut factors = linear_factors(q0, 2, Ty::F32);
    factors.extend(linear_factors(v1, R, Ty::F32));
    factors.extend(linear_factors(k1, R, Ty::F32));
    let cfg = lora_config(json!({
        "use_rslora": true, "lora_alpha": 16,
        "rank_pattern": {"q_proj": 2},
        "alpha_pattern": {"layers\\.1\\.self_attn\\.v_proj": 3},
    }));
    let adapter = d.path().join("adapter");
    write_adapter(&adapter, &cfg, &factors);
    let out = d.path().join("out");
    ok(&merge(&base_dir, &adapter, &out, &["--scale", "0.5"]));
    let (o, b) = (read_model(&out), read_model(&base_dir));
    let f = |n: String| factors.iter().find(|t| t.name == n).unwrap().clone();
    for (module, r, alpha) in [(q0, 2.0f64, 16.0f64), (v1, R as f64, 3.0), (k1, R as f64, 16.0)] {
        let name = format!("{module}.weight");
        let (a, bb) = (
            f(format!("base_model.model.{module}.lora_A.weight")),
            f(format!("base_model.model.{module}.lora_B.weight")),
        );
        check_linear(&o[&name], &b[&name], &a, &bb, 0.5 * alpha / r.sqrt());
    }
}

#[test]
fn embedding_and_fan_in_fan_out_updates_are_the_transposed_product() {
    let d = tempfile::tempdir().unwrap();
    let base_dir = base(d.path(), Ty::F32);
    // An embedding [vocab, hidden]: lora_embedding_A is r x vocab, B hidden x r.
    let emb = vec![
        tensor(7, "base_model.model.model.embed_tokens.lora_embedding_A", vec![R, 16], Ty::F32),
        tensor(8, "base_model.model.model.embed_tokens.lora_embedding_B", vec![HIDDEN, R], Ty::F32),
    ];
    let adapter = d.path().join("emb");
    write_adapter(&adapter, &lora_config(json!({})), &emb);
    let out = d.path().join("out-emb");
    ok(&merge(&base_dir, &adapter, &out, &[]));
    let (o, b) = (read_model(&out), read_model(&base_dir));
    let name = "model.embed_tokens.weight";
    let (a, bb) = (&emb[0], &emb[1]);
    let r = R as usize;
    // delta[i, k] = sum_t A[t, i] * B[k, t]
    check_low_rank(
        &o[name],
        &b[name],
        2.0,
        r,
        |i, t| a.get(t * 16 + i) as f64,
        |t, k| bb.get(k * r + t) as f64,
    );

    // PEFT also saves a targeted embedding's own weight as `base_layer`:
    // the update goes onto that copy.
    let mut saved = emb.clone();
    let layer = tensor(9, "base_model.model.model.embed_tokens.base_layer.weight", vec![16, HIDDEN], Ty::F32);
    saved.push(layer.clone());
    write_adapter(&adapter, &lora_config(json!({})), &saved);
    let out = d.path().join("out-layer");
    ok(&merge(&base_dir, &adapter, &out, &[]));
    let o = read_model(&out);
    check_low_rank(
        &o[name],
        &layer,
        2.0,
        r,
        |i, t| a.get(t * 16 + i) as f64,
        |t, k| bb.get(k * r + t) as f64,
    );

    // GPT-2's Conv1D stores its weight [in, out]: PEFT transposes the
    // update whatever fan_in_fan_out says (here false), and so does chatvec.
    let conv_base = d.path().join("gpt2-like");
    let mut ts = llama(3, 16, false, Ty::F32);
    let m = "transformer.h.0.mlp.c_fc";
    let w = tensor(5, &format!("{m}.weight"), vec![HIDDEN, INTER], Ty::F32);
    ts.push(w.clone());
    let mut cfg = config(16, false, LAYERS);
    cfg["model_type"] = json!("gpt2");
    write_model(&conv_base, &ts, 1, &cfg, Some(&tokens(16)));
    // in = 8, out = 12: A is r x 8, B is 12 x r; the update is (B @ A)^T.
    let conv = vec![
        tensor(7, &format!("base_model.model.{m}.lora_A.weight"), vec![R, HIDDEN], Ty::F32),
        tensor(8, &format!("base_model.model.{m}.lora_B.weight"), vec![INTER, R], Ty::F32),
    ];
    let adapter = d.path().join("conv1d");
    write_adapter(&adapter, &lora_config(json!({"fan_in_fan_out": false})), &conv);
    let out = d.path().join("out-conv1d");
    let o = merge(&conv_base, &adapter, &out, &[]);
    ok(&o);
    assert!(
        stderr(&o).contains("fan_in_fan_out is false in the adapter's config, but 'transformer.h.0.mlp.c_fc' is a Conv1D layer"),
        "{}",
        stderr(&o)
    );
    let got = read_model(&out);
    let (a, bb) = (&conv[0], &conv[1]);
    let rows = HIDDEN as usize;
    check_low_rank(
        &got[&format!("{m}.weight")],
        &w,
        2.0,
        r,
        |i, t| a.get(t * rows + i) as f64,
        |t, k| bb.get(k * r + t) as f64,
    );

    // A Linear layer with fan_in_fan_out = true (square, so the shapes
    // cannot tell): PEFT ignores the flag, and so does chatvec.
    let q = "model.layers.0.self_attn.q_proj";
    let adapter = d.path().join("fif-linear");
    let lin = linear_factors(q, R, Ty::F32);
    write_adapter(&adapter, &lora_config(json!({"fan_in_fan_out": true})), &lin);
    let out = d.path().join("out-fif-linear");
    let o = chatvec(&["apply", "--base", s(&base_dir), "--lora", s(&adapter), "-o", s(&out)]);
    ok(&o);
    assert!(
        stderr(&o).contains("fan_in_fan_out is true in the adapter's config, but 'model.layers.0.self_attn.q_proj' is a Linear layer"),
        "{}",
        stderr(&o)
    );
    let (got, b) = (read_model(&out), read_model(&base_dir));
    let name = format!("{q}.weight");
    let (a, bb) = (&lin[0], &lin[1]);
    let cols = HIDDEN as usize;
    // delta[i, k] = sum_t B[i, t] * A[t, k]: not transposed.
    check_low_rank(
        &got[&name],
        &b[&name],
        2.0,
        r,
        |i, t| bb.get(i * r + t) as f64,
        |t, k| a.get(t * cols + k) as f64,
    );
}

#[test]
fn factors_stored_for_the_wrong_kind_of_layer_are_refused_as_peft_drops_them() {
    let d = tempfile::tempdir().unwrap();
    let base_dir = base(d.path(), Ty::F32);
    let adapter = d.path().join("adapter");
    let out = d.path().join("out");
    // lora_embedding_* on a Linear layer, and lora_A/B on an embedding.
    let cases = [
        (
            vec![
                tensor(
                    7,
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_embedding_A",
                    vec![R, HIDDEN],
                    Ty::F32,
                ),
                tensor(
                    8,
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_embedding_B",
                    vec![HIDDEN, R],
                    Ty::F32,
                ),
            ],
            "'model.layers.0.self_attn.q_proj' is a Linear layer in the base, but the adapter stores lora_embedding_A/B for it",
        ),
        (
            vec![
                tensor(7, "base_model.model.model.embed_tokens.lora_A.weight", vec![R, HIDDEN], Ty::F32),
                tensor(8, "base_model.model.model.embed_tokens.lora_B.weight", vec![16, R], Ty::F32),
            ],
            "'model.embed_tokens' is an embedding in the base, but the adapter stores lora_A/lora_B for it",
        ),
    ];
    for (tensors, needle) in cases {
        write_adapter(&adapter, &lora_config(json!({})), &tensors);
        let o = merge(&base_dir, &adapter, &out, &[]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains(needle) && stderr(&o).contains("PEFT drops"), "{}", stderr(&o));
        assert!(!out.exists());
    }
}

#[test]
fn nan_in_an_adapter_never_reaches_the_output() {
    let d = tempfile::tempdir().unwrap();
    let base_dir = base(d.path(), Ty::BF16);
    let adapter = d.path().join("adapter");
    let out = d.path().join("out");
    // In a factor of a low-rank update, and in a whole saved module.
    let mut factors = linear_factors("model.layers.0.self_attn.q_proj", R, Ty::F32);
    factors[1].data[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    let mut head = tensor(9, "base_model.model.lm_head.weight", vec![16, HIDDEN], Ty::F32);
    head.data[0..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    for (tensors, needle) in [
        (
            factors,
            "come from the adapter's tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight'",
        ),
        (vec![head], "come from the adapter's tensor 'base_model.model.lm_head.weight'"),
    ] {
        write_adapter(&adapter, &lora_config(json!({"modules_to_save": ["lm_head"]})), &tensors);
        let o = merge(&base_dir, &adapter, &out, &[]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{}", stderr(&o));
        assert!(!out.exists());
    }
}

#[test]
fn whole_tensors_in_the_adapter_replace_the_base_and_a_scale_moves_part_way() {
    let d = tempfile::tempdir().unwrap();
    let base_dir = base(d.path(), Ty::BF16);
    let mut ts = linear_factors("model.layers.0.self_attn.q_proj", R, Ty::F32);
    // modules_to_save = ["lm_head"] saves the trained head whole.
    let head = tensor(9, "base_model.model.lm_head.weight", vec![16, HIDDEN], Ty::F32);
    ts.push(head.clone());
    let adapter = d.path().join("adapter");
    write_adapter(&adapter, &lora_config(json!({"modules_to_save": ["lm_head"]})), &ts);
    let out = d.path().join("out");
    ok(&merge(&base_dir, &adapter, &out, &[]));
    let (o, b) = (read_model(&out), read_model(&base_dir));
    let got = &o["lm_head.weight"];
    assert_eq!(got.ty, Ty::BF16);
    for i in 0..head.numel() {
        assert_eq!(got.data[i * 2..i * 2 + 2], Ty::BF16.encode(head.get(i))[..], "lm_head[{i}]");
    }
    let half = d.path().join("half");
    ok(&merge(&base_dir, &adapter, &half, &["--scale", "0.5"]));
    let h = read_model(&half);
    for i in 0..head.numel() {
        let (w, n) = (b["lm_head.weight"].get(i) as f64, head.get(i) as f64);
        let exact = w + 0.5 * (n - w);
        let got = h["lm_head.weight"].get(i) as f64;
        assert!((got - exact).abs() <= exact.abs() * 2f64.powi(-8) + 1e-6, "lm_head[{i}]: {got} vs {exact}");
    }
}

#[test]
fn lora_apply_takes_the_adapters_chat_template_when_it_carries_a_tokenizer() {
    let d = tempfile::tempdir().unwrap();
    let base_dir = base(d.path(), Ty::BF16);
    let adapter = q_proj_adapter(d.path());
    std::fs::write(
        adapter.join("tokenizer_config.json"),
        serde_json::to_vec(&json!({"chat_template": "{{ messages[0]['content'] }}"})).unwrap(),
    )
    .unwrap();
    let out = d.path().join("out");
    ok(&merge(&base_dir, &adapter, &out, &[]));
    let tc: Value = std::fs::read(out.join("tokenizer_config.json"))
        .map_or(Value::Null, |b| serde_json::from_slice(&b).unwrap());
    let jinja = std::fs::read_to_string(out.join("chat_template.jinja")).unwrap_or_default();
    assert!(
        tc["chat_template"] == "{{ messages[0]['content'] }}" || jinja == "{{ messages[0]['content'] }}",
        "{tc} / {jinja}"
    );
}

/// Runs a merge that must fail: exit 1, the message names `needles`, and
/// no output directory appears.
fn refused(base: &Path, adapter: &Path, root: &Path, extra: &[&str], needles: &[&str]) {
    let out = root.join("refused-out");
    let o = merge(base, adapter, &out, extra);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    for n in needles {
        assert!(e.contains(n), "expected '{n}' in: {e}");
    }
    assert!(!out.exists(), "a refused merge wrote {}", out.display());
}

#[test]
fn dora_and_other_non_plain_lora_adapters_are_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let base_dir = base(d.path(), Ty::BF16);
    let adapter = d.path().join("adapter");
    let q = linear_factors("model.layers.0.self_attn.q_proj", R, Ty::F32);
    for (cfg, needle) in [
        (json!({"use_dora": true}), "use_dora"),
        (json!({"peft_type": "IA3"}), "IA3"),
        (json!({"lora_bias": true}), "lora_bias"),
        (json!({"target_parameters": ["mlp.experts.gate_up_proj"]}), "target_parameters"),
        (json!({"r": 0}), "r must be a positive integer"),
        (json!({"rank_pattern": {"q_proj[": 2}}), "rank_pattern"),
        // PEFT itself refuses to merge these.
        (json!({"alora_invocation_tokens": [128002, 9]}), "aLoRA does not support merging"),
        (json!({"arrow_config": {"top_k": 3}}), "arrow_config is set: an Arrow router"),
        // Variants whose merge is not W + s * B @ A, by name.
        (json!({"use_bdlora": {"target_modules_bd_a": ["q_proj"], "nblocks": 2}}), "BD-LoRA"),
        (json!({"kasa_config": {"beta": 0.1, "gamma": 0.01}}), "KaSA"),
        (json!({"use_qalora": true}), "QALoRA"),
        (json!({"layer_replication": [[0, 2], [1, 2]]}), "layer_replication"),
        (json!({"init_lora_weights": "pissa_niter_4"}), "init_lora_weights is \"pissa_niter_4\""),
        (json!({"init_lora_weights": "olora"}), "init_lora_weights is \"olora\""),
    ] {
        write_adapter(&adapter, &lora_config(cfg), &q);
        refused(&base_dir, &adapter, d.path(), &[], &["adapter_config.json", needle]);
    }
    let mut dora = q.clone();
    dora.push(tensor(
        1,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
        vec![HIDDEN],
        Ty::F32,
    ));
    write_adapter(&adapter, &lora_config(json!({})), &dora);
    refused(&base_dir, &adapter, d.path(), &[], &["lora_magnitude_vector", "DoRA"]);
}

#[test]
fn variants_peft_merges_as_plain_lora_are_merged_as_plain_lora() {
    let d = tempfile::tempdir().unwrap();
    let base_dir = base(d.path(), Ty::F32);
    let adapter = d.path().join("adapter");
    let q = "model.layers.0.self_attn.q_proj";
    let factors = linear_factors(q, R, Ty::F32);
    for (cfg, note) in [
        (json!({"velora_config": {"num_groups": 2}}), "VeLoRA"),
        (json!({"monteclora_config": {"num_samples": 4}}), "MonteCLoRA"),
        (json!({"init_lora_weights": "mica"}), ""),
        (json!({"alora_invocation_tokens": []}), ""),
    ] {
        write_adapter(&adapter, &lora_config(cfg.clone()), &factors);
        let out = d.path().join("out");
        let _ = std::fs::remove_dir_all(&out);
        let o = chatvec(&["apply", "--base", s(&base_dir), "--lora", s(&adapter), "-o", s(&out)]);
        ok(&o);
        assert!(stderr(&o).contains(note), "{cfg}: {}", stderr(&o));
        let (got, b) = (read_model(&out), read_model(&base_dir));
        let name = format!("{q}.weight");
        check_linear(&got[&name], &b[&name], &factors[0], &factors[1], 8.0 / R as f64);
    }
}

#[test]
fn rank_and_alpha_patterns_match_each_in_its_own_order_as_peft_does() {
    let d = tempfile::tempdir().unwrap();
    let base_dir = base(d.path(), Ty::F32);
    let q0 = "model.layers.0.self_attn.q_proj";
    let v1 = "model.layers.1.self_attn.v_proj";
    let k1 = "model.layers.1.self_attn.k_proj";
    let mut factors = linear_factors(q0, R, Ty::F32);
    factors.extend(linear_factors(v1, R, Ty::F32));
    factors.extend(linear_factors(k1, R, Ty::F32));
    // Both maps list two keys that match layer 0's q_proj, in opposite
    // orders: PEFT takes each map's first match, so alpha is 3 (0.75), not
    // 20 (5.0). A key's `.` matches any character (v.proj is v_proj), and
    // a key may be a regular expression.
    let cfg = lora_config(json!({
        "rank_pattern": {"q_proj": R, "layers.0.self_attn.q_proj": R},
        "alpha_pattern": {
            "layers.0.self_attn.q_proj": 3, "q_proj": 20,
            "layers.1.self_attn.v.proj": 6,
            "layers\\.[0-9]+\\.self_attn\\.k_proj": 10
        },
    }));
    let adapter = d.path().join("adapter");
    write_adapter(&adapter, &cfg, &factors);
    let out = d.path().join("out");
    ok(&merge(&base_dir, &adapter, &out, &[]));
    let (o, b) = (read_model(&out), read_model(&base_dir));
    let f = |n: String| factors.iter().find(|t| t.name == n).unwrap().clone();
    for (module, alpha) in [(q0, 3.0f64), (v1, 6.0), (k1, 10.0)] {
        let name = format!("{module}.weight");
        let (a, bb) = (
            f(format!("base_model.model.{module}.lora_A.weight")),
            f(format!("base_model.model.{module}.lora_B.weight")),
        );
        check_linear(&o[&name], &b[&name], &a, &bb, alpha / R as f64);
    }
}

#[test]
fn pattern_maps_cost_bounded_work_and_oversized_ones_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let base_dir = base(d.path(), Ty::F32);
    let q = "model.layers.0.self_attn.q_proj";
    let factors = linear_factors(q, R, Ty::F32);
    let adapter = d.path().join("adapter");
    let timed = |cfg: Value| {
        write_adapter(&adapter, &lora_config(cfg), &factors);
        let out = d.path().join("out");
        let _ = std::fs::remove_dir_all(&out);
        let start = std::time::Instant::now();
        let o = merge(&base_dir, &adapter, &out, &[]);
        (o, start.elapsed())
    };
    // 20,000 plain keys that match nothing, then the one that does.
    let mut many = serde_json::Map::new();
    for i in 0..20_000 {
        many.insert(format!("model.layers.{i}.self_attn.x_proj"), json!(1.0));
    }
    many.insert("q_proj".into(), json!(4.0));
    let (o, took) = timed(json!({ "alpha_pattern": many }));
    ok(&o);
    assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
    let (got, b) = (read_model(&d.path().join("out")), read_model(&base_dir));
    let name = format!("{q}.weight");
    check_linear(&got[&name], &b[&name], &factors[0], &factors[1], 1.0);
    // A regular expression whose automaton would take gigabytes, too many
    // regular expressions, too many keys: refused, quickly.
    let mut regexes = serde_json::Map::new();
    for i in 0..1100 {
        regexes.insert(format!("layers\\.{i}\\..*"), json!(2));
    }
    let mut huge = serde_json::Map::new();
    for i in 0..70_000 {
        huge.insert(format!("k{i}"), json!(2));
    }
    for (cfg, needle) in [
        (
            json!({"alpha_pattern": {"(?:(?:a{1,100}){1,100}){1,100}": 2.0}}),
            "cannot take as a regular expression",
        ),
        (json!({"alpha_pattern": regexes}), "keys that are regular expressions; chatvec takes at most 1024"),
        (json!({"rank_pattern": huge}), "chatvec takes at most 65536"),
    ] {
        let (o, took) = timed(cfg);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{}", stderr(&o));
        assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
    }
}

#[test]
fn malformed_adapters_name_the_module_or_tensor_and_what_was_expected() {
    let d = tempfile::tempdir().unwrap();
    let base_dir = base(d.path(), Ty::BF16);
    let adapter = d.path().join("adapter");
    let q = "model.layers.0.self_attn.q_proj";
    // lora_B missing.
    write_adapter(&adapter, &lora_config(json!({})), &linear_factors(q, R, Ty::F32)[..1]);
    refused(&base_dir, &adapter, d.path(), &[], &[q, "no lora_B"]);
    // Rank other than the config's.
    write_adapter(&adapter, &lora_config(json!({})), &linear_factors(q, 2, Ty::F32));
    refused(&base_dir, &adapter, d.path(), &[], &[q, "rank 2", "r = 4"]);
    // Factors for another architecture (k_proj is 4 x 8; these make 8 x 8).
    let mut other = linear_factors(q, R, Ty::F32);
    for t in &mut other {
        t.name = t.name.replace("q_proj", "k_proj");
    }
    write_adapter(&adapter, &lora_config(json!({})), &other);
    refused(
        &base_dir,
        &adapter,
        d.path(),
        &[],
        &["model.layers.0.self_attn.k_proj.weight", "[4, 8]", "[8, 8]"],
    );
    // A module the base does not have.
    let mut extra = linear_factors(q, R, Ty::F32);
    for t in &mut extra {
        t.name = t.name.replace("layers.0", "layers.9");
    }
    write_adapter(&adapter, &lora_config(json!({})), &extra);
    refused(
        &base_dir,
        &adapter,
        d.path(),
        &[],
        &["model.layers.9.self_attn.q_proj.weight", "not in the base"],
    );
    // Keys without PEFT's prefix.
    let mut bare = linear_factors(q, R, Ty::F32);
    for t in &mut bare {
        t.name = t.name.replace("base_model.model.", "");
    }
    write_adapter(&adapter, &lora_config(json!({})), &bare);
    refused(&base_dir, &adapter, d.path(), &[], &["adapter_model.safetensors", "base_model.model."]);
    // A whole tensor of the wrong shape (a resized vocabulary).
    let head = tensor(9, "base_model.model.lm_head.weight", vec![20, HIDDEN], Ty::F32);
    write_adapter(&adapter, &lora_config(json!({})), &[head]);
    refused(&base_dir, &adapter, d.path(), &[], &["lm_head.weight", "[20, 8]", "[16, 8]"]);
    // Integer adapter tensors.
    let int = T {
        name: format!("base_model.model.{q}.lora_A.weight"),
        ty: Ty::I64,
        shape: vec![R, HIDDEN],
        data: vec![0; 8 * 32],
    };
    write_adapter(&adapter, &lora_config(json!({})), &[int]);
    refused(&base_dir, &adapter, d.path(), &[], &["lora_A", "BF16, F16 or F32"]);
    // A truncated weight file.
    write_adapter(&adapter, &lora_config(json!({})), &linear_factors(q, R, Ty::F32));
    let w = adapter.join("adapter_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() - 10]).unwrap();
    refused(&base_dir, &adapter, d.path(), &[], &["adapter_model.safetensors"]);
    // Not an adapter at all.
    refused(&base_dir, &base_dir, d.path(), &[], &["adapter_config.json", "not a PEFT adapter"]);
    // A bad config file.
    write_adapter(&adapter, &lora_config(json!({})), &linear_factors(q, R, Ty::F32));
    std::fs::write(adapter.join("adapter_config.json"), b"{\"peft_type\": ").unwrap();
    refused(&base_dir, &adapter, d.path(), &[], &["adapter_config.json", "invalid adapter config"]);
}

#[test]
fn lora_changes_to_the_head_of_a_tied_base_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let base_dir = d.path().join("tied");
    write_model(&base_dir, &llama(3, 16, true, Ty::BF16), 1, &config(16, true, LAYERS), None);
    let head = vec![
        tensor(7, "base_model.model.lm_head.lora_A.weight", vec![R, HIDDEN], Ty::F32),
        tensor(8, "base_model.model.lm_head.lora_B.weight", vec![16, R], Ty::F32),
    ];
    let adapter = d.path().join("adapter");
    write_adapter(&adapter, &lora_config(json!({})), &head);
    refused(&base_dir, &adapter, d.path(), &[], &["lm_head.weight", "ties"]);
}

#[test]
fn lora_with_a_chat_vector_flag_or_cuda_is_a_usage_error() {
    let d = tempfile::tempdir().unwrap();
    let base_dir = base(d.path(), Ty::BF16);
    let adapter = q_proj_adapter(d.path());
    let out = d.path().join("out");
    let o = chatvec(&[
        "apply",
        "--base",
        s(&base_dir),
        "--lora",
        s(&adapter),
        "--vector",
        s(&base_dir),
        "-o",
        s(&out),
    ]);
    assert_ne!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot be used with"), "{}", stderr(&o));
    refused(&base_dir, &adapter, d.path(), &["--device", "cuda"], &["LoRA", "CPU"]);
    // A dry run lists the low-rank formula.
    let o = merge(&base_dir, &adapter, &out, &["--dry-run"]);
    ok(&o);
    assert!(stdout(&o).contains("rank 4"), "{}", stdout(&o));
    assert!(!out.exists());
}
