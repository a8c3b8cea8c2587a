//! Models found by Hub id in a fake Hugging Face cache built in the real
//! layout (`models--org--name/{refs,snapshots,blobs}`, snapshot files as
//! relative symlinks into blobs/). Nothing touches the network.

mod common;

use std::path::Path;

use common::*;

const COMMIT_A: &str = "0123456789abcdef0123456789abcdef01234567";
const COMMIT_B: &str = "89abcdef0123456789abcdef0123456789abcdef";

/// Moves model directory `model` into `cache` as `org/name` at `commit`,
/// with `refs` naming it.
fn cache_model(cache: &Path, model: &Path, repo: &str, commit: &str, refs: &[&str]) {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snap = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo_dir.join("blobs")).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    for e in std::fs::read_dir(model).unwrap() {
        let p = e.unwrap().path();
        let blob = sha256_file(&p);
        std::fs::copy(&p, repo_dir.join("blobs").join(&blob)).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snap.join(p.file_name().unwrap())).unwrap();
    }
    for r in refs {
        std::fs::write(repo_dir.join("refs").join(r), commit).unwrap();
    }
}

fn with_cache(cache: &Path, args: &[&str]) -> std::process::Output {
    command()
        .env("HF_HUB_CACHE", cache)
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env("HF_HUB_OFFLINE", "1")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn hub_ids_resolve_in_the_cache_by_branch_tag_and_commit() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 2);
    let cache = d.path().join("hub");
    cache_model(&cache, &t.pre, "meta-llama/Meta-Llama-3-8B", COMMIT_A, &["main"]);
    cache_model(&cache, &t.chat, "meta-llama/Meta-Llama-3-8B-Instruct", COMMIT_B, &["main", "v1"]);
    cache_model(&cache, &t.base, "tokyotech-llm/Llama-3-Swallow-8B-v0.1", COMMIT_A, &["main"]);

    let local = d.path().join("local");
    ok(&apply_streaming(&t, &local, &["-q"]));
    let out = d.path().join("out");
    let o = with_cache(
        &cache,
        &[
            "-q",
            "apply",
            "--base",
            "tokyotech-llm/Llama-3-Swallow-8B-v0.1",
            "--chat",
            "meta-llama/Meta-Llama-3-8B-Instruct@v1",
            "--pretrained",
            &format!("meta-llama/Meta-Llama-3-8B@{COMMIT_A}"),
            "-o",
            s(&out),
        ],
    );
    ok(&o);
    assert_eq!(shard_hashes(&out), shard_hashes(&local));
    check_manifest_hashes(&out);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("chatvec-manifest.json")).unwrap()).unwrap();
    let hub = |i: usize| m["inputs"][i]["hub"].clone();
    assert_eq!(hub(0)["repo"], "tokyotech-llm/Llama-3-Swallow-8B-v0.1");
    assert_eq!(hub(0)["revision"], "main");
    assert_eq!(hub(0)["commit"], COMMIT_A);
    assert_eq!(hub(1)["revision"], "v1");
    assert_eq!(hub(1)["commit"], COMMIT_B);
    assert_eq!(hub(2)["revision"], COMMIT_A);

    // HF_HOME/hub is used when HF_HUB_CACHE is not set.
    let home = d.path().join("hfhome");
    std::fs::create_dir(&home).unwrap();
    std::fs::rename(&cache, home.join("hub")).unwrap();
    let o = command()
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env("HF_HOME", &home)
        .args(["inspect", "--json", "meta-llama/Meta-Llama-3-8B"])
        .output()
        .unwrap();
    ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(v["path"].as_str().unwrap().ends_with(&format!("snapshots/{COMMIT_A}")));
}

#[test]
fn missing_models_revisions_and_shards_are_named() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 3);
    let cache = d.path().join("hub");
    cache_model(&cache, &t.base, "org/base", COMMIT_A, &["main"]);

    let o = with_cache(&cache, &["inspect", "org/absent"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("model org/absent is not in the Hugging Face cache")
            && e.contains("hint: download it first: `huggingface-cli download org/absent`"),
        "{e}"
    );

    let o = with_cache(&cache, &["inspect", "org/base@nightly"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("revision 'nightly' of org/base is not"), "{}", stderr(&o));

    std::fs::write(cache.join("models--org--base/refs/broken"), "not-a-sha").unwrap();
    let o = with_cache(&cache, &["inspect", "org/base@broken"]);
    assert!(stderr(&o).contains("refs/broken") && stderr(&o).contains("40-hex"), "{}", stderr(&o));

    // A snapshot that lacks a shard its index names (an interrupted download).
    std::fs::remove_file(
        cache.join(format!("models--org--base/snapshots/{COMMIT_A}/model-00002-of-00003.safetensors")),
    )
    .unwrap();
    let o = with_cache(&cache, &["inspect", "org/base"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("model-00002-of-00003.safetensors"), "{}", stderr(&o));

    let o = with_cache(&cache, &["inspect", "not a model"]);
    assert!(stderr(&o).contains("neither a local directory nor a Hub id"), "{}", stderr(&o));
}
