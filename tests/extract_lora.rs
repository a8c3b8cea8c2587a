//! `extract --rank`: a chat vector as a PEFT LoRA adapter. The factors are
//! checked against singular values computed here in f64 (Jacobi on
//! `D^T D`), so the reconstruction error is compared with the optimal one
//! (Eckart-Young) without trusting chatvec's SVD; the adapter applied by
//! `apply --lora` is checked against `base + B @ A` in f64.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use serde_json::Value;

/// A tensor as an f64 matrix (rows, cols, row-major values).
fn matrix(t: &T) -> (usize, usize, Vec<f64>) {
    let (r, c) = match t.shape[..] {
        [r, c] => (r as usize, c as usize),
        [n] => (1, n as usize),
        _ => panic!("{:?}", t.shape),
    };
    (r, c, (0..t.numel()).map(|i| f64::from(t.get(i))).collect())
}

/// Singular values of an r x c matrix, largest first: square roots of the
/// eigenvalues of `D^T D` by cyclic Jacobi rotations, in f64.
fn singular_values(r: usize, c: usize, d: &[f64]) -> Vec<f64> {
    let mut g = vec![0f64; c * c];
    for i in 0..c {
        for j in 0..c {
            g[i * c + j] = (0..r).map(|k| d[k * c + i] * d[k * c + j]).sum();
        }
    }
    for _ in 0..100 {
        let off: f64 = (0..c)
            .flat_map(|i| (0..c).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| g[i * c + j].powi(2))
            .sum();
        if off < 1e-30 {
            break;
        }
        for p in 0..c {
            for q in p + 1..c {
                if g[p * c + q].abs() < 1e-300 {
                    continue;
                }
                let theta = (g[q * c + q] - g[p * c + p]) / (2.0 * g[p * c + q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let (cs, sn) = (1.0 / (t * t + 1.0).sqrt(), t / (t * t + 1.0).sqrt());
                for k in 0..c {
                    let (a, b) = (g[k * c + p], g[k * c + q]);
                    g[k * c + p] = cs * a - sn * b;
                    g[k * c + q] = sn * a + cs * b;
                }
                for k in 0..c {
                    let (a, b) = (g[p * c + k], g[q * c + k]);
                    g[p * c + k] = cs * a - sn * b;
                    g[q * c + k] = sn * a + cs * b;
                }
            }
        }
    }
    let mut s: Vec<f64> = (0..c).map(|i| g[i * c + i].max(0.0).sqrt()).collect();
    s.sort_by(|a, b| b.partial_cmp(a).unwrap());
    s.truncate(r.min(c));
    s
}

/// `B @ A` as an f64 matrix.
fn product(b: &T, a: &T) -> Vec<f64> {
    let (m, r, bv) = matrix(b);
    let (r2, n, av) = matrix(a);
    assert_eq!(r, r2);
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..r).map(|k| bv[i * r + k] * av[k * n + j]).sum();
        }
    }
    out
}

fn adapter(dir: &Path) -> BTreeMap<String, T> {
    read_model(dir)
}

fn config(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap()
}

/// The linear modules of the tiny Llama.
fn linear_modules() -> Vec<String> {
    llama_shapes(16, false)
        .into_iter()
        .filter(|(n, s)| s.len() == 2 && n.starts_with("model.layers."))
        .map(|(n, _)| n.strip_suffix(".weight").unwrap().to_string())
        .collect()
}

#[test]
fn rank_r_factors_reach_the_optimal_error_of_each_difference() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::F32, 1);
    let out = d.path().join("adapter");
    ok(&extract(&t, &out, &["--rank", "3"]));
    let (a, chat, pre) = (adapter(&out), read_model(&t.chat), read_model(&t.pre));
    for m in linear_modules() {
        let w = format!("{m}.weight");
        let (r, c, cv) = matrix(&chat[&w]);
        let (_, _, pv) = matrix(&pre[&w]);
        let delta: Vec<f64> = cv.iter().zip(&pv).map(|(x, y)| x - y).collect();
        let fa = &a[&format!("base_model.model.{m}.lora_A.weight")];
        let fb = &a[&format!("base_model.model.{m}.lora_B.weight")];
        assert_eq!(fa.shape, vec![3, c as u64], "{m}");
        assert_eq!(fb.shape, vec![r as u64, 3], "{m}");
        assert_eq!(fa.ty, Ty::F32, "the chat model's dtype");
        let ba = product(fb, fa);
        let err: f64 = delta.iter().zip(&ba).map(|(x, y)| (x - y).powi(2)).sum::<f64>();
        let s = singular_values(r, c, &delta);
        let best: f64 = s[3..].iter().map(|x| x * x).sum();
        let total: f64 = s.iter().map(|x| x * x).sum();
        assert!(err <= best + 1e-9 * total, "{m}: error^2 {err} above the optimal {best}");
    }
    let cfg = config(&out);
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 3);
    assert_eq!(cfg["lora_alpha"], 3, "scaling 1, as mergekit-extract-lora writes");
    let mut targets: Vec<&str> =
        cfg["target_modules"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    targets.sort();
    assert_eq!(targets, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]);
    // Embeddings, lm_head and the norms: saved whole from the chat model.
    let saved: Vec<&str> =
        cfg["modules_to_save"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(saved, ["embed_tokens", "input_layernorm", "lm_head", "norm"]);
    for name in [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.1.input_layernorm.weight",
    ] {
        assert_eq!(a[&format!("base_model.model.{name}")].data, chat[name].data, "{name}");
    }
    assert_eq!(cfg["base_model_name_or_path"], s(&t.pre));
    check_manifest_hashes(&out);
    ok(&chatvec(&["verify", s(&out)]));
}

#[test]
fn the_adapter_applied_with_apply_lora_is_base_plus_b_a() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::F32, 1);
    let adapter_dir = d.path().join("adapter");
    ok(&extract(&t, &adapter_dir, &["--rank", "2", "--dtype", "f32"]));
    let merged = d.path().join("merged");
    ok(&chatvec(&["apply", "--base", s(&t.base), "--lora", s(&adapter_dir), "-o", s(&merged)]));
    let (a, base, chat, out) =
        (adapter(&adapter_dir), read_model(&t.base), read_model(&t.chat), read_model(&merged));
    for m in linear_modules() {
        let w = format!("{m}.weight");
        let ba = product(
            &a[&format!("base_model.model.{m}.lora_B.weight")],
            &a[&format!("base_model.model.{m}.lora_A.weight")],
        );
        for (i, want) in ba.iter().enumerate() {
            let want = f64::from(base[&w].get(i)) + want;
            let got = f64::from(out[&w].get(i));
            assert!((got - want).abs() <= want.abs() * 2e-7 + 1e-7, "{w}[{i}]: {got} vs {want}");
        }
    }
    assert_eq!(
        out["model.norm.weight"].data, chat["model.norm.weight"].data,
        "modules_to_save replace the base's"
    );
}

#[test]
fn keep_picks_each_modules_rank_and_the_patterns_record_them() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let out = d.path().join("adapter");
    let o = chatvec(&[
        "--json",
        "extract",
        "--chat",
        s(&t.chat),
        "--pretrained",
        s(&t.pre),
        "--keep",
        "0.8",
        "--rank",
        "6",
        "-o",
        s(&out),
    ]);
    ok(&o);
    let report: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let cfg = config(&out);
    let r = cfg["r"].as_u64().unwrap();
    let (chat, pre) = (read_model(&t.chat), read_model(&t.pre));
    for m in report["modules"].as_array().unwrap().iter().filter(|m| m["kind"] == "lora") {
        let name = m["name"].as_str().unwrap();
        let w = format!("{name}.weight");
        let (rows, cols, cv) = matrix(&chat[&w]);
        let (_, _, pv) = matrix(&pre[&w]);
        let delta: Vec<f64> = cv.iter().zip(&pv).map(|(x, y)| x - y).collect();
        let s = singular_values(rows, cols, &delta);
        let total: f64 = s.iter().map(|x| x * x).sum();
        // The fewest singular values holding 80% of the energy (or the cap).
        let mut acc = 0.0;
        let want = s.iter().position(|x| {
            acc += x * x;
            acc >= 0.8 * total * (1.0 - 1e-9)
        });
        let want = want.map_or(6.min(s.len()), |p| (p + 1).min(6)) as u64;
        assert_eq!(m["rank"].as_u64().unwrap(), want, "{name}");
        assert!(m["energy_kept"].as_f64().unwrap() >= 0.8 - 1e-6 || want == 6, "{m}");
        if want != r {
            assert_eq!(cfg["rank_pattern"][name], want, "{name}");
            assert_eq!(cfg["alpha_pattern"][name], want, "{name}");
        } else {
            assert!(cfg["rank_pattern"].get(name).is_none());
        }
        let fa = &adapter(&out)[&format!("base_model.model.{name}.lora_A.weight")];
        assert_eq!(fa.shape[0], want);
        assert_eq!(fa.ty, Ty::BF16, "the chat model's dtype");
    }
}

#[test]
fn embed_lora_decomposes_the_embeddings_in_pefts_transposed_layout() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::F32, 1);
    let out = d.path().join("adapter");
    ok(&extract(&t, &out, &["--rank", "3", "--embed-lora"]));
    let (a, chat, pre) = (adapter(&out), read_model(&t.chat), read_model(&t.pre));
    // embed_tokens [16, 8]: lora_embedding_A [r, 16], lora_embedding_B [8, r], delta = (B A)^T.
    let ea = &a["base_model.model.model.embed_tokens.lora_embedding_A"];
    let eb = &a["base_model.model.model.embed_tokens.lora_embedding_B"];
    assert_eq!((ea.shape.clone(), eb.shape.clone()), (vec![3, 16], vec![HIDDEN, 3]));
    let ba = product(eb, ea);
    let (r, c, cv) = matrix(&chat["model.embed_tokens.weight"]);
    let (_, _, pv) = matrix(&pre["model.embed_tokens.weight"]);
    let delta: Vec<f64> = cv.iter().zip(&pv).map(|(x, y)| x - y).collect();
    let err: f64 = (0..r)
        .flat_map(|i| (0..c).map(move |j| (i, j)))
        .map(|(i, j)| (delta[i * c + j] - ba[j * r + i]).powi(2))
        .sum();
    let s = singular_values(r, c, &delta);
    let best: f64 = s[3..].iter().map(|x| x * x).sum();
    assert!(err <= best * (1.0 + 1e-6) + 1e-12, "{err} vs {best}");
    // lm_head is a Linear layer: plain lora_A / lora_B.
    assert_eq!(a["base_model.model.lm_head.lora_A.weight"].shape, vec![3, HIDDEN]);
    let cfg = config(&out);
    let saved: Vec<&str> =
        cfg["modules_to_save"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(saved, ["input_layernorm", "norm"]);
}

#[test]
fn a_stored_vector_gives_the_pairs_factors_and_leaves_out_what_needs_weights() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::F32, 1);
    let vector = d.path().join("cv");
    ok(&extract(&t, &vector, &["--dtype", "f32"]));
    let (from_pair, from_vector) = (d.path().join("a1"), d.path().join("a2"));
    ok(&extract(&t, &from_pair, &["--rank", "2"]));
    let o = chatvec(&["extract", "--vector", s(&vector), "--rank", "2", "-o", s(&from_vector)]);
    ok(&o);
    assert!(stderr(&o).contains("stored vector holds differences only"), "{}", stderr(&o));
    let (p, v) = (adapter(&from_pair), adapter(&from_vector));
    for m in linear_modules() {
        let k = format!("base_model.model.{m}.lora_A.weight");
        assert_eq!(p[&k].data, v[&k].data, "{k}: the same difference, the same factors");
    }
    assert!(!v.keys().any(|k| k.contains("norm") || k.contains("embed")), "{:?}", v.keys());
    assert_eq!(config(&from_vector)["base_model_name_or_path"], s(&t.pre), "read from the vector's manifest");
}

#[test]
fn thread_count_does_not_change_a_byte() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 2);
    let (one, four) = (d.path().join("one"), d.path().join("four"));
    ok(&extract(&t, &one, &["--rank", "4", "--threads", "1"]));
    ok(&extract(&t, &four, &["--rank", "4", "--threads", "4"]));
    let f = "adapter_model.safetensors";
    assert_eq!(sha256_file(&one.join(f)), sha256_file(&four.join(f)));
}

#[test]
fn a_dry_run_writes_nothing_and_lists_the_modules() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let out = d.path().join("adapter");
    let o = extract(&t, &out, &["--rank", "4", "--dry-run"]);
    ok(&o);
    assert!(!out.exists());
    assert!(stdout(&o).contains("14 modules decomposed, 5 saved whole"), "{}", stdout(&o));
}

#[test]
fn bad_lora_requests_are_refused_naming_the_problem_and_writing_nothing() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let out = d.path().join("adapter");
    let refused = |args: &[&str], needle: &str| {
        let o = extract(&t, &out, args);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
        assert!(!out.exists(), "{args:?} left {out:?}");
    };
    refused(&["--rank", "0"], "--rank must be at least 1");
    refused(&["--embed-lora"], "--embed-lora shapes a LoRA adapter");
    refused(&["--rank", "2", "--keep", "0"], "--keep 0");
    refused(&["--rank", "2", "--rank-for", "mlp"], "expected REGEX=R");
    refused(&["--rank", "2", "--exclude", "."], "no module is left");
    // A pretrained model of another shape: named tensor by tensor.
    let other = d.path().join("other");
    let mut tensors = llama(1, 16, false, Ty::BF16);
    let k = tensors.iter_mut().find(|x| x.name == "model.layers.0.self_attn.q_proj.weight").unwrap();
    k.shape = vec![4, 16];
    write_model(&other, &tensors, 1, &common::config(16, false, LAYERS), None);
    let o =
        chatvec(&["extract", "--chat", s(&t.chat), "--pretrained", s(&other), "--rank", "2", "-o", s(&out)]);
    assert!(!o.status.success());
    assert!(
        stderr(&o)
            .contains("model.layers.0.self_attn.q_proj.weight: shape [8, 8] in the chat model, [4, 16]"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
    // A stored vector without --rank is already a vector.
    let o = chatvec(&["extract", "--vector", s(&t.chat), "-o", s(&out)]);
    assert!(stderr(&o).contains("give --rank R"), "{}", stderr(&o));
}

/// Loads both adapters and the two models in Python: per LoRA module, the
/// reconstruction error `||(chat - pre) - scaling * B @ A||_F` in f64 of
/// chatvec's adapter and mergekit's; then PEFT loads chatvec's adapter on
/// the pretrained model (bf16) and merges it, and the merged weights are
/// compared with `chatvec apply --lora`'s in bf16 ulps.
const PEERS: &str = r#"
import json, sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from peft import PeftModel
chat, pre, ours, theirs, applied = sys.argv[1:6]
c, p = load_file(chat + "/model.safetensors"), load_file(pre + "/model.safetensors")
def errors(d):
    a = load_file(d + "/adapter_model.safetensors")
    cfg = json.load(open(d + "/adapter_config.json"))
    out = {}
    for k in a:
        if not k.endswith("lora_A.weight"):
            continue
        m = k[len("base_model.model."):-len(".lora_A.weight")]
        r = a[k].shape[0]
        alpha = cfg["alpha_pattern"].get(m, cfg["lora_alpha"])
        ba = a[k.replace("lora_A", "lora_B")].double() @ a[k].double() * (alpha / r)
        delta = c[m + ".weight"].double() - p[m + ".weight"].double()
        out[m] = (delta - ba).norm().item() / delta.norm().item()
    return out
e_ours, e_theirs = errors(ours), errors(theirs)
base = AutoModelForCausalLM.from_pretrained(pre, dtype=torch.bfloat16)
merged = PeftModel.from_pretrained(base, ours).merge_and_unload().state_dict()
mine = load_file(applied + "/model.safetensors")
worst, same, total = 0, 0, 0
for k, v in mine.items():
    a, b = v.view(torch.int16).int(), merged[k].contiguous().view(torch.int16).int()
    worst = max(worst, (a - b).abs().max().item())
    same += (a == b).sum().item()
    total += a.numel()
print(json.dumps({"ours": e_ours, "theirs": e_theirs, "max_ulps": worst, "identical": same / total}))
"#;

/// mergekit-extract-lora (mergekit 0.1.5) and PEFT on the same tiny bf16
/// models: chatvec's reconstruction error per module is at most
/// mergekit's (up to bf16 rounding of the factors, 0.1%), PEFT loads and
/// merges chatvec's adapter, and its merge equals `chatvec apply --lora`'s
/// bit for bit.
#[test]
#[ignore = "needs mergekit 0.1.5 and peft: CHATVEC_SFT_PYTHON=$(scripts/sft-venv.sh) cargo test --test extract_lora -- --ignored"]
fn errors_are_at_most_mergekit_extract_loras_and_peft_merges_the_adapter() {
    let py =
        std::env::var_os("CHATVEC_SFT_PYTHON").map(std::path::PathBuf::from).expect("CHATVEC_SFT_PYTHON");
    let d = tempfile::tempdir().unwrap();
    // mergekit's Llama has each layer's post-attention norm.
    for (name, seed) in [("pre", 1), ("chat", 2)] {
        let mut shapes = llama_shapes(16, false);
        for l in 0..LAYERS {
            shapes.push((format!("model.layers.{l}.post_attention_layernorm.weight"), vec![HIDDEN]));
        }
        let t: Vec<T> = shapes
            .into_iter()
            .map(|(n, shape)| {
                let len: u64 = shape.iter().product();
                let data = (0..len as usize).flat_map(|i| Ty::BF16.encode(val(seed, &n, i))).collect();
                T { name: n, ty: Ty::BF16, shape, data }
            })
            .collect();
        write_model(&d.path().join(name), &t, 1, &common::config(16, false, LAYERS), None);
    }
    let (chat, pre) = (d.path().join("chat"), d.path().join("pre"));
    let (ours, theirs, applied) = (d.path().join("ours"), d.path().join("theirs"), d.path().join("applied"));
    ok(&chatvec(&[
        "-q",
        "extract",
        "--chat",
        s(&chat),
        "--pretrained",
        s(&pre),
        "--rank",
        "3",
        "-o",
        s(&ours),
    ]));
    let o = std::process::Command::new(&py)
        .args(["-m", "mergekit.scripts.extract_lora", "--model", s(&chat), "--base-model", s(&pre)])
        .args(["--out-path", s(&theirs), "--max-rank", "3"])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "mergekit-extract-lora: {}", String::from_utf8_lossy(&o.stderr));
    // The same modules, saved whole or decomposed, as mergekit chose them.
    let (mine, peer) = (adapter(&ours), adapter(&theirs));
    let keys = |m: &BTreeMap<String, T>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&mine), keys(&peer));
    let (cfg, peer_cfg) = (config(&ours), config(&theirs));
    let sorted = |v: &Value| {
        let mut x: Vec<String> =
            v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
        x.sort();
        x
    };
    assert_eq!(sorted(&cfg["target_modules"]), sorted(&peer_cfg["target_modules"]));
    assert_eq!(sorted(&cfg["modules_to_save"]), sorted(&peer_cfg["modules_to_save"]));
    ok(&chatvec(&["-q", "apply", "--base", s(&pre), "--lora", s(&ours), "-o", s(&applied)]));
    let o = std::process::Command::new(&py)
        .args(["-c", PEERS, s(&chat), s(&pre), s(&ours), s(&theirs), s(&applied)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    for (m, e) in r["ours"].as_object().unwrap() {
        let (e, theirs) = (e.as_f64().unwrap(), r["theirs"][m].as_f64().unwrap());
        assert!(e <= theirs * 1.001, "{m}: relative error {e} against mergekit's {theirs}");
    }
    // Bit for bit here (rank 3: the f32 sums and PEFT's two roundings agree
    // on every element); at large ranks PEFT's BLAS order and its rounding
    // of the product to bf16 before the add can move an element by one ulp.
    assert_eq!(r["max_ulps"], 0, "{r}");
    assert_eq!(r["identical"], 1.0, "{r}");
}

#[test]
fn mergekit_extract_loras_command_line_runs_unchanged() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let (ours, theirs_spelling) = (d.path().join("a"), d.path().join("b"));
    ok(&extract(&t, &ours, &["--rank", "2", "--exclude", "mlp"]));
    ok(&chatvec(&[
        "extract",
        "--model",
        s(&t.chat),
        "--base-model",
        s(&t.pre),
        "--out-path",
        s(&theirs_spelling),
        "--max-rank",
        "2",
        "--exclude-regex",
        "mlp",
    ]));
    let f = "adapter_model.safetensors";
    assert_eq!(sha256_file(&ours.join(f)), sha256_file(&theirs_spelling.join(f)));
    assert!(!adapter(&ours).keys().any(|k| k.contains("mlp")));
}
