//! Quantized checkpoints as inputs: FP8 block-scaled weights (`F8_E4M3` /
//! `F8_E5M2` with `weight_scale_inv` or `weight_scale` blocks) and gpt-oss
//! MXFP4 experts (`*_blocks` + `*_scales`) are decoded in the streaming
//! engine, so a chat vector lands on a quantized base exactly as on the
//! float model it stands for. References are computed here: the FP8 and FP4
//! code points decoded from their bit fields in f64, then the documented f32
//! order of apply. The ignored test compares with transformers' own
//! dequantizers on every code point.

mod common;

use std::path::Path;

use common::*;
use serde_json::{Value, json};

const E4M3: Ty = Ty::Raw("F8_E4M3", 1);
const E5M2: Ty = Ty::Raw("F8_E5M2", 1);
const U8: Ty = Ty::Raw("U8", 1);

/// An OCP FP8 E4M3 (`fn`: no infinities, S.1111.111 is NaN) code's value.
fn e4m3(b: u8) -> f64 {
    let (e, m) = ((b >> 3) & 15, b & 7);
    let v = if e == 0 {
        f64::from(m) / 8.0 * 2f64.powi(-6)
    } else {
        (1.0 + f64::from(m) / 8.0) * 2f64.powi(i32::from(e) - 7)
    };
    if b & 0x80 != 0 { -v } else { v }
}

/// An FP8 E5M2 code's value (IEEE-like: exponent 31 is inf/NaN, avoided here).
fn e5m2(b: u8) -> f64 {
    let (e, m) = ((b >> 2) & 31, b & 3);
    let v = if e == 0 {
        f64::from(m) / 4.0 * 2f64.powi(-14)
    } else {
        (1.0 + f64::from(m) / 4.0) * 2f64.powi(i32::from(e) - 15)
    };
    if b & 0x80 != 0 { -v } else { v }
}

/// An FP4 E2M1 nibble's value.
fn fp4(n: u8) -> f64 {
    let (e, m) = ((n >> 1) & 3, n & 1);
    let v =
        if e == 0 { f64::from(m) * 0.5 } else { (1.0 + f64::from(m) * 0.5) * 2f64.powi(i32::from(e) - 1) };
    if n & 8 != 0 { -v } else { v }
}

/// Finite FP8 codes of varied magnitude, every finite code among the first
/// of each tensor.
fn codes(n: usize, salt: usize, e5: bool) -> Vec<u8> {
    (0..n)
        .map(|i| {
            let c = if i < 256 { ((i + salt) % 256) as u8 } else { ((i * 97 + salt * 13) % 256) as u8 };
            let nan = if e5 { (c >> 2) & 31 == 31 } else { c & 0x7f == 0x7f };
            if nan { c & 0x83 } else { c }
        })
        .collect()
}

/// How an FP8 fixture stores its scales.
struct Fp8 {
    ty: Ty,
    block: [u64; 2],
    /// `weight_block_size` in the config (a ceil grid needs it).
    config_block: Option<[u64; 2]>,
    scale_ty: Ty,
    suffix: &'static str,
}

/// The Llama of `seed` with every projection quantized as `q` says; the
/// projections' f32 values (code * scale, exact) are returned beside.
fn fp8_llama(dir: &Path, seed: u32, q: &Fp8) -> std::collections::BTreeMap<String, Vec<f32>> {
    let mut tensors = Vec::new();
    let mut values = std::collections::BTreeMap::new();
    for (k, t) in llama(seed, 16, false, Ty::BF16).into_iter().enumerate() {
        if !t.name.ends_with("proj.weight") {
            tensors.push(t);
            continue;
        }
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let e5 = q.ty == E5M2;
        let c = codes(t.numel(), k, e5);
        let (sr, sc) = (rows.div_ceil(q.block[0]), cols.div_ceil(q.block[1]));
        // Scales of varied magnitude, not only powers of two, exact in bf16
        // (powers of two as E8M0 bytes).
        let e8m0 = q.scale_ty == Ty::Raw("F8_E8M0", 1);
        let mantissa = |i: u64| if e8m0 { 1.0 } else { 1.0 + (i % 7) as f32 / 8.0 };
        let sv: Vec<f32> = (0..sr * sc).map(|i| mantissa(i) * 2f32.powi((i % 5) as i32 - 8)).collect();
        let v: Vec<f32> = (0..t.numel())
            .map(|i| {
                let (r, cc) = (i as u64 / cols, i as u64 % cols);
                let s = f64::from(sv[((r / q.block[0]) * sc + cc / q.block[1]) as usize]);
                let code = if e5 { e5m2(c[i]) } else { e4m3(c[i]) };
                (code * s) as f32
            })
            .collect();
        values.insert(t.name.clone(), v);
        let scale_data = if e8m0 {
            sv.iter().map(|x| (x.to_bits() >> 23) as u8).collect()
        } else {
            sv.iter().flat_map(|&x| q.scale_ty.encode(x)).collect()
        };
        tensors.push(T { name: t.name.clone(), ty: q.ty, shape: t.shape.clone(), data: c });
        tensors.push(T {
            name: format!("{}{}", t.name, q.suffix),
            ty: q.scale_ty,
            shape: vec![sr, sc],
            data: scale_data,
        });
    }
    let mut cfg = config(16, false, LAYERS);
    let mut qc = json!({"quant_method": "fp8", "fmt": if q.ty == E5M2 { "e5m2" } else { "e4m3" }, "activation_scheme": "dynamic"});
    if let Some(b) = q.config_block {
        qc["weight_block_size"] = json!(b);
    }
    cfg["quantization_config"] = qc;
    write_model(dir, &tensors, 1, &cfg, Some(&tokens(16)));
    values
}

/// The documented f32 order of apply, rounded once to bf16.
fn applied(b: f32, c: f32, p: f32, s: f32) -> f32 {
    let d = c - p;
    half::bf16::from_f32(b + s * d).to_f32()
}

/// The chat pair `root/pre`, `root/chat` with `base` as the base.
fn pair_on(root: &Path, base: &Path) -> Trio {
    Trio { pre: root.join("pre"), chat: root.join("chat"), base: base.to_path_buf() }
}

/// Applies a bf16 chat pair to the quantized base at `base` and checks
/// every tensor against `applied` over the base's decoded values.
fn check_apply_on(
    root: &Path,
    base: &Path,
    decoded: &std::collections::BTreeMap<String, Vec<f32>>,
    extra: &[&str],
) {
    let t = pair_on(root, base);
    let out = root.join("out");
    let o = apply_streaming(&t, &out, extra);
    ok(&o);
    assert!(stderr(&o).contains("without quantization_config"), "{}", stderr(&o));
    let got = read_model(&out);
    let (c, p) = (read_model(&t.chat), read_model(&t.pre));
    let bf = read_model_loose(base);
    for (name, ct) in &c {
        let g = &got[name];
        assert_eq!(g.ty, Ty::BF16, "{name}");
        assert_eq!(g.shape, ct.shape, "{name}");
        for i in 0..ct.numel() {
            let b = decoded.get(name).map_or_else(|| bf[name].get(i), |v| v[i]);
            assert_eq!(
                g.get(i).to_bits(),
                applied(b, ct.get(i), p[name].get(i), 1.0).to_bits(),
                "{name}[{i}]"
            );
        }
    }
    assert_eq!(got.len(), c.len(), "no scale tensor reaches the output");
    let cfg: Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert!(cfg.get("quantization_config").is_none(), "{cfg}");
    assert_eq!(cfg["vocab_size"], 16);
}

/// The bf16 tensors of a partly quantized model (raw types skipped).
fn read_model_loose(dir: &Path) -> std::collections::BTreeMap<String, T> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(_, v)| v.dtype() == safetensors::Dtype::BF16)
        .map(|(name, v)| {
            let t = T {
                name: name.clone(),
                ty: Ty::BF16,
                shape: v.shape().iter().map(|&d| d as u64).collect(),
                data: v.data().to_vec(),
            };
            (name, t)
        })
        .collect()
}

fn chat_pair(root: &Path) {
    for (dir, seed) in [("pre", 1), ("chat", 2)] {
        write_model(
            &root.join(dir),
            &llama(seed, 16, false, Ty::BF16),
            1,
            &config(16, false, LAYERS),
            Some(&tokens(16)),
        );
    }
}

#[test]
fn fp8_e4m3_base_takes_a_bf16_chat_vector_bit_for_bit() {
    let d = tempfile::tempdir().unwrap();
    chat_pair(d.path());
    let base = d.path().join("base");
    let q =
        Fp8 { ty: E4M3, block: [4, 4], config_block: Some([4, 4]), scale_ty: Ty::F32, suffix: "_scale_inv" };
    let decoded = fp8_llama(&base, 3, &q);
    check_apply_on(d.path(), &base, &decoded, &[]);
}

/// E5M2 codes, bf16 scales named `weight_scale` (compressed-tensors), and a
/// block that does not divide the matrices: the grid is the ceiling and the
/// block comes from the config's `weight_block_size`, as DeepSeek-V3 stores
/// sizes that are not multiples of 128.
#[test]
fn fp8_e5m2_ceil_grid_uses_the_config_block_size() {
    let d = tempfile::tempdir().unwrap();
    chat_pair(d.path());
    let base = d.path().join("base");
    let q = Fp8 { ty: E5M2, block: [3, 5], config_block: Some([3, 5]), scale_ty: Ty::BF16, suffix: "_scale" };
    let decoded = fp8_llama(&base, 3, &q);
    check_apply_on(d.path(), &base, &decoded, &[]);
}

/// The chunking of the streaming engine never splits a decode wrongly:
/// the smallest chunk size gives the same bytes.
#[test]
fn fp8_decode_is_the_same_at_any_chunk_size() {
    let d = tempfile::tempdir().unwrap();
    chat_pair(d.path());
    let base = d.path().join("base");
    let q =
        Fp8 { ty: E4M3, block: [3, 5], config_block: Some([3, 5]), scale_ty: Ty::F32, suffix: "_scale_inv" };
    let decoded = fp8_llama(&base, 3, &q);
    check_apply_on(d.path(), &base, &decoded, &["--threads", "2", "--chunk-elems", "7"]);
}

#[test]
fn fp8_scales_of_the_wrong_grid_are_refused_naming_the_tensor() {
    let d = tempfile::tempdir().unwrap();
    chat_pair(d.path());
    let base = d.path().join("base");
    // A 3x5 grid stored, the config saying 4x4: neither divides nor fits.
    let q =
        Fp8 { ty: E4M3, block: [3, 5], config_block: Some([4, 4]), scale_ty: Ty::F32, suffix: "_scale_inv" };
    fp8_llama(&base, 3, &q);
    let out = d.path().join("out");
    let o = chatvec(&[
        "apply",
        "--base",
        s(&base),
        "--chat",
        s(&d.path().join("chat")),
        "--pretrained",
        s(&d.path().join("pre")),
        "-o",
        s(&out),
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("model.safetensors") && e.contains("proj.weight") && e.contains("weight_block_size"),
        "{e}"
    );
    assert!(!out.exists(), "nothing written");
}

#[test]
fn fp8_scales_of_an_integer_type_are_refused() {
    let d = tempfile::tempdir().unwrap();
    chat_pair(d.path());
    let base = d.path().join("base");
    let q = Fp8 { ty: E4M3, block: [4, 4], config_block: None, scale_ty: Ty::F32, suffix: "_scale_inv" };
    fp8_llama(&base, 3, &q);
    // Rewrite one scale tensor's dtype in the header to I32 (same width).
    let f = base.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["model.layers.0.self_attn.q_proj.weight_scale_inv"]["dtype"] = json!("I32");
    let mut h = serde_json::to_vec(&header).unwrap();
    h.resize(n, b' ');
    let mut edited = bytes[..8].to_vec();
    edited.extend(h);
    edited.extend(&bytes[8 + n..]);
    std::fs::write(&f, edited).unwrap();
    let o = chatvec(&["inspect", s(&base)]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("q_proj.weight")
            && e.contains("q_proj.weight_scale_inv")
            && e.contains("F32, BF16, F16 or E8M0"),
        "{e}"
    );
}

#[test]
fn quantized_inputs_refuse_the_cuda_device_and_auto_decodes_on_the_cpu() {
    let d = tempfile::tempdir().unwrap();
    chat_pair(d.path());
    let base = d.path().join("base");
    let q = Fp8 { ty: E4M3, block: [4, 4], config_block: None, scale_ty: Ty::F32, suffix: "_scale_inv" };
    fp8_llama(&base, 3, &q);
    let run = |device: &str, out: &Path| {
        chatvec(&[
            "apply",
            "--base",
            s(&base),
            "--chat",
            s(&d.path().join("chat")),
            "--pretrained",
            s(&d.path().join("pre")),
            "--device",
            device,
            "-o",
            s(out),
        ])
    };
    let o = run("cuda", &d.path().join("cuda"));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("FP8 and MXFP4 inputs are decoded on the CPU"), "{}", stderr(&o));
    assert!(!d.path().join("cuda").exists());
    let o = run("auto", &d.path().join("auto"));
    ok(&o);
    assert!(stderr(&o).contains("decoded on the CPU"), "{}", stderr(&o));
}

#[test]
fn inspect_names_the_quantization_scheme() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base");
    let q =
        Fp8 { ty: E4M3, block: [4, 4], config_block: Some([4, 4]), scale_ty: Ty::F32, suffix: "_scale_inv" };
    fp8_llama(&base, 3, &q);
    let o = chatvec(&["inspect", s(&base)]);
    ok(&o);
    let out = stdout(&o);
    assert!(out.contains("fp8 F8_E4M3, blocks of 4x4: 14 tensor(s) (quant_method fp8)"), "{out}");
    let o = chatvec(&["inspect", "--json", s(&base)]);
    ok(&o);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(v["quantization"].as_str().unwrap().contains("blocks of 4x4"), "{v}");
}

// ---- MXFP4 (gpt-oss) ----

const H: u64 = 64;
const I: u64 = 32;
const EXPERTS: u64 = 2;

fn bf16_tensor(seed: u32, name: &str, shape: Vec<u64>) -> T {
    let n: u64 = shape.iter().product();
    T {
        name: name.to_string(),
        ty: Ty::BF16,
        data: (0..n as usize).flat_map(|i| Ty::BF16.encode(val(seed, name, i))).collect(),
        shape,
    }
}

fn gpt_oss_config(quantized: bool) -> Value {
    let mut c = json!({
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": H,
        "intermediate_size": I, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 32, "num_local_experts": EXPERTS, "num_experts_per_tok": 1, "vocab_size": 16,
        "tie_word_embeddings": false, "torch_dtype": "bfloat16"
    });
    if quantized {
        c["quantization_config"] = json!({"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]});
    }
    c
}

/// A tiny gpt-oss: experts `gate_up_proj [E, H, 2I]` and `down_proj [E, I,
/// H]` as bf16, or as MXFP4 blocks `[E, out, in / 32, 16]` with E8M0
/// scales; the decoded values of the latter are returned (f64 decode of
/// each nibble times 2^(scale - 127), exact in f32).
fn gpt_oss(dir: &Path, seed: u32, quantized: bool) -> std::collections::BTreeMap<String, Vec<f32>> {
    let p = "model.layers.0";
    let mut v = vec![
        bf16_tensor(seed, "model.embed_tokens.weight", vec![16, H]),
        bf16_tensor(seed, &format!("{p}.input_layernorm.weight"), vec![H]),
        bf16_tensor(seed, &format!("{p}.mlp.router.weight"), vec![EXPERTS, H]),
        bf16_tensor(seed, &format!("{p}.mlp.experts.gate_up_proj_bias"), vec![EXPERTS, 2 * I]),
        bf16_tensor(seed, &format!("{p}.mlp.experts.down_proj_bias"), vec![EXPERTS, H]),
    ];
    let mut decoded = std::collections::BTreeMap::new();
    for (k, (name, inp, out)) in [("gate_up_proj", H, 2 * I), ("down_proj", I, H)].into_iter().enumerate() {
        let name = format!("{p}.mlp.experts.{name}");
        if !quantized {
            v.push(bf16_tensor(seed, &name, vec![EXPERTS, inp, out]));
            continue;
        }
        let groups = inp / 32;
        let blocks: Vec<u8> =
            (0..EXPERTS * out * groups * 16).map(|i| ((i * 61 + k as u64 * 7 + 5) % 256) as u8).collect();
        // Exponents from 2^-127 (subnormal results) to 2^+40.
        let scales: Vec<u8> = (0..EXPERTS * out * groups)
            .map(|i| [0u8, 1, 100, 120, 127, 128, 135, 167][(i as usize + k) % 8])
            .collect();
        let mut values = vec![0f32; (EXPERTS * inp * out) as usize];
        for e in 0..EXPERTS {
            for r in 0..out {
                for c in 0..inp {
                    let g = (e * out + r) * groups + c / 32;
                    let byte = blocks[(g * 16 + (c % 32) / 2) as usize];
                    let nib = if c % 2 == 0 { byte & 15 } else { byte >> 4 };
                    let x = fp4(nib) * 2f64.powi(i32::from(scales[g as usize]) - 127);
                    values[((e * inp + c) * out + r) as usize] = x as f32;
                }
            }
        }
        decoded.insert(name.clone(), values);
        v.push(T {
            name: format!("{name}_blocks"),
            ty: U8,
            shape: vec![EXPERTS, out, groups, 16],
            data: blocks,
        });
        v.push(T { name: format!("{name}_scales"), ty: U8, shape: vec![EXPERTS, out, groups], data: scales });
    }
    v.push(bf16_tensor(seed, "lm_head.weight", vec![16, H]));
    write_model(dir, &v, 1, &gpt_oss_config(quantized), Some(&tokens(16)));
    decoded
}

/// GPT-OSS Swallow's case: the base is MXFP4 as published, the chat pair
/// bf16; the experts are decoded and the vector added in f32.
#[test]
fn mxfp4_base_takes_a_bf16_chat_vector_bit_for_bit() {
    let d = tempfile::tempdir().unwrap();
    gpt_oss(&d.path().join("pre"), 1, false);
    gpt_oss(&d.path().join("chat"), 2, false);
    let base = d.path().join("base");
    let decoded = gpt_oss(&base, 3, true);
    check_apply_on(d.path(), &base, &decoded, &["--chunk-elems", "100"]);
}

/// Every nibble and the extreme exponents, decoded to f32 with no rounding
/// (a float32 passthrough), against the f64 decode.
#[test]
fn mxfp4_decodes_every_code_exactly_to_f32() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    let decoded = gpt_oss(&m, 3, true);
    let recipe = d.path().join("r.yml");
    std::fs::write(
        &recipe,
        format!("merge_method: passthrough\nmodels:\n  - model: {}\ndtype: float32\n", m.display()),
    )
    .unwrap();
    let out = d.path().join("out");
    ok(&chatvec(&["merge", s(&recipe), s(&out), "-q"]));
    let got = read_model(&out);
    for (name, want) in &decoded {
        let g = &got[name];
        assert_eq!(
            g.shape,
            [
                EXPERTS,
                if name.ends_with("gate_up_proj") { H } else { I },
                if name.ends_with("gate_up_proj") { 2 * I } else { H }
            ]
        );
        for (i, w) in want.iter().enumerate() {
            assert_eq!(g.get(i).to_bits(), w.to_bits(), "{name}[{i}]");
        }
    }
    assert!(!got.keys().any(|k| k.ends_with("_blocks") || k.ends_with("_scales")));
}

#[test]
fn inspect_names_mxfp4_experts_and_counts_their_scales() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    gpt_oss(&m, 3, true);
    let o = chatvec(&["inspect", "--json", s(&m)]);
    ok(&o);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let experts = 2 * EXPERTS * H * I + EXPERTS * I * H;
    assert!(v["dtypes"].as_array().unwrap().contains(&json!(["MXFP4", experts])), "{v}");
    assert!(v["quantization"].as_str().unwrap().starts_with("mxfp4"), "{v}");
    // Every byte of the file but its header: blocks, scales, bf16 tensors.
    let file = std::fs::metadata(m.join("model.safetensors")).unwrap().len();
    let bytes = std::fs::read(m.join("model.safetensors")).unwrap();
    let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert_eq!(v["tensor_bytes"], file - header, "{v}");
}

#[test]
fn mxfp4_scales_that_do_not_match_the_blocks_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    gpt_oss(&m, 3, true);
    let f = m.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let key = "model.layers.0.mlp.experts.down_proj_scales";
    // Same byte count, another shape: [E, H] read as [H, E].
    header[key]["shape"] = json!([H, EXPERTS, 1]);
    let mut h = serde_json::to_vec(&header).unwrap();
    h.resize(n, b' ');
    let mut edited = bytes[..8].to_vec();
    edited.extend(h);
    edited.extend(&bytes[8 + n..]);
    std::fs::write(&f, edited).unwrap();
    let o = chatvec(&["inspect", s(&m)]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("down_proj_blocks") && e.contains(key) && e.contains("[experts, rows, groups]"),
        "{e}"
    );
}

const TRANSFORMERS_SCRIPT: &str = include_str!("quant_reference.py");

/// A temporary directory holding `quant_reference.py`'s models (its
/// `write`), and a function that runs the script with the test venv's
/// Python (`CHATVEC_SFT_PYTHON`) and returns stdout.
fn reference_models() -> (tempfile::TempDir, impl Fn(&[&str]) -> String) {
    let root = tempfile::tempdir().unwrap();
    let py =
        std::env::var_os("CHATVEC_SFT_PYTHON").map(std::path::PathBuf::from).expect("CHATVEC_SFT_PYTHON");
    let script = root.path().join("quant.py");
    std::fs::write(&script, TRANSFORMERS_SCRIPT).unwrap();
    let run = move |args: &[&str]| {
        let o = std::process::Command::new(&py).arg(&script).args(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    run(&["write", s(root.path())]);
    (root, run)
}

/// `--out-dtype fp8` gives the codes and `weight_scale_inv` transformers'
/// own `Fp8Quantize` (what `save_pretrained` runs on a block-FP8 model)
/// makes from the same apply's f32 output, bit for bit, on an FP8 base
/// whose codes cover every finite E4M3 value, with f32 scales and under
/// `scale_fmt: ue8m0` (power-of-two scales).
#[test]
#[ignore = "needs transformers 5: CHATVEC_SFT_PYTHON=$(scripts/sft-venv.sh) cargo test --test quant -- --ignored"]
fn transformers_fp8_quantizer_matches_out_dtype_fp8_bit_for_bit() {
    let (root, py_run) = reference_models();
    let r = root.path();
    // The same base under scale_fmt ue8m0 (power-of-two inverse scales).
    let ue8m0 = r.join("fp8-ue8m0");
    std::fs::create_dir_all(&ue8m0).unwrap();
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(r.join("fp8-e4m3").join(f), ue8m0.join(f)).unwrap();
    }
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(ue8m0.join("config.json")).unwrap()).unwrap();
    cfg["quantization_config"]["scale_fmt"] = json!("ue8m0");
    std::fs::write(ue8m0.join("config.json"), cfg.to_string()).unwrap();
    for base in ["fp8-e4m3", "fp8-ue8m0"] {
        let (exact, quantized) = (r.join(format!("{base}-f32")), r.join(format!("{base}-fp8")));
        for (out, dtype) in [(&exact, "f32"), (&quantized, "fp8")] {
            // The FP8 base's config (written from a config object) has no `architectures`.
            let extra = ["--out-dtype", dtype, "-q", "--allow-mismatch"];
            ok(&apply_streaming(&pair_on(r, &r.join(base)), out, &extra));
        }
        let said = py_run(&["requant", s(&exact), s(&quantized)]);
        assert!(said.starts_with("requant identical 14"), "{base}: {said}");
    }
}

/// `--out-dtype mxfp4` output loads in transformers 5 (`Mxfp4Config(
/// dequantize=True)`) with every key in place, each expert equal to its
/// blocks and scales decoded in f64 by the script, and finite logits.
#[test]
#[ignore = "needs transformers 5: CHATVEC_SFT_PYTHON=$(scripts/sft-venv.sh) cargo test --test quant -- --ignored"]
fn out_dtype_mxfp4_loads_in_transformers() {
    let (root, py_run) = reference_models();
    let r = root.path();
    let out = r.join("out-mxfp4");
    let t = Trio { pre: r.join("pre-oss"), chat: r.join("chat-oss"), base: r.join("mxfp4") };
    ok(&apply_streaming(&t, &out, &["--out-dtype", "mxfp4", "-q"]));
    let said = py_run(&["mxfp4-load", s(&out)]);
    assert!(said.starts_with("mxfp4-load identical 4 finite"), "{said}");
}

/// FP8 (E4M3 and E5M2, every finite code point, random f32 scales) and
/// MXFP4 (every nibble, exponents from 2^-127 to 2^+22) checkpoints loaded
/// by transformers with `dequantize=True` in float32 give the same f32 as
/// chatvec's decode, bit for bit.
#[test]
#[ignore = "needs transformers 5: CHATVEC_SFT_PYTHON=$(scripts/sft-venv.sh) cargo test --test quant -- --ignored"]
fn transformers_dequantizers_match_chatvec_decode_bit_for_bit() {
    let (root, py_run) = reference_models();
    let r = root.path();
    let mut outs = Vec::new();
    for m in ["fp8-e4m3", "fp8-e5m2", "mxfp4"] {
        let recipe = r.join(format!("{m}.yml"));
        std::fs::write(
            &recipe,
            format!(
                "merge_method: passthrough\nmodels:\n  - model: {}\ndtype: float32\n",
                r.join(m).display()
            ),
        )
        .unwrap();
        let out = r.join(format!("out-{m}"));
        ok(&chatvec(&["merge", s(&recipe), s(&out), "-q"]));
        outs.push(out);
    }
    let args: Vec<&str> = ["compare"].into_iter().chain(outs.iter().map(|o| s(o))).collect();
    let said = py_run(&args);
    assert_eq!(said.matches("identical").count(), 3, "{said}");
}

/// `--out-dtype fp8` writes an FP8 base's weights as FP8 again: codes and
/// `weight_scale_inv` per 4x4 block equal a quantizer written here (amax,
/// the scale `(1 / amax) * 448` as torch's `448.0 / tensor` computes it,
/// its inverse, all in f32, the nearest E4M3 code searched in f64, ties to
/// the even code) applied to the documented f32 apply; the
/// config keeps `quantization_config`; the error is reported. Bases it
/// cannot write back are refused.
#[test]
fn out_dtype_fp8_requantizes_the_base_weights_in_its_blocks() {
    let d = tempfile::tempdir().unwrap();
    chat_pair(d.path());
    let base = d.path().join("base");
    let q =
        Fp8 { ty: E4M3, block: [4, 4], config_block: Some([4, 4]), scale_ty: Ty::F32, suffix: "_scale_inv" };
    let decoded = fp8_llama(&base, 3, &q);
    // The same base under DeepSeek-V3.1's scale_fmt ue8m0, its scales
    // stored as E8M0 bytes as transformers saves them.
    let ue8m0 = d.path().join("ue8m0");
    let decoded_ue8m0 = fp8_llama(&ue8m0, 3, &Fp8 { scale_ty: Ty::Raw("F8_E8M0", 1), ..q });
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(ue8m0.join("config.json")).unwrap()).unwrap();
    cfg["quantization_config"]["scale_fmt"] = json!("ue8m0");
    std::fs::write(ue8m0.join("config.json"), cfg.to_string()).unwrap();
    let (chat, pre) = (d.path().join("chat"), d.path().join("pre"));
    // The chat pair applied to `base` into `out`, with `extra` after.
    let apply =
        |base: &Path, out: &Path, extra: &[&str]| apply_streaming(&pair_on(d.path(), base), out, extra);
    let (c, p) = (read_model(&chat), read_model(&pre));
    let bf = read_model_loose(&base);
    // Non-negative E4M3 codes' values, for the nearest-code search.
    let table: Vec<f64> = (0..=0x7eu8).map(e4m3).collect();
    for (b, decoded, pow2) in [(&base, &decoded, false), (&ue8m0, &decoded_ue8m0, true)] {
        let out = d.path().join(if pow2 { "out-ue8m0" } else { "out" });
        let o = apply(b, &out, &["--out-dtype", "fp8", "--chunk-elems", "40"]);
        ok(&o);
        assert!(
            stderr(&o).contains("written as FP8 E4M3 again in the base's blocks: relative RMS error"),
            "{}",
            stderr(&o)
        );
        let cfg: Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["quantization_config"]["weight_block_size"], json!([4, 4]), "{cfg}");
        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut requantized = 0;
        for (name, ct) in &c {
            let y: Vec<f32> = (0..ct.numel())
                .map(|i| {
                    let b = decoded.get(name).map_or_else(|| bf[name].get(i), |v| v[i]);
                    let dd = ct.get(i) - p[name].get(i);
                    let m = 1.0f32 * dd;
                    b + m
                })
                .collect();
            let view = st.tensor(name).unwrap();
            if !decoded.contains_key(name) {
                assert_eq!(view.dtype(), safetensors::Dtype::BF16, "{name}");
                continue;
            }
            requantized += 1;
            assert_eq!(format!("{:?}", view.dtype()), "F8_E4M3", "{name}");
            let inv_view = st.tensor(&format!("{name}_scale_inv")).unwrap();
            let (rows, cols) = (ct.shape[0] as usize, ct.shape[1] as usize);
            assert_eq!(inv_view.shape(), &[rows / 4, cols / 4]);
            let inv: Vec<f32> = if pow2 {
                assert_eq!(format!("{:?}", inv_view.dtype()), "F8_E8M0");
                inv_view.data().iter().map(|b| 2f32.powi(i32::from(*b) - 127)).collect()
            } else {
                assert_eq!(inv_view.dtype(), safetensors::Dtype::F32);
                inv_view.data().chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
            };
            for tr in 0..rows / 4 {
                for tc in 0..cols / 4 {
                    let cells: Vec<usize> =
                        (0..4).flat_map(|r| (0..4).map(move |k| (tr * 4 + r) * cols + tc * 4 + k)).collect();
                    let amax = cells.iter().map(|&i| y[i].abs()).fold(0f32, f32::max);
                    // torch's `448.0 / tensor`: the reciprocal, times 448.
                    let mut scale = if amax > 0.0 { (1f32 / amax) * 448f32 } else { 1.0 };
                    let mut want_inv = 1f32 / scale;
                    if pow2 {
                        // The smallest power of two at or above it.
                        let k = (-126..128).find(|k| 2f64.powi(*k) >= f64::from(want_inv)).unwrap();
                        want_inv = 2f32.powi(k);
                        scale = 1.0 / want_inv;
                    }
                    assert_eq!(
                        inv[tr * (cols / 4) + tc].to_bits(),
                        want_inv.to_bits(),
                        "{name} tile {tr},{tc}"
                    );
                    for &i in &cells {
                        let v = f64::from((y[i] * scale).clamp(-448.0, 448.0));
                        let best = (0..table.len())
                            .min_by(|&a, &b| {
                                let (da, db) = ((table[a] - v.abs()).abs(), (table[b] - v.abs()).abs());
                                da.partial_cmp(&db).unwrap().then((a & 1).cmp(&(b & 1)))
                            })
                            .unwrap() as u8;
                        let want = if v.is_sign_negative() { best | 0x80 } else { best };
                        assert_eq!(view.data()[i], want, "{name}[{i}]: {v}");
                    }
                }
            }
        }
        assert_eq!(requantized, decoded.len());
    }
    // The dry run says which weights are quantized again, and their scales.
    let o = apply(&base, &d.path().join("dry"), &["--out-dtype", "fp8", "--dry-run"]);
    ok(&o);
    let plan = stdout(&o);
    assert!(plan.contains("model.layers.0.mlp.up_proj.weight F8_E4M3 [12, 8]: base:"), "{plan}");
    assert!(plan.contains(", quantized in 4x4 blocks"), "{plan}");
    assert!(plan.contains("model.layers.0.mlp.up_proj.weight_scale_inv F32 [3, 2]: FP8 block scales of model.layers.0.mlp.up_proj.weight"), "{plan}");
    // What cannot be written back is refused, nothing written.
    let bf16_base = d.path().join("bf16");
    write_model(&bf16_base, &llama(3, 16, false, Ty::BF16), 1, &config(16, false, LAYERS), Some(&tokens(16)));
    let e5 = d.path().join("e5");
    fp8_llama(
        &e5,
        3,
        &Fp8 { ty: E5M2, block: [4, 4], config_block: Some([4, 4]), scale_ty: Ty::F32, suffix: "_scale_inv" },
    );
    let odd_fmt = d.path().join("odd-fmt");
    fp8_llama(&odd_fmt, 3, &q);
    let mut cfg: Value =
        serde_json::from_slice(&std::fs::read(odd_fmt.join("config.json")).unwrap()).unwrap();
    cfg["quantization_config"]["scale_fmt"] = json!("e4m3");
    std::fs::write(odd_fmt.join("config.json"), cfg.to_string()).unwrap();
    for (b, dtype, want) in [
        (&odd_fmt, "fp8", "has scale_fmt 'e4m3'; chatvec writes 'float' and 'ue8m0' scales"),
        (&bf16_base, "fp8", "has no block-scaled FP8 E4M3 weights"),
        (&e5, "fp8", "is F8_E5M2 with F32 scales; F8_E4M3 with F32 scales"),
        (&base, "mxfp4", "in the base; each quantized weight is written in its own scheme only"),
    ] {
        let bad = d.path().join("bad");
        let o = apply(b, &bad, &["--out-dtype", dtype]);
        assert!(!o.status.success(), "{want}");
        assert!(stderr(&o).contains(want), "{want}:\n{}", stderr(&o));
        assert!(!bad.exists());
    }
}

/// `--out-dtype mxfp4` writes a gpt-oss base's experts as MXFP4 again:
/// blocks and scales equal a quantizer written here from the rule of
/// transformers' `quantize_to_mxfp4` (values rounded to bf16; per 32 along
/// the contraction axis, the scale the smallest power of two at or above
/// `amax / 6` in f32, searched over the exponents; codes the nearest FP4
/// value to `x / scale` in f64, ties away from zero), applied to the
/// documented f32 apply, at a chunk size that cuts bands of 3 rows (the
/// last one shorter). Every other tensor is the bf16 apply; the config
/// keeps `quantization_config`; the error is reported; the dry run lists
/// the mapping. Bases it cannot write back are refused, nothing written.
#[test]
fn out_dtype_mxfp4_requantizes_the_base_experts_in_groups_of_32() {
    let d = tempfile::tempdir().unwrap();
    gpt_oss(&d.path().join("pre"), 1, false);
    gpt_oss(&d.path().join("chat"), 2, false);
    let base = d.path().join("base");
    let decoded = gpt_oss(&base, 3, true);
    let (chat, pre) = (d.path().join("chat"), d.path().join("pre"));
    let apply =
        |base: &Path, out: &Path, extra: &[&str]| apply_streaming(&pair_on(d.path(), base), out, extra);
    let out = d.path().join("out");
    let o = apply(&base, &out, &["--out-dtype", "mxfp4", "--chunk-elems", "200"]);
    ok(&o);
    assert!(
        stderr(&o).contains("2 weight(s) written as MXFP4 again (rounded to bf16, one E8M0 scale per 32 values): relative RMS error"),
        "{}",
        stderr(&o)
    );
    let cfg: Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["quantization_config"]["quant_method"], "mxfp4", "{cfg}");
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (c, p) = (read_model(&chat), read_model(&pre));
    let bf = read_model_loose(&base);
    for (name, ct) in &c {
        let y: Vec<f32> = (0..ct.numel())
            .map(|i| {
                let b = decoded.get(name).map_or_else(|| bf[name].get(i), |v| v[i]);
                b + 1.0f32 * (ct.get(i) - p[name].get(i))
            })
            .collect();
        let Some(_) = decoded.get(name) else {
            let view = st.tensor(name).unwrap();
            assert_eq!(view.dtype(), safetensors::Dtype::BF16, "{name}");
            for (i, v) in y.iter().enumerate() {
                let got = u16::from_le_bytes([view.data()[2 * i], view.data()[2 * i + 1]]);
                assert_eq!(got, half::bf16::from_f32(*v).to_bits(), "{name}[{i}]");
            }
            continue;
        };
        assert!(st.tensor(name).is_err(), "{name} is written as blocks and scales only");
        let [experts, cols, rows] = ct.shape[..] else { panic!("{name} {:?}", ct.shape) };
        let (experts, cols, rows) = (experts as usize, cols as usize, rows as usize);
        let groups = cols / 32;
        let blocks = st.tensor(&format!("{name}_blocks")).unwrap();
        let scales = st.tensor(&format!("{name}_scales")).unwrap();
        assert_eq!(blocks.dtype(), safetensors::Dtype::U8);
        assert_eq!(blocks.shape(), &[experts, rows, groups, 16]);
        assert_eq!(scales.shape(), &[experts, rows, groups]);
        for e in 0..experts {
            for r in 0..rows {
                for g in 0..groups {
                    let v: Vec<f32> = (0..32)
                        .map(|k| half::bf16::from_f32(y[(e * cols + g * 32 + k) * rows + r]).to_f32())
                        .collect();
                    let amax = v.iter().fold(0f32, |a, x| a.max(x.abs()));
                    let ds = f64::from(amax / 6.0f32);
                    let want_scale = if ds == 0.0 {
                        0
                    } else {
                        (1..=254u8).find(|b| 2f64.powi(i32::from(*b) - 127) >= ds).unwrap()
                    };
                    let at = (e * rows + r) * groups + g;
                    assert_eq!(scales.data()[at], want_scale, "{name} scale ({e}, {r}, {g}): amax {amax}");
                    let scale = 2f64.powi(i32::from(want_scale) - 127);
                    for (k, x) in v.iter().enumerate() {
                        let q = if want_scale == 0 { 0.0 } else { f64::from(*x) / scale };
                        // The nearest magnitude, the larger on a tie.
                        let best = (0..8u8)
                            .min_by(|&a, &b| {
                                let (da, db) = ((fp4(a) - q.abs()).abs(), (fp4(b) - q.abs()).abs());
                                da.partial_cmp(&db).unwrap().then(b.cmp(&a))
                            })
                            .unwrap();
                        let want = if x.is_sign_negative() { best | 8 } else { best };
                        let byte = blocks.data()[at * 16 + k / 2];
                        let got = if k % 2 == 0 { byte & 15 } else { byte >> 4 };
                        assert_eq!(got, want, "{name} ({e}, {r}, {}): {x} / {scale}", g * 32 + k);
                    }
                }
            }
        }
    }
    // The dry run names the float shape each weight is quantized from.
    let o = apply(&base, &d.path().join("dry"), &["--out-dtype", "mxfp4", "--dry-run"]);
    ok(&o);
    let plan = stdout(&o);
    assert!(
        plan.contains("model.layers.0.mlp.experts.gate_up_proj_blocks U8 [2, 64, 2, 16]: base:"),
        "{plan}"
    );
    assert!(plan.contains(", quantized to MXFP4 from [2, 64, 64], one E8M0 scale per 32"), "{plan}");
    assert!(
        plan.contains("model.layers.0.mlp.experts.down_proj_scales U8 [2, 64, 1]: MXFP4 scales of model.layers.0.mlp.experts.down_proj_blocks"),
        "{plan}"
    );
    // What cannot be written back is refused, nothing written.
    let bf16_base = d.path().join("pre");
    let bad = d.path().join("bad");
    let o = apply(&bf16_base, &bad, &["--out-dtype", "mxfp4"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("has no MXFP4 weights to write as MXFP4 again"), "{}", stderr(&o));
    assert!(!bad.exists());
    let sweep =
        ["sweep", "--base", s(&base), "--chat", s(&chat), "--pretrained", s(&pre), "--scales", "0.5,1"];
    let o = chatvec(&[&sweep[..], &["--out-dtype", "mxfp4", "-o", s(&bad)]].concat());
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("a sweep writes bf16 candidates; --out-dtype mxfp4 is for apply"),
        "{}",
        stderr(&o)
    );
    assert!(!bad.exists());
}
