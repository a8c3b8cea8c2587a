//! `chatvec merge`: every method against a reference written here from the
//! definitions (f64 arithmetic over the f32 deltas), run through the real
//! binary on generated checkpoints.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use sha2::{Digest, Sha256};

/// Base (seed 1) and three models (seeds 2..4), bf16, a tiny Llama whose
/// embedding matrix has `vocab` rows.
struct Models {
    root: PathBuf,
}

impl Models {
    fn new(root: &Path, vocab: u64) -> Models {
        for (name, seed) in [("base", 1), ("m1", 2), ("m2", 3), ("m3", 4)] {
            let t = llama(seed, vocab, false, Ty::BF16);
            write_model(&root.join(name), &t, 1, &config(vocab, false, LAYERS), None);
        }
        Models { root: root.to_path_buf() }
    }
    fn dir(&self, n: &str) -> String {
        self.root.join(n).display().to_string()
    }
    fn read(&self, n: &str) -> BTreeMap<String, T> {
        read_model(&self.root.join(n))
    }
}

/// Writes `recipe` (TOML, with `{base}`, `{m1}`.. replaced) and merges it.
fn merge(m: &Models, recipe: &str, out: &Path, extra: &[&str]) -> BTreeMap<String, T> {
    let text = recipe
        .replace("{base}", &m.dir("base"))
        .replace("{m1}", &m.dir("m1"))
        .replace("{m2}", &m.dir("m2"))
        .replace("{m3}", &m.dir("m3"));
    let path = out.with_extension("toml");
    std::fs::write(&path, text).unwrap();
    let mut args = vec!["-q", "merge", path.to_str().unwrap(), "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    ok(&chatvec(&args));
    read_model(out)
}

fn vals(t: &T) -> Vec<f32> {
    (0..t.numel()).map(|i| t.get(i)).collect()
}

/// Asserts every tensor equals `reference(name, base, models)` within f32
/// rounding.
fn check(
    got: &BTreeMap<String, T>,
    base: &BTreeMap<String, T>,
    models: &[BTreeMap<String, T>],
    reference: impl Fn(&str, &[f32], &[Vec<f32>]) -> Vec<f64>,
) {
    assert_eq!(got.len(), base.len());
    for (name, bt) in base {
        let g = &got[name];
        assert_eq!(g.ty, Ty::F32, "{name}");
        let xs: Vec<Vec<f32>> = models.iter().map(|m| vals(&m[name])).collect();
        let want = reference(name, &vals(bt), &xs);
        for (i, w) in want.iter().enumerate() {
            let v = g.get(i) as f64;
            let tol = 2e-6 * (w.abs() + 1.0);
            assert!((v - w).abs() <= tol, "{name}[{i}]: got {v}, reference {w}");
        }
    }
}

fn deltas(b: &[f32], xs: &[Vec<f32>]) -> Vec<Vec<f32>> {
    xs.iter().map(|x| x.iter().zip(b).map(|(x, b)| x - b).collect()).collect()
}

/// Indices sorted by ascending |d| (f32 bits), equal magnitudes by index.
fn ascending(d: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..d.len()).collect();
    idx.sort_by_key(|&i| (d[i].abs().to_bits(), i));
    idx
}

/// Keeps ascending ranks lo..hi.
fn keep_ranks(d: &[f32], lo: usize, hi: usize) -> Vec<bool> {
    let mut keep = vec![false; d.len()];
    for &i in &ascending(d)[lo..hi.max(lo)] {
        keep[i] = true;
    }
    keep
}

/// The documented generator: SplitMix64 at counter index + 1.
fn uniform(seed: u64, tensor: &str, input: u64, index: u64) -> f32 {
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    let key = u64::from_le_bytes(Sha256::digest(tensor.as_bytes())[..8].try_into().unwrap());
    let stream = mix(mix(seed ^ key) ^ input);
    let u = mix(stream.wrapping_add((index + 1).wrapping_mul(0x9E3779B97F4A7C15)));
    (u >> 40) as f32 / (1u64 << 24) as f32
}

/// The task-arithmetic combination of already sparsified deltas.
fn combine(b: &[f32], e: &[Vec<f64>], w: &[f64], consensus: bool, normalize: bool, lambda: f64) -> Vec<f64> {
    (0..b.len())
        .map(|j| {
            let (mut mixed, mut div);
            if consensus {
                let sum: f64 = e.iter().map(|v| v[j]).sum();
                let major = if sum >= 0.0 { 1.0 } else { -1.0 };
                mixed = 0.0;
                div = 0.0;
                for (v, wi) in e.iter().zip(w) {
                    if v[j] != 0.0 && v[j].signum() == major {
                        mixed += v[j];
                        div += wi;
                    }
                }
                if div == 0.0 {
                    div = 1.0;
                }
            } else {
                mixed = e.iter().map(|v| v[j]).sum();
                div = w.iter().sum();
                if div.abs() < 1e-8 {
                    div = 1.0;
                }
            }
            if normalize {
                mixed /= div;
            }
            b[j] as f64 + lambda * mixed
        })
        .collect()
}

/// Masks, rescales (L1) and weights one delta.
fn sparsified(d: &[f32], keep: &[bool], rescale: bool, w: f64) -> Vec<f64> {
    let before: f64 = d.iter().map(|v| v.abs() as f64).sum();
    let after: f64 = d.iter().zip(keep).filter(|(_, k)| **k).map(|(v, _)| v.abs() as f64).sum();
    let f = if rescale && before >= 1e-7 && after >= 1e-7 { before / after } else { 1.0 };
    d.iter().zip(keep).map(|(v, k)| if *k { *v as f64 * f * w } else { 0.0 }).collect()
}

fn all_models(m: &Models) -> Vec<BTreeMap<String, T>> {
    ["m1", "m2", "m3"].iter().map(|n| m.read(n)).collect()
}

const THREE: &str = "[[models]]\nmodel = \"{m1}\"\nparameters = { weight = 0.5 }\n[[models]]\nmodel = \"{m2}\"\nparameters = { weight = 0.3 }\n[[models]]\nmodel = \"{m3}\"\nparameters = { weight = 0.2 }\n";

#[test]
fn linear_with_filters_matches_reference() {
    let d = tempfile::tempdir().unwrap();
    let m = Models::new(d.path(), 16);
    let recipe = format!(
        "merge_method = \"linear\"\nout_dtype = \"float32\"\n{THREE}[parameters]\nweight = [{{ filter = \"mlp\", value = 1.0 }}]\n"
    );
    // Per-model weights win over the global rule; the rule applies to nobody.
    let got = merge(&m, &recipe, &d.path().join("out"), &[]);
    check(&got, &m.read("m1"), &all_models(&m), |_, _, xs| {
        let w = [0.5, 0.3, 0.2];
        (0..xs[0].len()).map(|j| xs.iter().zip(w).map(|(x, w)| x[j] as f64 * w).sum::<f64>() / 1.0).collect()
    });
    // Global weights with a gradient over the two layers, no normalization.
    let recipe = "merge_method = \"linear\"\nout_dtype = \"float32\"\nmodels = [\"{m1}\", \"{m2}\"]\n[parameters]\nnormalize = false\nweight = [{ filter = \"self_attn\", value = [0.0, 1.0] }, { value = 0.25 }]\n";
    let got = merge(&m, recipe, &d.path().join("out2"), &[]);
    check(&got, &m.read("m1"), &all_models(&m)[..2], |name, _, xs| {
        let w = if name.contains("self_attn") {
            if name.contains("layers.0.") { 0.0 } else { 1.0 }
        } else {
            0.25
        };
        (0..xs[0].len()).map(|j| (xs[0][j] as f64 + xs[1][j] as f64) * w).collect()
    });
}

#[test]
fn task_arithmetic_and_ties_match_reference() {
    let d = tempfile::tempdir().unwrap();
    let m = Models::new(d.path(), 16);
    let base = m.read("base");
    let recipe = format!(
        "merge_method = \"task_arithmetic\"\nbase_model = \"{{base}}\"\nout_dtype = \"float32\"\n{THREE}[parameters]\nlambda = 0.7\n"
    );
    let got = merge(&m, &recipe, &d.path().join("ta"), &[]);
    let w = [0.5, 0.3, 0.2];
    check(&got, &base, &all_models(&m), |_, b, xs| {
        let e: Vec<Vec<f64>> = deltas(b, xs)
            .iter()
            .zip(w)
            .map(|(d, wi)| sparsified(d, &vec![true; d.len()], false, wi))
            .collect();
        combine(b, &e, &w, false, false, 0.7)
    });

    // TIES with a density gradient over the layers (t = 0 outside them).
    let recipe = format!(
        "merge_method = \"ties\"\nbase_model = \"{{base}}\"\nout_dtype = \"float32\"\n{THREE}[parameters]\ndensity = [0.3, 0.7]\n"
    );
    let got = merge(&m, &recipe, &d.path().join("ties"), &[]);
    check(&got, &base, &all_models(&m), |name, b, xs| {
        let density = if name.contains("layers.1.") { 0.7 } else { 0.3 };
        let e: Vec<Vec<f64>> = deltas(b, xs)
            .iter()
            .zip(w)
            .map(|(d, wi)| {
                let n = d.len();
                let k = ((density * n as f64) as usize).max(1);
                sparsified(d, &keep_ranks(d, n - k, n), false, wi)
            })
            .collect();
        combine(b, &e, &w, true, true, 1.0)
    });
}

#[test]
fn ties_threshold_is_exact_with_many_equal_magnitudes_and_any_chunking() {
    let d = tempfile::tempdir().unwrap();
    // 8200 x 8 embeddings: more than one 65536-element statistics block.
    let m = Models::new(d.path(), 8200);
    // m1's deltas take only four magnitudes, so the threshold falls inside
    // a long run of equal values.
    let base = m.read("base");
    let mut t1: Vec<T> = llama(2, 8200, false, Ty::BF16);
    for t in &mut t1 {
        let b = &base[&t.name];
        let v: Vec<f32> = (0..b.numel()).map(|i| b.get(i) + [0.5f32, -0.25, 0.125, -0.5][i % 4]).collect();
        t.data = v.iter().flat_map(|x| Ty::BF16.encode(*x)).collect();
    }
    write_model(&d.path().join("m1"), &t1, 1, &config(8200, false, LAYERS), None);
    let recipe = "merge_method = \"ties\"\nbase_model = \"{base}\"\nout_dtype = \"float32\"\n[[models]]\nmodel = \"{m1}\"\nparameters = { weight = 1.0, density = 0.37 }\n[[models]]\nmodel = \"{m2}\"\nparameters = { weight = 0.6, density = 0.37 }\n";
    let got = merge(&m, recipe, &d.path().join("a"), &["--threads", "1"]);
    let models = vec![m.read("m1"), m.read("m2")];
    check(&got, &base, &models, |_, b, xs| {
        let e: Vec<Vec<f64>> = deltas(b, xs)
            .iter()
            .zip([1.0, 0.6])
            .map(|(d, wi)| {
                let n = d.len();
                let k = ((0.37 * n as f64) as usize).max(1);
                let keep = keep_ranks(d, n - k, n);
                assert_eq!(keep.iter().filter(|k| **k).count(), k);
                sparsified(d, &keep, false, wi)
            })
            .collect();
        combine(b, &e, &[1.0, 0.6], true, true, 1.0)
    });
    let a = shard_hashes(&d.path().join("a"));
    merge(&m, recipe, &d.path().join("b"), &["--threads", "3", "--chunk-elems", "777"]);
    assert_eq!(a, shard_hashes(&d.path().join("b")), "output depends on threads or chunking");
}

#[test]
fn dare_and_della_use_the_documented_generator() {
    let d = tempfile::tempdir().unwrap();
    let m = Models::new(d.path(), 16);
    let base = m.read("base");
    let w = [0.5, 0.3, 0.2];
    for method in ["dare_linear", "dare_ties", "della", "della_linear"] {
        let recipe = format!(
            "merge_method = \"{method}\"\nbase_model = \"{{base}}\"\nout_dtype = \"float32\"\nseed = 42\n{THREE}[parameters]\ndensity = 0.6\nepsilon = 0.2\n"
        )
        .replace("epsilon = 0.2\n", if method.starts_with("della") { "epsilon = 0.2\n" } else { "" });
        let out = d.path().join(method);
        let got = merge(&m, &recipe, &out, &[]);
        let della = method.starts_with("della");
        let consensus = method == "dare_ties" || method == "della";
        let normalize = method == "della";
        check(&got, &base, &all_models(&m), |name, b, xs| {
            let rows = if base[name].shape.len() >= 2 { base[name].shape[0] as usize } else { 1 };
            let e: Vec<Vec<f64>> = deltas(b, xs)
                .iter()
                .zip(w)
                .enumerate()
                .map(|(k, (dl, wi))| {
                    let len = dl.len() / rows;
                    let keep: Vec<bool> = (0..dl.len())
                        .map(|i| {
                            let p = if della {
                                let row = &dl[i / len * len..(i / len + 1) * len];
                                let rank = ascending(row).iter().position(|&j| j == i % len).unwrap();
                                let rn = if len > 1 { rank as f32 / (len - 1) as f32 } else { 0.0 };
                                (0.6f64 - 0.2) as f32 + rn * 2.0 * 0.2f32
                            } else {
                                0.6
                            };
                            uniform(42, name, k as u64, i as u64) < p
                        })
                        .collect();
                    sparsified(dl, &keep, true, wi)
                })
                .collect();
            combine(b, &e, &w, consensus, normalize, 1.0)
        });
        // Same seed, same bytes; another seed, other masks.
        let again = d.path().join(format!("{method}-again"));
        merge(&m, &recipe, &again, &["--threads", "1", "--chunk-elems", "5"]);
        assert_eq!(shard_hashes(&out), shard_hashes(&again), "{method}");
        let other = d.path().join(format!("{method}-seed"));
        merge(&m, &recipe, &other, &["--seed", "7"]);
        assert_ne!(shard_hashes(&out), shard_hashes(&other), "{method}");
    }
}

#[test]
fn breadcrumbs_drop_outliers_and_small_values() {
    let d = tempfile::tempdir().unwrap();
    let m = Models::new(d.path(), 16);
    let base = m.read("base");
    let w = [0.5, 0.3, 0.2];
    for (method, consensus) in [("breadcrumbs", false), ("breadcrumbs_ties", true)] {
        let recipe = format!(
            "merge_method = \"{method}\"\nbase_model = \"{{base}}\"\nout_dtype = \"float32\"\n{THREE}[parameters]\ndensity = 0.6\ngamma = 0.1\n"
        );
        let got = merge(&m, &recipe, &d.path().join(method), &[]);
        check(&got, &base, &all_models(&m), |_, b, xs| {
            let e: Vec<Vec<f64>> = deltas(b, xs)
                .iter()
                .zip(w)
                .map(|(dl, wi)| {
                    let n = dl.len();
                    let target = (0.6 * n as f64) as usize;
                    let top = (0.1 * n as f64) as usize;
                    let bot = n.saturating_sub(target + top);
                    sparsified(dl, &keep_ranks(dl, bot, bot + target), false, wi)
                })
                .collect();
            combine(b, &e, &w, consensus, false, 1.0)
        });
    }
}

#[test]
fn slerp_and_model_stock_match_reference() {
    let d = tempfile::tempdir().unwrap();
    let m = Models::new(d.path(), 16);
    let base = m.read("base");
    let recipe = "merge_method = \"slerp\"\nbase_model = \"{base}\"\nout_dtype = \"float32\"\nmodels = [\"{m1}\"]\n[parameters]\nt = [{ filter = \"mlp\", value = [0.2, 0.9] }, { value = 0.4 }]\n";
    let got = merge(&m, recipe, &d.path().join("slerp"), &[]);
    check(&got, &base, &[m.read("m1")], |name, a, xs| {
        let t = if name.contains("mlp") { if name.contains("layers.0.") { 0.2 } else { 0.9 } } else { 0.4 };
        let b = &xs[0];
        let na = a.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        let nb = b.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum::<f64>() / (na * nb);
        let (ca, cb) = if dot.abs() > 0.9995 {
            (1.0 - t, t)
        } else {
            let th = dot.clamp(-1.0, 1.0).acos();
            (((1.0 - t) * th).sin() / th.sin(), (t * th).sin() / th.sin())
        };
        a.iter().zip(b).map(|(x, y)| ca * *x as f64 + cb * *y as f64).collect()
    });

    for filter_wise in [false, true] {
        let recipe = format!(
            "merge_method = \"model_stock\"\nbase_model = \"{{base}}\"\nout_dtype = \"float32\"\nmodels = [\"{{m1}}\", \"{{m2}}\", \"{{m3}}\"]\n[parameters]\nfilter_wise = {filter_wise}\n"
        );
        let got = merge(&m, &recipe, &d.path().join(format!("stock-{filter_wise}")), &[]);
        check(&got, &base, &all_models(&m), |name, b, xs| {
            let rows =
                if filter_wise && base[name].shape.len() >= 2 { base[name].shape[0] as usize } else { 1 };
            let len = b.len() / rows;
            let ds = deltas(b, xs);
            let mut out = Vec::new();
            for r in 0..rows {
                let seg =
                    |v: &Vec<f32>| v[r * len..(r + 1) * len].iter().map(|x| *x as f64).collect::<Vec<_>>();
                let dd: Vec<Vec<f64>> = ds.iter().map(seg).collect();
                let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
                let mut cos = Vec::new();
                for i in 0..3 {
                    for j in i + 1..3 {
                        let dot: f64 = dd[i].iter().zip(&dd[j]).map(|(a, b)| a * b).sum();
                        cos.push((dot / (norm(&dd[i]) * norm(&dd[j])).max(1e-6)).clamp(-1.0, 1.0));
                    }
                }
                let c = cos.iter().sum::<f64>() / cos.len() as f64;
                let t = 3.0 * c / (1.0 + 2.0 * c);
                for j in r * len..(r + 1) * len {
                    let avg = xs.iter().map(|x| x[j] as f64).sum::<f64>() / 3.0;
                    out.push(t * avg + (1.0 - t) * b[j] as f64);
                }
            }
            out
        });
    }
}

#[test]
fn recipes_rerun_to_the_same_bytes_and_verify_says_what_differs() {
    let d = tempfile::tempdir().unwrap();
    let m = Models::new(d.path(), 16);
    let recipe = format!(
        "merge_method = \"dare_ties\"\nbase_model = \"{{base}}\"\nseed = 9\n{THREE}[parameters]\ndensity = 0.5\n"
    );
    let a = d.path().join("a");
    merge(&m, &recipe, &a, &[]);
    let b = d.path().join("b");
    merge(&m, &recipe, &b, &["--threads", "1"]);
    assert_eq!(shard_hashes(&a), shard_hashes(&b));
    for f in ["README.md", "config.json"] {
        assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap(), "{f}");
    }
    let card = std::fs::read_to_string(a.join("README.md")).unwrap();
    assert!(card.contains("**dare_ties**") && card.contains("merge_method = \"dare_ties\""), "{card}");
    let man: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("chatvec-manifest.json")).unwrap()).unwrap();
    assert_eq!(man["kind"], "merge");
    assert_eq!(man["recipe"]["sha256"], sha256_file(&a.with_extension("toml")));
    assert_eq!(man["parameters"]["method"], "dare_ties");
    assert_eq!(man["parameters"]["seed"], 9);
    assert_eq!(man["inputs"].as_array().unwrap().len(), 4);
    check_manifest_hashes(&a);

    let rec = a.with_extension("toml");
    let o = chatvec(&["verify", s(&a), "--recipe", s(&rec)]);
    ok(&o);
    assert!(stdout(&o).contains("OK:"), "{}", stdout(&o));

    // A changed recipe, a changed input, a tampered shard, a stray file.
    std::fs::write(&rec, std::fs::read_to_string(&rec).unwrap().replace("seed = 9", "seed = 10")).unwrap();
    let o = chatvec(&["verify", s(&a), "--recipe", s(&rec)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains(&format!("DIFFERS  recipe {}", s(&rec))), "{}", stdout(&o));
    let shard = a.join("model.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    std::fs::write(a.join("notes.txt"), "x").unwrap();
    std::fs::remove_file(a.join("README.md")).unwrap();
    let o = chatvec(&["verify", s(&a)]);
    assert_eq!(o.status.code(), Some(1));
    let text = stdout(&o);
    assert!(text.contains("DIFFERS  output model.safetensors: sha256"), "{text}");
    assert!(text.contains("MISSING  output README.md"), "{text}");
    assert!(text.contains("UNLISTED notes.txt"), "{text}");
    assert!(stderr(&o).contains("does not match its manifest"), "{}", stderr(&o));
    let o = chatvec(&["verify", s(d.path())]);
    assert!(stderr(&o).contains("has no chatvec-manifest.json"), "{}", stderr(&o));
}

#[test]
fn mergekit_yaml_configs_run_and_dry_run_prints_the_plan() {
    let d = tempfile::tempdir().unwrap();
    let m = Models::new(d.path(), 16);
    let yaml = format!(
        "merge_method: ties\nbase_model: {}\nmodels:\n  - model: {}\n    parameters:\n      weight: 0.5\n      density: 0.5\n  - model: {}\n    parameters:\n      weight: 0.5\n      density: 0.5\n  - model: {}\nparameters:\n  normalize: true\ndtype: bfloat16\nout_dtype: float32\n",
        m.dir("base"),
        m.dir("m1"),
        m.dir("m2"),
        m.dir("base"),
    );
    let cfg = d.path().join("config.yml");
    std::fs::write(&cfg, &yaml).unwrap();
    let out = d.path().join("out");
    let o = chatvec(&["merge", s(&cfg), "-o", s(&out), "--dry-run"]);
    ok(&o);
    let plan = stdout(&o);
    assert!(plan.contains("model.layers.1.mlp.up_proj.weight F32 [12, 8]: ties base="), "{plan}");
    assert!(plan.contains("(weight=0.5, density=0.5)") && plan.contains("normalize=true"), "{plan}");
    assert!(!out.exists());
    // The base listed among the models is the base, as in mergekit.
    let got = {
        ok(&chatvec(&["-q", "merge", s(&cfg), "-o", s(&out)]));
        read_model(&out)
    };
    // The config travels with the model as mergekit writes it, listed in
    // the manifest; the card says it is a merge (local paths are not Hub
    // ids, so no base_model).
    assert_eq!(std::fs::read_to_string(out.join("mergekit_config.yml")).unwrap(), yaml);
    let man: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("chatvec-manifest.json")).unwrap()).unwrap();
    assert!(man["files"].as_array().unwrap().iter().any(|f| f["file"] == "mergekit_config.yml"), "{man}");
    ok(&chatvec(&["verify", s(&out)]));
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    let front = card.strip_prefix("---\n").and_then(|c| c.split_once("---\n")).expect("front matter").0;
    let meta: serde_json::Value = serde_yaml_ng::from_str(front).unwrap();
    // Local inputs: no base_model for the Hub, so no relation to one.
    assert_eq!(meta["base_model_relation"], serde_json::Value::Null, "{card}");
    assert_eq!(meta["base_model"], serde_json::Value::Null, "{card}");
    assert_eq!(meta["pipeline_tag"], "text-generation", "{card}");
    let toml = "merge_method = \"ties\"\nbase_model = \"{base}\"\nout_dtype = \"float32\"\n[[models]]\nmodel = \"{m1}\"\nparameters = { weight = 0.5, density = 0.5 }\n[[models]]\nmodel = \"{m2}\"\nparameters = { weight = 0.5, density = 0.5 }\n";
    let same = merge(&m, toml, &d.path().join("t"), &[]);
    for (k, v) in &got {
        assert_eq!(v.data, same[k].data, "{k}");
    }
}

#[test]
fn bad_merges_are_named_and_leave_nothing() {
    let d = tempfile::tempdir().unwrap();
    let m = Models::new(d.path(), 16);
    // A model with other shapes (vocabulary 20) and one missing a tensor.
    write_model(&d.path().join("wide"), &llama(5, 20, false, Ty::BF16), 1, &config(20, false, LAYERS), None);
    let mut short = llama(6, 16, false, Ty::BF16);
    short.retain(|t| t.name != "model.norm.weight");
    write_model(&d.path().join("short"), &short, 1, &config(16, false, LAYERS), None);
    let cases: Vec<(String, &str)> = vec![
        (
            format!(
                "merge_method = \"ties\"\nbase_model = \"{}\"\nmodels = [\"{}\"]\nparameters = {{ weight = 1 }}\n",
                m.dir("base"),
                d.path().join("wide").display()
            ),
            "'model.embed_tokens.weight': ",
        ),
        (
            format!(
                "merge_method = \"ties\"\nbase_model = \"{}\"\nmodels = [\"{}\"]\nparameters = {{ weight = 1 }}\n",
                m.dir("base"),
                d.path().join("short").display()
            ),
            "'model.norm.weight' is missing from",
        ),
        (
            format!(
                "merge_method = \"ties\"\nbase_model = \"{}\"\nmodels = [\"{}\"]\n[parameters]\nweight = 1\ndensty = 0.5\n",
                m.dir("base"),
                m.dir("m1")
            ),
            "ties takes no parameter 'densty'",
        ),
        (
            format!(
                "merge_method = \"ties\"\nbase_model = \"{}\"\nmodels = [\"{}\"]\n",
                m.dir("base"),
                m.dir("m1")
            ),
            "ties needs parameter 'weight' of",
        ),
        (
            format!(
                "merge_method = \"della\"\nbase_model = \"{}\"\nmodels = [\"{}\"]\n[parameters]\nweight = 1\ndensity = 0.9\nepsilon = 0.2\n",
                m.dir("base"),
                m.dir("m1")
            ),
            "density 0.9 +/- epsilon 0.2 must stay inside (0, 1)",
        ),
        (
            format!(
                "merge_method = \"slerp\"\nbase_model = \"{}\"\nmodels = [\"{}\", \"{}\"]\n[parameters]\nt = 0.5\n",
                m.dir("base"),
                m.dir("m1"),
                m.dir("m2")
            ),
            "slerp needs exactly 1 model(s) besides the base, got 2",
        ),
        (
            format!("merge_method = \"model_stock\"\nmodels = [\"{}\", \"{}\"]\n", m.dir("m1"), m.dir("m2")),
            "model_stock needs a base model",
        ),
        (
            format!(
                "merge_method = \"linear\"\nmodels = [\"{}\", \"{}\"]\n[parameters]\nweight = [{{ filter = \"mlp\", value = 1 }}, {{ value = 0 }}]\n",
                m.dir("m1"),
                m.dir("m2")
            ),
            "the linear weights sum to 0",
        ),
        (
            format!(
                "merge_method = \"ties\"\nbase_model = \"{}\"\n[[models]]\nmodel = \"{}\"\nparameters = {{ weight = 1, lambda = 2 }}\n",
                m.dir("base"),
                m.dir("m1")
            ),
            "'lambda' applies to the whole merge",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let rec = d.path().join(format!("bad{i}.toml"));
        std::fs::write(&rec, text).unwrap();
        let out = d.path().join(format!("out{i}"));
        let o = chatvec(&["merge", s(&rec), "-o", s(&out)]);
        assert_eq!(o.status.code(), Some(1), "{want}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "want {want}\n got {}", stderr(&o));
        assert!(!out.exists(), "{want}");
    }
    assert!(!entries(d.path()).iter().any(|e| e.starts_with('.')), "{:?}", entries(d.path()));
    let o = chatvec(&["merge", "no-such-recipe", "-o", s(&d.path().join("x"))]);
    assert!(
        stderr(&o).contains("neither a file nor a shipped recipe (llama3-swallow-8b-chat-vector"),
        "{}",
        stderr(&o)
    );
}

/// Writes a tiny bf16 Llama (values `seed`) whose vocabulary is `toks`.
fn vocab_model(dir: &Path, seed: u32, toks: &[String]) {
    let n = toks.len() as u64;
    write_model(dir, &llama(seed, n, false, Ty::BF16), 1, &config(n, false, LAYERS), Some(toks));
}

/// 20 tokens: `base`'s reversed, minus t5, plus new0..new4.
fn wide_vocab(base: &[String]) -> Vec<String> {
    let mut v: Vec<String> = base.iter().rev().filter(|t| *t != "t5").cloned().collect();
    v.extend((0..5).map(|i| format!("new{i}")));
    v
}

#[test]
fn models_with_other_vocabularies_are_aligned_to_the_base_by_token() {
    let d = tempfile::tempdir().unwrap();
    let base_tokens = tokens(16);
    vocab_model(&d.path().join("base"), 1, &base_tokens);
    vocab_model(&d.path().join("m1"), 2, &base_tokens);
    let wide_tokens = wide_vocab(&base_tokens);
    vocab_model(&d.path().join("m2"), 3, &wide_tokens);
    let m = Models { root: d.path().to_path_buf() };
    let recipe = "merge_method = \"task_arithmetic\"\nbase_model = \"{base}\"\nout_dtype = \"float32\"\nmodels = [\"{m1}\", \"{m2}\"]\n[parameters]\nweight = 0.5\n";
    let out = d.path().join("out");
    let text =
        recipe.replace("{base}", &m.dir("base")).replace("{m1}", &m.dir("m1")).replace("{m2}", &m.dir("m2"));
    std::fs::write(out.with_extension("toml"), text).unwrap();
    let o = chatvec(&["merge", s(&out.with_extension("toml")), "-o", s(&out)]);
    ok(&o);
    assert!(
        stderr(&o).contains("model.embed_tokens.weight from") && stderr(&o).contains("15 of 16 rows"),
        "{}",
        stderr(&o)
    );
    let got = read_model(&out);
    let (b, m1, m2) = (m.read("base"), m.read("m1"), m.read("m2"));
    for (name, bt) in &b {
        let bv = vals(bt);
        let x1 = vals(&m1[name]);
        let x2 = vals(&m2[name]);
        let vocab = name.contains("embed_tokens") || name.contains("lm_head");
        let row = bt.shape.get(1).copied().unwrap_or(1) as usize;
        let want: Vec<f64> = (0..bv.len())
            .map(|j| {
                let d2 = if vocab {
                    let (r, c) = (j / row, j % row);
                    match wide_tokens.iter().position(|t| *t == base_tokens[r]) {
                        Some(wr) => x2[wr * row + c] - bv[j],
                        None => 0.0,
                    }
                } else {
                    x2[j] - bv[j]
                };
                bv[j] as f64 + 0.5 * (x1[j] - bv[j]) as f64 + 0.5 * d2 as f64
            })
            .collect();
        for (j, w) in want.iter().enumerate() {
            let v = got[name].get(j) as f64;
            assert!((v - w).abs() <= 2e-6 * (w.abs() + 1.0), "{name}[{j}]: {v} vs {w}");
        }
    }
}

/// The row mergekit gives an input that lacks a token, from the inputs'
/// rows (the base first; None where an input lacks it too): the one input
/// that has it, else the base's, else the mean of those that have it
/// (zeros where none has it).
fn mergekit_fill(rows: &[Option<f64>]) -> f64 {
    let present: Vec<f64> = rows.iter().flatten().copied().collect();
    match (present.len(), rows[0]) {
        (0, _) => 0.0,
        (1, _) => present[0],
        (_, Some(b)) => b,
        (n, None) => present.iter().sum::<f64>() / n as f64,
    }
}

#[test]
fn tokenizer_source_union_adds_every_models_tokens() {
    let d = tempfile::tempdir().unwrap();
    let base_tokens = tokens(16);
    vocab_model(&d.path().join("base"), 1, &base_tokens);
    let mut m1_tokens = base_tokens.clone();
    m1_tokens.push("new0".into());
    vocab_model(&d.path().join("m1"), 2, &m1_tokens);
    let wide_tokens = wide_vocab(&base_tokens);
    vocab_model(&d.path().join("m2"), 3, &wide_tokens);
    let m = Models { root: d.path().to_path_buf() };
    let recipe = "merge_method = \"task_arithmetic\"\nbase_model = \"{base}\"\nout_dtype = \"float32\"\ntokenizer_source = \"union\"\nmodels = [\"{m1}\", \"{m2}\"]\n[parameters]\nweight = 0.5\n";
    let out = d.path().join("out");
    let got = merge(&m, recipe, &out, &[]);
    let (b, m1, m2) = (m.read("base"), m.read("m1"), m.read("m2"));
    let union: Vec<String> = base_tokens.iter().cloned().chain((0..5).map(|i| format!("new{i}"))).collect();
    for (name, bt) in &b {
        let vocab = name.contains("embed_tokens") || name.contains("lm_head");
        let (bv, x1, x2) = (vals(bt), vals(&m1[name]), vals(&m2[name]));
        if !vocab {
            continue;
        }
        assert_eq!(got[name].shape, vec![21, HIDDEN], "{name}");
        let row = HIDDEN as usize;
        for r in 0..21 {
            let tok = &union[r];
            let own = |toks: &[String], x: &[f32], c: usize| {
                toks.iter().position(|t| t == tok).map(|i| x[i * row + c] as f64)
            };
            for c in 0..row {
                let b0 = if r < 16 { Some(bv[r * row + c] as f64) } else { None };
                let (h1, h2) = (own(&m1_tokens, &x1, c), own(&wide_tokens, &x2, c));
                let fill = mergekit_fill(&[b0, h1, h2]);
                let (vb, v1, v2) = (b0.unwrap_or(fill), h1.unwrap_or(fill), h2.unwrap_or(fill));
                let want = vb + 0.5 * (v1 - vb) + 0.5 * (v2 - vb);
                let v = got[name].get(r * row + c) as f64;
                assert!(
                    (v - want).abs() <= 2e-6 * (want.abs() + 1.0),
                    "{name}[{r},{c}] ({tok}): {v} vs {want}"
                );
            }
        }
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["vocab_size"], 21);
    let tj: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("tokenizer.json")).unwrap()).unwrap();
    let added: Vec<(u64, String)> = tj["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["id"].as_u64().unwrap(), t["content"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(added, (0..5).map(|i| (16 + i as u64, format!("new{i}"))).collect::<Vec<_>>());
    check_manifest_hashes(&out);
}

/// Linear has no base role: under `tokenizer_source: union` each model reads
/// its own rows of the union table (a token only one model has is that
/// model's row for both, so the weighted mean keeps it).
#[test]
fn linear_merge_with_a_union_vocabulary_reads_each_models_own_rows() {
    let d = tempfile::tempdir().unwrap();
    let m1_tokens = tokens(16);
    vocab_model(&d.path().join("m1"), 2, &m1_tokens);
    let wide_tokens = wide_vocab(&m1_tokens);
    vocab_model(&d.path().join("m2"), 3, &wide_tokens);
    let m = Models { root: d.path().to_path_buf() };
    let recipe = "merge_method = \"linear\"\nout_dtype = \"float32\"\ntokenizer_source = \"union\"\n[[models]]\nmodel = \"{m1}\"\nparameters = { weight = 0.25 }\n[[models]]\nmodel = \"{m2}\"\nparameters = { weight = 0.75 }\n";
    let out = d.path().join("out");
    let got = merge(&m, recipe, &out, &[]);
    let (x1, x2) = (m.read("m1"), m.read("m2"));
    let union: Vec<String> = m1_tokens.iter().cloned().chain((0..5).map(|i| format!("new{i}"))).collect();
    let row = HIDDEN as usize;
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let (a, b) = (vals(&x1[name]), vals(&x2[name]));
        assert_eq!(got[name].shape, vec![21, HIDDEN], "{name}");
        for (r, tok) in union.iter().enumerate() {
            let own = |toks: &[String], x: &[f32], c: usize| {
                toks.iter().position(|t| t == tok).map(|i| x[i * row + c] as f64)
            };
            for c in 0..row {
                let (h1, h2) = (own(&m1_tokens, &a, c), own(&wide_tokens, &b, c));
                let (v1, v2) = (h1.or(h2).unwrap(), h2.or(h1).unwrap());
                let want = (0.25 * v1 + 0.75 * v2) / (0.25 + 0.75);
                let v = got[name].get(r * row + c) as f64;
                assert!(
                    (v - want).abs() <= 2e-6 * (want.abs() + 1.0),
                    "{name}[{r},{c}] ({tok}): {v} vs {want}"
                );
            }
        }
    }
}

/// Linear with `tokenizer_source: base` and a model of another vocabulary:
/// the output has the base's rows; the model's rows are matched by token,
/// and a token it lacks takes the base's row (mergekit's fill).
#[test]
fn linear_merge_aligns_another_vocabulary_to_the_base_by_token() {
    let d = tempfile::tempdir().unwrap();
    let base_tokens = tokens(16);
    vocab_model(&d.path().join("base"), 1, &base_tokens);
    let wide_tokens = wide_vocab(&base_tokens);
    vocab_model(&d.path().join("m2"), 3, &wide_tokens);
    let m = Models { root: d.path().to_path_buf() };
    let yaml = format!(
        "merge_method: linear\nbase_model: {b}\ntokenizer_source: base\nout_dtype: float32\nmodels:\n  - model: {b}\n    parameters:\n      weight: 0.25\n  - model: {m2}\n    parameters:\n      weight: 0.75\n",
        b = m.dir("base"),
        m2 = m.dir("m2")
    );
    let cfg = d.path().join("linear.yml");
    std::fs::write(&cfg, yaml).unwrap();
    let out = d.path().join("out");
    let o = chatvec(&["merge", s(&cfg), "-o", s(&out)]);
    ok(&o);
    assert!(stderr(&o).contains("15 of 16 rows"), "{}", stderr(&o));
    let got = read_model(&out);
    let (b, x2) = (m.read("base"), m.read("m2"));
    for (name, bt) in &b {
        let (bv, mv) = (vals(bt), vals(&x2[name]));
        let vocab = name.contains("embed_tokens") || name.contains("lm_head");
        assert_eq!(got[name].shape, bt.shape, "{name}");
        let row = bt.shape.get(1).copied().unwrap_or(1) as usize;
        for j in 0..bv.len() {
            let other = if vocab {
                let (r, c) = (j / row, j % row);
                match wide_tokens.iter().position(|t| *t == base_tokens[r]) {
                    Some(wr) => mv[wr * row + c] as f64,
                    None => bv[j] as f64,
                }
            } else {
                mv[j] as f64
            };
            let want = 0.25 * bv[j] as f64 + 0.75 * other;
            let v = got[name].get(j) as f64;
            assert!((v - want).abs() <= 2e-6 * (want.abs() + 1.0), "{name}[{j}]: {v} vs {want}");
        }
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["vocab_size"], 16);
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|x| *x as f64).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// nearswap, ram, ramplus_tl and passthrough against f64 references of
/// mergekit's formulas.
#[test]
fn element_wise_newer_methods_match_reference() {
    let d = tempfile::tempdir().unwrap();
    let m = Models::new(d.path(), 16);
    let base = m.read("base");
    let head = "base_model = \"{base}\"\nout_dtype = \"float32\"\n";
    let recipe =
        format!("merge_method = \"nearswap\"\n{head}models = [\"{{m1}}\"]\n[parameters]\nt = 0.05\n");
    let got = merge(&m, &recipe, &d.path().join("nearswap"), &[]);
    check(&got, &base, &[m.read("m1")], |_, b, xs| {
        b.iter()
            .zip(&xs[0])
            .map(|(a, x)| {
                let (a, x) = (*a as f64, *x as f64);
                let w = (0.05 / (a - x).abs().max(1e-6)).clamp(0.0, 1.0);
                w * x + (1.0 - w) * a
            })
            .collect()
    });
    for (name, params) in
        [("ram", "epsilon = 0.5\n"), ("ramplus_tl", "epsilon = 0.5\nr = 0.5\nalpha = 0.3\n")]
    {
        let recipe = format!(
            "merge_method = \"{name}\"\n{head}models = [\"{{m1}}\", \"{{m2}}\", \"{{m3}}\"]\n[parameters]\n{params}"
        );
        let got = merge(&m, &recipe, &d.path().join(name), &[]);
        check(&got, &base, &all_models(&m), |_, b, xs| {
            let ds = deltas(b, xs);
            let counted = |i: usize, j: usize| ds[i][j].abs() > 0.5f32;
            let count = |j: usize| (0..3).filter(|&i| counted(i, j)).count();
            // ramplus_tl: per model, shared over unique counted elements.
            let lambda: Vec<f64> = (0..3)
                .map(|i| {
                    if name == "ram" {
                        return 1.0;
                    }
                    let shared = (0..b.len()).filter(|&j| counted(i, j) && count(j) > 1).count() as f64;
                    let unique = (0..b.len()).filter(|&j| counted(i, j) && count(j) == 1).count() as f64;
                    1.0 + 0.5 * (shared / unique.max(0.5)).clamp(0.0, 0.3)
                })
                .collect();
            (0..b.len())
                .map(|j| {
                    let c = count(j);
                    let sum: f64 = (0..3)
                        .filter(|&i| counted(i, j))
                        .map(|i| {
                            let z = ds[i][j] as f64;
                            if c == 1 { z * lambda[i] } else { z / c as f64 }
                        })
                        .sum();
                    b[j] as f64 + sum
                })
                .collect()
        });
    }
    // sce: variance top-k (ties by index: the later elements rank higher),
    // weights from the kept deltas' mean square, sign erasure.
    let recipe = format!(
        "merge_method = \"sce\"\n{head}models = [\"{{m1}}\", \"{{m2}}\", \"{{m3}}\"]\n[parameters]\nselect_topk = 0.3\n"
    );
    let got = merge(&m, &recipe, &d.path().join("sce"), &[]);
    check(&got, &base, &all_models(&m), |_, b, xs| {
        let ds = deltas(b, xs);
        let n = b.len();
        let var: Vec<f32> = (0..n)
            .map(|j| {
                let v: Vec<f64> = ds.iter().map(|d| d[j] as f64).collect();
                let mean = v.iter().sum::<f64>() / 3.0;
                (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 3.0) as f32
            })
            .collect();
        let nonzero = var.iter().filter(|v| **v != 0.0).count();
        let keep = (nonzero as f32 * 0.3f32) as usize;
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&j| (var[j].to_bits(), j));
        let mut kept = vec![false; n];
        order[n - keep..].iter().for_each(|&j| kept[j] = true);
        let dk: Vec<Vec<f64>> =
            ds.iter().map(|d| (0..n).map(|j| if kept[j] { d[j] as f64 } else { 0.0 }).collect()).collect();
        let means: Vec<f64> = dk.iter().map(|d| d.iter().map(|v| v * v).sum::<f64>() / n as f64).collect();
        let total: f64 = means.iter().sum();
        let w: Vec<f64> = means.iter().map(|m| m / total).collect();
        (0..n)
            .map(|j| {
                let sum: f64 = dk.iter().map(|d| d[j]).sum();
                let major = if sum >= 0.0 { 1.0 } else { -1.0 };
                let (mut merged, mut div) = (0.0, 0.0);
                for (d, wi) in dk.iter().zip(&w) {
                    if d[j] != 0.0 && d[j].signum() == major {
                        merged += wi * d[j];
                        div += wi;
                    }
                }
                b[j] as f64 + merged / f64::max(div, 1e-6)
            })
            .collect()
    });
    let recipe = "merge_method = \"passthrough\"\nout_dtype = \"float32\"\n[[models]]\nmodel = \"{m2}\"\nparameters = { scale = 0.5 }\n";
    let got = merge(&m, recipe, &d.path().join("passthrough"), &[]);
    check(&got, &base, &[m.read("m2")], |_, _, xs| xs[0].iter().map(|x| *x as f64 * 0.5).collect());
}

/// nuslerp (whole tensor, rows, columns), multislerp and karcher against
/// f64 references that follow mergekit's steps on the full vectors
/// (multislerp's tangent step and karcher's iteration included), not the
/// Gram-matrix shortcut chatvec takes.
#[test]
fn spherical_methods_match_reference() {
    let d = tempfile::tempdir().unwrap();
    let m = Models::new(d.path(), 16);
    let base = m.read("base");
    let two = "[[models]]\nmodel = \"{m1}\"\nparameters = { weight = 0.3 }\n[[models]]\nmodel = \"{m2}\"\nparameters = { weight = 0.7 }\n";
    let t = 0.7;
    for (tag, params) in [
        ("flat", ""),
        ("rows", "nuslerp_flatten = false\n"),
        ("cols", "nuslerp_flatten = false\nnuslerp_row_wise = true\n"),
    ] {
        let recipe = format!(
            "merge_method = \"nuslerp\"\nbase_model = \"{{base}}\"\nout_dtype = \"float32\"\n{two}[parameters]\n{params}"
        );
        let got = merge(&m, &recipe, &d.path().join(format!("nuslerp-{tag}")), &[]);
        let xs = [m.read("m1"), m.read("m2")];
        check(&got, &base, &xs, |name, b, xs| {
            let ds: Vec<Vec<f64>> = deltas(b, xs).iter().map(|v| f64s(v)).collect();
            let shape = &base[name].shape;
            let (rows, cols) =
                if shape.len() == 2 { (shape[0] as usize, shape[1] as usize) } else { (1, b.len()) };
            // The index sets of the vectors.
            let groups: Vec<Vec<usize>> = match tag {
                "rows" if rows > 1 => (0..rows).map(|r| (r * cols..(r + 1) * cols).collect()).collect(),
                "cols" if rows > 1 => (0..cols).map(|c| (0..rows).map(|r| r * cols + c).collect()).collect(),
                _ => vec![(0..b.len()).collect()],
            };
            let mut out: Vec<f64> = f64s(b);
            for g in groups {
                let v0: Vec<f64> = g.iter().map(|&i| ds[0][i]).collect();
                let v1: Vec<f64> = g.iter().map(|&i| ds[1][i]).collect();
                let (n0, n1) = (dot(&v0, &v0).sqrt().max(1e-7), dot(&v1, &v1).sqrt().max(1e-7));
                let cos = (dot(&v0, &v1) / (n0 * n1)).clamp(-1.0, 1.0);
                let (c0, c1) = if 1.0 - cos * cos <= 1e-16 {
                    (1.0 - t, t)
                } else {
                    let th = cos.acos();
                    (((1.0 - t) * th).sin() / th.sin(), (t * th).sin() / th.sin())
                };
                for (k, &i) in g.iter().enumerate() {
                    out[i] += c0 * v0[k] + c1 * v1[k];
                }
            }
            out
        });
    }

    let recipe =
        format!("merge_method = \"multislerp\"\nbase_model = \"{{base}}\"\nout_dtype = \"float32\"\n{THREE}");
    let got = merge(&m, &recipe, &d.path().join("multislerp"), &[]);
    check(&got, &base, &all_models(&m), |_, b, xs| {
        let ds: Vec<Vec<f64>> = deltas(b, xs).iter().map(|v| f64s(v)).collect();
        let w = [0.5, 0.3, 0.2];
        let eps = 1e-8;
        let norms: Vec<f64> = ds.iter().map(|v| dot(v, v).sqrt()).collect();
        let units: Vec<Vec<f64>> =
            ds.iter().zip(&norms).map(|(v, n)| v.iter().map(|x| x / (n + eps)).collect()).collect();
        let mut mean = vec![0.0; b.len()];
        for (u, wi) in units.iter().zip(w) {
            mean.iter_mut().zip(u).for_each(|(m, x)| *m += wi * x);
        }
        let mn = dot(&mean, &mean).sqrt();
        mean.iter_mut().for_each(|x| *x /= mn);
        let mut tangent = vec![0.0; b.len()];
        for (u, wi) in units.iter().zip(w) {
            let dt = dot(u, &mean);
            tangent.iter_mut().zip(u.iter().zip(&mean)).for_each(|(t, (x, m))| *t += wi * (x - dt * m));
        }
        let tn = dot(&tangent, &tangent).sqrt() + eps;
        let avg: f64 = norms.iter().zip(w).map(|(n, wi)| n * wi).sum();
        (0..b.len()).map(|j| b[j] as f64 + avg * (mean[j] * tn.cos() + tangent[j] * tn.sin() / tn)).collect()
    });

    // karcher merges the base like the other inputs, equal weights.
    let recipe = "merge_method = \"karcher\"\nbase_model = \"{base}\"\nout_dtype = \"float32\"\nmodels = [\"{m1}\", \"{m2}\"]\n";
    let got = merge(&m, recipe, &d.path().join("karcher"), &[]);
    check(&got, &base, &[m.read("m1"), m.read("m2")], |_, b, xs| {
        let vs: Vec<Vec<f64>> = [b.to_vec(), xs[0].clone(), xs[1].clone()].iter().map(|v| f64s(v)).collect();
        let (tol, k) = (1e-5, 3.0);
        let norms: Vec<f64> = vs.iter().map(|v| dot(v, v).sqrt()).collect();
        let units: Vec<Vec<f64>> =
            vs.iter().zip(&norms).map(|(v, n)| v.iter().map(|x| x / n).collect()).collect();
        let mut u = vec![0.0; b.len()];
        for un in &units {
            u.iter_mut().zip(un).for_each(|(a, x)| *a += x / k);
        }
        let n = dot(&u, &u).sqrt();
        u.iter_mut().for_each(|x| *x /= n);
        for _ in 0..10 {
            let mut tg = vec![0.0; b.len()];
            for un in &units {
                let dt = dot(&u, un).clamp(-1.0, 1.0);
                let th = dt.acos();
                if th < tol {
                    continue;
                }
                tg.iter_mut()
                    .zip(un.iter().zip(&u))
                    .for_each(|(t, (x, m))| *t += th / th.sin() / k * (x - dt * m));
            }
            let tn = dot(&tg, &tg).sqrt();
            if tn < tol {
                break;
            }
            u = u.iter().zip(&tg).map(|(m, t)| tn.cos() * m + tn.sin() * t / tn).collect();
            let un = dot(&u, &u).sqrt();
            u.iter_mut().for_each(|x| *x /= un);
        }
        let scale = norms.iter().sum::<f64>() / k;
        u.iter().map(|x| scale * x).collect()
    });
}

/// slerp's t outside [0, 1] extrapolates along the arc (mergekit's
/// formula), and --device cuda names a method with no kernels.
#[test]
fn slerp_extrapolates_and_cpu_only_methods_refuse_cuda() {
    let d = tempfile::tempdir().unwrap();
    let m = Models::new(d.path(), 16);
    let base = m.read("base");
    let recipe = "merge_method = \"slerp\"\nbase_model = \"{base}\"\nout_dtype = \"float32\"\nmodels = [\"{m1}\"]\n[parameters]\nt = 1.5\n";
    let got = merge(&m, recipe, &d.path().join("slerp"), &[]);
    check(&got, &base, &[m.read("m1")], |_, a, xs| {
        let (a, b) = (f64s(a), f64s(&xs[0]));
        let cos = (dot(&a, &b) / (dot(&a, &a).sqrt() * dot(&b, &b).sqrt())).clamp(-1.0, 1.0);
        let th = cos.acos();
        let (ca, cb) = ((-0.5 * th).sin() / th.sin(), (1.5 * th).sin() / th.sin());
        a.iter().zip(&b).map(|(x, y)| ca * x + cb * y).collect()
    });
    let cfg = d.path().join("k.toml");
    std::fs::write(
        &cfg,
        format!("merge_method = \"karcher\"\nmodels = [\"{}\", \"{}\"]\n", m.dir("m1"), m.dir("m2")),
    )
    .unwrap();
    let o = chatvec(&["merge", s(&cfg), "-o", s(&d.path().join("k")), "--device", "cuda"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("merge method karcher runs on the CPU"), "{}", stderr(&o));
    std::fs::write(
        &cfg,
        format!(
            "merge_method = \"arcee_fusion\"\nbase_model = \"{}\"\nmodels = [\"{}\"]\n",
            m.dir("base"),
            m.dir("m1")
        ),
    )
    .unwrap();
    let o = chatvec(&["merge", s(&cfg), "-o", s(&d.path().join("fusion")), "--device", "cuda"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("merge method arcee_fusion runs on the CPU"), "{}", stderr(&o));
}

/// arcee_fusion against an f64 reference of mergekit's formula: per-row KL
/// of the softmaxes, importance |x - b| * kl, the threshold median + 1.5
/// IQR at mergekit's truncated quantile indices, the change kept where the
/// importance reaches it.
#[test]
fn arcee_fusion_matches_an_f64_reference() {
    let d = tempfile::tempdir().unwrap();
    let m = Models::new(d.path(), 16);
    let base = m.read("base");
    let recipe = "merge_method = \"arcee_fusion\"\nbase_model = \"{base}\"\nout_dtype = \"float32\"\nmodels = [\"{m1}\"]\n";
    let got = merge(&m, recipe, &d.path().join("fusion"), &[]);
    let shapes: BTreeMap<String, Vec<u64>> = llama_shapes(16, false).into_iter().collect();
    let kept = std::cell::Cell::new((0usize, 0usize));
    check(&got, &base, &[m.read("m1")], |name, b, xs| {
        let x = &xs[0];
        let row = *shapes[name].last().unwrap() as usize;
        let softmax = |v: &[f32]| {
            let mx = v.iter().map(|x| *x as f64).fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = v.iter().map(|x| (*x as f64 - mx).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(|x| x / s + 1e-8).collect::<Vec<f64>>()
        };
        let kl: Vec<f64> = x
            .chunks(row)
            .zip(b.chunks(row))
            .map(|(xr, br)| {
                let (p, q) = (softmax(xr), softmax(br));
                p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum()
            })
            .collect();
        let imp: Vec<f64> = (0..b.len()).map(|i| ((x[i] - b[i]) as f64).abs() * kl[i / row]).collect();
        let mut sorted = imp.clone();
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| sorted[(q * (sorted.len() - 1) as f64) as usize];
        let threshold = at(0.5) + 1.5 * (at(0.75) - at(0.25));
        let (k, n) = kept.get();
        kept.set((k + imp.iter().filter(|v| **v >= threshold).count(), n + imp.len()));
        (0..b.len()).map(|i| if imp[i] >= threshold { x[i] as f64 } else { b[i] as f64 }).collect()
    });
    let (k, n) = kept.get();
    assert!(k > 0 && k < n, "the threshold keeps some changes and not others: {k} of {n}");
}

/// Differences in bf16 units in the last place between two tensors
/// (same-signed values; a sign change counts as far).
/// mergekit 0.1.5 (`scripts/sft-venv.sh` installs it) on the same configs,
/// computing in float32 and writing bfloat16, as chatvec does: every
/// tensor within one bf16 ulp.
#[test]
#[ignore = "needs mergekit 0.1.5: CHATVEC_SFT_PYTHON=$(scripts/sft-venv.sh) cargo test --test merge -- --ignored"]
fn newer_methods_match_mergekit_within_one_ulp() {
    let py = std::env::var_os("CHATVEC_SFT_PYTHON").map(PathBuf::from).expect("CHATVEC_SFT_PYTHON");
    let d = tempfile::tempdir().unwrap();
    let m = Models::new(d.path(), 16);
    // mergekit's Llama also has each layer's post-attention norm. The
    // values are f32 off the fixture's grid, so no two of sce's variances
    // tie at its threshold (which torch's topk and chatvec break apart
    // differently).
    for (name, seed) in [("base", 1), ("m1", 2), ("m2", 3), ("m3", 4)] {
        let mut shapes = llama_shapes(16, false);
        for l in 0..LAYERS {
            shapes.push((format!("model.layers.{l}.post_attention_layernorm.weight"), vec![HIDDEN]));
        }
        let t: Vec<T> = shapes
            .into_iter()
            .map(|(n, shape)| {
                let len: u64 = shape.iter().product();
                let v = |i: usize| val(seed, &n, i) + ((i as f32 * 0.618_034 + seed as f32).sin() * 1e-3);
                let data = (0..len as usize).flat_map(|i| Ty::F32.encode(v(i))).collect();
                T { name: n, ty: Ty::F32, shape, data }
            })
            .collect();
        write_model(&d.path().join(name), &t, 1, &config(16, false, LAYERS), None);
    }
    let w2 = |a: &str, b: &str| {
        format!(
            "models:\n  - model: {a}\n    parameters:\n      weight: 0.3\n  - model: {b}\n    parameters:\n      weight: 0.7\n"
        )
    };
    let (base, m1, m2, m3) = (m.dir("base"), m.dir("m1"), m.dir("m2"), m.dir("m3"));
    let three = format!("models:\n  - model: {m1}\n  - model: {m2}\n  - model: {m3}\n");
    let configs = [
        ("nearswap", format!("base_model: {base}\nmodels:\n  - model: {m1}\nparameters:\n  t: 0.05\n")),
        ("ram", format!("base_model: {base}\n{three}parameters:\n  epsilon: 0.5\n")),
        ("ramplus_tl", format!("base_model: {base}\n{three}parameters:\n  epsilon: 0.5\n  r: 0.5\n")),
        ("nuslerp", format!("base_model: {base}\n{}", w2(&m1, &m2))),
        ("nuslerp", format!("{}parameters:\n  nuslerp_flatten: false\n", w2(&m1, &m2))),
        (
            "nuslerp",
            format!(
                "base_model: {base}\n{}parameters:\n  nuslerp_flatten: false\n  nuslerp_row_wise: true\n",
                w2(&m1, &m2)
            ),
        ),
        (
            "multislerp",
            format!(
                "base_model: {base}\n{}",
                w2(&m1, &m2)
                    .replace(
                        "weight: 0.7",
                        "weight: 0.7\n  - model: REPLACE\n    parameters:\n      weight: 1.5"
                    )
                    .replace("REPLACE", &m3)
            ),
        ),
        ("multislerp", w2(&m1, &m3)),
        ("karcher", format!("base_model: {base}\n{three}")),
        ("karcher", format!("{three}parameters:\n  max_iter: 3\n")),
        ("passthrough", format!("models:\n  - model: {m2}\n    parameters:\n      scale: 0.5\n")),
        ("slerp", format!("base_model: {base}\nmodels:\n  - model: {m1}\nparameters:\n  t: 1.5\n")),
        ("sce", format!("base_model: {base}\n{three}")),
        (
            "passthrough",
            format!(
                "slices:\n  - sources:\n      - model: {m1}\n        layer_range: [0, 2]\n  - sources:\n      - model: {m2}\n        layer_range: [1, 2]\n"
            ),
        ),
        (
            "slerp",
            format!(
                "base_model: {base}\nslices:\n  - sources:\n      - model: {base}\n        layer_range: [0, 2]\n      - model: {m1}\n        layer_range: [0, 2]\nparameters:\n  t: [0.2, 0.7]\n"
            ),
        ),
        ("sce", format!("base_model: {base}\n{three}parameters:\n  select_topk: 0.3\n")),
        ("arcee_fusion", format!("base_model: {base}\nmodels:\n  - model: {m1}\n")),
    ];
    for (i, (method, body)) in configs.iter().enumerate() {
        let cfg = d.path().join(format!("{i}.yml"));
        std::fs::write(&cfg, format!("merge_method: {method}\n{body}dtype: float32\nout_dtype: bfloat16\n"))
            .unwrap();
        let (ours, theirs) = (d.path().join(format!("cv-{i}")), d.path().join(format!("mk-{i}")));
        ok(&chatvec(&["-q", "merge", s(&cfg), "-o", s(&ours)]));
        let o = std::process::Command::new(&py)
            .args(["-m", "mergekit.scripts.run_yaml", s(&cfg), s(&theirs)])
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(o.status.success(), "mergekit on {method} #{i}: {}", String::from_utf8_lossy(&o.stderr));
        let (a, b) = (read_model(&ours), read_model(&theirs));
        assert_eq!(a.len(), b.len(), "{method} #{i}");
        for (name, t) in &a {
            assert_eq!(t.ty, Ty::BF16, "{name}");
            let u = bf16_ulps(t, &b[name]);
            assert!(u <= 1, "{method} #{i}: {name} differs from mergekit by {u} bf16 ulps");
        }
    }
}

/// mergekit-yaml's command line runs unchanged: the output positionally,
/// its flags with their meaning (or accepted with a note), --cuda as
/// --device cuda.
#[test]
fn mergekit_yaml_command_lines_run_unchanged() {
    let d = tempfile::tempdir().unwrap();
    let m = Models::new(d.path(), 16);
    let cfg = d.path().join("config.yml");
    std::fs::write(
        &cfg,
        format!(
            "merge_method: dare_ties\nbase_model: {}\nmodels:\n  - model: {}\n    parameters:\n      density: 0.5\n      weight: 1\n",
            m.dir("base"),
            m.dir("m1")
        ),
    )
    .unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let o = chatvec(&[
        "merge",
        s(&cfg),
        s(&a),
        "--no-cuda",
        "--copy-tokenizer",
        "--lazy-unpickle",
        "--allow-crimes",
        "--out-shard-size",
        "1B",
        "--trust-remote-code",
        "--lora-merge-cache",
        s(&d.path().join("cache")),
        "-j",
        "1",
        "--random-seed",
        "3",
    ]);
    ok(&o);
    for note in ["--lazy-unpickle: chatvec always reads", "--trust-remote-code: chatvec runs no model code"] {
        assert!(stderr(&o).contains(note), "{}", stderr(&o));
    }
    assert!(!d.path().join("cache").exists());
    // The same as chatvec's own spelling.
    ok(&chatvec(&["merge", s(&cfg), "-o", s(&b), "--seed", "3", "--device", "cpu"]));
    assert_eq!(shard_hashes(&a), shard_hashes(&b));
    // --cuda is --device cuda: here, the GPU error, not an unknown flag.
    let o = chatvec(&["merge", s(&cfg), s(&d.path().join("c")), "--cuda"]);
    assert!(!o.status.success());
    assert!(!stderr(&o).contains("unexpected argument") && stderr(&o).contains("cuda"), "{}", stderr(&o));
    let o = chatvec(&["merge", s(&cfg)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("name the output directory"), "{}", stderr(&o));
}

/// What chatvec does not run yet of mergekit's configs is refused with
/// the reason and what to do instead, never as a missing file or a parse
/// error.
#[test]
fn mergekit_features_not_yet_supported_say_why() {
    let d = tempfile::tempdir().unwrap();
    let m = Models::new(d.path(), 16);
    let cases = [(
        format!(
            "merge_method: linear\nmodels:\n  - model: {}\n---\nmerge_method: linear\nmodels:\n  - model: {}\n",
            m.dir("m1"),
            m.dir("m2")
        ),
        "only the final merge may be unnamed",
    )];
    for (i, (yaml, said)) in cases.iter().enumerate() {
        let cfg = d.path().join(format!("{i}.yml"));
        std::fs::write(&cfg, yaml).unwrap();
        let o = chatvec(&["merge", s(&cfg), s(&d.path().join(format!("out{i}")))]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains(said), "#{i}: {}", stderr(&o));
        assert!(!d.path().join(format!("out{i}")).exists());
    }
}

/// Reads one tensor's values of a model directory.
fn tensor_vals(dir: &Path, name: &str) -> Vec<f32> {
    vals(&read_model(dir)[name])
}

/// mergekit's slices: depth up-scaling by passthrough (the output layers
/// are the named source layers, renumbered, bytes unchanged), a per-slice
/// slerp with a gradient over each slice's layers, the config's layer
/// count and per-layer lists rebuilt, and the errors a bad slice gets.
#[test]
fn slices_build_frankenmerges_and_per_slice_merges() {
    let d = tempfile::tempdir().unwrap();
    let m = Models::new(d.path(), 16);
    // Per-layer config lists follow their layers.
    for (name, tag) in [("base", "b"), ("m1", "m")] {
        let p = d.path().join(name).join("config.json");
        let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        cfg["layer_types"] = serde_json::json!([format!("{tag}0"), format!("{tag}1")]);
        std::fs::write(&p, cfg.to_string()).unwrap();
    }
    let (base, m1) = (m.dir("base"), m.dir("m1"));
    let cfg = d.path().join("dus.yml");
    std::fs::write(
        &cfg,
        format!(
            "slices:\n  - sources:\n      - model: {base}\n        layer_range: [0, 2]\n  - sources:\n      - model: {m1}\n        layer_range: [1, 2]\n  - sources:\n      - model: {base}\n        layer_range: [0, 1]\nmerge_method: passthrough\n"
        ),
    )
    .unwrap();
    let out = d.path().join("dus");
    let o = chatvec(&["merge", s(&cfg), "--dry-run", "-o", s(&out)]);
    ok(&o);
    assert!(
        stdout(&o).contains(
            "model.layers.2.mlp.up_proj.weight BF16 [12, 8]: copy model:model.layers.1.mlp.up_proj.weight"
        ),
        "{}",
        stdout(&o)
    );
    ok(&chatvec(&["-q", "merge", s(&cfg), s(&out)]));
    let got = read_model(&out);
    let (b, x) = (m.read("base"), m.read("m1"));
    for (o, (src, l)) in [(0, (&b, 0)), (1, (&b, 1)), (2, (&x, 1)), (3, (&b, 0))] {
        for t in ["mlp.down_proj.weight", "self_attn.q_proj.weight", "input_layernorm.weight"] {
            let (gn, sn) = (format!("model.layers.{o}.{t}"), format!("model.layers.{l}.{t}"));
            assert_eq!(got[&gn].data, src[&sn].data, "{gn}");
        }
    }
    assert_eq!(got["model.embed_tokens.weight"].data, b["model.embed_tokens.weight"].data);
    assert_eq!(got["lm_head.weight"].data, b["lm_head.weight"].data);
    assert_eq!(got.len(), 3 + 4 * 8);
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(c["num_hidden_layers"], 4);
    assert_eq!(c["layer_types"], serde_json::json!(["b0", "b1", "m1", "b0"]));
    ok(&chatvec(&["verify", s(&out)]));

    // slerp per slice: t runs over each slice's layers (0 at its first: the
    // base; 1 at its last: the other model).
    let cfg = d.path().join("slerp.yml");
    std::fs::write(
        &cfg,
        format!(
            "slices:\n  - sources:\n      - model: {base}\n        layer_range: [0, 2]\n      - model: {m1}\n        layer_range: [0, 2]\nmerge_method: slerp\nbase_model: {base}\nparameters:\n  t: [0, 1]\nout_dtype: float32\n"
        ),
    )
    .unwrap();
    let out = d.path().join("slerp-slices");
    ok(&chatvec(&["-q", "merge", s(&cfg), s(&out)]));
    for (l, want) in [(0, &b), (1, &x)] {
        let n = format!("model.layers.{l}.mlp.up_proj.weight");
        let got = tensor_vals(&out, &n);
        for (g, w) in got.iter().zip(vals(&want[&n])) {
            assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "{n}: {g} vs {w}");
        }
    }

    // What a bad slice is told.
    for (yaml, said) in [
        (
            format!(
                "slices:\n  - sources:\n      - model: {base}\n        layer_range: [0, 3]\nmerge_method: passthrough\n"
            ),
            "runs past its 2 layers",
        ),
        (
            format!(
                "slices:\n  - sources:\n      - model: {base}\n        layer_range: [0, 2]\n      - model: {m1}\n        layer_range: [0, 1]\nmerge_method: linear\n"
            ),
            "the same number of layers",
        ),
        (
            format!(
                "slices:\n  - sources:\n      - model: {base}\n        layer_range: [0, 2]\n      - model: {m1}\n        layer_range: [0, 2]\nmerge_method: passthrough\n"
            ),
            "passthrough takes exactly 1 source",
        ),
        (
            format!(
                "slices:\n  - sources:\n      - model: {m1}\n        layer_range: [0, 2]\nmerge_method: task_arithmetic\nbase_model: {base}\n"
            ),
            "is not one of them",
        ),
        (
            format!(
                "slices:\n  - sources:\n      - model: {base}\n        layer_range: [1, 1]\nmerge_method: passthrough\n"
            ),
            "holds no layer",
        ),
        (
            format!(
                "models:\n  - model: {m1}\nslices:\n  - sources:\n      - model: {base}\n        layer_range: [0, 1]\nmerge_method: passthrough\n"
            ),
            "models or slices, not both",
        ),
    ] {
        let cfg = d.path().join("bad.yml");
        std::fs::write(&cfg, &yaml).unwrap();
        let o = chatvec(&["merge", s(&cfg), s(&d.path().join("bad-out"))]);
        assert_eq!(o.status.code(), Some(1), "{yaml}\n{}", stderr(&o));
        assert!(stderr(&o).contains(said), "{yaml}\n{}", stderr(&o));
        assert!(!d.path().join("bad-out").exists());
    }
}

/// Writes `template` into `dir`'s tokenizer_config.json.
fn set_template(dir: &Path, template: &str) {
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({"chat_template": template}).to_string(),
    )
    .unwrap();
}

/// mergekit's `chat_template`: a built-in format, the recipe's own Jinja,
/// or `auto` (the template most inputs share) replaces the reference's.
#[test]
fn chat_template_key_sets_the_outputs_template() {
    let d = tempfile::tempdir().unwrap();
    let m = Models::new(d.path(), 16);
    let own = "{% for m in messages %}{{ m['content'] }}{% endfor %}";
    set_template(&d.path().join("base"), "{{ 'base' }}{% for m in messages %}{% endfor %}");
    set_template(&d.path().join("m1"), own);
    set_template(&d.path().join("m2"), own);
    let template_of = |out: &Path| -> String {
        let c: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("tokenizer_config.json")).unwrap()).unwrap();
        c["chat_template"].as_str().unwrap().to_string()
    };
    let head = format!(
        "merge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: {}\n  - model: {}\nparameters:\n  weight: 0.5\n",
        m.dir("base"),
        m.dir("m1"),
        m.dir("m2")
    );
    for (i, (spec, want)) in [
        ("chatml", "<|im_start|>"),
        ("llama3", "<|start_header_id|>"),
        ("auto", own),
        ("\"{% for message in messages %}{{ message['content'] }}{% endfor %}\"", "{{ message['content'] }}"),
    ]
    .iter()
    .enumerate()
    {
        let cfg = d.path().join(format!("t{i}.yml"));
        std::fs::write(&cfg, format!("{head}chat_template: {spec}\n")).unwrap();
        let out = d.path().join(format!("t{i}"));
        let o = chatvec(&["merge", s(&cfg), s(&out)]);
        ok(&o);
        assert!(template_of(&out).contains(want), "{spec}: {}", template_of(&out));
        assert!(stderr(&o).contains("chat template:"), "{}", stderr(&o));
        ok(&chatvec(&["verify", s(&out)]));
    }
    let cfg = d.path().join("bad.yml");
    std::fs::write(&cfg, format!("{head}chat_template: vicuna\n")).unwrap();
    let o = chatvec(&["merge", s(&cfg), s(&d.path().join("bad"))]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("bad.yml") && stderr(&o).contains("neither auto, a built-in"),
        "{}",
        stderr(&o)
    );
    assert!(!d.path().join("bad").exists());
}

/// Every built-in chat template renders a conversation with transformers'
/// own Jinja environment, with the turns in order and the generation prompt.
#[test]
#[ignore = "needs transformers: CHATVEC_SFT_PYTHON=$(scripts/sft-venv.sh) cargo test --test merge -- --ignored"]
fn built_in_chat_templates_render_with_transformers() {
    let py = std::env::var_os("CHATVEC_SFT_PYTHON").map(PathBuf::from).expect("CHATVEC_SFT_PYTHON");
    let d = tempfile::tempdir().unwrap();
    let m = Models::new(d.path(), 16);
    for name in ["alpaca", "chatml", "exaone", "llama3", "mistral"] {
        let cfg = d.path().join(format!("{name}.yml"));
        std::fs::write(
            &cfg,
            format!("merge_method: linear\nmodels:\n  - model: {}\n    parameters:\n      weight: 1\nchat_template: {name}\n", m.dir("m1")),
        )
        .unwrap();
        let out = d.path().join(name);
        ok(&chatvec(&["-q", "merge", s(&cfg), s(&out)]));
        let script = r#"
import sys
from transformers.utils.chat_template_utils import _compile_jinja_template
t = open(sys.argv[1]).read()
msgs = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
out = _compile_jinja_template(t).render(messages=msgs, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
assert out.index("Q1") < out.index("A1") < out.index("Q2"), out
assert "SYS" in out, out
print(out)
"#;
        let o = std::process::Command::new(&py)
            .arg("-c")
            .arg(script)
            .arg(out.join("chat_template.jinja"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
    }
}

/// mergekit-multimerge's form: several documents in one config, named
/// merges used as models by later ones, run in dependency order (here the
/// file lists them backwards), each giving the bytes its own config gives.
#[test]
fn multi_document_configs_run_each_merge_in_order() {
    let d = tempfile::tempdir().unwrap();
    let m = Models::new(d.path(), 16);
    let (base, m1, m2, m3) = (m.dir("base"), m.dir("m1"), m.dir("m2"), m.dir("m3"));
    let first = format!(
        "merge_method: linear\nmodels:\n  - model: {m1}\n    parameters:\n      weight: 0.4\n  - model: {m2}\n    parameters:\n      weight: 0.6\n"
    );
    let second = |f: &str| {
        format!("merge_method: slerp\nbase_model: {f}\nmodels:\n  - model: {m3}\nparameters:\n  t: 0.3\n")
    };
    let last = |s: &str| {
        format!(
            "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {s}\n    parameters:\n      weight: 0.5\n"
        )
    };
    let cfg = d.path().join("multi.yml");
    std::fs::write(
        &cfg,
        format!("{}---\nname: second\n{}---\nname: first\n{first}", last("second"), second("first")),
    )
    .unwrap();
    let out = d.path().join("final");
    let o = chatvec(&["merge", s(&cfg), s(&out)]);
    ok(&o);
    let inter = d.path().join("final-intermediates");
    // The same three merges, one config each.
    let one = |name: &str, text: &str| {
        let p = d.path().join(format!("{name}.yml"));
        std::fs::write(&p, text).unwrap();
        let o = d.path().join(format!("sep-{name}"));
        ok(&chatvec(&["-q", "merge", s(&p), s(&o)]));
        o
    };
    let f = one("first", &first);
    let sc = one("second", &second(s(&f)));
    let l = one("last", &last(s(&sc)));
    for (a, b) in [(inter.join("first"), f), (inter.join("second"), sc), (out.clone(), l)] {
        assert_eq!(read_model(&a).len(), read_model(&b).len());
        for (name, t) in read_model(&a) {
            assert_eq!(t.data, read_model(&b)[&name].data, "{}: {name}", a.display());
        }
    }
    // Again: the intermediates are reused; --no-lazy makes them anew.
    let o = chatvec(&["merge", s(&cfg), s(&out), "--force"]);
    ok(&o);
    assert!(stderr(&o).contains("already holds this merge (reused"), "{}", stderr(&o));
    let o = chatvec(&["merge", s(&cfg), s(&out), "--force", "--no-lazy"]);
    ok(&o);
    assert!(!stderr(&o).contains("reused"), "{}", stderr(&o));
}

#[test]
fn bad_multi_document_configs_are_refused_naming_the_problem() {
    let d = tempfile::tempdir().unwrap();
    let m = Models::new(d.path(), 16);
    let (m1, m2) = (m.dir("m1"), m.dir("m2"));
    let doc = |name: &str, model: &str| {
        format!(
            "{name}merge_method: linear\nmodels:\n  - model: {model}\n    parameters:\n      weight: 1.0\n  - model: {m2}\n    parameters:\n      weight: 1.0\n"
        )
    };
    let out = d.path().join("out");
    for (text, needle) in [
        (format!("{}---\n{}", doc("name: a\n", &m1), doc("name: a\n", &m1)), "two documents are named 'a'"),
        (format!("{}---\n{}", doc("", &m1), doc("", &m1)), "only the final merge may be unnamed"),
        (
            format!("{}---\n{}", doc("name: a\n", "b"), doc("name: b\n", "a")),
            "depend on each other in a circle",
        ),
        (format!("{}---\n{}", doc("name: ../x\n", &m1), doc("", &m1)), "plain directory name"),
        (format!("{}---\n{}", doc("name: a\n", "a"), doc("", &m1)), "uses its own output"),
    ] {
        let cfg = d.path().join("bad.yml");
        std::fs::write(&cfg, &text).unwrap();
        let o = chatvec(&["merge", s(&cfg), s(&out)]);
        assert_eq!(o.status.code(), Some(1), "{text}");
        assert!(stderr(&o).contains(needle) && stderr(&o).contains("bad.yml"), "{needle}: {}", stderr(&o));
        assert!(!out.exists() && !d.path().join("out-intermediates").exists(), "{text}");
    }
}

/// `tokenizer_source: MODEL` (and the `tokenizer:` block's `source`): the
/// output vocabulary is that model's, each input's rows placed by token,
/// a token an input lacks filled as mergekit does (the one model that has
/// it, else the base's row, else the mean), checked in f64; the output's
/// tokenizer files are that model's and config.json's vocab_size its rows.
#[test]
fn tokenizer_source_model_takes_that_models_vocabulary() {
    let d = tempfile::tempdir().unwrap();
    let base_tokens = tokens(16);
    vocab_model(&d.path().join("base"), 1, &base_tokens);
    let mut m1_tokens = base_tokens.clone();
    m1_tokens.push("new0".into());
    vocab_model(&d.path().join("m1"), 2, &m1_tokens);
    let wide_tokens = wide_vocab(&base_tokens);
    vocab_model(&d.path().join("m2"), 3, &wide_tokens);
    let m = Models { root: d.path().to_path_buf() };
    let (b, m1, m2) = (m.read("base"), m.read("m1"), m.read("m2"));
    for (i, source) in
        ["tokenizer_source = \"{m2}\"\n", "tokenizer = { source = \"{m2}\" }\n"].iter().enumerate()
    {
        let recipe = format!(
            "merge_method = \"task_arithmetic\"\nbase_model = \"{{base}}\"\nout_dtype = \"float32\"\n{source}models = [\"{{m1}}\", \"{{m2}}\"]\n[parameters]\nweight = 0.5\n"
        );
        let out = d.path().join(format!("out{i}"));
        let got = merge(&m, &recipe, &out, &[]);
        let row = HIDDEN as usize;
        for (name, bt) in &b {
            let (bv, x1, x2) = (vals(bt), vals(&m1[name]), vals(&m2[name]));
            if !(name.contains("embed_tokens") || name.contains("lm_head")) {
                continue;
            }
            assert_eq!(got[name].shape, vec![wide_tokens.len() as u64, HIDDEN], "{name}");
            for (r, tok) in wide_tokens.iter().enumerate() {
                let own = |toks: &[String], x: &[f32], c: usize| {
                    toks.iter().position(|t| t == tok).map(|i| x[i * row + c] as f64)
                };
                for c in 0..row {
                    let (h0, h1, h2) =
                        (own(&base_tokens, &bv, c), own(&m1_tokens, &x1, c), own(&wide_tokens, &x2, c));
                    let fill = mergekit_fill(&[h0, h1, h2]);
                    let (vb, v1, v2) = (h0.unwrap_or(fill), h1.unwrap_or(fill), h2.unwrap_or(fill));
                    let want = vb + 0.5 * (v1 - vb) + 0.5 * (v2 - vb);
                    let v = got[name].get(r * row + c) as f64;
                    assert!(
                        (v - want).abs() <= 2e-6 * (want.abs() + 1.0),
                        "{name}[{r},{c}] ({tok}): {v} vs {want}"
                    );
                }
            }
        }
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["vocab_size"], wide_tokens.len());
        assert_eq!(
            std::fs::read(out.join("tokenizer.json")).unwrap(),
            std::fs::read(d.path().join("m2/tokenizer.json")).unwrap()
        );
        check_manifest_hashes(&out);
    }
    // A model the merge does not use, and a padding that is no whole number, are refused by name.
    for (source, said) in [
        ("tokenizer_source = \"elsewhere\"\n", "'elsewhere' is not one of the merge's models"),
        (
            "tokenizer = { source = \"union\", pad_to_multiple_of = 2.5 }\n",
            "pad_to_multiple_of: expected a whole number",
        ),
    ] {
        let text = format!(
            "merge_method = \"task_arithmetic\"\nbase_model = \"{}\"\n{}models = [\"{}\"]\n",
            m.dir("base"),
            source.replace("{m1}", &m.dir("m1")),
            m.dir("m1")
        );
        let cfg = d.path().join("bad.toml");
        std::fs::write(&cfg, text).unwrap();
        let o = chatvec(&["merge", s(&cfg), "-o", s(&d.path().join("bad"))]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains(said), "{said}: {}", stderr(&o));
    }
}

/// The `tokenizer:` block's `tokens`: a forced model row for every input, a
/// zero row for inputs that lack a token, and a row by id from another
/// model, as mergekit's `TokenEmbeddingConfig`s place them, checked in f64.
#[test]
fn tokenizer_tokens_place_the_rows_they_name() {
    let d = tempfile::tempdir().unwrap();
    let base_tokens = tokens(16);
    vocab_model(&d.path().join("base"), 1, &base_tokens);
    let mut m1_tokens = base_tokens.clone();
    m1_tokens.push("new0".into());
    vocab_model(&d.path().join("m1"), 2, &m1_tokens);
    let wide_tokens = wide_vocab(&base_tokens);
    vocab_model(&d.path().join("m2"), 3, &wide_tokens);
    let m = Models { root: d.path().to_path_buf() };
    let recipe = "merge_method = \"task_arithmetic\"\nbase_model = \"{base}\"\nout_dtype = \"float32\"\nmodels = [\"{m1}\", \"{m2}\"]\n[parameters]\nweight = 0.5\n[tokenizer]\nsource = \"union\"\n[tokenizer.tokens.new0]\nsource = \"{m2}\"\nforce = true\n[tokenizer.tokens.t5]\nsource = { kind = \"zero\" }\n[tokenizer.tokens.new1]\nsource = { kind = \"model_token\", model = \"{base}\", token_id = 2 }\n";
    let got = merge(&m, recipe, &d.path().join("out"), &[]);
    let (b, m1, m2) = (m.read("base"), m.read("m1"), m.read("m2"));
    let union: Vec<String> = base_tokens.iter().cloned().chain((0..5).map(|i| format!("new{i}"))).collect();
    let row = HIDDEN as usize;
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let xs =
            [(vals(&b[name]), &base_tokens), (vals(&m1[name]), &m1_tokens), (vals(&m2[name]), &wide_tokens)];
        assert_eq!(got[name].shape, vec![21, HIDDEN]);
        for (r, tok) in union.iter().enumerate() {
            for c in 0..row {
                let own =
                    |k: usize| xs[k].1.iter().position(|t| t == tok).map(|i| xs[k].0[i * row + c] as f64);
                let value = |k: usize| -> f64 {
                    match tok.as_str() {
                        "new0" => own(2).unwrap(),
                        "t5" => own(k).unwrap_or(0.0),
                        "new1" => own(k).unwrap_or(xs[0].0[2 * row + c] as f64),
                        _ => own(k).unwrap_or(mergekit_fill(&[own(0), own(1), own(2)])),
                    }
                };
                let (vb, v1, v2) = (value(0), value(1), value(2));
                let want = vb + 0.5 * (v1 - vb) + 0.5 * (v2 - vb);
                let v = got[name].get(r * row + c) as f64;
                assert!(
                    (v - want).abs() <= 2e-6 * (want.abs() + 1.0),
                    "{name}[{r},{c}] ({tok}): {v} vs {want}"
                );
            }
        }
    }
    // A rule naming a token the model lacks, or a row past its matrix, is an error.
    for (rule, said) in [
        ("[tokenizer.tokens.t5]\nsource = \"{m2}\"\n", "has no such token"),
        (
            "[tokenizer.tokens.t1]\nsource = { kind = \"model_token\", model = \"{m1}\", token_id = 99 }\n",
            "row 99 is beyond",
        ),
        (
            "[tokenizer.tokens.t1]\nsource = { kind = \"model_token\", model = \"{m1}\" }\n",
            "give token or token_id",
        ),
    ] {
        let text = format!(
            "merge_method = \"task_arithmetic\"\nbase_model = \"{}\"\nmodels = [\"{}\", \"{}\"]\n[parameters]\nweight = 0.5\n[tokenizer]\nsource = \"union\"\n{}",
            m.dir("base"),
            m.dir("m1"),
            m.dir("m2"),
            rule.replace("{m1}", &m.dir("m1")).replace("{m2}", &m.dir("m2"))
        );
        let cfg = d.path().join("bad.toml");
        std::fs::write(&cfg, text).unwrap();
        let o = chatvec(&["merge", s(&cfg), "-o", s(&d.path().join("bad"))]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains(said), "{said}: {}", stderr(&o));
        assert!(!d.path().join("bad").exists());
    }
}

/// `tokenizer.pad_to_multiple_of` rounds the vocabulary matrices' rows up
/// (the block's source is union, as in mergekit); each padding row is, in
/// each model, the mean of that model's rows over the vocabulary, then
/// merged like any row; config.json's vocab_size is the padded count.
#[test]
fn tokenizer_pad_to_multiple_of_pads_with_each_models_mean_row() {
    let d = tempfile::tempdir().unwrap();
    let base_tokens = tokens(16);
    vocab_model(&d.path().join("base"), 1, &base_tokens);
    let mut m1_tokens = base_tokens.clone();
    m1_tokens.push("new0".into());
    vocab_model(&d.path().join("m1"), 2, &m1_tokens);
    let m = Models { root: d.path().to_path_buf() };
    let recipe = "merge_method = \"task_arithmetic\"\nbase_model = \"{base}\"\nout_dtype = \"float32\"\nmodels = [\"{m1}\"]\n[parameters]\nweight = 0.5\n[tokenizer]\npad_to_multiple_of = 8\n";
    let out = d.path().join("out");
    let got = merge(&m, recipe, &out, &[]);
    let (b, m1) = (m.read("base"), m.read("m1"));
    let row = HIDDEN as usize;
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        assert_eq!(got[name].shape, vec![24, HIDDEN], "{name}");
        let (vb, v1) = (vals(&b[name]), vals(&m1[name]));
        // Each model's rows over the union vocabulary: the base lacks new0
        // and takes m1's row, the one model that has it.
        let base_row = |r: usize, c: usize| if r < 16 { vb[r * row + c] } else { v1[16 * row + c] } as f64;
        let m1_row = |r: usize, c: usize| v1[r * row + c] as f64;
        for r in 0..24 {
            for c in 0..row {
                let (xb, x1) = if r < 17 {
                    (base_row(r, c), m1_row(r, c))
                } else {
                    let mean = |f: &dyn Fn(usize, usize) -> f64| (0..17).map(|k| f(k, c)).sum::<f64>() / 17.0;
                    (mean(&base_row), mean(&m1_row))
                };
                let want = xb + 0.5 * (x1 - xb);
                let v = got[name].get(r * row + c) as f64;
                assert!((v - want).abs() <= 4e-6 * (want.abs() + 1.0), "{name}[{r},{c}]: {v} vs {want}");
            }
        }
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["vocab_size"], 24);
    // Not a whole number: refused by name.
    let bad = d.path().join("bad.toml");
    std::fs::write(
        &bad,
        recipe.replace("{base}", &m.dir("base")).replace("{m1}", &m.dir("m1")).replace("= 8", "= 0"),
    )
    .unwrap();
    let o = chatvec(&["merge", s(&bad), "-o", s(&d.path().join("bad"))]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("tokenizer.pad_to_multiple_of"), "{}", stderr(&o));
}

/// mergekit's `modules:` for a model of one module (`default`) is the
/// same merge as its slices or models at the top level, the module's
/// parameters before the top level's; several modules are refused.
#[test]
fn modules_default_is_the_top_level_merge_and_several_modules_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let m = Models::new(d.path(), 16);
    let (base, m1, m2) = (m.dir("base"), m.dir("m1"), m.dir("m2"));
    let run = |name: &str, yaml: String| {
        let cfg = d.path().join(format!("{name}.yml"));
        std::fs::write(&cfg, yaml).unwrap();
        let out = d.path().join(name);
        (chatvec(&["-q", "merge", s(&cfg), s(&out)]), out)
    };
    // Each pair: the modules form, then the top-level form of one merge.
    let pairs = [
        (
            "modules",
            format!(
                "merge_method: ties\nbase_model: {base}\nmodules:\n  default:\n    models:\n      - model: {m1}\n      - model: {m2}\n    parameters:\n      weight: 0.4\nparameters:\n  weight: 1.0\n  density: 0.5\n"
            ),
            format!(
                "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {m1}\n  - model: {m2}\nparameters:\n  weight: 0.4\n  density: 0.5\n"
            ),
        ),
        (
            "modules-slices",
            format!(
                "merge_method: passthrough\nmodules:\n  default:\n    slices:\n      - sources:\n          - model: {m1}\n            layer_range: [0, 2]\n      - sources:\n          - model: {m2}\n            layer_range: [1, 2]\n"
            ),
            format!(
                "merge_method: passthrough\nslices:\n  - sources:\n      - model: {m1}\n        layer_range: [0, 2]\n  - sources:\n      - model: {m2}\n        layer_range: [1, 2]\n"
            ),
        ),
    ];
    for (name, modules, top) in pairs {
        let (o, a) = run(name, modules);
        ok(&o);
        let (o, b) = run(&format!("{name}-top"), top);
        ok(&o);
        assert_eq!(shard_hashes(&a), shard_hashes(&b), "{name}");
    }
    for (i, (yaml, said)) in [
        (
            format!("merge_method: linear\nmodules:\n  text_decoder:\n    models: [{m1}]\n  vision_tower:\n    models: [{m1}]\n"),
            "per-module merges of a multimodal model",
        ),
        (format!("merge_method: linear\nmodules:\n  decoder:\n    models: [{m1}]\n"), "modules.decoder"),
        (
            format!("merge_method: linear\nmodels: [{m1}]\nmodules:\n  default:\n    models: [{m1}]\n"),
            "not both",
        ),
        (
            format!(
                "merge_method: linear\nmodules:\n  default:\n    models: [{m1}, {m2}]\n    parameters:\n      weight: [{{filter: mlp, value: 0.2}}]\nparameters:\n  weight: 0.5\n"
            ),
            "a filter list without a default entry",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let (o, out) = run(&format!("bad{i}"), yaml);
        assert_eq!(o.status.code(), Some(1), "#{i}: {}", stderr(&o));
        assert!(stderr(&o).contains(said), "#{i}: {}", stderr(&o));
        assert!(!out.exists());
    }
}
