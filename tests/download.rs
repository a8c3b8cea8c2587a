//! Downloads from a fake Hub: a small HTTP server on 127.0.0.1 that answers
//! the two endpoints chatvec uses (revision info, file resolve) from model
//! directories the test generates. Nothing leaves the machine.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};

use common::hub::*;
use common::*;
use serde_json::json;

#[test]
fn downloads_resume_verify_and_land_in_the_cache_layout() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 2);
    let hub = Hub::start(vec![("org/model", &t.base, Fault::Break(usize::MAX))]);
    let cache = d.path().join("hub");

    // Every attempt breaks off mid-file: five retries, then a clear error,
    // a partial blob, nothing in the snapshot that was not checked.
    // A transfer that breaks off is an I/O error (exit 2), not bad input.
    let o = hub.run(&cache, &["inspect", "org/model"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(stderr(&o).matches("retrying in").count(), 5, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("broke off") && stderr(&o).contains("run the command again to resume"),
        "{}",
        stderr(&o)
    );
    let repo = cache.join("models--org--model");
    let partial: Vec<String> =
        entries(&repo.join("blobs")).into_iter().filter(|e| e.ends_with(".incomplete")).collect();
    assert_eq!(partial.len(), 1);
    let big = largest(&t.base);
    assert!(!repo.join("snapshots").join(COMMIT).join(&big).exists());

    // The second (the server healthy again) resumes with a Range request
    // and completes.
    hub.set_fault("org/model", Fault::Healthy);
    let o = hub.run(&cache, &["inspect", "--json", "org/model"]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(v["path"].as_str().unwrap().ends_with(&format!("models--org--model/snapshots/{COMMIT}")));
    let log = hub.log.lock().unwrap().clone();
    assert!(log.iter().any(|l| l.contains(&big) && l.contains("bytes=")), "{log:?}");
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap(), COMMIT);
    for f in entries(&t.base) {
        let link = repo.join("snapshots").join(COMMIT).join(&f);
        let target = std::fs::read_link(&link).unwrap();
        assert!(target.starts_with("../../blobs/"), "{target:?}");
        assert_eq!(std::fs::read(&link).unwrap(), std::fs::read(t.base.join(&f)).unwrap(), "{f}");
        if f.ends_with(".safetensors") {
            assert_eq!(target.file_name().unwrap().to_string_lossy(), sha256_file(&t.base.join(&f)));
        }
    }
    assert!(!entries(&repo.join("blobs")).iter().any(|e| e.ends_with(".incomplete")));

    // The merged output equals one made from the local directory, and the
    // manifest pins the commit.
    let out = d.path().join("out");
    let o = hub.run(
        &cache,
        &[
            "-q",
            "apply",
            "--base",
            "org/model",
            "--chat",
            s(&t.chat),
            "--pretrained",
            s(&t.pre),
            "-o",
            s(&out),
        ],
    );
    ok(&o);
    let local = d.path().join("local");
    ok(&apply_streaming(&t, &local, &["-q"]));
    assert_eq!(shard_hashes(&out), shard_hashes(&local));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("chatvec-manifest.json")).unwrap()).unwrap();
    assert_eq!(m["inputs"][0]["hub"]["commit"], COMMIT);

    // Offline: no request is made, the cache serves.
    let before = hub.log.lock().unwrap().len();
    let o = hub.run(&cache, &["--offline", "inspect", "org/model"]);
    ok(&o);
    assert_eq!(hub.log.lock().unwrap().len(), before);
    let o = hub.run(&cache, &["--offline", "inspect", "org/other"]);
    assert!(stderr(&o).contains("model org/other is not in the Hugging Face cache"), "{}", stderr(&o));
}

#[test]
fn corrupt_gated_and_missing_downloads_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let hub = Hub::start(vec![
        ("org/bad", &t.base, Fault::Corrupt(usize::MAX)),
        ("org/gated", &t.chat, Fault::Gated),
    ]);
    let cache = d.path().join("hub");

    let o = hub.run(&cache, &["inspect", "org/bad"]);
    assert_eq!(o.status.code(), Some(2), "a corrupt transfer is an I/O error");
    let e = stderr(&o);
    assert!(e.contains("downloaded model.safetensors is corrupt") && e.contains("sha256"), "{e}");
    assert!(e.contains("downloading it once more"), "one more try before the error: {e}");
    let repo = cache.join("models--org--bad");
    assert!(
        entries(&repo.join("blobs")).iter().all(|b| !b.ends_with(".incomplete")),
        "{:?}",
        entries(&repo.join("blobs"))
    );
    assert!(!repo.join("snapshots").join(COMMIT).join("model.safetensors").exists());

    let o = hub.run(&cache, &["inspect", "org/gated"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("asks for a token to read org/gated (401)")
            && stderr(&o).contains("HF_TOKEN or run `hf auth login`"),
        "{}",
        stderr(&o)
    );
    let o = command()
        .env("HF_ENDPOINT", format!("http://127.0.0.1:{}", hub.port))
        .env("HF_HUB_CACHE", &cache)
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_TOKEN", "secret")
        .args(["inspect", "org/gated"])
        .output()
        .unwrap();
    ok(&o);

    let o = hub.run(&cache, &["inspect", "org/none"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("the Hub has no model org/none@main"), "{}", stderr(&o));
}

#[test]
fn a_token_without_access_is_told_with_the_hubs_own_message() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let hub = Hub::start(vec![("org/forbidden", &t.base, Fault::Forbidden)]);
    let cache = d.path().join("hub");
    let o = hub
        .command(&cache)
        .env("HF_TOKEN", "hf_valid_but_not_approved")
        .args(["inspect", "org/forbidden"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("refused your token access to org/forbidden (403)"), "{e}");
    assert!(e.contains("the Hub says \"Access to model org/forbidden is restricted"), "{e}");
    assert!(!e.contains("set HF_TOKEN"), "a token was given: {e}");
}

#[test]
fn a_bare_name_looked_up_on_the_hub_says_so_with_the_nearest_aliases() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let hub = Hub::start(vec![("org/model", &t.base, Fault::Healthy)]);
    let cache = d.path().join("hub");
    let o = hub.run(&cache, &["inspect", "llama-three-swallow"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains(
            "'llama-three-swallow' is neither a local directory nor an alias, so it was looked up as a Hub id"
        ),
        "{e}"
    );
    assert!(e.contains("the Hub has no model llama-three-swallow@main"), "{e}");
    assert!(e.contains("nearest aliases: ") && e.contains("swallow"), "{e}");
}

#[test]
fn temporary_download_files_are_never_written_through_planted_links() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let hub = Hub::start(vec![("org/model", &t.base, Fault::Healthy)]);
    let cache = d.path().join("hub");
    let blobs = cache.join("models--org--model").join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let weights = sha256_file(&t.base.join("model.safetensors"));
    let config = git_blob_id(&std::fs::read(t.base.join("config.json")).unwrap());
    // Files of the user's that links planted in the cache point at.
    let victims: Vec<PathBuf> = (0..4).map(|i| d.path().join(format!("victim{i}"))).collect();
    for v in &victims {
        std::fs::write(v, "precious").unwrap();
    }
    let planted = [
        format!("{weights}.chatvec-ranges"),
        format!("{weights}.chatvec-ranges.json"),
        format!("{weights}.incomplete"),
        format!("{config}.incomplete"),
    ];
    for (name, victim) in planted.iter().zip(&victims) {
        std::os::unix::fs::symlink(victim, blobs.join(name)).unwrap();
    }
    // Ranged (a 1-byte threshold) and single-stream downloads both.
    for ranged in ["1", "1000000000"] {
        let o = hub
            .command(&cache)
            .env("CHATVEC_RANGE_MIN", ranged)
            .args(["inspect", "org/model"])
            .output()
            .unwrap();
        ok(&o);
        assert!(
            stderr(&o).contains("symbolic link where chatvec keeps a download's temporary file"),
            "{}",
            stderr(&o)
        );
        for v in &victims {
            assert_eq!(std::fs::read_to_string(v).unwrap(), "precious", "{}", v.display());
        }
        for b in entries(&blobs) {
            let m = std::fs::symlink_metadata(blobs.join(&b)).unwrap();
            assert!(m.file_type().is_file(), "{b} is not a regular file: {}", stderr(&o));
        }
        assert_eq!(
            std::fs::read(blobs.join(&weights)).unwrap(),
            std::fs::read(t.base.join("model.safetensors")).unwrap()
        );
        // Plant them again for the other mode.
        std::fs::remove_dir_all(&cache).unwrap();
        std::fs::create_dir_all(&blobs).unwrap();
        for (name, victim) in planted.iter().zip(&victims) {
            std::os::unix::fs::symlink(victim, blobs.join(name)).unwrap();
        }
    }
}

#[test]
fn a_download_stops_at_the_listed_size_and_keeps_nothing_past_it() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let hub = Hub::start(vec![("org/model", &t.base, Fault::Oversize)]);
    let cache = d.path().join("hub");
    let listed = std::fs::metadata(t.base.join("config.json")).unwrap().len();
    let o = hub.run(&cache, &["inspect", "org/model"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("more than the {listed} bytes expected")), "{}", stderr(&o));
    // Nothing of config.json stays, and no file in the cache grew past it.
    let blobs = cache.join("models--org--model").join("blobs");
    for b in entries(&blobs) {
        let len = std::fs::metadata(blobs.join(&b)).unwrap().len();
        assert!(
            len <= std::fs::metadata(t.base.join("model.safetensors")).unwrap().len(),
            "{b}: {len} bytes"
        );
        assert!(!b.ends_with(".incomplete"), "{b} was kept");
    }
    assert!(!cache.join("models--org--model/snapshots").join(COMMIT).join("config.json").exists());
}

#[test]
fn a_trickling_server_counts_as_dropped_and_every_hub_request_is_retried() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let hub = Hub::start(vec![
        ("org/trickle", &t.base, Fault::Trickle(1)),
        ("org/info", &t.chat, Fault::InfoUnavailable(2)),
    ]);
    let cache = d.path().join("hub");
    let start = std::time::Instant::now();
    let o = hub
        .command(&cache)
        .env("HF_HUB_DOWNLOAD_TIMEOUT", "0.2")
        .args(["inspect", "org/trickle"])
        .output()
        .unwrap();
    ok(&o);
    assert!(stderr(&o).contains("stalled") && stderr(&o).contains("retrying"), "{}", stderr(&o));
    assert!(start.elapsed() < std::time::Duration::from_secs(10), "{:?}", start.elapsed());
    let snap = cache.join("models--org--trickle/snapshots").join(COMMIT);
    assert_eq!(
        std::fs::read(snap.join("model.safetensors")).unwrap(),
        std::fs::read(t.base.join("model.safetensors")).unwrap()
    );
    // The revision-info call is retried like the file reads.
    let o = hub.run(&cache, &["inspect", "org/info"]);
    ok(&o);
    assert!(stderr(&o).contains("503") && stderr(&o).contains("retry 2 of 5"), "{}", stderr(&o));
}

/// Sends SIGINT to `child` once `ready` holds, and returns how long it took
/// to exit after that, with its output.
fn interrupt_when(
    mut child: std::process::Child,
    ready: impl Fn() -> bool,
) -> (std::time::Duration, std::process::Output) {
    let start = std::time::Instant::now();
    while !ready() {
        assert!(start.elapsed() < std::time::Duration::from_secs(20), "never got ready");
        assert!(child.try_wait().unwrap().is_none(), "exited early: {:?}", child.wait_with_output());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let sent = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() && sent.elapsed() < std::time::Duration::from_secs(15) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let took = sent.elapsed();
    let _ = child.kill();
    (took, child.wait_with_output().unwrap())
}

#[test]
fn ctrl_c_during_a_header_probe_or_a_lock_wait_stops_within_a_second() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    // Two stand-ins: the hanging one serves nothing else while it hangs.
    let hub = Hub::start(vec![("org/hang", &t.base, Fault::Hang)]);
    let other = Hub::start(vec![("org/locked", &t.pre, Fault::Healthy)]);
    let cache = d.path().join("hub");
    let out = d.path().join("out");
    let spawn = |hub: &Hub, args: &[&str]| {
        hub.command(&cache)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let child = spawn(
        &hub,
        &[
            "apply",
            "--base",
            "org/hang",
            "--chat",
            s(&t.chat),
            "--pretrained",
            s(&t.pre),
            "-o",
            s(&out),
            "--dry-run",
        ],
    );
    let log = hub.log.clone();
    let (took, o) =
        interrupt_when(child, || log.lock().unwrap().iter().any(|l| l.contains("model.safetensors bytes=")));
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(took < std::time::Duration::from_secs(1), "took {took:?}");

    // Another process holds the lock of a blob this one needs.
    let weights = sha256_file(&t.pre.join("model.safetensors"));
    let locks = cache.join(".locks").join("models--org--locked");
    std::fs::create_dir_all(&locks).unwrap();
    let lock = std::fs::File::create(locks.join(format!("{weights}.lock"))).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) }, 0);
    let child = spawn(&other, &["inspect", "org/locked"]);
    let started = std::time::Instant::now();
    let (took, o) = interrupt_when(child, || started.elapsed() > std::time::Duration::from_millis(1800));
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(took < std::time::Duration::from_secs(1), "took {took:?}");
    assert!(stderr(&o).contains("waiting for another process downloading"), "{}", stderr(&o));
    // And the wait has a bound when the other download makes no progress.
    let o = other
        .command(&cache)
        .env("CHATVEC_LOCK_TIMEOUT", "1")
        .args(["inspect", "org/locked"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("without its download") && stderr(&o).contains("making progress"),
        "{}",
        stderr(&o)
    );
    drop(lock);
}

#[test]
fn probe_directories_left_by_killed_runs_are_removed() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let hub = Hub::start(vec![("org/base", &t.base, Fault::Healthy)]);
    let cache = d.path().join("hub");
    let tmp = d.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    // A pid that is gone, and one that is running (this test's).
    let mut c = std::process::Command::new("true").spawn().unwrap();
    c.wait().unwrap();
    let dead = c.id();
    let killed = tmp.join(format!("chatvec-probe-{dead}-AbC123"));
    std::fs::create_dir_all(killed.join("org--base")).unwrap();
    std::fs::write(killed.join("org--base/model.safetensors"), vec![0u8; 4096]).unwrap();
    let running = tmp.join(format!("chatvec-probe-{}-XyZ789", std::process::id()));
    std::fs::create_dir(&running).unwrap();
    let elsewhere = d.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, tmp.join(format!("chatvec-probe-{dead}-Link00"))).unwrap();
    let out = d.path().join("out");
    let o = hub
        .command(&cache)
        .env("TMPDIR", &tmp)
        .args([
            "apply",
            "--base",
            "org/base",
            "--chat",
            s(&t.chat),
            "--pretrained",
            s(&t.pre),
            "-o",
            s(&out),
            "--dry-run",
        ])
        .output()
        .unwrap();
    ok(&o);
    assert!(stderr(&o).contains(&format!("process {dead} is gone")), "{}", stderr(&o));
    assert!(!killed.exists() && running.is_dir() && elsewhere.is_dir());
    // This run's own probe went with it.
    let left: Vec<String> =
        entries(&tmp).into_iter().filter(|e| !e.contains("XyZ789") && !e.contains("Link00")).collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_mismatched_pair_is_refused_and_a_dry_run_planned_with_only_headers_fetched() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 2);
    // A "chat model" of another vocabulary: the subtraction cannot line up.
    let other = d.path().join("other");
    write_model(&other, &llama(2, 20, false, Ty::BF16), 1, &config(20, false, LAYERS), Some(&tokens(20)));
    let hub = Hub::start(vec![
        ("org/base", &t.base, Fault::Healthy),
        ("org/chat", &t.chat, Fault::Healthy),
        ("org/pre", &t.pre, Fault::Healthy),
        ("org/other", &other, Fault::Healthy),
    ]);
    let cache = d.path().join("hub");
    let weight_requests = |log: &[String]| -> Vec<String> {
        log.iter().filter(|l| l.contains(".safetensors ") && !l.contains(".index.json")).cloned().collect()
    };
    let out = d.path().join("out");
    let o = hub.run(
        &cache,
        &["apply", "--base", "org/base", "--chat", "org/other", "--pretrained", "org/pre", "-o", s(&out)],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("lm_head.weight") || stderr(&o).contains("vocab"), "{}", stderr(&o));
    // The bytes served of weight files are exactly each shard's 8-byte
    // length and its header, no more.
    let header_bytes: u64 = [&t.base, &other, &t.pre]
        .iter()
        .flat_map(|dir| {
            entries(dir).into_iter().filter(|f| f.ends_with(".safetensors")).map(move |f| dir.join(f))
        })
        .map(|p| {
            let mut n = [0u8; 8];
            std::fs::File::open(&p).unwrap().read_exact(&mut n).unwrap();
            8 + u64::from_le_bytes(n)
        })
        .sum();
    assert_eq!(hub.weight_bytes(), header_bytes);
    let log = hub.log.lock().unwrap().clone();
    let w = weight_requests(&log);
    assert!(!w.is_empty() && w.iter().all(|l| l.contains("bytes=0-7") || l.contains("bytes=8-")), "{w:?}");
    // No weight was stored: the cache holds the small files only.
    for repo in ["models--org--base", "models--org--other", "models--org--pre"] {
        let snap = cache.join(repo).join("snapshots").join(COMMIT);
        assert!(entries(&snap).iter().all(|f| !f.ends_with(".safetensors")), "{repo}: {:?}", entries(&snap));
    }
    assert!(!out.exists());

    // A dry run of a good pair plans on headers only.
    let apply = |extra: &[&str]| {
        let mut a = vec![
            "apply",
            "--base",
            "org/base",
            "--chat",
            "org/chat",
            "--pretrained",
            "org/pre",
            "-o",
            s(&out),
        ];
        a.extend(extra);
        hub.run(&cache, &a)
    };
    let before = hub.log.lock().unwrap().len();
    let o = apply(&["--dry-run"]);
    ok(&o);
    assert!(stdout(&o).contains("model.layers.0.mlp.up_proj.weight"), "{}", stdout(&o));
    assert!(stderr(&o).contains("no weights were downloaded"), "{}", stderr(&o));
    let log = hub.log.lock().unwrap().clone();
    let w = weight_requests(&log[before..]);
    assert!(w.iter().all(|l| l.contains("bytes=0-7") || l.contains("bytes=8-")), "{w:?}");
    // Then for real: the same bytes as from the local directories.
    let o = apply(&["-q"]);
    ok(&o);
    let local = d.path().join("local");
    ok(&apply_streaming(&t, &local, &["-q"]));
    assert_eq!(shard_hashes(&out), shard_hashes(&local));
}

#[test]
fn two_processes_downloading_one_repo_at_once_leave_a_correct_shared_cache() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 3);
    let hub = Hub::start(vec![("org/model", &t.base, Fault::Healthy)]);
    let cache = d.path().join("hub");
    let spawn = || {
        hub.command(&cache)
            .args(["-q", "inspect", "org/model"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    for child in [a, b] {
        let o = child.wait_with_output().unwrap();
        ok(&o);
    }
    let repo = cache.join("models--org--model");
    // Every file is linked to a whole, checked blob; nothing half-written.
    for f in entries(&t.base) {
        let link = repo.join("snapshots").join(COMMIT).join(&f);
        assert_eq!(std::fs::read(&link).unwrap(), std::fs::read(t.base.join(&f)).unwrap(), "{f}");
    }
    let blobs = entries(&repo.join("blobs"));
    assert!(blobs.iter().all(|b| !b.ends_with(".incomplete")), "{blobs:?}");
    assert_eq!(blobs.len(), entries(&t.base).len(), "one blob per file: {blobs:?}");
    // huggingface_hub's conventions: a lock per blob, absent side files marked.
    let locks = entries(&cache.join(".locks").join("models--org--model"));
    assert!(locks.iter().all(|l| l.ends_with(".lock")) && !locks.is_empty(), "{locks:?}");
    assert!(repo.join(".no_exist").join(COMMIT).join("generation_config.json").is_file());
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap(), COMMIT);
}

#[test]
fn large_files_download_as_parallel_ranges_that_resume_and_verify() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 2);
    let hub = Hub::start(vec![
        ("org/model", &t.base, Fault::Break(usize::MAX)),
        ("org/fresh", &t.chat, Fault::Healthy),
    ]);
    let cache = d.path().join("hub");
    let run = |repo: &str| {
        hub.command(&cache)
            // Every weight file counts as large here.
            .env("CHATVEC_RANGE_MIN", "1")
            .args(["-q", "inspect", repo])
            .output()
            .unwrap()
    };
    // A healthy ranged download asks for each byte exactly once and hashes
    // as it goes: no range file, join or record is left.
    let big = largest(&t.chat);
    let before = hub.log.lock().unwrap().len();
    ok(&run("org/fresh"));
    let size = std::fs::metadata(t.chat.join(&big)).unwrap().len();
    assert_eq!(hub.ranged_bytes(&format!("/org/fresh/resolve/{COMMIT}/{big}"), before), size);
    let fresh = cache.join("models--org--fresh");
    let blobs = entries(&fresh.join("blobs"));
    assert!(blobs.iter().all(|b| !b.contains(".incomplete") && !b.contains(".chatvec-")), "{blobs:?}");
    let link = fresh.join("snapshots").join(COMMIT).join(&big);
    assert_eq!(std::fs::read(&link).unwrap(), std::fs::read(t.chat.join(&big)).unwrap());

    // Every request for the largest file breaks off: after the retries an
    // I/O error, with what arrived kept in place and each range's progress
    // recorded; nothing linked.
    let o = run("org/model");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("broke off") && stderr(&o).contains("resume"), "{}", stderr(&o));
    let repo = cache.join("models--org--model");
    let blobs = entries(&repo.join("blobs"));
    let record = blobs.iter().find(|b| b.ends_with(".chatvec-ranges.json")).expect("a progress record");
    assert!(blobs.iter().any(|b| b.ends_with(".chatvec-ranges")), "{blobs:?}");
    assert!(
        blobs.iter().all(|b| !b.ends_with(".incomplete")),
        "huggingface_hub must not resume it: {blobs:?}"
    );
    let big = largest(&t.base);
    assert!(!repo.join("snapshots").join(COMMIT).join(&big).exists());
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.join("blobs").join(record)).unwrap()).unwrap();
    let kept: u64 = rec["ranges"].as_array().unwrap().iter().map(|r| r[2].as_u64().unwrap()).sum();
    let size = std::fs::metadata(t.base.join(&big)).unwrap().len();
    assert!(kept > 0 && kept < size, "{rec}");

    // The server heals: the next run asks only for the missing bytes of
    // each range, and the file checks out.
    hub.set_fault("org/model", Fault::Healthy);
    let before = hub.log.lock().unwrap().len();
    ok(&run("org/model"));
    assert_eq!(hub.ranged_bytes(&format!("/org/model/resolve/{COMMIT}/{big}"), before), size - kept);
    for f in entries(&t.base) {
        let link = repo.join("snapshots").join(COMMIT).join(&f);
        assert_eq!(std::fs::read(&link).unwrap(), std::fs::read(t.base.join(&f)).unwrap(), "{f}");
    }
    let blobs = entries(&repo.join("blobs"));
    assert!(blobs.iter().all(|b| !b.contains(".incomplete") && !b.contains(".chatvec-")), "{blobs:?}");
}

/// Faults a long download meets (a dropped connection, a stalled one, a
/// 503, a range served corrupt once) are ridden out within one run, with a
/// warning for each, and end with the right bytes.
#[test]
fn dropped_connections_503s_and_a_corrupt_range_are_retried_within_one_run() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 2);
    let hub = Hub::start(vec![
        ("org/drop", &t.base, Fault::Break(3)),
        ("org/busy", &t.chat, Fault::Unavailable(2)),
        ("org/flip", &t.pre, Fault::Corrupt(1)),
        ("org/stall", &t.pre, Fault::Stall(1)),
    ]);
    let cache = d.path().join("hub");
    for (repo, dir, ranged, said) in [
        ("org/drop", &t.base, false, "broke off"),
        ("org/busy", &t.chat, false, "503"),
        ("org/flip", &t.pre, true, "is corrupt"),
        ("org/drop", &t.base, true, "broke off"),
        ("org/stall", &t.pre, false, "timeout"),
    ] {
        let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
        let _ = std::fs::remove_dir_all(&folder);
        hub.set_fault(
            repo,
            match repo {
                "org/drop" => Fault::Break(3),
                "org/busy" => Fault::Unavailable(2),
                "org/stall" => Fault::Stall(1),
                _ => Fault::Corrupt(1),
            },
        );
        let mut c = hub.command(&cache);
        // A read that waits 0.3 s for bytes gives up (the stall lasts 1.5 s).
        c.env("HF_HUB_DOWNLOAD_TIMEOUT", "0.3");
        if ranged {
            c.env("CHATVEC_RANGE_MIN", "1");
        }
        let o = c.args(["inspect", repo]).output().unwrap();
        ok(&o);
        let e = stderr(&o);
        assert!(e.contains(said), "{repo} (ranged {ranged}): {e}");
        let again = if said == "is corrupt" { "downloading it once more" } else { "retrying in" };
        assert!(e.contains(again), "{repo}: {e}");
        for f in entries(dir) {
            let link = folder.join("snapshots").join(COMMIT).join(&f);
            assert_eq!(std::fs::read(&link).unwrap(), std::fs::read(dir.join(&f)).unwrap(), "{repo}: {f}");
        }
    }
}

/// huggingface_hub's `snapshot_download` into the cache at argv[1] from
/// the endpoint argv[2], then its own cache scan: the warnings it reports
/// (corrupted or unknown files), one per line.
const HF_SNAPSHOT_AND_SCAN: &str = r#"
import sys
from huggingface_hub import scan_cache_dir, snapshot_download
snapshot_download("org/model", cache_dir=sys.argv[1], endpoint=sys.argv[2])
report = scan_cache_dir(sys.argv[1])
for w in report.warnings:
    print("WARNING", w)
print("repos", len(report.repos))
"#;

#[test]
#[ignore = "needs huggingface_hub: CHATVEC_SFT_PYTHON=$(scripts/sft-venv.sh) cargo test --test download -- --ignored"]
fn chatvec_and_huggingface_hub_fill_one_cache_at_once() {
    let py = std::env::var_os("CHATVEC_SFT_PYTHON").map(PathBuf::from).expect("CHATVEC_SFT_PYTHON");
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 3);
    let hub = Hub::start(vec![("org/model", &t.base, Fault::Healthy)]);
    let cache = d.path().join("hub");
    let endpoint = format!("http://127.0.0.1:{}", hub.port);
    let python = std::process::Command::new(&py)
        .arg("-c")
        .arg(HF_SNAPSHOT_AND_SCAN)
        .arg(&cache)
        .arg(&endpoint)
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env("HF_HUB_DISABLE_XET", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let o = hub.run(&cache, &["-q", "inspect", "org/model"]);
    ok(&o);
    let p = python.wait_with_output().unwrap();
    assert!(p.status.success(), "{}", String::from_utf8_lossy(&p.stderr));
    let said = String::from_utf8_lossy(&p.stdout).to_string();
    assert!(!said.contains("WARNING"), "{said}");
    assert!(said.contains("repos 1"), "{said}");
    // A second scan after chatvec: the cache is still whole.
    let o = std::process::Command::new(&py)
        .arg("-c")
        .arg("import sys\nfrom huggingface_hub import scan_cache_dir\nr = scan_cache_dir(sys.argv[1])\nprint(len(r.warnings), len(r.repos))")
        .arg(&cache)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "0 1", "{}", String::from_utf8_lossy(&o.stderr));
    let repo = cache.join("models--org--model");
    for f in entries(&t.base) {
        let link = repo.join("snapshots").join(COMMIT).join(&f);
        assert_eq!(std::fs::read(&link).unwrap(), std::fs::read(t.base.join(&f)).unwrap(), "{f}");
    }
}

#[test]
fn sft_checks_a_hub_model_on_its_probe_and_a_dry_run_downloads_no_weights() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 2);
    let template = "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}";
    std::fs::write(t.base.join("tokenizer_config.json"), json!({"chat_template": template}).to_string())
        .unwrap();
    let hub = Hub::start(vec![("org/model", &t.base, Fault::Healthy)]);
    let cache = d.path().join("hub");
    let data = d.path().join("data.jsonl");
    std::fs::write(&data, "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n").unwrap();
    let py = d.path().join("fake-python");
    std::fs::write(
        &py,
        "#!/bin/sh\necho '{\"python\": \"3.11.0\", \"packages\": {\"torch\": \"2.5.0\", \"transformers\": \"5.23.0\", \"trl\": \"1.16.0\", \"accelerate\": \"1.15.0\", \"datasets\": \"5.2.0\"}, \"cuda_devices\": 0}'\n",
    )
    .unwrap();
    let mut perm = std::fs::metadata(&py).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&py, perm).unwrap();
    let run = d.path().join("run");
    let o = hub.run(
        &cache,
        &["sft", "--model", "org/model", "--data", s(&data), "-o", s(&run), "--python", s(&py), "--dry-run"],
    );
    ok(&o);
    // The trainer is pointed at where the model will be, and no weight was fetched.
    let snap = cache.join("models--org--model").join("snapshots").join(COMMIT);
    assert!(stdout(&o).contains(&format!("model_name_or_path: {}", snap.display())), "{}", stdout(&o));
    assert!(entries(&snap).iter().all(|f| !f.ends_with(".safetensors")), "{:?}", entries(&snap));
    let log = hub.log.lock().unwrap().clone();
    let weights: Vec<&String> =
        log.iter().filter(|l| l.contains(".safetensors ") && !l.contains("index")).collect();
    assert!(weights.iter().all(|l| l.contains("bytes=0-7") || l.contains("bytes=8-")), "{weights:?}");
}

#[test]
fn a_corrupt_ranged_download_is_deleted_and_never_linked() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let hub = Hub::start(vec![("org/bad", &t.base, Fault::Corrupt(usize::MAX))]);
    let cache = d.path().join("hub");
    let o = hub.command(&cache).env("CHATVEC_RANGE_MIN", "1").args(["inspect", "org/bad"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("is corrupt") && stderr(&o).contains("sha256"), "{}", stderr(&o));
    let repo = cache.join("models--org--bad");
    let blobs = entries(&repo.join("blobs"));
    assert!(blobs.iter().all(|b| !b.contains(".incomplete") && !b.contains(".chatvec-")), "{blobs:?}");
    assert!(!repo.join("snapshots").join(COMMIT).join("model.safetensors").exists());
}

/// A weight file chatvec downloaded and verified goes into the input hash
/// cache under its blob's state, so the first merge after a download does
/// not hash the model again; the merge's manifest still records the right
/// sha256 of every input shard.
#[test]
fn a_verified_download_seeds_the_input_hash_cache() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 2);
    let hub = Hub::start(vec![("org/model", &t.base, Fault::Healthy)]);
    let cache = d.path().join("hub");
    let hashes = d.path().join("hash-cache");
    let o = hub
        .command(&cache)
        .env("CHATVEC_CACHE_DIR", &hashes)
        .args(["-q", "inspect", "org/model"])
        .output()
        .unwrap();
    ok(&o);
    let shards: Vec<String> = entries(&t.base).into_iter().filter(|f| f.ends_with(".safetensors")).collect();
    let mut want: Vec<String> = shards.iter().map(|f| sha256_file(&t.base.join(f))).collect();
    let mut got: Vec<String> = entries(&hashes.join("sha256"))
        .iter()
        .map(|e| std::fs::read_to_string(hashes.join("sha256").join(e)).unwrap().trim().to_string())
        .collect();
    want.sort();
    got.sort();
    assert_eq!(got, want, "one entry per downloaded weight file, holding its sha256");
    // The merge takes the base's hashes from those entries: one rewritten
    // by hand shows up in the manifest (`verify` never trusts the cache).
    let forged = "f".repeat(64);
    let first = entries(&hashes.join("sha256")).remove(0);
    let real = std::fs::read_to_string(hashes.join("sha256").join(&first)).unwrap();
    std::fs::write(hashes.join("sha256").join(&first), format!("{forged}\n")).unwrap();
    // A merge of the downloaded base into `out`; its manifest.
    let apply = |out: &Path| -> serde_json::Value {
        let args = [
            "-q",
            "apply",
            "--base",
            "org/model",
            "--chat",
            s(&t.chat),
            "--pretrained",
            s(&t.pre),
            "-o",
            s(out),
        ];
        ok(&hub.command(&cache).env("CHATVEC_CACHE_DIR", &hashes).args(args).output().unwrap());
        serde_json::from_slice(&std::fs::read(out.join("chatvec-manifest.json")).unwrap()).unwrap()
    };
    let manifest = apply(&d.path().join("probe")).to_string();
    assert!(manifest.contains(&forged), "the base's hash came from the cache");
    std::fs::write(hashes.join("sha256").join(&first), real).unwrap();

    let m = apply(&d.path().join("out"));
    let recorded: Vec<(String, String)> = m["inputs"][0]["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["file"].as_str().unwrap().to_string(), x["sha256"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(recorded.len(), shards.len(), "{m}");
    for (file, sha) in recorded {
        assert_eq!(sha, sha256_file(&t.base.join(&file)), "{file}");
    }
}

/// A ranged download that stopped, whose blob another tool then finished,
/// leaves nothing behind once chatvec next needs that blob.
#[test]
fn a_stopped_ranged_download_is_cleared_when_another_tool_finished_the_blob() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 1);
    let hub = Hub::start(vec![("org/model", &t.base, Fault::Break(usize::MAX))]);
    let cache = d.path().join("hub");
    let run = || {
        hub.command(&cache)
            .env("CHATVEC_RANGE_MIN", "1")
            .args(["-q", "inspect", "org/model"])
            .output()
            .unwrap()
    };
    assert_eq!(run().status.code(), Some(2));
    let blobs = cache.join("models--org--model").join("blobs");
    let big = largest(&t.base);
    let sha = sha256_file(&t.base.join(&big));
    assert!(blobs.join(format!("{sha}.chatvec-ranges.json")).is_file(), "{:?}", entries(&blobs));
    // huggingface_hub (say) completes the blob.
    std::fs::copy(t.base.join(&big), blobs.join(&sha)).unwrap();
    hub.set_fault("org/model", Fault::Healthy);
    ok(&run());
    let left = entries(&blobs);
    assert!(left.iter().all(|b| !b.contains(".chatvec-")), "{left:?}");
    let link = cache.join("models--org--model").join("snapshots").join(COMMIT).join(&big);
    assert_eq!(std::fs::read(link).unwrap(), std::fs::read(t.base.join(&big)).unwrap());
}

/// `chatvec download` fills the cache as a job would fetch the model, so
/// a later job runs offline; `--dry-run` lists files and sizes and
/// fetches no weight; `--include` takes only the matching files.
#[test]
fn download_prefetches_what_a_job_needs_and_dry_run_fetches_no_weights() {
    let d = tempfile::tempdir().unwrap();
    let t = trio(d.path(), Ty::BF16, 2);
    let hub = Hub::start(vec![
        ("org/base", &t.base, Fault::Healthy),
        ("org/chat", &t.chat, Fault::Healthy),
        ("org/pre", &t.pre, Fault::Healthy),
    ]);
    let cache = d.path().join("hub");
    let o = hub.run(&cache, &["download", "org/base", "--dry-run", "--json"]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let files = v["models"][0]["files"].as_array().unwrap();
    assert!(files.iter().any(|f| f["name"] == "model.safetensors.index.json"), "{v}");
    let shard = files.iter().find(|f| f["name"].as_str().unwrap().ends_with(".safetensors")).unwrap();
    let name = shard["name"].as_str().unwrap();
    assert_eq!(shard["size"].as_u64().unwrap(), std::fs::metadata(t.base.join(name)).unwrap().len());
    assert_eq!(v["models"][0]["commit"], COMMIT);
    assert_eq!(hub.weight_bytes(), 0, "a dry run fetches no weight");
    for m in ["org/base", "org/chat", "org/pre"] {
        ok(&hub.run(&cache, &["-q", "download", m]));
    }
    // Offline, the job finds everything it needs in the cache.
    let out = d.path().join("out");
    let o = hub
        .command(&cache)
        .env("HF_HUB_OFFLINE", "1")
        .args([
            "-q",
            "apply",
            "--base",
            "org/base",
            "--chat",
            "org/chat",
            "--pretrained",
            "org/pre",
            "-o",
            s(&out),
        ])
        .output()
        .unwrap();
    ok(&o);
    let again = hub.run(&cache, &["download", "org/base"]);
    ok(&again);
    assert!(stdout(&again).contains("0.00 GB downloaded"), "{}", stdout(&again));
    // Only the files a pattern names.
    let cache2 = d.path().join("hub2");
    ok(&hub.run(&cache2, &["-q", "download", "org/chat", "--include", "*.json"]));
    let snap = cache2.join("models--org--chat/snapshots").join(COMMIT);
    let got: Vec<String> = std::fs::read_dir(&snap)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!got.is_empty() && got.iter().all(|n| n.ends_with(".json")), "{got:?}");
    let o = hub.run(&cache2, &["download", "org/chat", "--include", "*.gguf"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("no file matches --include *.gguf"), "{}", stderr(&o));
    let o = hub.run(&cache2, &["download", "./local-dir"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}
