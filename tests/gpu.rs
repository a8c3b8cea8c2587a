//! The CUDA path. On any machine: `auto` says which device it chose and
//! gives the CPU's bytes, and a device that is not there is one clear
//! error. With a GPU (ignored elsewhere): every method and dtype, and
//! apply/extract, give the same bytes on `--device cuda` as on `--device
//! cpu` (contract 1), also with small chunks that send jobs through every
//! slot and statistics over several chunks. (The kernels' NVRTC compile
//! check is a unit test of src/cuda/kernels.rs.)

mod common;

use std::path::Path;

use common::*;

/// `--device auto` picks the GPU when one works, else the CPU, and says
/// which; either way the bytes are the CPU's. A device that does not exist
/// is one clear error (exit 1, no panic, nothing written), on any machine.
#[test]
fn auto_says_which_device_and_a_missing_device_is_one_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let out = d.path().join("out");
    let o = apply_streaming(&t, &out, &["--device", "auto"]);
    ok(&o);
    let e = stderr(&o);
    let gpu = e.contains("device: cuda:");
    assert!(gpu || e.lines().any(|l| l == "device: cpu"), "{e}");
    let cpu = d.path().join("cpu");
    ok(&apply_streaming(&t, &cpu, &["--device", "cpu"]));
    assert_eq!(shard_hashes(&out), shard_hashes(&cpu));

    let mut missing = vec!["cuda:99"];
    if !gpu {
        missing.push("cuda");
    }
    for dev in missing {
        let bad = d.path().join(format!("bad-{dev}"));
        let o = apply_streaming(&t, &bad, &["--device", dev]);
        assert_eq!(o.status.code(), Some(chatvec::EXIT_INPUT), "{}", stderr(&o));
        let e = stderr(&o);
        let named = if dev == "cuda" { "cuda:0" } else { dev };
        assert!(e.contains(&format!("error: --device {named}: ")), "{e}");
        assert!(!e.contains("panicked"), "{e}");
        assert!(!bad.exists());
    }
    let o = apply_streaming(&t, &d.path().join("tpu"), &["--device", "tpu"]);
    assert!(stderr(&o).contains("expected cpu, cuda, cuda:N or auto"), "{}", stderr(&o));
}

/// Base and three models with a vocabulary of 9000 rows (72,000-element
/// embeddings: two statistics blocks) in dtype `ty`.
fn models(root: &Path, ty: Ty) {
    for (name, seed) in [("base", 1), ("m1", 2), ("m2", 3), ("m3", 4)] {
        let t = llama(seed, 9000, false, ty);
        write_model(&root.join(name), &t, 2, &config(9000, false, LAYERS), None);
    }
}

const METHODS: &[(&str, &str)] = &[
    ("linear", "weight = 1.0\n"),
    ("task_arithmetic", "lambda = 0.7\n"),
    ("ties", "density = [0.3, 0.7]\n"),
    ("dare_linear", "density = 0.6\n"),
    ("dare_ties", "density = 0.6\nrescale = true\n"),
    ("breadcrumbs", "density = 0.6\ngamma = 0.1\n"),
    ("breadcrumbs_ties", "density = 0.6\ngamma = 0.1\n"),
    ("della", "density = 0.6\nepsilon = 0.2\n"),
    ("della_linear", "density = 0.6\nepsilon = 0.2\n"),
    ("slerp", "t = [0.2, 0.9]\n"),
    ("model_stock", "filter_wise = true\n"),
];

fn recipe(root: &Path, method: &str, params: &str, out_dtype: &str) -> String {
    let m = |n: &str| root.join(n).display().to_string();
    let models = if method == "slerp" {
        format!("models = [\"{}\"]\n", m("m1"))
    } else {
        ["m1", "m2", "m3"]
            .iter()
            .zip([0.5, 0.3, 0.2])
            .map(|(n, w)| format!("[[models]]\nmodel = \"{}\"\nparameters = {{ weight = {w} }}\n", m(n)))
            .collect()
    };
    let base = if method == "linear" { String::new() } else { format!("base_model = \"{}\"\n", m("base")) };
    format!(
        "merge_method = \"{method}\"\n{base}out_dtype = \"{out_dtype}\"\nseed = 7\n{models}[parameters]\n{params}"
    )
}

#[test]
#[ignore = "needs an NVIDIA GPU: run `cargo test --test gpu -- --ignored` on a GPU machine"]
fn cuda_output_equals_cpu_output_for_every_method_and_dtype() {
    let d = tempfile::tempdir().unwrap();
    for (ty, out_dtype) in [(Ty::BF16, "bfloat16"), (Ty::F16, "float16"), (Ty::F32, "float32")] {
        let root = d.path().join(ty.name());
        models(&root, ty);
        for (method, params) in METHODS {
            let path = root.join(format!("{method}.toml"));
            std::fs::write(&path, recipe(&root, method, params, out_dtype)).unwrap();
            let run = |dev: &str, extra: &[&str]| {
                let out = root.join(format!("{method}-{dev}-{}", extra.len()));
                let mut args = vec!["-q", "merge", s(&path), "-o", s(&out), "--device", dev];
                args.extend_from_slice(extra);
                ok(&chatvec(&args));
                shard_hashes(&out)
            };
            let cpu = run("cpu", &[]);
            assert_eq!(run("cuda", &[]), cpu, "{method} {out_dtype}");
            assert_eq!(run("cuda", &["--chunk-elems", "65536"]), cpu, "{method} {out_dtype}, small chunks");
        }
        // The chat vector family, streaming and stored, into each dtype.
        let t = Trio { pre: root.join("m1"), chat: root.join("m2"), base: root.join("base") };
        let cv = |dev: &str| {
            let v = root.join(format!("vector-{dev}"));
            ok(&extract(&t, &v, &["--device", dev, "--dtype", "f32"]));
            let a = root.join(format!("apply-{dev}"));
            ok(&apply_streaming(&t, &a, &["--device", dev, "--scale", "0.8", "--out-dtype", "f16"]));
            let b = root.join(format!("apply-stored-{dev}"));
            ok(&chatvec(&["apply", "--base", s(&t.base), "--vector", s(&v), "-o", s(&b), "--device", dev]));
            [shard_hashes(&v), shard_hashes(&a), shard_hashes(&b)]
        };
        assert_eq!(cv("cuda"), cv("cpu"), "chat vector {out_dtype}");
    }
}
