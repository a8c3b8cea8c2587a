//! `apply` with several vectors in one pass (`--vector A --scale 1
//! --vector B --scale 0.5`, or chat/pretrained pairs): every element
//! checked against the documented f32 steps written here (bit for bit) and
//! an f64 sum (error bound), each `--scale` going with the vector before
//! it, vocabularies of each vector lined up on their own, and the
//! refusals.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// Two vector pairs beside a base: (pre, chat) seeds (1, 2) and (4, 5),
/// base seed 3; vocabularies as given (tokens `t0..`), the base's tokens
/// as given.
struct Five {
    base: std::path::PathBuf,
    pairs: [(std::path::PathBuf, std::path::PathBuf); 2],
}

fn five(root: &Path, ty: Ty, vocabs: [usize; 2], base_tokens: &[String]) -> Five {
    let n = base_tokens.len() as u64;
    let base = root.join("base");
    write_model(&base, &llama(3, n, false, ty), 2, &config(n, false, LAYERS), Some(base_tokens));
    let pairs = [(1, 2, vocabs[0], "a"), (4, 5, vocabs[1], "b")].map(|(ps, cs, v, tag)| {
        let (pre, chat) = (root.join(format!("pre-{tag}")), root.join(format!("chat-{tag}")));
        let v64 = v as u64;
        write_model(&pre, &llama(ps, v64, false, ty), 1, &config(v64, false, LAYERS), Some(&tokens(v)));
        write_model(&chat, &llama(cs, v64, false, ty), 1, &config(v64, false, LAYERS), Some(&tokens(v)));
        (pre, chat)
    });
    Five { base, pairs }
}

/// `apply` of the stored vector `va` then the second pair of `f` onto its
/// base, into `out`, with `extra` after (a `--scale` there is the pair's).
fn apply_stored_and_pair(f: &Five, va: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let (pre_b, chat_b) = &f.pairs[1];
    let mut args = vec!["apply", "--base", s(&f.base), "--vector", s(va), "--chat", s(chat_b)];
    args.extend(["--pretrained", s(pre_b), "-o", s(out), "-q"]);
    args.extend(extra);
    chatvec(&args)
}

/// The documented order: `acc = base`, then per vector in the order
/// given `m = s * d; acc = acc + m` (d the stored vector, or chat - pre,
/// one f32 subtraction), one rounding at the end.
fn steps(base: f32, terms: &[(f32, f32)]) -> f32 {
    let mut acc = base;
    for &(s, d) in terms {
        let m = s * d;
        acc += m;
    }
    acc
}

fn ulp(ty: Ty, x: f64) -> f64 {
    let mant = match ty {
        Ty::BF16 => 7,
        Ty::F16 => 10,
        _ => 23,
    };
    2f64.powf(x.abs().max(1e-30).log2().floor() - mant as f64)
}

fn manifest(out: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(out.join("chatvec-manifest.json")).unwrap()).unwrap()
}

/// A stored vector (bf16, from extract) and a pair streamed, scales 1
/// and -0.5 (and a layer gradient on the first in f32): each element is
/// the f32 steps bit for bit and within one output ulp (plus f32 slop) of
/// the f64 sum.
#[test]
fn two_vectors_follow_the_documented_f32_order_and_an_f64_reference() {
    for (ty, first_scale) in [(Ty::BF16, "1"), (Ty::F32, "[0.25, 1.0]"), (Ty::F16, "0.75")] {
        let d = tempfile::tempdir().unwrap();
        let f = five(d.path(), ty, [16, 16], &tokens(16));
        let v1 = d.path().join("v1");
        let [(pre_a, chat_a), (pre_b, chat_b)] = &f.pairs;
        ok(&chatvec(&["extract", "--chat", s(chat_a), "--pretrained", s(pre_a), "-o", s(&v1), "-q"]));
        let out = d.path().join("out");
        ok(&chatvec(&[
            "apply",
            "--base",
            s(&f.base),
            "--vector",
            s(&v1),
            "--scale",
            first_scale,
            "--chat",
            s(chat_b),
            "--pretrained",
            s(pre_b),
            "--scale",
            "-0.5",
            "-o",
            s(&out),
            "-q",
        ]));
        let (o, b, v, c, p) =
            (read_model(&out), read_model(&f.base), read_model(&v1), read_model(chat_b), read_model(pre_b));
        let man = manifest(&out);
        let scales = &man["parameters"]["tensor_scales"];
        assert_eq!(scales.as_array().map(Vec::len), Some(2), "{scales}");
        assert_eq!(man["parameters"]["scale"][1], -0.5, "{}", man["parameters"]);
        assert_eq!(o.len(), b.len());
        for (name, bt) in &b {
            let ot = &o[name];
            assert_eq!((ot.ty, &ot.shape), (ty, &bt.shape), "{name}");
            // The first vector's scale per tensor: 1, 0.75, or the
            // gradient's value at the tensor's layer (checked by hand).
            let s1 = scales[0][name].as_f64().unwrap() as f32;
            let want_s1 = match first_scale {
                "[0.25, 1.0]" if name.contains("layers.0.") || name.contains("embed") => 0.25,
                "[0.25, 1.0]" => 1.0,
                x => x.parse().unwrap(),
            };
            assert_eq!(s1, want_s1, "{name}");
            assert_eq!(scales[1][name], -0.5, "{name}");
            let sz = ty.size();
            for i in 0..bt.numel() {
                let (bv, vv, dv) = (bt.get(i), v[name].get(i), c[name].get(i) - p[name].get(i));
                let want = ty.encode(steps(bv, &[(s1, vv), (-0.5, dv)]));
                assert_eq!(&ot.data[i * sz..(i + 1) * sz], &want[..], "{ty:?} {name}[{i}]");
                let exact =
                    bv as f64 + s1 as f64 * vv as f64 - 0.5 * (c[name].get(i) as f64 - p[name].get(i) as f64);
                let slop = 4.0 * 2f64.powi(-24) * (bv.abs() + (s1 * vv).abs() + (0.5 * dv).abs()) as f64;
                let err = (ot.get(i) as f64 - exact).abs();
                assert!(err <= ulp(ty, exact) + slop, "{ty:?} {name}[{i}]: {} vs {exact}", ot.get(i));
            }
        }
        check_manifest_hashes(&out);
    }
}

/// A `--scale` goes with the vector written before it; a vector without
/// one takes 1. Writing the scale elsewhere changes the output.
#[test]
fn each_scale_goes_with_the_vector_before_it() {
    let d = tempfile::tempdir().unwrap();
    let f = five(d.path(), Ty::BF16, [16, 16], &tokens(16));
    let [(pre_a, chat_a), (pre_b, chat_b)] = &f.pairs;
    let (va, vb) = (d.path().join("va"), d.path().join("vb"));
    for (v, chat, pre) in [(&va, chat_a, pre_a), (&vb, chat_b, pre_b)] {
        ok(&chatvec(&["extract", "--chat", s(chat), "--pretrained", s(pre), "-o", s(v), "-q"]));
    }
    let run = |name: &str, args: &[&str]| {
        let out = d.path().join(name);
        let mut all = vec!["apply", "--base", s(&f.base), "-o", s(&out), "-q"];
        all.extend(args);
        ok(&chatvec(&all));
        (read_model(&out), manifest(&out))
    };
    let (implicit, m1) = run("implicit", &["--vector", s(&va), "--vector", s(&vb), "--scale", "0.5"]);
    let (explicit, _) =
        run("explicit", &["--vector", s(&va), "--scale", "1", "--vector", s(&vb), "--scale", "0.5"]);
    let (swapped, m3) = run("swapped", &["--vector", s(&va), "--scale", "0.5", "--vector", s(&vb)]);
    assert_eq!(m1["parameters"]["scale"], serde_json::json!([1.0, 0.5]));
    assert_eq!(m3["parameters"]["scale"], serde_json::json!([0.5, 1.0]));
    assert_eq!(m1["parameters"]["vector"], serde_json::json!([s(&va), s(&vb)]));
    let bytes =
        |m: &std::collections::BTreeMap<String, T>| m.values().map(|t| t.data.clone()).collect::<Vec<_>>();
    assert!(bytes(&implicit) == bytes(&explicit), "the same scales give the same bytes");
    assert!(bytes(&implicit) != bytes(&swapped), "the scale follows its vector");
    // A pair given as --pretrained then --chat with its scale after both.
    let (pair_first, m4) = run(
        "pairs",
        &[
            "--pretrained",
            s(pre_a),
            "--chat",
            s(chat_a),
            "--scale",
            "0.3",
            "--vector",
            s(&vb),
            "--scale",
            "0.5",
        ],
    );
    assert_eq!(m4["parameters"]["scale"], serde_json::json!([0.3, 0.5]));
    assert_eq!(m4["parameters"]["chat"], s(chat_a));
    assert!(bytes(&pair_first) != bytes(&implicit));
}

/// Each vector's vocabulary is lined up with the base's on its own: rows
/// both vectors have take both, rows only the second has take it alone,
/// the base's new tokens stay as they were.
#[test]
fn each_vector_lines_up_its_own_vocabulary_rows() {
    let d = tempfile::tempdir().unwrap();
    let mut toks = tokens(20);
    toks.swap(2, 7);
    toks.extend((0..4).map(|i| format!("ja{i}")));
    let f = five(d.path(), Ty::BF16, [16, 20], &toks);
    let [(pre_a, chat_a), (pre_b, chat_b)] = &f.pairs;
    let out = d.path().join("out");
    let o = chatvec(&[
        "apply",
        "--base",
        s(&f.base),
        "--chat",
        s(chat_a),
        "--pretrained",
        s(pre_a),
        "--scale",
        "0.5",
        "--chat",
        s(chat_b),
        "--pretrained",
        s(pre_b),
        "--scale",
        "2",
        "-o",
        s(&out),
        "--chunk-elems",
        "13",
    ]);
    ok(&o);
    // Each vector's rows are reported as its own.
    for (k, rows) in [(1, 16), (2, 20)] {
        let said = format!("lm_head.weight (vector {k}): {rows} of 24 rows got the vector (align)");
        assert!(stderr(&o).contains(&said), "{said}\n{}", stderr(&o));
    }
    let (got, b) = (read_model(&out), read_model(&f.base));
    let (ca, pa, cb, pb) = (read_model(chat_a), read_model(pre_a), read_model(chat_b), read_model(pre_b));
    let w = HIDDEN as usize;
    // Base row r holds token toks[r]; vector rows are t0.. in order.
    let row_of = |tok: &str, vocab: usize| {
        tok.strip_prefix('t').and_then(|n| n.parse::<usize>().ok()).filter(|&n| n < vocab)
    };
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        for (r, tok) in toks.iter().enumerate() {
            for j in 0..w {
                let i = r * w + j;
                let mut terms = Vec::new();
                if let Some(k) = row_of(tok, 16) {
                    terms.push((0.5, ca[name].get(k * w + j) - pa[name].get(k * w + j)));
                }
                if let Some(k) = row_of(tok, 20) {
                    terms.push((2.0, cb[name].get(k * w + j) - pb[name].get(k * w + j)));
                }
                let want = if terms.is_empty() {
                    b[name].data[i * 2..i * 2 + 2].to_vec()
                } else {
                    Ty::BF16.encode(steps(b[name].get(i), &terms))
                };
                assert_eq!(&got[name].data[i * 2..i * 2 + 2], &want[..], "{name} row {r} ({tok})");
            }
        }
    }
}

/// A tensor one vector's extract left out takes only the others.
#[test]
fn a_tensor_one_vector_left_out_takes_only_the_others() {
    let d = tempfile::tempdir().unwrap();
    let f = five(d.path(), Ty::BF16, [16, 16], &tokens(16));
    let [(pre_a, chat_a), (pre_b, chat_b)] = &f.pairs;
    let va = d.path().join("va");
    ok(&chatvec(&[
        "extract",
        "--chat",
        s(chat_a),
        "--pretrained",
        s(pre_a),
        "-o",
        s(&va),
        "--exclude",
        "mlp",
        "-q",
    ]));
    let out = d.path().join("out");
    ok(&apply_stored_and_pair(&f, &va, &out, &[]));
    let (got, b, v) = (read_model(&out), read_model(&f.base), read_model(&va));
    let (cb, pb) = (read_model(chat_b), read_model(pre_b));
    for (name, bt) in &b {
        for i in 0..bt.numel() {
            let mut terms = Vec::new();
            if !name.contains("mlp") {
                terms.push((1.0, v[name].get(i)));
            }
            terms.push((1.0, cb[name].get(i) - pb[name].get(i)));
            assert_eq!(
                &got[name].data[i * 2..i * 2 + 2],
                &Ty::BF16.encode(steps(bt.get(i), &terms))[..],
                "{name}[{i}]"
            );
        }
    }
    let scales = &manifest(&out)["parameters"]["tensor_scales"];
    assert!(scales[0].get("model.layers.0.mlp.up_proj.weight").is_none(), "{scales}");
    assert_eq!(scales[1]["model.layers.0.mlp.up_proj.weight"], 1.0);
}

/// Scales that cannot be paired, a sweep or the GPU with several vectors,
/// and a LoRA adapter beside a vector: one clear error, nothing written.
#[test]
fn scales_that_cannot_be_paired_and_unsupported_uses_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let f = five(d.path(), Ty::BF16, [16, 16], &tokens(16));
    let [(pre_a, chat_a), (pre_b, chat_b)] = &f.pairs;
    let out = d.path().join("out");
    let base = ["--base", s(&f.base), "-o", s(&out)];
    let a = ["--chat", s(chat_a), "--pretrained", s(pre_a)];
    let b = ["--chat", s(chat_b), "--pretrained", s(pre_b)];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        ([&["apply", "--scale", "2"][..], &a, &b, &base].concat(), "--scale 2 comes before any vector"),
        (
            [&["apply"][..], &a, &["--scale", "1", "--scale", "2"], &b, &base].concat(),
            "has two values of --scale",
        ),
        (
            [&["apply"][..], &a, &["--chat", s(chat_b)], &base].concat(),
            "each --chat needs its --pretrained (2 --chat, 1 --pretrained)",
        ),
        (
            [&["apply"][..], &a, &b, &["--device", "cuda"], &base].concat(),
            "several vectors are added in one pass on the CPU",
        ),
        (
            [&["sweep", "--scales", "0.5,1"][..], &a, &b, &base].concat(),
            "a sweep scales one vector; 2 were given",
        ),
        ([&["apply", "--lora", s(&f.base)][..], &a, &base].concat(), "cannot be used with"),
        (
            [&["apply", "--scale", "1", "--scale", "2"][..], &a, &base].concat(),
            "2 values of --scale for one vector",
        ),
    ];
    for (args, want) in cases {
        let o = chatvec(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(stderr(&o).contains(want), "{args:?}: want '{want}', got:\n{}", stderr(&o));
        assert!(!out.exists(), "{args:?} left {}", out.display());
    }
}

/// A chat_vector recipe's `[[vectors]]` is the command line's several
/// vectors: the same bytes, and `verify --recipe` finds the manifest's
/// parameters as the recipe gives them. Mixed or unpaired forms are
/// refused naming the key.
#[test]
fn a_recipe_lists_several_vectors_with_their_scales() {
    let d = tempfile::tempdir().unwrap();
    let f = five(d.path(), Ty::BF16, [16, 16], &tokens(16));
    let [(pre_a, chat_a), (pre_b, chat_b)] = &f.pairs;
    let va = d.path().join("va");
    ok(&chatvec(&["extract", "--chat", s(chat_a), "--pretrained", s(pre_a), "-o", s(&va), "-q"]));
    let cli = d.path().join("cli");
    ok(&apply_stored_and_pair(&f, &va, &cli, &["--scale", "[0.25, 0.75]", "--scale-for", "mlp=0.5"]));
    let recipe = d.path().join("two.toml");
    let text = format!(
        "merge_method = \"chat_vector\"\nbase_model = \"{}\"\n[parameters]\nscale = [{{ filter = \"mlp\", value = 0.5 }}]\n\
         [[vectors]]\nvector = \"{}\"\n[[vectors]]\nchat = \"{}\"\npretrained = \"{}\"\nscale = [0.25, 0.75]\n",
        f.base.display(),
        va.display(),
        chat_b.display(),
        pre_b.display()
    );
    std::fs::write(&recipe, &text).unwrap();
    let out = d.path().join("out");
    ok(&chatvec(&["merge", s(&recipe), "-o", s(&out), "-q"]));
    let (a, b) = (read_model(&cli), read_model(&out));
    assert!(a.iter().all(|(n, t)| b[n].data == t.data), "the recipe gives the command line's bytes");
    let v = chatvec(&["--json", "verify", s(&out), "--recipe", s(&recipe)]);
    ok(&v);
    let rep: Value = serde_json::from_slice(&v.stdout).unwrap();
    assert_eq!(rep["ok"], true, "{rep}");
    assert!(rep.to_string().contains("recipe parameter scale"), "{rep}");
    let base_line = format!("merge_method = \"chat_vector\"\nbase_model = \"{}\"\n", f.base.display());
    let entry = format!("[[vectors]]\nvector = \"{}\"\n", va.display());
    for (body, want) in [
        (format!("vector = \"{}\"\n{entry}", va.display()), "vectors: give the vectors either there"),
        (
            format!("[parameters]\nscale = 0.5\n{entry}"),
            "parameters.scale: with [[vectors]] each vector takes its own scale",
        ),
        (
            format!("{entry}scale = [{{ filter = \"mlp\", value = 0.5 }}]\n"),
            "vectors[0].scale: a number or a layer gradient",
        ),
        (
            format!("[[vectors]]\nchat = \"{}\"\n", chat_b.display()),
            "vectors[0]: give either vector, or both chat and pretrained",
        ),
        (format!("{entry}weight = 2\n"), "vectors[0]"),
        ("vectors = []\n".to_string(), "vectors: an empty list adds nothing"),
    ] {
        std::fs::write(&recipe, format!("{base_line}{body}")).unwrap();
        let bad = d.path().join("bad");
        let o = chatvec(&["merge", s(&recipe), "-o", s(&bad)]);
        assert!(!o.status.success(), "{body}");
        assert!(stderr(&o).contains(want), "{body}: want '{want}':\n{}", stderr(&o));
        assert!(!bad.exists());
    }
}
