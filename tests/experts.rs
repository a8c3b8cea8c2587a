//! Mixture-of-experts checkpoints whose experts are stored in different
//! layouts (one tensor per expert, or transformers 5's fused
//! `experts.gate_up_proj [E, 2I, H]` / `experts.down_proj [E, H, I]`)
//! are lined up expert by expert: any mix of layouts gives the weights of
//! the all-per-expert computation, written in the base's layout or the
//! one `--expert-layout` asks for. Fixtures are written here, the fused
//! tensors assembled by the test from the per-expert values.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{T, Ty, chatvec, ok, read_model, s, stderr, stdout, val, write_model};
use serde_json::json;

const H: u64 = 8;
const I: u64 = 4;
const E: u64 = 3;
const LAYERS: u64 = 2;
const VOCAB: u64 = 16;

/// How a family names its experts: per-expert module path and the gate,
/// up, down names; the fused path; the router's name in each layout.
struct Names {
    model_type: &'static str,
    per_expert: &'static str,
    parts: [&'static str; 3],
    router: (&'static str, &'static str),
}

const QWEN: Names = Names {
    model_type: "qwen3_moe",
    per_expert: "mlp.experts",
    parts: ["gate_proj.weight", "up_proj.weight", "down_proj.weight"],
    router: ("mlp.gate.weight", "mlp.gate.weight"),
};
const MIXTRAL: Names = Names {
    model_type: "mixtral",
    per_expert: "block_sparse_moe.experts",
    parts: ["w1.weight", "w3.weight", "w2.weight"],
    router: ("block_sparse_moe.gate.weight", "mlp.gate.weight"),
};

fn tensor(seed: u32, name: &str, value_name: &str, shape: Vec<u64>) -> T {
    let n: u64 = shape.iter().product();
    let data = (0..n as usize).flat_map(|i| Ty::BF16.encode(val(seed, value_name, i))).collect();
    T { name: name.to_string(), ty: Ty::BF16, shape, data }
}

/// A tiny MoE model of `seed` in either layout. Expert values are keyed by
/// the per-expert name, so both layouts of one seed hold the same model.
fn moe(seed: u32, f: &Names, fused: bool) -> Vec<T> {
    let mut v = vec![tensor(seed, "model.embed_tokens.weight", "embed", vec![VOCAB, H])];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        v.push(tensor(seed, &format!("{p}.input_layernorm.weight"), &format!("{p}.ln"), vec![H]));
        v.push(tensor(seed, &format!("{p}.self_attn.q_proj.weight"), &format!("{p}.q"), vec![H, H]));
        let piece = |e: u64, k: usize| {
            let name = format!("{p}.{}.{e}.{}", f.per_expert, f.parts[k]);
            let shape = if k == 2 { vec![H, I] } else { vec![I, H] };
            tensor(
                seed,
                &name,
                &name.replace(f.per_expert, "experts").replace(f.parts[k], ["g", "u", "d"][k]),
                shape,
            )
        };
        if fused {
            let mut gate_up = Vec::new();
            let mut down = Vec::new();
            for e in 0..E {
                gate_up.extend(piece(e, 0).data);
                gate_up.extend(piece(e, 1).data);
                down.extend(piece(e, 2).data);
            }
            let name = |k: &str| format!("{p}.mlp.experts.{k}");
            v.push(T { name: name("gate_up_proj"), ty: Ty::BF16, shape: vec![E, 2 * I, H], data: gate_up });
            v.push(T { name: name("down_proj"), ty: Ty::BF16, shape: vec![E, H, I], data: down });
        } else {
            for e in 0..E {
                for k in 0..3 {
                    v.push(piece(e, k));
                }
            }
        }
        let router = if fused { f.router.1 } else { f.router.0 };
        v.push(tensor(seed, &format!("{p}.{router}"), &format!("{p}.router"), vec![E, H]));
    }
    v.push(tensor(seed, "model.norm.weight", "norm", vec![H]));
    v.push(tensor(seed, "lm_head.weight", "head", vec![VOCAB, H]));
    v
}

fn config(f: &Names) -> serde_json::Value {
    json!({
        "architectures": ["X"], "model_type": f.model_type, "hidden_size": H,
        "intermediate_size": I, "moe_intermediate_size": I, "num_hidden_layers": LAYERS,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": VOCAB,
        "num_experts": E, "num_local_experts": E, "tie_word_embeddings": false, "torch_dtype": "bfloat16"
    })
}

/// Writes pretrained (seed 1), chat (2) and base (3) in both layouts under
/// `root/{pre,chat,base}-{per,fused}`.
fn write_trios(root: &Path, f: &Names) {
    for (name, seed) in [("pre", 1), ("chat", 2), ("base", 3)] {
        for fused in [false, true] {
            let dir = root.join(format!("{name}-{}", if fused { "fused" } else { "per" }));
            write_model(&dir, &moe(seed, f, fused), 1, &config(f), None);
        }
    }
}

/// An output read back with every fused expert tensor cut into its
/// per-expert matrices (named as `f` names them) and the router under its
/// per-expert name: what the output means, whatever its layout.
fn per_expert_view(dir: &Path, f: &Names) -> BTreeMap<String, T> {
    let mut out = BTreeMap::new();
    for (name, t) in read_model(dir) {
        let fused =
            name.split_once(".mlp.experts.").filter(|(_, k)| *k == "gate_up_proj" || *k == "down_proj");
        let Some((p, kind)) = fused else {
            let name = name.replace(f.router.1, f.router.0);
            out.insert(name.clone(), T { name, ..t });
            continue;
        };
        let parts: &[usize] = if kind == "gate_up_proj" { &[0, 1] } else { &[2] };
        let bytes = t.data.len() / (E as usize * parts.len());
        for e in 0..E as usize {
            for (k, &part) in parts.iter().enumerate() {
                let at = (e * parts.len() + k) * bytes;
                let name = format!("{p}.{}.{e}.{}", f.per_expert, f.parts[part]);
                let shape = vec![t.shape[1] / parts.len() as u64, t.shape[2]];
                out.insert(name.clone(), T { name, ty: t.ty, shape, data: t.data[at..at + bytes].to_vec() });
            }
        }
    }
    out
}

/// Stored tensor names and shapes of an output.
fn stored(dir: &Path) -> BTreeMap<String, Vec<u64>> {
    read_model(dir).into_iter().map(|(n, t)| (n, t.shape)).collect()
}

fn layout(fused: bool) -> &'static str {
    if fused { "fused" } else { "per" }
}

#[test]
fn mixed_layout_trios_give_the_all_per_expert_weights() {
    for f in [QWEN, MIXTRAL] {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        write_trios(r, &f);
        let inputs = |kind: &str, fused: bool| r.join(format!("{kind}-{}", layout(fused)));
        let mut reference: Option<BTreeMap<String, T>> = None;
        for combo in 0..8 {
            let (b, c, p) = (combo & 1 != 0, combo & 2 != 0, combo & 4 != 0);
            let out = r.join(format!("out-{combo}"));
            ok(&chatvec(&[
                "apply",
                "--base",
                s(&inputs("base", b)),
                "--chat",
                s(&inputs("chat", c)),
                "--pretrained",
                s(&inputs("pre", p)),
                "-q",
                "-o",
                s(&out),
            ]));
            // Written in the base's layout.
            let names = stored(&out);
            let fused_name = "model.layers.1.mlp.experts.gate_up_proj";
            assert_eq!(
                names.get(fused_name).cloned(),
                b.then(|| vec![E, 2 * I, H]),
                "{} combo {combo}",
                f.model_type
            );
            let got = per_expert_view(&out, &f);
            match &reference {
                None => {
                    // All per-expert: checked against base + (chat - pre) in f64.
                    let (base, chat, pre) = (moe(3, &f, false), moe(2, &f, false), moe(1, &f, false));
                    for ((bt, ct), pt) in base.iter().zip(&chat).zip(&pre) {
                        let o = &got[&bt.name];
                        for i in 0..bt.numel() {
                            let want = bt.get(i) as f64 + (ct.get(i) as f64 - pt.get(i) as f64);
                            let ulps = (half::bf16::from_f64(want).to_bits() as i32
                                - half::bf16::from_f32(o.get(i)).to_bits() as i32)
                                .abs();
                            assert!(ulps <= 1, "{} [{i}]: {} vs f64 {want}", bt.name, o.get(i));
                        }
                    }
                    assert_eq!(got.len(), base.len());
                    reference = Some(got);
                }
                Some(want) => {
                    for (name, t) in want {
                        assert_eq!(got[name].data, t.data, "{} combo {combo}: {name}", f.model_type);
                    }
                    assert_eq!(got.len(), want.len());
                }
            }
        }
    }
}

#[test]
fn expert_layout_flag_writes_the_layout_asked_for() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_trios(r, &MIXTRAL);
    let run = |base: &str, want: &str, out: &str| {
        ok(&chatvec(&[
            "apply",
            "--base",
            s(&r.join(base)),
            "--chat",
            s(&r.join("chat-fused")),
            "--pretrained",
            s(&r.join("pre-per")),
            "--expert-layout",
            want,
            "-q",
            "-o",
            s(&r.join(out)),
        ]));
        r.join(out)
    };
    let fused = run("base-per", "fused", "to-fused");
    let names = stored(&fused);
    assert_eq!(names["model.layers.0.mlp.experts.gate_up_proj"], vec![E, 2 * I, H]);
    assert_eq!(names["model.layers.0.mlp.experts.down_proj"], vec![E, H, I]);
    assert_eq!(names["model.layers.0.mlp.gate.weight"], vec![E, H], "the router takes its fused-layout name");
    assert!(!names.keys().any(|n| n.contains("block_sparse_moe")), "{names:?}");
    let per = run("base-fused", "per-expert", "to-per");
    let names = stored(&per);
    assert_eq!(names["model.layers.1.block_sparse_moe.experts.2.w3.weight"], vec![I, H]);
    assert!(names.contains_key("model.layers.1.block_sparse_moe.gate.weight"));
    assert!(!names.keys().any(|n| n.contains(".mlp.")), "{names:?}");
    // The same weights either way.
    assert_eq!(
        per_expert_view(&fused, &MIXTRAL).into_iter().map(|(n, t)| (n, t.data)).collect::<Vec<_>>(),
        per_expert_view(&per, &MIXTRAL).into_iter().map(|(n, t)| (n, t.data)).collect::<Vec<_>>()
    );
    // The index names the stored tensors, and the manifest's shard hashes hold.
    common::check_manifest_hashes(&fused);
}

#[test]
fn dry_run_shows_each_inputs_layout_and_the_fused_groups() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_trios(r, &QWEN);
    let o = chatvec(&[
        "apply",
        "--base",
        s(&r.join("base-fused")),
        "--chat",
        s(&r.join("chat-per")),
        "--pretrained",
        s(&r.join("pre-fused")),
        "-o",
        s(&r.join("out")),
        "--dry-run",
    ]);
    ok(&o);
    let text = stdout(&o) + &stderr(&o);
    assert!(text.contains("experts (qwen2_moe layout family)"), "{text}");
    assert!(text.contains("base-fused: fused; 4 fused tensor(s) read expert by expert"), "{text}");
    assert!(text.contains("chat-per: per-expert"), "{text}");
    assert!(text.contains("output: fused (the reference model's)"), "{text}");
    assert!(
        text.contains("model.layers.0.mlp.experts.gate_up_proj BF16 [3, 8, 8]: the 6 tensors below"),
        "{text}"
    );
    assert!(text.contains("(stored as model.layers.0.mlp.experts.gate_up_proj[1][4:8])"), "{text}");
    assert!(!r.join("out").exists());
}

#[test]
fn a_checkpoint_holding_both_layouts_is_refused_naming_both_tensors() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_trios(r, &QWEN);
    let mut both = moe(2, &QWEN, true);
    both.push(tensor(2, "model.layers.0.mlp.experts.0.gate_proj.weight", "x", vec![I, H]));
    write_model(&r.join("chat-both"), &both, 1, &config(&QWEN), None);
    let out = r.join("out");
    let o = chatvec(&[
        "apply",
        "--base",
        s(&r.join("base-per")),
        "--chat",
        s(&r.join("chat-both")),
        "--pretrained",
        s(&r.join("pre-per")),
        "-o",
        s(&out),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("model.layers.0.mlp.experts.gate_up_proj")
            || e.contains("model.layers.0.mlp.experts.down_proj"),
        "{e}"
    );
    assert!(e.contains("model.layers.0.mlp.experts.0.gate_proj.weight"), "{e}");
    assert!(e.contains("one layout"), "{e}");
    assert!(!out.exists());
}

#[test]
fn a_missing_expert_is_named_whatever_the_layouts() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_trios(r, &QWEN);
    let short: Vec<T> =
        moe(2, &QWEN, false).into_iter().filter(|t| !t.name.contains("experts.2.up_proj")).collect();
    write_model(&r.join("chat-short"), &short, 1, &config(&QWEN), None);
    let out = r.join("out");
    let o = chatvec(&[
        "apply",
        "--base",
        s(&r.join("base-fused")),
        "--chat",
        s(&r.join("chat-short")),
        "--pretrained",
        s(&r.join("pre-per")),
        "-o",
        s(&out),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("model.layers.0.mlp.experts.2.up_proj.weight"), "{}", stderr(&o));
    assert!(!out.exists());
}

#[test]
fn a_fused_tensor_of_odd_gate_up_rows_is_refused_naming_it() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_trios(r, &QWEN);
    let mut bad = moe(3, &QWEN, true);
    let t = bad.iter_mut().find(|t| t.name == "model.layers.1.mlp.experts.gate_up_proj").unwrap();
    t.shape = vec![E, 2 * I - 1, H];
    t.data.truncate((E * (2 * I - 1) * H * 2) as usize);
    write_model(&r.join("base-bad"), &bad, 1, &config(&QWEN), None);
    let out = r.join("out");
    let o = chatvec(&[
        "apply",
        "--base",
        s(&r.join("base-bad")),
        "--chat",
        s(&r.join("chat-per")),
        "--pretrained",
        s(&r.join("pre-per")),
        "-o",
        s(&out),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("model.layers.1.mlp.experts.gate_up_proj") && e.contains("even"), "{e}");
    assert!(!out.exists());
}

#[test]
fn expert_layout_on_a_dense_model_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let t = common::trio(root.path(), Ty::BF16, 1);
    let o = common::apply_streaming(&t, &root.path().join("out"), &["--expert-layout", "fused"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--expert-layout fused"), "{}", stderr(&o));
    let o = common::apply_streaming(&t, &root.path().join("out"), &["--expert-layout", "sideways"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("fused, per-expert"), "{}", stderr(&o));
}

#[test]
fn merges_extracts_and_analyses_line_up_mixed_layouts() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_trios(r, &MIXTRAL);
    let recipe = |name: &str, pre: &str, chat: &str, base: &str| {
        let text = format!(
            "merge_method: ties\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0, density: 0.5}}\n  - model: {}\n    parameters: {{weight: 0.5, density: 0.7}}\ndtype: bfloat16\n",
            s(&r.join(pre)),
            s(&r.join(chat)),
            s(&r.join(base))
        );
        std::fs::write(r.join(name), text).unwrap();
        r.join(name)
    };
    let mixed = recipe("mixed.yml", "pre-fused", "chat-per", "base-fused");
    let plain = recipe("plain.yml", "pre-per", "chat-per", "base-per");
    ok(&chatvec(&["merge", s(&mixed), "-q", "-o", s(&r.join("m-mixed"))]));
    ok(&chatvec(&["merge", s(&plain), "-q", "-o", s(&r.join("m-plain"))]));
    assert!(stored(&r.join("m-mixed")).contains_key("model.layers.0.mlp.experts.down_proj"));
    let (a, b) =
        (per_expert_view(&r.join("m-mixed"), &MIXTRAL), per_expert_view(&r.join("m-plain"), &MIXTRAL));
    assert_eq!(a.len(), b.len());
    for (n, t) in &b {
        assert_eq!(a[n].data, t.data, "{n}");
    }
    // extract from a fused chat and a per-expert pretrained model: the chat model's layout
    for (chat, out) in [("chat-fused", "v-mixed"), ("chat-per", "v-plain")] {
        ok(&chatvec(&[
            "extract",
            "--chat",
            s(&r.join(chat)),
            "--pretrained",
            s(&r.join("pre-per")),
            "--dtype",
            "f32",
            "-q",
            "-o",
            s(&r.join(out)),
        ]));
    }
    let (a, b) =
        (per_expert_view(&r.join("v-mixed"), &MIXTRAL), per_expert_view(&r.join("v-plain"), &MIXTRAL));
    for (n, t) in &b {
        assert_eq!(a[n].data, t.data, "{n}");
    }
    // analyze pairs a fused vector with a per-expert base, tensor by tensor.
    let o =
        chatvec(&["analyze", "--vector", s(&r.join("v-mixed")), "--base", s(&r.join("base-per")), "--json"]);
    // Random fixtures fail the pair checks (exit 1); the report is printed all the same.
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(report["skipped"].as_array().map(Vec::len), Some(0), "{report}");
    let expert = report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "model.layers.1.block_sparse_moe.experts.2.w2.weight")
        .unwrap_or_else(|| panic!("{report}"));
    assert!(expert["norm"].as_f64().unwrap() > 0.0, "{expert}");
    assert!(expert["rel_norm_base"].as_f64().is_some(), "the base's matrix was found: {expert}");
}

#[test]
fn inspect_names_the_expert_family_layout_and_count() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_trios(r, &MIXTRAL);
    for (dir, layout) in [("base-fused", "fused"), ("base-per", "per-expert")] {
        let o = chatvec(&["inspect", s(&r.join(dir))]);
        ok(&o);
        let want = format!("experts: 3 per layer in 2 layer(s), stored {layout} (mixtral layout family)");
        assert!(stdout(&o).contains(&want), "{}", stdout(&o));
        let o = chatvec(&["inspect", s(&r.join(dir)), "--json"]);
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(v["experts"]["experts"], 3);
        assert_eq!(v["experts"]["layout"], layout);
    }
}

/// Writes tiny random models with transformers 5 (pretrained, chat and
/// base, each saved with `save_original_format` True and False), and
/// compares outputs loaded back by transformers, tensor by tensor, bits.
const TRANSFORMERS_SCRIPT: &str = r#"
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
mode, root = sys.argv[1], sys.argv[2]
common = dict(hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, vocab_size=32, head_dim=8)
families = {
    "qwen3_moe": dict(num_experts=3, num_experts_per_tok=2, moe_intermediate_size=8, decoder_sparse_step=1, mlp_only_layers=[]),
    "mixtral": dict(num_local_experts=3, num_experts_per_tok=2),
    "phimoe": dict(num_local_experts=3, num_experts_per_tok=2),
    "deepseek_v3": dict(n_routed_experts=3, num_experts_per_tok=2, moe_intermediate_size=8, first_k_dense_replace=0,
                        n_shared_experts=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
                        v_head_dim=8, n_group=1, topk_group=1),
}
if mode == "write":
    for mt, extra in families.items():
        cfg = AutoConfig.for_model(mt, **common, **extra)
        torch.manual_seed(0)
        pre = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
        for name, seed in [("pre", 0), ("chat", 1), ("base", 2)]:
            m = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
            m.load_state_dict(pre.state_dict())
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in m.parameters():
                    if seed:
                        p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.01)
            for fmt in ("per", "fused"):
                m.save_pretrained(f"{root}/{mt}/{name}-{fmt}", save_original_format=(fmt == "per"))
else:
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).state_dict()
    ref = load(sys.argv[3])
    for d in sys.argv[4:]:
        sd = load(d)
        assert sd.keys() == ref.keys(), (d, sorted(set(sd) ^ set(ref)))
        bad = [k for k in ref if not torch.equal(ref[k].view(torch.int16), sd[k].view(torch.int16))]
        assert not bad, (d, bad[:5])
        moved = [k for k in ref if "experts" in k]
        assert moved, ("no expert tensor in", d)
    print("identical", len(sys.argv) - 4)
"#;

#[test]
#[ignore = "needs transformers 5: CHATVEC_SFT_PYTHON=$(scripts/sft-venv.sh) cargo test --test experts -- --ignored"]
fn transformers_written_layouts_line_up_bit_for_bit() {
    let py =
        std::env::var_os("CHATVEC_SFT_PYTHON").map(std::path::PathBuf::from).expect("CHATVEC_SFT_PYTHON");
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let script = r.join("moe.py");
    std::fs::write(&script, TRANSFORMERS_SCRIPT).unwrap();
    let py_run = |args: &[&str]| {
        let o = std::process::Command::new(&py).arg(&script).args(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    py_run(&["write", s(r)]);
    for family in ["qwen3_moe", "mixtral", "phimoe", "deepseek_v3"] {
        let d = r.join(family);
        let mut outs = Vec::new();
        // (base, chat, pretrained) layouts: the published chat pair per-expert
        // and a v5-native fused base, and the other mixes.
        for (k, (b, c, p)) in [
            ("per", "per", "per"),
            ("fused", "per", "per"),
            ("per", "fused", "fused"),
            ("fused", "fused", "per"),
        ]
        .into_iter()
        .enumerate()
        {
            let out = d.join(format!("out-{k}"));
            ok(&chatvec(&[
                "apply",
                "--base",
                s(&d.join(format!("base-{b}"))),
                "--chat",
                s(&d.join(format!("chat-{c}"))),
                "--pretrained",
                s(&d.join(format!("pre-{p}"))),
                "-q",
                "-o",
                s(&out),
            ]));
            outs.push(out);
        }
        let args: Vec<&str> = ["compare", s(r)].into_iter().chain(outs.iter().map(|o| s(o))).collect();
        let said = py_run(&args);
        assert!(said.contains("identical 3"), "{family}: {said}");
    }
}

/// A LoRA adapter trained on the per-expert layout (PEFT wraps each
/// expert's linear layer: `experts.N.gate_proj`) merges into a base saved
/// fused: the same weights as merging it into the per-expert base, written
/// fused (or per expert with `--expert-layout`).
#[test]
fn a_per_expert_lora_adapter_merges_into_a_fused_base() {
    let d = tempfile::tempdir().unwrap();
    for f in [&QWEN, &MIXTRAL] {
        let (per, fused) = (d.path().join("base-per"), d.path().join("base-fused"));
        write_model(&per, &moe(3, f, false), 1, &config(f), None);
        write_model(&fused, &moe(3, f, true), 1, &config(f), None);
        let r = 2u64;
        let mut factors = Vec::new();
        for (e, k) in [(1u64, 0usize), (2, 2), (0, 1)] {
            let module =
                format!("model.layers.1.{}.{e}.{}", f.per_expert, f.parts[k].trim_end_matches(".weight"));
            let (rows, cols) = if k == 2 { (H, I) } else { (I, H) };
            factors.push(tensor(7, &format!("base_model.model.{module}.lora_A.weight"), "a", vec![r, cols]));
            factors.push(tensor(8, &format!("base_model.model.{module}.lora_B.weight"), "b", vec![rows, r]));
        }
        let targets: Vec<&str> = f.parts.iter().map(|p| p.trim_end_matches(".weight")).collect();
        let adapter = d.path().join("adapter");
        let _ = std::fs::remove_dir_all(&adapter);
        std::fs::create_dir_all(&adapter).unwrap();
        let cfg = json!({
            "peft_type": "LORA", "r": r, "lora_alpha": 4, "target_modules": targets, "bias": "none",
            "task_type": "CAUSAL_LM", "fan_in_fan_out": false, "use_rslora": false, "use_dora": false,
        });
        std::fs::write(adapter.join("adapter_config.json"), cfg.to_string()).unwrap();
        common::write_safetensors(&adapter.join("adapter_model.safetensors"), &factors);
        let merged = |base: &Path, name: &str, extra: &[&str]| {
            let out = d.path().join(name);
            let mut args =
                vec!["apply", "--base", s(base), "--lora", s(&adapter), "-o", s(&out), "-q", "--force"];
            args.extend(extra);
            let o = chatvec(&args);
            ok(&o);
            out
        };
        let want = per_expert_view(&merged(&per, "out-per", &[]), f);
        let from_fused = merged(&fused, "out-fused", &[]);
        assert!(
            stored(&from_fused).contains_key("model.layers.1.mlp.experts.gate_up_proj"),
            "{:?}",
            stored(&from_fused)
        );
        let got = per_expert_view(&from_fused, f);
        assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{}", f.model_type);
        for (name, t) in &want {
            assert!(got[name].data == t.data, "{} {name}", f.model_type);
        }
        // The adapter did change the experts it names.
        let base_view = per_expert_view(&per, f);
        let changed = format!("model.layers.1.{}.1.{}", f.per_expert, f.parts[0]);
        assert!(want[&changed].data != base_view[&changed].data, "{changed}");
        let as_per = merged(&fused, "out-as-per", &["--expert-layout", "per-expert"]);
        assert!(!stored(&as_per).keys().any(|k| k.contains("gate_up_proj")));
        for (name, t) in per_expert_view(&as_per, f) {
            assert!(want[&name].data == t.data, "{} {name}", f.model_type);
        }
    }
}
