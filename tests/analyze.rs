//! `chatvec analyze`: every figure checked against an f64 computation
//! written here over the generated models' decoded values, for bf16 and f16
//! inputs, a tied model, a vocabulary-expanded base, a second vector and an
//! applied output; the pair checks; and the picture.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::{Value, json};

/// A tiny Llama whose weights are `val(seed)` plus `scale * val(delta_seed)`
/// (scale 0: the seed's own weights), so a chat model can sit a fine-tune's
/// distance from its pretrained model.
fn near(seed: u32, delta_seed: u32, scale: f32, vocab: u64, tied: bool, ty: Ty) -> Vec<T> {
    llama_shapes(vocab, tied)
        .into_iter()
        .map(|(name, shape)| {
            let n: u64 = shape.iter().product();
            let data = (0..n as usize)
                .flat_map(|i| ty.encode(val(seed, &name, i) + scale * val(delta_seed, &name, i)))
                .collect();
            T { name, ty, shape, data }
        })
        .collect()
}

struct Models {
    pre: PathBuf,
    chat: PathBuf,
    base: PathBuf,
    /// A second chat model of the same pretrained model.
    chat2: PathBuf,
}

/// pretrained = seed 1; chat = pre + 0.05 * seed 5; base (vocab
/// `base_vocab`) = pre + 0.1 * seed 6; chat2 = pre + 0.05 * (seed 5 + seed 7).
fn models(root: &Path, ty: Ty, base_vocab: u64, tied: bool) -> Models {
    let m = Models {
        pre: root.join("pre"),
        chat: root.join("chat"),
        base: root.join("base"),
        chat2: root.join("chat2"),
    };
    let cfg = |v| config(v, tied, LAYERS);
    write_model(&m.pre, &near(1, 5, 0.0, 16, tied, ty), 1, &cfg(16), Some(&tokens(16)));
    write_model(&m.chat, &near(1, 5, 0.05, 16, tied, ty), 1, &cfg(16), Some(&tokens(16)));
    write_model(
        &m.base,
        &near(1, 6, 0.1, base_vocab, tied, ty),
        2,
        &cfg(base_vocab),
        Some(&tokens(base_vocab as usize)),
    );
    let two: Vec<T> = near(1, 5, 0.05, 16, tied, ty)
        .into_iter()
        .map(|mut t| {
            let s = ty.size();
            for i in 0..t.numel() {
                let v = t.get(i) + 0.05 * val(7, &t.name, i);
                t.data[i * s..(i + 1) * s].copy_from_slice(&ty.encode(v));
            }
            t
        })
        .collect();
    write_model(&m.chat2, &two, 1, &cfg(16), Some(&tokens(16)));
    m
}

/// `chatvec apply` of `chat - pre` onto the base at `scale`, into `out`.
fn apply_at(m: &Models, scale: &str, out: &Path) {
    let (b, c, p) = (s(&m.base), s(&m.chat), s(&m.pre));
    ok(&chatvec(&[
        "-q",
        "apply",
        "--base",
        b,
        "--chat",
        c,
        "--pretrained",
        p,
        "--scale",
        scale,
        "-o",
        s(out),
    ]));
}

fn analyze(args: &[&str]) -> (Value, std::process::Output) {
    let mut a = vec!["--json", "-q", "analyze"];
    a.extend(args);
    let o = chatvec(&a);
    let v = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    (v, o)
}

/// f64 reference sums of one tensor.
#[derive(Default, Clone, Copy)]
struct Ref {
    n: f64,
    zeros: f64,
    vv: f64,
    max: f64,
    pre: f64,
    vv_b: f64,
    base: f64,
    vv_u: f64,
    uu: f64,
    vu: f64,
    agree: f64,
    both: f64,
    dv: f64,
    vv_o: f64,
}

impl Ref {
    fn add(&mut self, o: &Ref) {
        self.n += o.n;
        self.zeros += o.zeros;
        self.vv += o.vv;
        self.max = self.max.max(o.max);
        self.pre += o.pre;
        self.vv_b += o.vv_b;
        self.base += o.base;
        self.vv_u += o.vv_u;
        self.uu += o.uu;
        self.vu += o.vu;
        self.agree += o.agree;
        self.both += o.both;
        self.dv += o.dv;
        self.vv_o += o.vv_o;
    }
}

/// The tensor named `name` of a model (a tied model's lm_head is its embedding).
fn get<'a>(m: &'a BTreeMap<String, T>, name: &str) -> Option<&'a T> {
    m.get(name).or_else(|| (name == "lm_head.weight").then(|| m.get("model.embed_tokens.weight")).flatten())
}

/// Reference sums per tensor name: v = chat - pre; base, u = chat2 - pre and
/// applied compared over the rows they share with v.
fn reference(
    chat: &Path,
    pre: &Path,
    base: Option<&Path>,
    against: Option<(&Path, &Path)>,
    applied: Option<&Path>,
) -> BTreeMap<String, Ref> {
    let (c, p) = (read_model(chat), read_model(pre));
    let b = base.map(read_model);
    let u = against.map(|(c2, p2)| (read_model(c2), read_model(p2)));
    let o = applied.map(read_model);
    let mut out = BTreeMap::new();
    for (name, ct) in &c {
        let pt = &p[name];
        let mut r = Ref::default();
        let row =
            if ct.shape.len() >= 2 { ct.shape[1..].iter().product::<u64>() as usize } else { ct.numel() };
        for i in 0..ct.numel() {
            let v = ct.get(i) as f64 - pt.get(i) as f64;
            r.n += 1.0;
            r.zeros += f64::from(u8::from(v == 0.0));
            r.vv += v * v;
            r.max = r.max.max(v.abs());
            r.pre += (pt.get(i) as f64).powi(2);
            if let Some(bt) = b.as_ref().and_then(|b| get(b, name))
                && i < bt.numel()
                && bt.shape[1..] == ct.shape[1..]
            {
                r.vv_b += v * v;
                r.base += (bt.get(i) as f64).powi(2);
                if let Some(ot) = o.as_ref().and_then(|o| get(o, name)) {
                    r.dv += (ot.get(i) as f64 - bt.get(i) as f64) * v;
                    r.vv_o += v * v;
                }
            }
            if let Some((c2, p2)) = &u {
                let w = c2[name].get(i) as f64 - p2[name].get(i) as f64;
                r.vv_u += v * v;
                r.uu += w * w;
                r.vu += v * w;
                if v != 0.0 && w != 0.0 {
                    r.both += 1.0;
                    r.agree += f64::from(u8::from((v > 0.0) == (w > 0.0)));
                }
            }
        }
        let _ = row;
        out.insert(name.clone(), r);
    }
    out
}

fn close(got: &Value, want: f64, what: &str) {
    let g = got.as_f64().unwrap_or_else(|| panic!("{what}: {got}"));
    assert!((g - want).abs() <= 1e-9 * want.abs().max(1e-12), "{what}: {g} vs {want}");
}

/// Checks a figures object (tensor or group) against reference sums.
fn check(fig: &Value, r: &Ref, what: &str) {
    close(&fig["norm"], r.vv.sqrt(), &format!("{what} norm"));
    close(&fig["max_abs"], r.max, &format!("{what} max_abs"));
    close(&fig["zero_fraction"], r.zeros / r.n, &format!("{what} zero_fraction"));
    assert_eq!(fig["elements"].as_f64(), Some(r.n), "{what}");
    if r.pre > 0.0 {
        close(&fig["rel_norm_pretrained"], (r.vv / r.pre).sqrt(), &format!("{what} rel_norm_pretrained"));
    }
    if r.base > 0.0 {
        close(&fig["rel_norm_base"], (r.vv_b / r.base).sqrt(), &format!("{what} rel_norm_base"));
    }
    if r.uu > 0.0 {
        close(&fig["cosine"], r.vu / (r.vv_u * r.uu).sqrt(), &format!("{what} cosine"));
        close(&fig["sign_agreement"], r.agree / r.both, &format!("{what} sign_agreement"));
    }
    if r.vv_o > 0.0 {
        close(&fig["effective_scale"], r.dv / r.vv_o, &format!("{what} effective_scale"));
    }
}

fn check_report(rep: &Value, refs: &BTreeMap<String, Ref>) {
    let tensors = rep["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), refs.len());
    let mut layer0 = Ref::default();
    let mut all = Ref::default();
    let mut q = Ref::default();
    for t in tensors {
        let name = t["name"].as_str().unwrap();
        check(t, &refs[name], name);
        if name.starts_with("model.layers.0.") {
            layer0.add(&refs[name]);
        }
        if name.ends_with("q_proj.weight") {
            q.add(&refs[name]);
        }
        all.add(&refs[name]);
    }
    let group =
        |list: &str, g: &str| rep[list].as_array().unwrap().iter().find(|x| x["group"] == g).unwrap().clone();
    check(&group("layers", "0"), &layer0, "layer 0");
    check(&group("kinds", "q"), &q, "kind q");
    check(&rep["overall"], &all, "overall");
}

#[test]
fn figures_of_a_bf16_pair_with_base_against_and_applied_match_an_f64_reference() {
    let d = tempfile::tempdir().unwrap();
    let m = models(d.path(), Ty::BF16, 16, false);
    let out = d.path().join("applied");
    apply_at(&m, "0.7", &out);
    let (rep, o) = analyze(&[
        "--chat",
        s(&m.chat),
        "--pretrained",
        s(&m.pre),
        "--base",
        s(&m.base),
        "--against-chat",
        s(&m.chat2),
        "--against-pretrained",
        s(&m.pre),
        "--applied",
        s(&out),
    ]);
    ok(&o);
    let refs = reference(&m.chat, &m.pre, Some(&m.base), Some((&m.chat2, &m.pre)), Some(&out));
    check_report(&rep, &refs);
    // The applied output got the scale asked for, up to bf16 rounding.
    let eff = rep["overall"]["effective_scale"].as_f64().unwrap();
    assert!((eff - 0.7).abs() < 0.01, "{eff}");
    assert!(
        rep["findings"].as_array().unwrap().iter().all(|f| f["severity"] != "error"),
        "{}",
        rep["findings"]
    );
}

#[test]
fn f16_figures_and_a_stored_vector_match_the_pair() {
    let d = tempfile::tempdir().unwrap();
    let m = models(d.path(), Ty::F16, 16, false);
    let (pair, o) = analyze(&["--chat", s(&m.chat), "--pretrained", s(&m.pre), "--base", s(&m.base)]);
    ok(&o);
    check_report(&pair, &reference(&m.chat, &m.pre, Some(&m.base), None, None));
    // The same vector extracted in f32 (exact) gives the same figures, less
    // the pretrained-relative ones it cannot know.
    let v = d.path().join("v");
    ok(&chatvec(&[
        "-q",
        "extract",
        "--chat",
        s(&m.chat),
        "--pretrained",
        s(&m.pre),
        "--dtype",
        "f32",
        "-o",
        s(&v),
    ]));
    let (stored, o) = analyze(&["--vector", s(&v), "--base", s(&m.base)]);
    ok(&o);
    for key in ["norm", "rel_norm_base", "max_abs", "zero_fraction"] {
        assert_eq!(stored["overall"][key], pair["overall"][key], "{key}");
    }
    assert_eq!(stored["overall"]["rel_norm_pretrained"], Value::Null);
}

#[test]
fn an_expanded_base_vocabulary_is_compared_over_the_shared_rows() {
    let d = tempfile::tempdir().unwrap();
    let m = models(d.path(), Ty::BF16, 24, false);
    let (rep, o) = analyze(&["--chat", s(&m.chat), "--pretrained", s(&m.pre), "--base", s(&m.base)]);
    ok(&o);
    check_report(&rep, &reference(&m.chat, &m.pre, Some(&m.base), None, None));
}

#[test]
fn a_tied_pair_and_a_tied_base_are_read_through_the_shared_matrix() {
    let d = tempfile::tempdir().unwrap();
    let m = models(d.path(), Ty::BF16, 16, true);
    let (rep, o) = analyze(&["--chat", s(&m.chat), "--pretrained", s(&m.pre), "--base", s(&m.base)]);
    ok(&o);
    let refs = reference(&m.chat, &m.pre, Some(&m.base), None, None);
    assert!(!refs.contains_key("lm_head.weight"));
    check_report(&rep, &refs);
}

#[test]
fn figures_do_not_depend_on_threads() {
    let d = tempfile::tempdir().unwrap();
    let m = models(d.path(), Ty::BF16, 16, false);
    let args = ["--chat", s(&m.chat), "--pretrained", s(&m.pre), "--base", s(&m.base)];
    let (one, _) = analyze(&[&args[..], &["--threads", "1"]].concat());
    let (many, _) = analyze(&[&args[..], &["--threads", "3"]].concat());
    for k in ["tensors", "layers", "kinds", "overall", "findings"] {
        assert_eq!(one[k], many[k], "{k}");
    }
}

#[test]
fn a_whole_model_given_as_a_vector_is_flagged_and_exits_1() {
    let d = tempfile::tempdir().unwrap();
    let m = models(d.path(), Ty::BF16, 16, false);
    let (rep, o) = analyze(&["--vector", s(&m.chat), "--base", s(&m.base)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let f = &rep["findings"][0];
    assert_eq!(f["severity"], "error");
    assert!(f["what"].as_str().unwrap().contains("||v|| / ||W||"), "{f}");
    assert!(f["why"].as_str().unwrap().contains("whole model"), "{f}");
    assert!(stderr(&o).contains("fails 1 pair check"), "{}", stderr(&o));
    // An unrelated pair: about 140%.
    let other = d.path().join("other");
    write_model(&other, &llama(9, 16, false, Ty::BF16), 1, &config(16, false, LAYERS), Some(&tokens(16)));
    let (rep, o) = analyze(&["--chat", s(&other), "--pretrained", s(&m.pre)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(rep["findings"][0]["what"].as_str().unwrap().contains("against the pretrained model"));
}

#[test]
fn a_pair_with_other_rope_settings_is_flagged() {
    let d = tempfile::tempdir().unwrap();
    let m = models(d.path(), Ty::BF16, 16, false);
    let mut cfg = config(16, false, LAYERS);
    cfg["rope_theta"] = json!(10000.0);
    std::fs::write(m.chat.join("config.json"), cfg.to_string()).unwrap();
    let (rep, o) = analyze(&["--chat", s(&m.chat), "--pretrained", s(&m.pre)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let f = &rep["findings"][0];
    assert_eq!(f["severity"], "error");
    assert!(
        f["what"].as_str().unwrap().contains("RoPE") || f["what"].as_str().unwrap().contains("rope"),
        "{f}"
    );
    // The same models: the vector is zero.
    let (rep, o) = analyze(&["--chat", s(&m.pre), "--pretrained", s(&m.pre)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(rep["findings"].to_string().contains("zero in every tensor"));
}

#[test]
fn rows_untrained_in_the_pretrained_model_and_set_by_the_vector_are_named() {
    let d = tempfile::tempdir().unwrap();
    let m = models(d.path(), Ty::BF16, 16, false);
    // Row 3 ("t3", standing for <|eot_id|>) is all zeros in the pretrained
    // model's embeddings and head, and trained in the chat model.
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let mut ts = read_model(&m.pre).into_values().collect::<Vec<_>>();
        ts.sort_by_key(|t| llama_shapes(16, false).iter().position(|(n, _)| *n == t.name));
        for t in ts.iter_mut().filter(|t| t.name == name) {
            let row = (HIDDEN as usize) * 2;
            t.data[3 * row..4 * row].fill(0);
        }
        write_model(&m.pre, &ts, 1, &config(16, false, LAYERS), Some(&tokens(16)));
    }
    let (rep, o) = analyze(&["--chat", s(&m.chat), "--pretrained", s(&m.pre)]);
    ok(&o);
    let text = rep["findings"].to_string();
    assert!(text.contains("untrained in the pretrained model and set by the vector: t3 (3)"), "{text}");
}

#[test]
fn the_picture_is_a_well_formed_svg_with_lines_and_a_cosine_heatmap() {
    let d = tempfile::tempdir().unwrap();
    let m = models(d.path(), Ty::BF16, 16, false);
    let svg = d.path().join("cv.svg");
    let (_, o) = analyze(&[
        "--chat",
        s(&m.chat),
        "--pretrained",
        s(&m.pre),
        "--against-chat",
        s(&m.chat2),
        "--against-pretrained",
        s(&m.pre),
        "--plot",
        s(&svg),
    ]);
    ok(&o);
    let text = std::fs::read_to_string(&svg).unwrap();
    let doc = roxmltree::Document::parse(&text).expect("well-formed XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(root.tag_name().namespace(), Some("http://www.w3.org/2000/svg"));
    let count = |tag: &str| doc.descendants().filter(|n| n.tag_name().name() == tag).count();
    assert_eq!(count("polyline"), 7, "a line per projection kind");
    // 2 layers x 7 kinds of heatmap cells, each with its value as a tooltip.
    assert!(count("title") >= 14);
    assert!(!text.contains("<script") && !text.contains("href"), "self-contained");
    // An existing picture is replaced only with --force.
    let (_, o) = analyze(&["--chat", s(&m.chat), "--pretrained", s(&m.pre), "--plot", s(&svg)]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(std::fs::read_to_string(&svg).unwrap(), text);
    // --force replaces a picture, never another file (here an input's config).
    let cfg = m.chat.join("config.json");
    let before = std::fs::read(&cfg).unwrap();
    let (_, o) = analyze(&["--chat", s(&m.chat), "--pretrained", s(&m.pre), "--plot", s(&cfg), "--force"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("is not one"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&cfg).unwrap(), before);
    let (_, o) = analyze(&["--chat", s(&m.chat), "--pretrained", s(&m.pre), "--plot", s(&svg), "--force"]);
    ok(&o);
}

#[test]
fn the_effective_scale_of_a_layer_gradient_apply_reads_back_per_layer() {
    let d = tempfile::tempdir().unwrap();
    let m = models(d.path(), Ty::F32, 16, false);
    let out = d.path().join("applied");
    apply_at(&m, "[0.3, 1.0]", &out);
    let (rep, o) = analyze(&[
        "--chat",
        s(&m.chat),
        "--pretrained",
        s(&m.pre),
        "--base",
        s(&m.base),
        "--applied",
        s(&out),
    ]);
    ok(&o);
    let layer = |g: &str| {
        rep["layers"].as_array().unwrap().iter().find(|x| x["group"] == g).unwrap()["effective_scale"]
            .as_f64()
            .unwrap()
    };
    for (g, want) in [("embed", 0.3), ("0", 0.3), ("1", 1.0), ("head", 1.0)] {
        assert!((layer(g) - want).abs() < 1e-4, "layer {g}: {} vs {want}", layer(g));
    }
}

#[test]
fn vocabulary_rows_changed_alone_or_most_are_named_by_token() {
    let d = tempfile::tempdir().unwrap();
    let m = models(d.path(), Ty::F32, 16, false);
    let row = HIDDEN as usize * 4;
    let pre = read_model(&m.pre);
    let ordered = |mut ts: Vec<T>| {
        ts.sort_by_key(|t| llama_shapes(16, false).iter().position(|(n, _)| *n == t.name));
        ts
    };
    // The chat model differs from the pretrained one in row 5 of the
    // embeddings (an added token) and nowhere else in that matrix...
    let mut only = ordered(pre.values().cloned().collect());
    for t in only.iter_mut().filter(|t| t.name == "model.embed_tokens.weight") {
        for b in &mut t.data[5 * row..6 * row] {
            *b ^= 0x01;
        }
    }
    // ...and lm_head changes a little everywhere and a lot in row 3.
    for t in only.iter_mut().filter(|t| t.name == "lm_head.weight") {
        for i in 0..t.numel() {
            let big = if i / HIDDEN as usize == 3 { 1.0 } else { 0.001 };
            let v = t.get(i) + big * val(8, &t.name, i).signum();
            t.data[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
    }
    let chat = d.path().join("chat-rows");
    write_model(&chat, &only, 1, &config(16, false, LAYERS), Some(&tokens(16)));
    let (rep, o) = analyze(&["--chat", s(&chat), "--pretrained", s(&m.pre)]);
    ok(&o);
    let text = rep["findings"].to_string();
    assert!(text.contains("'model.embed_tokens.weight': only 1 of 16 rows differ: t5 (5)"), "{text}");
    assert!(
        text.contains("'lm_head.weight':") && text.contains("of the change is in 1 rows (1% of 16): t3 (3)"),
        "{text}"
    );
}

#[test]
fn a_picture_of_models_in_directories_with_control_characters_parses() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("runs\u{7}\u{1b}[31m\u{1}<&>");
    std::fs::create_dir(&root).unwrap();
    let m = models(&root, Ty::BF16, 16, false);
    let svg = d.path().join("cv.svg");
    let (_, o) = analyze(&[
        "--chat",
        s(&m.chat),
        "--pretrained",
        s(&m.pre),
        "--against-chat",
        s(&m.chat2),
        "--against-pretrained",
        s(&m.pre),
        "--plot",
        s(&svg),
    ]);
    ok(&o);
    let text = std::fs::read_to_string(&svg).unwrap();
    let doc = roxmltree::Document::parse(&text).expect("well-formed XML");
    assert!(
        doc.descendants().any(|n| n.text().is_some_and(|t| t.contains("runs\\u{7}\\u{1b}[31m\\u{1}<&>"))),
        "{text}"
    );
}

#[test]
fn a_relative_norm_well_above_fine_tuning_is_flagged_as_unusual() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(16, false, LAYERS);
    let pre = d.path().join("pre");
    write_model(&pre, &near(1, 5, 0.0, 16, false, Ty::F32), 1, &cfg, Some(&tokens(16)));
    for (scale, flagged) in [(0.02f32, false), (0.2, true), (0.35, true)] {
        let chat = d.path().join(format!("chat-{scale}"));
        write_model(&chat, &near(1, 5, scale, 16, false, Ty::F32), 1, &cfg, Some(&tokens(16)));
        let o = chatvec(&["analyze", "--chat", s(&chat), "--pretrained", s(&pre)]);
        ok(&o);
        let text = stdout(&o);
        assert_eq!(text.contains("well above the 0.1% to 5% fine-tuning gives"), flagged, "{scale}: {text}");
        assert_eq!(text.contains("findings: none"), !flagged, "{scale}: {text}");
    }
}

/// With `--against`, the modules of each layer where the two vectors pull
/// apart are listed: here the second vector is the first one negated in
/// layer 1's MLP and the same elsewhere, so exactly layer 1's gate, up and
/// down conflict, with the cosine an f64 sum gives.
#[test]
fn the_layers_and_modules_where_two_vectors_conflict_are_listed() {
    let d = tempfile::tempdir().unwrap();
    let m = models(d.path(), Ty::BF16, 16, false);
    let (pre, chat) = (read_model(&m.pre), read_model(&m.chat));
    let flipped = |name: &str| name.contains("layers.1.mlp");
    let other: Vec<T> = chat
        .values()
        .map(|t| {
            let mut t = t.clone();
            if flipped(&t.name) {
                let p = &pre[&t.name];
                for i in 0..t.numel() {
                    let v = 2.0 * p.get(i) - t.get(i);
                    t.data[i * 2..i * 2 + 2].copy_from_slice(&Ty::BF16.encode(v));
                }
            }
            t
        })
        .collect();
    let other_dir = d.path().join("other");
    write_model(&other_dir, &other, 1, &config(16, false, LAYERS), Some(&tokens(16)));
    // The pair against `against`: its JSON report, and its text.
    let against = |against: &Path| {
        let args = ["--chat", s(&m.chat), "--pretrained", s(&m.pre)];
        let args = [&args[..], &["--against-chat", s(against), "--against-pretrained", s(&m.pre)]].concat();
        let (rep, o) = analyze(&args);
        ok(&o);
        (rep, stdout(&chatvec(&[&["analyze"][..], &args].concat())))
    };
    let (rep, text) = against(&other_dir);
    let cells: Vec<(String, String)> = rep["conflicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["layer"].as_str().unwrap().to_string(), c["kind"].as_str().unwrap().to_string()))
        .collect();
    let want: Vec<(String, String)> =
        ["gate", "up", "down"].iter().map(|k| ("1".to_string(), k.to_string())).collect();
    assert_eq!(cells, want);
    let other = read_model(&other_dir);
    for (c, kind) in rep["conflicts"].as_array().unwrap().iter().zip(["gate", "up", "down"]) {
        let name = format!("model.layers.1.mlp.{kind}_proj.weight");
        let (mut vu, mut vv, mut uu) = (0f64, 0f64, 0f64);
        for i in 0..pre[&name].numel() {
            let v = chat[&name].get(i) as f64 - pre[&name].get(i) as f64;
            let u = other[&name].get(i) as f64 - pre[&name].get(i) as f64;
            (vu, vv, uu) = (vu + v * u, vv + v * v, uu + u * u);
        }
        let cos = vu / (vv.sqrt() * uu.sqrt());
        assert!(cos < -0.9, "{kind}: {cos}");
        close(&c["cosine"], cos, kind);
        close(&c["norms"][0], vv.sqrt(), kind);
        close(&c["norms"][1], uu.sqrt(), kind);
    }
    assert!(text.contains("conflicts (cosine < 0 or signs agree on under half"), "{text}");
    // The same vector against itself conflicts nowhere.
    let (rep, text) = against(&m.chat);
    assert!(text.contains("conflicts: none"), "{text}");
    assert_eq!(rep["conflicts"], json!([]));
}
