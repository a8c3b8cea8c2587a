//! The CUDA path. Without a GPU: the kernels still compile under NVRTC
//! (when NVRTC is found), `--device cuda` is one clear error, and `auto`
//! falls back to the CPU and says so. With a GPU: every method and dtype,
//! and apply/extract, give the same bytes on `--device cuda` as on
//! `--device cpu` (contract 1), also with small chunks that send jobs
//! through every slot and statistics over several chunks.

mod common;

use std::path::Path;

use common::*;

/// Whether a GPU can be opened; prints why not.
fn gpu() -> bool {
    match chatvec::cuda::open(0, None) {
        Ok(g) => {
            eprintln!("GPU: {}", g.describe());
            true
        }
        Err(e) => {
            eprintln!("skipping: no usable GPU ({e})");
            false
        }
    }
}

#[test]
fn kernels_compile_under_nvrtc() {
    // Hopper and Ampere targets; a compile error prints NVRTC's log.
    for (major, minor) in [(9, 0), (8, 0)] {
        match chatvec::cuda::compile_check(major, minor) {
            Ok(bytes) => assert!(bytes > 1000, "a CUBIN of {bytes} bytes"),
            Err(e) if e.contains("could not be loaded") => {
                eprintln!("skipping: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn device_cuda_without_a_gpu_is_one_clear_error_and_auto_falls_back() {
    if gpu() {
        eprintln!("skipping: a GPU is present");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let out = d.path().join("out");
    for dev in ["cuda", "cuda:1"] {
        let o = apply_streaming(&t, &out, &["--device", dev]);
        assert_eq!(o.status.code(), Some(chatvec::error::EXIT_INPUT), "{}", stderr(&o));
        let e = stderr(&o);
        assert!(e.contains(&format!("--device {}", if dev == "cuda" { "cuda:0" } else { dev })), "{e}");
        assert!(!e.contains("panicked"), "{e}");
        assert!(!out.exists());
    }
    let o = apply_streaming(&t, &out, &["--device", "auto"]);
    ok(&o);
    assert!(stderr(&o).contains("device: cpu (auto: no usable GPU"), "{}", stderr(&o));
    let cpu = d.path().join("cpu");
    ok(&apply_streaming(&t, &cpu, &["--device", "cpu"]));
    assert_eq!(shard_hashes(&out), shard_hashes(&cpu));
    let o = apply_streaming(&t, &d.path().join("bad"), &["--device", "tpu"]);
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
fn cuda_output_equals_cpu_output_for_every_method_and_dtype() {
    if !gpu() {
        return;
    }
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
