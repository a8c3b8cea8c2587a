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
        .env("HF_HUB_OFFLINE", "1")
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
            && e.contains("chatvec downloads it; or run `hf download org/absent`"),
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

#[test]
fn aliases_and_shipped_recipes_run_the_users_words() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 2);
    let cache = d.path().join("hub");
    cache_model(&cache, &t.pre, "meta-llama/Meta-Llama-3-8B", COMMIT_A, &["main"]);
    cache_model(&cache, &t.chat, "meta-llama/Meta-Llama-3-8B-Instruct", COMMIT_B, &["main"]);
    cache_model(&cache, &t.base, "tokyotech-llm/Llama-3-Swallow-8B-v0.1", COMMIT_A, &["main"]);
    let local = d.path().join("local");
    ok(&apply_streaming(&t, &local, &["-q"]));

    // chatvec apply --base swallow-8b --vector llama3-instruct
    let out = d.path().join("swallow-8b-cv");
    let o =
        with_cache(&cache, &["apply", "--base", "swallow-8b", "--vector", "llama3-instruct", "-o", s(&out)]);
    ok(&o);
    assert!(stderr(&o).contains("vector llama3-instruct = llama3-8b-instruct - llama3-8b"), "{}", stderr(&o));
    assert_eq!(shard_hashes(&out), shard_hashes(&local));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("chatvec-manifest.json")).unwrap()).unwrap();
    assert_eq!(m["inputs"][0]["reference"], "swallow-8b");
    assert_eq!(m["inputs"][0]["hub"]["repo"], "tokyotech-llm/Llama-3-Swallow-8B-v0.1");
    assert_eq!(m["inputs"][1]["hub"]["commit"], COMMIT_B);
    // The card's front matter is YAML the Hub reads: every input is a base_model.
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    let front = card.strip_prefix("---\n").and_then(|c| c.split_once("---\n")).expect("front matter").0;
    let meta: serde_json::Value = serde_yaml_ng::from_str(front).unwrap();
    assert_eq!(
        meta["base_model"],
        serde_json::json!([
            "tokyotech-llm/Llama-3-Swallow-8B-v0.1",
            "meta-llama/Meta-Llama-3-8B-Instruct",
            "meta-llama/Meta-Llama-3-8B"
        ]),
        "{card}"
    );
    assert_eq!(meta["base_model_relation"], "merge", "{card}");
    assert_eq!(meta["tags"], serde_json::json!(["chatvec", "merge", "chat-vector"]), "{card}");

    // The shipped recipe does the same, and verify --recipe accepts it.
    let viar = d.path().join("viar");
    ok(&with_cache(&cache, &["-q", "merge", "llama3-swallow-8b-chat-vector", "-o", s(&viar)]));
    assert_eq!(shard_hashes(&viar), shard_hashes(&local));
    let o = with_cache(&cache, &["verify", s(&viar), "--recipe", "llama3-swallow-8b-chat-vector"]);
    ok(&o);
    assert!(stdout(&o).contains("OK:"), "{}", stdout(&o));

    // A user's aliases file adds names and replaces built-in ones.
    let mine = d.path().join("mine.toml");
    std::fs::write(
        &mine,
        format!(
            "[models]\nswallow-8b = {{ repo = \"meta-llama/Meta-Llama-3-8B\", revision = \"{COMMIT_A}\" }}\n[vectors]\nmy-vector = {{ chat = \"llama3-8b-instruct\", pretrained = \"llama3-8b\" }}\n"
        ),
    )
    .unwrap();
    let o = command()
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1")
        .env("CHATVEC_ALIASES", &mine)
        .args(["inspect", "--json", "swallow-8b"])
        .output()
        .unwrap();
    ok(&o);
    assert!(stdout(&o).contains("models--meta-llama--Meta-Llama-3-8B/snapshots"), "{}", stdout(&o));
    let other = d.path().join("other");
    let o = with_cache(
        &cache,
        &[
            "-q",
            "--aliases",
            s(&mine),
            "apply",
            "--base",
            "llama3-8b",
            "--vector",
            "my-vector",
            "-o",
            s(&other),
        ],
    );
    ok(&o);

    // A bad aliases file is named.
    std::fs::write(&mine, "[models]\nx = { repo = \"a/b\", rev = \"main\" }\n").unwrap();
    let o = with_cache(&cache, &["--aliases", s(&mine), "inspect", "swallow-8b"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("mine.toml: models.x: unknown key 'rev'"), "{}", stderr(&o));
}
